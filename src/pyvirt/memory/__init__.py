"""Guest RAM: anonymous mmap'd regions addressed by ``GuestAddress``.

Every device reaches guest memory through ``GuestMemory``; every access is
bounds-checked here, so a hostile address or length from the guest raises
``GuestMemoryError`` (which fails that one request) and never touches host
memory outside the guest's RAM.

Layout: RAM starts at guest physical 0. A guest larger than the start of the
PCI hole (3 GiB) is split: the part above the hole start is mapped from 4 GiB
up, leaving [3 GiB, 4 GiB) for MMIO (LAPIC, IOAPIC, PCI BARs).
"""

from __future__ import annotations

import ctypes
import mmap
import struct
import sys
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from typing import NewType

from pyvirt.errors import PyvirtError

__all__ = [
    "PCI_HOLE_END",
    "PCI_HOLE_START",
    "GuestAddress",
    "GuestMemory",
    "GuestMemoryError",
    "GuestRegion",
]

#: A guest-physical address. Distinct from plain ints for mypy; free at run time.
GuestAddress = NewType("GuestAddress", int)

PCI_HOLE_START = 0xC000_0000
PCI_HOLE_END = 0x1_0000_0000  # first byte after the hole (4 GiB)

# Native formats on purpose: a standard-size format ("<H") packs and unpacks
# byte by byte, so a vCPU could see a torn 16-bit ring index (0x01FF -> 0x0000
# -> 0x0200) while a device thread stores it. Native formats copy the whole
# value with one naturally sized load/store; x86 is little-endian, as guests
# expect.
assert sys.byteorder == "little", "pyvirt guest memory helpers assume a little-endian host"
_U16 = struct.Struct("@H")
_U32 = struct.Struct("@I")
_U64 = struct.Struct("@Q")


class GuestMemoryError(PyvirtError):
    """A guest address range that is not (entirely) backed by guest RAM."""

    def __init__(self, addr: int, length: int, why: str = "outside guest RAM") -> None:
        super().__init__(f"guest memory access {addr:#x}+{length:#x}: {why}")
        self.addr = addr
        self.length = length


@dataclass(eq=False)
class GuestRegion:
    """One contiguous slot of guest RAM backed by one host mapping."""

    guest_addr: int
    size: int
    mmap: mmap.mmap
    host_addr: int  # address of the mapping in this process (for KVM / unicorn)

    @property
    def end(self) -> int:
        return self.guest_addr + self.size

    @classmethod
    def anonymous(cls, guest_addr: int, size: int) -> GuestRegion:
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE)
        host = ctypes.addressof(ctypes.c_char.from_buffer(m))
        return cls(guest_addr, size, m, host)


class GuestMemory:
    """All guest RAM regions, sorted by guest address, non-overlapping."""

    def __init__(self, regions: list[GuestRegion]) -> None:
        regions = sorted(regions, key=lambda r: r.guest_addr)
        for a, b in pairwise(regions):
            if a.end > b.guest_addr:
                raise ValueError("overlapping guest memory regions")
        self.regions: tuple[GuestRegion, ...] = tuple(regions)
        self._starts = [r.guest_addr for r in regions]
        self._views = [memoryview(r.mmap) for r in regions]

    @classmethod
    def create(cls, size: int) -> GuestMemory:
        """Anonymous RAM of ``size`` bytes, split around the PCI hole."""
        if size <= 0 or size % mmap.PAGESIZE:
            raise ValueError(
                f"guest memory size {size} must be a positive multiple of the page size")
        if size <= PCI_HOLE_START:
            return cls([GuestRegion.anonymous(0, size)])
        return cls([
            GuestRegion.anonymous(0, PCI_HOLE_START),
            GuestRegion.anonymous(PCI_HOLE_END, size - PCI_HOLE_START),
        ])

    @property
    def size(self) -> int:
        """Total bytes of RAM (not counting the hole)."""
        return sum(r.size for r in self.regions)

    @property
    def end(self) -> int:
        """One past the highest RAM address."""
        return self.regions[-1].end

    def __iter__(self) -> Iterator[GuestRegion]:
        return iter(self.regions)

    def _locate(self, addr: int, length: int) -> tuple[int, int]:
        """Index of the region holding [addr, addr+length) and the offset in it."""
        i = bisect_right(self._starts, addr) - 1
        if i < 0 or length < 0:
            raise GuestMemoryError(addr, length)
        r = self.regions[i]
        off = addr - r.guest_addr
        if off + length > r.size:
            raise GuestMemoryError(addr, length)
        return i, off

    def check_range(self, addr: int, length: int) -> bool:
        """True when [addr, addr+length) lies entirely inside one RAM region."""
        try:
            self._locate(addr, length)
        except GuestMemoryError:
            return False
        return True

    def view(self, addr: int, length: int) -> memoryview:
        """A writable zero-copy view of guest RAM (must not cross a region)."""
        i, off = self._locate(addr, length)
        return self._views[i][off : off + length]

    def read(self, addr: int, length: int) -> bytes:
        return bytes(self.view(addr, length))

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        self.view(addr, len(data))[:] = data

    def host_address(self, addr: int, length: int = 1) -> int:
        """The host virtual address backing guest address ``addr``."""
        i, off = self._locate(addr, length)
        return self.regions[i].host_addr + off

    def read_u8(self, addr: int) -> int:
        return self.view(addr, 1)[0]

    def read_u16(self, addr: int) -> int:
        i, off = self._locate(addr, 2)
        return int(_U16.unpack_from(self._views[i], off)[0])

    def read_u32(self, addr: int) -> int:
        i, off = self._locate(addr, 4)
        return int(_U32.unpack_from(self._views[i], off)[0])

    def read_u64(self, addr: int) -> int:
        i, off = self._locate(addr, 8)
        return int(_U64.unpack_from(self._views[i], off)[0])

    def write_u8(self, addr: int, value: int) -> None:
        self.view(addr, 1)[0] = value & 0xFF

    def write_u16(self, addr: int, value: int) -> None:
        i, off = self._locate(addr, 2)
        _U16.pack_into(self._views[i], off, value & 0xFFFF)

    def write_u32(self, addr: int, value: int) -> None:
        i, off = self._locate(addr, 4)
        _U32.pack_into(self._views[i], off, value & 0xFFFF_FFFF)

    def write_u64(self, addr: int, value: int) -> None:
        i, off = self._locate(addr, 8)
        _U64.pack_into(self._views[i], off, value & 0xFFFF_FFFF_FFFF_FFFF)

    def close(self) -> None:
        for v in self._views:
            v.release()
        self._views = []
        for r in self.regions:
            r.mmap.close()
