from __future__ import annotations

import pytest

from pyvirt.devices.bus import Bus, BusOverlapError


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
