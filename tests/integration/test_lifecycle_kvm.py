"""The controllable VM on the KVM backend, process to process: the test guest
counts in memory while its LAPIC timer ticks every millisecond; pause,
snapshot, kill -9, restore in a new process, snapshot again. The counters
continue (they are read from the snapshots' memory files), the guest's TSC
never went backwards, and every API answer is valid for the OpenAPI document.
"""

from __future__ import annotations

import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.api_support import checked_client
from tests.conftest import pyvirt_cmd, read_until

pytestmark = [pytest.mark.kvm]

COUNT_AREA = 0x30000
COUNT_MAGIC = 0x544E554F43564B50


def counters(snap: Path) -> dict[str, int]:
    with open(snap / "memory.bin", "rb") as f:
        f.seek(COUNT_AREA)
        magic, counter, ticks, last_tsc, _max_gap, backwards = struct.unpack("<6Q", f.read(48))
    assert magic == COUNT_MAGIC, "the count area is not in the snapshot's memory"
    return {"counter": counter, "ticks": ticks, "last_tsc": last_tsc, "backwards": backwards}


def start(args: list[str], sock: Path) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(pyvirt_cmd("run", "--api-socket", str(sock), *args),
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not sock.exists() and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.01)
    assert sock.exists(), p.communicate()[0][-2000:]
    return p


def test_kvm_snapshot_restore_across_processes(test_guest: Path, tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    p = start(["--accel", "kvm", "--kernel", str(test_guest), "--memory", "128M",
               "--cmdline", "test=count"], sock)
    procs = [p]
    try:
        assert p.stdout is not None
        assert b"count: running" in read_until(p.stdout.fileno(), b"count: running", 30)
        api = checked_client(sock)
        time.sleep(0.5)
        api.pause()
        info = api.info()
        assert info["state"] == "paused" and info["backend"] == "kvm"
        snap1 = tmp_path / "snap1"
        api.snapshot(str(snap1))
        first = counters(snap1)
        assert first["ticks"] > 50 and first["counter"] > 0
        api.close()
        p.send_signal(signal.SIGKILL)
        p.wait()

        sock2 = tmp_path / "b.sock"
        r = start(["--restore", str(snap1), "--resume"], sock2)
        procs.append(r)
        api2 = checked_client(sock2)
        assert api2.info()["state"] == "running"
        time.sleep(1.0)
        api2.pause()
        snap2 = tmp_path / "snap2"
        api2.snapshot(str(snap2))
        second = counters(snap2)
        # counted on from where it stopped: no reboot (that would restart at 0)
        assert second["counter"] > first["counter"]
        assert second["ticks"] > first["ticks"] + 100, (first, second)
        assert second["backwards"] == 0, "the guest's TSC went backwards"
        assert second["last_tsc"] > first["last_tsc"]
        api2.stop()
        assert r.wait(30) == 0
        api2.close()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
