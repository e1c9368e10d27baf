"""Saved state read back from a snapshot (``pyvirt.state.decode`` + a device's
``restore_state``): fuzzer bytes, or a real record with fuzzer-made edits,
restored into a fresh UART, i8042, RTC or ACPI PM, which is then read.

Documented outcome: ``StateError`` (one line, naming the part). Invariants:
nothing else is raised, and a device that accepted a record answers reads."""

from __future__ import annotations

from typing import Any

from fuzz.common import Provider, check
from pyvirt.devices.irq import NullIrq
from pyvirt.devices.legacy.acpi_pm import AcpiPm
from pyvirt.devices.legacy.i8042 import I8042
from pyvirt.devices.legacy.rtc import CmosRtc
from pyvirt.devices.legacy.serial import Serial16550
from pyvirt.state import StateError, decode, encode

MAX_LEN = 4096


def _devices() -> list[tuple[str, Any, int]]:
    """(name, a fresh device, its port count)."""
    return [
        ("serial", Serial16550(NullIrq(), lambda b: None), 8),
        ("i8042", I8042(lambda: None, NullIrq()), 1),
        ("rtc", CmosRtc(irq=NullIrq()), 2),
        ("acpi_pm", AcpiPm(NullIrq(), lambda t: None), 8),
    ]


def seeds() -> list[bytes]:
    return [bytes([i]) + encode(dev.save_state()) for i, (_, dev, _) in enumerate(_devices())]


def one_input(data: bytes) -> None:
    fdp = Provider(data)
    devices = _devices()
    try:
        name, dev, ports = devices[fdp.ConsumeIntInRange(0, len(devices) - 1)]
        if fdp.ConsumeBool():
            record = fdp.ConsumeBytes(fdp.remaining_bytes())
        else:  # a real record with edits: decodes often, so restore_state's checks run
            record = bytearray(encode(dev.save_state()))
            for _ in range(fdp.ConsumeIntInRange(0, 8)):
                if not record:
                    break
                record[fdp.ConsumeIntInRange(0, len(record) - 1)] = fdp.ConsumeIntInRange(0, 255)
            record = bytes(record)
        try:
            state = decode(record, dev.state_type, part=name)
            dev.restore_state(state)
        except StateError as exc:
            check("\n" not in str(exc), f"StateError is not one line: {exc!r}")
            check(str(exc).startswith(name) or name in str(exc), f"StateError names no part: {exc}")
            return
        buf = bytearray(1)
        for port in range(ports):
            dev.read(port, memoryview(buf))
    finally:
        for _, d, _ in devices:
            close = getattr(d, "close", None)
            if close is not None:
                close()
