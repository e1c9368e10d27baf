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

# Ring indices and other fields the guest reads while a device thread writes
# them must change in one naturally sized load/store, never byte by byte and
# never through an intermediate value:
# - standard-size struct formats ("<H") pack and unpack byte by byte (a torn
#   0x01FF -> 0x0000 -> 0x0200 is visible);
# - struct's pack_into zeroes its destination before it stores the value, so
#   a vCPU can read 0 in between (this made Linux's virtio_blk read a stale
#   used-ring entry: "id N is not a head!").
# So aligned accesses go through memoryviews cast to the native integer type:
# item access is one memcpy of sizeof(type), a single mov on x86. x86 is
# little-endian, as guests expect.
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
        # typed views for single-access (untorn) aligned loads and stores
        self._v16 = [v.cast("H") for v in self._views]
        self._v32 = [v.cast("I") for v in self._views]
        self._v64 = [v.cast("Q") for v in self._views]

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
        if off & 1:
            return int(_U16.unpack_from(self._views[i], off)[0])
        return int(self._v16[i][off >> 1])

    def read_u32(self, addr: int) -> int:
        i, off = self._locate(addr, 4)
        if off & 3:
            return int(_U32.unpack_from(self._views[i], off)[0])
        return int(self._v32[i][off >> 2])

    def read_u64(self, addr: int) -> int:
        i, off = self._locate(addr, 8)
        if off & 7:
            return int(_U64.unpack_from(self._views[i], off)[0])
        return int(self._v64[i][off >> 3])

    def write_u8(self, addr: int, value: int) -> None:
        self.view(addr, 1)[0] = value & 0xFF

    # Unaligned stores cannot be single accesses anyway; they still avoid
    # pack_into (zero first, then the value) and copy the final bytes.

    def write_u16(self, addr: int, value: int) -> None:
        i, off = self._locate(addr, 2)
        if off & 1:
            self._views[i][off : off + 2] = (value & 0xFFFF).to_bytes(2, "little")
        else:
            self._v16[i][off >> 1] = value & 0xFFFF

    def write_u32(self, addr: int, value: int) -> None:
        i, off = self._locate(addr, 4)
        if off & 3:
            self._views[i][off : off + 4] = (value & 0xFFFF_FFFF).to_bytes(4, "little")
        else:
            self._v32[i][off >> 2] = value & 0xFFFF_FFFF

    def write_u64(self, addr: int, value: int) -> None:
        i, off = self._locate(addr, 8)
        if off & 7:
            self._views[i][off : off + 8] = (value & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little")
        else:
            self._v64[i][off >> 3] = value & 0xFFFF_FFFF_FFFF_FFFF

    def close(self) -> None:
        for typed in (self._v16, self._v32, self._v64):
            for v in typed:
                v.release()
        for v in self._views:
            v.release()
        self._v16, self._v32, self._v64, self._views = [], [], [], []
        for r in self.regions:
            r.mmap.close()
