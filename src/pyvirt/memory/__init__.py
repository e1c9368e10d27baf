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
import os
import struct
import sys
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from typing import NewType

from pyvirt.errors import PyvirtError

_MAP_FIXED = 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]


def _libc_mmap(addr: int, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    return int(_libc.mmap(addr, length, prot, flags, fd, offset) or 0)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> int:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)
    return done


def _mark_file_data(resident: bytearray, fd: int, offset: int, size: int) -> None:
    """Also mark the pages of ``fd``'s data extents in [offset, offset+size): in a
    private file mapping, a page not in memory may still hold data from the file."""
    page = mmap.PAGESIZE
    pos = offset
    end = offset + size
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            return
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        for p in range((data - offset) // page, (hole - offset + page - 1) // page):
            resident[p] |= 1
        pos = hole

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

    #: the file this region was mapped from (MAP_PRIVATE: the guest's writes stay
    #: in this process), and the offset in it; None for anonymous memory
    backing_fd: int | None = None
    file_offset: int = 0

    @classmethod
    def anonymous(cls, guest_addr: int, size: int) -> GuestRegion:
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE)
        host = ctypes.addressof(ctypes.c_char.from_buffer(m))
        return cls(guest_addr, size, m, host)

    @classmethod
    def from_file(cls, guest_addr: int, size: int, fd: int, offset: int) -> GuestRegion:
        """A private mapping of ``fd`` at ``offset``: pages are read from the file
        when the guest first touches them (a snapshot restores without reading
        all of RAM first); guest writes copy the page and never reach the file."""
        m = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        host = ctypes.addressof(ctypes.c_char.from_buffer(m))
        return cls(guest_addr, size, m, host, fd, offset)

    def discard(self) -> None:
        """Give the pages back: the region reads as zeros again (its mapping, and so
        its host address known to KVM or the engine, stays the same)."""
        if self.backing_fd is None:
            self.mmap.madvise(mmap.MADV_DONTNEED)
            return
        # MADV_DONTNEED on a private file mapping would bring the file back:
        # put anonymous memory over it at the same address instead
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED
        got = _libc_mmap(self.host_addr, self.size, mmap.PROT_READ | mmap.PROT_WRITE,
                         flags, -1, 0)
        if got != self.host_addr:
            raise OSError(ctypes.get_errno(), "mmap(MAP_FIXED) over guest RAM failed")
        self.backing_fd = None
        self.file_offset = 0

    def resident_pages(self) -> bytearray:
        """One byte per page, bit 0 set where the page is in memory (mincore):
        pages the guest never touched need not be read to be known zero."""
        pages = (self.size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        if _libc.mincore(ctypes.c_void_p(self.host_addr), ctypes.c_size_t(self.size), vec):
            raise OSError(ctypes.get_errno(), "mincore failed")
        return bytearray(vec)


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

    @staticmethod
    def layout(size: int) -> list[tuple[int, int]]:
        """(guest address, size) of each region for ``size`` bytes of RAM."""
        if size <= 0 or size % mmap.PAGESIZE:
            raise ValueError(
                f"guest memory size {size} must be a positive multiple of the page size")
        if size <= PCI_HOLE_START:
            return [(0, size)]
        return [(0, PCI_HOLE_START), (PCI_HOLE_END, size - PCI_HOLE_START)]

    @classmethod
    def create(cls, size: int, *, backing_fd: int | None = None) -> GuestMemory:
        """RAM of ``size`` bytes, split around the PCI hole: anonymous, or a private
        mapping of ``backing_fd`` (regions one after another in the file, as
        ``dump`` writes them)."""
        if backing_fd is None:
            return cls([GuestRegion.anonymous(a, n) for a, n in cls.layout(size)])
        regions, offset = [], 0
        try:
            for a, n in cls.layout(size):
                regions.append(GuestRegion.from_file(a, n, backing_fd, offset))
                offset += n
        except BaseException:
            for r in regions:
                r.mmap.close()
            raise
        return cls(regions)

    def discard(self) -> None:
        """All RAM reads as zeros again, at the same host addresses (a reset in place)."""
        for r in self.regions:
            r.discard()

    def dump(self, fd: int, *, page_check: int = 1 << 16) -> int:
        """Write all RAM to ``fd`` (regions one after another, from offset 0) as a
        sparse file: the file is sized first and only non-zero pages are written,
        so untouched and zero pages cost neither time nor disk. Returns the bytes
        written. Pages the guest never touched (mincore) are not even read."""
        total = self.size
        os.ftruncate(fd, 0)
        os.ftruncate(fd, total)
        page = mmap.PAGESIZE
        zero = bytes(page_check)
        written = 0
        base = 0
        for r, view in zip(self.regions, self._views, strict=True):
            resident = r.resident_pages()
            if r.backing_fd is not None:
                _mark_file_data(resident, r.backing_fd, r.file_offset, r.size)
            per = page_check // page
            for block in range(0, r.size, page_check):
                first = block // page
                if not any(resident[first:first + per]):
                    continue
                chunk = view[block:block + page_check]
                if chunk == zero[:len(chunk)]:
                    continue
                # write runs of non-zero pages in this block
                run_start = -1
                for off in range(0, len(chunk) + page, page):
                    nonzero = off < len(chunk) and chunk[off:off + page] != zero[:page]
                    if nonzero and run_start < 0:
                        run_start = off
                    elif not nonzero and run_start >= 0:
                        written += _pwrite_all(fd, chunk[run_start:off], base + block + run_start)
                        run_start = -1
            base += r.size
        return written

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
