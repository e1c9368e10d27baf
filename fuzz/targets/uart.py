"""The 16550A UART (``Serial16550``) at COM1: fuzzer-chosen register reads and writes of
any width at any offset of its 8 ports (as the bus hands them over), interleaved
with console input.

Invariants: the receive FIFO and the host-side buffer stay within their
capacities; ``enqueue_input`` takes no more than it reports; every THR write
outside loopback and DLAB reaches the output; the interrupt line is high only
with OUT2 set and loopback off."""

from __future__ import annotations

from fuzz.common import Provider, check, register_ops
from pyvirt.devices.irq import NullIrq
from pyvirt.devices.legacy.serial import HOST_RX_CAPACITY, Serial16550

MAX_LEN = 2048


def one_input(data: bytes) -> None:
    fdp = Provider(data)
    out = [0]

    def sink(b: bytes) -> None:
        check(len(b) == 1, "UART output is not byte by byte")
        out[0] += 1

    irq = NullIrq()
    uart = Serial16550(irq, sink)
    buf = bytearray(4)
    while fdp.remaining_bytes():
        if fdp.ConsumeIntInRange(0, 7) == 0:
            chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
            room = uart.rx_free()
            took = uart.enqueue_input(chunk)
            check(took == min(len(chunk), room), "enqueue_input took more than its room")
        for write, off, width, value in register_ops(fdp, 1, 8):
            view = memoryview(buf)[:width]
            if write:
                view[:] = value.to_bytes(width, "little")
                uart.write(off, view)
            else:
                uart.read(off, view)
        check(len(uart._fifo) <= 16, f"receive FIFO holds {len(uart._fifo)} bytes")
        check(len(uart._host) <= HOST_RX_CAPACITY, "host-side receive buffer over capacity")
        if irq.level:
            check(uart._mcr & 0x18 == 0x08, "IRQ asserted without OUT2 or in loopback")
