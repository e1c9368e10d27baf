"""The sampler (pyvirt.manager.monitor) over a fake /proc: host CPU and memory,
per-VM CPU and byte rates, a VM restarted (counters reset, a new process), the
rings' bounds, and a subscriber that does not keep up."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from pyvirt.manager import monitor as mon
from pyvirt.manager.monitor import (
    HISTORY,
    QUEUE,
    Monitor,
    parse_cpu_line,
    parse_meminfo,
    parse_pid_stat,
    rates_from_metrics,
)

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeProc:
    """A /proc with the files the sampler reads."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.host(busy=0, idle=0)
        (root / "meminfo").write_text("MemTotal:  4000000 kB\nMemFree:  100 kB\n"
                                      "MemAvailable:  1000000 kB\n")

    def host(self, busy: int, idle: int) -> None:
        # user nice system idle iowait irq softirq steal guest guest_nice
        (self.root / "stat").write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 2 3 4\n")

    def vmm(self, pid: int, ticks: int, start: int = 500, rss_pages: int = 1000) -> None:
        d = self.root / str(pid)
        d.mkdir(exist_ok=True)
        rest = ["S"] + ["0"] * 10 + [str(ticks - ticks // 2), str(ticks // 2)] + ["0"] * 6 \
            + [str(start)] + ["0"] * 20
        (d / "stat").write_text(f"{pid} (python3 (pyvirt) x) " + " ".join(rest) + "\n")
        (d / "statm").write_text(f"5000 {rss_pages} 100 1 0 200 0\n")

    def gone(self, pid: int) -> None:
        for f in (self.root / str(pid)).iterdir():
            f.unlink()
        (self.root / str(pid)).rmdir()


def metrics(rd: float = 0, wr: float = 0, rx: float = 0, tx: float = 0
            ) -> dict[str, list[tuple[dict[str, str], float]]]:
    """A VMM's samples: one disk, one NIC, and a console and vsock whose byte
    counters must not count as the network's."""
    return {
        "pyvirt_device_bytes_read_total": [({"device": "virtio-blk-vda"}, rd)],
        "pyvirt_device_bytes_written_total": [({"device": "virtio-blk-vda"}, wr)],
        "pyvirt_device_rx_bytes_total": [({"device": "virtio-net-0"}, rx),
                                         ({"device": "virtio-console"}, 1e9)],
        "pyvirt_device_tx_bytes_total": [({"device": "virtio-net-0"}, tx),
                                         ({"device": "virtio-vsock"}, 1e9)],
    }


@pytest.fixture
def env(tmp_path: Path) -> tuple[Monitor, FakeProc, Clock]:
    proc = tmp_path / "proc"
    proc.mkdir()
    clock = Clock()
    return Monitor(tmp_path, proc=proc, clock=clock), FakeProc(proc), clock


def one_pass(m: Monitor, clock: Clock, dt: float, *doms: tuple[str, int, Any]
             ) -> dict[str, Any]:
    clock.now += dt
    m.begin()
    for name, pid, samples in doms:
        m.domain("u-" + name, name, pid, samples)
    frame = m.end({"u-" + n: n for n, _p, _s in doms})
    assert frame is not None
    return frame


def test_parsers() -> None:
    assert parse_cpu_line("cpu  10 2 3 80 5 0 0 0 7 0\n") == (15, 100)
    assert parse_meminfo("MemTotal: 2 kB\nMemAvailable: 1 kB\n") == (2048, 1024)
    assert parse_meminfo("MemTotal: 2 kB\nMemFree: 1 kB\n") == (2048, 1024)  # old kernels
    text = "42 (a) b) c) S " + " ".join(str(i) for i in range(4, 60))
    assert parse_pid_stat(text) == (14 + 15, 22)  # utime + stime, starttime
    with pytest.raises(ValueError):
        parse_cpu_line("intr 5\n")
    assert rates_from_metrics(None) == {"disk_rd": 0, "disk_wr": 0, "net_rx": 0, "net_tx": 0}


def test_host_cpu_memory_disk(env: tuple[Monitor, FakeProc, Clock]) -> None:
    m, proc, clock = env
    first = one_pass(m, clock, 2)["host"]
    assert first["cpu"] == 0.0  # no previous sample yet
    assert first["mem_total"] == 4000000 * 1024
    assert first["mem_used"] == 3000000 * 1024
    st = os.statvfs(m.disk_path)
    assert first["disk_total"] == st.f_blocks * st.f_frsize > 0
    proc.host(busy=30, idle=70)
    assert one_pass(m, clock, 2)["host"]["cpu"] == 0.3
    proc.host(busy=130, idle=70)  # all busy
    assert one_pass(m, clock, 2)["host"]["cpu"] == 1.0


def test_domain_cpu_and_rates(env: tuple[Monitor, FakeProc, Clock]) -> None:
    m, proc, clock = env
    proc.vmm(7, ticks=0)
    s = one_pass(m, clock, 2, ("a", 7, metrics()))["domains"]["a"]
    assert s["cpu"] == 0 and s["rss"] == 1000 * PAGE  # the first sample is the baseline
    proc.vmm(7, ticks=TICK)  # one second of CPU in two seconds
    s = one_pass(m, clock, 2, ("a", 7, metrics(rd=4096, wr=2048, rx=1000, tx=500)))["domains"]["a"]
    assert s["cpu"] == 0.5
    assert (s["disk_rd"], s["disk_wr"], s["net_rx"], s["net_tx"]) == (2048, 1024, 500, 250)
    # the VMM did not answer this pass: no rates, and the baseline is kept
    proc.vmm(7, ticks=2 * TICK)
    s = one_pass(m, clock, 1, ("a", 7, None))["domains"]["a"]
    assert s["cpu"] == 1.0 and s["disk_rd"] == 0
    s = one_pass(m, clock, 1, ("a", 7, metrics(rd=4096 + 300, wr=2048, rx=1000, tx=500)))
    assert s["domains"]["a"]["disk_rd"] == 150  # over the 2 s since the last answer's counters
    # a VM first seen while its VMM does not answer: its first answer is a baseline
    proc.vmm(9, ticks=0)
    one_pass(m, clock, 2, ("b", 9, None))
    s = one_pass(m, clock, 2, ("b", 9, metrics(rd=1 << 30)))
    assert s["domains"]["b"]["disk_rd"] == 0


def test_restarted_vm_starts_a_new_baseline(env: tuple[Monitor, FakeProc, Clock]) -> None:
    """A restart (new VMM, counters back at 0) or a reused pid never gives a
    negative or huge rate."""
    m, proc, clock = env
    proc.vmm(7, ticks=10 * TICK)
    one_pass(m, clock, 2, ("a", 7, metrics(rd=1 << 30, rx=1 << 30)))
    proc.gone(7)
    assert one_pass(m, clock, 2, ("a", 7, None))["domains"] == {}  # the process is gone
    proc.vmm(8, ticks=TICK)  # the VM started again: a new process, counters from 0
    s = one_pass(m, clock, 2, ("a", 8, metrics(rd=4096)))["domains"]["a"]
    assert s["cpu"] == 0 and s["disk_rd"] == 0
    proc.vmm(8, ticks=2 * TICK)
    s = one_pass(m, clock, 2, ("a", 8, metrics(rd=8192)))["domains"]["a"]
    assert s["cpu"] == 0.5 and s["disk_rd"] == 2048
    # the same pid, a different process (start time) that already ran longer and
    # read more: its totals are not this interval's, so a new baseline too
    proc.vmm(8, ticks=50 * TICK, start=999)
    s = one_pass(m, clock, 2, ("a", 8, metrics(rd=1 << 30)))["domains"]["a"]
    assert s["cpu"] == 0 and s["disk_rd"] == 0
    proc.vmm(8, ticks=51 * TICK, start=999)
    s = one_pass(m, clock, 2, ("a", 8, metrics(rd=1 << 30)))["domains"]["a"]
    assert s["cpu"] == 0.5
    # counters that went down in one process (its devices were recreated)
    proc.vmm(8, ticks=51 * TICK + 2, start=999)
    s = one_pass(m, clock, 2, ("a", 8, metrics(rd=50)))["domains"]["a"]
    assert s["disk_rd"] == 0 and s["cpu"] > 0
    for sample in m.history()["domains"]["a"]:
        assert all(sample[k] >= 0 for k in mon.DOMAIN_FIELDS)


def test_rings_are_bounded_and_follow_the_defined_domains(
        env: tuple[Monitor, FakeProc, Clock]) -> None:
    m, proc, clock = env
    proc.vmm(7, ticks=0)
    proc.vmm(9, ticks=0)
    for _ in range(HISTORY + 20):
        one_pass(m, clock, 2, ("a", 7, metrics()), ("b", 9, metrics()))
    h = m.history()
    assert len(h["host"]) == HISTORY and len(h["domains"]["a"]) == HISTORY
    assert h["interval_s"] == 2.0
    assert set(h["domains"]["a"][0]) == set(mon.DOMAIN_FIELDS)
    assert set(h["host"][0]) == set(mon.HOST_FIELDS)
    assert set(m.history({"b"})["domains"]) == {"b"}
    assert m.history(set())["domains"] == {}
    m.forget("u-a")  # undefined
    assert set(m.history()["domains"]) == {"b"}
    # a domain sampled as it was undefined: dropped at the end of the pass
    clock.now += 2
    m.begin()
    m.domain("u-a", "a", 7, None)
    m.end({"u-b": "b"})
    assert set(m.history()["domains"]) == {"b"} and m.tracked() == 1
    # renamed: the history follows the uuid
    clock.now += 2
    m.begin()
    m.end({"u-b": "b2"})
    assert set(m.history()["domains"]) == {"b2"}


def test_subscribers_get_frames_and_a_slow_one_is_dropped(
        env: tuple[Monitor, FakeProc, Clock]) -> None:
    m, proc, clock = env
    proc.vmm(7, ticks=0)
    fast, slow = m.subscribe(), m.subscribe()
    for _ in range(QUEUE + 3):
        one_pass(m, clock, 2, ("a", 7, metrics()))
        frame = fast.get(timeout=1)
        assert frame is not None and set(frame) == {"t", "host", "domains"}
        assert "a" in frame["domains"]
    assert slow.closed and slow.dropped and not fast.closed
    assert m.subscribers() == 1
    got = 0
    while slow.get(timeout=0.01) is not None:
        got += 1
    assert got == QUEUE  # what it had stays readable; nothing more was queued
    m.close()  # the daemon stops: every stream ends
    assert fast.closed and fast.get(timeout=1) is None
    assert m.subscribers() == 0
    assert m.subscribe().closed
