"""virtio-vsock driven as a guest's vsock transport drives it (``tests.virtio_driver``,
a real ``EventLoop`` thread), against real host Unix sockets in a temporary directory:
Firecracker's host side (``PATH_P`` for guest-initiated connections, ``CONNECT P`` /
``OK HOSTPORT`` on ``PATH``), credit both ways, shutdown and reset paths, and a
hostile guest."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvirt.errors import UserInputError
from pyvirt.state import encode
from pyvirt.virtio import vsock
from pyvirt.virtio.vsock import BUF_ALLOC, HDR, MAX_PKT, VsockDevice, bind_listener
from tests.virtio_driver import VirtioPciDriver, wait_for

CID = 3
HOST = 2
REQUEST, RESPONSE, RST, SHUTDOWN, RW, CREDIT_UPDATE, CREDIT_REQUEST = range(1, 8)
STREAM = 1
RCV, SEND = 1, 2
QUIET = 0.1  # how long to watch for a packet that must not come


@dataclass
class Pkt:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int
    data: bytes = b""


def hdr(src_port: int, dst_port: int, op: int, *, length: int = 0, flags: int = 0,
        buf_alloc: int = BUF_ALLOC, fwd_cnt: int = 0, src_cid: int = CID, dst_cid: int = HOST,
        typ: int = STREAM) -> bytes:
    return HDR.pack(src_cid, dst_cid, src_port, dst_port, length, typ, op, flags, buf_alloc,
                    fwd_cnt)


def pattern(n: int, seed: int = 1, offset: int = 0) -> bytes:
    """Deterministic, non-repeating within a packet: catches lost, doubled or
    reordered chunks (the same as tests/vsock_tool.pattern)."""
    from tests.vsock_tool import pattern as p

    return p(n, seed, offset)


class Guest:
    """The guest's side: rx buffers (header + data, as Linux posts them), tx packets,
    the event queue."""

    def __init__(self, drv: VirtioPciDriver, *, rx_bufs: int = 64, rx_size: int = 4096,
                 post: bool = True) -> None:
        self.drv = drv
        self.rx, self.tx, self.ev = drv.init()
        self.rx_size = rx_size
        self.bufs: dict[int, tuple[int, int]] = {}
        self.ev_bufs: dict[int, int] = {}
        self.backlog: list[Pkt] = []
        if post:
            self.post_rx(rx_bufs)
        for _ in range(8):
            addr = drv.alloc(4)
            self.ev_bufs[self.ev.add([], [(addr, 4)])] = addr
        self.ev.kick()

    def post_rx(self, count: int) -> None:
        for _ in range(count):
            h, d = self.drv.alloc(HDR.size), self.drv.alloc(self.rx_size)
            self.bufs[self.rx.add([], [(h, HDR.size), (d, self.rx_size)])] = (h, d)
        self.rx.kick()

    def send(self, header: bytes, data: bytes = b"") -> None:
        self.tx.submit([header, data] if data else [header])

    def poll(self) -> list[Pkt]:
        """Packets the device has sent so far (their buffers are posted again)."""
        n = self.rx.pending_used()
        out = []
        for head, length in self.rx.wait_used(n) if n else []:
            h, d = self.bufs.pop(head)
            assert length >= HDR.size, f"rx packet of {length} bytes"
            p = Pkt(*HDR.unpack(self.drv.mem.read(h, HDR.size)))
            assert length == HDR.size + p.len, (length, p)
            p.data = self.drv.mem.read(d, p.len)
            assert p.src_cid == HOST and p.dst_cid == CID and p.type == STREAM, p
            out.append(p)
            self.bufs[self.rx.add([], [(h, HDR.size), (d, self.rx_size)])] = (h, d)
        if out:
            self.rx.kick()
        return out

    def expect(self, pred: Callable[[Pkt], bool], what: str, timeout: float = 5.0) -> Pkt:
        """The first packet matching ``pred``; others are kept in ``backlog``."""
        deadline = time.monotonic() + timeout
        while True:
            for i, p in enumerate(self.backlog):
                if pred(p):
                    return self.backlog.pop(i)
            self.backlog += self.poll()
            if not any(pred(p) for p in self.backlog):
                if time.monotonic() > deadline:
                    raise AssertionError(f"no {what}; got {self.backlog}")
                time.sleep(0.001)

    def quiet(self, pred: Callable[[Pkt], bool] = lambda p: True) -> bool:
        time.sleep(QUIET)
        self.backlog += self.poll()
        return not any(pred(p) for p in self.backlog)

    def events(self) -> list[int]:
        n = self.ev.pending_used()
        return [struct.unpack("<I", self.drv.mem.read(self.ev_bufs[h], 4))[0]
                for h, _ in (self.ev.wait_used(n) if n else [])]


class GuestConn:
    """One guest stream socket over ``Guest``, with the credit rules of Linux's
    virtio_transport_common.c on both sides."""

    def __init__(self, g: Guest, local: int, peer: int, *, buf_alloc: int = BUF_ALLOC) -> None:
        self.g, self.local, self.peer = g, local, peer
        self.buf_alloc = buf_alloc
        self.tx_cnt = 0  # sent to the host
        self.peer_buf_alloc = 0
        self.peer_fwd = 0
        self.fwd_cnt = 0  # consumed from the host
        self.received = bytearray()
        self.in_buffer = 0  # received, not consumed
        self.shutdown = 0
        self.reset = False

    def h(self, op: int, **kw: int) -> bytes:
        return hdr(self.local, self.peer, op, buf_alloc=self.buf_alloc, fwd_cnt=self.fwd_cnt,
                   **kw)

    def mine(self, p: Pkt) -> bool:
        return p.src_port == self.peer and p.dst_port == self.local

    def take(self, p: Pkt) -> None:
        self.peer_buf_alloc, self.peer_fwd = p.buf_alloc, p.fwd_cnt
        if p.op == RW:
            self.in_buffer += p.len
            assert self.in_buffer <= self.buf_alloc, "the device overran our credit"
            self.received += p.data
        elif p.op == RST:
            self.reset = True
        elif p.op == SHUTDOWN:
            self.shutdown |= p.flags

    def pump(self) -> None:
        keep = []
        for p in self.g.backlog + self.g.poll():
            (self.take if self.mine(p) else keep.append)(p)
        self.g.backlog = keep

    def credit(self) -> int:
        return self.peer_buf_alloc - (self.tx_cnt - self.peer_fwd)

    def connect(self) -> None:
        self.g.send(self.h(REQUEST))
        p = self.g.expect(self.mine, "RESPONSE")
        assert p.op == RESPONSE, p
        self.take(p)

    def write(self, data: bytes, timeout: float = 20.0) -> None:
        """Send respecting the host's credit (waiting for its updates)."""
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        while view:
            self.pump()
            assert not self.reset, "connection reset"
            n = min(self.credit(), MAX_PKT, len(view))
            if n <= 0:
                assert time.monotonic() < deadline, "no credit from the host"
                time.sleep(0.001)
                continue
            self.g.send(self.h(RW, length=n), bytes(view[:n]))
            self.tx_cnt += n
            view = view[n:]

    def consume(self) -> None:
        """The application read everything: tell the host (Linux sends an update once
        free space is low; we do it every time for a faster test)."""
        if self.in_buffer:
            self.fwd_cnt += self.in_buffer
            self.in_buffer = 0
            self.g.send(self.h(CREDIT_UPDATE))

    def read(self, n: int, timeout: float = 20.0) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            self.pump()
            self.consume()
            if len(self.received) >= n:
                break
            assert not self.reset and not self.shutdown & SEND, "stream ended early"
            assert time.monotonic() < deadline, f"{len(self.received)} of {n} bytes"
            time.sleep(0.0005)
        out = bytes(self.received[:n])
        del self.received[:n]
        return out


@pytest.fixture
def uds(tmp_path: Path) -> Path:
    return tmp_path / "v.sock"


@pytest.fixture
def listener(uds: Path) -> Iterator[socket.socket]:
    s = bind_listener(uds, "vsock.path")
    yield s
    s.close()


@pytest.fixture
def dev(listener: socket.socket, uds: Path) -> VsockDevice:
    return VsockDevice(guest_cid=CID, listener=listener, uds_path=uds)


@pytest.fixture
def drv(dev: VsockDevice) -> Iterator[VirtioPciDriver]:
    d = VirtioPciDriver(dev, mem_size=64 << 20)
    yield d
    d.close()
    dev.close()


@contextlib.contextmanager
def host_server(path: Path) -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(64)
    s.settimeout(5)
    try:
        yield s
    finally:
        s.close()


def host_client(uds: Path, line: bytes) -> socket.socket:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(5)
    c.connect(str(uds))
    if line:
        c.sendall(line)
    return c


def read_line(s: socket.socket) -> bytes:
    out = b""
    while not out.endswith(b"\n"):
        b = s.recv(1)
        if not b:
            break
        out += b
    return out


def closed(s: socket.socket, timeout: float = 5.0) -> bool:
    """The peer closed ``s`` (EOF or reset), after any data it still had."""
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


# ---- the device ------------------------------------------------------------------


def test_config_features_and_queues(drv: VirtioPciDriver) -> None:
    assert drv.common_read("num_queues") == 3
    assert not drv.device_features() >> 1 & 1  # VIRTIO_VSOCK_F_SEQPACKET not offered
    drv.init()
    assert drv.config_read(0, 4) == CID and drv.config_read(4, 4) == 0  # le64 guest_cid


def test_device_refuses_reserved_cids(listener: socket.socket, uds: Path) -> None:
    for cid in (0, 1, 2, 0xFFFF_FFFF, 1 << 32):
        with pytest.raises(ValueError, match="CID"):
            VsockDevice(guest_cid=cid, listener=listener, uds_path=uds)


def test_guest_to_host_streams_both_ways_byte_exact(drv: VirtioPciDriver, uds: Path) -> None:
    """Guest connects to host port 1234 (Unix socket PATH_1234); 3 MiB each way at
    once, checksummed; the guest's buffer is small so credit limits the host side."""
    g = Guest(drv, rx_size=16384)
    size = 3 << 20
    up, down = pattern(size, 7), pattern(size, 9)
    got_up: list[bytes] = []
    with host_server(Path(f"{uds}_1234")) as srv:
        c = GuestConn(g, 40000, 1234, buf_alloc=64 << 10)
        c.connect()
        peer, _ = srv.accept()
        peer.settimeout(20)

        def host() -> None:
            def rd() -> None:
                buf = bytearray()
                while len(buf) < size:
                    chunk = peer.recv(1 << 20)
                    if not chunk:
                        break
                    buf += chunk
                got_up.append(bytes(buf))
            t = threading.Thread(target=rd)
            t.start()
            peer.sendall(down)
            t.join()

        t = threading.Thread(target=host)
        t.start()
        # interleave: write in slices and read what came meanwhile
        for off in range(0, size, 256 << 10):
            c.write(up[off:off + (256 << 10)])
            c.pump()
            c.consume()
        assert hashlib.sha256(c.read(size)).digest() == hashlib.sha256(down).digest()
        t.join(30)
        assert hashlib.sha256(got_up[0]).digest() == hashlib.sha256(up).digest()
        m = drv.device.metrics()
        assert m["tx_bytes"] == size and m["rx_bytes"] == size
        assert m["connections_live"] == 1 and m["connections_total"] == 1
        peer.close()
    assert not drv.needs_reset


def test_connection_to_a_port_nobody_listens_on_is_reset(drv: VirtioPciDriver) -> None:
    g = Guest(drv)
    g.send(hdr(40000, 77, REQUEST))
    p = g.expect(lambda p: True, "a reply")
    assert (p.op, p.src_port, p.dst_port) == (RST, 77, 40000)
    assert drv.device.metrics()["connections_live"] == 0


def test_host_initiated_connect_ok_and_data(drv: VirtioPciDriver, uds: Path) -> None:
    """CONNECT 5000 → REQUEST to the guest from an ephemeral host port → the guest's
    RESPONSE → "OK <port>". Bytes the client sent right after its line are the
    stream's first bytes, not part of the handshake."""
    g = Guest(drv)
    cl = host_client(uds, b"CONNECT 5000\nearly")
    p = g.expect(lambda p: p.op == REQUEST, "REQUEST")
    assert p.dst_port == 5000 and p.src_port >= 1 << 30 and p.buf_alloc == BUF_ALLOC
    c = GuestConn(g, 5000, p.src_port)
    c.take(p)
    g.send(c.h(RESPONSE))
    assert read_line(cl) == f"OK {p.src_port}\n".encode()
    assert c.read(5) == b"early"
    cl.sendall(b"more from the host")
    assert c.read(18) == b"more from the host"
    c.write(b"hello from the guest")
    assert cl.recv(100) == b"hello from the guest"
    # two host clients to the same guest port get different host ports
    cl2 = host_client(uds, b"CONNECT 5000\n")
    p2 = g.expect(lambda p: p.op == REQUEST, "REQUEST")
    assert p2.src_port != p.src_port
    g.send(hdr(5000, p2.src_port, RESPONSE))
    assert read_line(cl2) == f"OK {p2.src_port}\n".encode()
    cl.close()
    cl2.close()


def test_host_connect_refused_or_unanswered(drv: VirtioPciDriver, dev: VsockDevice,
                                            uds: Path) -> None:
    g = Guest(drv)
    cl = host_client(uds, b"CONNECT 6000\n")
    p = g.expect(lambda p: p.op == REQUEST, "REQUEST")
    g.send(hdr(6000, p.src_port, RST))
    assert read_line(cl) == b""  # closed, no OK
    dev.request_timeout = 0.2
    cl = host_client(uds, b"CONNECT 6001\n")
    p = g.expect(lambda p: p.op == REQUEST, "REQUEST")
    assert read_line(cl) == b""  # nobody answered in time
    rst = g.expect(lambda p: p.op == RST, "RST after the timeout")
    assert (rst.src_port, rst.dst_port) == (p.src_port, 6001)
    assert dev.metrics()["connections_live"] == 0


@pytest.mark.parametrize("line", [b"CONNECT 1\r\n", b"connect 5\n", b"CONNECT \n",
                                  b"CONNECT 4294967296\n", b"CONNECT -1\n", b"X" * 40,
                                  b"CONNECT 00000000000000000001\n"])
def test_bad_connect_lines_close_the_client(drv: VirtioPciDriver, uds: Path,
                                            line: bytes) -> None:
    g = Guest(drv)
    cl = host_client(uds, line)
    assert closed(cl)
    assert g.quiet(lambda p: p.op == REQUEST)


def test_silent_host_client_is_closed_after_the_timeout(drv: VirtioPciDriver, dev: VsockDevice,
                                                       uds: Path) -> None:
    dev.handshake_timeout = 0.2
    Guest(drv)
    cl = host_client(uds, b"CONN")  # and then nothing
    t0 = time.monotonic()
    assert closed(cl)
    assert 0.15 < time.monotonic() - t0 < 3


def test_device_never_overruns_the_guests_credit(drv: VirtioPciDriver, uds: Path) -> None:
    """The host program sends 200 KiB; the guest advertises 5000 bytes (not a whole
    number of its 4 KiB buffers) and consumes nothing: exactly 5000 bytes arrive,
    then nothing until its credit update."""
    g = Guest(drv)
    with host_server(Path(f"{uds}_99")) as srv:
        c = GuestConn(g, 41000, 99, buf_alloc=5000)
        c.connect()
        peer, _ = srv.accept()
        data = pattern(200 << 10, 3)
        threading.Thread(target=peer.sendall, args=(data,), daemon=True).start()
        wait_for(lambda: (c.pump(), len(c.received) >= 5000)[1], what="5000 bytes")
        time.sleep(QUIET)
        c.pump()
        assert len(c.received) == 5000  # take() asserts it per packet too
        got = c.read(200 << 10)  # consumes, updates credit
        assert bytes(c.received) == b"" and got == data
        peer.close()


def test_guest_overrunning_our_credit_is_reset(drv: VirtioPciDriver, dev: VsockDevice,
                                               uds: Path) -> None:
    """The host program reads nothing; a guest that keeps sending past the credit we
    advertised gets RST at the first byte beyond it, and we buffer at most BUF_ALLOC."""
    g = Guest(drv)
    with host_server(Path(f"{uds}_98")) as srv:
        c = GuestConn(g, 41001, 98)
        c.connect()
        peer, _ = srv.accept()
        chunk = bytes(MAX_PKT)
        for _ in range(200):
            time.sleep(0.01)
            c.pump()  # the guest's view of our credit is now exactly what we advertised
            assert not c.reset, "reset while within credit"
            over = len(chunk) > c.credit()
            c.g.send(c.h(RW, length=len(chunk)), chunk)
            c.tx_cnt += len(chunk)
            if over:
                break
        else:
            raise AssertionError("credit never ran out")
        g.expect(lambda p: c.mine(p) and p.op == RST, "RST for the overrun")
        assert max(len(x.txbuf) for x in dev._conns.values()) <= BUF_ALLOC \
            if dev._conns else True
        assert closed(peer)


def test_shutdown_paths(drv: VirtioPciDriver, uds: Path) -> None:
    """SHUTDOWN(SEND) from the guest reaches the host program as EOF after the data,
    while the other direction still works; SHUTDOWN(RCV|SEND) is answered with RST
    and the host socket closes; a host half-close reaches the guest as SHUTDOWN(SEND)."""
    g = Guest(drv)
    with host_server(Path(f"{uds}_7")) as srv:
        c = GuestConn(g, 42000, 7)
        c.connect()
        peer, _ = srv.accept()
        c.write(b"last words")
        g.send(c.h(SHUTDOWN, flags=SEND))
        assert peer.recv(100) == b"last words"
        assert peer.recv(100) == b""  # EOF
        peer.sendall(b"still listening?")
        assert c.read(16) == b"still listening?"
        peer.shutdown(socket.SHUT_WR)
        g.expect(lambda p: c.mine(p) and p.op == SHUTDOWN and p.flags & SEND, "SHUTDOWN")
        g.send(c.h(SHUTDOWN, flags=RCV | SEND))
        g.expect(lambda p: c.mine(p) and p.op == RST, "RST answering the full shutdown")
        assert closed(peer)
        # the guest's RST closes the host side at once, with no reply
        c2 = GuestConn(g, 42001, 7)
        c2.connect()
        peer2, _ = srv.accept()
        g.send(c2.h(RST))
        assert closed(peer2)
        assert g.quiet(c2.mine)
    assert drv.device.metrics()["connections_live"] == 0


def test_host_peer_vanishing_mid_stream(drv: VirtioPciDriver, uds: Path) -> None:
    """Guest → host: the host program closes with our data unread → the guest gets
    RST. Host → guest: it closes after sending → data, then SHUTDOWN(RCV|SEND)."""
    g = Guest(drv)
    with host_server(Path(f"{uds}_8")) as srv:
        c = GuestConn(g, 43000, 8)
        c.connect()
        peer, _ = srv.accept()
        c.write(pattern(100 << 10))
        peer.close()  # unread data: the device's socket sees ECONNRESET / EPIPE
        with contextlib.suppress(AssertionError):  # "connection reset"
            c.write(pattern(100 << 10), timeout=2)
        wait_for(lambda: (c.pump(), c.reset)[1], what="RST")

        c2 = GuestConn(g, 43001, 8)
        c2.connect()
        peer2, _ = srv.accept()
        peer2.sendall(b"bye")
        peer2.close()
        assert c2.read(3) == b"bye"
        wait_for(lambda: (c2.pump(), c2.shutdown == RCV | SEND)[1], what="SHUTDOWN")
        g.send(c2.h(RST))  # Linux answers a full shutdown with RST
    wait_for(lambda: drv.device.metrics()["connections_live"] == 0, what="no connections")


def test_packets_for_no_connection_are_reset(drv: VirtioPciDriver) -> None:
    g = Guest(drv)
    g.send(hdr(50000, 60000, RW, length=3), b"abc")
    p = g.expect(lambda p: True, "RST")
    assert (p.op, p.src_port, p.dst_port) == (RST, 60000, 50000)
    g.send(hdr(50000, 60000, RST))  # never answered: no RST ping-pong
    g.send(hdr(50000, 60000, RST, src_cid=7))  # not even a bad one
    g.send(hdr(50000, 60000, CREDIT_UPDATE, src_cid=7))  # not the guest's CID
    g.send(hdr(50000, 60000, REQUEST, dst_cid=5))  # not the host
    g.send(hdr(50000, 60000, REQUEST, typ=2))  # SEQPACKET was not negotiated
    g.send(hdr(50000, 60000, RW, length=100), b"short")  # len past the chain
    g.send(hdr(50000, 60000, 99))  # unknown op
    got = [g.expect(lambda p: True, f"reply {i}") for i in range(5)]
    assert all(p.op == RST and p.src_port == 60000 and p.dst_port == 50000 for p in got)
    assert g.quiet()
    assert not drv.needs_reset


def test_replies_without_rx_buffers_are_bounded(drv: VirtioPciDriver, dev: VsockDevice) -> None:
    g = Guest(drv, post=False)
    for i in range(vsock.MAX_STRAY + 100):
        g.send(hdr(50000, 60000 + i, CREDIT_REQUEST))
    assert len(dev._stray) == vsock.MAX_STRAY
    g.post_rx(100)  # fewer than the replies: poll() posts them again
    got: list[Pkt] = []
    deadline = time.monotonic() + 5
    while len(got) < vsock.MAX_STRAY and time.monotonic() < deadline:
        got += g.poll()
    assert g.quiet()
    assert len(got + g.backlog) == vsock.MAX_STRAY


def test_connection_flood_is_bounded(drv: VirtioPciDriver, uds: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vsock, "MAX_CONNECTIONS", 8)
    g = Guest(drv)
    with host_server(Path(f"{uds}_5")) as srv:
        for i in range(12):
            g.send(hdr(30000 + i, 5, REQUEST))
        ops = [g.expect(lambda p, i=i: p.dst_port == 30000 + i, f"reply {i}").op
               for i in range(12)]
        assert ops == [RESPONSE] * 8 + [RST] * 4
        assert drv.device.metrics()["connections_live"] == 8
        del srv


def test_host_handshakes_are_bounded(drv: VirtioPciDriver, dev: VsockDevice, uds: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients that never send their line hold at most MAX_HANDSHAKES slots; the rest
    wait in the listener's backlog and are served once slots free up."""
    monkeypatch.setattr(vsock, "MAX_HANDSHAKES", 4)
    dev.handshake_timeout = 0.5
    g = Guest(drv)
    silent = [host_client(uds, b"") for _ in range(6)]
    time.sleep(QUIET)
    assert len(dev._handshakes) == 4
    late = host_client(uds, b"CONNECT 9\n")  # served after the silent ones time out
    p = g.expect(lambda p: p.op == REQUEST, "REQUEST", timeout=5)
    assert p.dst_port == 9
    assert len(dev._handshakes) <= 4
    for s in [*silent, late]:
        s.close()


def test_no_spin_without_rx_buffers(drv: VirtioPciDriver, dev: VsockDevice, uds: Path) -> None:
    """Host data waiting while the guest has no rx buffers: the host socket leaves
    epoll (nothing polls it, no CPU spent); the next rx kick resumes the stream."""
    g = Guest(drv, rx_bufs=2)
    with host_server(Path(f"{uds}_11")) as srv:
        c = GuestConn(g, 44000, 11)
        c.connect()  # uses one buffer; the poll reposts it
        peer, _ = srv.accept()
        c.pump()
        # take the posted buffers away: used, never reposted
        peer.sendall(b"x" * 20000)
        wait_for(lambda: g.rx.pending_used() >= 2, what="rx buffers used")
        time.sleep(QUIET)
        names = drv.loop.registrations()
        assert not [n for n in names if "conn-" in n], names
        cpu = time.process_time()
        time.sleep(0.3)
        assert time.process_time() - cpu < 0.1
        got = g.poll()  # reposts and kicks
        for p in got:
            c.take(p)
        assert c.read(20000) == b"x" * 20000
        peer.close()


def test_reset_closes_host_sockets_and_keeps_the_listener(
        drv: VirtioPciDriver, dev: VsockDevice, uds: Path, listener: socket.socket) -> None:
    g = Guest(drv)
    with host_server(Path(f"{uds}_12")) as srv:
        GuestConn(g, 45000, 12).connect()
        peer, _ = srv.accept()
        cl = host_client(uds, b"")  # a handshake in progress
        time.sleep(QUIET)
        drv.reset()
        assert closed(peer) and closed(cl)
        assert dev.metrics()["connections_live"] == 0
        assert listener.fileno() >= 0 and uds.exists()
        # the next driver works, through the same listener
        g = Guest(drv)
        cl = host_client(uds, b"CONNECT 1\n")
        assert g.expect(lambda p: p.op == REQUEST, "REQUEST").dst_port == 1
        cl.close()


def test_restore_sends_transport_reset_and_drops_connections(
        drv: VirtioPciDriver, dev: VsockDevice, uds: Path, listener: socket.socket) -> None:
    g = Guest(drv)
    with host_server(Path(f"{uds}_13")) as srv:
        GuestConn(g, 46000, 13).connect()
        peer, _ = srv.accept()
        drv.pdev.pause_io()
        state = encode(drv.pdev.save_state())
        assert dev.save_state() == vsock.VsockState(1, CID)
        drv.pdev.resume_io()
        dev2 = VsockDevice(guest_cid=CID, listener=listener, uds_path=uds)
        new = drv.restore_copy(dev2, state)
        try:
            g.drv = new
            wait_for(lambda: g.events() == [0], what="TRANSPORT_RESET")
            assert dev2.metrics()["connections_live"] == 0
            # in the same process, a restore closes what the device had
            drv.pdev.pause_io()
            drv.pdev.restore_state(drv.pdev.save_state())
            assert closed(peer)
            # the restored device serves new connections
            g.send(hdr(46001, 13, REQUEST))
            assert g.expect(lambda p: p.dst_port == 46001, "RESPONSE").op == RESPONSE
        finally:
            new.close()
            dev2.close()


def test_restore_refuses_another_cid(dev: VsockDevice) -> None:
    from pyvirt.state import StateError

    with pytest.raises(StateError, match="guest_cid"):
        dev.check_state(vsock.VsockState(1, CID + 1))


_OPS = st.sampled_from([0, REQUEST, RESPONSE, RST, SHUTDOWN, RW, CREDIT_UPDATE,
                        CREDIT_REQUEST, 8, 0xFFFF])


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(st.lists(st.tuples(
    st.sampled_from([CID, CID, CID, 0, 2, 1 << 40]), st.sampled_from([HOST, HOST, 1, CID]),
    st.sampled_from([1, 2, 40000, 1 << 30, 0xFFFF_FFFF]), st.sampled_from([14, 15, 16, 99]),
    st.integers(0, 1 << 17), st.sampled_from([STREAM, STREAM, 2, 0]), _OPS,
    st.integers(0, 0xFFFF_FFFF), st.integers(0, 0xFFFF_FFFF), st.integers(0, 0xFFFF_FFFF),
    st.binary(max_size=300)), max_size=25))
def test_hostile_headers(hostile: Guest, packets: list[tuple]) -> None:  # type: ignore[type-arg]
    """Any sequence of headers (with any payload): the device stays up, replies only
    with well-formed packets, keeps its bounds, and still serves a good connection."""
    g = hostile
    dev = g.drv.device
    assert isinstance(dev, VsockDevice)
    for (src_cid, dst_cid, src_port, dst_port, length, typ, op, flags, buf_alloc, fwd,
         data) in packets:
        g.send(HDR.pack(src_cid, dst_cid, src_port, dst_port, length, typ, op, flags,
                        buf_alloc, fwd), data)
        g.poll()  # asserts every reply is well-formed
    assert not g.drv.needs_reset
    assert len(dev._conns) <= vsock.MAX_CONNECTIONS
    assert all(len(c.txbuf) <= BUF_ALLOC for c in dev._conns.values())
    # RST every connection it may have opened, then a good one works
    for c in list(dev._conns.values()):
        g.send(hdr(c.key[1], c.key[0], RST))
    c = GuestConn(g, 47000, 16)
    c.connect()
    g.send(c.h(RST))
    g.backlog.clear()


@pytest.fixture(scope="module")
def hostile_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    tmp = tmp_path_factory.mktemp("vsock")
    uds = tmp / "v.sock"
    lst = bind_listener(uds, "vsock.path")
    servers = []
    for port in (14, 15, 16):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(f"{uds}_{port}")
        s.listen(1024)
        servers.append(s)
    dev = VsockDevice(guest_cid=CID, listener=lst, uds_path=uds)
    d = VirtioPciDriver(dev, mem_size=64 << 20)
    g = Guest(d, rx_bufs=128)
    yield g
    d.close()
    dev.close()
    lst.close()
    for s in servers:
        s.close()


@pytest.fixture
def hostile(hostile_env: Guest) -> Guest:
    return hostile_env


# ---- bind_listener ---------------------------------------------------------------


def test_bind_listener_replaces_a_stale_socket(tmp_path: Path) -> None:
    path = tmp_path / "s"
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(str(path))
    old.close()  # the file stays; nobody listens
    s = bind_listener(path, "vsock.path")
    try:
        assert not s.getblocking()
        assert os.get_inheritable(s.fileno()) is False
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(str(path))
        c.close()
    finally:
        s.close()


def test_bind_listener_refuses_live_sockets_and_other_files(tmp_path: Path) -> None:
    live = tmp_path / "live"
    s = bind_listener(live, "vsock.path")
    try:
        with pytest.raises(UserInputError,
                           match=r"^vsock\.path: .*live: a process is already listening"):
            bind_listener(live, "vsock.path")
    finally:
        s.close()
    f = tmp_path / "file"
    f.write_text("keep me")
    with pytest.raises(UserInputError, match=r"^vsock\.path: .*file: exists and is not a socket"):
        bind_listener(f, "vsock.path")
    assert f.read_text() == "keep me"
    with pytest.raises(UserInputError, match=r"^vsock\.path: .*: No such file or directory"):
        bind_listener(tmp_path / "no" / "dir" / "s", "vsock.path")
    with pytest.raises(UserInputError, match="at most 107 bytes"):
        bind_listener(tmp_path / ("x" * 120), "vsock.path")


def test_bad_rx_buffers_are_returned_and_logged_within_budget(
        drv: VirtioPciDriver, caplog: pytest.LogCaptureFixture) -> None:
    g = Guest(drv, post=False)
    with caplog.at_level(logging.WARNING, logger="pyvirt"):
        for _ in range(30):
            g.rx.add([], [(drv.alloc(16), 16)])  # cannot hold a header
        g.rx.kick()
        g.send(hdr(1, 2, RW, length=1), b"x")  # wants an RST reply
        g.rx.wait_used(30)
    assert len(caplog.records) <= 11
    g.post_rx(1)
    assert g.expect(lambda p: True, "RST").op == RST


def test_watch_events_follow_credit(drv: VirtioPciDriver, dev: VsockDevice, uds: Path) -> None:
    """With no credit left the host socket is not polled for reading."""
    g = Guest(drv)
    with host_server(Path(f"{uds}_17")) as srv:
        c = GuestConn(g, 48000, 17, buf_alloc=4096)
        c.connect()
        peer, _ = srv.accept()
        peer.sendall(b"y" * 10000)
        wait_for(lambda: (c.pump(), len(c.received) == 4096)[1], what="4 KiB")
        time.sleep(QUIET)
        (conn,) = dev._conns.values()
        assert conn.watch is not None and not conn.watch.events & select.EPOLLIN
        assert c.read(10000) == b"y" * 10000
        peer.close()


# ---- the vsock-io tool (tests/guests/vsock), host side against the device ---------


@pytest.fixture(scope="module")
def tool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.vsock_tool import build_vsock_tool

    return build_vsock_tool(tmp_path_factory.mktemp("vsock-tool"))


def test_tool_streams_through_the_device_both_ways(drv: VirtioPciDriver, uds: Path,
                                                   tool: Path) -> None:
    """``vsock-io uds-listen`` is the host end of a guest-initiated connection,
    ``vsock-io uds-connect`` a host-initiated one (CONNECT/OK); its pattern and hashes
    agree with ``tests.vsock_tool``'s."""
    import subprocess

    from tests.vsock_tool import parse_report

    size = (1 << 20) + 12345
    g = Guest(drv, rx_size=16384)
    srv = subprocess.Popen([str(tool), "uds-listen", f"{uds}_20", "recv"],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None and srv.stdout.readline() == "listening\n"
        c = GuestConn(g, 49000, 20)
        c.connect()
        c.write(pattern(size, 5))
        g.send(c.h(SHUTDOWN, flags=RCV | SEND))
        out, _ = srv.communicate(timeout=20)
        assert parse_report(out) == ("recv", size, hashlib.sha256(pattern(size, 5)).hexdigest())
    finally:
        srv.kill()
        srv.wait()
    cl = subprocess.Popen([str(tool), "uds-connect", str(uds), "21", "send", str(size), "9"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        p = g.expect(lambda p: p.op == REQUEST and p.dst_port == 21, "REQUEST")
        c = GuestConn(g, 21, p.src_port)
        c.take(p)
        g.send(c.h(RESPONSE))
        assert hashlib.sha256(c.read(size)).digest() == hashlib.sha256(pattern(size, 9)).digest()
        wait_for(lambda: (c.pump(), c.shutdown & SEND)[1], what="SHUTDOWN(SEND)")
        g.send(c.h(RST))  # the application closed: the tool's wait for EOF ends
        out, err = cl.communicate(timeout=20)
        assert cl.returncode == 0, err
        assert parse_report(out) == ("sent", size, hashlib.sha256(pattern(size, 9)).hexdigest())
    finally:
        cl.kill()
        cl.wait()


def test_tool_reports_a_refused_connection(uds: Path, drv: VirtioPciDriver, tool: Path) -> None:
    import subprocess

    g = Guest(drv)
    cl = subprocess.Popen([str(tool), "uds-connect", str(uds), "22", "recv"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p = g.expect(lambda p: p.op == REQUEST, "REQUEST")
    g.send(hdr(22, p.src_port, RST))
    _, err = cl.communicate(timeout=10)
    assert cl.returncode == 1 and err.startswith("vsock-io: the VMM closed the connection")


_UNDER_SECCOMP = """
import ctypes, socket, sys, time
from pathlib import Path
from pyvirt.sandbox import seccomp
from pyvirt.virtio.vsock import VsockDevice, bind_listener
from tests.virtio_driver import VirtioPciDriver
from tests.unit.test_virtio_vsock import Guest, GuestConn, REQUEST, RESPONSE, closed, \\
    host_client, read_line

tmp = Path(sys.argv[1])
uds = tmp / "v.sock"
lst = bind_listener(uds, "vsock.path")
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(f"{uds}_30"); srv.listen(4); srv.settimeout(5)
dev = VsockDevice(guest_cid=3, listener=lst, uds_path=uds)
dev.handshake_timeout = 0.2
drv = VirtioPciDriver(dev, mem_size=16 << 20)
g = Guest(drv)
assert ctypes.CDLL(None).prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
seccomp.load_filter()
c = GuestConn(g, 50000, 30)
c.connect()                                   # connect()
peer, _ = srv.accept()
c.write(b"up" * 50000)                        # sendmsg
got = b""
while len(got) < 100000:
    got += peer.recv(65536)
peer.sendall(b"down" * 10000)
assert c.read(40000) == b"down" * 10000      # recvfrom / recvmsg
cl = host_client(uds, b"CONNECT 31\\n")       # accept4, peek
p = g.expect(lambda p: p.op == REQUEST, "REQUEST")
g.send(GuestConn(g, 31, p.src_port).h(RESPONSE))
assert read_line(cl) == f"OK {p.src_port}\\n".encode()
silent = host_client(uds, b"")               # timerfd_settime, then its expiry
assert closed(silent)
drv.reset()                                   # shutdown/close of everything
assert closed(peer) and closed(cl)
print("vsock under seccomp: ok")
"""


def test_device_runs_under_the_vmm_seccomp_filter(tmp_path: Path) -> None:
    """Every syscall the device makes after set-up is on the VMM's allow-list (a
    missing one kills the child with SIGSYS)."""
    import subprocess
    import sys

    from pyvirt.sandbox import seccomp

    assert seccomp.available() is None, seccomp.available()
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", _UNDER_SECCOMP, str(tmp_path)], cwd=root,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "vsock under seccomp: ok" in r.stdout, (r.returncode,
                                                                         r.stderr[-3000:])


def test_bogus_credit_resets_the_connection(drv: VirtioPciDriver, uds: Path) -> None:
    """A guest claiming to have consumed more than we sent (or going backwards) has
    its connection reset; honest numbers pass."""
    g = Guest(drv)
    with host_server(Path(f"{uds}_18")) as srv:
        c = GuestConn(g, 51000, 18)
        c.connect()
        peer, _ = srv.accept()
        peer.sendall(b"z" * 100)
        assert c.read(100) == b"z" * 100  # consume() sends fwd_cnt 100: honest
        assert g.quiet(lambda p: p.op == RST)
        g.send(hdr(51000, 18, CREDIT_UPDATE, fwd_cnt=101))  # one byte more than sent
        g.expect(lambda p: c.mine(p) and p.op == RST, "RST")
        assert closed(peer)
        c2 = GuestConn(g, 51001, 18)
        c2.connect()
        peer2, _ = srv.accept()
        peer2.sendall(b"z" * 100)
        assert c2.read(100) == b"z" * 100
        g.send(hdr(51001, 18, CREDIT_UPDATE, fwd_cnt=50))  # backwards
        g.expect(lambda p: c2.mine(p) and p.op == RST, "RST")
        assert closed(peer2)


def test_shutdown_rcv_with_data_waiting_for_rx_buffers(drv: VirtioPciDriver, uds: Path) -> None:
    """Host data waits for rx buffers when the guest says it receives no more: nothing
    is sent when buffers come (no stray RST), and the other direction still works."""
    g = Guest(drv, rx_bufs=1)
    with host_server(Path(f"{uds}_19")) as srv:
        c = GuestConn(g, 52000, 19)
        g.send(c.h(REQUEST))
        wait_for(lambda: g.rx.pending_used() == 1, what="RESPONSE")  # the only buffer
        peer, _ = srv.accept()
        peer.sendall(b"unwanted")
        time.sleep(QUIET)
        g.send(c.h(SHUTDOWN, flags=RCV))
        for p in g.poll():  # the RESPONSE; its buffer is posted again
            c.take(p)
        g.post_rx(4)
        assert g.quiet(c.mine), g.backlog
        c.write(b"still sending")
        assert peer.recv(100) == b"still sending"
        peer.close()


def test_several_connections_at_once(drv: VirtioPciDriver, uds: Path) -> None:
    """Four connections to one host port, interleaved, each echoed by its own host
    peer: every stream comes back whole and to its own guest socket."""
    g = Guest(drv, rx_bufs=100)
    conns = [GuestConn(g, 53000 + i, 23) for i in range(4)]
    threads = []
    with host_server(Path(f"{uds}_23")) as srv:
        for c in conns:
            c.connect()
            peer, _ = srv.accept()

            def echo(s: socket.socket = peer) -> None:
                while data := s.recv(65536):
                    s.sendall(data)
                s.close()
            threads.append(threading.Thread(target=echo, daemon=True))
            threads[-1].start()
        for r in range(4):
            for i, c in enumerate(conns):
                c.write(pattern(32 << 10, 10 + i, offset=r * (32 << 10)))
        for i, c in enumerate(conns):
            assert c.read(128 << 10) == pattern(128 << 10, 10 + i), i
            g.send(c.h(SHUTDOWN, flags=RCV | SEND))
            wait_for(lambda c=c: (c.pump(), c.reset)[1], what="RST for the full shutdown")
        for t in threads:
            t.join(5)
    assert drv.device.metrics()["connections_live"] == 0
