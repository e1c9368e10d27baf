"""Legacy PC devices: 16550A UART, i8042, CMOS RTC, ACPI PM registers, port sinks."""

from pyvirt.devices.legacy.acpi_pm import AcpiPm, ResetControl
from pyvirt.devices.legacy.i8042 import I8042
from pyvirt.devices.legacy.misc import PortSink, legacy_ignore_ranges
from pyvirt.devices.legacy.rtc import CmosRtc
from pyvirt.devices.legacy.serial import Serial16550

__all__ = [
    "I8042",
    "AcpiPm",
    "CmosRtc",
    "PortSink",
    "ResetControl",
    "Serial16550",
    "legacy_ignore_ranges",
]
