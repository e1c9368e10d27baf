"""The timer service and the assembled emulated irqchip, end to end."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from pyvirt.devices.bus import Bus
from pyvirt.hypervisor.emulated.irqchip import EmulatedIrqChip
from pyvirt.hypervisor.emulated.timers import ManualClock, TimerService

# -- timer service ---------------------------------------------------------------


def test_timers_fake_clock_order_and_cancel() -> None:
    clock = ManualClock()
    svc = TimerService(clock, start=False)
    ran: list[str] = []
    svc.schedule(300, lambda: ran.append("c"))
    svc.schedule(100, lambda: ran.append("a"))
    hb = svc.schedule(200, lambda: ran.append("b"))
    svc.schedule(100, lambda: ran.append("a2"))  # same deadline: FIFO
    svc.cancel(hb)
    svc.cancel(hb)  # repeat is harmless
    svc.cancel(None)
    assert svc.pending() == 3
    assert svc.next_deadline() == 100
    assert svc.run_due() == 0
    clock.advance(250)
    assert svc.run_due() == 2
    assert ran == ["a", "a2"]
    clock.advance(100)
    svc.run_due()
    assert ran == ["a", "a2", "c"]
    assert svc.pending() == 0
    svc.close()
    with pytest.raises(RuntimeError):
        svc.schedule(0, lambda: None)


def test_timers_callback_reschedules_and_survives_errors() -> None:
    clock = ManualClock()
    svc = TimerService(clock, start=False)
    ran: list[int] = []

    def bad() -> None:
        raise ValueError("boom")

    def tick() -> None:
        ran.append(clock())
        if len(ran) < 3:
            svc.schedule(clock() + 10, tick)

    svc.schedule(5, bad)
    svc.schedule(10, tick)
    for _ in range(5):
        clock.advance(10)
        svc.run_due()
    assert ran == [10, 20, 30]


def test_timers_many_cancels_compact() -> None:
    svc = TimerService(ManualClock(), start=False)
    handles = [svc.schedule(1000 + i, lambda: None) for i in range(500)]
    for h in handles[:400]:
        svc.cancel(h)
    assert svc.pending() == 100
    assert len(svc._heap) < 500


def test_timers_real_thread() -> None:
    svc = TimerService()
    try:
        done = threading.Event()
        order: list[int] = []
        now = svc.now_ns()

        def last() -> None:
            order.append(2)
            done.set()

        svc.schedule(now + 30_000_000, last)
        svc.schedule(now + 10_000_000, lambda: order.append(1))
        cancelled = svc.schedule(now + 20_000_000, lambda: order.append(99))
        svc.cancel(cancelled)
        assert done.wait(2.0)
        assert order == [1, 2]
        assert svc.now_ns() - now >= 30_000_000
        # an earlier deadline scheduled while the thread sleeps wakes it up
        late = threading.Event()
        early = threading.Event()
        svc.schedule(svc.now_ns() + 5 * 10**9, late.set)
        t0 = time.monotonic()
        svc.schedule(svc.now_ns() + 5_000_000, early.set)
        assert early.wait(2.0)
        assert time.monotonic() - t0 < 1.0
    finally:
        svc.close()
    assert not svc._thread or not svc._thread.is_alive()


# -- the assembled chip -------------------------------------------------------------


def w32(dev: object, off: int, value: int) -> None:
    dev.write(off, memoryview(bytearray(value.to_bytes(4, "little"))))  # type: ignore[attr-defined]


def r32(dev: object, off: int) -> int:
    buf = bytearray(4)
    dev.read(off, memoryview(buf))  # type: ignore[attr-defined]
    return int.from_bytes(buf, "little")


class Rig:
    def __init__(self, ncpu: int = 2) -> None:
        self.clock = ManualClock(10**9)
        self.timers = TimerService(self.clock, start=False)
        self.chip = EmulatedIrqChip(ncpu, tsc_hz=3 * 10**9, timers=self.timers)
        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        for base, length, dev, name in self.chip.pio_devices():
            self.pio.insert(dev, base, length, name)
        for base, length, dev, name in self.chip.mmio_devices():
            self.mmio.insert(dev, base, length, name)
        self.notified = [0] * ncpu
        for i in range(ncpu):
            self.chip.set_notify(i, self._notifier(i))

    def _notifier(self, i: int) -> Callable[[], None]:
        def f() -> None:
            self.notified[i] += 1
        return f

    def outb(self, port: int, value: int) -> None:
        self.pio.write(port, memoryview(bytearray([value])))

    def inb(self, port: int) -> int:
        buf = bytearray(1)
        self.pio.read(port, memoryview(buf))
        return buf[0]

    def ioapic_write(self, index: int, value: int) -> None:
        w32(self.mmio, 0xFEC00000, index)
        w32(self.mmio, 0xFEC00010, value)

    def ioapic_read(self, index: int) -> int:
        w32(self.mmio, 0xFEC00000, index)
        return r32(self.mmio, 0xFEC00010)

    def advance(self, ns: int, step: int = 100_000) -> None:
        done = 0
        while done < ns:
            d = min(step, ns - done)
            self.clock.advance(d)
            self.timers.run_due()
            done += d

    def apic_mode(self) -> None:
        # what Linux does with an IOAPIC: PICs fully masked, LAPICs software-enabled
        self.outb(0x21, 0xFF)
        self.outb(0xA1, 0xFF)
        for i in range(self.chip.num_cpus):
            w32(self.chip.lapic(i), 0xF0, 0x1FF)


def test_wiring_table() -> None:
    r = Rig()
    pio = {(b, n) for b, n, _, _ in r.chip.pio_devices()}
    assert pio == {(0x20, 2), (0xA0, 2), (0x4D0, 2), (0x40, 4), (0x61, 1)}
    assert r.chip.mmio_devices()[0][:2] == (0xFEC00000, 0x1000)
    assert r.chip.lapic(1).read_msr(0x1B) == 0xFEE00800  # AP: not BSP
    with pytest.raises(ValueError):
        r.chip.irq_line(2)
    with pytest.raises(ValueError):
        r.chip.irq_line(24)
    r.chip.close()


def test_isa_irq4_through_ioapic_end_to_end() -> None:
    r = Rig()
    r.apic_mode()
    r.ioapic_write(0x11 + 8, 0x00000000)  # pin 4 -> APIC ID 0
    r.ioapic_write(0x10 + 8, 0x24)  # edge, fixed, vector 0x24, unmasked
    serial = r.chip.irq_line(4)
    serial.set_level(True)
    assert r.notified[0] >= 1
    assert r.chip.has_interrupt(0)
    assert not r.chip.has_interrupt(1)
    assert r.chip.interrupt_for_cpu(0) == 0x24
    assert r.chip.interrupt_for_cpu(0) is None
    w32(r.chip.lapic(0), 0xB0, 0)  # EOI
    serial.set_level(False)
    serial.set_level(True)
    assert r.chip.interrupt_for_cpu(0) == 0x24
    # the masked PIC saw it too but does not interrupt
    assert not r.chip.pic.has_interrupt()


def test_level_pci_gsi_remote_irr_through_lapic_eoi() -> None:
    r = Rig()
    r.apic_mode()
    r.ioapic_write(0x11 + 2 * 17, 1 << 24)  # to APIC ID 1
    r.ioapic_write(0x10 + 2 * 17, 0xA051)  # level, active low, vector 0x51
    line = r.chip.irq_line(17)
    line.set_level(True)
    assert r.chip.interrupt_for_cpu(1) == 0x51
    assert r.ioapic_read(0x10 + 34) & 0x4000
    line.set_level(False)
    w32(r.chip.lapic(1), 0xB0, 0)  # EOI broadcast clears remote IRR
    assert not r.ioapic_read(0x10 + 34) & 0x4000
    assert r.chip.interrupt_for_cpu(1) is None


def test_pit_irq0_reaches_ioapic_pin2() -> None:
    r = Rig()
    r.apic_mode()
    r.ioapic_write(0x10 + 4, 0x30)  # pin 2 = ISA IRQ0 (MADT override)
    r.outb(0x43, 0x34)
    latch = 1193
    r.outb(0x40, latch & 0xFF)
    r.outb(0x40, latch >> 8)
    got = 0
    for _ in range(100):
        r.advance(1_000_000)
        v = r.chip.interrupt_for_cpu(0)
        if v is not None:
            assert v == 0x30
            got += 1
            w32(r.chip.lapic(0), 0xB0, 0)
    assert 99 <= got <= 101


def test_virtual_wire_mode_through_pic() -> None:
    r = Rig()
    # PIC programmed like Linux, IRQ0 unmasked; BSP LINT0 = ExtINT
    for port, val in ((0x20, 0x11), (0x21, 0x30), (0x21, 0x04), (0x21, 0x01),
                      (0xA0, 0x11), (0xA1, 0x38), (0xA1, 0x02), (0xA1, 0x01),
                      (0x21, 0xFE), (0xA1, 0xFF)):
        r.outb(port, val)
    lapic = r.chip.lapic(0)
    w32(lapic, 0xF0, 0x1FF)
    w32(lapic, 0x350, 0x700)  # LINT0: ExtINT, unmasked
    w32(r.chip.lapic(1), 0x350, 0x10700)  # APs keep LINT0 masked
    r.outb(0x43, 0x34)
    r.outb(0x40, 0xA9)
    r.outb(0x40, 0x04)
    r.advance(1_000_000)
    assert r.notified[0] >= 1
    assert r.chip.has_interrupt(0)
    assert not r.chip.has_interrupt(1)
    assert r.chip.interrupt_for_cpu(0) == 0x30
    assert r.chip.interrupt_for_cpu(0) is None  # IRQ0 in service at the PIC
    r.outb(0x20, 0x60)  # specific EOI IRQ0
    r.advance(1_000_000)
    assert r.chip.interrupt_for_cpu(0) == 0x30


def test_pic_passthrough_with_lapic_globally_disabled() -> None:
    r = Rig(1)
    r.chip.lapic(0).write_msr(0x1B, 0xFEE00100)  # EN clear (e.g. "nolapic")
    for port, val in ((0x20, 0x11), (0x21, 0x08), (0x21, 0x04), (0x21, 0x01), (0x21, 0xEF)):
        r.outb(port, val)
    r.chip.irq_line(4).set_level(True)
    assert r.chip.interrupt_for_cpu(0) == 0x0C


def test_lapic_timer_and_ipi_through_chip() -> None:
    r = Rig()
    r.apic_mode()
    lapic0 = r.chip.lapic(0)
    w32(lapic0, 0x3E0, 0xB)
    w32(lapic0, 0x320, 0x200EC)  # periodic, vector 0xEC as Linux's LOCAL_TIMER_VECTOR
    w32(lapic0, 0x380, 1_000_000)
    r.advance(1_000_000)
    assert r.chip.interrupt_for_cpu(0) == 0xEC
    w32(lapic0, 0xB0, 0)
    w32(lapic0, 0x310, 1 << 24)
    w32(lapic0, 0x300, 0x40FD)  # IPI vector 0xFD to APIC 1
    assert r.notified[1] >= 1
    assert r.chip.interrupt_for_cpu(1) == 0xFD


def test_init_sipi_callbacks() -> None:
    r = Rig()
    events: list[tuple[str, int]] = []
    r.chip.set_init_sipi(1, lambda: events.append(("init", 1)),
                         lambda v: events.append(("sipi", v)))
    lapic0 = r.chip.lapic(0)
    w32(lapic0, 0x310, 1 << 24)
    w32(lapic0, 0x300, 0xC500)
    w32(lapic0, 0x300, 0x8500)
    w32(lapic0, 0x300, 0x0609)
    assert events == [("init", 1), ("sipi", 9)]


def test_concurrent_irqs_and_eois_do_not_deadlock() -> None:
    """Device threads, IPIs, EOIs and a real timer thread at once (lock order check)."""
    chip = EmulatedIrqChip(2, tsc_hz=10**9)
    try:
        for i in range(2):
            w32(chip.lapic(i), 0xF0, 0x1FF)
            w32(chip.lapic(i), 0x3E0, 0xB)
            w32(chip.lapic(i), 0x320, 0x200EC)
            w32(chip.lapic(i), 0x380, 200_000)
        for pin, cpu in ((4, 0), (17, 1)):
            chip.ioapic.write(0, memoryview(bytearray([0x11 + 2 * pin, 0, 0, 0])))
            w32(chip.ioapic, 0x10, cpu << 24)
            chip.ioapic.write(0, memoryview(bytearray([0x10 + 2 * pin, 0, 0, 0])))
            w32(chip.ioapic, 0x10, 0x8000 | (0x40 + pin))
        chip.pit.write_port(3, 0x34)
        chip.pit.write_port(0, 0x20)
        chip.pit.write_port(0, 0x00)
        stop = threading.Event()
        errors: list[BaseException] = []
        taken = [0, 0]

        def device(gsi: int) -> None:
            line = chip.irq_line(gsi)
            while not stop.is_set():
                line.set_level(True)
                line.set_level(False)

        def vcpu(i: int) -> None:
            try:
                lapic = chip.lapic(i)
                while not stop.is_set():
                    v = chip.interrupt_for_cpu(i)
                    if v is not None:
                        taken[i] += 1
                        w32(lapic, 0xB0, 0)
                    w32(lapic, 0x310, (1 - i) << 24)
                    w32(lapic, 0x300, 0x40F0)
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=device, args=(g,)) for g in (4, 17)]
        threads += [threading.Thread(target=vcpu, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(5.0)
            assert not t.is_alive(), "deadlock"
        assert not errors
        assert all(taken)
    finally:
        chip.close()


def test_chip_state_roundtrip_pit_through_ioapic_keeps_ticking() -> None:
    """The assembled chip: PIT channel 0 periodic into IOAPIC pin 2, one
    interrupt pending in the LAPIC at the save. A fresh chip restored from
    the (encoded) record announces the pending interrupt and goes on ticking;
    restoring into the used chip drops what it did since."""
    from pyvirt.hypervisor.emulated.irqchip import IrqChipState
    from pyvirt.state import decode, encode

    r = Rig()
    r.apic_mode()
    r.ioapic_write(0x10 + 4, 0x30)
    r.outb(0x43, 0x34)
    r.outb(0x40, 1193 & 0xFF)
    r.outb(0x40, 1193 >> 8)  # ~1 ms
    r.advance(1_500_000)
    assert r.chip.has_interrupt(0)  # taken by nobody yet
    st = decode(encode(r.chip.save_state()), IrqChipState, part="irqchip")
    r2 = Rig()
    r2.chip.restore_state(st, elapsed_ns=3_000_000)
    assert r2.notified[0] >= 1  # INTR raised for the pending interrupt
    assert r2.chip.interrupt_for_cpu(0) == 0x30
    w32(r2.chip.lapic(0), 0xB0, 0)
    got = 0
    for _ in range(10):
        r2.advance(1_000_000)
        if r2.chip.interrupt_for_cpu(0) == 0x30:
            got += 1
            w32(r2.chip.lapic(0), 0xB0, 0)
    assert 9 <= got <= 11
    # into the used chip: the PIT reprogrammed since is forgotten
    r2.outb(0x43, 0x30)
    r2.chip.restore_state(st)
    assert r2.timers.pending() == 1  # only the restored PIT timer
    assert r2.chip.interrupt_for_cpu(0) == 0x30
    r2.chip.close()
