"""The web listener (``pyvirt daemon --web``): the GUI's static files and the API
behind a login.

One ASGI app in front of the same FastAPI app the Unix socket serves:
``GET /`` and ``/static/...`` are files under ``pyvirt/web/static`` (no listing,
no escape, app files revalidated with an ETag, vendored ones cached);
``/v1/session`` logs in and out; every other ``/v1/...`` request is
authenticated (session cookie, or the daemon's bearer token), checked against
CSRF (header + Origin) and against the path policy (``auth.authorize``: one
place for every domain path), then handed to the API with its principal in
``scope["state"]``. Security headers go on every answer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import re
import stat
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool

from pyvirt.manager import auth

if TYPE_CHECKING:
    from pyvirt.manager.manager import Manager

__all__ = ["COOKIE", "STATIC_DIR", "WebApp", "make_web_app"]

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

COOKIE = "pyvirt_session"
STATIC_DIR = Path(__file__).resolve().parents[1] / "web" / "static"
#: a login body is two short strings
LOGIN_LIMIT = 8192
#: how often a long connection's session is checked again (it ends within this)
RECHECK_S = 5.0
#: long-lived GETs (server-sent events): they end with their session
STREAMS = frozenset({"/v1/events", "/v1/metrics/stream"})

_TYPES = {
    ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
    ".json": "application/json", ".map": "application/json", ".svg": "image/svg+xml",
    ".png": "image/png", ".ico": "image/x-icon", ".woff2": "font/woff2",
    ".woff": "font/woff", ".txt": "text/plain; charset=utf-8", ".webp": "image/webp",
}
_SEGMENT = re.compile(r"^[A-Za-z0-9_@+-][A-Za-z0-9_@+.,-]*$")
_IMPORTMAP = re.compile(rb'<script type="importmap">(.*?)</script>', re.S)
_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _json(status: int, body: Any, headers: list[tuple[bytes, bytes]] | None = None
          ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    data = json.dumps(body, separators=(",", ":")).encode() if body is not None else b""
    h = [(b"content-type", b"application/json")] if body is not None else []
    return status, h + (headers or []), data


def _err(status: int, code: str, message: str, field: str | None = None,
         headers: list[tuple[bytes, bytes]] | None = None
         ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    return _json(status, {"error": {"code": code, "message": message, "field": field}},
                 headers)


async def _answer(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes,
                  *, head: bool = False) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": b"" if head else body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _cookie(scope: Scope, name: str) -> str | None:
    raw = _header(scope, b"cookie")
    if not raw:
        return None
    for part in raw.split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k == name:
            return v.strip()
    return None


class _Static:
    """Files under ``root``, read per request (small), their ETag from mtime + size."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._csp_key: tuple[int, int] | None = None
        self._csp = ""

    def resolve(self, rel: str) -> Path | None:
        """The file ``rel`` names, or None: every segment plain (no dot files, no
        ``..``, no backslash or NUL), a regular file inside the root after links."""
        parts = rel.split("/")
        if not parts or any(not _SEGMENT.fullmatch(p) for p in parts):
            return None
        path = self.root.joinpath(*parts)
        try:
            real = path.resolve(strict=True)
            st = real.stat()
        except (OSError, RuntimeError):
            return None
        if not real.is_relative_to(self.root) or not stat.S_ISREG(st.st_mode):
            return None
        return real

    def csp(self) -> str:
        """The CSP, with the sha256 of index.html's one inline script (its import map)."""
        index = self.root / "index.html"
        try:
            st = index.stat()
            key = (st.st_mtime_ns, st.st_size)
            if key != self._csp_key:
                m = _IMPORTMAP.search(index.read_bytes())
                digest = (base64.b64encode(hashlib.sha256(m.group(1)).digest()).decode()
                          if m else "")
                self._csp, self._csp_key = digest, key
        except OSError:
            self._csp = ""
        script = "script-src 'self'" + (f" 'sha256-{self._csp}'" if self._csp else "")
        return (f"default-src 'self'; {script}; style-src 'self' 'unsafe-inline'; "
                "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
                "base-uri 'none'; form-action 'self'")

    async def serve(self, scope: Scope, send: Send) -> None:
        method = scope["method"]
        path = scope["path"]
        head = method == "HEAD"
        if method not in ("GET", "HEAD"):
            await _answer(send, *_err(405, "method-not-allowed",
                                      f"method {method} not allowed on {path}",
                                      headers=[(b"allow", b"GET, HEAD")]))
            return
        rel = "index.html" if path == "/" else path.removeprefix("/static/")
        file = self.resolve(rel)
        if file is None:
            await _answer(send, *_err(404, "not-found", f"no such file: {path}"), head=head)
            return
        try:
            data = file.read_bytes()
            st = file.stat()
        except OSError:
            await _answer(send, *_err(404, "not-found", f"no such file: {path}"), head=head)
            return
        etag = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
        vendor = rel.startswith("vendor/")
        headers = [(b"content-type", _TYPES.get(file.suffix, "application/octet-stream")
                    .encode()),
                   (b"etag", etag.encode()),
                   # vendored packages change only with a pyvirt release; the app's own
                   # files are revalidated so an upgrade shows at the next load
                   (b"cache-control", b"public, max-age=86400" if vendor else b"no-cache")]
        if _header(scope, b"if-none-match") == etag:
            await send({"type": "http.response.start", "status": 304, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        await _answer(send, 200, headers, data, head=head)


class WebApp:
    """The web listener's ASGI app (see the module's docstring)."""

    def __init__(self, api: ASGIApp, manager: Manager, *, tls: bool = False,
                 token: str | None = None, idle_s: float = auth.IDLE_S,
                 static_dir: Path = STATIC_DIR, recheck_s: float = RECHECK_S) -> None:
        self.api = api
        self.manager = manager
        self.tls = tls
        self.token = f"Bearer {token}".encode() if token else None
        self.accounts = auth.accounts(manager)
        self.accounts.idle_s = idle_s
        self.static = _Static(static_dir)
        self.throttle = auth.LoginThrottle()
        self.recheck_s = recheck_s

    # ---- the wrapper: security headers on every answer
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.api(scope, receive, send)
            return
        csp = self.static.csp().encode()
        extra = [(b"content-security-policy", csp), (b"x-content-type-options", b"nosniff"),
                 (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY")]
        if self.tls:
            extra.append((b"strict-transport-security", b"max-age=31536000"))

        async def send_secured(msg: Message) -> None:
            if msg["type"] in ("http.response.start", "websocket.http.response.start"):
                msg = dict(msg)
                msg["headers"] = [*msg.get("headers", ()), *extra]
            await send(msg)

        if scope["type"] == "http":
            await self._http(scope, receive, send_secured)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send_secured)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if path == "/" or path.startswith("/static/"):
            await self.static.serve(scope, send)
            return
        if path == "/v1/session":
            await self._session(scope, receive, send)
            return
        if path == "/v1/version" and scope["method"] in ("GET", "HEAD"):
            await self._pass(scope, receive, send, auth.ANONYMOUS)
            return
        if not path.startswith("/v1/"):
            await _answer(send, *_err(404, "not-found", f"no such path: {path}"))
            return
        got = await self._authenticate(scope)
        if not isinstance(got, auth.Principal):
            await _answer(send, *got)
            return
        if got.via == "session" and scope["method"] in _UNSAFE:
            bad = self._csrf(scope, got)
            if bad is not None:
                await _answer(send, *bad)
                return
        if not self._origin_ok(scope):
            await _answer(send, *_err(403, "csrf", "the request's Origin is not this site"))
            return
        refused = await run_in_threadpool(auth.authorize, self.manager, got,
                                          scope["method"], path)
        if refused is not None:
            await _answer(send, *_err(refused.status, refused.code, refused.message,
                                      refused.field))
            return
        await self._pass(scope, receive, send, got)

    async def _pass(self, scope: Scope, receive: Receive, send: Send,
                    principal: auth.Principal) -> None:
        scope = dict(scope)
        scope["state"] = {**scope.get("state", {}), "principal": principal}
        if principal.via == "session" and (scope["type"] == "websocket"
                                           or scope["path"] in STREAMS):
            await self._watched(scope, receive, send)
            return
        if principal.via != "session" or scope["type"] != "http":
            await self.api(scope, receive, send)
            return
        accounts = self.accounts

        async def send_noting(msg: Message) -> None:
            # a task a user started is theirs to follow (GET /v1/tasks shows it)
            if msg["type"] == "http.response.start" and msg.get("status") == 202:
                for key, value in msg.get("headers", ()):
                    if key == b"location":
                        tid = bytes(value).decode("latin-1").rpartition("/")[2]
                        if tid.isdigit():
                            await run_in_threadpool(accounts.note_task, int(tid),
                                                    principal.name)
            await send(msg)

        await self.api(scope, receive, send_noting)

    async def _watched(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A long connection (a console, an event or metrics stream) lasts only as
        long as its session: logged out, expired, the password changed or the
        account removed, it ends within ``recheck_s``. Input on a console counts as
        activity (typing only in the console keeps the session alive); an open
        stream alone does not."""
        token = _cookie(scope, COOKIE) or ""
        ended = asyncio.Event()
        typed = False
        ws = scope["type"] == "websocket"
        closed = False

        async def watch() -> None:
            nonlocal typed
            while not ended.is_set():
                await asyncio.sleep(self.recheck_s)
                touch, typed = typed, False
                found = await run_in_threadpool(self.accounts.session_lookup, token,
                                                touch=touch)
                if not isinstance(found, auth.Session):
                    ended.set()

        gone: Message = ({"type": "websocket.disconnect", "code": 4401} if ws
                         else {"type": "http.disconnect"})

        async def guarded_receive() -> Message:
            nonlocal typed
            if ended.is_set():
                return gone
            rx = asyncio.ensure_future(receive())
            stop = asyncio.ensure_future(ended.wait())
            done, _ = await asyncio.wait({rx, stop}, return_when=asyncio.FIRST_COMPLETED)
            if rx in done:
                stop.cancel()
                msg = rx.result()
                if msg["type"] == "websocket.receive":
                    typed = True
                return msg
            rx.cancel()
            return gone

        async def noting_send(msg: Message) -> None:
            nonlocal closed
            if msg["type"] == "websocket.close":
                closed = True
            await send(msg)

        watcher = asyncio.ensure_future(watch())
        try:
            await self.api(scope, guarded_receive, noting_send)
        finally:
            watcher.cancel()
        if ws and ended.is_set() and not closed:
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": 4401,
                            "reason": "session-expired"})

    # ---- who is asking
    async def _authenticate(self, scope: Scope
                            ) -> auth.Principal | tuple[int, list[tuple[bytes, bytes]], bytes]:
        authz = _header(scope, b"authorization")
        if authz is not None and self.token is not None:
            if hmac.compare_digest(authz.encode("latin-1"), self.token):
                return auth.Principal("token", "admin", "token")
            return _err(401, "unauthenticated", "wrong bearer token",
                        headers=[(b"www-authenticate", b"Bearer")])
        cookie = _cookie(scope, COOKIE)
        if not cookie:
            return _err(401, "unauthenticated", "log in first")
        found = await run_in_threadpool(self.accounts.session_lookup, cookie)
        if found is None:
            return _err(401, "unauthenticated", "log in first")
        if found == "expired":
            return _err(401, "session-expired", "your session expired: log in again")
        assert isinstance(found, auth.Session)
        return auth.Principal(found.user, found.role, "session", csrf=found.csrf)

    def _csrf(self, scope: Scope, p: auth.Principal
              ) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
        got = (_header(scope, b"x-csrf-token") or "").encode("latin-1")
        if not p.csrf or not hmac.compare_digest(got, p.csrf.encode()):
            return _err(403, "csrf", "missing or wrong X-CSRF-Token header")
        return None

    def _origin_ok(self, scope: Scope) -> bool:
        """An Origin header, when sent, must be this listener as the browser
        reached it (scheme + Host): a page of another site never is."""
        origin = _header(scope, b"origin")
        if origin is None:
            return True
        host = _header(scope, b"host")
        if not host:
            return False
        scheme = "https" if self.tls else "http"
        return hmac.compare_digest(origin.encode("latin-1"), f"{scheme}://{host}".encode(
            "latin-1", "replace"))

    # ---- /v1/session
    async def _session(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        if method == "POST":
            await self._login(scope, receive, send)
            return
        if method not in ("GET", "DELETE"):
            await _answer(send, *_err(405, "method-not-allowed",
                                      f"method {method} not allowed on /v1/session"))
            return
        got = await self._authenticate(scope)
        if not isinstance(got, auth.Principal):
            await _answer(send, *got)
            return
        if got.via != "session":
            await _answer(send, *_err(400, "invalid-argument",
                                      "a bearer token has no session"))
            return
        if method == "DELETE":
            bad = self._csrf(scope, got) or (
                None if self._origin_ok(scope)
                else _err(403, "csrf", "the request's Origin is not this site"))
            if bad is not None:
                await _answer(send, *bad)
                return
            await run_in_threadpool(self.accounts.session_delete, _cookie(scope, COOKIE) or "")
            await _answer(send, 204, [(b"set-cookie", self._set_cookie("", 0))], b"")
            return
        info = await run_in_threadpool(self.accounts.session_lookup, _cookie(scope, COOKIE)
                                       or "")
        if not isinstance(info, auth.Session):
            await _answer(send, *_err(401, "session-expired", "your session expired"))
            return
        await _answer(send, *_json(200, info.to_doc(self.accounts.idle_s)))

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._origin_ok(scope):
            await _answer(send, *_err(403, "csrf", "the request's Origin is not this site"))
            return
        body = b""
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            body += msg.get("body", b"")
            if len(body) > LOGIN_LIMIT:
                await _answer(send, *_err(413, "invalid-argument",
                                          "request body: too large"))
                return
            if not msg.get("more_body", False):
                break
        try:
            doc = json.loads(body)
        except ValueError:
            await _answer(send, *_err(400, "invalid-argument", "request body: not valid JSON"))
            return
        if not isinstance(doc, dict):
            await _answer(send, *_err(400, "invalid-argument",
                                      "request body: expected an object"))
            return
        for key in ("user", "password"):
            if not isinstance(doc.get(key), str) or not doc[key]:
                await _answer(send, *_err(400, "invalid-argument", f"{key}: required", key))
                return
        user, password = str(doc["user"])[:64], str(doc["password"])[:auth.PASSWORD_MAX]
        client = scope.get("client") or ("?", 0)
        key = f"{user}\0{client[0]}"
        wait = self.throttle.retry_after(key)
        if wait > 0:
            await _answer(send, *_err(429, "too-many-attempts",
                                      f"too many failed logins: try again in {wait} s",
                                      headers=[(b"retry-after", str(wait).encode())]))
            return
        role = await run_in_threadpool(self.accounts.verify, user, password)
        if role is None:
            self.throttle.failed(key)
            log.info("web login of %r from %s refused", user, client[0])
            await _answer(send, *_err(401, "bad-credentials", "wrong user name or password"))
            return
        self.throttle.succeeded(key)
        token, info = await run_in_threadpool(self.accounts.session_create, user)
        log.info("web login of %r from %s", user, client[0])
        await _answer(send, *_json(200, info.to_doc(self.accounts.idle_s),
                                   [(b"set-cookie", self._set_cookie(
                                       token, int(self.accounts.lifetime_s)))]))

    def _set_cookie(self, value: str, max_age: int) -> bytes:
        parts = [f"{COOKIE}={value}", "HttpOnly", "SameSite=Strict", "Path=/",
                 f"Max-Age={max_age}"]
        if self.tls:
            parts.append("Secure")
        return "; ".join(parts).encode()

    # ---- WebSockets (the console)
    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]

        async def refuse(code: int, reason: str) -> None:
            # accepted then closed: the page sees the code (4401 log in, 4403, 4404)
            msg = await receive()
            if msg["type"] != "websocket.connect":
                return
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": code, "reason": reason[:120]})

        if not path.startswith("/v1/"):
            await refuse(4404, "no such path")
            return
        got = await self._authenticate(scope)
        if not isinstance(got, auth.Principal):
            status, _h, body = got
            await refuse(4000 + status, json.loads(body)["error"]["code"])
            return
        if got.via == "session" and (_header(scope, b"origin") is None
                                     or not self._origin_ok(scope)):
            # cross-site WebSocket hijacking: the browser sends the cookie anyway
            await refuse(4403, "csrf")
            return
        refused = await run_in_threadpool(auth.authorize, self.manager, got, "WEBSOCKET", path)
        if refused is not None:
            await refuse(4000 + refused.status, refused.code)
            return
        await self._pass(scope, receive, send, got)


def make_web_app(api: ASGIApp, manager: Manager, **kw: Any) -> WebApp:
    return WebApp(api, manager, **kw)

