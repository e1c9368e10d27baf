"""Storage pools and volumes: libvirt's directory pools, on ``pyvirt.disk``.

A pool is a directory (``pools`` table); its volumes are the regular files
directly in it whose names follow the volume-name rule. A volume's format
(raw or qcow2) is recorded when pyvirt makes it (``volumes`` table) and is
never probed again: a guest owns a raw volume's bytes and could write a qcow2
header there naming any host file as its "backing file". Files put into a
pool directory by hand are adopted with their probed format when the pool
starts or is refreshed (the administrator vouches for them; use ``vol_import``
for images of unknown origin, which checks them).

Rules that keep the daemon's files its own:

- a volume name is one path component (``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``):
  never a path outside the pool; symbolic links in a pool are not volumes and
  are never followed (the file opened is compared by identity with the one
  ``lstat`` saw);
- a qcow2 volume's backing chain stays inside the pools: each backing file is
  a volume of some pool, named with its format as that pool records it. An
  image that would make a VM read a host file outside every pool is refused
  (import, upload, and every time a domain resolves the volume);
- work that writes a new file writes it as ``.NAME.part-XXXX`` beside the
  volume and links it into place only when complete (a task's cleanup path),
  so a failed, interrupted or killed operation leaves no half-written volume;
- resize only grows (shrinking would cut what a guest wrote; qcow2 cannot
  shrink here at all); delete is refused while a defined domain uses the
  volume (the Manager answers through ``set_user_lookup``), while another
  volume is based on it, or while some process holds its image lock.

Upload writes a volume's file from a byte stream: the bytes of the file in
the volume's format (disk content for raw, a whole qcow2 image for qcow2);
the declared length must match what arrives, and the result is checked
(qcow2: header, ``check``, backing chain) before it replaces the volume.

Threads: every method may be called from any thread. ``_lock`` guards the pool
definitions' changes and ``_busy`` (names being written); it is never held
during file I/O. Long work (copies) runs as a task on its own thread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import stat
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pyvirt.disk.backend import DiskBackend, DiskError
from pyvirt.manager.errors import (
    AlreadyExists,
    InvalidArgument,
    ManagerError,
    NotFound,
    OperationFailed,
    OperationInvalid,
)

if TYPE_CHECKING:
    import sqlite3

    from pyvirt.disk.qcow2_header import Qcow2Header
    from pyvirt.manager.db import Store
    from pyvirt.manager.events import EventBus
    from pyvirt.manager.paths import DaemonPaths
    from pyvirt.manager.tasks import TaskHandle, Tasks

__all__ = ["FORMATS", "Storage", "UserLookup", "check_volume_name"]

log = logging.getLogger(__name__)

FORMATS = ("raw", "qcow2")
_VOL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_POOL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_POOL_KEYS = ("name", "type", "path", "autostart")
_PART = ".part-"
#: as qcow2's limit (pyvirt.disk.qcow2_header.MAX_VIRTUAL_SIZE): 32 PiB
MAX_CAPACITY = 1 << 55
#: bytes read from the upload stream / copied at a time
_CHUNK = 1 << 20
#: backing chain depth, as pyvirt.disk's ChainLimits
_MAX_DEPTH = 64

#: a domain's users of an image: path -> names of the defined domains whose disks use it
UserLookup = Callable[[Path], list[str]]


class _Readable(Protocol):
    def read(self, n: int = ..., /) -> bytes: ...


def check_volume_name(name: object, field: str = "name") -> str:
    if not isinstance(name, str) or not _VOL_RE.match(name):
        raise InvalidArgument("a volume name is 1 to 128 letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit", field)
    return name


def _check_pool_name(name: object, field: str = "name") -> str:
    if not isinstance(name, str) or not _POOL_RE.match(name):
        raise InvalidArgument("a pool name is 1 to 64 letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit", field)
    return name


def _check_capacity(value: object, field: str = "capacity") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument("must be a number of bytes", field)
    if value < 0 or value > MAX_CAPACITY:
        raise InvalidArgument(f"{value} is outside 0..{MAX_CAPACITY}", field)
    return -(-value // 512) * 512  # whole sectors, as qemu-img


class Storage:
    """Directory pools and their volumes (see the module docstring)."""

    def __init__(self, store: Store, paths: DaemonPaths, events: EventBus, tasks: Tasks,
                 privilege: object | None = None) -> None:
        self._store = store
        self._paths = paths
        self._events = events
        self._tasks = tasks
        # VMMs get their images as handed fds (privilege.open_files), so volumes
        # stay the daemon's own (0600) whoever runs the VMs
        self._privilege = privilege
        self._lock = threading.Lock()
        self._busy: set[tuple[str, str]] = set()  # (pool, volume) being written
        self._user_lookup: UserLookup | None = None

    # -- set-up --------------------------------------------------------------------

    def startup(self) -> None:
        """The "default" pool on first start; active pools checked (a vanished
        directory makes its pool inactive), stale partial files removed,
        autostart pools started."""
        if self._store.get_meta("storage.initialized") is None:
            with self._store.read() as db:
                taken = db.execute("SELECT 1 FROM pools WHERE name = 'default'").fetchone()
            if taken is None:
                self.pool_define({"name": "default", "path": str(self._paths.pool_default()),
                                  "autostart": True})
            with self._store.write() as db:
                db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                           ("storage.initialized", "1"))
        for row in self._pool_rows():
            name = row["name"]
            if row["active"]:
                try:
                    pdir = self._pool_dir(row)
                except ManagerError as exc:
                    self._set_active(name, False)
                    self._events.emit("pool", name, "stopped", exc.message)
                    continue
                self._remove_partials(pdir)
                self._sync(row)
            elif row["autostart"]:
                try:
                    self.pool_start(name)
                except ManagerError as exc:
                    log.warning("storage pool %s did not start: %s", name, exc.message)
                    self._events.emit("pool", name, "start-failed", exc.message)

    def set_user_lookup(self, fn: UserLookup) -> None:
        """``fn(path)``: the defined domains whose disks use the image ``path``."""
        self._user_lookup = fn

    def users_of(self, path: Path) -> list[str]:
        return list(self._user_lookup(path)) if self._user_lookup is not None else []

    # -- pools -----------------------------------------------------------------------

    def pool_define(self, doc: object) -> dict[str, Any]:
        """Define (or change the path/autostart of) a directory pool:
        ``{"name", "type": "dir", "path": absolute directory, "autostart": true}``."""
        if not isinstance(doc, dict):
            raise InvalidArgument("a pool definition is an object with name, type, path "
                                  "and autostart")
        for key in doc:
            if key not in _POOL_KEYS:
                raise InvalidArgument("unknown field (known: name, type, path, autostart)",
                                      str(key))
        name = _check_pool_name(doc.get("name"))
        kind = doc.get("type", "dir")
        if kind != "dir":
            raise InvalidArgument(f"unsupported pool type {kind!r} (only dir)", "type")
        raw_path = doc.get("path")
        if not isinstance(raw_path, str) or not raw_path or "\0" in raw_path:
            raise InvalidArgument("must be a directory path", "path")
        if not os.path.isabs(raw_path):
            raise InvalidArgument(f"{raw_path!r} is not an absolute path", "path")
        path = os.path.realpath(raw_path)  # the directory as it is now; never re-resolved
        if path == "/":
            raise InvalidArgument("the root directory cannot be a pool", "path")
        autostart = doc.get("autostart", True)
        if not isinstance(autostart, bool):
            raise InvalidArgument("must be true or false", "autostart")
        with self._lock, self._store.write() as db:
            other = db.execute("SELECT name FROM pools WHERE path = ? AND name != ?",
                               (path, name)).fetchone()
            if other is not None:
                raise AlreadyExists(f"storage pool '{other['name']}' already uses {path}",
                                    "path")
            row = db.execute("SELECT * FROM pools WHERE name = ?", (name,)).fetchone()
            if row is None:
                pool_uuid = str(uuidlib.uuid4())
                db.execute("INSERT INTO pools (name, uuid, kind, path, autostart, active, "
                           "created) VALUES (?, ?, 'dir', ?, ?, 0, ?)",
                           (name, pool_uuid, path, int(autostart), time.time()))
            else:
                if row["active"] and row["path"] != path:
                    raise OperationInvalid(f"storage pool '{name}' is active: stop it before "
                                           "changing its path")
                pool_uuid = row["uuid"]
                db.execute("UPDATE pools SET path = ?, autostart = ? WHERE name = ?",
                           (path, int(autostart), name))
        self._events.emit("pool", name, "defined", path)
        return {"name": name, "uuid": pool_uuid, "type": "dir", "path": path,
                "autostart": autostart}

    def pool_undefine(self, name: str) -> None:
        """Forget the pool (its directory and files stay, as libvirt's)."""
        with self._lock, self._store.write() as db:
            row = self._pool_row(name, db)
            if row["active"]:
                raise OperationInvalid(f"storage pool '{name}' is still active")
            db.execute("DELETE FROM pools WHERE name = ?", (name,))
        self._events.emit("pool", name, "undefined")

    def pool_start(self, name: str) -> None:
        """Make the pool usable: its directory is created if missing (0711)."""
        row = self._pool_row(name)
        if row["active"]:
            raise OperationInvalid(f"storage pool '{name}' is already active")
        path = Path(row["path"])
        try:
            path.mkdir(mode=0o711, parents=True, exist_ok=True)
        except OSError as exc:
            raise OperationFailed(f"storage pool '{name}': cannot create {path}: "
                                  f"{exc.strerror}") from None
        pdir = self._pool_dir(row)
        self._remove_partials(pdir)
        self._set_active(name, True)
        self._sync(self._pool_row(name))
        self._events.emit("pool", name, "started")

    def pool_stop(self, name: str) -> None:
        """Stop using the pool (libvirt's pool-destroy: nothing is deleted)."""
        row = self._pool_row(name)
        if not row["active"]:
            raise OperationInvalid(f"storage pool '{name}' is not active")
        self._set_active(name, False)
        self._events.emit("pool", name, "stopped")

    def pool_refresh(self, name: str) -> None:
        """Look at the directory again: files put there by hand are adopted
        (format probed), volumes whose files are gone are forgotten."""
        row = self._active_row(name)
        self._pool_dir(row)
        self._sync(row)
        self._events.emit("pool", name, "refreshed")

    def set_autostart(self, name: str, on: bool) -> None:
        self._pool_row(name)
        with self._store.write() as db:
            db.execute("UPDATE pools SET autostart = ? WHERE name = ?", (int(bool(on)), name))

    def pool_list(self) -> list[dict[str, Any]]:
        return [self._pool_dict(row) for row in self._pool_rows()]

    def pool_info(self, name: str) -> dict[str, Any]:
        return self._pool_dict(self._pool_row(name))

    # -- volumes: reading ------------------------------------------------------------

    def vol_list(self, pool: str) -> list[dict[str, Any]]:
        row = self._active_row(pool)
        pdir = self._pool_dir(row)
        out = []
        for name, fmt in sorted(self._sync(row).items()):
            with contextlib.suppress(NotFound):  # deleted meanwhile
                out.append(self._vol_dict(pool, pdir, name, fmt))
        return out

    def vol_info(self, pool: str, vol: str) -> dict[str, Any]:
        row = self._active_row(pool)
        pdir = self._pool_dir(row)
        fmt = self._vol_format(row, pdir, vol)
        return self._vol_dict(pool, pdir, vol, fmt)

    def vol_path(self, pool: str, vol: str) -> tuple[Path, str]:
        """(path, format) of a volume for a domain's disk; its backing chain is
        checked to stay inside the pools."""
        row = self._active_row(pool)
        pdir = self._pool_dir(row)
        fmt = self._vol_format(row, pdir, vol)
        path = pdir / vol
        if fmt == "qcow2":
            self._check_chain(path, f"storage volume '{pool}/{vol}'")
        return path, fmt

    # -- volumes: creating -----------------------------------------------------------

    def vol_create(self, pool: str, name: str, capacity: int, format: str = "qcow2", *,
                   backing: str | None = None, prealloc: bool = False) -> int:
        """A new empty volume (a task). ``backing``: "VOL" (this pool) or
        "POOL/VOL", a qcow2 overlay over it (capacity 0: the backing volume's);
        ``prealloc``: the space allocated now (raw: every byte; qcow2: metadata
        and the file's space, as qemu's preallocation=falloc)."""
        row = self._active_row(pool)
        pdir = self._pool_dir(row)
        check_volume_name(name)
        size = _check_capacity(capacity)
        if format not in FORMATS:
            raise InvalidArgument(f"unknown format {format!r} (expected raw or qcow2)", "format")
        base: tuple[Path, str] | None = None
        if backing is not None:
            if format != "qcow2":
                raise InvalidArgument("only a qcow2 volume can have a backing volume",
                                      "backing")
            if prealloc:
                raise InvalidArgument("a volume with a backing volume cannot be preallocated",
                                      "prealloc")
            base = self._backing_volume(pool, backing)
            if size == 0:
                size = self._virtual_size(base[0], base[1], f"backing volume {backing}")
        return self._start_new(pool, pdir, name, "vol-create", lambda h, dst: self._make_empty(
            dst, format, size, base, prealloc), format)

    def vol_clone(self, pool: str, src: str, new: str, *, mode: str = "overlay") -> int:
        """A new volume ``new`` in the same pool from ``src`` (a task):
        ``overlay``: a qcow2 image whose backing file is ``src`` (instant);
        ``copy``: a full copy of what ``src`` reads (its chain flattened), in
        ``src``'s format, with progress."""
        if mode not in ("overlay", "copy"):
            raise InvalidArgument(f"{mode!r} is not overlay or copy", "mode")
        row = self._active_row(pool)
        pdir = self._pool_dir(row)
        check_volume_name(new)
        src_fmt = self._vol_format(row, pdir, src)
        src_path = pdir / src
        if src_fmt == "qcow2":
            self._check_chain(src_path, f"storage volume '{pool}/{src}'")
        if mode == "overlay":
            what = f"storage volume '{pool}/{src}'"
            # an overlay over an image some VM is writing would read a moving target
            self._open(src_path, src_fmt, readonly=True, what=what).close()
            size = self._virtual_size(src_path, src_fmt, what)
            return self._start_new(pool, pdir, new, "vol-clone", lambda h, dst: self._make_empty(
                dst, "qcow2", size, (src_path, src_fmt), False), "qcow2")
        return self._start_new(pool, pdir, new, "vol-clone", lambda h, dst: self._copy_volume(
            h, src_path, src_fmt, dst, f"storage volume '{pool}/{src}'"), src_fmt)

    def vol_import(self, pool: str, name: str, source_path: str, *, format: str | None = None,
                   mode: str = "copy") -> int:
        """An existing image file becomes the volume ``name`` (a task): copied
        (the file as it is, holes kept) or moved. Its format is ``format`` or
        probed (read-only, the file opened with its backing chain); a qcow2
        image must pass the qcow2 check and its backing chain must lie in the
        pools (relative backing names are made absolute)."""
        if mode not in ("copy", "move"):
            raise InvalidArgument(f"{mode!r} is not copy or move", "mode")
        if format is not None and format not in FORMATS:
            raise InvalidArgument(f"unknown format {format!r} (expected raw or qcow2)", "format")
        if not isinstance(source_path, str) or not source_path or "\0" in source_path:
            raise InvalidArgument("must be the path of an image file", "source")
        if not os.path.isabs(source_path):
            raise InvalidArgument(f"{source_path!r} is not an absolute path", "source")
        row = self._active_row(pool)
        pdir = self._pool_dir(row)
        check_volume_name(name)
        source = Path(source_path)
        inside = self._locate(source)
        if inside is not None:
            raise InvalidArgument(f"{source} is already volume '{inside[0]}/{inside[1]}' "
                                  "(clone it instead)", "source")
        if (format or _probe(source)) == "qcow2":
            # before anything opens the chain: it must not lead out of the pools
            self._check_chain(source, "source", field="source")
        disk = self._open(source, format, readonly=True, what="source")
        fmt = disk.format
        disk.close()
        return self._start_new(pool, pdir, name, "vol-import", lambda h, dst: self._import(
            h, source, fmt, dst, mode), fmt)

    def vol_upload(self, pool: str, name: str, stream: Iterable[bytes] | _Readable,
                   length: int | None) -> dict[str, Any]:
        """Replace an existing volume's file with the bytes of ``stream``: disk
        content for a raw volume (padded with zeros to whole sectors), a whole
        qcow2 image for a qcow2 volume. ``length``: what the sender declared
        (None: unknown, bounded by the pool's free space); a stream that ends
        early or runs longer fails, and nothing changes."""
        row = self._active_row(pool)
        pdir = self._pool_dir(row)
        fmt = self._vol_format(row, pdir, name)
        free = _statvfs(pdir)["available"]
        if length is not None:
            if isinstance(length, bool) or not isinstance(length, int) or length < 0:
                raise InvalidArgument("must be a number of bytes", "length")
            if length > free:
                raise InvalidArgument(f"{length} bytes do not fit in storage pool '{pool}' "
                                      f"({free} bytes available)", "length")
        limit = length if length is not None else free
        target = pdir / name
        what = f"storage volume '{pool}/{name}'"
        child = self._dependent(target)
        if child is not None:  # new content under an overlay would garble what it reads
            raise OperationInvalid(f"{what} is the backing file of storage volume '{child}'")
        self._reserve(pool, pdir, name, new=False)
        try:
            # our write lock on the old file for the whole upload: no VM has it open
            holder = self._lock_image(target, what)
            try:
                staged = self._staged(pdir, name)
                try:
                    got = self._receive(stream, staged, limit, length, what)
                    if fmt == "raw" and got % 512:
                        os.truncate(staged, got + (-got % 512))
                    elif fmt == "qcow2":
                        self._check_qcow2_file(staged, what, at=target, field="data")
                    os.replace(staged, target)
                except BaseException:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(staged)
                    raise
            finally:
                holder.close()
        finally:
            self._release(pool, name)
        self._events.emit("volume", f"{pool}/{name}", "uploaded", f"{got} bytes")
        return self._vol_dict(pool, pdir, name, fmt)

    # -- volumes: changing -----------------------------------------------------------

    def vol_resize(self, pool: str, vol: str, capacity: int) -> None:
        """Grow the volume to ``capacity`` bytes (shrinking is refused: it
        would cut off what a guest wrote)."""
        row = self._active_row(pool)
        pdir = self._pool_dir(row)
        fmt = self._vol_format(row, pdir, vol)
        size = _check_capacity(capacity)
        what = f"storage volume '{pool}/{vol}'"
        self._reserve(pool, pdir, vol, new=False)
        try:
            disk = self._open(pdir / vol, fmt, readonly=False, what=what)
            try:
                if size < disk.size:
                    raise InvalidArgument(f"{size} is below the volume's {disk.size} bytes: "
                                          "shrinking a volume is not supported", "capacity")
                if size > disk.size:
                    try:
                        disk.resize(size)
                        disk.flush()
                    except (DiskError, OSError, ValueError) as exc:
                        raise OperationFailed(f"resize of {what} failed: {exc}") from None
            finally:
                disk.close()
        finally:
            self._release(pool, vol)
        self._events.emit("volume", f"{pool}/{vol}", "resized", str(size))

    def vol_delete(self, pool: str, vol: str) -> None:
        """Delete the volume's file; refused while a defined domain uses it,
        another volume is based on it, or a process has it open."""
        row = self._active_row(pool)
        pdir = self._pool_dir(row)
        self._vol_format(row, pdir, vol)
        path = pdir / vol
        what = f"storage volume '{pool}/{vol}'"
        users = self.users_of(path)
        if users:
            names = ", ".join(f"'{u}'" for u in users)
            raise OperationInvalid(f"{what} is in use by domain {names}")
        child = self._dependent(path)
        if child is not None:
            raise OperationInvalid(f"{what} is the backing file of storage volume '{child}'")
        self._reserve(pool, pdir, vol, new=False)
        try:
            holder = self._lock_image(path, what)
            try:
                os.unlink(path)
            except OSError as exc:
                raise OperationFailed(f"cannot delete {what}: {exc.strerror}") from None
            finally:
                holder.close()
            with self._store.write() as db:
                db.execute("DELETE FROM volumes WHERE pool = ? AND name = ?", (pool, vol))
        finally:
            self._release(pool, vol)
        self._events.emit("volume", f"{pool}/{vol}", "deleted")

    # -- the work of tasks -----------------------------------------------------------

    def _start_new(self, pool: str, pdir: Path, name: str, kind: str,
                   work: Callable[[TaskHandle, Path], Callable[[], None] | None],
                   fmt: str) -> int:
        """Run ``work(handle, staged)`` as a task writing a new volume at a
        staged path, then link it into place as ``name`` with format ``fmt``;
        ``work`` may return what to do once the volume is in place."""
        self._reserve(pool, pdir, name, new=True)
        staged = self._staged(pdir, name)
        obj = f"{pool}/{name}"

        def run(handle: TaskHandle) -> dict[str, Any]:
            try:
                try:
                    after = work(handle, staged)
                    os.chmod(staged, 0o600)
                except ManagerError:
                    raise
                except (DiskError, OSError, ValueError) as exc:
                    raise OperationFailed(f"{kind} of storage volume '{obj}' failed: "
                                          f"{_why(exc)}") from None
                self._link_into_place(pool, pdir, name, fmt, staged)
                if after is not None:
                    after()
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(staged)
                self._release(pool, name)
            self._events.emit("volume", obj, "created", kind)
            return self._vol_dict(pool, pdir, name, fmt)

        try:
            return self._tasks.start(kind, obj, run, cleanup=[staged])
        except BaseException:
            self._release(pool, name)
            raise

    def _make_empty(self, dst: Path, fmt: str, size: int, base: tuple[Path, str] | None,
                    prealloc: bool) -> None:
        if fmt == "raw":
            from pyvirt.disk.raw import create_raw

            create_raw(dst, size)
        else:
            from pyvirt.disk.qcow2_create import create_qcow2

            create_qcow2(dst, size, backing=str(base[0]) if base else None,
                         backing_format=base[1] if base else None,
                         preallocation="metadata" if prealloc else "off")
        if prealloc:
            fd = os.open(dst, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                end = os.fstat(fd).st_size
                if end:
                    os.posix_fallocate(fd, 0, end)
                os.fsync(fd)
            finally:
                os.close(fd)

    def _copy_volume(self, handle: TaskHandle, src: Path, fmt: str, dst: Path,
                     what: str) -> None:
        from pyvirt.disk.copy import copy_content

        source = self._open(src, fmt, readonly=True, what=what)
        try:
            self._make_empty(dst, fmt, source.size, None, False)
            out = self._open_new(dst, fmt)
            try:
                copy_content(source, out, sparse=4096, base=None,
                             tick=_ticker(handle, source.size, "copying"))
                out.flush()
            finally:
                out.close()
        finally:
            source.close()

    def _import(self, handle: TaskHandle, source: Path, fmt: str, dst: Path,
                mode: str) -> Callable[[], None] | None:
        disk = self._open(source, fmt, readonly=True, what="source")  # locked while copied
        try:
            linked = False
            st = os.lstat(source)
            ours = disk.identity == ("file", st.st_dev, st.st_ino)
            # moved by a second name, the source's removed once the volume is in
            # place (a daemon killed meanwhile loses nothing); only a file of ours
            # with no other name: anyone else who could still write it is copied
            if mode == "move" and ours and st.st_nlink == 1 and st.st_uid == os.geteuid():
                try:
                    os.link(source, dst, follow_symlinks=False)
                    linked = True
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP,
                                         errno.EMLINK):
                        raise
            if not linked:
                _copy_file(source, dst, _ticker(handle, os.stat(source).st_size, "copying"))
            if fmt == "qcow2":
                self._absolute_backing(dst, source)
                self._check_qcow2_file(dst, "source", at=dst, field="source")
        finally:
            disk.close()
        if mode == "move":
            return lambda: _unlink_quietly(source)
        return None

    def _absolute_backing(self, image: Path, was_at: Path) -> None:
        """A relative backing name pointed next to ``was_at``: make it absolute."""
        header = _read_header(image, "source")
        if header is None or header.backing_name is None or os.path.isabs(header.backing_name):
            return
        full = str(_resolve_backing(os.path.dirname(was_at), header.backing_name))
        disk = self._open_new(image, "qcow2", backing=False)
        try:
            disk.set_backing(full, header.backing_format)  # type: ignore[attr-defined]
        finally:
            disk.close()

    def _receive(self, stream: Iterable[bytes] | _Readable, staged: Path, limit: int,
                 length: int | None, what: str) -> int:
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        got = 0
        try:
            # the stream's own errors (a client gone) pass through as they are
            for chunk in _chunks(stream):
                got += len(chunk)
                if got > limit:
                    if length is not None:
                        raise InvalidArgument(f"the upload to {what} sent more than the "
                                              f"{length} bytes declared", "length")
                    raise OperationFailed(f"the upload to {what} does not fit in the pool")
                try:
                    _write_all(fd, chunk)
                except OSError as exc:
                    raise OperationFailed(f"upload to {what} failed: {_why(exc)}") from None
            if length is not None and got != length:
                raise InvalidArgument(f"the upload to {what} ended after {got} of the "
                                      f"{length} bytes declared", "length")
            try:
                os.fsync(fd)
            except OSError as exc:
                raise OperationFailed(f"upload to {what} failed: {_why(exc)}") from None
        finally:
            os.close(fd)
        return got

    def _check_qcow2_file(self, path: Path, what: str, *, at: Path, field: str) -> None:
        """``path`` (a file this daemon wrote, not yet a volume) is a sound
        qcow2 image (its header parses, it opens, ``check`` finds no
        corruption) whose backing chain, resolved from ``at``, stays in the
        pools; else InvalidArgument naming ``field``."""
        from pyvirt.disk.open import open_disk
        from pyvirt.disk.qcow2_check import check_qcow2

        try:
            if _read_header(path, "the image") is None:
                raise InvalidArgument(f"the image is not qcow2 ({what} is a qcow2 volume)", field)
            open_disk(path, format="qcow2", readonly=True, backing=False,
                      what="the image").close()
        except DiskError as exc:
            raise InvalidArgument(str(exc), field) from None
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            res = check_qcow2(fd, filename=str(path))
        finally:
            os.close(fd)
        if res.corruptions or res.check_errors:
            first = res.messages[0] if res.messages else "see pyvirt img check"
            raise InvalidArgument(f"the qcow2 image is damaged ({res.corruptions} errors, "
                                  f"{res.check_errors} check errors: {first})", field)
        self._check_chain(path, what, field=field, resolve_from=at)

    # -- helpers: pools ----------------------------------------------------------------

    def _pool_rows(self) -> list[sqlite3.Row]:
        with self._store.read() as db:
            return list(db.execute("SELECT * FROM pools ORDER BY name").fetchall())

    def _pool_row(self, name: str, db: sqlite3.Connection | None = None) -> sqlite3.Row:
        if db is None:
            with self._store.read() as conn:
                row = conn.execute("SELECT * FROM pools WHERE name = ?", (name,)).fetchone()
        else:
            row = db.execute("SELECT * FROM pools WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"storage pool '{name}' not found")
        return row  # type: ignore[no-any-return]

    def _active_row(self, name: str) -> sqlite3.Row:
        row = self._pool_row(name)
        if not row["active"]:
            raise OperationInvalid(f"storage pool '{name}' is not active")
        return row

    def _pool_dir(self, row: sqlite3.Row) -> Path:
        """The pool's directory, checked to be one (not a symbolic link)."""
        path = Path(row["path"])
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise OperationFailed(f"storage pool '{row['name']}': {path}: "
                                  f"{exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode) or os.path.realpath(path) != str(path):
            raise OperationFailed(f"storage pool '{row['name']}': {path} is no longer a "
                                  "directory of its own (a symbolic link or another file)")
        return path

    def _set_active(self, name: str, on: bool) -> None:
        with self._store.write() as db:
            db.execute("UPDATE pools SET active = ? WHERE name = ?", (int(on), name))

    def _pool_dict(self, row: sqlite3.Row) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": row["name"], "uuid": row["uuid"], "type": row["kind"], "path": row["path"],
            "state": "active" if row["active"] else "inactive",
            "autostart": bool(row["autostart"]),
            "capacity": None, "allocation": None, "available": None}
        if row["active"]:
            with contextlib.suppress(OSError):
                doc.update(_statvfs(Path(row["path"])))
        return doc

    def _remove_partials(self, pdir: Path) -> None:
        """Files a dead daemon was writing (uploads are not tasks)."""
        with contextlib.suppress(OSError), os.scandir(pdir) as it:
            for entry in it:
                if entry.name.startswith(".") and _PART in entry.name:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)

    # -- helpers: volumes --------------------------------------------------------------

    def _scan(self, pdir: Path) -> dict[str, os.stat_result]:
        out: dict[str, os.stat_result] = {}
        try:
            with os.scandir(pdir) as it:
                for entry in it:
                    if not _VOL_RE.match(entry.name):
                        continue
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode):
                        out[entry.name] = st
        except OSError as exc:
            raise OperationFailed(f"cannot read {pdir}: {exc.strerror}") from None
        return out

    def _sync(self, row: sqlite3.Row) -> dict[str, str]:
        """The pool's volumes (name -> format): recorded ones whose file is
        there, plus files found there adopted with their probed format."""
        pool = row["name"]
        pdir = Path(row["path"])
        files = self._scan(pdir)
        with self._store.read() as db:
            recorded = {r["name"]: r["format"] for r in db.execute(
                "SELECT name, format FROM volumes WHERE pool = ?", (pool,))}
        with self._lock:
            busy = {n for p, n in self._busy if p == pool}
        gone = [n for n in recorded if n not in files and n not in busy]
        found = {n: _probe(pdir / n) for n in files if n not in recorded and n not in busy}
        found = {n: f for n, f in found.items() if f is not None}
        if gone or found:
            now = time.time()
            with self._store.write() as db:
                db.executemany("DELETE FROM volumes WHERE pool = ? AND name = ?",
                               [(pool, n) for n in gone])
                db.executemany("INSERT OR IGNORE INTO volumes (pool, name, format, created) "
                               "VALUES (?, ?, ?, ?)",
                               [(pool, n, f, now) for n, f in found.items()])
        out = {n: f for n, f in recorded.items() if n in files}
        out.update({n: f for n, f in found.items() if n not in out})
        return out

    def _vol_format(self, row: sqlite3.Row, pdir: Path, vol: str) -> str:
        """The recorded format of an existing volume (a regular file, not a link)."""
        pool = row["name"]
        check_volume_name(vol, "volume")
        try:
            st = os.lstat(pdir / vol)
        except FileNotFoundError:
            raise NotFound(f"storage volume '{pool}/{vol}' not found") from None
        except OSError as exc:
            raise OperationFailed(f"storage volume '{pool}/{vol}': {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise NotFound(f"storage volume '{pool}/{vol}' not found ({pdir / vol} is not a "
                           "regular file; symbolic links are never followed)")
        with self._store.read() as db:
            rec = db.execute("SELECT format FROM volumes WHERE pool = ? AND name = ?",
                             (pool, vol)).fetchone()
        if rec is not None:
            return str(rec["format"])
        return self._sync(row).get(vol) or _raise(
            NotFound(f"storage volume '{pool}/{vol}' not found"))

    def _vol_dict(self, pool: str, pdir: Path, name: str, fmt: str) -> dict[str, Any]:
        path = pdir / name
        try:
            st = os.lstat(path)
        except OSError:
            raise NotFound(f"storage volume '{pool}/{name}' not found") from None
        capacity = st.st_size
        backing: str | None = None
        backing_format: str | None = None
        if fmt == "qcow2":
            with contextlib.suppress(DiskError, OSError):
                header = _read_header(path, f"storage volume '{pool}/{name}'")
                if header is not None:
                    capacity = header.size
                    if header.backing_name is not None:
                        backing = os.path.join(pdir, header.backing_name)
                        backing_format = header.backing_format
        return {"name": name, "pool": pool, "path": str(path), "type": "file", "format": fmt,
                "capacity": capacity, "allocation": st.st_blocks * 512, "backing": backing,
                "backing_format": backing_format}

    def _reserve(self, pool: str, pdir: Path, name: str, *, new: bool) -> None:
        with self._lock:
            if (pool, name) in self._busy:
                if new:
                    raise AlreadyExists(f"storage volume '{pool}/{name}' is being created")
                raise OperationInvalid(f"storage volume '{pool}/{name}' is busy with "
                                       "another operation")
            if new and os.path.lexists(pdir / name):
                raise AlreadyExists(f"storage volume '{pool}/{name}' already exists")
            self._busy.add((pool, name))

    def _release(self, pool: str, name: str) -> None:
        with self._lock:
            self._busy.discard((pool, name))

    @staticmethod
    def _staged(pdir: Path, name: str) -> Path:
        return pdir / f".{name}{_PART}{secrets.token_hex(4)}"

    def _link_into_place(self, pool: str, pdir: Path, name: str, fmt: str,
                         staged: Path) -> None:
        """The complete file at ``staged`` becomes volume ``name``, never over
        an existing file (a hard link fails if the name exists)."""
        final = pdir / name
        try:
            os.link(staged, final, follow_symlinks=False)
        except FileExistsError:
            raise AlreadyExists(f"storage volume '{pool}/{name}' already exists") from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                raise OperationFailed(f"cannot create storage volume '{pool}/{name}': "
                                      f"{exc.strerror}") from None
            if os.path.lexists(final):  # no hard links on this file system
                raise AlreadyExists(f"storage volume '{pool}/{name}' already exists") from None
            os.rename(staged, final)
        with self._store.write() as db:
            db.execute("INSERT OR REPLACE INTO volumes (pool, name, format, created) "
                       "VALUES (?, ?, ?, ?)", (pool, name, fmt, time.time()))

    def _backing_volume(self, pool: str, ref: str) -> tuple[Path, str]:
        """``ref``: "VOL" (in ``pool``) or "POOL/VOL" -> (path, format), the chain checked."""
        if not isinstance(ref, str):
            raise InvalidArgument("must be a volume name or POOL/VOL", "backing")
        bpool, sep, bvol = ref.partition("/")
        if not sep:
            bpool, bvol = pool, ref
        try:
            return self.vol_path(bpool, bvol)
        except ManagerError as exc:
            raise InvalidArgument(exc.message, "backing") from None

    def _locate(self, path: Path) -> tuple[str, str, str | None] | None:
        """(pool, volume, recorded format or None) when ``path`` names a regular
        file directly in a defined pool's directory (its parent resolved)."""
        parent = os.path.realpath(path.parent)
        with self._store.read() as db:
            row = db.execute("SELECT * FROM pools WHERE path = ?", (parent,)).fetchone()
            if row is None or not _VOL_RE.match(path.name):
                return None
            rec = db.execute("SELECT format FROM volumes WHERE pool = ? AND name = ?",
                             (row["name"], path.name)).fetchone()
        try:
            st = os.lstat(Path(parent) / path.name)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return row["name"], path.name, None if rec is None else str(rec["format"])

    def _check_chain(self, top: Path, what: str, *, field: str | None = None,
                     resolve_from: Path | None = None) -> None:
        """Every backing file under the qcow2 image ``top`` is a volume of some
        pool, named with the format that pool records for it."""
        cur = top
        base_dir = os.path.dirname(resolve_from if resolve_from is not None else top)
        seen: set[tuple[int, int]] = set()
        for _ in range(_MAX_DEPTH + 1):
            header = _read_header(cur, what)
            if header is None or header.backing_name is None:
                return
            full = _resolve_backing(base_dir, header.backing_name)
            where = self._locate(full)
            if where is None:
                raise _chain_error(f"{what}: backing file {full} is outside every storage "
                                   "pool; a volume may only be based on another volume, so "
                                   "that no VM reads a host file through it", field)
            bpool, bvol, recorded = where
            if recorded is None:
                recorded = self._sync(self._pool_row(bpool)).get(bvol)
            if header.backing_format is None:
                raise _chain_error(f"{what}: the image does not record its backing file's "
                                   f"format (volume '{bpool}/{bvol}' is {recorded})", field)
            if header.backing_format != recorded:
                raise _chain_error(f"{what}: the image reads its backing file as "
                                   f"{header.backing_format}, but volume '{bpool}/{bvol}' "
                                   f"is {recorded}", field)
            st = os.stat(full)
            if (st.st_dev, st.st_ino) in seen:
                raise _chain_error(f"{what}: the backing chain loops at {full}", field)
            seen.add((st.st_dev, st.st_ino))
            if recorded != "qcow2":
                return
            cur = full
            base_dir = os.path.dirname(full)
        raise _chain_error(f"{what}: the backing chain is deeper than {_MAX_DEPTH} images",
                           field)

    def _dependent(self, path: Path) -> str | None:
        """A volume (POOL/VOL) of an active pool whose backing file is ``path``."""
        try:
            target = os.stat(path)
        except OSError:
            return None
        for row in self._pool_rows():
            if not row["active"]:
                continue
            with contextlib.suppress(ManagerError):
                for name, fmt in self._sync(row).items():
                    if fmt != "qcow2":
                        continue
                    image = Path(row["path"]) / name
                    with contextlib.suppress(DiskError, OSError):
                        header = _read_header(image, name)
                        if header is None or header.backing_name is None:
                            continue
                        st = os.stat(os.path.join(row["path"], header.backing_name))
                        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                            return f"{row['name']}/{name}"
        return None

    def _open(self, path: Path, fmt: str | None, *, readonly: bool, what: str) -> DiskBackend:
        """open_disk, refusing a symbolic link: the file opened is the one lstat saw."""
        from pyvirt.disk.open import open_disk

        try:
            before = os.lstat(path)
        except FileNotFoundError:
            raise _open_error(what, f"{path}: no such file") from None
        except OSError as exc:
            raise _open_error(what, f"{path}: {exc.strerror}") from None
        if stat.S_ISLNK(before.st_mode):
            raise _open_error(what, f"{path} is a symbolic link (not followed)")
        try:
            disk = open_disk(path, format=fmt, readonly=readonly, what=what)
        except DiskError as exc:
            raise _open_error(what, str(exc), prefixed=True) from None
        if disk.identity != ("file", before.st_dev, before.st_ino):
            disk.close()
            raise _open_error(what, f"{path} changed while it was opened")
        return disk

    def _open_new(self, path: Path, fmt: str, *, backing: bool = True, readonly: bool = False,
                  what: str = "volume") -> DiskBackend:
        """A file this daemon just wrote (a staged path)."""
        from pyvirt.disk.open import open_disk

        try:
            return open_disk(path, format=fmt, readonly=readonly, what=what, backing=backing)
        except DiskError as exc:
            raise _open_error(what, str(exc), prefixed=True) from None

    def _lock_image(self, path: Path, what: str) -> Any:
        """Hold the image's write lock (refused while any process has it open)."""
        from pyvirt.disk.lock import open_image_file

        try:
            before = os.lstat(path)
            file = open_image_file(path, readonly=False, direct=False, what=what)
        except DiskError as exc:
            raise OperationInvalid(str(exc)) from None
        except OSError as exc:
            raise OperationFailed(f"{what}: {exc.strerror}") from None
        if file.identity != ("file", before.st_dev, before.st_ino):
            file.close()
            raise OperationFailed(f"{what}: {path} changed while it was opened")
        return file

    @staticmethod
    def _virtual_size(path: Path, fmt: str, what: str) -> int:
        if fmt == "raw":
            return os.stat(path).st_size
        header = _read_header(path, what)
        if header is None:
            raise OperationFailed(f"{what} is not a qcow2 image")
        return header.size


# -- module helpers ---------------------------------------------------------------------


def _raise(exc: Exception) -> str:
    raise exc


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def _chain_error(message: str, field: str | None) -> ManagerError:
    if field is not None:
        err = InvalidArgument(message)
        err.field = field
        return err
    return OperationInvalid(message)


def _open_error(what: str, message: str, *, prefixed: bool = False) -> ManagerError:
    """A disk that cannot be opened: the caller's input ("source") or the state
    of a volume (in use, damaged)."""
    if what == "source":
        text = message if prefixed else f"{message}"
        return InvalidArgument(text.removeprefix("source: "), "source")
    text = message if prefixed else f"{what}: {message}"
    return OperationInvalid(text)


def _resolve_backing(base_dir: str, name: str) -> Path:
    """Where a recorded backing name leads (relative to the naming image's
    directory, as qemu), its directories resolved as the kernel would; the
    last component is left as is (a symbolic link there is no volume)."""
    joined = os.path.join(base_dir, name)
    return Path(os.path.realpath(os.path.dirname(joined))) / os.path.basename(joined)


def _statvfs(path: Path) -> dict[str, int]:
    """capacity/allocation/available as libvirt's pool-info shows them."""
    sv = os.statvfs(path)
    return {"capacity": sv.f_blocks * sv.f_frsize,
            "allocation": (sv.f_blocks - sv.f_bfree) * sv.f_frsize,
            "available": sv.f_bavail * sv.f_frsize}


def _probe(path: Path) -> str | None:
    """A file's format from its first bytes (adoption of files found in a
    pool); None when it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return "qcow2" if os.pread(fd, 4, 0) == b"QFI\xfb" else "raw"
    except OSError:
        return None
    finally:
        os.close(fd)


def _read_header(path: Path, what: str) -> Qcow2Header | None:
    """The qcow2 header of ``path`` (no lock taken: only the first cluster is
    read), or None when the file is not qcow2."""
    from pyvirt.disk.qcow2_header import V2_HEADER_LEN, parse_header

    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DiskError(f"{what}: {path} is not a regular file")
        head = os.pread(fd, V2_HEADER_LEN, 0)
        if len(head) < V2_HEADER_LEN or head[:4] != b"QFI\xfb":
            return None
        bits = int.from_bytes(head[20:24], "big")
        cluster = 1 << min(max(bits, 9), 21)  # parse_header rejects what is outside 9..21
        buf = os.pread(fd, min(cluster, st.st_size), 0)
        return parse_header(buf, what, st.st_size)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _chunks(stream: Iterable[bytes] | _Readable) -> Iterator[bytes]:
    read = getattr(stream, "read", None)
    if callable(read):
        while True:
            chunk = read(_CHUNK)
            if not chunk:
                return
            yield bytes(chunk)
    else:
        for chunk in stream:  # type: ignore[union-attr]
            if chunk:
                yield bytes(chunk)


def _ticker(handle: TaskHandle, total: int, message: str) -> Callable[[int], None]:
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if total > 0:
            handle.progress(min(done / total, 0.99), message)

    return tick


def _copy_file(src: Path, dst: Path, tick: Callable[[int], None]) -> None:
    """Copy the file's bytes, keeping its holes (SEEK_DATA/SEEK_HOLE)."""
    sfd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        os.set_blocking(sfd, True)
        if not stat.S_ISREG(os.fstat(sfd).st_mode):
            raise DiskError(f"source: {src} is not a regular file")
        size = os.fstat(sfd).st_size
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600)
        try:
            offset = 0
            while offset < size:
                try:
                    data = os.lseek(sfd, offset, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:  # only a hole is left
                        break
                    raise
                hole = min(os.lseek(sfd, data, os.SEEK_HOLE), size)
                tick(data - offset)
                pos = data
                while pos < hole:
                    buf = os.pread(sfd, min(_CHUNK, hole - pos), pos)
                    if not buf:
                        break  # the file shrank under us: what is left reads as zeros
                    view = memoryview(buf)
                    while view:
                        n = os.pwrite(dfd, view, pos)
                        view, pos = view[n:], pos + n
                    tick(len(buf))
                offset = max(hole, pos)
            tick(size - offset)
            os.ftruncate(dfd, size)
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
