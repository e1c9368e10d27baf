"""The zero page (``struct boot_params``) and the e820 memory map.

Field offsets are those of ``struct boot_params`` / ``struct setup_header`` in
arch/x86/include/uapi/asm/bootparam.h; which fields a boot loader fills in,
and how, is from Documentation/arch/x86/boot.rst ("Details of header fields"
and "64-bit Boot Protocol"). tests/unit/test_bootparams.py checks the offsets
against the system's <asm/bootparam.h> when a C compiler is available.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pyvirt.arch.x86_64 import layout
from pyvirt.loader.bzimage import BOOT_FLAG, HDR_MAX_END, HDR_START, HDRS_MAGIC
from pyvirt.loader.cmdline import Cmdline
from pyvirt.loader.errors import LoaderError
from pyvirt.loader.kernel import KernelImage
from pyvirt.memory import GuestMemory

__all__ = [
    "BOOT_PARAMS_SIZE",
    "E820_ACPI",
    "E820_RAM",
    "E820_RESERVED",
    "E820Entry",
    "build_boot_params",
    "e820_map",
    "setup_linux_boot",
]

BOOT_PARAMS_SIZE = 4096

# struct boot_params
OFF_ACPI_RSDP_ADDR = 0x070  # u64, protocol 2.14+
OFF_EXT_RAMDISK_IMAGE = 0x0C0  # u32: high 32 bits of ramdisk_image
OFF_EXT_RAMDISK_SIZE = 0x0C4
OFF_EXT_CMD_LINE_PTR = 0x0C8
OFF_E820_ENTRIES = 0x1E8  # u8
OFF_SENTINEL = 0x1EF  # must stay 0 (the kernel wipes fields otherwise)
OFF_HDR = HDR_START  # struct setup_header
OFF_E820_TABLE = 0x2D0  # struct boot_e820_entry[E820_MAX_ENTRIES_ZEROPAGE]
E820_MAX_ENTRIES_ZEROPAGE = 128
E820_ENTRY_SIZE = 20  # packed: u64 addr, u64 size, u32 type

# struct setup_header, as offsets in boot_params
OFF_SETUP_SECTS = 0x1F1
OFF_VID_MODE = 0x1FA
OFF_BOOT_FLAG = 0x1FE
OFF_HEADER = 0x202
OFF_VERSION = 0x206
OFF_TYPE_OF_LOADER = 0x210
OFF_LOADFLAGS = 0x211
OFF_CODE32_START = 0x214
OFF_RAMDISK_IMAGE = 0x218
OFF_RAMDISK_SIZE = 0x21C
OFF_HEAP_END_PTR = 0x224
OFF_CMD_LINE_PTR = 0x228
OFF_INITRD_ADDR_MAX = 0x22C
OFF_KERNEL_ALIGNMENT = 0x230
OFF_XLOADFLAGS = 0x236
OFF_CMDLINE_SIZE = 0x238
OFF_SETUP_DATA = 0x250
OFF_PREF_ADDRESS = 0x258

LOADED_HIGH = 0x01
KASLR_FLAG = 0x02  # set by the kernel's decompressor, never by a loader
KEEP_SEGMENTS = 0x40  # obsolete since 2.07's 32-bit path; not wanted
CAN_USE_HEAP = 0x80
#: boot.rst: "If set to 0xffff, this means "normal"" (vid_mode, 80x25).
VID_MODE_NORMAL = 0xFFFF
#: boot.rst type_of_loader: 0xFF means "undefined" (no assigned loader ID).
LOADER_TYPE_UNDEFINED = 0xFF
#: boot.rst sample configuration: heap_end = 0xe000, heap_end_ptr = heap_end - 0x200.
HEAP_END_PTR = 0xE000 - 0x200

E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_E820 = struct.Struct("<QQI")


@dataclass(frozen=True)
class E820Entry:
    """One BIOS e820 memory map entry."""

    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size


def e820_map(mem: GuestMemory) -> list[E820Entry]:
    """The guest's memory map: low RAM, the reserved BIOS area, high RAM.

    [EBDA_START, 1 MiB) is reserved: it holds the ACPI tables at 0xE0000 (the
    kernel also scans 0xE0000-0xFFFFF for the RSDP). The PCI hole is simply not
    listed, which tells the kernel it is not RAM.
    """
    out: list[E820Entry] = []
    for r in mem.regions:
        start, end = r.guest_addr, r.end
        if start < layout.HIGH_MEMORY_START:
            low_end = min(end, layout.EBDA_START)
            if low_end > start:
                out.append(E820Entry(start, low_end - start, E820_RAM))
            res_start = max(start, layout.EBDA_START)
            if end > res_start:
                out.append(E820Entry(res_start, layout.HIGH_MEMORY_START - res_start,
                                     E820_RESERVED))
            start = layout.HIGH_MEMORY_START
        if end > start:
            out.append(E820Entry(start, end - start, E820_RAM))
    # PCI ECAM: reserved, as firmware does, so the kernel trusts MCFG (and never
    # puts anything else there)
    out.append(E820Entry(layout.PCI_ECAM_ADDR, layout.PCI_ECAM_SIZE, E820_RESERVED))
    return sorted(out, key=lambda e: e.addr)


def _synthetic_header(kernel: KernelImage) -> bytes:
    """A minimal setup header for a bare ELF kernel (no bzImage to copy from)."""
    hdr = bytearray(HDR_MAX_END - HDR_START)

    def put(fmt: struct.Struct, off: int, value: int) -> None:
        fmt.pack_into(hdr, off - HDR_START, value)

    put(_U16, OFF_BOOT_FLAG, BOOT_FLAG)
    hdr[OFF_HEADER - HDR_START:OFF_HEADER - HDR_START + 4] = HDRS_MAGIC
    put(_U16, OFF_VERSION, kernel.protocol_version)
    put(_U32, OFF_INITRD_ADDR_MAX, kernel.initrd_addr_max)
    put(_U32, OFF_KERNEL_ALIGNMENT, 0x20_0000)
    put(_U32, OFF_CMDLINE_SIZE, kernel.cmdline_size)
    put(_U64, OFF_PREF_ADDRESS, kernel.load_addr)
    return bytes(hdr)


def build_boot_params(kernel: KernelImage, *, cmdline_addr: int, cmdline_len: int,
                      initrd: tuple[int, int] | None, e820: list[E820Entry],
                      acpi_rsdp_addr: int | None) -> bytes:
    """The 4096-byte zero page for the 64-bit boot protocol.

    ``cmdline_len`` is the line's length without the NUL; it is only checked
    against the kernel's limit here (the kernel reads up to the NUL).
    """
    if cmdline_len > kernel.cmdline_size:
        raise LoaderError(f"kernel command line is {cmdline_len} bytes; the kernel accepts "
                          f"at most {kernel.cmdline_size}", kernel.source)
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise LoaderError(f"{len(e820)} e820 entries; the zero page holds at most "
                          f"{E820_MAX_ENTRIES_ZEROPAGE}")
    bp = bytearray(BOOT_PARAMS_SIZE)

    # boot.rst, 64-bit boot protocol: "the setup header should be loaded from
    # the kernel image at offset 0x01f1 ... and then filled in".
    hdr = kernel.setup_header if kernel.setup_header is not None else _synthetic_header(kernel)
    hdr = hdr[:HDR_MAX_END - HDR_START]
    bp[HDR_START:HDR_START + len(hdr)] = hdr

    _U16.pack_into(bp, OFF_VID_MODE, VID_MODE_NORMAL)
    bp[OFF_TYPE_OF_LOADER] = LOADER_TYPE_UNDEFINED
    flags = bp[OFF_LOADFLAGS] | LOADED_HIGH | CAN_USE_HEAP
    bp[OFF_LOADFLAGS] = flags & ~(KEEP_SEGMENTS | KASLR_FLAG)
    _U16.pack_into(bp, OFF_HEAP_END_PTR, HEAP_END_PTR)
    if kernel.kind == "bzimage":
        _U32.pack_into(bp, OFF_CODE32_START, kernel.load_addr & 0xFFFF_FFFF)
    _U64.pack_into(bp, OFF_SETUP_DATA, 0)  # no setup_data list

    # 2.02+ cmd_line_ptr; ext_cmd_line_ptr (boot_params 0xc8) holds bits 32-63.
    _U32.pack_into(bp, OFF_CMD_LINE_PTR, cmdline_addr & 0xFFFF_FFFF)
    _U32.pack_into(bp, OFF_EXT_CMD_LINE_PTR, cmdline_addr >> 32)

    if initrd is not None:
        addr, size = initrd
        _U32.pack_into(bp, OFF_RAMDISK_IMAGE, addr & 0xFFFF_FFFF)
        _U32.pack_into(bp, OFF_RAMDISK_SIZE, size & 0xFFFF_FFFF)
        _U32.pack_into(bp, OFF_EXT_RAMDISK_IMAGE, addr >> 32)
        _U32.pack_into(bp, OFF_EXT_RAMDISK_SIZE, size >> 32)

    # boot.rst: acpi_rsdp_addr exists from protocol 2.14; older kernels
    # find the RSDP by scanning 0xE0000-0xFFFFF, where our tables are.
    if acpi_rsdp_addr is not None and kernel.protocol_version >= 0x20E:
        _U64.pack_into(bp, OFF_ACPI_RSDP_ADDR, acpi_rsdp_addr)

    bp[OFF_E820_ENTRIES] = len(e820)
    for i, e in enumerate(e820):
        _E820.pack_into(bp, OFF_E820_TABLE + i * E820_ENTRY_SIZE, e.addr, e.size, e.type)
    assert bp[OFF_SENTINEL] == 0
    return bytes(bp)


def setup_linux_boot(mem: GuestMemory, kernel: KernelImage, cmdline: Cmdline,
                     initrd: tuple[int, int] | None, acpi_rsdp_addr: int | None) -> int:
    """Write the command line and the zero page; returns the zero page address (RSI)."""
    limit = min(kernel.cmdline_size, layout.CMDLINE_MAX - 1)
    line = cmdline.to_bytes(limit)
    mem.write(layout.CMDLINE_ADDR, line)
    bp = build_boot_params(kernel, cmdline_addr=layout.CMDLINE_ADDR, cmdline_len=len(line) - 1,
                           initrd=initrd, e820=e820_map(mem), acpi_rsdp_addr=acpi_rsdp_addr)
    mem.write(layout.ZERO_PAGE_ADDR, bp)
    return layout.ZERO_PAGE_ADDR

