"""CmosRtc with a fake clock."""

from __future__ import annotations

import calendar

import pytest

from pyvirt.devices.legacy.rtc import CmosRtc

# 2024-02-29 13:45:30 UTC, a Thursday
T0 = calendar.timegm((2024, 2, 29, 13, 45, 30, 0, 0, 0))


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Cmos:
    def __init__(self, now: float = T0) -> None:
        self.clock = FakeClock(now)
        self.dev = CmosRtc(self.clock)

    def get(self, idx: int) -> int:
        self.dev.write(0, memoryview(bytearray([idx | 0x80])))  # NMI bit set, ignored
        buf = bytearray(1)
        self.dev.read(1, memoryview(buf))
        return buf[0]

    def set(self, idx: int, value: int) -> None:
        self.dev.write(0, memoryview(bytearray([idx])))
        self.dev.write(1, memoryview(bytearray([value])))


def test_bcd_24h_default() -> None:
    c = Cmos()
    assert c.get(0x0B) == 0x02
    assert [c.get(i) for i in (0, 2, 4, 6, 7, 8, 9, 0x32)] == [
        0x30, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]
    c.clock.now += 61
    assert (c.get(2), c.get(0)) == (0x46, 0x31)


def test_binary_and_12h() -> None:
    c = Cmos()
    c.set(0x0B, 0x04)  # binary, 12-hour
    assert c.get(4) == 0x80 | 1  # 1 PM
    assert c.get(9) == 24 and c.get(0x32) == 20
    c.set(0x0B, 0x00)  # BCD 12-hour
    assert c.get(4) == 0x81
    c.clock.now = calendar.timegm((2024, 1, 1, 0, 5, 0, 0, 0, 0))
    assert c.get(4) == 0x12  # midnight is 12 AM
    c.set(0x0B, 0x06)
    assert c.get(4) == 0


def test_status_registers() -> None:
    c = Cmos()
    assert c.get(0x0A) == 0x26
    c.set(0x0A, 0xA6)  # UIP is read-only; divider/rate bits stick
    assert c.get(0x0A) == 0x26
    c.set(0x0A, 0x2F)
    assert c.get(0x0A) == 0x2F
    assert c.get(0x0C) == 0
    assert c.get(0x0D) == 0x80
    c.set(0x0D, 0)
    assert c.get(0x0D) == 0x80


def test_nvram_and_index_port() -> None:
    c = Cmos()
    c.set(0x40, 0x5A)
    assert c.get(0x40) == 0x5A
    c.dev.set_cmos(0x34, 0x12)
    assert c.get(0x34) == 0x12
    buf = bytearray(1)
    c.dev.read(0, memoryview(buf))
    assert buf[0] == 0xFF
    with pytest.raises(ValueError):
        c.dev.set_cmos(0x00, 1)


def test_set_time_like_linux() -> None:
    """mc146818_set_time: SET, write all fields (BCD), clear SET."""
    c = Cmos()
    c.set(0x0B, 0x82)
    c.clock.now += 100  # frozen while SET
    assert c.get(0) == 0x30
    for idx, v in ((0, 0x00), (2, 0x00), (4, 0x08), (7, 0x01), (8, 0x03), (9, 0x25),
                   (0x32, 0x20)):
        c.set(idx, v)
    c.clock.now += 5
    assert c.get(4) == 0x08  # still frozen
    c.set(0x0B, 0x02)
    assert c.dev.guest_time() == pytest.approx(calendar.timegm((2025, 3, 1, 8, 0, 0)))
    c.clock.now += 3600 + 7
    assert [c.get(i) for i in (0, 2, 4, 7, 8, 9)] == [0x07, 0x00, 0x09, 0x01, 0x03, 0x25]


def test_write_without_set_adjusts_offset() -> None:
    c = Cmos()
    c.set(4, 0x15)  # hours 13 -> 15
    assert c.get(4) == 0x15
    assert c.dev.guest_time() == pytest.approx(T0 + 2 * 3600)


def test_invalid_time_is_ignored() -> None:
    c = Cmos()
    c.set(0x0B, 0x82)
    c.set(7, 0x31)  # Feb 31
    c.set(0x0B, 0x02)
    assert c.dev.guest_time() == pytest.approx(T0)


def test_set_clears_uie() -> None:
    c = Cmos()
    c.set(0x0B, 0x92)
    assert c.get(0x0B) == 0x82


def test_update_and_alarm_interrupts() -> None:
    from pyvirt.devices.irq import NullIrq

    irq = NullIrq()
    clock = FakeClock(T0)
    dev = CmosRtc(clock, irq)
    c = Cmos()
    c.dev, c.clock = dev, clock
    dev.update_cycle()  # UF set, but not enabled: no IRQF
    assert c.get(0x0C) == 0x10
    assert not irq.level
    c.set(0x0B, 0x12)  # UIE
    try:
        dev.update_cycle()
        assert irq.level
        assert c.get(0x0C) == 0x90
        assert not irq.level
        assert c.get(0x0C) == 0
        # Alarm at 13:45:31 with hours as don't-care.
        c.set(0x0B, 0x22)  # AIE only
        c.set(0x01, 0x31)
        c.set(0x03, 0x45)
        c.set(0x05, 0xC0)
        dev.update_cycle()
        assert not irq.level
        assert c.get(0x0C) == 0x10
        clock.now += 1
        dev.update_cycle()
        assert irq.level
        assert c.get(0x0C) == 0xB0
    finally:
        dev.close()


def test_update_timer_fires_in_real_time() -> None:
    import time

    from pyvirt.devices.irq import NullIrq

    irq = NullIrq()
    dev = CmosRtc(irq=irq)
    c = Cmos()
    c.dev = dev
    c.set(0x0B, 0x12)
    try:
        deadline = time.monotonic() + 3
        while not irq.level and time.monotonic() < deadline:
            time.sleep(0.02)
        assert irq.level
        assert c.get(0x0C) & 0x90 == 0x90
    finally:
        dev.close()



@pytest.mark.parametrize(("reg_b", "century", "year"), [
    (0x06, 100, 24),  # binary: year 10024
    (0x06, 255, 99),  # binary: year 25599
    (0x02, 0x00, 0x00),  # BCD: year 0
])
def test_years_outside_the_calendar_are_ignored(reg_b: int, century: int, year: int) -> None:
    """A guest can write any century/year byte; a year Python's calendar cannot
    hold is ignored like any invalid time, never an exception on the vCPU
    thread (found by the guest-side stress test: the VM died)."""
    c = Cmos()
    c.set(0x0B, reg_b)  # the data mode first: SET latches the time in it
    c.set(0x0B, reg_b | 0x80)
    c.set(0x32, century)
    c.set(9, year)
    c.set(0x0B, reg_b)
    assert c.dev.guest_time() == pytest.approx(T0)
