"""The Manager: the one facade every front end (API, CLI through the API,
tests) calls. Synchronous and thread-safe.

Threads and locks:

- each domain has one lock (by UUID) that serialises operations on it; a
  lifecycle call holds it while it talks to that VM's VMM, never while
  waiting for a shutdown the guest may take long over (``shutdown`` waits
  outside it), and never another domain's;
- ``_runs_lock`` guards the table of running VMMs (held for dict access only);
- the exit watcher (one thread) waits on every VMM's pidfd and records the
  end of one (``_finished``: idempotent under the run's own lock, never the
  domain lock, so an operation holding the domain lock can wait for it);
- the poller (one thread) asks each VM's ``GET /vm`` every 2 s for reboots and
  pauses made behind our back; it only try-locks the domain (an operation in
  progress owns the VM's state);
- the Store's own lock is taken last and held for one short transaction.

VMs outlive the Manager: ``close`` stops watching; ``startup`` adopts every
VMM still running (same pid and start time) and records the end of the others
from their exit files.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import selectors
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyvirt.manager.domain import (
    Definition,
    DiskDef,
    disk_target,
    parse_definition,
    resolve,
)
from pyvirt.manager.errors import (
    AlreadyExists,
    InvalidArgument,
    ManagerError,
    NotFound,
    OperationFailed,
    OperationInvalid,
    OperationTimeout,
)
from pyvirt.manager.paths import DaemonPaths
from pyvirt.manager.vmproc import (
    VmmProcess,
    classify_exit,
    last_log_line,
    read_exit_file,
)

if TYPE_CHECKING:
    import sqlite3

    from pyvirt.api.client import VmClient
    from pyvirt.manager.db import Store
    from pyvirt.manager.events import EventBus
    from pyvirt.manager.monitor import Monitor
    from pyvirt.manager.tasks import TaskHandle, Tasks
    from pyvirt.vmm.config import VmConfig

__all__ = ["ACTIVE_STATES", "Manager"]

log = logging.getLogger(__name__)

#: vCPUs the software CPU runs (hypervisor/emulated/backend.py refuses more)
EMU_MAX_VCPUS = 1
#: states in which a VMM process runs
ACTIVE_STATES = ("running", "paused", "in shutdown")
#: how long a VMM may take from spawn to answering its API (set-up, a restore)
START_TIMEOUT = 180.0
#: how long ``destroy`` waits for PUT /vm/stop before SIGKILL
DESTROY_GRACE = 10.0
POLL_INTERVAL = 2.0
#: memory the host keeps for itself in the limit the GUI offers (at most a quarter of it)
MEMORY_RESERVE = 1 << 30


@dataclass
class _Run:
    """A VMM we watch."""

    uuid: str
    name: str
    proc: VmmProcess
    run_id: int
    api_socket: Path
    console_socket: Path
    exit_file: Path
    log_path: Path
    taps: list[str] = field(default_factory=list)
    cgroup: Any = None
    #: what the daemon asked of it ("destroy", "save", "shutdown"): words the end
    asked: str | None = None
    boot_count: int = 1
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    client: VmClient | None = None

    def vm(self) -> VmClient:
        if self.client is None:
            from pyvirt.api.client import VmClient

            self.client = VmClient(self.api_socket, timeout=30.0)
        return self.client


class Manager:
    def __init__(self, paths: DaemonPaths, *, privilege: Any = None,
                 start_networks: bool = True) -> None:
        self.paths = paths
        self.privilege = privilege
        self._start_networks = start_networks
        self._locks: dict[str, threading.RLock] = {}
        self._locks_guard = threading.Lock()
        self._runs: dict[str, _Run] = {}
        self._runs_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._wake_r, self._wake_w = -1, -1
        self.storage: Any = None
        self.networks: Any = None
        #: the VMM's command line before its options (tests put a fake VMM here)
        self.vmm_command: list[str] = [sys.executable, "-m", "pyvirt", "run"]
        self.store: Store
        self.events: EventBus
        self.tasks: Tasks
        self.monitor: Monitor

    # ---- life of the Manager

    def startup(self) -> None:
        from pyvirt.manager.db import Store
        from pyvirt.manager.events import EventBus
        from pyvirt.manager.tasks import Tasks

        self.paths.ensure()
        self.store = Store(self.paths.db)
        self.events = EventBus(self.store)
        self.tasks = Tasks(self.store, self.events)
        self.tasks.recover()
        from pyvirt.manager.monitor import Monitor

        self.monitor = Monitor(self.paths.state, interval_s=POLL_INTERVAL)
        if self.privilege is None:
            from pyvirt.manager.privilege import Privilege

            self.privilege = Privilege.detect()
        python = getattr(self.privilege, "python", None)
        if python and self.vmm_command[0] == sys.executable:
            self.vmm_command = [python, *self.vmm_command[1:]]  # one the VM user can run
        from pyvirt.manager.storage import Storage

        self.storage = Storage(self.store, self.paths, self.events, self.tasks,
                               privilege=self.privilege)
        self.storage.startup()
        self.storage.set_user_lookup(self.users_of)
        if self._start_networks:
            from pyvirt.manager.network import Networks

            self.networks = Networks(self.store, self.paths, self.events,
                                     privilege=self.privilege)
            self.networks.startup()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._adopt_all()
        for name, target in (("vmm-exits", self._watch_exits), ("vmm-poll", self._poll_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self._autostart()

    def close(self) -> None:
        """Stop watching; every VMM keeps running (a later startup adopts it)."""
        self._stop.set()
        self._wake()
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()
        self.monitor.close()  # its streams end with the daemon
        with self._runs_lock:
            runs = list(self._runs.values())
            self._runs.clear()
        for run in runs:
            if run.client is not None:
                run.client.close()
            run.proc.close()
        if self.networks is not None and hasattr(self.networks, "close"):
            self.networks.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        self.store.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            if self._wake_w >= 0:
                os.write(self._wake_w, b"x")

    # ---- the store

    def _lock(self, uuid: str) -> threading.RLock:
        with self._locks_guard:
            lock = self._locks.get(uuid)
            if lock is None:
                lock = self._locks[uuid] = threading.RLock()
            return lock

    def _row(self, name: str) -> sqlite3.Row:
        with self.store.read() as db:
            row = db.execute("SELECT * FROM domains WHERE name = ?", (name,)).fetchone()
            if row is None:
                row = db.execute("SELECT * FROM domains WHERE uuid = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"domain '{name}' not found")
        return row  # type: ignore[no-any-return]

    @contextlib.contextmanager
    def _domain(self, name: str) -> Iterator[sqlite3.Row]:
        """The domain's row, its lock held (read again under the lock)."""
        first = self._row(name)
        with self._lock(first["uuid"]):
            yield self._row(first["uuid"])

    def _runstate(self, uuid: str) -> dict[str, Any]:
        with self.store.read() as db:
            row = db.execute("SELECT * FROM runstate WHERE uuid = ?", (uuid,)).fetchone()
        if row is None:
            return {"state": "shut off", "reason": "unknown", "detail": "", "run_id": None,
                    "pid": None, "start_ticks": None, "api_socket": None,
                    "console_socket": None, "exit_file": None, "started": None,
                    "config": None, "extra": "{}"}
        return dict(row)

    def _set_state(self, uuid: str, state: str, reason: str, detail: str = "") -> None:
        with self.store.write() as db:
            db.execute("UPDATE runstate SET state = ?, reason = ?, detail = ? WHERE uuid = ?",
                       (state, reason, detail, uuid))

    def _record_stopped(self, uuid: str, state: str, reason: str, detail: str) -> None:
        with self.store.write() as db:
            db.execute("UPDATE runstate SET state = ?, reason = ?, detail = ?, run_id = NULL, "
                       "pid = NULL, start_ticks = NULL, api_socket = NULL, console_socket = NULL,"
                       " started = NULL, extra = '{}' WHERE uuid = ?",
                       (state, reason, detail, uuid))

    def _definition(self, row: sqlite3.Row) -> Definition:
        return parse_definition(json.loads(row["definition"]))

    def _store_definition(self, uuid: str, defn: Definition) -> None:
        with self.store.write() as db:
            db.execute("UPDATE domains SET definition = ?, updated = ? WHERE uuid = ?",
                       (json.dumps(defn.to_doc()), time.time(), uuid))

    def _emit(self, name: str, event: str, detail: str = "") -> None:
        self.events.emit("domain", name, event, detail)

    # ---- domains: definitions

    def list_domains(self, all: bool = True) -> list[dict[str, Any]]:
        with self.store.read() as db:
            rows = db.execute("SELECT d.uuid, d.name, d.autostart, d.description, r.state, "
                              "r.reason, r.run_id FROM domains d LEFT JOIN runstate r "
                              "ON r.uuid = d.uuid ORDER BY d.name").fetchall()
        out = []
        for r in rows:
            state = r["state"] or "shut off"
            active = state in ACTIVE_STATES
            if not all and not active:
                continue
            out.append({"id": r["run_id"] if active else None, "name": r["name"],
                        "uuid": r["uuid"], "state": state, "reason": r["reason"] or "unknown",
                        "autostart": bool(r["autostart"]), "description": r["description"]})
        out.sort(key=lambda d: (d["id"] is None, d["id"] or 0, d["name"]))
        return out

    def define(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Create the domain, or replace the definition of the one with the same
        name (or UUID); a change takes effect at the next start."""
        defn = parse_definition(doc)
        self._check_references(defn)
        explicit_uuid = isinstance(doc, dict) and doc.get("uuid") is not None
        now = time.time()
        with self.store.write() as db:
            by_name = db.execute("SELECT uuid FROM domains WHERE name = ?",
                                 (defn.name,)).fetchone()
            by_uuid = db.execute("SELECT name FROM domains WHERE uuid = ?",
                                 (defn.uuid,)).fetchone() if explicit_uuid else None
            if by_name is not None and explicit_uuid and by_name["uuid"] != defn.uuid:
                raise AlreadyExists(f"domain '{defn.name}' already exists with uuid "
                                    f"{by_name['uuid']}", "name")
            if by_name is not None and not explicit_uuid:
                import dataclasses

                defn = dataclasses.replace(defn, uuid=by_name["uuid"])
            existed = by_name is not None or by_uuid is not None
            text = json.dumps(defn.to_doc())
            if existed:
                db.execute("UPDATE domains SET name = ?, description = ?, autostart = ?, "
                           "definition = ?, updated = ? WHERE uuid = ?",
                           (defn.name, defn.description, int(defn.autostart), text, now,
                            defn.uuid))
            else:
                db.execute("INSERT INTO domains (uuid, name, description, autostart, "
                           "definition, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (defn.uuid, defn.name, defn.description, int(defn.autostart), text,
                            now, now))
                db.execute("INSERT INTO runstate (uuid, state, reason) VALUES "
                           "(?, 'shut off', 'unknown')", (defn.uuid,))
        self._emit(defn.name, "defined", "updated" if existed else "")
        return self.get(defn.uuid)

    def _check_references(self, defn: Definition) -> None:
        """Volumes and networks exist; a TAP NIC needs root (checked again at start)."""
        for i, d in enumerate(defn.disks):
            if d.volume is not None:
                pool, _, vol = d.volume.partition("/")
                self._check_disk_ref(i, pool, vol)
        for i, n in enumerate(defn.nics):
            if n.network is not None:
                if self.networks is None:
                    raise InvalidArgument("networks are not available in this daemon",
                                          f"nics[{i}].network")
                try:
                    self.networks.info(n.network)
                except ManagerError as exc:
                    raise InvalidArgument(exc.message, f"nics[{i}].network") from None
            elif n.spec.get("kind") == "tap" and os.geteuid() != 0:
                raise InvalidArgument("a TAP NIC needs a daemon running as root (use a "
                                      "network NIC: {\"network\": \"default\"})",
                                      f"nics[{i}].kind")

    def undefine(self, name: str, *, remove_storage: bool = False,
                 keep_snapshots: bool = False) -> None:
        with self._domain(name) as row:
            uuid, dname = row["uuid"], row["name"]
            if self._runstate(uuid)["state"] in ACTIVE_STATES:
                raise OperationInvalid("domain is running: destroy or shut it down first")
            defn = self._definition(row)
            with self.store.read() as db:
                snaps = db.execute("SELECT disks FROM snapshots WHERE domain = ?",
                                   (uuid,)).fetchall()
            with self.store.write() as db:
                db.execute("DELETE FROM domains WHERE uuid = ?", (uuid,))
            self.monitor.forget(uuid)
            if remove_storage and self.storage is not None:
                volumes = [d.volume for d in defn.disks if d.volume is not None]
                # a snapshot points the definition at overlays: the pool volumes they
                # froze are this domain's storage too
                frozen = {os.path.realpath(str(d["frozen"])) for r in snaps
                          for d in json.loads(r["disks"]) if d.get("frozen")}
                volumes += self._volumes_at(frozen)
                for v in dict.fromkeys(volumes):
                    pool, _, vol = v.partition("/")
                    try:
                        self.storage.vol_delete(pool, vol)
                    except ManagerError as exc:
                        log.warning("undefine %s: %s", dname, exc)
            vm_dir = self.paths.vm_dir(uuid)
            if not keep_snapshots:
                shutil.rmtree(vm_dir, ignore_errors=True)
            else:  # snapshots and their overlays stay on disk; the rest goes
                shutil.rmtree(vm_dir / "managed-save", ignore_errors=True)
            shutil.rmtree(self.paths.vm_run(uuid), ignore_errors=True)
        self._emit(dname, "undefined")

    def _volumes_at(self, paths: set[str]) -> list[str]:
        """``POOL/VOL`` of the pool volumes whose files are ``paths`` (real paths)."""
        out: list[str] = []
        if not paths or self.storage is None:
            return out
        for pool in self.storage.pool_list():
            if pool.get("state") != "active":
                continue
            with contextlib.suppress(ManagerError):
                for v in self.storage.vol_list(pool["name"]):
                    if os.path.realpath(v["path"]) in paths:
                        out.append(f"{pool['name']}/{v['name']}")
        return out

    def users_of(self, path: str | os.PathLike[str]) -> list[str]:
        """Names of the domains whose definition uses the image ``path`` (Storage asks)."""
        target = os.path.realpath(path)
        out = []
        with self.store.read() as db:
            rows = db.execute("SELECT name, definition FROM domains").fetchall()
        for r in rows:
            try:
                defn = parse_definition(json.loads(r["definition"]))
            except (ManagerError, ValueError):
                continue
            for d in defn.disks:
                p: str | None = d.spec.get("path")
                if d.volume is not None and self.storage is not None:
                    pool, _, vol = d.volume.partition("/")
                    with contextlib.suppress(ManagerError):
                        p = str(self.storage.vol_path(pool, vol)[0])
                if p is not None and os.path.realpath(p) == target:
                    out.append(r["name"])
                    break
        return out

    def get(self, name: str) -> dict[str, Any]:
        row = self._row(name)
        rs = self._runstate(row["uuid"])
        state = rs["state"]
        active = state in ACTIVE_STATES
        doc = json.loads(row["definition"])
        with self.store.read() as db:
            snaps = db.execute("SELECT name, current FROM snapshots WHERE domain = ?",
                               (row["uuid"],)).fetchall()
        current = next((s["name"] for s in snaps if s["current"]), None)
        return {"id": rs["run_id"] if active else None, "name": row["name"],
                "uuid": row["uuid"], "state": state, "reason": rs["reason"],
                "detail": rs["detail"], "autostart": bool(row["autostart"]),
                "description": row["description"], "definition": doc,
                "memory": doc.get("memory"), "cpus": doc.get("cpus", 1),
                "pid": rs["pid"] if active else None,
                "started": rs["started"] if active else None,
                "api_socket": rs["api_socket"] if active else None,
                "console_socket": rs["console_socket"] if active else None,
                "managed_save": row["managed_save"] is not None,
                "current_snapshot": current, "snapshots": len(snaps),
                "config": json.loads(rs["config"]) if active and rs["config"] else None,
                # how its VMM is confined (who it runs as, cgroup): what the host allowed
                "security": self.privilege.notes() if self.privilege is not None else [],
                # who its VMM runs as, as libvirt's DAC label (+UID:+GID), when not root
                "security_label": (f"+{self.privilege.vm_uid}:+{self.privilege.vm_gid}"
                                   if active and self.privilege is not None
                                   and self.privilege.drop else None)}

    def set_autostart(self, name: str, on: bool) -> None:
        with self._domain(name) as row:
            defn = self._definition(row)
            import dataclasses

            defn = dataclasses.replace(defn, autostart=bool(on))
            with self.store.write() as db:
                db.execute("UPDATE domains SET autostart = ?, definition = ?, updated = ? "
                           "WHERE uuid = ?", (int(on), json.dumps(defn.to_doc()), time.time(),
                                              row["uuid"]))

    # ---- start: resolve, spawn, wait for the API

    def start(self, name: str, *, paused: bool = False) -> dict[str, Any]:
        with self._domain(name) as row:
            uuid = row["uuid"]
            self._refuse_active(uuid)
            save = row["managed_save"]
            restore = Path(save) if save and Path(save, "manifest.json").is_file() else None
            self._start_locked(row, paused=paused, restore=restore,
                               reason="restored" if restore else "booted")
            if restore is not None:
                shutil.rmtree(restore, ignore_errors=True)
                with self.store.write() as db:
                    db.execute("UPDATE domains SET managed_save = NULL WHERE uuid = ?", (uuid,))
        return self.get(uuid)

    def restore(self, path: str) -> dict[str, Any]:
        """Start the domain a ``save NAME PATH`` directory holds, from it."""
        src = Path(path)
        if not src.is_absolute():
            raise InvalidArgument("must be an absolute path", "path")
        try:
            with open(src / "manifest.json", "rb") as f:
                manifest = json.loads(f.read(1 << 20))  # a manifest is small: bounded
            vm_name = manifest["config"]["name"]
        except (OSError, ValueError, KeyError, TypeError):
            raise InvalidArgument(f"{path}: not a saved domain (no readable manifest.json)",
                                  "path") from None
        if not isinstance(vm_name, str):
            raise InvalidArgument(f"{path}: the saved configuration has no domain name", "path")
        with self._domain(vm_name) as row:
            self._refuse_active(row["uuid"])
            self._start_locked(row, paused=False, restore=src, reason="restored")
        self._emit(row["name"], "restored", str(src))
        return self.get(row["uuid"])

    def _refuse_active(self, uuid: str) -> None:
        if self._runstate(uuid)["state"] in ACTIVE_STATES:
            raise OperationInvalid("domain is already running")

    def _default_guest(self) -> tuple[Path, Path]:
        from pyvirt.guest.build import default_guest, guest_is_built

        if not guest_is_built():
            raise OperationFailed("the default guest is not built (run: pyvirt guest build)",
                                  "kernel")
        g = default_guest()
        return g.kernel, g.initrd

    def _volume(self, pool: str, vol: str) -> tuple[Path, str]:
        if self.storage is None:
            raise NotFound(f"storage pool '{pool}' not found")
        path, fmt = self.storage.vol_path(pool, vol)
        return Path(path), str(fmt)

    def _start_locked(self, row: sqlite3.Row, *, paused: bool, restore: Path | None,
                      reason: str, disk_paths: dict[int, tuple[Path, str]] | None = None
                      ) -> _Run:
        """Spawn the VMM for ``row`` (its lock held) and wait until its API answers."""
        uuid, name = row["uuid"], row["name"]
        defn = self._definition(row)
        vm_dir, vm_run = self.paths.vm_dir(uuid), self.paths.vm_run(uuid)
        for d in (vm_dir, vm_run, vm_dir / "disks", vm_dir / "snapshots"):
            d.mkdir(parents=True, exist_ok=True)
        for d in (vm_dir / "disks", vm_dir / "snapshots"):
            self._own(d)  # the VMM writes overlays and snapshots there
        api, console = vm_run / "api.sock", vm_run / "console.sock"
        exit_file, config_path, log_path = vm_run / "exit.json", vm_run / "config.json", \
            vm_dir / "vmm.log"
        for stale in (api, console, exit_file):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        taps: dict[int, str] = {}
        attachments: list[Any] = []
        handed: Any = None
        cgroup: Any = None
        priv = self.privilege
        try:
            owner = priv.vm_uid if priv is not None and priv.drop else None
            for i, n in enumerate(defn.nics):
                if n.network is None:
                    continue
                if self.networks is None:
                    raise InvalidArgument("networks are not available in this daemon",
                                          f"nics[{i}].network")
                try:
                    att = self.networks.attach(n.network, name, defn.nic_macs()[i],
                                               owner_uid=owner)
                except ManagerError as exc:
                    raise InvalidArgument(exc.message, f"nics[{i}].network") from None
                attachments.append(att)
                taps[i] = att.tap
            config = resolve(defn, console=console, volume=self._volume,
                             default_guest=self._default_guest, taps=taps,
                             disk_paths=disk_paths)
            argv = self._vmm_argv(config, config_path=config_path, api=api, console=console,
                                  exit_file=exit_file, root=vm_dir, restore=restore,
                                  resume=not paused, disks=disk_paths is not None,
                                  nics=bool(taps))
            extra: dict[str, Any] = {}
            if priv is None:
                config_path.write_text(config.to_json())
            else:
                priv.prepare_vm_dirs(vm_dir, vm_run)
                priv.write_file(config_path, config.to_json().encode())
                handed = priv.open_files(config)
                for att in attachments:  # the VMM may not open /dev/net/tun itself
                    handed.add(f"tap:{att.tap}", att.open_fd(), what="nics")
                cgroup = priv.cgroup_create(uuid, _memory_limit(config))
                extra = priv.spawn_kwargs(handed, cgroup=cgroup,
                                          cache_dir=priv.prepare_cache_dir(self.paths.state))
                argv += handed.args
            with open(log_path, "ab") as f:
                f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} start ({reason})\n".encode())
            try:
                proc = VmmProcess.spawn(argv, log_path=log_path, cwd=vm_dir, extra=extra)
            except OSError as exc:  # e.g. the VM user cannot reach the interpreter
                who = f" as uid {extra['user']}" if "user" in extra else ""
                raise OperationFailed(f"start of '{name}' failed: cannot run {argv[0]}{who}: "
                                      f"{exc.strerror}") from None
        except BaseException:
            for att in attachments:
                with contextlib.suppress(Exception):
                    self.networks.detach(att.tap)
            if cgroup is not None:
                with contextlib.suppress(Exception):
                    cgroup.remove()
            raise
        finally:
            if handed is not None:
                handed.close()  # the VMM holds its own copies
        if cgroup is not None:
            with contextlib.suppress(Exception):
                cgroup.add(proc.pid)  # a no-op when the preexec joined it
        run_id = self.store.next_counter("run_id")
        run = _Run(uuid=uuid, name=name, proc=proc, run_id=run_id, api_socket=api,
                   console_socket=console, exit_file=exit_file, log_path=log_path,
                   taps=list(taps.values()), cgroup=cgroup)
        state = "paused" if paused else "running"
        with self.store.write() as db:
            db.execute("UPDATE runstate SET state = ?, reason = ?, detail = '', run_id = ?, "
                       "pid = ?, start_ticks = ?, api_socket = ?, console_socket = ?, "
                       "exit_file = ?, started = ?, config = ?, extra = ? WHERE uuid = ?",
                       (state, "user" if paused else reason, run_id, proc.pid, proc.ticks,
                        str(api), str(console), str(exit_file), time.time(),
                        config.to_json(indent=None),
                        json.dumps({"taps": run.taps,
                                    "cgroup": str(getattr(cgroup, "path", "") or "")}), uuid))
        with self._runs_lock:
            self._runs[uuid] = run
        self._wake()
        info = self._wait_api(run)
        if info is None:
            self._finished(run)
            rs = self._runstate(uuid)
            why = rs["detail"] or last_log_line(log_path) or "the VMM ended during set-up"
            if rs["state"] != "crashed":
                self._record_stopped(uuid, "shut off", "failed", why)
            raise OperationFailed(f"start of '{name}' failed: {why}")
        run.boot_count = int(info.get("boot_count") or 1)
        if paused and restore is None and info.get("state") == "running":
            run.vm().pause()
        self._emit(name, "started", reason)
        if paused:
            self._emit(name, "suspended", "user")
        return run

    def _own(self, path: Path) -> None:
        """``path`` owned by the user VMMs run as (when that is not us)."""
        uid = getattr(self.privilege, "vm_uid", None)
        gid = getattr(self.privilege, "vm_gid", None)
        if isinstance(uid, int) and uid != os.geteuid():
            os.chown(path, uid, gid if isinstance(gid, int) else -1)

    def _vmm_argv(self, config: VmConfig, *, config_path: Path, api: Path, console: Path,
                  exit_file: Path, root: Path, restore: Path | None, resume: bool,
                  disks: bool, nics: bool = False) -> list[str]:
        argv = list(self.vmm_command)
        if restore is None:
            argv += ["--config", str(config_path)]
        else:
            # the snapshot holds the configuration; the console and (after a
            # revert) the disks are this start's
            argv += ["--restore", str(restore), "--console", f"socket:{console}"]
            if resume:
                argv.append("--resume")
            if disks:
                for d in config.disks:
                    spec = f"path={d.path},readonly={'on' if d.readonly else 'off'}," \
                           f"cache={d.cache},discard={'on' if d.discard else 'off'}"
                    if d.format:
                        spec += f",format={d.format}"
                    if d.serial:
                        spec += f",serial={d.serial}"
                    argv += ["--disk", spec]
            if nics:  # the network NICs' TAPs are this start's
                for n in config.nics:
                    spec = f"tap={n.tap},mac={n.mac}" if n.kind == "tap" else f"user,mac={n.mac}"
                    if n.bridge:
                        spec += f",bridge={n.bridge}"
                    for fwd in n.hostfwd:
                        spec += (f",hostfwd={fwd.proto}:{fwd.host_addr}:{fwd.host_port}"
                                 f"-:{fwd.guest_port}")
                    argv += ["--net", spec]
        argv += ["--api-socket", str(api), "--exit-file", str(exit_file),
                 "--snapshot-root", str(root)]
        return argv

    def _wait_api(self, run: _Run) -> dict[str, Any] | None:
        """``GET /vm``'s answer once the VMM serves it; None if it ended first."""
        from pyvirt.api.client import ApiConnectionError, ApiError, VmClient

        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if run.done.is_set() or not run.proc.alive():
                return None
            if run.api_socket.exists():
                try:
                    with VmClient(run.api_socket, timeout=5.0) as c:
                        return dict(c.info())
                except (ApiConnectionError, ApiError):
                    pass
            time.sleep(0.05)
        run.asked = "destroy"
        run.proc.kill()
        run.done.wait(10)
        raise OperationFailed(f"start of '{run.name}' failed: the VMM did not answer within "
                              f"{START_TIMEOUT:g} s")

    # ---- the end of a VMM

    def _finished(self, run: _Run) -> None:
        """Record that ``run``'s VMM ended (idempotent; any thread)."""
        with run.lock:
            if run.done.is_set():
                return
            if run.proc.alive():
                return
            code = run.proc.reap()
            record = read_exit_file(run.exit_file)
            state, reason, detail = classify_exit(record, asked=run.asked, exit_code=code)
            for tap in run.taps:
                if self.networks is not None:
                    with contextlib.suppress(Exception):
                        self.networks.detach(tap)
            if run.cgroup is not None:
                with contextlib.suppress(Exception):
                    run.cgroup.remove()
            with contextlib.suppress(Exception):
                self._record_stopped(run.uuid, state, reason, detail)
            self.monitor.stopped(run.uuid)
            with self._runs_lock:
                if self._runs.get(run.uuid) is run:
                    del self._runs[run.uuid]
            if run.client is not None:
                run.client.close()
            run.proc.close()
            event = {"crashed": "crashed"}.get(state) or {
                "shutdown": "shutdown", "saved": "saved"}.get(reason, "stopped")
            with contextlib.suppress(Exception):
                self._emit(run.name, event, f"{reason}: {detail}" if detail else reason)
            run.done.set()

    def _watch_exits(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        watched: dict[int, _Run] = {}
        try:
            while not self._stop.is_set():
                with self._runs_lock:
                    runs = list(self._runs.values())
                for run in runs:
                    fd = run.proc.pidfd
                    if fd is not None and fd not in watched:
                        sel.register(fd, selectors.EVENT_READ, run)
                        watched[fd] = run
                live = {r.proc.pidfd for r in runs}
                for fd in [fd for fd, r in watched.items() if fd not in live or r.done.is_set()]:
                    with contextlib.suppress(KeyError, ValueError, OSError):
                        sel.unregister(fd)
                    del watched[fd]
                for key, _ in sel.select(timeout=1.0):
                    if key.data is None:
                        with contextlib.suppress(OSError):
                            os.read(self._wake_r, 4096)
                        continue
                    run = key.data
                    with contextlib.suppress(KeyError, ValueError, OSError):
                        sel.unregister(key.fd)
                    watched.pop(key.fd, None)
                    try:
                        self._finished(run)
                    except Exception:
                        log.exception("recording the end of %s", run.name)
                for run in runs:  # no pidfd (old kernel): look now and then
                    if run.proc.pidfd is None and not run.proc.alive():
                        self._finished(run)
        finally:
            sel.close()

    def _poll_loop(self) -> None:
        while not self._stop.wait(POLL_INTERVAL):
            if self.networks is not None:
                try:  # dnsmasq died, a bridge deleted behind our back: put them back
                    self.networks.supervise()
                except Exception:
                    log.exception("supervising the networks")
            with self._runs_lock:
                runs = list(self._runs.values())
            # one sampling pass for every client of the metrics (monitor.py)
            self.monitor.begin()
            for run in runs:
                if self._stop.is_set():
                    return
                metrics: Any = None
                try:
                    metrics = self._poll(run)
                except Exception:
                    log.exception("polling %s", run.name)
                if not run.done.is_set():
                    self.monitor.domain(run.uuid, run.name, run.proc.pid, metrics)
            try:
                with self.store.read() as db:
                    defined = {r["uuid"]: r["name"] for r in
                               db.execute("SELECT uuid, name FROM domains").fetchall()}
            except Exception:
                log.exception("listing the domains for the monitor")
                defined = None
            self.monitor.end(defined)

    def _poll(self, run: _Run) -> Any:
        """Reboots and pauses behind our back; returns the VMM's metric samples
        (the one GET /metrics of this pass), None when it did not answer."""
        from pyvirt.api.client import ApiConnectionError, ApiError, VmClient

        lock = self._lock(run.uuid)
        if not lock.acquire(blocking=False):
            return None  # an operation owns the VM's state now
        try:
            if run.done.is_set():
                return None
            samples: Any = None
            try:
                with VmClient(run.api_socket, timeout=2.0) as c:
                    info = c.info()
                    with contextlib.suppress(ApiConnectionError, ApiError):
                        samples = c.metrics().samples
            except (ApiConnectionError, ApiError):
                return None
            boots = int(info.get("boot_count") or 0)
            if boots > run.boot_count:
                run.boot_count = boots
                self._emit(run.name, "rebooted", f"boot {boots}")
            rs = self._runstate(run.uuid)
            if info.get("state") == "paused" and rs["state"] == "running":
                self._set_state(run.uuid, "paused", "user")
                self._emit(run.name, "suspended", "user")
            elif info.get("state") == "running" and rs["state"] == "paused":
                self._set_state(run.uuid, "running", "unpaused")
                self._emit(run.name, "resumed", "unpaused")
            return samples
        finally:
            lock.release()

    def _adopt_all(self) -> None:
        """After a restart: every VMM still running is watched again; the end of
        the others is recorded from their exit files."""
        with self.store.read() as db:
            rows = db.execute("SELECT r.*, d.name FROM runstate r JOIN domains d "
                              "ON d.uuid = r.uuid WHERE r.pid IS NOT NULL").fetchall()
        for r in rows:
            extra = json.loads(r["extra"] or "{}")
            proc = VmmProcess.adopt(int(r["pid"]), int(r["start_ticks"] or -1))
            vm_dir = self.paths.vm_dir(r["uuid"])
            run = _Run(uuid=r["uuid"], name=r["name"],
                       proc=proc or VmmProcess(int(r["pid"]), None, None, None),
                       run_id=int(r["run_id"] or 0), api_socket=Path(r["api_socket"] or ""),
                       console_socket=Path(r["console_socket"] or ""),
                       exit_file=Path(r["exit_file"] or "/nonexistent"),
                       log_path=vm_dir / "vmm.log", taps=list(extra.get("taps", [])),
                       cgroup=None if self.privilege is None else
                       self.privilege.cgroup_for(r["uuid"]))
            if proc is None:
                self._finished(run)
                continue
            if r["state"] == "in shutdown":
                self._set_state(r["uuid"], "running", "booted")
            with contextlib.suppress(Exception):
                with run.vm() as c:
                    run.boot_count = int(c.info().get("boot_count") or 1)
                run.client = None
            with self._runs_lock:
                self._runs[r["uuid"]] = run
            log.info("adopted %s (pid %d)", r["name"], proc.pid)

    def _autostart(self) -> None:
        """Start the autostart domains, once per host boot (as libvirt): the marker
        lives in the run directory (a tmpfs under /run), so a daemon restart does not
        start again a VM its user shut down meanwhile."""
        marker = self.paths.run / "autostarted"
        if marker.exists():
            return
        marker.touch()
        with self.store.read() as db:
            names = [r["name"] for r in db.execute(
                "SELECT name FROM domains WHERE autostart = 1 ORDER BY name").fetchall()]
        for name in names:
            try:
                if self.get(name)["state"] not in ACTIVE_STATES:
                    self.start(name)
            except ManagerError as exc:
                log.warning("autostart of %s: %s", name, exc)
                self._emit(name, "stopped", f"autostart failed: {exc.message}")

    # ---- lifecycle verbs

    def _active_run(self, uuid: str) -> _Run:
        with self._runs_lock:
            run = self._runs.get(uuid)
        if run is None or run.done.is_set():
            raise OperationInvalid("domain is not running")
        return run

    def _call(self, run: _Run, fn: Callable[[VmClient], Any]) -> Any:
        """One request to the VMM; its refusals and failures as ManagerErrors."""
        from pyvirt.api.client import ApiConnectionError, ApiError

        try:
            return fn(run.vm())
        except ApiError as exc:
            if exc.status == 409:
                raise OperationInvalid(f"domain '{run.name}': {exc.fault_message}") from None
            raise OperationFailed(f"domain '{run.name}': {exc.fault_message}") from None
        except ApiConnectionError as exc:
            raise OperationFailed(f"domain '{run.name}': the VMM does not answer ({exc})"
                                  ) from None

    def shutdown(self, name: str, *, timeout: float = 60.0) -> None:
        """ACPI power button; waits up to ``timeout`` s (outside the domain lock)."""
        with self._domain(name) as row:
            uuid = row["uuid"]
            rs = self._runstate(uuid)
            if rs["state"] != "running" and rs["state"] != "in shutdown":
                raise OperationInvalid("domain is not running")
            run = self._active_run(uuid)
            before = (rs["state"], rs["reason"]) if rs["state"] == "running" else (
                "running", "booted")
            self._call(run, lambda c: c.power_button())
            run.asked = "shutdown"
            self._set_state(uuid, "in shutdown", "user")
        if run.done.wait(max(0.0, timeout)):
            return
        with self._lock(uuid):
            if not run.done.is_set() and self._runstate(uuid)["state"] == "in shutdown":
                self._set_state(uuid, *before)
                run.asked = None
        raise OperationTimeout(f"domain '{row['name']}' did not shut down within {timeout:g} s")

    def destroy(self, name: str) -> None:
        with self._domain(name) as row:
            self._destroy_locked(self._active_run(row["uuid"]))

    def _destroy_locked(self, run: _Run) -> None:
        from pyvirt.api.client import ApiConnectionError, ApiError

        run.asked = "destroy"
        with contextlib.suppress(ApiError, ApiConnectionError):
            run.vm().stop()
        if not run.done.wait(DESTROY_GRACE):
            run.proc.kill(signal.SIGKILL)
            if not run.done.wait(DESTROY_GRACE):
                self._finished(run)
        if not run.done.is_set():
            raise OperationFailed(f"domain '{run.name}': the VMM (pid {run.proc.pid}) did not "
                                  "end after SIGKILL")

    def _require(self, name: str, states: tuple[str, ...], message: str
                 ) -> tuple[sqlite3.Row, _Run]:
        row = self._row(name)
        rs = self._runstate(row["uuid"])
        if rs["state"] not in states:
            raise OperationInvalid(message)
        return row, self._active_run(row["uuid"])

    def reboot(self, name: str) -> None:
        with self._domain(name):
            _, run = self._require(name, ("running",), "domain is not running")
            self._call(run, lambda c: c.ctrl_alt_del())

    def reset(self, name: str) -> None:
        with self._domain(name):
            _, run = self._require(name, ("running", "paused"), "domain is not running")
            self._call(run, lambda c: c.reset())

    def suspend(self, name: str) -> None:
        with self._domain(name) as row:
            if self._runstate(row["uuid"])["state"] == "paused":
                raise OperationInvalid("domain is already paused")
            _, run = self._require(name, ("running",), "domain is not running")
            self._call(run, lambda c: c.pause())
            self._set_state(row["uuid"], "paused", "user")
        self._emit(row["name"], "suspended", "user")

    def resume(self, name: str) -> None:
        with self._domain(name) as row:
            state = self._runstate(row["uuid"])["state"]
            if state not in ACTIVE_STATES:
                raise OperationInvalid("domain is not running")
            _, run = self._require(name, ("paused",), "domain is not paused")
            self._call(run, lambda c: c.resume())
            self._set_state(row["uuid"], "running", "unpaused")
        self._emit(row["name"], "resumed", "unpaused")

    # ---- save / restore

    def save(self, name: str, path: str | None = None) -> int:
        """A task: the VM's state to the managed save (``path`` None) or to the new
        directory ``path``; the VM then ends, shut off "saved"."""
        row = self._row(name)
        if self._runstate(row["uuid"])["state"] not in ("running", "paused"):
            raise OperationInvalid("domain is not running")
        dest: Path | None = None
        if path is not None:
            dest = Path(path)
            if not dest.is_absolute():
                raise InvalidArgument("must be an absolute path", "path")
            if os.path.lexists(dest):
                raise InvalidArgument(f"{path}: already exists", "path")
            if not dest.parent.is_dir():
                raise InvalidArgument(f"{path}: directory {dest.parent} does not exist", "path")
        uuid = row["uuid"]

        def work(handle: TaskHandle) -> dict[str, Any]:
            with self._domain(uuid) as r:
                if self._runstate(uuid)["state"] not in ("running", "paused"):
                    raise OperationInvalid("domain is not running")
                run = self._active_run(uuid)
                vm_dir = self.paths.vm_dir(uuid)
                target = vm_dir / "managed-save" if dest is None else \
                    vm_dir / f"save-{int(time.time() * 1000)}"
                shutil.rmtree(target, ignore_errors=True)
                handle.add_cleanup(target)
                self._memory_snapshot(run, target, handle, why="saving")
                handle.progress(0.9, "stopping the VMM")
                self._destroy_locked_as(run, "save")
                if dest is not None:
                    shutil.move(str(target), str(dest))
                    handle.drop_cleanup(target)
                    result = str(dest)
                else:
                    handle.drop_cleanup(target)
                    with self.store.write() as db:
                        db.execute("UPDATE domains SET managed_save = ? WHERE uuid = ?",
                                   (str(target), uuid))
                    result = str(target)
                self._record_stopped(uuid, "shut off", "saved", result)
            return {"path": result, "domain": r["name"]}

        return self.tasks.start("save", row["name"], work)

    def managed_save_remove(self, name: str) -> None:
        """Throw the managed save away: the next start boots afresh."""
        with self._domain(name) as row:
            if not row["managed_save"]:
                raise OperationInvalid(f"domain '{row['name']}' has no managed save image")
            shutil.rmtree(row["managed_save"], ignore_errors=True)
            with self.store.write() as db:
                db.execute("UPDATE domains SET managed_save = NULL WHERE uuid = ?",
                           (row["uuid"],))

    def _destroy_locked_as(self, run: _Run, why: str) -> None:
        run.asked = why
        from pyvirt.api.client import ApiConnectionError, ApiError

        with contextlib.suppress(ApiError, ApiConnectionError):
            run.vm().stop()
        if not run.done.wait(DESTROY_GRACE):
            run.proc.kill(signal.SIGKILL)
            run.done.wait(DESTROY_GRACE)
            self._finished(run)

    def _memory_snapshot(self, run: _Run, target: Path, handle: TaskHandle | None, *,
                         why: str) -> bool:
        """Pause (if running) and write the VM's state to ``target``; returns whether it
        was running. On failure the VM is resumed as it was."""
        rs = self._runstate(run.uuid)
        was_running = bool(rs["state"] == "running")
        if was_running:
            self._call(run, lambda c: c.pause())
        self._set_state(run.uuid, "paused", why)
        if handle is not None:
            handle.progress(0.1, "writing the VM's memory")
        try:
            self._call(run, lambda c: c.snapshot(target))
        except ManagerError:
            shutil.rmtree(target, ignore_errors=True)
            if was_running:
                with contextlib.suppress(ManagerError):
                    self._call(run, lambda c: c.resume())
            self._set_state(run.uuid, rs["state"], rs["reason"])
            raise
        return was_running

    # ---- snapshots

    def snapshot_create(self, name: str, snap: str | None = None,
                        description: str = "") -> int:
        row = self._row(name)
        snap = snap if snap is not None else str(int(time.time()))
        from pyvirt.vmm.config import _NAME_OK

        if not _NAME_OK.match(snap):
            raise InvalidArgument("must be 1-64 letters, digits, '.', '_' or '-', starting "
                                  "with a letter or digit", "name")
        if len(description) > 4096:
            raise InvalidArgument("at most 4096 characters", "description")
        with self.store.read() as db:
            if db.execute("SELECT 1 FROM snapshots WHERE domain = ? AND name = ?",
                          (row["uuid"], snap)).fetchone():
                raise AlreadyExists(f"snapshot '{snap}' of domain '{row['name']}' "
                                    "already exists")
        uuid = row["uuid"]

        def work(handle: TaskHandle) -> dict[str, Any]:
            with self._domain(uuid) as r:
                self._snapshot_locked(r, snap, description, handle)
            return {"domain": r["name"], "snapshot": snap}

        return self.tasks.start("snapshot", row["name"], work)

    def _snapshot_locked(self, row: sqlite3.Row, snap: str, description: str,
                         handle: TaskHandle) -> None:
        uuid = row["uuid"]
        defn = self._definition(row)
        rs = self._runstate(uuid)
        vm_dir = self.paths.vm_dir(uuid)
        disk_dir = vm_dir / "disks"
        disk_dir.mkdir(parents=True, exist_ok=True)
        memory: Path | None = None
        disks: list[dict[str, Any]] = []
        state = rs["state"]
        if state in ("running", "paused"):
            run = self._active_run(uuid)
            memory = vm_dir / "snapshots" / snap
            memory.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(memory, ignore_errors=True)
            handle.add_cleanup(memory)
            was_running = self._memory_snapshot(run, memory, handle, why="snapshot")
            try:
                cfg = json.loads(rs["config"])
                for i, d in enumerate(cfg.get("disks", [])):
                    if d.get("readonly"):
                        continue
                    overlay = disk_dir / f"{disk_target(i)}-{snap}.qcow2"
                    handle.progress(0.6, f"overlay for {disk_target(i)}")
                    answer = self._call(run, functools.partial(_disk_overlay, disk=i,
                                                               path=overlay))
                    disks.append({"disk": i, "target": disk_target(i),
                                  "frozen": str(answer.get("backing") or d["path"]),
                                  "format": d.get("format"), "overlay": str(overlay)})
                if disks:  # the VMM now writes the overlays: its config says so
                    now = self._call(run, lambda c: c.info())["config"]
                    with self.store.write() as db:
                        db.execute("UPDATE runstate SET config = ? WHERE uuid = ?",
                                   (json.dumps(now), uuid))
            finally:
                if was_running:
                    self._call(run, lambda c: c.resume())
                self._set_state(uuid, rs["state"], rs["reason"])
        else:
            resolved = resolve(defn, console=None, volume=self._volume)
            for i, d in enumerate(resolved.disks):
                if d.readonly:
                    continue
                overlay = disk_dir / f"{disk_target(i)}-{snap}.qcow2"
                _create_overlay(overlay, d.path, d.format)
                handle.add_cleanup(overlay)
                disks.append({"disk": i, "target": disk_target(i), "frozen": str(d.path),
                              "format": d.format, "overlay": str(overlay)})
        # the definition follows the overlays: the frozen images are the snapshot's
        defn = _with_disks(defn, {d["disk"]: Path(d["overlay"]) for d in disks})
        with self.store.write() as db:
            parent = db.execute("SELECT name FROM snapshots WHERE domain = ? AND current = 1",
                                (uuid,)).fetchone()
            db.execute("UPDATE snapshots SET current = 0 WHERE domain = ?", (uuid,))
            db.execute("INSERT INTO snapshots (domain, name, parent, created, description, "
                       "state, memory, disks, current) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1)",
                       (uuid, snap, parent["name"] if parent else None, time.time(),
                        description, state, None if memory is None else str(memory),
                        json.dumps(disks)))
            db.execute("UPDATE domains SET definition = ?, updated = ? WHERE uuid = ?",
                       (json.dumps(defn.to_doc()), time.time(), uuid))
        if memory is not None:
            handle.drop_cleanup(memory)
        for d in disks:
            handle.drop_cleanup(d["overlay"])
        self._emit(row["name"], "snapshot-created", snap)

    def snapshot_list(self, name: str) -> list[dict[str, Any]]:
        row = self._row(name)
        with self.store.read() as db:
            rows = db.execute("SELECT * FROM snapshots WHERE domain = ? ORDER BY created, name",
                              (row["uuid"],)).fetchall()
        return [{"name": r["name"], "parent": r["parent"], "created": r["created"],
                 "state": r["state"], "description": r["description"],
                 "current": bool(r["current"]), "memory": r["memory"] is not None}
                for r in rows]

    def _snapshot_row(self, uuid: str, dname: str, snap: str) -> sqlite3.Row:
        with self.store.read() as db:
            r = db.execute("SELECT * FROM snapshots WHERE domain = ? AND name = ?",
                           (uuid, snap)).fetchone()
        if r is None:
            raise NotFound(f"snapshot '{snap}' of domain '{dname}' not found")
        return r  # type: ignore[no-any-return]

    def snapshot_revert(self, name: str, snap: str) -> None:
        with self._domain(name) as row:
            uuid = row["uuid"]
            s = self._snapshot_row(uuid, row["name"], snap)
            disks = json.loads(s["disks"])
            with self._runs_lock:
                run = self._runs.get(uuid)
            if run is not None and not run.done.is_set():
                self._destroy_locked(run)
            disk_dir = self.paths.vm_dir(uuid) / "disks"
            disk_dir.mkdir(parents=True, exist_ok=True)
            stamp = int(time.time() * 1000)
            new: dict[int, Path] = {}
            try:
                for d in disks:
                    overlay = disk_dir / f"{d['target']}-{snap}-{stamp}.qcow2"
                    _create_overlay(overlay, Path(d["frozen"]), d.get("format"))
                    new[int(d["disk"])] = overlay
            except BaseException:
                for p in new.values():
                    with contextlib.suppress(OSError):
                        p.unlink()
                raise
            defn = _with_disks(self._definition(row), new)
            self._store_definition(uuid, defn)
            with self.store.write() as db:
                db.execute("UPDATE snapshots SET current = (name = ?) WHERE domain = ?",
                           (snap, uuid))
            if s["memory"] is not None:
                fresh = self._row(uuid)
                self._start_locked(fresh, paused=s["state"] == "paused",
                                   restore=Path(s["memory"]), reason="from snapshot",
                                   disk_paths={i: (p, "qcow2") for i, p in new.items()})
                if s["state"] == "paused":
                    self._set_state(uuid, "paused", "snapshot")
                else:
                    self._set_state(uuid, "running", "from snapshot")
            else:
                self._record_stopped(uuid, "shut off", "from snapshot", "")
        self._emit(row["name"], "snapshot-reverted", snap)

    def snapshot_delete(self, name: str, snap: str) -> None:
        """The snapshot's record and memory go; disk images stay (later images use
        them as backing files)."""
        with self._domain(name) as row:
            uuid = row["uuid"]
            s = self._snapshot_row(uuid, row["name"], snap)
            with self.store.write() as db:
                db.execute("UPDATE snapshots SET parent = ? WHERE domain = ? AND parent = ?",
                           (s["parent"], uuid, snap))
                if s["current"] and s["parent"] is not None:
                    db.execute("UPDATE snapshots SET current = 1 WHERE domain = ? AND name = ?",
                               (uuid, s["parent"]))
                db.execute("DELETE FROM snapshots WHERE domain = ? AND name = ?", (uuid, snap))
            if s["memory"]:
                shutil.rmtree(s["memory"], ignore_errors=True)
        self._emit(row["name"], "snapshot-deleted", snap)

    # ---- information

    def console_path(self, name: str) -> Path:
        row = self._row(name)
        rs = self._runstate(row["uuid"])
        if rs["state"] not in ACTIVE_STATES or not rs["console_socket"]:
            raise OperationInvalid("domain is not running")
        return Path(rs["console_socket"])

    def stats(self, name: str) -> dict[str, Any]:
        row = self._row(name)
        rs = self._runstate(row["uuid"])
        if rs["state"] not in ACTIVE_STATES:
            raise OperationInvalid("domain is not running")
        run = self._active_run(row["uuid"])
        info = self._call(run, lambda c: c.info())
        metrics = self._call(run, lambda c: c.metrics())
        cfg = info.get("config", {})
        devices: dict[str, dict[str, float]] = {}
        for mname, samples in metrics.samples.items():
            if not mname.startswith("pyvirt_device_"):
                continue
            key = mname.removeprefix("pyvirt_device_").removesuffix("_total")
            for labels, value in samples:
                devices.setdefault(labels.get("device", "?"), {})[key] = value
        disks = [{"name": k, **v} for k, v in sorted(devices.items())
                 if "blk" in k or k.startswith("vd")]
        nics = [{"name": k, **v} for k, v in sorted(devices.items())
                if "net" in k or k.startswith("eth")]
        return {"state": rs["state"], "reason": rs["reason"],
                "cpu_time_s": _cpu_time(run.proc.pid), "uptime_s": info.get("uptime_s"),
                "memory": cfg.get("memory"), "boot_count": info.get("boot_count"),
                "vcpus": cfg.get("cpus"), "rss_bytes": metrics.get("pyvirt_vmm_rss_bytes"),
                "disks": disks, "nics": nics}

    def block_list(self, name: str) -> list[dict[str, Any]]:
        row = self._row(name)
        rs = self._runstate(row["uuid"])
        if rs["state"] in ACTIVE_STATES and rs["config"]:
            disks = json.loads(rs["config"]).get("disks", [])
        else:
            defn = self._definition(row)
            disks = []
            for d in defn.disks:
                doc = dict(d.spec)
                if d.volume is not None:
                    try:
                        p, fmt = self._volume(*d.volume.split("/", 1))
                        doc.update(path=str(p), format=fmt)
                    except ManagerError:
                        doc.update(path=d.volume, format=None)
                disks.append(doc)
        return [{"target": disk_target(i), "source": d.get("path"), "format": d.get("format"),
                 "readonly": bool(d.get("readonly"))} for i, d in enumerate(disks)]

    def iface_list(self, name: str) -> list[dict[str, Any]]:
        row = self._row(name)
        defn = self._definition(row)
        rs = self._runstate(row["uuid"])
        taps = iter(json.loads(rs["extra"] or "{}").get("taps", [])
                    if rs["state"] in ACTIVE_STATES else [])
        macs = defn.nic_macs()
        out = []
        for i, n in enumerate(defn.nics):
            if n.network is not None:
                out.append({"interface": next(taps, "-"), "type": "network",
                            "source": n.network, "model": "virtio", "mac": macs[i]})
            else:
                kind = str(n.spec.get("kind"))
                out.append({"interface": n.spec.get("tap") or "-", "type": kind,
                            "source": n.spec.get("bridge") or "-", "model": "virtio",
                            "mac": macs[i]})
        return out

    # ---- monitoring (monitor.py: the poller samples; these read)

    def host_info(self, visible: set[str] | None = None) -> dict[str, Any]:
        """The host's figures for the GUI; ``visible``: the domain names counted
        (None: all)."""
        import socket

        from pyvirt.manager.monitor import parse_meminfo
        from pyvirt.vmm.config import MAX_CPUS_HARD, MIN_MEMORY

        cpus = os.cpu_count() or 1
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                mem_total, mem_avail = parse_meminfo(f.read(65536))
        except (OSError, ValueError, KeyError, IndexError):
            mem_total = mem_avail = 0
        try:
            st = os.statvfs(self.paths.state)
            disk_total, disk_free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        except OSError:
            disk_total = disk_free = 0
        try:
            with open("/proc/uptime", encoding="ascii") as f:
                uptime = float(f.read(256).split()[0])
        except (OSError, ValueError, IndexError):
            uptime = 0.0
        counts: dict[str, int] = dict.fromkeys(("running", "paused", "shut off"), 0)
        for d in self.list_domains():
            if visible is None or d["name"] in visible:
                counts[d["state"]] = counts.get(d["state"], 0) + 1
        # the host keeps MEMORY_RESERVE for itself (the daemon, the VMMs' overhead)
        reserve = min(MEMORY_RESERVE, mem_total // 4)
        max_mib = max(MIN_MEMORY >> 20, ((mem_total - reserve) >> 20) & ~1)
        return {"hostname": socket.gethostname(), "cpus": cpus, "memory_bytes": mem_total,
                "memory_available_bytes": mem_avail,
                "disk": {"path": str(self.paths.state), "total_bytes": disk_total,
                         "free_bytes": disk_free},
                "limits": {"max_vcpus": min(cpus, MAX_CPUS_HARD), "max_memory_mib": max_mib,
                           **self._accelerators(min(cpus, MAX_CPUS_HARD))},
                "domains": counts, "load": [round(x, 2) for x in os.getloadavg()],
                "uptime_s": round(uptime, 1)}

    def _accelerators(self, max_vcpus: int) -> dict[str, Any]:
        """What each ``accel`` gives a VM this daemon starts: the backend ``auto``
        picks (the VMMs' user may be denied /dev/kvm even where the daemon is not)
        and the vCPUs each backend runs (the software CPU: one, for now)."""
        from pyvirt.hypervisor import HostVirt, choose, probe_host

        host = probe_host()
        if self.privilege is not None and self.privilege.drop and \
                not self.privilege.kvm_reachable:
            host = HostVirt(host.kvm_device, False, host.vendor_module, host.cpu_flag)
        auto = choose("auto", host)
        kvm_ok = host.kvm_accessible
        per = {"kvm": max_vcpus if kvm_ok else 0, "emu": EMU_MAX_VCPUS}
        per["auto"] = per[auto.name]
        return {"accel_auto": auto.name, "accel_auto_reason": auto.reason,
                "max_vcpus_by_accel": per}

    def metrics_history(self, visible: set[str] | None = None,
                        domain: str | None = None) -> dict[str, Any]:
        """The host's and the domains' recent samples (``domain``: that one only)."""
        names = visible
        if domain is not None:
            self._row(domain)  # 404 for an unknown domain
            names = {domain} if visible is None or domain in visible else set()
        return self.monitor.history(names)

    # ---- clone, disks and NICs (definition edits: a running VM gets them at its next start)

    def clone(self, name: str, new_name: str, description: str | None = None, *,
              allow_paths: bool = True,
              on_defined: Callable[[str], None] | None = None) -> int:
        """A task: a new domain ``new_name`` from the shut-off ``name``: new uuid,
        new MACs (derived from the new name), each volume disk copied in full into
        its pool as ``NEW-<index>``, each path disk (``allow_paths``) copied next to
        the original. ``on_defined(new_name)`` runs once it is defined."""
        row = self._row(name)
        uuid, src_name = row["uuid"], row["name"]
        if self._runstate(uuid)["state"] in ACTIVE_STATES:
            raise OperationInvalid("domain is running: shut it down before cloning it")
        defn = self._definition(row)
        doc = defn.to_doc()
        doc.pop("uuid", None)
        doc["name"] = new_name
        doc["autostart"] = False
        if description is not None:
            doc["description"] = description
        # MACs: derived from the new name (a clone must not share its source's)
        doc["nics"] = [{k: v for k, v in n.items() if k != "mac"} for n in doc["nics"]]
        parse_definition(doc)  # the new name and description checked before any copy
        with self.store.read() as db:
            if db.execute("SELECT 1 FROM domains WHERE name = ?", (new_name,)).fetchone():
                raise AlreadyExists(f"domain '{new_name}' already exists", "name")
        plan: list[tuple[int, str, str, str]] = []  # (index, "volume"|"path", source, new)
        for i, d in enumerate(defn.disks):
            if d.volume is not None:
                pool, _, vol = d.volume.partition("/")
                self._check_disk_ref(i, pool, vol)
                plan.append((i, "volume", d.volume, f"{pool}/{_clone_name(new_name, i, vol)}"))
            else:
                src = str(d.spec.get("path"))
                if self._own_overlay(uuid, src):
                    # a snapshot's overlay (the daemon's file): a flattened copy becomes
                    # a volume of the default pool, for anyone who may clone
                    plan.append((i, "overlay", src,
                                 f"default/{_clone_name(new_name, i, 'x.qcow2')}"))
                    continue
                if not allow_paths:
                    raise InvalidArgument("a disk given by a host path is cloned only by an "
                                          "administrator", f"disks[{i}]")
                if d.spec.get("readonly"):
                    plan.append((i, "shared", src, src))  # read-only: both use the one image
                    continue
                dst = Path(src).with_name(_clone_name(new_name, i, Path(src).name))
                if os.path.lexists(dst):
                    raise AlreadyExists(f"{dst} already exists", f"disks[{i}]")
                plan.append((i, "path", src, str(dst)))

        def work(handle: TaskHandle) -> dict[str, Any]:
            made_volumes: list[tuple[str, str]] = []
            try:
                with self._domain(uuid):  # the source stays shut off while it is read
                    if self._runstate(uuid)["state"] in ACTIVE_STATES:
                        raise OperationInvalid(f"domain '{src_name}' was started meanwhile")
                    disks = list(doc["disks"])
                    for n, (i, kind, src, dst) in enumerate(plan):
                        handle.progress(n / max(1, len(plan)), f"copying {disk_target(i)}")
                        if kind in ("volume", "overlay"):
                            pool, _, vol = src.partition("/")
                            new_vol = dst.partition("/")[2]
                            tid = (self.storage.vol_clone(pool, vol, new_vol, mode="copy")
                                   if kind == "volume" else
                                   self._volume_from_image(Path(src), "default", new_vol))
                            made_volumes.append((pool, new_vol))
                            t = self.tasks.wait(tid)
                            if t["state"] != "done":
                                made_volumes.pop()
                                raise OperationFailed(f"disks[{i}]: {t['error']}",
                                                      f"disks[{i}]")
                            disks[i] = {"volume": dst, **{
                                k: v for k, v in disks[i].items()
                                if k not in ("volume", "path", "format")}}
                        elif kind == "path":
                            handle.add_cleanup(dst)
                            fmt = disks[i].get("format")
                            self._copy_path_disk(handle, Path(src), fmt, Path(dst), i)
                            disks[i] = {**disks[i], "path": dst}
                    doc["disks"] = disks
                    with self.store.read() as db:
                        if db.execute("SELECT 1 FROM domains WHERE name = ?",
                                      (new_name,)).fetchone():
                            raise AlreadyExists(f"domain '{new_name}' already exists", "name")
                    self.define(doc)
                    for _i, kind, _src, dst in plan:
                        if kind == "path":
                            handle.drop_cleanup(dst)
            except BaseException:
                for pool, vol in made_volumes:
                    with contextlib.suppress(Exception):
                        self.storage.vol_delete(pool, vol)
                raise
            if on_defined is not None:
                on_defined(new_name)
            self._emit(src_name, "cloned", new_name)
            return {"domain": new_name, "source": src_name}

        return self.tasks.start("clone", src_name, work)

    def _own_overlay(self, uuid: str, path: str) -> bool:
        """Whether ``path`` is an image the daemon made in the domain's directory."""
        real, mine = os.path.realpath(path), os.path.realpath(self.paths.vm_dir(uuid))
        return real.startswith(mine + os.sep)

    def _volume_from_image(self, src: Path, pool: str, name: str) -> int:
        """A task: a flattened qcow2 copy of the image ``src`` as the new volume
        ``pool/name``, through the storage module's create path."""
        st = self.storage
        from pyvirt.manager.storage import check_volume_name

        pdir = st._pool_dir(st._active_row(pool))
        check_volume_name(name)
        return int(st._start_new(pool, pdir, name, "vol-clone", lambda h, dst: st._copy_volume(
            h, src, "qcow2", dst, f"image {src.name}"), "qcow2"))

    def _check_disk_ref(self, i: int, pool: str, vol: str) -> None:
        if self.storage is None:
            raise InvalidArgument("storage pools are not available in this daemon",
                                  f"disks[{i}].volume")
        try:
            self.storage.vol_path(pool, vol)
        except ManagerError as exc:
            raise InvalidArgument(exc.message, f"disks[{i}].volume") from None

    def _copy_path_disk(self, handle: TaskHandle, src: Path, fmt: str | None, dst: Path,
                        i: int) -> None:
        """A full copy (chain flattened) of the image ``src`` at ``dst``, same format."""
        from pyvirt.disk import DiskError, open_disk

        try:
            probe = open_disk(src, format=fmt, readonly=True)
            fmt = str(getattr(probe, "format", None) or fmt or "raw")
            probe.close()
            staged = dst.with_name(f".{dst.name}.part-{os.getpid()}")
            handle.add_cleanup(staged)
            self.storage._copy_volume(handle, src, fmt, staged, f"disks[{i}] ({src})")
            os.chmod(staged, 0o600)
            os.rename(staged, dst)
            handle.drop_cleanup(staged)
        except (DiskError, OSError, ValueError) as exc:
            raise OperationFailed(f"copy of {src} failed: {exc}", f"disks[{i}]") from None

    def _edit(self, name: str, change: Callable[[Definition, dict[str, Any]], None],
              event: str, detail: str, *, field_map: dict[str, str] | None = None
              ) -> tuple[Definition, str]:
        """Apply ``change(defn, doc)`` to the stored definition under the domain's lock;
        the result is checked as a definition (errors name fields, ``field_map``
        renaming them to the request's). Returns (new definition, applies)."""
        with self._domain(name) as row:
            defn = self._definition(row)
            doc = defn.to_doc()
            change(defn, doc)
            try:
                new = parse_definition(doc)
                self._check_references(new)
            except InvalidArgument as exc:
                if field_map and exc.field in field_map:
                    raise InvalidArgument(exc.message, field_map[exc.field]) from None
                raise
            self._store_definition(row["uuid"], new)
            active = self._runstate(row["uuid"])["state"] in ACTIVE_STATES
        self._emit(row["name"], event, detail)
        return new, "next-start" if active else "now"

    def disk_add(self, name: str, *, pool: str, volume: str | None = None,
                 size_bytes: int | None = None, format: str = "qcow2") -> dict[str, Any]:
        """Add a disk: the existing volume ``pool/volume`` (used by no other
        domain), or a new one of ``size_bytes`` in ``pool`` named NAME-diskN."""
        row = self._row(name)
        dname = row["name"]
        defn = self._definition(row)
        index = len(defn.disks)
        if self.storage is None:
            raise InvalidArgument("storage pools are not available in this daemon", "pool")
        created: str | None = None
        if volume is None:
            if size_bytes is None:
                raise InvalidArgument("required for a new volume", "size_bytes")
            if format not in ("qcow2", "raw"):
                raise InvalidArgument(f"{format!r} is not qcow2 or raw", "format")
            try:
                taken = {v["name"] for v in self.storage.vol_list(pool)}
            except ManagerError as exc:
                raise InvalidArgument(exc.message, "pool") from None
            n = index
            while f"{dname}-disk{n}.{format}" in taken:
                n += 1
            volume = f"{dname}-disk{n}.{format}"
            try:
                tid = self.storage.vol_create(pool, volume, size_bytes, format)
            except InvalidArgument as exc:
                raise InvalidArgument(exc.message, {"capacity": "size_bytes"}.get(
                    exc.field or "", exc.field)) from None
            t = self.tasks.wait(tid, timeout=120)
            if t["state"] != "done":
                raise OperationFailed(f"new volume {pool}/{volume}: {t['error']}", "pool")
            created = volume
        else:
            try:
                path, _fmt = self.storage.vol_path(pool, volume)
            except ManagerError as exc:  # a missing pool or volume, a bad name
                field = "pool" if "pool" in exc.message and "volume" not in exc.message \
                    else "volume"
                raise InvalidArgument(exc.message, field) from None
            users = self.users_of(path)
            if users:
                raise InvalidArgument(f"storage volume '{pool}/{volume}' is in use by domain "
                                      f"'{users[0]}'", "volume")
        ref = f"{pool}/{volume}"

        def change(_defn: Definition, doc: dict[str, Any]) -> None:
            doc["disks"].append({"volume": ref})

        try:
            new, applies = self._edit(name, change, "disk-added", ref, field_map={
                f"disks[{index}].volume": "volume", "disks": "disks"})
        except BaseException:
            if created is not None:
                with contextlib.suppress(Exception):
                    self.storage.vol_delete(pool, created)
            raise
        return {"index": len(new.disks) - 1, "target": disk_target(len(new.disks) - 1),
                "volume": ref, "applies": applies}

    def disk_remove(self, name: str, index: int, *, remove_storage: bool = False) -> None:
        """Remove disk ``index`` from the definition; ``remove_storage``: its volume
        too (a path disk's file stays)."""
        row = self._row(name)
        uuid = row["uuid"]
        with self.store.read() as db:
            if db.execute("SELECT 1 FROM snapshots WHERE domain = ?", (uuid,)).fetchone():
                # snapshots record disks by index: removing one would shift the rest
                raise OperationInvalid(f"domain '{row['name']}' has snapshots: delete them "
                                       "before removing a disk")
        removed: list[DiskDef] = []

        def change(defn: Definition, doc: dict[str, Any]) -> None:
            if not 0 <= index < len(defn.disks):
                raise NotFound(f"domain '{defn.name}' has no disk {index}")
            if remove_storage and self._runstate(defn.uuid)["state"] in ACTIVE_STATES:
                raise OperationInvalid("domain is running: its disk's storage cannot be "
                                       "removed until it stops")
            removed.append(defn.disks[index])
            del doc["disks"][index]

        self._edit(name, change, "disk-removed", disk_target(index))
        d = removed[0]
        if remove_storage and d.volume is not None and self.storage is not None:
            pool, _, vol = d.volume.partition("/")
            self.storage.vol_delete(pool, vol)

    def disk_resize(self, name: str, index: int, size_bytes: int, *,
                    allow_paths: bool = True) -> None:
        """Grow disk ``index`` to ``size_bytes`` (the VM shut off); a host path
        other than the daemon's own overlays only with ``allow_paths``."""
        with self._domain(name) as row:
            if self._runstate(row["uuid"])["state"] in ACTIVE_STATES:
                raise OperationInvalid("domain is running: resize its disk while it is "
                                       "shut off")
            defn = self._definition(row)
            if not 0 <= index < len(defn.disks):
                raise NotFound(f"domain '{defn.name}' has no disk {index}")
            d = defn.disks[index]
            if d.volume is not None:
                pool, _, vol = d.volume.partition("/")
                try:
                    self.storage.vol_resize(pool, vol, size_bytes)
                except InvalidArgument as exc:
                    raise InvalidArgument(exc.message, "size_bytes") from None
            else:
                path = str(d.spec.get("path"))
                if not allow_paths and not self._own_overlay(row["uuid"], path):
                    raise InvalidArgument("a disk given by a host path is resized only by "
                                          "an administrator", f"disks[{index}]")
                _resize_image(Path(path), d.spec.get("format"), size_bytes)
        self._emit(row["name"], "disk-resized", f"{disk_target(index)} {size_bytes}")

    def iface_add(self, name: str, *, network: str, mac: str | None = None,
                  model: str | None = None) -> dict[str, Any]:
        """A NIC on the virtual network ``network`` (virtio; ``mac`` or derived)."""
        if model not in (None, "virtio"):
            raise InvalidArgument(f"{model!r}: only virtio NICs are supported", "model")
        holder: list[int] = []

        def change(defn: Definition, doc: dict[str, Any]) -> None:
            self._pin_macs(defn, doc)
            holder.append(len(doc["nics"]))
            doc["nics"].append({"network": network, **({"mac": mac} if mac else {})})

        row = self._row(name)
        i = len(self._definition(row).nics)
        new, applies = self._edit(name, change, "interface-added", network, field_map={
            f"nics[{i}].network": "network", f"nics[{i}].mac": "mac", "nics": "nics"})
        index = holder[0]
        return {"index": index, "mac": new.nic_macs()[index], "applies": applies}

    def iface_remove(self, name: str, index: int) -> None:
        def change(defn: Definition, doc: dict[str, Any]) -> None:
            if not 0 <= index < len(defn.nics):
                raise NotFound(f"domain '{defn.name}' has no interface {index}")
            self._pin_macs(defn, doc)  # the NICs after it keep their addresses
            del doc["nics"][index]

        self._edit(name, change, "interface-removed", str(index))

    @staticmethod
    def _pin_macs(defn: Definition, doc: dict[str, Any]) -> None:
        """Every NIC's MAC written out: derived ones depend on the NIC's index."""
        for n, mac in zip(doc["nics"], defn.nic_macs(), strict=True):
            n.setdefault("mac", mac)


def _disk_overlay(c: VmClient, disk: int, path: Path) -> dict[str, Any]:
    fn = getattr(c, "disk_overlay", None)
    if fn is not None:
        return dict(fn(disk, path))
    resp = c.request("PUT", "/vm/disk-overlay", json_body={"disk": disk, "path": str(path)})
    return dict(resp.json())


def _create_overlay(path: Path, backing: Path, fmt: str | None) -> None:
    """A new qcow2 image at ``path`` over ``backing`` (its size)."""
    from pyvirt.disk import DiskError, open_disk
    from pyvirt.disk.qcow2_create import create_qcow2

    try:
        base = open_disk(backing, format=fmt, readonly=True, backing=False)
        try:
            size = base.size
            fmt = fmt or getattr(base, "format", None)
        finally:
            base.close()
        create_qcow2(path, size, backing=str(backing), backing_format=fmt)
    except DiskError as exc:
        raise OperationFailed(f"overlay {path.name}: {exc}") from None


def _with_disks(defn: Definition, paths: dict[int, Path]) -> Definition:
    """``defn`` with disk i on the qcow2 image ``paths[i]`` (other keys kept)."""
    import dataclasses

    disks = list(defn.disks)
    for i, p in paths.items():
        spec = {k: v for k, v in disks[i].spec.items() if k not in ("path", "format")}
        disks[i] = DiskDef(None, {"path": str(p), "format": "qcow2", **spec})
    return dataclasses.replace(defn, disks=tuple(disks))


def _clone_name(new: str, index: int, old: str) -> str:
    """NEW-<index> with the old file's extension (web1.qcow2 -> web2-0.qcow2)."""
    ext = Path(old).suffix if Path(old).suffix in (".qcow2", ".raw", ".img") else ""
    return f"{new}-{index}{ext}"


def _resize_image(path: Path, fmt: str | None, size: int) -> None:
    """Grow the image at ``path`` to ``size`` bytes (shrinking refused)."""
    from pyvirt.disk import DiskError, open_disk

    try:
        disk = open_disk(path, format=fmt, readonly=False)
    except DiskError as exc:
        raise OperationFailed(f"{path}: {exc}") from None
    try:
        if size < disk.size:
            raise InvalidArgument(f"{size} is below the disk's {disk.size} bytes: shrinking "
                                  "a disk is not supported", "size_bytes")
        if size > disk.size:
            disk.resize(size)
            disk.flush()
    except (DiskError, OSError, ValueError) as exc:
        raise OperationFailed(f"resize of {path} failed: {exc}") from None
    finally:
        disk.close()

def _memory_limit(config: VmConfig) -> int:
    from pyvirt.manager.privilege import memory_limit_for

    return memory_limit_for(config)


def _cpu_time(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            rest = f.read(4096).rsplit(b")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None
