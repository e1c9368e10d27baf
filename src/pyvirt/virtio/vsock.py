"""virtio-vsock (virtio 1.2, 5.10): stream sockets between the guest and host
programs, with Firecracker's host side.

Queues: rx (0, packets to the guest), tx (1, packets from it), event (2,
``TRANSPORT_RESET``). Config: le64 ``guest_cid``. Only stream sockets are
offered (no ``VIRTIO_VSOCK_F_SEQPACKET``).

The host side is a set of Unix sockets, as Firecracker's (docs/vsock.md there):
- the guest connects to host port P (dst_cid 2): we connect, non-blocking, to
  the AF_UNIX stream socket ``{uds_path}_{P}``; success → RESPONSE, failure
  (nobody there, backlog full, path too long) → RST;
- a host program connects to ``uds_path`` (the listener, which the VM's
  resources own) and sends ``CONNECT <port>\\n``; we pick a host port from the
  ephemeral range (unique among live connections), send REQUEST to the guest
  and, on its RESPONSE, write ``OK <hostport>\\n``; the guest's RST or no answer
  within ``request_timeout`` closes the client.

Flow control (5.10.6.3) both ways. To the guest: never more than its
``buf_alloc - (tx_cnt - fwd_cnt)``; each RW packet's data is read from the
host socket straight into the guest's receive buffer. From the guest: we
advertise ``BUF_ALLOC`` and our ``fwd_cnt`` (bytes written to the host
socket) in every packet; what the host socket does not take at once is kept
in the connection's buffer, which the credit bounds: a guest that sends more
than we granted has that connection reset. ``CREDIT_UPDATE`` goes out when
the guest asks, or once enough has been freed (see ``_maybe_credit_update``).

The guest is hostile: a packet whose header is wrong (source CID not the
guest's, destination not the host, a type other than stream, a length past
its chain or 64 KiB, an unknown op) or that names no connection is answered
with RST (replies for no connection wait in a bounded queue; the rest of a
connection's replies are flags on it); bogus credit numbers reset the
connection; live connections are bounded (``MAX_CONNECTIONS``), and so are
host-initiated handshakes (``MAX_HANDSHAKES``); memory per connection is at
most ``BUF_ALLOC`` bytes of buffered data.

Threads: ``activate``/``reset`` run on a vCPU thread with the queue work
stopped; everything else (queue work, host socket and listener readiness,
the timer) on the device's loop thread, one handler at a time, never while
I/O is paused. Host sockets are ``FdWatch``es: readable only while we may
forward data to the guest (credit, no packet of theirs waiting for an rx
buffer), writable only while data waits for the host program. Without guest
rx buffers nothing is polled: the next rx kick resumes the work.

Saved state: connections cannot be saved. After a restore (and a device
reset) every host connection is closed and, once the driver is active, the
guest gets ``VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`` (as Firecracker and QEMU do)
so that its sockets see the reset too. The listener stays open: the device
never closes or unlinks it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import socket
import stat
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pyvirt.devices.guestlog import guest_faults
from pyvirt.errors import UserInputError
from pyvirt.virtio import DEVICE_ID_VSOCK
from pyvirt.virtio.device import (
    Completions,
    FdWatch,
    Transport,
    VirtioDevice,
    copy_to_chain,
    next_chain,
)
from pyvirt.virtio.queue import Chain, SplitQueue

__all__ = ["BUF_ALLOC", "HDR", "MAX_CONNECTIONS", "MAX_HANDSHAKES", "MAX_PKT", "VsockDevice",
           "VsockState", "bind_listener"]

log = logging.getLogger(__name__)

RX, TX, EVENT = 0, 1, 2

#: struct virtio_vsock_hdr (5.10.6): src_cid, dst_cid, src_port, dst_port, len, type,
#: op, flags, buf_alloc, fwd_cnt
HDR = struct.Struct("<QQIIIHHIII")
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = \
    range(1, 8)
TYPE_STREAM = 1
SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2
EVENT_TRANSPORT_RESET = 0
HOST_CID = 2
#: CIDs 0-2 are the hypervisor, local and host; 0xFFFFFFFF is VMADDR_CID_ANY
MIN_GUEST_CID, MAX_GUEST_CID = 3, 0xFFFF_FFFE

#: the receive buffer we advertise per connection (what the guest may have in flight)
BUF_ALLOC = 256 << 10
#: the largest packet payload either way (Linux: VIRTIO_VSOCK_MAX_PKT_BUF_SIZE)
MAX_PKT = 64 << 10
#: live connections: with BUF_ALLOC each, what a guest that fills every one while the
#: host programs read nothing can make us hold (64 MiB)
MAX_CONNECTIONS = 256
#: host clients accepted but not yet connected to the guest (CONNECT line or RESPONSE)
MAX_HANDSHAKES = 64
#: RST replies to packets that name no connection, waiting for rx buffers
MAX_STRAY = 256
#: "CONNECT 4294967295\n" is 19 bytes; a longer line is not one
CONNECT_LINE_MAX = 32
#: host ports of host-initiated connections (as Firecracker: from 2^30 up)
LOCAL_PORT_FIRST, LOCAL_PORT_LAST = 1 << 30, 0xFFFF_FFFF
#: work per pass on the loop before handing it back (other devices, the console)
RX_BUDGET = 128
TX_BUDGET = 256

_U32 = 0xFFFF_FFFF
# pending replies of a connection, in the order they go out
P_REQUEST, P_RESPONSE, P_RW, P_CREDIT_UPDATE, P_CREDIT_REQUEST, P_SHUTDOWN, P_RST = (
    1 << i for i in range(7))
# connection states
LOCAL_INIT, ESTABLISHED, CLOSING = range(3)


def bind_listener(path: Path, what: str) -> socket.socket:
    """The host-initiated side's listening socket at ``path``: AF_UNIX stream,
    non-blocking, close-on-exec. A socket file nobody listens on is replaced;
    anything else there (a regular file, a live socket) is one ``UserInputError``
    line naming ``what`` (the config field)."""
    if len(os.fsencode(path)) > 107:  # sun_path, with its NUL
        raise UserInputError(f"{what}: {path}: a Unix socket path is at most 107 bytes")
    try:
        st: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise UserInputError(f"{what}: {path}: {exc.strerror}") from None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise UserInputError(f"{what}: {path}: exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.settimeout(1.0)
            probe.connect(os.fspath(path))
        except ConnectionRefusedError:
            pass  # a stale socket file: nobody listens
        except (BlockingIOError, TimeoutError):
            raise UserInputError(f"{what}: {path}: a process is already listening there "
                                 "(its backlog is full)") from None
        except OSError as exc:
            raise UserInputError(f"{what}: {path}: {exc.strerror}") from None
        else:
            raise UserInputError(f"{what}: {path}: a process is already listening there")
        finally:
            probe.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise UserInputError(f"{what}: {path}: cannot remove the stale socket: "
                                 f"{exc.strerror}") from None
    sock = socket.socket(socket.AF_UNIX,
                         socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.bind(os.fspath(path))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise UserInputError(f"{what}: {path}: cannot listen there: "
                             f"{exc.strerror or exc}") from None
    return sock


class _TimerFd:
    """A CLOCK_MONOTONIC timerfd (Python 3.11 has no ``os.timerfd_*``): handshake
    deadlines, watched on the loop like any other fd of the device. Created with
    the device (before the sandbox); only ``timerfd_settime`` runs later."""

    class _Spec(ctypes.Structure):
        _fields_ = [("i_sec", ctypes.c_long), ("i_nsec", ctypes.c_long),
                    ("v_sec", ctypes.c_long), ("v_nsec", ctypes.c_long)]

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.timerfd_create(1, os.O_NONBLOCK | os.O_CLOEXEC)  # CLOCK_MONOTONIC
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_create: {os.strerror(err)}")
        self.fd: int = fd
        self.armed_at: float | None = None  # monotonic time it fires

    def arm(self, when: float) -> None:
        delay = max(when - time.monotonic(), 0.001)
        spec = self._Spec(0, 0, int(delay), int(delay % 1 * 1e9))
        if self._libc.timerfd_settime(self.fd, 0, ctypes.byref(spec), None) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")
        self.armed_at = when

    def clear(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(BlockingIOError):
                os.read(self.fd, 8)
        self.armed_at = None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class VsockState:
    """virtio-vsock keeps nothing across a snapshot but the CID the guest knows:
    connections are host sockets and cannot be saved (see the module docstring)."""

    version: int
    guest_cid: int


class _Conn:
    """One stream connection, keyed by (host port, guest port)."""

    __slots__ = (
        "deadline",
        "eof_flags",
        "fwd_cnt",
        "fwd_sent",
        "guest_shut",
        "host_eof",
        "key",
        "peer_buf_alloc",
        "peer_fwd_cnt",
        "pending",
        "rx_cnt",
        "sock",
        "state",
        "tx_cnt",
        "txbuf",
        "watch",
    )

    def __init__(self, key: tuple[int, int], sock: socket.socket, state: int) -> None:
        self.key = key
        self.sock: socket.socket | None = sock
        self.watch: FdWatch | None = None
        self.state = state
        self.pending = 0
        self.deadline: float | None = None  # LOCAL_INIT: the guest's RESPONSE is due
        # host -> guest: bytes sent, and the guest's view (its buffer, what it consumed)
        self.tx_cnt = 0
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        # guest -> host: bytes received, written to the host socket, last advertised
        self.rx_cnt = 0
        self.fwd_cnt = 0
        self.fwd_sent = 0
        self.txbuf = bytearray()  # received, not yet taken by the host socket
        self.host_eof = False  # the host program sends no more
        self.eof_flags = 0  # the SHUTDOWN flags to send for it
        self.guest_shut = 0  # SHUTDOWN flags the guest sent

    def credit(self) -> int:
        """Bytes we may still send the guest."""
        return max(0, self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & _U32))


class _Handshake:
    """A host client on the listener that has not sent its CONNECT line yet."""

    __slots__ = ("buf", "deadline", "sock", "watch")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buf = b""
        self.watch: FdWatch | None = None


class VsockDevice(VirtioDevice):
    device_id = DEVICE_ID_VSOCK
    name = "virtio-vsock"
    pci_class = 0x00FF00
    features = 0  # stream only: VIRTIO_VSOCK_F_SEQPACKET is not offered
    STATE_VERSION: ClassVar[int] = 1
    state_type: ClassVar[type[VsockState]] = VsockState

    def __init__(self, *, guest_cid: int, listener: socket.socket, uds_path: Path,
                 name: str = "virtio-vsock") -> None:
        if not MIN_GUEST_CID <= guest_cid <= MAX_GUEST_CID:
            raise ValueError(f"guest CID {guest_cid} is not in {MIN_GUEST_CID}.."
                             f"{MAX_GUEST_CID}")
        super().__init__([256, 256, 16])
        self.name = name
        self.guest_cid = guest_cid
        self.uds_path = Path(uds_path)
        self._listener = listener
        self._timer = _TimerFd()
        #: how long a host client may take to send its CONNECT line, and the guest to
        #: answer our REQUEST (Firecracker: 2 s)
        self.handshake_timeout = 5.0
        self.request_timeout = 2.0
        # the loop thread only (and activate/reset, with the queue work stopped):
        self._rxq: SplitQueue | None = None
        self._evq: SplitQueue | None = None
        self._conns: dict[tuple[int, int], _Conn] = {}
        self._ready: dict[tuple[int, int], None] = {}  # connections with replies, in order
        self._stray: deque[bytes] = deque()  # RST replies for no connection (headers)
        self._handshakes: dict[int, _Handshake] = {}  # by fd
        self._local_ports: dict[int, int] = {}  # host port -> live connections using it
        self._next_port = LOCAL_PORT_FIRST
        self._listen_watch: FdWatch | None = None
        self._event_pending = False
        # metrics
        self.connections_total = 0
        self.tx_bytes = 0  # guest -> host
        self.rx_bytes = 0  # host -> guest
        self.resets_sent = 0
        self.replies_dropped = 0

    def config_space(self) -> bytes:
        return struct.pack("<Q", self.guest_cid)

    # ---- activation and reset (vCPU thread, queue work stopped)

    def activate(self, transport: Transport, queues: Sequence[SplitQueue],
                 driver_features: int) -> None:
        super().activate(transport, queues, driver_features)
        self._rxq, self._evq = queues[RX], queues[EVENT]
        self._listen_watch = transport.watch(self._listener.fileno(), self._on_listener,
                                             name="listen")
        transport.watch(self._timer.fd, self._on_timer, name="timer")

    def reset(self) -> None:
        """Every host connection ends (the transport closed the watches already)."""
        self._close_all()
        self._timer.clear()
        self._rxq = self._evq = None
        self._listen_watch = None
        self._event_pending = False
        self._next_port = LOCAL_PORT_FIRST
        super().reset()

    def _close_all(self) -> None:
        for c in list(self._conns.values()):
            self._remove(c)
        for h in list(self._handshakes.values()):
            self._end_handshake(h)
        self._stray.clear()
        self._ready.clear()

    def close(self) -> None:
        """The VM is going away: host sockets and the timer close; the listener is the
        VM's resources' to close."""
        self._close_all()
        self._timer.close()

    # ---- queue work (loop thread)

    def process(self, q: SplitQueue) -> None:
        if q.index == TX:
            self._drain_tx(q)
        elif q.index == RX:
            self._fill_rx()
        elif q.index == EVENT:
            self._send_event()

    def _send_event(self) -> None:
        q, transport = self._evq, self.transport
        if not self._event_pending or q is None or transport is None or not q.ready:
            return
        out = Completions(transport, q)
        while (chain := next_chain(q, self.name, out)) is not None:
            if chain.writable_len < 4:
                guest_faults.warning(log, self.name, "%s: event buffer of %d bytes",
                                     self.name, chain.writable_len)
                out.add(chain.head, 0)
                continue
            n = copy_to_chain(transport.memory, chain, struct.pack("<I", EVENT_TRANSPORT_RESET))
            self._note_written(transport, chain, n)
            out.add(chain.head, n)
            self._event_pending = False
            break
        out.flush()

    # ---- packets from the guest (tx queue)

    def _drain_tx(self, q: SplitQueue) -> None:
        transport = self.transport
        if transport is None:
            return
        out = Completions(transport, q)
        budget = TX_BUDGET
        while budget and (chain := next_chain(q, self.name, out)) is not None:
            budget -= 1
            self._packet(transport, chain)
            out.add(chain.head, 0)
        out.flush()
        if not budget:
            transport.requeue(q)  # more may wait: later, after the others had a turn
        self._fill_rx()

    def _fault(self, fmt: str, *args: object) -> None:
        guest_faults.warning(log, self.name, "%s: " + fmt, self.name, *args)

    def _packet(self, transport: Transport, chain: Chain) -> None:
        readable = chain.readable_len
        if readable < HDR.size:
            self._fault("packet of %d bytes has no header", readable)
            return
        raw = bytearray(HDR.size)
        copy = 0
        for addr, length in chain.readable:
            n = min(length, HDR.size - copy)
            raw[copy:copy + n] = transport.memory.view(addr, n)
            copy += n
            if copy == HDR.size:
                break
        (src_cid, dst_cid, src_port, dst_port, length, typ, op, flags, buf_alloc,
         fwd_cnt) = HDR.unpack(raw)
        key = (dst_port, src_port)
        if src_cid != self.guest_cid or dst_cid != HOST_CID or typ != TYPE_STREAM:
            self._fault("packet from CID %d to CID %d of type %d refused", src_cid, dst_cid, typ)
            self._stray_rst(dst_port, src_port, op)
            return
        c = self._conns.get(key)
        if op == OP_RW and (length > MAX_PKT or length > readable - HDR.size):
            self._fault("RW packet of %d bytes in a chain of %d", length, readable)
            if c is not None:
                self._kill(c)
            else:
                self._stray_rst(dst_port, src_port, op)
            return
        if c is None:
            if op == OP_REQUEST:
                self._guest_connect(key, buf_alloc, fwd_cnt)
            elif op != OP_RST:
                self._stray_rst(dst_port, src_port, op)
            return
        if c.state == CLOSING:  # its RST is on the way
            if op == OP_REQUEST:
                self._stray_rst(dst_port, src_port, op)
            return
        if c.state == LOCAL_INIT:
            if op == OP_RESPONSE:
                self._established(c, buf_alloc, fwd_cnt)
            elif op == OP_RST:
                self._remove(c)  # the guest refused: the client's socket closes
            else:
                self._fault("op %d before the connection is established", op)
                self._kill(c)
            return
        if not self._take_credit(c, buf_alloc, fwd_cnt):
            self._fault("bogus credit: fwd_cnt %d with %d bytes sent", fwd_cnt, c.tx_cnt)
            self._kill(c)
            return
        if op == OP_RW:
            self._guest_data(transport, c, chain, length)
        elif op == OP_CREDIT_UPDATE:
            pass  # taken above
        elif op == OP_CREDIT_REQUEST:
            self._want(c, P_CREDIT_UPDATE)
        elif op == OP_SHUTDOWN:
            self._guest_shutdown(c, flags)
        elif op == OP_RST:
            self._remove(c)
            return
        else:  # REQUEST on a live connection, RESPONSE to ours twice, unknown ops
            self._fault("op %d on an established connection", op)
            self._kill(c)
            return
        if c.state == ESTABLISHED:
            self._update_watch(c)

    def _take_credit(self, c: _Conn, buf_alloc: int, fwd_cnt: int) -> bool:
        """The guest's buffer and consumption, from any of its packets; False when the
        numbers are impossible (it consumed more than we sent, or went backwards)."""
        if (c.tx_cnt - fwd_cnt) & _U32 > (c.tx_cnt - c.peer_fwd_cnt) & _U32:
            return False
        c.peer_buf_alloc, c.peer_fwd_cnt = buf_alloc, fwd_cnt
        return True

    def _guest_connect(self, key: tuple[int, int], buf_alloc: int, fwd_cnt: int) -> None:
        port = key[0]
        if len(self._conns) >= MAX_CONNECTIONS:
            self._fault("%d connections are open; connection to port %d refused",
                        len(self._conns), port)
            self._stray_rst(key[0], key[1], OP_REQUEST)
            return
        sock = socket.socket(socket.AF_UNIX,
                             socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            # AF_UNIX connects at once or fails (EAGAIN: the listener's backlog is full)
            sock.connect(f"{self.uds_path}_{port}")
        except OSError as exc:
            sock.close()
            log.debug("%s: guest connection to port %d refused: %s", self.name, port, exc)
            self._stray_rst(key[0], key[1], OP_REQUEST)
            return
        c = self._add(key, sock, ESTABLISHED)
        c.tx_cnt = c.peer_fwd_cnt = fwd_cnt  # nothing sent yet: whatever it counts from
        c.peer_buf_alloc = buf_alloc
        self._want(c, P_RESPONSE)
        self._update_watch(c)

    def _established(self, c: _Conn, buf_alloc: int, fwd_cnt: int) -> None:
        """The guest accepted our REQUEST: tell the host client its port."""
        assert c.sock is not None
        c.state = ESTABLISHED
        c.deadline = None
        c.tx_cnt = c.peer_fwd_cnt = fwd_cnt
        c.peer_buf_alloc = buf_alloc
        line = f"OK {c.key[0]}\n".encode()
        try:
            n = c.sock.send(line, socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
        except OSError:
            n = 0
        if n != len(line):  # the client is gone (its buffer cannot be full yet)
            self._kill(c)
            return
        self._update_watch(c)
        self._arm_timer()

    def _guest_data(self, transport: Transport, c: _Conn, chain: Chain, length: int) -> None:
        if c.guest_shut & SHUTDOWN_SEND:
            self._fault("data after the guest's SHUTDOWN(SEND) on port %d", c.key[0])
            self._kill(c)
            return
        if not length:
            return
        if (c.rx_cnt + length - c.fwd_sent) & _U32 > BUF_ALLOC:
            self._fault("guest sent %d bytes past its credit on port %d",
                        ((c.rx_cnt + length - c.fwd_sent) & _U32) - BUF_ALLOC, c.key[0])
            self._kill(c)
            return
        views = _payload(transport, chain, length)
        c.rx_cnt = (c.rx_cnt + length) & _U32
        self.tx_bytes += length
        sent = 0
        if not c.txbuf and c.sock is not None:
            try:
                sent = c.sock.sendmsg(views, [], socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError as exc:  # the host program went away
                log.debug("%s: host socket of port %d: %s", self.name, c.key[0], exc)
                self._kill(c)
                return
        if sent < length:
            skip = sent
            for v in views:
                if skip >= len(v):
                    skip -= len(v)
                    continue
                c.txbuf += v[skip:]
                skip = 0
        c.fwd_cnt = (c.fwd_cnt + sent) & _U32
        self._maybe_credit_update(c)

    def _guest_shutdown(self, c: _Conn, flags: int) -> None:
        c.guest_shut |= flags & (SHUTDOWN_RCV | SHUTDOWN_SEND)
        if c.guest_shut & SHUTDOWN_RCV:
            c.pending &= ~P_RW  # nothing more goes to the guest
        self._after_flush(c)

    def _after_flush(self, c: _Conn) -> None:
        """The host socket took everything: pass on the guest's SHUTDOWN(SEND); both
        directions shut: the connection ends with our RST (as Firecracker's and Linux's
        hosts answer a full shutdown)."""
        if c.txbuf or c.state != ESTABLISHED or c.sock is None:
            return
        if c.guest_shut == SHUTDOWN_RCV | SHUTDOWN_SEND:
            self._kill(c)
        elif c.guest_shut & SHUTDOWN_SEND:
            with contextlib.suppress(OSError):
                c.sock.shutdown(socket.SHUT_WR)

    def _maybe_credit_update(self, c: _Conn) -> None:
        """Tell the guest what we freed once it is a quarter of the buffer, or as soon as
        its credit as it sees it is below a packet (it would wait for us)."""
        freed = (c.fwd_cnt - c.fwd_sent) & _U32
        seen_free = BUF_ALLOC - ((c.rx_cnt - c.fwd_sent) & _U32)
        if freed and (freed >= BUF_ALLOC // 4 or seen_free < MAX_PKT):
            self._want(c, P_CREDIT_UPDATE)

    # ---- host sockets (loop thread)

    def _add(self, key: tuple[int, int], sock: socket.socket, state: int) -> _Conn:
        c = _Conn(key, sock, state)
        self._conns[key] = c
        self._local_ports[key[0]] = self._local_ports.get(key[0], 0) + 1
        self.connections_total += 1
        transport = self.transport
        assert transport is not None
        c.watch = transport.watch(sock.fileno(), lambda ev: self._on_host(c, ev), events=0,
                                  name=f"conn-{key[0]}-{key[1]}")
        return c

    def _close_host(self, c: _Conn) -> None:
        if c.watch is not None:
            c.watch.close()
            c.watch = None
        if c.sock is not None:
            c.sock.close()
            c.sock = None
        c.txbuf = bytearray()

    def _remove(self, c: _Conn) -> None:
        """The connection ends here, with nothing more to the guest."""
        self._close_host(c)
        if self._conns.get(c.key) is c:
            del self._conns[c.key]
            n = self._local_ports.get(c.key[0], 1) - 1
            if n:
                self._local_ports[c.key[0]] = n
            else:
                self._local_ports.pop(c.key[0], None)
        self._ready.pop(c.key, None)
        c.state = CLOSING
        c.pending = 0

    def _kill(self, c: _Conn) -> None:
        """End the connection with an RST to the guest (its host socket closes now;
        the entry stays, bounded like every connection, until the RST went out)."""
        self._close_host(c)
        c.state = CLOSING
        c.pending = P_RST
        self._ready[c.key] = None

    def _want(self, c: _Conn, bit: int) -> None:
        c.pending |= bit
        self._ready[c.key] = None

    def _events(self, c: _Conn) -> int:
        if c.state != ESTABLISHED or c.sock is None:
            return 0
        ev = 0
        if (not c.pending & P_RW and not c.host_eof and not c.guest_shut & SHUTDOWN_RCV
                and c.credit() > 0):
            ev |= select.EPOLLIN
        if c.txbuf:
            ev |= select.EPOLLOUT
        return ev

    def _update_watch(self, c: _Conn) -> None:
        if c.watch is not None:
            ev = self._events(c)
            if ev != c.watch.events:
                c.watch.set_events(ev)

    def _on_host(self, c: _Conn, events: int) -> None:
        if c.state != ESTABLISHED or c.sock is None:
            return
        if c.txbuf and events & (select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP):
            self._flush(c)
            if c.state != ESTABLISHED:
                self._fill_rx()
                return
        if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) and (
                not c.host_eof and not c.guest_shut & SHUTDOWN_RCV):
            c.eof_flags = SHUTDOWN_SEND | (SHUTDOWN_RCV if events & select.EPOLLHUP else 0)
            self._want(c, P_RW)  # read when an rx buffer is there to read into
        self._update_watch(c)
        self._fill_rx()

    def _flush(self, c: _Conn) -> None:
        assert c.sock is not None
        try:
            n = c.sock.send(c.txbuf, socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            log.debug("%s: host socket of port %d: %s", self.name, c.key[0], exc)
            self._kill(c)
            return
        del c.txbuf[:n]
        c.fwd_cnt = (c.fwd_cnt + n) & _U32
        self._maybe_credit_update(c)
        self._after_flush(c)

    # ---- packets to the guest (rx queue)

    def _stray_rst(self, src_port: int, dst_port: int, op: int) -> None:
        """RST for a packet that names no connection (never for an RST: no ping-pong)."""
        if op == OP_RST:
            return
        if len(self._stray) >= MAX_STRAY:
            self.replies_dropped += 1
            return
        self._stray.append(HDR.pack(HOST_CID, self.guest_cid, src_port, dst_port, 0,
                                    TYPE_STREAM, OP_RST, 0, BUF_ALLOC, 0))

    def _rx_chain(self, q: SplitQueue, out: Completions) -> Chain | None:
        while (chain := next_chain(q, self.name, out)) is not None:
            if chain.writable_len >= HDR.size:
                return chain
            self._fault("rx buffer of %d bytes cannot hold a header", chain.writable_len)
            out.add(chain.head, 0)
        return None

    def _fill_rx(self) -> None:
        q, transport = self._rxq, self.transport
        if q is None or transport is None or not q.ready:
            return
        out = Completions(transport, q)
        budget = RX_BUDGET
        while budget and (self._stray or self._first_ready() is not None):
            chain = self._rx_chain(q, out)
            if chain is None:
                break  # no buffers: the driver's next rx kick brings us back
            budget -= 1
            out.add(chain.head, self._emit(transport, chain))
        out.flush()
        if not budget and (self._stray or self._ready):
            transport.requeue(q)

    def _first_ready(self) -> _Conn | None:
        """The next connection with a packet to send, dropping entries whose replies
        were withdrawn meanwhile (a SHUTDOWN(RCV) cancels pending data): a chain is
        taken only for a packet that exists."""
        while self._ready:
            key = next(iter(self._ready))
            c = self._conns.get(key)
            if c is not None and c.pending:
                return c
            del self._ready[key]
        return None

    def _emit(self, transport: Transport, chain: Chain) -> int:
        """One packet into ``chain``; returns its length."""
        if self._stray:
            hdr = self._stray.popleft()
            self.resets_sent += 1
            return self._put(transport, chain, hdr)
        c = self._first_ready()
        assert c is not None  # _fill_rx took the chain for it
        key = c.key
        del self._ready[key]
        p = c.pending
        if p & P_REQUEST:
            c.pending &= ~P_REQUEST
            n = self._put(transport, chain, self._hdr(c, OP_REQUEST))
        elif p & P_RESPONSE:
            c.pending &= ~P_RESPONSE
            n = self._put(transport, chain, self._hdr(c, OP_RESPONSE))
        elif p & P_RW:
            c.pending &= ~P_RW
            n = self._read_host(transport, c, chain)
        elif p & P_CREDIT_UPDATE:
            n = self._put(transport, chain, self._hdr(c, OP_CREDIT_UPDATE))
        elif p & P_CREDIT_REQUEST:
            c.pending &= ~P_CREDIT_REQUEST
            n = self._put(transport, chain, self._hdr(c, OP_CREDIT_REQUEST))
        elif p & P_SHUTDOWN:
            c.pending &= ~P_SHUTDOWN
            n = self._put(transport, chain, self._hdr(c, OP_SHUTDOWN, flags=c.eof_flags))
        else:  # P_RST
            n = self._put(transport, chain, self._hdr(c, OP_RST))
            self.resets_sent += 1
            self._remove(c)
            return n
        if c.pending and c.key in self._conns:
            self._ready[key] = None
        self._update_watch(c)
        return n

    def _hdr(self, c: _Conn, op: int, length: int = 0, flags: int = 0) -> bytes:
        """Every packet carries our buffer and fwd_cnt: it is a credit update too."""
        c.fwd_sent = c.fwd_cnt
        c.pending &= ~P_CREDIT_UPDATE
        return HDR.pack(HOST_CID, self.guest_cid, c.key[0], c.key[1], length, TYPE_STREAM,
                        op, flags, BUF_ALLOC, c.fwd_cnt)

    def _put(self, transport: Transport, chain: Chain, hdr: bytes) -> int:
        n = copy_to_chain(transport.memory, chain, hdr)
        self._note_written(transport, chain, n)
        return n

    @staticmethod
    def _note_written(transport: Transport, chain: Chain, n: int) -> None:
        for addr, length in chain.writable:
            if n <= 0:
                break
            transport.note_dma_write(addr, min(length, n))
            n -= length

    def _read_host(self, transport: Transport, c: _Conn, chain: Chain) -> int:
        """Data from the host socket straight into the guest's buffer (an RW packet), or
        what its state calls for instead: SHUTDOWN at EOF, RST on an error, a credit
        request when the guest's credit shrank meanwhile (the chain is taken: something
        valid must go in it)."""
        room = min(chain.writable_len - HDR.size, MAX_PKT, c.credit())
        if c.sock is None or c.state != ESTABLISHED or c.guest_shut & SHUTDOWN_RCV:
            return self._put(transport, chain, self._hdr(c, OP_CREDIT_UPDATE))
        if room <= 0:
            return self._put(transport, chain, self._hdr(
                c, OP_CREDIT_REQUEST if c.credit() <= 0 else OP_CREDIT_UPDATE))
        views = _buffers(transport, chain, HDR.size, room)
        try:
            if len(views) == 1:
                got = c.sock.recv_into(views[0], room, socket.MSG_DONTWAIT)
            else:
                got = c.sock.recvmsg_into(views, 0, socket.MSG_DONTWAIT)[0]
        except BlockingIOError:
            return self._put(transport, chain, self._hdr(c, OP_CREDIT_UPDATE))
        except OSError as exc:  # ECONNRESET: the host program vanished mid-stream
            log.debug("%s: host socket of port %d: %s", self.name, c.key[0], exc)
            self._close_host(c)
            c.state = CLOSING
            c.pending = 0
            self.resets_sent += 1
            n = self._put(transport, chain, self._hdr(c, OP_RST))
            self._remove(c)
            return n
        if got == 0:
            c.host_eof = True
            return self._put(transport, chain, self._hdr(c, OP_SHUTDOWN, flags=c.eof_flags))
        c.tx_cnt = (c.tx_cnt + got) & _U32
        self.rx_bytes += got
        if got == room and c.credit() > 0:
            # the buffer filled up: more is likely waiting, so read on in this pass
            # rather than through epoll (two epoll_ctl and a wait per packet)
            c.pending |= P_RW
        copy_to_chain(transport.memory, chain, self._hdr(c, OP_RW, length=got))
        self._note_written(transport, chain, HDR.size + got)
        return HDR.size + got

    # ---- host-initiated connections (loop thread)

    def _on_listener(self, events: int) -> None:
        for _ in range(16):  # a bounded batch per wake-up
            if len(self._handshakes) >= MAX_HANDSHAKES:
                break
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: try again on the next wake-up
                log.warning("%s: accept on %s: %s", self.name, self.uds_path, exc)
                return
            sock.setblocking(False)
            h = _Handshake(sock, time.monotonic() + self.handshake_timeout)
            transport = self.transport
            assert transport is not None
            h.watch = transport.watch(sock.fileno(), self._line_handler(h), name="connect")
            self._handshakes[sock.fileno()] = h
            self._arm_timer()
        self._listen_update()

    def _line_handler(self, h: _Handshake) -> Callable[[int], None]:
        return lambda events: self._on_line(h)

    def _listen_update(self) -> None:
        """Stop accepting while the handshakes are at their bound (clients wait in the
        listener's backlog), accept again once one ends."""
        if self._listen_watch is not None:
            want = select.EPOLLIN if len(self._handshakes) < MAX_HANDSHAKES else 0
            if self._listen_watch.events != want:
                self._listen_watch.set_events(want)

    def _end_handshake(self, h: _Handshake, *, close: bool = True) -> None:
        if h.watch is not None:
            h.watch.close()
            h.watch = None
        self._handshakes.pop(h.sock.fileno(), None)
        if close:
            h.sock.close()
        self._listen_update()

    def _on_line(self, h: _Handshake) -> None:
        """Read the CONNECT line without consuming a byte past it: what follows is the
        client's data for the guest."""
        try:
            peek = h.sock.recv(CONNECT_LINE_MAX - len(h.buf), socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            peek = b""
        if not peek:
            self._end_handshake(h)
            return
        nl = peek.find(b"\n")
        take = nl + 1 if nl >= 0 else len(peek)
        try:
            h.buf += h.sock.recv(take)
        except OSError:
            self._end_handshake(h)
            return
        if nl < 0:
            if len(h.buf) >= CONNECT_LINE_MAX:
                log.debug("%s: host client sent no CONNECT line", self.name)
                self._end_handshake(h)
            return
        port = _parse_connect(h.buf)
        if port is None:
            log.debug("%s: host client sent %r, not CONNECT <port>", self.name, h.buf)
            self._end_handshake(h)
            return
        self._host_connect(h, port)

    def _host_connect(self, h: _Handshake, port: int) -> None:
        local = self._alloc_port()
        if local is None or len(self._conns) >= MAX_CONNECTIONS:
            log.debug("%s: %d connections open; host client refused", self.name,
                      len(self._conns))
            self._end_handshake(h)
            return
        self._end_handshake(h, close=False)
        c = self._add((local, port), h.sock, LOCAL_INIT)
        c.deadline = time.monotonic() + self.request_timeout
        self._want(c, P_REQUEST)
        self._arm_timer()
        self._fill_rx()

    def _alloc_port(self) -> int | None:
        for _ in range(MAX_CONNECTIONS + 1):
            port = self._next_port
            self._next_port = port + 1 if port < LOCAL_PORT_LAST else LOCAL_PORT_FIRST
            if port not in self._local_ports:
                return port
        return None

    # ---- deadlines (loop thread)

    def _arm_timer(self) -> None:
        soonest = min([h.deadline for h in self._handshakes.values()]
                      + [c.deadline for c in self._conns.values()
                         if c.state == LOCAL_INIT and c.deadline is not None],
                      default=None)
        if soonest is None:
            return  # a timer still armed fires once and finds nothing due
        if self._timer.armed_at is None or soonest < self._timer.armed_at:
            self._timer.arm(soonest)

    def _on_timer(self, events: int) -> None:
        self._timer.clear()
        now = time.monotonic()
        for h in list(self._handshakes.values()):
            if h.deadline <= now:
                log.debug("%s: host client sent no CONNECT line in time", self.name)
                self._end_handshake(h)
        for c in list(self._conns.values()):
            if c.state == LOCAL_INIT and c.deadline is not None and c.deadline <= now:
                log.debug("%s: guest did not answer the connection to port %d", self.name,
                          c.key[1])
                self._kill(c)  # RST: the guest may have a half-open socket
        self._arm_timer()
        self._fill_rx()

    # ---- saved state and metrics

    def save_state(self) -> VsockState:
        return VsockState(self.STATE_VERSION, self.guest_cid)

    def check_state(self, state: VsockState) -> None:
        from pyvirt.devices.statecheck import check_int

        super().check_state(state)
        check_int(self.name, "guest_cid", state.guest_cid, self.guest_cid, self.guest_cid)

    def restore_state(self, state: VsockState) -> None:
        """Connections are gone (``reset`` ran); a driver that was active learns it from
        TRANSPORT_RESET once the queue work runs."""
        self.check_state(state)
        self._close_all()
        self._event_pending = self.transport is not None

    def metrics(self) -> dict[str, int]:
        return {"connections_live": len(self._conns), "connections_total": self.connections_total,
                "tx_bytes": self.tx_bytes, "rx_bytes": self.rx_bytes,
                "resets_sent": self.resets_sent, "replies_dropped": self.replies_dropped}


def _parse_connect(line: bytes) -> int | None:
    """The port of ``CONNECT <port>\\n`` (decimal, 32 bits), else None."""
    if not line.startswith(b"CONNECT ") or not line.endswith(b"\n"):
        return None
    digits = line[8:-1]
    if not 1 <= len(digits) <= 10 or not digits.isdigit():
        return None
    port = int(digits)
    return port if port <= _U32 else None


def _views(transport: Transport, bufs: Sequence[tuple[int, int]], skip: int,
           limit: int) -> list[memoryview]:
    """Views of ``bufs`` (guest address, length) from byte ``skip``, ``limit`` bytes long."""
    out = []
    for addr, length in bufs:
        if skip >= length:
            skip -= length
            continue
        n = min(length - skip, limit)
        out.append(transport.memory.view(addr + skip, n))
        limit -= n
        skip = 0
        if not limit:
            break
    return out


def _buffers(transport: Transport, chain: Chain, skip: int, limit: int) -> list[memoryview]:
    """Views of the chain's writable buffers from byte ``skip``, ``limit`` bytes long."""
    return _views(transport, chain.writable, skip, limit)


def _payload(transport: Transport, chain: Chain, length: int) -> list[memoryview]:
    """Views of a tx packet's payload: ``length`` bytes after the header."""
    return _views(transport, chain.readable, HDR.size, length)
