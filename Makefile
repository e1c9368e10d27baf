# pyvirt — every target sets up what it needs, idempotently, on a fresh Debian 12.
#   make run    set up, build the default guest, boot it to a shell
#   make test   set up and run every test
#   make rootfs the Debian root filesystem image (debootstrap; needs root)
#   make bench  pyvirt vs QEMU side by side (docs/benchmarks.md)
#   make soak   N consecutive boots of the default guest (N=100)
#   make lint   ruff + mypy
#   make fuzz   coverage-guided fuzzing of every guest/user input, FUZZ_RUNS (10^6) per target

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := .make
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := python3-venv gcc binutils make linux-libc-dev kmod cpio acpica-tools \
	e2fsprogs qemu-system-x86 qemu-utils cmake pkg-config debootstrap libseccomp2 \
	passt iperf3 dnsmasq-base iproute2 iputils-ping nftables openssh-server \
	openssh-client openssl chromium
N ?= 100
FUZZ_RUNS ?= 1000000

.PHONY: run test bench soak lint setup guest rootfs clean engine fuzz web screenshots

run: setup guest
	$(VENV)/bin/pyvirt run $(ARGS)

test: setup guest rootfs
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

bench: setup guest rootfs
	$(PY) -m bench $(BENCH_ARGS)

# The README's pictures of the web GUI (docs/screenshots/), from a real daemon and VMs.
screenshots: setup guest
	$(PY) -m bench.screenshots

soak: setup guest
	$(PY) -m bench.soak --boots $(N)

# One target after another under nice -n 19 (atheris; results in build/fuzz/results.md,
# docs/security.md). FUZZ_ARGS: e.g. --targets virtqueue,pci_config --max-time 600
fuzz: setup
	$(PY) -m fuzz.run --runs $(FUZZ_RUNS) $(FUZZ_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests bench fuzz
	$(VENV)/bin/mypy

setup: $(STAMPS)/apt $(STAMPS)/venv engine $(STAMPS)/users web

# Re-checked whenever this Makefile changes (APT_PACKAGES may have grown). npm: any
# installed one will do (a Node.js from elsewhere brings its own), else Debian's.
$(STAMPS)/apt: Makefile
	@mkdir -p $(STAMPS)
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
		| grep -q 'install ok installed' || echo $$p; done); \
	command -v npm >/dev/null || missing="$$missing npm"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi
	@touch $@

$(STAMPS)/venv: pyproject.toml
	@mkdir -p $(STAMPS)
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

# pyvirtd's group "pyvirt" (may use the management socket) and the system user
# "pyvirt-vm" its VMMs run as (no login shell, no home, in group kvm when there is
# one): pyvirt.manager.privilege.ensure_users, idempotent. Elsewhere than root the
# daemon runs VMMs as its own user, so this says so and leaves no stamp.
$(STAMPS)/users: $(STAMPS)/venv
	@if [ "$$(id -u)" = 0 ]; then $(PY) -m pyvirt.manager.privilege ensure-users && touch $@; \
	else echo "users: skipped: creating the pyvirt group and pyvirt-vm user needs root"; fi

# The web GUI's front-end packages from the npm registry, pinned with their digests
# (src/pyvirt/web/vendor.json); quick when they are already there.
web: $(STAMPS)/apt $(STAMPS)/venv
	@$(PY) -m pyvirt.web.vendor

# The software CPU: unicorn built from its PyPI sdist with our patch series.
engine: $(STAMPS)/venv
	@if [ -x third_party/unicorn/build.sh ]; then third_party/unicorn/build.sh $(PY); fi

guest: $(STAMPS)/venv
	@$(PY) -m pyvirt.guest.build

# The Debian root filesystem for root=/dev/vda (~1 min once, then cached). debootstrap
# needs root: elsewhere this says so, and the tests that need the image skip.
rootfs: $(STAMPS)/apt $(STAMPS)/venv
	@if [ "$$(id -u)" = 0 ]; then $(PY) -m pyvirt.guest.rootfs; \
	else echo "rootfs: skipped: debootstrap needs root (run make rootfs as root)"; fi

clean:
	rm -rf $(STAMPS) build dist tests/guests/build third_party/unicorn/build
