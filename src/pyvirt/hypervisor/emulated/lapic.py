"""The local APIC of one vCPU, in xAPIC (MMIO) and x2APIC (MSR) modes.

References are to the Intel SDM vol. 3A ch. 11 ("Advanced Programmable
Interrupt Controller (APIC)"): register map in table 11-1 (xAPIC) and
table 11-6 (x2APIC MSRs), priorities in 11.8.3.1, EOI in 11.8.5, ICR/IPIs in
11.6, the timer in 11.5.4, IA32_APIC_BASE in 11.4.4 and the x2APIC state
transitions in 11.12.5.

Threading: every ``LocalApic`` has one lock. Its vCPU thread does MMIO/MSR
accesses and ``get_interrupt``; other vCPU threads (IPIs), the IOAPIC (any
device thread) and the timer thread call ``accept``/``set_lint``. Everything
that leaves this object (IPIs to other LAPICs, the EOI broadcast to the
IOAPIC, the PIC acknowledge for ExtINT, ``notify``, ``on_init``/``on_sipi``) is
collected under the lock and run *after* releasing it. So a LAPIC lock is never
held while another lock is taken except the timer service's internal lock, and
the global order is PIT -> PIC -> IOAPIC -> LAPIC -> timer service.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from pyvirt.hypervisor.emulated._staterec import (
    MAX_REL_NS,
    bits_from_bytes,
    bits_to_bytes,
    check_bool,
    check_int,
    check_len,
)
from pyvirt.hypervisor.emulated.timers import TimerHandle, TimerService
from pyvirt.state import StateError, check_version

__all__ = [
    "APIC_BUS_HZ",
    "APIC_VERSION",
    "DM_EXTINT",
    "DM_FIXED",
    "DM_INIT",
    "DM_LOWEST",
    "DM_NMI",
    "DM_SIPI",
    "DM_SMI",
    "MSR_IA32_APIC_BASE",
    "MSR_IA32_TSC_DEADLINE",
    "ApicBus",
    "ApicMsrFault",
    "LapicState",
    "LocalApic",
]

log = logging.getLogger(__name__)

#: The APIC timer's input clock ("bus clock" before the divider), SDM 11.5.4.
#: 1 GHz = one tick per nanosecond, as KVM does; tell the guest through CPUID
#: 0x15 (crystal clock) or let it calibrate against the PIT.
APIC_BUS_HZ = 1_000_000_000

#: Version register: integrated APIC version 0x14, Max LVT Entry = 5 (six LVT
#: entries: timer, thermal, perf, LINT0, LINT1, error; no CMCI); bit 24 (EOI
#: broadcast suppression) clear: not supported. SDM 11.4.8.
APIC_VERSION = 0x0005_0014

MSR_IA32_APIC_BASE = 0x1B
MSR_IA32_TSC_DEADLINE = 0x6E0
X2APIC_MSR_FIRST = 0x800
X2APIC_MSR_LAST = 0x8FF

APIC_BASE_BSP = 1 << 8
APIC_BASE_EXTD = 1 << 10  # x2APIC mode
APIC_BASE_EN = 1 << 11  # global enable
APIC_DEFAULT_BASE = 0xFEE0_0000

# Delivery modes (ICR bits 10:8, LVT bits 10:8, IOAPIC RTE bits 10:8), SDM 11.6.1.
DM_FIXED = 0
DM_LOWEST = 1
DM_SMI = 2
DM_NMI = 4
DM_INIT = 5
DM_SIPI = 6
DM_EXTINT = 7

# Register offsets in the xAPIC page (SDM table 11-1); x2APIC MSR = 0x800 + offset/16.
R_ID = 0x020
R_VERSION = 0x030
R_TPR = 0x080
R_APR = 0x090
R_PPR = 0x0A0
R_EOI = 0x0B0
R_RRD = 0x0C0
R_LDR = 0x0D0
R_DFR = 0x0E0
R_SVR = 0x0F0
R_ISR = 0x100
R_TMR = 0x180
R_IRR = 0x200
R_ESR = 0x280
R_ICR_LO = 0x300
R_ICR_HI = 0x310
R_LVT_TIMER = 0x320
R_LVT_THERMAL = 0x330
R_LVT_PERF = 0x340
R_LVT_LINT0 = 0x350
R_LVT_LINT1 = 0x360
R_LVT_ERROR = 0x370
R_TMICT = 0x380
R_TMCCT = 0x390
R_TDCR = 0x3E0
R_SELF_IPI = 0x3F0  # x2APIC only (MSR 0x83F)

LVT_TIMER, LVT_THERMAL, LVT_PERF, LVT_LINT0, LVT_LINT1, LVT_ERROR = range(6)
_LVT_OFFSETS = (R_LVT_TIMER, R_LVT_THERMAL, R_LVT_PERF, R_LVT_LINT0, R_LVT_LINT1, R_LVT_ERROR)
# Writable bits per LVT entry (SDM figure 11-8): delivery status (bit 12) and
# remote IRR (bit 14) are read-only; timer and error have no delivery mode.
_LVT_WRITABLE = (0x700FF, 0x107FF, 0x107FF, 0x1A7FF, 0x1A7FF, 0x100FF)
LVT_MASKED = 1 << 16
LVT_LEVEL = 1 << 15
LVT_ACTIVE_LOW = 1 << 13

TIMER_ONESHOT = 0
TIMER_PERIODIC = 1
TIMER_TSC_DEADLINE = 2

SVR_ENABLE = 1 << 8
# ESR bits (SDM figure 11-9)
ESR_SEND_ILLEGAL_VECTOR = 1 << 5
ESR_RECV_ILLEGAL_VECTOR = 1 << 6
ESR_ILLEGAL_REGISTER = 1 << 7

# ICR destination shorthands (bits 19:18)
SH_NONE, SH_SELF, SH_ALL, SH_OTHERS = range(4)

#: A periodic timer never fires more often than this (KVM clamps similarly):
#: a guest writing a tiny initial count must not flood the host.
MIN_PERIOD_NS = 100_000

_ALL_X2APIC = 0xFFFF_FFFF
_U32 = 0xFFFF_FFFF

Action = Callable[[], None]


class ApicMsrFault(Exception):
    """The MSR access raises #GP(0) in the guest (SDM 11.12.1.3)."""


def _top(bits: int) -> int:
    """Highest set bit of a 256-bit vector set, or -1."""
    return bits.bit_length() - 1


class ApicBus:
    """The system bus between the IOAPIC and the local APICs (and between LAPICs).

    Destination matching reads each LAPIC's ID/LDR/DFR without its lock: those
    are plain ints (atomic to read) and the guest changes them only at boot.
    """

    def __init__(self) -> None:
        self._lapics: list[LocalApic] = []

    def attach(self, lapic: LocalApic) -> None:
        self._lapics.append(lapic)

    @property
    def lapics(self) -> tuple[LocalApic, ...]:
        return tuple(self._lapics)

    def deliver(self, *, dest: int, logical: bool, mode: int, vector: int,
                trigger_level: bool = False, assert_level: bool = True,
                shorthand: int = SH_NONE, source: LocalApic | None = None,
                short_dest: bool = False) -> int:
        """Send one interrupt message; return how many LAPICs accepted it.

        ``short_dest`` marks an 8-bit destination (IOAPIC or xAPIC ICR): 0xFF
        then means broadcast also to x2APIC-mode LAPICs, as KVM treats it.
        """
        if shorthand == SH_SELF:
            targets = [source] if source is not None else []
        elif shorthand == SH_ALL:
            targets = list(self._lapics)
        elif shorthand == SH_OTHERS:
            targets = [a for a in self._lapics if a is not source]
        else:
            targets = [a for a in self._lapics if a.matches(dest, logical, short_dest)]
        targets = [a for a in targets if a.hw_enabled]
        if mode == DM_LOWEST and len(targets) > 1:
            # SDM 11.6.2.4: the lowest processor priority wins; ties go to the first.
            targets = [min(targets, key=lambda a: a.ppr)]
        accepted = 0
        for a in targets:
            if a.receive(mode, vector, trigger_level, assert_level):
                accepted += 1
        return accepted


@dataclass(frozen=True)
class LapicState:
    """One LAPIC. Times are nanoseconds relative to the moment of saving, so
    a restore places them on its own clock (moved on by the time elapsed)."""

    version: int
    id: int
    base_msr: int
    tpr: int
    ldr: int
    dfr: int
    svr: int
    isr: bytes  # 256-bit vector sets, little-endian (msgpack ints stop at 64 bits)
    tmr: bytes
    irr: bytes
    esr: int
    esr_pending: int
    icr_lo: int
    icr_dest: int
    lvt: tuple[int, ...]
    tdcr: int
    tmict: int
    tsc_deadline: int  # guest TSC (absolute)
    sipi_vector: int | None
    lint_level: tuple[bool, ...]
    nmi_pending: bool
    extint_msg: bool
    timer_armed: bool
    timer_next_ns: int  # when the armed timer fires, relative to the save (<0: overdue)
    count_start_ns: int | None  # one-shot/periodic: when the count was loaded (relative)
    period_ns: int


class LocalApic:
    STATE_VERSION: ClassVar[int] = 1
    state_type: ClassVar[type] = LapicState

    def __init__(self, apic_id: int, *, bus: ApicBus, timers: TimerService, tsc_hz: int,
                 now_tsc: Callable[[], int], bsp: bool = False, bus_hz: int = APIC_BUS_HZ,
                 notify: Callable[[], None] | None = None,
                 eoi_broadcast: Callable[[int], None] | None = None,
                 on_init: Callable[[], None] | None = None,
                 on_sipi: Callable[[int], None] | None = None,
                 extint_ack: Callable[[], int | None] | None = None) -> None:
        self.initial_id = apic_id
        self.bsp = bsp
        self.bus = bus
        self.bus_hz = bus_hz
        self.tsc_hz = tsc_hz
        self._timers = timers
        self._now_tsc = now_tsc
        self._notify = notify
        #: called with the vector when a level-triggered interrupt is EOIed (IOAPIC)
        self.eoi_broadcast = eoi_broadcast
        #: INIT received (not the level de-assert): the backend resets the vCPU
        self.on_init = on_init
        #: SIPI received with its vector: the AP starts at vector << 12
        self.on_sipi = on_sipi
        #: INTA to the 8259 for ExtINT (virtual wire mode), returns the vector
        self.extint_ack = extint_ack
        self._lock = threading.Lock()
        self.base_msr = APIC_DEFAULT_BASE | APIC_BASE_EN | (APIC_BASE_BSP if bsp else 0)
        self.sipi_vector: int | None = None
        self._lint_level = [False, False]
        self._nmi_pending = False
        self._extint_msg = False  # an ExtINT message (IOAPIC/ICR) awaits INTA
        self._timer_gen = 0
        self._timer_handle: TimerHandle | None = None
        self._count_start_ns: int | None = None  # when the current count was loaded
        self._period_ns = 0
        self._next_ns = 0  # deadline of the armed timer
        self._reset_locked(power_up=True)
        bus.attach(self)

    # -- state -------------------------------------------------------------

    def _reset_locked(self, power_up: bool) -> None:
        # SDM 11.4.7.1 (power-up) and 11.4.7.3 (INIT): the APIC ID is kept on INIT.
        if power_up:
            self.id = self.initial_id
        self.tpr = 0
        self.ldr = 0
        self.dfr = _U32
        self.svr = 0xFF
        self.isr = 0
        self.tmr = 0
        self.irr = 0
        self.esr = 0
        self._esr_pending = 0
        self.icr_lo = 0
        self.icr_dest = 0  # the ICR destination field, unshifted (8 or 32 bits)
        self.lvt = [LVT_MASKED] * 6
        if self.bsp:
            # The BSP's LINT0 starts as unmasked ExtINT (virtual wire), the state
            # firmware leaves and KVM's reset gives (KVM_X86_QUIRK_LINT0_REENABLED):
            # a directly booted kernel then gets PIC interrupts before it sets up the APIC.
            self.lvt[LVT_LINT0] = DM_EXTINT << 8
        self.tdcr = 0
        self.tmict = 0
        self._stop_timer_locked()
        self.tsc_deadline = 0
        self._nmi_pending = False
        self._extint_msg = False

    @property
    def hw_enabled(self) -> bool:
        return bool(self.base_msr & APIC_BASE_EN)

    @property
    def x2apic(self) -> bool:
        return bool(self.base_msr & APIC_BASE_EXTD)

    @property
    def sw_enabled(self) -> bool:
        return bool(self.svr & SVR_ENABLE)

    @property
    def ppr(self) -> int:
        """Processor priority, SDM 11.8.3.1."""
        isrv = max(_top(self.isr), 0)
        if (self.tpr & 0xF0) >= (isrv & 0xF0):
            return self.tpr
        return isrv & 0xF0

    @property
    def ldr_value(self) -> int:
        if self.x2apic:
            # SDM 11.12.10.2: logical x2APIC ID = cluster (ID[19:4]) << 16 | 1 << ID[3:0]
            return ((self.id >> 4) << 16) | (1 << (self.id & 0xF))
        return self.ldr

    def set_notify(self, notify: Callable[[], None] | None) -> None:
        self._notify = notify

    # -- message reception (any thread) --------------------------------------

    def matches(self, dest: int, logical: bool, short_dest: bool = False) -> bool:
        """Whether a message for ``dest`` in the given destination mode targets us (11.6.2)."""
        if self.x2apic:
            if dest == _ALL_X2APIC or (short_dest and dest == 0xFF):
                return True
            if not logical:
                return dest == self.id
            ldr = self.ldr_value
            return (dest >> 16) == (ldr >> 16) and bool(dest & ldr & 0xFFFF)
        dest &= 0xFF
        if dest == 0xFF:
            return True
        if not logical:
            return dest == (self.id & 0xFF)
        ldr = self.ldr >> 24
        if (self.dfr >> 28) == 0xF:  # flat model: bitmap of up to 8 CPUs
            return bool(dest & ldr)
        # cluster model: high nibble cluster, low nibble member bitmap
        return (dest >> 4) == (ldr >> 4) and bool(dest & ldr & 0xF)

    def receive(self, mode: int, vector: int, trigger_level: bool, assert_level: bool) -> bool:
        """One interrupt message from the APIC bus (IOAPIC or an IPI)."""
        if mode in (DM_FIXED, DM_LOWEST):
            return self.accept(vector, trigger_level)
        if mode == DM_NMI:
            self.nmi()
            return True
        if mode == DM_INIT:
            if trigger_level and not assert_level:
                return True  # INIT level de-assert: arbitration ID sync only (11.6.1)
            self.init()
            return True
        if mode == DM_SIPI:
            self.sipi(vector)
            return True
        if mode == DM_EXTINT:
            with self._lock:
                self._extint_msg = True
            self._call_notify()
            return True
        log.debug("LAPIC %d: delivery mode %d ignored", self.id, mode)  # SMI
        return False

    def accept(self, vector: int, level_triggered: bool) -> bool:
        """Fixed delivery: set IRR (and TMR for level-triggered). False if dropped."""
        out: list[Action] = []
        with self._lock:
            ok = self._accept_locked(vector, level_triggered, out)
        _run(out)
        return ok

    def nmi(self) -> None:
        with self._lock:
            self._nmi_pending = True
        self._call_notify()

    def init(self) -> None:
        """INIT: reset the APIC (keeping its ID and APIC_BASE) and tell the backend."""
        with self._lock:
            self._reset_locked(power_up=False)
        if self.on_init is not None:
            self.on_init()

    def sipi(self, vector: int) -> None:
        with self._lock:
            self.sipi_vector = vector & 0xFF
        if self.on_sipi is not None:
            self.on_sipi(vector & 0xFF)

    def set_lint(self, pin: int, level: bool) -> None:
        """Drive LINT0 (the 8259 INT output) or LINT1 (usually NMI)."""
        out: list[Action] = []
        with self._lock:
            old = self._lint_level[pin]
            self._lint_level[pin] = level
            lvt = self.lvt[LVT_LINT0 + pin]
            active_low = bool(lvt & LVT_ACTIVE_LOW)
            was, now = old != active_low, level != active_low
            mode = (lvt >> 8) & 7
            if self._wants_extint_locked():
                out.append(self._call_notify)
            elif self.hw_enabled and not lvt & LVT_MASKED and now and not was:
                if mode == DM_FIXED:
                    self._accept_locked(lvt & 0xFF, bool(lvt & LVT_LEVEL), out)
                elif mode == DM_NMI:
                    self._nmi_pending = True
                    out.append(self._call_notify)
        _run(out)

    # -- what the CPU asks ----------------------------------------------------

    def has_interrupt(self) -> bool:
        """A maskable interrupt (fixed or ExtINT) is deliverable now (wake from HLT)."""
        with self._lock:
            return self._wants_extint_locked() or self._pending_vector_locked() is not None

    def nmi_pending(self) -> bool:
        return self._nmi_pending

    def take_nmi(self) -> bool:
        """Consume a pending NMI (the engine injects vector 2 regardless of IF)."""
        with self._lock:
            pending, self._nmi_pending = self._nmi_pending, False
            return pending

    def get_interrupt(self) -> int | None:
        """Interrupt acknowledge: the vector to deliver now, or None.

        ExtINT (virtual wire: LINT0 in ExtINT mode, or the APIC globally
        disabled on the BSP so the 8259 INTR goes straight to the core) wins
        over fixed interrupts, since it bypasses IRR/ISR (11.5.1). A fixed
        vector moves from IRR to ISR (11.8.4).
        """
        with self._lock:
            extint = self._wants_extint_locked()
            if extint:
                self._extint_msg = False
        if extint and self.extint_ack is not None:
            v = self.extint_ack()  # 8259 INTA, without our lock (PIC -> LAPIC order)
            if v is not None:
                return v
        with self._lock:
            v = self._pending_vector_locked()
            if v is None:
                return None
            bit = 1 << v
            self.irr &= ~bit
            self.isr |= bit
            return v

    # -- MMIO (xAPIC), BusDevice over offsets 0..0xFFF -----------------------

    def read(self, offset: int, data: memoryview) -> None:
        n = len(data)
        value = 0
        inner = offset & 0xF
        if inner + n <= 4:
            out: list[Action] = []
            with self._lock:
                if self.hw_enabled and not self.x2apic:
                    value = self._read_reg_locked(offset & 0xFF0, out) or 0
            _run(out)
            value >>= 8 * inner
        data[:] = (value & ((1 << (8 * n)) - 1)).to_bytes(n, "little")

    def write(self, offset: int, data: memoryview) -> None:
        # Only aligned 32-bit (or wider) stores reach a register (11.4.1).
        if offset & 0xF or len(data) < 4:
            return
        value = int.from_bytes(data[:4], "little")
        out: list[Action] = []
        with self._lock:
            if self.hw_enabled and not self.x2apic:
                self._write_reg_locked(offset & 0xFF0, value, out)
        _run(out)

    # -- MSRs ---------------------------------------------------------------

    @staticmethod
    def handles_msr(index: int) -> bool:
        return (index in (MSR_IA32_APIC_BASE, MSR_IA32_TSC_DEADLINE)
                or X2APIC_MSR_FIRST <= index <= X2APIC_MSR_LAST)

    def read_msr(self, index: int) -> int:
        """RDMSR of IA32_APIC_BASE, IA32_TSC_DEADLINE or an x2APIC MSR; ApicMsrFault = #GP."""
        out: list[Action] = []
        with self._lock:
            if index == MSR_IA32_APIC_BASE:
                return self.base_msr
            if index == MSR_IA32_TSC_DEADLINE:
                return self.tsc_deadline if self._timer_mode_locked() == TIMER_TSC_DEADLINE else 0
            if not (X2APIC_MSR_FIRST <= index <= X2APIC_MSR_LAST) or not self.x2apic:
                raise ApicMsrFault(f"rdmsr {index:#x}")
            off = (index - X2APIC_MSR_FIRST) << 4
            if off == R_ICR_LO:  # the 64-bit ICR (11.12.9)
                return (self.icr_dest << 32) | self.icr_lo
            value = self._read_reg_locked(off, out)
        _run(out)
        if value is None:
            raise ApicMsrFault(f"rdmsr {index:#x}")
        return value

    def write_msr(self, index: int, value: int) -> bool:
        """WRMSR; returns False where the guest gets #GP."""
        out: list[Action] = []
        with self._lock:
            if index == MSR_IA32_APIC_BASE:
                ok = self._write_base_locked(value, out)
            elif index == MSR_IA32_TSC_DEADLINE:
                ok = True
                if self._timer_mode_locked() == TIMER_TSC_DEADLINE:
                    self._arm_tsc_deadline_locked(value & ((1 << 64) - 1), out)
            elif not (X2APIC_MSR_FIRST <= index <= X2APIC_MSR_LAST) or not self.x2apic:
                ok = False
            else:
                off = (index - X2APIC_MSR_FIRST) << 4
                if off == R_ICR_LO:
                    self.icr_lo = value & 0x000C_CFFF  # bit 12 (delivery status) reads 0
                    self.icr_dest = (value >> 32) & _U32
                    self._send_ipi_locked(out)
                    ok = True
                elif value >> 32:
                    ok = False  # the other x2APIC registers are 32-bit: reserved bits #GP
                else:
                    ok = self._write_reg_locked(off, value, out)
        _run(out)
        return ok

    def _write_base_locked(self, value: int, out: list[Action]) -> bool:
        # SDM 11.4.4 and 11.12.5: reserved bits, EXTD without EN, x2APIC -> xAPIC
        # and disabled -> x2APIC are invalid transitions (#GP).
        if value & 0x2FF or value >> 52:
            return False
        en, extd = bool(value & APIC_BASE_EN), bool(value & APIC_BASE_EXTD)
        if extd and not en:
            return False
        if self.x2apic and en and not extd:
            return False
        if not self.hw_enabled and extd:
            return False
        was_enabled, was_x2 = self.hw_enabled, self.x2apic
        bsp = self.base_msr & APIC_BASE_BSP
        self.base_msr = (value & ~APIC_BASE_BSP) | bsp
        if not en and was_enabled:
            # disabling resets the APIC to its power-up state (11.4.7.2, 11.12.5)
            self._reset_locked(power_up=True)
        elif extd and not was_x2:
            self.id = self.initial_id  # x2APIC ID = initial APIC ID (11.12.5.1)
        if self._wants_extint_locked() or self._pending_vector_locked() is not None:
            out.append(self._call_notify)
        return True

    # -- registers (shared by both interfaces) --------------------------------

    def _read_reg_locked(self, off: int, out: list[Action]) -> int | None:
        """A register value, or None where x2APIC raises #GP (xAPIC reads 0)."""
        x2 = self.x2apic
        if off == R_ID:
            return self.id if x2 else (self.id & 0xFF) << 24
        if off == R_VERSION:
            return APIC_VERSION
        if off == R_TPR:
            return self.tpr
        if off == R_APR and not x2:
            irrv = max(_top(self.irr), _top(self.isr), 0)
            return self.tpr if (self.tpr & 0xF0) >= (irrv & 0xF0) else irrv & 0xF0
        if off == R_PPR:
            return self.ppr
        if off in (R_EOI, R_RRD):
            return None if x2 else 0  # write-only / remote read unsupported
        if off == R_LDR:
            return self.ldr_value
        if off == R_DFR and not x2:
            return self.dfr
        if off == R_SVR:
            return self.svr
        if R_ISR <= off < R_ISR + 0x80:
            return (self.isr >> (2 * (off - R_ISR))) & _U32  # 32 bits per 16-byte slot
        if R_TMR <= off < R_TMR + 0x80:
            return (self.tmr >> (2 * (off - R_TMR))) & _U32
        if R_IRR <= off < R_IRR + 0x80:
            return (self.irr >> (2 * (off - R_IRR))) & _U32
        if off == R_ESR:
            return self.esr
        if off == R_ICR_LO:
            return self.icr_lo
        if off == R_ICR_HI and not x2:
            return (self.icr_dest & 0xFF) << 24
        if off in _LVT_OFFSETS:
            return self.lvt[_LVT_OFFSETS.index(off)]
        if off == R_TMICT:
            return self.tmict
        if off == R_TMCCT:
            return self._current_count_locked()
        if off == R_TDCR:
            return self.tdcr
        if x2:
            return None
        self._error_locked(ESR_ILLEGAL_REGISTER, out)
        return 0

    def _write_reg_locked(self, off: int, value: int, out: list[Action]) -> bool:
        """Store a register; False where x2APIC raises #GP (xAPIC ignores)."""
        x2 = self.x2apic
        value &= _U32
        if off == R_ID:
            if x2:
                return False
            self.id = value >> 24  # xAPIC ID is writable (11.4.6)
        elif off == R_TPR:
            self.tpr = value & 0xFF
            self._notify_if_deliverable_locked(out)
        elif off == R_EOI:
            if x2 and value:
                return False
            self._eoi_locked(out)
        elif off == R_LDR:
            if x2:
                return False
            self.ldr = value & 0xFF00_0000
        elif off == R_DFR:
            if x2:
                return False
            self.dfr = value | 0x0FFF_FFFF
        elif off == R_SVR:
            # bit 12 (EOI broadcast suppression) is not offered by the version register
            self.svr = value & 0x3FF
            if not self.svr & SVR_ENABLE:
                # software disable masks every LVT entry (11.4.7.2)
                self.lvt = [v | LVT_MASKED for v in self.lvt]
            self._notify_if_deliverable_locked(out)
        elif off == R_ESR:
            if x2 and value:
                return False
            # a write latches the errors seen since the last write (11.5.3)
            self.esr, self._esr_pending = self._esr_pending, 0
        elif off == R_ICR_LO and not x2:
            self.icr_lo = value & 0x000C_CFFF
            self._send_ipi_locked(out)
        elif off == R_ICR_HI and not x2:
            self.icr_dest = value >> 24
        elif off in _LVT_OFFSETS:
            self._write_lvt_locked(_LVT_OFFSETS.index(off), value, out)
        elif off == R_TMICT:
            if self._timer_mode_locked() != TIMER_TSC_DEADLINE:
                self.tmict = value
                self._start_count_locked(out)
        elif off == R_TDCR:
            self.tdcr = value & 0xB
        elif off == R_SELF_IPI and x2:
            self._accept_locked(value & 0xFF, False, out)
        elif x2:
            return False  # read-only or absent register
        else:
            self._error_locked(ESR_ILLEGAL_REGISTER, out)
        return True

    def _write_lvt_locked(self, i: int, value: int, out: list[Action]) -> None:
        new = value & _LVT_WRITABLE[i]
        if not self.sw_enabled:
            new |= LVT_MASKED  # cannot unmask while software-disabled (11.4.7.2)
        old = self.lvt[i]
        self.lvt[i] = new
        if i == LVT_TIMER and ((old >> 17) & 3) != ((new >> 17) & 3):
            # a timer mode change disarms the timer (11.5.4.1)
            self._stop_timer_locked()
            self.tmict = 0
            self.tsc_deadline = 0
        if i == LVT_LINT0 and self._wants_extint_locked():
            out.append(self._call_notify)

    # -- priorities, acceptance, EOI -------------------------------------------

    def _pending_vector_locked(self) -> int | None:
        if not (self.hw_enabled and self.sw_enabled) or not self.irr:
            return None
        v = _top(self.irr)
        # deliverable only if its priority class beats the processor priority (11.8.3.1)
        if (v & 0xF0) > (self.ppr & 0xF0):
            return v
        return None

    def _wants_extint_locked(self) -> bool:
        if not self.hw_enabled:
            # APIC globally disabled: the 8259 INTR reaches the BSP core directly
            return self.bsp and self._lint_level[0]
        if self._extint_msg:
            return True
        lvt = self.lvt[LVT_LINT0]
        if lvt & LVT_MASKED or (lvt >> 8) & 7 != DM_EXTINT:
            return False
        # the 8259's INT output itself, whatever the polarity bit says (as KVM's
        # kvm_apic_accept_pic_intr): "active low" with INT low wanted an ExtINT the
        # 8259 never answers, and the vCPU re-acknowledged it forever
        return self._lint_level[0]

    def _notify_if_deliverable_locked(self, out: list[Action]) -> None:
        if self._pending_vector_locked() is not None or self._wants_extint_locked():
            out.append(self._call_notify)

    def _accept_locked(self, vector: int, level: bool, out: list[Action]) -> bool:
        if not (self.hw_enabled and self.sw_enabled):
            return False  # fixed interrupts are dropped while disabled (11.4.7.2)
        vector &= 0xFF
        if vector < 16:
            self._error_locked(ESR_RECV_ILLEGAL_VECTOR, out)
            return False
        bit = 1 << vector
        self.irr |= bit
        if level:
            self.tmr |= bit
        else:
            self.tmr &= ~bit
        self._notify_if_deliverable_locked(out)
        return True

    def _eoi_locked(self, out: list[Action]) -> None:
        v = _top(self.isr)
        if v < 0:
            return
        bit = 1 << v
        self.isr &= ~bit
        if self.tmr & bit and self.eoi_broadcast is not None:
            # level-triggered: broadcast the EOI so the IOAPIC clears remote IRR (11.8.5)
            cb = self.eoi_broadcast
            out.append(lambda: cb(v))
        self._notify_if_deliverable_locked(out)

    def _error_locked(self, bit: int, out: list[Action]) -> None:
        self._esr_pending |= bit
        lvt = self.lvt[LVT_ERROR]
        if not lvt & LVT_MASKED and bit != ESR_RECV_ILLEGAL_VECTOR:
            self._accept_locked(lvt & 0xFF, False, out)

    def _send_ipi_locked(self, out: list[Action]) -> None:
        icr = self.icr_lo
        vector = icr & 0xFF
        mode = (icr >> 8) & 7
        if mode in (DM_FIXED, DM_LOWEST) and vector < 16:
            self._error_locked(ESR_SEND_ILLEGAL_VECTOR, out)
            return
        x2 = self.x2apic
        dest = self.icr_dest if x2 else self.icr_dest & 0xFF

        def send() -> None:
            self.bus.deliver(dest=dest, logical=bool(icr & (1 << 11)), mode=mode, vector=vector,
                             trigger_level=bool(icr & (1 << 15)),
                             assert_level=bool(icr & (1 << 14)), shorthand=(icr >> 18) & 3,
                             source=self, short_dest=not x2)

        out.append(send)

    # -- timer (11.5.4) ---------------------------------------------------------

    def _timer_mode_locked(self) -> int:
        return (self.lvt[LVT_TIMER] >> 17) & 3

    def _divide(self) -> int:
        # divide configuration bits 3,1:0 (figure 11-10); 0b111 means divide by 1
        code = (self.tdcr & 3) | ((self.tdcr >> 1) & 4)
        return 1 if code == 7 else 2 << code

    def timer_ns_per_count(self) -> float:
        return self._divide() * 1e9 / self.bus_hz

    def _stop_timer_locked(self) -> None:
        self._timer_gen += 1
        self._timers.cancel(self._timer_handle)
        self._timer_handle = None
        self._count_start_ns = None
        self._period_ns = 0
        self._next_ns = 0

    def _schedule_locked(self, deadline_ns: int) -> None:
        gen = self._timer_gen
        self._next_ns = deadline_ns
        self._timer_handle = self._timers.schedule(deadline_ns, lambda: self._timer_expired(gen))

    def _start_count_locked(self, out: list[Action]) -> None:
        self._stop_timer_locked()
        if self.tmict == 0:
            return  # writing 0 stops the timer
        now = self._timers.now_ns()
        self._count_start_ns = now
        self._period_ns = max(1, self.tmict * self._divide() * 1_000_000_000 // self.bus_hz)
        first = self._period_ns
        if self._timer_mode_locked() == TIMER_PERIODIC:
            first = max(first, MIN_PERIOD_NS)
        self._schedule_locked(now + first)

    def _current_count_locked(self) -> int:
        start = self._count_start_ns
        if start is None or self.tmict == 0:
            return 0
        ticks = (self._timers.now_ns() - start) * self.bus_hz // (1_000_000_000 * self._divide())
        if self._timer_mode_locked() == TIMER_PERIODIC:
            return self.tmict - ticks % self.tmict
        return max(0, self.tmict - ticks)

    def _arm_tsc_deadline_locked(self, deadline: int, out: list[Action]) -> None:
        self._stop_timer_locked()
        self.tsc_deadline = deadline
        if deadline == 0:
            return  # writing 0 disarms (11.5.4.1)
        delta = deadline - self._now_tsc()
        if delta <= 0:
            self._fire_locked(out)
            self.tsc_deadline = 0
            return
        delta_ns = -(-delta * 1_000_000_000 // self.tsc_hz)  # round up: never early
        self._schedule_locked(self._timers.now_ns() + delta_ns)

    def _fire_locked(self, out: list[Action]) -> None:
        lvt = self.lvt[LVT_TIMER]
        if not lvt & LVT_MASKED:
            self._accept_locked(lvt & 0xFF, False, out)

    def _timer_expired(self, gen: int) -> None:
        out: list[Action] = []
        with self._lock:
            if gen != self._timer_gen:
                return  # cancelled or re-armed after the timer thread picked it up
            self._timer_handle = None
            mode = self._timer_mode_locked()
            self._fire_locked(out)
            if mode == TIMER_TSC_DEADLINE:
                self.tsc_deadline = 0
            elif mode == TIMER_PERIODIC and self._period_ns:
                # next boundary after now: missed periods are coalesced into one interrupt
                step = max(self._period_ns, MIN_PERIOD_NS)
                now = self._timers.now_ns()
                nxt = self._next_ns + step
                if nxt <= now:
                    nxt += ((now - nxt) // step + 1) * step
                self._schedule_locked(nxt)
        _run(out)

    # -- misc -------------------------------------------------------------------

    def _call_notify(self) -> None:
        cb = self._notify
        if cb is not None:
            cb()

    def close(self) -> None:
        with self._lock:
            self._stop_timer_locked()

    # -- saved state ------------------------------------------------------------

    def save_state(self) -> LapicState:
        with self._lock:
            now = self._timers.now_ns()
            armed = self._timer_handle is not None
            start = self._count_start_ns
            return LapicState(
                version=self.STATE_VERSION, id=self.id, base_msr=self.base_msr, tpr=self.tpr,
                ldr=self.ldr, dfr=self.dfr, svr=self.svr, isr=bits_to_bytes(self.isr, 32),
                tmr=bits_to_bytes(self.tmr, 32), irr=bits_to_bytes(self.irr, 32),
                esr=self.esr, esr_pending=self._esr_pending, icr_lo=self.icr_lo,
                icr_dest=self.icr_dest, lvt=tuple(self.lvt), tdcr=self.tdcr, tmict=self.tmict,
                tsc_deadline=self.tsc_deadline, sipi_vector=self.sipi_vector,
                lint_level=tuple(self._lint_level), nmi_pending=self._nmi_pending,
                extint_msg=self._extint_msg, timer_armed=armed,
                timer_next_ns=self._next_ns - now if armed else 0,
                count_start_ns=None if start is None else start - now,
                period_ns=self._period_ns)

    def restore_state(self, st: LapicState, elapsed_ns: int = 0) -> None:
        """Load ``st`` (any previous state is dropped, timers included).

        ``elapsed_ns`` is the wall time since the save: relative times are
        placed that far in the past, so an overdue one-shot or TSC-deadline
        timer fires once now and a periodic one keeps its phase without
        catching up the periods it missed. The TSC deadline compares with the
        guest TSC (``now_tsc``), which the caller has already moved on.
        Interrupts this leaves deliverable are announced through ``notify``.
        """
        part = f"lapic{self.initial_id}"
        check_version(part, st.version, self.STATE_VERSION)
        u32 = 0xFFFF_FFFF
        check_int(part, "id", st.id, 0, u32)
        check_int(part, "base_msr", st.base_msr, 0, (1 << 52) - 1)
        if st.base_msr & 0x2FF or (st.base_msr & APIC_BASE_EXTD
                                   and not st.base_msr & APIC_BASE_EN):
            raise StateError(f"{part}: saved state field base_msr = {st.base_msr:#x} is "
                             "not a valid IA32_APIC_BASE")
        check_int(part, "tpr", st.tpr, 0, 0xFF)
        for name in ("ldr", "dfr", "esr", "esr_pending", "icr_lo", "icr_dest", "tmict"):
            check_int(part, name, getattr(st, name), 0, u32)
        check_int(part, "svr", st.svr, 0, 0x3FF)
        check_int(part, "tdcr", st.tdcr, 0, 0xB)
        check_int(part, "tsc_deadline", st.tsc_deadline, 0, (1 << 64) - 1)
        isr = bits_from_bytes(part, "isr", st.isr, 32)
        tmr = bits_from_bytes(part, "tmr", st.tmr, 32)
        irr = bits_from_bytes(part, "irr", st.irr, 32)
        check_len(part, "lvt", st.lvt, 6)
        for i, v in enumerate(st.lvt):
            check_int(part, f"lvt[{i}]", v, 0, u32)
        if st.sipi_vector is not None:
            check_int(part, "sipi_vector", st.sipi_vector, 0, 0xFF)
        check_len(part, "lint_level", st.lint_level, 2)
        for i, b in enumerate(st.lint_level):
            check_bool(part, f"lint_level[{i}]", b)
        for name in ("nmi_pending", "extint_msg", "timer_armed"):
            check_bool(part, name, getattr(st, name))
        check_int(part, "timer_next_ns", st.timer_next_ns, -MAX_REL_NS, MAX_REL_NS)
        if st.count_start_ns is not None:
            check_int(part, "count_start_ns", st.count_start_ns, -MAX_REL_NS, MAX_REL_NS)
        check_int(part, "period_ns", st.period_ns, 0, MAX_REL_NS)
        check_int(part, "elapsed_ns", elapsed_ns, 0, MAX_REL_NS)
        out: list[Action] = []
        with self._lock:
            self._stop_timer_locked()
            self.id, self.base_msr, self.tpr = st.id, st.base_msr, st.tpr
            self.ldr, self.dfr, self.svr = st.ldr, st.dfr, st.svr
            self.isr, self.tmr, self.irr = isr, tmr, irr
            self.esr, self._esr_pending = st.esr, st.esr_pending
            self.icr_lo, self.icr_dest = st.icr_lo, st.icr_dest
            self.lvt = [v & (_LVT_WRITABLE[i] | LVT_MASKED) for i, v in enumerate(st.lvt)]
            self.tdcr, self.tmict, self.tsc_deadline = st.tdcr, st.tmict, st.tsc_deadline
            self.sipi_vector = st.sipi_vector
            self._lint_level = list(st.lint_level)
            self._nmi_pending, self._extint_msg = st.nmi_pending, st.extint_msg
            if st.timer_armed:
                if self._timer_mode_locked() == TIMER_TSC_DEADLINE:
                    # absolute in guest TSC: overdue -> fires once, now
                    self._arm_tsc_deadline_locked(st.tsc_deadline, out)
                else:
                    base = self._timers.now_ns() - elapsed_ns  # the save, on our clock
                    self._count_start_ns = (None if st.count_start_ns is None
                                            else base + st.count_start_ns)
                    self._period_ns = st.period_ns
                    # in the past: the timer thread runs it at once, and a periodic
                    # timer goes on from the next boundary after now (no catch-up)
                    self._schedule_locked(base + st.timer_next_ns)
            elif st.count_start_ns is not None and self.tmict:
                # an expired one-shot count keeps reading 0
                self._count_start_ns = self._timers.now_ns() - elapsed_ns + st.count_start_ns
                self._period_ns = st.period_ns
            if self._nmi_pending:
                out.append(self._call_notify)
            self._notify_if_deliverable_locked(out)
        _run(out)

    def __repr__(self) -> str:
        return f"<LocalApic id={self.id} base={self.base_msr:#x} svr={self.svr:#x}>"


def _run(actions: list[Action]) -> None:
    for a in actions:
        a()
