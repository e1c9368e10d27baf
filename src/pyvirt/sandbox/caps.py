"""no_new_privs and capabilities, with ctypes (prctl(2), capset(2)).

Both are per-thread attributes: set them while the process has one thread
(seccomp's TSYNC also carries no_new_privs to the others).
"""

from __future__ import annotations

import ctypes
import errno
import os

__all__ = ["CapsError", "drop_capabilities", "no_new_privs", "set_no_new_privs"]

_PR_CAPBSET_READ = 23
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_GET_NO_NEW_PRIVS = 39
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_SYS_CAPSET = 126  # x86_64
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class CapsError(OSError):
    """prctl/capset refused a change."""


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32))


def _prctl_or_raise(option: int, arg2: int = 0, arg3: int = 0, what: str = "prctl") -> int:
    ret: int = _prctl(option, arg2, arg3, 0, 0)
    if ret < 0:
        e = ctypes.get_errno()
        raise CapsError(e, f"{what}: {os.strerror(e)}")
    return ret


def set_no_new_privs() -> None:
    """execve can no longer grant privileges (setuid bits, file capabilities);
    also what lets an unprivileged process install seccomp and Landlock."""
    _prctl_or_raise(_PR_SET_NO_NEW_PRIVS, 1, what="PR_SET_NO_NEW_PRIVS")


def no_new_privs() -> bool:
    return _prctl_or_raise(_PR_GET_NO_NEW_PRIVS, what="PR_GET_NO_NEW_PRIVS") == 1


def drop_capabilities() -> bool:
    """Empty the ambient, bounding, effective, permitted and inheritable sets.

    Returns whether the bounding set was emptied: that needs CAP_SETPCAP,
    which an unprivileged VMM does not hold (nor any other capability, and
    with no_new_privs and no execve it can gain none)."""
    _prctl_or_raise(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, what="PR_CAP_AMBIENT")
    bounding = True
    cap = 0
    while True:
        if _prctl(_PR_CAPBSET_READ, cap, 0, 0, 0) < 0:
            break  # EINVAL past the kernel's last capability
        if _prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) < 0:
            e = ctypes.get_errno()
            if e != errno.EPERM:
                raise CapsError(e, f"PR_CAPBSET_DROP {cap}: {os.strerror(e)}")
            bounding = False
        cap += 1
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()  # version 3: two 32-bit halves, all zero
    if _syscall(ctypes.c_long(_SYS_CAPSET), ctypes.byref(header), data) < 0:
        e = ctypes.get_errno()
        raise CapsError(e, f"capset: {os.strerror(e)}")
    return bounding
