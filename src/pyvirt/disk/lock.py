"""Opening and locking image files (every file of a disk's backing chain).

Images are locked with open-file-description locks (F_OFD_SETLK) on QEMU's
lock bytes, so that pyvirt, QEMU and qemu-img see each other's locks: for each
permission held (consistent read, write, ...) a shared lock on byte 100+bit,
for each permission other users may NOT have a shared lock on byte 200+bit; a
permission conflicts with a lock on the other byte of its bit. A writable
image holds read and write and shares neither write nor resize; a read-only
one (a backing file, a ``readonly`` disk) holds read and shares neither
write nor resize. So a second VM cannot open an image that another one writes
(or write one that another reads), while ``qemu-img info``/``check`` of an
image some VM only reads still works; the error names the process holding
the conflicting lock. The lock lives exactly as long as the image's fd,
whatever else in the process opens and closes the same file. Paths that would
block in ``open()`` (FIFOs) are refused, see ``pyvirt.hostfile``.

Import-light: on the VMM's start-up path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
import time
from collections.abc import Collection, Mapping
from pathlib import Path

from pyvirt.disk.backend import DiskError, ImageFile
from pyvirt.hostfile import FileIdentity, identity, open_host_file

__all__ = ["open_image_file", "relock_readonly"]

_FLOCK = struct.Struct("@hhqqi4x")  # struct flock on x86-64 Linux


def open_image_file(path: Path, *, readonly: bool, direct: bool, what: str,
                    others: Mapping[FileIdentity, str] | None = None,
                    allow_self_shared: Collection[FileIdentity] = ()) -> ImageFile:
    """Open and lock ``path`` (a regular file or block device); errors name
    ``what`` (e.g. ``disks[1].path``) and leave nothing open.

    ``others``: the files already open for this VM (top images and their
    backing files), by identity, each with its name; the same file again
    (another name, a hard link) is refused before locking, where it would
    only conflict with ourselves -- unless this open is read-only and the
    identity is in ``allow_self_shared`` (the earlier uses are read-only too:
    two overlays over one base image).
    """
    flags = os.O_RDONLY if readonly else os.O_RDWR
    fd, st = open_host_file(path, flags, what=what, allow_block=True, error=DiskError)
    try:
        ident = identity(st)
        if others and ident in others and not (readonly and ident in allow_self_shared):
            raise DiskError(f"{what}: {path} is the same file as {others[ident]}")
        if direct:
            try:  # O_DIRECT set on the fd: open() itself stays non-blocking
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise DiskError(f"{what}: {path}: {exc.strerror}") from None
                raise DiskError(f"{what}: {path}: cache=none needs O_DIRECT, which this "
                                "file system does not support (use cache=writeback)") from None
        try:
            conflict = _lock(fd, readonly)
        except OSError as exc:
            raise DiskError(f"{what}: {path}: cannot lock: {exc.strerror}") from None
        if conflict is not None:
            how = "read-only" if readonly else "read-write"
            raise DiskError(f"{what}: {path}: cannot open {how}: the image is in use by "
                            f"{_holder(fd, st, readonly)}")
        block = stat.S_ISBLK(st.st_mode)
        try:
            size = os.lseek(fd, 0, os.SEEK_END) if block else st.st_size
        except OSError as exc:
            raise DiskError(f"{what}: {path}: cannot find its size: {exc.strerror}") from None
        return ImageFile(path, fd, ident, readonly, direct, block, size)
    except BaseException:
        os.close(fd)
        raise


#: QEMU's lock bytes (block/file-posix.c): permission bit i held -> byte
#: PERM_BASE+i, not shared -> byte SHARED_BASE+i
PERM_BASE = 100
SHARED_BASE = 200
PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, PERM_RESIZE = 1, 2, 4, 8
_PERM_NAMES = {PERM_CONSISTENT_READ: "consistent read", PERM_WRITE: "write",
               PERM_WRITE_UNCHANGED: "write unchanged", PERM_RESIZE: "resize"}


def _perms(readonly: bool) -> tuple[int, int]:
    """(held, not shared) permission bits, as QEMU's for a drive of that kind."""
    held = PERM_CONSISTENT_READ | (0 if readonly else PERM_WRITE)
    return held, PERM_WRITE | PERM_RESIZE


def _setlk(fd: int, kind: int, start: int) -> None:
    arg = _FLOCK.pack(kind, os.SEEK_SET, start, 1, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, arg)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        fcntl.fcntl(fd, fcntl.F_SETLK, arg)  # no OFD locks (Linux < 3.15): record locks


def _conflict(fd: int, start: int) -> tuple[bool, int]:
    """Whether another open of the file holds a lock on byte ``start`` (and its pid
    when the kernel names one: only for record locks)."""
    arg = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, 1, 0)
    try:
        l_type, _, _, _, pid = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_OFD_GETLK, arg))
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        l_type, _, _, _, pid = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_GETLK, arg))
    return l_type != fcntl.F_UNLCK, pid


def _lock(fd: int, readonly: bool) -> str | None:
    """Take the image's lock bytes on ``fd``; None when done, else what conflicts
    (``"write"``: another user holds write permission, ...).

    An open-file-description lock (F_OFD_SETLK) belongs to this open of the
    file and lives until its last fd is closed; a POSIX record lock would die
    with any ``close()`` of the same file anywhere in the process (e.g. the
    loader reading it as an initrd). As QEMU: take ours, then test the other
    side of each bit (whoever comes second sees the first).
    """
    held, unshared = _perms(readonly)
    try:
        for bit in _PERM_NAMES:
            if held & bit:
                _setlk(fd, fcntl.F_RDLCK, PERM_BASE + bit.bit_length() - 1)
            if unshared & bit:
                _setlk(fd, fcntl.F_RDLCK, SHARED_BASE + bit.bit_length() - 1)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return "lock"
        raise
    for bit, name in _PERM_NAMES.items():
        if held & bit and _conflict(fd, SHARED_BASE + bit.bit_length() - 1)[0]:
            return f"another user does not share {name}"
        if unshared & bit and _conflict(fd, PERM_BASE + bit.bit_length() - 1)[0]:
            return f"another user holds {name}"
    return None


def relock_readonly(fd: int) -> None:
    """Downgrade a writer's lock bytes on ``fd`` to a reader's (the image becomes a
    backing file): the write permission is given up; what others may not do
    (write, resize) stays refused, as for any read-only image."""
    held_rw, _ = _perms(False)
    held_ro, _ = _perms(True)
    for bit in _PERM_NAMES:
        if held_rw & bit and not held_ro & bit:
            arg = _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, PERM_BASE + bit.bit_length() - 1, 1, 0)
            try:
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, arg)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                fcntl.fcntl(fd, fcntl.F_SETLK, arg)


def _holder(fd: int, st: os.stat_result, readonly: bool) -> str:
    """Who holds a lock conflicting with ours on ``fd`` (best effort, never blocks for long).

    F_OFD_GETLK names the pid only for a record lock; an OFD lock (QEMU's,
    another pyvirt's) reports -1, as /proc/locks does. Then look for the
    process with an fd on the same file whose fdinfo shows a lock, for at most
    half a second.
    """
    held, unshared = _perms(readonly)
    pid = 0
    with contextlib.suppress(OSError):  # drop the lock bytes we took: the search would find us
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0))
    try:
        for bit in _PERM_NAMES:
            for mine, other in ((held, SHARED_BASE), (unshared, PERM_BASE)):
                if mine & bit:
                    hit, who = _conflict(fd, other + bit.bit_length() - 1)
                    if hit and who > 0:
                        pid = who
    except OSError:
        pass
    if pid <= 0:
        pid = _find_lock_owner(identity(st), deadline=time.monotonic() + 0.5)
    if pid <= 0:
        return "another process"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace").strip()
    except OSError:
        cmd = ""
    return f"process {pid}" + (f" ({cmd[:80]})" if cmd else "")


def _find_lock_owner(ident: FileIdentity, deadline: float) -> int:
    try:
        pids = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return 0
    for pid in pids:
        if time.monotonic() > deadline:
            break
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # gone, or another user's
        for n in fds:
            try:
                if not os.readlink(f"/proc/{pid}/fd/{n}").startswith("/"):
                    continue  # pipes, sockets, anonymous inodes
                if identity(os.stat(f"/proc/{pid}/fd/{n}")) != ident:
                    continue
                with open(f"/proc/{pid}/fdinfo/{n}", encoding="ascii", errors="replace") as f:
                    if any(line.startswith("lock:") for line in f):
                        return int(pid)
            except OSError:
                continue
    return 0
