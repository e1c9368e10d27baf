"""pyvirtd under stress (issue #12): killed with SIGKILL while VMs run and a long
task writes, then started again; and 50 concurrent API clients for a minute.

Real daemons (`pyvirt daemon --root DIR --no-networks`: these tests need no
virtual network, and so touch no interface), real VMMs booting the default
guest on the software CPU, the real client.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_support import (
    ConsoleReader,
    remove_root,
    short_root,
    spawn_daemon,
    stop_daemon,
    wait_for,
)

pytestmark = [pytest.mark.guest, pytest.mark.slow]

READY = b"PYVIRT-READY"


def _definition(name: str, memory: str = "128M") -> dict[str, Any]:
    return {"name": name, "memory": memory, "nics": [], "accel": "emu"}


class Daemon:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.sock = root / "run" / "pyvirtd.sock"
        self.log = root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()
        self.proc = spawn_daemon(self.root, extra=["--no-networks"])
        wait_for(lambda: self._answers(), 60, "the daemon's API")

    def _answers(self) -> bool:
        from pyvirt.client import Client, ConnectionFailed

        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the daemon exited: {self.log.read_text()[-3000:]}")
        try:
            with Client(f"unix://{self.sock}", timeout=5) as c:
                c.version()
            return True
        except ConnectionFailed:
            return False

    def client(self, timeout: float = 120) -> Any:
        from pyvirt.client import Client

        return Client(f"unix://{self.sock}", timeout=timeout)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_daemon(self.proc)


@pytest.fixture
def daemon(test_guest: Path) -> Iterator[Daemon]:
    root = short_root("pvr")
    d = Daemon(root)
    try:
        yield d
    finally:
        d.stop()
        remove_root(root)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")


def _console_says(info: dict[str, Any], cmd: bytes, answer: bytes) -> None:
    con = ConsoleReader(Path(info["console_socket"]))
    try:
        mark = con.mark()
        con.send(cmd)
        con.expect(answer, 60, since=mark)
    finally:
        con.sock.close()


def test_sigkill_while_vms_run_and_a_task_writes(daemon: Daemon, tmp_path: Path) -> None:
    daemon.start()
    names = ["k0", "k1", "k2"]
    with daemon.client() as c:
        for n in names:
            c.define(_definition(n))
            c.start(n)
        for n in names:
            con = ConsoleReader(Path(c.domain(n)["console_socket"]))
            con.expect(READY, 180)
            con.sock.close()
        pids = {n: c.domain(n)["pid"] for n in names}
        # a long task: importing 1.5 GiB of data into the default pool
        big = tmp_path / "big.img"
        with open(big, "wb") as f:
            chunk = b"\x5a" * (1 << 20)
            for _ in range(1536):
                f.write(chunk)
        pool_dir = Path(c.pool_info("default")["path"])
        tid = c.vol_import("default", "big", str(big), format="raw", mode="copy")
        # killed as soon as its half-written file exists (polled without the API: a
        # fast disk copies 1.5 GiB in well under a second)
        wait_for(lambda: list(pool_dir.glob(".big.part-*")), 60, "the import's partial file",
                 interval=0.001)
    daemon.kill9()
    assert list(pool_dir.glob(".big.part-*")) or (pool_dir / "big").exists()

    # the VMs never noticed
    for n in names:
        assert _alive(pids[n]), f"{n}'s VMM died with the daemon"
    _console_says({"console_socket": _console_path(daemon.root, "k1")},
                  b"echo alive-$((6*7))\n", b"alive-42")

    daemon.start()
    with daemon.client() as c:
        doms = {d["name"]: d for d in c.list_domains()}
        assert {n: doms[n]["state"] for n in names} == dict.fromkeys(names, "running")
        assert {n: c.domain(n)["pid"] for n in names} == pids
        task = c.task(tid)
        assert task["state"] == "failed" and "daemon stopped" in task["error"]
        assert not (pool_dir / "big").exists(), "the interrupted import left its volume"
        assert not list(pool_dir.glob(".big.part-*")), "the interrupted import left its file"
        assert "big" not in {v["name"] for v in c.vol_list("default")}
        # and it controls them
        c.suspend("k0")
        assert c.domain("k0")["state"] == "paused"
        c.resume("k0")
        _console_says(c.domain("k0"), b"echo back-$((2*21))\n", b"back-42")
        c.shutdown("k2", timeout=120)
        k2 = c.domain("k2")
        assert (k2["state"], k2["reason"]) == ("shut off", "shutdown")

    # a VMM that dies while no daemon runs is found dead, with the reason
    daemon.kill9()
    os.kill(pids["k1"], signal.SIGKILL)
    wait_for(lambda: not _alive(pids["k1"]), 10, "k1's VMM to die")
    daemon.start()
    with daemon.client() as c:
        k1 = c.domain("k1")
        assert k1["state"] == "crashed", k1
        # not the daemon's child any more: no wait status, only the missing exit record
        assert "without an exit record" in k1["detail"], k1
        assert c.domain("k0")["state"] == "running"
        c.destroy("k0")
        assert (c.domain("k0")["state"], c.domain("k0")["reason"]) == ("shut off", "destroyed")
    daemon.stop()
    con = sqlite3.connect(daemon.root / "state" / "pyvirt.db")
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        con.close()


def _console_path(root: Path, name: str) -> str:
    """A VM's console socket read from the database (no daemon is running)."""
    con = sqlite3.connect(root / "state" / "pyvirt.db")
    try:
        row = con.execute("SELECT r.console_socket FROM runstate r JOIN domains d "
                          "ON d.uuid = r.uuid WHERE d.name = ?", (name,)).fetchone()
    finally:
        con.close()
    assert row is not None and row[0], f"no console socket recorded for {name}"
    return str(row[0])


LOAD_SECONDS = float(os.environ.get("PYVIRT_LOAD_SECONDS", "60"))


def test_fifty_clients_for_a_minute(daemon: Daemon) -> None:
    from pyvirt.client import ClientError

    daemon.start()
    running = [f"r{i}" for i in range(4)]
    idle = [f"d{i:02d}" for i in range(16)]
    with daemon.client() as c:
        for n in running + idle:
            c.define(_definition(n))
        for n in running:
            c.start(n)
    ok: collections.Counter[tuple[str, str]] = collections.Counter()
    failures: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + LOAD_SECONDS

    def worker(i: int) -> None:
        rnd = random.Random(i)
        mine: collections.Counter[tuple[str, str]] = collections.Counter()
        try:
            with daemon.client(timeout=120) as c:
                k = 0
                while time.monotonic() < stop_at:
                    k += 1
                    vm = rnd.choice(running)
                    op = rnd.choice(("suspend", "resume", "info", "list", "stats",
                                     "define", "autostart"))
                    try:
                        if op == "suspend":
                            c.suspend(vm)
                        elif op == "resume":
                            c.resume(vm)
                        elif op == "info":
                            assert c.domain(vm)["name"] == vm
                        elif op == "list":
                            assert len([d for d in c.list_domains() if
                                        not d["name"].startswith("t")]) == 20
                        elif op == "stats":
                            c.stats(vm)
                        elif op == "define":
                            tmp = f"t{i}-{k}"
                            c.define(_definition(tmp))
                            c.undefine(tmp)
                            vm = tmp
                        else:
                            own = rnd.choice(idle)
                            c.domain(own)
                            vm = own
                        mine[(vm, op)] += 1
                    except ClientError as exc:
                        if exc.code != "operation-invalid" or op not in ("suspend", "resume"):
                            with lock:
                                failures.append(f"{op} {vm}: {exc.status} {exc}")
        except Exception as exc:  # a crash of the worker itself is a failure too
            with lock:
                failures.append(f"worker {i}: {type(exc).__name__}: {exc}")
        with lock:
            ok.update(mine)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(LOAD_SECONDS + 300)
    assert not failures, failures[:10]
    assert sum(ok.values()) > 500, ok

    from pyvirt.api.client import VmClient

    with daemon.client() as c:
        names = [d["name"] for d in c.list_domains()]
        assert sorted(names) == sorted(running + idle), "define/undefine lost or doubled a VM"
        for vm in running:
            info = c.domain(vm)
            with VmClient(info["api_socket"]) as v:
                assert v.info()["state"] == info["state"], (vm, info["state"])
            # every successful suspend/resume is one event, no more, no less (the log
            # reaches back to the VM's start: nothing was dropped from it)
            log = c.event_log(limit=10000, kind="domain", obj=vm)
            assert [e["event"] for e in log[:2]] == ["defined", "started"], log[:3]
            events = collections.Counter(e["event"] for e in log)
            assert events["suspended"] == ok[(vm, "suspend")], (vm, events, ok)
            assert events["resumed"] == ok[(vm, "resume")], (vm, events, ok)
            c.destroy(vm)
    text = daemon.log.read_text()
    assert "database is locked" not in text and "Traceback" not in text, text[-3000:]
