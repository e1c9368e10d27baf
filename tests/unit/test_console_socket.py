"""The socket console (``--console socket:PATH``): backlog, takeover, input
untouched, and bounded memory whatever a client or the guest does.

The console runs on a real ``EventLoop`` thread, as in the VMM; ``write`` is
called from another thread, as a vCPU does.
"""

from __future__ import annotations

import os
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirt.eventloop import EventLoop
from pyvirt.vmm import console as console_mod
from pyvirt.vmm.config import ConfigError, ConsoleSpec, parse_console
from pyvirt.vmm.console import BACKLOG, MAX_QUEUED, SocketConsole, _Ring, make_console


class Served:
    def __init__(self, path: Path, pending: list[int]) -> None:
        self.path = path
        self.inputs: list[bytes] = []
        self._pending = pending
        self.loop = EventLoop("test-console")
        self.console = SocketConsole(ConsoleSpec("socket", path))
        self.console.open()
        self.console.attach(self.loop, self.deliver)
        self._stop = False
        self.thread = threading.Thread(target=self.loop.run_until, args=(lambda: self._stop,),
                                       kwargs={"tick": 0.05}, daemon=True)
        self.thread.start()

    def deliver(self, data: bytes) -> int:
        if data:
            self.inputs.append(data)
        return self._pending[0]

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(self.path))
        s.settimeout(5)
        return s

    def close(self) -> None:
        self._stop = True
        self.loop.wake()
        self.thread.join(5)
        self.console.close()
        self.loop.close()


@pytest.fixture
def served() -> Iterator[Served]:
    d = Path(tempfile.mkdtemp(prefix="pv", dir="/tmp"))
    srv = Served(d / "con.sock", [0])
    try:
        yield srv
    finally:
        srv.close()
        for f in d.iterdir():
            f.unlink()
        d.rmdir()


def recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def wait_for(cond: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def test_ring_keeps_the_last_bytes() -> None:
    r = _Ring(8)
    assert r.contents() == b""
    r.write(b"abc")
    assert r.contents() == b"abc"
    r.write(b"defgh")
    assert r.contents() == b"abcdefgh"
    r.write(b"ij")
    assert r.contents() == b"cdefghij"
    r.write(b"0123456789xyz")  # longer than the ring
    assert r.contents() == b"56789xyz"
    for i in range(100):  # wrap-around many times, one byte at a time
        r.write(bytes([65 + i % 26]))
    assert r.contents() == bytes(65 + i % 26 for i in range(92, 100))


def test_parse_and_spec() -> None:
    assert parse_console("socket:/run/x/console.sock") == ConsoleSpec(
        "socket", Path("/run/x/console.sock"))
    with pytest.raises(ConfigError, match="socket console needs a path"):
        ConsoleSpec("socket")
    with pytest.raises(ConfigError, match="at most 107 bytes"):
        ConsoleSpec("socket", Path("/" + "x" * 120))
    with pytest.raises(ConfigError, match="socket:PATH"):
        parse_console("socket:")
    assert isinstance(make_console(ConsoleSpec("socket", Path("/tmp/x.sock"))), SocketConsole)


def test_backlog_then_live_output_and_input_untouched(served: Served) -> None:
    early = bytes(i % 251 for i in range(BACKLOG + 5000))  # more than the backlog
    served.console.write(early)
    mode = stat.S_IMODE(os.stat(served.path).st_mode)
    assert mode == 0o600
    s = served.connect()
    assert recv_exactly(s, BACKLOG) == early[-BACKLOG:]
    served.console.write(b"live\r\n")
    assert recv_exactly(s, 6) == b"live\r\n"
    raw = bytes(range(256))  # Ctrl-A, Ctrl-], NUL...: the client's business, not ours
    s.sendall(raw)
    assert wait_for(lambda: b"".join(served.inputs) == raw)
    s.close()


def test_a_new_client_takes_over(served: Served) -> None:
    served.console.write(b"boot log\n")
    a = served.connect()
    assert recv_exactly(a, 9) == b"boot log\n"
    b = served.connect()
    assert recv_exactly(b, 9) == b"boot log\n"  # the backlog again
    assert a.recv(100) == b""  # the old one was closed
    served.console.write(b"x")
    assert b.recv(1) == b"x"
    b.sendall(b"typed")
    assert wait_for(lambda: b"".join(served.inputs) == b"typed")
    b.close()
    assert wait_for(lambda: served.console._client is None)
    served.console.write(b"nobody listens")  # no client: only the backlog grows
    c = served.connect()
    assert recv_exactly(c, 24) == b"boot log\nxnobody listens"
    c.close()


def test_a_client_that_does_not_read_is_dropped_and_never_blocks_output(
        served: Served) -> None:
    s = served.connect()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    assert wait_for(lambda: served.console._client is not None)
    chunk = b"z" * 4096
    longest = 0.0
    peak = 0
    for _ in range((4 * MAX_QUEUED) // len(chunk)):  # 4 MiB from a "vCPU"
        t0 = time.perf_counter()
        served.console.write(chunk)
        longest = max(longest, time.perf_counter() - t0)
        c = served.console._client
        if c is not None:
            peak = max(peak, c.queued)
    assert peak <= MAX_QUEUED
    assert longest < 0.5  # never waits for the client
    assert wait_for(lambda: served.console.clients_dropped == 1)
    got = b""
    while chunk_in := s.recv(1 << 16):  # what was in flight, then the end
        got += chunk_in
    assert len(got) <= MAX_QUEUED + (1 << 20)  # bounded by the queue plus socket buffers
    # the backlog stays bounded too, and a new client works
    t = served.connect()
    assert len(recv_exactly(t, BACKLOG)) == BACKLOG
    t.close()


def test_input_stops_while_the_guest_does_not_take_it(served: Served) -> None:
    pending = served._pending
    pending[0] = console_mod.MAX_PENDING_INPUT + 1  # the guest is full
    s = served.connect()
    assert wait_for(lambda: served.console._client is not None)
    s.sendall(b"a" * 100)
    assert wait_for(lambda: served.inputs)
    s.sendall(b"b" * 100)
    time.sleep(0.3)
    assert b"b" not in b"".join(served.inputs)  # not read while the guest is full
    pending[0] = 0
    assert wait_for(lambda: b"b" * 100 in b"".join(served.inputs))
    s.close()


def test_stale_socket_replaced_other_files_refused() -> None:
    d = Path(tempfile.mkdtemp(prefix="pv", dir="/tmp"))
    try:
        path = d / "c.sock"
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(path))
        stale.close()  # the file stays, nobody listens
        con = SocketConsole(ConsoleSpec("socket", path))
        con.open()
        live = socket.socket(socket.AF_UNIX)
        live.connect(str(path))  # ours now
        live.close()
        other = SocketConsole(ConsoleSpec("socket", path))
        with pytest.raises(ConfigError, match="already listening"):
            other.open()
        con.close()
        assert not path.exists()  # ours, removed
        path.write_text("not a socket")
        with pytest.raises(ConfigError, match=r"console.path: .* not a socket"):
            SocketConsole(ConsoleSpec("socket", path)).open()
        assert path.read_text() == "not a socket"
    finally:
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
