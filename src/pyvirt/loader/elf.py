"""ELF64 x86-64 executables (a Linux ``vmlinux`` or a small test guest).

Only what a loader needs: the ELF header, PT_LOAD segments (placed at their
physical address ``p_paddr``) and PT_NOTE segments (for the PVH entry note).
Field layout from the System V ABI gABI ``Elf64_Ehdr`` / ``Elf64_Phdr`` /
``Elf64_Nhdr``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from pyvirt.arch.x86_64 import layout
from pyvirt.loader.errors import LoaderError
from pyvirt.memory import GuestMemory

__all__ = ["ELF_MAGIC", "ElfImage", "ElfSegment", "is_elf", "load_elf_segments", "parse_elf"]

ELF_MAGIC = b"\x7fELF"
_ELFCLASS64 = 2
_ELFDATA2LSB = 1
_ET_EXEC = 2
_EM_X86_64 = 62
_PT_LOAD = 1
_PT_NOTE = 4
_PN_XNUM = 0xFFFF

# e_ident[16], e_type, e_machine, e_version, e_entry, e_phoff, e_shoff, e_flags,
# e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
# p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
_PHDR = struct.Struct("<IIQQQQQQ")
_NHDR = struct.Struct("<III")  # n_namesz, n_descsz, n_type

#: Xen's ELF note giving the 32-bit PVH entry point (xen/include/public/elfnote.h).
XEN_ELFNOTE_PHYS32_ENTRY = 18

_ET_NAMES = {0: "NONE", 1: "REL (object file)", 2: "EXEC", 3: "DYN (shared/PIE)", 4: "CORE"}

#: Guest-physical ranges the VMM writes itself (layout.py); a segment there would
#: be overwritten by, or overwrite, the GDT, zero page, stack, page tables,
#: command line or ACPI tables.
VMM_RANGES: tuple[tuple[int, int, str], ...] = (
    (layout.GDT_ADDR, 0x1000, "GDT/IDT"),
    (layout.ZERO_PAGE_ADDR, layout.PD_ADDR + 4 * 0x1000, "zero page, boot stack and page tables"),
    (layout.CMDLINE_ADDR, layout.CMDLINE_ADDR + layout.CMDLINE_MAX, "kernel command line"),
    (layout.EBDA_START, layout.HIGH_MEMORY_START, "EBDA/ACPI tables area"),
)


@dataclass(frozen=True)
class ElfSegment:
    """One PT_LOAD program header."""

    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int


@dataclass(frozen=True)
class ElfImage:
    """What the loader needs from a parsed ELF executable."""

    entry: int  # guest-physical
    segments: tuple[ElfSegment, ...]
    pvh_entry: int | None
    load_addr: int  # lowest p_paddr
    end: int  # one past the highest p_paddr + p_memsz


def is_elf(data: bytes | memoryview) -> bool:
    return bytes(data[:4]) == ELF_MAGIC


def _size(n: int) -> str:
    if n >= 1 << 30 and n % (1 << 30) == 0:
        return f"{n >> 30} GiB"
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20} MiB"
    return f"{n} bytes"


def parse_elf(data: bytes | memoryview, path: Path) -> ElfImage:
    """Validate an ELF64 x86-64 EXEC file and read its segments, entry and PVH note."""
    if len(data) < _EHDR.size or not is_elf(data):
        raise LoaderError("not an ELF file", path)
    (ident, e_type, e_machine, _ver, e_entry, e_phoff, _shoff, _flags, _ehsize,
     e_phentsize, e_phnum, _shentsize, _shnum, _shstrndx) = _EHDR.unpack_from(data, 0)
    if ident[4] != _ELFCLASS64:
        raise LoaderError("ELF file is 32-bit (ELFCLASS32); need an ELF64 x86-64 kernel", path)
    if ident[5] != _ELFDATA2LSB:
        raise LoaderError("ELF file is big-endian; need little-endian x86-64", path)
    if e_machine != _EM_X86_64:
        raise LoaderError(f"ELF machine is {e_machine}, not x86-64 (62)", path)
    if e_type != _ET_EXEC:
        name = _ET_NAMES.get(e_type, str(e_type))
        raise LoaderError(f"ELF type is {name}; need an executable (EXEC)", path)
    if e_phnum == 0:
        raise LoaderError("ELF file has no program headers", path)
    if e_phnum == _PN_XNUM or e_phentsize != _PHDR.size:
        raise LoaderError(f"unsupported ELF program header table "
                          f"({e_phnum} entries of {e_phentsize} bytes)", path)
    if e_phoff + e_phnum * _PHDR.size > len(data):
        raise LoaderError("truncated ELF file: program headers run past the end of the file",
                          path)

    segments: list[ElfSegment] = []
    notes: list[tuple[int, int]] = []
    for i in range(e_phnum):
        p_type, _pf, off, vaddr, paddr, filesz, memsz, _al = _PHDR.unpack_from(
            data, e_phoff + i * _PHDR.size)
        if p_type not in (_PT_LOAD, _PT_NOTE):
            continue
        if off + filesz > len(data):
            raise LoaderError(f"truncated ELF file: segment {i} needs bytes up to "
                              f"{off + filesz:#x} but the file has {len(data):#x}", path)
        if p_type == _PT_NOTE:
            notes.append((off, filesz))
            continue
        if filesz > memsz:
            raise LoaderError(f"bad ELF segment {i}: file size {filesz:#x} > "
                              f"memory size {memsz:#x}", path)
        if memsz:
            segments.append(ElfSegment(off, vaddr, paddr, filesz, memsz))
    if not segments:
        raise LoaderError("ELF file has no loadable (PT_LOAD) segments", path)

    return ElfImage(
        entry=_entry_physical(e_entry, segments, path),
        segments=tuple(segments),
        pvh_entry=_find_pvh_entry(data, notes),
        load_addr=min(s.paddr for s in segments),
        end=max(s.paddr + s.memsz for s in segments),
    )


def _entry_physical(e_entry: int, segments: list[ElfSegment], path: Path) -> int:
    """``e_entry`` as a guest-physical address.

    The gABI defines e_entry as virtual; translate it through the segment that
    contains it. Linux's vmlinux instead sets it to the physical startup_64
    (``ENTRY(phys_startup_64)`` in vmlinux.lds), so a value inside a segment's
    physical range is taken as is.
    """
    for s in segments:
        if s.vaddr <= e_entry < s.vaddr + s.memsz:
            return s.paddr + (e_entry - s.vaddr)
    for s in segments:
        if s.paddr <= e_entry < s.paddr + s.memsz:
            return e_entry
    raise LoaderError(f"ELF entry point {e_entry:#x} is not inside any loadable segment", path)


def _find_pvh_entry(data: bytes | memoryview, notes: list[tuple[int, int]]) -> int | None:
    """The XEN_ELFNOTE_PHYS32_ENTRY note's value (4 or 8 byte descriptor), if any."""
    for off, size in notes:
        pos, end = off, off + size
        while pos + _NHDR.size <= end:
            namesz, descsz, ntype = _NHDR.unpack_from(data, pos)
            name_at = pos + _NHDR.size
            desc_at = name_at + ((namesz + 3) & ~3)  # name and desc are 4-byte aligned
            nxt = desc_at + ((descsz + 3) & ~3)
            if nxt > end:
                break
            name = bytes(data[name_at:name_at + namesz]).rstrip(b"\0")
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                if descsz == 4:
                    return int(struct.unpack_from("<I", data, desc_at)[0])
                if descsz == 8:
                    return int(struct.unpack_from("<Q", data, desc_at)[0])
            pos = nxt
    return None


def check_segment_placement(mem: GuestMemory, paddr: int, memsz: int, path: Path,
                            what: str) -> None:
    """Raise unless [paddr, paddr+memsz) is inside one RAM region and clear of VMM data."""
    end = paddr + memsz
    if not mem.check_range(paddr, memsz):
        low = mem.regions[0]
        if low.guest_addr <= paddr < low.end and end > low.end and end <= layout.MMIO_32_START:
            raise LoaderError(f"kernel too large for {_size(mem.size)} of guest RAM "
                              f"({what} [{paddr:#x}, {end:#x}) ends past RAM at "
                              f"{low.end:#x})", path)
        raise LoaderError(f"{what} [{paddr:#x}, {end:#x}) is outside guest RAM "
                          f"({_size(mem.size)})", path)
    for lo, hi, name in VMM_RANGES:
        if paddr < hi and lo < end:
            raise LoaderError(f"{what} [{paddr:#x}, {end:#x}) overlaps the VMM's {name} "
                              f"at [{lo:#x}, {hi:#x})", path)


def load_elf_segments(mem: GuestMemory, data: bytes | memoryview, image: ElfImage,
                      path: Path) -> None:
    """Copy every PT_LOAD segment to p_paddr and zero its p_memsz - p_filesz tail (bss)."""
    # Check all segments before writing any, so a bad file leaves RAM untouched.
    for i, s in enumerate(image.segments):
        check_segment_placement(mem, s.paddr, s.memsz, path, f"ELF segment {i}")
    src = memoryview(data)
    for s in image.segments:
        dst = mem.view(s.paddr, s.memsz)
        dst[:s.filesz] = src[s.offset:s.offset + s.filesz]
        if s.memsz > s.filesz:
            dst[s.filesz:] = bytes(s.memsz - s.filesz)
