"""The emulated IOAPIC: registers, edge/level semantics, remote IRR, masking, EOI."""

from __future__ import annotations

from pyvirt.hypervisor.emulated.ioapic import IoApic
from pyvirt.hypervisor.emulated.lapic import ApicBus, LocalApic
from pyvirt.hypervisor.emulated.timers import ManualClock, TimerService


class Rig:
    def __init__(self, ncpu: int = 2) -> None:
        self.clock = ManualClock()
        self.timers = TimerService(self.clock, start=False)
        self.bus = ApicBus()
        self.ioapic = IoApic(self.bus)
        self.apics = [
            LocalApic(i, bus=self.bus, timers=self.timers, tsc_hz=10**9,
                      now_tsc=self.clock, bsp=(i == 0), eoi_broadcast=self.ioapic.eoi)
            for i in range(ncpu)]
        for a in self.apics:
            a.write(0xF0, memoryview(bytearray((0x1FF).to_bytes(4, "little"))))

    def reg_write(self, index: int, value: int) -> None:
        self.ioapic.write(0x00, memoryview(bytearray(index.to_bytes(4, "little"))))
        self.ioapic.write(0x10, memoryview(bytearray(value.to_bytes(4, "little"))))

    def reg_read(self, index: int) -> int:
        self.ioapic.write(0x00, memoryview(bytearray(index.to_bytes(4, "little"))))
        buf = bytearray(4)
        self.ioapic.read(0x10, memoryview(buf))
        return int.from_bytes(buf, "little")

    def program(self, pin: int, low: int, dest: int = 0) -> None:
        self.reg_write(0x11 + 2 * pin, dest << 24)
        self.reg_write(0x10 + 2 * pin, low)

    def eoi(self, cpu: int = 0) -> None:
        self.apics[cpu].write(0xB0, memoryview(bytearray(4)))


def test_id_version_and_reset() -> None:
    r = Rig()
    assert r.reg_read(0x01) == 0x00170020  # version 0x20, 24 entries
    r.reg_write(0x00, 0x05000000)
    assert r.reg_read(0x00) == 0x05000000
    assert r.reg_read(0x10) == 0x10000  # masked at reset
    buf = bytearray(4)
    r.ioapic.read(0x00, memoryview(buf))
    assert buf[0] == 0x10  # IOREGSEL reads back


def test_edge_delivery() -> None:
    r = Rig()
    r.program(4, 0x24)
    r.ioapic.set_irq(4, True)
    assert r.apics[0].get_interrupt() == 0x24
    r.ioapic.set_irq(4, True)  # no new edge
    r.eoi()
    assert r.apics[0].get_interrupt() is None
    r.ioapic.set_irq(4, False)
    r.ioapic.set_irq(4, True)
    assert r.apics[0].get_interrupt() == 0x24


def test_masked_edge_is_lost_and_unmask() -> None:
    r = Rig()
    r.program(4, 0x10024)
    r.ioapic.set_irq(4, True)
    r.program(4, 0x24)
    assert r.apics[0].get_interrupt() is None
    r.ioapic.set_irq(4, False)
    r.ioapic.set_irq(4, True)
    assert r.apics[0].get_interrupt() == 0x24


def test_level_remote_irr_and_redelivery() -> None:
    r = Rig()
    r.program(9, 0x8039)  # level, vector 0x39
    r.ioapic.set_irq(9, True)
    assert r.reg_read(0x10 + 18) & 0x4000  # remote IRR
    assert r.apics[0].get_interrupt() == 0x39
    r.ioapic.set_irq(9, True)  # still asserted: no second delivery while remote IRR
    assert r.ioapic.delivered[9] == 1
    r.eoi()  # line still high -> delivered again
    assert r.ioapic.delivered[9] == 2
    assert r.apics[0].get_interrupt() == 0x39
    r.ioapic.set_irq(9, False)
    r.eoi()
    assert not r.reg_read(0x10 + 18) & 0x4000
    assert r.apics[0].get_interrupt() is None
    assert r.ioapic.delivered[9] == 2


def test_level_masked_then_unmasked_delivers() -> None:
    r = Rig()
    r.program(10, 0x18040)
    r.ioapic.set_irq(10, True)
    assert r.apics[0].get_interrupt() is None
    r.program(10, 0x8040)
    assert r.apics[0].get_interrupt() == 0x40


def test_eoi_register() -> None:
    r = Rig()
    r.program(11, 0x8041)
    r.ioapic.set_irq(11, True)
    r.ioapic.set_irq(11, False)
    assert r.reg_read(0x10 + 22) & 0x4000
    r.ioapic.write(0x40, memoryview(bytearray(b"\x41\0\0\0")))
    assert not r.reg_read(0x10 + 22) & 0x4000


def test_physical_and_logical_destinations() -> None:
    r = Rig(2)
    r.program(5, 0x25, dest=1)
    r.ioapic.set_irq(5, True)
    assert r.apics[0].get_interrupt() is None
    assert r.apics[1].get_interrupt() == 0x25
    r.eoi(1)
    for i, a in enumerate(r.apics):
        a.write(0xD0, memoryview(bytearray(((1 << i) << 24).to_bytes(4, "little"))))
    r.program(6, 0x826, dest=0b11)  # logical flat, both CPUs
    r.ioapic.set_irq(6, True)
    assert r.apics[0].get_interrupt() == 0x26
    assert r.apics[1].get_interrupt() == 0x26


def test_no_destination_keeps_remote_irr_clear() -> None:
    r = Rig(1)
    r.program(12, 0x8042, dest=7)  # nobody has APIC ID 7
    r.ioapic.set_irq(12, True)
    assert not r.reg_read(0x10 + 24) & 0x4000


def test_irq_line() -> None:
    r = Rig()
    r.program(20, 0x50)
    r.ioapic.irq_line(20).set_level(True)
    assert r.apics[0].get_interrupt() == 0x50


def test_state_roundtrip_keeps_remote_irr_and_levels() -> None:
    import dataclasses

    import pytest

    from pyvirt.hypervisor.emulated.ioapic import IoApicState
    from pyvirt.state import StateError, decode, encode

    r = Rig()
    r.reg_write(0x00, 0x03000000)
    r.program(5, 0xA045)  # level, vector 0x45
    r.ioapic.set_irq(5, True)
    assert r.apics[0].get_interrupt() == 0x45
    st = decode(encode(r.ioapic.save_state()), IoApicState, part="ioapic")
    r2 = Rig()
    r2.ioapic.restore_state(st)
    assert r2.reg_read(0x00) == 0x03000000
    assert r2.reg_read(0x10 + 2 * 5) & (1 << 14)  # remote IRR still set
    r2.ioapic.set_irq(5, True)  # still asserted: no second delivery
    assert r2.apics[0].get_interrupt() is None
    r2.ioapic.eoi(0x45)  # the line is still high: delivered again
    assert r2.apics[0].get_interrupt() == 0x45
    for bad in (dataclasses.replace(st, rte=st.rte[:23]),
                dataclasses.replace(st, rte=(1 << 64, *st.rte[1:])),
                dataclasses.replace(st, ioapic_id=16),
                dataclasses.replace(st, version=0)):
        with pytest.raises(StateError, match="ioapic"):
            r2.ioapic.restore_state(bad)
