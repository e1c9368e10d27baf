"""virtio-blk (virtio 1.2, 5.2) over a disk backend (``pyvirt.disk``).

The device holds a ``DiskBackend`` (raw file or block device, qcow2 with its
backing chain) and never touches a file itself: reads, writes, flushes,
discards and write-zeroes go through the backend, which the VM's resources
open (``open_disk``: format, locks, O_DIRECT) and close.

Requests run on a pool of worker threads (started on demand, up to 32 per
disk, ending after 10 s idle) so that several are in flight; the backends
move data straight between the image and views of guest RAM, releasing the
GIL in their system calls. Both cache modes present a write-back cache to the
guest, whose FLUSH becomes ``disk.flush()``. A lone small read may be served on
the event loop thread when the page cache holds it (``read_cached``).

Everything in a request is checked: a header shorter than 16 bytes, no room
for the status byte, data not a whole number of sectors, a range beyond the
capacity, a write to a read-only disk, too many discard segments — each fails
that request (``VIRTIO_BLK_S_IOERR``/``UNSUPP``); host I/O errors become
``IOERR``, are logged, and never stop the VM; so does damage a backend finds
in its image metadata (``CorruptImage``, logged once).
"""

from __future__ import annotations

import logging
import queue
import struct
import threading
from dataclasses import dataclass
from typing import Any, ClassVar

from pyvirt.devices.guestlog import guest_faults
from pyvirt.disk.backend import CorruptImage, DiskBackend
from pyvirt.memory import GuestMemory
from pyvirt.state import StateError
from pyvirt.virtio import DEVICE_ID_BLOCK
from pyvirt.virtio.device import Transport, VirtioDevice
from pyvirt.virtio.queue import Chain, SplitQueue

__all__ = ["BlockDevice", "BlockState"]

log = logging.getLogger(__name__)

SECTOR = 512
QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2  # data segments per request: header and status take two
MAX_DISCARD_SECTORS = 0xFFFF_FFFF
MAX_DISCARD_SEG = 32
#: the most worker threads per disk: one per request at the queue depth Linux
#: uses by default (QEMU's thread pool allows 64). Started on demand, and a
#: worker idle for WORKER_IDLE_S seconds ends (as in QEMU's pool).
WORKERS = 32
WORKER_IDLE_S = 10.0
#: the largest read the event loop thread serves itself from the page cache
#: (see BlockDevice.process)
INLINE_MAX = 64 * 1024

# feature bits (5.2.3)
F_SEG_MAX = 2
F_RO = 5
F_BLK_SIZE = 6
F_FLUSH = 9
F_TOPOLOGY = 10
F_CONFIG_WCE = 11
F_DISCARD = 13
F_WRITE_ZEROES = 14

# request types and status (5.2.6)
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
ID_BYTES = 20

_HEADER = struct.Struct("<IIQ")
_SEGMENT = struct.Struct("<QII")


@dataclass
class _Request:
    queue: SplitQueue
    chain: Chain
    type: int = 0
    sector: int = 0
    status_addr: int = 0
    data: list[tuple[int, int]] | None = None  # (gpa, len) of the payload
    length: int = 0  # bytes of payload (sum of data), computed once in _parse


@dataclass(frozen=True)
class BlockState:
    """virtio-blk: nothing in flight (I/O is paused before a save); the disk's
    size, which a restore requires unchanged (the guest knows its capacity),
    and the cache mode the driver chose."""

    version: int
    disk_size: int
    writeback: int


class BlockDevice(VirtioDevice):
    device_id = DEVICE_ID_BLOCK
    STATE_VERSION: ClassVar[int] = 1
    state_type: ClassVar[type[BlockState]] = BlockState
    name = "virtio-blk"
    pci_class = 0x010000  # mass storage, SCSI (as QEMU presents virtio-blk)

    def __init__(self, disk: DiskBackend, *, serial: str | None = None, discard: bool = False,
                 name: str = "virtio-blk", workers: int = WORKERS) -> None:
        super().__init__([QUEUE_SIZE])
        self.disk = disk  # the VM's (its resources close it): it outlives guest reboots
        self.name = name
        self.serial = (serial or "").encode("ascii")[:ID_BYTES]
        self.discard = discard and not disk.readonly
        self.features = (1 << F_SEG_MAX | 1 << F_BLK_SIZE | 1 << F_FLUSH | 1 << F_TOPOLOGY
                         | 1 << F_CONFIG_WCE)
        if disk.readonly:
            self.features |= 1 << F_RO
        else:
            self.features |= 1 << F_WRITE_ZEROES
        if self.discard:
            self.features |= 1 << F_DISCARD
        self.writeback = 1
        self.mem: GuestMemory | None = None
        self._jobs: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._idle = threading.Condition()
        self._in_flight = 0
        self._starved = False  # process() stopped for lack of room (guarded by _idle)
        #: the largest lone read served on the loop thread itself (0: none, see process)
        self.inline_max = INLINE_MAX
        self._max_workers = max(1, workers)
        self._pool_lock = threading.Lock()
        self._threads: list[threading.Thread] = []  # guarded by _pool_lock
        self._waiting = 0  # workers blocked on _jobs (guarded by _pool_lock)
        self._closing = False
        self._worker_seq = 0
        self._bounce = threading.local()
        self.errors = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self._logged: set[str] = set()
        self._corrupt_logged = False
        #: completed requests by type, for tests and statistics
        self.stats: dict[str, int] = {"read": 0, "write": 0, "flush": 0, "other": 0, "failed": 0}

    # ---- configuration space (5.2.4)

    def config_space(self) -> bytes:
        capacity = self.disk.size // SECTOR
        return struct.pack(
            "<QIIHBBIBBHIBBHIIIIIB3x",
            capacity, 0, SEG_MAX,
            0, 0, 0,                          # geometry: not offered
            SECTOR,                           # blk_size
            0, 0, 1, 0,                       # topology: exp, offset, min_io (sectors), opt_io
            self.writeback, 0, 1,             # writeback, unused0, num_queues
            MAX_DISCARD_SECTORS if self.discard else 0,
            MAX_DISCARD_SEG if self.discard else 0,
            self._discard_alignment(),        # discard_sector_alignment (sectors)
            MAX_DISCARD_SECTORS if not self.disk.readonly else 0,
            MAX_DISCARD_SEG if not self.disk.readonly else 0,
            1 if self.discard else 0)         # write_zeroes_may_unmap

    def _discard_alignment(self) -> int:
        if not self.discard:
            return 0
        # the backend's granularity (a qcow2 cluster): smaller discards may do nothing
        return max(1, min(self.disk.discard_granularity // SECTOR, 0xFFFF_FFFF))

    def write_config(self, offset: int, data: bytes) -> None:
        if offset == 32 and len(data) == 1 and self.driver_features >> F_CONFIG_WCE & 1:
            # writethrough (0) or writeback (1): we flush after every write in writethrough
            self.writeback = 1 if data[0] else 0

    # ---- life cycle

    def activate(self, transport: Transport, queues: Any, driver_features: int) -> None:
        super().activate(transport, queues, driver_features)
        self.mem = transport.memory

    def quiesce(self, timeout: float = 30.0) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout=timeout)

    def reset(self) -> None:
        super().reset()
        self.writeback = 1
        with self._idle:
            self._starved = False

    # ---- saved state and metrics

    def save_state(self) -> BlockState:
        with self._idle:
            busy = self._in_flight
        if busy:  # pause_io drains them; a host I/O stall can outlast its wait
            raise StateError(f"{self.name}: {busy} requests still in flight; the state "
                             "cannot be saved (host I/O stalled?)")
        try:  # the saved state promises the guest its completed writes
            self.disk.flush()
        except OSError as exc:
            raise StateError(f"{self.name}: flushing {self.disk.path} failed: "
                             f"{exc.strerror or exc}") from None
        return BlockState(self.STATE_VERSION, self.disk.size, self.writeback)

    def check_state(self, state: BlockState) -> None:
        from pyvirt.devices.statecheck import check_int

        super().check_state(state)
        check_int(self.name, "disk_size", state.disk_size, 0, (1 << 63) - 1)
        check_int(self.name, "writeback", state.writeback, 0, 1)
        if state.disk_size != self.disk.size:
            raise StateError(f"{self.name}: size changed: {self.disk.path} has "
                             f"{self.disk.size} bytes, the saved state {state.disk_size}")

    def restore_state(self, state: BlockState) -> None:
        self.check_state(state)
        self.writeback = state.writeback

    def metrics(self) -> dict[str, int]:
        return {"bytes_read": self.bytes_read, "bytes_written": self.bytes_written,
                "errors": self.errors}

    def close(self) -> None:
        self.quiesce()
        with self._pool_lock:
            self._closing = True
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(None)
        for t in threads:
            if t.is_alive():
                t.join(5)
        # the disk is not ours to close: it belongs to the VM and outlives this device

    # ---- the event loop thread: parse, then hand over to a worker

    def process(self, q: SplitQueue) -> None:
        transport = self.transport
        mem = self.mem
        if transport is None or mem is None:
            return
        while True:
            batch: list[_Request] = []
            # At most a ring's worth of requests in flight: a driver cannot have
            # more, and a hostile one re-posting busy heads must not grow the
            # job queue (and the worker pool's backlog) without bound.
            # The loop thread must not wait for room: it stops taking chains, and
            # the request that makes room asks for this queue's work again.
            with self._idle:
                room = q.size - self._in_flight
                if room <= 0:
                    self._starved = True
                    return
            while len(batch) < room and (chain := q.pop()) is not None:
                req = self._parse(mem, q, chain)
                if req is not None:
                    batch.append(req)
            if batch:
                with self._idle:
                    busy = self._in_flight
                    self._in_flight += len(batch)
                # A lone small read with nothing else in flight (queue depth 1) is
                # served here when the page cache holds it (RWF_NOWAIT: the loop,
                # shared by every device and the console, never waits for a disk);
                # that spares a thread hand-off (~1.4x the IOPS at depth 1).
                # Anything else goes to the workers, so this thread is back on the
                # ring at once and the host sees the whole queue depth.
                if not (len(batch) == 1 and not busy and self._run_cached(batch[0])):
                    for req in batch:
                        self._jobs.put(req)
                    self._grow_pool()
                continue
            if not q.enable_notifications():
                return

    def _fail_early(self, q: SplitQueue, chain: Chain, why: str, status_addr: int | None,
                    status: int = S_IOERR) -> None:
        self._note(why)
        self.stats["failed"] += 1
        assert self.transport is not None and self.mem is not None
        if status_addr is not None:
            self.mem.write_u8(status_addr, status)
            self.transport.note_dma_write(status_addr, 1)
        self.transport.complete(q, [(chain.head, 1 if status_addr is not None else 0)])

    def _parse(self, mem: GuestMemory, q: SplitQueue, chain: Chain) -> _Request | None:
        if chain.error is not None:
            self._fail_early(q, chain, f"bad descriptor chain: {chain.error}", None)
            return None
        if not chain.writable:
            self._fail_early(q, chain, "request without a writable status byte", None)
            return None
        last_addr, last_len = chain.writable[-1]
        status_addr = last_addr + last_len - 1
        writable = list(chain.writable)
        writable[-1] = (last_addr, last_len - 1)
        writable = [(a, n) for a, n in writable if n]
        if chain.readable_len < _HEADER.size:
            self._fail_early(q, chain, f"request header of {chain.readable_len} bytes "
                             f"(needs {_HEADER.size})", status_addr)
            return None
        header = bytearray()
        for a, n in chain.readable:  # the header may span buffers; copy just 16 bytes
            header += mem.view(a, min(n, _HEADER.size - len(header)))
            if len(header) == _HEADER.size:
                break
        rtype, _, sector = _HEADER.unpack_from(header)
        req = _Request(q, chain, rtype, sector, status_addr)
        if rtype in (T_IN, T_GET_ID):
            if chain.readable_len != _HEADER.size:
                self._fail_early(q, chain, "read request with data to the device", status_addr)
                return None
            req.data = writable
        else:
            if writable:
                self._fail_early(q, chain, f"request type {rtype} with device-writable data",
                                 status_addr)
                return None
            req.data = _skip(chain.readable, _HEADER.size)
        req.length = sum(n for _, n in req.data)
        return req

    # ---- workers

    def _grow_pool(self) -> None:
        """Start workers while requests wait and every worker is busy."""
        with self._pool_lock:
            backlog = self._jobs.qsize() - self._waiting
            while (backlog > 0 and len(self._threads) < self._max_workers
                   and not self._closing):
                self._worker_seq += 1
                t = threading.Thread(target=self._worker, daemon=True,
                                     name=f"{self.name}-w{self._worker_seq}")
                self._threads.append(t)
                self._waiting += 1  # counted as free from the start
                t.start()
                backlog -= 1

    def _worker(self) -> None:
        me = threading.current_thread()
        while True:
            try:
                req = self._jobs.get(timeout=WORKER_IDLE_S)
            except queue.Empty:
                with self._pool_lock:
                    if self._jobs.qsize() == 0 and not self._closing:
                        self._waiting -= 1
                        self._threads.remove(me)
                        return
                continue
            with self._pool_lock:
                self._waiting -= 1
            if req is None:
                return
            try:
                self._run_one(req)
            finally:
                with self._pool_lock:
                    self._waiting += 1

    def _run_cached(self, req: _Request) -> bool:
        """Serve a small, valid read from the page cache without blocking; False
        (nothing completed) when it is not all cached or not such a read."""
        disk, length = self.disk, req.length
        offset = req.sector * SECTOR
        if (req.type != T_IN or disk.direct or not 0 < length <= self.inline_max
                or length % SECTOR or req.sector >= 1 << 55 or offset + length > disk.size
                or self.mem is None or self.transport is None):
            return False
        assert req.data is not None
        try:
            views = [self.mem.view(a, n) for a, n in req.data]
            if not disk.read_cached(views, offset):
                return False  # not all cached: a worker reads it all again
        except Exception:  # a failure here is the worker's to report
            return False
        for a, n in req.data:
            self.transport.note_dma_write(a, n)
        self.stats["read"] += 1
        self.bytes_read += length
        self._run_one(req, (S_OK, length))
        return True

    def _run_one(self, req: _Request, result: tuple[int, int] | None = None) -> None:
        try:
            status, written = self._execute(req) if result is None else result
        except Exception as exc:  # a bug here must fail the request, not the VM
            log.exception("%s: request failed", self.name)
            self._note(f"internal error: {exc}", host=True)
            status, written = S_IOERR, 0
        try:
            self._finish(req, status, written)
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()  # quiesce() waits for 0
                wake = self._starved and self._in_flight < req.queue.size
                if wake:
                    self._starved = False
            if wake and self.transport is not None:
                self.transport.requeue(req.queue)  # room again: take more chains

    def _finish(self, req: _Request, status: int, written: int) -> None:
        transport, mem = self.transport, self.mem
        if transport is None or mem is None:
            return  # the device was reset while this ran
        if status != S_OK:
            self.stats["failed"] += 1
        mem.write_u8(req.status_addr, status)
        transport.note_dma_write(req.status_addr, 1)
        transport.complete(req.queue, [(req.chain.head, written + 1)])

    def _execute(self, req: _Request) -> tuple[int, int]:
        assert req.data is not None
        length = req.length
        disk = self.disk
        if req.type in (T_IN, T_OUT):
            if length % SECTOR:
                self._note(f"data length {length} is not a multiple of 512")
                return S_IOERR, 0
            offset = req.sector * SECTOR
            if req.sector >= 1 << 55 or offset + length > disk.size:
                self._note(f"sectors {req.sector}+{length // SECTOR} beyond the capacity")
                return S_IOERR, 0
            if req.type == T_OUT and disk.readonly:
                self._note("write to a read-only disk")
                return S_IOERR, 0
            try:
                if req.type == T_IN:
                    self._rw(req.data, offset, write=False)
                    self.stats["read"] += 1
                    self.bytes_read += length
                    return S_OK, length
                self._rw(req.data, offset, write=True)
                if not self.writeback:
                    disk.flush()
                self.stats["write"] += 1
                self.bytes_written += length
                return S_OK, 0
            except OSError as exc:
                self._host_error(f"host I/O error at byte {offset}", exc)
                return S_IOERR, 0
        if req.type == T_FLUSH:
            try:
                disk.flush()
            except OSError as exc:
                self._host_error("flush failed", exc)
                return S_IOERR, 0
            self.stats["flush"] += 1
            return S_OK, 0
        if req.type == T_GET_ID:
            ident = self.serial.ljust(ID_BYTES, b"\0")
            done = self._copy_out(req.data, ident)
            self.stats["other"] += 1
            return S_OK, done
        if req.type in (T_DISCARD, T_WRITE_ZEROES):
            return self._discard(req, length)
        self.stats["other"] += 1
        return S_UNSUPP, 0

    def _discard(self, req: _Request, length: int) -> tuple[int, int]:
        assert req.data is not None and self.mem is not None
        allowed = self.discard if req.type == T_DISCARD else not self.disk.readonly
        if not allowed:
            return S_UNSUPP, 0
        if length == 0 or length % _SEGMENT.size or length // _SEGMENT.size > MAX_DISCARD_SEG:
            self._note(f"discard/write-zeroes payload of {length} bytes")
            return S_IOERR, 0
        payload = b"".join(bytes(self.mem.view(a, n)) for a, n in req.data)
        segs = [_SEGMENT.unpack_from(payload, i) for i in range(0, length, _SEGMENT.size)]
        for sector, count, flags in segs:  # check them all before changing anything
            if flags & ~1 or (req.type == T_DISCARD and flags):
                return S_UNSUPP, 0
            if sector >= 1 << 55 or (sector + count) * SECTOR > self.disk.size:
                self._note("discard/write-zeroes beyond the capacity")
                return S_IOERR, 0
        for sector, count, flags in segs:
            start, size = sector * SECTOR, count * SECTOR
            if not size:
                continue
            try:
                if req.type == T_DISCARD:
                    self.disk.discard(start, size)
                else:
                    self.disk.write_zeroes(start, size, unmap=bool(flags & 1))
            except OSError as exc:
                self._host_error("discard/write-zeroes failed", exc)
                return S_IOERR, 0
        self.stats["other"] += 1
        return S_OK, 0

    # ---- data movement

    def _rw(self, segs: list[tuple[int, int]], offset: int, *, write: bool) -> None:
        assert self.mem is not None and self.transport is not None
        views = [self.mem.view(a, n) for a, n in segs]
        if write:
            self.disk.writev(views, offset)
            return
        self.disk.readv(views, offset)
        for a, n in segs:
            self.transport.note_dma_write(a, n)

    def _copy_out(self, segs: list[tuple[int, int]], data: bytes) -> int:
        assert self.mem is not None and self.transport is not None
        done = 0
        for a, n in segs:
            k = min(n, len(data) - done)
            if k <= 0:
                break
            self.mem.view(a, k)[:] = data[done:done + k]
            self.transport.note_dma_write(a, k)
            done += k
        return done

    def _host_error(self, what: str, exc: OSError) -> None:
        """A failed host operation; a damaged image is said once (each request
        on it would say it again)."""
        if isinstance(exc, CorruptImage):
            self.errors += 1
            if not self._corrupt_logged:
                self._corrupt_logged = True
                log.error("%s (%s): %s: %s; requests touching the damage fail", self.name,
                          self.disk.path, what, exc.strerror)
            return
        self._note(f"{what}: {exc.strerror or exc}", host=True)

    def _note(self, why: str, *, host: bool = False) -> None:
        """Count a failed request and say why: the host's own failures (I/O
        errors, bugs) once per distinct message, up to 100; the guest's
        mistakes within the device's budget of warnings (``guest_faults``),
        since a hostile driver can make endless distinct ones."""
        self.errors += 1
        if not host:
            guest_faults.warning(log, self.name, "%s (%s): %s", self.name, self.disk.path, why)
        elif why not in self._logged and len(self._logged) < 100:
            self._logged.add(why)
            log.warning("%s (%s): %s", self.name, self.disk.path, why)


def _skip(segs: list[tuple[int, int]], nbytes: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, n in segs:
        if nbytes >= n:
            nbytes -= n
            continue
        out.append((a + nbytes, n - nbytes))
        nbytes = 0
    return out
