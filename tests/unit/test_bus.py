from __future__ import annotations

import logging
import tracemalloc

import pytest

from pyvirt.devices.bus import Bus, BusOverlapError, UnclaimedLog


class Recorder:
    def __init__(self) -> None:
        self.log: list[tuple[str, int, bytes]] = []

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes([offset]) * len(data)
        self.log.append(("r", offset, bytes(data)))

    def write(self, offset: int, data: memoryview) -> None:
        self.log.append(("w", offset, bytes(data)))


def test_dispatch_by_offset() -> None:
    bus = Bus("pio")
    a, b = Recorder(), Recorder()
    bus.insert(a, 0x3F8, 8, "a")
    bus.insert(b, 0x60, 5, "b")
    buf = bytearray(1)
    bus.read(0x3FD, memoryview(buf))
    assert buf == b"\x05"
    bus.write(0x64, memoryview(b"\xfe"))
    assert b.log == [("w", 4, b"\xfe")]
    assert bus.lookup(0x3F7) is None and bus.lookup(0x400) is None


def test_unclaimed_reads_float_high_and_are_counted() -> None:
    bus = Bus("pio")
    buf = bytearray(2)
    bus.read(0x1234, memoryview(buf))
    bus.write(0x1234, memoryview(b"\x00"))
    assert buf == b"\xff\xff"
    assert bus.unclaimed[("read", 0x1234)] == 1 and bus.unclaimed[("write", 0x1234)] == 1
    bus.read(0x1234, memoryview(buf))
    assert bus.unclaimed[("read", 0x1234)] == 2


def test_unclaimed_state_is_bounded_whatever_the_guest_touches() -> None:
    """A guest sweeping distinct unclaimed addresses (dd over /dev/mem) must not
    grow the VMM: issue #17 saw 2.5 GB from one Counter entry per address."""
    bus = Bus("mmio")
    buf = memoryview(bytearray(4))
    for addr in range(0xD000_0000, 0xD000_0000 + 4096 * 4, 4):  # warm up to the cap
        bus.read(addr, buf)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for addr in range(0xD100_0000, 0xD100_0000 + 200_000 * 4, 4):
            bus.read(addr, buf)
            bus.write(addr, buf)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 << 10, f"unclaimed accesses grew the bus by {grown} bytes"
    assert len(bus.unclaimed) == UnclaimedLog.MAX_ADDRESSES
    assert bus.unclaimed.totals == {"read": 204_096, "write": 200_000}
    assert bus.unclaimed.untracked == 204_096 + 200_000 - UnclaimedLog.MAX_ADDRESSES
    # the first addresses stay tracked (the useful ones: a driver probing)
    assert bus.unclaimed[("read", 0xD000_0000)] == 1
    assert bus.unclaimed[("read", 0xD100_0000)] == 0


def test_unclaimed_logging_is_first_per_address_then_rate_limited(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    log = UnclaimedLog("pio", max_addresses=2, summary_interval=10.0, clock=lambda: now[0])
    caplog.set_level(logging.DEBUG, logger="pyvirt.devices.bus")
    log.note("read", 0x80)
    log.note("read", 0x80)
    log.note("write", 0x80)
    assert [r.getMessage() for r in caplog.records] == [
        "unclaimed pio read at 0x80", "unclaimed pio write at 0x80"]
    caplog.clear()
    for port in range(0x100, 0x200):
        log.note("read", port)
    assert len(caplog.records) == 1  # one summary, not one line per port
    assert caplog.records[0].getMessage().startswith("1 more unclaimed pio accesses")
    caplog.clear()
    now[0] += 10.0
    log.note("write", 0x300)
    assert [r.getMessage() for r in caplog.records] == [
        "256 more unclaimed pio accesses at addresses beyond the first 2 "
        "(258 reads, 2 writes in all)"]
    assert len(log) == 2 and log.untracked == 257


def test_overlaps_are_refused() -> None:
    bus = Bus("mmio")
    bus.insert(Recorder(), 0x1000, 0x100, "x")
    for base, length in ((0x10FF, 1), (0xF00, 0x101), (0x1000, 1), (0x800, 0x1000)):
        with pytest.raises(BusOverlapError):
            bus.insert(Recorder(), base, length)
    bus.insert(Recorder(), 0x1100, 1)
    bus.insert(Recorder(), 0xFFF, 1)


def test_remove() -> None:
    bus = Bus("pio")
    a = Recorder()
    bus.insert(a, 0x80, 1, "post")
    assert bus.remove(0x80) is a
    assert bus.lookup(0x80) is None
    with pytest.raises(KeyError):
        bus.remove(0x80)
