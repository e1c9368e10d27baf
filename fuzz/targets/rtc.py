"""The CMOS RTC (``CmosRtc``) at 0x70/0x71: fuzzer-chosen index/data sequences (time
registers in BCD and binary, 12/24-hour, SET freezes, alarms, NVRAM), update
cycles, and a guest clock anywhere from 1970 to 2106.

Invariants: every read is one byte; the device never raises, whatever time the
guest sets and whatever format it then reads it in."""

from __future__ import annotations

from fuzz.common import Provider, register_ops
from pyvirt.devices.irq import NullIrq
from pyvirt.devices.legacy.rtc import CmosRtc

MAX_LEN = 2048


def one_input(data: bytes) -> None:
    fdp = Provider(data)
    now = [float(fdp.ConsumeUInt(4)) + fdp.ConsumeIntInRange(0, 999) / 1000]
    rtc = CmosRtc(clock=lambda: now[0], irq=NullIrq())
    buf = bytearray(4)
    try:
        while fdp.remaining_bytes():
            k = fdp.ConsumeIntInRange(0, 15)
            if k == 0:
                rtc.update_cycle()
            elif k == 1:
                now[0] += fdp.ConsumeIntInRange(0, 100_000)
            elif k < 8:  # select a register (mostly the clock's), then access it
                idx = fdp.ConsumeIntInRange(0, 0x33) if fdp.ConsumeBool() else fdp.ConsumeUInt(1)
                rtc.write(0, memoryview(bytearray([idx])))
                width = (1, 1, 2, 4)[fdp.ConsumeIntInRange(0, 3)]
                view = memoryview(buf)[:width]
                if fdp.ConsumeBool():
                    view[:] = fdp.ConsumeBytes(width).ljust(width, b"\0")
                    rtc.write(1, view)
                else:
                    rtc.read(1, view)
            else:
                for write, off, width, value in register_ops(fdp, 1, 2):
                    view = memoryview(buf)[:width]
                    if write:
                        view[:] = value.to_bytes(width, "little")
                        rtc.write(off, view)
                    else:
                        rtc.read(off, view)
            rtc.guest_time()
    finally:
        rtc.close()
