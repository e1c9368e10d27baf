"""The Manager's clone, disk and NIC edits, and the poller feeding the monitor,
against a fake VMM (tests/daemon_support.py) and real pools on disk."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pyvirt.manager.errors import AlreadyExists, InvalidArgument, NotFound, OperationInvalid
from tests.daemon_support import (
    fake_kernel_fixture,
    manager_on,
    root_fixture,
    wait_for,
)

root = root_fixture("pvb")
kernel = fake_kernel_fixture()


def volume(m: Any, name: str, size: int = 1 << 20, fmt: str = "qcow2") -> None:
    t = m.tasks.wait(m.storage.vol_create("default", name, size, fmt), timeout=30)
    assert t["state"] == "done", t


def qemu_img(*args: str) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", *args, "--output=json"], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out) if out.strip() else {}


class FakeNetworks:
    """Networks that exist (the NIC edits only check that they do)."""

    def info(self, name: str) -> dict[str, Any]:
        if name != "default":
            raise NotFound(f"network '{name}' not found")
        return {"name": name}

    def supervise(self) -> None:
        pass


def test_clone_copies_volumes_and_gets_new_identity(root: Path, kernel: str,
                                                    tmp_path: Path) -> None:
    img = tmp_path / "data.raw"
    img.write_bytes(b"D" * 4096)
    with manager_on(root, fake=True) as m:
        volume(m, "a.qcow2")
        pool_dir = Path(m.storage.pool_info("default")["path"])
        subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 64k", str(pool_dir / "a.qcow2")],
                       check=True, capture_output=True)
        src = m.define({"name": "a", "kernel": kernel, "memory": "64M",
                        "disks": [{"volume": "default/a.qcow2"},
                                  {"path": str(img), "format": "raw"}],
                        "nics": [{"kind": "user", "mac": "52:54:00:aa:bb:cc"}]})
        with pytest.raises(InvalidArgument) as exc:  # a path disk: administrators only
            m.clone("a", "b", allow_paths=False)
        assert exc.value.field == "disks[1]"
        with pytest.raises(InvalidArgument) as exc:
            m.clone("a", "bad name")
        assert exc.value.field == "name"
        with pytest.raises(AlreadyExists):
            m.clone("a", "a")
        granted: list[str] = []
        t = m.tasks.wait(m.clone("a", "b", "the copy", on_defined=granted.append), timeout=60)
        assert t["state"] == "done", t
        assert t["result"] == {"domain": "b", "source": "a"} and granted == ["b"]
        b = m.get("b")
        assert b["uuid"] != src["uuid"] and b["description"] == "the copy"
        disks = b["definition"]["disks"]
        assert disks[0] == {"volume": "default/b-0.qcow2"}
        assert disks[1]["path"] == str(tmp_path / "b-1.raw")
        assert (tmp_path / "b-1.raw").read_bytes() == b"D" * 4096
        clone_vol = pool_dir / "b-0.qcow2"
        assert qemu_img("info", str(clone_vol))["format"] == "qcow2"
        assert qemu_img("check", str(clone_vol)).get("corruptions", 0) == 0
        cmp = subprocess.run(["qemu-img", "compare", str(pool_dir / "a.qcow2"), str(clone_vol)],
                             capture_output=True, text=True)
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr
        macs = [n["mac"] for n in m.iface_list("a")], [n["mac"] for n in m.iface_list("b")]
        assert macs[0] == ["52:54:00:aa:bb:cc"] and macs[1][0] != macs[0][0]
        assert "cloned" in [e["event"] for e in m.events.recent(50, obj="a")]
        # the source runs: refused; a failed copy leaves no volume behind
        m.start("a")
        with pytest.raises(OperationInvalid):
            m.clone("a", "c")
        m.destroy("a")
        (tmp_path / "c-1.raw").write_bytes(b"")
        with pytest.raises(AlreadyExists):
            m.clone("a", "c")
        assert not (pool_dir / "c-0.qcow2").exists()


def test_disk_add_remove_resize(root: Path, kernel: str) -> None:
    with manager_on(root, fake=True) as m:
        m.define({"name": "a", "kernel": kernel, "memory": "64M"})
        got = m.disk_add("a", pool="default", size_bytes=1 << 30)
        assert got == {"index": 0, "target": "vda", "volume": "default/a-disk0.qcow2",
                       "applies": "now"}
        path = Path(m.storage.vol_info("default", "a-disk0.qcow2")["path"])
        assert qemu_img("info", str(path))["virtual-size"] == 1 << 30
        volume(m, "spare.raw", fmt="raw")
        assert m.disk_add("a", pool="default", volume="spare.raw")["index"] == 1
        with pytest.raises(InvalidArgument) as exc:  # already used (by this domain)
            m.disk_add("a", pool="default", volume="spare.raw")
        assert exc.value.field == "volume"
        with pytest.raises(InvalidArgument) as exc:
            m.disk_add("a", pool="default", volume="none.raw")
        assert exc.value.field == "volume"
        with pytest.raises(InvalidArgument) as exc:
            m.disk_add("a", pool="nopool", size_bytes=1 << 20)
        assert exc.value.field == "pool"
        for bad in ("../etc/passwd", "/etc/passwd", "x\0y", "a" * 300):
            with pytest.raises(InvalidArgument) as exc:
                m.disk_add("a", pool="default", volume=bad)
            assert exc.value.field == "volume"
        with pytest.raises(InvalidArgument) as exc:
            m.disk_add("a", pool="../x", volume="spare.raw")
        assert exc.value.field == "pool"
        with pytest.raises(InvalidArgument) as exc:
            m.disk_add("a", pool="default")
        assert exc.value.field == "size_bytes"
        m.disk_resize("a", 0, 2 << 30, allow_paths=False)  # a volume: anyone's
        assert qemu_img("info", str(path))["virtual-size"] == 2 << 30
        with pytest.raises(InvalidArgument) as exc:
            m.disk_resize("a", 0, 1 << 30)
        assert exc.value.field == "size_bytes"
        with pytest.raises(NotFound):
            m.disk_resize("a", 5, 1 << 30)
        # running: an edit applies at the next start; a resize and a removal of
        # storage wait until it stops
        m.start("a")
        got = m.disk_add("a", pool="default", size_bytes=1 << 20)
        assert got["applies"] == "next-start" and got["index"] == 2
        assert len(m.get("a")["config"]["disks"]) == 2  # the running VM's own
        with pytest.raises(OperationInvalid):
            m.disk_resize("a", 0, 3 << 30)
        with pytest.raises(OperationInvalid):
            m.disk_remove("a", 2, remove_storage=True)
        m.destroy("a")
        m.disk_remove("a", 1)  # the definition only: the volume stays
        assert m.storage.vol_info("default", "spare.raw")
        m.disk_remove("a", 0, remove_storage=True)
        with pytest.raises(NotFound):
            m.storage.vol_info("default", "a-disk0.qcow2")
        assert [d["volume"] for d in m.get("a")["definition"]["disks"]] == [
            "default/a-disk2.qcow2"]
        img = root / "host.raw"
        img.write_bytes(b"\0" * 4096)
        m.define({**m.get("a")["definition"], "disks": [
            *m.get("a")["definition"]["disks"], {"path": str(img), "format": "raw"}]})
        with pytest.raises(InvalidArgument) as exc:
            m.disk_resize("a", 1, 8192, allow_paths=False)
        assert exc.value.field == "disks[1]" and img.stat().st_size == 4096
        m.disk_resize("a", 1, 8192)
        assert img.stat().st_size == 8192
        m.disk_remove("a", 1, remove_storage=True)
        assert img.exists()  # a host file is never deleted
        with pytest.raises(NotFound):
            m.disk_remove("a", 3)
        events = [e["event"] for e in m.events.recent(100, obj="a")]
        assert {"disk-added", "disk-removed", "disk-resized"} <= set(events)
        # snapshots record disks by index: a removal would shift them
        m.tasks.wait(m.snapshot_create("a", "s1"), timeout=30)
        with pytest.raises(OperationInvalid):
            m.disk_remove("a", 0)


def test_nic_add_remove_keeps_the_others_macs(root: Path, kernel: str) -> None:
    with manager_on(root, fake=True) as m:
        m.define({"name": "a", "kernel": kernel, "memory": "64M",
                  "nics": [{"kind": "user"}, {"kind": "user"}]})
        with pytest.raises(InvalidArgument) as exc:  # this daemon has no networks
            m.iface_add("a", network="default")
        assert exc.value.field == "network"
        m.networks = FakeNetworks()
        before = [n["mac"] for n in m.iface_list("a")]
        m.iface_remove("a", 0)
        assert [n["mac"] for n in m.iface_list("a")] == [before[1]]  # no MAC moved
        got = m.iface_add("a", network="default", mac="52:54:00:12:34:56")
        assert got == {"index": 1, "mac": "52:54:00:12:34:56", "applies": "now"}
        with pytest.raises(InvalidArgument) as exc:
            m.iface_add("a", network="nonet")
        assert exc.value.field == "network"
        with pytest.raises(InvalidArgument) as exc:
            m.iface_add("a", network="default", mac="not-a-mac")
        assert exc.value.field == "mac"
        with pytest.raises(InvalidArgument) as exc:
            m.iface_add("a", network="default", model="e1000")
        assert exc.value.field == "model"
        m.iface_add("a", network="default")
        m.iface_remove("a", 1)
        assert m.iface_list("a")[0]["mac"] == before[1]
        assert [n["source"] for n in m.iface_list("a")] == ["-", "default"]
        with pytest.raises(NotFound):
            m.iface_remove("a", 7)
        m.networks = None


def test_poller_samples_running_vms_and_drops_undefined(root: Path, kernel: str) -> None:
    with manager_on(root, fake=True) as m:
        m.define({"name": "a", "kernel": kernel, "memory": "64M"})
        sub = m.monitor.subscribe()
        m.start("a")
        wait_for(lambda: len(m.metrics_history()["domains"].get("a", [])) >= 2, 30,
                 "two samples of a")
        frame = None
        while frame is None or "a" not in frame["domains"]:
            frame = sub.get(timeout=10)
            assert frame is not None
        s = frame["domains"]["a"]
        assert s["rss"] > 0 and s["cpu"] >= 0 and s["disk_rd"] == 0
        h = m.metrics_history(domain="a")
        assert set(h["domains"]) == {"a"} and h["host"] and h["interval_s"] == 2.0
        assert m.metrics_history(visible={"other"}, domain="a")["domains"] == {}
        with pytest.raises(NotFound):
            m.metrics_history(domain="nope")
        info = m.host_info()
        assert info["domains"]["running"] == 1 and info["cpus"] == os.cpu_count()
        assert 0 < info["limits"]["max_memory_mib"] < info["memory_bytes"] >> 20
        # this host's /dev/kvm is PVM or out of the VM user's reach: auto is the
        # software CPU, which runs one vCPU
        lim = info["limits"]
        assert lim["max_vcpus_by_accel"]["emu"] == 1
        assert lim["max_vcpus_by_accel"]["auto"] == lim["max_vcpus_by_accel"][lim["accel_auto"]]
        from pyvirt.hypervisor import choose, probe_host
        if choose("auto", probe_host()).name == "emu":
            assert lim["accel_auto"] == "emu"
        assert m.host_info(visible=set())["domains"]["running"] == 0
        m.destroy("a")
        m.undefine("a")
        assert m.metrics_history()["domains"] == {} and m.monitor.tracked() == 0
        sub.close()


def test_clone_after_a_snapshot_copies_the_overlay_into_a_volume(root: Path,
                                                                 kernel: str) -> None:
    """A snapshot moves a volume disk onto an overlay in the domain's directory (a
    path disk the daemon made): a clone by anyone flattens it into a new volume."""
    with manager_on(root, fake=True) as m:
        volume(m, "a.qcow2")
        pool_dir = Path(m.storage.pool_info("default")["path"])
        subprocess.run(["qemu-io", "-c", "write -P 0x11 0 64k", str(pool_dir / "a.qcow2")],
                       check=True, capture_output=True)
        m.define({"name": "a", "kernel": kernel, "memory": "64M",
                  "disks": [{"volume": "default/a.qcow2", "serial": "s1"}]})
        assert m.tasks.wait(m.snapshot_create("a", "s1"), timeout=30)["state"] == "done"
        overlay = m.get("a")["definition"]["disks"][0]["path"]
        subprocess.run(["qemu-io", "-c", "write -P 0x22 4096 4k", overlay],
                       check=True, capture_output=True)
        t = m.tasks.wait(m.clone("a", "b", allow_paths=False), timeout=60)
        assert t["state"] == "done", t
        assert m.get("b")["definition"]["disks"] == [{"volume": "default/b-0.qcow2",
                                                      "serial": "s1"}]
        new = pool_dir / "b-0.qcow2"
        assert qemu_img("info", str(new)).get("backing-filename") is None  # flattened
        cmp = subprocess.run(["qemu-img", "compare", overlay, str(new)],
                             capture_output=True, text=True)
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr
        # resizing: the daemon's overlay for anyone, a host path for administrators
        m.disk_resize("a", 0, 2 << 20, allow_paths=False)
        assert qemu_img("info", overlay)["virtual-size"] == 2 << 20
