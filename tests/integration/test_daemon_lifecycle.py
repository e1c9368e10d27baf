"""The Manager with real VMMs: the default guest on the software CPU, the
Manager in-process (no HTTP: the API's tests cover that layer).

Boots are few (each costs seconds, more under load): one domain goes through
the whole lifecycle (console, suspend/resume, reboot, managed save and the
start that restores it, a snapshot, a disk write, a revert, ACPI shutdown);
another is adopted by a second Manager and then killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from pyvirt.guest import READY_LINE
from pyvirt.manager.errors import OperationInvalid
from tests.daemon_support import (
    BOOT,
    ConsoleReader,
    ensure_guest,
    guest_marks,
    manager_on,
    root_fixture,
    wait_for,
)

pytestmark = guest_marks(needs_root=False)

READY = READY_LINE.encode()


@pytest.fixture(scope="module", autouse=True)
def _guest() -> None:
    ensure_guest()


root = root_fixture("pvd")


def _state(m: Any, name: str) -> tuple[str, str]:
    d = m.get(name)
    return d["state"], d["reason"]


def _events(m: Any, name: str) -> list[str]:
    return [e["event"] for e in m.events.recent(200, kind="domain", obj=name)]


def _say(con: ConsoleReader, command: str, needle: bytes, timeout: float = 60) -> None:
    mark = con.mark()
    con.send(command.encode() + b"\n")
    con.expect(needle, timeout, since=mark)


def test_lifecycle_end_to_end(root: Path, tmp_path: Path) -> None:
    disk = root / "data.img"
    with open(disk, "wb") as f:
        f.truncate(8 << 20)
    with manager_on(root) as m:
        m.define({"name": "life", "accel": "emu", "memory": "256M", "sandbox": "off",
                  "disks": [{"path": str(disk), "format": "raw"}]})
        d = m.start("life")
        assert (d["state"], d["reason"]) == ("running", "booted")
        con = ConsoleReader(m.console_path("life"))
        try:
            con.expect(READY, BOOT)
            with pytest.raises(OperationInvalid, match=r"^domain is already running$"):
                m.start("life")
            m.suspend("life")
            assert _state(m, "life") == ("paused", "user")
            m.resume("life")
            assert _state(m, "life") == ("running", "unpaused")

            # reboot: Ctrl+Alt+Del, busybox init reboots, the VMM resets in place
            mark = con.mark()
            m.reboot("life")
            con.expect(READY, BOOT, since=mark)
            wait_for(lambda: "rebooted" in _events(m, "life"), 30, "the rebooted event")
            assert m.stats("life")["boot_count"] == 2

            # managed save: the shell's variable survives the save and the start
            _say(con, "X=42; echo set-$X", b"set-42")
        finally:
            con.close()
        task = m.tasks.wait(m.save("life"), 300)
        assert task["state"] == "done", task
        d = m.get("life")
        assert (d["state"], d["reason"], d["managed_save"]) == ("shut off", "saved", True)
        with pytest.raises(OperationInvalid, match=r"^domain is not running$"):
            m.suspend("life")
        d = m.start("life")
        assert (d["state"], d["reason"], d["managed_save"]) == ("running", "restored", False)
        con = ConsoleReader(m.console_path("life"))
        try:
            _say(con, "echo val=$X", b"val=42")

            # snapshot while running, then a file and a disk write after it
            task = m.tasks.wait(m.snapshot_create("life", "s1"), 300)
            assert task["state"] == "done", task
            assert _state(m, "life")[0] == "running"
            blk = m.block_list("life")
            assert blk[0]["source"].endswith("vda-s1.qcow2")
            _say(con, "touch /tmp/after; printf MARKER-XYZ > /dev/vda; sync; echo wrote",
                 b"\nwrote")
            m.snapshot_revert("life", "s1")
            assert _state(m, "life") == ("running", "from snapshot")
        finally:
            con.close()
        con = ConsoleReader(m.console_path("life"))
        try:
            _say(con, "ls /tmp/after 2>/dev/null || echo gone-file; "
                 "head -c 4096 /dev/vda | grep -q MARKER-XYZ && echo disk-dirty "
                 "|| echo disk-clean", b"\ngone-file", 120)
            con.expect(b"\ndisk-clean", 30)
            assert b"\ndisk-dirty" not in con.data
            assert [(s["name"], s["current"], s["memory"]) for s in m.snapshot_list("life")] \
                == [("s1", True, True)]
            m.shutdown("life", timeout=BOOT)
        finally:
            con.close()
        assert _state(m, "life") == ("shut off", "shutdown")
        # the write went to the abandoned overlay; the frozen image never saw it
        assert b"MARKER-XYZ" not in disk.read_bytes()
        events = _events(m, "life")
        for e in ("started", "suspended", "resumed", "rebooted", "saved", "snapshot-created",
                  "snapshot-reverted", "shutdown"):
            assert e in events, (e, events)


def test_adopt_after_restart_then_sigkill(root: Path) -> None:
    with manager_on(root) as m:
        m.define({"name": "keep", "accel": "emu", "memory": "256M", "sandbox": "off"})
        first = m.start("keep")
        con = ConsoleReader(m.console_path("keep"))
        try:
            con.expect(READY, BOOT)
            _say(con, "Y=7; echo y-$Y", b"y-7")
        finally:
            con.close()
    # the Manager is gone (as after kill -9 of the daemon); the VM never noticed
    with manager_on(root) as m2:
        d = m2.get("keep")
        assert (d["state"], d["pid"], d["id"]) == ("running", first["pid"], first["id"])
        con = ConsoleReader(m2.console_path("keep"))
        try:
            _say(con, "echo again-$Y", b"again-7")
        finally:
            con.close()
        m2.suspend("keep")  # controlled by the new Manager
        m2.resume("keep")
        os.kill(d["pid"], signal.SIGKILL)
        wait_for(lambda: _state(m2, "keep")[0] == "crashed", 30, "crashed")
        d = m2.get("keep")
        # the new Manager is not the VMM's parent here: no wait status, so no signal name
        assert d["reason"] == "vmm-died"
        assert d["detail"] in ("the VMM process ended without an exit record",
                               "the VMM process was killed by SIGKILL")
        assert _events(m2, "keep")[-1] == "crashed"
