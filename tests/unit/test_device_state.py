"""Saved state of the legacy devices and PCI: each is driven into a non-trivial
state the way a driver would, saved, encoded, decoded and restored into a fresh
device and into one that already ran; reads and IRQ levels must then be the
same as the original's. Hostile records fail with a StateError naming the part
and the field."""

from __future__ import annotations

import calendar
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import pytest

from pyvirt.arch.x86_64.layout import ACPI_PM_TMR_HZ
from pyvirt.devices.irq import NullIrq, NullMsiRoute
from pyvirt.devices.legacy.acpi_pm import AcpiPm, ResetControl
from pyvirt.devices.legacy.i8042 import I8042
from pyvirt.devices.legacy.rtc import CmosRtc
from pyvirt.devices.legacy.serial import HOST_RX_CAPACITY, Serial16550
from pyvirt.pci.msix import MsixTable
from pyvirt.state import StateError, decode, encode
from tests.unit.test_pci import Dummy, Machine

T0 = calendar.timegm((2024, 2, 29, 13, 45, 30, 0, 0, 0))


def roundtrip(state: Any, part: str) -> Any:
    """Through the snapshot encoding, as the state file carries it."""
    return decode(encode(state), type(state), part=part)


def bad(dev: Any, state: Any, match: str, **changes: Any) -> None:
    with pytest.raises(StateError, match=match):
        dev.restore_state(dataclasses.replace(state, **changes))


def b(value: int) -> memoryview:
    return memoryview(bytearray([value]))


# ---- 16550A ------------------------------------------------------------------------------


class Uart:
    def __init__(self) -> None:
        self.irq = NullIrq()
        self.tx = bytearray()
        self.dev = Serial16550(self.irq, self.tx.extend)

    def inb(self, off: int) -> int:
        buf = bytearray(1)
        self.dev.read(off, memoryview(buf))
        return buf[0]

    def outb(self, off: int, value: int) -> None:
        self.dev.write(off, b(value))


def uart_in_use() -> Uart:
    """8250 start-up (FIFO, trigger 8, divisor 3), RX and THRE interrupts, input
    partly received, some typed ahead on the wire, a scratch value."""
    u = Uart()
    u.outb(3, 0x83)
    u.outb(0, 3)
    u.outb(1, 0)
    u.outb(3, 0x1B)  # 8E1, DLAB off
    u.outb(2, 0x81)  # FIFO on, trigger 8
    u.outb(4, 0x0B)
    u.outb(7, 0x5A)
    u.outb(1, 0x03)  # RDI | THRI
    u.outb(0, ord("x"))
    assert u.dev.enqueue_input(b"0123456789" * 4) == 40
    assert u.inb(0) == ord("0")  # 16 moved into the FIFO, one read
    return u


def uart_probe(u: Uart) -> list[int]:
    """Everything a driver can observe, in an order that drains the receiver."""
    seen = [int(u.irq.level), u.inb(2), u.inb(5), u.inb(6), u.inb(7), u.inb(1), u.inb(3),
            u.inb(4)]
    for _ in range(50):
        seen += [u.inb(5), u.inb(0), int(u.irq.level)]
    seen += [u.inb(2)]
    u.outb(3, 0x9B)
    seen += [u.inb(0), u.inb(1)]
    return seen


def test_serial_round_trip_fresh_and_used() -> None:
    src = uart_in_use()
    state = roundtrip(src.dev.save_state(), "serial")
    assert len(state.fifo) == 15 and len(state.wire) == 24
    fresh = Uart()
    fresh.dev.restore_state(state)
    assert fresh.irq.level  # RX data waits: the line is driven at restore, before any access
    used = uart_in_use()
    used.outb(4, 0x1F)  # loopback, with its own junk received
    used.outb(0, 0xEE)
    used.dev.restore_state(state)
    expected = uart_probe(src)
    assert uart_probe(fresh) == expected
    assert uart_probe(used) == expected
    assert expected[-2:] == [3, 0]  # the divisor latch came along


def test_serial_restore_lowers_a_line_left_high() -> None:
    quiet = Uart().dev.save_state()
    u = uart_in_use()
    assert u.irq.level
    u.dev.restore_state(quiet)
    assert not u.irq.level
    assert u.inb(5) == 0x60 and u.dev.rx_free() == HOST_RX_CAPACITY


def test_serial_bad_records() -> None:
    u = uart_in_use()
    st = u.dev.save_state()
    bad(u.dev, st, "serial: saved state has version 9", version=9)
    bad(u.dev, st, "serial: saved state field ier", ier=0x10)
    bad(u.dev, st, "serial: saved state field fifo holds 17 bytes", fifo=bytes(17))
    bad(u.dev, st, "serial: saved state field fifo holds 2 bytes", fcr=0, fifo=b"ab")
    bad(u.dev, st, "serial: saved state field wire", wire=bytes(HOST_RX_CAPACITY + 1))
    bad(u.dev, st, "serial: saved state field fcr", fcr=0xC0)
    bad(u.dev, st, "serial: saved state field dll", dll=256)
    bad(u.dev, st, "serial: saved state field lsr_err", lsr_err=0x01)
    bad(u.dev, st, "serial: saved state field thre_pending", thre_pending=1)
    with pytest.raises(StateError, match="serial: saved state is unreadable"):
        decode(encode(st)[:-3], type(st), part="serial")
    assert uart_probe(u) == uart_probe(uart_in_use())  # nothing was half-restored


def test_serial_metrics() -> None:
    u = uart_in_use()
    assert u.dev.metrics() == {"tx_bytes": 1, "rx_bytes": 40, "interrupts": 1}
    u.dev.restore_state(Uart().dev.save_state())
    assert u.dev.metrics()["rx_bytes"] == 40  # counters are not state: they only grow


# ---- i8042 -------------------------------------------------------------------------------


class Kbc:
    def __init__(self, aux: bool = True) -> None:
        self.kbd, self.aux = NullIrq(), NullIrq()
        self.resets = 0
        self.dev = I8042(self._reset, self.kbd, self.aux if aux else None)

    def _reset(self) -> None:
        self.resets += 1

    def inb(self, port: int) -> int:
        buf = bytearray(1)
        self.dev.read(port - 0x60, memoryview(buf))
        return buf[0]

    def outb(self, port: int, value: int) -> None:
        self.dev.write(port - 0x60, b(value))


def kbc_in_use() -> Kbc:
    k = Kbc()
    k.outb(0x64, 0x60)
    k.outb(0x60, 0x47)  # CTR: kbd+aux IRQs, SYS, translation
    k.outb(0x64, 0xD4)
    k.outb(0x60, 0xF3)  # mouse: set sample rate...
    k.outb(0x64, 0xD4)
    k.outb(0x60, 40)  # ...to 40
    k.outb(0x64, 0xD4)
    k.outb(0x60, 0xF4)  # mouse enabled
    k.outb(0x64, 0xD1)  # output port write: its data byte is pending
    assert k.dev.enqueue_keyboard(b"\x1e\x9e") == 2
    return k


def kbc_probe(k: Kbc) -> list[int]:
    seen = [int(k.kbd.level), int(k.aux.level)]
    for _ in range(8):
        seen += [k.inb(0x64), k.inb(0x60), int(k.kbd.level), int(k.aux.level)]
    k.outb(0x60, 0x03)  # completes the pending 0xD1: A20 on, no reset
    k.outb(0x64, 0xD4)
    k.outb(0x60, 0xE9)  # mouse status: enabled flag, resolution, rate
    k.outb(0x64, 0xD0)
    seen += [k.resets]
    for _ in range(6):
        seen += [k.inb(0x64), k.inb(0x60)]
    k.outb(0x64, 0x20)
    return [*seen, k.inb(0x60)]


def test_i8042_round_trip_fresh_and_used() -> None:
    src = kbc_in_use()
    state = roundtrip(src.dev.save_state(), "i8042")
    assert src.aux.level  # the mouse's ACK is first in the output buffer
    fresh = Kbc()
    fresh.dev.restore_state(state)
    assert (fresh.kbd.level, fresh.aux.level) == (False, True)
    used = kbc_in_use()
    used.dev.send_ctrl_alt_del()
    used.outb(0x64, 0xAD)
    used.dev.restore_state(state)
    expected = kbc_probe(src)
    assert kbc_probe(fresh) == expected
    assert kbc_probe(used) == expected
    assert expected[-1] == 0x47 and 0x20 in expected  # CTR, mouse status "enabled"


def test_i8042_bad_records() -> None:
    k = kbc_in_use()
    st = k.dev.save_state()
    bad(k.dev, st, "i8042: saved state has version 0", version=0)
    bad(k.dev, st, "i8042: saved state field ram holds 31", ram=bytes(31))
    bad(k.dev, st, "i8042: saved state field out is not a queue", out=((1, False),) * 65)
    bad(k.dev, st, r"i8042: saved state field out\[1\]", out=((1, False), (256, False)))
    bad(k.dev, st, "i8042: saved state field pending_cmd", pending_cmd=0x55)
    bad(k.dev, st, "i8042: saved state field mouse_res", mouse_res=4)
    noaux = Kbc(aux=False)
    bad(noaux.dev, st, r"i8042: saved state field ram\[0\]")


def test_ctrl_alt_del_scancodes() -> None:
    k = Kbc()
    assert k.dev.send_ctrl_alt_del()
    assert k.kbd.level and k.kbd.raised == 1
    got = []
    while k.inb(0x64) & 1:
        got.append(k.inb(0x60))
    # set 1 (translated): Ctrl, Alt, Delete made, then broken in reverse order
    assert got == [0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D]
    assert k.kbd.raised == 8  # one edge per byte, as atkbd reads one byte per IRQ
    k.outb(0x64, 0x60)
    k.outb(0x60, 0x07)  # translation off: the guest reads set 2
    assert k.dev.send_ctrl_alt_del()
    got = []
    while k.inb(0x64) & 1:
        got.append(k.inb(0x60))
    assert got == [0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0, 0x14]
    assert k.dev.enqueue_keyboard(bytes(60)) == 60
    assert not k.dev.send_ctrl_alt_del()  # no room for all of it: nothing queued
    assert k.dev.metrics()["interrupts"] >= 19


# ---- CMOS RTC ----------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Rtc:
    def __init__(self, now: float = T0 + 0.25) -> None:
        self.clock = Clock(now)
        self.irq = NullIrq()
        self.dev = CmosRtc(self.clock, self.irq)

    def get(self, idx: int) -> int:
        self.dev.write(0, b(idx))
        buf = bytearray(1)
        self.dev.read(1, memoryview(buf))
        return buf[0]

    def set(self, idx: int, value: int) -> None:
        self.dev.write(0, b(idx))
        self.dev.write(1, b(value))

    def hms(self) -> tuple[int, int, int]:
        return self.get(4), self.get(2), self.get(0)


def rtc_in_use(clock_at: float = T0 + 0.25) -> Rtc:
    r = Rtc(clock_at)
    r.set(0x0B, 0x06)  # binary, 24 h
    r.set(0x0B, 0x86)  # SET: the way mc146818_set_time writes the time
    r.set(0x04, 1)
    r.set(0x02, 2)
    r.set(0x00, 3)  # 01:02:03 on the host's date
    r.set(0x0B, 0x06)
    r.set(0x0B, 0x16)  # UIE on
    r.set(0x40, 0x99)  # NVRAM
    r.dev.update_cycle()  # one update ended: UF and IRQF set, IRQ8 high
    r.dev.write(0, b(0x40))  # leave the index pointing at the NVRAM byte
    return r


def test_rtc_time_moves_on_with_the_host() -> None:
    src = rtc_in_use()
    assert src.irq.level and src.hms() == (1, 2, 3)
    src.dev.write(0, b(0x40))
    state = roundtrip(src.dev.save_state(), "rtc")
    src.dev.close()
    later = Rtc(T0 + 0.25 + 3600 + 125)  # restored an hour and 125 s later
    try:
        later.dev.restore_state(state)
        assert later.irq.level  # IRQF was pending: IRQ8 driven at restore
        buf = bytearray(1)
        later.dev.read(1, memoryview(buf))
        assert buf[0] == 0x99  # the index register came along
        assert later.hms() == (2, 4, 8)  # the guest's clock kept its offset from the host's
        assert later.get(0x0C) == 0x90 and not later.irq.level  # IRQF|UF, cleared by reading
    finally:
        later.dev.close()


def test_rtc_restore_restarts_and_stops_the_update_timer() -> None:
    src = rtc_in_use()
    state = src.dev.save_state()
    src.dev.close()
    r = Rtc(T0 + 0.97)  # the next second boundary of guest time is 30 ms away
    quiet = r.dev.save_state()
    try:
        r.dev.restore_state(state)
        r.get(0x0C)
        deadline = time.monotonic() + 2
        while not r.irq.level and time.monotonic() < deadline:
            time.sleep(0.01)
        assert r.irq.level, "UIE restored but no update interrupt came"
        # Restoring the state of a machine with UIE off stops the timer again.
        r.dev.restore_state(quiet)
        r.get(0x0C)
        assert not r.irq.level
        time.sleep(0.15)
        assert not r.irq.level and r.get(0x0C) == 0
    finally:
        r.dev.close()


def test_rtc_bad_records() -> None:
    r = Rtc()
    st = r.dev.save_state()
    bad(r.dev, st, "rtc: saved state has version 2", version=2)
    bad(r.dev, st, "rtc: saved state field index", index=0x80)
    bad(r.dev, st, "rtc: saved state field cmos holds 129", cmos=bytes(129))
    bad(r.dev, st, "rtc: saved state field offset_s", offset_s=float("nan"))
    bad(r.dev, st, "rtc: saved state field offset_s", offset_s=1e12)  # past year 9999
    bad(r.dev, st, "rtc: saved state field offset_s", offset_s=-1e11)  # before year 1
    bad(r.dev, st, r"rtc: saved state field cmos\[0xc\]", cmos=bytes(12) + b"\x01" + bytes(115))


# ---- ACPI PM and 0xCF9 -------------------------------------------------------------------


class Pm:
    def __init__(self, ns: int = 0) -> None:
        self.ns = ns
        self.sci = NullIrq()
        self.sleeps: list[int] = []
        self.dev = AcpiPm(self.sci, self.sleeps.append, lambda: self.ns)

    def rd(self, off: int, width: int) -> int:
        buf = bytearray(width)
        self.dev.read(off, memoryview(buf))
        return int.from_bytes(buf, "little")

    def wr(self, off: int, width: int, value: int) -> None:
        self.dev.write(off, memoryview(bytearray(value.to_bytes(width, "little"))))


def pm_in_use() -> Pm:
    p = Pm(ns=5_000_000_000)
    p.ns += 1_234_567_891  # the timer has run 1.23 s
    p.wr(2, 2, 0x0100)  # PWRBTN_EN
    p.wr(4, 2, 0x0401)  # some SLP_TYP left in PM1_CNT, no SLP_EN
    p.dev.press_power_button()
    return p


def test_acpi_pm_round_trip_timer_continues() -> None:
    src = pm_in_use()
    tmr = src.rd(8, 4)
    assert src.sci.level and tmr == 1_234_567_891 * ACPI_PM_TMR_HZ // 10**9
    state = roundtrip(src.dev.save_state(), "acpi_pm")
    for dst in (Pm(ns=77_000_000_000_000), pm_in_use()):
        dst.dev.restore_state(state)
        assert dst.sci.level
        assert dst.rd(8, 4) == tmr  # continues where it stood: no jump, no going back
        dst.ns += 1_000_000
        assert dst.rd(8, 4) == tmr + ACPI_PM_TMR_HZ // 1000
        assert [dst.rd(0, 2), dst.rd(2, 2), dst.rd(4, 2)] == [0x0100, 0x0100, 0x0401]
        dst.wr(0, 2, 0x0100)  # the OS acknowledges the button
        assert not dst.sci.level


def test_acpi_pm_restore_lowers_sci() -> None:
    p = pm_in_use()
    p.dev.restore_state(Pm().dev.save_state())
    assert not p.sci.level and p.rd(0, 2) == 0 and p.rd(8, 4) == 0


def test_acpi_pm_bad_records() -> None:
    p = pm_in_use()
    st = p.dev.save_state()
    bad(p.dev, st, "acpi_pm: saved state has version 3", version=3)
    bad(p.dev, st, "acpi_pm: saved state field pm1_sts", pm1_sts=0x0004)
    bad(p.dev, st, "acpi_pm: saved state field pm1_en", pm1_en=0x10000)
    bad(p.dev, st, "acpi_pm: saved state field pm1_cnt", pm1_cnt=0)
    bad(p.dev, st, "acpi_pm: saved state field pm1_cnt", pm1_cnt=0x2001)
    bad(p.dev, st, "acpi_pm: saved state field pm_tmr", pm_tmr=1 << 32)
    bad(p.dev, st, "acpi_pm: saved state field tmr_msb_seen", tmr_msb_seen=2)


def test_power_button_waits_for_enable_and_counts_sci() -> None:
    p = Pm()
    p.dev.press_power_button()
    assert p.rd(0, 2) & 0x0100 and not p.sci.level  # PWRBTN_EN clear: status only
    p.wr(2, 2, 0x0100)
    assert p.sci.level and p.dev.metrics() == {"sci": 1}
    p.wr(0, 2, 0x0100)
    p.dev.press_power_button()
    assert p.dev.metrics() == {"sci": 2}


def test_reset_control_state() -> None:
    resets: list[int] = []
    rc = ResetControl(lambda: resets.append(1))
    rc.write(0, b(0x02))
    st = roundtrip(rc.save_state(), "reset_control")
    other = ResetControl(lambda: resets.append(2))
    other.restore_state(st)
    buf = bytearray(1)
    other.read(0, memoryview(buf))
    assert buf[0] == 0x02 and not resets
    bad(other, st, "reset_control: saved state field value", value=0x01)


# ---- PCI ---------------------------------------------------------------------------------


def pci_machine(moved_to: int | None = None) -> tuple[Machine, Dummy]:
    m = Machine()
    d = Dummy()
    m.root.add(3, d)
    return m, d


def test_pci_function_round_trip_with_a_moved_bar() -> None:
    m1, d1 = pci_machine()
    old = d1.bar_address(d1.bar0)
    new = old + 0x10_0000
    m1.ecam_write(3, 0x10, 4, new)  # the guest moves BAR0
    m1.ecam_write(3, 0x3C, 1, 11)  # interrupt line
    m1.ecam_write(3, d1.cap + 4, 1, 0x77)  # a writable capability byte
    m1.ecam_write(3, 0x04, 2, 0x0006)  # memory + bus master
    m1.mmio_write(new + 8, 4, 0xCAFE)
    state = roundtrip(d1.save_pci_state(), "pci")

    m2, d2 = pci_machine()
    d2.restore_pci_state(state)
    found = m2.mmio.lookup(new + 8)
    assert found is not None and found[0] is d2.r0 and found[1] == 8
    assert m2.mmio.lookup(old) is None  # nothing left where it was
    assert d2.moves[-1] == (0, old, new)
    for reg in range(0, 0x100, 4):
        assert m2.ecam_read(3, reg) == m1.ecam_read(3, reg), hex(reg)
    m2.mmio_write(new, 4, 1)
    assert d2.r0.writes == [(0, b"\x01\0\0\0")]


def test_pci_restore_takes_bars_off_the_bus_when_decoding_is_off() -> None:
    m1, d1 = pci_machine()
    m1.ecam_write(3, 0x04, 2, 0)  # memory decoding off
    state = d1.save_pci_state()
    m2, d2 = pci_machine()
    addr = d2.bar_address(d2.bar2)
    assert m2.mmio.lookup(addr) is not None
    d2.restore_pci_state(state)
    assert m2.mmio.lookup(addr) is None and d2.bar2.mapped_at is None
    assert m2.mmio_read(addr) == 0xFFFF_FFFF


def test_pci_swapped_bars_are_all_decoded_after_restore() -> None:
    """Restoring A onto B's current place fails for a moment (overlap); once B
    moves away A must be decoded: the root retries BARs left undecoded."""
    m1 = Machine()
    a, bdev = Dummy(0x1111), Dummy(0x2222)
    m1.root.add(3, a)
    m1.root.add(4, bdev)
    pa, pb = a.bar_address(a.bar0), bdev.bar_address(bdev.bar0)
    spare = 0xD000_0000
    m1.ecam_write(3, 0x10, 4, spare)  # the guest swaps the two BAR0s through a spare address
    m1.ecam_write(4, 0x10, 4, pa)
    m1.ecam_write(3, 0x10, 4, pb)
    sa, sb = a.save_pci_state(), bdev.save_pci_state()

    m2 = Machine()
    a2, b2 = Dummy(0x1111), Dummy(0x2222)
    m2.root.add(3, a2)
    m2.root.add(4, b2)
    a2.restore_pci_state(sa)  # wants pb, still held by b2
    b2.restore_pci_state(sb)
    assert a2.bar0.mapped_at == pb and b2.bar0.mapped_at == pa
    fa, fb = m2.mmio.lookup(pb), m2.mmio.lookup(pa)
    assert fa is not None and fa[0] is a2.r0
    assert fb is not None and fb[0] is b2.r0


def test_pci_bad_records() -> None:
    _, d = pci_machine()
    st = d.save_pci_state()
    with pytest.raises(StateError, match=r"pci dummy-1234: saved state field config\[0x0\]"):
        d.restore_pci_state(Dummy(0x4321).save_pci_state())  # another device's record
    with pytest.raises(StateError, match="pci dummy-1234: saved state field config holds"):
        d.restore_pci_state(dataclasses.replace(st, config=bytes(4095)))
    with pytest.raises(StateError, match="pci dummy-1234: saved state has version 7"):
        d.restore_pci_state(dataclasses.replace(st, version=7))
    cfg = bytearray(st.config)
    cfg[0x10] |= 0x08  # BAR0's type bits claim prefetchable
    with pytest.raises(StateError, match=r"config\[0x10\]"):
        d.check_pci_state(dataclasses.replace(st, config=bytes(cfg)))
    cfg[0x10] &= ~0x08
    cfg[0x04] = 0  # decoding off: fine, and checking alone changes nothing
    assert d.check_pci_state(dataclasses.replace(st, config=bytes(cfg))) == bytes(cfg)
    assert d.command & 0x2 and d.bar0.mapped_at is not None


def test_pci_root_state() -> None:
    m1, _ = pci_machine()
    m1.cf8(0, 3, 0, 0x10)
    state = roundtrip(m1.root.save_state(), "pci")
    m2, _ = pci_machine()
    m2.root.restore_state(state)
    assert m2.cfc_read(0, 4) == m1.cfc_read(0, 4)  # CONFIG_ADDRESS came along
    bad(m2.root, state, "pci: saved state field config_address", config_address=0x3)


# ---- MSI-X -------------------------------------------------------------------------------


class Msix:
    def __init__(self) -> None:
        self.routes: list[NullMsiRoute] = []
        self.t = MsixTable(4, self._route)

    def _route(self) -> NullMsiRoute:
        r = NullMsiRoute()
        self.routes.append(r)
        return r

    def entry(self, v: int, addr: int, data: int, masked: bool) -> None:
        off = 16 * v
        for i, val in enumerate((addr & 0xFFFF_FFFF, addr >> 32, data, int(masked))):
            self.t.table_write(off + 4 * i, memoryview(bytearray(val.to_bytes(4, "little"))))

    def pba(self) -> int:
        buf = bytearray(8)
        self.t.pba_read(0, memoryview(buf))
        return int.from_bytes(buf, "little")

    def sent(self) -> list[tuple[int, int]]:
        return [m for r in self.routes for m in r.sent]


def msix_in_use() -> Msix:
    x = Msix()
    x.t.control_written(0x8000)  # enabled
    x.entry(0, 0xFEE0_1000, 0x41, masked=False)
    x.entry(1, 0xFEE0_2000, 0x42, masked=True)
    x.entry(3, 0x1_FEE0_3000, 0x43, masked=False)
    assert x.t.notify(1)  # masked: pending
    return x


def test_msix_round_trip_reprograms_routes() -> None:
    src = msix_in_use()
    state = roundtrip(src.t.save_state(), "msix")
    for dst in (Msix(), msix_in_use()):
        if dst.routes:
            dst.entry(2, 0xFEE0_9000, 0x99, masked=False)
        before = len(dst.sent())
        dst.t.restore_state(state)
        assert len(dst.sent()) == before  # restoring sends nothing
        programmed = {(r.address, r.data) for r in dst.routes}
        assert {(0xFEE0_1000, 0x41), (0x1_FEE0_3000, 0x43)} <= programmed
        assert dst.pba() == src.pba() == 0b10
        buf = bytearray(16 * 4)
        dst.t.table_read(0, memoryview(buf)[:8])
        assert dst.t.enabled and not dst.t.function_masked
        assert dst.t.notify(2) and dst.pba() == 0b110  # vector 2 is masked in the record
        dst.t.notify(0)
        assert dst.sent()[-1] == (0xFEE0_1000, 0x41)
        dst.entry(1, 0xFEE0_2000, 0x42, masked=False)  # unmask: the pending message goes
        assert dst.sent()[-1] == (0xFEE0_2000, 0x42) and dst.pba() == 0b100


def test_msix_bad_records() -> None:
    x = msix_in_use()
    st = x.t.save_state()
    bad(x.t, st, "msix: saved state has version 0", version=0)
    bad(x.t, st, "msix: saved state field num_vectors", num_vectors=5)
    bad(x.t, st, "msix: saved state field table holds", table=bytes(65))
    bad(x.t, st, "msix: saved state field pba has bits beyond", pba=(0x10).to_bytes(8, "little"))
    bad(x.t, st, "msix: saved state field pba has vector 0 pending",
        pba=(1).to_bytes(8, "little"))
    bad(x.t, st, "msix: saved state field enabled", enabled=1)
    with pytest.raises(StateError, match="msix: saved state field num_vectors"):
        x.t.check_state(dataclasses.replace(st, num_vectors=1))
    x.t.check_state(Msix().t.save_state())  # valid; checking alone changes nothing
    assert x.t.save_state() == st


@pytest.mark.parametrize("make", [Uart, Kbc, Pm, Rtc])
def test_state_types_are_declared(make: Callable[[], Any]) -> None:
    dev = make().dev
    st = dev.save_state()
    assert isinstance(st, dev.state_type) and st.version == dev.STATE_VERSION
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.version = 5


def test_rtc_a_timer_cancelled_by_restore_that_fires_anyway_is_ignored() -> None:
    r = rtc_in_use()
    try:
        stale_gen = r.dev._timer_gen  # the armed timer's generation (UIE is on)
        r.dev.restore_state(Rtc().dev.save_state())  # a machine with no interrupt enabled
        r.dev._on_timer(stale_gen)  # it had passed cancel() already and now runs
        assert r.get(0x0C) == 0 and not r.irq.level
        assert r.dev._timer is None
    finally:
        r.dev.close()
