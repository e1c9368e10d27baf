"""The VMM's seccomp allow-list, loaded with libseccomp (``pyseccomp``).

The list is measured, not guessed: the running VMM was traced with
``strace -f`` from the end of set-up on both backends (software CPU: the
default guest to a shell with two disks, rng and the virtio console, disk
writes and reads, a reboot, power-off, on the serial and the virtio console;
KVM: the test guest's boot/hello/timer/rtc/triple/smp/reset/halt/virtio-blk
scenarios, console to a file, SIGINT/SIGTERM). Every syscall seen is in
``MEASURED``. ``PATHS_NOT_TRACED`` adds the few that code paths the traces
did not take need (discard, write-zeroes, interrupted sleeps, tracebacks,
the AF_UNIX API to come); each says why.

Arguments are checked where it is cheap and closes a door:
- ``clone`` only with CLONE_THREAD (threads, never processes); ``clone3``
  (whose flags sit behind a pointer seccomp cannot read) fails with ENOSYS,
  and glibc then falls back to ``clone``;
- ``ioctl`` only KVM's (type 0xAE) and the terminal calls the console makes;
- ``socket``/``socketpair`` only AF_UNIX;
- ``tgkill`` only to this process's own threads (the vCPU kick).

Anything else kills the whole process (SECCOMP_RET_KILL_PROCESS, as
Firecracker): a syscall outside the list is either a compromised VMM, which
must not get to probe with EPERM answers, or a gap in the list, which must be
loud (exit by SIGSYS, audited by the kernel) rather than a Python error some
handler swallows into a half-working VM.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from typing import Any

__all__ = ["MEASURED", "PATHS_NOT_TRACED", "SeccompError", "allowed_syscalls", "available",
           "load_filter"]

#: Seen in the traces after set-up (both backends; see the module docstring).
MEASURED: tuple[str, ...] = (
    "brk", "clock_nanosleep", "close", "epoll_create1", "epoll_ctl", "epoll_wait",
    "eventfd2", "exit", "exit_group", "fcntl", "fdatasync", "futex", "getdents64",
    "getpid", "getrandom", "gettid", "lseek", "madvise", "mmap", "mprotect", "munmap",
    "newfstatat", "openat", "pread64", "preadv2", "pwritev2", "read", "rseq", "rt_sigaction",
    "rt_sigprocmask", "rt_sigreturn", "set_robust_list", "statfs", "write",
    # with argument checks below: clone3 (-> ENOSYS), clone, ioctl, tgkill
)

#: Needed on paths the traced runs did not take.
PATHS_NOT_TRACED: dict[str, str] = {
    "fallocate": "virtio-blk discard / write-zeroes with unmap (raw); qcow2 freed clusters",
    "pwrite64": "qcow2 metadata updates; raw write-zeroes without fallocate support",
    "fsync": "flushing a file the VMM writes (console file)",
    "restart_syscall": "a sleep or futex wait interrupted by SIGINT/SIGTERM resumes through it",
    "sigaltstack": "CPython's faulthandler and signal set-up on new threads",
    "sched_yield": "glibc/CPython lock back-off",
    "nanosleep": "time.sleep on older glibc",
    "clock_gettime": "the vDSO falls back to the syscall when the clock source is unstable",
    "gettimeofday": "the same fallback",
    "poll": "select/poll on the console",
    "ppoll": "the same, newer glibc",
    "epoll_pwait": "epoll_wait on newer glibc",
    "fstat": "os.fstat on older glibc (newer: newfstatat)",
    "statx": "os.stat on newer glibc",
    "readlink": "os.path.realpath in tracebacks and lazy imports",
    "getcwd": "os.getcwd / relative paths in tracebacks",
    "dup": "os.dup of an open file",
    "dup3": "os.dup2",
    "mremap": "realloc of large buffers (guest reads into bytes)",
    "sched_getaffinity": "os.cpu_count in lazily imported code",
    # snapshots (pyvirt.vmm.snapshot): a temporary directory renamed into place
    "mkdir": "snapshot directory", "mkdirat": "snapshot directory",
    "rename": "snapshot rename into place", "renameat": "snapshot rename into place",
    "renameat2": "snapshot rename into place",
    "unlink": "replacing an old snapshot", "unlinkat": "replacing an old snapshot",
    "rmdir": "replacing an old snapshot",
    "ftruncate": "sizing the sparse memory file",
    "mincore": "skipping guest pages never touched when writing memory",
    "fchmod": "the API socket's mode", "umask": "the API socket's mode",
    # the control API listens on an AF_UNIX socket (socket/socketpair below)
    "bind": "AF_UNIX API socket", "listen": "AF_UNIX API socket",
    "accept4": "AF_UNIX API socket", "connect": "AF_UNIX API socket",
    "sendto": "AF_UNIX API socket", "recvfrom": "AF_UNIX API socket",
    "sendmsg": "AF_UNIX API socket", "recvmsg": "AF_UNIX API socket",
    "shutdown": "AF_UNIX API socket", "getsockname": "AF_UNIX API socket",
    "getpeername": "AF_UNIX API socket", "setsockopt": "AF_UNIX API socket",
    "getsockopt": "AF_UNIX API socket",
    # virtio-vsock: its host sockets use the AF_UNIX calls above; its timerfd (handshake
    # deadlines) is created with the device, before the sandbox, and armed later
    "timerfd_settime": "virtio-vsock handshake deadlines",
    # NICs (pyvirt.net): frames to and from a TAP, passt's helper process
    "readv": "TAP frames read into guest buffers", "writev": "TAP frames from guest buffers",
    "wait4": "reaping passt when the VM ends (it quits when its socket closes)",
}

_CLONE_THREAD = 0x00010000
_AF_UNIX = 1  # <sys/socket.h>; not importing socket keeps start-up lean
_KVMIO_TYPE = 0xAE00  # _IOC_TYPE bits of every KVM ioctl
_TYPE_MASK = 0xFF00
#: what the console (termios, os.isatty, os.set_blocking) and open() do to terminals
TERMINAL_IOCTLS: tuple[int, ...] = (
    0x5401,  # TCGETS (isatty, tcgetattr; io.open asks every new file)
    0x5402,  # TCSETS
    0x5403,  # TCSETSW (tcsetattr TCSADRAIN: restoring the terminal)
    0x5404,  # TCSETSF
    0x5413,  # TIOCGWINSZ
    0x5421,  # FIONBIO
)
#: what a NIC does to its TAP once the guest runs (the guest's offload features)
NET_IOCTLS: tuple[int, ...] = (
    0x400454D0,  # TUNSETOFFLOAD (pyvirt.net.tap)
)


#: the syscalls of the exit and I/O paths, checked first
_HOT = ("ioctl", "futex", "epoll_wait", "read", "write", "preadv2", "pwritev2", "readv",
        "writev")


class SeccompError(OSError):
    """libseccomp is missing, or the kernel refused the filter."""


_SONAMES = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}


def _lib() -> Any:
    if "pyseccomp" in sys.modules:
        return sys.modules["pyseccomp"]
    import ctypes
    import types

    # pyseccomp finds its libraries with ctypes.util.find_library, whose module
    # imports subprocess/tempfile/shutil (~11 ms) and which runs ``ldconfig -p``
    # per call (~10 ms each): most of the sandbox's start-up cost. While it
    # loads, it sees a stand-in that knows the two sonames and defers to the
    # real search for anything else.
    real_util = sys.modules.get("ctypes.util")

    def find_library(name: str) -> str | None:
        soname = _SONAMES.get(name)
        if soname is not None:
            try:
                ctypes.CDLL(soname)
                return soname
            except OSError:
                pass
        import importlib

        sys.modules.pop("ctypes.util", None)
        found: str | None = importlib.import_module("ctypes.util").find_library(name)
        return found

    stand_in = types.ModuleType("ctypes.util")
    stand_in.find_library = find_library  # type: ignore[attr-defined]
    sys.modules["ctypes.util"] = stand_in
    saved_attr = getattr(ctypes, "util", None)
    ctypes.util = stand_in  # type: ignore[attr-defined]
    try:
        import pyseccomp  # type: ignore[import-untyped]  # no stubs; ctypes over libseccomp
    except (ImportError, OSError, RuntimeError) as exc:  # the binding, or libseccomp.so.2
        raise SeccompError(errno.ENOENT, f"libseccomp is not usable: {exc}") from exc
    finally:
        if sys.modules.get("ctypes.util") is stand_in:
            del sys.modules["ctypes.util"]
        if real_util is not None:
            sys.modules["ctypes.util"] = real_util
        if saved_attr is not None:
            ctypes.util = saved_attr  # type: ignore[attr-defined]
        elif getattr(ctypes, "util", None) is stand_in:
            del ctypes.util  # type: ignore[attr-defined]
    return pyseccomp


def available() -> str | None:
    """None when a filter can be loaded here; else why not."""
    try:
        _lib()
    except SeccompError as exc:
        return str(exc.strerror)
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            if not any(line.startswith("Seccomp_filters:") or line.startswith("Seccomp:")
                       for line in f):
                return "the kernel has no seccomp"
    except OSError:
        pass  # no /proc: loading will tell
    return None


def allowed_syscalls() -> list[str]:
    """Every syscall the filter lets through (some only with checked arguments)."""
    return sorted({*MEASURED, *PATHS_NOT_TRACED, "clone", "ioctl", "socket", "socketpair",
                   "tgkill"})


def load_filter(*, kill: bool = True) -> None:
    """Load the allow-list on every thread of the process (SECCOMP_FILTER_FLAG_TSYNC).

    Needs no_new_privs set before (or CAP_SYS_ADMIN). ``kill=False`` makes denied calls
    fail with EPERM instead: only for tests that want to keep the process."""
    sc = _lib()
    deny = sc.KILL_PROCESS if kill else sc.ERRNO(errno.EPERM)
    f = sc.SyscallFilter(deny)
    try:
        f.set_attr(sc.Attr.ACT_BADARCH, deny)  # i386/x32 entry points: same answer
        f.set_attr(sc.Attr.CTL_TSYNC, 1)  # threads started before are covered too
        f.set_attr(sc.Attr.CTL_NNP, 0)  # apply() sets no_new_privs itself, first
        # a binary tree instead of a linear list; libseccomp < 2.5 keeps the
        # list, with the hot calls first (below)
        with contextlib.suppress(OSError):
            f.set_attr(sc.Attr.CTL_OPTIMIZE, 2)
        for prio, hot in enumerate(_HOT, start=1):  # KVM_RUN, the vCPU/I/O waits
            f.syscall_priority(hot, 256 - prio)
        arch = sc.system_arch()
        for name in sorted({*MEASURED, *PATHS_NOT_TRACED}):
            if sc.resolve_syscall(arch, name) < 0:
                continue  # this libseccomp does not know it: nothing to allow
            f.add_rule(sc.ALLOW, name)
        f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
        f.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, _CLONE_THREAD, _CLONE_THREAD))
        # the request is an unsigned int to the kernel; mask so upper register
        # bits (ctypes may sign-extend) cannot matter
        f.add_rule(sc.ALLOW, "ioctl", sc.Arg(1, sc.MASKED_EQ, _TYPE_MASK, _KVMIO_TYPE))
        for request in (*TERMINAL_IOCTLS, *NET_IOCTLS):
            f.add_rule(sc.ALLOW, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
        f.add_rule(sc.ALLOW, "socket", sc.Arg(0, sc.EQ, _AF_UNIX))
        f.add_rule(sc.ALLOW, "socketpair", sc.Arg(0, sc.EQ, _AF_UNIX))
        f.add_rule(sc.ALLOW, "tgkill", sc.Arg(0, sc.EQ, os.getpid()))
        f.load()
    except OSError as exc:
        raise SeccompError(exc.errno or errno.EINVAL,
                           f"loading the seccomp filter failed: {exc}") from exc
