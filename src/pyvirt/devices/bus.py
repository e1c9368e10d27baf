"""The I/O buses: port I/O and MMIO ranges mapped to devices.

A device sees offsets, never placement: it implements ``read(offset, data)``
and ``write(offset, data)`` where ``data`` is a memoryview of the access
width (1, 2, 4 or 8 bytes). For a read the device fills ``data``; bytes it
leaves alone read as 0xff (what an unclaimed ISA read returns). The bus owns
where devices live. An access nobody claims is counted and logged at debug
level, never fatal.

Thread model: a bus is built before the vCPUs start and is read-only after
that, so lookups take no lock. Devices lock their own state.
"""

from __future__ import annotations

import logging
import threading
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Bus", "BusDevice", "BusOverlapError", "put_byte"]

log = logging.getLogger(__name__)


class BusDevice(Protocol):
    """What a device on a bus implements."""

    def read(self, offset: int, data: memoryview) -> None: ...

    def write(self, offset: int, data: memoryview) -> None: ...


def put_byte(data: memoryview, value: int) -> None:
    """A byte-wide register read: ``value`` in the first byte, the rest float high (0xff)."""
    data[0] = value
    if len(data) > 1:
        data[1:] = b"\xff" * (len(data) - 1)


class BusOverlapError(ValueError):
    pass


@dataclass(frozen=True)
class _Range:
    base: int
    length: int
    device: BusDevice
    name: str


class Bus:
    """A sorted set of non-overlapping [base, base+length) ranges."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # "pio" or "mmio", for messages
        # copy-on-write: lookups read one (bases, ranges) snapshot without a lock,
        # so a BAR can be moved at run time while other vCPUs dispatch
        self._ranges: list[_Range] = []
        self._bases: list[int] = []
        self._snapshot: tuple[list[int], list[_Range]] = ([], [])
        self._write_lock = threading.Lock()
        #: unclaimed accesses by (read/write, address): for diagnostics
        self.unclaimed: Counter[tuple[str, int]] = Counter()

    def insert(self, device: BusDevice, base: int, length: int, name: str = "") -> None:
        if length <= 0:
            raise ValueError("bus range length must be positive")
        with self._write_lock:
            bases, ranges = list(self._bases), list(self._ranges)
            i = bisect_right(bases, base)
            if i > 0:
                prev = ranges[i - 1]
                if prev.base + prev.length > base:
                    raise BusOverlapError(
                        f"{self.kind} {base:#x}+{length:#x} overlaps {prev.name}")
            if i < len(ranges) and base + length > ranges[i].base:
                raise BusOverlapError(
                    f"{self.kind} {base:#x}+{length:#x} overlaps {ranges[i].name}")
            ranges.insert(i, _Range(base, length, device, name or type(device).__name__))
            bases.insert(i, base)
            self._publish(bases, ranges)

    def remove(self, base: int) -> BusDevice:
        """Take the device whose range starts at ``base`` off the bus (any time)."""
        with self._write_lock:
            bases, ranges = list(self._bases), list(self._ranges)
            i = bisect_right(bases, base) - 1
            if i < 0 or ranges[i].base != base:
                raise KeyError(f"no {self.kind} range starts at {base:#x}")
            del bases[i]
            dev = ranges.pop(i).device
            self._publish(bases, ranges)
            return dev

    def _publish(self, bases: list[int], ranges: list[_Range]) -> None:
        self._bases, self._ranges = bases, ranges
        self._snapshot = (bases, ranges)  # one reference store: atomic for readers

    def lookup(self, addr: int) -> tuple[BusDevice, int] | None:
        """The device covering ``addr`` and the offset inside its range."""
        bases, ranges = self._snapshot
        i = bisect_right(bases, addr) - 1
        if i >= 0:
            r = ranges[i]
            off = addr - r.base
            if off < r.length:
                return r.device, off
        return None

    def read(self, addr: int, data: memoryview) -> None:
        found = self.lookup(addr)
        if found is None:
            data[:] = b"\xff" * len(data)
            self._unclaimed("read", addr)
            return
        found[0].read(found[1], data)

    def write(self, addr: int, data: memoryview) -> None:
        found = self.lookup(addr)
        if found is None:
            self._unclaimed("write", addr)
            return
        found[0].write(found[1], data)

    def _unclaimed(self, op: str, addr: int) -> None:
        key = (op, addr)
        self.unclaimed[key] += 1
        if self.unclaimed[key] == 1:
            log.debug("unclaimed %s %s at %#x", self.kind, op, addr)
