"""pyvirt.loader boot params: zero page layout, e820 map, setup_linux_boot."""

from __future__ import annotations

import itertools
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirt.arch.x86_64 import layout
from pyvirt.loader import (
    E820_RAM,
    E820_RESERVED,
    Cmdline,
    E820Entry,
    KernelImage,
    LoaderError,
    build_boot_params,
    e820_map,
    setup_linux_boot,
)
from pyvirt.loader import bootparams as bp
from pyvirt.loader.bzimage import HDR_MAX_END
from pyvirt.memory import GuestMemory

MiB = 1 << 20
GiB = 1 << 30
HEADER = Path("/usr/include/x86_64-linux-gnu/asm/bootparam.h")

# (C member expression, our offset, our size)
FIELDS: list[tuple[str, int, int]] = [
    ("acpi_rsdp_addr", bp.OFF_ACPI_RSDP_ADDR, 8),
    ("ext_ramdisk_image", bp.OFF_EXT_RAMDISK_IMAGE, 4),
    ("ext_ramdisk_size", bp.OFF_EXT_RAMDISK_SIZE, 4),
    ("ext_cmd_line_ptr", bp.OFF_EXT_CMD_LINE_PTR, 4),
    ("e820_entries", bp.OFF_E820_ENTRIES, 1),
    ("sentinel", bp.OFF_SENTINEL, 1),
    ("hdr", bp.OFF_HDR, -1),
    ("e820_table", bp.OFF_E820_TABLE, bp.E820_ENTRY_SIZE * bp.E820_MAX_ENTRIES_ZEROPAGE),
    ("hdr.setup_sects", bp.OFF_SETUP_SECTS, 1),
    ("hdr.vid_mode", bp.OFF_VID_MODE, 2),
    ("hdr.boot_flag", bp.OFF_BOOT_FLAG, 2),
    ("hdr.header", bp.OFF_HEADER, 4),
    ("hdr.version", bp.OFF_VERSION, 2),
    ("hdr.type_of_loader", bp.OFF_TYPE_OF_LOADER, 1),
    ("hdr.loadflags", bp.OFF_LOADFLAGS, 1),
    ("hdr.code32_start", bp.OFF_CODE32_START, 4),
    ("hdr.ramdisk_image", bp.OFF_RAMDISK_IMAGE, 4),
    ("hdr.ramdisk_size", bp.OFF_RAMDISK_SIZE, 4),
    ("hdr.heap_end_ptr", bp.OFF_HEAP_END_PTR, 2),
    ("hdr.cmd_line_ptr", bp.OFF_CMD_LINE_PTR, 4),
    ("hdr.initrd_addr_max", bp.OFF_INITRD_ADDR_MAX, 4),
    ("hdr.kernel_alignment", bp.OFF_KERNEL_ALIGNMENT, 4),
    ("hdr.xloadflags", bp.OFF_XLOADFLAGS, 2),
    ("hdr.cmdline_size", bp.OFF_CMDLINE_SIZE, 4),
    ("hdr.setup_data", bp.OFF_SETUP_DATA, 8),
    ("hdr.pref_address", bp.OFF_PREF_ADDRESS, 8),
]


def test_offsets_match_kernel_header(tmp_path: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not HEADER.exists():
        pytest.skip("needs a C compiler and linux-libc-dev's <asm/bootparam.h>")
    lines = [
        "#include <stdio.h>", "#include <stddef.h>", "#include <asm/bootparam.h>",
        "#define F(m) printf(\"%s %zu %zu\\n\", #m, offsetof(struct boot_params, m), "
        "sizeof(((struct boot_params *)0)->m));",
        "int main(void) {",
        "printf(\"sizeof %zu 0\\n\", sizeof(struct boot_params));",
        "printf(\"e820_entry %zu 0\\n\", sizeof(struct boot_e820_entry));",
        "printf(\"hdr_end %zu 0\\n\", offsetof(struct boot_params, hdr) + "
        "sizeof(struct setup_header));",
    ]
    lines += [f"F({name})" for name, _, _ in FIELDS]
    lines += ["return 0; }"]
    src = tmp_path / "off.c"
    src.write_text("\n".join(lines) + "\n")
    exe = tmp_path / "off"
    subprocess.run([cc, "-o", str(exe), str(src)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    got = {n: (int(o), int(s)) for n, o, s in (ln.split() for ln in out.splitlines())}
    assert got["sizeof"][0] == bp.BOOT_PARAMS_SIZE
    assert got["e820_entry"][0] == bp.E820_ENTRY_SIZE
    assert got["hdr_end"][0] <= HDR_MAX_END
    for name, off, size in FIELDS:
        assert got[name][0] == off, name
        if size >= 0:
            assert got[name][1] == size, name


# ---------------------------------------------------------------- e820


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.create(256 * MiB)
    yield m
    m.close()


def test_e820_small(mem: GuestMemory) -> None:
    assert e820_map(mem) == [
        E820Entry(0, layout.EBDA_START, E820_RAM),
        E820Entry(layout.EBDA_START, 0x100000 - layout.EBDA_START, E820_RESERVED),
        E820Entry(0x100000, 255 * MiB, E820_RAM),
        E820Entry(layout.PCI_ECAM_ADDR, layout.PCI_ECAM_SIZE, E820_RESERVED),
    ]


@pytest.mark.parametrize("size", [3 * GiB + 4096, 3 * GiB + 512 * MiB, 5 * GiB])
def test_e820_above_pci_hole(size: int) -> None:
    m = GuestMemory.create(size)
    try:
        e = e820_map(m)
        assert e[2] == E820Entry(0x100000, 3 * GiB - 0x100000, E820_RAM)
        # the PCI hole is not RAM; only the ECAM in it is listed (reserved)
        assert e[3] == E820Entry(layout.PCI_ECAM_ADDR, layout.PCI_ECAM_SIZE, E820_RESERVED)
        assert e[4] == E820Entry(4 * GiB, size - 3 * GiB, E820_RAM)
        assert len(e) == 5
        assert sum(x.size for x in e if x.type == E820_RAM) == size - (0x100000 - 0x9FC00)
        for x in e:
            assert x.end <= 3 * GiB or x.addr >= 4 * GiB or x.type == E820_RESERVED
    finally:
        m.close()


@pytest.mark.parametrize("size", [64 * 4096, 0x9F000, 0x100000, 0x100000 + 4096, 3 * GiB])
def test_e820_odd_sizes(size: int) -> None:
    m = GuestMemory.create(size)
    try:
        e = e820_map(m)
        ram = [x for x in e if x.type == E820_RAM]
        assert all(x.size > 0 for x in e)
        assert ram[0].addr == 0
        assert ram[-1].end == (size if size > 0x100000 else min(size, layout.EBDA_START))
        assert e == sorted(e, key=lambda x: x.addr)
        for a, b in itertools.pairwise(e):
            assert a.end <= b.addr
    finally:
        m.close()


# ---------------------------------------------------------------- zero page


def _kernel(setup_header: bytes | None = None, version: int = 0x20F,
            kind: str = "elf") -> KernelImage:
    return KernelImage(kind="bzimage" if kind == "bzimage" else "elf", entry=0x100_0000,
                       load_addr=0x100_0000, end=0x200_0000, setup_header=setup_header,
                       protocol_version=version, initrd_addr_max=0x7FFF_FFFF,
                       cmdline_size=2047, pvh_entry=None, source=Path("/k"))


def _u(data: bytes, off: int, size: int) -> int:
    return int.from_bytes(data[off:off + size], "little")


def test_zero_page_for_bare_elf() -> None:
    e820 = [E820Entry(0, 0x9FC00, 1), E820Entry(0x100000, 0xFF00000, 1)]
    z = build_boot_params(_kernel(), cmdline_addr=0x20000, cmdline_len=10,
                          initrd=(0x800_0000, 0x1234), e820=e820, acpi_rsdp_addr=0xE0000)
    assert len(z) == 4096
    assert _u(z, 0x1FE, 2) == 0xAA55
    assert z[0x202:0x206] == b"HdrS"
    assert _u(z, 0x206, 2) == 0x20F
    assert z[0x210] == 0xFF  # type_of_loader
    assert z[0x211] & 0x81 == 0x81  # LOADED_HIGH | CAN_USE_HEAP
    assert z[0x211] & 0x40 == 0  # no KEEP_SEGMENTS
    assert _u(z, 0x1FA, 2) == 0xFFFF
    assert _u(z, 0x228, 4) == 0x20000
    assert _u(z, 0xC8, 4) == 0
    assert (_u(z, 0x218, 4), _u(z, 0x21C, 4)) == (0x800_0000, 0x1234)
    assert _u(z, 0x70, 8) == 0xE0000
    assert z[0x1E8] == 2
    assert struct.unpack_from("<QQI", z, 0x2D0) == (0, 0x9FC00, 1)
    assert struct.unpack_from("<QQI", z, 0x2D0 + 20) == (0x100000, 0xFF00000, 1)
    assert z[0x1EF] == 0  # sentinel


def test_zero_page_copies_bzimage_header() -> None:
    hdr = bytearray(0x26C - 0x1F1)
    hdr[0] = 27  # setup_sects
    struct.pack_into("<H", hdr, 0x1FE - 0x1F1, 0xAA55)
    hdr[0x202 - 0x1F1:0x206 - 0x1F1] = b"HdrS"
    struct.pack_into("<H", hdr, 0x206 - 0x1F1, 0x20F)
    hdr[0x211 - 0x1F1] = 0x01 | 0x40
    struct.pack_into("<I", hdr, 0x238 - 0x1F1, 2047)
    struct.pack_into("<I", hdr, 0x260 - 0x1F1, 0x3F98000)
    z = build_boot_params(_kernel(bytes(hdr), kind="bzimage"), cmdline_addr=0x20000,
                          cmdline_len=0, initrd=None, e820=[], acpi_rsdp_addr=None)
    assert z[0x1F1] == 27
    assert _u(z, 0x238, 4) == 2047
    assert _u(z, 0x260, 4) == 0x3F98000
    assert z[0x211] == 0x81
    assert _u(z, 0x214, 4) == 0x100_0000  # code32_start = load address
    assert _u(z, 0x218, 8) == 0  # no initrd
    assert _u(z, 0x70, 8) == 0
    assert z[0x26C:0x290] == bytes(0x290 - 0x26C)


def test_zero_page_high_addresses() -> None:
    z = build_boot_params(_kernel(), cmdline_addr=0x1_2345_6000, cmdline_len=0,
                          initrd=(0x1_8000_0000, 0x1000), e820=[], acpi_rsdp_addr=None)
    assert (_u(z, 0x228, 4), _u(z, 0xC8, 4)) == (0x2345_6000, 1)
    assert (_u(z, 0x218, 4), _u(z, 0xC0, 4)) == (0x8000_0000, 1)
    assert (_u(z, 0x21C, 4), _u(z, 0xC4, 4)) == (0x1000, 0)


def test_rsdp_only_for_protocol_2_14() -> None:
    z = build_boot_params(_kernel(version=0x20D), cmdline_addr=0x20000, cmdline_len=0,
                          initrd=None, e820=[], acpi_rsdp_addr=0xE0000)
    assert _u(z, 0x70, 8) == 0


def test_zero_page_limits() -> None:
    with pytest.raises(LoaderError, match="at most 2047"):
        build_boot_params(_kernel(), cmdline_addr=0x20000, cmdline_len=2048, initrd=None,
                          e820=[], acpi_rsdp_addr=None)
    with pytest.raises(LoaderError, match="129 e820 entries"):
        build_boot_params(_kernel(), cmdline_addr=0x20000, cmdline_len=0, initrd=None,
                          e820=[E820Entry(i * 8192, 4096, 1) for i in range(129)],
                          acpi_rsdp_addr=None)


def test_setup_linux_boot(mem: GuestMemory) -> None:
    c = Cmdline("console=ttyS0 quiet")
    zp = setup_linux_boot(mem, _kernel(), c, (0x800_0000, 100), 0xE0000)
    assert zp == layout.ZERO_PAGE_ADDR
    line = b"console=ttyS0 quiet\0"
    assert mem.read(layout.CMDLINE_ADDR, len(line)) == line
    assert mem.read_u32(zp + 0x228) == layout.CMDLINE_ADDR
    assert mem.read_u32(zp + 0x218) == 0x800_0000
    assert mem.read_u8(zp + 0x1E8) == 4  # low RAM, BIOS area, high RAM, PCI ECAM
    assert mem.read_u64(zp + 0x70) == 0xE0000


def test_setup_linux_boot_cmdline_too_long(mem: GuestMemory) -> None:
    with pytest.raises(LoaderError, match="the kernel accepts at most 2047"):
        setup_linux_boot(mem, _kernel(), Cmdline("x=" + "a" * 2046), None, None)
