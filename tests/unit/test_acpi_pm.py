"""AcpiPm (PM1a event/control, PM timer) and ResetControl."""

from __future__ import annotations

from pyvirt.arch.x86_64.layout import ACPI_PM_TMR_HZ, ACPI_S5_SLP_TYP
from pyvirt.devices.irq import NullIrq
from pyvirt.devices.legacy.acpi_pm import AcpiPm, ResetControl


class Pm:
    def __init__(self) -> None:
        self.ns = 0
        self.sci = NullIrq()
        self.sleeps: list[int] = []
        self.dev = AcpiPm(self.sci, self.sleeps.append, lambda: self.ns)

    def rd(self, off: int, width: int) -> int:
        buf = bytearray(width)
        self.dev.read(off, memoryview(buf))
        return int.from_bytes(buf, "little")

    def wr(self, off: int, width: int, value: int) -> None:
        self.dev.write(off, memoryview(bytearray(value.to_bytes(width, "little"))))


def test_cnt_sci_en_always_set() -> None:
    p = Pm()
    assert p.rd(4, 2) & 1
    p.wr(4, 2, 0)
    assert p.rd(4, 2) == 1
    assert p.rd(4, 1) == 1


def test_power_button_sci_level() -> None:
    p = Pm()
    p.dev.press_power_button()
    assert p.rd(0, 2) & 0x100
    assert not p.sci.level  # not enabled
    p.wr(2, 2, 0x100)
    assert p.sci.level and p.sci.raised == 1
    assert p.rd(2, 2) == 0x100
    p.wr(0, 2, 0x100)  # write 1 to clear
    assert not p.sci.level
    assert not p.rd(0, 2) & 0x100


def test_w1c_byte_access() -> None:
    p = Pm()
    p.wr(2, 1, 0x00)
    p.wr(3, 1, 0x01)  # PWRBTN_EN through the high byte
    p.dev.press_power_button()
    assert p.sci.level
    p.wr(1, 1, 0x00)  # writing 0 clears nothing
    assert p.sci.level
    p.wr(0, 4, 0x0100_0100)  # dword over STS and EN: clears STS bit 8, EN stays
    assert not p.sci.level
    assert p.rd(2, 2) == 0x100


def test_s5_poweroff() -> None:
    p = Pm()
    p.wr(4, 2, (ACPI_S5_SLP_TYP << 10) | (1 << 13))
    assert p.sleeps == [ACPI_S5_SLP_TYP]
    cnt = p.rd(4, 2)
    assert not cnt & (1 << 13)  # SLP_EN reads 0
    assert (cnt >> 10) & 7 == ACPI_S5_SLP_TYP
    assert p.rd(0, 2) & 0x8000  # WAK_STS


def test_sleep_via_byte_write() -> None:
    p = Pm()
    p.wr(4, 2, 0x1 | (1 << 10))
    assert p.sleeps == []
    p.wr(5, 1, (ACPI_S5_SLP_TYP << 2) | 0x20)
    assert p.sleeps == [ACPI_S5_SLP_TYP]


def test_pm_timer() -> None:
    p = Pm()
    assert p.rd(8, 4) == 0
    p.ns = 1_000_000_000
    assert p.rd(8, 4) == ACPI_PM_TMR_HZ
    assert p.rd(9, 1) == (ACPI_PM_TMR_HZ >> 8) & 0xFF
    p.wr(8, 4, 0)  # read-only
    assert p.rd(8, 4) == ACPI_PM_TMR_HZ
    # 32-bit wrap and TMR_STS when bit 31 toggles
    assert not p.rd(0, 2) & 1
    p.ns = (1 << 31) * 1_000_000_000 // ACPI_PM_TMR_HZ + 1000
    assert p.rd(8, 4) >> 31 == 1
    assert p.rd(0, 2) & 1
    p.wr(0, 2, 1)
    assert not p.rd(0, 2) & 1
    p.ns = (1 << 32) * 1_000_000_000 // ACPI_PM_TMR_HZ + 1000
    assert p.rd(8, 4) < 10_000


def test_reserved_bytes() -> None:
    p = Pm()
    assert p.rd(6, 2) == 0
    assert p.rd(12, 4) == 0


def test_reset_control() -> None:
    resets: list[int] = []
    r = ResetControl(lambda: resets.append(1))
    buf = bytearray(1)
    r.write(0, memoryview(bytearray([0x02])))
    assert resets == []
    r.read(0, memoryview(buf))
    assert buf[0] == 0x02
    r.write(0, memoryview(bytearray([0x06])))
    assert resets == [1]
    r.read(0, memoryview(buf))
    assert buf[0] == 0x06
