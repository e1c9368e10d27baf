"""PCI bus 0: configuration space semantics, BAR sizing/placement/decoding, both
configuration mechanisms (0xCF8/0xCFC and ECAM), INTx routing, and the ACPI
description (DSDT objects, MCFG)."""

from __future__ import annotations

import itertools
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pyvirt.arch.x86_64 import layout
from pyvirt.arch.x86_64.acpi import plan_acpi_tables
from pyvirt.devices.bus import Bus
from pyvirt.devices.irq import NullIrq
from pyvirt.pci.acpi import build_mcfg, pci_dsdt_objects
from pyvirt.pci.device import Bar, BarKind, PciDevice
from pyvirt.pci.root import BarAllocator, PciRoot, attach_pci_root, intx_gsi

IASL = shutil.which("iasl")
needs_iasl = pytest.mark.skipif(IASL is None, reason="iasl (Debian acpica-tools) not installed")

RAM_END = 16 << 20
ECAM = layout.PCI_ECAM_ADDR


class Regs:
    """A BAR's register file: plain memory, with a log of writes."""

    def __init__(self, size: int) -> None:
        self.mem = bytearray(size)
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = self.mem[offset:offset + len(data)]

    def write(self, offset: int, data: memoryview) -> None:
        self.mem[offset:offset + len(data)] = data
        self.writes.append((offset, bytes(data)))


class Dummy(PciDevice):
    """A 32-bit 4 KiB BAR0 and a 64-bit prefetchable 1 MiB BAR2, one capability."""

    def __init__(self, vendor: int = 0x1234) -> None:
        super().__init__(vendor_id=vendor, device_id=0x5678, class_code=0x020000, revision=3,
                         subsystem_vendor_id=0x1AF4, subsystem_id=0x42, interrupt_pin=1,
                         name=f"dummy-{vendor:x}")
        self.r0, self.r2 = Regs(0x1000), Regs(0x10_0000)
        self.bar0 = self.add_bar(0, 0x1000, BarKind.MEM32, self.r0)
        self.bar2 = self.add_bar(2, 0x10_0000, BarKind.MEM64, self.r2, prefetchable=True)
        self.cap = self.add_capability(0x09, b"\x08\xaa\xbb\xcc\xdd\xee",
                                       wmask=b"\0\0\xff\0\0\0")
        self.moves: list[tuple[int, int | None, int | None]] = []

    def bar_moved(self, bar: Bar, old: int | None, new: int | None) -> None:
        self.moves.append((bar.index, old, new))


class Machine:
    def __init__(self) -> None:
        self.pio, self.mmio = Bus("pio"), Bus("mmio")
        self.lines: dict[int, NullIrq] = {}
        self.root: PciRoot = attach_pci_root(self.pio, self.mmio, self.irq_line, RAM_END)

    def irq_line(self, gsi: int) -> NullIrq:
        return self.lines.setdefault(gsi, NullIrq())

    # ---- mechanism #1
    def cf8(self, bus: int, slot: int, fn: int, reg: int, enable: bool = True) -> None:
        value = (1 << 31 if enable else 0) | bus << 16 | slot << 11 | fn << 8 | reg
        self.pio.write(0xCF8, memoryview(value.to_bytes(4, "little")))

    def cfc_read(self, offset: int, size: int) -> int:
        buf = bytearray(size)
        self.pio.read(0xCFC + offset, memoryview(buf))
        return int.from_bytes(buf, "little")

    def cfc_write(self, offset: int, size: int, value: int) -> None:
        self.pio.write(0xCFC + offset, memoryview(value.to_bytes(size, "little")))

    def conf1_read(self, slot: int, reg: int, size: int = 4, *, bus: int = 0,
                   fn: int = 0) -> int:
        self.cf8(bus, slot, fn, reg & ~3)
        return self.cfc_read(reg & 3, size)

    # ---- ECAM
    def ecam_read(self, slot: int, reg: int, size: int = 4, *, bus: int = 0,
                  fn: int = 0) -> int:
        buf = bytearray(size)
        self.mmio.read(ECAM + (bus << 20 | slot << 15 | fn << 12 | reg), memoryview(buf))
        return int.from_bytes(buf, "little")

    def ecam_write(self, slot: int, reg: int, size: int, value: int) -> None:
        self.mmio.write(ECAM + (slot << 15 | reg), memoryview(value.to_bytes(size, "little")))

    # ---- MMIO
    def mmio_read(self, addr: int, size: int = 4) -> int:
        buf = bytearray(size)
        self.mmio.read(addr, memoryview(buf))
        return int.from_bytes(buf, "little")

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        self.mmio.write(addr, memoryview(value.to_bytes(size, "little")))


@pytest.fixture
def m() -> Machine:
    return Machine()


@pytest.fixture
def dev(m: Machine) -> Dummy:
    d = Dummy()
    assert m.root.add(3, d) == 3
    return d


# ---- configuration mechanisms ----------------------------------------------------------


def test_host_bridge(m: Machine) -> None:
    assert m.conf1_read(0, 0) == 0x0008_1B36
    assert m.conf1_read(0, 0x08) >> 8 == 0x060000
    m.cf8(0, 0, 0, 0x04)
    m.cfc_write(0, 2, 0xFFFF)
    assert m.conf1_read(0, 0x04, 2) == 0  # nothing to enable on the bridge


def test_mechanism_1_reaches_the_right_device(m: Machine, dev: Dummy) -> None:
    assert m.conf1_read(3, 0) == 0x5678_1234
    assert m.conf1_read(3, 0x02, 2) == 0x5678  # word at 0xCFE
    assert m.conf1_read(3, 0x03, 1) == 0x56  # byte at 0xCFF
    assert m.conf1_read(3, 0x08) == 0x0200_0003  # class, revision
    assert m.conf1_read(3, 0x2C) == 0x0042_1AF4
    assert m.conf1_read(3, 0x3D, 1) == 1
    m.cf8(0, 3, 0, 0x3C)
    m.cfc_write(0, 1, 0x0B)  # interrupt line
    assert m.ecam_read(3, 0x3C, 1) == 0x0B


@pytest.mark.parametrize(("bus", "slot", "fn"), [(0, 5, 0), (0, 3, 1), (1, 3, 0), (0, 31, 7)])
def test_mechanism_1_absent_functions_read_all_ones(m: Machine, dev: Dummy, bus: int,
                                                    slot: int, fn: int) -> None:
    assert m.conf1_read(slot, 0, bus=bus, fn=fn) == 0xFFFF_FFFF
    assert m.conf1_read(slot, 0, 2, bus=bus, fn=fn) == 0xFFFF
    m.cf8(bus, slot, fn, 0x3C)
    m.cfc_write(0, 1, 0x0B)  # goes nowhere
    assert dev.config_read(0x3C, 1) == 0


def test_mechanism_1_address_register(m: Machine, dev: Dummy) -> None:
    m.cf8(0, 3, 0, 0, enable=False)
    assert m.cfc_read(0, 4) == 0xFFFF_FFFF  # enable bit clear: no cycle
    buf = bytearray(4)
    m.pio.write(0xCF8, memoryview((0xFFFF_FFFF).to_bytes(4, "little")))
    m.pio.read(0xCF8, memoryview(buf))
    assert int.from_bytes(buf, "little") == 0x80FF_FFFC  # reserved and low bits read 0
    m.cf8(0, 3, 0, 0)
    m.pio.write(0xCF8, memoryview(b"\x00"))  # a byte write is not CONFIG_ADDRESS
    assert m.cfc_read(0, 4) == 0x5678_1234
    assert m.pio.lookup(0xCF9) is None  # the reset register stays someone else's
    assert m.cfc_read(1, 2) == 0xFFFF  # misaligned word in the window


def test_ecam_reaches_the_right_device(m: Machine, dev: Dummy) -> None:
    assert m.ecam_read(3, 0) == 0x5678_1234
    assert m.ecam_read(0, 0) == 0x0008_1B36
    assert m.ecam_read(3, 0x02, 2) == 0x5678
    assert m.ecam_read(3, 0x34, 1) == dev.cap
    assert m.ecam_read(3, 0x100) == 0  # extended space of a conventional device
    assert m.ecam_read(3, 0xFFC) == 0
    assert m.ecam_read(4, 0) == 0xFFFF_FFFF
    assert m.ecam_read(3, 0, fn=2) == 0xFFFF_FFFF
    assert m.ecam_read(3, 1, 2) == 0xFFFF  # misaligned
    assert m.ecam_read(3, 0, bus=1) == 0xFFFF_FFFF  # outside the bus-0 window
    m.ecam_write(3, 0x3C, 1, 0x0A)
    assert m.conf1_read(3, 0x3C, 1) == 0x0A
    m.ecam_write(3, 0x3D, 2, 0xFFFF)  # misaligned: ignored
    assert dev.config_read(0x3C, 4) == 0x0000_010A


# ---- configuration space semantics ----------------------------------------------------


def test_read_only_and_write_one_to_clear(m: Machine, dev: Dummy) -> None:
    m.ecam_write(3, 0x00, 4, 0)
    assert m.ecam_read(3, 0) == 0x5678_1234
    m.ecam_write(3, 0x08, 4, 0)
    assert m.ecam_read(3, 0x08) == 0x0200_0003
    dev.put(0x06, 2, dev.get(0x06, 2) | 0x8000 | 0x2000)  # parity error, master abort
    m.ecam_write(3, 0x06, 2, 0x8000)
    status = m.ecam_read(3, 0x06, 2)
    assert not status & 0x8000 and status & 0x2000
    assert status & 0x10  # capability list
    m.ecam_write(3, 0x04, 2, 0xFFFF)
    assert m.ecam_read(3, 0x04, 2) == 0x0507  # IO, memory, master, SERR, INTx disable


def test_capability_list(m: Machine, dev: Dummy) -> None:
    ptr = m.ecam_read(3, 0x34, 1)
    assert ptr == dev.cap and ptr >= 0x40 and ptr % 4 == 0
    assert m.ecam_read(3, ptr, 1) == 0x09 and m.ecam_read(3, ptr + 1, 1) == 0
    m.ecam_write(3, ptr + 4, 1, 0x77)  # writable byte
    m.ecam_write(3, ptr + 5, 1, 0x77)  # read-only byte
    assert m.ecam_read(3, ptr + 4, 2) == 0xCC77
    second = dev.add_capability(0x05, b"\0" * 6)
    assert second == (ptr + 8 + 3) & ~3
    assert m.ecam_read(3, ptr + 1, 1) == second


def test_device_construction_errors() -> None:
    d = PciDevice(vendor_id=1, device_id=2, class_code=0)
    r = Regs(16)
    with pytest.raises(ValueError):
        d.add_bar(6, 0x1000, BarKind.MEM32, r)
    with pytest.raises(ValueError):
        d.add_bar(5, 0x1000, BarKind.MEM64, r)
    with pytest.raises(ValueError):
        d.add_bar(0, 0x1800, BarKind.MEM32, r)
    with pytest.raises(ValueError):
        d.add_bar(0, 8, BarKind.MEM32, r)
    d.add_bar(0, 0x1000, BarKind.MEM64, r)
    with pytest.raises(ValueError):
        d.add_bar(1, 0x1000, BarKind.MEM32, r)  # the upper half of BAR0
    with pytest.raises(ValueError):
        d.add_bar(0, 0x1000, BarKind.MEM32, r)
    with pytest.raises(ValueError):
        d.add_capability(0x09, b"\0" * 200)
    with pytest.raises(ValueError):
        d.add_capability(0x09, b"\0" * 4, wmask=b"\0")
    assert d.config_read(0, 3) == 0xFF_FFFF and d.config_read(1, 2) == 0xFFFF
    assert d.config_read(4094, 4) == 0xFFFF_FFFF


# ---- BARs -------------------------------------------------------------------------------


def test_bars_are_placed_and_decoded(m: Machine, dev: Dummy) -> None:
    a0, a2 = dev.bar0.mapped_at, dev.bar2.mapped_at
    assert a0 is not None and a2 is not None
    assert layout.PCI_MMIO32_START <= a0 < layout.PCI_MMIO32_END and a0 % 0x1000 == 0
    start64, size64 = m.root.mmio64_window
    assert start64 >= RAM_END and start64 <= a2 < start64 + size64 and a2 % 0x10_0000 == 0
    assert m.ecam_read(3, 0x10) == a0
    assert m.ecam_read(3, 0x18) == (a2 & 0xFFFF_FFFF) | 0xC
    assert m.ecam_read(3, 0x1C) == a2 >> 32
    assert m.ecam_read(3, 0x04, 2) & 0x2  # memory decode on, as firmware leaves it
    dev.r0.mem[0x10:0x14] = b"\x01\x02\x03\x04"
    assert m.mmio_read(a0 + 0x10) == 0x0403_0201
    m.mmio_write(a2 + 0xFFFF8, 8, 0x1122_3344_5566_7788)
    assert dev.r2.writes == [(0xFFFF8, (0x1122_3344_5566_7788).to_bytes(8, "little"))]


def test_bar_sizing(m: Machine, dev: Dummy) -> None:
    orig = [m.ecam_read(3, 0x10 + 4 * i) for i in range(6)]
    m.ecam_write(3, 0x04, 2, 0)  # decode off while sizing, as Linux does
    for i in range(6):
        m.ecam_write(3, 0x10 + 4 * i, 4, 0xFFFF_FFFF)
    sizes = [m.ecam_read(3, 0x10 + 4 * i) for i in range(6)]
    assert sizes == [0xFFFF_F000, 0, 0xFFF0_000C, 0xFFFF_FFFF, 0, 0]
    assert dev.bar0.mapped_at is None and dev.bar2.mapped_at is None
    for i, v in enumerate(orig):
        m.ecam_write(3, 0x10 + 4 * i, 4, v)
    m.ecam_write(3, 0x04, 2, 0x2)
    assert [m.ecam_read(3, 0x10 + 4 * i) for i in range(6)] == orig
    assert dev.bar0.mapped_at == orig[0]
    assert dev.bar2.mapped_at == (orig[2] & ~0xF) | orig[3] << 32


def test_bar_move_remaps(m: Machine, dev: Dummy) -> None:
    old = dev.bar0.mapped_at
    assert old is not None
    new = old + 0x10_0000
    dev.r0.mem[0:4] = b"\xde\xad\xbe\xef"
    dev.moves.clear()
    m.ecam_write(3, 0x10, 4, new)
    assert m.mmio.lookup(old) is None
    assert m.mmio_read(old) == 0xFFFF_FFFF  # nobody there now
    assert m.mmio_read(new) == 0xEFBE_ADDE
    assert dev.moves == [(0, old, new)]
    assert dev.bar0.mapped_at == new and dev.bar2.mapped_at is not None


def test_moving_a_64bit_bar_dword_by_dword(m: Machine, dev: Dummy) -> None:
    old = dev.bar2.mapped_at
    assert old is not None
    new = old + (1 << 30)
    m.ecam_write(3, 0x18, 4, (new & 0xFFFF_FFFF) | 0xC)
    m.ecam_write(3, 0x1C, 4, new >> 32)
    assert dev.bar2.mapped_at == new
    m.mmio_write(new, 4, 7)
    assert dev.r2.writes[-1] == (0, b"\x07\0\0\0")
    m.ecam_write(3, 0x1C, 4, 0xFFFF_FFFF)  # half-written: beyond the address space
    assert dev.bar2.mapped_at is None and m.mmio.lookup(new) is None
    assert dev.moves[-1] == (2, new, None)


def test_memory_decode_off_unmaps(m: Machine, dev: Dummy) -> None:
    a0, a2 = dev.bar0.mapped_at, dev.bar2.mapped_at
    assert a0 is not None and a2 is not None
    dev.moves.clear()
    m.ecam_write(3, 0x04, 2, 0x4)  # bus master only
    assert m.mmio.lookup(a0) is None and m.mmio.lookup(a2) is None
    assert sorted(dev.moves) == [(0, a0, None), (2, a2, None)]
    m.ecam_write(3, 0x04, 2, 0x6)
    assert dev.bar0.mapped_at == a0 and m.mmio.lookup(a0) is not None
    assert dev.bar2.mapped_at == a2


def test_overlapping_bar_is_not_decoded(m: Machine, dev: Dummy) -> None:
    other = Dummy(vendor=0x4321)
    m.root.add(4, other)
    target = dev.bar0.mapped_at
    assert target is not None and other.bar0.mapped_at is not None
    m.ecam_write(4, 0x10, 4, target)  # the guest puts one BAR on top of another
    assert other.bar0.mapped_at is None
    dev.r0.mem[0:4] = b"\x01\0\0\0"
    assert m.mmio_read(target) == 1  # the first device still answers
    m.ecam_write(4, 0x10, 4, target + 0x2000)
    assert other.bar0.mapped_at == target + 0x2000


def test_slots_and_allocation(m: Machine) -> None:
    devs = [Dummy(vendor=0x1000 + i) for i in range(31)]
    slots = [m.root.add(None, d) for d in devs]
    assert slots == list(range(1, 32))
    with pytest.raises(ValueError):
        m.root.add(None, Dummy())
    with pytest.raises(ValueError):
        m.root.add(0, Dummy())  # the host bridge's
    spans = sorted((b.mapped_at, b.mapped_at + b.size) for d in devs
                   for b in d.bars.values() if b.mapped_at is not None)
    assert len(spans) == 62
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))


def test_bar_allocator() -> None:
    alloc = BarAllocator((0x1000, 0x4000), (0x10_0000, 0x20_0000))
    assert alloc.allocate(0x1000, high=False) == 0x1000
    assert alloc.allocate(0x2000, high=False) == 0x2000
    with pytest.raises(ValueError):
        alloc.allocate(0x1000, high=False)
    assert alloc.allocate(0x8_0000, high=True) == 0x10_0000
    assert alloc.allocate(0x8_0000, high=True) == 0x18_0000
    with pytest.raises(ValueError):
        alloc.allocate(0x8_0000, high=True)  # both windows full


def test_io_bars_are_refused(m: Machine) -> None:
    d = PciDevice(vendor_id=1, device_id=2, class_code=0)
    d.add_bar(0, 0x100, BarKind.IO, Regs(0x100))
    with pytest.raises(ValueError):
        m.root.add(7, d)


def test_intx_routing(m: Machine) -> None:
    assert [intx_gsi(s, 0) for s in range(10)] == [16, 17, 18, 19, 20, 21, 22, 23, 16, 17]
    assert [intx_gsi(1, p) for p in range(4)] == [17, 18, 19, 20]
    line = m.root.intx_line(3, 1)
    assert line is m.lines[20]


# ---- ACPI ------------------------------------------------------------------------------


def test_mcfg_table() -> None:
    raw = build_mcfg().to_bytes()
    assert raw[:4] == b"MCFG" and len(raw) == 60
    assert struct.unpack_from("<I", raw, 4)[0] == 60 and sum(raw) % 256 == 0
    base, seg, start, end = struct.unpack_from("<QHBB", raw, 44)
    assert (base, seg, start, end) == (ECAM, 0, 0, 0)


def _pci_tables() -> dict[str, bytes]:
    root = PciRoot(Bus("mmio"), lambda gsi: NullIrq(), RAM_END)
    img = plan_acpi_tables(num_cpus=1, extra_tables=[build_mcfg()],
                           dsdt_extra=pci_dsdt_objects(root.mmio64_window))
    return {name: data for name, (_, data) in img.tables.items()}


def _iasl(tmp_path: Path, *args: str) -> str:
    assert IASL is not None
    proc = subprocess.run([IASL, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    return log


@needs_iasl
def test_iasl_disassembles_dsdt_and_mcfg(tmp_path: Path) -> None:
    tables = _pci_tables()
    dsl: dict[str, str] = {}
    for name in ("DSDT", "MCFG"):
        (tmp_path / f"{name}.dat").write_bytes(tables[name])
        log = _iasl(tmp_path, "-d", f"{name}.dat")
        assert not re.search(r"\b(error|warning)\b", log, re.IGNORECASE), log
        dsl[name] = (tmp_path / f"{name}.dsl").read_text()
    dsdt = dsl["DSDT"]
    for pnp in ("PNP0A08", "PNP0A03", "PNP0C02"):
        assert f'EisaId ("{pnp}")' in dsdt
    assert "Device (PCI0)" in dsdt and "Device (MRES)" in dsdt
    assert "WordBusNumber" in dsdt and "QWordMemory" in dsdt and "DWordMemory" in dsdt
    assert "0xE0000000" in dsdt  # the ECAM reservation
    assert len(re.findall(r"Package \(0x04\)\s*\{\s*0x[0-9A-F]+FFFF,", dsdt)) == 31 * 4
    assert re.search(r"0x0003FFFF,\s*One,\s*Zero,\s*0x14", dsdt)  # slot 3 INTB: GSI 20
    assert "_ADR" not in dsdt  # a device has _HID or _ADR, not both
    mcfg = dsl["MCFG"]
    assert re.search(r"Base Address : 00000000E0000000", mcfg), mcfg
    assert re.search(r"End Bus Number : 00", mcfg), mcfg


@needs_iasl
def test_iasl_recompiles_pci_dsdt(tmp_path: Path) -> None:
    (tmp_path / "DSDT.dat").write_bytes(_pci_tables()["DSDT"])
    _iasl(tmp_path, "-d", "DSDT.dat")
    log = _iasl(tmp_path, "DSDT.dsl")
    assert "0 Errors, 0 Warnings" in log, log
