"""virtio-net (virtio 1.2, 5.1): a NIC whose host side is a ``NetBackend``.

Queues: receiveq 0, transmitq 1, controlq 2 (one queue pair: no MQ, the VMM
has one device I/O thread, so more pairs would only interleave on it). The
header is always the 12-byte ``virtio_net_hdr_v1`` (VERSION_1 is required).

Features: MAC, STATUS (``set_link``), MRG_RXBUF, CTRL_VQ with CTRL_RX,
CTRL_RX_EXTRA and CTRL_MAC_ADDR; with a backend that carries the header
(``vnet_hdr``, a TAP): CSUM, HOST_TSO4/6, HOST_ECN (segments the guest sends
pass through to the host unsegmented), GUEST_CSUM, GUEST_TSO4/6, GUEST_ECN
and CTRL_GUEST_OFFLOADS (the host sends the guest only what it negotiated:
``backend.set_offloads``). No UFO: Linux stopped producing UFO in 4.14 and a
TAP would only hand us what the guest could not take anyway.

Transmit: each chain is one frame. Its header is copied and checked (flags,
gso_type known and negotiated, csum_start/csum_offset and hdr_len inside the
frame, 12+14 <= length <= 12+65550); the copy is what the backend gets, so a
guest cannot change the header after the check. The data goes to
``backend.send`` as views of guest memory (one ``writev``). A bad frame is
dropped and counted. At most ``TX_BUDGET`` frames per pass (then
``requeue``), popped in one batch (``SplitQueue.pop_many``). When the backend
is full the chain and the rest of its batch are put back (``last_avail``
rewound: nothing is lost, and nothing popped survives a snapshot) and the
backend fd is watched for EPOLLOUT.

Receive: the device holds the receive chains it has popped (``_rx_bufs``)
until a frame fills them; with MRG_RXBUF it keeps enough for the largest
frame (``backend.max_frame``), popped ``_RX_BATCH`` at a time (a 64 KiB
frame takes ~43 of Linux's buffers), and ``recv_into`` scatters straight into
guest memory; the chains a frame used are completed (num_buffers set), the rest
wait for the next frame. What a frame wrote is noted as DMA in ranges of
adjacent buffers (Linux carves them from one page frag), not per buffer.
Held chains are put back (``last_avail`` rewound) in ``quiesce``, i.e.
before any pause, snapshot or reset. Posted buffers smaller than the largest
frame in total (or more than one ``readv`` takes): the frame
goes to a bounce buffer and is copied if it fits; with MRG_RXBUF one frame
waits for more buffers (bounded: one; dropped if the whole ring could not
hold it), without it a frame that does not fit the chain is dropped. No buffers:
the backend fd leaves epoll (never spin) until the driver kicks receiveq.
Filtering (CTRL_RX, MAC tables of at most ``MAC_TABLE_MAX`` entries each)
starts promiscuous, as QEMU's does.

Threads: queue work and the backend watch run on the device I/O loop, never
concurrently; ``set_link`` and ``config_space`` (vCPU threads, the API) take
``_lock``; ``metrics`` reads plain counters and ``backend.stats()`` from the
caller's thread. ``set_offloads`` also runs in ``activate``/``restore_state``
(vCPU or main thread), while the queue work is stopped. The device never
closes its backend (the VM's resources own it).
"""

from __future__ import annotations

import logging
import select
import struct
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from pyvirt.devices.guestlog import guest_faults
from pyvirt.memory import GuestMemory
from pyvirt.net.backend import VNET_HDR_LEN, NetBackend, NetBackendError
from pyvirt.virtio import DEVICE_ID_NET
from pyvirt.virtio.device import (
    Completions,
    FdWatch,
    Transport,
    VirtioDevice,
    copy_from_chain,
    serve_queue,
)
from pyvirt.virtio.queue import Chain, SplitQueue

__all__ = [
    "CTRL_ERR",
    "CTRL_OK",
    "MAC_TABLE_MAX",
    "RX_BUDGET",
    "TX_BUDGET",
    "NetDevice",
    "NetState",
]

log = logging.getLogger(__name__)

RX, TX, CTRL = 0, 1, 2
QUEUE_SIZE = 256

# feature bits (5.1.3)
F_CSUM = 0
F_GUEST_CSUM = 1
F_CTRL_GUEST_OFFLOADS = 2
F_MAC = 5
F_GUEST_TSO4 = 7
F_GUEST_TSO6 = 8
F_GUEST_ECN = 9
F_GUEST_UFO = 10
F_HOST_TSO4 = 11
F_HOST_TSO6 = 12
F_HOST_ECN = 13
F_MRG_RXBUF = 15
F_STATUS = 16
F_CTRL_VQ = 17
F_CTRL_RX = 18
F_CTRL_RX_EXTRA = 20
F_CTRL_MAC_ADDR = 23

_BASE_FEATURES = sum(1 << b for b in (F_MAC, F_STATUS, F_MRG_RXBUF, F_CTRL_VQ, F_CTRL_RX,
                                      F_CTRL_RX_EXTRA, F_CTRL_MAC_ADDR))
_OFFLOAD_FEATURES = sum(1 << b for b in (F_CSUM, F_GUEST_CSUM, F_HOST_TSO4, F_HOST_TSO6,
                                         F_HOST_ECN, F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN,
                                         F_CTRL_GUEST_OFFLOADS))
#: what CTRL_GUEST_OFFLOADS_SET may name (5.1.6.5.6.1): the GUEST_* bits we offer
GUEST_OFFLOADS = sum(1 << b for b in (F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN))

STATUS_LINK_UP = 1

# struct virtio_net_hdr_v1 (5.1.6)
_HDR = struct.Struct("<BBHHHHH")
_U16 = struct.Struct("<H")
HDR_F_NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6 = 0, 1, 3, 4
GSO_ECN = 0x80
ETH_HLEN = 14
#: the largest frame a driver may send (64 KiB of GSO payload plus an Ethernet header)
TX_MAX_FRAME = 65550
TX_MIN = VNET_HDR_LEN + ETH_HLEN
TX_MAX = VNET_HDR_LEN + TX_MAX_FRAME
BROADCAST = b"\xff" * 6

# control queue (5.1.6.5)
CTRL_OK, CTRL_ERR = 0, 1
CLASS_RX, CLASS_MAC, CLASS_GUEST_OFFLOADS = 0, 1, 5
RX_PROMISC, RX_ALLMULTI, RX_ALLUNI, RX_NOMULTI, RX_NOUNI, RX_NOBCAST = range(6)
MAC_TABLE_SET, MAC_ADDR_SET = 0, 1
GUEST_OFFLOADS_SET = 0
#: entries per MAC filter table (unicast, multicast); a larger table is refused
MAC_TABLE_MAX = 64
#: the longest control command read: class, command, two full tables
_CTRL_MAX = 2 + 2 * (4 + 6 * MAC_TABLE_MAX)
_RX_MODES = ("promisc", "allmulti", "alluni", "nomulti", "nouni", "nobcast")

#: frames per pass of the loop (a flood from either side must not hog it)
TX_BUDGET = 64
RX_BUDGET = 64
#: receive chains popped per read of the available ring
_RX_BATCH = 16

_EPOLLIN, _EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
#: the most buffers one readv takes (Linux's IOV_MAX); more (tiny buffers): bounced
_IOV_MAX = 1024
_EPOLL_GONE = select.EPOLLERR | select.EPOLLHUP


@dataclass(frozen=True)
class NetState:
    """virtio-net: the link as set by the host, the MAC the driver set, the
    receive filter (mode flags and MAC tables) and the guest offloads in force.
    Receive chains the device held are back in the ring (``quiesce``); a frame
    waiting for buffers is not kept."""

    version: int
    link_up: bool
    mac: bytes
    promisc: bool
    allmulti: bool
    alluni: bool
    nomulti: bool
    nouni: bool
    nobcast: bool
    uni: tuple[bytes, ...]
    multi: tuple[bytes, ...]
    offloads: int


class NetDevice(VirtioDevice):
    """See the module docstring."""

    device_id = DEVICE_ID_NET
    pci_class = 0x020000  # network controller, Ethernet
    STATE_VERSION: ClassVar[int] = 1
    state_type: ClassVar[type[NetState]] = NetState

    def __init__(self, backend: NetBackend, *, mac: bytes, name: str,
                 link_up: bool = True) -> None:
        if len(mac) != 6:
            raise ValueError("a MAC address is 6 bytes")
        super().__init__([QUEUE_SIZE, QUEUE_SIZE, 64])
        self.name = name
        self.backend = backend
        self._vnet = backend.vnet_hdr
        self.features = _BASE_FEATURES | (_OFFLOAD_FEATURES if self._vnet else 0)
        self._conf_mac = bytes(mac)
        # guest bytes for the largest frame: a bare backend's frames get our header
        self._extra = 0 if self._vnet else VNET_HDR_LEN
        self._need = backend.max_frame + self._extra
        self._bounce = bytearray(backend.max_frame)
        self._bounce_views = [memoryview(self._bounce)]
        # _lock guards what other threads touch: the link, the MAC and transport
        # as config_space/set_link see them
        self._lock = threading.Lock()
        self._link_req = link_up
        self._failed = False  # the backend is gone for good (NetBackendError)
        self._mac = self._conf_mac
        # loop-thread state (and reset/restore/quiesce, with the queue work stopped)
        self._watch: FdWatch | None = None
        self._events = 0
        self._rx_on = False  # EPOLLIN wanted: the guest has (or may have) buffers
        self._tx_blocked = False  # the backend was full: waiting for EPOLLOUT
        self._tx_len = 0  # data bytes of the frame _tx_frame returned last
        self._rxq: SplitQueue | None = None
        self._txq: SplitQueue | None = None
        self._ctrlq: SplitQueue | None = None
        #: popped receive chains not used yet: (head, views, bytes, spans), in pop order
        self._rx_bufs: deque[tuple[int, list[memoryview], int, list[tuple[int, int]]]] = deque()
        self._rx_total = 0
        #: their views one after another: what a frame is read into
        self._rx_flat: list[memoryview] = []
        self._held = 0  # length of the frame waiting in the bounce buffer (0: none)
        self._mrg = False
        self._tx_csum = False
        self._tx_gso: frozenset[int] = frozenset()
        self._guest_mask = 0  # GUEST_* offloads negotiated
        self._offloads = 0  # GUEST_* offloads in force
        self._ctrl_rx = self._rx_extra = self._ctrl_mac = self._ctrl_offl = False
        self._set_rx_defaults()
        # metrics (plain counters, loop thread)
        self.rx_frames = self.rx_bytes = self.tx_frames = self.tx_bytes = 0
        self.drops: dict[str, int] = {}

    # ---- link and configuration space (any thread)

    @property
    def link_up(self) -> bool:
        """The link as the guest sees it (down also when the backend failed)."""
        return self._link_req and not self._failed

    @property
    def mac(self) -> bytes:
        return self._mac

    def set_link(self, up: bool) -> None:
        """Link up or down (any thread): the driver gets a configuration change."""
        with self._lock:
            before = self.link_up
            self._link_req = up
            changed = before != self.link_up
            transport = self.transport
        if changed and transport is not None:
            transport.config_changed()

    def config_space(self) -> bytes:
        # mac, status, max_virtqueue_pairs (5.1.4)
        with self._lock:
            return struct.pack("<6sHH", self._mac, STATUS_LINK_UP if self.link_up else 0, 1)

    # ---- life cycle

    def activate(self, transport: Transport, queues: Sequence[SplitQueue],
                 driver_features: int) -> None:
        with self._lock:
            super().activate(transport, queues, driver_features)

        def has(bit: int) -> bool:
            return bool(driver_features >> bit & 1)

        self._mrg = has(F_MRG_RXBUF)
        ctrl = has(F_CTRL_VQ)
        # features whose dependency (5.1.3.1) is missing count as not negotiated
        self._ctrl_rx = ctrl and has(F_CTRL_RX)
        self._rx_extra = self._ctrl_rx and has(F_CTRL_RX_EXTRA)
        self._ctrl_mac = ctrl and has(F_CTRL_MAC_ADDR)
        self._ctrl_offl = ctrl and has(F_CTRL_GUEST_OFFLOADS)
        self._tx_csum = has(F_CSUM)
        gso = set()
        if self._tx_csum and has(F_HOST_TSO4):
            gso.add(GSO_TCPV4)
        if self._tx_csum and has(F_HOST_TSO6):
            gso.add(GSO_TCPV6)
        if gso and has(F_HOST_ECN):
            gso |= {g | GSO_ECN for g in gso}
        self._tx_gso = frozenset(gso)
        self._guest_mask = _normalize_offloads(driver_features & GUEST_OFFLOADS)
        self._offloads = self._guest_mask
        self._rxq, self._txq = queues[RX], queues[TX]
        self._ctrlq = queues[CTRL] if ctrl else None
        self._rx_on, self._tx_blocked = True, False
        self._apply_offloads()
        if not self._failed:
            self._events = _EPOLLIN
            self._watch = transport.watch(self.backend.fileno(), self._on_backend,
                                          events=_EPOLLIN, name="backend")

    def quiesce(self, timeout: float = 30.0) -> bool:
        # the queue work is stopped: receive chains we held go back to the ring, so a
        # snapshot or a reset sees every chain either completed or available
        q = self._rxq
        if self._rx_bufs and q is not None:
            q.last_avail = (q.last_avail - len(self._rx_bufs)) & 0xFFFF
        self._rx_bufs.clear()
        self._rx_flat.clear()
        self._rx_total = 0
        return True

    def reset(self) -> None:
        with self._lock:
            super().reset()
            self._mac = self._conf_mac  # as QEMU: the configured MAC again
        self._watch = None  # the transport closed it
        self._events = 0
        self._rxq = self._txq = self._ctrlq = None
        self._rx_bufs.clear()
        self._rx_flat.clear()
        self._rx_total = 0
        self._held = 0
        self._rx_on = self._tx_blocked = False
        self._mrg = self._tx_csum = False
        self._tx_gso = frozenset()
        self._guest_mask = self._offloads = 0
        self._ctrl_rx = self._rx_extra = self._ctrl_mac = self._ctrl_offl = False
        self._set_rx_defaults()

    def _set_rx_defaults(self) -> None:
        self._promisc = True  # until the driver says otherwise (QEMU does the same)
        self._allmulti = self._alluni = self._nomulti = self._nouni = self._nobcast = False
        self._uni: frozenset[bytes] = frozenset()
        self._multi: frozenset[bytes] = frozenset()
        self._uni_list: tuple[bytes, ...] = ()
        self._multi_list: tuple[bytes, ...] = ()

    # ---- the backend

    def _apply_offloads(self) -> None:
        if not self._vnet or self._failed:
            return
        o = self._offloads
        try:
            self.backend.set_offloads(csum=bool(o >> F_GUEST_CSUM & 1),
                                      tso4=bool(o >> F_GUEST_TSO4 & 1),
                                      tso6=bool(o >> F_GUEST_TSO6 & 1),
                                      ecn=bool(o >> F_GUEST_ECN & 1), ufo=False)
        except NetBackendError as exc:
            self._fail(str(exc))

    def _fail(self, why: str) -> None:
        """The backend is gone for good: link down, stop watching it; the VM goes on."""
        with self._lock:
            if self._failed:
                return
            was_up = self.link_up
            self._failed = True
            transport = self.transport
        log.warning("%s: host side %s failed (%s); the link is down", self.name,
                    self.backend.name, why)
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.close()
        self._events = 0
        if was_up and transport is not None:
            transport.config_changed()

    def _update_events(self) -> None:
        ev = (_EPOLLIN if self._rx_on else 0) | (_EPOLLOUT if self._tx_blocked else 0)
        if ev != self._events and self._watch is not None:
            self._events = ev
            self._watch.set_events(ev)

    def _on_backend(self, events: int) -> None:
        if events & _EPOLL_GONE:
            self._fail("it hung up")
            return
        if events & _EPOLLOUT and self._tx_blocked:
            self._tx_blocked = False
            self._update_events()
            if self._txq is not None:
                self._tx_pass(self._txq)
        if events & _EPOLLIN:
            self._rx_pass()

    def _drop(self, why: str) -> None:
        self.drops[why] = self.drops.get(why, 0) + 1

    # ---- queue work

    def process(self, queue: SplitQueue) -> None:
        index = queue.index
        if index == TX:
            self._tx_pass(queue)
        elif index == RX:
            if not self._rx_on:  # buffers again: watch the backend again
                self._rx_on = True
                self._update_events()
            self._rx_pass()
        elif index == CTRL and self._ctrlq is not None and self.transport is not None:
            transport = self.transport
            serve_queue(transport, queue, self.name, lambda c: self._control(transport, c))

    # ---- transmit

    def _tx_pass(self, q: SplitQueue) -> None:
        transport = self.transport
        if transport is None or self._tx_blocked or not q.ready:
            return
        mem = transport.memory
        backend = self.backend
        out = Completions(transport, q)
        batch: list[Chain] = []
        taken = 0  # chains of batch handled
        served = 0
        try:
            while served < TX_BUDGET:
                if taken == len(batch):
                    # one read of the ring for all that waits (within the budget)
                    batch, taken = q.pop_many(TX_BUDGET - served), 0
                    if not batch:
                        if q.enable_notifications():
                            served += 1  # bounded even against a guest that races us
                            continue  # more came while notifications were off
                        break
                chain = batch[taken]
                taken += 1
                served += 1
                if chain.error is not None:
                    guest_faults.warning(log, self.name, "%s: bad transmit chain: %s",
                                         self.name, chain.error)
                    transport.note_error()
                    out.add(chain.head, 0)
                    continue
                bufs = self._tx_frame(mem, chain)
                if bufs is None:
                    out.add(chain.head, 0)
                    continue
                if not self._link_req or self._failed:
                    self._drop("tx_link_down")
                    out.add(chain.head, 0)
                    continue
                try:
                    sent = backend.send(bufs)
                except NetBackendError as exc:
                    out.add(chain.head, 0)
                    self._drop("tx_backend_failed")
                    self._fail(str(exc))
                    continue  # the rest is dropped as link-down frames
                if not sent:
                    # full: this chain and the rest of the batch go back to the ring
                    # and wait for EPOLLOUT
                    q.last_avail = (q.last_avail - (len(batch) - taken + 1)) & 0xFFFF
                    self._tx_blocked = True
                    self._update_events()
                    break
                self.tx_frames += 1
                self.tx_bytes += self._tx_len
                out.add(chain.head, 0)
            else:
                transport.requeue(q)  # budget spent: the loop serves others first
        finally:
            out.flush()

    def _tx_frame(self, mem: GuestMemory, chain: Chain) -> list[memoryview] | None:
        """The frame's buffers for ``backend.send`` (a checked copy of the header
        first with ``vnet_hdr``), or None when it is dropped (counted)."""
        rd = chain.readable
        total = 0
        for _, n in rd:
            total += n
        if not TX_MIN <= total <= TX_MAX:
            self._bad_tx("tx_bad_length", f"frame of {total} bytes")
            return None
        view = mem.view
        a, n = rd[0]
        if n >= VNET_HDR_LEN:
            first = view(a, n)
            hdr = bytes(first[:VNET_HDR_LEN])
            data = [first[VNET_HDR_LEN:]] if n > VNET_HDR_LEN else []
            for a, n in rd[1:]:
                data.append(view(a, n))
        else:  # the header spans buffers (any layout is legal, 5.1.6.6)
            data = [view(a, n) for a, n in rd]
            hdr = _take(data, VNET_HDR_LEN)
        flags, gso, hdr_len, gso_size, csum_start, csum_off, _ = _HDR.unpack(hdr)
        dlen = total - VNET_HDR_LEN
        if (flags or gso or hdr_len) and not self._tx_header_ok(
                flags, gso, hdr_len, gso_size, csum_start, csum_off, dlen):
            return None
        self._tx_len = dlen
        if self._vnet:
            data.insert(0, memoryview(hdr))
        return data

    def _tx_header_ok(self, flags: int, gso: int, hdr_len: int, gso_size: int,
                      csum_start: int, csum_off: int, dlen: int) -> bool:
        if flags & ~HDR_F_NEEDS_CSUM:
            return self._bad_tx("tx_bad_header", f"header flags {flags:#x}")
        if flags & HDR_F_NEEDS_CSUM:
            if not self._tx_csum:
                return self._bad_tx("tx_bad_header", "checksum offload not negotiated")
            if csum_start + csum_off + 2 > dlen:
                return self._bad_tx("tx_bad_header", f"checksum at {csum_start}+{csum_off} "
                                    f"outside a {dlen}-byte frame")
        if gso:
            if gso not in self._tx_gso:
                return self._bad_tx("tx_bad_header", f"gso_type {gso:#x} not negotiated")
            if not gso_size:
                return self._bad_tx("tx_bad_header", "gso_size 0")
        if hdr_len > dlen:
            return self._bad_tx("tx_bad_header", f"hdr_len {hdr_len} beyond a {dlen}-byte "
                                "frame")
        return True

    def _bad_tx(self, why: str, what: str) -> bool:
        self._drop(why)
        guest_faults.warning(log, self.name, "%s: transmitted frame dropped: %s", self.name,
                             what)
        return False

    # ---- receive

    def _fill_rx(self, q: SplitQueue, out: Completions) -> int:
        """Pop receive chains until the held ones can take the largest frame (one
        chain without MRG_RXBUF) or the ring is empty; returns the bytes held."""
        bufs = self._rx_bufs
        total = self._rx_total
        need = self._need if self._mrg else 1
        flat = self._rx_flat
        view = out.transport.memory.view
        while total < need and len(bufs) < q.size:
            # a few chains per read of the ring: a 64 KiB frame takes ~43 mergeable
            # buffers (the few more held than needed serve the next frame); without
            # MRG_RXBUF a frame fills one chain: one at a time
            room = q.size - len(bufs) if self._mrg else 1
            batch = q.pop_many(room if room < _RX_BATCH else _RX_BATCH)
            if not batch:
                if q.enable_notifications():
                    continue
                break
            for chain in batch:
                spans = chain.writable
                if len(spans) == 1 and chain.error is None:  # a mergeable buffer
                    a, size = spans[0]
                    v = view(a, size)
                    bufs.append((chain.head, [v], size, spans))
                    flat.append(v)
                    total += size
                else:
                    total = self._hold(chain, out, total)
        self._rx_total = total
        return total

    def _hold(self, chain: Chain, out: Completions, total: int) -> int:
        """Hold a popped receive chain of several buffers; a bad one is completed
        unused, and so are the held ones before it. Returns the bytes held."""
        bufs = self._rx_bufs
        flat = self._rx_flat
        transport = out.transport
        if chain.error is not None or not chain.writable:
            if chain.error is not None:
                guest_faults.warning(log, self.name, "%s: bad receive chain: %s",
                                     self.name, chain.error)
            else:
                guest_faults.warning(log, self.name, "%s: receive chain without "
                                     "device-writable buffers", self.name)
            transport.note_error()
            # the held chains cannot be put back behind this one: return them unused
            for entry in bufs:
                out.add(entry[0], 0)
            bufs.clear()
            flat.clear()
            out.add(chain.head, 0)
            return 0
        spans = chain.writable
        views = [transport.memory.view(a, n) for a, n in spans]
        size = 0
        for _, n in spans:
            size += n
        bufs.append((chain.head, views, size, spans))
        flat += views
        return total + size

    def _rx_pass(self) -> None:
        q = self._rxq
        transport = self.transport
        if q is None or transport is None or self._failed or not q.ready:
            return
        out = Completions(transport, q)
        backend = self.backend
        try:
            for _ in range(RX_BUDGET):
                if not self._link_req:  # link down: frames from the host are dropped
                    if self._held:
                        self._held = 0
                        self._drop("rx_link_down")
                    if backend.recv_into(self._bounce_views) is None:
                        break
                    self._drop("rx_link_down")
                    continue
                if self._held:
                    if not self._deliver_bounce(q, out, self._held):
                        break  # still waiting for buffers
                    continue
                avail = self._fill_rx(q, out)
                if avail == 0:
                    self._rx_on = False  # no buffers: stop watching until a kick
                    self._update_events()
                    break
                if avail >= self._need and len(self._rx_flat) <= _IOV_MAX:
                    if not self._rx_direct(q, out, avail):
                        break
                    continue
                n = backend.recv_into(self._bounce_views)
                if n is None:
                    break
                if not self._rx_check(n, self._bounce, self._extra):
                    continue
                if not self._deliver_bounce(q, out, n):
                    break
        except NetBackendError as exc:
            self._fail(str(exc))
        finally:
            out.flush()

    def _rx_direct(self, q: SplitQueue, out: Completions, avail: int) -> bool:
        """One frame scattered straight into the held chains; False: none waited."""
        views = self._rx_flat
        got = avail
        extra = self._extra
        target = _skip(views, extra) if extra else views
        n = self.backend.recv_into(target)
        if n is None:
            return False
        if n + extra > got:  # cannot happen with max_frame honoured: cut, drop it
            self._drop("rx_too_big")
            return True
        if n + extra < VNET_HDR_LEN + ETH_HLEN:
            self._drop("rx_runt")
            return True
        if not self._promisc:
            first = views[0]
            dst = bytes(first[VNET_HDR_LEN:VNET_HDR_LEN + 6]) if len(first) >= 18 else (
                _peek(views, VNET_HDR_LEN, 6))
            if not self._accept(dst):
                self._drop("rx_filtered")
                return True
        self._use(q, out, n + extra)
        return True

    def _rx_check(self, n: int, frame: bytearray, extra: int) -> bool:
        """A frame read into the bounce buffer: may it go to the guest?"""
        if n > len(frame):
            self._drop("rx_too_big")
            return False
        off = VNET_HDR_LEN - extra  # where the Ethernet header starts
        if n < off + ETH_HLEN:
            self._drop("rx_runt")
            return False
        if not self._promisc and not self._accept(bytes(frame[off:off + 6])):
            self._drop("rx_filtered")
            return False
        return True

    def _deliver_bounce(self, q: SplitQueue, out: Completions, n: int) -> bool:
        """Copy the bounced frame (``n`` bytes) into held chains. False: it waits for
        buffers (the one held frame; the backend is not read meanwhile); True: it was
        delivered, or dropped because no buffer the guest can post would hold it."""
        g = n + self._extra
        avail = self._fill_rx(q, out)
        if avail < g:
            if avail == 0 or (self._mrg and len(self._rx_bufs) < q.size):
                self._held = n
                self._rx_on = False  # until the driver kicks receiveq
                self._update_events()
                return False
            # without MRG_RXBUF one chain must hold it; with it, the whole ring could not
            self._drop("rx_no_room")
            self._held = 0
            return True
        _scatter(self._rx_flat, self._extra, memoryview(self._bounce)[:n])
        self._use(q, out, g)
        self._held = 0
        return True

    def _use(self, q: SplitQueue, out: Completions, g: int) -> None:
        """The frame (``g`` guest bytes, header included) fills the first held chains:
        set num_buffers (and the whole header for a bare backend) and complete them."""
        bufs = self._rx_bufs
        flat = self._rx_flat
        note = out.transport.note_dma_write
        rem = g
        nviews = 0
        dma_start = dma_end = 0
        done: list[tuple[int, int]] = []
        while rem > 0:
            head, views, size, spans = bufs.popleft()
            w = size if size < rem else rem
            self._rx_total -= size
            rem -= w
            nviews += len(views)
            done.append((head, w))
            left = w
            for a, n in spans:
                if left <= 0:
                    break
                m = n if n < left else left
                left -= n
                # adjacent buffers (Linux carves them from one page frag) are one
                # range: each range costs the software CPU a code-cache lookup
                if a == dma_end:
                    dma_end += m
                else:
                    if dma_end:
                        note(dma_start, dma_end - dma_start)
                    dma_start, dma_end = a, a + m
        if dma_end:
            note(dma_start, dma_end - dma_start)
        k = len(done)
        first = flat[0]
        if self._vnet:  # the backend wrote the rest of the header
            if len(first) >= VNET_HDR_LEN:
                first[10:12] = _U16.pack(k)
            else:
                _scatter(flat, 10, memoryview(_U16.pack(k)))
        elif len(first) >= VNET_HDR_LEN:
            first[:VNET_HDR_LEN] = _HDR.pack(0, 0, 0, 0, 0, 0, k)
        else:
            _scatter(flat, 0, memoryview(_HDR.pack(0, 0, 0, 0, 0, 0, k)))
        del flat[:nviews]
        for head, w in done:
            out.add(head, w)
        self.rx_frames += 1
        self.rx_bytes += g - VNET_HDR_LEN

    def _accept(self, dst: bytes) -> bool:
        """The receive filter (5.1.6.5.1, 5.1.6.5.2), in QEMU's order."""
        if dst[0] & 1:
            if dst == BROADCAST:
                return not self._nobcast
            if self._nomulti:
                return False
            return self._allmulti or dst in self._multi
        if self._nouni:
            return False
        return self._alluni or dst == self._mac or dst in self._uni

    # ---- the control queue

    def _control(self, transport: Transport, chain: Chain) -> int:
        if not chain.writable:
            guest_faults.warning(log, self.name, "%s: control command without room for "
                                 "the ack", self.name)
            transport.note_error()
            return 0
        n = chain.readable_len
        ack = CTRL_ERR
        if 2 <= n <= _CTRL_MAX:
            raw = copy_from_chain(transport.memory, chain)
            ack = self._command(raw[0], raw[1], raw[2:])
        if ack != CTRL_OK:
            transport.note_error()
        addr = chain.writable[0][0]
        transport.memory.write_u8(addr, ack)
        transport.note_dma_write(addr, 1)
        return 1

    def _command(self, cls: int, cmd: int, data: bytes) -> int:
        if cls == CLASS_RX and self._ctrl_rx:
            if len(data) != 1 or cmd > RX_NOBCAST or (cmd > RX_ALLMULTI and not self._rx_extra):
                return CTRL_ERR
            setattr(self, "_" + _RX_MODES[cmd], bool(data[0]))
            return CTRL_OK
        if cls == CLASS_MAC and cmd == MAC_TABLE_SET and self._ctrl_rx:
            tables = _parse_mac_tables(data)
            if tables is None:
                return CTRL_ERR
            self._uni_list, self._multi_list = tables
            self._uni, self._multi = frozenset(tables[0]), frozenset(tables[1])
            return CTRL_OK
        if cls == CLASS_MAC and cmd == MAC_ADDR_SET and self._ctrl_mac:
            if len(data) != 6:
                return CTRL_ERR
            with self._lock:
                self._mac = bytes(data)
            return CTRL_OK
        if cls == CLASS_GUEST_OFFLOADS and cmd == GUEST_OFFLOADS_SET and self._ctrl_offl:
            if len(data) != 8:
                return CTRL_ERR
            (want,) = struct.unpack("<Q", data)
            if want & ~self._guest_mask:
                return CTRL_ERR  # only what was negotiated (5.1.6.5.6.1)
            self._offloads = _normalize_offloads(want)
            self._apply_offloads()
            return CTRL_ERR if self._failed else CTRL_OK
        return CTRL_ERR

    # ---- saved state and metrics

    def save_state(self) -> NetState:
        return NetState(self.STATE_VERSION, self._link_req, self._mac, self._promisc,
                        self._allmulti, self._alluni, self._nomulti, self._nouni,
                        self._nobcast, self._uni_list, self._multi_list, self._offloads)

    def check_state(self, state: NetState) -> None:
        from pyvirt.devices.statecheck import check_bits, check_bool, check_bytes, check_int

        super().check_state(state)
        for name in ("link_up", *_RX_MODES):
            check_bool(self.name, name, getattr(state, name))
        check_bytes(self.name, "mac", state.mac, length=6)
        for name in ("uni", "multi"):
            table = getattr(state, name)
            if not isinstance(table, tuple):
                check_bytes(self.name, name, table)  # names the wrong type
            check_int(self.name, f"len({name})", len(table), 0, MAC_TABLE_MAX)
            for i, entry in enumerate(table):
                check_bytes(self.name, f"{name}[{i}]", entry, length=6)
        check_bits(self.name, "offloads", state.offloads, GUEST_OFFLOADS)

    def restore_state(self, state: NetState) -> None:
        """After ``activate`` when the record is DRIVER_OK, else after ``reset``."""
        self.check_state(state)
        with self._lock:
            self._link_req = state.link_up
            self._mac = bytes(state.mac)
        for name in _RX_MODES:
            setattr(self, "_" + name, getattr(state, name))
        self._uni_list = tuple(bytes(m) for m in state.uni)
        self._multi_list = tuple(bytes(m) for m in state.multi)
        self._uni, self._multi = frozenset(self._uni_list), frozenset(self._multi_list)
        if self.transport is not None:
            self._offloads = _normalize_offloads(state.offloads & self._guest_mask)
            self._apply_offloads()

    def metrics(self) -> dict[str, int]:
        out = {"rx_frames": self.rx_frames, "rx_bytes": self.rx_bytes,
               "tx_frames": self.tx_frames, "tx_bytes": self.tx_bytes,
               "link_up": int(self.link_up)}
        for why, n in list(self.drops.items()):
            out[f"dropped_{why}"] = n
        for key, value in self.backend.stats().items():
            out[f"backend_{key}"] = value
        return out


# ---- helpers -----------------------------------------------------------------------


def _normalize_offloads(bits: int) -> int:
    """Drop GUEST_* offloads whose dependency is missing (5.1.3.1): TSO needs
    GUEST_CSUM, ECN needs TSO."""
    if not bits >> F_GUEST_CSUM & 1:
        bits &= ~(1 << F_GUEST_TSO4 | 1 << F_GUEST_TSO6)
    if not bits & (1 << F_GUEST_TSO4 | 1 << F_GUEST_TSO6):
        bits &= ~(1 << F_GUEST_ECN)
    return bits


def _parse_mac_tables(data: bytes) -> tuple[tuple[bytes, ...], tuple[bytes, ...]] | None:
    """struct virtio_net_ctrl_mac twice (unicast, multicast), each at most
    ``MAC_TABLE_MAX`` entries, and nothing after them; None if not."""
    tables: list[tuple[bytes, ...]] = []
    off = 0
    for _ in range(2):
        if off + 4 > len(data):
            return None
        (count,) = struct.unpack_from("<I", data, off)
        off += 4
        if count > MAC_TABLE_MAX or off + 6 * count > len(data):
            return None
        tables.append(tuple(data[off + 6 * i:off + 6 * i + 6] for i in range(count)))
        off += 6 * count
    if off != len(data):
        return None
    return tables[0], tables[1]


def _skip(views: list[memoryview], n: int) -> list[memoryview]:
    """``views`` without their first ``n`` bytes."""
    out = list(views)
    while n and out:
        first = out[0]
        if len(first) > n:
            out[0] = first[n:]
            return out
        n -= len(first)
        del out[0]
    return out


def _take(views: list[memoryview], n: int) -> bytes:
    """Remove and return the first ``n`` bytes of ``views`` (in place)."""
    got = bytearray()
    while len(got) < n and views:
        first = views[0]
        k = min(n - len(got), len(first))
        got += first[:k]
        if k == len(first):
            del views[0]
        else:
            views[0] = first[k:]
    return bytes(got)


def _peek(views: Sequence[memoryview], off: int, n: int) -> bytes:
    got = bytearray()
    for v in views:
        if off >= len(v):
            off -= len(v)
            continue
        got += v[off:off + n - len(got)]
        off = 0
        if len(got) >= n:
            break
    return bytes(got)


def _scatter(views: Sequence[memoryview], off: int, src: memoryview) -> None:
    """Copy ``src`` into ``views`` from byte ``off`` on (the caller checked the room)."""
    done = 0
    for v in views:
        if done >= len(src):
            return
        size = len(v)
        if off >= size:
            off -= size
            continue
        k = min(size - off, len(src) - done)
        v[off:off + k] = src[done:done + k]
        done += k
        off = 0
