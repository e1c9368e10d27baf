"""Landlock (Linux >= 5.13) through its three system calls, with ctypes.

A ruleset *handles* access rights (what it restricts) and rules *allow* some
of them beneath a path; after ``landlock_restrict_self`` every handled right
not allowed by a rule is denied to this thread and the threads it starts
later (ABI < 8 cannot reach threads that already run; see ``apply``). Only
opening paths is checked: file descriptors opened before keep working.

Each ABI version adds rights (Documentation/userspace-api/landlock.rst):
v2 REFER, v3 TRUNCATE, v4 TCP bind/connect, v5 IOCTL_DEV, v6 scopes
(abstract unix sockets, signals). We handle every right the running kernel
knows, so an older kernel gets the strongest ruleset it can enforce.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "FS_READ",
    "FS_READ_FILE",
    "FS_READ_WRITE_FILE",
    "FS_WRITE_TREE",
    "LandlockError",
    "PathRule",
    "abi_version",
    "handled_fs",
    "restrict_self",
]

# <linux/landlock.h>; x86_64 syscall numbers (the same on every architecture since 5.13)
_SYS_CREATE_RULESET = 444
_SYS_ADD_RULE = 445
_SYS_RESTRICT_SELF = 446
_CREATE_RULESET_VERSION = 1 << 0
_RULE_PATH_BENEATH = 1

EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2
TRUNCATE = 1 << 14  # ABI 3
IOCTL_DEV = 1 << 15  # ABI 5

NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1

#: rights a rule on a file (not a directory) may carry
_FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV

FS_READ_FILE = READ_FILE
FS_READ = READ_FILE | READ_DIR
#: a disk image or console file: read, write, truncate, and device ioctls
#: (a disk may be a block device; /dev/kvm lives on its ioctls)
FS_READ_WRITE_FILE = READ_FILE | WRITE_FILE | TRUNCATE | IOCTL_DEV
#: a directory snapshots are written beneath: make and remove files and
#: directories, rename within it (REFER), read and write the files
FS_WRITE_TREE = (READ_FILE | READ_DIR | WRITE_FILE | TRUNCATE | MAKE_DIR | MAKE_REG
                 | REMOVE_DIR | REMOVE_FILE | REFER)


class LandlockError(OSError):
    """A Landlock call failed (not: Landlock is missing, see ``abi_version``)."""


class _RulesetAttr(ctypes.Structure):
    _fields_ = (("handled_access_fs", ctypes.c_uint64),
                ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64))


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)) in the UAPI header: 12 bytes
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _call(nr: int, *args: object) -> int:
    ret: int = _syscall(ctypes.c_long(nr), *args)
    if ret < 0:
        e = ctypes.get_errno()
        raise LandlockError(e, os.strerror(e))
    return ret


def abi_version() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is absent or disabled."""
    try:
        return _call(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0),
                     ctypes.c_uint32(_CREATE_RULESET_VERSION))
    except LandlockError as exc:
        if exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
            return 0
        raise


def handled_fs(abi: int) -> int:
    """Every file-system right ABI ``abi`` knows."""
    rights = (1 << 13) - 1  # EXECUTE .. MAKE_SYM (ABI 1)
    if abi >= 2:
        rights |= REFER
    if abi >= 3:
        rights |= TRUNCATE
    if abi >= 5:
        rights |= IOCTL_DEV
    return rights if abi >= 1 else 0


def _handled_net(abi: int) -> int:
    return NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0


def _scoped(abi: int) -> int:
    return SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0


def _ruleset_size(abi: int) -> int:
    # the kernel rejects fields it does not know unless they are zero; older
    # kernels reject a larger struct outright, so pass only what ABI knows
    return 24 if abi >= 6 else 16 if abi >= 4 else 8


@dataclass(frozen=True)
class PathRule:
    """Allow ``access`` beneath ``path`` (for a file: on that file)."""

    path: Path
    access: int


def restrict_self(rules: Iterable[PathRule], abi: int) -> None:
    """Build a ruleset allowing ``rules`` (rights the kernel does not know are
    dropped), and enforce it on the calling thread. Needs no_new_privs (or
    CAP_SYS_ADMIN). TCP bind/connect are handled with no rule: denied."""
    fs = handled_fs(abi)
    attr = _RulesetAttr(fs, _handled_net(abi), _scoped(abi))
    ruleset = _call(_SYS_CREATE_RULESET, ctypes.byref(attr),
                    ctypes.c_size_t(_ruleset_size(abi)), ctypes.c_uint32(0))
    try:
        for rule in rules:
            try:
                fd = os.open(rule.path, os.O_PATH | os.O_CLOEXEC)
            except OSError as exc:
                raise LandlockError(exc.errno, f"{rule.path}: {exc.strerror}") from exc
            try:
                access = rule.access & fs
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    access &= _FILE_RIGHTS
                beneath = _PathBeneathAttr(access, fd)
                try:
                    _call(_SYS_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(_RULE_PATH_BENEATH),
                          ctypes.byref(beneath), ctypes.c_uint32(0))
                except LandlockError as exc:
                    raise LandlockError(exc.errno, f"{rule.path}: {exc.strerror}") from exc
            finally:
                os.close(fd)
        _call(_SYS_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(ruleset)
