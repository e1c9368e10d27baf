"""The split virtqueue (virtio 1.2, 2.7), device side, over guest RAM.

The driver owns three areas: the descriptor table (16 bytes per entry), the
available ring (flags, idx, ring[size], used_event) and the used ring (flags,
idx, ring[size] of {id, len}, avail_event). Nothing read from them is
trusted:

- the available index may run at most ``size`` ahead of what we consumed,
  and a head index must be below ``size``; otherwise the queue is broken
  (``QueueBroken``) and the device must enter DEVICE_NEEDS_RESET (2.1.2);
- a descriptor chain longer than the queue (a loop), an indirect table that
  is empty, misaligned in length or nested, a buffer outside guest RAM, or a
  device-readable buffer after a device-writable one fails only that request:
  ``pop`` returns the chain with ``error`` set, and the device completes it
  with nothing written.

Memory ordering: the guest runs on other CPUs. x86 keeps loads ordered with
loads and stores with stores, so the only barrier needed is store→load where
we publish (used idx / avail_event) and then read what the driver published
(used_event / avail idx). ``full_fence`` gives it: acquiring a lock is a
``lock``-prefixed instruction, a full barrier on x86.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from pyvirt.memory import GuestMemory
from pyvirt.state import StateError, check_version

__all__ = ["Chain", "QueueBroken", "QueueState", "SplitQueue", "full_fence"]

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
DESC_SIZE = 16
MAX_QUEUE_SIZE = 32768
#: the most descriptors an indirect table may hold (Linux uses at most a few hundred)
MAX_INDIRECT = 4096

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")
#: "<nH" for small n: reading a batch of ring slots without formatting a struct each time
_U16S = [struct.Struct(f"<{n}H") for n in range(65)]
_fence_lock = threading.Lock()


def full_fence() -> None:
    """A full memory barrier (see the module docstring)."""
    _fence_lock.acquire()
    _fence_lock.release()


class QueueBroken(Exception):
    """The driver broke the queue itself: the device needs a reset."""


@dataclass(slots=True)
class Chain:
    """One request: a head index and its buffers as (guest address, length)."""

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)
    #: why the chain is unusable (it must be completed with len 0), or None
    error: str | None = None

    @property
    def readable_len(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)


@dataclass(frozen=True)
class QueueState:
    """One virtqueue: its configuration and the device's side of the ring
    (the indices live in guest RAM too, but these are the device's shadows)."""

    version: int
    size: int
    ready: bool
    msix_vector: int
    desc_addr: int
    avail_addr: int
    used_addr: int
    indirect: bool
    event_idx: bool
    last_avail: int
    used_idx: int
    signalled_used: int
    signalled_valid: bool


class SplitQueue:
    """Configuration (written through the transport) and the ring state."""

    STATE_VERSION: ClassVar[int] = 1
    state_type: ClassVar[type[QueueState]] = QueueState

    def __init__(self, index: int, max_size: int) -> None:
        if not 1 <= max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError("queue size must be a power of two up to 32768")
        self.index = index
        self.max_size = max_size
        self.lock = threading.Lock()  # guards the used ring (several completers)
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.msix_vector = 0xFFFF
        self.mem: GuestMemory | None = None
        self.indirect = False
        self.event_idx = False
        self.last_avail = 0
        self.used_idx = 0
        self._signalled_used = 0
        self._signalled_valid = False

    # ---- set-up

    def activate(self, mem: GuestMemory, *, indirect: bool, event_idx: bool) -> None:
        """Check the driver's ring addresses and start using them."""
        self._check_rings(mem)
        self.mem = mem
        self.indirect = indirect
        self.event_idx = event_idx
        # a freshly enabled queue starts at index 0 on both sides (2.7.6, 2.7.8)
        self.last_avail = self.used_idx = 0
        self._signalled_used, self._signalled_valid = 0, False
        self.ready = True

    def _check_rings(self, mem: GuestMemory) -> None:
        n = self.size
        if not n or n & (n - 1) or n > self.max_size:
            raise QueueBroken(f"queue {self.index}: size {n} is not a power of two "
                              f"up to {self.max_size}")
        areas = (("descriptor table", self.desc_addr, DESC_SIZE * n, 16),
                 ("available ring", self.avail_addr, 6 + 2 * n, 2),
                 ("used ring", self.used_addr, 6 + 8 * n, 4))
        for what, addr, length, align in areas:
            if addr % align:
                raise QueueBroken(f"queue {self.index}: {what} at {addr:#x} is not "
                                  f"{align}-byte aligned")
            if not mem.check_range(addr, length):
                raise QueueBroken(f"queue {self.index}: {what} {addr:#x}+{length:#x} "
                                  "is not in guest RAM")

    # ---- saved state

    def save_state(self) -> QueueState:
        with self.lock:
            return QueueState(self.STATE_VERSION, self.size, self.ready, self.msix_vector,
                              self.desc_addr, self.avail_addr, self.used_addr, self.indirect,
                              self.event_idx, self.last_avail, self.used_idx,
                              self._signalled_used, self._signalled_valid)

    def restore_state(self, state: QueueState, mem: GuestMemory, *, part: str,
                      field: str) -> None:
        """Take ``state`` (checked as hostile data: ``StateError`` naming ``part`` and
        ``field``); a ready queue uses its rings in ``mem`` from now on."""
        self.check_state(state, mem, part=part, field=field)
        with self.lock:
            self.reset()
            self.size = state.size
            self.msix_vector = state.msix_vector
            self.desc_addr, self.avail_addr, self.used_addr = (
                state.desc_addr, state.avail_addr, state.used_addr)
            self.indirect, self.event_idx = state.indirect, state.event_idx
            self.last_avail, self.used_idx = state.last_avail, state.used_idx
            self._signalled_used = state.signalled_used
            self._signalled_valid = state.signalled_valid
            if state.ready:
                self.mem = mem
                self.ready = True

    def check_state(self, state: QueueState, mem: GuestMemory, *, part: str,
                    field: str) -> None:
        """``StateError`` unless ``state`` could be this queue's (changes nothing)."""
        from pyvirt.devices.statecheck import check_bool, check_int

        check_version(f"{part} {field}", state.version, self.STATE_VERSION)
        n = check_int(part, f"{field}.size", state.size, 1, self.max_size)
        if n & (n - 1):
            raise StateError(f"{part}: saved state field {field}.size = {n} is not a power "
                             "of two")
        for name in ("last_avail", "used_idx", "signalled_used", "msix_vector"):
            check_int(part, f"{field}.{name}", getattr(state, name), 0, 0xFFFF)
        for name in ("desc_addr", "avail_addr", "used_addr"):
            check_int(part, f"{field}.{name}", getattr(state, name), 0, (1 << 64) - 1)
        for name in ("ready", "indirect", "event_idx", "signalled_valid"):
            check_bool(part, f"{field}.{name}", getattr(state, name))
        if state.ready:
            probe = SplitQueue(self.index, self.max_size)
            probe.size = n
            probe.desc_addr, probe.avail_addr, probe.used_addr = (
                state.desc_addr, state.avail_addr, state.used_addr)
            try:
                probe._check_rings(mem)
            except QueueBroken as exc:
                raise StateError(f"{part}: saved state field {field}: {exc}") from None

    # ---- the available side

    def _mem(self) -> GuestMemory:
        mem = self.mem
        if mem is None:
            raise QueueBroken(f"queue {self.index} is not enabled")
        return mem

    def avail_idx(self) -> int:
        return self._mem().read_u16(self.avail_addr + 2)

    def has_available(self) -> bool:
        return self.ready and self.avail_idx() != self.last_avail

    def pop(self) -> Chain | None:
        """The next available chain, or None. Raises ``QueueBroken``."""
        got = self.pop_many(1)
        return got[0] if got else None

    def pop_many(self, limit: int) -> list[Chain]:
        """Up to ``limit`` available chains in ring order, as ``pop`` returns them one
        by one: the available index and the ring slots are read once, and a chain of
        one direct descriptor (a receive buffer) skips the chain walk. A bad head
        raises ``QueueBroken`` only when it is the first; otherwise the chains before
        it are returned and the next call raises."""
        mem = self._mem()
        idx = mem.read_u16(self.avail_addr + 2)
        last = self.last_avail
        pending = (idx - last) & 0xFFFF
        if pending == 0 or limit <= 0:
            return []
        size = self.size
        if pending > size:
            raise QueueBroken(f"queue {self.index}: available index {idx} is {pending} "
                              f"ahead of {last} with only {size} entries")
        n = pending if pending < limit else limit
        # the rings were checked to lie in RAM when the queue was enabled
        ring = mem.view(self.avail_addr + 4, 2 * size)
        table = mem.view(self.desc_addr, DESC_SIZE * size)
        slot = last % size
        if slot + n <= size:
            heads = _U16S[n].unpack_from(ring, 2 * slot) if n < len(_U16S) else (
                struct.unpack_from(f"<{n}H", ring, 2 * slot))
        else:
            k = size - slot
            heads = struct.unpack_from(f"<{k}H", ring, 2 * slot) + struct.unpack_from(
                f"<{n - k}H", ring, 0)
        spans: list[tuple[int, int]] | None = None
        unpack = _DESC.unpack_from
        out: list[Chain] = []
        for head in heads:
            if head >= size:
                if out:
                    break  # the next call raises, as pop would
                raise QueueBroken(f"queue {self.index}: head index {head} out of range")
            last = (last + 1) & 0xFFFF
            addr, length, flags, _ = unpack(table, DESC_SIZE * head)
            if flags & (DESC_F_NEXT | DESC_F_INDIRECT):
                chain = Chain(head)
                chain.error = self._walk(mem, chain)
                if chain.error is not None:
                    chain.readable.clear()
                    chain.writable.clear()
                out.append(chain)
                continue
            # one direct descriptor: the walk's checks, inline
            if not length:
                out.append(Chain(head))
                continue
            if spans is None:
                spans = [(r.guest_addr, r.end) for r in mem.regions]
            end = addr + length
            for lo, hi in spans:
                if lo <= addr and end <= hi:
                    break
            else:
                out.append(Chain(head, [], [],
                                 f"buffer {addr:#x}+{length:#x} is outside guest RAM"))
                continue
            if flags & DESC_F_WRITE:
                out.append(Chain(head, [], [(addr, length)]))
            else:
                out.append(Chain(head, [(addr, length)], []))
        self.last_avail = last
        return out

    def _walk(self, mem: GuestMemory, chain: Chain) -> str | None:
        # one memoryview over the table (no copy); RAM bounds as plain tuples:
        # this loop runs once per descriptor, up to hundreds per request
        spans = [(r.guest_addr, r.end) for r in mem.regions]
        count, i = self.size, chain.head
        table = mem.view(self.desc_addr, DESC_SIZE * count)
        unpack = _DESC.unpack_from
        readable, writable = chain.readable, chain.writable
        indirect_seen = False
        seen = 0
        while True:
            seen += 1
            if seen > count:
                return "descriptor chain longer than its table (a loop?)"
            addr, length, flags, nxt = unpack(table, DESC_SIZE * i)
            if flags & DESC_F_INDIRECT:
                if not self.indirect:
                    return "indirect descriptor without VIRTIO_F_INDIRECT_DESC"
                if indirect_seen:
                    return "nested indirect descriptor table"
                if flags & DESC_F_NEXT:
                    return "indirect descriptor with the NEXT flag"
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_INDIRECT:
                    return f"indirect table length {length} is invalid"
                if not mem.check_range(addr, length):
                    return f"indirect table {addr:#x}+{length:#x} is outside guest RAM"
                indirect_seen = True
                table, count, i, seen = mem.view(addr, length), length // DESC_SIZE, 0, 0
                continue
            if length:
                end = addr + length
                for lo, hi in spans:
                    if lo <= addr and end <= hi:
                        break
                else:
                    return f"buffer {addr:#x}+{length:#x} is outside guest RAM"
                if flags & DESC_F_WRITE:
                    writable.append((addr, length))
                elif writable:
                    return "device-readable buffer after a device-writable one"
                else:
                    readable.append((addr, length))
            if not flags & DESC_F_NEXT:
                return None
            if nxt >= count:
                return f"next index {nxt} out of range"
            i = nxt

    # ---- the used side

    def push(self, head: int, written: int) -> None:
        """Return chain ``head`` with ``written`` bytes written (call with ``lock``)."""
        mem = self._mem()
        slot = self.used_idx % self.size
        mem.view(self.used_addr + 4 + 8 * slot, 8)[:] = _USED_ELEM.pack(head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        mem.write_u16(self.used_addr + 2, self.used_idx)  # x86: ordered after the element

    def push_many(self, done: Sequence[tuple[int, int]]) -> None:
        """``push`` each (head, written) of ``done``, with one store of the used index
        after all the elements (call with ``lock``)."""
        if not done:
            return
        mem = self._mem()
        size = self.size
        ring = mem.view(self.used_addr + 4, 8 * size)  # checked when enabled
        pack = _USED_ELEM.pack_into
        idx = self.used_idx
        for head, written in done:
            pack(ring, 8 * (idx % size), head, written)
            idx = (idx + 1) & 0xFFFF
        self.used_idx = idx
        mem.write_u16(self.used_addr + 2, idx)  # x86: ordered after the elements

    def needs_interrupt(self) -> bool:
        """After ``push``es: should the driver be interrupted? (call with ``lock``)"""
        mem = self._mem()
        full_fence()
        new = self.used_idx
        if not self.event_idx:
            return not mem.read_u16(self.avail_addr) & AVAIL_F_NO_INTERRUPT
        old = self._signalled_used
        valid = self._signalled_valid
        self._signalled_used = new
        self._signalled_valid = True
        if not valid:
            return True
        used_event = mem.read_u16(self.avail_addr + 4 + 2 * self.size)
        # 2.7.10: vring_need_event(event, new, old)
        return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)

    def enable_notifications(self) -> bool:
        """Ask for a notification on the next buffer; True if one is already there."""
        mem = self._mem()
        if self.event_idx:
            mem.write_u16(self.used_addr + 4 + 8 * self.size, self.last_avail)
        else:
            mem.write_u16(self.used_addr, 0)
        full_fence()
        return self.avail_idx() != self.last_avail
