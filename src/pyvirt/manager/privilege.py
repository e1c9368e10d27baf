"""Least privilege for the VMMs the daemon starts (issue #12, item 9).

A VMM parses what a hostile guest hands it, so it runs with as little as the
host allows:

- as the system user ``pyvirt-vm`` (created by ``make setup``: no login shell,
  no home, in group ``kvm`` when there is one) when the daemon is root and the
  user exists; otherwise as the daemon's own user, with ``Privilege.reason``
  saying why;
- with its files handed over as open descriptors (``open_files``): the kernel,
  the initrd, every disk image and every file of its backing chain, each opened
  here with the access it needs (a writable top image O_RDWR, everything else
  O_RDONLY) and passed as ``--fd PATH=N[,N2]`` (docs/api.md, "Handed files");
  the VM user needs no access to those paths at all;
- with ``PR_SET_NO_NEW_PRIVS`` set before exec, umask 077, a clean
  environment, its own session, no core dumps (they would hold guest memory);
- in its own cgroup ``pyvirt.slice/vm-UUID8`` with a memory limit of the guest's
  RAM plus the VMM's overhead (``memory_limit_for``), joined before exec;
- and, once set up, in the VMM's own sandbox (seccomp allow-list, Landlock,
  capabilities dropped: ``pyvirt.sandbox``).

Where the host allows less (no such user, a non-root daemon, no writable
memory cgroup), the VM still starts and the reason is recorded: ``reason``,
``cgroup_reason`` and ``notes()`` (which the Manager shows in dominfo).

The Manager's sequence for one start::

    priv.prepare_vm_dirs(vm_dir, vm_run)
    priv.write_file(vm_run / "config.json", config_json)     # the VM user reads it
    cg = priv.cgroup_create(uuid, memory_limit_for(config))  # None: see priv.cgroup_reason
    with priv.open_files(config) as handed:                  # InvalidArgument naming the field
        handed.add("tap:" + tap, tap_fd)                       # handed over, closed with the rest
        kw = priv.spawn_kwargs(handed, cgroup=cg, cache_dir=priv.prepare_cache_dir(paths.state))
        proc = subprocess.Popen(argv + handed.args, stdin=..., stdout=log, **kw)
    cg.add(proc.pid)                                         # a no-op: the child joined already
    ...
    cg.remove()                                              # when the VMM has ended
                                                             # (after a restart: priv.cgroup_for)

Errors: ``InvalidArgument`` (a file of the configuration cannot be opened or
is not a usable image: the field is named), ``OperationFailed`` (the host
refused something the daemon needs: a directory, a user).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import pwd
import stat
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from pyvirt.errors import UserInputError
from pyvirt.manager.errors import InvalidArgument, OperationFailed

if TYPE_CHECKING:
    from pyvirt.vmm.config import VmConfig

__all__ = [
    "API_GROUP",
    "CGROUP_SLICE",
    "DEFAULT_OVERHEAD",
    "TCG_BUFFER",
    "VM_USER",
    "Cgroup",
    "HandedFile",
    "HandedFiles",
    "Privilege",
    "ensure_users",
    "memory_limit_for",
    "own_cgroup",
]

log = logging.getLogger(__name__)

VM_USER = "pyvirt-vm"
API_GROUP = "pyvirt"
CGROUP_SLICE = "pyvirt.slice"
#: where a test (or an admin) puts pyvirt.slice instead of the hierarchy's root:
#: a cgroup path such as "/process_api/1234" (the test's own cgroup)
CGROUP_PARENT_ENV = "PYVIRT_CGROUP_PARENT"

#: The VMM's memory beyond guest RAM. Measured on the default guest on the
#: software CPU (this host, 2026-12): 90 MiB of RSS besides the guest's pages at
#: the ready line (Python, the engine, device buffers), flat from 256 MiB to
#: 1 GiB of guest RAM; doubled for virtio queues in flight, snapshot writing
#: and the page cache the VMM's own image I/O is charged with.
DEFAULT_OVERHEAD = 192 << 20
#: the software CPU's translation buffer (unicorn's default code_gen_buffer: a
#: 1 GiB mapping, filled as the guest runs new code before it is flushed)
TCG_BUFFER = 1 << 30

_PR_SET_NO_NEW_PRIVS = 38
_SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: PYVIRT_* variables the VMM must not inherit: the client's secrets, and the
#: cache location (set to the VM user's own below)
_ENV_HELD_BACK = frozenset({"PYVIRT_URI", "PYVIRT_TOKEN", "PYVIRT_CACHE_DIR",
                            CGROUP_PARENT_ENV})


def memory_limit_for(config: VmConfig, *, overhead: int = DEFAULT_OVERHEAD) -> int:
    """The cgroup memory limit of a VMM running ``config``: guest RAM, the
    VMM's ``overhead``, and the translation buffer unless it surely runs on KVM."""
    limit = config.memory + overhead
    if config.accel != "kvm":
        limit += TCG_BUFFER
    return limit


# --------------------------------------------------------------------------- files

@dataclass
class HandedFile:
    """One path handed to the VMM: its fd (and, for a qcow2 image under
    cache=none, a second fd without O_DIRECT for metadata)."""

    key: str  # the path exactly as the VMM will name it, or "tap:IFNAME"
    fds: tuple[int, ...]
    writable: bool
    what: str  # the config field it came from, for messages

    @property
    def arg(self) -> str:
        return f"{self.key}={','.join(map(str, self.fds))}"


class HandedFiles:
    """The descriptors a VMM receives (``--fd`` arguments and ``pass_fds``).
    Close them (``close()`` or ``with``) once the VMM has been spawned: the
    child holds its own copies."""

    def __init__(self) -> None:
        self.files: list[HandedFile] = []
        self._private: list[int] = []  # the daemon's own (the cgroup join fd): never passed

    def __enter__(self) -> HandedFiles:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def fds(self) -> list[int]:
        return [fd for f in self.files for fd in f.fds]

    @property
    def args(self) -> list[str]:
        out: list[str] = []
        for f in self.files:
            out += ["--fd", f.arg]
        return out

    def get(self, key: str) -> HandedFile | None:
        return next((f for f in self.files if f.key == key), None)

    def add(self, key: str, fd: int, *, writable: bool = True, what: str = "") -> None:
        """Hand ``fd`` over as ``key`` (a TAP: ``"tap:IFNAME"``); owned from here."""
        if self.get(key) is not None:
            os.close(fd)
            raise ValueError(f"{key} is handed over twice")
        self.files.append(HandedFile(key, (fd,), writable, what or key))

    def keep_private(self, fd: int) -> None:
        """An fd the spawn needs that is closed with the rest, never passed."""
        self._private.append(fd)

    def close(self) -> None:
        for fd in [*self.fds, *self._private]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.files.clear()
        self._private.clear()


def _field_error(exc: Exception, what: str) -> InvalidArgument:
    """``"disks[0].path: /x: no such file"`` -> InvalidArgument naming the field."""
    msg = str(exc)
    field_name = what.split(": ", 1)[0]
    detail = msg[len(field_name) + 2:] if msg.startswith(field_name + ": ") else msg
    return InvalidArgument(detail, field_name)


def _open(path: Path, *, writable: bool, what: str, allow_block: bool) -> int:
    from pyvirt.hostfile import open_host_file

    try:
        fd, _ = open_host_file(path, os.O_RDWR if writable else os.O_RDONLY, what=what,
                               allow_block=allow_block)
    except UserInputError as exc:
        raise _field_error(exc, what) from None
    return fd


class _Opener:
    """Opens the files of one configuration into a ``HandedFiles``, walking each
    qcow2 chain as the VMM will (``pyvirt.disk.open``): same probing rules, so
    a backing name is followed only where the VMM would follow it."""

    def __init__(self, handed: HandedFiles) -> None:
        self.handed = handed

    def file(self, path: Path, *, writable: bool, what: str, second: bool = False,
             allow_block: bool = False) -> int:
        """Open ``path`` (once per path: a base shared by two overlays is
        handed once); returns the fd to read it through."""
        key = os.path.abspath(path)  # as pyvirt.hostfile keys its registry
        old = self.handed.get(key)
        if old is not None and (old.writable or not writable) and (len(old.fds) > 1 or not second):
            return old.fds[0]
        writable = writable or (old is not None and old.writable)
        fds = [_open(path, writable=writable, what=what, allow_block=allow_block)]
        try:
            if second:  # its own open file: the VMM sets O_DIRECT on the first only
                fds.append(_open(path, writable=writable, what=what, allow_block=allow_block))
        except BaseException:
            os.close(fds[0])
            raise
        if old is not None:  # widen an earlier, narrower use of the same path
            self.handed.files.remove(old)
            for fd in old.fds:
                os.close(fd)
        self.handed.files.append(HandedFile(key, tuple(fds), writable, what))
        return fds[0]

    def disk(self, path: Path, fmt: str | None, *, writable: bool, direct: bool,
             what: str) -> None:
        from pyvirt.disk.backend import ChainLimits, DiskError
        from pyvirt.disk.open import QCOW2_MAGIC, format_field

        limits = ChainLimits()
        seen: set[tuple[int, int]] = set()
        depth = 0
        while True:
            if depth > limits.max_depth:
                raise _field_error(DiskError(f"{what}: the backing chain is deeper than "
                                             f"{limits.max_depth} images"), what)
            fd = self.file(path, writable=writable and depth == 0, what=what, allow_block=True)
            st = os.fstat(fd)
            ident = (st.st_dev, st.st_ino) if not stat.S_ISBLK(st.st_mode) else (st.st_rdev, -1)
            if ident in seen:
                raise _field_error(DiskError(f"{what}: {path} is already in this backing "
                                             "chain (a loop)"), what)
            seen.add(ident)
            try:
                head = os.pread(fd, 72, 0)
            except OSError as exc:
                raise _field_error(DiskError(f"{what}: {path}: cannot read: {exc.strerror}"),
                                   what) from None
            found = "qcow2" if head[:4] == QCOW2_MAGIC else "raw"
            readonly = not writable or depth > 0
            if fmt is None and found == "qcow2" and not readonly:
                # the VMM refuses it (a guest may have written that header): follow nothing
                raise _field_error(DiskError(
                    f"{format_field(what)}: {path} starts with a qcow2 header but no format "
                    "was given; say format=qcow2 (or format=raw to give the guest these bytes "
                    "as they are)"), format_field(what))
            kind = fmt or found
            if kind != "qcow2":
                return  # raw (or a format the VMM will refuse with its own message)
            if direct:  # metadata goes through a second, buffered fd (docs/design.md)
                fd = self.file(path, writable=writable and depth == 0, what=what, second=True,
                               allow_block=True)
            name, bfmt = self._backing(fd, st, path, what)
            if name is None:
                return
            bpath = Path(name)
            if not bpath.is_absolute():  # as Qcow2Disk.open resolves it
                bpath = path.parent / bpath
            path, fmt, depth = bpath, bfmt, depth + 1
            what = f"{what.split(': ', 1)[0]}: backing file {name}"

    @staticmethod
    def _backing(fd: int, st: os.stat_result, path: Path,
                 what: str) -> tuple[str | None, str | None]:
        """The backing file name and format a qcow2 header records (checked by
        ``parse_header``: every bound of a hostile header)."""
        from pyvirt.disk.backend import DiskError
        from pyvirt.disk.qcow2_header import parse_header

        size = os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size
        try:
            head = os.pread(fd, 24, 0)
            bits = int.from_bytes(head[20:24], "big") if len(head) >= 24 else 0
            # parse_header refuses bits outside 9..21 before it needs the cluster
            cluster = 1 << bits if 9 <= bits <= 21 else 4096
            buf = os.pread(fd, min(cluster, size), 0)
            header = parse_header(buf, what, size)
        except DiskError as exc:
            raise _field_error(exc, what) from None
        except OSError as exc:
            raise _field_error(DiskError(f"{what}: {path}: cannot read: {exc.strerror}"),
                               what) from None
        return header.backing_name, header.backing_format


# --------------------------------------------------------------------------- cgroups

@dataclass
class Cgroup:
    """One VM's cgroup (``pyvirt.slice/vm-UUID8``) in the memory hierarchy."""

    path: Path
    version: int  # 1: the v1 memory hierarchy; 2: the unified one
    memory_limit: int

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    @property
    def limit_file(self) -> Path:
        return self.path / ("memory.max" if self.version == 2 else "memory.limit_in_bytes")

    def open_join_fd(self) -> int:
        """``cgroup.procs`` opened by the daemon: the child writes "0" to it
        after it changed user. The kernel checks a migration against the
        opener's credentials (Linux >= 5.16), so the unprivileged child may."""
        return os.open(self.procs_file, os.O_WRONLY | os.O_CLOEXEC)

    def add(self, pid: int) -> None:
        """Move ``pid`` in (a no-op when it is in already)."""
        try:
            with open(self.procs_file, "w", encoding="ascii") as f:
                f.write(str(pid))
        except ProcessLookupError:
            pass  # it ended meanwhile
        except OSError as exc:
            raise OperationFailed(f"cannot move process {pid} into cgroup {self.path}: "
                                  f"{exc.strerror}") from None

    def pids(self) -> list[int]:
        try:
            text = self.procs_file.read_text(encoding="ascii")
        except OSError:
            return []
        return [int(x) for x in text.split()]

    def read_limit(self) -> int | None:
        try:
            text = self.limit_file.read_text(encoding="ascii").strip()
        except OSError:
            return None
        return None if text == "max" else int(text)

    def remove(self, *, timeout: float = 2.0) -> bool:
        """Remove the (empty) cgroup; True when gone. A process that is still
        exiting keeps it busy briefly: retried for ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.rmdir(self.path)
                return True
            except FileNotFoundError:
                return True
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                    log.warning("cgroup %s not removed: %s", self.path, exc.strerror)
                    return False
            time.sleep(0.05)


@dataclass(frozen=True)
class _Hierarchy:
    """Where VM cgroups are made: the directory holding pyvirt.slice."""

    base: Path
    version: int


def own_cgroup() -> str:
    """This process's cgroup in the hierarchy VM cgroups would go to (the v1
    memory one when it is mounted, else the unified one): what a test sets
    ``PYVIRT_CGROUP_PARENT`` to, so its VMs stay within its own cgroup."""
    # the memory controller is in one hierarchy only: a "memory" line means v1
    return _own_cgroup_line("memory") or _own_cgroup_line("") or "/"


def _own_cgroup_line(hierarchy: str) -> str | None:
    try:
        text = Path("/proc/self/cgroup").read_text(encoding="ascii")
    except OSError:
        return None
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == hierarchy:
            return path
    return None


def _find_hierarchy(root: Path, parent: str) -> tuple[_Hierarchy | None, str]:
    """v2 where the unified hierarchy hands the memory controller to children
    of ``parent``; else the v1 memory hierarchy. (None, why) when neither."""
    rel = parent.strip("/")
    why: list[str] = []
    for mount in (root, root / "unified"):
        if not (mount / "cgroup.controllers").is_file():
            continue
        base = mount / rel if rel else mount
        try:
            enabled = (base / "cgroup.subtree_control").read_text(encoding="ascii").split()
        except OSError as exc:
            why.append(f"{base}: {exc.strerror}")
            continue
        if "memory" in enabled and os.access(base, os.W_OK):
            return _Hierarchy(base, 2), ""
        why.append(f"cgroup v2 at {mount} does not enable the memory controller"
                   + (f" below {parent}" if rel else ""))
    v1 = root / "memory"
    if (v1 / "memory.limit_in_bytes").is_file():
        base = v1 / rel if rel else v1
        if base.is_dir() and os.access(base, os.W_OK):
            return _Hierarchy(base, 1), ""
        why.append(f"{base} is not writable")
    else:
        why.append("no cgroup v1 memory hierarchy")
    return None, "no memory cgroup for VMs: " + "; ".join(why)


# --------------------------------------------------------------------------- the policy

@dataclass(frozen=True)
class Privilege:
    """Who VMMs run as and what confines them; ``detect()`` decides for this host."""

    vm_uid: int
    vm_gid: int
    #: supplementary groups of the VMM (the VM user's own, and /dev/kvm's group)
    extra_gids: tuple[int, ...] = ()
    #: True: VMMs run as another user than the daemon (the daemon is root)
    drop: bool = False
    #: one line: who VMMs run as, and why
    reason: str = ""
    cgroups: _Hierarchy | None = None
    cgroup_reason: str = ""
    #: further one-line notes about the host (e.g. /dev/kvm out of reach)
    host_notes: tuple[str, ...] = ()
    api_group: str = API_GROUP
    #: the interpreter VMMs run with (None: the daemon's own), and the PYTHONPATH it
    #: needs: the daemon's interpreter may lie where the VM user cannot reach it
    #: (a pyenv under /root), while the system's of the same version can run pyvirt
    #: from the same site-packages (see ``_system_python``)
    python: str | None = None
    pythonpath: str | None = None
    #: False: /dev/kvm exists but the VM user cannot open it (its VMs use the software CPU)
    kvm_reachable: bool = True

    @classmethod
    def detect(cls, *, user: str = VM_USER, api_group: str = API_GROUP,
               cgroup_root: Path = Path("/sys/fs/cgroup"), cgroup_parent: str | None = None,
               kvm_device: Path = Path("/dev/kvm"),
               runtime: Sequence[Path] | None = None) -> Privilege:
        """Root and ``user`` exists: VMMs as that user; else as the daemon's own
        user. Cgroups below ``cgroup_parent`` (default ``$PYVIRT_CGROUP_PARENT``,
        else the hierarchy's root, as libvirt's machine.slice). The VM user must
        reach ``runtime`` (default: the Python interpreter, its installation and
        pyvirt's package), or VMMs run as root and ``reason`` names what is out of reach."""
        parent = cgroup_parent if cgroup_parent is not None else os.environ.get(
            CGROUP_PARENT_ENV, "/")
        euid = os.geteuid()
        hierarchy: _Hierarchy | None = None
        cg_why = "the daemon is not root: VMs get no cgroup of their own"
        if euid == 0:
            hierarchy, cg_why = _find_hierarchy(cgroup_root, parent)
        notes: list[str] = []
        if euid != 0:
            me = _user_name(euid)
            return cls(euid, os.getegid(), drop=False, cgroups=None, cgroup_reason=cg_why,
                       reason=f"VMMs run as the daemon's user {me} (uid {euid}): the daemon "
                              "is not root", api_group=api_group)
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            return cls(0, 0, drop=False, cgroups=hierarchy, cgroup_reason=cg_why,
                       reason=f"VMMs run as root: user {user!r} does not exist (make setup "
                              "creates it)", api_group=api_group)
        gids = [g for g in os.getgrouplist(user, pw.pw_gid) if g != pw.pw_gid]
        python: str | None = None
        pythonpath: str | None = None
        for path in (runtime if runtime is not None else _runtime_paths()):
            blocked = _unreachable(path, pw.pw_uid, (pw.pw_gid, *gids))
            if blocked is None:
                continue
            alt = None if runtime is not None else _system_python(pw.pw_uid,
                                                                  (pw.pw_gid, *gids))
            if alt is None:
                return cls(0, 0, drop=False, cgroups=hierarchy, cgroup_reason=cg_why,
                           reason=f"VMMs run as root: user {user} cannot run pyvirt from "
                                  f"here: {blocked}", api_group=api_group)
            python, pythonpath = alt
            notes.append(f"VMMs run with {python} ({user} cannot reach this daemon's "
                         f"interpreter: {blocked})")
            break
        kvm_reachable = True
        try:
            st = os.stat(kvm_device)
        except OSError:
            pass  # no KVM here: the software CPU needs no device
        else:
            if (st.st_mode & 0o006) == 0o006:
                pass
            elif st.st_gid != 0 and (st.st_mode & 0o060) == 0o060:
                if st.st_gid not in gids:
                    gids.append(st.st_gid)
            elif st.st_uid != pw.pw_uid:
                kvm_reachable = False
                notes.append(f"{kvm_device} is not accessible to {user} (mode "
                             f"{stat.S_IMODE(st.st_mode):04o}, group "
                             f"{_group_name(st.st_gid)}): its VMs use the software CPU")
        return cls(pw.pw_uid, pw.pw_gid, tuple(gids), drop=True,
                   reason=f"VMMs run as user {user} (uid {pw.pw_uid})", cgroups=hierarchy,
                   cgroup_reason=cg_why, host_notes=tuple(notes), api_group=api_group,
                   python=python, pythonpath=pythonpath, kvm_reachable=kvm_reachable)

    def notes(self) -> list[str]:
        """What a VM started now gets, in one line each (for dominfo)."""
        out = [self.reason, *self.host_notes]
        if self.cgroups is None:
            out.append(self.cgroup_reason)
        return out

    # ---------------------------------------------------------------- directories

    def prepare_vm_dirs(self, vm_dir: Path, vm_run: Path) -> None:
        """Create the VM's state and run directories, owned by the VM user,
        mode 0700, and check the VM user can reach them."""
        for d in (vm_dir, vm_run):
            self._own_dir(d)

    def prepare_cache_dir(self, state: Path) -> Path:
        """The VMMs' HOME and XDG_CACHE_HOME (the decompressed-kernel cache):
        ``STATE/cache``, owned by the VM user."""
        d = state / "cache"
        self._own_dir(d)
        return d

    def _own_dir(self, d: Path) -> None:
        try:
            d.mkdir(mode=0o700, exist_ok=True)
            if self.drop:
                st = os.lstat(d)
                if not stat.S_ISDIR(st.st_mode):
                    raise OperationFailed(f"{d} is not a directory")
                if (st.st_uid, st.st_gid) != (self.vm_uid, self.vm_gid):
                    os.chown(d, self.vm_uid, self.vm_gid, follow_symlinks=False)
            os.chmod(d, 0o700)
        except OSError as exc:
            raise OperationFailed(f"cannot prepare {d}: {exc.strerror}") from None
        if self.drop:
            blocked = _unsearchable(d.parent, self.vm_uid, (self.vm_gid, *self.extra_gids))
            if blocked is not None:
                raise OperationFailed(f"the VM user (uid {self.vm_uid}) cannot reach {d}: "
                                      f"{blocked}")

    def write_file(self, path: Path, data: bytes) -> None:
        """Write a file the VMM reads by name (its config.json): a new file,
        owned by the VM user, 0600, replacing any old one."""
        tmp = path.with_name(f".{path.name}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
        try:
            if self.drop:
                os.fchown(fd, self.vm_uid, self.vm_gid)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            os.close(fd)
            tmp.unlink()
            raise
        os.close(fd)
        os.replace(tmp, path)

    # ---------------------------------------------------------------- files

    def open_files(self, config: VmConfig) -> HandedFiles:
        """Open everything ``config`` names that the VMM would open by path:
        kernel, initrd, every disk and every file of its backing chain.
        ``InvalidArgument`` (naming the field) with nothing left open when one
        cannot be opened or is not a usable image."""
        handed = HandedFiles()
        opener = _Opener(handed)
        try:
            opener.file(config.kernel, writable=False, what="kernel")
            if config.initrd is not None:
                opener.file(config.initrd, writable=False, what="initrd")
            for i, disk in enumerate(config.disks):
                opener.disk(disk.path, disk.format, writable=not disk.readonly,
                            direct=disk.cache == "none", what=f"disks[{i}].path")
        except BaseException:
            handed.close()
            raise
        return handed

    # ---------------------------------------------------------------- cgroups

    def cgroup_create(self, uuid: str, memory_limit: int) -> Cgroup | None:
        """``pyvirt.slice/vm-UUID8`` with ``memory_limit`` bytes; None when the
        host offers no memory cgroup (``cgroup_reason`` says why)."""
        h = self.cgroups
        if h is None:
            return None
        cg = self.cgroup_for(uuid, memory_limit)
        assert cg is not None
        slice_dir = h.base / CGROUP_SLICE
        try:
            if not slice_dir.is_dir():
                slice_dir.mkdir(exist_ok=True)
                if h.version == 2:  # children get the memory controller too
                    (slice_dir / "cgroup.subtree_control").write_text("+memory")
            cg.path.mkdir(exist_ok=True)
            cg.limit_file.write_text(str(memory_limit))
            if h.version == 2:
                # an OOM kill takes the VMM and its helpers (passt) together
                with contextlib.suppress(OSError):
                    (cg.path / "memory.oom.group").write_text("1")
        except OSError as exc:
            with contextlib.suppress(OSError):
                cg.path.rmdir()
            raise OperationFailed(f"cannot create cgroup {cg.path}: {exc.strerror}") from None
        return cg

    def cgroup_for(self, uuid: str, memory_limit: int = 0) -> Cgroup | None:
        """The cgroup a VM with ``uuid`` has (or would have): for reattaching
        after a daemon restart and removing it when the VM ends."""
        h = self.cgroups
        if h is None:
            return None
        name = "vm-" + uuid.replace("-", "")[:8]
        return Cgroup(h.base / CGROUP_SLICE / name, h.version, memory_limit)

    # ---------------------------------------------------------------- spawning

    def environment(self, cache_dir: Path | None = None,
                    extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The VMM's environment: PATH, a C.UTF-8 locale, pyvirt's own switches
        (PYVIRT_*, not the client's URI and token), HOME and XDG_CACHE_HOME at
        ``cache_dir``, then ``extra``."""
        # another user gets the system PATH, not the daemon's (root's own dirs)
        path = _SAFE_PATH if self.drop else os.environ.get("PATH") or _SAFE_PATH
        env = {"PATH": path, "LANG": "C.UTF-8"}
        env.update({k: v for k, v in os.environ.items()
                    if k.startswith("PYVIRT_") and k not in _ENV_HELD_BACK})
        if self.pythonpath is not None:
            env["PYTHONPATH"] = self.pythonpath
        if cache_dir is not None:
            env["HOME"] = env["XDG_CACHE_HOME"] = str(cache_dir)
        elif not self.drop and "HOME" in os.environ:
            env["HOME"] = os.environ["HOME"]
        env.update(extra or {})
        return env

    def spawn_kwargs(self, handed: HandedFiles | None = None, *, cgroup: Cgroup | None = None,
                     cache_dir: Path | None = None,
                     env: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Keyword arguments for ``subprocess.Popen`` of one VMM: its user and
        groups, the handed fds (nothing else inherited), its own session,
        umask 077, working directory /, a clean environment, and a preexec that
        joins ``cgroup``, sets no_new_privs and turns core dumps off. After the
        spawn call ``cgroup.add(pid)`` (a no-op when the preexec joined) and
        close ``handed``."""
        from pyvirt.sandbox import caps  # resolves prctl in the parent, not the child

        join_fd = -1
        if cgroup is not None:
            try:
                join_fd = cgroup.open_join_fd()
            except OSError as exc:
                raise OperationFailed(f"cannot open {cgroup.procs_file}: {exc.strerror}") from None
            if handed is None:
                handed = HandedFiles()  # only to own join_fd: the caller cannot close it
                log.warning("spawn_kwargs with a cgroup and no HandedFiles: an fd leaks")
            handed.keep_private(join_fd)
        kw: dict[str, Any] = {
            "pass_fds": tuple(handed.fds) if handed is not None else (),
            "close_fds": True,
            "start_new_session": True,
            "umask": 0o077,
            "cwd": "/",  # `python -m` puts the cwd first on sys.path: nothing to plant there
            "env": self.environment(cache_dir, env),
            "preexec_fn": _preexec(join_fd, caps.set_no_new_privs),
        }
        if self.drop:
            kw.update(user=self.vm_uid, group=self.vm_gid, extra_groups=list(self.extra_gids))
        return kw

    # ---------------------------------------------------------------- the API socket

    def api_socket_group(self) -> int | None:
        """The gid of group ``pyvirt`` (members may use the management socket,
        mode 0660), or None when there is no such group (root only, 0600)."""
        try:
            return grp.getgrnam(self.api_group).gr_gid
        except KeyError:
            return None


def _preexec(join_fd: int, no_new_privs: Callable[[], None]) -> Callable[[], None]:
    import resource

    def run() -> None:
        # Runs in the child between fork and exec, after the user switch: only
        # system calls, no imports, no locks another thread could hold.
        if join_fd >= 0:
            with contextlib.suppress(OSError):  # the parent's cgroup.add() covers it
                os.write(join_fd, b"0")
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        no_new_privs()

    return run


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _runtime_paths() -> list[Path]:
    """What a VMM must reach to run at all: the interpreter (every link of it),
    the installation's and the environment's prefixes, pyvirt's package."""
    import sys

    out = [Path(sys.executable), Path(os.path.realpath(sys.executable)),
           Path(sys.prefix), Path(sys.base_prefix), Path(__file__).resolve().parent.parent]
    return list(dict.fromkeys(out))


def _system_python(uid: int, gids: Sequence[int]) -> tuple[str, str] | None:
    """A system interpreter of this one's version (``/usr/bin/pythonX.Y``) that
    ``uid`` can run, with the PYTHONPATH that gives it pyvirt and its
    dependencies: the daemon's sys.path entries outside its own installation
    (the virtual environment's site-packages, an editable install's source).
    Compiled modules of one X.Y share their ABI, and .pyc files their magic
    number. None when there is none, or the VM user cannot reach what it needs."""
    import sys

    here = [os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)]
    for cand in (f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}",
                 f"/usr/local/bin/python{sys.version_info[0]}.{sys.version_info[1]}"):
        real = os.path.realpath(cand)
        if not os.path.isfile(real) or any(real.startswith(h + os.sep) for h in here):
            continue  # absent, or the daemon's own interpreter again
        entries = [p for p in sys.path[1:] if p and os.path.isdir(p)
                   and not any(os.path.realpath(p).startswith(h + os.sep) or
                               os.path.realpath(p) == h for h in here)]
        needed = [Path(cand), Path(real), *map(Path, entries),
                  Path(__file__).resolve().parent.parent]
        if all(_unreachable(p, uid, gids) is None for p in needed):
            return cand, os.pathsep.join(entries)
    return None


def _unreachable(path: Path, uid: int, gids: Sequence[int]) -> str | None:
    """Why ``uid`` cannot use ``path`` (a directory: list and search it; a
    file: read it, execute it when anyone may), or None."""
    blocked = _unsearchable(path.parent, uid, gids)
    if blocked is not None:
        return blocked
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    want = 0o5 if stat.S_ISDIR(st.st_mode) else 0o4
    shift = 6 if st.st_uid == uid else 3 if st.st_gid in gids else 0
    if (st.st_mode >> shift) & want != want:
        return (f"{path} (mode {stat.S_IMODE(st.st_mode):04o}, owner {_user_name(st.st_uid)}) "
                "is not readable by it")
    return None


def _unsearchable(d: Path, uid: int, gids: Sequence[int]) -> str | None:
    """The first directory from / to ``d`` that ``uid`` (with ``gids``) cannot
    search, described; None when every one is searchable (ACLs aside)."""
    chain: Iterator[Path] = reversed([d, *d.parents])
    for p in chain:
        try:
            st = os.stat(p)
        except OSError as exc:
            return f"{p}: {exc.strerror}"
        if st.st_uid == uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid in gids:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            return (f"{p} (mode {stat.S_IMODE(st.st_mode):04o}, owner {_user_name(st.st_uid)}) "
                    "is not searchable by it")
    return None


# --------------------------------------------------------------------------- set-up

def ensure_users(*, vm_user: str = VM_USER, api_group: str = API_GROUP,
                 run: Callable[[list[str]], None] | None = None) -> list[str]:
    """Create group ``api_group`` and the system user ``vm_user`` (no login
    shell, no home, in group kvm when it exists) unless they exist; what
    ``make setup`` runs as root. Returns what was done (empty: nothing to do)."""
    if os.geteuid() != 0:
        raise OperationFailed("creating the pyvirt group and user needs root")

    def _run(argv: list[str]) -> None:
        r = subprocess.run(argv, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise OperationFailed(f"{argv[0]} failed: {(r.stderr or r.stdout).strip()}")

    do = run or _run
    done: list[str] = []
    try:
        grp.getgrnam(api_group)
    except KeyError:
        do(["groupadd", "--system", api_group])
        done.append(f"group {api_group} created")
    try:
        pw = pwd.getpwnam(vm_user)
    except KeyError:
        do(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
            "/nonexistent", "--shell", "/usr/sbin/nologin", "--comment", "pyvirt VMMs", vm_user])
        done.append(f"user {vm_user} created")
        pw = pwd.getpwnam(vm_user)
    try:
        kvm = grp.getgrnam("kvm")
    except KeyError:
        pass
    else:
        if kvm.gr_gid not in os.getgrouplist(vm_user, pw.pw_gid):
            do(["usermod", "--append", "--groups", "kvm", vm_user])
            done.append(f"user {vm_user} added to group kvm")
    return done


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pyvirt.manager.privilege ensure-users`` (make setup)."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["ensure-users"]:
        sys.stderr.write("usage: python -m pyvirt.manager.privilege ensure-users\n")
        return 2
    try:
        for line in ensure_users() or ["the pyvirt group and the pyvirt-vm user exist"]:
            print(f"users: {line}")
    except OperationFailed as exc:
        sys.stderr.write(f"users: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
