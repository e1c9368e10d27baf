"""Opening the host files a user names (kernel, initrd, disks, console file) without blocking.

``open()`` of a FIFO waits for the other end, and of a file under a lease waits
for the lease holder; neither can be interrupted by a signal that does not
raise. So a path is checked with ``stat`` first (only regular files, and block
devices where allowed), opened with ``O_NONBLOCK`` (a FIFO swapped in between
then fails or opens at once instead of waiting), checked again on the opened
fd, and only then switched back to blocking I/O. Import-light: on the VMM's
start-up path.

Handed files (``pyvirt run --fd PATH=N[,N2]``): the daemon opens a VM's files
itself and passes the fds, so that a VMM running as a user who may not open
those paths still uses them. ``hand`` records them in the process-wide
registry ``handed`` (by ``os.path.abspath`` of the path, lexically: the daemon
names the paths the configuration names), and ``open_host_file`` then takes a
duplicate of the handed fd instead of opening the path: its access mode must
cover what the caller asks (a writable disk needs an ``O_RDWR`` fd), and the
file is checked as an opened one would be. ``N2`` is a second open file
description of the same file without ``O_DIRECT``, for qcow2 metadata under
``cache=none`` (``handed_second``), where the VMM would otherwise reopen
``/proc/self/fd/N``, which needs permission on the file itself.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from pyvirt.errors import UserInputError

__all__ = ["FileIdentity", "HandedFile", "describe_mode", "hand", "hand_tap", "handed",
           "handed_second", "handed_taps", "identity", "is_handed", "open_host_file"]

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


@dataclass(frozen=True)
class HandedFile:
    """A file the daemon opened for this VMM (``--fd PATH=N[,N2]``)."""

    path: str  # os.path.abspath of the name it was handed for
    fd: int
    fd2: int | None = None  # the same file, without O_DIRECT (qcow2 metadata)


#: abspath -> the fds handed for it; filled by ``hand`` before set-up, read-only after
handed: dict[str, HandedFile] = {}

#: TAP interface name -> the fd the daemon opened for it (``--fd tap:IFNAME=N``),
#: used by ``pyvirt.net.tap.open_tap``
handed_taps: dict[str, int] = {}

_ACCESS_WORDS = {os.O_RDONLY: "read-only", os.O_WRONLY: "write-only", os.O_RDWR: "read-write"}


def _key(path: Path | str) -> str:
    return os.path.abspath(os.fspath(path))


def hand(path: Path | str, fd: int, fd2: int | None = None, *,
         error: type[UserInputError] = UserInputError, what: str = "--fd") -> HandedFile:
    """Record ``fd`` (and ``fd2``) as the open file for ``path``; refused with
    ``error`` naming ``what`` when an fd is not open, ``fd2`` is another file,
    or the path was handed already. The fds become close-on-exec."""
    key = _key(path)
    if key in handed:
        raise error(f"{what}: {path} is handed twice")
    ids = []
    for n in (fd, fd2):
        if n is None:
            continue
        try:
            st = os.fstat(n)
        except OSError:
            raise error(f"{what}: fd {n} (for {path}) is not open") from None
        if stat.S_ISDIR(st.st_mode):
            raise error(f"{what}: fd {n} (for {path}) is a directory")
        ids.append(identity(st))
        os.set_inheritable(n, False)
    if len(ids) == 2 and ids[0] != ids[1]:
        raise error(f"{what}: fds {fd} and {fd2} (for {path}) are not the same file")
    if fd2 is not None:  # metadata I/O is not block aligned
        fl = fcntl.fcntl(fd2, fcntl.F_GETFL)
        if fl & os.O_DIRECT:
            fcntl.fcntl(fd2, fcntl.F_SETFL, fl & ~os.O_DIRECT)
    h = HandedFile(key, fd, fd2)
    handed[key] = h
    return h


def hand_tap(ifname: str, fd: int, *, error: type[UserInputError] = UserInputError,
             what: str = "--fd") -> None:
    """Record ``fd`` as the open TAP ``ifname`` (checked by ``open_tap``)."""
    if ifname in handed_taps:
        raise error(f"{what}: TAP {ifname} is handed twice")
    try:
        st = os.fstat(fd)
    except OSError:
        raise error(f"{what}: fd {fd} (for TAP {ifname}) is not open") from None
    if not stat.S_ISCHR(st.st_mode):
        raise error(f"{what}: fd {fd} (for TAP {ifname}) is {describe_mode(st.st_mode)}, "
                    "not a TAP (/dev/net/tun)")
    os.set_inheritable(fd, False)
    handed_taps[ifname] = fd


def is_handed(path: Path | str) -> bool:
    return _key(path) in handed


def handed_second(path: Path | str, *, readonly: bool) -> int | None:
    """A new fd of the second descriptor handed for ``path`` (None: none was);
    ``readonly`` False needs it open read-write (``OSError`` EACCES otherwise)."""
    h = handed.get(_key(path))
    if h is None or h.fd2 is None:
        return None
    acc = fcntl.fcntl(h.fd2, fcntl.F_GETFL) & os.O_ACCMODE
    if not readonly and acc != os.O_RDWR:
        raise OSError(errno.EACCES, "the second fd handed for it is not open read-write")
    return os.dup(h.fd2)


def _open_handed(h: HandedFile, path: Path, flags: int, what: str, allow_block: bool,
                 error: type[UserInputError]) -> tuple[int, os.stat_result]:
    """A duplicate of the handed fd, checked as a fresh open would be: its access
    mode covers ``flags``', it is a regular file (or block device)."""
    want = flags & os.O_ACCMODE
    try:
        have = fcntl.fcntl(h.fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError as exc:
        raise error(f"{what}: {path}: the fd handed for it ({h.fd}): {exc.strerror}") from None
    reads = want in (os.O_RDONLY, os.O_RDWR)
    writes = want in (os.O_WRONLY, os.O_RDWR)
    if (reads and have == os.O_WRONLY) or (writes and have == os.O_RDONLY):
        raise error(f"{what}: {path}: the fd handed for it ({h.fd}) is open "
                    f"{_ACCESS_WORDS.get(have, 'oddly')}, but it is used "
                    f"{_ACCESS_WORDS[want]} (hand an fd opened "
                    f"{'O_RDWR' if want == os.O_RDWR else 'O_RDONLY' if reads else 'O_WRONLY'})")
    fd = os.dup(h.fd)  # the caller closes what it gets; the handed fd stays for other uses
    return _checked(fd, path, what, allow_block, error)


def _checked(fd: int, path: Path, what: str, allow_block: bool,
             error: type[UserInputError]) -> tuple[int, os.stat_result]:
    """``fd`` (closed on failure) once its file is of a kind we take, in blocking mode."""
    try:
        st = os.fstat(fd)
        _check_kind(st, path, what, allow_block, error)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def open_host_file(path: Path, flags: int, *, what: str, allow_block: bool = False,
                   error: type[UserInputError] = UserInputError,
                   mode: int = 0o644) -> tuple[int, os.stat_result]:
    """Open ``path`` with ``flags`` (plus O_CLOEXEC) without ever blocking in open().

    Returns the fd (in blocking mode) and its fstat. Anything but a regular
    file (or a block device with ``allow_block``) is refused with ``error``
    naming ``what`` (a config field such as ``disks[0].path``). With O_CREAT a
    missing file is created. A path in ``handed`` is not opened: a duplicate
    of its handed fd is returned (see the module docstring).
    """
    if handed:
        h = handed.get(_key(path))
        if h is not None:
            return _open_handed(h, path, flags, what, allow_block, error)
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
    return _checked(fd, path, what, allow_block, error)
