"""Long operations (creating or copying a volume, a snapshot, a save) as tasks:
each runs on a thread of its own, reports progress, and is recorded in the
database, so it can be listed and followed (``GET /v1/tasks``, the event
stream) and survives in the record when the daemon does not: at the next
start a task still marked running is marked failed and whatever it was
writing (its cleanup paths) is removed, so nothing half-written is left.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pyvirt.manager.db import Store
from pyvirt.manager.errors import ManagerError, NotFound, OperationTimeout
from pyvirt.manager.events import EventBus

__all__ = ["TaskHandle", "Tasks"]

log = logging.getLogger(__name__)

#: progress is written at most this often per task
PROGRESS_INTERVAL = 0.25


class TaskHandle:
    """What a task's function gets: report progress, name files to clean up."""

    def __init__(self, tasks: Tasks, tid: int, cleanup: list[str]) -> None:
        self._tasks = tasks
        self.id = tid
        self._cleanup = cleanup
        self._last = 0.0

    def progress(self, fraction: float, message: str = "") -> None:
        now = time.monotonic()
        if now - self._last < PROGRESS_INTERVAL and fraction < 1.0:
            return
        self._last = now
        fraction = min(max(float(fraction), 0.0), 1.0)
        with self._tasks._store.write() as db:
            db.execute("UPDATE tasks SET progress = ?, message = ? WHERE id = ?",
                       (fraction, message, self.id))
        self._tasks._events.emit("task", str(self.id), "progress",
                                 f"{fraction * 100:.0f}% {message}".strip())

    def add_cleanup(self, path: str | os.PathLike[str]) -> None:
        """Remove ``path`` if the task fails (or the daemon dies while it runs)."""
        self._cleanup.append(os.fspath(path))
        with self._tasks._store.write() as db:
            db.execute("UPDATE tasks SET cleanup = ? WHERE id = ?",
                       (json.dumps(self._cleanup), self.id))

    def drop_cleanup(self, path: str | os.PathLike[str]) -> None:
        """``path`` is finished and must stay even if a later step fails."""
        p = os.fspath(path)
        if p in self._cleanup:
            self._cleanup.remove(p)
            with self._tasks._store.write() as db:
                db.execute("UPDATE tasks SET cleanup = ? WHERE id = ?",
                           (json.dumps(self._cleanup), self.id))


class Tasks:
    def __init__(self, store: Store, events: EventBus) -> None:
        self._store = store
        self._events = events
        self._done = threading.Condition()

    def start(self, kind: str, obj: str, fn: Callable[[TaskHandle], dict[str, Any] | None], *,
              cleanup: Iterable[str | os.PathLike[str]] = ()) -> int:
        paths = [os.fspath(p) for p in cleanup]
        with self._store.write() as db:
            cur = db.execute("INSERT INTO tasks (kind, object, state, cleanup, created) "
                             "VALUES (?, ?, 'running', ?, ?)",
                             (kind, obj, json.dumps(paths), time.time()))
            tid = int(cur.lastrowid or 0)
        self._events.emit("task", str(tid), "started", f"{kind} {obj}")
        handle = TaskHandle(self, tid, paths)
        threading.Thread(target=self._run, args=(handle, kind, fn), daemon=True,
                         name=f"task-{tid}").start()
        return tid

    def _run(self, handle: TaskHandle, kind: str,
             fn: Callable[[TaskHandle], dict[str, Any] | None]) -> None:
        try:
            result = fn(handle)
        except ManagerError as exc:
            self._finish(handle, error=exc.message)
        except Exception as exc:
            log.exception("task %d (%s) failed", handle.id, kind)
            self._finish(handle, error=f"internal error: {type(exc).__name__}: {exc}")
        else:
            self._finish(handle, result=result)

    def _finish(self, handle: TaskHandle, *, error: str | None = None,
                result: dict[str, Any] | None = None) -> None:
        if error is not None:
            _remove(handle._cleanup)
        state = "failed" if error is not None else "done"
        with self._store.write() as db:
            db.execute("UPDATE tasks SET state = ?, error = ?, result = ?, finished = ?, "
                       "progress = CASE WHEN ? = 'done' THEN 1.0 ELSE progress END, cleanup = '[]' "
                       "WHERE id = ?",
                       (state, error, None if result is None else json.dumps(result),
                        time.time(), state, handle.id))
        self._events.emit("task", str(handle.id), state, error or "")
        with self._done:
            self._done.notify_all()

    def get(self, tid: int) -> dict[str, Any]:
        with self._store.read() as db:
            row = db.execute("SELECT * FROM tasks WHERE id = ?", (tid,)).fetchone()
        if row is None:
            raise NotFound(f"task {tid} not found")
        return _task_dict(row)

    def list(self, active_only: bool = False,
             limit: int = 200) -> builtins.list[dict[str, Any]]:
        sql = "SELECT * FROM tasks"
        if active_only:
            sql += " WHERE state = 'running'"
        sql += " ORDER BY id DESC LIMIT ?"
        with self._store.read() as db:
            rows = db.execute(sql, (limit,)).fetchall()
        return [_task_dict(r) for r in reversed(rows)]

    def wait(self, tid: int, timeout: float | None = None) -> dict[str, Any]:
        """The task once it has ended; OperationTimeout after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._done:
            while True:
                task = self.get(tid)
                if task["state"] != "running":
                    return task
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise OperationTimeout(f"task {tid} is still running after {timeout} s")
                self._done.wait(0.5 if left is None else min(left, 0.5))

    def recover(self) -> builtins.list[int]:
        """At start: tasks a previous daemon left running have failed; remove what
        they were writing. Returns their ids."""
        with self._store.read() as db:
            rows = db.execute("SELECT id, cleanup FROM tasks WHERE state = 'running'").fetchall()
        ids = []
        for row in rows:
            try:
                paths = json.loads(row["cleanup"] or "[]")
            except ValueError:
                paths = []
            _remove([p for p in paths if isinstance(p, str)])
            with self._store.write() as db:
                db.execute("UPDATE tasks SET state = 'failed', error = ?, finished = ?, "
                           "cleanup = '[]' WHERE id = ?",
                           ("the daemon stopped while it ran", time.time(), row["id"]))
            self._events.emit("task", str(row["id"]), "failed", "the daemon stopped while it ran")
            ids.append(int(row["id"]))
        return ids


def _task_dict(row: Any) -> dict[str, Any]:
    d = dict(row)
    d.pop("cleanup", None)
    d["result"] = None if d.get("result") is None else json.loads(d["result"])
    return d


def _remove(paths: Iterable[str]) -> None:
    for p in paths:
        path = Path(p)
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove %s left by a failed task: %s", p, exc)
