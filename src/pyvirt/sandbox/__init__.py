"""The VMM sandboxes itself once set-up is done (``pyvirt run --sandbox``).

``apply(policy)`` first checks that every part it is asked for can be
applied (so ``mode="on"`` fails before anything changed), then, in this order:

1. ``no_new_privs``: execve can grant nothing; lets us install the rest.
2. Landlock: the file system shrinks to what the VM was given (read-only:
   kernel, initrd, read-only disks, the vmlinux cache, the Python installation
   and pyvirt's sources for lazy imports and tracebacks, shared libraries,
   /proc/self, CPU topology in sysfs; read-write: disks, the console file,
   /dev/kvm, /dev/null). TCP bind/connect and (ABI >= 6) abstract unix
   sockets and signals to other processes are denied too.
3. capabilities: ambient, bounding, effective, permitted, inheritable emptied.
4. seccomp: the measured allow-list (``seccomp.py``), on every thread (TSYNC).

Landlock and capabilities are per thread and reach only the calling thread
and those it starts afterwards, so the VMM applies the sandbox while it has
one thread (``SandboxReport.notes`` says otherwise); seccomp's TSYNC covers
every thread either way and carries no_new_privs along.

Errors::

    PyvirtError
    └── SandboxError     a part cannot be applied (mode "on"), or applying failed
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pyvirt.errors import PyvirtError

if TYPE_CHECKING:
    from pyvirt.sandbox.landlock import PathRule
    from pyvirt.vmm.config import VmConfig

__all__ = [
    "PROBE_ENV",
    "SandboxError",
    "SandboxMode",
    "SandboxPolicy",
    "SandboxReport",
    "apply",
    "policy_for_vm",
    "probe_from_env",
    "require_all",
    "runtime_read_paths",
    "unavailable",
]

log = logging.getLogger(__name__)

SandboxMode = Literal["auto", "on", "off"]

#: Test-only hook: after the sandbox is applied the VMM reports its state and
#: tries to open each path in this variable (os.pathsep-separated), then makes
#: a forbidden syscall (socket(AF_INET)), which kills it with SIGSYS.
PROBE_ENV = "PYVIRT_TEST_SANDBOX_PROBE"

#: Read-only system paths a running VMM may need: shared libraries for lazily
#: imported extension modules, the loader cache, and what glibc/CPython/the
#: engine read at run time (CPU topology, /proc/self/{status,mounts,maps}).
_SYSTEM_READ_ONLY = ("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib",
                     "/etc/ld.so.cache", "/proc/self", "/sys/devices/system/cpu",
                     "/dev/urandom")


class SandboxError(PyvirtError):
    """The sandbox cannot be applied as asked."""


@dataclass(frozen=True)
class SandboxPolicy:
    """What a sandboxed VMM may still open. Everything else is denied.

    ``read_only``/``read_write`` are files or directories (a directory rule
    covers what is beneath it); ``devices`` are opened read-write with ioctls
    allowed (``/dev/kvm``). Every path must exist when the policy is applied.
    """

    mode: SandboxMode = "auto"
    read_only: tuple[Path, ...] = ()
    read_write: tuple[Path, ...] = ()
    devices: tuple[Path, ...] = ()
    #: directories beneath which files and directories may be created, written,
    #: renamed and removed (where snapshots go)
    write_trees: tuple[Path, ...] = ()
    #: test-only: deny with EPERM instead of killing the process
    seccomp_kill: bool = True


@dataclass
class SandboxReport:
    applied: list[str] = field(default_factory=list)
    #: part -> why it was left out (mode "auto" on a host without it)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [", ".join(self.applied) or "nothing applied"]
        parts += [f"no {k} ({v})" for k, v in self.skipped.items()]
        return "sandbox: " + "; ".join(parts + self.notes)


def runtime_read_paths() -> list[Path]:
    """Where CPython and pyvirt read code from after start-up: the Python
    installation (stdlib, lib-dynload, site-packages), pyvirt's package
    directory, and existing system library paths. Not sys.path[0]: that is
    the script's directory or, for ``python -m``, the working directory."""
    cands: list[str] = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                        *sys.path[1:], str(Path(__file__).resolve().parent.parent),
                        *_SYSTEM_READ_ONLY]
    out: list[Path] = []
    for c in cands:
        if not c:
            continue
        p = Path(c)
        if p.exists() and p not in out:
            out.append(p)
    return out


def policy_for_vm(config: VmConfig, *, mode: SandboxMode, kvm: bool,
                  snapshot_root: Path | None = None) -> SandboxPolicy:
    """The policy of a VMM running ``config``: its kernel, initrd, disks (by
    path; read-only disks read-only), console file, /dev/kvm under KVM, and the
    directory snapshots may be written beneath."""
    from pyvirt.hostfile import is_handed
    from pyvirt.paths import cache_dir

    ro: list[Path] = []
    rw: list[Path] = []
    # a handed file (``--fd``) is used through its fd alone: no rule for its path,
    # which this process may not even be able to name
    for path in (config.kernel, config.initrd):
        if path is not None and not is_handed(path):
            ro.append(path)
    vmlinux = cache_dir() / "vmlinux"
    if vmlinux.is_dir():
        ro.append(vmlinux)  # read-only: a VMM must not plant kernels for the next one
    for disk in config.disks:
        if not is_handed(disk.path):
            (ro if disk.readonly else rw).append(disk.path)
    if config.console.kind == "file" and config.console.path is not None:
        rw.append(config.console.path)
    ro.extend(runtime_read_paths())
    devices = [Path("/dev/null")]
    if kvm:
        devices.append(Path("/dev/kvm"))
    trees = (snapshot_root,) if snapshot_root is not None else ()
    return SandboxPolicy(mode=mode, read_only=tuple(ro), read_write=tuple(rw),
                         devices=tuple(devices), write_trees=trees)


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def _rules(policy: SandboxPolicy) -> Iterator[PathRule]:
    from pyvirt.sandbox import landlock as ll

    for p in policy.read_only:
        yield ll.PathRule(p, ll.FS_READ)
    for p in policy.read_write:
        yield ll.PathRule(p, ll.FS_READ_WRITE_FILE)
    for p in policy.devices:
        yield ll.PathRule(p, ll.FS_READ_WRITE_FILE)
    for p in policy.write_trees:
        yield ll.PathRule(p, ll.FS_WRITE_TREE)


def unavailable() -> dict[str, str]:
    """The parts this host cannot apply, each with the reason (empty: all can be)."""
    from pyvirt.sandbox import landlock, seccomp

    missing: dict[str, str] = {}
    try:
        if landlock.abi_version() == 0:
            missing["landlock"] = "the kernel has no Landlock (or it is disabled)"
    except OSError as exc:
        missing["landlock"] = f"landlock_create_ruleset: {exc.strerror}"
    why = seccomp.available()
    if why is not None:
        missing["seccomp"] = why
    return missing


def require_all(mode: SandboxMode) -> None:
    """For mode "on": raise ``SandboxError`` now if a part cannot be applied
    (the VMM calls this before it writes anything)."""
    if mode == "on":
        for part, reason in unavailable().items():
            raise SandboxError(f"sandbox=on: {part} cannot be applied: {reason}")


def apply(policy: SandboxPolicy) -> SandboxReport:
    """Apply ``policy`` to this process (irreversibly). Mode "auto" leaves out
    what the host lacks and says so in the report; mode "on" raises
    ``SandboxError`` before changing anything if a part is missing."""
    report = SandboxReport()
    if policy.mode == "off":
        report.skipped["sandbox"] = "turned off"
        return report
    from pyvirt.sandbox import caps, landlock, seccomp

    require_all(policy.mode)
    report.skipped.update(unavailable())
    abi = 0 if "landlock" in report.skipped else landlock.abi_version()
    for p in (*policy.read_only, *policy.read_write, *policy.devices):
        if not p.exists():
            raise SandboxError(f"sandbox: {p}: no such file (the policy names it)")
    threads = _threads()
    if threads > 1:
        report.notes.append(f"{threads - 1} thread(s) started before the sandbox keep their "
                            "file system and capabilities (seccomp covers them)")
    try:
        caps.set_no_new_privs()
        report.applied.append("no_new_privs")
        if abi:
            landlock.restrict_self(_rules(policy), abi)
            report.applied.append(f"landlock (ABI {abi})")
        bounding = caps.drop_capabilities()
        report.applied.append("capabilities dropped")
        if not bounding:
            report.notes.append("capability bounding set kept (no CAP_SETPCAP to drop it)")
        if "seccomp" not in report.skipped:
            seccomp.load_filter(kill=policy.seccomp_kill)
            report.applied.append("seccomp allow-list")
    except OSError as exc:
        raise SandboxError(f"sandbox: {exc.strerror or exc}") from exc
    return report


def probe_from_env() -> None:
    """The test-only hook (``PYVIRT_TEST_SANDBOX_PROBE``): report the sandbox
    state and try what it must forbid, on stderr. Never returns when set."""
    target = os.environ.get(PROBE_ENV)
    if not target:
        return

    def say(line: str) -> None:
        os.write(2, f"sandbox-probe: {line}\n".encode())

    with open("/proc/self/status", encoding="ascii") as f:
        wanted = ("NoNewPrivs", "Seccomp", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
        for line in f:
            key, _, value = line.partition(":")
            if key in wanted:
                say(f"{key}={value.strip()}")
    for path in target.split(os.pathsep):
        try:
            with open(path, "rb") as fh:
                fh.read(1)
            say(f"open {path}: allowed")
        except OSError as exc:
            say(f"open {path}: denied ({exc.strerror})")
    import socket

    say("socket(AF_INET): trying")
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
        say("socket(AF_INET): allowed")
    except OSError as exc:
        say(f"socket(AF_INET): denied ({exc.strerror})")
    os._exit(3)  # only reached if the syscall was not fatal
