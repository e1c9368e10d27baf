"""The cascaded 8259A pair of the PC (Intel 8259A datasheet, 231468).

Master at ports 0x20/0x21, slave at 0xA0/0xA1 on master input IR2, and the
edge/level control registers (ELCR, PIIX/ICH) at 0x4D0/0x4D1 that decide per
input whether it is edge- or level-sensitive (the ICW1 LTIM bit is ignored,
as on those chipsets).

Inputs speak "asserted" (``set_irq(irq, True)``). The master's INT output is
reported through ``on_output(level)`` (wired to LINT0 of the LAPICs) and
queried with ``has_interrupt()``; ``get_interrupt()`` is the INTA cycle.

Threading: one lock for the pair. ``on_output`` is called with it held, so the
lock order is PIC -> LAPIC; a LAPIC calls ``get_interrupt`` only after
releasing its own lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from pyvirt.hypervisor.emulated._staterec import check_bool, check_int
from pyvirt.state import StateError, check_version

__all__ = ["Pic8259", "Pic8259Pair", "Pic8259State", "PicPairState"]

# the 8-bit registers and the flags of one 8259, by attribute name
_PIC_BYTES = ("elcr", "last_level", "irr", "isr", "imr", "vector_base")
_PIC_FLAGS = ("need_icw4", "single", "auto_eoi", "rotate_on_aeoi", "special_mask",
              "special_fully_nested", "read_isr", "poll")


@dataclass(frozen=True)
class Pic8259State:
    elcr: int
    last_level: int
    irr: int
    isr: int
    imr: int
    vector_base: int
    init_step: int
    need_icw4: bool
    single: bool
    auto_eoi: bool
    rotate_on_aeoi: bool
    special_mask: bool
    special_fully_nested: bool
    read_isr: bool
    poll: bool
    lowest: int


@dataclass(frozen=True)
class PicPairState:
    version: int
    master: Pic8259State
    slave: Pic8259State
    output: bool


class Pic8259:
    """One 8259A. No lock of its own: the pair serialises access."""

    def __init__(self, elcr_mask: int) -> None:
        self.elcr_mask = elcr_mask  # which inputs may be level-sensitive
        self.elcr = 0
        self.last_level = 0  # input levels, for edge detection
        self.irr = 0
        self.isr = 0
        self.imr = 0
        self.vector_base = 0
        self.init_step = 0  # 0: operational; 2..4: expecting ICW2..ICW4
        self.need_icw4 = False
        self.single = False
        self.auto_eoi = False
        self.rotate_on_aeoi = False
        self.special_mask = False
        self.special_fully_nested = False
        self.read_isr = False
        self.poll = False
        self.lowest = 7  # the lowest-priority input; IR(lowest+1) has the highest priority

    def set_input(self, irq: int, level: bool) -> None:
        bit = 1 << irq
        if self.elcr & bit:
            # level-sensitive: IRR follows the line (datasheet "LTIM"; ELCR on PIIX)
            if level:
                self.irr |= bit
            else:
                self.irr &= ~bit
        elif level and not self.last_level & bit:
            self.irr |= bit  # edge-sensitive: a low-to-high transition latches a request
        if level:
            self.last_level |= bit
        else:
            self.last_level &= ~bit

    def _by_priority(self, bits: int) -> int | None:
        """The highest-priority input set in ``bits``, honouring rotation."""
        for p in range(8):
            irq = (self.lowest + 1 + p) & 7
            if bits & (1 << irq):
                return irq
        return None

    def _priority(self, irq: int) -> int:
        return (irq - self.lowest - 1) & 7  # 0 is the highest priority

    def pending(self, cascade: int | None = None) -> int | None:
        """The input the INT output is raised for, or None (fully nested mode)."""
        req = self._by_priority(self.irr & ~self.imr)
        if req is None:
            return None
        isr = self.isr
        if self.special_mask:
            isr &= ~self.imr  # special mask mode: masked in-service levels do not block
        if self.special_fully_nested and cascade is not None:
            isr &= ~(1 << cascade)  # SFNM: the slave's own higher requests pass
        cur = self._by_priority(isr)
        if cur is not None and self._priority(req) >= self._priority(cur):
            return None
        return req

    def ack(self, irq: int) -> None:
        """INTA for ``irq``: into ISR unless auto-EOI; edge requests are consumed."""
        bit = 1 << irq
        if not self.elcr & bit:
            self.irr &= ~bit
        if self.auto_eoi:
            if self.rotate_on_aeoi:
                self.lowest = irq
        else:
            self.isr |= bit

    def write_cmd(self, value: int) -> None:
        if value & 0x10:
            # ICW1 (datasheet "Initialization Command Words"): clears IMR and ISR,
            # IR7 lowest priority, special mask off, status read points at IRR.
            self.need_icw4 = bool(value & 0x01)
            self.single = bool(value & 0x02)
            self.init_step = 2
            self.imr = 0
            self.isr = 0
            self.irr = 0
            self.last_level = 0  # the edge sense latch is reset
            self.lowest = 7
            self.special_mask = False
            self.read_isr = False
            self.poll = False
            self.auto_eoi = False
            self.rotate_on_aeoi = False
            self.special_fully_nested = False
        elif value & 0x08:
            # OCW3: poll, read register select, special mask mode
            self.poll = bool(value & 0x04)
            if value & 0x02:
                self.read_isr = bool(value & 0x01)
            if value & 0x40:
                self.special_mask = bool(value & 0x20)
        else:
            self._ocw2(value)

    def _ocw2(self, value: int) -> None:
        cmd = value >> 5  # R, SL, EOI bits
        level = value & 7
        if cmd in (1, 5):  # non-specific EOI (5: and rotate)
            irq = self._by_priority(self.isr)
            if irq is not None:
                self.isr &= ~(1 << irq)
                if cmd == 5:
                    self.lowest = irq
        elif cmd in (3, 7):  # specific EOI (7: and rotate)
            self.isr &= ~(1 << level)
            if cmd == 7:
                self.lowest = level
        elif cmd == 6:  # set priority: ``level`` becomes the lowest
            self.lowest = level
        elif cmd == 4:
            self.rotate_on_aeoi = True
        elif cmd == 0:
            self.rotate_on_aeoi = False

    def write_data(self, value: int) -> None:
        if self.init_step == 2:
            self.vector_base = value & 0xF8  # ICW2: T7-T3 (8086 mode)
            self.init_step = 0 if self.single and not self.need_icw4 else (
                4 if self.single else 3)
        elif self.init_step == 3:
            self.init_step = 4 if self.need_icw4 else 0  # ICW3: cascade wiring is fixed
        elif self.init_step == 4:
            self.auto_eoi = bool(value & 0x02)  # ICW4 AEOI
            self.special_fully_nested = bool(value & 0x10)  # ICW4 SFNM
            self.init_step = 0
        else:
            self.imr = value & 0xFF  # OCW1

    def read_cmd(self) -> int:
        return self.isr if self.read_isr else self.irr

    def save_state(self) -> Pic8259State:
        return Pic8259State(**{name: getattr(self, name) for name in
                               (*_PIC_BYTES, "init_step", *_PIC_FLAGS, "lowest")})

    @staticmethod
    def check_state(st: Pic8259State, part: str) -> None:
        for name in _PIC_BYTES:
            check_int(part, name, getattr(st, name), 0, 0xFF)
        if check_int(part, "init_step", st.init_step, 0, 4) == 1:
            raise StateError(f"{part}: saved state field init_step = 1 is out of range")
        for name in _PIC_FLAGS:
            check_bool(part, name, getattr(st, name))
        check_int(part, "lowest", st.lowest, 0, 7)

    def restore_state(self, st: Pic8259State) -> None:
        """Load a record that ``check_state`` accepted."""
        for name in (*_PIC_BYTES, "init_step", *_PIC_FLAGS, "lowest"):
            setattr(self, name, getattr(st, name))
        self.elcr &= self.elcr_mask
        self.vector_base &= 0xF8


class _Port:
    """A BusDevice for one chip's two ports, or the ELCR pair."""

    def __init__(self, pair: Pic8259Pair, which: str) -> None:
        self.pair = pair
        self.which = which

    def read(self, offset: int, data: memoryview) -> None:
        for i in range(len(data)):
            data[i] = self.pair.port_read(self.which, offset + i)

    def write(self, offset: int, data: memoryview) -> None:
        for i in range(len(data)):
            self.pair.port_write(self.which, offset + i, data[i])


class Pic8259Pair:
    CASCADE_IRQ = 2
    STATE_VERSION: ClassVar[int] = 1
    state_type: ClassVar[type] = PicPairState

    def __init__(self, on_output: Callable[[bool], None] | None = None) -> None:
        self._lock = threading.Lock()
        # PIIX ELCR: IRQ0, 1, 2 (master) and IRQ8, 13 (slave) are always edge
        self.master = Pic8259(elcr_mask=0xF8)
        self.slave = Pic8259(elcr_mask=0xDE)
        self.on_output = on_output
        self._output = False
        self.master_device = _Port(self, "master")
        self.slave_device = _Port(self, "slave")
        self.elcr_device = _Port(self, "elcr")

    # -- inputs and outputs ----------------------------------------------------

    def set_irq(self, irq: int, level: bool) -> None:
        with self._lock:
            if irq >= 8:
                self.slave.set_input(irq - 8, level)
            else:
                self.master.set_input(irq, level)
            self._update_locked()

    def has_interrupt(self) -> bool:
        """The master's INT output."""
        with self._lock:
            return self._output

    def get_interrupt(self) -> int | None:
        """The INTA cycle: the vector, or None when INT is low.

        If the slave's request vanished between INT and INTA (a level line
        dropped) the slave answers with its IR7 vector without setting ISR:
        the spurious IRQ 15 that Linux recognises by reading ISR. The master's
        spurious IRQ 7 cannot arise here since INT and INTA are evaluated
        under one lock; a caller that must complete an INTA anyway can use
        ``intack_spurious``.
        """
        with self._lock:
            m, s = self.master, self.slave
            irq = m.pending(self.CASCADE_IRQ)
            if irq is None:
                return None
            m.ack(irq)
            if irq != self.CASCADE_IRQ:
                vector = m.vector_base + irq
            else:
                sirq = s.pending()
                if sirq is None:
                    vector = s.vector_base + 7  # spurious IRQ 15
                else:
                    s.ack(sirq)
                    vector = s.vector_base + sirq
            self._update_locked()
            return vector

    def intack_spurious(self) -> int:
        """INTA with no request: the master answers IR7 without setting ISR (spurious IRQ 7)."""
        with self._lock:
            return self.master.vector_base + 7

    def _update_locked(self) -> None:
        # The slave's INT output is the master's IR2 request. Treated as a level
        # so a second slave request right after an INTA is not lost as a non-edge.
        bit = 1 << self.CASCADE_IRQ
        if self.slave.pending() is not None:
            self.master.irr |= bit
        else:
            self.master.irr &= ~bit
        out = self.master.pending(self.CASCADE_IRQ) is not None
        if out != self._output:
            self._output = out
            if self.on_output is not None:
                self.on_output(out)

    # -- ports ------------------------------------------------------------------

    def _chip(self, which: str) -> Pic8259:
        return self.master if which == "master" else self.slave

    def port_read(self, which: str, offset: int) -> int:
        with self._lock:
            if which == "elcr":
                return (self.master.elcr, self.slave.elcr)[offset & 1]
            chip = self._chip(which)
            if chip.poll:
                # poll command: the next read returns 0x80 | level and acknowledges it
                chip.poll = False
                irq = chip.pending()
                if irq is None:
                    return 0
                chip.ack(irq)
                self._update_locked()
                return 0x80 | irq
            return chip.imr if offset & 1 else chip.read_cmd()

    def port_write(self, which: str, offset: int, value: int) -> None:
        with self._lock:
            if which == "elcr":
                chip = (self.master, self.slave)[offset & 1]
                chip.elcr = value & chip.elcr_mask
            else:
                chip = self._chip(which)
                if offset & 1:
                    chip.write_data(value)
                else:
                    chip.write_cmd(value)
            self._update_locked()

    # -- saved state -------------------------------------------------------------

    def save_state(self) -> PicPairState:
        with self._lock:
            return PicPairState(version=self.STATE_VERSION, master=self.master.save_state(),
                                slave=self.slave.save_state(), output=self._output)

    def restore_state(self, st: PicPairState) -> None:
        """Both 8259s as saved; the INT output level is the saved one (the
        LAPICs' LINT0 level is restored with them), not re-announced."""
        check_version("pic", st.version, self.STATE_VERSION)
        check_bool("pic", "output", st.output)
        Pic8259.check_state(st.master, "pic.master")
        Pic8259.check_state(st.slave, "pic.slave")
        with self._lock:
            self.master.restore_state(st.master)
            self.slave.restore_state(st.slave)
            self._output = st.output
