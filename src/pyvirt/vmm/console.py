"""The serial console on the user's side: terminal, pipe, file or nothing.

Output: the guest's UART calls ``write`` from a vCPU thread with the bytes it
transmitted; they go straight to the output fd (no buffering, so a crash loses
nothing). Input: the VMM's event loop watches ``input_fd`` and calls
``read_input`` when it is readable; on a terminal we switch it to raw mode
(restored on exit, even on a crash) and interpret the escape ``Ctrl-A x``
(quit) and ``Ctrl-A Ctrl-A`` (send a literal Ctrl-A), as QEMU does. When stdin
is not a terminal the bytes pass through untouched, so commands can be piped
into the guest's shell.

``SocketConsole`` (``--console socket:PATH``, what the daemon uses): the serial
console on a Unix stream socket, bound (mode 0600, a stale socket replaced)
before the sandbox. It keeps the last ``BACKLOG`` bytes of output in a ring; a
client that connects receives that backlog, then live output, and its bytes go
to the guest's input untouched (the client handles its own escape key). One
client at a time: a new connection replaces the old one, which is closed.
Output never blocks a vCPU: it is sent without waiting, the rest queued for the
event loop to send when the socket drains; a client that lets more than
``MAX_QUEUED`` bytes pile up is disconnected.

Threads: ``write`` runs on vCPU threads; accepting, reading, flushing and
closing clients on the main event loop. ``_lock`` guards the ring, the client
and its queue; loop registrations change only on the loop thread (a vCPU asks
with ``call_soon``), so no thread ever waits on the loop while holding it.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import threading
import tty
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyvirt.hostfile import open_host_file
from pyvirt.vmm.config import ConfigError, ConsoleSpec

if TYPE_CHECKING:
    import socket

    from pyvirt.eventloop import EventLoop, Token

__all__ = ["BACKLOG", "MAX_QUEUED", "Console", "SocketConsole", "make_console"]

#: output kept for the next client of a socket console
BACKLOG = 256 << 10
#: output queued for a client that does not read; beyond it the client is dropped
MAX_QUEUED = 1 << 20
#: input read from a client but not yet taken by the guest: reading stops beyond it
MAX_PENDING_INPUT = 64 << 10

ESCAPE = 0x01  # Ctrl-A
HELP = (
    b"\r\nC-a x    exit pyvirt\r\nC-a C-a  send C-a to the guest\r\nC-a h    this help\r\n"
)


class Console:
    def __init__(self, spec: ConsoleSpec, *, stdin_fd: int = 0, stdout_fd: int = 1) -> None:
        self.spec = spec
        self._saved_tty: list[Any] | None = None
        self._escape_pending = False
        self.quit_requested = False
        self.input_fd: int | None = None
        self._out_fd: int | None = None
        self._owns_out = False
        if spec.kind in ("stdio", "virtio"):
            self.input_fd = stdin_fd
            self._out_fd = stdout_fd
        self.is_tty = self.input_fd is not None and os.isatty(self.input_fd)

    def open(self) -> None:
        """Create (or truncate) the output file; enter raw mode when the input is a
        terminal. Called once everything else is checked, just before the guest
        first runs: a run that fails before leaves the file as it was."""
        if self.spec.kind == "file" and self._out_fd is None:
            self._out_fd = _open_output_file(self.spec)
            self._owns_out = True
        if self.is_tty and self.input_fd is not None and self._saved_tty is None:
            self._saved_tty = termios.tcgetattr(self.input_fd)
            tty.setraw(self.input_fd)

    def close(self) -> None:
        if self._saved_tty is not None and self.input_fd is not None:
            saved, self._saved_tty = self._saved_tty, None
            # TCSANOW: a hung-up or stopped reader must not keep us waiting for output to drain
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(self.input_fd, termios.TCSANOW, saved)
        if self._owns_out and self._out_fd is not None:
            fd, self._out_fd = self._out_fd, None
            os.close(fd)

    def write(self, data: bytes) -> None:
        """Guest output. Called from vCPU threads; os.write of a few bytes is atomic."""
        fd = self._out_fd
        if fd is None:
            return
        try:
            while data:
                n = os.write(fd, data)
                data = data[n:]
        except BlockingIOError:
            pass  # a non-blocking terminal that is full: drop rather than stall the vCPU
        except OSError:
            self._out_fd = None  # the reader went away (EPIPE): keep the guest running

    def message(self, text: str) -> None:
        """A line from pyvirt itself (not the guest), on stderr."""
        end = "\r\n" if self._saved_tty is not None else "\n"
        with contextlib.suppress(OSError):  # a hung-up terminal (SIGHUP) must not stop the exit
            sys.stderr.write(f"pyvirt: {text}{end}")
            sys.stderr.flush()

    def read_input(self) -> bytes | None:
        """Read what the user typed; None at end of input. Handles the escape on terminals."""
        assert self.input_fd is not None
        try:
            data = os.read(self.input_fd, 4096)
        except BlockingIOError:
            return b""
        except OSError:
            return None  # EIO: the terminal hung up (SIGHUP follows); no more input
        if not data:
            return None
        if not self.is_tty:
            return data
        return self._filter_escapes(data)

    def _filter_escapes(self, data: bytes) -> bytes:
        out = bytearray()
        for b in data:
            if self._escape_pending:
                self._escape_pending = False
                if b in (ord("x"), ord("X")):
                    self.quit_requested = True
                    break
                if b == ESCAPE:
                    out.append(ESCAPE)
                elif b in (ord("h"), ord("?")):
                    self.write(HELP)
                # any other key after C-a is swallowed, as in QEMU
            elif b == ESCAPE:
                self._escape_pending = True
            else:
                out.append(b)
        return bytes(out)


def _open_output_file(spec: ConsoleSpec) -> int:
    """Open ``console.path`` for writing without blocking (a FIFO is refused, not
    waited on) and truncate it only once it is known to be a regular file."""
    assert spec.path is not None
    fd, _ = open_host_file(spec.path, os.O_WRONLY | os.O_CREAT, what="console.path",
                           error=ConfigError)
    try:
        os.ftruncate(fd, 0)
    except OSError as exc:
        os.close(fd)
        raise ConfigError(f"console.path: {spec.path}: {exc.strerror}") from None
    return fd


def make_console(spec: ConsoleSpec, **kwargs: Any) -> Console:
    """The console ``spec`` asks for."""
    if spec.kind == "socket":
        return SocketConsole(spec)
    return Console(spec, **kwargs)


class _Ring:
    """The last ``size`` bytes written (a fixed buffer: a byte of output costs a copy
    of that byte, not of the whole backlog)."""

    def __init__(self, size: int) -> None:
        self._buf = bytearray(size)
        self._size = size
        self._end = 0  # bytes ever written

    def write(self, data: bytes) -> None:
        n = len(data)
        if n >= self._size:
            data = data[-self._size:]
            self._end += n - self._size
            n = self._size
        pos = self._end % self._size
        first = min(n, self._size - pos)
        self._buf[pos:pos + first] = data[:first]
        if first < n:
            self._buf[:n - first] = data[first:]
        self._end += n

    def contents(self) -> bytes:
        if self._end <= self._size:
            return bytes(self._buf[:self._end])
        pos = self._end % self._size
        return bytes(self._buf[pos:]) + bytes(self._buf[:pos])


class _Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.queue: deque[bytes] = deque()
        self.queued = 0
        self.overflow = False  # more than MAX_QUEUED piled up: to be dropped
        self.token: Token | None = None


class SocketConsole(Console):
    """The serial console on a Unix socket (see the module docstring)."""

    def __init__(self, spec: ConsoleSpec) -> None:
        super().__init__(spec)
        assert spec.kind == "socket" and spec.path is not None
        self.path: Path = spec.path
        self._listener: socket.socket | None = None
        self._ident: tuple[int, int] | None = None
        self._ring = _Ring(BACKLOG)
        self._lock = threading.Lock()
        self._client: _Client | None = None
        self._loop: EventLoop | None = None
        self._listen_token: Token | None = None
        self._deliver: Callable[[bytes], int] | None = None
        self._flush_asked = False
        self._input_paused = False
        self.clients_dropped = 0  # for tests and logs: clients cut off for not reading

    # ---- set-up (main thread, before the sandbox)

    def open(self) -> None:
        if self._listener is None:
            self._listener, self._ident = _bind_socket(self.path, "console.path")

    def attach(self, loop: EventLoop, deliver: Callable[[bytes], int]) -> None:
        """Serve clients on ``loop``; ``deliver(data)`` hands input to the guest
        and returns how many bytes still wait for it (reading stops above
        ``MAX_PENDING_INPUT``)."""
        self.open()
        assert self._listener is not None
        self._loop = loop
        self._deliver = deliver
        self._listen_token = loop.add(self._listener.fileno(), self._on_accept,
                                      name="console-socket")

    def close(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and self._listen_token is not None:
            loop.remove(self._listen_token)
            self._listen_token = None
        self._drop_client(loop)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):  # only our own socket file (a sandbox may refuse)
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._ident:
                    os.unlink(self.path)

    # ---- output (vCPU threads)

    def write(self, data: bytes) -> None:
        ask = False
        with self._lock:
            self._ring.write(data)
            c = self._client
            if c is None or c.overflow:
                return
            if not c.queue:
                try:
                    n = c.sock.send(data)
                except BlockingIOError:
                    n = 0
                except OSError:
                    return  # the client went away: the loop sees it and drops it
                data = data[n:]
                if not data:
                    return
            if c.queued + len(data) > MAX_QUEUED:
                c.overflow = True
                c.queue.clear()
                c.queued = 0
            else:
                c.queue.append(bytes(data))
                c.queued += len(data)
            if not self._flush_asked:
                self._flush_asked = ask = True
        if ask and self._loop is not None:
            self._loop.call_soon(self._flush, name="console-socket-flush")

    # ---- the loop thread

    def _on_accept(self, events: int) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:  # EMFILE and the like: this client is refused, the VM goes on
            self.message(f"console socket: accept failed: {exc.strerror}")
            return
        sock.setblocking(False)
        self._drop_client(self._loop)  # takeover: the newest client wins
        c = _Client(sock)
        with self._lock:
            backlog = self._ring.contents()
            if backlog:
                c.queue.append(backlog)
                c.queued = len(backlog)
            self._client = c
        assert self._loop is not None
        c.token = self._loop.add(sock.fileno(), lambda ev: self._on_client(c, ev),
                                 name="console-client")
        self._input_paused = False
        self._flush()

    def _on_client(self, c: _Client, events: int) -> None:
        if c is not self._client:
            return
        if self._input_paused and events & (select.EPOLLHUP | select.EPOLLERR):
            self._drop_client(self._loop)  # gone while we were not reading
            return
        if events & select.EPOLLOUT:
            self._flush()
            if c is not self._client:
                return
        if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            self._read_client(c)

    def _read_client(self, c: _Client) -> None:
        if self._input_paused:
            return
        try:
            data = c.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client left
            self._drop_client(self._loop)
            return
        assert self._deliver is not None
        waiting = self._deliver(data)
        if waiting > MAX_PENDING_INPUT:
            # the guest is not taking it: stop reading until it has (bounded input)
            self._input_paused = True
            self._update_events(c)
            assert self._loop is not None
            self._loop.call_later(0.02, lambda: self._retry_input(c), name="console-input-wait")

    def _retry_input(self, c: _Client) -> None:
        if c is not self._client or self._deliver is None:
            return
        if self._deliver(b"") > MAX_PENDING_INPUT:
            assert self._loop is not None
            self._loop.call_later(0.02, lambda: self._retry_input(c), name="console-input-wait")
            return
        self._input_paused = False
        self._update_events(c)

    def _flush(self) -> None:
        """Send what is queued for the client, without waiting; EPOLLOUT for the rest."""
        with self._lock:
            self._flush_asked = False
            c = self._client
            if c is None:
                return
            overflow = c.overflow
            while c.queue and not overflow:
                chunk = c.queue[0]
                try:
                    n = c.sock.send(chunk)
                except BlockingIOError:
                    break
                except OSError:
                    overflow = True  # gone: dropped below
                    break
                c.queued -= n
                if n < len(chunk):
                    c.queue[0] = chunk[n:]
                    break
                c.queue.popleft()
        if overflow:
            if c.overflow:
                self.clients_dropped += 1
            self._drop_client(self._loop)
            return
        self._update_events(c)

    def _update_events(self, c: _Client) -> None:
        if self._loop is None or c.token is None or c is not self._client:
            return
        events = 0 if self._input_paused else select.EPOLLIN
        if c.queue:
            events |= select.EPOLLOUT
        self._loop.modify(c.token, events)

    def _drop_client(self, loop: EventLoop | None) -> None:
        with self._lock:
            c, self._client = self._client, None
        if c is None:
            return
        if loop is not None and c.token is not None:
            loop.remove(c.token)  # before close: the fd number may be reused at once
        c.sock.close()


def _bind_socket(path: Path, what: str) -> tuple[socket.socket, tuple[int, int]]:
    """A listening, non-blocking Unix socket at ``path``, mode 0600 from the start;
    a stale socket file (nobody listening) is replaced, anything else refused."""
    import socket
    import stat

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}", what) from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"{path} exists and is not a socket (refusing to replace it)",
                              what)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.setblocking(False)
        try:
            probe.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # stale
        except BlockingIOError:
            raise ConfigError(f"{path}: a process is already listening there", what) from None
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror}", what) from None
        else:
            raise ConfigError(f"{path}: a process is already listening there", what)
        finally:
            probe.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        # the inode's mode is the file's (less the umask): set before bind, so that
        # no moment exists when another user could connect
        os.fchmod(sock.fileno(), 0o600)
        try:
            sock.bind(os.fspath(path))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot create the socket: {exc.strerror or exc}",
                              what) from None
        st = os.lstat(path)
        sock.listen(8)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock, (st.st_dev, st.st_ino)
