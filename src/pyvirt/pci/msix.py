"""MSI-X (PCI Local Bus 3.0, 6.8.2): the capability, the vector table and the PBA.

The table and the pending-bit array live in a BAR; this class serves reads
and writes at offsets the owning device forwards. ``notify(vector)`` is what
a device's worker thread calls to interrupt the guest: masked vectors (the
entry's mask bit or the function mask) set their pending bit instead, and an
unmask sends what is pending, as 6.8.2.9 requires.

A route (``MsiRoute``, from the hypervisor) is created per vector when the
table is set up; a changed address/data is pushed to it lazily, on the next
send, so programming the table costs no hypervisor call.

Saved state (``MsixState``): the table, the PBA, the enable and function mask
bits. Restoring programs the route of every vector whose entry is unmasked at
once (``MsiRoute.update``), as a guest write followed by a send would; masked
ones stay lazy. The owning device restores its configuration space (where the
capability's Message Control lives) with ``PciDevice.restore_pci_state``.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from pyvirt.devices.irq import MsiRoute
from pyvirt.devices.statecheck import check_bool, check_bytes, check_int
from pyvirt.state import StateError, check_version

__all__ = ["MSIX_CAP_ID", "NO_VECTOR", "MsixState", "MsixTable"]

MSIX_CAP_ID = 0x11
NO_VECTOR = 0xFFFF  # virtio's VIRTIO_MSI_NO_VECTOR
ENTRY_SIZE = 16
CTRL_ENABLE = 1 << 15
CTRL_FUNCTION_MASK = 1 << 14
VECTOR_MASKED = 1


@dataclass(frozen=True)
class MsixState:
    version: int
    num_vectors: int
    table: bytes  # num_vectors entries of 16 bytes: address lo/hi, data, vector control
    pba: bytes  # pending bits, bit v = vector v, as the guest reads the PBA
    enabled: bool
    function_masked: bool


class MsixTable:
    STATE_VERSION: ClassVar[int] = 1
    state_type: ClassVar[type] = MsixState

    def __init__(self, num_vectors: int, route_factory: Callable[[], MsiRoute]) -> None:
        if not 1 <= num_vectors <= 2048:
            raise ValueError("MSI-X supports 1-2048 vectors")
        self.num_vectors = num_vectors
        self.table = bytearray(num_vectors * ENTRY_SIZE)
        for i in range(num_vectors):  # entries start masked (6.8.2.9)
            self.table[i * ENTRY_SIZE + 12] = VECTOR_MASKED
        self.pending = [False] * num_vectors
        self._dirty = [True] * num_vectors
        self._routes: list[MsiRoute | None] = [None] * num_vectors
        self._route_factory = route_factory
        self.enabled = False
        self.function_masked = False
        self._lock = threading.Lock()
        self.sent = 0

    @property
    def table_size(self) -> int:
        return self.num_vectors * ENTRY_SIZE

    @property
    def pba_size(self) -> int:
        return ((self.num_vectors + 63) // 64) * 8

    def capability_body(self, table_bar: int, table_offset: int, pba_bar: int,
                        pba_offset: int) -> tuple[bytes, bytes]:
        """(body, wmask) for ``PciDevice.add_capability(MSIX_CAP_ID, ...)``."""
        body = struct.pack("<HII", self.num_vectors - 1, table_offset | table_bar,
                           pba_offset | pba_bar)
        wmask = struct.pack("<HII", CTRL_ENABLE | CTRL_FUNCTION_MASK, 0, 0)
        return body, wmask

    def control_written(self, control: int) -> None:
        """The guest wrote Message Control (the device forwards the new value)."""
        with self._lock:
            self.enabled = bool(control & CTRL_ENABLE)
            self.function_masked = bool(control & CTRL_FUNCTION_MASK)
            todo = self._unmasked_pending_locked()
        for v in todo:
            self._send(v)

    # ---- the table and PBA as the guest sees them

    def table_read(self, offset: int, data: memoryview) -> None:
        n = len(data)
        if n not in (4, 8) or offset % n or offset + n > self.table_size:
            data[:] = b"\xff" * n  # 6.8.2: only aligned dword/qword accesses are defined
            return
        with self._lock:
            data[:] = self.table[offset:offset + n]

    def table_write(self, offset: int, data: memoryview) -> None:
        n = len(data)
        if n not in (4, 8) or offset % n or offset + n > self.table_size:
            return
        vector = offset // ENTRY_SIZE
        with self._lock:
            self.table[offset:offset + n] = data
            self._dirty[vector] = True
            todo = self._unmasked_pending_locked()
        for v in todo:
            self._send(v)

    def pba_read(self, offset: int, data: memoryview) -> None:
        n = len(data)
        if n not in (4, 8) or offset % n or offset + n > self.pba_size:
            data[:] = b"\xff" * n
            return
        with self._lock:
            bits = self._pba_bits()
        data[:] = ((bits >> (8 * offset)) & ((1 << (8 * n)) - 1)).to_bytes(n, "little")

    def _pba_bits(self) -> int:
        bits = 0
        for i, p in enumerate(self.pending):
            if p:
                bits |= 1 << i
        return bits

    # ---- saved state (the VM is paused)

    def save_state(self) -> MsixState:
        with self._lock:
            return MsixState(version=self.STATE_VERSION, num_vectors=self.num_vectors,
                             table=bytes(self.table),
                             pba=self._pba_bits().to_bytes(self.pba_size, "little"),
                             enabled=self.enabled, function_masked=self.function_masked)

    def check_state(self, state: MsixState) -> None:
        """Validate ``state`` without changing anything (``restore_state`` checks too)."""
        self._checked(state)

    def restore_state(self, state: MsixState) -> None:
        table, pending, unmasked = self._checked(state)
        with self._lock:
            self.table[:] = table
            self.pending = pending
            self.enabled, self.function_masked = state.enabled, state.function_masked
            self._dirty = [True] * self.num_vectors
            for v in unmasked:
                route = self._routes[v]
                if route is None:
                    route = self._routes[v] = self._route_factory()
                addr_lo, addr_hi, data, _ = struct.unpack_from("<IIII", table, v * ENTRY_SIZE)
                route.update(addr_lo | (addr_hi << 32), data)
                self._dirty[v] = False

    def _checked(self, state: MsixState) -> tuple[bytes, list[bool], list[int]]:
        """(table, pending bits, unmasked vectors) of a valid record."""
        part = "msix"
        check_version(part, state.version, self.STATE_VERSION)
        check_int(part, "num_vectors", state.num_vectors, self.num_vectors, self.num_vectors)
        table = check_bytes(part, "table", state.table, length=self.table_size)
        pba = int.from_bytes(check_bytes(part, "pba", state.pba, length=self.pba_size),
                             "little")
        if pba >> self.num_vectors:
            raise StateError(f"{part}: saved state field pba has bits beyond vector "
                             f"{self.num_vectors - 1}")
        enabled = check_bool(part, "enabled", state.enabled)
        function_masked = check_bool(part, "function_masked", state.function_masked)
        pending = [bool(pba >> v & 1) for v in range(self.num_vectors)]
        unmasked = [v for v in range(self.num_vectors)
                    if not table[v * ENTRY_SIZE + 12] & VECTOR_MASKED]
        if enabled and not function_masked:
            for v in unmasked:
                if pending[v]:  # an unmask sends what is pending: never saved like this
                    raise StateError(f"{part}: saved state field pba has vector {v} "
                                     "pending while it is unmasked")
        return table, pending, unmasked

    # ---- sending

    def masked(self, vector: int) -> bool:
        return self.function_masked or bool(
            self.table[vector * ENTRY_SIZE + 12] & VECTOR_MASKED)

    def notify(self, vector: int) -> bool:
        """Interrupt the guest through ``vector``; False when MSI-X is off or
        the vector is out of range (the caller may fall back to INTx)."""
        if not self.enabled or not 0 <= vector < self.num_vectors:
            return False
        with self._lock:
            if self.masked(vector):
                self.pending[vector] = True
                return True
        self._send(vector)
        return True

    def _unmasked_pending_locked(self) -> list[int]:
        if not self.enabled:
            return []
        todo = [v for v in range(self.num_vectors) if self.pending[v] and not self.masked(v)]
        for v in todo:
            self.pending[v] = False
        return todo

    def _send(self, vector: int) -> None:
        with self._lock:
            route = self._routes[vector]
            if route is None:
                route = self._routes[vector] = self._route_factory()
            if self._dirty[vector]:
                self._dirty[vector] = False
                base = vector * ENTRY_SIZE
                addr_lo, addr_hi, data, _ = struct.unpack_from("<IIII", self.table, base)
                route.update(addr_lo | (addr_hi << 32), data)
            self.sent += 1
        route.trigger()

    def reset(self) -> None:
        with self._lock:
            for i in range(self.num_vectors):
                self.table[i * ENTRY_SIZE:(i + 1) * ENTRY_SIZE] = bytes(ENTRY_SIZE)
                self.table[i * ENTRY_SIZE + 12] = VECTOR_MASKED
                self.pending[i] = False
                self._dirty[i] = True
            self.enabled = False
            self.function_masked = False

    def close(self) -> None:
        with self._lock:
            routes, self._routes = self._routes, [None] * self.num_vectors
        for r in routes:
            if r is not None:
                r.close()
