"""The management API (pyvirt.manager.api) against a fake Manager: every route,
every error shape, the OpenAPI document validated and every answer checked
against it; events as SSE, consoles as WebSockets, uploads streamed."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import jsonschema
import pytest
from fastapi.routing import APIRoute
from openapi_spec_validator import validate as validate_spec
from starlette.routing import WebSocketRoute

with warnings.catch_warnings():  # Starlette >= 1.x would rather have httpx2
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient, WebSocketDenialResponse

from pyvirt.manager import errors
from pyvirt.manager.api import DEFINITION_LIMIT, make_app, require_token

DOMAIN = {"id": 3, "name": "web1", "uuid": "6f1c2d3e-0000-4000-8000-000000000001",
          "state": "running", "reason": "booted", "autostart": False, "description": "",
          "definition": {"name": "web1"}, "memory": 536870912, "cpus": 1}
SUMMARY = {k: DOMAIN[k] for k in ("id", "name", "uuid", "state", "reason", "autostart",
                                  "description")}
TASK = {"id": 7, "kind": "save", "object": "web1", "state": "running", "progress": 0.5,
        "message": "", "error": None, "result": None, "created": 1.0, "finished": None}
EVENT = {"id": 1, "time": 1.0, "kind": "domain", "object": "web1", "event": "started",
         "detail": "booted"}
POOL = {"name": "default", "uuid": "u", "state": "active", "autostart": True, "path": "/p",
        "capacity": 1, "allocation": 0, "available": 1}
VOL = {"name": "a.qcow2", "pool": "default", "path": "/p/a.qcow2", "format": "qcow2",
       "capacity": 1 << 30, "allocation": 0, "backing": None}
NET = {"name": "default", "mode": "nat", "bridge": "pyvirt0", "ipv4": "192.168.124.1/24",
       "dhcp": {"start": "192.168.124.2", "end": "192.168.124.254"}, "autostart": True}

#: the name that makes any fake method raise the error mapped here
FAILURES: dict[str, BaseException] = {
    "missing": errors.NotFound("domain 'missing' not found"),
    "running": errors.OperationInvalid("domain is already running"),
    "dup": errors.AlreadyExists("domain 'dup' already exists"),
    "slow": errors.OperationTimeout("domain 'slow' did not shut down within 60 s"),
    "broken": errors.OperationFailed("start of 'broken' failed: no kernel"),
    "badfield": errors.InvalidArgument("must be positive", field="memory"),
    "bug": RuntimeError("a bug"),
}


class Recorder:
    """Methods that record their calls and answer from ``returns``; a first
    argument named in FAILURES raises that error instead."""

    def __init__(self, prefix: str, calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]],
                 returns: dict[str, Any]) -> None:
        self._prefix, self._calls, self._returns = prefix, calls, returns

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):
            raise AttributeError(attr)

        def method(*args: Any, **kwargs: Any) -> Any:
            self._calls.append((self._prefix + attr, args, kwargs))
            if args and isinstance(args[0], str) and args[0] in FAILURES:
                raise FAILURES[args[0]]
            return self._returns.get(attr)

        return method


class FakeSub:
    def __init__(self, events: list[dict[str, Any]], idle: int = 0) -> None:
        self._events = list(events)
        self._idle = idle
        self.closed = False

    def get(self, timeout: float) -> dict[str, Any] | None:
        if self._idle:
            self._idle -= 1
            threading.Event().wait(min(timeout, 0.05))
            return None
        if self._events:
            return self._events.pop(0)
        self.closed = True
        return None

    def close(self) -> None:
        self.closed = True


class FakeEvents:
    def __init__(self, calls: list[Any]) -> None:
        self.calls = calls
        self.next_sub = FakeSub([EVENT, {**EVENT, "id": 2, "event": "stopped"}])

    def subscribe(self, since: int | None = None) -> FakeSub:
        self.calls.append(("events.subscribe", (since,), {}))
        return self.next_sub

    def recent(self, limit: int = 100, kind: str | None = None,
               obj: str | None = None) -> list[dict[str, Any]]:
        self.calls.append(("events.recent", (), {"limit": limit, "kind": kind, "obj": obj}))
        return [EVENT]


class FakeStorage(Recorder):
    def vol_upload(self, pool: str, name: str, stream: Any, length: int | None) -> dict[str, Any]:
        data = b""
        while chunk := stream.read(65536):
            data += chunk
        self._calls.append(("storage.vol_upload", (pool, name, len(data), length), {}))
        if pool in FAILURES:
            raise FAILURES[pool]
        return {**VOL, "name": name, "uploaded": len(data)}


class FakeManager(Recorder):
    """What the API needs of pyvirt.manager.manager.Manager."""

    paths = None

    def __init__(self, console: Path | None = None) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        super().__init__("", self.calls, {
            "list_domains": [SUMMARY], "define": DOMAIN, "get": DOMAIN, "start": DOMAIN,
            "save": 7, "restore": DOMAIN, "stats": {"state": "running", "cpu_time_s": 1.5},
            "block_list": [{"target": "vda", "source": "/p/a", "format": "raw",
                            "readonly": False}],
            "iface_list": [{"interface": "-", "type": "user", "source": "", "model": "virtio",
                            "mac": "52:54:00:00:00:01"}],
            "snapshot_create": 8, "clone": 12,
            "host_info": {"hostname": "h", "cpus": 2, "memory_bytes": 1 << 30,
                          "memory_available_bytes": 1 << 29,
                          "disk": {"path": "/p", "total_bytes": 1, "free_bytes": 1},
                          "limits": {"max_vcpus": 2, "max_memory_mib": 512,
                                     "accel_auto": "emu", "accel_auto_reason": "no /dev/kvm",
                                     "max_vcpus_by_accel": {"auto": 1, "kvm": 0, "emu": 1}},
                          "domains": {"running": 1}, "load": [0.1, 0.2, 0.3],
                          "uptime_s": 5.0},
            "metrics_history": {"interval_s": 2, "host": [], "domains": {}},
            "disk_add": {"index": 1, "applies": "now"},
            "iface_add": {"index": 0, "mac": "52:54:00:00:00:02", "applies": "next-start"},
            "snapshot_list": [{"name": "s1", "parent": None, "created": 1.0,
                               "state": "running", "description": "", "current": True,
                               "memory": True}]})
        self.storage = FakeStorage("storage.", self.calls, {
            "pool_list": [POOL], "pool_define": POOL, "pool_info": POOL, "vol_list": [VOL],
            "vol_info": VOL, "vol_create": 9, "vol_clone": 10, "vol_import": 11})
        self.networks = Recorder("networks.", self.calls, {
            "list": [NET], "define": NET, "info": NET,
            "leases": [{"mac": "52:54:00:00:00:01", "ip": "192.168.124.5", "hostname": "g",
                        "expires": 2.0}]})
        self.tasks = Recorder("tasks.", self.calls, {"list": [TASK], "get": TASK})
        self.events = FakeEvents(self.calls)
        self.console = console

    def console_path(self, name: str) -> Path:
        self.calls.append(("console_path", (name,), {}))
        if name in FAILURES:
            raise FAILURES[name]
        assert self.console is not None
        return self.console


@pytest.fixture
def fake() -> FakeManager:
    return FakeManager()


@pytest.fixture
def client(fake: FakeManager) -> Iterator[TestClient]:
    with TestClient(make_app(fake, uri="unix:///run/pyvirt/pyvirtd.sock"),
                    raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    doc = make_app(FakeManager()).openapi()
    validate_spec(doc)
    return doc


def check_against_spec(spec: dict[str, Any], method: str, url: str, status: int,
                       body: Any) -> None:
    """The answer's status is documented for the route and its JSON body matches
    the documented schema."""
    path = url.split("?", 1)[0]
    for template, ops in spec["paths"].items():
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        if re.match(pattern, path) and method.lower() in ops:
            op = ops[method.lower()]
            break
    else:
        raise AssertionError(f"{method} {path} is not in the OpenAPI document")
    assert str(status) in op["responses"], f"{method} {path}: {status} is not documented"
    content = op["responses"][str(status)].get("content", {})
    if status == 204:
        assert body is None
        return
    schema = content.get("application/json", {}).get("schema")
    assert schema is not None, f"{method} {path} {status}: no JSON schema documented"
    jsonschema.Draft202012Validator({**schema, "components": spec["components"]}).validate(body)


def call(client: TestClient, spec: dict[str, Any], method: str, url: str,
         **kwargs: Any) -> tuple[int, Any]:
    r = client.request(method, url, **kwargs)
    body = r.json() if r.content else None
    check_against_spec(spec, method, url, r.status_code, body)
    return r.status_code, body


# (method, url, json body, status, the Manager call it makes)
ROUTES: list[tuple[str, str, Any, int, tuple[str, tuple[Any, ...], dict[str, Any]]]] = [
    ("GET", "/v1/domains", None, 200, ("list_domains", (), {"all": True})),
    ("GET", "/v1/domains?all=false", None, 200, ("list_domains", (), {"all": False})),
    ("POST", "/v1/domains", {"name": "web1", "memory": "512M"}, 201,
     ("define", ({"name": "web1", "memory": "512M"},), {})),
    ("PUT", "/v1/domains/web1", {"memory": "1G"}, 200,
     ("define", ({"memory": "1G", "name": "web1"},), {})),
    ("GET", "/v1/domains/web1", None, 200, ("get", ("web1",), {})),
    ("DELETE", "/v1/domains/web1?remove_storage=true", None, 204,
     ("undefine", ("web1",), {"remove_storage": True, "keep_snapshots": False})),
    ("POST", "/v1/domains/web1/start", {"paused": True}, 200,
     ("start", ("web1",), {"paused": True})),
    ("POST", "/v1/domains/web1/start", None, 200, ("start", ("web1",), {"paused": False})),
    ("POST", "/v1/domains/web1/shutdown", {"timeout": 5}, 204,
     ("shutdown", ("web1",), {"timeout": 5.0})),
    ("POST", "/v1/domains/web1/destroy", None, 204, ("destroy", ("web1",), {})),
    ("POST", "/v1/domains/web1/reboot", None, 204, ("reboot", ("web1",), {})),
    ("POST", "/v1/domains/web1/reset", None, 204, ("reset", ("web1",), {})),
    ("POST", "/v1/domains/web1/suspend", None, 204, ("suspend", ("web1",), {})),
    ("POST", "/v1/domains/web1/resume", None, 204, ("resume", ("web1",), {})),
    ("POST", "/v1/domains/web1/save", {"path": "/srv/s"}, 202, ("save", ("web1", "/srv/s"), {})),
    ("POST", "/v1/domains/web1/save", None, 202, ("save", ("web1", None), {})),
    ("POST", "/v1/restore", {"path": "/srv/s"}, 200, ("restore", ("/srv/s",), {})),
    ("DELETE", "/v1/domains/web1/managed-save", None, 204,
     ("managed_save_remove", ("web1",), {})),
    ("PUT", "/v1/domains/web1/autostart", {"enabled": True}, 204,
     ("set_autostart", ("web1", True), {})),
    ("GET", "/v1/domains/web1/stats", None, 200, ("stats", ("web1",), {})),
    ("GET", "/v1/domains/web1/disks", None, 200, ("block_list", ("web1",), {})),
    ("GET", "/v1/domains/web1/interfaces", None, 200, ("iface_list", ("web1",), {})),
    ("GET", "/v1/domains/web1/snapshots", None, 200, ("snapshot_list", ("web1",), {})),
    ("POST", "/v1/domains/web1/snapshots", {"name": "s1", "description": "d"}, 202,
     ("snapshot_create", ("web1", "s1", "d"), {})),
    ("POST", "/v1/domains/web1/snapshots/s1/revert", None, 204,
     ("snapshot_revert", ("web1", "s1"), {})),
    ("DELETE", "/v1/domains/web1/snapshots/s1", None, 204,
     ("snapshot_delete", ("web1", "s1"), {})),
    ("GET", "/v1/pools", None, 200, ("storage.pool_list", (), {})),
    ("POST", "/v1/pools", {"name": "p2", "path": "/srv/p2"}, 201,
     ("storage.pool_define", ({"name": "p2", "path": "/srv/p2"},), {})),
    ("GET", "/v1/pools/default", None, 200, ("storage.pool_info", ("default",), {})),
    ("DELETE", "/v1/pools/p2", None, 204, ("storage.pool_undefine", ("p2",), {})),
    ("POST", "/v1/pools/p2/start", None, 204, ("storage.pool_start", ("p2",), {})),
    ("POST", "/v1/pools/p2/stop", None, 204, ("storage.pool_stop", ("p2",), {})),
    ("POST", "/v1/pools/p2/refresh", None, 204, ("storage.pool_refresh", ("p2",), {})),
    ("GET", "/v1/pools/default/volumes", None, 200, ("storage.vol_list", ("default",), {})),
    ("POST", "/v1/pools/default/volumes", {"name": "a.qcow2", "capacity": 1 << 30}, 202,
     ("storage.vol_create", ("default", "a.qcow2", 1 << 30, "qcow2"),
      {"backing": None, "prealloc": False})),
    ("GET", "/v1/pools/default/volumes/a.qcow2", None, 200,
     ("storage.vol_info", ("default", "a.qcow2"), {})),
    ("DELETE", "/v1/pools/default/volumes/a.qcow2", None, 204,
     ("storage.vol_delete", ("default", "a.qcow2"), {})),
    ("POST", "/v1/pools/default/volumes/a.qcow2/resize", {"capacity": 2 << 30}, 204,
     ("storage.vol_resize", ("default", "a.qcow2", 2 << 30), {})),
    ("POST", "/v1/pools/default/volumes/a.qcow2/clone", {"name": "b", "mode": "copy"}, 202,
     ("storage.vol_clone", ("default", "a.qcow2", "b"), {"mode": "copy"})),
    ("POST", "/v1/pools/default/import", {"name": "c", "source": "/srv/c.img"}, 202,
     ("storage.vol_import", ("default", "c", "/srv/c.img"), {"format": None, "mode": "copy"})),
    ("GET", "/v1/networks", None, 200, ("networks.list", (), {})),
    ("POST", "/v1/networks", {"name": "n2", "mode": "isolated"}, 201,
     ("networks.define", ({"name": "n2", "mode": "isolated"},), {})),
    ("GET", "/v1/networks/default", None, 200, ("networks.info", ("default",), {})),
    ("DELETE", "/v1/networks/n2", None, 204, ("networks.undefine", ("n2",), {})),
    ("POST", "/v1/networks/n2/start", None, 204, ("networks.start", ("n2",), {})),
    ("POST", "/v1/networks/n2/stop", None, 204, ("networks.stop", ("n2",), {})),
    ("PUT", "/v1/networks/n2/autostart", {"enabled": False}, 204,
     ("networks.set_autostart", ("n2", False), {})),
    ("GET", "/v1/networks/default/leases", None, 200, ("networks.leases", ("default",), {})),
    ("GET", "/v1/tasks?active=true", None, 200, ("tasks.list", (), {"active_only": True})),
    ("GET", "/v1/tasks/7", None, 200, ("tasks.get", (7,), {})),
    ("GET", "/v1/events/log?limit=5&kind=domain&object=web1", None, 200,
     ("events.recent", (), {"limit": 5, "kind": "domain", "obj": "web1"})),
    ("GET", "/v1/version", None, 200, ("", (), {})),
    # monitoring, clone, disks and NICs (api_monitor.py; more in test_monitor_api.py)
    ("GET", "/v1/host", None, 200, ("host_info", (None,), {})),
    ("GET", "/v1/metrics/history?domain=web1", None, 200,
     ("metrics_history", (None, "web1"), {})),
    ("POST", "/v1/domains/web1/clone", {"name": "web2"}, 202,
     ("clone", ("web1", "web2", None), {"allow_paths": True, "on_defined": ANY})),
    ("POST", "/v1/domains/web1/disks", {"pool": "default", "size_bytes": 1 << 30}, 201,
     ("disk_add", ("web1",), {"pool": "default", "volume": None, "size_bytes": 1 << 30,
                              "format": "qcow2"})),
    ("DELETE", "/v1/domains/web1/disks/1?remove_storage=true", None, 204,
     ("disk_remove", ("web1", 1), {"remove_storage": True})),
    ("POST", "/v1/domains/web1/disks/0/resize", {"size_bytes": 2 << 30}, 204,
     ("disk_resize", ("web1", 0, 2 << 30), {"allow_paths": True})),
    ("POST", "/v1/domains/web1/interfaces", {"network": "default"}, 201,
     ("iface_add", ("web1",), {"network": "default", "mac": None, "model": None})),
    ("DELETE", "/v1/domains/web1/interfaces/0", None, 204, ("iface_remove", ("web1", 0), {})),
]


@pytest.mark.parametrize(("method", "url", "body", "status", "expect"), ROUTES,
                         ids=[f"{m} {u}" for m, u, *_ in ROUTES])
def test_route(client: TestClient, fake: FakeManager, spec: dict[str, Any], method: str,
               url: str, body: Any, status: int,
               expect: tuple[str, tuple[Any, ...], dict[str, Any]]) -> None:
    got_status, got = call(client, spec, method, url,
                           **({"json": body} if body is not None else {}))
    assert got_status == status, got
    if expect[0]:
        assert fake.calls == [expect]
    if status == 202:
        assert isinstance(got["task"], int)


def test_every_route_is_tested(spec: dict[str, Any]) -> None:
    app = make_app(FakeManager())
    tested = {(m, re.sub(r"\?.*", "", u)) for m, u, *_ in ROUTES}
    tested |= {("PUT", "/v1/pools/default/volumes/a.qcow2/data"), ("GET", "/v1/events"),
               ("GET", "/v1/metrics/stream"),
               ("GET", "/v1/openapi.json")}
    for route in app.routes:
        if isinstance(route, WebSocketRoute):
            assert route.path == "/v1/domains/{name}/console"  # test_console_*
            continue
        if not isinstance(route, APIRoute):
            continue
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", route.path) + "$"
        for method in route.methods:
            assert any(m == method and re.match(pattern, u) for m, u in tested), \
                f"{method} {route.path} has no test"


def test_version(client: TestClient) -> None:
    v = client.get("/v1/version").json()
    assert v["api_version"] == 1 and v["uri"] == "unix:///run/pyvirt/pyvirtd.sock"
    assert v["pyvirt_version"] and v["hostname"] == socket.gethostname()


@pytest.mark.parametrize(("name", "status", "code"), [
    ("missing", 404, "not-found"), ("running", 409, "operation-invalid"),
    ("dup", 409, "already-exists"), ("slow", 504, "timeout"),
    ("broken", 500, "operation-failed"), ("badfield", 400, "invalid-argument"),
])
def test_manager_errors_keep_their_status_and_shape(client: TestClient, spec: dict[str, Any],
                                                    name: str, status: int, code: str) -> None:
    got_status, body = call(client, spec, "POST", f"/v1/domains/{name}/start")
    assert got_status == status
    assert body["error"]["code"] == code
    assert body["error"]["message"] == str(FAILURES[name])
    if name == "badfield":
        assert body["error"]["field"] == "memory"
        assert body["error"]["message"] == "memory: must be positive"


def test_unexpected_exception_is_500_internal_error_and_logged(
        client: TestClient, spec: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="pyvirt.manager.api"):
        status, body = call(client, spec, "GET", "/v1/domains/bug")
    assert status == 500
    assert body == {"error": {"code": "internal-error", "message": "internal error",
                              "field": None}}
    assert "a bug" in caplog.text  # the traceback is in the log, not in the answer


@pytest.mark.parametrize(("url", "kwargs", "field", "message"), [
    ("/v1/domains/web1/start", {"json": {"paused": True, "extra": 1}}, "extra",
     "extra: unknown field"),
    ("/v1/domains/web1/start", {"json": {"paused": "yes"}}, "paused", None),
    ("/v1/domains/web1/shutdown", {"json": {"timeout": -1}}, "timeout", None),
    ("/v1/domains/web1/shutdown", {"json": {"timeout": 1e9}}, "timeout", None),
    ("/v1/restore", {"json": {}}, "path", "path: required"),
    ("/v1/restore", {}, None, "request body: a JSON body is required"),
    ("/v1/restore", {"content": b"{not json", "headers": {"content-type": "application/json"}},
     None, "request body: not valid JSON"),
    ("/v1/domains", {"json": [1, 2]}, None, None),
    ("/v1/pools/default/volumes", {"json": {"name": "a", "capacity": "1G"}}, "capacity", None),
    ("/v1/pools/default/volumes", {"json": {"name": "a", "capacity": 1, "format": "vmdk"}},
     "format", None),
    ("/v1/pools/default/volumes/a/clone", {"json": {"name": "b", "mode": "link"}}, "mode", None),
])
def test_invalid_bodies_are_400_naming_the_field(client: TestClient, fake: FakeManager,
                                                 spec: dict[str, Any], url: str,
                                                 kwargs: dict[str, Any], field: str | None,
                                                 message: str | None) -> None:
    status, body = call(client, spec, "POST", url, **kwargs)
    assert status == 400, body
    assert body["error"]["code"] == "invalid-argument"
    assert body["error"]["field"] == field
    if field:
        assert body["error"]["message"].startswith(f"{field}: ")
    if message:
        assert body["error"]["message"] == message
    assert "\n" not in body["error"]["message"]
    assert fake.calls == []  # nothing reached the Manager


def test_invalid_query_and_path_values_are_400(client: TestClient, spec: dict[str, Any]) -> None:
    for url, field in (("/v1/events/log?limit=0", "limit"), ("/v1/events/log?limit=x", "limit"),
                       ("/v1/tasks/abc", "tid"), ("/v1/domains?all=maybe", "all")):
        status, body = call(client, spec, "GET", url)
        assert status == 400 and body["error"]["field"] == field, (url, body)


def test_put_refuses_a_definition_naming_another_domain(client: TestClient,
                                                        fake: FakeManager) -> None:
    r = client.put("/v1/domains/web1", json={"name": "web2"})
    assert r.status_code == 400
    assert r.json()["error"]["field"] == "name"
    assert r.json()["error"]["message"].startswith("name: 'web2' differs")
    assert fake.calls == []


def test_unknown_paths_and_methods_keep_the_error_shape(client: TestClient) -> None:
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not-found"
    r = client.patch("/v1/domains/web1")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method-not-allowed"


def test_body_limit(client: TestClient, fake: FakeManager) -> None:
    big = {"name": "web1", "description": "x" * DEFINITION_LIMIT}
    r = client.post("/v1/domains", json=big)
    assert r.status_code == 413
    assert r.json()["error"]["message"] == f"request body: larger than {DEFINITION_LIMIT} bytes"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while read
        for _ in range(DEFINITION_LIMIT // 65536 + 2):
            yield b" " * 65536

    r = client.post("/v1/domains", content=chunks(),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = client.put("/v1/domains/data", json=big)  # a name that ends like an upload's path
    assert r.status_code == 413
    assert fake.calls == []


def test_upload_streams_past_the_body_limit(client: TestClient, fake: FakeManager,
                                            spec: dict[str, Any]) -> None:
    data = os.urandom(DEFINITION_LIMIT * 3 + 17)
    status, body = call(client, spec, "PUT", "/v1/pools/default/volumes/a.qcow2/data",
                        content=data, headers={"content-type": "application/octet-stream"})
    assert status == 200 and body["uploaded"] == len(data)
    assert fake.calls == [("storage.vol_upload", ("default", "a.qcow2", len(data), len(data)),
                           {})]
    status, body = call(client, spec, "PUT", "/v1/pools/missing/volumes/a/data", content=b"x")
    assert status == 404


def test_openapi_document(client: TestClient, spec: dict[str, Any]) -> None:
    served = client.get("/openapi.json").json()
    validate_spec(served)
    assert served["openapi"].startswith("3.")
    assert "/v1/domains/{name}/start" in served["paths"]
    for ops in served["paths"].values():  # this API never answers FastAPI's 422
        for op in ops.values():
            assert "422" not in op["responses"]
            assert "400" in op["responses"]


def sse_events(text: str) -> list[tuple[str | None, str]]:
    out = []
    for block in text.split("\n\n"):
        ident = data = None
        for line in block.splitlines():
            if line.startswith("id: "):
                ident = line[4:]
            elif line.startswith("data: "):
                data = line[6:]
        if data is not None:
            out.append((ident, data))
    return out


def test_events_stream(client: TestClient, fake: FakeManager) -> None:
    with client.stream("GET", "/v1/events?since=0") as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    got = sse_events(text)
    assert [i for i, _ in got] == ["1", "2"]
    assert '"event":"stopped"' in got[1][1]
    assert ("events.subscribe", (0,), {}) in fake.calls
    assert fake.events.next_sub.closed


def test_events_stream_resumes_from_last_event_id(client: TestClient, fake: FakeManager) -> None:
    with client.stream("GET", "/v1/events", headers={"last-event-id": "41"}) as r:
        "".join(r.iter_text())
    assert ("events.subscribe", (41,), {}) in fake.calls


def test_events_keepalive_and_overflow_end(fake: FakeManager) -> None:
    overflow = {**EVENT, "id": 3, "kind": "daemon", "event": "overflow"}
    fake.events.next_sub = FakeSub([EVENT, overflow, EVENT], idle=6)
    with TestClient(make_app(fake, keepalive_s=0.02)) as c, c.stream("GET", "/v1/events") as r:
        text = "".join(r.iter_text())
    assert ": keep-alive" in text
    assert [i for i, _ in sse_events(text)] == ["1", "3"]  # nothing after the overflow


def test_events_over_a_websocket(fake: FakeManager) -> None:
    # the web GUI's transport: one JSON event per text message, then a close when the
    # stream ends (here: the overflow), so that the page resumes with since=
    overflow = {**EVENT, "id": 3, "kind": "daemon", "event": "overflow"}
    fake.events.next_sub = FakeSub([EVENT, overflow, EVENT], idle=6)
    with TestClient(make_app(fake, keepalive_s=0.02)) as c, \
            c.websocket_connect("/v1/events?since=7") as ws:
        first = json.loads(ws.receive_text())
        assert first["id"] == 1 and first["event"] == EVENT["event"]
        assert json.loads(ws.receive_text())["event"] == "overflow"
        msg = ws.receive()
        assert msg["type"] == "websocket.close" and msg["code"] == 1001
    assert ("events.subscribe", (7,), {}) in fake.calls
    assert fake.events.next_sub.closed


def test_events_websocket_closed_by_the_client_ends_the_subscription(
        fake: FakeManager) -> None:
    class Endless(FakeSub):  # one event, then quiet until closed
        def get(self, timeout: float) -> dict[str, Any] | None:
            if self._events:
                return self._events.pop(0)
            threading.Event().wait(min(timeout, 0.05))
            return None

    fake.events.next_sub = Endless([EVENT])
    with TestClient(make_app(fake, keepalive_s=0.02)) as c, \
            c.websocket_connect("/v1/events") as ws:
        assert json.loads(ws.receive_text())["id"] == 1
    deadline = time.monotonic() + 5
    while not fake.events.next_sub.closed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fake.events.next_sub.closed


@contextlib.contextmanager
def echo_console() -> Iterator[Path]:
    """A stand-in for the VMM's console socket: sends a banner, echoes in upper case."""
    d = tempfile.mkdtemp(prefix="pv", dir="/tmp")
    path = Path(d) / "c.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = srv.accept()
            with conn:
                conn.sendall(b"login: ")
                while data := conn.recv(4096):
                    if data == b"bye":
                        return
                    conn.sendall(data.upper())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield path
    finally:
        srv.close()
        t.join(5)
        path.unlink(missing_ok=True)
        os.rmdir(d)


def test_console_relays_bytes_both_ways() -> None:
    with echo_console() as path:
        fake = FakeManager(console=path)
        with TestClient(make_app(fake)) as c, \
                c.websocket_connect("/v1/domains/web1/console") as ws:
            assert ws.receive_bytes() == b"login: "
            ws.send_bytes(b"root\r")
            assert ws.receive_bytes() == b"ROOT\r"
            ws.send_bytes(b"bye")  # the VM side closes: so does the WebSocket
            msg = ws.receive()
            assert msg["type"] == "websocket.close"


def test_console_of_a_missing_or_stopped_domain_is_refused() -> None:
    fake = FakeManager()
    with TestClient(make_app(fake)) as c:
        for name, status, code in (("missing", 404, "not-found"),
                                   ("running", 409, "operation-invalid")):
            with pytest.raises(WebSocketDenialResponse) as exc, \
                    c.websocket_connect(f"/v1/domains/{name}/console"):
                pass
            assert exc.value.status_code == status
            assert exc.value.json()["error"]["code"] == code


def test_console_of_a_vmm_that_just_ended_is_409_not_500() -> None:
    # the VM was running when the route looked, its VMM gone when it connected
    d = tempfile.mkdtemp(prefix="pv", dir="/tmp")
    try:
        fake = FakeManager(console=Path(d) / "gone.sock")
        with TestClient(make_app(fake)) as c:
            with pytest.raises(WebSocketDenialResponse) as exc, \
                    c.websocket_connect("/v1/domains/web1/console"):
                pass
            assert exc.value.status_code == 409
            assert exc.value.json()["error"]["code"] == "operation-invalid"
            assert "is gone" in exc.value.json()["error"]["message"]
    finally:
        os.rmdir(d)


def test_token_guard() -> None:
    app = require_token(make_app(FakeManager()), "s3cret")
    with TestClient(app) as c:  # type: ignore[arg-type]
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            r = c.get("/v1/domains", headers=headers)
            assert r.status_code == 401, headers
            assert r.json()["error"]["code"] == "unauthorized"
        assert c.get("/v1/domains", headers={"authorization": "Bearer s3cret"}).status_code == 200
        with pytest.raises(WebSocketDenialResponse) as exc, \
                c.websocket_connect("/v1/domains/web1/console"):
            pass
        assert exc.value.status_code == 401


# ---------------------------------------------------------------- the daemon's arguments
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"listen": "nohost"}, "listen address 'nohost': expected HOST:PORT"),
    ({"listen": "h:99999"}, "listen address 'h:99999': expected HOST:PORT"),
    ({"listen": "127.0.0.1:8443"}, "listening on TCP needs a TLS certificate and key"),
    ({"listen": "127.0.0.1:8443", "tls_cert": Path("/etc/hostname"),
      "tls_key": Path("/etc/hostname")}, "listening on TCP needs a token file"),
    ({"listen": "127.0.0.1:8443", "tls_cert": Path("/nonexistent.crt"),
      "tls_key": Path("/etc/hostname"), "token_file": Path("/etc/hostname")},
     "TLS certificate /nonexistent.crt: no such file"),
    ({"token_file": Path("/etc/hostname")},
     "a TLS certificate, key or token file is only used with a TCP listen address"),
    ({"group": "no-such-group-pv"}, "group 'no-such-group-pv' does not exist"),
])
def test_daemon_refuses_bad_arguments_before_touching_anything(
        kwargs: dict[str, Any], message: str) -> None:
    from pyvirt.errors import UserInputError
    from pyvirt.manager.daemon import run_daemon
    from pyvirt.manager.paths import DaemonPaths

    root = Path(tempfile.mkdtemp(prefix="pv", dir="/tmp"))
    try:
        with pytest.raises(UserInputError) as exc:
            run_daemon(DaemonPaths.for_root(root), **kwargs)
        assert str(exc.value) == message
        assert list(root.iterdir()) == []  # nothing made
    finally:
        os.rmdir(root)


def test_daemon_token_file_must_be_private(tmp_path: Path) -> None:
    from pyvirt.cli.main import cli

    tok = tmp_path / "token"
    tok.write_text("0123456789abcdef0123\n")
    os.chmod(tok, 0o644)
    from click.testing import CliRunner

    r = CliRunner().invoke(cli, ["daemon", "--root", str(tmp_path / "r"), "--listen",
                                 "127.0.0.1:1", "--tls-cert", "/etc/hostname", "--tls-key",
                                 "/etc/hostname", "--token-file", str(tok)])
    assert r.exit_code == 2
    assert r.output.strip() == (f"pyvirt: error: token file {tok}: readable by other users "
                                "(chmod 600 it)")
    os.chmod(tok, 0o600)
    tok.write_text("short\n")
    r = CliRunner().invoke(cli, ["daemon", "--root", str(tmp_path / "r"), "--listen",
                                 "127.0.0.1:1", "--tls-cert", "/etc/hostname", "--tls-key",
                                 "/etc/hostname", "--token-file", str(tok)])
    assert r.exit_code == 2 and "the token must be 16 to 4096 printable" in r.output
    tok.write_text("0123456789abcdef0123\n")
    r = CliRunner().invoke(cli, ["daemon", "--root", str(tmp_path / "r"), "--listen",
                                 "127.0.0.1:1", "--tls-cert", "/etc/hostname", "--tls-key",
                                 "/etc/hostname", "--token-file", str(tok)])
    assert r.exit_code == 2
    assert r.output.strip() == ("pyvirt: error: TLS certificate /etc/hostname and key "
                                "/etc/hostname cannot be used: PEM lib")
    assert not (tmp_path / "r").exists()


def test_networks_off_is_a_clear_refusal_not_a_500() -> None:
    # `pyvirt daemon --no-networks`: the Manager has no Networks
    fake = FakeManager()
    fake.networks = None  # type: ignore[assignment]
    with TestClient(make_app(fake), raise_server_exceptions=False) as c:
        assert c.get("/v1/networks").json() == []
        r = c.post("/v1/networks", json={"name": "n1"})
        assert r.status_code == 409, r.text
        assert "--no-networks" in r.json()["error"]["message"]
        for method, path in (("GET", "/v1/networks/n1"), ("POST", "/v1/networks/n1/start"),
                             ("GET", "/v1/networks/n1/leases")):
            assert c.request(method, path).status_code == 409
