"""A 16550A UART (the PC COM port), modelled on the National PC16550D datasheet.

Register map (offset from the base port; DLAB = LCR bit 7):

    0  RBR (read) / THR (write);  DLL when DLAB=1
    1  IER;                       DLM when DLAB=1
    2  IIR (read) / FCR (write);  not affected by DLAB
    3  LCR   4 MCR   5 LSR   6 MSR   7 SCR

Transmission is instantaneous: every THR write hands one byte to ``out`` and
THR/TSR are empty again at once, so LSR always shows THRE|TEMT. ``out`` is
called once per byte, *outside* the device lock, with a shared 1-byte
``bytes`` object (no allocation): the sink should only append to a buffer
that the console thread flushes, never block on the console.

Receive side: a 16-byte hardware FIFO (1 byte when FIFOs are off) fed from a
host-side buffer (the "wire") of ``HOST_RX_CAPACITY`` bytes, so pasted input is
not lost: ``enqueue_input`` returns how many bytes it took so the console can
back-pressure. Overrun (LSR.OE) only happens where the datasheet says a byte is
destroyed, i.e. on loopback transmission into a full receiver.

When bytes leave the wire: only while the driver listens (IER.ERBFI, not in
loopback), and only when the driver *looks* at the receiver (reads RBR, LSR or
IIR); the interrupt line already reports the waiting bytes. A FIFO reset (FCR)
clears the hardware FIFO as the datasheet says, but never the wire, so it only
drops bytes the driver has seen. This matters because Linux's 8250 driver sets
ERBFI and resets the FIFO without reading in between, more than once while it
brings the console up (drivers/tty/serial/8250/8250_port.c, v6.1):
``autoconfig()`` writes IER = 0x0F to test the register, then enables and
clears the FIFOs; ``serial8250_do_startup()`` leaves IER = RLSI|RDI with the
FIFOs off, and ``serial8250_do_set_termios()`` writes that IER again and then
FCR = ENABLE_FIFO ("two steps"), which per the datasheet clears the FIFO.
Moving bytes in at the IER write lost one byte at each of the two (the README's
``echo 'uname -a; poweroff' | pyvirt run`` ran ``ame -a``).

Interrupt pin: on PC boards the UART's INTR reaches the PIC through a buffer
enabled by the (active-low) -OUT2 pin, so the line is driven only while
MCR.OUT2 is set and loopback is off (the datasheet forces OUT2 inactive in
loopback). The line's *level* is reported; it is cached here so the per-byte
TX path calls ``set_level`` only on a change.

Threading: one ``threading.Lock`` guards all state. Register accesses come from
any vCPU thread, ``enqueue_input`` from the console thread; ``irq.set_level`` is
called under the lock, ``out`` after releasing it.

Saved state (``SerialState``): every register, the receive FIFO, the input
still on the wire (so typed-ahead input survives a snapshot) and the pending
THRE condition; the interrupt level is derived from them and driven again on
restore.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from pyvirt.devices.irq import IrqLine
from pyvirt.devices.statecheck import check_bits, check_bool, check_bytes, check_int
from pyvirt.state import StateError, check_version

__all__ = ["HOST_RX_CAPACITY", "Serial16550", "SerialState"]

#: bytes of input buffered host-side beyond the 16-byte hardware FIFO
HOST_RX_CAPACITY = 4096
_FIFO_SIZE = 16

# IER (datasheet Table II)
_IER_ERBFI = 0x01  # received data available
_IER_ETBEI = 0x02  # THR empty
_IER_ELSI = 0x04  # receiver line status
_IER_EDSSI = 0x08  # modem status
_IER_MASK = 0x0F  # bits 4-7 are always 0 on a 16550A (Linux's XScale UUE probe relies on it)

# IIR interrupt identification codes, highest priority first
_IIR_NONE = 0x01
_IIR_RLS = 0x06
_IIR_RDA = 0x04
_IIR_TIMEOUT = 0x0C
_IIR_THRE = 0x02
_IIR_MSR = 0x00
_IIR_FIFO = 0xC0  # bits 7:6 set while FCR0 = 1 (how drivers tell a 16550A from a 16550)

# FCR
_FCR_ENABLE = 0x01
_FCR_RX_RESET = 0x02
_FCR_TX_RESET = 0x04
_RX_TRIGGER = (1, 4, 8, 14)  # FCR bits 7:6

# LCR / MCR
_LCR_DLAB = 0x80
_MCR_DTR = 0x01
_MCR_RTS = 0x02
_MCR_OUT1 = 0x04
_MCR_OUT2 = 0x08
_MCR_LOOP = 0x10
_MCR_MASK = 0x1F  # bits 5-7 are always 0 on a 16550A

# LSR
_LSR_DR = 0x01
_LSR_OE = 0x02
_LSR_ERRORS = 0x1E  # OE|PE|FE|BI: cleared by reading LSR, raise the RLS interrupt
_LSR_THRE = 0x20
_LSR_TEMT = 0x40

# MSR: delta bits 3:0, line states 7:4
_MSR_DCTS = 0x01
_MSR_DDSR = 0x02
_MSR_TERI = 0x04
_MSR_DDCD = 0x08
_MSR_CTS = 0x10
_MSR_DSR = 0x20
_MSR_RI = 0x40
_MSR_DCD = 0x80
#: modem inputs outside loopback: the "cable" always has CTS, DSR and DCD asserted
_MSR_LINES_CONNECTED = _MSR_CTS | _MSR_DSR | _MSR_DCD

#: one shared immutable 1-byte object per value, so the TX path does not allocate
_BYTE = tuple(bytes((i,)) for i in range(256))


@dataclass(frozen=True)
class SerialState:
    version: int
    ier: int
    fcr: int
    lcr: int
    mcr: int
    scr: int
    dll: int
    dlm: int
    lsr_err: int  # sticky OE/PE/FE/BI until LSR is read
    msr_delta: int
    thre_pending: bool
    rbr_last: int
    fifo: bytes  # the receiver FIFO (RBR first)
    wire: bytes  # input taken from the console, not yet received


class Serial16550:
    """A 16550A UART. Map it at COM1_PORT with length 8."""

    STATE_VERSION: ClassVar[int] = 1
    state_type: ClassVar[type] = SerialState

    def __init__(self, irq: IrqLine, out: Callable[[bytes], None]) -> None:
        self._irq = irq
        self._out = out
        self._lock = threading.Lock()
        self._irq_out = False  # last level driven on ``irq``
        # counters for metrics(); never reset, not part of the saved state
        self._tx_bytes = 0
        self._rx_bytes = 0
        self._interrupts = 0
        # Reset values from the datasheet's "UART reset configuration" table.
        self._ier = 0
        self._fcr = 0
        self._lcr = 0
        self._mcr = 0
        self._scr = 0
        self._dll = 0x0C  # 9600 baud with the 1.8432 MHz crystal; not reset by MR
        self._dlm = 0
        self._lsr_err = 0  # sticky OE/PE/FE/BI bits until LSR is read
        self._msr_delta = 0
        self._thre_pending = False  # THRE interrupt condition (set when THR empties)
        self._rbr_last = 0  # RBR keeps its last byte when the FIFO is empty
        self._fifo: deque[int] = deque()
        self._host: deque[int] = deque()

    # -- host side ---------------------------------------------------------

    def enqueue_input(self, data: bytes) -> int:
        """Queue bytes from the console for the guest; returns how many were taken."""
        with self._lock:
            taken = data[: self._room()]
            self._host.extend(taken)
            self._rx_bytes += len(taken)
            self._update_irq()  # the bytes stay on the wire until the driver reads
            return len(taken)

    def rx_free(self) -> int:
        """Room left in the host-side receive buffer (for console back-pressure)."""
        with self._lock:
            return self._room()

    def metrics(self) -> dict[str, int]:
        """Bytes sent by the guest, bytes taken from the console, IRQ assertions."""
        return {"tx_bytes": self._tx_bytes, "rx_bytes": self._rx_bytes,
                "interrupts": self._interrupts}

    # -- saved state (the VM is paused) ------------------------------------

    def save_state(self) -> SerialState:
        with self._lock:
            return SerialState(
                version=self.STATE_VERSION, ier=self._ier, fcr=self._fcr, lcr=self._lcr,
                mcr=self._mcr, scr=self._scr, dll=self._dll, dlm=self._dlm,
                lsr_err=self._lsr_err, msr_delta=self._msr_delta,
                thre_pending=self._thre_pending, rbr_last=self._rbr_last,
                fifo=bytes(self._fifo), wire=bytes(self._host))

    def restore_state(self, state: SerialState) -> None:
        part = "serial"
        check_version(part, state.version, self.STATE_VERSION)
        fcr = check_bits(part, "fcr", state.fcr, 0xC9)
        if fcr and not fcr & _FCR_ENABLE:
            raise StateError(f"{part}: saved state field fcr = {fcr:#x} programs a "
                             "trigger level with the FIFOs off")
        ier = check_bits(part, "ier", state.ier, _IER_MASK)
        mcr = check_bits(part, "mcr", state.mcr, _MCR_MASK)
        regs = {name: check_int(part, name, getattr(state, name), 0, 0xFF)
                for name in ("lcr", "scr", "dll", "dlm", "rbr_last")}
        lsr_err = check_bits(part, "lsr_err", state.lsr_err, _LSR_ERRORS)
        msr_delta = check_bits(part, "msr_delta", state.msr_delta, 0x0F)
        thre = check_bool(part, "thre_pending", state.thre_pending)
        fifo = check_bytes(part, "fifo", state.fifo,
                           max_len=_FIFO_SIZE if fcr & _FCR_ENABLE else 1)
        wire = check_bytes(part, "wire", state.wire, max_len=HOST_RX_CAPACITY)
        with self._lock:
            self._ier, self._fcr, self._mcr = ier, fcr, mcr
            self._lcr, self._scr = regs["lcr"], regs["scr"]
            self._dll, self._dlm, self._rbr_last = regs["dll"], regs["dlm"], regs["rbr_last"]
            self._lsr_err, self._msr_delta, self._thre_pending = lsr_err, msr_delta, thre
            self._fifo = deque(fifo)
            self._host = deque(wire)
            # Drive the line even if the cached level agrees: the line behind it may
            # be new (a fresh process) or have been left elsewhere by the last run.
            level = self._irq_level()
            self._irq_out = level
            self._irq.set_level(level)

    # -- bus interface -----------------------------------------------------

    def read(self, offset: int, data: memoryview) -> None:
        if len(data) != 1:
            # Drivers use byte accesses; treat a wider one as consecutive byte reads.
            for i in range(len(data)):
                self.read(offset + i, data[i : i + 1])
            return
        with self._lock:
            data[0] = self._read_reg(offset)

    def write(self, offset: int, data: memoryview) -> None:
        if len(data) != 1:
            for i in range(len(data)):
                self.write(offset + i, data[i : i + 1])
            return
        value = data[0]
        with self._lock:
            if offset != 0 or self._lcr & _LCR_DLAB or self._mcr & _MCR_LOOP:
                self._write_reg(offset, value)
                return
            # THR write, the hot path: writing THR clears a pending THRE interrupt, and
            # as transmission is instantaneous THR empties again at once, which (per the
            # datasheet) sets it again: the net effect is "THRE pending".
            self._thre_pending = True
            self._tx_bytes += 1
            if self._ier & _IER_ETBEI and not self._irq_out:
                self._update_irq()
        self._out(_BYTE[value])

    # -- registers (called with the lock held) -----------------------------

    def _read_reg(self, offset: int) -> int:
        if offset == 0:
            if self._lcr & _LCR_DLAB:
                return self._dll
            self._refill()
            if self._fifo:
                self._rbr_last = self._fifo.popleft()
                self._update_irq()
            return self._rbr_last
        if offset == 1:
            return self._dlm if self._lcr & _LCR_DLAB else self._ier
        if offset == 2:
            self._refill()  # the driver learns about waiting input here: it is received
            iir = self._pending_iir()
            if iir == _IIR_THRE:
                # Reading IIR clears THRE when it is the source reported (datasheet Table IV).
                self._thre_pending = False
                self._update_irq()
            return iir | (_IIR_FIFO if self._fcr & _FCR_ENABLE else 0)
        if offset == 3:
            return self._lcr
        if offset == 4:
            return self._mcr
        if offset == 5:
            self._refill()
            lsr = self._lsr_err | _LSR_THRE | _LSR_TEMT
            if self._fifo:
                lsr |= _LSR_DR
            if self._lsr_err:
                self._lsr_err = 0  # error bits are cleared by reading LSR
                self._update_irq()
            return lsr
        if offset == 6:
            msr = self._msr_lines() | self._msr_delta
            if self._msr_delta:
                self._msr_delta = 0  # delta bits are cleared by reading MSR
                self._update_irq()
            return msr
        if offset == 7:
            return self._scr
        return 0xFF

    def _write_reg(self, offset: int, value: int) -> None:
        if offset == 0:
            if self._lcr & _LCR_DLAB:
                self._dll = value
            else:  # THR in loopback: the TSR output is wired to the receiver
                self._thre_pending = True
                self._receive_loopback(value)
                self._update_irq()
        elif offset == 1:
            if self._lcr & _LCR_DLAB:
                self._dlm = value
                return
            old = self._ier
            self._ier = value & _IER_MASK
            # Enabling ETBEI while THR is empty raises THRE (THR is always empty here);
            # Linux's THRE test at port startup toggles IER to check exactly this.
            if self._ier & _IER_ETBEI and not old & _IER_ETBEI:
                self._thre_pending = True
            # Input held on the wire raises RDA now, but moves in only when the driver
            # reads: the FIFO reset that follows in Linux's set_termios must not eat it.
            self._update_irq()
        elif offset == 2:
            self._write_fcr(value)
        elif offset == 3:
            self._lcr = value
        elif offset == 4:
            before = self._msr_lines()
            self._mcr = value & _MCR_MASK
            after = self._msr_lines()
            self._note_msr_change(before, after)
            # Leaving loopback reconnects the receiver to the wire (bytes move on a read).
            self._update_irq()
        elif offset == 7:
            self._scr = value
        # LSR and MSR writes are factory-test only in the datasheet: ignored.

    def _write_fcr(self, value: int) -> None:
        was_enabled = self._fcr & _FCR_ENABLE
        if not value & _FCR_ENABLE:
            # FCR0 = 0: FIFOs off (the other bits are not programmed without FCR0).
            self._fcr = 0
            if was_enabled:
                self._fifo.clear()  # changing FCR0 clears both FIFOs
        else:
            self._fcr = value & 0xC9  # keep enable, DMA mode and trigger level
            if not was_enabled or value & _FCR_RX_RESET:
                self._fifo.clear()
            # TX FIFO reset (bit 2) has nothing to do: transmission is instantaneous.
        # Only the hardware FIFO is cleared: bytes still on the wire are not received yet.
        self._update_irq()

    # -- helpers (lock held) -----------------------------------------------

    def _fifo_capacity(self) -> int:
        return _FIFO_SIZE if self._fcr & _FCR_ENABLE else 1

    def _room(self) -> int:
        """Bytes ``enqueue_input`` can take now: free space on the wire."""
        return max(HOST_RX_CAPACITY - len(self._host), 0)

    def _listening(self) -> bool:
        # In loopback the serial input is disconnected from the receiver.
        return bool(self._ier & _IER_ERBFI) and not self._mcr & _MCR_LOOP

    def _rx_count(self) -> int:
        """Bytes the receiver holds once the wire has refilled it (what IIR/LSR show)."""
        n = len(self._fifo)
        if self._host and self._listening():
            n = min(n + len(self._host), max(self._fifo_capacity(), n))
        return n

    def _refill(self) -> None:
        """Move bytes from the wire into the receiver while it has room.

        Called only where the driver reads the receiver (RBR, LSR, IIR) and only
        while it listens (IER.ERBFI): input that arrives before the driver is up,
        or while it is still programming the FIFO, stays on the wire, out of reach
        of the FIFO resets of its start-up sequence (see the module docstring).
        """
        if not self._host or not self._listening():
            return
        cap = self._fifo_capacity()
        fifo, host = self._fifo, self._host
        while host and len(fifo) < cap:
            fifo.append(host.popleft())

    def _receive_loopback(self, value: int) -> None:
        if self._fcr & _FCR_ENABLE:
            if len(self._fifo) >= _FIFO_SIZE:
                # FIFO full: the character in the shift register is lost (datasheet, LSR1).
                self._lsr_err |= _LSR_OE
                return
            self._fifo.append(value)
        else:
            if self._fifo:
                # RBR not read before the next character: it is overwritten.
                self._fifo.clear()
                self._lsr_err |= _LSR_OE
            self._fifo.append(value)

    def _msr_lines(self) -> int:
        mcr = self._mcr
        if not mcr & _MCR_LOOP:
            return _MSR_LINES_CONNECTED
        # Loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD (datasheet, MCR bit 4).
        lines = 0
        if mcr & _MCR_RTS:
            lines |= _MSR_CTS
        if mcr & _MCR_DTR:
            lines |= _MSR_DSR
        if mcr & _MCR_OUT1:
            lines |= _MSR_RI
        if mcr & _MCR_OUT2:
            lines |= _MSR_DCD
        return lines

    def _note_msr_change(self, before: int, after: int) -> None:
        changed = before ^ after
        if changed & _MSR_CTS:
            self._msr_delta |= _MSR_DCTS
        if changed & _MSR_DSR:
            self._msr_delta |= _MSR_DDSR
        if before & _MSR_RI and not after & _MSR_RI:
            self._msr_delta |= _MSR_TERI  # trailing edge of RI only
        if changed & _MSR_DCD:
            self._msr_delta |= _MSR_DDCD

    def _pending_iir(self) -> int:
        """The IIR identification of the highest-priority pending interrupt."""
        ier = self._ier
        if ier & _IER_ELSI and self._lsr_err:
            return _IIR_RLS
        rx = self._rx_count() if ier & _IER_ERBFI else 0
        if rx:
            if not self._fcr & _FCR_ENABLE:
                return _IIR_RDA
            if rx >= _RX_TRIGGER[self._fcr >> 6]:
                return _IIR_RDA
            # Below the trigger level the 16550A reports a character timeout once no
            # character has moved for 4 character times; input here arrives in bursts
            # that are complete when queued, so the timeout is reported at once.
            return _IIR_TIMEOUT
        if ier & _IER_ETBEI and self._thre_pending:
            return _IIR_THRE
        if ier & _IER_EDSSI and self._msr_delta:
            return _IIR_MSR
        return _IIR_NONE

    def _irq_level(self) -> bool:
        return (self._pending_iir() != _IIR_NONE
                and self._mcr & (_MCR_OUT2 | _MCR_LOOP) == _MCR_OUT2)

    def _update_irq(self) -> None:
        level = self._irq_level()
        if level != self._irq_out:
            self._irq_out = level
            if level:
                self._interrupts += 1
            self._irq.set_level(level)
