"""Build the Debian root filesystem image: an ext4 disk for ``root=/dev/vda``.

``debootstrap --variant=minbase`` installs Debian 12 (bookworm) plus a few tools
(:data:`INCLUDE`: ``fio`` for the block benchmark, ``procps``, ``busybox-static``
for its acpid) into a temporary
folder, from the Debian mirror apt is configured with (``apt-get indextargets``;
``http://deb.debian.org/debian`` when apt names none). Package caches, apt lists,
manuals, docs (but the copyright files) and translations are dropped, and the tree
gets pyvirt's own init, ``/sbin/pyvirt-init`` (``pyvirt-init.sh`` next to this file:
mounts, hostname, one bash on the console with job control that prints the ready
line, power-off when it exits), and ``poweroff``/``reboot``/``halt`` in
``/usr/local/sbin`` (the image has no systemd). ``mkfs.ext4 -d`` then writes the tree
into ``<cache>/guest/rootfs.ext4``, labelled ``pyvirt-root``, sized as the tree plus
512 MiB (or ``--size``).

The initramfs' ``/init`` (see ``init``) mounts ``root=/dev/vdX`` and, finding
``/sbin/pyvirt-init`` there, switch_roots into it; ``init=PATH`` picks another.

Like :mod:`pyvirt.guest.build`: a lock (``rootfs.lock``), temporary names renamed
into place, the manifest (``rootfs.json``) written last and removed first; an
up-to-date image is kept unless ``force``. debootstrap needs root.

Run ``python -m pyvirt.guest.rootfs [--force] [--size SIZE]`` to build it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pyvirt.errors import PyvirtError, UserInputError
from pyvirt.guest import READY_LINE, GuestBuildError
from pyvirt.guest.build import _atomic_write, _build_lock, _last_error_line, _which
from pyvirt.paths import cache_dir

__all__ = [
    "INCLUDE",
    "ROOTFS_LABEL",
    "ROOTFS_RECIPE_VERSION",
    "RootfsImage",
    "build_rootfs",
    "check_size",
    "debian_mirror",
    "main",
    "rootfs_image",
    "rootfs_is_built",
]

#: bump when the build changes in a way the script hashes below do not capture
ROOTFS_RECIPE_VERSION = 3

SUITE = "bookworm"
VARIANT = "minbase"
#: installed on top of minbase (with their dependencies)
INCLUDE = ("fio", "procps", "busybox-static", "iperf3", "curl", "iproute2")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")

ROOTFS_LABEL = "pyvirt-root"
IMAGE_NAME = "rootfs.ext4"
MANIFEST_NAME = "rootfs.json"
LOCK_NAME = "rootfs.lock"
WORK_PREFIX = "rootfs-build-"

MIB = 1 << 20
#: free space left in the image on top of the tree
HEADROOM = 512 * MIB
#: the smallest --size accepted before the tree is known (the tree alone is ~250 MiB)
MIN_SIZE = 256 * MIB
#: mke2fs's default bytes-per-inode for a filesystem of this size
_BYTES_PER_INODE = 16384

# Package data written into the tree: source name -> (path in the image, mode).
_FILES = {
    "pyvirt-init.sh": ("usr/sbin/pyvirt-init", 0o755),
    "rootfs-bashrc.sh": ("etc/pyvirt/bashrc", 0o644),
    "rootfs-power.sh": ("usr/local/sbin/poweroff", 0o755),
    # busybox acpid runs it on the ACPI power button (pyvirt-init starts acpid)
    "rootfs-acpi-power.sh": ("etc/acpi/PWRF/00000080", 0o755),
    # the network at boot: eth0 by DHCP (busybox udhcpc) or static (pyvirt.ip=)
    "net-up.sh": ("usr/sbin/pyvirt-net-up", 0o755),
    "udhcpc.script": ("usr/share/udhcpc/default.script", 0o755),
}
_POWER_LINKS = ("reboot", "halt")

_HOSTS = "127.0.0.1\tlocalhost\n127.0.1.1\tpyvirt\n::1\tlocalhost ip6-localhost ip6-loopback\n"
_FSTAB = "# pyvirt: the root is mounted by the initramfs; /sbin/pyvirt-init mounts the rest\n"


@dataclass(frozen=True)
class RootfsImage:
    """The root filesystem image: its path, size in bytes and ext4 label."""

    path: Path
    size: int
    label: str = ROOTFS_LABEL


def _guest_dir() -> Path:
    return cache_dir() / "guest"


def rootfs_image() -> Path:
    """Where the root filesystem image lives (whether or not it has been built yet)."""
    return _guest_dir() / IMAGE_NAME


def _manifest() -> dict[str, object] | None:
    try:
        data = json.loads((_guest_dir() / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def rootfs_is_built(size: int | None = None) -> bool:
    """True when a complete image made by the current recipe (and of ``size``) is there."""
    manifest = _manifest()
    if manifest is None or manifest.get("recipe") != _recipe_fingerprint():
        return False
    try:
        actual = rootfs_image().stat().st_size
    except OSError:
        return False
    return actual == manifest.get("image_bytes") and (size is None or actual == size)


def build_rootfs(
    *, force: bool = False, size: int | None = None, log: Callable[[str], None] = print
) -> RootfsImage:
    """Build the Debian root filesystem image unless an up-to-date one is in the cache.

    ``size`` (bytes, rounded up to MiB) fixes the image size; by default it is the tree
    plus 512 MiB.
    """
    check_size(size)
    if size is not None:
        size = _round_up(size, MIB)
    gdir = _guest_dir()
    try:
        gdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise GuestBuildError(f"cannot create the cache directory {gdir}: {err.strerror}") from err
    with _build_lock(gdir.parent, LOCK_NAME):
        if not force and rootfs_is_built(size):
            image = _current()
            log(f"rootfs: already built ({image.size // MIB} MiB) in {image.path}")
            return image
        _check_host()
        _remove_stale_workdirs(gdir.parent)
        start = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=gdir.parent))
        try:
            _build(work, gdir, size, log)
        finally:
            _remove_workdir(work)
        image = _current()
        log(f"rootfs: built in {time.monotonic() - start:.0f}s: {image.path} "
            f"({image.size // MIB} MiB)")
        return image


def check_size(size: int | None) -> None:
    """Reject an image size too small for any tree (before anything is downloaded)."""
    if size is not None and size < MIN_SIZE:
        raise UserInputError(f"--size {size // MIB}M is too small: the image needs at least "
                             f"{MIN_SIZE // MIB}M")


def _current() -> RootfsImage:
    path = rootfs_image()
    return RootfsImage(path=path, size=path.stat().st_size)


# -- the build -------------------------------------------------------------------------------


def _check_host() -> None:
    for tool, package in (("debootstrap", "debootstrap"), ("mkfs.ext4", "e2fsprogs")):
        if _which(tool) is None:
            raise GuestBuildError(
                f"'{tool}' not found: the rootfs build needs Debian's {package} (make setup)"
            )
    if os.geteuid() != 0:
        raise GuestBuildError("building the rootfs needs root (debootstrap chroots into the "
                              "tree and creates device nodes): run it as root or with sudo")


def _build(work: Path, gdir: Path, size: int | None, log: Callable[[str], None]) -> None:
    tree = work / "tree"
    mirror = debian_mirror()
    log(f"rootfs: debootstrap --variant={VARIANT} {SUITE} from {mirror} "
        f"with {', '.join(INCLUDE)} (about a minute)")
    t0 = time.monotonic()
    _debootstrap(tree, mirror, work / "debootstrap.log")
    debootstrap_s = time.monotonic() - t0
    packages = _installed_packages(tree)
    missing = [p for p in INCLUDE if p not in packages]
    if missing:
        raise GuestBuildError(f"debootstrap did not install {', '.join(missing)}")
    log(f"rootfs: {len(packages)} packages installed in {debootstrap_s:.0f}s")
    _trim(tree)
    _customize(tree)

    used, inodes = _tree_usage(tree)
    needed = _min_image_size(used, inodes)
    if size is None:
        size = _round_up(used + HEADROOM, 64 * MIB)
    elif size < needed:
        raise GuestBuildError(f"--size {size // MIB}M is too small: the tree "
                              f"({used // MIB} MiB, {inodes} files) needs at least "
                              f"{_round_up(needed, MIB) // MIB}M")
    log(f"rootfs: tree is {used // MIB} MiB in {inodes} files; "
        f"mkfs.ext4 a {size // MIB} MiB image")
    t0 = time.monotonic()
    tmp_image = gdir / f".{IMAGE_NAME}.{os.getpid()}"
    try:
        _mkfs(tree, tmp_image, size)
        mkfs_s = time.monotonic() - t0
        size = tmp_image.stat().st_size
        manifest = {
            "recipe": _recipe_fingerprint(),
            "recipe_version": ROOTFS_RECIPE_VERSION,
            "suite": SUITE,
            "variant": VARIANT,
            "include": list(INCLUDE),
            "mirror": mirror,
            "label": ROOTFS_LABEL,
            "image_bytes": size,
            "tree_bytes": used,
            "tree_files": inodes,
            "debootstrap_seconds": round(debootstrap_s, 1),
            "mkfs_seconds": round(mkfs_s, 1),
            "packages": packages,
        }
        # The manifest marks a complete build: drop it before replacing the image.
        with contextlib.suppress(FileNotFoundError):
            (gdir / MANIFEST_NAME).unlink()
        os.replace(tmp_image, gdir / IMAGE_NAME)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_image.unlink()
        raise
    _atomic_write(gdir / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())


def debian_mirror() -> str:
    """The Debian archive apt fetches bookworm from here; the default mirror otherwise."""
    apt_get = _which("apt-get")
    if apt_get is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            proc = subprocess.run(
                [apt_get, "indextargets", "--format", "$(SITE) $(RELEASE) $(LABEL)",
                 "Identifier: Packages"],
                capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
            if proc.returncode == 0:
                site = _pick_mirror(proc.stdout)
                if site is not None:
                    return site
    return DEFAULT_MIRROR


def _pick_mirror(indextargets: str) -> str | None:
    """The first ``SITE`` of Debian's ``bookworm`` release in ``apt-get indextargets`` lines."""
    for line in indextargets.splitlines():
        parts = line.split()
        if (len(parts) == 3 and parts[1] == SUITE and parts[2] == "Debian"
                and re.match(r"https?://", parts[0])):
            return parts[0].rstrip("/")
    return None


def _debootstrap(tree: Path, mirror: str, logfile: Path) -> None:
    cmd = [
        "debootstrap", f"--variant={VARIANT}", f"--include={','.join(INCLUDE)}",
        "--merged-usr",
    ]  # fmt: skip
    if KEYRING.is_file():
        # check the Release signature even where debootstrap would not look for the keyring
        cmd.append(f"--keyring={KEYRING}")
    cmd += [SUITE, str(tree), mirror]
    exe = _which(cmd[0])
    assert exe is not None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
    try:
        with logfile.open("w") as out:
            proc = subprocess.run([exe, *cmd[1:]], stdout=out, stderr=subprocess.STDOUT,
                                  env=env, check=False)
    except OSError as err:
        raise GuestBuildError(f"debootstrap failed: {err.strerror}") from err
    if proc.returncode != 0:
        text = logfile.read_text(errors="replace")
        raise GuestBuildError(f"debootstrap failed: {_debootstrap_error(text)}")


def _debootstrap_error(log: str) -> str:
    """debootstrap's last ``E:`` line (``W: Failure ...`` when it gives only that)."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("E:")] or [
        ln for ln in lines if ln.startswith("W: Failure")
    ]
    return (errors or lines or ["(no message)"])[-1]


def _installed_packages(tree: Path) -> dict[str, str]:
    """``{package: version}`` from the tree's dpkg status file."""
    try:
        status = (tree / "var/lib/dpkg/status").read_text(errors="replace")
    except OSError as err:
        raise GuestBuildError(f"debootstrap left no dpkg status: {err.strerror}") from err
    found: dict[str, str] = {}
    for block in status.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if ": " in line and line[0] != " "
        )
        if fields.get("Status") == "install ok installed" and "Package" in fields:
            found[fields["Package"]] = fields.get("Version", "")
    return dict(sorted(found.items()))


def _trim(tree: Path) -> None:
    """Drop what a disk for tests and benchmarks does not need (about a third of it)."""
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/log/*.log"):
        for path in tree.glob(pattern):
            path.unlink()
    for path in (tree / "var/lib/apt/lists").glob("*"):
        if path.is_file() and path.name != "lock":
            path.unlink()
    for rel in ("usr/share/man", "usr/share/info", "usr/share/locale"):
        _empty_dir(tree / rel)
    # /usr/share/doc: keep every package's copyright file
    for path in (tree / "usr/share/doc").glob("*/*"):
        if path.name != "copyright":
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def _empty_dir(path: Path) -> None:
    if not path.is_dir():
        return
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _customize(tree: Path) -> None:
    """pyvirt's init, power commands and host-independent identity files."""
    for source, (dest, mode) in _FILES.items():
        text = _script(source).replace("@READY_LINE@", READY_LINE)
        target = tree / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)
    power = tree / _FILES["rootfs-power.sh"][0]
    for name in _POWER_LINKS:
        link = power.with_name(name)
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to("poweroff")
    # debootstrap copies the host's hostname, hosts and resolv.conf: not the guest's.
    (tree / "etc/hostname").write_text("pyvirt\n")
    (tree / "etc/hosts").write_text(_HOSTS)
    (tree / "etc/fstab").write_text(_FSTAB)
    resolv = tree / "etc/resolv.conf"
    with contextlib.suppress(FileNotFoundError):
        resolv.unlink()
    # written at boot by udhcpc's hook into /run (a tmpfs: the root may be read-only)
    resolv.symlink_to("/run/resolv.conf")
    # no systemd to fill it at boot; empty means "uninitialized" to anything that reads it
    (tree / "etc/machine-id").write_text("")


def _tree_usage(tree: Path) -> tuple[int, int]:
    """(bytes allocated, inodes) of the tree, hard links counted once."""
    seen: set[tuple[int, int]] = set()
    used = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in (*dirnames, *filenames):
            st = os.lstat(os.path.join(dirpath, name))
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            used += max(st.st_blocks * 512, 4096 if st.st_size else 0)
    return used, len(seen) + 1


def _min_image_size(used: int, inodes: int) -> int:
    # ext4 metadata (inode tables, bitmaps, journal) plus a little slack; enough inodes.
    by_blocks = int(used * 1.15) + 64 * MIB
    by_inodes = int(inodes * 1.1) * _BYTES_PER_INODE
    return max(by_blocks, by_inodes)


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def _mkfs(tree: Path, image: Path, size: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        image.unlink()
    exe = _which("mkfs.ext4")
    assert exe is not None
    cmd = [
        exe, "-q", "-F", "-t", "ext4", "-L", ROOTFS_LABEL, "-d", str(tree),
        "-b", "4096", "-i", str(_BYTES_PER_INODE), "-m", "0",
        # inode tables and journal written now: the guest mounts it read-only, and a
        # read-write mount would otherwise start zeroing them in the background
        "-E", "lazy_itable_init=0,lazy_journal_init=0",
        str(image), f"{size // 1024}k",
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as err:
        raise GuestBuildError(f"mkfs.ext4 failed: {err.strerror}") from err
    if proc.returncode != 0:
        raise GuestBuildError(f"mkfs.ext4 failed: {_last_error_line(proc.stderr + proc.stdout)}")
    image.chmod(0o644)


# -- cache plumbing --------------------------------------------------------------------------


def _script(name: str) -> str:
    return resources.files("pyvirt.guest").joinpath(name).read_text()


def _recipe_fingerprint() -> str:
    digest = hashlib.sha256(f"rootfs recipe {ROOTFS_RECIPE_VERSION}\n".encode())
    digest.update(f"{SUITE} {VARIANT} {' '.join(INCLUDE)} {ROOTFS_LABEL} {HEADROOM}".encode())
    digest.update(READY_LINE.encode())
    digest.update((_HOSTS + _FSTAB + " ".join(_POWER_LINKS)).encode())
    for name in sorted(_FILES):
        digest.update(b"\0" + name.encode() + b"\0" + _script(name).encode())
    return f"{ROOTFS_RECIPE_VERSION}:{digest.hexdigest()[:16]}"


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first (debootstrap mounts proc/sys)."""
    real = os.path.realpath(path)
    found = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 5:
                    continue
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                if point == real or point.startswith(real + "/"):
                    found.append(point)
    except OSError:
        return []
    return sorted(found, key=len, reverse=True)


def _remove_workdir(work: Path) -> None:
    # A killed debootstrap can leave proc, sys or dev mounted inside the tree: removing
    # files through those mounts would reach the host's, so unmount or leave it alone.
    for point in _mounts_under(work):
        umount = _which("umount") or "umount"
        subprocess.run([umount, "-l", point], capture_output=True, check=False)
    left = _mounts_under(work)
    if left:
        raise GuestBuildError(f"{left[0]} is still mounted: unmount it and remove {work}")
    shutil.rmtree(work, ignore_errors=True)


def _remove_stale_workdirs(root: Path) -> None:
    # Left behind by a build that was killed; we hold the lock, so none is in use.
    for stale in root.glob(f"{WORK_PREFIX}*"):
        _remove_workdir(stale)
    for stale in _guest_dir().glob(f".{IMAGE_NAME}.*"):
        with contextlib.suppress(OSError):
            stale.unlink()


# -- command line ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pyvirt.guest.rootfs [--force] [--size SIZE]``."""
    from pyvirt.vmm.config import parse_size

    ap = argparse.ArgumentParser(
        prog="python -m pyvirt.guest.rootfs",
        description="Build the Debian root filesystem image (needs root).",
    )
    ap.add_argument("--force", action="store_true", help="rebuild even when already built")
    ap.add_argument("--size", help="image size, e.g. 1G (default: the tree plus 512 MiB)")
    args = ap.parse_args(argv)
    try:
        size = None if args.size is None else parse_size(args.size, what="--size")
        image = build_rootfs(force=args.force, size=size, log=lambda m: print(m, flush=True))
    except PyvirtError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_status
    print(f"rootfs: {image.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
