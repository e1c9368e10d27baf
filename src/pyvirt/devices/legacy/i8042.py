"""The i8042 PS/2 controller: keyboard, optional aux (mouse) port, reset line.

Map at port 0x60 with length 5: offset 0 is the data port (0x60), offset 4 the
status (read) / command (write) port (0x64); offsets 1-3 (0x61-0x63) read 0xff
and ignore writes (under KVM the in-kernel PIT owns 0x61 and sees it first).
Where 0x61 must be mapped separately, map this device at 0x60 with length 1
and ``command_port()`` at 0x64 with length 1 instead.

What it is for: Linux's i8042/atkbd probe (must finish quickly, never hang)
and the reset line (command 0xFE, or output port bit 0 cleared via 0xD1).
The keyboard answers the usual PS/2 commands; no keys are typed unless the VMM
calls ``enqueue_keyboard``. The aux port exists only when ``aux_irq`` is given:
without it the aux-disable bit (CTR bit 5) is stuck at 1, which Linux's
``i8042_check_aux`` reads as "no AUX port" after a few commands and no timeout.
With it, a minimal PS/2 mouse ACKs commands and never moves.

Interrupts: IRQ1 (``kbd_irq``) while the output buffer holds keyboard data and
CTR bit 0 is set; IRQ12 (``aux_irq``) likewise for aux data and CTR bit 1.
Reading the data port drops the line before loading the next byte, so an
edge-triggered pin sees one edge per byte (Linux reads one byte per interrupt).

Threading: a ``threading.Lock`` guards the state; IRQ levels are set under it,
the ``reset`` callback runs after it is released.

Saved state (``I8042State``): controller RAM (the command byte is byte 0), the
output port (bit 1 is A20), the output queue, commands awaiting a parameter
and the mouse settings; IRQ1/IRQ12 follow from them and are driven again on
restore.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from pyvirt.devices.bus import BusDevice, put_byte
from pyvirt.devices.irq import IrqLine
from pyvirt.devices.statecheck import check_bool, check_bytes, check_int
from pyvirt.state import StateError, check_version

__all__ = ["I8042", "I8042State"]

# Status register bits
_STS_OBF = 0x01
_STS_SYS = 0x04  # system flag: POST passed
_STS_CMD = 0x08  # A2: last write was to the command port
_STS_UNLOCKED = 0x10  # keyboard not inhibited
_STS_AUXB = 0x20  # output buffer holds aux data

# Controller configuration byte ("command byte", CTR)
_CTR_KBDINT = 0x01
_CTR_AUXINT = 0x02
_CTR_SYS = 0x04
_CTR_KBDDIS = 0x10
_CTR_AUXDIS = 0x20
_CTR_XLATE = 0x40

_ACK = 0xFA
_OUTPUT_QUEUE_MAX = 64  # beyond this, injected bytes and controller answers are dropped

# Ctrl, Alt, Delete pressed, then released in reverse order. Set 1 is what the
# guest reads while the controller translates (CTR bit 6), set 2 otherwise.
_CTRL_ALT_DEL_SET1 = bytes([0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D])
_CTRL_ALT_DEL_SET2 = bytes([0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0, 0x14])

# Controller commands that take a data byte, keyboard/mouse commands that take a parameter.
_DATA_COMMANDS = frozenset([0, *range(0x60, 0x80), 0xD1, 0xD2, 0xD3, 0xD4])
_KBD_PARAM_COMMANDS = frozenset([0, 0xED, 0xF0, 0xF3])
_AUX_PARAM_COMMANDS = frozenset([0, 0xE8, 0xF3])


@dataclass(frozen=True)
class I8042State:
    version: int
    ram: bytes  # 32 bytes of controller RAM; byte 0 is the command byte (CTR)
    status_cmd: int  # status bit 3: the last write went to the command port
    outport: int  # bit 0: reset line (1 = inactive), bit 1: A20
    pending_cmd: int  # controller command awaiting its data byte, or 0
    kbd_param_for: int
    aux_param_for: int
    out: tuple[tuple[int, bool], ...]  # output queue: (byte, from the aux port)
    last_data: int
    mouse_rate: int
    mouse_res: int
    mouse_enabled: bool


class _CommandPort:
    """The 0x64 port alone, for maps where 0x60 and 0x64 are separate ranges."""

    def __init__(self, ctl: I8042) -> None:
        self._ctl = ctl

    def read(self, offset: int, data: memoryview) -> None:
        self._ctl.read(4 + offset, data)

    def write(self, offset: int, data: memoryview) -> None:
        self._ctl.write(4 + offset, data)


class I8042:
    """An i8042 keyboard controller. Map at 0x60, length 5."""

    STATE_VERSION: ClassVar[int] = 1
    state_type: ClassVar[type] = I8042State

    def __init__(
        self,
        reset: Callable[[], None],
        kbd_irq: IrqLine | None = None,
        aux_irq: IrqLine | None = None,
    ) -> None:
        self._reset = reset
        self._kbd_irq = kbd_irq
        self._aux_irq = aux_irq
        self._lock = threading.Lock()
        # CTR as firmware leaves it: keyboard IRQ on, SYS set, scancode translation on.
        self._ram = bytearray(32)  # controller RAM; byte 0 is the CTR
        self._ram[0] = _CTR_KBDINT | _CTR_SYS | _CTR_XLATE | (
            _CTR_AUXINT if aux_irq is not None else _CTR_AUXDIS)
        self._status_cmd = 0  # A2 bit
        self._outport = 0x03  # bit 0: reset line inactive, bit 1: A20 enabled
        self._pending_cmd = 0  # controller command awaiting its data byte, or 0
        self._kbd_param_for = 0  # keyboard command awaiting its parameter, or 0
        self._aux_param_for = 0  # mouse command awaiting its parameter, or 0
        # Output buffer contents: (byte, is_aux). Index 0 is what port 0x60 reads.
        self._out: deque[tuple[int, bool]] = deque()
        self._kbd_level = False
        self._aux_level = False
        self._last_data = 0
        # minimal mouse state (status request answers)
        self._mouse_rate = 100
        self._mouse_res = 2
        self._mouse_enabled = False
        self._interrupts = 0  # IRQ1/IRQ12 assertions, for metrics(); never reset

    def command_port(self) -> BusDevice:
        """A device for port 0x64 alone (length 1)."""
        return _CommandPort(self)

    # -- host side ---------------------------------------------------------

    def enqueue_keyboard(self, scancodes: bytes) -> int:
        """Inject keyboard bytes (already in the guest's scancode set); returns bytes taken."""
        with self._lock:
            n = 0
            for b in scancodes:
                if len(self._out) >= _OUTPUT_QUEUE_MAX:
                    break
                self._out.append((b, False))
                n += 1
            self._update_irqs()
            return n

    def send_ctrl_alt_del(self) -> bool:
        """Type Ctrl-Alt-Del (press and release) on the keyboard, with IRQ1.

        Linux's atkbd turns it into ``ctrl_alt_del()``: with C-A-D disabled by
        init (busybox and systemd both do) that is a SIGINT to PID 1, which runs
        inittab's ``::ctrlaltdel:`` entry. All or nothing: False (nothing
        queued) when the output queue has no room for the whole sequence, so a
        key is never left pressed.
        """
        with self._lock:
            seq = _CTRL_ALT_DEL_SET1 if self._ram[0] & _CTR_XLATE else _CTRL_ALT_DEL_SET2
            if len(self._out) + len(seq) > _OUTPUT_QUEUE_MAX:
                return False
            self._out.extend((b, False) for b in seq)
            self._update_irqs()
            return True

    def metrics(self) -> dict[str, int]:
        return {"interrupts": self._interrupts}

    # -- saved state (the VM is paused) ------------------------------------

    def save_state(self) -> I8042State:
        with self._lock:
            return I8042State(
                version=self.STATE_VERSION, ram=bytes(self._ram), status_cmd=self._status_cmd,
                outport=self._outport, pending_cmd=self._pending_cmd,
                kbd_param_for=self._kbd_param_for, aux_param_for=self._aux_param_for,
                out=tuple(self._out), last_data=self._last_data,
                mouse_rate=self._mouse_rate, mouse_res=self._mouse_res,
                mouse_enabled=self._mouse_enabled)

    def restore_state(self, state: I8042State) -> None:
        part = "i8042"
        check_version(part, state.version, self.STATE_VERSION)
        ram = check_bytes(part, "ram", state.ram, length=len(self._ram))
        if self._aux_irq is None and not ram[0] & _CTR_AUXDIS:
            raise StateError(f"{part}: saved state field ram[0] = {ram[0]:#x} enables an "
                             "aux port this machine does not have")
        status_cmd = check_int(part, "status_cmd", state.status_cmd, 0, _STS_CMD)
        if status_cmd not in (0, _STS_CMD):
            raise StateError(f"{part}: saved state field status_cmd = {status_cmd:#x} "
                             "is not 0 or 0x8")
        outport = check_int(part, "outport", state.outport, 0, 0xFF)
        for name, allowed in (("pending_cmd", _DATA_COMMANDS),
                              ("kbd_param_for", _KBD_PARAM_COMMANDS),
                              ("aux_param_for", _AUX_PARAM_COMMANDS)):
            value = check_int(part, name, getattr(state, name), 0, 0xFF)
            if value not in allowed:
                raise StateError(f"{part}: saved state field {name} = {value:#x} is not a "
                                 "command that takes a parameter")
        if not isinstance(state.out, tuple | list) or len(state.out) > _OUTPUT_QUEUE_MAX:
            raise StateError(f"{part}: saved state field out is not a queue of at most "
                             f"{_OUTPUT_QUEUE_MAX} bytes")
        out: deque[tuple[int, bool]] = deque()
        for i, entry in enumerate(state.out):
            if not isinstance(entry, tuple | list) or len(entry) != 2:
                raise StateError(f"{part}: saved state field out[{i}] is not (byte, aux)")
            out.append((check_int(part, f"out[{i}]", entry[0], 0, 0xFF),
                        check_bool(part, f"out[{i}]", entry[1])))
        last_data = check_int(part, "last_data", state.last_data, 0, 0xFF)
        mouse_rate = check_int(part, "mouse_rate", state.mouse_rate, 0, 0xFF)
        mouse_res = check_int(part, "mouse_res", state.mouse_res, 0, 3)
        mouse_enabled = check_bool(part, "mouse_enabled", state.mouse_enabled)
        with self._lock:
            self._ram[:] = ram
            self._status_cmd, self._outport = status_cmd, outport
            self._pending_cmd = state.pending_cmd
            self._kbd_param_for, self._aux_param_for = state.kbd_param_for, state.aux_param_for
            self._out = out
            self._last_data = last_data
            self._mouse_rate, self._mouse_res = mouse_rate, mouse_res
            self._mouse_enabled = mouse_enabled
            # Drive both lines whatever the cached levels say: the lines behind
            # them may be new (a fresh process) or left elsewhere by the last run.
            kbd, aux = self._wanted_levels()
            self._kbd_level, self._aux_level = kbd, aux
            if self._kbd_irq is not None:
                self._kbd_irq.set_level(kbd)
            if self._aux_irq is not None:
                self._aux_irq.set_level(aux)

    # -- bus interface -----------------------------------------------------

    def read(self, offset: int, data: memoryview) -> None:
        with self._lock:
            if offset == 0:
                value = self._read_data()
            elif offset == 4:
                value = self._status()
            else:
                value = 0xFF
        put_byte(data, value)

    def write(self, offset: int, data: memoryview) -> None:
        value = data[0]
        with self._lock:
            if offset == 0:
                self._status_cmd = 0
                do_reset = self._write_data(value)
            elif offset == 4:
                self._status_cmd = _STS_CMD
                do_reset = self._write_command(value)
            else:
                do_reset = False
            self._update_irqs()
        if do_reset:
            self._reset()

    # -- internals (lock held) ---------------------------------------------

    def _status(self) -> int:
        sts = _STS_SYS | _STS_UNLOCKED | self._status_cmd
        if self._out:
            sts |= _STS_OBF
            if self._out[0][1]:
                sts |= _STS_AUXB
        return sts

    def _read_data(self) -> int:
        if not self._out:
            return self._last_data  # the output buffer keeps its last byte
        self._last_data = self._out.popleft()[0]
        # Drop the line so the next byte (if any) gives an edge.
        self._set_kbd_level(False)
        self._set_aux_level(False)
        self._update_irqs()
        return self._last_data

    def _push(self, value: int, aux: bool = False) -> None:
        # A guest can make the controller answer without ever reading port 0x60:
        # keep the queue bounded (a real i8042 holds one byte) by dropping the excess.
        if len(self._out) < _OUTPUT_QUEUE_MAX:
            self._out.append((value, aux))

    def _write_command(self, cmd: int) -> bool:
        self._pending_cmd = 0
        ctr = self._ram[0]
        if cmd == 0x20 or 0x21 <= cmd <= 0x3F:  # read controller RAM (0x20 = CTR)
            self._push(self._ram[cmd & 0x1F])
        elif 0x60 <= cmd <= 0x7F or cmd in (0xD1, 0xD2, 0xD3, 0xD4):
            self._pending_cmd = cmd  # the data byte follows on port 0x60
        elif cmd == 0xA7:
            self._ram[0] = ctr | _CTR_AUXDIS
        elif cmd == 0xA8:
            if self._aux_irq is not None:  # no aux port: the bit stays set
                self._ram[0] = ctr & ~_CTR_AUXDIS & 0xFF
        elif cmd == 0xA9:
            self._push(0x00)  # aux interface test: no error
        elif cmd == 0xAA:
            self._push(0x55)  # controller self test passed
        elif cmd == 0xAB:
            self._push(0x00)  # keyboard interface test: no error
        elif cmd == 0xAD:
            self._ram[0] = ctr | _CTR_KBDDIS
        elif cmd == 0xAE:
            self._ram[0] = ctr & ~_CTR_KBDDIS & 0xFF
        elif cmd == 0xC0:
            self._push(0x80)  # input port: keyboard not inhibited
        elif cmd == 0xD0:
            out = self._outport & 0xCF
            if self._out:
                out |= 0x20 if self._out[0][1] else 0x10
            self._push(out)
        elif cmd == 0xE0:
            self._push(0x00)  # test inputs
        elif cmd & 0xF0 == 0xF0:
            # Pulse output port lines whose mask bit is 0; bit 0 is the CPU reset line.
            return not cmd & 0x01
        # anything else: ignored
        return False

    def _write_data(self, value: int) -> bool:
        cmd = self._pending_cmd
        if cmd:
            self._pending_cmd = 0
            if 0x60 <= cmd <= 0x7F:
                self._ram[cmd & 0x1F] = value
                if cmd == 0x60 and self._aux_irq is None:
                    self._ram[0] |= _CTR_AUXDIS  # no aux port to enable
            elif cmd == 0xD1:
                self._outport = value
                return not value & 0x01  # output port bit 0 low asserts CPU reset
            elif cmd == 0xD2:
                self._push(value)
            elif cmd == 0xD3:
                self._push(value, aux=True)
            elif cmd == 0xD4 and self._aux_irq is not None:  # no aux port: dropped
                self._mouse_command(value)
            return False
        self._keyboard_command(value)
        return False

    def _keyboard_command(self, value: int) -> None:
        param_for = self._kbd_param_for
        if param_for:
            self._kbd_param_for = 0
            if param_for == 0xF0 and value == 0:
                self._push(_ACK)
                self._push(0x41 if self._ram[0] & _CTR_XLATE else 0x02)  # set 2
            else:
                self._push(_ACK)
            return
        if value == 0xFF:  # reset: ACK, then BAT passed
            self._push(_ACK)
            self._push(0xAA)
        elif value == 0xF2:  # identify: MF2 keyboard (0x83 reads as 0x41 when translated)
            self._push(_ACK)
            self._push(0xAB)
            self._push(0x41 if self._ram[0] & _CTR_XLATE else 0x83)
        elif value == 0xEE:  # echo
            self._push(0xEE)
        elif value in (0xED, 0xF0, 0xF3):  # LEDs, scancode set, typematic: take a parameter
            self._kbd_param_for = value
            self._push(_ACK)
        else:  # 0xF4 enable, 0xF5 disable, 0xF6 defaults, ...
            self._push(_ACK)

    def _mouse_command(self, value: int) -> None:
        param_for = self._aux_param_for
        if param_for:
            self._aux_param_for = 0
            if param_for == 0xF3:
                self._mouse_rate = value
            elif param_for == 0xE8:
                self._mouse_res = value & 0x03
            self._push(_ACK, aux=True)
            return
        self._push(_ACK, aux=True)
        if value == 0xFF:  # reset: ACK, BAT passed, device id 0 (standard mouse)
            self._mouse_enabled = False
            self._push(0xAA, aux=True)
            self._push(0x00, aux=True)
        elif value == 0xF2:  # get device id
            self._push(0x00, aux=True)
        elif value == 0xE9:  # status request: flags, resolution, sample rate
            self._push(0x20 if self._mouse_enabled else 0x00, aux=True)
            self._push(self._mouse_res, aux=True)
            self._push(self._mouse_rate, aux=True)
        elif value == 0xEB:  # read data: one empty movement packet
            self._push(0x08, aux=True)
            self._push(0x00, aux=True)
            self._push(0x00, aux=True)
        elif value in (0xF3, 0xE8):
            self._aux_param_for = value
        elif value == 0xF4:
            self._mouse_enabled = True
        elif value in (0xF5, 0xF6):
            self._mouse_enabled = False

    def _set_kbd_level(self, level: bool) -> None:
        if level != self._kbd_level:
            self._kbd_level = level
            if self._kbd_irq is not None:
                self._interrupts += level
                self._kbd_irq.set_level(level)

    def _set_aux_level(self, level: bool) -> None:
        if level != self._aux_level:
            self._aux_level = level
            if self._aux_irq is not None:
                self._interrupts += level
                self._aux_irq.set_level(level)

    def _wanted_levels(self) -> tuple[bool, bool]:
        """(IRQ1, IRQ12): the byte at the head of the output buffer and the CTR."""
        if not self._out:
            return False, False
        ctr = self._ram[0]
        if self._out[0][1]:
            return False, bool(ctr & _CTR_AUXINT)
        return bool(ctr & _CTR_KBDINT), False

    def _update_irqs(self) -> None:
        kbd, aux = self._wanted_levels()
        self._set_kbd_level(kbd)
        self._set_aux_level(aux)
