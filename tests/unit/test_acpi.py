"""ACPI tables: structure, checksums, AML encoding, and iasl disassembly."""

from __future__ import annotations

import itertools
import re
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirt.arch.x86_64 import aml
from pyvirt.arch.x86_64.acpi import (
    MAX_CPUS,
    Sdt,
    build_acpi_tables,
    plan_acpi_tables,
)
from pyvirt.arch.x86_64.layout import (
    ACPI_PM_BASE,
    ACPI_S5_SLP_TYP,
    ACPI_TABLES_ADDR,
    ACPI_TABLES_END,
    IOAPIC_ADDR,
    LAPIC_ADDR,
)
from pyvirt.memory import GuestMemory

IASL = shutil.which("iasl")
needs_iasl = pytest.mark.skipif(IASL is None, reason="iasl (Debian acpica-tools) not installed")


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.create(2 << 20)
    yield m
    m.close()


def _read_table(mem: GuestMemory, addr: int) -> bytes:
    length = mem.read_u32(addr + 4)
    return mem.read(addr, length)


def _walk(mem: GuestMemory, rsdp: int) -> dict[str, bytes]:
    """Find every table the way an OS does: RSDP -> XSDT -> FADT -> DSDT/FACS."""
    raw = mem.read(rsdp, 36)
    assert raw[:8] == b"RSD PTR "
    xsdt_addr = struct.unpack_from("<Q", raw, 24)[0]
    xsdt = _read_table(mem, xsdt_addr)
    tables = {"RSDP": raw, "XSDT": xsdt}
    count = (len(xsdt) - 36) // 8
    for (addr,) in struct.iter_unpack("<Q", xsdt[36:36 + 8 * count]):
        t = _read_table(mem, addr)
        tables[t[:4].decode()] = t
    fadt = tables["FACP"]
    dsdt_addr = struct.unpack_from("<Q", fadt, 140)[0]
    facs_addr = struct.unpack_from("<Q", fadt, 132)[0]
    tables["DSDT"] = _read_table(mem, dsdt_addr)
    tables["FACS"] = mem.read(facs_addr, 64)
    return tables


# --- structure --------------------------------------------------------------------


@pytest.mark.parametrize("num_cpus", [1, 2, 64, MAX_CPUS])
def test_checksums_and_pointers(mem: GuestMemory, num_cpus: int) -> None:
    rsdp = build_acpi_tables(mem, num_cpus=num_cpus)
    assert rsdp % 16 == 0 and 0xE0000 <= rsdp < 0x100000
    tables = _walk(mem, rsdp)
    assert set(tables) == {"RSDP", "XSDT", "FACP", "APIC", "DSDT", "FACS"}
    raw = tables.pop("RSDP")
    assert sum(raw[:20]) % 256 == 0
    assert sum(raw) % 256 == 0
    assert raw[15] == 2  # revision
    assert struct.unpack_from("<I", raw, 20)[0] == 36
    facs = tables.pop("FACS")
    assert facs[:4] == b"FACS" and struct.unpack_from("<I", facs, 4)[0] == 64
    for sig, t in tables.items():
        assert sum(t) % 256 == 0, sig
        assert struct.unpack_from("<I", t, 4)[0] == len(t)
    assert tables["FACP"][8] == 6 and len(tables["FACP"]) == 276
    assert tables["DSDT"][8] == 2


def test_layout_within_region() -> None:
    img = plan_acpi_tables(num_cpus=MAX_CPUS)
    assert img.rsdp_addr == ACPI_TABLES_ADDR
    assert img.end <= ACPI_TABLES_END
    spans = sorted((a, a + len(d)) for a, d in img.tables.values())
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start  # no overlap
    facs_addr, _ = img.tables["FACS"]
    assert facs_addr % 64 == 0


def test_fadt_fields() -> None:
    img = plan_acpi_tables(num_cpus=1)
    fadt = img.tables["FACP"][1]
    facs_addr = img.tables["FACS"][0]
    dsdt_addr = img.tables["DSDT"][0]
    firmware_ctrl, dsdt32 = struct.unpack_from("<II", fadt, 36)
    assert firmware_ctrl == 0 and dsdt32 == dsdt_addr
    assert struct.unpack_from("<QQ", fadt, 132) == (facs_addr, dsdt_addr)
    assert struct.unpack_from("<H", fadt, 46)[0] == 9  # SCI_INT
    assert struct.unpack_from("<I", fadt, 48)[0] == 0  # SMI_CMD
    pm1a_evt, _, pm1a_cnt, _, _, pm_tmr = struct.unpack_from("<6I", fadt, 56)
    assert (pm1a_evt, pm1a_cnt, pm_tmr) == (ACPI_PM_BASE, ACPI_PM_BASE + 4, ACPI_PM_BASE + 8)
    assert tuple(fadt[88:92]) == (4, 2, 0, 4)
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & (1 << 4) == 0  # fixed power button present
    assert flags == 0x525
    assert struct.unpack_from("<H", fadt, 109)[0] == 0b111  # legacy, 8042, no VGA
    # RESET_REG: SystemIO, 8 bits at 0xCF9, value 6
    assert struct.unpack_from("<BBBBQ", fadt, 116) == (1, 8, 0, 1, 0xCF9)
    assert fadt[128] == 6
    # X_ blocks: (space, bit width, address)
    for off, addr, bits in ((148, ACPI_PM_BASE, 32), (172, ACPI_PM_BASE + 4, 16),
                            (208, ACPI_PM_BASE + 8, 32)):
        space, width, _, _, a = struct.unpack_from("<BBBBQ", fadt, off)
        assert (space, width, a) == (1, bits, addr)


def test_madt_entries() -> None:
    madt = plan_acpi_tables(num_cpus=3).tables["APIC"][1]
    lapic_addr, flags = struct.unpack_from("<II", madt, 36)
    assert lapic_addr == LAPIC_ADDR and flags == 1
    off = 44
    entries: list[tuple[int, bytes]] = []
    while off < len(madt):
        typ, length = madt[off], madt[off + 1]
        entries.append((typ, madt[off:off + length]))
        off += length
    assert off == len(madt)
    lapics = [e for t, e in entries if t == 0]
    assert [struct.unpack_from("<BBI", e, 2) for e in lapics] == [(i, i, 1) for i in range(3)]
    (ioapic,) = [e for t, e in entries if t == 1]
    assert struct.unpack_from("<BxII", ioapic, 2) == (3, IOAPIC_ADDR, 0)
    isos = [struct.unpack_from("<BBIH", e, 2) for t, e in entries if t == 2]
    assert isos == [(0, 0, 2, 0x5), (0, 9, 9, 0xD)]


def test_bad_arguments(mem: GuestMemory) -> None:
    with pytest.raises(ValueError):
        build_acpi_tables(mem, num_cpus=0)
    with pytest.raises(ValueError):
        build_acpi_tables(mem, num_cpus=256)
    with pytest.raises(ValueError):
        build_acpi_tables(mem, num_cpus=1, base=0x1000)  # RSDP not findable there


def test_extra_table_hook(mem: GuestMemory) -> None:
    mcfg = Sdt(b"MCFG", 1, bytes(8) + struct.pack("<QHBBI", 0xB000_0000, 0, 0, 0, 0))
    extra_dev = aml.Scope("\\_SB_", [aml.Device("PCI0", [aml.Name("_HID", aml.EisaId("PNP0A08"))])])
    rsdp = build_acpi_tables(mem, num_cpus=1, extra_tables=[mcfg], dsdt_extra=[extra_dev])
    tables = _walk(mem, rsdp)
    assert "MCFG" in tables and sum(tables["MCFG"]) % 256 == 0
    assert b"PCI0" in tables["DSDT"]


# --- AML encoder ------------------------------------------------------------------


@pytest.mark.parametrize(("n", "expected"), [
    (0, b"\x01"), (62, b"\x3f"), (63, b"\x41\x04"), (0xFFD, b"\x4f\xff"),
    (0xFFE, b"\x81\x00\x01"), (0x10000, b"\x83\x00\x10"),
])
def test_pkg_length(n: int, expected: bytes) -> None:
    enc = aml.encode_pkg_length(n)
    assert enc == expected
    # the encoded value counts its own bytes
    lead = enc[0]
    total = lead & 0x3F if len(enc) == 1 else (lead & 0xF) | int.from_bytes(enc[1:], "little") << 4
    assert total == n + len(enc)


@pytest.mark.parametrize(("value", "expected"), [
    (0, b"\x00"), (1, b"\x01"), (2, b"\x0a\x02"), (0xFF, b"\x0a\xff"),
    (0x100, b"\x0b\x00\x01"), (0x10000, b"\x0c\x00\x00\x01\x00"),
    (1 << 32, b"\x0e" + (1 << 32).to_bytes(8, "little")), ((1 << 64) - 1, b"\xff"),
])
def test_integer_encoding(value: int, expected: bytes) -> None:
    assert aml.encode_integer(value) == expected


def test_names_and_eisa_id() -> None:
    assert aml.encode_name_string("_SB") == b"_SB_"
    assert aml.encode_name_string("\\_SB.COM1") == b"\\\x2e_SB_COM1"
    assert aml.encode_name_string("^^A.B.C") == b"^^\x2f\x03A___B___C___"
    assert aml.eisa_id("PNP0501") == 0x0105D041
    assert aml.eisa_id("PNP0C0C") == 0x0C0CD041
    with pytest.raises(ValueError):
        aml.encode_name_string("toolong")


def test_resource_template_bytes() -> None:
    rt = aml.ResourceTemplate([aml.IoPort(0x3F8, alignment=1, length=8), aml.IrqNoFlags([4])])
    assert rt.encode() == bytes([0x11, 0x10, 0x0A, 0x0D,
                                 0x47, 0x01, 0xF8, 0x03, 0xF8, 0x03, 0x01, 0x08,
                                 0x22, 0x10, 0x00, 0x79, 0x00])


# --- iasl -------------------------------------------------------------------------


def _disassemble(tmp_path: Path, num_cpus: int) -> dict[str, str]:
    assert IASL is not None
    img = plan_acpi_tables(num_cpus=num_cpus)
    out: dict[str, str] = {}
    for name, (_, data) in img.tables.items():
        if name == "RSDP":
            continue  # not a table with a standard header; iasl -d rejects the file
        path = tmp_path / f"{name}.dat"
        path.write_bytes(data)
        proc = subprocess.run([IASL, "-d", path.name], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60, check=False)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log
        assert not re.search(r"\b(error|warning)\b", log, re.IGNORECASE), log
        out[name] = (tmp_path / f"{name}.dsl").read_text()
    return out


@needs_iasl
@pytest.mark.parametrize("num_cpus", [1, 2, 64])
def test_iasl_disassembly(tmp_path: Path, num_cpus: int) -> None:
    dsl = _disassemble(tmp_path, num_cpus)
    assert set(dsl) == {"FACS", "DSDT", "FACP", "APIC", "XSDT"}
    dsdt = dsl["DSDT"]
    assert "Name (\\_S5, Package (0x04)" in dsdt
    assert re.search(rf"_S5_: S5 System State\s*\{{\s*0x{ACPI_S5_SLP_TYP:02X},", dsdt)
    for pnp in ("PNP0501", "PNP0C0C", "PNP0B00", "PNP0303"):
        assert f'EisaId ("{pnp}")' in dsdt
    assert "IO (Decode16,\n                    0x03F8," in dsdt
    assert "IO (Decode16,\n                    0x0070," in dsdt
    assert "0x0060," in dsdt and "0x0064," in dsdt
    for irq in ("{4}", "{8}", "{1}"):
        assert irq in dsdt
    assert "Return (0x0F)" in dsdt

    madt = dsl["APIC"]
    assert madt.count("[Processor Local APIC]") == num_cpus
    assert re.search(r"Local Apic Address : FEE00000", madt)
    assert f"I/O Apic ID : {num_cpus:02X}" in madt
    assert madt.count("[Interrupt Source Override]") == 2

    fadt = dsl["FACP"]
    assert re.search(r"PM1A Event Block Address : 00000600", fadt)
    assert re.search(r"PM1A Control Block Address : 00000604", fadt)
    assert re.search(r"PM Timer Block Address : 00000608", fadt)
    assert re.search(r"SCI Interrupt : 0009", fadt)
    assert re.search(r"Control Method Power Button \(V1\) : 0", fadt)
    assert re.search(r"Reset Register Supported \(V2\) : 1", fadt)
    assert re.search(r"Address : 0000000000000CF9", fadt)
    assert re.search(r"Hardware Reduced \(V5\) : 0", fadt)
    assert "XSDT" in dsl["XSDT"] and dsl["XSDT"].count("ACPI Table Address") == 2


@needs_iasl
def test_iasl_recompiles_dsdt(tmp_path: Path) -> None:
    """The disassembled DSDT compiles back without errors or warnings."""
    dsl = _disassemble(tmp_path, 1)["DSDT"]
    src = tmp_path / "re.dsl"
    src.write_text(dsl)
    assert IASL is not None
    proc = subprocess.run([IASL, src.name], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "0 Errors, 0 Warnings" in log, log
