"""The emulated local APIC: priorities, EOI, TPR, timer modes, x2APIC MSRs, IPIs."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pyvirt.hypervisor.emulated.lapic import (
    APIC_BASE_EN,
    APIC_BASE_EXTD,
    ApicBus,
    ApicMsrFault,
    LocalApic,
)
from pyvirt.hypervisor.emulated.timers import ManualClock, TimerService

TSC_HZ = 2_000_000_000


class Rig:
    def __init__(self, ncpu: int = 1) -> None:
        self.clock = ManualClock(1_000_000)
        self.timers = TimerService(self.clock, start=False)
        self.bus = ApicBus()
        self.notified = [0] * ncpu
        self.eois: list[int] = []
        self.inits: list[int] = []
        self.sipis: list[tuple[int, int]] = []
        self.apics: list[LocalApic] = []
        for i in range(ncpu):
            a = LocalApic(i, bus=self.bus, timers=self.timers, tsc_hz=TSC_HZ,
                          now_tsc=lambda: self.clock.now_ns * 2, bsp=(i == 0),
                          notify=self._notifier(i), eoi_broadcast=self.eois.append,
                          on_init=self._init_cb(i), on_sipi=self._sipi_cb(i))
            self.apics.append(a)

    def _notifier(self, i: int) -> Callable[[], None]:
        def f() -> None:
            self.notified[i] += 1
        return f

    def _init_cb(self, i: int) -> Callable[[], None]:
        return lambda: self.inits.append(i)

    def _sipi_cb(self, i: int) -> Callable[[int], None]:
        return lambda v: self.sipis.append((i, v))

    def advance(self, ns: int) -> None:
        self.clock.advance(ns)
        self.timers.run_due()


def wr(a: LocalApic, off: int, value: int) -> None:
    a.write(off, memoryview(bytearray(value.to_bytes(4, "little"))))


def rd(a: LocalApic, off: int) -> int:
    buf = bytearray(4)
    a.read(off, memoryview(buf))
    return int.from_bytes(buf, "little")


def enable(a: LocalApic) -> None:
    wr(a, 0xF0, 0x1FF)  # SVR: software enable, spurious vector 0xFF


def test_reset_state_and_version() -> None:
    r = Rig()
    a = r.apics[0]
    assert rd(a, 0x30) == 0x00050014
    assert rd(a, 0x20) == 0
    assert rd(a, 0xF0) == 0xFF
    assert rd(a, 0xE0) == 0xFFFFFFFF
    assert a.read_msr(0x1B) == 0xFEE00000 | 0x900  # BSP + enable
    assert r.apics[0].bsp
    assert rd(a, 0x350) == 0x700  # BSP LINT0: virtual wire, as firmware leaves it
    assert rd(r.apics[0], 0x360) & 0x10000  # other LVTs masked
    ap = Rig(2).apics[1]
    assert rd(ap, 0x350) == 0x10000


def test_disabled_drops_fixed_interrupts() -> None:
    r = Rig()
    a = r.apics[0]
    assert not a.accept(0x40, False)
    enable(a)
    assert a.accept(0x40, False)
    assert a.get_interrupt() == 0x40


def test_priority_and_eoi_order() -> None:
    r = Rig()
    a = r.apics[0]
    enable(a)
    a.accept(0x31, False)
    a.accept(0x52, False)
    a.accept(0x41, False)
    assert r.notified[0] >= 1
    assert rd(a, 0x200 + 0x10 * (0x52 // 32)) & (1 << (0x52 % 32))
    assert a.get_interrupt() == 0x52
    # 0x41 is a lower class than the in-service 0x52: held
    assert a.get_interrupt() is None
    assert rd(a, 0xA0) == 0x50  # PPR follows the ISR class
    wr(a, 0xB0, 0)  # EOI clears 0x52
    assert a.get_interrupt() == 0x41
    # a higher class nests above 0x41
    a.accept(0x60, False)
    assert a.get_interrupt() == 0x60
    wr(a, 0xB0, 0)
    assert rd(a, 0x100 + 0x10 * (0x41 // 32)) & (1 << (0x41 % 32))  # 0x41 still in service
    wr(a, 0xB0, 0)
    assert a.get_interrupt() == 0x31
    wr(a, 0xB0, 0)
    assert a.get_interrupt() is None
    assert r.eois == []  # all edge-triggered: no EOI broadcast


def test_same_class_waits() -> None:
    r = Rig()
    a = r.apics[0]
    enable(a)
    a.accept(0x40, False)
    assert a.get_interrupt() == 0x40
    a.accept(0x4F, False)  # same priority class as in-service 0x40
    assert a.get_interrupt() is None
    wr(a, 0xB0, 0)
    assert a.get_interrupt() == 0x4F


def test_tpr_masks() -> None:
    r2 = Rig()
    b = r2.apics[0]
    enable(b)
    wr(b, 0x80, 0x50)
    b.accept(0x45, False)
    b.accept(0x55, False)  # class 5 is not above TPR class 5: held
    assert not b.has_interrupt()
    assert b.get_interrupt() is None
    b.accept(0x61, False)
    assert b.get_interrupt() == 0x61
    wr(b, 0xB0, 0)
    before = r2.notified[0]
    wr(b, 0x80, 0x00)  # lowering TPR makes 0x55 deliverable and notifies
    assert r2.notified[0] > before
    assert b.get_interrupt() == 0x55
    wr(b, 0xB0, 0)
    assert b.get_interrupt() == 0x45


def test_level_triggered_eoi_broadcast() -> None:
    r = Rig()
    a = r.apics[0]
    enable(a)
    a.accept(0x70, True)
    assert rd(a, 0x180 + 0x10 * (0x70 // 32)) & (1 << (0x70 % 32))  # TMR
    assert a.get_interrupt() == 0x70
    wr(a, 0xB0, 0)
    assert r.eois == [0x70]


def test_illegal_vector_sets_esr() -> None:
    r = Rig()
    a = r.apics[0]
    enable(a)
    assert not a.accept(5, False)
    wr(a, 0x280, 0)  # latch
    assert rd(a, 0x280) & 0x40


def test_software_disable_masks_lvt() -> None:
    r = Rig()
    a = r.apics[0]
    wr(a, 0x320, 0x20)  # while disabled: stays masked
    assert rd(a, 0x320) == 0x10020
    enable(a)
    wr(a, 0x320, 0x20)
    assert rd(a, 0x320) == 0x20
    wr(a, 0xF0, 0xFF)
    assert rd(a, 0x320) & 0x10000


def test_timer_one_shot() -> None:
    r = Rig()
    a = r.apics[0]
    enable(a)
    wr(a, 0x3E0, 0xB)  # divide by 1: 1 count per ns at 1 GHz
    wr(a, 0x320, 0x30)  # one-shot, vector 0x30
    wr(a, 0x380, 10_000)
    assert rd(a, 0x390) == 10_000
    r.advance(4_000)
    assert rd(a, 0x390) == 6_000
    assert a.get_interrupt() is None
    r.advance(6_000)
    assert a.get_interrupt() == 0x30
    assert rd(a, 0x390) == 0
    wr(a, 0xB0, 0)
    r.advance(100_000)
    assert a.get_interrupt() is None


def test_timer_divider() -> None:
    r = Rig()
    a = r.apics[0]
    enable(a)
    wr(a, 0x3E0, 0x3)  # divide by 16
    wr(a, 0x320, 0x30)
    wr(a, 0x380, 1000)
    r.advance(15_999)
    assert a.get_interrupt() is None
    assert rd(a, 0x390) == 1
    r.advance(1)
    assert a.get_interrupt() == 0x30


def test_timer_periodic() -> None:
    r = Rig()
    a = r.apics[0]
    enable(a)
    wr(a, 0x3E0, 0xB)
    wr(a, 0x320, 0x20031)  # periodic, vector 0x31
    wr(a, 0x380, 1_000_000)  # 1 ms
    fired = 0
    for _ in range(10):
        r.advance(1_000_000)
        if a.get_interrupt() == 0x31:
            fired += 1
            wr(a, 0xB0, 0)
    assert fired == 10
    r.advance(250_000)
    assert rd(a, 0x390) == 750_000
    # stopping by writing 0
    wr(a, 0x380, 0)
    r.advance(5_000_000)
    assert a.get_interrupt() is None
    assert r.timers.pending() == 0


def test_timer_masked_counts_but_no_interrupt() -> None:
    r = Rig()
    a = r.apics[0]
    enable(a)
    wr(a, 0x3E0, 0xB)
    wr(a, 0x320, 0x10030)
    wr(a, 0x380, 1000)
    r.advance(2000)
    assert a.get_interrupt() is None


def test_timer_tsc_deadline() -> None:
    r = Rig()
    a = r.apics[0]
    enable(a)
    # the deadline MSR is ignored outside TSC-deadline mode
    assert a.write_msr(0x6E0, 123)
    assert a.read_msr(0x6E0) == 0
    wr(a, 0x320, 0x40032)  # TSC-deadline mode, vector 0x32
    now_tsc = r.clock.now_ns * 2
    assert a.write_msr(0x6E0, now_tsc + 2_000_000)  # 1 ms at 2 GHz
    assert a.read_msr(0x6E0) == now_tsc + 2_000_000
    wr(a, 0x380, 5)  # initial count is ignored in TSC-deadline mode
    assert rd(a, 0x380) == 0
    r.advance(999_999)
    assert a.get_interrupt() is None
    r.advance(1)
    assert a.get_interrupt() == 0x32
    assert a.read_msr(0x6E0) == 0
    wr(a, 0xB0, 0)
    # a deadline in the past fires at once
    assert a.write_msr(0x6E0, 1)
    assert a.get_interrupt() == 0x32
    wr(a, 0xB0, 0)
    # re-arm then disarm with 0
    a.write_msr(0x6E0, r.clock.now_ns * 2 + 1000)
    a.write_msr(0x6E0, 0)
    r.advance(10_000)
    assert a.get_interrupt() is None


def test_timer_mode_change_disarms() -> None:
    r = Rig()
    a = r.apics[0]
    enable(a)
    wr(a, 0x320, 0x30)
    wr(a, 0x380, 1000)
    wr(a, 0x320, 0x20030)  # -> periodic: disarmed
    assert rd(a, 0x380) == 0
    r.advance(10_000)
    assert a.get_interrupt() is None


def test_stale_timer_callback_is_ignored() -> None:
    r = Rig()
    a = r.apics[0]
    enable(a)
    wr(a, 0x3E0, 0xB)
    wr(a, 0x320, 0x30)
    wr(a, 0x380, 1000)
    gen = a._timer_gen
    wr(a, 0x380, 0)  # cancel
    a._timer_expired(gen)  # as if the timer thread had already picked it up
    assert a.get_interrupt() is None


def test_x2apic_msrs() -> None:
    r = Rig(2)
    a = r.apics[1]
    with pytest.raises(ApicMsrFault):
        a.read_msr(0x802)  # not in x2APIC mode yet
    # disabled -> x2APIC directly is invalid; EXTD without EN is invalid
    assert not a.write_msr(0x1B, 0xFEE00000 | APIC_BASE_EXTD)
    assert a.write_msr(0x1B, 0xFEE00000 | APIC_BASE_EN | APIC_BASE_EXTD)
    assert a.x2apic
    assert a.read_msr(0x802) == 1
    assert a.read_msr(0x803) == 0x00050014
    assert a.read_msr(0x80D) == (0 << 16) | (1 << 1)  # logical x2APIC ID
    assert a.write_msr(0x80F, 0x1FF)
    assert a.read_msr(0x80F) == 0x1FF
    assert a.write_msr(0x808, 0x20)
    assert a.read_msr(0x808) == 0x20
    assert not a.write_msr(0x802, 5)  # ID is read-only
    assert not a.write_msr(0x80D, 5)  # LDR is read-only
    assert not a.write_msr(0x80E, 0)  # no DFR in x2APIC mode
    assert not a.write_msr(0x80B, 1)  # EOI must be written with 0
    assert not a.write_msr(0x808, 1 << 32)  # reserved upper half
    with pytest.raises(ApicMsrFault):
        a.read_msr(0x80B)  # EOI is write-only
    with pytest.raises(ApicMsrFault):
        a.read_msr(0x83F)  # self-IPI is write-only
    # self IPI
    assert a.write_msr(0x83F, 0x45)
    assert a.get_interrupt() == 0x45
    assert a.read_msr(0x810 + 0x45 // 32) & (1 << (0x45 % 32))  # ISR
    assert a.write_msr(0x80B, 0)
    assert a.read_msr(0x810 + 0x45 // 32) == 0
    # xAPIC MMIO is gone in x2APIC mode
    assert rd(a, 0x30) == 0
    # x2APIC -> xAPIC directly is invalid; -> disabled is fine and resets
    assert not a.write_msr(0x1B, 0xFEE00000 | APIC_BASE_EN)
    assert a.write_msr(0x1B, 0xFEE00000)
    assert not a.hw_enabled and not a.x2apic
    assert a.read_msr(0x1B) == 0xFEE00000
    assert a.write_msr(0x1B, 0xFEE00000 | APIC_BASE_EN)
    assert rd(a, 0xF0) == 0xFF


def test_x2apic_icr_ipi() -> None:
    r = Rig(2)
    for a in r.apics:
        a.write_msr(0x1B, 0xFEE00000 | APIC_BASE_EN | APIC_BASE_EXTD | (0x100 if a.bsp else 0))
        a.write_msr(0x80F, 0x1FF)
    a0, a1 = r.apics
    assert a0.write_msr(0x830, (1 << 32) | 0x4050)  # fixed, vector 0x50, assert, to ID 1
    assert a0.read_msr(0x830) == (1 << 32) | 0x4050
    assert a1.get_interrupt() == 0x50
    assert a0.get_interrupt() is None


def _ipi(a: LocalApic, dest: int, low: int) -> None:
    wr(a, 0x310, dest << 24)
    wr(a, 0x300, low)


def test_xapic_ipi_physical_logical_and_shorthands() -> None:
    r = Rig(4)
    for a in r.apics:
        enable(a)
    a0, a1 = r.apics[:2]
    _ipi(a0, 2, 0x4041)  # physical to APIC 2
    assert [a.get_interrupt() for a in r.apics] == [None, None, 0x41, None]
    for a in r.apics:
        wr(a, 0xB0, 0)
    # flat logical: LDR bit per CPU
    for i, a in enumerate(r.apics):
        wr(a, 0xD0, (1 << i) << 24)
    _ipi(a0, 0b1010, 0x4842)  # logical to CPUs 1 and 3
    assert [a.get_interrupt() for a in r.apics] == [None, 0x42, None, 0x42]
    for a in r.apics:
        wr(a, 0xB0, 0)
    # cluster logical: cluster 1, members 0 and 1
    for i, a in enumerate(r.apics):
        wr(a, 0xE0, 0x0FFFFFFF)
        wr(a, 0xD0, ((1 << 4) | (1 << i)) << 24 if i < 2 else ((2 << 4) | 1) << 24)
    _ipi(a0, 0x13, 0x4843)
    assert [a.get_interrupt() for a in r.apics] == [0x43, 0x43, None, None]
    for a in r.apics:
        wr(a, 0xB0, 0)
    _ipi(a1, 0, 0x44044)  # shorthand self
    assert [a.get_interrupt() for a in r.apics] == [None, 0x44, None, None]
    wr(a1, 0xB0, 0)
    _ipi(a1, 0, 0x84045)  # all including self
    assert [a.get_interrupt() for a in r.apics] == [0x45] * 4
    for a in r.apics:
        wr(a, 0xB0, 0)
    _ipi(a1, 0, 0xC4046)  # all excluding self
    assert [a.get_interrupt() for a in r.apics] == [0x46, None, 0x46, 0x46]
    for a in r.apics:
        wr(a, 0xB0, 0)
    _ipi(a0, 0xFF, 0x4047)  # physical broadcast
    assert [a.get_interrupt() for a in r.apics] == [0x47] * 4


def test_lowest_priority_picks_one() -> None:
    r = Rig(2)
    for a in r.apics:
        enable(a)
    wr(r.apics[0], 0x80, 0x30)
    _ipi(r.apics[0], 0xFF, 0x4150)  # lowest priority, broadcast
    assert r.apics[0].get_interrupt() is None
    assert r.apics[1].get_interrupt() == 0x50


def test_nmi_ipi() -> None:
    r = Rig(2)
    _ipi(r.apics[0], 1, 0x4400)
    assert r.apics[1].nmi_pending()
    assert r.apics[1].take_nmi()
    assert not r.apics[1].take_nmi()
    assert r.notified[1] == 1


def test_init_sipi_sequence_as_linux_sends_it() -> None:
    r = Rig(2)
    bsp, ap = r.apics
    enable(bsp)
    enable(ap)
    wr(ap, 0x80, 0x20)
    # INIT assert, INIT level de-assert (ignored), then two SIPIs (vector 0x9A)
    _ipi(bsp, 1, 0xC500)
    assert r.inits == [1]
    assert rd(ap, 0xF0) == 0xFF and rd(ap, 0x80) == 0  # INIT reset the AP's APIC
    assert rd(ap, 0x20) == 1 << 24  # but kept its ID
    _ipi(bsp, 1, 0x8500)
    assert r.inits == [1]
    _ipi(bsp, 1, 0x469A)
    _ipi(bsp, 1, 0x469A)
    assert r.sipis == [(1, 0x9A), (1, 0x9A)]
    assert ap.sipi_vector == 0x9A
    assert rd(bsp, 0x300) & 0x1000 == 0  # delivery status: idle


def test_send_illegal_vector() -> None:
    r = Rig(2)
    for a in r.apics:
        enable(a)
    _ipi(r.apics[0], 1, 0x4005)
    assert r.apics[1].get_interrupt() is None
    wr(r.apics[0], 0x280, 0)
    assert rd(r.apics[0], 0x280) & 0x20


def test_lint0_extint_and_nmi() -> None:
    r = Rig()
    a = r.apics[0]
    acks: list[int] = []

    def ack() -> int | None:
        acks.append(1)
        return 0x30

    a.extint_ack = ack
    enable(a)
    wr(a, 0x350, 0x700)  # LINT0 ExtINT, unmasked
    a.set_lint(0, True)
    assert r.notified[0] == 1
    assert a.has_interrupt()
    assert a.get_interrupt() == 0x30
    assert acks == [1]
    a.set_lint(0, False)
    wr(a, 0x360, 0x400)  # LINT1 NMI
    a.set_lint(1, True)
    assert a.take_nmi()


def test_globally_disabled_bsp_passes_pic_through() -> None:
    r = Rig()
    a = r.apics[0]
    a.extint_ack = lambda: 0x38
    assert a.write_msr(0x1B, 0xFEE00000 | 0x100)  # EN clear
    a.set_lint(0, True)
    assert a.get_interrupt() == 0x38


def test_mmio_byte_reads_and_bad_writes() -> None:
    r = Rig()
    a = r.apics[0]
    buf = bytearray(1)
    a.read(0x32, memoryview(buf))
    assert buf[0] == 0x05  # version register byte 2: max LVT
    a.write(0x80, memoryview(bytearray(b"\x40")))  # byte write: ignored
    assert rd(a, 0x80) == 0


@pytest.mark.parametrize("polarity", [0, 0x2000])
def test_lint0_extint_follows_the_8259_output_whatever_the_polarity(polarity: int) -> None:
    """Found by the guest-side stress test: LINT0 as ExtINT with the polarity bit
    set (active low) and the 8259's INT low counted as asserted, so has_interrupt()
    stayed true while the 8259 had no vector to give; the vCPU thread acknowledged
    nothing, re-raised INTR and never ran another guest instruction."""
    r = Rig()
    a = r.apics[0]
    acks: list[int] = []

    def ack() -> int | None:
        acks.append(1)
        return 0x30 if a._lint_level[0] else None

    a.extint_ack = ack
    enable(a)
    wr(a, 0x350, 0x700 | polarity)  # LINT0 ExtINT, unmasked
    assert not a.has_interrupt()  # INT low: nothing to acknowledge
    assert a.get_interrupt() is None
    a.set_lint(0, True)
    assert a.has_interrupt()
    assert a.get_interrupt() == 0x30
    a.set_lint(0, False)
    assert not a.has_interrupt()


# -- saved state -------------------------------------------------------------------


def _roundtrip(a: LocalApic) -> object:
    from pyvirt.hypervisor.emulated.lapic import LapicState
    from pyvirt.state import decode, encode

    return decode(encode(a.save_state()), LapicState, part="lapic0")


def test_state_roundtrip_registers() -> None:
    r = Rig()
    a = r.apics[0]
    enable(a)
    wr(a, 0x80, 0x20)  # TPR
    wr(a, 0xD0, 0x0300_0000)  # LDR
    wr(a, 0x350, 0x8700)  # LINT0 level ExtINT
    a.accept(0x41, True)
    a.accept(0xF0, False)
    assert a.get_interrupt() == 0xF0  # in service
    st = _roundtrip(a)
    r2 = Rig()
    b = r2.apics[0]
    b.restore_state(st)  # type: ignore[arg-type]
    for off in (0x20, 0x80, 0xA0, 0xD0, 0xE0, 0xF0, 0x350, 0x320):
        assert rd(b, off) == rd(a, off), hex(off)
    for base in (0x100, 0x180, 0x200):
        assert [rd(b, base + 16 * i) for i in range(8)] == [rd(a, base + 16 * i)
                                                              for i in range(8)]
    assert r2.notified[0] == 0  # 0x41 is below the in-service 0xF0: not deliverable
    wr(b, 0xB0, 0)  # EOI of 0xF0
    assert b.get_interrupt() == 0x41


def test_state_restore_periodic_timer_keeps_phase_without_catch_up() -> None:
    r = Rig()
    a = r.apics[0]
    enable(a)
    wr(a, 0x3E0, 0xB)
    wr(a, 0x320, 0x20031)  # periodic, 1 ms
    wr(a, 0x380, 1_000_000)
    r.advance(300_000)
    st = _roundtrip(a)
    r2 = Rig()
    b = r2.apics[0]
    # 5.5 ms later: five periods missed -> one interrupt now, then the old phase
    b.restore_state(st, elapsed_ns=5_500_000)  # type: ignore[arg-type]
    r2.advance(0)
    assert b.get_interrupt() == 0x31
    wr(b, 0xB0, 0)
    assert b.get_interrupt() is None  # no storm: the missed periods are one interrupt
    # next boundary: 0.7 + 6 ms after the old start = 0.2 ms from now
    r2.advance(199_999)
    assert b.get_interrupt() is None
    r2.advance(1)
    assert b.get_interrupt() == 0x31
    assert r2.timers.pending() == 1


def test_state_restore_one_shot_fires_once_or_on_time() -> None:
    r = Rig()
    a = r.apics[0]
    enable(a)
    wr(a, 0x3E0, 0xB)
    wr(a, 0x320, 0x31)  # one-shot
    wr(a, 0x380, 1_000_000)
    r.advance(400_000)
    st = _roundtrip(a)
    late = Rig()
    b = late.apics[0]
    b.restore_state(st, elapsed_ns=10_000_000)  # type: ignore[arg-type]
    late.advance(0)
    assert b.get_interrupt() == 0x31
    wr(b, 0xB0, 0)
    late.advance(10_000_000)
    assert b.get_interrupt() is None and late.timers.pending() == 0
    assert rd(b, 0x390) == 0
    soon = Rig()
    c = soon.apics[0]
    c.restore_state(st, elapsed_ns=100_000)  # type: ignore[arg-type]
    assert rd(c, 0x390) == 500_000  # 1 ms - 0.4 ms - 0.1 ms
    soon.advance(499_999)
    assert c.get_interrupt() is None
    soon.advance(1)
    assert c.get_interrupt() == 0x31


def test_state_restore_tsc_deadline_compares_with_the_guest_tsc() -> None:
    r = Rig()
    a = r.apics[0]
    enable(a)
    wr(a, 0x320, 0x40032)
    a.write_msr(0x6E0, r.clock.now_ns * 2 + 2_000_000)  # 1 ms ahead
    st = _roundtrip(a)
    r2 = Rig()
    b = r2.apics[0]
    b.restore_state(st)  # type: ignore[arg-type]  # same guest TSC (Rig clocks agree)
    r2.advance(999_999)
    assert b.get_interrupt() is None
    r2.advance(1)
    assert b.get_interrupt() == 0x32
    # restored on a clock already past the deadline: fires once, at once
    r3 = Rig()
    r3.clock.advance(5_000_000)
    c = r3.apics[0]
    c.restore_state(st)  # type: ignore[arg-type]
    assert c.get_interrupt() == 0x32
    assert r3.timers.pending() == 0


def test_state_restore_into_a_used_lapic_cancels_its_timer() -> None:
    r = Rig()
    a = r.apics[0]
    st = a.save_state()  # power-up state: no timer
    enable(a)
    wr(a, 0x3E0, 0xB)
    wr(a, 0x320, 0x20031)
    wr(a, 0x380, 1000)
    a.accept(0x50, False)
    assert r.timers.pending() == 1
    a.restore_state(st)
    assert r.timers.pending() == 0
    r.advance(10_000)
    assert a.get_interrupt() is None
    assert rd(a, 0xF0) == 0xFF


@pytest.mark.parametrize("field,value", [
    ("version", 99), ("tpr", 0x100), ("lvt", (0,) * 5), ("isr", bytes(31)),
    ("svr", -1), ("base_msr", 0xFEE0_0001), ("timer_next_ns", 1 << 70),
    ("lint_level", (True,)), ("sipi_vector", 256), ("nmi_pending", 1),
])
def test_state_bad_records_are_refused(field: str, value: object) -> None:
    import dataclasses

    from pyvirt.state import StateError

    a = Rig().apics[0]
    st = dataclasses.replace(a.save_state(), **{field: value})
    with pytest.raises(StateError, match="lapic0"):
        a.restore_state(st)
