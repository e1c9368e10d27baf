"""The control API server: HTTP/1.1 + JSON on the VM's Unix socket.

Everything runs on the VMM's event loop (``pyvirt.eventloop``): the listening
socket and every connection are registrations on it, timeouts are its timers;
no thread per connection and no call here blocks, so a client can never stall
the loop (and with it the guest's devices). Only the ``VmControl`` calls a
request makes may take a moment (pausing waits for the vCPUs).

The socket is the trust boundary (mode 0600: the VMM's user and root). Past
it, each connection is held to ``ApiLimits``: the request head and body sizes
(431, 413), one complete request within ``request_timeout`` of connecting or
of the previous answer (else it is dropped: slow or stuck clients hold no slot
for long), an answer written within ``write_timeout`` of the last progress
(a client that does not read is dropped; while an answer waits, nothing more is
read from that client, so its buffers stay bounded by one answer), and at most
``max_connections`` open at once (the next are answered 503 and closed).

Module layout: ``server.py`` (this: the socket, accepting, limits) imports
only the standard library, so that starting a VM with ``--api-socket`` costs
a bind and a registration; ``_http.py`` (h11 framing, buffers, timers) and
``_routes.py`` (paths, JSON, the ``VmControl`` calls) load at the first
connection.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pyvirt.errors import UserInputError

if TYPE_CHECKING:
    from pyvirt.api._http import Connection
    from pyvirt.eventloop import EventLoop, Timer, Token
    from pyvirt.vmm.control import VmControl

__all__ = ["ApiLimits", "ApiServer", "ApiSocketError"]

log = logging.getLogger(__name__)

# sun_path is 108 bytes on Linux, one of them the terminating NUL
_MAX_SOCKET_PATH = 107


class ApiSocketError(UserInputError):
    """The API socket cannot be created at the path given (``api_socket``)."""


@dataclass(frozen=True)
class ApiLimits:
    """What one client may cost the VMM (see the module docstring)."""

    max_body: int = 64 * 1024
    max_head: int = 16 * 1024
    max_connections: int = 64
    request_timeout: float = 10.0
    write_timeout: float = 10.0


class ApiServer:
    """Serve the control API for ``control`` on a new Unix socket at ``path``.

    Create, use and ``close`` it on the loop's thread (or before the loop runs).
    ``close`` removes the socket file (if it is still ours).
    """

    def __init__(self, path: Path | str, control: VmControl, loop: EventLoop, *,
                 limits: ApiLimits | None = None) -> None:
        self.path = Path(path)
        self.control = control
        self.loop = loop
        self.limits = limits or ApiLimits()
        self.connections: set[Connection] = set()
        self._closed = False
        self._resume_accept: Timer | None = None
        self._sock, self._ident = _bind(self.path)
        try:
            self._token: Token = loop.add(self._sock.fileno(), self._on_accept,
                                          name="api-socket", events=select.EPOLLIN)
        except BaseException:
            self._unlink()
            self._sock.close()
            raise

    def __enter__(self) -> ApiServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop listening, remove the socket file, close every connection
        (after one last non-blocking try to write what each has pending)."""
        if self._closed:
            return
        self._closed = True
        if self._resume_accept is not None:
            self._resume_accept.cancel()
        self.loop.remove(self._token)
        self._unlink()
        self._sock.close()
        for conn in list(self.connections):
            conn.close(flush=True)

    def _unlink(self) -> None:
        # only our own socket: someone may have replaced the path since
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.path)

    # ---- accepting (loop thread)

    def _on_accept(self, events: int) -> None:
        for _ in range(self.limits.max_connections):  # then let other handlers run
            if self._closed:
                return
            try:
                sock, _ = self._sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # the pending connection stays queued: stop polling for a moment
                    # instead of spinning on a socket that stays readable
                    log.warning("api: cannot accept a connection: %s; pausing for 0.5 s",
                                os.strerror(exc.errno or 0))
                    self.loop.modify(self._token, 0)
                    self._resume_accept = self.loop.call_later(0.5, self._accept_again,
                                                               name="api-accept")
                    return
                continue  # ECONNABORTED and the like: that client is gone
            sock.setblocking(False)
            if len(self.connections) >= self.limits.max_connections:
                _refuse_busy(sock)
                continue
            from pyvirt.api._http import Connection

            try:
                self.connections.add(Connection(self, sock))
            except Exception:
                log.exception("api: cannot serve a connection")
                sock.close()

    def _accept_again(self) -> None:
        self._resume_accept = None
        if not self._closed:
            self.loop.modify(self._token, select.EPOLLIN)


def _refuse_busy(sock: socket.socket) -> None:
    """Answer 503 and close, without reading: one non-blocking send of a
    small answer, which a fresh socket's buffer always takes."""
    body = json.dumps({"fault_message": "too many connections to the VMM's API; "
                                       "try again"}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
    with contextlib.suppress(OSError):
        sock.send(head + body, socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
    sock.close()


def _bind(path: Path) -> tuple[socket.socket, tuple[int, int]]:
    """A listening, non-blocking Unix socket at ``path`` with mode 0600 from
    the start, and the (st_dev, st_ino) of its file. A stale socket file (no
    one listening) is replaced; anything else at ``path`` is refused."""
    where = f"api_socket {path}"
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise ApiSocketError(f"{where}: the path is longer than {_MAX_SOCKET_PATH} bytes "
                             "(the limit of a Unix socket address)")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ApiSocketError(f"{where}: {exc.strerror}") from exc
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ApiSocketError(f"{where}: exists and is not a socket")
        if _socket_in_use(path):
            raise ApiSocketError(f"{where}: another process is listening on it")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # bind() creates the file with the socket inode's mode (less the umask):
        # set it first, so there is no moment when others may connect
        os.fchmod(sock.fileno(), 0o600)
        try:
            sock.bind(os.fspath(path))
        except OSError as exc:
            raise ApiSocketError(f"{where}: cannot create the socket: "
                                 f"{exc.strerror or exc}") from exc
        st = os.lstat(path)
        ident = (st.st_dev, st.st_ino)
        try:
            sock.listen(1024)  # a burst of clients waits here, not in EAGAIN
            sock.setblocking(False)
        except BaseException:
            os.unlink(path)
            raise
    except BaseException:
        sock.close()
        raise
    return sock, ident


def _socket_in_use(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except BlockingIOError:  # listening, its backlog full
        return True
    except OSError as exc:
        raise ApiSocketError(f"api_socket {path}: {exc.strerror}") from exc
    finally:
        probe.close()
    return True
