"""virtio-net driven as a guest driver would (``tests.virtio_driver``: the real PCI
transport, guest RAM, a real EventLoop on a thread) over a seqpacket socket pair
standing in for the TAP (``tests.net_fakes``), and over a real TAP in a network
namespace of its own."""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvirt.net.backend import VNET_HDR_LEN
from pyvirt.state import StateError, encode
from pyvirt.virtio import net as vnet
from pyvirt.virtio.net import MAC_TABLE_MAX, TX_BUDGET, NetDevice, NetState
from tests.net_fakes import SeqpacketBackend
from tests.virtio_driver import VirtioPciDriver, wait_for

MAC = bytes.fromhex("525400123456")
OTHER = bytes.fromhex("525400abcdef")
BCAST = b"\xff" * 6
MCAST = bytes.fromhex("01005e000001")
QUIET = 0.1  # how long to watch for something that must not happen

ALL_VNET = (1 << vnet.F_CSUM | 1 << vnet.F_GUEST_CSUM | 1 << vnet.F_HOST_TSO4
            | 1 << vnet.F_HOST_TSO6 | 1 << vnet.F_HOST_ECN | 1 << vnet.F_GUEST_TSO4
            | 1 << vnet.F_GUEST_TSO6 | 1 << vnet.F_GUEST_ECN | 1 << vnet.F_CTRL_GUEST_OFFLOADS)


def hdr(flags: int = 0, gso: int = 0, hdr_len: int = 0, gso_size: int = 0,
        csum_start: int = 0, csum_offset: int = 0, num_buffers: int = 0) -> bytes:
    return struct.pack("<BBHHHHH", flags, gso, hdr_len, gso_size, csum_start, csum_offset,
                       num_buffers)


def frame(dst: bytes = MAC, size: int = 100, seed: int = 0) -> bytes:
    body = bytes((seed + i * 7) & 0xFF for i in range(size - 14))
    return dst + OTHER + b"\x08\x00" + body


class Net:
    """The guest driver's side: receiveq, transmitq, controlq."""

    def __init__(self, drv: VirtioPciDriver, features: int | None = None, *,
                 msix: bool = True) -> None:
        self.drv = drv
        self.rx, self.tx, self.ctrl = drv.init(features, msix=msix)
        self.rx_bufs: dict[int, tuple[int, int]] = {}  # head -> (addr, size)

    @property
    def dev(self) -> NetDevice:
        dev = self.drv.device
        assert isinstance(dev, NetDevice)
        return dev

    def post(self, count: int, size: int, *, kick: bool = True) -> None:
        for _ in range(count):
            addr = self.drv.alloc(size)
            self.rx_bufs[self.rx.add([], [(addr, size)])] = (addr, size)
        if kick:
            self.rx.kick()

    def received(self, timeout: float = 5.0) -> tuple[bytes, bytes, int]:
        """One frame from receiveq: (header, frame, buffers it used)."""
        ((head, n),) = self.rx.wait_used(1, timeout)
        addr, size = self.rx_bufs.pop(head)
        assert n <= size
        data = self.drv.mem.read(addr, n)
        num = struct.unpack_from("<H", data, 10)[0]
        if self.drv.has_feature(vnet.F_MRG_RXBUF):
            for _ in range(num - 1):
                ((head, n),) = self.rx.wait_used(1, timeout)
                addr, size = self.rx_bufs.pop(head)
                data += self.drv.mem.read(addr, n)
        else:
            assert num == 1
        return data[:VNET_HDR_LEN], data[VNET_HDR_LEN:], num

    def nothing_received(self) -> bool:
        time.sleep(QUIET)
        return self.rx.pending_used() == 0

    def send(self, data: bytes, *, split: tuple[int, ...] = ()) -> int:
        """Transmit ``data`` (header included) cut at ``split``; returns the used len."""
        cuts = [0, *split, len(data)]
        parts = [data[a:b] for a, b in itertools.pairwise(cuts)]
        used, _ = self.tx.submit(parts)
        return used

    def command(self, cls: int, cmd: int, data: bytes = b"") -> int:
        _used, (ack,) = self.ctrl.submit([bytes([cls, cmd]) + data], [1])
        return ack[0]


@pytest.fixture
def backend() -> Iterator[SeqpacketBackend]:
    b = SeqpacketBackend()
    yield b
    b.close()


@pytest.fixture
def drv(backend: SeqpacketBackend) -> Iterator[VirtioPciDriver]:
    d = VirtioPciDriver(NetDevice(backend, mac=MAC, name="virtio-net"), mem_size=32 << 20,
                        ioeventfd=True)
    yield d
    d.close()


def peer_recv(backend: SeqpacketBackend) -> bytes:
    return backend.peer.recv(70000)


def peer_quiet(backend: SeqpacketBackend) -> bool:
    r, _, _ = select.select([backend.peer], [], [], QUIET)
    return not r


# ---- features and configuration ----------------------------------------------------


def test_features_and_config_space(drv: VirtioPciDriver) -> None:
    offered = drv.device_features()
    for bit in (vnet.F_MAC, vnet.F_STATUS, vnet.F_MRG_RXBUF, vnet.F_CTRL_VQ, vnet.F_CTRL_RX,
                vnet.F_CTRL_MAC_ADDR, vnet.F_CSUM, vnet.F_HOST_TSO4, vnet.F_GUEST_TSO6):
        assert offered >> bit & 1, bit
    assert not offered >> 22 & 1  # no MQ
    assert drv.common_read("num_queues") == 3
    assert bytes(drv.config_read(i, 1) for i in range(6)) == MAC
    assert drv.config_read(6, 2) == 1  # VIRTIO_NET_S_LINK_UP
    assert drv.config_read(8, 2) == 1  # max_virtqueue_pairs


def test_a_bare_backend_offers_no_offloads() -> None:
    b = SeqpacketBackend(vnet_hdr=False)
    with VirtioPciDriver(NetDevice(b, mac=MAC, name="n")) as d:
        offered = d.device_features()
        assert not offered & ALL_VNET
        assert offered >> vnet.F_MRG_RXBUF & 1
    b.close()


# ---- transmit ------------------------------------------------------------------------


@pytest.mark.parametrize("split", [(), (12,), (5,), (12, 40, 41)])
def test_tx_frame_reaches_the_backend_byte_exact(drv: VirtioPciDriver,
                                                 backend: SeqpacketBackend,
                                                 split: tuple[int, ...]) -> None:
    n = Net(drv)
    f = frame(OTHER, 600)
    h = hdr(1, 0, 0, 0, 34, 16)  # NEEDS_CSUM inside the frame
    assert n.send(h + f, split=split) == 0
    assert peer_recv(backend) == h + f
    m = n.dev.metrics()
    assert m["tx_frames"] == 1 and m["tx_bytes"] == len(f)


def test_tx_without_vnet_hdr_strips_the_header() -> None:
    b = SeqpacketBackend(vnet_hdr=False)
    with VirtioPciDriver(NetDevice(b, mac=MAC, name="n"), ioeventfd=True) as d:
        n = Net(d)
        f = frame(OTHER, 300)
        n.send(hdr() + f, split=(7,))
        assert b.peer.recv(70000) == f
        # an offload the driver could not have negotiated: dropped
        n.send(hdr(flags=1, csum_start=14, csum_offset=16) + f)
        assert peer_quiet(b)
        assert n.dev.metrics()["dropped_tx_bad_header"] == 1
    b.close()


def test_tx_gso_frame_passes_through(drv: VirtioPciDriver, backend: SeqpacketBackend) -> None:
    n = Net(drv)
    f = frame(OTHER, 65550)
    h = hdr(1, vnet.GSO_TCPV4, 54, 1448, 34, 16)
    chunks = tuple(range(4096, len(h + f), 4096))
    n.send(h + f, split=chunks)
    assert peer_recv(backend) == h + f


@pytest.mark.parametrize(("h", "size", "why"), [
    (hdr(flags=4), 100, "tx_bad_header"),  # unknown flag
    (hdr(gso=vnet.GSO_UDP, gso_size=1000, flags=1), 100, "tx_bad_header"),  # UFO not offered
    (hdr(gso=vnet.GSO_TCPV4, gso_size=0, flags=1), 100, "tx_bad_header"),
    (hdr(gso=0x42, gso_size=100), 100, "tx_bad_header"),
    (hdr(flags=1, csum_start=90, csum_offset=9), 100, "tx_bad_header"),  # past the end
    (hdr(hdr_len=101), 100, "tx_bad_header"),
    (hdr(), 13, "tx_bad_length"),
    (hdr(), 65551, "tx_bad_length"),
])
def test_tx_bad_headers_are_dropped_and_counted(drv: VirtioPciDriver,
                                                backend: SeqpacketBackend, h: bytes,
                                                size: int, why: str) -> None:
    n = Net(drv)
    f = (MAC + OTHER + b"\x08\x00" + bytes(size))[:size]
    assert n.send(h + f) == 0
    assert peer_quiet(backend)
    assert n.dev.metrics()[f"dropped_{why}"] == 1
    n.send(hdr() + frame(OTHER))  # the next good frame goes
    assert peer_recv(backend) == hdr() + frame(OTHER)
    assert not drv.needs_reset


def test_tx_offloads_need_negotiation(drv: VirtioPciDriver, backend: SeqpacketBackend) -> None:
    offered = drv.device_features()
    n = Net(drv, offered & ~(1 << vnet.F_HOST_TSO4))
    n.send(hdr(1, vnet.GSO_TCPV4, 54, 1448, 34, 16) + frame(OTHER, 3000))
    assert peer_quiet(backend)
    n.send(hdr(1, vnet.GSO_TCPV6, 74, 1428, 54, 16) + frame(OTHER, 3000))
    assert len(peer_recv(backend)) == 3012


def test_tx_flood_is_bounded_per_pass(drv: VirtioPciDriver, backend: SeqpacketBackend) -> None:
    n = Net(drv)
    dev = n.dev
    per_pass: list[int] = []
    inner = dev._tx_pass

    def counting(q: object) -> None:
        before = dev.tx_frames
        inner(q)  # type: ignore[arg-type]
        per_pass.append(dev.tx_frames - before)

    dev._tx_pass = counting  # type: ignore[method-assign]
    total = 200
    for i in range(total):
        n.tx.add([(drv.put(hdr() + frame(OTHER, 80, i)), 92)])
    n.tx.kick()
    got = [peer_recv(backend) for _ in range(total)]
    assert got == [hdr() + frame(OTHER, 80, i) for i in range(total)]
    n.tx.wait_used(total)
    assert max(per_pass) <= TX_BUDGET
    assert sum(per_pass) == total and len(per_pass) >= total // TX_BUDGET


def test_tx_backend_full_resumes_on_writability(drv: VirtioPciDriver,
                                                backend: SeqpacketBackend) -> None:
    """The host side stops taking frames: the device waits for EPOLLOUT and loses
    none, in order."""
    n = Net(drv)
    total = 600
    size = 8000
    got: list[bytes] = []
    sent = 0
    deadline = time.monotonic() + 30
    while sent < total or len(got) < total:
        assert time.monotonic() < deadline, f"{len(got)} of {sent} frames came out"
        while sent < total and n.tx.free:
            n.tx.add([(drv.put(hdr() + frame(OTHER, size, sent)), 12 + size)])
            sent += 1
        n.tx.kick()
        if backend.send_full == 0 and sent < total:
            time.sleep(0.005)  # let it fill up before the host reads
        else:
            with contextlib.suppress(TimeoutError):
                while True:
                    backend.peer.settimeout(0.05)
                    got.append(peer_recv(backend))
        n.tx.wait_used(n.tx.pending_used())
    assert backend.send_full > 0, "the host side never filled up"
    assert got == [hdr() + frame(OTHER, size, i) for i in range(total)]


def test_tx_with_link_down_is_dropped(drv: VirtioPciDriver, backend: SeqpacketBackend) -> None:
    n = Net(drv)
    n.dev.set_link(False)
    n.send(hdr() + frame(OTHER))
    assert peer_quiet(backend)
    assert n.dev.metrics()["dropped_tx_link_down"] == 1


# ---- receive ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [60, 1514, 3000])
def test_rx_mergeable_byte_exact(drv: VirtioPciDriver, backend: SeqpacketBackend,
                                 size: int) -> None:
    n = Net(drv)
    n.post(64, 2048)
    f = frame(MAC, size, 3)
    h = hdr(2)  # DATA_VALID from the host
    backend.peer.send(h + f)
    got_h, got_f, num = n.received()
    assert got_f == f
    assert got_h[:10] == h[:10]
    assert num == -(-(size + 12) // 2048)
    m = n.dev.metrics()
    assert m["rx_frames"] == 1 and m["rx_bytes"] == size


def test_rx_large_gso_frame_over_many_buffers(drv: VirtioPciDriver,
                                              backend: SeqpacketBackend) -> None:
    n = Net(drv)
    n.post(100, 1536)
    big = frame(MAC, 65550, 9)
    h = hdr(1, vnet.GSO_TCPV4, 66, 1448, 34, 16)
    backend.peer.send(h + big)
    small = frame(MAC, 200, 4)
    backend.peer.send(hdr() + small)
    got_h, got_f, num = n.received()
    assert got_f == big and got_h[:10] == h[:10]
    assert num == -(-(65550 + 12) // 1536)
    assert n.received()[1] == small  # the buffers left over serve the next frame


def test_rx_adjacent_buffers_are_one_dma_range(drv: VirtioPciDriver,
                                               backend: SeqpacketBackend) -> None:
    """Linux carves mergeable buffers one after another from a page frag: a frame over
    adjacent buffers is one DMA note (the software CPU looks up its code cache per
    note), and it covers exactly what was written."""
    n = Net(drv)
    n.post(60, 1536)  # bump-allocated: adjacent
    first = min(a for a, _ in n.rx_bufs.values())
    big = frame(MAC, 30000, 5)
    with drv.vm.lock:
        drv.vm.dma.clear()
    backend.peer.send(hdr() + big)
    _, got_f, num = n.received()
    assert got_f == big and num == -(-(30000 + 12) // 1536)
    with drv.vm.lock:
        assert drv.vm.dma == [(first, 30000 + 12)]


def test_rx_without_mrg_rxbuf(drv: VirtioPciDriver, backend: SeqpacketBackend) -> None:
    n = Net(drv, drv.device_features() & ~(1 << vnet.F_MRG_RXBUF))
    n.post(4, 1526)  # Linux's "small" buffers
    f = frame(MAC, 1514, 1)
    backend.peer.send(hdr() + f)
    _got_h, got_f, num = n.received()
    assert got_f == f and num == 1
    backend.peer.send(hdr() + frame(MAC, 4000))  # cannot fit one chain: dropped
    backend.peer.send(hdr() + f)
    assert n.received()[1] == f
    assert n.dev.metrics()["dropped_rx_no_room"] == 1
    # "big packets" chains: one chain takes the largest frame, scattered directly
    big_chain = [(drv.alloc(4096), 4096) for _ in range(17)]
    head = n.rx.add([], big_chain)
    n.rx.kick()
    # the two small buffers left go first; use them up
    for _ in range(2):
        backend.peer.send(hdr() + f)
        n.received()
    big = frame(MAC, 60000, 5)
    backend.peer.send(hdr() + big)
    ((used_head, used),) = n.rx.wait_used(1)
    assert used_head == head and used == 60012
    data = b"".join(drv.mem.read(a, s) for a, s in big_chain)[:used]
    assert data[12:] == big and struct.unpack_from("<H", data, 10)[0] == 1


def test_rx_into_many_tiny_buffers(drv: VirtioPciDriver, backend: SeqpacketBackend) -> None:
    """Chains of many tiny buffers (more than one readv takes): the frame is bounced
    and copied, the header split across buffers."""
    n = Net(drv)
    chains = []
    for _ in range(2):
        bufs = [(drv.alloc(64, 8), 5 if i == 0 else 64) for i in range(640)]
        chains.append((n.rx.add([], bufs, indirect=True), bufs))
    n.rx.kick()
    f = frame(MAC, 50000, 6)
    h = hdr(2)
    backend.peer.send(h + f)
    used = n.rx.wait_used(2)
    assert [u[0] for u in used] == [c[0] for c in chains]
    data = b"".join(drv.mem.read(a, s) for _h, bufs in chains for a, s in bufs)
    assert sum(u[1] for u in used) == len(h + f)
    assert data[:10] == h[:10] and struct.unpack_from("<H", data, 10)[0] == 2
    assert data[12:len(h + f)] == f


def test_rx_bare_backend_gets_a_header(backend: SeqpacketBackend) -> None:
    b = SeqpacketBackend(vnet_hdr=False)
    with VirtioPciDriver(NetDevice(b, mac=MAC, name="n"), ioeventfd=True) as d:
        n = Net(d)
        n.post(8, 4096)
        f = frame(MAC, 1000)
        d.mem.write(next(iter(n.rx_bufs.values()))[0], b"\xee" * 12)  # stale bytes
        b.peer.send(f)
        got_h, got_f, _num = n.received()
        assert got_f == f and got_h == hdr(num_buffers=1)
    b.close()


def test_rx_without_buffers_does_not_spin(drv: VirtioPciDriver,
                                          backend: SeqpacketBackend) -> None:
    n = Net(drv)
    for i in range(5):
        backend.peer.send(hdr() + frame(MAC, 100, i))
    wait_for(lambda: not any("backend" in r for r in drv.loop.registrations()),
             what="the backend fd out of epoll")
    calls = backend.recv_calls
    time.sleep(0.3)
    assert backend.recv_calls == calls <= 1, "the device polls a backend it cannot serve"
    n.post(8, 2048)
    assert [n.received()[1] for _ in range(5)] == [frame(MAC, 100, i) for i in range(5)]
    assert any("backend" in r for r in drv.loop.registrations())


def test_rx_frame_waits_for_buffers(drv: VirtioPciDriver, backend: SeqpacketBackend) -> None:
    """Fewer posted bytes than the frame: it is held (one frame) and delivered once
    the driver posts more."""
    n = Net(drv)
    n.post(2, 2048)
    big = frame(MAC, 10000, 2)
    backend.peer.send(hdr() + big)
    backend.peer.send(hdr() + frame(MAC, 100, 1))
    assert n.nothing_received()
    n.post(4, 2048)
    _got_h, got_f, num = n.received()
    assert got_f == big and num == 5
    assert n.dev.metrics().get("dropped_rx_no_room", 0) == 0
    assert n.received()[1] == frame(MAC, 100, 1)


def test_rx_ring_too_small_for_a_frame_drops_it(backend: SeqpacketBackend) -> None:
    with VirtioPciDriver(NetDevice(backend, mac=MAC, name="n"), ioeventfd=True) as d:
        rx, _tx, _ctrl = d.init(queue_sizes=[4, None, None])
        bufs = {rx.add([], [(d.alloc(1024), 1024)]): 0 for _ in range(4)}
        rx.kick()
        backend.peer.send(hdr() + frame(MAC, 8000))
        backend.peer.send(hdr() + frame(MAC, 500))
        ((head, used),) = rx.wait_used(1)
        assert head in bufs and used == 512
        assert d.device.metrics()["dropped_rx_no_room"] == 1


def test_rx_link_down_drops_host_frames(drv: VirtioPciDriver,
                                        backend: SeqpacketBackend) -> None:
    n = Net(drv)
    n.post(8, 2048)
    n.dev.set_link(False)
    backend.peer.send(hdr() + frame(MAC))
    assert n.nothing_received()
    n.dev.set_link(True)
    backend.peer.send(hdr() + frame(MAC, 70))
    assert n.received()[1] == frame(MAC, 70)


# ---- link state ------------------------------------------------------------------------


def test_link_down_up_is_a_config_change(drv: VirtioPciDriver) -> None:
    n = Net(drv)
    before = drv.vm.msi_count(0)
    n.dev.set_link(False)
    wait_for(lambda: drv.vm.msi_count(0) == before + 1, what="config interrupt")
    assert drv.config_read(6, 2) == 0 and not n.dev.link_up
    n.dev.set_link(False)  # no change: no interrupt
    n.dev.set_link(True)
    wait_for(lambda: drv.vm.msi_count(0) == before + 2, what="config interrupt")
    assert drv.config_read(6, 2) == 1


def test_link_change_with_intx_sets_isr_bit(drv: VirtioPciDriver) -> None:
    n = Net(drv, msix=False)
    drv.read_isr()
    n.dev.set_link(False)
    assert drv.read_isr() & 2


def test_backend_failure_takes_the_link_down(drv: VirtioPciDriver, backend: SeqpacketBackend,
                                             caplog: pytest.LogCaptureFixture) -> None:
    n = Net(drv)
    n.post(4, 2048)
    before = drv.vm.msi_count(0)
    backend.fail = "passt exited"
    backend.peer.send(hdr() + frame(MAC))
    wait_for(lambda: drv.vm.msi_count(0) == before + 1, what="config interrupt")
    assert drv.config_read(6, 2) == 0
    assert "passt exited" in caplog.text
    assert not any("backend" in r for r in drv.loop.registrations())
    n.send(hdr() + frame(OTHER))  # the guest goes on; frames are dropped
    assert not drv.needs_reset
    n.dev.set_link(True)
    assert drv.config_read(6, 2) == 0  # still down: the host side is gone


# ---- the control queue -----------------------------------------------------------------


def mac_tables(uni: list[bytes], multi: list[bytes]) -> bytes:
    return (struct.pack("<I", len(uni)) + b"".join(uni)
            + struct.pack("<I", len(multi)) + b"".join(multi))


def deliver(n: Net, backend: SeqpacketBackend, dst: bytes) -> bool:
    backend.peer.send(hdr() + frame(dst, 80))
    if n.nothing_received():
        return False
    assert n.received()[1] == frame(dst, 80)
    return True


@pytest.mark.parametrize("buffers", [16, 48], ids=["bounced", "direct"])
def test_rx_filter_modes_and_tables(drv: VirtioPciDriver, backend: SeqpacketBackend,
                                    buffers: int) -> None:
    """With fewer posted bytes than the largest frame the frame is bounced, with more
    it is read straight into the buffers: both paths filter."""
    n = Net(drv)
    n.post(buffers, 2048)
    assert deliver(n, backend, OTHER)  # promiscuous until the driver says otherwise
    assert n.command(vnet.CLASS_RX, vnet.RX_PROMISC, b"\0") == vnet.CTRL_OK
    assert not deliver(n, backend, OTHER)
    assert deliver(n, backend, MAC)
    assert deliver(n, backend, BCAST)
    assert not deliver(n, backend, MCAST)
    assert n.command(vnet.CLASS_MAC, vnet.MAC_TABLE_SET, mac_tables([OTHER], [MCAST])) == 0
    assert deliver(n, backend, OTHER) and deliver(n, backend, MCAST)
    assert not deliver(n, backend, bytes.fromhex("333300000001"))
    assert n.command(vnet.CLASS_RX, vnet.RX_ALLMULTI, b"\1") == 0
    assert deliver(n, backend, bytes.fromhex("333300000001"))
    assert n.command(vnet.CLASS_RX, vnet.RX_NOBCAST, b"\1") == 0
    assert not deliver(n, backend, BCAST)
    assert n.command(vnet.CLASS_RX, vnet.RX_NOUNI, b"\1") == 0
    assert not deliver(n, backend, MAC)
    assert n.command(vnet.CLASS_RX, vnet.RX_NOMULTI, b"\1") == 0
    assert not deliver(n, backend, MCAST)
    assert n.command(vnet.CLASS_RX, vnet.RX_PROMISC, b"\1") == 0
    assert deliver(n, backend, MAC)
    assert n.dev.metrics()["dropped_rx_filtered"] == 6


def test_mac_table_over_the_bound_is_refused(drv: VirtioPciDriver,
                                             backend: SeqpacketBackend) -> None:
    n = Net(drv)
    n.post(8, 2048)
    ok = [bytes([0x01, 0, 0x5E, 0, 0, i]) for i in range(MAC_TABLE_MAX)]
    assert n.command(vnet.CLASS_MAC, vnet.MAC_TABLE_SET, mac_tables([], ok)) == vnet.CTRL_OK
    too_many = [*ok, bytes.fromhex("01005e0000ff")]
    assert n.command(vnet.CLASS_MAC, vnet.MAC_TABLE_SET, mac_tables([], too_many)) == 1
    assert n.command(vnet.CLASS_MAC, vnet.MAC_TABLE_SET,
                     struct.pack("<II", 0xFFFF_FFFF, 0)) == vnet.CTRL_ERR
    assert n.command(vnet.CLASS_MAC, vnet.MAC_TABLE_SET, mac_tables([], ok)[:-3]) == 1
    assert n.command(vnet.CLASS_MAC, vnet.MAC_TABLE_SET, mac_tables([], ok) + b"x") == 1
    assert n.dev.save_state().multi == tuple(ok)  # the refused tables changed nothing


def test_mac_addr_set(drv: VirtioPciDriver, backend: SeqpacketBackend) -> None:
    n = Net(drv)
    n.post(8, 2048)
    new = bytes.fromhex("525400000099")
    assert n.command(vnet.CLASS_MAC, vnet.MAC_ADDR_SET, new) == vnet.CTRL_OK
    assert bytes(drv.config_read(i, 1) for i in range(6)) == new
    assert n.command(vnet.CLASS_MAC, vnet.MAC_ADDR_SET, new[:5]) == vnet.CTRL_ERR
    n.command(vnet.CLASS_RX, vnet.RX_PROMISC, b"\0")
    assert deliver(n, backend, new) and not deliver(n, backend, MAC)
    drv.reset()  # the configured MAC again
    assert bytes(drv.config_read(i, 1) for i in range(6)) == MAC


def test_guest_offloads_set(drv: VirtioPciDriver, backend: SeqpacketBackend) -> None:
    n = Net(drv)
    assert backend.offloads[-1] == {"csum": True, "tso4": True, "tso6": True, "ecn": True,
                                    "ufo": False}
    assert n.command(vnet.CLASS_GUEST_OFFLOADS, 0, struct.pack("<Q", 0)) == vnet.CTRL_OK
    assert backend.offloads[-1] == dict.fromkeys(("csum", "tso4", "tso6", "ecn", "ufo"), False)
    csum_tso4 = 1 << vnet.F_GUEST_CSUM | 1 << vnet.F_GUEST_TSO4
    assert n.command(vnet.CLASS_GUEST_OFFLOADS, 0, struct.pack("<Q", csum_tso4)) == 0
    assert backend.offloads[-1]["tso4"] and not backend.offloads[-1]["tso6"]
    assert n.command(vnet.CLASS_GUEST_OFFLOADS, 0,
                     struct.pack("<Q", 1 << vnet.F_GUEST_UFO)) == vnet.CTRL_ERR
    assert n.command(vnet.CLASS_GUEST_OFFLOADS, 0, b"\0" * 4) == vnet.CTRL_ERR
    # the driver did not negotiate GUEST_TSO6: it may not turn it on
    drv2 = Net(drv, drv.device_features() & ~(1 << vnet.F_GUEST_TSO6))
    assert backend.offloads[-1]["tso4"] and not backend.offloads[-1]["tso6"]
    assert drv2.command(vnet.CLASS_GUEST_OFFLOADS, 0,
                        struct.pack("<Q", 1 << vnet.F_GUEST_TSO6)) == vnet.CTRL_ERR


@pytest.mark.parametrize("cmd", [
    b"", b"\0", bytes([0, 0]), bytes([0, 0, 1, 1]), bytes([0, 9, 1]), bytes([7, 0]),
    bytes([3, 0]), bytes([1, 5]) + bytes(6), bytes([0, 0]) + bytes(2000),
])
def test_malformed_control_commands_are_refused(drv: VirtioPciDriver, cmd: bytes) -> None:
    n = Net(drv)
    if cmd:
        _used, (ack,) = n.ctrl.submit([cmd], [1])
        assert ack == b"\x01"
    else:
        used, (ack,) = n.ctrl.submit([], [1])
        assert ack == b"\x01" and used == 1
    n.ctrl.submit([bytes([0, 0, 1])], [])  # no room for the ack: completed, nothing written
    assert not drv.needs_reset
    assert n.command(vnet.CLASS_RX, vnet.RX_PROMISC, b"\1") == vnet.CTRL_OK


def test_rx_extra_needs_its_feature(drv: VirtioPciDriver) -> None:
    n = Net(drv, drv.device_features() & ~(1 << vnet.F_CTRL_RX_EXTRA))
    assert n.command(vnet.CLASS_RX, vnet.RX_ALLMULTI, b"\1") == vnet.CTRL_OK
    assert n.command(vnet.CLASS_RX, vnet.RX_NOBCAST, b"\1") == vnet.CTRL_ERR


# ---- hostile chains and headers -------------------------------------------------------


def test_hostile_receive_chains(drv: VirtioPciDriver, backend: SeqpacketBackend) -> None:
    n = Net(drv)
    n.post(3, 2048, kick=False)
    n.rx.add([(drv.put(b"x" * 64), 64)], [])  # nothing device-writable
    n.rx.add([], [(1 << 40, 2048)])  # outside RAM
    n.rx.kick()
    backend.peer.send(hdr() + frame(MAC))
    used = n.rx.wait_used(5)
    assert all(u == 0 for _h, u in used)  # the held chains came back unused too
    assert not drv.needs_reset
    for h, _u in used:
        n.rx_bufs.pop(h, None)
    n.post(4, 2048)
    backend.peer.send(hdr() + frame(MAC, 90))
    assert n.received()[1] in (frame(MAC), frame(MAC, 90))


def reference_ok(h: bytes, dlen: int, features: int) -> bool:
    """What a header must be to leave the device (written apart from the device)."""
    flags, gso, hdr_len, gso_size, cs, co, _ = struct.unpack("<BBHHHHH", h)
    csum = bool(features >> vnet.F_CSUM & 1)
    if not 14 <= dlen <= 65550 or flags & ~1 or hdr_len > dlen:
        return False
    if flags & 1 and (not csum or cs + co + 2 > dlen):
        return False
    if gso:
        ecn, base = gso & 0x80, gso & 0x7F
        bit = {1: vnet.F_HOST_TSO4, 4: vnet.F_HOST_TSO6}.get(base)
        if bit is None or not csum or not features >> bit & 1 or not gso_size:
            return False
        if ecn and not features >> vnet.F_HOST_ECN & 1:
            return False
    return True


_small = st.one_of(st.integers(0, 3100), st.integers(0, 0xFFFF))
#: headers near the edges: known and unknown flags and GSO types, offsets about the frame
_headers = st.one_of(
    st.binary(min_size=12, max_size=12),
    st.builds(hdr, st.sampled_from([0, 1, 2, 3, 0x80]), st.sampled_from(
        [0, 1, 3, 4, 5, 0x81, 0x84, 0x80, 0x7F]), _small, _small, _small, _small, _small))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(_headers, st.integers(0, 3000),
                          st.lists(st.integers(1, 3100), max_size=3)), min_size=1,
                max_size=6))
def test_hostile_transmit_headers(drv: VirtioPciDriver, backend: SeqpacketBackend,
                                  frames: list[tuple[bytes, int, list[int]]]) -> None:
    if not drv.queues:
        Net(drv)
    tx = drv.queues[1]
    want = []
    for h, dlen, cuts in frames:
        data = h + bytes(i & 0xFF for i in range(dlen))
        split = tuple(sorted({c for c in cuts if c < len(data)}))
        cut = [0, *split, len(data)]
        tx.submit([data[a:b] for a, b in itertools.pairwise(cut)])
        if reference_ok(h, dlen, drv.features):
            want.append(data)
    got = []
    while not peer_quiet(backend):
        got.append(peer_recv(backend))
    assert got == want
    assert not drv.needs_reset


# ---- reset, saved state ---------------------------------------------------------------


def test_reset_in_the_middle_of_traffic(drv: VirtioPciDriver, backend: SeqpacketBackend) -> None:
    """A reset while frames flow both ways: the device forgets its held chains, held
    frame and filter, keeps its backend, and serves the next driver."""
    n = Net(drv)
    n.post(8, 2048)
    n.command(vnet.CLASS_RX, vnet.RX_PROMISC, b"\0")
    for i in range(10):  # more than the posted buffers take
        backend.peer.send(hdr() + frame(MAC, 1500, i))
    n.tx.add([(drv.put(hdr() + frame(OTHER)), 112)])
    n.tx.kick()
    drv.reset()
    dev = n.dev
    assert not dev._rx_bufs and dev._held == 0 and dev._rxq is None
    n = Net(drv)
    assert dev.save_state().promisc  # the filter is forgotten
    n.post(64, 2048)
    backend.peer.send(hdr() + frame(OTHER, 333))
    for _ in range(11):  # what the host had queued comes first
        if n.received()[1] == frame(OTHER, 333):
            break
    else:
        raise AssertionError("no frame after the reset")
    n.send(hdr() + frame(OTHER, 77))
    got = peer_recv(backend)
    if got == hdr() + frame(OTHER):  # sent before the reset took it
        got = peer_recv(backend)
    assert got == hdr() + frame(OTHER, 77)
    assert not drv.needs_reset


class _StallingBackend(SeqpacketBackend):
    """Full once, then a send that waits for the test."""

    def __init__(self) -> None:
        super().__init__()
        self.sends = 0
        self.entered = threading.Event()
        self.release = threading.Event()

    def send(self, bufs: Sequence[memoryview]) -> bool:
        self.sends += 1
        if self.sends == 1:
            return False
        if self.sends == 2:
            self.entered.set()
            self.release.wait(5)
        return super().send(bufs)


def test_reset_waits_for_a_handler_that_stopped_watching() -> None:
    """The backend handler took its fd out of epoll (no receive buffers, transmit no
    longer blocked) and is still sending when the driver resets the device: the
    reset waits for it, so it never sees the rings vanish under it."""
    b = _StallingBackend()
    with VirtioPciDriver(NetDevice(b, mac=MAC, name="n"), ioeventfd=True) as d:
        n = Net(d)
        b.peer.send(hdr() + frame(MAC))  # no receive buffers: EPOLLIN is dropped
        wait_for(lambda: not any("backend" in r for r in d.loop.registrations()))
        n.tx.add([(d.put(hdr() + frame(OTHER)), 112)])
        n.tx.add([(d.put(hdr() + frame(OTHER, 90)), 102)])
        n.tx.kick()  # full, then EPOLLOUT: the handler unwatches and sends again
        assert b.entered.wait(5)
        resetting = threading.Thread(target=d.reset)
        resetting.start()
        time.sleep(QUIET)
        assert resetting.is_alive(), "the reset did not wait for the running handler"
        b.release.set()
        resetting.join(5)
        assert not resetting.is_alive()
        assert not d.needs_reset
    b.close()


def test_saved_state_round_trip(drv: VirtioPciDriver, backend: SeqpacketBackend) -> None:
    n = Net(drv)
    n.post(20, 2048)
    n.command(vnet.CLASS_RX, vnet.RX_PROMISC, b"\0")
    n.command(vnet.CLASS_RX, vnet.RX_ALLMULTI, b"\1")
    n.command(vnet.CLASS_MAC, vnet.MAC_TABLE_SET, mac_tables([OTHER], [MCAST]))
    n.command(vnet.CLASS_MAC, vnet.MAC_ADDR_SET, bytes.fromhex("52540000aaaa"))
    n.command(vnet.CLASS_GUEST_OFFLOADS, 0, struct.pack("<Q", 1 << vnet.F_GUEST_CSUM))
    backend.peer.send(hdr() + frame(OTHER, 100, 1))
    assert n.received()[1] == frame(OTHER, 100, 1)  # the device now holds chains
    n.dev.set_link(False)
    drv.pdev.pause_io()
    state = drv.pdev.save_state()
    dev_state = n.dev.save_state()
    assert dev_state == NetState(1, False, bytes.fromhex("52540000aaaa"), False, True, False,
                                 False, False, False, (OTHER,), (MCAST,),
                                 1 << vnet.F_GUEST_CSUM)
    b2 = SeqpacketBackend()
    new = drv.restore_copy(NetDevice(b2, mac=MAC, name="virtio-net"), encode(state))
    try:
        dev2 = new.device
        assert isinstance(dev2, NetDevice)
        assert dev2.save_state() == dev_state
        assert b2.offloads[-1] == {"csum": True, "tso4": False, "tso6": False, "ecn": False,
                                   "ufo": False}
        assert new.config_read(6, 2) == 0
        dev2.set_link(True)
        n.drv = new
        # every chain the old device held is available again: 19 frames fit
        for i in range(19):
            b2.peer.send(hdr() + frame(OTHER, 100, i))
        assert [n.received()[1] for _ in range(19)] == [frame(OTHER, 100, i)
                                                         for i in range(19)]
        b2.peer.send(hdr() + frame(bytes.fromhex("525400000001")))  # filtered
        assert n.nothing_received()
    finally:
        new.close()
        b2.close()


@pytest.mark.parametrize(("field", "value", "match"), [
    ("version", 2, "version"),
    ("link_up", 1, "link_up"),
    ("mac", b"\0" * 5, "mac"),
    ("promisc", "yes", "promisc"),
    ("uni", (b"\0" * 6,) * (MAC_TABLE_MAX + 1), "len\\(uni\\)"),
    ("multi", (b"\0" * 7,), "multi\\[0\\]"),
    ("multi", b"\0" * 6, "multi"),
    ("offloads", 1 << vnet.F_GUEST_UFO, "offloads"),
    ("offloads", -1, "offloads"),
])
def test_hostile_saved_state_is_refused(drv: VirtioPciDriver, field: str, value: object,
                                        match: str) -> None:
    dev = drv.device
    assert isinstance(dev, NetDevice)
    good = dev.save_state()
    bad = NetState(**{**good.__dict__, field: value})
    with pytest.raises(StateError, match=match):
        dev.restore_state(bad)
    assert dev.save_state() == good


# ---- a real TAP ------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_real_tap_frame_both_ways() -> None:
    """One frame each way through a real TAP with IFF_VNET_HDR, inside a network
    namespace of the test's own (the host's interfaces are never touched): the
    guest's frame reaches a packet socket on the TAP's interface byte-exact, and
    one sent there reaches the guest."""
    from pyvirt.net.tap import open_tap
    from tests.netns import NetNs

    peer_mac = bytes.fromhex("525400000002")
    with NetNs() as ns:
        tap = ns.call(open_tap, "ptap0", create=True, what="nics[0]")
        try:
            ns.run("ip link set ptap0 up")
            with ns.entered():
                raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
            raw.bind(("ptap0", 0))
            raw.settimeout(5)
            with raw, VirtioPciDriver(NetDevice(tap, mac=MAC, name="virtio-net"),
                                      ioeventfd=True) as d:
                n = Net(d)
                n.post(64, 2048)
                out = peer_mac + MAC + b"\x88\xb5" + b"pyvirt-out" * 20
                n.send(hdr() + out)
                assert raw.recv(4096) == out
                into = MAC + peer_mac + b"\x88\xb5" + b"pyvirt-in" * 30
                raw.send(into)
                for _ in range(20):  # the kernel's own frames (IPv6 MLD ...) may come first
                    _h, f, _num = n.received()
                    if f == into:
                        break
                else:
                    raise AssertionError("the frame did not come in")
        finally:
            tap.close()
