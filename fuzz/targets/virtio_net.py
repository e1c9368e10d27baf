"""virtio-net (``NetDevice``) behind the real virtio-pci transport: fuzzer-chosen
features, queues and rings (transmit frames with any header, receive chains of any
shape, control commands), a host side that delivers fuzzer-chosen frames (up to
the largest a TAP can), refuses sends (full) or fails for good, and link changes.
One device with a vnet-header backend (a TAP's offloads) and one without (passt's).

Documented outcomes: a transmitted frame leaves only with a header a device may
pass on (checked here against a model written apart from the device), bad frames
and chains are dropped or completed with 0, at most one receive frame is held,
held receive chains never exceed the ring, ``QueueBroken`` → NEEDS_RESET,
``NetBackendError`` → the link goes down."""

from __future__ import annotations

import functools
import struct
from collections import deque
from collections.abc import Sequence

from fuzz.common import Provider, VirtioHarness, check, check_used
from pyvirt.net.backend import VNET_HDR_LEN, NetBackendError
from pyvirt.virtio import STATUS_FEATURES_OK
from pyvirt.virtio.device import QueueWorker
from pyvirt.virtio.net import (
    F_CSUM,
    F_HOST_ECN,
    F_HOST_TSO4,
    F_HOST_TSO6,
    RX_BUDGET,
    TX_BUDGET,
    NetDevice,
)

_EPOLLIN, _EPOLLOUT, _EPOLLHUP = 0x001, 0x004, 0x010


def _header_ok(hdr: bytes, dlen: int, features: int) -> bool:
    """What a transmitted header must be (virtio 1.2, 5.1.6.2), apart from the device."""
    flags, gso, hdr_len, gso_size, cs, co, _ = struct.unpack("<BBHHHHH", hdr)
    csum = bool(features >> F_CSUM & 1)
    if not 14 <= dlen <= 65550 or flags & ~1 or hdr_len > dlen:
        return False
    if flags & 1 and (not csum or cs + co + 2 > dlen):
        return False
    if gso:
        bit = {1: F_HOST_TSO4, 4: F_HOST_TSO6}.get(gso & 0x7F)
        if bit is None or not csum or not features >> bit & 1 or not gso_size:
            return False
        if gso & 0x80 and not features >> F_HOST_ECN & 1:
            return False
    return True


class _Backend:
    """A host side whose frames, room and failure the fuzzer chooses."""

    def __init__(self, vnet_hdr: bool, max_frame: int) -> None:
        self.name = "fuzz"
        self.vnet_hdr = vnet_hdr
        self.max_frame = max_frame
        self.frames: deque[bytes] = deque()
        self.full = False
        self.fail = False
        self.features = 0  # the driver's, for the header model
        self.sent = 0

    def fileno(self) -> int:
        return 0  # never registered: the harness runs the handlers itself

    def recv_into(self, bufs: Sequence[memoryview]) -> int | None:
        if self.fail:
            raise NetBackendError("fuzz: gone")
        if not self.frames:
            return None
        frame = self.frames.popleft()
        done = 0
        for b in bufs:
            k = min(len(b), len(frame) - done)
            b[:k] = frame[done:done + k]
            done += k
        return len(frame)

    def send(self, bufs: Sequence[memoryview]) -> bool:
        if self.fail:
            raise NetBackendError("fuzz: gone")
        if self.full:
            return False
        data = b"".join(bufs)
        check(len(data) <= 65550 + VNET_HDR_LEN, f"a {len(data)}-byte frame sent")
        if self.vnet_hdr:
            check(_header_ok(data[:VNET_HDR_LEN], len(data) - VNET_HDR_LEN, self.features),
                  f"frame sent with header {data[:VNET_HDR_LEN].hex()}")
        else:
            check(14 <= len(data) <= 65550, f"a bare frame of {len(data)} bytes")
            if len(data) > self.max_frame:
                return True  # what the host refuses counts as sent (and dropped)
        self.sent += 1
        return True

    def set_offloads(self, *, csum: bool, tso4: bool, tso6: bool, ecn: bool,
                     ufo: bool) -> None:
        check(self.vnet_hdr, "offloads set on a backend without a vnet header")
        check(not ufo, "UFO asked for")
        if self.fail:
            raise NetBackendError("fuzz: gone")

    def stats(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass


_MAC = bytes.fromhex("525400123456")
# the bare one with a small largest frame, so that the few KiB of receive buffers the
# harness posts are enough to read into them directly (the vnet one bounces)
_backends = (_Backend(True, 65550 + VNET_HDR_LEN), _Backend(False, 1514))
_devices = tuple(NetDevice(b, mac=_MAC, name="virtio-net") for b in _backends)
_harnesses = tuple(VirtioHarness(d) for d in _devices)


def _frame(fdp: Provider) -> bytes:
    kind = fdp.ConsumeIntInRange(0, 5)
    size = (fdp.ConsumeIntInRange(0, 80), fdp.ConsumeIntInRange(0, 2000),
            fdp.ConsumeIntInRange(60000, 65600), fdp.ConsumeIntInRange(0, 70000),
            1514, 65562)[kind]
    dst = (_MAC, b"\xff" * 6, bytes.fromhex("01005e000001"),
           bytes.fromhex("525400abcdef"))[fdp.ConsumeIntInRange(0, 3)]
    head = fdp.ConsumeBytes(12) + dst
    return (head + bytes(max(0, size - len(head))))[:size]


def one_input(data: bytes) -> None:
    fdp = Provider(data)
    which = fdp.ConsumeIntInRange(0, 1)
    harness, device, backend = _harnesses[which], _devices[which], _backends[which]
    backend.frames.clear()
    backend.fail = backend.full = False
    device._failed = False  # a fresh backend for each input
    device.set_link(True)
    frames = [_frame(fdp) for _ in range(fdp.ConsumeIntInRange(0, 6))]
    harness_run(harness, device, backend, fdp, frames)


def harness_run(harness: VirtioHarness, device: NetDevice, backend: _Backend, fdp: Provider,
                frames: list[bytes]) -> None:
    """``VirtioHarness.run`` with the transport's worker in place before activation
    (the device watches its backend from ``activate`` on), and the backend's events
    delivered by hand between queue passes."""
    pci = harness.pci
    queues = harness.set_up(fdp)
    if not pci.status & STATUS_FEATURES_OK:
        return
    backend.features = pci.driver_features
    worker = QueueWorker("fuzz-io", device, pci.queues, pci.notify_fds, pci.needs_reset)
    pci._worker = worker  # what _activate does, without starting the loop
    device.activate(pci, pci.queues, pci.driver_features)
    backend.frames.extend(frames)
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        step = fdp.ConsumeIntInRange(0, 7)
        if step == 0:
            backend.full = not backend.full
        elif step == 1:
            device.set_link(fdp.ConsumeBool())
        elif step == 2 and fdp.ConsumeIntInRange(0, 3) == 0:
            backend.fail = True
        elif step == 3:
            ev = (_EPOLLIN, _EPOLLOUT, _EPOLLIN | _EPOLLOUT, _EPOLLHUP)[fdp.ConsumeIntInRange(0, 3)]
            worker.call(functools.partial(device._on_backend, ev))
        for q in queues:
            before_used = q.used_idx
            before_tx = device.tx_frames
            before_rx = device.rx_frames
            worker._process(q)
            check(device.tx_frames - before_tx <= TX_BUDGET, "transmit pass over its budget")
            check(device.rx_frames - before_rx <= RX_BUDGET, "receive pass over its budget")
            check_used(harness.mem, q, before_used)
        check(len(device._rx_bufs) <= pci.queues[0].size, "more receive chains held than exist")
        check(device._held <= backend.max_frame, "held frame larger than the largest")
    device.quiesce()
    check(not device._rx_bufs, "receive chains still held after quiesce")
