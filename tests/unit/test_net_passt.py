"""The passt backend: the real passt in throw-away network namespaces, and the
stream framing against a hostile fake peer."""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirt.net.backend import NetBackendError
from pyvirt.net.errors import NetConfigError
from pyvirt.net.passt import FIXED_GATEWAY, FIXED_GUEST, HostForward, PasstBackend, start_passt
from tests.netns import NetNs, available
from tests.packets import arp_request, dhcp_discover, eth, parse_dhcp, tcp

needs_netns = pytest.mark.skipif(available() is not None, reason=str(available()))
needs_passt = pytest.mark.skipif(shutil.which("passt") is None,
                                 reason="passt is not installed (Debian package passt)")

MAC = bytes.fromhex("525400123456")


def _recv(b: PasstBackend, timeout: float = 5, size: int = 70000) -> bytes | None:
    buf = bytearray(size)
    end = time.monotonic() + timeout
    while True:
        n = b.recv_into([memoryview(buf)])
        if n is not None:
            return bytes(buf[:n])
        left = end - time.monotonic()
        if left <= 0:
            return None
        select.select([b.fileno()], [], [], left)


def _recv_matching(b: PasstBackend, pred: object, timeout: float = 5) -> bytes:
    end = time.monotonic() + timeout
    while (f := _recv(b, max(0.01, end - time.monotonic()))) is not None:
        if pred(f):  # type: ignore[operator]
            return f
    raise AssertionError("no matching frame from passt")


def _is_tcp(f: bytes) -> bool:
    return f[12:14] == b"\x08\x00" and f[23] == 6


@pytest.fixture
def ns() -> Iterator[NetNs]:
    with NetNs() as n:
        yield n


@pytest.fixture
def routed_ns(ns: NetNs) -> NetNs:
    """A namespace with a veth, an address and a default route (and nothing behind it)."""
    ns.run("ip link add v0 type veth peer name v1")
    ns.run("ip addr add 10.9.0.1/24 dev v0")
    ns.run("ip link set v0 up")
    ns.run("ip link set v1 up")
    ns.run("ip route add default via 10.9.0.254 dev v0")
    return ns


def _dhcp(b: PasstBackend) -> tuple[str, str]:
    assert b.send([memoryview(dhcp_discover(MAC))])
    f = _recv_matching(b, lambda f: parse_dhcp(f) is not None)
    kind, yiaddr, opts = parse_dhcp(f)  # type: ignore[misc]
    assert kind == 2  # DHCPOFFER
    assert f[:6] == MAC
    return yiaddr, socket.inet_ntoa(opts[3])


@needs_netns
@needs_passt
def test_no_default_route_fixed_addresses_dhcp_arp_outbound_tcp(ns: NetNs) -> None:
    """Only lo: passt refuses the host's addressing; ours gives QEMU-like addresses,
    DHCP, ARP for the gateway, and a guest connection to the gateway reaches the host."""
    listener = ns.call(socket.create_server, ("127.0.0.1", 8080))
    b = ns.call(start_passt, hostfwd=[], what="nics[0]")
    try:
        assert b.addressing == "fixed"
        assert _dhcp(b) == (FIXED_GUEST, FIXED_GATEWAY)
        # ARP: who has the gateway?
        assert b.send([memoryview(arp_request(MAC, FIXED_GUEST, FIXED_GATEWAY))])
        reply = _recv_matching(b, lambda f: f[12:14] == b"\x08\x06")
        assert struct.unpack("!H", reply[20:22])[0] == 2  # ARP reply
        gw_mac = reply[22:28]
        assert reply[28:32] == socket.inet_aton(FIXED_GATEWAY) and reply[:6] == MAC
        # a TCP SYN to the gateway: passt connects to the host's loopback service
        syn = tcp(FIXED_GUEST, FIXED_GATEWAY, 40000, 8080, 1, 0, 0x02,
                  options=struct.pack("!BBH", 2, 4, 1460))
        assert b.send([memoryview(eth(gw_mac, MAC, 0x0800, syn))])
        listener.settimeout(5)
        conn, _ = listener.accept()
        conn.close()
        synack = _recv_matching(b, _is_tcp)
        assert synack[14 + 20 + 13] & 0x12 == 0x12  # SYN-ACK back to the guest
        assert struct.unpack("!HH", synack[34:38]) == (8080, 40000)
    finally:
        b.close()
        listener.close()


@needs_netns
@needs_passt
def test_host_addressing_and_port_forward(routed_ns: NetNs) -> None:
    """With a default route the guest mirrors the host; a host port forward sends a
    connection to the guest's port."""
    b = routed_ns.call(start_passt, hostfwd=[HostForward("tcp", "", 18080, 80)],
                       what="nics[0]")
    try:
        assert b.addressing == "host"
        guest, gateway = _dhcp(b)
        assert (guest, gateway) == ("10.9.0.1", "10.9.0.254")
        c = routed_ns.call(socket.socket, socket.AF_INET, socket.SOCK_STREAM)
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", 18080))
        syn = _recv_matching(b, lambda f: _is_tcp(f) and f[14 + 20 + 13] & 0x02 != 0)
        assert struct.unpack("!H", syn[36:38])[0] == 80
        assert socket.inet_ntoa(syn[30:34]) == guest
        c.close()
    finally:
        b.close()


@needs_netns
@needs_passt
def test_host_port_in_use_is_one_line(ns: NetNs) -> None:
    # held on IPv4 only: passt itself would still bind IPv6 and not complain
    held = ns.call(socket.create_server, ("0.0.0.0", 18081))
    try:
        with pytest.raises(NetConfigError, match=r"^nics\[0\]: hostfwd tcp::18081-:22: host "
                           r"port 18081 is in use$"):
            ns.call(start_passt, hostfwd=[HostForward("tcp", "", 18081, 22)], what="nics[0]")
        with pytest.raises(NetConfigError, match=r"^nics\[1\]: hostfwd tcp:192.0.2.77:"
                           r"18082-:22: 192.0.2.77 is not an address of this host$"):
            ns.call(start_passt, hostfwd=[HostForward("tcp", "192.0.2.77", 18082, 22)],
                    what="nics[1]")
    finally:
        held.close()


@needs_netns
@needs_passt
def test_passt_killed_is_backend_error_with_its_status(ns: NetNs) -> None:
    b = ns.call(start_passt, hostfwd=[], what="nics[0]")
    try:
        os.kill(b._proc.pid, signal.SIGKILL)
        with pytest.raises(NetBackendError, match=r"^user: passt closed the connection; "
                           r"passt exited with status -9"):
            _recv(b, timeout=5)
        with pytest.raises(NetBackendError, match="writing failed"):
            for _ in range(100):  # the first write may still land in the socket buffer
                b.send([memoryview(arp_request(MAC, FIXED_GUEST, FIXED_GATEWAY))])
    finally:
        b.close()


@needs_passt
def test_close_ends_passt_and_is_idempotent() -> None:
    b = start_passt(hostfwd=[], what="nics[0]")
    proc = b._proc
    assert proc.poll() is None
    b.close()
    b.close()
    assert proc.returncode is not None  # reaped: it quit when its socket closed


def test_passt_missing_and_failing_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(NetConfigError, match=r"^nics\[0\]: /nonexistent/passt not found: "
                       r"install the Debian package passt$"):
        start_passt(hostfwd=[], what="nics[0]", passt="/nonexistent/passt")
    fake = tmp_path / "passt"
    fake.write_text("#!/bin/sh\necho 'Failed to send 20 bytes to syslog' >&2\n"
                    "echo 'Invalid port specifier 99999' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(NetConfigError, match=r"^nics\[0\]: passt failed to start: Invalid "
                       r"port specifier 99999$"):
        start_passt(hostfwd=[], what="nics[0]", passt=str(fake))


# -- the framing against a fake peer -------------------------------------------------

@pytest.fixture
def fake() -> Iterator[tuple[PasstBackend, socket.socket]]:
    """A backend whose "passt" is a sleeping process and whose peer is the test."""
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    err_r, err_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    proc = subprocess.Popen(["sleep", "60"], stderr=err_w)
    os.close(err_w)
    b = PasstBackend(ours, proc, err_r, "test")
    try:
        yield b, peer
    finally:
        proc.kill()
        b.close()
        peer.close()


def _framed(frame: bytes) -> bytes:
    return len(frame).to_bytes(4, "big") + frame


def test_frames_one_per_call_and_exact_readiness(fake: tuple[PasstBackend, socket.socket]
                                                 ) -> None:
    b, peer = fake
    frames = [bytes([i]) * (60 + i) for i in range(5)]
    peer.sendall(b"".join(_framed(f) for f in frames))
    got = []
    for _ in frames:
        buf = bytearray(100)
        n = b.recv_into([memoryview(buf)[:30], memoryview(buf)[30:]])
        assert n is not None
        got.append(bytes(buf[:n]))
    assert got == frames
    assert b.recv_into([memoryview(bytearray(100))]) is None
    # nothing is held back: the socket is not readable once every frame was handed out
    assert select.select([b.fileno()], [], [], 0)[0] == []


def test_frames_split_anywhere_are_reassembled(fake: tuple[PasstBackend, socket.socket]
                                               ) -> None:
    b, peer = fake
    frames = [os.urandom(1500), os.urandom(64), os.urandom(65535)]
    stream = b"".join(_framed(f) for f in frames)
    got: list[bytes] = []
    buf = bytearray(65535)
    for cut in (1, 3, 2, 700, 801, 5, 1500, 60000, len(stream)):  # odd splits
        chunk, stream = stream[:cut], stream[cut:]
        peer.sendall(chunk)
        while (n := b.recv_into([memoryview(buf)[:1000], memoryview(buf)[1000:]])) is not None:
            got.append(bytes(buf[:n]))
        if not stream:
            break
    assert got == frames


def test_frame_longer_than_buffers_is_cut_and_stream_stays_in_step(
        fake: tuple[PasstBackend, socket.socket]) -> None:
    b, peer = fake
    big, small = os.urandom(3000), os.urandom(80)
    peer.sendall(_framed(big) + _framed(small))
    buf = bytearray(1000)
    assert b.recv_into([memoryview(buf)]) == 3000  # > 1000: the caller drops it
    assert bytes(buf) == big[:1000]
    assert b.recv_into([memoryview(buf)]) == 80
    assert bytes(buf[:80]) == small


@pytest.mark.parametrize("length", [0, 65536, 0xFFFFFFFF])
def test_bad_length_is_protocol_error(fake: tuple[PasstBackend, socket.socket],
                                      length: int) -> None:
    b, peer = fake
    peer.sendall(length.to_bytes(4, "big") + b"x" * 64)
    with pytest.raises(NetBackendError, match=f"protocol error: passt sent a frame length of "
                       f"{length}$"):
        b.recv_into([memoryview(bytearray(70000))])


def _drain(peer: socket.socket, data: bytearray) -> None:
    peer.setblocking(False)
    while True:
        try:
            data.extend(peer.recv(1 << 20))
        except BlockingIOError:
            return


def _frames_in(data: bytearray) -> list[bytes]:
    """The stream cut into frames; every frame whole (else the assertion fails)."""
    out, pos = [], 0
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        assert pos + 4 + n <= len(data), "a torn frame"
        out.append(bytes(data[pos + 4:pos + 4 + n]))
        pos += 4 + n
    return out


def _fill(b: PasstBackend, frame: bytes) -> int:
    """Send ``frame`` until the socket is full and it was taken in part; the count of
    frames taken whole (the last call answered False)."""
    sent = 0
    while b.send([memoryview(frame[:100]), memoryview(frame[100:])]):
        sent += 1
        assert sent < 10000
    return sent


def test_send_frames_and_never_tears_one(fake: tuple[PasstBackend, socket.socket]) -> None:
    b, peer = fake
    frame = os.urandom(60000)  # over 32 KiB: two socket buffers, so it can go in part
    t0 = time.monotonic()
    sent = _fill(b, frame)
    # a partial write never waits on the device loop (it waited up to 1 s)
    assert time.monotonic() - t0 < 0.5
    assert b.stats()["tx_full"] == 0 and b.stats()["tx_partial_writes"] == 1
    assert sent >= 1
    assert b._tx_rest  # the socket took part of the last frame: its rest waits, whole
    # still full: the same frame again is refused, the rest still waits
    assert not b.send([memoryview(frame)])
    assert b.stats()["tx_full"] == 1
    data = bytearray()
    _drain(peer, data)
    # room again (the device saw EPOLLOUT): the same frame again finishes it, once
    assert select.select([], [b.fileno()], [], 0)[1]
    assert b.send([memoryview(frame)])
    sent += 1
    assert not b._tx_rest
    assert b.send([memoryview(frame)])  # and then a frame like any other
    sent += 1
    _drain(peer, data)
    assert _frames_in(data) == [frame] * sent
    # a frame the framing cannot carry: dropped and counted, never sent
    assert b.send([memoryview(bytes(65536))])
    assert b.stats()["tx_dropped_too_long"] == 1


def test_partial_frame_then_another_frame(fake: tuple[PasstBackend, socket.socket]) -> None:
    """After a partial write the device may send another frame instead (it was reset
    meanwhile): the rest goes first, then that frame, both whole."""
    b, peer = fake
    frame, other = os.urandom(60000), os.urandom(60000)
    sent = _fill(b, frame)
    data = bytearray()
    _drain(peer, data)
    assert b.send([memoryview(other)])
    _drain(peer, data)
    assert _frames_in(data) == [frame] * (sent + 1) + [other]


def test_more_buffers_than_one_readv_takes(fake: tuple[PasstBackend, socket.socket]) -> None:
    """A guest posting more tiny buffers than IOV_MAX: the frame goes through the
    stage (readv refused such a list: the link went down as if passt were gone)."""
    b, peer = fake
    frame = os.urandom(3000)
    peer.sendall(_framed(frame) + _framed(frame[:100]))
    buf = bytearray(3000)
    bufs = [memoryview(buf)[i:i + 2] for i in range(0, 3000, 2)]  # 1500 buffers
    assert b.recv_into(bufs) == 3000
    assert bytes(buf) == frame
    assert b.recv_into([memoryview(buf)]) == 100  # and the stream stays in step
    assert bytes(buf[:100]) == frame[:100]


def test_socket_buffers_and_mtu_passt_is_given(tmp_path: Path) -> None:
    """passt's end of the pair gets a large send buffer (with the default one passt
    dropped frames it could not write at once: host→guest ran at ~21 Mbit/s), ours
    too, and passt offers MTU 65520 by DHCP."""
    report = tmp_path / "report"
    fake = tmp_path / "passt"
    fake.write_text(f"""#!{shutil.which("python3")}
import select, socket, sys
fd = int(sys.argv[sys.argv.index("-F") + 1])
s = socket.socket(fileno=fd)
with open({str(report)!r}, "w") as f:
    print(s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF), *sys.argv[1:], file=f)
select.epoll().poll()  # "ready": waiting in epoll_wait
""")
    fake.chmod(0o755)
    b = start_passt(hostfwd=[], what="nics[0]", passt=str(fake))
    try:
        theirs, *argv = report.read_text().split()
        assert int(theirs) >= 4 << 20
        assert argv[argv.index("-m") + 1] == "65520"
        assert b._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 4 << 20
    finally:
        b._proc.kill()
        b.close()
