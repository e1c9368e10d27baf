"""Monitoring, clone and disk/NIC edits through a real daemon (`pyvirt daemon
--no-networks`) and the default guest on the software CPU: /v1/host, the
history and the live stream while a VM boots, a disk added and grown on a
shut-off VM that the guest then sees, a clone of a qcow2 volume disk that
boots with the source's data, and the stream ending with the daemon.

Two boots: the source VM and its clone.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from pyvirt.client import Client, ClientError
from pyvirt.guest import READY_LINE
from tests.daemon_support import (
    BOOT,
    ConsoleReader,
    ensure_guest,
    guest_marks,
    root_fixture,
    spawn_daemon,
    stop_daemon,
    wait_for,
)

pytestmark = guest_marks(needs_root=False)

READY = READY_LINE.encode()


@pytest.fixture(scope="module", autouse=True)
def _guest() -> None:
    ensure_guest()


root = root_fixture("pvo")


class Stream:
    """``GET /v1/metrics/stream`` read on a thread: frames in ``frames``, None at its end."""

    def __init__(self, sock: Path) -> None:
        self.frames: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._client = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)),
                                    timeout=httpx.Timeout(60.0))
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with self._client.stream("GET", "http://pyvirtd/v1/metrics/stream") as resp:
                assert resp.status_code == 200
                assert resp.headers["content-type"].startswith("text/event-stream")
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        self.frames.put(json.loads(line[6:]))
        except httpx.HTTPError:
            pass
        finally:
            self.frames.put(None)

    def frame_with(self, name: str, timeout: float = 30) -> dict[str, Any]:
        while True:
            f = self.frames.get(timeout=timeout)
            assert f is not None, "the stream ended"
            if name in f["domains"]:
                return f

    def ended(self, timeout: float) -> bool:
        try:
            while True:
                if self.frames.get(timeout=timeout) is None:
                    return True
        except queue.Empty:
            return False

    def close(self) -> None:
        self._client.close()


def _say(con: ConsoleReader, command: str, needle: bytes, timeout: float = 60) -> None:
    mark = con.mark()
    con.send(command.encode() + b"\n")
    con.expect(needle, timeout, since=mark)


def _boot(c: Client, name: str) -> ConsoleReader:
    c.start(name)
    con = ConsoleReader(Path(c.domain(name)["console_socket"]))
    con.expect(READY, BOOT)
    return con


def test_monitoring_clone_and_disks(root: Path) -> None:
    proc = spawn_daemon(root, extra=["--no-networks"])
    sock = root / "run" / "pyvirtd.sock"
    stream: Stream | None = None
    try:
        with Client(f"unix://{sock}", timeout=180) as c:
            host = c.host()
            assert host["cpus"] == os.cpu_count() and host["hostname"]
            assert 0 < host["memory_available_bytes"] <= host["memory_bytes"]
            assert 0 < host["disk"]["free_bytes"] <= host["disk"]["total_bytes"]
            assert host["disk"]["path"] == str(root / "state")
            assert host["limits"]["max_vcpus"] == os.cpu_count()
            assert 0 < host["limits"]["max_memory_mib"] < host["memory_bytes"] >> 20
            assert len(host["load"]) == 3 and host["uptime_s"] > 0

            c.wait_task(c.vol_create("default", "src.qcow2", 16 << 20, "qcow2"), timeout=60)
            c.define({"name": "mon1", "accel": "emu", "memory": "256M",
                      "disks": [{"volume": "default/src.qcow2"}]})
            assert c.host()["domains"]["shut off"] == 1
            # a disk added and grown while shut off: the guest sees it at start
            added = c.disk_add("mon1", "default", size_bytes=4 << 20)
            assert added["index"] == 1 and added["applies"] == "now"
            with pytest.raises(ClientError) as exc:
                c.disk_resize("mon1", 1, 1 << 20)
            assert exc.value.status == 400 and exc.value.field == "size_bytes"
            c.disk_resize("mon1", 1, 8 << 20)
            # NICs: this daemon has no networks; the error names the field
            with pytest.raises(ClientError) as exc:
                c.iface_add("mon1", "default")
            assert exc.value.status == 400 and exc.value.field == "network"
            with pytest.raises(ClientError) as exc:
                c.iface_remove("mon1", 0)
            assert exc.value.status == 404

            stream = Stream(sock)
            con = _boot(c, "mon1")
            try:
                frame = stream.frame_with("mon1")
                s = frame["domains"]["mon1"]
                assert s["rss"] > 16 << 20 and frame["host"]["mem_total"] > 0
                wait_for(lambda: len(c.metrics_history("mon1")["domains"]["mon1"]) >= 3, 60,
                         "three samples of mon1")
                hist = c.metrics_history("mon1")
                assert hist["interval_s"] == 2 and len(hist["host"]) >= 3
                samples = hist["domains"]["mon1"]
                assert any(x["cpu"] > 0 for x in samples), samples  # it booted meanwhile
                assert samples[-1]["t"] > samples[0]["t"]
                with pytest.raises(ClientError) as exc:
                    c.metrics_history("nope")
                assert exc.value.status == 404
                assert c.host()["domains"]["running"] == 1
                # the added disk, at its new size (512-byte sectors); data for the clone
                _say(con, "cat /sys/block/vdb/size", b"16384")
                _say(con, "printf CLONE-ME-42 > /dev/vda; sync; echo done", b"\ndone")
                # the guest's disk writes show as a rate
                _say(con, "dd if=/dev/vda of=/dev/null bs=64k 2>/dev/null; echo read",
                     b"\nread")
                wait_for(lambda: any(x["disk_rd"] > 0 for x in
                                     c.metrics_history("mon1")["domains"]["mon1"]), 30,
                         "a disk read rate")
                with pytest.raises(ClientError) as exc:  # clone: shut-off sources only
                    c.clone("mon1", "mon2")
                assert exc.value.status == 409
                running = c.disk_add("mon1", "default", size_bytes=1 << 20)
                assert running["applies"] == "next-start"
            finally:
                con.close()
            c.destroy("mon1")
            c.disk_remove("mon1", 2, remove_storage=True)
            assert "mon1-disk2.qcow2" not in {v["name"] for v in c.vol_list("default")}

            t = c.wait_task(c.clone("mon1", "mon2", "a copy"), timeout=300)
            assert t["result"] == {"domain": "mon2", "source": "mon1"}
            d = c.domain("mon2")
            assert d["uuid"] != c.domain("mon1")["uuid"] and d["description"] == "a copy"
            assert [x["volume"] for x in d["definition"]["disks"]] == [
                "default/mon2-0.qcow2", "default/mon2-1.qcow2"]
            vol = c.vol_info("default", "mon2-0.qcow2")
            assert vol["format"] == "qcow2"
            check = subprocess.run(["qemu-img", "check", "--output=json", vol["path"]],
                                   capture_output=True, text=True)
            assert check.returncode == 0, check.stdout + check.stderr
            assert json.loads(check.stdout).get("corruptions", 0) == 0
            con = _boot(c, "mon2")
            try:
                _say(con, "head -c 11 /dev/vda; echo", b"CLONE-ME-42")
                _say(con, "cat /sys/block/vdb/size", b"16384")
            finally:
                con.close()
            c.destroy("mon2")
            c.undefine("mon2", remove_storage=True)
            wait_for(lambda: "mon2" not in c.metrics_history()["domains"], 10,
                     "mon2's history dropped")
        # the daemon stops: the stream ends (it would otherwise hold the shutdown)
        stop_daemon(proc)
        assert proc.returncode == 0
        assert stream.ended(15)
    finally:
        if stream is not None:
            stream.close()
        stop_daemon(proc)
