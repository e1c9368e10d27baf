"""I8042: Linux's i8042/atkbd probe sequence, reset paths, IRQ edges."""

from __future__ import annotations

from pyvirt.devices.irq import NullIrq
from pyvirt.devices.legacy.i8042 import I8042

OBF, SYS, AUXB = 0x01, 0x04, 0x20


class Ctl:
    def __init__(self, with_aux: bool = False) -> None:
        self.resets = 0
        self.kbd = NullIrq()
        self.aux = NullIrq()
        self.dev = I8042(self._reset, self.kbd, self.aux if with_aux else None)

    def _reset(self) -> None:
        self.resets += 1

    def inb(self, port: int) -> int:
        buf = bytearray(1)
        self.dev.read(port - 0x60, memoryview(buf))
        return buf[0]

    def outb(self, port: int, value: int) -> None:
        self.dev.write(port - 0x60, memoryview(bytearray([value])))

    def command(self, cmd: int, params: bytes = b"", nres: int = 0) -> list[int] | None:
        """Like Linux's __i8042_command: None on timeout (no OBF)."""
        self.outb(0x64, cmd)
        for b in params:
            self.outb(0x60, b)
        res: list[int] = []
        for _ in range(nres):
            if not self.inb(0x64) & OBF:
                return None
            res.append(self.inb(0x60))
        return res

    def flush(self) -> list[int]:
        out: list[int] = []
        for _ in range(32):
            if not self.inb(0x64) & OBF:
                return out
            out.append(self.inb(0x60))
        raise AssertionError("output buffer never empties")


def test_status_and_selftest() -> None:
    c = Ctl()
    sts = c.inb(0x64)
    assert sts & SYS
    assert not sts & (OBF | 0x02)  # nothing to read, input buffer never full
    assert c.command(0xAA, nres=1) == [0x55]
    assert c.command(0xAB, nres=1) == [0x00]
    assert c.flush() == []


def test_ctr_read_write() -> None:
    c = Ctl()
    ctr = c.command(0x20, nres=1)
    assert ctr is not None and ctr[0] & 0x04  # SYS flag
    c.command(0x60, bytes([0x65]))
    assert c.command(0x20, nres=1) == [0x65 | 0x20]  # no aux port: AUXDIS sticks
    c.command(0xAD)
    assert c.command(0x20, nres=1) == [0x75]
    c.command(0xAE)
    assert c.command(0x20, nres=1) == [0x65]


def test_linux_aux_check_without_aux_port_is_quick() -> None:
    # i8042_check_aux: AUX_LOOP, then disable/enable and check CTR bit 5.
    c = Ctl()
    assert c.flush() == []
    res = c.command(0xD3, b"\x5a", 1)
    assert res == [0x5A]
    c.command(0xA7)
    ctr = c.command(0x20, nres=1)
    assert ctr is not None and ctr[0] & 0x20
    c.command(0xA8)
    ctr = c.command(0x20, nres=1)
    assert ctr is not None and ctr[0] & 0x20  # "no AUX": Linux gives up, no timeouts
    assert c.flush() == []


def test_aux_port_loop_irq_and_mouse() -> None:
    c = Ctl(with_aux=True)
    c.command(0x60, bytes([0x47]))  # KBDINT | AUXINT | SYS | XLATE
    c.command(0xA8)
    ctr = c.command(0x20, nres=1)
    assert ctr is not None and not ctr[0] & 0x20
    c.outb(0x64, 0xD3)
    c.outb(0x60, 0xA5)
    assert c.inb(0x64) & (OBF | AUXB) == OBF | AUXB
    assert c.aux.level and not c.kbd.level
    assert c.inb(0x60) == 0xA5
    assert not c.aux.level
    # psmouse: reset and get ID through 0xD4
    c.command(0xD4, b"\xff")
    assert c.flush() == [0xFA, 0xAA, 0x00]
    c.command(0xD4, b"\xf2")
    assert c.flush() == [0xFA, 0x00]
    c.command(0xD4, b"\xf3")
    c.command(0xD4, b"\x28")
    c.command(0xD4, b"\xe9")
    assert c.flush() == [0xFA, 0xFA, 0xFA, 0x00, 0x02, 0x28]


def test_keyboard_commands_and_irq_edges() -> None:
    c = Ctl()
    c.command(0x60, bytes([0x45]))  # KBDINT, SYS, XLATE
    c.outb(0x60, 0xFF)  # keyboard reset
    assert c.kbd.level and c.kbd.raised == 1
    assert c.inb(0x60) == 0xFA
    # next byte queued: the line dropped and rose again (one edge per byte)
    assert c.kbd.level and c.kbd.raised == 2
    assert c.inb(0x60) == 0xAA
    assert not c.kbd.level
    c.outb(0x60, 0xF2)
    assert c.flush() == [0xFA, 0xAB, 0x41]  # translated MF2 id
    c.outb(0x60, 0xED)
    c.outb(0x60, 0x07)
    assert c.flush() == [0xFA, 0xFA]
    c.outb(0x60, 0xF4)
    assert c.flush() == [0xFA]
    c.outb(0x60, 0xEE)
    assert c.flush() == [0xEE]


def test_no_irq_when_kbd_int_disabled() -> None:
    c = Ctl()
    c.command(0x60, bytes([0x44]))
    c.outb(0x60, 0xF4)
    assert c.inb(0x64) & OBF
    assert not c.kbd.level
    assert c.flush() == [0xFA]


def test_reset_via_pulse_and_output_port() -> None:
    c = Ctl()
    c.outb(0x64, 0xFE)
    assert c.resets == 1
    c.outb(0x64, 0xFF)  # pulse nothing
    assert c.resets == 1
    out = c.command(0xD0, nres=1)
    assert out is not None and out[0] & 0x03 == 0x03
    c.command(0xD1, b"\x03")
    assert c.resets == 1
    c.command(0xD1, b"\x02")
    assert c.resets == 2


def test_write_kbd_output_buffer_and_enqueue() -> None:
    c = Ctl()
    c.command(0xD2, b"\x1c")
    assert c.inb(0x64) & (OBF | AUXB) == OBF
    assert c.inb(0x60) == 0x1C
    assert c.dev.enqueue_keyboard(b"\x1e\x9e") == 2
    assert c.flush() == [0x1E, 0x9E]


def test_command_port_adapter_and_unused_offsets() -> None:
    c = Ctl()
    port64 = c.dev.command_port()
    port64.write(0, memoryview(bytearray([0xAA])))
    buf = bytearray(1)
    port64.read(0, memoryview(buf))
    assert buf[0] & OBF
    assert c.inb(0x60) == 0x55
    assert c.inb(0x61) == 0xFF
