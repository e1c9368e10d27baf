"""The i8042 keyboard controller (``I8042``) at 0x60/0x64: fuzzer-chosen command and
data port sequences (controller commands with their data bytes, keyboard and
mouse commands, output port pulses), interleaved with injected scancodes.

Invariants: the output queue stays bounded (the guest can make the controller
answer without ever reading the answers); a CPU reset is requested only by the
commands that pulse the reset line; the IRQ lines follow the output buffer."""

from __future__ import annotations

from fuzz.common import Provider, check, register_ops
from pyvirt.devices.irq import NullIrq
from pyvirt.devices.legacy.i8042 import _OUTPUT_QUEUE_MAX, I8042

MAX_LEN = 2048


def one_input(data: bytes) -> None:
    fdp = Provider(data)
    resets = [0]

    def reset() -> None:
        resets[0] += 1

    kbd, aux = NullIrq(), NullIrq()
    dev = I8042(reset, kbd, aux if fdp.ConsumeBool() else None)
    buf = bytearray(4)
    while fdp.remaining_bytes():
        if fdp.ConsumeIntInRange(0, 15) == 0:
            dev.enqueue_keyboard(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 80)))
        for write, off, width, value in register_ops(fdp, 1, 5):
            if fdp.ConsumeBool():
                off = (0, 4)[off & 1]  # mostly the two real ports
            view = memoryview(buf)[:width]
            before = resets[0]
            if write:
                view[:] = value.to_bytes(width, "little")
                dev.write(off, view)
                if resets[0] != before:
                    check((off == 4 and (value & 0xF1) == 0xF0) or off == 0,
                          "CPU reset from a write that does not pulse the reset line")
            else:
                dev.read(off, view)
        check(len(dev._out) <= _OUTPUT_QUEUE_MAX,
              f"i8042 output queue grew to {len(dev._out)} bytes")
        if not dev._out:
            check(not kbd.level and not aux.level, "IRQ raised with an empty output buffer")
