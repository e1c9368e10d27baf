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
Either way the device's I/O thread wakes up. Interrupts: the queue's MSI-X
vector when MSI-X is on, else INTx (ISR bit 0 and the level-triggered line).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Sequence

from pyvirt.devices.guestlog import guest_faults
from pyvirt.devices.irq import IrqLine
from pyvirt.hypervisor.base import Vm
from pyvirt.memory import GuestMemory
from pyvirt.pci.device import CMD_INTX_DISABLE, STATUS, STATUS_INTERRUPT, Bar, BarKind, PciDevice
from pyvirt.pci.msix import MSIX_CAP_ID, NO_VECTOR, MsixTable
from pyvirt.virtio import (
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_VERSION_1,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
)
from pyvirt.virtio.device import QueueWorker, VirtioDevice
from pyvirt.virtio.queue import QueueBroken, SplitQueue

__all__ = ["VirtioPciDevice"]

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


class _Bar0:
    """BAR0's bus device: dispatches to the structure at each offset."""

    def __init__(self, dev: VirtioPciDevice) -> None:
        self.dev = dev

    def read(self, offset: int, data: memoryview) -> None:
        self.dev.bar_read(offset, data)

    def write(self, offset: int, data: memoryview) -> None:
        self.dev.bar_write(offset, data)


class VirtioPciDevice(PciDevice):
    def __init__(self, device: VirtioDevice, *, vm: Vm, memory: GuestMemory,
                 intx: IrqLine, name: str | None = None) -> None:
        super().__init__(vendor_id=VIRTIO_VENDOR, device_id=0x1040 + device.device_id,
                         class_code=device.pci_class, revision=1,
                         subsystem_vendor_id=VIRTIO_VENDOR, subsystem_id=VIRTIO_SUBSYSTEM_ID,
                         interrupt_pin=1, name=name or device.name)
        self.device = device
        self.vm = vm
        self.memory = memory
        self.intx = intx
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
        # status and generation as device threads change them: never _vlock there, a
        # reset holds _vlock while it joins the I/O thread
        self._status_lock = threading.Lock()
        self.isr = 0
        self._ioeventfd_at: int | None = None
        self._worker: QueueWorker | None = None
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
                    # a driver that clears DRIVER_OK and sets it again gets no second I/O thread
                    activate = self._worker is None
            self.status = new
        if activate:
            self._activate()

    def _activate(self) -> None:
        self.device.activate(self, self.queues, self.driver_features)
        self._worker = QueueWorker(f"{self.name}-io", self.device, self.queues,
                                   self.notify_fds, self.needs_reset)
        self._worker.start()

    def _reset(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.stop()
        self.device.quiesce()
        self.device.reset()
        self._reset_state()
        with self._isr_lock:
            self.isr = 0
            self.intx.set_level(False)

    # ---- what the device and its threads call (the Transport protocol)

    def complete(self, queue: SplitQueue, done: Sequence[tuple[int, int]]) -> None:
        with queue.lock:
            if not queue.ready:
                return  # reset under our feet: the driver forgot these
            for head, written in done:
                queue.push(head, written)
            due = queue.needs_interrupt()
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

    def config_changed(self) -> None:
        with self._status_lock:
            self.generation += 1
        self._interrupt(self.config_msix, 2)

    # ---- interrupts

    def _interrupt(self, vector: int, isr_bit: int) -> None:
        if self.msix.enabled:
            if vector != NO_VECTOR:
                self.msix.notify(vector)
            return
        with self._isr_lock:
            self.isr |= isr_bit
            self.intx.set_level(not self.command & CMD_INTX_DISABLE)

    def _read_isr(self) -> int:
        with self._isr_lock:
            value, self.isr = self.isr, 0
            self.intx.set_level(False)
        return value

    def close(self) -> None:
        self._reset()
        self.device.close()
        self.msix.close()
        for fd in self.notify_fds:
            os.close(fd)
        self.notify_fds = []
