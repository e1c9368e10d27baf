"""User-mode networking through passt (``PasstBackend``, started by ``start_passt``).

passt (Debian package ``passt``) turns the guest's Ethernet frames into
ordinary host sockets (TCP, UDP, ICMP echo) and answers ARP, DHCP, NDP and
DHCPv6 itself: no privileges, no TAP. We hand it one end of an AF_UNIX
stream socket pair (``-F FD``) and speak QEMU's stream framing on the other:
a 4-byte big-endian length, then the bare frame (no vnet header: passt
takes no offloads, ``vnet_hdr`` is False).

How it is run: ``passt -f -q -F FD -t SPEC -u SPEC [addressing]`` in its own
session (a terminal's Ctrl-C is ours to handle, not its), stdin/stdout on
/dev/null, stderr on a non-blocking pipe that we drain into a few bounded
lines (passt must never block on a full pipe; it writes "Failed to send ...
to syslog" for every message when there is no syslog, which we drop). As
root passt drops to ``nobody`` by itself (checked here: it works). With
``-F`` it quits once our end of the pair closes, which is how ``close`` ends
it even inside the sandbox (where signals to other processes are denied);
SIGTERM/SIGKILL are only the fall-back outside it.

Ready: passt prints nothing with ``-q`` and writes its PID file (``-P``) only
after dropping privileges, so readiness is read from ``/proc/PID/wchan``
(its main loop waits in ``epoll_wait``), with a short grace period where
that file says nothing; an exit before that is a ``NetConfigError`` carrying
passt's own last message.

The guest's addresses (this passt is 0.0~git20230309): by default passt
copies the host: the guest gets by DHCP the address, prefix and default
gateway of the host interface with the first IPv4 default route, and the
host's resolvers from /etc/resolv.conf; connections to the gateway address
reach the host itself (its loopback services). On a host with no IPv4
default route (a fresh CI machine, a namespace with only a veth) passt
refuses to start ("External interface not usable"), even given addresses;
there we use fixed QEMU-like addresses on loopback, which it accepts:
``-4 -i lo -M 9a:55:9a:55:9a:55 -a 10.0.2.15 -n 24 -g 10.0.2.2`` (guest
10.0.2.15/24, gateway and host 10.0.2.2). ``PasstBackend.addressing`` says
which was used ("host" or "fixed").

The link's MTU: ``-m 65520`` (DHCP option 26), the largest frame QEMU's framing
carries less the Ethernet header, rounded down to 4 bytes, as newer passt
versions do by default. passt ends TCP and UDP on the host, so the guest's MTU
only sizes the frames on our socket pair, and the cost here is per frame:
measured in the rootfs guest (software CPU, load 1.5-3.7 on 2 cores) with MTU
65520 against 1500, iperf3 guest→host 900-1200 against 170-340 Mbit/s and
host→guest 920-1510 against 170-390 Mbit/s. A guest must apply the option
(busybox udhcpc's hook gets it as ``$mtu``); one that ignores it keeps 1500.

Socket buffers: passt drops the frames it cannot write to us at once and
leaves it to the guest's TCP to have them sent again (it rewinds to the last
ACK: go-back-N), so a full socket costs whole windows. A socket pair it gets
through ``-F`` keeps the default 208 KiB send buffer (it enlarges only the
sockets it accepts itself), and the VMM reads one frame per call on the device
loop, which falls behind a burst: with that buffer a host→guest stream through
a port forward ran at 21 Mbit/s in bursts with pauses (1.25 MB per 0.6 s,
passt skipping and repeating 56-80 frames at a time, seen in an strace); with
4 MiB on both ends (``_SOCK_BUF``; SO_SNDBUFFORCE where allowed, else capped
by net.core.wmem_max) 170-390 Mbit/s at MTU 1500, steady.

Port forwards: ``HostForward`` entries become ``-t``/``-u`` specs (``-u none``
when no UDP forward is asked, since passt otherwise mirrors TCP ports to
UDP). passt binds a host port on IPv4 and IPv6 and gives up only when none
binds, so a port another program holds on IPv4 alone would not fail; we bind
each host port ourselves first to name a conflict in one line.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pyvirt.net.backend import NetBackendError
from pyvirt.net.errors import NetConfigError

if TYPE_CHECKING:
    import subprocess

__all__ = [
    "FIXED_GATEWAY",
    "FIXED_GUEST",
    "MAX_FRAME",
    "HostForward",
    "PasstBackend",
    "start_passt",
]

#: QEMU's framing carries at most this much per frame (passt's limit too)
MAX_FRAME = 65535
#: the addresses used on a host with no IPv4 default route (see the module docstring)
FIXED_GUEST = "10.0.2.15"
FIXED_GATEWAY = "10.0.2.2"
_FIXED_ARGS = ("-4", "-i", "lo", "-M", "9a:55:9a:55:9a:55", "-a", FIXED_GUEST, "-n", "24",
               "-g", FIXED_GATEWAY)
_NO_EXTERNAL = ("External interface not usable", "No external routable interface")
_READY_WCHAN = ("do_epoll_wait", "ep_poll", "do_epoll_pwait")
_START_TIMEOUT = 5.0
_GRACE = 0.3  # alive this long with an unreadable wchan: taken as ready
#: send buffer of each end of the socket pair (the kernel doubles it); see the docstring
_SOCK_BUF = 4 << 20
#: the MTU passt offers the guest by DHCP (see the module docstring)
MTU = 65520
#: the most buffers one readv/recvmsg takes (Linux's UIO_MAXIOV)
_IOV_MAX = 1024
_SO_SNDBUFFORCE = 32  # <asm-generic/socket.h>; not in Python's socket module
_TX_HEAD = 64  # bytes of a frame kept to recognise it when it is sent again
_LOG_LINES = 8
_LOG_CHUNK = 4096


@dataclass(frozen=True)
class HostForward:
    """A host port forwarded to a guest port (``hostfwd=tcp:ADDR:HP-:GP``)."""

    proto: Literal["tcp", "udp"]
    host_addr: str  # "" = every address
    host_port: int
    guest_port: int

    def __post_init__(self) -> None:
        if self.proto not in ("tcp", "udp"):
            raise ValueError(f"proto {self.proto!r} is not tcp or udp")
        for port in (self.host_port, self.guest_port):
            if not 1 <= port <= 65535:
                raise ValueError(f"port {port} is not 1-65535")

    def spec(self) -> str:
        """passt's ``-t``/``-u`` form: ``[ADDR/]HP:GP``."""
        where = f"{self.host_addr}/" if self.host_addr else ""
        return f"{where}{self.host_port}:{self.guest_port}"

    def describe(self) -> str:
        return f"{self.proto}:{self.host_addr}:{self.host_port}-:{self.guest_port}"


class PasstBackend:
    """The VMM's end of passt's socket pair, plus the passt process.

    RX reads exactly one frame's bytes per call, straight into the caller's
    buffers, together with the next frame's length (one ``readv`` per frame
    in a stream of frames): nothing but a partial frame is ever held here, so
    the socket's readiness tells the device the truth (level-triggered epoll
    sees every frame that waits). TX writes length and frame with one
    ``sendmsg``. A frame passt took only part of (a full socket; only frames
    over ~32 KiB span more than one socket buffer, so only a large MTU gets
    there) is finished before anything else is sent, so no frame is ever torn,
    and without waiting: ``send`` keeps its rest and answers False, the device
    waits for EPOLLOUT and sends the same frame again, and that call writes
    the rest and answers True without writing the frame twice (recognised by
    its length and first bytes; any other frame after a device reset waits for
    the rest to go, then goes itself)."""

    name = "user"
    vnet_hdr = False
    max_frame = MAX_FRAME

    def __init__(self, sock: socket.socket, proc: subprocess.Popen[bytes], err_fd: int,
                 addressing: str) -> None:
        self.addressing = addressing
        self._sock = sock
        self._fd = sock.fileno()
        self._proc = proc
        self._err_fd = err_fd  # read end of passt's stderr pipe (non-blocking)
        self._log: collections.deque[str] = collections.deque(maxlen=_LOG_LINES)
        self._log_tail = b""
        # RX: the next frame's length as it arrives, then a partial frame if any
        self._hdr = bytearray(4)
        self._hdr_view = memoryview(self._hdr)
        self._hdr_have = 0
        self._stage = bytearray(MAX_FRAME)
        self._stage_view = memoryview(self._stage)
        self._stage_have = 0  # > 0: part of the current frame is in _stage
        # TX: the unsent rest of a frame passt took only part of, and what that
        # frame looked like (length, first bytes): the device sends it again
        self._tx_rest = bytearray()
        self._tx_again: tuple[int, bytes] | None = None
        self._len = bytearray(4)
        self._len_view = memoryview(self._len)
        self._closed = False
        self._tx_dropped = 0
        self._tx_full = 0
        self._tx_partial = 0
        self._rx_partial = 0

    def fileno(self) -> int:
        return self._fd

    # -- RX --------------------------------------------------------------------------

    def recv_into(self, bufs: Sequence[memoryview]) -> int | None:
        if self._hdr_have < 4:
            n = self._recv([self._hdr_view[self._hdr_have:]])
            if n is None:
                return None
            self._hdr_have += n
            if self._hdr_have < 4:
                return None
        length = int.from_bytes(self._hdr, "big")
        if not 0 < length <= MAX_FRAME:
            raise NetBackendError(f"{self.name}: protocol error: passt sent a frame length of "
                                  f"{length}")
        if not self._stage_have:
            iov: list[memoryview] = []
            room = length
            for b in bufs:
                if len(b) >= room:
                    iov.append(b[:room])
                    room = 0
                    break
                iov.append(b)
                room -= len(b)
            if room:  # longer than the buffers: the rest goes to the stage, dropped
                iov.append(self._stage_view[length - room:length])
            iov.append(self._hdr_view)
            if len(iov) <= _IOV_MAX:
                n = self._recv(iov)
                if n is None:
                    return None
                return self._frame_read(n, length, bufs, staged=False)
            # more (tiny) buffers than one readv takes: through the stage
        # finishing a frame that came in parts (or the case above)
        n = self._recv([self._stage_view[self._stage_have:length], self._hdr_view])
        if n is None:
            return None
        return self._frame_read(n, length, bufs, staged=True)

    def _frame_read(self, n: int, length: int, bufs: Sequence[memoryview],
                    *, staged: bool) -> int | None:
        have = (self._stage_have if staged else 0) + n
        if have < length:  # part of the frame: keep it, finish when the rest comes
            if not staged:
                self._stage_from(bufs, n, length)
            self._stage_have = have  # (the frame's length stays in _hdr)
            self._rx_partial += 1
            return None
        self._hdr_have = have - length  # the next frame's length (or part of it)
        if staged:
            self._stage_have = 0
            self._scatter(length, bufs)
        return length

    def _stage_from(self, bufs: Sequence[memoryview], n: int, length: int) -> None:
        """The first ``n`` bytes of a frame went to the caller's buffers (and maybe the
        stage's tail): gather them at the stage's front."""
        pos = 0
        for b in bufs:
            if pos >= n:
                break
            take = min(len(b), n - pos, length - pos)
            self._stage[pos:pos + take] = b[:take]
            pos += take
        # bytes past the buffers were read to _stage[pos:] already, in place

    def _scatter(self, length: int, bufs: Sequence[memoryview]) -> None:
        pos = 0
        for b in bufs:
            if pos >= length:
                break
            take = min(len(b), length - pos)
            b[:take] = self._stage_view[pos:pos + take]
            pos += take

    def _recv(self, iov: list[memoryview]) -> int | None:
        try:
            n = os.readv(self._fd, iov)  # recvmsg_into's tuple costs ~2 us more a frame
        except BlockingIOError:
            return None
        except OSError as exc:  # ECONNRESET: passt is gone
            raise self._gone(f"reading failed: {exc.strerror}") from exc
        if n == 0:
            raise self._gone("passt closed the connection")
        return n

    # -- TX --------------------------------------------------------------------------

    def send(self, bufs: Sequence[memoryview]) -> bool:
        length = sum(map(len, bufs))
        if self._tx_rest:
            if not self._flush_rest():
                self._tx_full += 1
                return False
            again, self._tx_again = self._tx_again, None
            if again is not None and again == (length, _head(bufs)):
                return True  # the frame whose rest just went: it is sent now
        if not 0 < length <= MAX_FRAME:
            self._tx_dropped += 1  # QEMU's framing cannot carry it
            return True
        self._len[:] = length.to_bytes(4, "big")
        try:
            n = self._sock.sendmsg([self._len_view, *bufs], (), socket.MSG_NOSIGNAL)
        except BlockingIOError:
            self._tx_full += 1
            return False
        except OSError as exc:  # EPIPE, ECONNRESET: passt is gone
            raise self._gone(f"writing failed: {exc.strerror}") from exc
        if n < 4 + length:
            # passt took part of the frame: its rest must go before anything else.
            # Never wait here (this is the device loop): keep the rest and say
            # "full"; the device sends this frame again once the socket is writable,
            # and that call finishes it (see the class docstring)
            self._tx_partial += 1
            self._tx_rest = bytearray(b"".join((bytes(self._len), *bufs))[n:])
            self._tx_again = (length, _head(bufs))
            return False
        return True

    def _flush_rest(self) -> bool:
        while self._tx_rest:
            try:
                n = self._sock.send(self._tx_rest, socket.MSG_NOSIGNAL)
            except BlockingIOError:
                return False
            except OSError as exc:
                raise self._gone(f"writing failed: {exc.strerror}") from exc
            del self._tx_rest[:n]
        return True

    def set_offloads(self, *, csum: bool, tso4: bool, tso6: bool, ecn: bool,
                     ufo: bool) -> None:
        """passt takes no offloads (``vnet_hdr`` is False): nothing to set."""

    def stats(self) -> dict[str, int]:
        return {"tx_dropped_too_long": self._tx_dropped, "tx_full": self._tx_full,
                "tx_partial_writes": self._tx_partial, "rx_partial_reads": self._rx_partial}

    def messages(self) -> list[str]:
        """passt's last few stderr lines (the syslog noise dropped)."""
        if self._err_fd >= 0:
            _drain(self._err_fd, self._log, self)
        return list(self._log)

    # -- the process -----------------------------------------------------------------

    def _gone(self, what: str) -> NetBackendError:
        status = None
        deadline = time.monotonic() + 0.2
        while (status := self._proc.poll()) is None and time.monotonic() < deadline:
            time.sleep(0.005)  # its exit follows the socket's end closely
        msgs = self.messages()
        parts = [f"{self.name}: {what}"]
        if status is not None:
            parts.append(f"passt exited with status {status}")
        if msgs:
            parts.append(f"its last message: {msgs[-1]}")
        return NetBackendError("; ".join(parts))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sock.close()  # passt quits at the end of its connection (-F)
        try:
            _reap(self._proc)
        finally:
            self.messages()  # its last words, for a later look
            err_fd, self._err_fd = self._err_fd, -1
            os.close(err_fd)


def _head(bufs: Sequence[memoryview]) -> bytes:
    """A frame's first ``_TX_HEAD`` bytes (fewer if it is shorter)."""
    out = bytearray()
    for b in bufs:
        out += b[:_TX_HEAD - len(out)]
        if len(out) >= _TX_HEAD:
            break
    return bytes(out)


def _grow_send_buffer(sock: socket.socket) -> None:
    """``_SOCK_BUF`` of send buffer: forced where we may (root, CAP_NET_ADMIN), else
    as much as net.core.wmem_max allows (the kernel caps SO_SNDBUF silently)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, _SOCK_BUF)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCK_BUF)


def start_passt(*, hostfwd: Sequence[HostForward], what: str,
                passt: str = "passt") -> PasstBackend:
    """Start passt on a fresh socket pair and wait until it runs. Errors are one
    ``NetConfigError`` line starting with ``what`` (passt missing, a host port in
    use, passt's own complaint)."""
    for fwd in hostfwd:
        _check_host_port(fwd, what)
    tcp = ",".join(f.spec() for f in hostfwd if f.proto == "tcp") or "none"
    udp = ",".join(f.spec() for f in hostfwd if f.proto == "udp") or "none"
    plans: list[tuple[str, tuple[str, ...]]] = [("fixed", _FIXED_ARGS)]
    if _has_default_route():
        plans.insert(0, ("host", ()))
    for i, (addressing, extra) in enumerate(plans):
        backend, problem = _spawn(passt, ["-t", tcp, "-u", udp, *extra], addressing, what)
        if backend is not None:
            return backend
        if not (any(s in problem for s in _NO_EXTERNAL) and i + 1 < len(plans)):
            raise NetConfigError(what, f"passt failed to start: {problem}")
    raise AssertionError("unreachable")  # pragma: no cover


def _spawn(passt: str, args: list[str], addressing: str,
           what: str) -> tuple[PasstBackend | None, str]:
    import subprocess  # only with user-mode networking

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    err_r, err_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        for end in (ours, theirs):  # passt's end: what it writes to us (see the docstring)
            _grow_send_buffer(end)
        argv = [passt, "-f", "-q", "-F", str(theirs.fileno()), "-m", str(MTU), *args]
        try:
            proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err_w,
                                    start_new_session=True)
        except FileNotFoundError:
            raise NetConfigError(what, f"{passt} not found: install the Debian package "
                                 "passt") from None
        except OSError as exc:
            raise NetConfigError(what, f"cannot run {passt}: {exc.strerror}") from None
    except BaseException:
        ours.close()
        os.close(err_r)
        raise
    finally:
        theirs.close()
        os.close(err_w)
    ours.setblocking(False)
    backend = PasstBackend(ours, proc, err_r, addressing)
    try:
        ready = _wait_ready(proc)
    except BaseException:
        backend.close()
        raise
    if ready:
        return backend, ""
    msgs = backend.messages()
    backend.close()
    if proc.returncode is None:
        return None, f"it did not start within {_START_TIMEOUT:g} s"
    return None, (msgs[-1] if msgs else f"it exited with status {proc.returncode}")


def _wait_ready(proc: subprocess.Popen[bytes]) -> bool:
    """True once passt waits in its main loop; False if it exited or took too long."""
    start = time.monotonic()
    wchan_path = f"/proc/{proc.pid}/wchan"
    while True:
        if proc.poll() is not None:
            return False
        try:
            with open(wchan_path, encoding="ascii") as f:
                wchan = f.read().strip()
        except OSError:
            wchan = ""
        elapsed = time.monotonic() - start
        if wchan in _READY_WCHAN:
            return True
        if wchan in ("", "0") and elapsed >= _GRACE:
            return True  # wchan hidden from us: alive past the grace period
        if elapsed >= _START_TIMEOUT:
            return False
        time.sleep(0.002)


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """passt ends by itself once the socket closed; signals only if it lingers, and
    never under seccomp (the filter kills a process that calls kill(2)): there it
    is left to finish on its own."""
    import subprocess

    signals = () if _under_seccomp() else (15, 9)  # SIGTERM, SIGKILL
    for sig in (None, *signals):
        if sig is not None:
            with contextlib.suppress(OSError):  # gone meanwhile
                os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=1.0)
            return
        except subprocess.TimeoutExpired:
            continue


def _under_seccomp() -> bool:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return any(line.startswith("Seccomp:") and line.split()[1] != "0" for line in f)
    except OSError:
        return True  # cannot tell: do not risk a forbidden call


def _drain(fd: int, log: collections.deque[str], backend: PasstBackend | None) -> None:
    """Read what passt wrote to stderr into ``log`` (bounded: lines cut, few kept)."""
    tail = backend._log_tail if backend is not None else b""
    for _ in range(64):  # bounded work: 256 KiB at most per call
        try:
            chunk = os.read(fd, _LOG_CHUNK)
        except (BlockingIOError, OSError):
            break
        if not chunk:
            break
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()[-_LOG_CHUNK:]
        for raw in lines:
            line = raw.decode(errors="replace").strip()[:200]
            if line and not (line.startswith("Failed to send") and "syslog" in line):
                log.append(line)
    if backend is not None:
        backend._log_tail = tail


def _check_host_port(fwd: HostForward, what: str) -> None:
    """Bind the host port ourselves first: passt's own check misses a port held on
    one address family only."""
    kind = socket.SOCK_STREAM if fwd.proto == "tcp" else socket.SOCK_DGRAM
    family = socket.AF_INET6 if ":" in fwd.host_addr else socket.AF_INET
    s = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:  # as a listener would: TIME_WAIT is no conflict
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((fwd.host_addr or "0.0.0.0", fwd.host_port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            problem = f"host port {fwd.host_port} is in use"
        elif exc.errno in (errno.EACCES, errno.EPERM):
            problem = f"no permission to bind host port {fwd.host_port}"
        elif exc.errno == errno.EADDRNOTAVAIL:
            problem = f"{fwd.host_addr} is not an address of this host"
        else:
            problem = f"cannot bind host port {fwd.host_port}: {exc.strerror}"
        raise NetConfigError(what, f"hostfwd {fwd.describe()}: {problem}") from None
    except socket.gaierror:
        raise NetConfigError(what, f"hostfwd {fwd.describe()}: {fwd.host_addr!r} is not an IP "
                             "address") from None
    finally:
        s.close()


def _has_default_route() -> bool:
    """An IPv4 default route in this network namespace (/proc/net/route is per netns)."""
    try:
        # thread-self: /proc/net follows the main thread's namespace, not this thread's
        with open("/proc/thread-self/net/route", encoding="ascii") as f:
            next(f, None)
            return any(line.split()[1:2] == ["00000000"] for line in f)
    except OSError:
        return True  # cannot tell: let passt try the host's addressing first
