"""Opening the host files a user names (kernel, initrd, disks, console file) without blocking.

``open()`` of a FIFO waits for the other end, and of a file under a lease waits
for the lease holder; neither can be interrupted by a signal that does not
raise. So a path is checked with ``stat`` first (only regular files, and block
devices where allowed), opened with ``O_NONBLOCK`` (a FIFO swapped in between
then fails or opens at once instead of waiting), checked again on the opened
fd, and only then switched back to blocking I/O. Import-light: on the VMM's
start-up path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path

from pyvirt.errors import UserInputError

__all__ = ["FileIdentity", "describe_mode", "identity", "open_host_file"]

#: what identifies a file whatever its name: ("file", st_dev, st_ino), or
#: ("blk", st_rdev, 0) for a block device (two device nodes of one disk)
FileIdentity = tuple[str, int, int]


def identity(st: os.stat_result) -> FileIdentity:
    if stat.S_ISBLK(st.st_mode):
        return ("blk", st.st_rdev, 0)
    return ("file", st.st_dev, st.st_ino)


def describe_mode(mode: int) -> str:
    """'a directory', 'a named pipe (FIFO)', ... for messages."""
    for test, words in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                        (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                        (stat.S_ISBLK, "a block device"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return words
    return "not a regular file"


def _check_kind(st: os.stat_result, path: Path, what: str, allow_block: bool,
                error: type[UserInputError]) -> None:
    if stat.S_ISREG(st.st_mode) or (allow_block and stat.S_ISBLK(st.st_mode)):
        return
    expected = "a regular file or block device" if allow_block else "a regular file"
    raise error(f"{what}: {path} is {describe_mode(st.st_mode)}, not {expected}")


def open_host_file(path: Path, flags: int, *, what: str, allow_block: bool = False,
                   error: type[UserInputError] = UserInputError,
                   mode: int = 0o644) -> tuple[int, os.stat_result]:
    """Open ``path`` with ``flags`` (plus O_CLOEXEC) without ever blocking in open().

    Returns the fd (in blocking mode) and its fstat. Anything but a regular
    file (or a block device with ``allow_block``) is refused with ``error``
    naming ``what`` (a config field such as ``disks[0].path``). With O_CREAT a
    missing file is created.
    """
    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        if not flags & os.O_CREAT:
            raise error(f"{what}: {path}: no such file") from None
        st = None
    except OSError as exc:
        raise error(f"{what}: {path}: {exc.strerror}") from None
    if st is not None:
        _check_kind(st, path, what, allow_block, error)
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY, mode)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise error(f"{what}: {path}: another process holds a lease on it") from None
        with contextlib.suppress(OSError):  # a FIFO swapped in meanwhile: say so
            _check_kind(os.stat(path), path, what, allow_block, error)
        raise error(f"{what}: {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        _check_kind(st, path, what, allow_block, error)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd, st
