"""The virtio-over-PCI transport, modern interface only (virtio 1.2, 4.1).

One 64-bit prefetchable memory BAR (BAR0, 32 KiB) holds every structure::

    0x0000  common configuration (4.1.4.3)
    0x1000  ISR status (4.1.4.5)
    0x2000  device-specific configuration (4.1.4.6)
    0x3000  notifications: queue i at 0x3000 + 4 * i (multiplier 4, 4.1.4.4)
    0x4000  MSI-X table, 0x5000 MSI-X PBA

Capabilities point at them, plus a VIRTIO_PCI_CAP_PCI_CFG window (4.1.4.9).
PCI IDs: vendor 0x1AF4, device 0x1040 + the device ID, revision 1.

Notifications: each queue has an eventfd. Under KVM it is registered as an
ioeventfd on the queue's notify address, so a driver's kick never leaves the
kernel; otherwise the MMIO write arrives here and we signal the eventfd.
Either way the VMM's event loop runs the queue's work: the eventfds are
registered on the shared loop at DRIVER_OK and removed at reset (and while
I/O is paused, ``pause_io``). Interrupts: the queue's MSI-X vector when
MSI-X is on, else INTx (ISR bit 0 and the level-triggered line).

Saved state (``save_state``/``restore_state``, with vCPUs parked and I/O
paused): the PCI function (config space, BARs, MSI-X table), the transport's
registers, each queue's configuration and ring indices, and the device type's
own record. Restoring a record into a device that ran (a reset in place)
first stops whatever the device was doing.
"""

from __future__ import annotations

import logging
import os
import select
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from pyvirt.devices.guestlog import guest_faults
from pyvirt.devices.irq import IrqLine
from pyvirt.hypervisor.base import Vm
from pyvirt.memory import GuestMemory
from pyvirt.pci.device import (
    CMD_INTX_DISABLE,
    STATUS,
    STATUS_INTERRUPT,
    Bar,
    BarKind,
    PciDevice,
    PciState,
)
from pyvirt.pci.msix import MSIX_CAP_ID, NO_VECTOR, MsixState, MsixTable
from pyvirt.state import StateError, check_version
from pyvirt.virtio import (
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_VERSION_1,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
)
from pyvirt.virtio.device import FdWatch, QueueWorker, VirtioDevice
from pyvirt.virtio.queue import QueueBroken, QueueState, SplitQueue

if TYPE_CHECKING:
    from pyvirt.eventloop import EventLoop

__all__ = ["VirtioPciDevice", "VirtioPciState"]

log = logging.getLogger(__name__)

VIRTIO_VENDOR = 0x1AF4
VIRTIO_SUBSYSTEM_ID = 0x1100
VENDOR_CAP_ID = 0x09
CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE, CAP_PCI_CFG = 1, 2, 3, 4, 5

BAR_INDEX = 0
BAR_SIZE = 0x8000
COMMON_OFF, COMMON_LEN = 0x0000, 0x3C
ISR_OFF = 0x1000
DEVICE_OFF, DEVICE_LEN = 0x2000, 0x1000
NOTIFY_OFF, NOTIFY_MULT = 0x3000, 4
MSIX_TABLE_OFF = 0x4000
MSIX_PBA_OFF = 0x5000

# common configuration: (name, offset, size) in layout order
_COMMON = struct.Struct("<IIIIHHBBHHHHHQQQHH")
_FIELDS = ("dfselect", "dfeature", "gfselect", "gfeature", "config_msix", "num_queues",
           "status", "generation", "qselect", "qsize", "qmsix", "qenable", "qnotify_off",
           "qdesc", "qdriver", "qdevice", "qnotify_data", "qreset")
_FIELD_SPANS: list[tuple[str, int, int]] = []
_o = 0
for _name, _fmt in zip(_FIELDS, "IIIIHHBBHHHHHQQQHH", strict=True):
    _n = struct.calcsize("<" + _fmt)
    _FIELD_SPANS.append((_name, _o, _n))
    _o += _n
assert _o == COMMON_LEN


#: how long ``pause_io`` waits for requests in flight on the host
PAUSE_DRAIN_S = 10.0


@dataclass(frozen=True)
class VirtioPciState:
    """One virtio-pci function: PCI config space (BARs included) and MSI-X, the
    transport's registers, its queues and the device type's own record (encoded:
    each type has its own record class)."""

    version: int
    pci: PciState
    msix: MsixState
    status: int
    dfselect: int
    gfselect: int
    driver_features: int
    config_msix: int
    qselect: int
    generation: int
    isr: int
    intx_level: bool
    #: the queue work stopped because the driver broke a queue (until a reset)
    io_broken: bool
    queues: tuple[QueueState, ...]
    device: bytes


class _Bar0:
    """BAR0's bus device: dispatches to the structure at each offset."""

    def __init__(self, dev: VirtioPciDevice) -> None:
        self.dev = dev

    def read(self, offset: int, data: memoryview) -> None:
        self.dev.bar_read(offset, data)

    def write(self, offset: int, data: memoryview) -> None:
        self.dev.bar_write(offset, data)


class VirtioPciDevice(PciDevice):
    STATE_VERSION: ClassVar[int] = 1
    state_type: ClassVar[type[VirtioPciState]] = VirtioPciState

    def __init__(self, device: VirtioDevice, *, vm: Vm, memory: GuestMemory,
                 intx: IrqLine, loop: EventLoop, name: str | None = None) -> None:
        super().__init__(vendor_id=VIRTIO_VENDOR, device_id=0x1040 + device.device_id,
                         class_code=device.pci_class, revision=1,
                         subsystem_vendor_id=VIRTIO_VENDOR, subsystem_id=VIRTIO_SUBSYSTEM_ID,
                         interrupt_pin=1, name=name or device.name)
        self.device = device
        self.vm = vm
        self.memory = memory
        self.intx = intx
        self.loop = loop
        guest_faults.forget(self.name)  # a new device: a new budget of warnings
        nq = len(device.queue_sizes)
        if not 1 <= nq <= 254:
            raise ValueError("a virtio device needs 1-254 queues")
        self.queues = [SplitQueue(i, n) for i, n in enumerate(device.queue_sizes)]
        self.notify_fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in self.queues]
        self.msix = MsixTable(nq + 1, vm.msi_route)
        self.device_features = (device.features | 1 << F_VERSION_1 | 1 << F_INDIRECT_DESC
                                | 1 << F_EVENT_IDX)
        self._vlock = threading.RLock()
        self._isr_lock = threading.Lock()
        # status and generation as the queue work changes them: never _vlock there, a
        # reset holds _vlock while it waits for the device's running handler
        self._status_lock = threading.Lock()
        self.isr = 0
        self._intx_level = False  # guarded by _isr_lock
        self._ioeventfd_at: int | None = None
        # _worker exists from DRIVER_OK to reset; it runs (is registered on the loop)
        # unless I/O is paused. Both change under _vlock.
        self._worker: QueueWorker | None = None
        self._paused = False
        # metrics (plain counters; a torn read is harmless)
        self._notifications = 0
        self._interrupts = 0
        self._requests = 0
        self._errors = 0
        self._reset_state()
        self.bar = self.add_bar(BAR_INDEX, BAR_SIZE, BarKind.MEM64, _Bar0(self),
                                prefetchable=True)
        for cfg_type, off, length, extra in (
                (CAP_COMMON, COMMON_OFF, COMMON_LEN, b""),
                (CAP_NOTIFY, NOTIFY_OFF, NOTIFY_MULT * nq, struct.pack("<I", NOTIFY_MULT)),
                (CAP_ISR, ISR_OFF, 1, b""),
                (CAP_DEVICE, DEVICE_OFF, DEVICE_LEN, b"")):
            self.add_capability(VENDOR_CAP_ID, self._vendor_cap(cfg_type, off, length, extra))
        body = self._vendor_cap(CAP_PCI_CFG, 0, 0, b"\0" * 4)
        # the driver picks bar, offset and length, and accesses pci_cfg_data
        wmask = bytes([0, 0, 0xFF, 0, 0, 0]) + b"\xff" * 12
        self._pci_cfg = self.add_capability(VENDOR_CAP_ID, body, wmask=wmask)
        self.hook_writes(self._pci_cfg + 16, 4, self._pci_cfg_written)
        msix_body, msix_wmask = self.msix.capability_body(BAR_INDEX, MSIX_TABLE_OFF,
                                                          BAR_INDEX, MSIX_PBA_OFF)
        self._msix_cap = self.add_capability(MSIX_CAP_ID, msix_body, wmask=msix_wmask)
        self.hook_writes(self._msix_cap + 2, 2, self._msix_control_written)

    @staticmethod
    def _vendor_cap(cfg_type: int, offset: int, length: int, extra: bytes) -> bytes:
        # struct virtio_pci_cap after cap_vndr/cap_next: cap_len, cfg_type, bar,
        # id, padding[2], offset, length (+ the notify multiplier or cfg data)
        cap_len = 16 + len(extra)
        return struct.pack("<BBBBxxII", cap_len, cfg_type, BAR_INDEX, 0, offset,
                           length) + extra

    def _reset_state(self) -> None:
        self.status = 0
        self.dfselect = 0
        self.gfselect = 0
        self.driver_features = 0
        self.config_msix = NO_VECTOR
        self.qselect = 0
        self.generation = 0
        for q in self.queues:
            q.reset()

    # ---- PCI plumbing

    def bar_moved(self, bar: Bar, old: int | None, new: int | None) -> None:
        with self._vlock:
            if self._ioeventfd_at is not None:
                for i, fd in enumerate(self.notify_fds):
                    self.vm.remove_ioeventfd(self._ioeventfd_at + NOTIFY_OFF + NOTIFY_MULT * i,
                                             2, fd)
                self._ioeventfd_at = None
            if new is None:
                return
            done: list[tuple[int, int]] = []
            try:
                for i, fd in enumerate(self.notify_fds):
                    addr = new + NOTIFY_OFF + NOTIFY_MULT * i
                    if not self.vm.add_ioeventfd(addr, 2, fd):
                        break
                    done.append((addr, fd))
            except Exception as exc:  # e.g. an address clash: notifies still work
                log.warning("%s: no ioeventfd at %#x (%s); queue notifies exit to the VMM",
                            self.name, new, exc)
            if len(done) == len(self.notify_fds):
                self._ioeventfd_at = new
            else:  # all or none: the bus path serves the notify region
                for addr, fd in done:
                    self.vm.remove_ioeventfd(addr, 2, fd)

    def _msix_control_written(self, offset: int, size: int) -> None:
        self.msix.control_written(self.get(self._msix_cap + 2, 2))

    def _pci_cfg_target(self) -> tuple[int, int] | None:
        base = self._pci_cfg
        bar, off, length = self.config[base + 4], self.get(base + 8, 4), self.get(base + 12, 4)
        if bar != BAR_INDEX or length not in (1, 2, 4) or off % length or off + length > BAR_SIZE:
            return None
        return off, length

    def _pci_cfg_written(self, offset: int, size: int) -> None:
        t = self._pci_cfg_target()
        if t is not None:
            off, length = t
            self.bar_write(off, memoryview(self.config[self._pci_cfg + 16:
                                                       self._pci_cfg + 16 + length]))

    def before_read(self, offset: int, size: int) -> None:
        data_off = self._pci_cfg + 16
        if offset < data_off + 4 and offset + size > data_off:
            t = self._pci_cfg_target()
            if t is not None:
                buf = bytearray(t[1])
                self.bar_read(t[0], memoryview(buf))
                self.config[data_off:data_off + t[1]] = buf
        if offset <= STATUS < offset + size:
            st = self.get(STATUS, 2)
            self.put(STATUS, 2, st | STATUS_INTERRUPT if self.isr else st & ~STATUS_INTERRUPT)

    # ---- BAR0

    def bar_read(self, offset: int, data: memoryview) -> None:
        n = len(data)
        if offset >= COMMON_OFF and offset + n <= COMMON_OFF + COMMON_LEN:
            with self._vlock:
                image = self._common_image()
            data[:] = image[offset - COMMON_OFF:offset - COMMON_OFF + n]
        elif offset == ISR_OFF and n == 1:
            data[0] = self._read_isr()
        elif DEVICE_OFF <= offset < DEVICE_OFF + DEVICE_LEN:
            cfg = self.device.config_space()
            off = offset - DEVICE_OFF
            chunk = cfg[off:off + n]
            data[:] = chunk + b"\0" * (n - len(chunk))
        elif MSIX_TABLE_OFF <= offset < MSIX_TABLE_OFF + self.msix.table_size:
            self.msix.table_read(offset - MSIX_TABLE_OFF, data)
        elif MSIX_PBA_OFF <= offset < MSIX_PBA_OFF + self.msix.pba_size:
            self.msix.pba_read(offset - MSIX_PBA_OFF, data)
        else:
            data[:] = bytes(n)

    def bar_write(self, offset: int, data: memoryview) -> None:
        n = len(data)
        if NOTIFY_OFF <= offset < NOTIFY_OFF + NOTIFY_MULT * len(self.queues):
            q = (offset - NOTIFY_OFF) // NOTIFY_MULT
            os.eventfd_write(self.notify_fds[q], 1)
        elif offset >= COMMON_OFF and offset + n <= COMMON_OFF + COMMON_LEN:
            self._common_write(offset - COMMON_OFF, bytes(data))
        elif DEVICE_OFF <= offset < DEVICE_OFF + DEVICE_LEN:
            self.device.write_config(offset - DEVICE_OFF, bytes(data))
        elif MSIX_TABLE_OFF <= offset < MSIX_TABLE_OFF + self.msix.table_size:
            self.msix.table_write(offset - MSIX_TABLE_OFF, data)

    # ---- common configuration

    def _selected(self) -> SplitQueue | None:
        return self.queues[self.qselect] if self.qselect < len(self.queues) else None

    def _common_image(self) -> bytes:
        q = self._selected()
        dfeature = (self.device_features >> (32 * self.dfselect)) & 0xFFFF_FFFF \
            if self.dfselect < 2 else 0
        gfeature = (self.driver_features >> (32 * self.gfselect)) & 0xFFFF_FFFF \
            if self.gfselect < 2 else 0
        if q is None:
            qfields = (0, NO_VECTOR, 0, 0, 0, 0, 0, 0, 0)
        else:
            qfields = (q.size, q.msix_vector, int(q.ready), q.index, q.desc_addr,
                       q.avail_addr, q.used_addr, q.index, 0)
        return _COMMON.pack(self.dfselect, dfeature, self.gfselect, gfeature, self.config_msix,
                            len(self.queues), self.status, self.generation & 0xFF,
                            self.qselect, *qfields)

    def _common_write(self, off: int, data: bytes) -> None:
        with self._vlock:
            image = bytearray(self._common_image())
            image[off:off + len(data)] = data
            values = dict(zip(_FIELDS, _COMMON.unpack(image), strict=True))
            end = off + len(data)
            for name, start, size in _FIELD_SPANS:
                if start < end and start + size > off:
                    self._set_field(name, values[name], start, size, off, end)

    def _set_field(self, name: str, value: int, start: int, size: int, off: int,
                   end: int) -> None:
        q = self._selected()
        if name == "dfselect":
            self.dfselect = value
        elif name == "gfselect":
            self.gfselect = value
        elif name == "gfeature":
            if self.gfselect < 2 and not self.status & STATUS_FEATURES_OK:
                shift = 32 * self.gfselect
                self.driver_features = ((self.driver_features & ~(0xFFFF_FFFF << shift))
                                        | (value << shift))
        elif name == "config_msix":
            self.config_msix = value if value < self.msix.num_vectors else NO_VECTOR
        elif name == "status":
            self._write_status(value)
        elif name == "qselect":
            self.qselect = value
        elif q is None or (q.ready and name != "qenable"):
            return  # no such queue, or it is live: its configuration is frozen
        elif name == "qsize":
            if 0 < value <= q.max_size and not value & (value - 1):
                q.size = value
        elif name == "qmsix":
            q.msix_vector = value if value < self.msix.num_vectors else NO_VECTOR
        elif name == "qenable":
            if value == 1 and not q.ready:
                self._enable_queue(q)
        elif name in ("qdesc", "qdriver", "qdevice"):
            attr = {"qdesc": "desc_addr", "qdriver": "avail_addr", "qdevice": "used_addr"}[name]
            setattr(q, attr, value)

    def _enable_queue(self, q: SplitQueue) -> None:
        try:
            q.activate(self.memory, indirect=bool(self.driver_features >> F_INDIRECT_DESC & 1),
                       event_idx=bool(self.driver_features >> F_EVENT_IDX & 1))
        except QueueBroken as exc:
            self.needs_reset(str(exc))

    def _write_status(self, value: int) -> None:
        value &= 0xFF
        if value == 0:
            self._reset()
            return
        activate = False
        with self._status_lock:
            old = self.status
            new = (value & ~STATUS_DEVICE_NEEDS_RESET) | (old & STATUS_DEVICE_NEEDS_RESET)
            if new & STATUS_FEATURES_OK and not old & STATUS_FEATURES_OK:
                bad = self.driver_features & ~self.device_features
                if bad or not self.driver_features >> F_VERSION_1 & 1:
                    log.info("%s: driver features %#x refused (unknown bits %#x)", self.name,
                             self.driver_features, bad)
                    new &= ~STATUS_FEATURES_OK
            if new & STATUS_DRIVER_OK and not old & STATUS_DRIVER_OK:
                if not new & STATUS_FEATURES_OK:
                    new &= ~STATUS_DRIVER_OK
                else:
                    # a driver that clears DRIVER_OK and sets it again: still one worker
                    activate = self._worker is None
            self.status = new
        if activate:
            self._activate()

    def _activate(self) -> None:
        with self._vlock:
            # the worker first: the device may watch fds of its own in activate
            self._worker = self._new_worker()
            self.device.activate(self, self.queues, self.driver_features)
            if not self._paused:
                self._worker.start()

    def _new_worker(self) -> QueueWorker:
        return QueueWorker(self.name, self.device, self.queues, self.notify_fds,
                           self.needs_reset, self.loop, self._count_notify)

    def _count_notify(self, n: int) -> None:
        self._notifications += n

    def _stop_io(self) -> None:
        """No queue work runs when this returns; requests the device's own threads
        still run (virtio-blk) may complete."""
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.stop()
            worker.close_watches()

    def _reset(self) -> None:
        with self._vlock:
            self._stop_io()
            self.device.quiesce()
            self.device.reset()
            self._reset_state()
            with self._isr_lock:
                self.isr = 0
                self._set_intx(False)

    # ---- pausing device I/O (the VM is paused: vCPUs parked)

    def pause_io(self) -> None:
        """Stop taking work and wait (up to ``PAUSE_DRAIN_S``) for requests in
        flight; from then on the device touches neither guest memory nor its
        interrupt until ``resume_io``. Kicks that come meanwhile wait in the
        queues' eventfds."""
        with self._vlock:
            self._paused = True
            if self._worker is not None:
                self._worker.stop()
            drained = self.device.quiesce(PAUSE_DRAIN_S)
        if not drained:
            log.warning("%s: requests still in flight %.0f s after pausing I/O (host I/O "
                        "stalled?)", self.name, PAUSE_DRAIN_S)

    def resume_io(self) -> None:
        """Take work again: each queue is processed once (kicks during the pause)."""
        with self._vlock:
            self._paused = False
            if self._worker is not None:
                self._worker.start()

    @property
    def io_paused(self) -> bool:
        return self._paused

    # ---- what the device and its threads call (the Transport protocol)

    def complete(self, queue: SplitQueue, done: Sequence[tuple[int, int]]) -> None:
        with queue.lock:
            if not queue.ready:
                return  # reset under our feet: the driver forgot these
            queue.push_many(done)
            due = queue.needs_interrupt()
        self._requests += len(done)
        if due:
            self._interrupt(queue.msix_vector, 1)

    def needs_reset(self, reason: str) -> None:
        guest_faults.warning(log, self.name, "%s: %s; the device needs a reset", self.name,
                             reason)
        with self._status_lock:
            self.status |= STATUS_DEVICE_NEEDS_RESET
        self.config_changed()

    def note_dma_write(self, gpa: int, size: int) -> None:
        self.vm.note_dma_write(gpa, size)

    def requeue(self, queue: SplitQueue) -> None:
        worker = self._worker
        if worker is not None:
            worker.kick(queue)

    def note_error(self) -> None:
        self._errors += 1

    def watch(self, fd: int, handler: Callable[[int], None], *, events: int = select.EPOLLIN,
              name: str) -> FdWatch:
        worker = self._worker
        if worker is None:
            raise RuntimeError(f"{self.name}: watch() before the device is active")
        return worker.watch(fd, handler, events=events, name=name)

    def config_changed(self) -> None:
        with self._status_lock:
            self.generation += 1
        self._interrupt(self.config_msix, 2)

    # ---- interrupts

    def _interrupt(self, vector: int, isr_bit: int) -> None:
        if self.msix.enabled:
            if vector != NO_VECTOR:
                self.msix.notify(vector)
                self._interrupts += 1
            return
        with self._isr_lock:
            self.isr |= isr_bit
            self._set_intx(not self.command & CMD_INTX_DISABLE)
        self._interrupts += 1

    def _set_intx(self, level: bool) -> None:
        """Drive the INTx line (call with ``_isr_lock``)."""
        self._intx_level = level
        self.intx.set_level(level)

    def _read_isr(self) -> int:
        with self._isr_lock:
            value, self.isr = self.isr, 0
            self._set_intx(False)
        return value

    # ---- metrics

    def metrics(self) -> dict[str, int]:
        """Counters since the device was created: queue notifications from the
        driver, interrupts sent, requests completed, requests failed, and the
        device type's own (bytes moved)."""
        out = {"notifications": self._notifications, "interrupts": self._interrupts,
               "requests": self._requests, "errors": self._errors}
        for key, value in self.device.metrics().items():
            out[key] = out.get(key, 0) + value
        return out

    # ---- saved state (vCPUs parked, I/O paused)

    def save_state(self) -> VirtioPciState:
        from pyvirt.state import encode

        pci = self.save_pci_state()  # before _vlock: the config lock comes first
        with self._vlock:
            device = encode(self.device.save_state())
            with self._isr_lock:
                isr, level = self.isr, self._intx_level
            worker = self._worker
            return VirtioPciState(
                self.STATE_VERSION, pci, self.msix.save_state(),
                self.status, self.dfselect, self.gfselect, self.driver_features,
                self.config_msix, self.qselect, self.generation & 0xFFFF_FFFF, isr, level,
                worker is not None and worker.broken,
                tuple(q.save_state() for q in self.queues), device)

    def restore_state(self, state: VirtioPciState) -> None:
        """Become exactly what ``state`` says. Every field is checked before anything
        changes (``StateError`` naming the device and the field). A device that ran is
        stopped first; a DRIVER_OK record gets its queues back on the event loop
        (unless I/O is paused: then at ``resume_io``)."""
        from pyvirt.devices.statecheck import check_bits, check_bool, check_int
        from pyvirt.state import decode

        part = self.name
        check_version(part, state.version, self.STATE_VERSION)
        status = check_int(part, "status", state.status, 0, 0xFF)
        for name in ("dfselect", "gfselect"):
            check_int(part, name, getattr(state, name), 0, 0xFFFF_FFFF)
        features = check_bits(part, "driver_features", state.driver_features,
                              self.device_features)
        check_int(part, "qselect", state.qselect, 0, 0xFFFF)
        check_int(part, "generation", state.generation, 0, 0xFFFF_FFFF)
        check_int(part, "isr", state.isr, 0, 3)
        check_bool(part, "intx_level", state.intx_level)
        check_bool(part, "io_broken", state.io_broken)
        for name, vector in [("config_msix", state.config_msix)] + [
                (f"queues[{i}].msix_vector", q.msix_vector) for i, q in enumerate(state.queues)]:
            if vector != NO_VECTOR:
                check_int(part, name, vector, 0, self.msix.num_vectors - 1)
        driver_ok = bool(status & STATUS_DRIVER_OK)
        if driver_ok and not (status & STATUS_FEATURES_OK and features >> F_VERSION_1 & 1):
            raise StateError(f"{part}: saved state has DRIVER_OK without accepted features "
                             f"(status {status:#x}, features {features:#x})")
        if len(state.queues) != len(self.queues):
            raise StateError(f"{part}: saved state has {len(state.queues)} queues; this "
                             f"device has {len(self.queues)}")
        for i, (q, qs) in enumerate(zip(self.queues, state.queues, strict=True)):
            q.check_state(qs, self.memory, part=part, field=f"queues[{i}]")
        dev_state = decode(state.device, self.device.state_type, part=f"{part} device")
        self.device.check_state(dev_state)
        # config space and BARs first, outside _vlock (lock order: config lock, then
        # _vlock); a moved BAR re-registers the ioeventfds through bar_moved. Then the
        # MSI-X table, which re-programs the routes of its unmasked vectors.
        try:
            self.restore_pci_state(state.pci)
            self.msix.restore_state(state.msix)
        except StateError as exc:
            raise StateError(f"{part}: {exc}") from None
        with self._vlock:
            self._stop_io()
            self.device.quiesce()
            self.device.reset()
            self._reset_state()
            self.status = status
            self.dfselect, self.gfselect = state.dfselect, state.gfselect
            self.driver_features = features
            self.config_msix = state.config_msix
            self.qselect = state.qselect
            self.generation = state.generation
            for i, (q, qs) in enumerate(zip(self.queues, state.queues, strict=True)):
                q.restore_state(qs, self.memory, part=part, field=f"queues[{i}]")
            with self._isr_lock:
                self.isr = state.isr
                self._set_intx(state.intx_level)
            if driver_ok:
                self._worker = self._new_worker()
                self._worker.broken = state.io_broken
                self.device.activate(self, self.queues, features)
            self.device.restore_state(dev_state)
            if driver_ok:
                assert self._worker is not None
                if not self._paused:
                    self._worker.start()

    def close(self) -> None:
        self._reset()
        self.device.close()
        self.msix.close()
        for fd in self.notify_fds:
            os.close(fd)
        self.notify_fds = []
