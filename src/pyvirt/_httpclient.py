"""A small HTTP/1.1 client connection over a Unix socket: what ``pyvirt.Client``
needs and nothing more, because ``http.client`` costs ~40 ms to import (it pulls in
``email`` and ``ssl``), a third of ``pyvirt list``'s budget.

``UnixConnection(path, timeout)``: ``request(method, url, body, headers)`` then
``getresponse()`` -> ``Response`` (``status``, ``reason``, ``getheader``,
``read()``, ``readline()``, ``will_close``). Bodies: bytes, or a binary file
(streamed; chunked when no Content-Length is given). Answers: Content-Length,
chunked, or until the server closes. Keep-alive unless the server says close.
A connection the server closed before answering raises ``RemoteDisconnected``
(a ``ConnectionResetError``), so the caller may send the request again.
"""

from __future__ import annotations

import socket
from typing import IO, Any

__all__ = ["BadAnswer", "RemoteDisconnected", "Response", "UnixConnection"]

#: request line + headers of an answer we accept
MAX_HEAD = 64 * 1024
_BLOCK = 256 * 1024


class RemoteDisconnected(ConnectionResetError):
    """The server closed the connection without answering."""


class BadAnswer(Exception):
    """The server's answer is not HTTP/1.x as we read it."""


class Response:
    def __init__(self, f: IO[bytes], method: str) -> None:
        self._f = f
        line = f.readline(MAX_HEAD)
        if not line:
            raise RemoteDisconnected("the server closed the connection without an answer")
        parts = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise BadAnswer(f"bad status line {line[:80]!r}")
        self.version = parts[0]
        self.status = int(parts[1])
        self.reason = parts[2] if len(parts) > 2 else ""
        self.headers: dict[str, str] = {}
        size = len(line)
        while True:
            h = f.readline(MAX_HEAD)
            size += len(h)
            if size > MAX_HEAD:
                raise BadAnswer("the answer's headers are too long")
            if not h:
                raise BadAnswer("the answer ends within its headers")
            if h in (b"\r\n", b"\n"):
                break
            name, sep, value = h.decode("latin-1").partition(":")
            if not sep:
                raise BadAnswer(f"bad header line {h[:80]!r}")
            key = name.strip().lower()
            value = value.strip()
            self.headers[key] = f"{self.headers[key]}, {value}" if key in self.headers else value
        conn = self.headers.get("connection", "").lower()
        self.will_close = "close" in conn or (self.version == "HTTP/1.0"
                                              and "keep-alive" not in conn)
        self._chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        self._left: int | None = None  # bytes left of the body (or of this chunk)
        self._done = False
        if method == "HEAD" or self.status in (204, 304) or 100 <= self.status < 200:
            self._done = True
        elif not self._chunked:
            length = self.headers.get("content-length")
            if length is not None:
                if not length.isdigit():
                    raise BadAnswer(f"bad Content-Length {length[:40]!r}")
                self._left = int(length)
                self._done = self._left == 0
            else:
                self.will_close = True  # the body ends when the server closes

    def getheader(self, name: str, default: str = "") -> str:
        return self.headers.get(name.lower(), default)

    def _chunk_left(self) -> int:
        """Bytes left in the current chunk, reading the next chunk's size when needed
        (0: the body has ended)."""
        if self._left:
            return self._left
        if self._left == 0:
            self._f.readline(MAX_HEAD)  # the CRLF after the previous chunk
        line = self._f.readline(MAX_HEAD)
        try:
            n = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise BadAnswer(f"bad chunk size {line[:40]!r}") from None
        if n == 0:
            while self._f.readline(MAX_HEAD) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            self._done = True
        self._left = n
        return n

    def read(self) -> bytes:
        """The whole (rest of the) body."""
        out = bytearray()
        while not self._done:
            out += self.read1(_BLOCK)
        return bytes(out)

    def read1(self, limit: int) -> bytes:
        """Up to ``limit`` bytes of the body (b"" at its end)."""
        if self._done:
            return b""
        if self._chunked:
            n = self._chunk_left()
            if n == 0:
                return b""
            data = self._f.read(min(n, limit))
        elif self._left is not None:
            data = self._f.read(min(self._left, limit))
        else:
            data = self._f.read1(limit) if hasattr(self._f, "read1") else self._f.read(limit)
            if not data:
                self._done = True
            return data
        if not data:
            raise BadAnswer("the connection closed within the answer's body")
        assert self._left is not None
        self._left -= len(data)
        if not self._chunked and self._left == 0:
            self._done = True
        return data

    def readline(self) -> bytes:
        """One line of the body (with its newline; b"" at the end)."""
        out = bytearray()
        while not self._done:
            if self._chunked:
                n = self._chunk_left()
                if n == 0:
                    break
                piece = self._f.readline(n)
            elif self._left is not None:
                piece = self._f.readline(self._left)
            else:
                piece = self._f.readline()
                if not piece:
                    self._done = True
                    break
                out += piece
                break
            if not piece:
                raise BadAnswer("the connection closed within the answer's body")
            assert self._left is not None
            self._left -= len(piece)
            if not self._chunked and self._left == 0:
                self._done = True
            out += piece
            if piece.endswith(b"\n"):
                break
        return bytes(out)


class UnixConnection:
    """HTTP/1.1 over a Unix stream socket (one request at a time)."""

    def __init__(self, path: str, timeout: float | None = None) -> None:
        self.path = path
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self._f: IO[bytes] | None = None
        self._method = "GET"

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(self.timeout)
            s.connect(self.path)
        except BaseException:
            s.close()
            raise
        self.sock = s
        self._f = s.makefile("rb")

    def request(self, method: str, url: str, body: Any = None,
                headers: dict[str, str] | None = None) -> None:
        if self.sock is None:
            self.connect()
        assert self.sock is not None
        self._method = method
        h = {"Host": "localhost", **(headers or {})}
        lower = {k.lower() for k in h}
        stream = body is not None and not isinstance(body, bytes | bytearray | memoryview)
        if body is not None and "content-length" not in lower:
            if stream:
                h["Transfer-Encoding"] = "chunked"
            else:
                h["Content-Length"] = str(len(body))
        elif body is None and method in ("POST", "PUT", "PATCH"):
            h.setdefault("Content-Length", "0")
        head = f"{method} {url} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items())
        self.sock.sendall(head.encode("latin-1") + b"\r\n")
        if body is None:
            return
        if not stream:
            self.sock.sendall(body)
            return
        chunked = "Transfer-Encoding" in h
        while True:
            block = body.read(_BLOCK)
            if not block:
                break
            if chunked:
                self.sock.sendall(f"{len(block):x}\r\n".encode() + block + b"\r\n")
            else:
                self.sock.sendall(block)
        if chunked:
            self.sock.sendall(b"0\r\n\r\n")

    def getresponse(self) -> Response:
        assert self._f is not None
        return Response(self._f, self._method)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
