"""The interrupt controllers of the software-CPU machine, wired as a PC.

One IOAPIC (24 pins, GSI base 0), one LAPIC per vCPU on a shared APIC bus,
the 8259 pair and the 8254 PIT: the hardware KVM's in-kernel irqchip
provides, so the guest sees the same ACPI machine under both backends.

Wiring (matching the MADT): ISA IRQ n drives 8259 input n and IOAPIC pin n,
except IRQ0 (the PIT), which drives IOAPIC pin 2 (the MADT's interrupt source
override 0 -> GSI 2). GSIs 16-23 exist only on the IOAPIC. The 8259 master's
INT output drives LINT0 of every LAPIC (Linux unmasks it, as ExtINT, only on
the BSP, and only in virtual-wire mode); LINT1 is not connected.

Threads and locks:
  * vCPU threads: LAPIC MMIO/MSR accesses, ``interrupt_for_cpu``, port I/O to
    the PIC/PIT, IOAPIC MMIO.
  * device threads: ``irq_line(...).set_level``.
  * the timer thread (``TimerService``): LAPIC timers and PIT channel 0.
  Lock order: PIT -> PIC -> IOAPIC -> LAPIC -> timer service. A LAPIC never
  calls out while holding its lock (IPIs, EOI broadcast, PIC INTA, notify run
  after release); the PIC and IOAPIC call into LAPICs with their own lock held.
  ``notify`` callbacks may be called with PIT/PIC/IOAPIC locks held: they must
  only wake the vCPU (set a flag, signal), never call back into the chips.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from pyvirt.arch.x86_64.layout import IOAPIC_ADDR, LAPIC_ADDR
from pyvirt.devices.bus import BusDevice
from pyvirt.devices.irq import IrqLine
from pyvirt.hypervisor.emulated._staterec import check_len
from pyvirt.hypervisor.emulated.ioapic import IOAPIC_MMIO_SIZE, IOAPIC_PINS, IoApic, IoApicState
from pyvirt.hypervisor.emulated.lapic import APIC_BUS_HZ, ApicBus, LapicState, LocalApic
from pyvirt.hypervisor.emulated.pic import Pic8259Pair, PicPairState
from pyvirt.hypervisor.emulated.pit import Pit8254, PitState
from pyvirt.hypervisor.emulated.timers import TimerService
from pyvirt.state import check_version

__all__ = ["LAPIC_MMIO_SIZE", "DeviceRange", "EmulatedIrqChip", "IrqChipState"]

LAPIC_MMIO_SIZE = 0x1000
ISA_IRQS = 16
PIT_IRQ = 0
PIT_GSI = 2  # the MADT interrupt source override for IRQ0
CASCADE_IRQ = 2

#: (base, length, device, name) for the VMM's buses
DeviceRange = tuple[int, int, BusDevice, str]


def isa_irq_to_gsi(irq: int) -> int:
    return PIT_GSI if irq == PIT_IRQ else irq


class _IsaIrq:
    """An ISA interrupt: the 8259 input and the IOAPIC pin together."""

    __slots__ = ("gsi", "ioapic", "irq", "pic")

    def __init__(self, pic: Pic8259Pair, ioapic: IoApic, irq: int) -> None:
        self.pic = pic
        self.ioapic = ioapic
        self.irq = irq
        self.gsi = isa_irq_to_gsi(irq)

    def set_level(self, level: bool) -> None:
        # not nested: the PIC lock is released before the IOAPIC lock is taken
        self.pic.set_irq(self.irq, level)
        self.ioapic.set_irq(self.gsi, level)


@dataclass(frozen=True)
class IrqChipState:
    version: int
    lapics: tuple[LapicState, ...]
    ioapic: IoApicState
    pic: PicPairState
    pit: PitState


class EmulatedIrqChip:
    STATE_VERSION: ClassVar[int] = 1
    state_type: ClassVar[type] = IrqChipState

    def __init__(self, num_cpus: int, *, tsc_hz: int,
                 now_tsc: Callable[[], int] | None = None,
                 timers: TimerService | None = None,
                 apic_bus_hz: int = APIC_BUS_HZ, ioapic_id: int | None = None) -> None:
        """``now_tsc`` is the guest TSC now (default: the timer clock scaled to ``tsc_hz``).

        ``ioapic_id`` defaults to ``num_cpus``, the ID the MADT (``acpi.build_madt``) gives.
        ``timers`` is shared with the caller when given; otherwise the chip
        starts and owns one (stopped by ``close``).
        """
        if num_cpus < 1:
            raise ValueError("need at least one vCPU")
        self._own_timers = timers is None
        self.timers = timers if timers is not None else TimerService()
        clock = self.timers
        self.tsc_hz = tsc_hz
        self.now_tsc: Callable[[], int] = (
            now_tsc if now_tsc is not None
            else lambda: clock.now_ns() * tsc_hz // 1_000_000_000)
        self.apic_bus = ApicBus()
        self.ioapic = IoApic(self.apic_bus,
                             ioapic_id=num_cpus if ioapic_id is None else ioapic_id)
        self.pic = Pic8259Pair(on_output=self._pic_output)
        self._lapics = [
            LocalApic(i, bus=self.apic_bus, timers=self.timers, tsc_hz=tsc_hz,
                      now_tsc=self.now_tsc, bsp=(i == 0), bus_hz=apic_bus_hz,
                      eoi_broadcast=self.ioapic.eoi, extint_ack=self.pic.get_interrupt)
            for i in range(num_cpus)]
        self._isa = [_IsaIrq(self.pic, self.ioapic, irq) for irq in range(ISA_IRQS)]
        self.pit = Pit8254(self.timers, irq0=self._isa[PIT_IRQ])

    @property
    def num_cpus(self) -> int:
        return len(self._lapics)

    def lapic(self, index: int) -> LocalApic:
        """The LAPIC of vCPU ``index``: route that vCPU's 0xFEE00000 page and MSRs to it."""
        return self._lapics[index]

    def irq_line(self, gsi: int) -> IrqLine:
        """Interrupt pin ``gsi``: 0-15 are ISA IRQs (PIC + IOAPIC), 16-23 IOAPIC only."""
        if gsi == CASCADE_IRQ:
            raise ValueError("IRQ 2 is the 8259 cascade (and GSI 2 is the PIT's IRQ0)")
        if 0 <= gsi < ISA_IRQS:
            return self._isa[gsi]
        if ISA_IRQS <= gsi < IOAPIC_PINS:
            return self.ioapic.irq_line(gsi)
        raise ValueError(f"GSI {gsi} out of range 0..{IOAPIC_PINS - 1}")

    # -- the CPU side -------------------------------------------------------------

    def set_notify(self, index: int, callback: Callable[[], None] | None) -> None:
        """``callback`` (thread-safe, must not re-enter the chips) when vCPU ``index``
        may have an interrupt or NMI to take: leave HLT and check."""
        self._lapics[index].set_notify(callback)

    def set_init_sipi(self, index: int, on_init: Callable[[], None] | None,
                      on_sipi: Callable[[int], None] | None) -> None:
        lapic = self._lapics[index]
        lapic.on_init = on_init
        lapic.on_sipi = on_sipi

    def interrupt_for_cpu(self, index: int) -> int | None:
        """Acknowledge and return the vector vCPU ``index`` takes now (its IF is 1), or None.

        ExtINT (PIC through LINT0 in virtual-wire mode, or the APIC globally
        disabled on the BSP) first, then the LAPIC's fixed interrupts.
        """
        return self._lapics[index].get_interrupt()

    def has_interrupt(self, index: int) -> bool:
        return self._lapics[index].has_interrupt()

    def take_nmi(self, index: int) -> bool:
        return self._lapics[index].take_nmi()

    def _pic_output(self, level: bool) -> None:
        for lapic in self._lapics:
            lapic.set_lint(0, level)

    # -- bus placement ------------------------------------------------------------

    def pio_devices(self) -> list[DeviceRange]:
        return [
            (0x20, 2, self.pic.master_device, "pic-master"),
            (0x40, 4, self.pit, "pit"),
            (0x61, 1, self.pit.port61, "port61"),
            (0xA0, 2, self.pic.slave_device, "pic-slave"),
            (0x4D0, 2, self.pic.elcr_device, "elcr"),
        ]

    def mmio_devices(self) -> list[DeviceRange]:
        """The IOAPIC. Not the LAPIC page: it is per vCPU (``lapic(index)``,
        ``LAPIC_ADDR`` + ``LAPIC_MMIO_SIZE``), routed by the CPU backend."""
        return [(IOAPIC_ADDR, IOAPIC_MMIO_SIZE, self.ioapic, "ioapic")]

    lapic_base = LAPIC_ADDR

    # -- saved state ------------------------------------------------------------

    def save_state(self) -> IrqChipState:
        """Every controller; call with the vCPUs parked (timers may still fire:
        each part is saved under its own lock, consistent in itself)."""
        return IrqChipState(version=self.STATE_VERSION,
                            lapics=tuple(a.save_state() for a in self._lapics),
                            ioapic=self.ioapic.save_state(), pic=self.pic.save_state(),
                            pit=self.pit.save_state())

    def restore_state(self, st: IrqChipState, elapsed_ns: int = 0) -> None:
        """Every controller as saved, timers re-armed ``elapsed_ns`` of wall
        time later (see ``LocalApic.restore_state``); the LAPICs come last and
        announce what is deliverable through their ``notify``."""
        check_version("irqchip", st.version, self.STATE_VERSION)
        check_len("irqchip", "lapics", st.lapics, len(self._lapics))
        self.pic.restore_state(st.pic)
        self.ioapic.restore_state(st.ioapic)
        self.pit.restore_state(st.pit, elapsed_ns)
        for lapic, ls in zip(self._lapics, st.lapics, strict=True):
            lapic.restore_state(ls, elapsed_ns)

    def close(self) -> None:
        self.pit.close()
        for lapic in self._lapics:
            lapic.close()
        if self._own_timers:
            self.timers.close()
