"""The I/O APIC (Intel 82093AA datasheet; version 0x20 as in later ICH parts).

Memory-mapped at 0xFEC00000: IOREGSEL at offset 0x00 selects an indirect
register, IOWIN at 0x10 reads/writes it, and the EOI register at 0x40
(version 0x20) clears remote IRR by vector. Indirect registers (82093AA 3.2):
0x00 ID, 0x01 version, 0x02 arbitration, 0x10 + 2n / 0x11 + 2n the low/high
halves of redirection table entry n.

Levels: ``set_irq(pin, True)`` means the line is *asserted*; the polarity bit
is stored for the guest but not applied, as KVM's and QEMU's IOAPICs do, so
every ``IrqLine`` speaks "asserted", whatever the pin's electrical polarity.

Threading: one lock. Delivery to the LAPICs happens under it (lock order
IOAPIC -> LAPIC); the LAPICs call ``eoi`` after releasing their own lock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import ClassVar

from pyvirt.devices.irq import IrqLine
from pyvirt.hypervisor.emulated._staterec import check_bool, check_int, check_len
from pyvirt.hypervisor.emulated.lapic import ApicBus
from pyvirt.state import check_version

__all__ = ["IOAPIC_MMIO_SIZE", "IOAPIC_PINS", "IOAPIC_VERSION", "IoApic", "IoApicState"]

IOAPIC_PINS = 24
IOAPIC_VERSION = 0x20
IOAPIC_MMIO_SIZE = 0x1000

REG_ID = 0x00
REG_VERSION = 0x01
REG_ARB = 0x02
REG_REDTBL = 0x10

IOREGSEL = 0x00
IOWIN = 0x10
IOEOI = 0x40

RTE_DEST_LOGICAL = 1 << 11
RTE_DELIVERY_STATUS = 1 << 12
RTE_POLARITY_LOW = 1 << 13
RTE_REMOTE_IRR = 1 << 14
RTE_LEVEL = 1 << 15
RTE_MASKED = 1 << 16
# vector, delivery mode, destination mode, polarity, trigger mode, mask (82093AA 3.2.4);
# delivery status and remote IRR are read-only.
_RTE_LOW_WRITABLE = 0x1_AFFF
_RTE_HIGH_WRITABLE = 0xFF00_0000


class _Pin:
    """The ``IrqLine`` for one IOAPIC input."""

    __slots__ = ("ioapic", "pin")

    def __init__(self, ioapic: IoApic, pin: int) -> None:
        self.ioapic = ioapic
        self.pin = pin

    def set_level(self, level: bool) -> None:
        self.ioapic.set_irq(self.pin, level)


@dataclass(frozen=True)
class IoApicState:
    version: int
    ioapic_id: int
    regsel: int
    rte: tuple[int, ...]  # redirection entries (64-bit), remote IRR included
    level: tuple[bool, ...]  # input lines as last driven


class IoApic:
    STATE_VERSION: ClassVar[int] = 1
    state_type: ClassVar[type] = IoApicState

    def __init__(self, bus: ApicBus, *, ioapic_id: int = 0, pins: int = IOAPIC_PINS) -> None:
        self.bus = bus
        self.pins = pins
        self._lock = threading.Lock()
        self.ioapic_id = ioapic_id & 0xF
        self.regsel = 0
        # redirection entries as 64-bit ints; all masked at reset (82093AA 3.2.4)
        self.rte = [RTE_MASKED] * pins
        self._level = [False] * pins
        #: deliveries per pin, for tests and diagnostics
        self.delivered = [0] * pins

    def irq_line(self, gsi: int) -> IrqLine:
        if not 0 <= gsi < self.pins:
            raise ValueError(f"GSI {gsi} is not on this IOAPIC (0..{self.pins - 1})")
        return _Pin(self, gsi)

    # -- inputs -------------------------------------------------------------

    def set_irq(self, pin: int, level: bool) -> None:
        with self._lock:
            old = self._level[pin]
            self._level[pin] = level
            rte = self.rte[pin]
            if rte & RTE_MASKED or not level:
                return  # an edge on a masked pin is lost, as on the 82093AA
            if rte & RTE_LEVEL:
                if not rte & RTE_REMOTE_IRR:
                    self._deliver_locked(pin)
            elif not old:
                self._deliver_locked(pin)

    def eoi(self, vector: int) -> None:
        """EOI for ``vector`` from a LAPIC (broadcast) or the EOI register."""
        with self._lock:
            for pin in range(self.pins):
                rte = self.rte[pin]
                if rte & 0xFF != vector or not rte & RTE_REMOTE_IRR:
                    continue
                self.rte[pin] = rte & ~RTE_REMOTE_IRR
                # a level line still asserted is delivered again (82093AA 3.2.4, remote IRR)
                if self._level[pin] and rte & RTE_LEVEL and not rte & RTE_MASKED:
                    self._deliver_locked(pin)

    def _deliver_locked(self, pin: int) -> None:
        rte = self.rte[pin]
        level = bool(rte & RTE_LEVEL)
        accepted = self.bus.deliver(
            dest=(rte >> 56) & 0xFF, logical=bool(rte & RTE_DEST_LOGICAL),
            mode=(rte >> 8) & 7, vector=rte & 0xFF, trigger_level=level, short_dest=True)
        self.delivered[pin] += 1
        if level and accepted:
            # remote IRR: set once a LAPIC accepted it, cleared by its EOI
            self.rte[pin] = rte | RTE_REMOTE_IRR

    # -- registers ------------------------------------------------------------

    def _read_reg_locked(self, index: int) -> int:
        if index == REG_ID:
            return self.ioapic_id << 24
        if index == REG_VERSION:
            # version in bits 7:0, maximum redirection entry in bits 23:16
            return IOAPIC_VERSION | ((self.pins - 1) << 16)
        if index == REG_ARB:
            return self.ioapic_id << 24
        n, high = divmod(index - REG_REDTBL, 2)
        if index >= REG_REDTBL and n < self.pins:
            rte = self.rte[n]
            return (rte >> 32) & 0xFFFF_FFFF if high else rte & 0xFFFF_FFFF
        return 0xFFFF_FFFF

    def _write_reg_locked(self, index: int, value: int) -> None:
        if index == REG_ID:
            self.ioapic_id = (value >> 24) & 0xF
            return
        n, high = divmod(index - REG_REDTBL, 2)
        if index < REG_REDTBL or n >= self.pins:
            return  # version and arbitration are read-only
        rte = self.rte[n]
        if high:
            rte = (rte & 0xFFFF_FFFF) | ((value & _RTE_HIGH_WRITABLE) << 32)
        else:
            ro = rte & (RTE_DELIVERY_STATUS | RTE_REMOTE_IRR)
            rte = (rte & ~0xFFFF_FFFF) | (value & _RTE_LOW_WRITABLE) | ro
            if not rte & RTE_LEVEL:
                rte &= ~RTE_REMOTE_IRR  # remote IRR is undefined for edge pins
        self.rte[n] = rte
        # unmasking (or switching to level) a pin whose level line is asserted delivers it
        if (rte & RTE_LEVEL and not rte & (RTE_MASKED | RTE_REMOTE_IRR)
                and self._level[n]):
            self._deliver_locked(n)

    def read(self, offset: int, data: memoryview) -> None:
        n = len(data)
        base, inner = offset & ~3, offset & 3
        value = 0
        if inner + n <= 4:
            with self._lock:
                if base == IOREGSEL:
                    value = self.regsel
                elif base == IOWIN:
                    value = self._read_reg_locked(self.regsel)
            value >>= 8 * inner
        data[:] = (value & ((1 << (8 * n)) - 1)).to_bytes(n, "little")

    def write(self, offset: int, data: memoryview) -> None:
        value = int.from_bytes(data, "little")
        with self._lock:
            if offset == IOREGSEL:
                self.regsel = value & 0xFF
            elif offset == IOWIN and len(data) >= 4:
                self._write_reg_locked(self.regsel, value & 0xFFFF_FFFF)
        if offset == IOEOI:
            self.eoi(value & 0xFF)

    # -- saved state ------------------------------------------------------------

    def save_state(self) -> IoApicState:
        with self._lock:
            return IoApicState(version=self.STATE_VERSION, ioapic_id=self.ioapic_id,
                               regsel=self.regsel, rte=tuple(self.rte),
                               level=tuple(self._level))

    def restore_state(self, st: IoApicState) -> None:
        """Registers and line levels as saved. Nothing is delivered: what was
        in flight sits in the LAPICs' IRR (restored with them) or behind
        remote IRR, exactly as at the save."""
        part = "ioapic"
        check_version(part, st.version, self.STATE_VERSION)
        check_int(part, "ioapic_id", st.ioapic_id, 0, 0xF)
        check_int(part, "regsel", st.regsel, 0, 0xFF)
        check_len(part, "rte", st.rte, self.pins)
        check_len(part, "level", st.level, self.pins)
        for i, v in enumerate(st.rte):
            check_int(part, f"rte[{i}]", v, 0, (1 << 64) - 1)
        for i, b in enumerate(st.level):
            check_bool(part, f"level[{i}]", b)
        with self._lock:
            self.ioapic_id = st.ioapic_id
            self.regsel = st.regsel
            ro = RTE_DELIVERY_STATUS | RTE_REMOTE_IRR
            self.rte = [v & ((_RTE_HIGH_WRITABLE << 32) | _RTE_LOW_WRITABLE | ro)
                        for v in st.rte]
            self._level = list(st.level)
