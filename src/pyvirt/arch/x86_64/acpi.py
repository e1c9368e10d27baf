"""ACPI tables for the x86-64 virtual platform (ACPI 6.3).

``build_acpi_tables`` writes, from ``base`` (0xE0000) up::

    RSDP  (rev 2, 36 bytes; 16-byte aligned in 0xE0000-0xFFFFF so Linux also
           finds it by scanning the BIOS area, ACPI 6.3 section 5.2.5.1)
    FACS  (64 bytes, 64-byte aligned, section 5.2.10)
    DSDT  (AML: \\_S5_, \\_SB.COM1, \\_SB.PWRB, \\_SB.RTC_, \\_SB.KBD_ + extras)
    FADT  (rev 6, 276 bytes, section 5.2.9)
    APIC  (MADT, section 5.2.12)
    ...   (extra tables: MCFG, SSDT, ... handed in by the caller)
    XSDT  (section 5.2.8) -> FADT, MADT, extras

and returns the RSDP address. There is no RSDT: an ACPI 2.0+ OS uses the XSDT.

Extending: pass ``extra_tables=[Sdt(b"MCFG", 1, body)]`` to add tables to the
XSDT, and ``dsdt_extra=[Scope("\\\\_SB", [Device("PCI0", [...])])]`` to add AML
(a PCI host bridge with a ``_PRT``) to the DSDT.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from pyvirt.arch.x86_64 import aml
from pyvirt.arch.x86_64.layout import (
    ACPI_PM_BASE,
    ACPI_S5_SLP_TYP,
    ACPI_TABLES_ADDR,
    ACPI_TABLES_END,
    COM1_IRQ,
    COM1_PORT,
    IOAPIC_ADDR,
    LAPIC_ADDR,
    RESET_PORT,
    SCI_IRQ,
)
from pyvirt.memory import GuestMemory

__all__ = [
    "MAX_CPUS",
    "AcpiImage",
    "GenericAddress",
    "Sdt",
    "build_acpi_tables",
    "build_dsdt",
    "build_facs",
    "build_fadt",
    "build_madt",
    "build_rsdp",
    "build_xsdt",
    "checksum",
    "dsdt_objects",
    "plan_acpi_tables",
]

OEM_ID = b"PYVIRT"
OEM_TABLE_ID = b"PYVIRTVM"
CREATOR_ID = b"PYVT"
CREATOR_REVISION = 1

#: xAPIC IDs are 8 bits and 0xFF is the broadcast ID, so at most 255 vCPUs
#: (APIC IDs 0..254) fit the MADT's Processor Local APIC entries.
MAX_CPUS = 255

# BIOS read-only area where the RSDP may live for a scan (section 5.2.5.1).
_RSDP_SCAN_START = 0xE0000
_RSDP_SCAN_END = 0x100000
_RSDP_LEN = 36
_HEADER_LEN = 36

# Register blocks inside the PM I/O range (see layout.ACPI_PM_BASE).
PM1A_EVT_BLK = ACPI_PM_BASE  # PM1a_STS (2 bytes) + PM1a_EN (2 bytes)
PM1A_CNT_BLK = ACPI_PM_BASE + 4
PM_TMR_BLK = ACPI_PM_BASE + 8
PM1_EVT_LEN = 4
PM1_CNT_LEN = 2
PM_TMR_LEN = 4
RESET_VALUE = 0x06  # bits 1 (SYS_RST) and 2 (RST_CPU) of the 0xCF9 reset control

# FADT Fixed Feature Flags, ACPI 6.3 Table 5-35.
FADT_F_WBINVD = 1 << 0
FADT_F_PROC_C1 = 1 << 2
FADT_F_PWR_BUTTON = 1 << 4  # set = NO fixed-feature power button
FADT_F_SLP_BUTTON = 1 << 5  # set = NO fixed-feature sleep button
FADT_F_TMR_VAL_EXT = 1 << 8  # PM timer is 32 bits wide
FADT_F_RESET_REG_SUP = 1 << 10
FADT_FLAGS = (FADT_F_WBINVD | FADT_F_PROC_C1 | FADT_F_SLP_BUTTON
              | FADT_F_TMR_VAL_EXT | FADT_F_RESET_REG_SUP)

# IA-PC Boot Architecture Flags, ACPI 6.3 Table 5-36.
IAPC_LEGACY_DEVICES = 1 << 0
IAPC_8042 = 1 << 1
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_BOOT_ARCH = IAPC_LEGACY_DEVICES | IAPC_8042 | IAPC_VGA_NOT_PRESENT

# MADT, ACPI 6.3 section 5.2.12.
MADT_PCAT_COMPAT = 1
MADT_LAPIC_ENABLED = 1
# MPS INTI flags (Table 5-50): polarity bits 1:0, trigger mode bits 3:2.
MPS_ACTIVE_HIGH = 0b01
MPS_EDGE = 0b01 << 2
MPS_LEVEL = 0b11 << 2

# Generic Address Structure fields (section 5.2.3.2).
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1
GAS_ACCESS_WORD = 2
GAS_ACCESS_DWORD = 3


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` (with it in place) sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def _fixed(value: bytes, size: int) -> bytes:
    if len(value) > size:
        raise ValueError(f"{value!r} is longer than {size} bytes")
    return value.ljust(size, b" ")


@dataclass(frozen=True)
class GenericAddress:
    """Generic Address Structure, 12 bytes (ACPI 6.3 section 5.2.3.2)."""

    space_id: int = 0
    bit_width: int = 0
    bit_offset: int = 0
    access_size: int = 0
    address: int = 0

    def pack(self) -> bytes:
        return struct.pack("<BBBBQ", self.space_id, self.bit_width, self.bit_offset,
                           self.access_size, self.address)

    @classmethod
    def io(cls, port: int, length: int, access_size: int) -> GenericAddress:
        return cls(GAS_SYSTEM_IO, length * 8, 0, access_size, port)


@dataclass
class Sdt:
    """A system description table: the 36-byte header (section 5.2.6) + body."""

    signature: bytes
    revision: int
    body: bytes
    oem_table_id: bytes = OEM_TABLE_ID
    oem_revision: int = 1

    def to_bytes(self) -> bytes:
        if len(self.signature) != 4:
            raise ValueError(f"bad table signature {self.signature!r}")
        length = _HEADER_LEN + len(self.body)
        header = bytearray(struct.pack(
            "<4sIBB6s8sI4sI", self.signature, length, self.revision, 0,
            _fixed(OEM_ID, 6), _fixed(self.oem_table_id, 8), self.oem_revision,
            CREATOR_ID, CREATOR_REVISION))
        data = header + self.body
        data[9] = checksum(data)
        return bytes(data)


# --- DSDT -----------------------------------------------------------------------


def dsdt_objects() -> list[aml.AmlNode]:
    """The platform's AML: S5 sleep object and the legacy ISA devices."""
    com1 = aml.Device("COM1", [
        aml.Name("_HID", aml.EisaId("PNP0501")),  # 16550A-compatible UART
        aml.Name("_UID", 1),
        aml.Method("_STA", [aml.Return(0x0F)]),  # present, enabled, shown, working
        aml.Name("_CRS", aml.ResourceTemplate([
            aml.IoPort(COM1_PORT, alignment=1, length=8),
            aml.IrqNoFlags([COM1_IRQ]),
        ])),
    ])
    # Control-method power button device (section 4.8.2.2.1.2); the FADT also
    # declares the fixed-feature button, which is what the VMM signals.
    pwrb = aml.Device("PWRB", [
        aml.Name("_HID", aml.EisaId("PNP0C0C")),
        aml.Name("_UID", 0),
    ])
    rtc = aml.Device("RTC_", [
        aml.Name("_HID", aml.EisaId("PNP0B00")),  # AT real-time clock
        aml.Name("_CRS", aml.ResourceTemplate([
            aml.IoPort(0x70, alignment=1, length=2),
            aml.IrqNoFlags([8]),
        ])),
    ])
    kbd = aml.Device("KBD_", [
        aml.Name("_HID", aml.EisaId("PNP0303")),  # IBM enhanced (101/102) keyboard, 8042
        aml.Name("_CRS", aml.ResourceTemplate([
            aml.IoPort(0x60, alignment=1, length=1),
            aml.IoPort(0x64, alignment=1, length=1),
            aml.IrqNoFlags([1]),
        ])),
    ])
    return [
        # \_S5 (section 7.4.2.6): SLP_TYPa, SLP_TYPb, two reserved. There is no
        # PM1b, so SLP_TYPb is unused; it carries the same value.
        aml.Name("\\_S5_", aml.Package([ACPI_S5_SLP_TYP, ACPI_S5_SLP_TYP, 0, 0])),
        aml.Scope("\\_SB_", [com1, pwrb, rtc, kbd]),
    ]


def build_dsdt(extra: Sequence[aml.AmlNode] = ()) -> Sdt:
    """DSDT revision 2: AML integers are 64 bits (section 5.2.11.1)."""
    body = b"".join(node.encode() for node in [*dsdt_objects(), *extra])
    return Sdt(b"DSDT", 2, body)


# --- FACS / FADT ----------------------------------------------------------------


def build_facs() -> bytes:
    """FACS version 2, 64 bytes, no checksum (section 5.2.10).

    Waking vectors are 0: the platform advertises no sleep state but S5.
    """
    return struct.pack("<4sIIIII Q B3xI 24x", b"FACS", 64, 0, 0, 0, 0, 0, 2, 0)


def build_fadt(*, dsdt_addr: int, facs_addr: int) -> Sdt:
    """FADT revision 6 (ACPI 6.3 Table 5-33), 276 bytes, not hardware-reduced.

    SMI_CMD = 0 means the platform is always in ACPI mode: the OS never tries an
    ACPI enable handshake (section 5.2.9, SMI_CMD). The VMM's PM1a_CNT must
    report SCI_EN set for the same reason (section 4.8.3.2.1).
    """
    pm1a_evt = GenericAddress.io(PM1A_EVT_BLK, PM1_EVT_LEN, GAS_ACCESS_WORD)
    pm1a_cnt = GenericAddress.io(PM1A_CNT_BLK, PM1_CNT_LEN, GAS_ACCESS_WORD)
    pm_tmr = GenericAddress.io(PM_TMR_BLK, PM_TMR_LEN, GAS_ACCESS_DWORD)
    reset_reg = GenericAddress.io(RESET_PORT, 1, GAS_ACCESS_BYTE)
    none = GenericAddress()
    body = b"".join([
        # FIRMWARE_CTRL must be 0 when X_FIRMWARE_CTRL is set (section 5.2.9).
        struct.pack("<II", 0, dsdt_addr),
        struct.pack("<BBH", 0, 0, SCI_IRQ),  # reserved, PM profile Unspecified, SCI_INT
        struct.pack("<IBBBB", 0, 0, 0, 0, 0),  # SMI_CMD, ACPI_EN/DIS, S4BIOS_REQ, PSTATE_CNT
        struct.pack("<8I", PM1A_EVT_BLK, 0, PM1A_CNT_BLK, 0, 0, PM_TMR_BLK, 0, 0),
        struct.pack("<8B", PM1_EVT_LEN, PM1_CNT_LEN, 0, PM_TMR_LEN, 0, 0, 0, 0),
        # P_LVL2_LAT > 100 and P_LVL3_LAT > 1000: C2/C3 not supported.
        struct.pack("<HHHH", 0x0FFF, 0x0FFF, 0, 0),
        struct.pack("<BBBBB", 0, 0, 0, 0, 0),  # DUTY_OFFSET/WIDTH, DAY/MON_ALRM, CENTURY
        struct.pack("<HBI", IAPC_BOOT_ARCH, 0, FADT_FLAGS),
        reset_reg.pack(),
        struct.pack("<BHB", RESET_VALUE, 0, 3),  # RESET_VALUE, ARM_BOOT_ARCH, minor rev 3
        struct.pack("<QQ", facs_addr, dsdt_addr),  # X_FIRMWARE_CTRL, X_DSDT
        pm1a_evt.pack(), none.pack(),  # X_PM1a_EVT_BLK, X_PM1b_EVT_BLK
        pm1a_cnt.pack(), none.pack(),  # X_PM1a_CNT_BLK, X_PM1b_CNT_BLK
        none.pack(),  # X_PM2_CNT_BLK
        pm_tmr.pack(),  # X_PM_TMR_BLK
        none.pack(), none.pack(),  # X_GPE0_BLK, X_GPE1_BLK
        none.pack(), none.pack(),  # SLEEP_CONTROL_REG, SLEEP_STATUS_REG (HW-reduced only)
        _fixed(b"PYVIRT", 8),  # Hypervisor Vendor Identity
    ])
    assert _HEADER_LEN + len(body) == 276
    return Sdt(b"FACP", 6, body)


# --- MADT -----------------------------------------------------------------------


def build_madt(num_cpus: int) -> Sdt:
    """MADT revision 5 (ACPI 6.3 section 5.2.12).

    One enabled Processor Local APIC per vCPU (ACPI processor UID = APIC ID =
    vCPU index), the IOAPIC (ID num_cpus, GSIs from 0), ISA overrides for the
    PIT (IRQ0 -> GSI2, as on every PC) and the SCI (level, active high), and
    LINT1 = NMI on all processors.
    """
    _check_cpus(num_cpus)
    parts = [struct.pack("<II", LAPIC_ADDR, MADT_PCAT_COMPAT)]
    for i in range(num_cpus):
        parts.append(struct.pack("<BBBBI", 0, 8, i, i, MADT_LAPIC_ENABLED))  # 5.2.12.2
    parts.append(struct.pack("<BBBBII", 1, 12, num_cpus, 0, IOAPIC_ADDR, 0))  # 5.2.12.3
    parts.append(struct.pack("<BBBBIH", 2, 10, 0, 0, 2, MPS_EDGE | MPS_ACTIVE_HIGH))  # 5.2.12.5
    parts.append(struct.pack("<BBBBIH", 2, 10, 0, SCI_IRQ, SCI_IRQ,
                             MPS_LEVEL | MPS_ACTIVE_HIGH))
    parts.append(struct.pack("<BBBHB", 4, 6, 0xFF, 0, 1))  # 5.2.12.7 Local APIC NMI
    return Sdt(b"APIC", 5, b"".join(parts))


# --- XSDT / RSDP ----------------------------------------------------------------


def build_xsdt(addresses: Sequence[int]) -> Sdt:
    return Sdt(b"XSDT", 1, b"".join(struct.pack("<Q", a) for a in addresses))


def build_rsdp(xsdt_addr: int) -> bytes:
    """RSDP revision 2 (section 5.2.5.3): checksum over the first 20 bytes,
    extended checksum over all 36. RsdtAddress is 0 (no RSDT)."""
    data = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, _fixed(OEM_ID, 6), 2,
                                 0, _RSDP_LEN, xsdt_addr, 0))
    data[8] = checksum(data[:20])
    data[32] = checksum(data)
    return bytes(data)


# --- placement ------------------------------------------------------------------


def _check_cpus(num_cpus: int) -> None:
    if not 1 <= num_cpus <= MAX_CPUS:
        raise ValueError(f"num_cpus must be 1..{MAX_CPUS}, got {num_cpus}")


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


@dataclass
class AcpiImage:
    """Where each table goes: ``tables`` maps a name (signature, or RSDP) to
    (guest address, bytes), in placement order."""

    rsdp_addr: int
    tables: dict[str, tuple[int, bytes]] = field(default_factory=dict)

    @property
    def end(self) -> int:
        return max(addr + len(data) for addr, data in self.tables.values())


def plan_acpi_tables(*, num_cpus: int, base: int = ACPI_TABLES_ADDR,
                     extra_tables: Sequence[Sdt] = (),
                     dsdt_extra: Sequence[aml.AmlNode] = ()) -> AcpiImage:
    """Build every table and choose its address (pure; nothing is written)."""
    _check_cpus(num_cpus)
    rsdp_addr = _align(base, 16)
    if not _RSDP_SCAN_START <= rsdp_addr <= _RSDP_SCAN_END - _RSDP_LEN:
        raise ValueError(f"ACPI base {base:#x}: the RSDP must lie in 0xE0000-0xFFFFF")
    image = AcpiImage(rsdp_addr)
    cursor = rsdp_addr + _RSDP_LEN

    def place(name: str, data: bytes, alignment: int = 16) -> int:
        nonlocal cursor
        addr = _align(cursor, alignment)
        if name in image.tables:
            raise ValueError(f"duplicate ACPI table {name}")
        image.tables[name] = (addr, data)
        cursor = addr + len(data)
        return addr

    facs_addr = place("FACS", build_facs(), 64)  # 64-byte alignment: section 5.2.10
    dsdt_addr = place("DSDT", build_dsdt(dsdt_extra).to_bytes())
    xsdt_entries = [place("FACP", build_fadt(dsdt_addr=dsdt_addr, facs_addr=facs_addr)
                          .to_bytes())]
    xsdt_entries.append(place("APIC", build_madt(num_cpus).to_bytes()))
    for table in extra_tables:
        xsdt_entries.append(place(table.signature.decode("ascii"), table.to_bytes()))
    xsdt_addr = place("XSDT", build_xsdt(xsdt_entries).to_bytes())
    image.tables = {"RSDP": (rsdp_addr, build_rsdp(xsdt_addr)), **image.tables}
    if image.end > ACPI_TABLES_END:
        raise ValueError(f"ACPI tables end at {image.end:#x}, past {ACPI_TABLES_END:#x}")
    return image


def build_acpi_tables(mem: GuestMemory, *, num_cpus: int, base: int = ACPI_TABLES_ADDR,
                      extra_tables: Sequence[Sdt] = (),
                      dsdt_extra: Sequence[aml.AmlNode] = ()) -> int:
    """Write the ACPI tables into guest RAM and return the RSDP's address."""
    image = plan_acpi_tables(num_cpus=num_cpus, base=base, extra_tables=extra_tables,
                             dsdt_extra=dsdt_extra)
    for addr, data in image.tables.values():
        mem.write(addr, data)
    return image.rsdp_addr
