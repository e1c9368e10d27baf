"""The ACPI PM registers (``AcpiPm``: PM1a status/enable/control, PM timer) and the
0xCF9 reset register (``ResetControl``): fuzzer-chosen accesses of any width at
any offset, power-button presses and a clock that moves by fuzzer-chosen steps.

Invariants: SCI is asserted exactly while an enabled event's status bit is set;
PM_TMR is a 24/32-bit counter that never runs backwards between reads (within
one wrap); sleep is requested only by a write with SLP_EN; reset only by a
0xCF9 write with RST_CPU."""

from __future__ import annotations

from fuzz.common import Provider, check, register_ops
from pyvirt.devices.irq import NullIrq
from pyvirt.devices.legacy.acpi_pm import _EVENTS, SLP_EN, AcpiPm, ResetControl

MAX_LEN = 2048


def one_input(data: bytes) -> None:
    fdp = Provider(data)
    clock = [fdp.ConsumeUInt(8) >> 1]
    sleeps: list[int] = []
    resets = [0]
    sci = NullIrq()
    pm = AcpiPm(sci, sleeps.append, clock_ns=lambda: clock[0])
    rc = ResetControl(lambda: resets.__setitem__(0, resets[0] + 1))
    buf = bytearray(4)
    while fdp.remaining_bytes():
        k = fdp.ConsumeIntInRange(0, 15)
        if k == 0:
            pm.press_power_button()
        elif k == 1:
            clock[0] += fdp.ConsumeUInt(5)
        elif k == 2:
            for write, _, width, value in register_ops(fdp, 1, 1):
                view = memoryview(buf)[:width]
                before = resets[0]
                if write:
                    view[:] = value.to_bytes(width, "little")
                    rc.write(0, view)
                    check((resets[0] > before) == bool(value & 0x04), "reset without RST_CPU")
                else:
                    rc.read(0, view)
        else:
            for write, off, width, value in register_ops(fdp, 1, 16):
                view = memoryview(buf)[:width]
                n = len(sleeps)
                if write:
                    view[:] = value.to_bytes(width, "little")
                    pm.write(off, view)
                    slp = any(4 <= off + i < 6 and (value >> (8 * i) << (8 * (off + i - 4)))
                              & SLP_EN for i in range(width))
                    check(len(sleeps) == n + int(slp), "sleep request does not match SLP_EN")
                else:
                    pm.read(off, view)
        check(sci.level == bool(pm._sts & pm._en & _EVENTS), "SCI level disagrees with STS & EN")
