"""The I/O buses: port I/O and MMIO ranges mapped to devices.

A device sees offsets, never placement: it implements ``read(offset, data)``
and ``write(offset, data)`` where ``data`` is a memoryview of the access
width (1, 2, 4 or 8 bytes). For a read the device fills ``data``; bytes it
leaves alone read as 0xff (what an unclaimed ISA read returns). The bus owns
where devices live. An access nobody claims is never fatal; it is counted
for diagnostics in bounded state (``UnclaimedLog``): a guest that sweeps the
address space must not grow the VMM.

Thread model: lookups take no lock (they read one copy-on-write snapshot);
``insert``/``remove`` (a BAR move, on a vCPU thread) publish a new one.
Devices lock their own state.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Bus", "BusDevice", "BusOverlapError", "UnclaimedLog", "put_byte"]

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


class UnclaimedLog:
    """Accesses nobody claimed: totals per operation plus the first few addresses.

    The guest picks the addresses, so nothing here grows with how many distinct
    ones it touches: per-address counts are kept only for the first
    ``max_addresses`` (read or write, address) pairs, each logged at debug level
    once; accesses elsewhere are only totalled, with a debug summary at most
    every ``summary_interval`` seconds. The first addresses are the useful ones
    (a driver probing a device we lack); a sweep after that adds nothing.
    """

    MAX_ADDRESSES = 256
    SUMMARY_INTERVAL = 10.0

    def __init__(self, kind: str, *, max_addresses: int = MAX_ADDRESSES,
                 summary_interval: float = SUMMARY_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.kind = kind
        self.max_addresses = max_addresses
        self.summary_interval = summary_interval
        self._clock = clock
        self._lock = threading.Lock()  # vCPU threads may miss at the same time
        self.totals: dict[str, int] = {"read": 0, "write": 0}
        #: per-address counts, for the first ``max_addresses`` (op, address) pairs only
        self.addresses: dict[tuple[str, int], int] = {}
        #: accesses at (op, address) pairs that did not fit in ``addresses``
        self.untracked = 0
        self._summary_at = 0.0
        self._summarized = 0

    def note(self, op: str, addr: int) -> None:
        key = (op, addr)
        with self._lock:
            self.totals[op] += 1
            n = self.addresses.get(key)
            if n is not None:
                self.addresses[key] = n + 1
                return
            if len(self.addresses) < self.max_addresses:
                self.addresses[key] = 1
                log.debug("unclaimed %s %s at %#x", self.kind, op, addr)
                return
            self.untracked += 1
            now = self._clock()
            if now < self._summary_at:
                return
            self._summary_at = now + self.summary_interval
            new, self._summarized = self.untracked - self._summarized, self.untracked
        log.debug("%d more unclaimed %s accesses at addresses beyond the first %d "
                  "(%d reads, %d writes in all)", new, self.kind, self.max_addresses,
                  self.totals["read"], self.totals["write"])

    def __getitem__(self, key: tuple[str, int]) -> int:
        """Accesses at (op, address) if it is among the tracked ones, else 0."""
        return self.addresses.get(key, 0)

    def __bool__(self) -> bool:
        return bool(self.totals["read"] or self.totals["write"])

    def __len__(self) -> int:
        return len(self.addresses)


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
        #: unclaimed accesses, for diagnostics (bounded whatever the guest does)
        self.unclaimed = UnclaimedLog(kind)

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
            self.unclaimed.note("read", addr)
            return
        found[0].read(found[1], data)

    def write(self, addr: int, data: memoryview) -> None:
        found = self.lookup(addr)
        if found is None:
            self.unclaimed.note("write", addr)
            return
        found[0].write(found[1], data)
