"""What the guest's ACPI tables say about PCI: the host bridge in the DSDT
(bus range, windows, ``_PRT``), the ECAM reservation, and MCFG.

Linux finds the root bus through ``\\_SB.PCI0`` (PNP0A08, compatible PNP0A03),
takes its windows from ``_CRS``, INTx routing from ``_PRT`` (direct GSIs, no
link devices), and ECAM from MCFG, which it uses only when the area is also
reserved by a motherboard resource (PNP0C02) — hence ``\\_SB.MRES``.
"""

from __future__ import annotations

import struct

from pyvirt.arch.x86_64 import aml, layout
from pyvirt.arch.x86_64.acpi import Sdt
from pyvirt.pci.root import NUM_SLOTS, intx_gsi

__all__ = ["build_mcfg", "pci_dsdt_objects"]


def build_mcfg(*, ecam_base: int = layout.PCI_ECAM_ADDR, segment: int = 0,
               start_bus: int = 0, end_bus: int = 0) -> Sdt:
    """MCFG (PCI Firmware 3.2, 4.1.2): 8 reserved bytes, then one allocation."""
    entry = struct.pack("<QHBBI", ecam_base, segment, start_bus, end_bus, 0)
    return Sdt(b"MCFG", 1, bytes(8) + entry)


def _prt() -> aml.Package:
    entries: list[aml.AmlValue] = []
    for slot in range(1, NUM_SLOTS):
        for pin in range(4):
            # {Address (device << 16 | 0xFFFF: any function), Pin, Source (0: a GSI), GSI}
            entries.append(aml.Package([(slot << 16) | 0xFFFF, pin, 0, intx_gsi(slot, pin)]))
    return aml.Package(entries)


def pci_dsdt_objects(mmio64: tuple[int, int]) -> list[aml.AmlNode]:
    start64, size64 = mmio64
    crs = aml.ResourceTemplate([
        aml.WordBusNumber(0, 1),
        aml.IoPort(0xCF8, alignment=1, length=8),
        aml.WordIo(0x0000, 0x0CF8),
        aml.WordIo(0x0D00, 0x10000 - 0x0D00),
        aml.DWordMemory(layout.PCI_MMIO32_START,
                        layout.PCI_MMIO32_END - layout.PCI_MMIO32_START),
        aml.QWordMemory(start64, size64, prefetchable=True),
    ])
    pci0 = aml.Device("PCI0", [
        aml.Name("_HID", aml.EisaId("PNP0A08")),
        aml.Name("_CID", aml.EisaId("PNP0A03")),
        aml.Name("_SEG", 0),
        aml.Name("_UID", 0),
        aml.Name("_BBN", 0),
        aml.Name("_CRS", crs),
        aml.Name("_PRT", _prt()),
    ])
    mres = aml.Device("MRES", [
        aml.Name("_HID", aml.EisaId("PNP0C02")),
        aml.Name("_UID", 1),
        aml.Name("_CRS", aml.ResourceTemplate([
            aml.Memory32Fixed(layout.PCI_ECAM_ADDR, layout.PCI_ECAM_SIZE)])),
    ])
    return [aml.Scope("\\_SB_", [pci0, mres])]
