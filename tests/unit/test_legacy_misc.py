"""PortSink and legacy_ignore_ranges."""

from __future__ import annotations

from pyvirt.arch.x86_64.layout import ACPI_PM_BASE, ACPI_PM_LEN, COM1_PORT, RESET_PORT
from pyvirt.devices.bus import Bus
from pyvirt.devices.irq import NullIrq
from pyvirt.devices.legacy import (
    I8042,
    AcpiPm,
    CmosRtc,
    PortSink,
    ResetControl,
    Serial16550,
    legacy_ignore_ranges,
)


def test_sink_reads_value_and_ignores_writes() -> None:
    s = PortSink()
    for width in (1, 2, 4, 8):
        buf = bytearray(width)
        s.read(0, memoryview(buf))
        assert buf == b"\xff" * width
    s.write(0, memoryview(bytearray(b"\x12")))
    z = PortSink(0x00)
    buf = bytearray(b"\xaa\xaa")
    z.read(0, memoryview(buf))
    assert buf == b"\x00\x00"


def test_ranges_sorted_disjoint_and_exclusions() -> None:
    ranges = legacy_ignore_ranges()
    covered: set[int] = set()
    prev_end = -1
    for base, length, name in ranges:
        assert name and length > 0
        assert base >= prev_end
        prev_end = base + length
        covered.update(range(base, base + length))
    for port in (0x80, 0xED, 0x2F8, 0x3E8, 0x2E8, 0x3C0, 0x3DF, 0x00, 0x1F, 0x81, 0x9F,
                 0xC0, 0xDF, 0x201):
        assert port in covered, hex(port)
    kvm_owned = [0x20, 0x21, 0xA0, 0xA1, 0x40, 0x41, 0x42, 0x43, 0x61, 0x4D0, 0x4D1]
    ours = [0x60, 0x64, 0x70, 0x71, *range(COM1_PORT, COM1_PORT + 8),
            *range(ACPI_PM_BASE, ACPI_PM_BASE + ACPI_PM_LEN), *range(0xCF8, 0xD00)]
    for port in kvm_owned + ours:
        assert port not in covered, hex(port)


def test_whole_legacy_map_fits_one_bus() -> None:
    bus = Bus("pio")
    for base, length, name in legacy_ignore_ranges():
        bus.insert(PortSink(), base, length, name)
    bus.insert(Serial16550(NullIrq(), lambda b: None), COM1_PORT, 8, "com1")
    bus.insert(I8042(lambda: None, NullIrq()), 0x60, 5, "i8042")
    bus.insert(CmosRtc(), 0x70, 2, "rtc")
    bus.insert(AcpiPm(NullIrq(), lambda t: None), ACPI_PM_BASE, ACPI_PM_LEN, "acpi-pm")
    bus.insert(ResetControl(lambda: None), RESET_PORT, 1, "reset")
    buf = bytearray(1)
    bus.read(0x80, memoryview(buf))
    assert buf[0] == 0xFF
    bus.read(COM1_PORT + 5, memoryview(buf))
    assert buf[0] == 0x60
    assert not bus.unclaimed
