"""Shared fixtures: KVM gating, the test guest, and running ``pyvirt`` as users do."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REQUIRE_KVM = os.environ.get("PYVIRT_REQUIRE_KVM") == "1"

if "PYVIRT_CGROUP_PARENT" not in os.environ:
    # daemons started by tests put their VMs' cgroups below the test's own cgroup,
    # never at the host's cgroup root (pyvirt.manager.privilege)
    from pyvirt.manager.privilege import own_cgroup

    os.environ["PYVIRT_CGROUP_PARENT"] = own_cgroup()


def kvm_available() -> bool:
    return os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)


@pytest.fixture
def require_kvm() -> None:
    """Skip without /dev/kvm, unless CI demands KVM (PYVIRT_REQUIRE_KVM=1): then fail."""
    if not kvm_available():
        if REQUIRE_KVM:
            pytest.fail("/dev/kvm is missing or inaccessible and PYVIRT_REQUIRE_KVM=1")
        pytest.skip("/dev/kvm is not available")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        names = getattr(item, "fixturenames", [])
        if item.get_closest_marker("kvm") and "require_kvm" not in names:
            names.insert(0, "require_kvm")


@pytest.fixture(scope="session")
def test_guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small test guest ELF (tests/guests), built with the host's gcc."""
    out = tmp_path_factory.mktemp("testguest")
    subprocess.run(["sh", str(ROOT / "tests/guests/build.sh"), str(out)], check=True)
    return out / "testguest.elf"


def pyvirt_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pyvirt", *args]


def run_pyvirt(*args: str, input: bytes | None = None, timeout: float = 120,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``pyvirt ARGS`` to completion, stdin from ``input`` (or /dev/null)."""
    return subprocess.run(pyvirt_cmd(*args), input=input if input is not None else b"",
                          capture_output=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def tmp_cwd(tmp_path: Path) -> Iterator[Path]:
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(old)


def read_until(fd: int, needle: bytes, timeout: float = 60) -> bytes:
    """Read from ``fd`` until ``needle`` appears (or EOF/timeout); returns all read."""
    import select
    import time

    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        seen += chunk
    return seen
