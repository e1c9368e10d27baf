"""A test driver for virtio 1.2 devices over the modern PCI transport.

``VirtioPciDriver`` plays the guest: it plugs a ``VirtioPciDevice`` into a real
PCI root (``attach_pci_root``: ECAM on the MMIO bus, 0xCF8/0xCFC on the port
bus), finds the virtio and MSI-X capabilities by walking configuration space,
and then reaches BAR0 only through the MMIO bus, as a guest's loads and
stores would. Guest RAM is a real ``GuestMemory``; the split rings, the
request buffers and (for hostile tests) arbitrary descriptor tables live
there.

The device's queue work runs on an ``EventLoop`` that a thread of the
driver runs (the VMM's main thread does in a VM), and virtio-blk completes
requests on its own workers, so everything that waits for the device (used
entries, interrupts) polls with a timeout.

``FakeVm`` stands in for the hypervisor: MSI messages, DMA-write notes and
ioeventfd registrations are recorded, INTx lines are ``NullIrq``.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pyvirt.arch.x86_64 import layout
from pyvirt.devices.bus import Bus
from pyvirt.devices.irq import NullIrq
from pyvirt.eventloop import EventLoop
from pyvirt.memory import GuestMemory
from pyvirt.pci.root import PciRoot, attach_pci_root, intx_gsi
from pyvirt.virtio import (
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
)
from pyvirt.virtio.device import VirtioDevice
from pyvirt.virtio.pci import VirtioPciDevice, VirtioPciState

__all__ = [
    "COMMON",
    "DESC_F_INDIRECT",
    "DESC_F_NEXT",
    "DESC_F_WRITE",
    "MSI_ADDR",
    "NO_VECTOR",
    "DriverQueue",
    "FakeVm",
    "VirtioPciDriver",
    "reference_chain",
    "wait_for",
]

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
NO_VECTOR = 0xFFFF

PCI_CAP_ID_VNDR = 0x09
PCI_CAP_ID_MSIX = 0x11
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5

#: struct virtio_pci_common_cfg (4.1.4.3): name -> (offset, size)
COMMON = {
    "device_feature_select": (0, 4),
    "device_feature": (4, 4),
    "driver_feature_select": (8, 4),
    "driver_feature": (12, 4),
    "config_msix_vector": (16, 2),
    "num_queues": (18, 2),
    "device_status": (20, 1),
    "config_generation": (21, 1),
    "queue_select": (22, 2),
    "queue_size": (24, 2),
    "queue_msix_vector": (26, 2),
    "queue_enable": (28, 2),
    "queue_notify_off": (30, 2),
    "queue_desc": (32, 8),
    "queue_driver": (40, 8),
    "queue_device": (48, 8),
    "queue_notify_data": (56, 2),
    "queue_reset": (58, 2),
}

MSI_ADDR = 0xFEE0_0000
#: MSI data of vector v is MSI_DATA_BASE + v, so a recorded message names its vector
MSI_DATA_BASE = 0x40
HEAP_START = 1 << 20
_DESC = struct.Struct("<QIHH")


def wait_for(pred: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``pred`` until it holds; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.0002)


# ---- the hypervisor side ----------------------------------------------------------


class RecordingRoute:
    """An MSI route whose messages land in ``FakeVm.msi``."""

    def __init__(self, vm: FakeVm) -> None:
        self.vm = vm
        self.address = 0
        self.data = 0
        self.closed = False

    def update(self, address: int, data: int) -> None:
        self.address, self.data = address, data

    def trigger(self) -> None:
        with self.vm.lock:
            self.vm.msi.append((self.address, self.data))

    def close(self) -> None:
        self.closed = True


class FakeVm:
    """What ``VirtioPciDevice`` needs from a ``Vm``."""

    def __init__(self, *, ioeventfd: bool = False) -> None:
        self.lock = threading.Lock()
        self.msi: list[tuple[int, int]] = []
        self.routes: list[RecordingRoute] = []
        self.dma: list[tuple[int, int]] = []
        self.lines: dict[int, NullIrq] = {}
        self.ioeventfd_supported = ioeventfd
        #: address -> eventfd of the registered ioeventfds
        self.ioeventfds: dict[int, int] = {}

    def irq_line(self, gsi: int) -> NullIrq:
        return self.lines.setdefault(gsi, NullIrq())

    def msi_route(self) -> RecordingRoute:
        r = RecordingRoute(self)
        self.routes.append(r)
        return r

    def add_ioeventfd(self, addr: int, length: int, fd: int) -> bool:
        if not self.ioeventfd_supported:
            return False
        assert length == 2 and addr not in self.ioeventfds
        self.ioeventfds[addr] = fd
        return True

    def remove_ioeventfd(self, addr: int, length: int, fd: int) -> None:
        assert self.ioeventfds.pop(addr) == fd

    def note_dma_write(self, gpa: int, size: int) -> None:
        with self.lock:
            self.dma.append((gpa, size))

    def msi_count(self, vector: int) -> int:
        with self.lock:
            return sum(1 for a, d in self.msi if a == MSI_ADDR and d == MSI_DATA_BASE + vector)

    def dma_covers(self, gpa: int, size: int) -> bool:
        """Some noted DMA write covers all of [gpa, gpa+size)."""
        with self.lock:
            return any(a <= gpa and gpa + size <= a + n for a, n in self.dma)


# ---- capabilities ------------------------------------------------------------------


@dataclass
class VirtioCap:
    cfg_type: int
    bar: int
    offset: int
    length: int
    cap_offset: int  # where in configuration space
    notify_multiplier: int = 0


@dataclass
class MsixCap:
    cap_offset: int
    table_size: int
    table_bar: int
    table_offset: int
    pba_bar: int
    pba_offset: int


# ---- the driver --------------------------------------------------------------------


class VirtioPciDriver:
    def __init__(self, device: VirtioDevice, *, mem_size: int = 16 << 20, slot: int = 1,
                 ioeventfd: bool = False) -> None:
        self.mem = GuestMemory.create(mem_size)
        self.vm = FakeVm(ioeventfd=ioeventfd)
        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        self.root: PciRoot = attach_pci_root(self.pio, self.mmio, self.vm.irq_line, self.mem.end)
        self.slot = slot
        self.device = device
        self.loop = EventLoop(f"test-{device.name}")
        self._loop_stop = threading.Event()
        self._loop_thread = threading.Thread(
            target=self.loop.run_until, args=(self._loop_stop.is_set,), kwargs={"tick": 0.05},
            name="test-loop", daemon=True)
        self._loop_thread.start()
        self.pdev = VirtioPciDevice(device, vm=self.vm, memory=self.mem,
                                    intx=self.root.intx_line(slot), loop=self.loop)
        self.root.add(slot, self.pdev)
        self.intx = self.vm.irq_line(intx_gsi(slot, 0))
        self._heap = HEAP_START
        self.features = 0
        self.queues: dict[int, DriverQueue] = {}
        self.caps: dict[int, VirtioCap] = {}
        self.msix: MsixCap | None = None
        self._closed = False
        self.find_capabilities()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.pdev.close()
        self._loop_stop.set()
        self.loop.wake()
        self._loop_thread.join(5)
        self.loop.close()
        self.mem.close()

    def restore_copy(self, device: VirtioDevice, state: bytes) -> VirtioPciDriver:
        """Another machine, as a restore in a new process builds it: a copy of this
        guest's RAM, a fresh transport around ``device`` restored from ``state``
        (encoded), and this driver's view of its queues carried over, so it can go on
        where it stopped. The caller closes both drivers."""
        from pyvirt.state import decode

        new = VirtioPciDriver(device, mem_size=self.mem.size, slot=self.slot,
                              ioeventfd=self.vm.ioeventfd_supported)
        try:
            new.mem.write(0, self.mem.read(0, self.mem.size))
            new.pdev.restore_state(decode(state, VirtioPciState, part=device.name))
        except BaseException:
            new.close()
            raise
        new._heap, new.features = self._heap, self.features
        for index, q in self.queues.items():
            q.drv, q.mem = new, new.mem
            new.queues[index] = q
        return new

    def __enter__(self) -> VirtioPciDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- guest RAM

    def alloc(self, size: int, align: int = 16) -> int:
        """Bump-allocate guest RAM (wraps around; requests are short-lived)."""
        addr = (self._heap + align - 1) // align * align
        if addr + size > self.mem.end:
            addr = HEAP_START
        self._heap = addr + size
        return addr

    def put(self, data: bytes, align: int = 16) -> int:
        addr = self.alloc(max(len(data), 1), align)
        self.mem.write(addr, data)
        return addr

    # ---- configuration space, through ECAM as the guest's MMCONFIG accesses

    def _ecam(self, offset: int) -> int:
        return layout.PCI_ECAM_ADDR + (self.slot << 15) + offset

    def cfg_read(self, offset: int, size: int) -> int:
        buf = bytearray(size)
        self.mmio.read(self._ecam(offset), memoryview(buf))
        return int.from_bytes(buf, "little")

    def cfg_write(self, offset: int, size: int, value: int) -> None:
        self.mmio.write(self._ecam(offset), memoryview(value.to_bytes(size, "little")))

    def find_capabilities(self) -> None:
        assert self.cfg_read(0x06, 2) & 0x10, "no capability list"
        ptr = self.cfg_read(0x34, 1) & ~3
        for _ in range(48):  # a cap list longer than this loops
            if not ptr:
                break
            cap_id = self.cfg_read(ptr, 1)
            nxt = self.cfg_read(ptr + 1, 1) & ~3
            if cap_id == PCI_CAP_ID_VNDR:
                cfg_type = self.cfg_read(ptr + 3, 1)
                cap = VirtioCap(cfg_type, self.cfg_read(ptr + 4, 1), self.cfg_read(ptr + 8, 4),
                                self.cfg_read(ptr + 12, 4), ptr)
                if cfg_type == VIRTIO_PCI_CAP_NOTIFY_CFG:
                    cap.notify_multiplier = self.cfg_read(ptr + 16, 4)
                self.caps.setdefault(cfg_type, cap)  # the first of each type counts
            elif cap_id == PCI_CAP_ID_MSIX:
                ctrl = self.cfg_read(ptr + 2, 2)
                table = self.cfg_read(ptr + 4, 4)
                pba = self.cfg_read(ptr + 8, 4)
                self.msix = MsixCap(ptr, (ctrl & 0x7FF) + 1, table & 7, table & ~7,
                                    pba & 7, pba & ~7)
            ptr = nxt
        else:
            raise AssertionError("capability list does not end")

    def bar_address(self, index: int) -> int:
        lo = self.cfg_read(0x10 + 4 * index, 4)
        if lo & 1:
            return lo & ~3
        addr = lo & ~0xF
        if (lo >> 1) & 3 == 2:  # 64-bit
            addr |= self.cfg_read(0x14 + 4 * index, 4) << 32
        return addr

    def _addr(self, cfg_type: int, offset: int) -> int:
        cap = self.caps[cfg_type]
        return self.bar_address(cap.bar) + cap.offset + offset

    # ---- MMIO

    def mmio_read(self, addr: int, size: int) -> int:
        buf = bytearray(size)
        self.mmio.read(addr, memoryview(buf))
        return int.from_bytes(buf, "little")

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        fd = self.vm.ioeventfds.get(addr)
        if fd is not None and size == 2:  # what KVM does with an ioeventfd
            os.eventfd_write(fd, 1)
            return
        self.mmio.write(addr, memoryview(value.to_bytes(size, "little")))

    def common_read(self, name: str) -> int:
        off, size = COMMON[name]
        if size == 8:  # as Linux does: two dword accesses
            addr = self._addr(VIRTIO_PCI_CAP_COMMON_CFG, off)
            return self.mmio_read(addr, 4) | self.mmio_read(addr + 4, 4) << 32
        return self.mmio_read(self._addr(VIRTIO_PCI_CAP_COMMON_CFG, off), size)

    def common_write(self, name: str, value: int) -> None:
        off, size = COMMON[name]
        addr = self._addr(VIRTIO_PCI_CAP_COMMON_CFG, off)
        if size == 8:
            self.mmio_write(addr, 4, value & 0xFFFF_FFFF)
            self.mmio_write(addr + 4, 4, value >> 32)
        else:
            self.mmio_write(addr, size, value)

    def config_read(self, offset: int, size: int) -> int:
        """The device-specific configuration space."""
        return self.mmio_read(self._addr(VIRTIO_PCI_CAP_DEVICE_CFG, offset), size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.mmio_write(self._addr(VIRTIO_PCI_CAP_DEVICE_CFG, offset), size, value)

    def read_isr(self) -> int:
        return self.mmio_read(self._addr(VIRTIO_PCI_CAP_ISR_CFG, 0), 1)

    # ---- status and features

    @property
    def status(self) -> int:
        return self.common_read("device_status")

    def set_status(self, value: int) -> None:
        self.common_write("device_status", value)

    def reset(self) -> None:
        self.set_status(0)
        assert self.status == 0, "the device did not reset"
        self.queues.clear()

    def device_features(self) -> int:
        feats = 0
        for sel in (0, 1):
            self.common_write("device_feature_select", sel)
            feats |= self.common_read("device_feature") << (32 * sel)
        return feats

    def negotiate(self, features: int | None = None) -> bool:
        """Reset, ACKNOWLEDGE, DRIVER, write ``features`` (default: all offered),
        FEATURES_OK; True when the device kept FEATURES_OK."""
        self.reset()
        self.set_status(STATUS_ACKNOWLEDGE)
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        offered = self.device_features()
        self.features = offered if features is None else features
        for sel in (0, 1):
            self.common_write("driver_feature_select", sel)
            self.common_write("driver_feature", (self.features >> (32 * sel)) & 0xFFFF_FFFF)
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        return bool(self.status & STATUS_FEATURES_OK)

    def has_feature(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    def driver_ok(self) -> None:
        self.set_status(self.status | STATUS_DRIVER_OK)
        assert self.status & STATUS_DRIVER_OK, "DRIVER_OK refused"

    @property
    def needs_reset(self) -> bool:
        return bool(self.status & STATUS_DEVICE_NEEDS_RESET)

    def init(self, features: int | None = None, *, msix: bool = False,
             queue_sizes: Sequence[int | None] | None = None) -> list[DriverQueue]:
        """The whole start-up sequence; returns the queues."""
        if msix:
            self.enable_msix()
        assert self.negotiate(features), "FEATURES_OK refused"
        if msix:
            self.set_config_vector(0)
        nq = self.common_read("num_queues")
        sizes = list(queue_sizes) if queue_sizes is not None else [None] * nq
        qs = [self.setup_queue(i, size=sizes[i], vector=(i + 1) if msix else NO_VECTOR)
              for i in range(len(sizes))]
        self.driver_ok()
        return qs

    # ---- queues

    def setup_queue(self, index: int, *, size: int | None = None,
                    vector: int = NO_VECTOR) -> DriverQueue:
        self.common_write("queue_select", index)
        max_size = self.common_read("queue_size")
        assert max_size, f"queue {index} does not exist"
        size = max_size if size is None else size
        self.common_write("queue_size", size)
        desc = self.alloc(16 * size, 4096)
        avail = self.alloc(6 + 2 * size, 4096)
        used = self.alloc(6 + 8 * size, 4096)
        self.mem.write(desc, bytes(16 * size))
        self.mem.write(avail, bytes(6 + 2 * size))
        self.mem.write(used, bytes(6 + 8 * size))
        self.common_write("queue_desc", desc)
        self.common_write("queue_driver", avail)
        self.common_write("queue_device", used)
        if vector != NO_VECTOR or self.msix_enabled:
            self.common_write("queue_msix_vector", vector)
            assert self.common_read("queue_msix_vector") == vector, "vector refused"
        notify_off = self.common_read("queue_notify_off")
        notify = self._addr(VIRTIO_PCI_CAP_NOTIFY_CFG,
                            notify_off * self.caps[VIRTIO_PCI_CAP_NOTIFY_CFG].notify_multiplier)
        self.common_write("queue_enable", 1)
        q = DriverQueue(self, index, size, desc, avail, used, notify, vector)
        self.queues[index] = q
        return q

    # ---- MSI-X

    @property
    def msix_enabled(self) -> bool:
        assert self.msix is not None
        return bool(self.cfg_read(self.msix.cap_offset + 2, 2) & 0x8000)

    def _msix_entry(self, vector: int) -> int:
        assert self.msix is not None
        return self.bar_address(self.msix.table_bar) + self.msix.table_offset + 16 * vector

    def enable_msix(self, *, masked: Sequence[int] = ()) -> None:
        """Program every table entry (data = MSI_DATA_BASE + vector) and enable MSI-X."""
        assert self.msix is not None
        for v in range(self.msix.table_size):
            entry = self._msix_entry(v)
            self.mmio_write(entry, 4, MSI_ADDR)
            self.mmio_write(entry + 4, 4, 0)
            self.mmio_write(entry + 8, 4, MSI_DATA_BASE + v)
            self.mmio_write(entry + 12, 4, 1 if v in masked else 0)
        ctrl = self.cfg_read(self.msix.cap_offset + 2, 2)
        self.cfg_write(self.msix.cap_offset + 2, 2, ctrl | 0x8000)

    def disable_msix(self) -> None:
        assert self.msix is not None
        ctrl = self.cfg_read(self.msix.cap_offset + 2, 2)
        self.cfg_write(self.msix.cap_offset + 2, 2, ctrl & ~0x8000)

    def mask_vector(self, vector: int, masked: bool) -> None:
        self.mmio_write(self._msix_entry(vector) + 12, 4, int(masked))

    def msix_entry(self, vector: int) -> tuple[int, int, int, int]:
        e = self._msix_entry(vector)
        return tuple(self.mmio_read(e + 4 * i, 4) for i in range(4))  # type: ignore[return-value]

    def pba_pending(self, vector: int) -> bool:
        assert self.msix is not None
        base = self.bar_address(self.msix.pba_bar) + self.msix.pba_offset
        qword = self.mmio_read(base + 8 * (vector // 64), 8)
        return bool(qword >> (vector % 64) & 1)

    def set_config_vector(self, vector: int) -> int:
        self.common_write("config_msix_vector", vector)
        return self.common_read("config_msix_vector")


class DriverQueue:
    """The driver's side of one split virtqueue."""

    def __init__(self, drv: VirtioPciDriver, index: int, size: int, desc: int, avail: int,
                 used: int, notify_addr: int, vector: int) -> None:
        self.drv = drv
        self.mem = drv.mem
        self.index = index
        self.size = size
        self.desc = desc
        self.avail = avail
        self.used = used
        self.notify_addr = notify_addr
        self.vector = vector
        self.free = list(range(size))
        self.avail_idx = 0  # the driver's shadow of avail->idx
        self.last_used = 0
        self.owned: dict[int, list[int]] = {}  # head -> its descriptor indices
        #: with EVENT_IDX: ask for an interrupt at the next used entry on every
        #: publish, as Linux does while callbacks are enabled
        self.auto_used_event = True

    # ---- raw access (hostile drivers write anything)

    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int,
                   table: int | None = None) -> None:
        base = self.desc if table is None else table
        self.mem.write(base + 16 * i, _DESC.pack(addr, length, flags, nxt))

    def set_avail_idx(self, value: int) -> None:
        self.mem.write_u16(self.avail + 2, value & 0xFFFF)

    def set_avail_slot(self, slot: int, head: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * (slot % self.size), head)

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write_u16(self.avail, flags)

    def set_used_event(self, value: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * self.size, value & 0xFFFF)

    def avail_event(self) -> int:
        return self.mem.read_u16(self.used + 4 + 8 * self.size)

    def used_idx(self) -> int:
        return self.mem.read_u16(self.used + 2)

    def used_flags(self) -> int:
        return self.mem.read_u16(self.used)

    def take(self, n: int) -> list[int]:
        """Reserve ``n`` free descriptor indices (for raw tables)."""
        if n > len(self.free):
            raise RuntimeError("no free descriptors")
        got, self.free = self.free[:n], self.free[n:]
        return got

    # ---- well-formed chains

    def add(self, readable: Sequence[tuple[int, int]], writable: Sequence[tuple[int, int]] = (),
            *, indirect: bool = False, publish: bool = True) -> int:
        """Queue a chain of (address, length) buffers; returns its head."""
        bufs = [(a, n, 0) for a, n in readable] + [(a, n, DESC_F_WRITE) for a, n in writable]
        assert bufs
        if indirect:
            table = self.drv.alloc(16 * len(bufs), 16)
            for k, (a, n, f) in enumerate(bufs):
                last = k == len(bufs) - 1
                self.write_desc(k, a, n, f | (0 if last else DESC_F_NEXT), k + 1, table)
            (head,) = ids = self.take(1)
            self.write_desc(head, table, 16 * len(bufs), DESC_F_INDIRECT, 0)
        else:
            ids = self.take(len(bufs))
            for k, (a, n, f) in enumerate(bufs):
                last = k == len(bufs) - 1
                self.write_desc(ids[k], a, n, f | (0 if last else DESC_F_NEXT),
                                0 if last else ids[k + 1])
            head = ids[0]
        if publish:
            self.publish(head, owned=ids)
        else:
            self.owned[head] = ids
        return head

    def publish(self, head: int, owned: Sequence[int] | None = None) -> None:
        """Make ``head`` available (ring entry, then the index, as x86 orders them)."""
        if owned is not None:
            self.owned[head] = list(owned)
        if self.auto_used_event:
            self.set_used_event(self.last_used)
        self.set_avail_slot(self.avail_idx, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)

    def kick(self) -> None:
        self.drv.mmio_write(self.notify_addr, 2, self.index)

    def pending_used(self) -> int:
        return (self.used_idx() - self.last_used) & 0xFFFF

    def wait_used(self, n: int = 1, timeout: float = 5.0) -> list[tuple[int, int]]:
        """Wait for ``n`` more used entries; returns them as (id, len)."""
        wait_for(lambda: self.pending_used() >= n, timeout,
                 f"{n} used entries on queue {self.index}")
        out = []
        for _ in range(n):
            slot = self.last_used % self.size
            out.append(struct.unpack("<II", self.mem.read(self.used + 4 + 8 * slot, 8)))
            self.last_used = (self.last_used + 1) & 0xFFFF
            ids = self.owned.pop(out[-1][0], None)
            if ids is not None:
                self.free.extend(ids)
        return out

    def submit(self, out: Sequence[bytes], in_lens: Sequence[int] = (), *,
               indirect: bool = False, timeout: float = 5.0) -> tuple[int, list[bytes]]:
        """One request: device-readable ``out`` buffers, device-writable buffers of
        ``in_lens`` bytes (pre-filled with 0xA5). Returns (used len, the in buffers)."""
        readable = [(self.drv.put(b), len(b)) for b in out]
        writable = [(self.drv.put(b"\xa5" * n), n) for n in in_lens]
        head = self.add(readable, writable, indirect=indirect)
        self.kick()
        ((used_id, used_len),) = self.wait_used(1, timeout)
        assert used_id == head, f"used id {used_id}, expected {head}"
        return used_len, [self.mem.read(a, n) for a, n in writable]


# ---- a reference model of chain walking ------------------------------------------


def reference_chain(mem: GuestMemory, desc_addr: int, size: int, head: int, *,
                    indirect: bool, max_indirect: int = 4096,
                    ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]] | None:
    """What a device must make of the chain at ``head`` (virtio 1.2, 2.7.5), written
    independently of ``SplitQueue``: (readable, writable) buffers, or None when the
    chain is unusable. A chain is a walk through one table that must not revisit a
    descriptor; it may end in one indirect descriptor whose table is walked the same
    way. Zero-length buffers carry nothing and are dropped."""
    bufs: list[tuple[int, int, bool]] = []
    table, count, i = desc_addr, size, head
    visited: set[int] = set()
    in_indirect = False
    while True:
        if i in visited:
            return None  # a loop
        visited.add(i)
        addr, length, flags, nxt = _DESC.unpack(mem.read(table + 16 * i, 16))
        if flags & DESC_F_INDIRECT:
            if (not indirect or in_indirect or flags & DESC_F_NEXT or length == 0
                    or length % 16 or length > 16 * max_indirect
                    or not mem.check_range(addr, length)):
                return None
            table, count, i, visited, in_indirect = addr, length // 16, 0, set(), True
            continue
        if length:
            if not mem.check_range(addr, length):
                return None
            bufs.append((addr, length, bool(flags & DESC_F_WRITE)))
        if not flags & DESC_F_NEXT:
            break
        if nxt >= count:
            return None
        i = nxt
    first_writable = next((k for k, b in enumerate(bufs) if b[2]), len(bufs))
    if any(not w for _, _, w in bufs[first_writable:]):
        return None  # device-readable after device-writable
    return ([(a, n) for a, n, _ in bufs[:first_writable]],
            [(a, n) for a, n, _ in bufs[first_writable:]])
