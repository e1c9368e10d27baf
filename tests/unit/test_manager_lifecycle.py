"""The Manager's lifecycle logic against a fake VMM (tests/daemon_support.py:
a real process with the VMM's command line, API socket and exit file, and no
guest): states and reasons, refusals, adoption after a restart, deaths."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from pyvirt.manager.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    OperationFailed,
    OperationInvalid,
    OperationTimeout,
)
from tests.daemon_support import (
    fake_kernel_fixture,
    manager_on,
    root_fixture,
    wait_for,
)

root = root_fixture("pvm")
kernel = fake_kernel_fixture()


def _state(m: Any, name: str) -> tuple[str, str]:
    d = m.get(name)
    return d["state"], d["reason"]


def _events(m: Any, name: str) -> list[str]:
    return [e["event"] for e in m.events.recent(100, kind="domain", obj=name)]


def test_define_list_get_undefine(root: Path, kernel: str) -> None:
    with manager_on(root, fake=True) as m:
        d = m.define({"name": "web1", "kernel": kernel, "memory": "256M",
                      "description": "front"})
        assert (d["state"], d["reason"], d["id"]) == ("shut off", "unknown", None)
        assert d["memory"] == 256 << 20 and d["definition"]["description"] == "front"
        again = m.define({"name": "web1", "kernel": kernel, "cpus": 1})  # replaces
        assert again["uuid"] == d["uuid"] and again["memory"] == 512 << 20
        with pytest.raises(AlreadyExists, match="domain 'web1' already exists") as taken:
            m.define({"name": "web1", "kernel": kernel,
                      "uuid": "00000000-0000-4000-8000-000000000001"})
        assert taken.value.field == "name"  # the web wizard shows it next to the name
        with pytest.raises(InvalidArgument, match=r"^disks\[0\]\.volume: "):
            m.define({"name": "web2", "kernel": kernel, "disks": [{"volume": "nope/x"}]})
        assert [x["name"] for x in m.list_domains()] == ["web1"]
        assert m.list_domains(all=False) == []
        assert m.get(d["uuid"])["name"] == "web1"  # by uuid too
        m.undefine("web1")
        with pytest.raises(NotFound, match="domain 'web1' not found"):
            m.get("web1")
        assert _events(m, "web1") == ["defined", "defined", "undefined"]


def test_lifecycle_states_and_refusals(root: Path, kernel: str) -> None:
    with manager_on(root, fake=True) as m:
        m.define({"name": "a", "kernel": kernel})
        for verb in (m.shutdown, m.destroy, m.reboot, m.reset, m.suspend, m.resume):
            with pytest.raises(OperationInvalid, match=r"^domain is not running$"):
                verb("a")
        with pytest.raises(OperationInvalid):
            m.console_path("a")
        d = m.start("a")
        assert (d["state"], d["reason"]) == ("running", "booted") and d["id"] == 1
        assert d["pid"] and Path(d["console_socket"]).name == "console.sock"
        cfg = json.loads(Path(d["api_socket"]).with_name("config.json").read_text())
        assert cfg["console"] == {"kind": "socket", "path": d["console_socket"]}
        with pytest.raises(OperationInvalid, match=r"^domain is already running$"):
            m.start("a")
        with pytest.raises(OperationInvalid, match=r"^domain is running"):
            m.undefine("a")
        with pytest.raises(OperationInvalid, match=r"^domain is not paused$"):
            m.resume("a")
        m.suspend("a")
        assert _state(m, "a") == ("paused", "user")
        with pytest.raises(OperationInvalid, match="already paused"):
            m.suspend("a")
        with pytest.raises(OperationInvalid, match="not running"):
            m.reboot("a")
        m.resume("a")
        assert _state(m, "a") == ("running", "unpaused")
        m.reboot("a")  # the poller sees the boot count grow
        wait_for(lambda: "rebooted" in _events(m, "a"), 10, "the rebooted event")
        m.shutdown("a", timeout=10)
        assert _state(m, "a") == ("shut off", "shutdown")
        assert m.list_domains()[0]["id"] is None
        d = m.start("a")
        assert d["id"] == 2  # a new run id per start
        m.destroy("a")
        assert _state(m, "a") == ("shut off", "destroyed")
        assert _events(m, "a") == ["defined", "started", "suspended", "resumed", "rebooted",
                                   "shutdown", "started", "stopped"]


def test_shutdown_timeout_keeps_the_vm(root: Path, kernel: str) -> None:
    with manager_on(root, fake=True) as m:
        m.define({"name": "stubborn", "kernel": kernel, "cmdline": "ignore-acpi"})
        m.start("stubborn")
        t = time.monotonic()
        with pytest.raises(OperationTimeout,
                           match=r"^domain 'stubborn' did not shut down within 0.5 s$"):
            m.shutdown("stubborn", timeout=0.5)
        assert time.monotonic() - t < 5
        assert _state(m, "stubborn") == ("running", "booted")
        m.destroy("stubborn")
        assert _state(m, "stubborn") == ("shut off", "destroyed")


def test_failed_start_names_the_vmm_error(root: Path, kernel: str) -> None:
    with manager_on(root, fake=True) as m:
        m.define({"name": "bad", "kernel": kernel, "cmdline": "fail-setup"})
        with pytest.raises(OperationFailed) as info:
            m.start("bad")
        assert str(info.value) == ("start of 'bad' failed: kernel: /nonexistent/vmlinuz: "
                                   "no such file")
        d = m.get("bad")
        assert (d["state"], d["reason"]) == ("shut off", "failed") and d["pid"] is None


def test_sigkill_marks_crashed(root: Path, kernel: str) -> None:
    with manager_on(root, fake=True) as m:
        m.define({"name": "k", "kernel": kernel, "cmdline": "no-exit-file"})
        pid = m.start("k")["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: _state(m, "k")[0] == "crashed", 10, "crashed")
        d = m.get("k")
        assert d["reason"] == "vmm-died"
        assert d["detail"] == "the VMM process was killed by SIGKILL"
        assert _events(m, "k")[-1] == "crashed"
        m.start("k")  # a crashed domain starts again
        m.destroy("k")


def test_restart_adopts_running_and_records_dead(root: Path, kernel: str) -> None:
    with manager_on(root, fake=True) as m:
        for n in ("stay", "die", "off"):
            m.define({"name": n, "kernel": kernel})
        stay = m.start("stay")
        die = m.start("die")
        m.start("off")
        m.suspend("off")
        # the daemon goes away; VMs do not notice
    os.kill(die["pid"], signal.SIGKILL)
    with manager_on(root, fake=True) as m2:
        d = m2.get("stay")
        assert (d["state"], d["pid"], d["id"]) == ("running", stay["pid"], stay["id"])
        assert _state(m2, "off") == ("paused", "user")
        assert _state(m2, "die")[0] == "crashed"
        m2.resume("off")  # controlled after adoption
        m2.shutdown("stay", timeout=10)
        assert _state(m2, "stay") == ("shut off", "shutdown")
        m2.destroy("off")
        # a pid whose start time differs is not ours
        m2.define({"name": "ghost", "kernel": kernel})
        uuid = m2.get("ghost")["uuid"]
        with m2.store.write() as db:
            db.execute("UPDATE runstate SET state = 'running', reason = 'booted', pid = ?, "
                       "start_ticks = 1, exit_file = ? WHERE uuid = ?",
                       (os.getpid(), str(root / "none.json"), uuid))
    with manager_on(root, fake=True) as m3:
        assert _state(m3, "ghost")[0] == "crashed"
        assert os.getpid()  # still here: nothing was signalled


def test_managed_save_and_restore(root: Path, kernel: str) -> None:
    with manager_on(root, fake=True) as m:
        m.define({"name": "s", "kernel": kernel})
        m.start("s")
        tid = m.save("s")
        t = m.tasks.wait(tid, 30)
        assert t["state"] == "done", t
        d = m.get("s")
        assert (d["state"], d["reason"], d["managed_save"]) == ("shut off", "saved", True)
        d = m.start("s")
        assert (d["state"], d["reason"], d["managed_save"]) == ("running", "restored", False)
        assert "saved" in _events(m, "s")
        out = root / "out"
        with pytest.raises(InvalidArgument, match=r"^path: must be an absolute path"):
            m.save("s", "relative")
        t = m.tasks.wait(m.save("s", str(out)), 30)
        assert t["state"] == "done" and (out / "manifest.json").is_file()
        d = m.restore(str(out))
        assert (d["state"], d["reason"]) == ("running", "restored")
        m.destroy("s")
        with pytest.raises(OperationInvalid):
            m.save("s")
        # a managed save thrown away: the next start boots
        m.start("s")
        assert m.tasks.wait(m.save("s"), 30)["state"] == "done"
        m.managed_save_remove("s")
        with pytest.raises(OperationInvalid, match="has no managed save image"):
            m.managed_save_remove("s")
        d = m.start("s")
        assert (d["reason"], d["managed_save"]) == ("booted", False)
        m.destroy("s")


def test_snapshots_of_a_shut_off_domain(root: Path, kernel: str, tmp_path: Path) -> None:
    from pyvirt.disk.raw import create_raw

    img = tmp_path / "d.img"
    create_raw(img, 1 << 20)
    with manager_on(root, fake=True) as m:
        m.define({"name": "d", "kernel": kernel, "disks": [{"path": str(img),
                                                            "format": "raw"}]})
        t = m.tasks.wait(m.snapshot_create("d", "s1", "first"), 30)
        assert t["state"] == "done", t
        top = m.get("d")["definition"]["disks"][0]
        assert top["format"] == "qcow2" and top["path"].endswith("vda-s1.qcow2")
        m.tasks.wait(m.snapshot_create("d", "s2"), 30)
        with pytest.raises(AlreadyExists):
            m.snapshot_create("d", "s2")
        snaps = m.snapshot_list("d")
        assert [(s["name"], s["parent"], s["current"], s["memory"]) for s in snaps] == [
            ("s1", None, False, False), ("s2", "s1", True, False)]
        m.snapshot_revert("d", "s1")
        assert _state(m, "d") == ("shut off", "from snapshot")
        assert [s["current"] for s in m.snapshot_list("d")] == [True, False]
        m.snapshot_delete("d", "s1")
        assert [(s["name"], s["parent"]) for s in m.snapshot_list("d")] == [("s2", None)]
        with pytest.raises(NotFound, match="snapshot 's1' of domain 'd' not found"):
            m.snapshot_revert("d", "s1")
        assert m.block_list("d")[0]["target"] == "vda"


def test_vmm_command_lines(tmp_path: Path) -> None:
    """Boot: the config file; restore: the snapshot with this start's console,
    disks (a revert's overlays) and TAPs (new names at every start)."""
    from pyvirt.manager.manager import Manager
    from pyvirt.manager.paths import DaemonPaths
    from pyvirt.vmm.config import VmConfig

    m = Manager(DaemonPaths.for_root(tmp_path))
    cfg = VmConfig.from_dict({"kernel": "/k", "name": "n", "disks": [
        {"path": "/o.qcow2", "format": "qcow2", "serial": "s1"}],
        "nics": [{"kind": "tap", "tap": "pvt0011aabb"}, {"kind": "user"}]})
    common = dict(config_path=tmp_path / "c.json", api=tmp_path / "a.sock",
                  console=tmp_path / "con.sock", exit_file=tmp_path / "e.json", root=tmp_path)
    boot = m._vmm_argv(cfg, restore=None, resume=True, disks=False, nics=True, **common)
    assert boot[1:] == ["-m", "pyvirt", "run", "--config", str(tmp_path / "c.json"),
                        "--api-socket", str(tmp_path / "a.sock"),
                        "--exit-file", str(tmp_path / "e.json"), "--snapshot-root",
                        str(tmp_path)]
    assert "--net" not in boot and "--restore" not in boot
    back = m._vmm_argv(cfg, restore=tmp_path / "snap", resume=False, disks=True, nics=True,
                       **common)
    i = back.index("--restore")
    assert back[i + 1:i + 4] == [str(tmp_path / "snap"), "--console",
                                 f"socket:{tmp_path / 'con.sock'}"]
    assert "--resume" not in back
    assert back[back.index("--disk") + 1] == ("path=/o.qcow2,readonly=off,cache=writeback,"
                                             "discard=off,format=qcow2,serial=s1")
    nets = [back[j + 1] for j, a in enumerate(back) if a == "--net"]
    assert nets == [f"tap=pvt0011aabb,mac={cfg.nics[0].mac}", f"user,mac={cfg.nics[1].mac}"]


def test_vmm_that_cannot_be_executed(root: Path, kernel: str) -> None:
    """An interpreter the VMM's user cannot run is one line, not a traceback."""
    with manager_on(root, fake=True) as m:
        m.define({"name": "x", "kernel": kernel})
        m.vmm_command = [str(root / "no-such-python")]
        with pytest.raises(OperationFailed) as info:
            m.start("x")
        assert str(info.value) == (f"start of 'x' failed: cannot run {root}/no-such-python: "
                                   "No such file or directory")
        assert _state(m, "x") == ("shut off", "unknown")


def test_autostart_once_per_host_boot(root: Path, kernel: str) -> None:
    with manager_on(root, fake=True) as m:
        m.define({"name": "auto", "kernel": kernel, "autostart": True})
        m.define({"name": "manual", "kernel": kernel})
        assert _state(m, "auto") == ("shut off", "unknown")  # not at define time
    (root / "run" / "autostarted").unlink()  # as after a reboot: /run is a tmpfs
    with manager_on(root, fake=True) as m:
        assert _state(m, "auto") == ("running", "booted")
        assert _state(m, "manual")[0] == "shut off"
        m.destroy("auto")
    with manager_on(root, fake=True) as m:  # a daemon restart, same boot
        assert _state(m, "auto") == ("shut off", "destroyed")
        m.set_autostart("auto", False)
        assert not m.get("auto")["autostart"]
