"""The daemon's store, event log and tasks (pyvirt.manager.db/events/tasks)."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from pyvirt.manager.db import MIGRATIONS, Store, StoreError
from pyvirt.manager.errors import InvalidArgument, NotFound, OperationTimeout, from_dict
from pyvirt.manager.events import QUEUE, EventBus
from pyvirt.manager.paths import DaemonPaths
from pyvirt.manager.tasks import Tasks


def test_schema_created_once_and_wal(tmp_path: Path) -> None:
    s = Store(tmp_path / "db")
    assert s.schema_version() == len(MIGRATIONS)
    s.close()
    s = Store(tmp_path / "db")  # reopening migrates nothing
    with s.read() as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert s.integrity_check() == "ok"
    s.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "db")
    db.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(StoreError, match="newer than this pyvirt"):
        Store(tmp_path / "db")


def test_not_a_database_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot be used"):
        Store(tmp_path / "db")


def test_failed_write_rolls_back(tmp_path: Path) -> None:
    s = Store(tmp_path / "db")
    with pytest.raises(RuntimeError), s.write() as db:
        db.execute("INSERT INTO meta (key, value) VALUES ('a', '1')")
        raise RuntimeError
    assert s.get_meta("a") is None


def test_counter_survives_reopen_and_threads(tmp_path: Path) -> None:
    s = Store(tmp_path / "db")
    got: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(50):
            n = s.next_counter("run_id")
            with lock:
                got.append(n)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 401))  # no lost or doubled value
    s.close()
    assert Store(tmp_path / "db").next_counter("run_id") == 401


def test_events_stored_replayed_and_live(tmp_path: Path) -> None:
    bus = EventBus(Store(tmp_path / "db"))
    first = bus.emit("domain", "vm1", "defined")
    bus.emit("domain", "vm1", "started", "booted")
    sub = bus.subscribe(since=first["id"])
    ev = sub.get(1)
    assert ev is not None and ev["event"] == "started" and ev["detail"] == "booted"
    assert sub.get(0.05) is None
    bus.emit("domain", "vm2", "stopped", "shutdown")
    ev = sub.get(1)
    assert ev is not None and (ev["object"], ev["event"]) == ("vm2", "stopped")
    assert [e["event"] for e in bus.recent(obj="vm1")] == ["defined", "started"]
    sub.close()


def test_slow_subscriber_is_dropped_not_buffered(tmp_path: Path) -> None:
    bus = EventBus(Store(tmp_path / "db"))
    sub = bus.subscribe()
    for i in range(QUEUE + 50):
        bus.emit("domain", "vm", "tick", str(i))
    assert sub.closed
    seen = []
    while (ev := sub.get(0.01)) is not None:
        seen.append(ev)
    assert len(seen) == QUEUE + 1 and seen[-1]["event"] == "overflow"


def test_task_done_failed_and_cleanup(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    tasks = Tasks(store, EventBus(store))
    out = tmp_path / "partial.img"

    def ok(h):  # type: ignore[no-untyped-def]
        h.progress(0.5, "half")
        return {"size": 1}

    def bad(h):  # type: ignore[no-untyped-def]
        out.write_bytes(b"x")
        h.add_cleanup(out)
        raise InvalidArgument("too big", "capacity")

    t1 = tasks.wait(tasks.start("vol-create", "p/v", ok), 5)
    assert t1["state"] == "done" and t1["result"] == {"size": 1} and t1["progress"] == 1.0
    t2 = tasks.wait(tasks.start("vol-create", "p/w", bad), 5)
    assert t2["state"] == "failed" and t2["error"] == "capacity: too big"
    assert not out.exists()
    with pytest.raises(NotFound):
        tasks.get(999)


def test_task_wait_times_out(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    tasks = Tasks(store, EventBus(store))
    release = threading.Event()
    tid = tasks.start("x", "y", lambda h: release.wait(5) and None)
    with pytest.raises(OperationTimeout):
        tasks.wait(tid, 0.2)
    release.set()
    assert tasks.wait(tid, 5)["state"] == "done"


def test_recover_marks_running_failed_and_removes_partials(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    tasks = Tasks(store, EventBus(store))
    partial = tmp_path / "half.qcow2"
    started = threading.Event()

    def hang(h):  # type: ignore[no-untyped-def]
        partial.write_bytes(b"x")
        h.add_cleanup(partial)
        started.set()
        time.sleep(30)

    tid = tasks.start("vol-clone", "p/v", hang)
    assert started.wait(5)
    # a new daemon on the same database (the old one "died")
    store2 = Store(tmp_path / "db")
    tasks2 = Tasks(store2, EventBus(store2))
    assert tasks2.recover() == [tid]
    t = tasks2.get(tid)
    assert t["state"] == "failed" and "daemon stopped" in t["error"]
    assert not partial.exists()


def test_paths_are_short_and_created(tmp_path: Path) -> None:
    p = DaemonPaths.for_root(tmp_path)
    p.ensure()
    assert p.vm_run("0123456789abcdef-aaaa").name == "01234567"
    assert (p.state / "vms").is_dir() and (p.run / "vm").is_dir()


def test_error_round_trip() -> None:
    e = from_dict(InvalidArgument("no such pool", "disks[0].volume").to_dict())
    assert isinstance(e, InvalidArgument) and e.field == "disks[0].volume"
    assert str(e) == "disks[0].volume: no such pool" and e.status == 400
