"""The API's monitoring, clone and device routes (docs/manager-api.md):
``GET /v1/host``, ``GET /v1/metrics/history``, ``GET /v1/metrics/stream`` (SSE),
``POST /v1/domains/{name}/clone``, ``.../disks``, ``.../disks/{index}[/resize]``,
``.../interfaces[/{index}]``.

Who may see which domain is decided once (``auth.visible_names``); a domain
path the principal may not see is refused before these routes run (the auth
middleware's path check), so here only lists are filtered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, WebSocket
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from pyvirt.manager import auth
from pyvirt.manager.monitor import QUEUE

if TYPE_CHECKING:
    from pyvirt.manager.manager import Manager
    from pyvirt.manager.monitor import MonitorSubscription

__all__ = ["add_monitor_routes"]

log = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class DomainCloneBody(_Strict):
    name: str = Field(min_length=1, max_length=255)
    description: str | None = Field(default=None, max_length=4096)


class DiskAddBody(_Strict):
    pool: str = Field(min_length=1, max_length=128)
    volume: str | None = Field(default=None, min_length=1, max_length=128)
    size_bytes: int | None = Field(default=None, gt=0, le=1 << 55)
    format: Literal["qcow2", "raw"] = "qcow2"


class DiskResizeBody(_Strict):
    size_bytes: int = Field(gt=0, le=1 << 55)


class IfaceAddBody(_Strict):
    network: str = Field(min_length=1, max_length=64)
    mac: str | None = Field(default=None, min_length=1, max_length=32)
    model: Literal["virtio"] | None = None


class _Open(BaseModel):
    """Documented answers: the fields listed are always there; more may be."""

    model_config = ConfigDict(extra="allow")


class HostDisk(_Open):
    path: str
    total_bytes: int
    free_bytes: int


class HostLimits(_Open):
    max_vcpus: int
    max_memory_mib: int
    #: the backend accel "auto" gives this daemon's VMs (kvm or emu), and why
    accel_auto: str
    accel_auto_reason: str
    #: the vCPUs a VM may have with each accel (auto, kvm, emu); 0: not available
    max_vcpus_by_accel: dict[str, int]


class HostInfo(_Open):
    hostname: str
    cpus: int
    memory_bytes: int
    memory_available_bytes: int
    disk: HostDisk
    limits: HostLimits
    domains: dict[str, int]
    load: list[float]
    uptime_s: float


class HostSample(_Open):
    t: float
    cpu: float
    mem_used: int
    mem_total: int
    disk_used: int
    disk_total: int


class DomainSample(_Open):
    t: float
    cpu: float
    rss: int
    disk_rd: float
    disk_wr: float
    net_rx: float
    net_tx: float


class MetricsHistory(_Open):
    interval_s: float
    host: list[HostSample]
    domains: dict[str, list[DomainSample]]


class DiskAdded(_Open):
    index: int
    applies: Literal["now", "next-start"]


class IfaceAdded(_Open):
    index: int
    mac: str
    applies: Literal["now", "next-start"]


Name = Annotated[str, Field(min_length=1, max_length=255)]
Index = Annotated[int, Field(ge=0, le=63)]
DomainQuery = Annotated[str | None, Query(min_length=1, max_length=255)]


def add_monitor_routes(r: APIRouter, manager: Manager, *,
                       closers: set[Callable[[], None]] | None = None,
                       keepalive_s: float = 15.0) -> None:
    """Add the routes to ``r`` (before make_app includes it). ``closers``: make_app's
    set of what ends each open stream when the daemon stops."""
    from pyvirt.manager.api import TaskRef  # loaded by now: make_app calls this

    m = manager
    ends = closers if closers is not None else set()
    t202: dict[int | str, dict[str, Any]] = {
        202: {"model": TaskRef, "description": "Started as a task"}}

    def visible(request: Request) -> set[str] | None:
        return auth.visible_names(m, auth.principal_of(request))

    # -- monitoring
    @r.get("/v1/host", response_model=None, responses={200: {"model": HostInfo}})
    def host(request: Request) -> Any:
        return m.host_info(visible(request))

    @r.get("/v1/metrics/history", response_model=None,
           responses={200: {"model": MetricsHistory}})
    def metrics_history(request: Request, domain: DomainQuery = None) -> Any:
        names = visible(request)
        if domain is not None and names is not None and domain not in names:
            from pyvirt.manager.errors import NotFound

            raise NotFound(f"domain '{domain}' not found")  # as a missing one: no leak
        return m.metrics_history(names, domain)

    @r.get("/v1/metrics/stream", response_class=StreamingResponse,
           responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                            "description": "Server-sent events: one `data: FRAME` per "
                                           "sampling pass; comments as keep-alives"}})
    async def metrics_stream(request: Request) -> StreamingResponse:
        principal = auth.principal_of(request)
        sub = m.monitor.subscribe()
        return StreamingResponse(
            _frames(sub, lambda: auth.visible_names(m, principal), keepalive_s, ends),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    @r.websocket("/v1/metrics/stream")
    async def metrics_stream_ws(ws: WebSocket) -> None:
        from pyvirt.manager.api import sse_over_websocket

        principal = auth.principal_of(ws)
        sub = m.monitor.subscribe()
        await sse_over_websocket(
            ws, _frames(sub, lambda: auth.visible_names(m, principal), keepalive_s, ends))

    # -- clone
    @r.post("/v1/domains/{name}/clone", status_code=202, response_model=None, responses=t202)
    def clone(name: Name, body: DomainCloneBody, request: Request) -> JSONResponse:
        principal = auth.principal_of(request)

        def on_defined(new: str) -> None:  # the clone is its creator's (A's grant hook)
            auth.grant_on_create(m, principal, new)

        tid = m.clone(name, body.name, body.description, allow_paths=principal.admin,
                      on_defined=on_defined)
        return JSONResponse({"task": tid}, status_code=202,
                            headers={"location": f"/v1/tasks/{tid}"})

    # -- disks and NICs
    @r.post("/v1/domains/{name}/disks", status_code=201, response_model=None,
            responses={201: {"model": DiskAdded}})
    def disk_add(name: Name, body: DiskAddBody) -> Any:
        if body.volume is not None and body.size_bytes is not None:
            from pyvirt.manager.errors import InvalidArgument

            raise InvalidArgument("give either volume (an existing one) or size_bytes "
                                  "(a new one), not both", "size_bytes")
        return JSONResponse(m.disk_add(name, pool=body.pool, volume=body.volume,
                                       size_bytes=body.size_bytes, format=body.format),
                            status_code=201)

    @r.delete("/v1/domains/{name}/disks/{index}", status_code=204, response_class=Response)
    def disk_remove(name: Name, index: Index, remove_storage: bool = False) -> None:
        m.disk_remove(name, index, remove_storage=remove_storage)

    @r.post("/v1/domains/{name}/disks/{index}/resize", status_code=204,
            response_class=Response)
    def disk_resize(name: Name, index: Index, body: DiskResizeBody, request: Request) -> None:
        m.disk_resize(name, index, body.size_bytes,
                      allow_paths=auth.principal_of(request).admin)

    @r.post("/v1/domains/{name}/interfaces", status_code=201, response_model=None,
            responses={201: {"model": IfaceAdded}})
    def iface_add(name: Name, body: IfaceAddBody) -> Any:
        return JSONResponse(m.iface_add(name, network=body.network, mac=body.mac,
                                        model=body.model), status_code=201)

    @r.delete("/v1/domains/{name}/interfaces/{index}", status_code=204,
              response_class=Response)
    def iface_remove(name: Name, index: Index) -> None:
        m.iface_remove(name, index)


async def _frames(sub: MonitorSubscription, names: Callable[[], set[str] | None],
                  keepalive_s: float, closers: set[Callable[[], None]]
                  ) -> AsyncIterator[bytes]:
    """Frames of ``sub`` as SSE, each filtered to the domains ``names()`` allows
    (asked per frame: a grant or revoke shows at the next one). As api._sse: a
    plain thread waits on the subscription and filters (it may read the
    database), the loop only writes."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()
    stop = threading.Event()

    def offer(chunk: bytes) -> None:
        # on the loop: a client that does not read its frames is dropped, not buffered
        if queue.qsize() >= QUEUE:
            stop.set()
            queue.put_nowait(None)
        else:
            queue.put_nowait(chunk)

    def pump() -> None:
        try:
            while not stop.is_set():
                frame = sub.get(timeout=0.5)
                if frame is None:
                    if sub.closed:
                        break
                    continue
                allowed = names()
                doms = frame["domains"] if allowed is None else {
                    k: v for k, v in frame["domains"].items() if k in allowed}
                data = json.dumps({"t": frame["t"], "host": frame["host"], "domains": doms},
                                  separators=(",", ":"))
                loop.call_soon_threadsafe(offer, f"data: {data}\n\n".encode())
        except Exception:
            log.exception("metrics subscription failed")
        finally:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=pump, name="sse-metrics", daemon=True).start()

    def end() -> None:
        queue.put_nowait(None)

    closers.add(end)
    try:
        yield b": pyvirtd metrics\n\n"
        while True:
            try:
                chunk = await asyncio.wait_for(queue.get(), keepalive_s)
            except TimeoutError:
                yield b": keep-alive\n\n"
                continue
            if chunk is None:
                return
            yield chunk
    finally:
        closers.discard(end)
        stop.set()
        with contextlib.suppress(Exception):
            sub.close()
