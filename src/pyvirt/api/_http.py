"""One API connection: HTTP/1.1 framing with h11 (sans-IO), output buffered
and written as the socket takes it, the per-connection timeouts.

Reading stops while an answer is still being written (EPOLLOUT instead of
EPOLLIN), so a client that sends requests without reading the answers holds
at most one answer and h11's bounded input buffer. Requests on a connection
are answered in order (keep-alive, pipelining).
"""

from __future__ import annotations

import contextlib
import http
import logging
import select
import socket
import time
from typing import TYPE_CHECKING

import h11

from pyvirt.api import _routes

if TYPE_CHECKING:
    from pyvirt.api.server import ApiServer
    from pyvirt.eventloop import Timer

__all__ = ["Connection"]

log = logging.getLogger("pyvirt.api.server")

_SERVER_HEADER = b"pyvirt"
_RECV_SIZE = 65536
_BATCH = 8  # pipelined requests answered per turn of the event loop


class Connection:
    def __init__(self, server: ApiServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.limits = server.limits
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head)
        self.out = bytearray()
        self.closing = False  # close once ``out`` is written
        self.closed = False
        self.request: h11.Request | None = None
        self.body = bytearray()
        self._timer: Timer | None = None
        self._timer_at = 0.0  # when self._timer fires
        self._deadline = 0.0  # when the connection is dropped without progress
        self._events = select.EPOLLIN
        self._processing = False  # inside _process (no re-entry from _flush)
        self._answering = False  # an answer is queued and not yet all written
        self._deferred = False  # the next batch of pipelined requests waits for call_soon
        self.token = server.loop.add(sock.fileno(), self._on_events, name="api-connection",
                                     events=self._events)
        self._arm(self.limits.request_timeout)

    # ---- loop callbacks

    def _on_events(self, events: int) -> None:
        try:
            if events & select.EPOLLERR:
                self.close()
                return
            if self._deferred:  # EPOLLHUP comes whatever the mask: _continue will read
                return
            if events & select.EPOLLOUT:
                self._flush()
            if events & (select.EPOLLIN | select.EPOLLHUP) and not self.closed:
                self._read()
        except Exception:
            # a bug here costs this connection, never the loop or the listener
            log.exception("api: connection failed")
            self.close()

    def _on_timeout(self) -> None:
        self._timer = None
        if self.closed:
            return
        left = self._deadline - time.monotonic()
        if left > 0:  # the deadline moved on since this timer was set
            self._timer_at = self._deadline
            self._timer = self.server.loop.call_later(left, self._on_timeout,
                                                      name="api-timeout")
            return
        log.debug("api: dropping a connection that was too slow (%s)",
                  "writing" if self.out else "reading")
        self.close()

    # ---- reading

    def _read(self) -> None:
        try:
            data = self.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if self.h11.their_state is h11.ERROR:
            self.close()
            return
        self.h11.receive_data(data)
        self._process()
        if not data and not self.closed:
            # EOF: nothing more will come; close once the answers are written
            self.closing = True
            if not self.out:
                self.close()

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            self._process_events()
        finally:
            self._processing = False

    def _process_events(self) -> None:
        served = 0
        while not (self.closed or self.closing or self.out):
            if served >= _BATCH:
                # a client pipelining many requests gets them answered a batch per
                # turn of the loop: the guest's devices run in between. Nothing is
                # read meanwhile, so what h11 holds stays one read's worth.
                self._deferred = True
                self._want(0)
                self.server.loop.call_soon(self._continue, name="api-continue")
                return
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                if exc.error_status_hint == 431:
                    self._head_too_large()
                else:
                    self._fault(400, f"malformed HTTP request: {exc}", close=True)
                return
            if event is h11.NEED_DATA:
                return
            if event is h11.PAUSED:
                # the previous answer is done or this side must close
                if self._next_cycle():
                    continue
                return
            if isinstance(event, h11.Request):
                self._on_request(event)
            elif isinstance(event, h11.Data):
                self.body += event.data
                if len(self.body) > self.limits.max_body:
                    self._too_large()
            elif isinstance(event, h11.EndOfMessage):
                self._dispatch()
                served += 1
            elif isinstance(event, h11.ConnectionClosed):
                self.close()
                return

    def _continue(self) -> None:
        self._deferred = False
        if self.closed:
            return
        if not self.out:
            self._want(select.EPOLLIN)
        self._process()

    def _on_request(self, req: h11.Request) -> None:
        self.request = req
        self.body = bytearray()
        # h11 bounds only a head that arrives in pieces; one that came whole in a
        # single read is held to the same limit here
        head = len(req.method) + len(req.target) + sum(len(k) + len(v) + 4
                                                      for k, v in req.headers)
        if head > self.limits.max_head:
            self._head_too_large()
            return
        if req.http_version not in (b"1.0", b"1.1"):  # h11 takes any "HTTP/d.d"
            self._fault(505, f"HTTP/{req.http_version.decode('ascii', 'replace')} is not "
                             "supported: use HTTP/1.1", close=True)
            return
        length: int | None = None
        for name, value in req.headers:
            if name == b"transfer-encoding":
                self._fault(411, "request bodies must be sent with Content-Length "
                                 "(Transfer-Encoding is not accepted)", close=True)
                return
            if name == b"content-length":
                length = int(value)  # h11 checked it is digits and not given twice
        if length is not None and length > self.limits.max_body:
            self._too_large()
            return
        if self.h11.client_is_waiting_for_100_continue:
            self.out += self.h11.send(h11.InformationalResponse(status_code=100, headers=[]))
            self._flush()

    def _head_too_large(self) -> None:
        self._fault(431, "the request line and headers are over the limit of "
                         f"{self.limits.max_head} bytes", close=True)

    def _too_large(self) -> None:
        self._fault(413, f"the request body is over the limit of {self.limits.max_body} bytes",
                    close=True)

    def _dispatch(self) -> None:
        req = self.request
        assert req is not None
        reply = _routes.handle(self.server.control, req.method.decode("ascii", "replace"),
                               req.target.decode("ascii", "replace"),
                               _content_type(req), bytes(self.body))
        if self.closed:  # the control call closed the server (a stop)
            return
        self._respond(reply.status, reply.body, reply.content_type, reply.headers)

    # ---- writing

    def _fault(self, status: int, message: str, *, close: bool = False) -> None:
        reply = _routes.fault(status, message)
        self._respond(status, reply.body, reply.content_type, close=close)

    def _respond(self, status: int, body: bytes, content_type: str,
                 headers: tuple[tuple[str, str], ...] = (), *, close: bool = False) -> None:
        hdrs: list[tuple[bytes, bytes]] = [(b"server", _SERVER_HEADER)]
        if status != 204:
            hdrs += [(b"content-type", content_type.encode()),
                     (b"content-length", str(len(body)).encode())]
        hdrs += [(k.encode(), v.encode()) for k, v in headers]
        if close:
            hdrs.append((b"connection", b"close"))
        method = self.request.method.decode("ascii", "replace") if self.request else "-"
        target = self.request.target[:200].decode("ascii", "replace") if self.request else "-"
        log.debug("api: %s %s -> %d", method, target, status)
        self._answering = True
        try:
            self.out += self.h11.send(h11.Response(
                status_code=status, headers=hdrs, reason=http.HTTPStatus(status).phrase))
            # HEAD: the head alone (Content-Length says what a GET would carry); sending
            # the body would be a protocol error here and cost the keep-alive connection
            if body and status != 204 and method != "HEAD":
                self.out += self.h11.send(h11.Data(data=body))
            self.out += self.h11.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            # no answer is possible in this state (one was already sent): just close
            log.debug("api: cannot answer %d here; closing", status)
            self.closing = True
        if close or self.h11.our_state is h11.MUST_CLOSE:
            self.closing = True
        else:
            self._next_cycle()
        self._flush()

    def _next_cycle(self) -> bool:
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            self.request = None
            self.body = bytearray()
            return True
        if self.h11.our_state in (h11.MUST_CLOSE, h11.CLOSED):
            self.closing = True
        return False

    def _flush(self) -> None:
        progress = False
        while self.out:
            try:
                n = self.sock.send(self.out, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # the client went away
                self.close()
                return
            del self.out[:n]
            progress = True
        if self.out:
            self._want(select.EPOLLOUT)
            if progress or self._events != select.EPOLLOUT:
                self._arm(self.limits.write_timeout)
            return
        if self.closing:
            self.close()
            return
        was_writing = self._events != select.EPOLLIN
        if self._deferred:  # _continue resumes reading
            return
        self._want(select.EPOLLIN)
        if self._answering or was_writing:
            # the answer is out: the next request gets a full request_timeout
            self._answering = False
            self._arm(self.limits.request_timeout)
            self._process()  # pipelined requests h11 already holds (no-op when inside it)

    def _want(self, events: int) -> None:
        if events != self._events and not self.closed:
            self._events = events
            self.server.loop.modify(self.token, events)

    def _arm(self, delay: float) -> None:
        """Drop the connection if it makes no progress within ``delay`` seconds.
        One timer per connection, moved only when the deadline comes earlier:
        re-arming after every answer must not pile cancelled timers up."""
        self._deadline = time.monotonic() + delay
        if self._timer is not None:
            if self._timer_at <= self._deadline:
                return  # it fires first and sets itself again for the rest
            self._timer.cancel()
        self._timer_at = self._deadline
        self._timer = self.server.loop.call_later(delay, self._on_timeout, name="api-timeout")

    def close(self, *, flush: bool = False) -> None:
        if self.closed:
            return
        if flush and self.out:
            with contextlib.suppress(OSError):
                self.sock.send(self.out, socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.server.loop.remove(self.token)
        self.sock.close()
        self.server.connections.discard(self)


def _content_type(req: h11.Request) -> str | None:
    for name, value in req.headers:
        if name == b"content-type":
            return value.decode("latin-1")
    return None
