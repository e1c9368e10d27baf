"""Build the default guest: a Debian 12 kernel and an initramfs written by pyvirt.

The kernel package (whatever ``linux-image-amd64`` depends on today) and
``busybox-static`` are fetched with ``apt-get download`` and unpacked with
``dpkg-deb -x``; ``depmod`` (Debian package kmod) indexes the modules. The
initramfs holds busybox with a symlink per applet, the virtio/vsock/ext4
modules and their dependencies, and our init scripts (see ``init`` and
``rcS.sh`` next to this file; the ready line comes from /etc/profile).

Results go to ``<cache>/guest/``: ``vmlinuz``, ``initramfs.cpio.gz``,
``kernel-version`` and ``manifest.json``. The manifest is written last and
removed first, so it marks a complete build; every file is written to a
temporary name and renamed into place.

Run ``python -m pyvirt.guest.build [--force]`` to build from the command line.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pyvirt.guest import READY_LINE, GuestBuildError
from pyvirt.guest.cpio import CpioWriter
from pyvirt.guest.modules import ModuleIndex, load_order, read_module, uncompressed_path
from pyvirt.paths import cache_dir

__all__ = [
    "GUEST_MODULES",
    "RECIPE_VERSION",
    "GuestImage",
    "build_default_guest",
    "cache_dir",
    "default_guest",
    "guest_is_built",
    "main",
]

#: bump when the build changes in a way the script hashes below do not capture
RECIPE_VERSION = 4

#: modules the guest loads at boot (their dependencies are added automatically)
GUEST_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "vmw_vsock_virtio_transport",
    "ext4",
    # the ACPI power button: button reports it as KEY_POWER on an input device
    # (evdev), which busybox acpid turns into a clean power-off
    "button",
    "evdev",
)

KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"

KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initramfs.cpio.gz"
VERSION_NAME = "kernel-version"
MANIFEST_NAME = "manifest.json"

# Package data: the scripts that end up in the initramfs.
_SCRIPTS = {
    "init": "init",
    "rcS.sh": "etc/init.d/rcS",
    "load-modules.sh": "etc/init.d/load-modules",
    "acpi-power.sh": "etc/acpi/PWRF/00000080",
    # eth0 by DHCP (or pyvirt.ip= static) at boot; udhcpc's hook applies the lease
    "net-up.sh": "etc/init.d/net-up",
    "udhcpc.script": "usr/share/udhcpc/default.script",
}

_INITTAB = """\
# busybox init: rcS first, then a shell on the kernel's console (ttyS0 or hvc0);
# cttyhack opens the real tty so the shell gets job control and Ctrl-C.
::sysinit:/etc/init.d/rcS
::respawn:/bin/cttyhack /bin/sh -l
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/sync
"""

_PROFILE = """\
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export PS1='# '
export HOME=/root
# pyvirt.noecho on the kernel command line: no echo and no line editing, so scripted
# input comes back as just the commands' output (and no "ESC[6n" cursor queries).
# Then busybox ash reads its input with stdio (fgets), which takes the EINTR of a
# SIGCHLD as end of input: a background job of this shell that ends while it waits
# for a line ends the shell (init starts a new one). Harnesses start background work
# as "(cmd &)", a grandchild.
case " $(cat /proc/cmdline 2>/dev/null) " in *" pyvirt.noecho "*) stty -echo ;; esac
# Printed here rather than in rcS: the shell has its tty open now, so whatever the host
# sends from this line on is kept in the tty's buffer until the shell reads it.
echo @READY_LINE@
"""

_PASSWD = "root:x:0:0:root:/root:/bin/sh\n"
_GROUP = "root:x:0:\ntty:x:5:\n"


@dataclass(frozen=True)
class GuestImage:
    """A kernel and initramfs pair, plus the kernel's release (``uname -r``)."""

    kernel: Path
    initrd: Path
    kernel_version: str


def _guest_dir() -> Path:
    return cache_dir() / "guest"


def default_guest() -> GuestImage:
    """Where the default guest lives (whether or not it has been built yet)."""
    gdir = _guest_dir()
    try:
        version = (gdir / VERSION_NAME).read_text().strip()
    except OSError:
        version = ""
    return GuestImage(kernel=gdir / KERNEL_NAME, initrd=gdir / INITRD_NAME, kernel_version=version)


def guest_is_built() -> bool:
    """True when a complete build made by the current recipe is in the cache."""
    gdir = _guest_dir()
    try:
        manifest = json.loads((gdir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    image = default_guest()
    return (
        isinstance(manifest, dict)
        and manifest.get("recipe") == _recipe_fingerprint()
        and manifest.get("kernel_version") == image.kernel_version
        and image.kernel.is_file()
        and image.initrd.is_file()
    )


def build_default_guest(*, force: bool = False, log: Callable[[str], None] = print) -> GuestImage:
    """Build the default guest into the cache unless an up-to-date build is there."""
    gdir = _guest_dir()
    try:
        gdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise GuestBuildError(f"cannot create the cache directory {gdir}: {err.strerror}") from err
    with _build_lock(gdir.parent):
        if not force and guest_is_built():
            image = default_guest()
            log(f"guest: already built (kernel {image.kernel_version}) in {gdir}")
            return image
        _remove_stale_workdirs(gdir.parent)
        start = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="guest-build-", dir=gdir.parent) as tmp:
            _build(Path(tmp), gdir, log)
        image = default_guest()
        log(f"guest: built in {time.monotonic() - start:.1f}s: {image.kernel} {image.initrd}")
        return image


# -- the build -------------------------------------------------------------------------------


def _build(work: Path, gdir: Path, log: Callable[[str], None]) -> None:
    for tool, package in (
        ("apt-get", "apt"),
        ("apt-cache", "apt"),
        ("dpkg-deb", "dpkg"),
        ("depmod", "kmod"),
    ):
        if _which(tool) is None:
            raise GuestBuildError(f"'{tool}' not found: the guest build needs Debian's {package}")

    kernel_pkg = _resolve_kernel_package()
    log(f"guest: downloading {kernel_pkg} and {BUSYBOX_PACKAGE} with apt-get")
    debs = _apt_download(work, [kernel_pkg, BUSYBOX_PACKAGE])

    log("guest: extracting packages")
    kroot = work / "kernel"
    broot = work / "busybox"
    _run(["dpkg-deb", "-x", str(debs[kernel_pkg]), str(kroot)], what=f"dpkg-deb -x {kernel_pkg}")
    _run(["dpkg-deb", "-x", str(debs[BUSYBOX_PACKAGE]), str(broot)], what="dpkg-deb -x busybox")

    version, moddir = _find_kernel_release(kroot)
    vmlinuz = kroot / "boot" / f"vmlinuz-{version}"
    if not vmlinuz.is_file():
        raise GuestBuildError(f"{kernel_pkg} has no /boot/vmlinuz-{version}")
    busybox = broot / "bin" / "busybox"
    if not busybox.is_file():
        raise GuestBuildError(f"{BUSYBOX_PACKAGE} has no /bin/busybox")

    log(f"guest: running depmod for {version}")
    _run(["depmod", "-b", str(kroot), version], what="depmod")
    index = ModuleIndex.load(moddir)
    modules, builtin = load_order(index, list(GUEST_MODULES))
    if builtin:
        log(f"guest: built into the kernel, skipped: {', '.join(builtin)}")
    log(f"guest: {len(modules)} modules: {' '.join(_short(m) for m in modules)}")

    applets = _busybox_applets(busybox)
    initrd_bytes = _initramfs(
        busybox=busybox.read_bytes(),
        applets=applets,
        version=version,
        moddir=moddir,
        modules=modules,
        index=index,
    )
    log(f"guest: initramfs is {len(initrd_bytes) // 1024} KiB ({len(applets)} busybox applets)")

    manifest = {
        "recipe": _recipe_fingerprint(),
        "recipe_version": RECIPE_VERSION,
        "kernel_version": version,
        "kernel_package": kernel_pkg,
        "kernel_package_version": _deb_field(debs[kernel_pkg], "Version"),
        "busybox_package_version": _deb_field(debs[BUSYBOX_PACKAGE], "Version"),
        "modules": [uncompressed_path(m) for m in modules],
        "builtin_skipped": builtin,
        "initramfs_sha256": hashlib.sha256(initrd_bytes).hexdigest(),
        "kernel_sha256": hashlib.sha256(vmlinuz.read_bytes()).hexdigest(),
    }
    # The manifest marks a complete build: drop it before touching the other files.
    with contextlib.suppress(FileNotFoundError):
        (gdir / MANIFEST_NAME).unlink()
    _atomic_write(gdir / KERNEL_NAME, vmlinuz.read_bytes())
    _atomic_write(gdir / INITRD_NAME, initrd_bytes)
    _atomic_write(gdir / VERSION_NAME, (version + "\n").encode())
    _atomic_write(gdir / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())


def _initramfs(
    *,
    busybox: bytes,
    applets: list[str],
    version: str,
    moddir: Path,
    modules: list[str],
    index: ModuleIndex,
) -> bytes:
    raw = io.BytesIO()
    with CpioWriter(raw) as cpio:
        for d in (
            "bin",
            "sbin",
            "usr/bin",
            "usr/sbin",
            "usr/share",
            "usr/share/udhcpc",
            "etc/init.d",
            "etc/acpi",
            "etc/acpi/PWRF",
            "root",
            "tmp",
            "run",
            "mnt",
            "newroot",
            "proc",
            "sys",
            "dev",
        ):
            cpio.add_dir(d, 0o1777 if d == "tmp" else 0o755)
        # The kernel opens /dev/console before /init runs and devtmpfs is not mounted yet.
        cpio.add_device("dev/console", "c", 5, 1, 0o600)
        cpio.add_device("dev/null", "c", 1, 3, 0o666)
        cpio.add_file("bin/busybox", busybox, 0o755)
        for applet in applets:
            cpio.add_symlink(applet, "/bin/busybox")
        for source, dest in _SCRIPTS.items():
            text = _script(source).replace("@READY_LINE@", READY_LINE)
            cpio.add_file(dest, text.encode(), 0o755)
        cpio.add_file("etc/inittab", _INITTAB.encode())
        cpio.add_file("etc/profile", _PROFILE.replace("@READY_LINE@", READY_LINE).encode())
        cpio.add_file("etc/passwd", _PASSWD.encode())
        cpio.add_file("etc/group", _GROUP.encode())
        cpio.add_file("etc/hostname", b"pyvirt\n")
        # written by udhcpc's hook (the Debian rootfs has the same link: its / may be read-only)
        cpio.add_symlink("etc/resolv.conf", "/run/resolv.conf")

        target = f"lib/modules/{version}"
        for rel in modules:
            cpio.add_file(f"{target}/{uncompressed_path(rel)}", read_module(moddir / rel))
        included = set(modules)
        # A modules.dep/alias for just these modules, so busybox modprobe works for the
        # kernel's own requests (e.g. ext4 asking for "crypto-crc32c").
        dep_lines = [
            f"{uncompressed_path(m)}: "
            + " ".join(uncompressed_path(d) for d in index.deps.get(m, []) if d in included)
            for m in modules
        ]
        names = {index_name for index_name, path in index.by_name.items() if path in included}
        alias_lines = [f"alias {pat} {mod}" for pat, mod in index.aliases if mod in names]
        cpio.add_file(f"{target}/modules.dep", _lines(dep_lines))
        cpio.add_file(f"{target}/modules.alias", _lines(alias_lines))
        cpio.add_file(f"{target}/pyvirt.load", _lines(uncompressed_path(m) for m in modules))
    # mtime=0 and no file name keep the gzip header, and so the whole image, reproducible.
    return gzip.compress(raw.getvalue(), compresslevel=9, mtime=0)


def _lines(lines: Sequence[str] | Iterator[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode()


def _short(relpath: str) -> str:
    return relpath.rsplit("/", 1)[-1].split(".ko", 1)[0]


# -- host tools ------------------------------------------------------------------------------


def _which(tool: str) -> str | None:
    # depmod lives in /usr/sbin, which is not on every user's PATH.
    path = os.environ.get("PATH", os.defpath) + ":/usr/sbin:/sbin"
    return shutil.which(tool, path=path)


def _run(cmd: list[str], *, what: str, cwd: Path | None = None) -> str:
    exe = _which(cmd[0])
    if exe is None:
        raise GuestBuildError(f"'{cmd[0]}' not found")
    try:
        proc = subprocess.run([exe, *cmd[1:]], cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as err:
        raise GuestBuildError(f"{what} failed: {err.strerror}") from err
    if proc.returncode != 0:
        raise GuestBuildError(f"{what} failed: {_last_error_line(proc.stderr)}")
    return proc.stdout


def _last_error_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("E:")]
    return (errors or lines or ["(no message)"])[-1]


def _resolve_kernel_package() -> str:
    try:
        out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE], what="apt-cache depends")
    except GuestBuildError as err:
        raise GuestBuildError(f"{err}; try 'apt-get update'") from err
    for line in out.splitlines():
        match = re.match(r"\s*Depends:\s*<?(linux-image-\d[^\s>]*)>?", line)
        if match:
            return match.group(1)
    raise GuestBuildError(
        f"cannot tell which kernel {KERNEL_META_PACKAGE} depends on; try 'apt-get update'"
    )


def _apt_download(work: Path, packages: list[str]) -> dict[str, Path]:
    cmd = ["apt-get", "download", "-q"]
    if os.geteuid() == 0:
        # apt's _apt sandbox user cannot write into our private temp dir; as root it
        # would fall back with a warning anyway, so say it up front.
        cmd += ["-o", "APT::Sandbox::User=root"]
    try:
        _run([*cmd, *packages], what=f"apt-get download {' '.join(packages)}", cwd=work)
    except GuestBuildError as err:
        raise GuestBuildError(f"{err}; try 'apt-get update' (needs a Debian mirror)") from err
    found: dict[str, Path] = {}
    for pkg in packages:
        matches = sorted(work.glob(f"{pkg}_*.deb"))
        if len(matches) != 1:
            raise GuestBuildError(f"apt-get download did not leave exactly one {pkg} .deb")
        found[pkg] = matches[0]
    return found


def _deb_field(deb: Path, name: str) -> str:
    return _run(["dpkg-deb", "-f", str(deb), name], what="dpkg-deb -f").strip()


def _find_kernel_release(root: Path) -> tuple[str, Path]:
    # Debian 12 ships /lib/modules; merged-/usr packages may ship /usr/lib/modules.
    for base in (root / "lib" / "modules", root / "usr" / "lib" / "modules"):
        if base.is_dir():
            releases = sorted(p for p in base.iterdir() if (p / "kernel").is_dir())
            if len(releases) == 1:
                if base.parent.parent == root / "usr" and not (root / "lib").exists():
                    # depmod -b looks under <root>/lib/modules
                    (root / "lib").symlink_to("usr/lib")
                return releases[0].name, releases[0]
            if releases:
                names = ", ".join(p.name for p in releases)
                raise GuestBuildError(f"kernel package holds several releases: {names}")
    raise GuestBuildError("kernel package holds no lib/modules/<release>/kernel directory")


def _busybox_applets(busybox: Path) -> list[str]:
    """Applet paths (``bin/ls``, ``usr/bin/[``) from the static busybox itself."""
    try:
        proc = subprocess.run(
            [str(busybox), "--list-full"], capture_output=True, text=True, check=False
        )
    except OSError as err:
        raise GuestBuildError(f"cannot run {busybox} --list-full: {err.strerror}") from err
    applets = [ln.strip().lstrip("/") for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not applets:
        raise GuestBuildError(f"{busybox} --list-full listed no applets")
    # bin/busybox itself is the target of every link
    return sorted(a for a in applets if a != "bin/busybox")


# -- cache plumbing --------------------------------------------------------------------------


def _script(name: str) -> str:
    return resources.files("pyvirt.guest").joinpath(name).read_text()


def _recipe_fingerprint() -> str:
    digest = hashlib.sha256(f"recipe {RECIPE_VERSION}\n".encode())
    digest.update(" ".join(GUEST_MODULES).encode())
    digest.update(READY_LINE.encode())
    digest.update((_INITTAB + _PROFILE + _PASSWD + _GROUP).encode())
    for name in sorted(_SCRIPTS):
        digest.update(b"\0" + name.encode() + b"\0" + _script(name).encode())
    return f"{RECIPE_VERSION}:{digest.hexdigest()[:16]}"


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _build_lock(root: Path, name: str = "guest.lock") -> Iterator[None]:
    # Two builds at once (parallel tests) would download twice and race on the renames.
    try:
        fd = os.open(root / name, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise GuestBuildError(f"cannot create {root / name}: {err.strerror}") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_stale_workdirs(root: Path) -> None:
    # Left behind by a build that was killed; we hold the lock, so none is in use.
    for stale in root.glob("guest-build-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in (root / "guest").glob(".*.*"):
        with contextlib.suppress(OSError):
            stale.unlink()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pyvirt.guest.build [--force]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    force = "--force" in args
    unknown = [a for a in args if a != "--force"]
    if unknown:
        print(
            f"usage: python -m pyvirt.guest.build [--force] (unknown: {' '.join(unknown)})",
            file=sys.stderr,
        )
        return 2
    try:
        build_default_guest(force=force, log=lambda msg: print(msg, flush=True))
    except GuestBuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
