"""The management API: HTTP/1.1 + JSON over the daemon's Unix socket (and TCP + TLS).

``make_app(manager)`` builds the FastAPI application; ``pyvirt daemon`` serves it.
Every route calls the synchronous, thread-safe ``Manager`` on Starlette's thread pool.
Errors always have one shape, ``{"error": {"code", "message", "field"}}``, with the
status of the ``ManagerError`` (docs/manager-api.md has the list); a request the
models refuse is 400 naming the field (never FastAPI's 422), anything unexpected is
500 "internal error" and logged. Long operations answer 202 ``{"task": id}``; events
are a ``text/event-stream``; a console is a WebSocket relayed to the VMM's console
socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import json
import logging
import os
import re
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, MutableMapping
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

import anyio
import anyio.from_thread
from fastapi import APIRouter, Body, FastAPI, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.websockets import WebSocketDisconnect

import pyvirt
from pyvirt.manager import auth
from pyvirt.manager.api_monitor import add_monitor_routes
from pyvirt.manager.errors import InvalidArgument, ManagerError, NotFound, OperationInvalid

if TYPE_CHECKING:
    from pyvirt.manager.manager import Manager

__all__ = ["API_VERSION", "DEFINITION_LIMIT", "close_streams", "make_app", "require_token"]

log = logging.getLogger(__name__)

API_VERSION = 1
#: the largest JSON body accepted (a definition is a few KiB; uploads stream instead)
DEFINITION_LIMIT = 1 << 20
#: SSE comment sent when no event came for this long (proxies and clients see a live stream)
KEEPALIVE_S = 15.0

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# ---------------------------------------------------------------- body models
class _Strict(BaseModel):
    """Request bodies: unknown keys and loose types are refused (400 naming the field)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StartBody(_Strict):
    paused: bool = False


class ShutdownBody(_Strict):
    timeout: float = Field(default=60.0, gt=0, le=3600)


class SaveBody(_Strict):
    path: str | None = Field(default=None, min_length=1, max_length=4096)


class RestoreBody(_Strict):
    path: str = Field(min_length=1, max_length=4096)


class EnabledBody(_Strict):
    enabled: bool


class SnapshotBody(_Strict):
    name: str | None = Field(default=None, min_length=1, max_length=255)
    description: str = Field(default="", max_length=4096)


class VolumeCreateBody(_Strict):
    name: str = Field(min_length=1, max_length=255)
    capacity: int = Field(gt=0, le=1 << 60)
    format: Literal["qcow2", "raw"] = "qcow2"
    backing: str | None = Field(default=None, min_length=1, max_length=4096)
    prealloc: bool = False


class ResizeBody(_Strict):
    capacity: int = Field(gt=0, le=1 << 60)


class CloneBody(_Strict):
    name: str = Field(min_length=1, max_length=255)
    mode: Literal["overlay", "copy"] = "overlay"


class UserBody(_Strict):
    name: str = Field(max_length=64)
    role: str = Field(default="user", max_length=16)
    password: str = Field(max_length=auth.PASSWORD_MAX)


class UserUpdateBody(_Strict):
    role: str | None = Field(default=None, max_length=16)
    password: str | None = Field(default=None, max_length=auth.PASSWORD_MAX)


class ImportBody(_Strict):
    name: str = Field(min_length=1, max_length=255)
    source: str = Field(min_length=1, max_length=4096)
    format: Literal["qcow2", "raw"] | None = None
    mode: Literal["copy", "move"] = "copy"


# ------------------------------------------------------ response models (docs)
class _Open(BaseModel):
    """Documented response shapes: the fields listed are always there; more may be."""

    model_config = ConfigDict(extra="allow")


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


class TaskRef(BaseModel):
    task: int


class Version(_Open):
    pyvirt_version: str
    api_version: int
    hostname: str
    uri: str


class DomainSummary(_Open):
    id: int | None
    name: str
    uuid: str
    state: str
    reason: str
    autostart: bool
    description: str


class Domain(DomainSummary):
    definition: dict[str, Any]


class Snapshot(_Open):
    name: str
    parent: str | None
    created: float
    state: str
    description: str
    current: bool
    memory: bool


class Pool(_Open):
    name: str


class Volume(_Open):
    name: str
    pool: str
    path: str
    format: str


class Network(_Open):
    name: str


class Task(_Open):
    id: int
    kind: str
    object: str
    state: Literal["running", "done", "failed"]
    progress: float
    message: str
    error: str | None


class Event(_Open):
    id: int
    time: float
    kind: str
    object: str
    event: str
    detail: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorBody, "description": d}
    for s, d in ((400, "Invalid argument"), (401, "Missing or wrong bearer token (TCP only)"),
                 (404, "No such object"), (409, "Operation invalid in this state / exists"),
                 (413, "Body too large"), (500, "Operation failed or internal error"),
                 (504, "Timed out"))
}


def _error(status: int, code: str, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "field": field}},
                        status_code=status)


def _field(loc: tuple[int | str, ...]) -> str:
    """FastAPI's error location as the field path the Manager uses: disks[1].path."""
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _validation_message(err: dict[str, Any]) -> tuple[str, str | None]:
    field = _field(tuple(err.get("loc", ())))
    kind = err.get("type", "")
    if kind == "json_invalid":
        return "request body: not valid JSON", None
    if kind == "extra_forbidden":
        msg = "unknown field"
    elif kind == "missing":
        msg = "required" if field else "a JSON body is required"
    else:
        msg = str(err.get("msg", "invalid value"))
    return (f"{field}: {msg}" if field else f"request body: {msg}"), field or None


class _Route(APIRoute):
    """Anything a route raises that is not an error of the API's own becomes 500
    "internal error" (logged with its traceback) here, before Starlette's
    ServerErrorMiddleware would print it and re-raise into the server."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        inner = super().get_route_handler()
        name = self.name

        async def handler(request: Request) -> Response:
            try:
                return await inner(request)
            except (ManagerError, RequestValidationError, StarletteHTTPException):
                raise
            except Exception:
                log.exception("%s %s (%s) failed", request.method, request.url.path, name)
                return _error(500, "internal-error", "internal error")

        return handler


# ---------------------------------------------------------------- body limit
_UPLOAD = re.compile(r"^/v1/pools/[^/]+/volumes/[^/]+/data$")


class _BodyLimit:
    """Buffers a request body of at most ``limit`` bytes before the app sees it
    (413 beyond, without reading more); volume uploads stream past untouched."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"] == "PUT"
                                       and _UPLOAD.match(scope["path"])):
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.limit or declared < 0:
                    await self._refuse(scope, receive, send)
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client went away
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        resp = _error(413, "invalid-argument",
                      f"request body: larger than {self.limit} bytes")
        resp.headers["connection"] = "close"
        await resp(scope, receive, send)


# ---------------------------------------------------------------- token guard
def require_token(app: ASGIApp, token: str) -> ASGIApp:
    """``app`` behind ``Authorization: Bearer TOKEN`` (TCP listeners; the Unix socket
    relies on its file mode). Compared in constant time; 401 otherwise."""
    expected = f"Bearer {token}".encode()

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            got = b""
            for key, value in scope.get("headers", ()):
                if key == b"authorization":
                    got = bytes(value)
            if not hmac.compare_digest(got, expected):
                resp = _error(401, "unauthorized", "missing or wrong bearer token")
                resp.headers["www-authenticate"] = "Bearer"
                # a WebSocket handshake is refused with the same HTTP answer where
                # the server has ASGI's websocket.http.response extension
                if scope["type"] == "http" or "websocket.http.response" in scope.get(
                        "extensions", {}):
                    await resp(scope, receive, send)
                else:
                    await receive()  # websocket.connect
                    await send({"type": "websocket.close", "code": 4401,
                                "reason": "missing or wrong bearer token"})
                return
        await app(scope, receive, send)

    return guarded


# ---------------------------------------------------------------- upload stream
class _BodyReader(io.RawIOBase):
    """The request body as a blocking file for ``Storage.vol_upload`` on a worker
    thread: each read pulls the next chunk from the event loop."""

    def __init__(self, request: Request) -> None:
        self._chunks = request.stream().__aiter__()
        self._buf = b""
        self._eof = False

    def readable(self) -> bool:
        return True

    async def _next(self) -> bytes:
        return await self._chunks.__anext__()

    def readinto(self, b: Any) -> int:
        while not self._buf and not self._eof:
            try:
                self._buf = anyio.from_thread.run(self._next)
            except StopAsyncIteration:
                self._eof = True
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


# ---------------------------------------------------------------- the app
# module level: the routes' annotations are strings resolved in this namespace
Definition = Annotated[dict[str, Any], Body(description="A definition document "
                                                      "(docs/manager-api.md)")]
Name = Annotated[str, Field(min_length=1, max_length=255)]
TaskId = Annotated[int, Field(ge=0, le=(1 << 63) - 1)]
SinceId = Annotated[int | None, Query(ge=0, le=(1 << 63) - 1)]
Limit = Annotated[int, Query(ge=1, le=10000)]
Kind = Annotated[str | None, Query(max_length=64)]
Obj = Annotated[str | None, Query(max_length=255)]

def make_app(manager: Manager, *, uri: str | None = None,
             keepalive_s: float = KEEPALIVE_S) -> FastAPI:
    """The API over ``manager``. ``uri``: how clients reach this daemon (GET /v1/version)."""
    if uri is None:
        paths = getattr(manager, "paths", None)
        uri = f"unix://{paths.socket}" if paths is not None else "unix://"
    app = FastAPI(title="pyvirtd management API", version=str(API_VERSION),
                  description="Domains, storage, networks, tasks and events of one pyvirt "
                              "host. See docs/manager-api.md.",
                  docs_url=None, redoc_url=None)
    r = APIRouter(route_class=_Route, responses=_ERRORS)
    m = manager
    # what ends each open event stream and console (close_streams: the daemon stops)
    closers: set[Callable[[], None]] = set()
    app.state.closers = closers
    hostname = socket.gethostname()

    @app.exception_handler(ManagerError)
    async def _manager_error(request: Request, exc: ManagerError) -> JSONResponse:
        return JSONResponse({"error": exc.to_dict()}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        msg, field = _validation_message(errors[0]) if errors else ("invalid request", None)
        return _error(400, "invalid-argument", msg, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        msg = {404: f"no such API path: {request.url.path}",
               405: f"method {request.method} not allowed on {request.url.path}"}.get(
                   exc.status_code, str(exc.detail))
        return _error(exc.status_code, code, msg)

    def task(tid: int) -> JSONResponse:
        return JSONResponse({"task": tid}, status_code=202,
                            headers={"location": f"/v1/tasks/{tid}"})

    T202: dict[int | str, dict[str, Any]] = {
        202: {"model": TaskRef, "description": "Started as a task"}}

    # -- host
    @r.get("/v1/version", response_model=None, responses={200: {"model": Version}})
    def version() -> Any:
        return {"pyvirt_version": pyvirt.__version__, "api_version": API_VERSION,
                "hostname": hostname, "uri": uri}

    # -- domains
    @r.get("/v1/domains", response_model=None,
           responses={200: {"model": list[DomainSummary]}})
    def list_domains(request: Request, all: bool = True) -> Any:
        seen = auth.visible_names(m, auth.principal_of(request))
        return [d for d in m.list_domains(all=all) if seen is None or d["name"] in seen]

    def define_as(request: Request, doc: dict[str, Any]) -> Any:
        # what a non-admin may define, checked before the Manager sees it; the
        # domain they made is theirs (auth.grant_on_create)
        who = auth.principal_of(request)
        auth.check_definition(m, who, doc)
        auth.check_existing(m, who, doc)
        out = m.define(doc)
        auth.grant_on_create(m, who, out["name"])
        return out

    @r.post("/v1/domains", status_code=201, response_model=None,
            responses={201: {"model": Domain}})
    def define(request: Request, doc: Definition) -> Any:
        return define_as(request, doc)

    @r.put("/v1/domains/{name}", response_model=None, responses={200: {"model": Domain}})
    def redefine(request: Request, name: Name, doc: Definition) -> Any:
        if "name" not in doc:
            doc = {**doc, "name": name}
        elif doc["name"] != name:
            raise InvalidArgument(f"{doc['name']!r} differs from the domain being "
                                  f"replaced ({name!r})", field="name")
        return define_as(request, doc)

    @r.get("/v1/domains/{name}", response_model=None, responses={200: {"model": Domain}})
    def get_domain(name: Name) -> Any:
        return m.get(name)

    @r.delete("/v1/domains/{name}", status_code=204, response_class=Response)
    def undefine(name: Name, remove_storage: bool = False, keep_snapshots: bool = False) -> None:
        m.undefine(name, remove_storage=remove_storage, keep_snapshots=keep_snapshots)

    @r.post("/v1/domains/{name}/start", response_model=None,
            responses={200: {"model": Domain}})
    def start(name: Name, body: StartBody | None = None) -> Any:
        return m.start(name, paused=(body or StartBody()).paused)

    @r.post("/v1/domains/{name}/shutdown", status_code=204, response_class=Response)
    def shutdown(name: Name, body: ShutdownBody | None = None) -> None:
        m.shutdown(name, timeout=(body or ShutdownBody()).timeout)

    def _action(verb: str) -> None:
        def act(name: Name) -> None:
            getattr(m, verb)(name)

        act.__name__ = verb
        r.post(f"/v1/domains/{{name}}/{verb}", status_code=204, response_class=Response,
               name=verb, summary=verb.capitalize())(act)

    for verb in ("destroy", "reboot", "reset", "suspend", "resume"):
        _action(verb)

    @r.post("/v1/domains/{name}/save", status_code=202, response_model=None, responses=T202)
    def save(name: Name, body: SaveBody | None = None) -> JSONResponse:
        return task(m.save(name, (body or SaveBody()).path))

    @r.delete("/v1/domains/{name}/managed-save", status_code=204, response_class=Response)
    def managed_save_remove(name: Name) -> None:
        m.managed_save_remove(name)

    @r.post("/v1/restore", response_model=None, responses={200: {"model": Domain}})
    def restore(body: RestoreBody) -> Any:
        return m.restore(body.path)

    @r.put("/v1/domains/{name}/autostart", status_code=204, response_class=Response)
    def set_autostart(name: Name, body: EnabledBody) -> None:
        m.set_autostart(name, body.enabled)

    @r.get("/v1/domains/{name}/stats", response_model=None)
    def stats(name: Name) -> Any:
        return m.stats(name)

    @r.get("/v1/domains/{name}/disks", response_model=None)
    def block_list(name: Name) -> Any:
        return m.block_list(name)

    @r.get("/v1/domains/{name}/interfaces", response_model=None)
    def iface_list(name: Name) -> Any:
        return m.iface_list(name)

    # -- snapshots
    @r.get("/v1/domains/{name}/snapshots", response_model=None,
           responses={200: {"model": list[Snapshot]}})
    def snapshot_list(name: Name) -> Any:
        return m.snapshot_list(name)

    @r.post("/v1/domains/{name}/snapshots", status_code=202, response_model=None,
            responses=T202)
    def snapshot_create(name: Name, body: SnapshotBody | None = None) -> JSONResponse:
        b = body or SnapshotBody()
        return task(m.snapshot_create(name, b.name, b.description))

    @r.post("/v1/domains/{name}/snapshots/{snap}/revert", status_code=204,
            response_class=Response)
    def snapshot_revert(name: Name, snap: Name) -> None:
        m.snapshot_revert(name, snap)

    @r.delete("/v1/domains/{name}/snapshots/{snap}", status_code=204, response_class=Response)
    def snapshot_delete(name: Name, snap: Name) -> None:
        m.snapshot_delete(name, snap)

    # -- storage
    @r.get("/v1/pools", response_model=None, responses={200: {"model": list[Pool]}})
    def pool_list() -> Any:
        return m.storage.pool_list()

    @r.post("/v1/pools", status_code=201, response_model=None,
            responses={201: {"model": Pool}})
    def pool_define(doc: Definition) -> Any:
        return m.storage.pool_define(doc)

    @r.get("/v1/pools/{pool}", response_model=None, responses={200: {"model": Pool}})
    def pool_info(pool: Name) -> Any:
        return m.storage.pool_info(pool)

    @r.delete("/v1/pools/{pool}", status_code=204, response_class=Response)
    def pool_undefine(pool: Name) -> None:
        m.storage.pool_undefine(pool)

    def _pool_action(verb: str) -> None:
        def act(pool: Name) -> None:
            getattr(m.storage, f"pool_{verb}")(pool)

        act.__name__ = f"pool_{verb}"
        r.post(f"/v1/pools/{{pool}}/{verb}", status_code=204, response_class=Response,
               name=f"pool_{verb}")(act)

    for verb in ("start", "stop", "refresh"):
        _pool_action(verb)

    @r.get("/v1/pools/{pool}/volumes", response_model=None,
           responses={200: {"model": list[Volume]}})
    def vol_list(pool: Name) -> Any:
        return m.storage.vol_list(pool)

    @r.post("/v1/pools/{pool}/volumes", status_code=202, response_model=None,
            responses=T202)
    def vol_create(request: Request, pool: Name, body: VolumeCreateBody) -> JSONResponse:
        auth.check_volume_create(m, auth.principal_of(request), pool, body.backing)
        return task(m.storage.vol_create(pool, body.name, body.capacity, body.format,
                                         backing=body.backing, prealloc=body.prealloc))

    @r.get("/v1/pools/{pool}/volumes/{vol}", response_model=None,
           responses={200: {"model": Volume}})
    def vol_info(pool: Name, vol: Name) -> Any:
        return m.storage.vol_info(pool, vol)

    @r.delete("/v1/pools/{pool}/volumes/{vol}", status_code=204, response_class=Response)
    def vol_delete(pool: Name, vol: Name) -> None:
        m.storage.vol_delete(pool, vol)

    @r.post("/v1/pools/{pool}/volumes/{vol}/resize", status_code=204, response_class=Response)
    def vol_resize(pool: Name, vol: Name, body: ResizeBody) -> None:
        m.storage.vol_resize(pool, vol, body.capacity)

    @r.post("/v1/pools/{pool}/volumes/{vol}/clone", status_code=202, response_model=None,
            responses=T202)
    def vol_clone(pool: Name, vol: Name, body: CloneBody) -> JSONResponse:
        return task(m.storage.vol_clone(pool, vol, body.name, mode=body.mode))

    @r.post("/v1/pools/{pool}/import", status_code=202, response_model=None, responses=T202)
    def vol_import(pool: Name, body: ImportBody) -> JSONResponse:
        return task(m.storage.vol_import(pool, body.name, body.source, format=body.format,
                                         mode=body.mode))

    @r.put("/v1/pools/{pool}/volumes/{vol}/data", response_model=None,
           responses={200: {"model": Volume}},
           openapi_extra={"requestBody": {"required": True, "content": {
               "application/octet-stream": {"schema": {"type": "string",
                                                       "format": "binary"}}}}})
    async def vol_upload(pool: Name, vol: Name, request: Request) -> Any:
        length: int | None = None
        if "content-length" in request.headers:
            try:
                length = int(request.headers["content-length"])
            except ValueError:
                length = -1
            if length < 0:
                raise InvalidArgument("not a byte count", field="Content-Length")
        reader = _BodyReader(request)
        return await run_in_threadpool(
            m.storage.vol_upload, pool, vol, reader, length)

    # -- networks
    def nets() -> Any:
        if m.networks is None:
            raise OperationInvalid("virtual networks are off in this daemon (it was started "
                                   "with --no-networks)")
        return m.networks

    @r.get("/v1/networks", response_model=None, responses={200: {"model": list[Network]}})
    def net_list() -> Any:
        return [] if m.networks is None else m.networks.list()

    @r.post("/v1/networks", status_code=201, response_model=None,
            responses={201: {"model": Network}})
    def net_define(doc: Definition) -> Any:
        return nets().define(doc)

    @r.get("/v1/networks/{net}", response_model=None, responses={200: {"model": Network}})
    def net_info(net: Name) -> Any:
        return nets().info(net)

    @r.delete("/v1/networks/{net}", status_code=204, response_class=Response)
    def net_undefine(net: Name) -> None:
        nets().undefine(net)

    def _net_action(verb: str) -> None:
        def act(net: Name) -> None:
            getattr(nets(), verb)(net)

        act.__name__ = f"net_{verb}"
        r.post(f"/v1/networks/{{net}}/{verb}", status_code=204, response_class=Response,
               name=f"net_{verb}")(act)

    for verb in ("start", "stop"):
        _net_action(verb)

    @r.put("/v1/networks/{net}/autostart", status_code=204, response_class=Response)
    def net_autostart(net: Name, body: EnabledBody) -> None:
        nets().set_autostart(net, body.enabled)

    @r.get("/v1/networks/{net}/leases", response_model=None)
    def net_leases(net: Name) -> Any:
        return nets().leases(net)

    # -- tasks and events
    def task_filter(request: Request) -> Callable[[dict[str, Any]], bool] | None:
        """Which tasks the caller sees: about their domains, or started by them."""
        who = auth.principal_of(request)
        seen = auth.visible_names(m, who)
        if seen is None:
            return None
        mine = auth.accounts(m).tasks_of(who.name) if who.via == "session" else set()
        return lambda t: t["id"] in mine or (t["object"] in seen and t["kind"] in _DOMAIN_TASKS)

    @r.get("/v1/tasks", response_model=None, responses={200: {"model": list[Task]}})
    def tasks(request: Request, active: bool = False) -> Any:
        keep = task_filter(request)
        return [t for t in m.tasks.list(active_only=active) if keep is None or keep(t)]

    @r.get("/v1/tasks/{tid}", response_model=None, responses={200: {"model": Task}})
    def get_task(request: Request, tid: TaskId) -> Any:
        t = m.tasks.get(tid)
        keep = task_filter(request)
        if keep is not None and not keep(t):
            raise NotFound(f"task {tid} not found")
        return t

    @r.get("/v1/events/log", response_model=None, responses={200: {"model": list[Event]}})
    def event_log(request: Request, limit: Limit = 100, kind: Kind = None,
                  object: Obj = None) -> Any:
        seen = auth.visible_names(m, auth.principal_of(request))
        if seen is None:
            return m.events.recent(limit=limit, kind=kind, obj=object)
        return _visible_events(m, seen, limit, kind, object)

    @r.get("/v1/events", response_class=StreamingResponse,
           responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                            "description": "Server-sent events: `id: N` and `data: EVENT` "
                                           "per event; comments as keep-alives"}})
    async def events(request: Request,
                     since: SinceId = None) -> StreamingResponse:
        if since is None and "last-event-id" in request.headers:
            with contextlib.suppress(ValueError):
                since = max(0, int(request.headers["last-event-id"]))
        who = auth.principal_of(request)
        sub = await run_in_threadpool(m.events.subscribe, since)
        keep = None if who.admin else lambda ev: _event_visible(m, who, ev)
        return StreamingResponse(_sse(sub, keepalive_s, closers, keep),
                                 media_type="text/event-stream",
                                 headers={"cache-control": "no-store",
                                          "x-accel-buffering": "no"})

    # the same stream over a WebSocket (the web GUI's: a browser holds at most 6
    # HTTP/1.1 connections to a host, and every open tab held two streams)
    @r.websocket("/v1/events")
    async def events_ws(ws: WebSocket, since: SinceId = None) -> None:
        who = auth.principal_of(ws)
        sub = await run_in_threadpool(m.events.subscribe, since)
        keep = None if who.admin else lambda ev: _event_visible(m, who, ev)
        await sse_over_websocket(ws, _sse(sub, keepalive_s, closers, keep))

    add_monitor_routes(r, m, closers=closers, keepalive_s=keepalive_s)
    # -- web GUI accounts (admin only: auth.authorize)
    accounts = auth.accounts(m)

    @r.get("/v1/users", response_model=None)
    def user_list() -> Any:
        return accounts.user_list()

    @r.post("/v1/users", status_code=201, response_model=None)
    def user_add(body: UserBody) -> Any:
        return accounts.user_add(body.name, body.role, body.password)

    @r.put("/v1/users/{user}", response_model=None)
    def user_set(user: Name, body: UserUpdateBody) -> Any:
        return accounts.user_set(user, role=body.role, password=body.password)

    @r.delete("/v1/users/{user}", status_code=204, response_class=Response)
    def user_delete(user: Name) -> None:
        accounts.user_delete(user)

    @r.put("/v1/users/{user}/grants/{name}", status_code=204, response_class=Response)
    def user_grant(user: Name, name: Name) -> None:
        accounts.grant(user, name)

    @r.delete("/v1/users/{user}/grants/{name}", status_code=204, response_class=Response)
    def user_revoke(user: Name, name: Name) -> None:
        accounts.revoke(user, name)

    app.include_router(r)

    @app.websocket("/v1/domains/{name}/console")
    async def console(ws: WebSocket, name: str) -> None:
        try:
            path = await run_in_threadpool(m.console_path, name)
        except ManagerError as exc:
            await _refuse_ws(ws, exc.status, {"error": exc.to_dict()})
            return
        except Exception:
            log.exception("console of %r", name)
            await _refuse_ws(ws, 500, {"error": {"code": "internal-error",
                                                 "message": "internal error", "field": None}})
            return
        try:
            reader, writer = await asyncio.open_unix_connection(os.fspath(path))
        except OSError as exc:
            # the VMM may have ended between the two steps (forced off, reverted):
            # that is the domain's state, not a fault of ours
            try:
                await run_in_threadpool(m.console_path, name)
            except ManagerError as again:
                await _refuse_ws(ws, again.status, {"error": again.to_dict()})
                return
            except Exception:
                log.exception("console of %r", name)
            if isinstance(exc, (FileNotFoundError, ConnectionRefusedError)):
                gone = OperationInvalid(f"the console of '{name}' is gone: its VMM is ending")
                await _refuse_ws(ws, gone.status, {"error": gone.to_dict()})
                return
            await _refuse_ws(ws, 500, {"error": {
                "code": "operation-failed", "field": None,
                "message": f"console of '{name}' cannot be reached: {exc.strerror or exc}"}})
            return
        await ws.accept()
        closers.add(writer.close)
        try:
            await _relay(ws, reader, writer)
        finally:
            closers.discard(writer.close)

    original_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = original_openapi()
            # FastAPI documents its own 422, which this API never answers (400 instead)
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            for gone in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(gone, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(_BodyLimit, limit=DEFINITION_LIMIT)
    return app


def close_streams(app: FastAPI) -> None:
    """End every open event stream and console (on the event loop's thread): the
    daemon is stopping, and they would otherwise hold its graceful shutdown."""
    for close in list(getattr(app.state, "closers", ())):
        close()


async def _sse(sub: Any, keepalive_s: float, closers: set[Callable[[], None]],
               keep: Callable[[dict[str, Any]], bool] | None = None
               ) -> AsyncIterator[bytes]:
    """Events from a subscription as SSE. A plain thread waits on the subscription
    (not the shared worker pool, which long streams would exhaust) and hands each
    event to the loop."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    stop = threading.Event()

    def pump() -> None:
        try:
            while not stop.is_set():
                ev = sub.get(timeout=0.5)
                if ev is None:
                    if getattr(sub, "closed", False):
                        break
                    continue
                if keep is not None and ev.get("event") != "overflow" and not keep(ev):
                    continue  # about a domain the caller cannot see
                loop.call_soon_threadsafe(queue.put_nowait, ev)
                if ev.get("event") == "overflow":
                    break
        except Exception:
            log.exception("event subscription failed")
        finally:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=pump, name="sse", daemon=True).start()

    def end() -> None:
        queue.put_nowait(None)

    closers.add(end)
    try:
        yield b": pyvirtd events\n\n"
        while True:
            try:
                ev = await asyncio.wait_for(queue.get(), keepalive_s)
            except TimeoutError:
                yield b": keep-alive\n\n"
                continue
            if ev is None:
                return
            data = json.dumps(ev, separators=(",", ":"))
            head = f"id: {ev['id']}\n" if ev.get("id") is not None else ""
            yield f"{head}event: message\ndata: {data}\n\n".encode()
            if ev.get("event") == "overflow":
                return
    finally:
        closers.discard(end)
        stop.set()
        with contextlib.suppress(Exception):
            sub.close()


async def sse_over_websocket(ws: WebSocket, chunks: AsyncIterator[bytes]) -> None:
    """Carry a server-sent-events stream over a WebSocket: each event's data (one
    JSON document) as one text message; comments (keep-alives) are dropped, the
    WebSocket's own pings keep it alive. Ends when either side does: the stream
    (the daemon stops, a subscriber fell behind: close code 1001, the client
    resumes with ``since``) or the client."""
    await ws.accept()

    async def pump() -> None:
        async for chunk in chunks:
            for line in chunk.split(b"\n"):
                if line.startswith(b"data: "):
                    await ws.send_text(line[6:].decode())

    async def watch() -> None:
        while (await ws.receive())["type"] != "websocket.disconnect":
            pass  # the client sends nothing we need

    sender, watcher = asyncio.ensure_future(pump()), asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (sender, watcher):
            t.cancel()
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()  # its finally: the subscription closed
    if sender in done and watcher not in done:
        with contextlib.suppress(Exception):
            await ws.close(code=1001, reason="stream ended")


#: task kinds whose object is a domain name (the others name volumes, pools...)
_DOMAIN_TASKS = frozenset({"save", "snapshot", "clone", "start", "restore", "migrate"})


def _event_visible(m: Manager, who: auth.Principal, ev: dict[str, Any]) -> bool:
    if ev.get("kind") != "domain":
        return False
    seen = auth.visible_names(m, who)
    return seen is None or ev.get("object") in seen


def _visible_events(m: Manager, seen: set[str], limit: int, kind: str | None,
                    obj: str | None) -> list[dict[str, Any]]:
    """The last ``limit`` events about the domains in ``seen``."""
    if (kind is not None and kind != "domain") or (obj is not None and obj not in seen):
        return []
    names = sorted(seen if obj is None else {obj})
    if not names:
        return []
    marks = ",".join("?" * len(names))
    with m.store.read() as db:
        rows = db.execute(f"SELECT * FROM events WHERE kind = 'domain' AND object IN "
                          f"({marks}) ORDER BY id DESC LIMIT ?", (*names, limit)).fetchall()
    return [dict(row) for row in reversed(rows)]


async def _refuse_ws(ws: WebSocket, status: int, body: dict[str, Any]) -> None:
    """Refuse a console before the handshake: a real HTTP error where the server
    can send one, else a close code 4000 + status with the message as reason."""
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(JSONResponse(body, status_code=status))
        return
    await ws.accept()
    reason = body["error"]["message"].encode()[:120].decode(errors="ignore")
    await ws.close(code=4000 + status, reason=reason)


#: console output arriving within this many seconds of a first byte goes in one frame
COALESCE_S = 0.005


async def _relay(ws: WebSocket, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
    """Bytes both ways until either side closes; then both are closed."""

    async def to_vm() -> None:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            data = msg.get("bytes")
            if data is None:
                data = (msg.get("text") or "").encode()
            if data:
                writer.write(data)
                await writer.drain()

    async def to_client() -> None:
        # A serial console arrives a byte or a few at a time (one UART write each):
        # waking up and sending a frame for each cost the daemon ~20-60 us a time,
        # 16k times per boot, enough to slow the guest on a small host (start ->
        # ready line 1.17x pyvirt run's). So after each frame the socket is left
        # unread for COALESCE_S: what arrives meanwhile waits in the kernel and is
        # the next frame, one wake-up later (the first byte is never delayed).
        transport = cast(asyncio.ReadTransport, writer.transport)  # a Unix socket's
        while True:
            data = await reader.read(65536)
            if not data:
                return
            await ws.send_bytes(data)
            transport.pause_reading()
            await asyncio.sleep(COALESCE_S)
            transport.resume_reading()

    tasks = [asyncio.create_task(to_vm()), asyncio.create_task(to_client())]
    try:
        _done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, OSError,
                                     RuntimeError):
                await t
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
            await ws.close()
