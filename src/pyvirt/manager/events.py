"""The event log: every lifecycle change, task step and network/pool change is
one row in the database (the last ``KEEP`` are kept) and goes live to every
subscriber (the API's event stream, ``pyvirt event --loop``).

A subscriber has a bounded queue: one that does not keep up is sent an
``overflow`` event and dropped, so a stalled client never grows the daemon's
memory nor slows anyone else.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

from pyvirt.manager.db import Store

__all__ = ["KEEP", "EventBus", "Subscription"]

#: events kept in the database (~100 bytes each: a bounded ~10 MB; a minute of 50 clients
#: suspending and resuming makes ~15 000)
KEEP = 100_000
#: events a subscriber may have waiting
QUEUE = 1000


class Subscription:
    def __init__(self, bus: EventBus) -> None:
        self._bus = bus
        self._q: queue.Queue[dict[str, Any]] = queue.Queue(QUEUE + 1)
        self.closed = False

    def _put(self, event: dict[str, Any]) -> None:
        if self.closed:
            return
        if self._q.qsize() >= QUEUE:
            self._q.put_nowait({"id": event["id"], "time": event["time"], "kind": "daemon",
                                "object": "", "event": "overflow",
                                "detail": "events were lost: this client fell behind"})
            self.close()
            return
        self._q.put_nowait(event)

    def get(self, timeout: float) -> dict[str, Any] | None:
        """The next event, or None after ``timeout`` seconds (or when closed and drained)."""
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.closed = True
        self._bus._unsubscribe(self)


class EventBus:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._subs: set[Subscription] = set()
        self._count = 0

    def emit(self, kind: str, obj: str, event: str, detail: str = "") -> dict[str, Any]:
        now = time.time()
        # the lock orders ids and fan-out: subscribers see events in id order
        with self._lock:
            with self._store.write() as db:
                cur = db.execute("INSERT INTO events (time, kind, object, event, detail) "
                                 "VALUES (?, ?, ?, ?, ?)", (now, kind, obj, event, detail))
                eid = int(cur.lastrowid or 0)
                self._count += 1
                if self._count % 500 == 0:
                    db.execute("DELETE FROM events WHERE id <= ?", (eid - KEEP,))
            ev = {"id": eid, "time": now, "kind": kind, "object": obj, "event": event,
                  "detail": detail}
            for sub in list(self._subs):
                sub._put(ev)
        return ev

    def subscribe(self, since: int | None = None) -> Subscription:
        """Live events; with ``since``, the stored events after that id first
        (at most the last ``QUEUE``)."""
        sub = Subscription(self)
        with self._lock:
            if since is not None:
                with self._store.read() as db:
                    rows = db.execute("SELECT * FROM events WHERE id > ? ORDER BY id DESC "
                                      "LIMIT ?", (since, QUEUE - 1)).fetchall()
                for row in reversed(rows):
                    sub._put(dict(row))
            self._subs.add(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        # called from _put under our lock too: a set discard needs no lock of its own
        self._subs.discard(sub)

    def recent(self, limit: int = 100, kind: str | None = None,
               obj: str | None = None) -> list[dict[str, Any]]:
        """The last ``limit`` stored events (oldest first), optionally of one kind/object."""
        limit = max(1, min(limit, KEEP))
        where, args = [], []
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        if obj is not None:
            where.append("object = ?")
            args.append(obj)
        sql = "SELECT * FROM events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        with self._store.read() as db:
            rows = db.execute(sql, (*args, limit)).fetchall()
        return [dict(r) for r in reversed(rows)]
