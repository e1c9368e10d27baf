"""What the fuzz targets share: the finding type, the hypervisor stand-in, guest RAM
with a hole, and a driver that writes fuzzer-chosen virtqueues into it.

A target's ``one_input(data)`` drives real pyvirt code as a guest (or a user)
would and catches exactly the documented error types; anything else that
escapes is a finding, and so is a broken invariant (``Finding``).

pyvirt is imported at module level here: the runner imports a target (and so
this module) under atheris' instrumentation, and nothing imports pyvirt before.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import atheris

from pyvirt.devices.irq import NullIrq
from pyvirt.eventloop import EventLoop
from pyvirt.memory import GuestMemory, GuestRegion
from pyvirt.virtio import (
    F_VERSION_1,
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_FEATURES_OK,
)
from pyvirt.virtio.device import QueueWorker, VirtioDevice
from pyvirt.virtio.pci import COMMON_OFF, DEVICE_LEN, DEVICE_OFF, VirtioPciDevice
from pyvirt.virtio.queue import SplitQueue

__all__ = [
    "HIGH",
    "LOW",
    "Finding",
    "NullVm",
    "Provider",
    "VirtioHarness",
    "check",
    "guest_memory",
]

Provider = atheris.FuzzedDataProvider


class Finding(AssertionError):
    """An invariant the code under test promises was broken."""


def check(cond: bool, what: str) -> None:
    if not cond:
        raise Finding(what)


# Guest RAM for the virtio targets: two regions with a hole between them, so a
# buffer may straddle the hole or run off either end.
LOW = (0, 0x10000)
HIGH = (0x20000, 0x40000)


def guest_memory() -> GuestMemory:
    return GuestMemory([GuestRegion.anonymous(LOW[0], LOW[1] - LOW[0]),
                        GuestRegion.anonymous(HIGH[0], HIGH[1] - HIGH[0])])


def clear(mem: GuestMemory) -> None:
    for r in mem.regions:
        mem.write(r.guest_addr, bytes(r.size))


class _Route:
    """An MSI route that counts (a list would grow over a million inputs)."""

    def __init__(self) -> None:
        self.address = self.data = self.sent = 0

    def update(self, address: int, data: int) -> None:
        self.address, self.data = address, data

    def trigger(self) -> None:
        self.sent += 1

    def close(self) -> None:
        pass


class NullVm:
    """The hypervisor as a virtio-pci device sees it (``Vm``): no ioeventfds, MSI
    routes that count, and DMA notes checked against guest RAM."""

    def __init__(self, mem: GuestMemory | None = None) -> None:
        self.mem = mem
        self.lines: dict[int, NullIrq] = {}
        self.ioeventfds: dict[int, int] = {}

    def irq_line(self, gsi: int) -> NullIrq:
        return self.lines.setdefault(gsi, NullIrq())

    def msi_route(self) -> _Route:
        return _Route()

    def add_ioeventfd(self, addr: int, length: int, fd: int) -> bool:
        check(addr not in self.ioeventfds, f"ioeventfd registered twice at {addr:#x}")
        self.ioeventfds[addr] = fd
        return True

    def remove_ioeventfd(self, addr: int, length: int, fd: int) -> None:
        check(self.ioeventfds.pop(addr, None) == fd, f"unknown ioeventfd removed at {addr:#x}")

    def note_dma_write(self, gpa: int, size: int) -> None:
        if self.mem is not None:
            check(self.mem.check_range(gpa, size), f"DMA note {gpa:#x}+{size:#x} outside RAM")


# ---- fuzzer-chosen split virtqueues ------------------------------------------------------

#: where queue i's rings go (desc, avail, used); room for 256 entries each
QUEUE_BASE, QUEUE_STRIDE = 0x1000, 0x3000
INDIRECT = 0x7000  # two indirect tables of up to 128 entries
DATA = 0x8000  # request buffers: [DATA, LOW end) and the high region


def ring_addresses(index: int) -> tuple[int, int, int]:
    base = QUEUE_BASE + QUEUE_STRIDE * index
    return base, base + 0x1000, base + 0x1800


def _address(fdp: Provider) -> int:
    kind = fdp.ConsumeIntInRange(0, 7)
    if kind == 0:
        return fdp.ConsumeUInt(8)  # anything at all
    if kind == 1:  # at the edges of RAM and of the hole
        edge = (LOW[1], HIGH[0], HIGH[1], 0)[fdp.ConsumeIntInRange(0, 3)]
        return (edge + fdp.ConsumeIntInRange(-64, 64)) & 0xFFFF_FFFF_FFFF_FFFF
    if kind == 2:
        return HIGH[0] + fdp.ConsumeIntInRange(0, HIGH[1] - HIGH[0])
    return DATA + fdp.ConsumeIntInRange(0, LOW[1] - DATA)


def _length(fdp: Provider) -> int:
    kind = fdp.ConsumeIntInRange(0, 4)
    if kind == 0:
        return fdp.ConsumeUInt(4)
    if kind == 1:
        return fdp.ConsumeIntInRange(0, 64)
    if kind == 2:
        return 512 * fdp.ConsumeIntInRange(0, 16)
    if kind == 3:
        return 16 * fdp.ConsumeIntInRange(0, 64)
    return fdp.ConsumeIntInRange(0, 0x2000)


def _descriptor(fdp: Provider, count: int) -> bytes:
    """One descriptor (addr, len, flags, next) aimed at interesting places."""
    if fdp.ConsumeIntInRange(0, 15) == 0:  # an indirect table (maybe)
        table = INDIRECT + 0x800 * fdp.ConsumeIntInRange(0, 1)
        n = fdp.ConsumeIntInRange(0, 129)
        flags = 4 | (fdp.ConsumeIntInRange(0, 3) if fdp.ConsumeIntInRange(0, 7) == 0 else 0)
        return struct.pack("<QIHH", table, 16 * n + fdp.ConsumeIntInRange(0, 1) * 3, flags,
                           fdp.ConsumeIntInRange(0, count))
    addr = _address(fdp)
    length = _length(fdp)
    flags = fdp.ConsumeUInt(2) if fdp.ConsumeIntInRange(0, 15) == 0 else (
        fdp.ConsumeIntInRange(0, 3))
    nxt = fdp.ConsumeUInt(2) if fdp.ConsumeIntInRange(0, 15) == 0 else (
        fdp.ConsumeIntInRange(0, max(count - 1, 0)))
    return struct.pack("<QIHH", addr, length, flags, nxt)


_REQUEST_LENGTHS = (16, 16, 1, 512, 1024, 4096, 20, 16, 32)
_BLK_TYPES = (0, 0, 0, 1, 1, 1, 4, 8, 11, 13)  # in, out, flush, get_id, discard, write zeroes


def _request_address(fdp: Provider, length: int) -> int:
    if fdp.ConsumeIntInRange(0, 3):
        return DATA + 0x200 * fdp.ConsumeIntInRange(0, (LOW[1] - DATA - length) // 0x200)
    return HIGH[0] + 0x200 * fdp.ConsumeIntInRange(0, (HIGH[1] - HIGH[0] - length) // 0x200)


def _request_chain(fdp: Provider, first: int, count: int,
                   late: list[tuple[int, bytes]]) -> list[bytes]:
    """A well-formed chain at ``first``, linked with NEXT, in the request area: mostly
    shaped like a virtio-blk request (16-byte header, data in the direction its type
    wants, a status byte), else device-readable then device-writable buffers of
    request-like sizes (what rng and console want)."""
    room = count - first
    bufs: list[tuple[int, bool]] = []  # (length, device-writable)
    if room >= 2 and fdp.ConsumeIntInRange(0, 3):
        rtype = _BLK_TYPES[fdp.ConsumeIntInRange(0, len(_BLK_TYPES) - 1)] if (
            fdp.ConsumeIntInRange(0, 7)) else fdp.ConsumeUInt(4)
        sector = fdp.ConsumeIntInRange(0, 140) if fdp.ConsumeIntInRange(0, 7) else (
            fdp.ConsumeUInt(8))
        inward = rtype in (0, 8)
        data = [((512, 1024, 4096, 16, 32, 20)[fdp.ConsumeIntInRange(0, 5)], inward)
                for _ in range(fdp.ConsumeIntInRange(0, min(2, room - 2)))]
        bufs = [(16, False), *data, (1, True)]
        hdr = struct.pack("<IIQ", rtype, 0, sector)
    else:
        n = fdp.ConsumeIntInRange(1, min(4, room))
        split = fdp.ConsumeIntInRange(0, n)
        bufs = [(_REQUEST_LENGTHS[fdp.ConsumeIntInRange(0, len(_REQUEST_LENGTHS) - 1)],
                 j >= split) for j in range(n)]
        hdr = b""
    out = []
    for j, (length, writable) in enumerate(bufs):
        addr = _request_address(fdp, length)
        last = j == len(bufs) - 1
        flags = (0 if last else 1) | (2 if writable else 0)
        out.append(struct.pack("<QIHH", addr, length, flags, 0 if last else first + j + 1))
        if j == 0 and hdr:
            late.append((addr, hdr))
    return out


def write_rings(fdp: Provider, mem: GuestMemory, q: SplitQueue,
                late: list[tuple[int, bytes]]) -> None:
    """Fill the rings of an enabled queue (and the indirect tables) from the fuzzer:
    a mix of well-formed request chains and descriptors aimed anywhere. Request
    headers go to ``late``: written over the buffer contents (``fill_data``)."""
    size = q.size
    limit = min(size, 32)  # the rest of the table stays zero
    descs: list[bytes] = []
    heads: list[int] = []
    while len(descs) < limit and fdp.remaining_bytes() and fdp.ConsumeIntInRange(0, 7):
        heads.append(len(descs))
        if fdp.ConsumeIntInRange(0, 3):
            descs += _request_chain(fdp, len(descs), limit, late)
        else:
            descs.append(_descriptor(fdp, size))
    table = b"".join(descs)
    if mem.check_range(q.desc_addr, len(table)):
        mem.write(q.desc_addr, table)
    for t in range(2):
        n = fdp.ConsumeIntInRange(0, 8)
        entries = b"".join(_descriptor(fdp, 8) for _ in range(n))
        mem.write(INDIRECT + 0x800 * t, entries)
    if not mem.check_range(q.avail_addr, 6 + 2 * size):
        return
    flags = fdp.ConsumeIntInRange(0, 1) if fdp.ConsumeBool() else fdp.ConsumeUInt(2)
    if fdp.ConsumeIntInRange(0, 15) == 0:
        idx = fdp.ConsumeUInt(2)  # hostile: far ahead of what we consumed
    else:
        idx = fdp.ConsumeIntInRange(0, min(size, 16))
    mem.write_u16(q.avail_addr, flags)
    mem.write_u16(q.avail_addr + 2, idx)
    for slot in range(min(idx, size, 16)):
        if fdp.ConsumeIntInRange(0, 15) == 0:
            head = fdp.ConsumeUInt(2)
        elif heads and fdp.ConsumeIntInRange(0, 3):
            head = heads[slot % len(heads)]  # each chain once, in order, mostly
        else:
            head = fdp.ConsumeIntInRange(0, max(min(len(descs), size) - 1, 0))
        mem.write_u16(q.avail_addr + 4 + 2 * slot, head)
    mem.write_u16(q.avail_addr + 4 + 2 * size, fdp.ConsumeUInt(2))  # used_event


def fill_data(fdp: Provider, mem: GuestMemory) -> None:
    """Whatever the fuzzer has left becomes the content of the request buffers."""
    rest = fdp.ConsumeBytes(LOW[1] - DATA)
    mem.write(DATA, rest)


# ---- a virtio device behind its real PCI transport ----------------------------------------


@dataclass
class VirtioHarness:
    """One virtio device in a ``VirtioPciDevice`` over guest RAM, driven as a guest
    driver would through BAR0's common configuration, except that the device's
    queue work runs on the calling thread (``process``) instead of its I/O thread,
    so each input is deterministic and an exception surfaces here."""

    device: VirtioDevice
    mem: GuestMemory = field(default_factory=guest_memory)
    vm: NullVm = field(init=False)
    pci: VirtioPciDevice = field(init=False)
    loop: EventLoop = field(init=False)
    intx: NullIrq = field(default_factory=NullIrq)

    def __post_init__(self) -> None:
        self.vm = NullVm(self.mem)
        # queue work runs here, not on the loop (never run): see ``run``
        self.loop = EventLoop("fuzz")
        self.pci = VirtioPciDevice(self.device, vm=self.vm,  # type: ignore[arg-type]
                                   memory=self.mem, intx=self.intx, loop=self.loop)

    def common(self, name: str, value: int) -> None:
        off, size = _COMMON[name]
        self.pci.bar_write(COMMON_OFF + off, memoryview(value.to_bytes(size, "little")))

    def set_up(self, fdp: Provider) -> list[SplitQueue]:
        """Reset, negotiate fuzzer-chosen features, enable fuzzer-chosen queues."""
        pci = self.pci
        self.common("device_status", 0)
        clear(self.mem)
        self.common("device_status", STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        offered = pci.device_features
        # mostly a subset of what is offered, with VERSION_1 (else FEATURES_OK fails)
        wanted = offered & (fdp.ConsumeUInt(8) | 1 << F_VERSION_1) if fdp.ConsumeIntInRange(
            0, 7) else fdp.ConsumeUInt(8)
        for sel in (0, 1):
            self.common("driver_feature_select", sel)
            self.common("driver_feature", (wanted >> (32 * sel)) & 0xFFFF_FFFF)
        self.common("device_status", STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        if fdp.ConsumeBool():  # MSI-X on, vectors unmasked
            pci.config_write(pci._msix_cap + 2, 2, 1 << 15)
            for v in range(pci.msix.num_vectors):
                pci.msix.table_write(16 * v + 12, memoryview(bytearray(4)))
        self.common("config_msix_vector", fdp.ConsumeIntInRange(0, 3))
        for q in pci.queues:
            if not fdp.ConsumeIntInRange(0, 7):
                continue  # this queue stays disabled
            self.common("queue_select", q.index)
            self.common("queue_size", 1 << fdp.ConsumeIntInRange(0, 8) if fdp.ConsumeIntInRange(
                0, 7) else fdp.ConsumeUInt(2))
            self.common("queue_msix_vector", fdp.ConsumeIntInRange(0, 3))
            desc, avail, used = ring_addresses(q.index)
            if fdp.ConsumeIntInRange(0, 15) == 0:  # hostile ring addresses
                desc, avail, used = (_address(fdp) for _ in range(3))
            self.common("queue_desc", desc)
            self.common("queue_driver", avail)
            self.common("queue_device", used)
            self.common("queue_enable", 1)
        queues = [q for q in pci.queues if q.ready]
        late: list[tuple[int, bytes]] = []
        for q in queues:
            write_rings(fdp, self.mem, q, late)
        for _ in range(fdp.ConsumeIntInRange(0, 2)):  # device-specific configuration
            off = fdp.ConsumeIntInRange(0, DEVICE_LEN - 1)
            pci.bar_write(DEVICE_OFF + off, memoryview(fdp.ConsumeBytes(
                (1, 2, 4)[fdp.ConsumeIntInRange(0, 2)]) or b"\0"))
        fill_data(fdp, self.mem)
        for addr, blob in late:
            self.mem.write(addr, blob)
        return queues

    def run(self, fdp: Provider, host_input: Callable[[], None] | None = None) -> None:
        """One input: set up, activate the device (DRIVER_OK without starting its I/O
        thread), then do what the I/O thread does, through the real ``QueueWorker``
        dispatch: ``host_input`` (e.g. console input arriving) and the device's extra
        fd handlers, then each enabled queue's work. ``QueueBroken`` puts the device in
        NEEDS_RESET there; anything else escapes and is a finding."""
        queues = self.set_up(fdp)
        if not self.pci.status & STATUS_FEATURES_OK:
            return  # the device refused the features: a driver cannot go on to DRIVER_OK
        self.device.activate(self.pci, self.pci.queues, self.pci.driver_features)
        worker = QueueWorker("fuzz-io", self.device, self.pci.queues, self.pci.notify_fds,
                             self.pci.needs_reset)
        try:
            if host_input is not None:
                host_input()
                for _, handler in self.device.extra_fds():
                    worker.call(handler)
            for q in queues:
                before = q.used_idx
                worker._process(q)
                self.device.quiesce()
                check_used(self.mem, q, before)
        finally:
            worker.stop()  # never started: this only closes its eventfd

    def close(self) -> None:
        self.pci.close()
        self.loop.close()
        self.mem.close()


def check_used(mem: GuestMemory, q: SplitQueue, before: int) -> None:
    """Every used element the device published names a head inside the queue."""
    n = (q.used_idx - before) & 0xFFFF
    check(n <= q.size, f"{n} used entries published on a queue of {q.size}")
    for k in range(n):
        slot = (before + k) % q.size
        head = mem.read_u32(q.used_addr + 4 + 8 * slot)
        check(head < q.size, f"used entry with head {head} on a queue of {q.size}")


#: struct virtio_pci_common_cfg (virtio 1.2, 4.1.4.3): name -> (offset, size)
_COMMON = {
    "device_feature_select": (0, 4), "device_feature": (4, 4),
    "driver_feature_select": (8, 4), "driver_feature": (12, 4),
    "config_msix_vector": (16, 2), "num_queues": (18, 2), "device_status": (20, 1),
    "config_generation": (21, 1), "queue_select": (22, 2), "queue_size": (24, 2),
    "queue_msix_vector": (26, 2), "queue_enable": (28, 2), "queue_notify_off": (30, 2),
    "queue_desc": (32, 8), "queue_driver": (40, 8), "queue_device": (48, 8),
    "queue_notify_data": (56, 2), "queue_reset": (58, 2),
}


def register_ops(fdp: Provider, count: int, ports: int,
                 widths: Sequence[int] = (1, 1, 1, 1, 2, 4)) -> list[tuple[bool, int, int, int]]:
    """A fuzzer-chosen sequence of (is_write, offset, width, value) register accesses."""
    ops: list[tuple[bool, int, int, int]] = []
    for _ in range(count):
        if fdp.remaining_bytes() == 0:
            break
        write = fdp.ConsumeBool()
        off = fdp.ConsumeIntInRange(0, ports - 1)
        width = widths[fdp.ConsumeIntInRange(0, len(widths) - 1)]
        value = fdp.ConsumeUInt(width) if write else 0
        ops.append((write, off, width, value))
    return ops
