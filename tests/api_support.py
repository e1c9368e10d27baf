"""Helpers for the control API tests: a fake ``VmControl``, a server on a real
event loop thread, raw-socket HTTP, and the OpenAPI response checker every
answer a test receives goes through."""

from __future__ import annotations

import contextlib
import json
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h11
import httpx
import jsonschema
import referencing
import referencing.jsonschema

from pyvirt import __version__
from pyvirt.api import openapi
from pyvirt.api.client import VmClient, unix_transport
from pyvirt.api.server import ApiLimits, ApiServer
from pyvirt.errors import PyvirtError, UserInputError
from pyvirt.eventloop import EventLoop
from pyvirt.vmm.control import MetricFamily, VmState, refuse_unless

_DOC_URI = "urn:pyvirt:openapi"


class FakeControl:
    """The VmControl protocol over a bare state machine (the real one is the
    lead's Machine; the API layer is pure logic on top of it)."""

    def __init__(self, state: VmState = VmState.RUNNING) -> None:
        self.state = state
        self.calls: list[str] = []
        self.threads: set[int] = set()
        self.fail_with: BaseException | None = None
        self.delay = 0.0
        self.families: list[MetricFamily] | None = None

    def _enter(self, name: str) -> None:
        self.calls.append(name)
        self.threads.add(threading.get_ident())
        if self.delay:
            time.sleep(self.delay)
        if self.fail_with is not None:
            raise self.fail_with

    def info(self) -> dict[str, object]:
        self._enter("info")
        return {"state": self.state.value, "uptime_s": 12.5, "backend": "emu",
                "pyvirt_version": __version__, "boot_count": 1,
                "config": {"cpus": 1, "memory": 512 << 20, "kernel": Path("/boot/vmlinuz"),
                           "disks": [{"path": "/tmp/d.img", "readonly": False}]}}

    def _act(self, name: str, action: str, new: VmState | None) -> None:
        self._enter(name)
        refuse_unless(action, self.state)
        if new is not None:
            self.state = new

    def pause(self) -> None:
        self._act("pause", "pause", VmState.PAUSED)

    def resume(self) -> None:
        self._act("resume", "resume", VmState.RUNNING)

    def power_button(self) -> None:
        self._act("power_button", "power-button", None)

    def reset(self) -> None:
        self._act("reset", "reset", None)

    def ctrl_alt_del(self) -> None:
        self._act("ctrl_alt_del", "ctrl-alt-del", None)

    def force_stop(self) -> None:
        self._act("force_stop", "force-stop", VmState.STOPPED)

    def snapshot(self, path: str) -> dict[str, object]:
        self._enter("snapshot")
        refuse_unless("snapshot", self.state)
        if Path(path).exists():
            raise UserInputError(f"snapshot path {path}: already exists")
        if not Path(path).parent.is_dir():
            raise PyvirtError(f"snapshot {path}: cannot write: No such file or directory")
        return {"path": path, "memory_bytes_written": 64 << 20, "seconds": 0.25}

    def disk_overlay(self, disk: int, path: str) -> dict[str, object]:
        self._enter("disk_overlay")
        refuse_unless("disk-overlay", self.state)
        if disk != 0:
            raise UserInputError(f"disk: the VM has no disk {disk} (0 to 0)")
        if Path(path).exists():
            raise UserInputError(f"path: {path} exists")
        return {"disk": disk, "path": path, "backing": "/tmp/d.img"}

    def set_nic_link(self, nic: int, up: bool) -> None:
        self._enter("set_nic_link")
        refuse_unless("nic-link", self.state)
        if nic != 0:
            raise UserInputError(f"nic: the VM has no NIC {nic} (0 to 0)")

    def metrics(self) -> list[MetricFamily]:
        self._enter("metrics")
        if self.families is not None:
            return self.families
        return [
            MetricFamily("pyvirt_vcpu_exits_total", "counter", "vCPU exits by kind",
                         [({"vcpu": "0", "kind": "io"}, 1234), ({"vcpu": "0", "kind": "mmio"}, 7)]),
            MetricFamily("pyvirt_device_bytes_read_total", "counter",
                         'Bytes read by a device\\ "quoted"\nsecond line',
                         [({"device": 'vda "root"\\\n'}, 4096.0)]),
            MetricFamily("pyvirt_uptime_seconds", "gauge", "Seconds since start", [({}, 12.5)]),
            MetricFamily("pyvirt_vm_state", "gauge", "1 for the current state",
                         [({"state": s.value}, float(s is self.state)) for s in VmState]),
        ]


def short_tmpdir() -> Path:
    # a Unix socket path must fit in 107 bytes: pytest's tmp_path can be longer
    return Path(tempfile.mkdtemp(prefix="pv-api-", dir="/tmp"))


@contextlib.contextmanager
def serving(control: FakeControl | None = None, limits: ApiLimits | None = None,
            path: Path | None = None) -> Iterator[ApiServer]:
    """An ApiServer on an EventLoop run by a thread (as the VMM's main thread
    runs it); stopped, then closed, on exit."""
    d = short_tmpdir() if path is None else None
    sock_path = path if path is not None else d / "api.sock"  # type: ignore[operator]
    loop = EventLoop("api-test")
    server = ApiServer(sock_path, control or FakeControl(), loop, limits=limits)
    stop = threading.Event()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            loop.run_until(stop.is_set, tick=0.05)
        except BaseException as exc:
            failures.append(exc)

    t = threading.Thread(target=run, name="api-loop", daemon=True)
    t.start()
    try:
        yield server
    finally:
        stop.set()
        loop.wake()
        t.join(10)
        assert not t.is_alive(), "the event loop thread did not stop"
        server.close()
        loop.close()
        if d is not None:
            with contextlib.suppress(OSError):
                d.rmdir()
    assert not failures, failures


# ---- checking answers against the OpenAPI document

def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


class OpenApiChecker:
    """Validates one answer against the document: the operation (path +
    method) and status must be documented (or be one of the answers any
    request may get), the content type listed, the body valid for its schema,
    the documented headers present."""

    def __init__(self) -> None:
        self.doc = openapi.document()
        resource = referencing.Resource.from_contents(
            self.doc, default_specification=referencing.jsonschema.DRAFT202012)
        self.registry: referencing.Registry[Any] = referencing.Registry().with_resource(
            _DOC_URI, resource)
        self.seen: Counter[tuple[str, str, int]] = Counter()
        self._validators: dict[str, jsonschema.Draft202012Validator] = {}

    def _at(self, pointer: str) -> Any:
        node: Any = self.doc
        for token in pointer.lstrip("/").split("/"):
            node = node[_unescape(token)]
        return node

    def _resolve(self, pointer: str) -> tuple[Any, str]:
        node = self._at(pointer)
        while isinstance(node, dict) and "$ref" in node:
            pointer = node["$ref"].removeprefix("#")
            node = self._at(pointer)
        return node, pointer

    def check(self, method: str | None, path: str | None, status: int,
              headers: dict[str, str], body: bytes) -> None:
        op = self.doc["paths"].get(path or "", {}).get((method or "").lower())
        if op is not None and str(status) in op["responses"]:
            pointer = f"/paths/{_escape(path or '')}/{(method or '').lower()}/responses/{status}"
        else:
            assert str(status) in self.doc["x-any-request-responses"], (
                f"{method} {path} -> {status} is not in the OpenAPI document")
            pointer = f"/x-any-request-responses/{status}"
        resp, pointer = self._resolve(pointer)
        for name in resp.get("headers", {}):
            assert name.lower() in headers, f"{status}: header {name} missing"
        content = resp.get("content")
        if method == "HEAD":  # the answer to HEAD has the headers but never a body
            assert body == b""
            return
        if content is None:
            assert body == b"", f"{status} must have no body, got {body[:100]!r}"
            return
        ctype = headers.get("content-type", "").split(";")[0].strip()
        assert ctype in content, f"{method} {path} -> {status}: content type {ctype!r}"
        instance = json.loads(body) if ctype == "application/json" else body.decode()
        schema_ref = f"{_DOC_URI}#{pointer}/content/{_escape(ctype)}/schema"
        validator = self._validators.get(schema_ref)
        if validator is None:
            validator = jsonschema.Draft202012Validator({"$ref": schema_ref},
                                                        registry=self.registry)
            self._validators[schema_ref] = validator
        validator.validate(instance)
        self.seen[(method or "-", path or "-", status)] += 1

    def hook(self, response: httpx.Response) -> None:
        response.read()
        req = response.request
        self.check(req.method, req.url.path, response.status_code,
                   {k.lower(): v for k, v in response.headers.items()}, response.content)


CHECKER = OpenApiChecker()


def checked_client(path: Path | str, **kw: Any) -> VmClient:
    """A VmClient whose every answer goes through the OpenAPI checker."""
    vm = VmClient(path, **kw)
    vm._http = httpx.Client(transport=unix_transport(path), base_url="http://localhost",
                            timeout=vm.timeout, trust_env=False,
                            event_hooks={"response": [CHECKER.hook]})
    return vm


# ---- raw sockets

@contextlib.contextmanager
def raw(path: Path | str, timeout: float = 5.0) -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    try:
        yield s
    finally:
        s.close()


def read_all(s: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything until the server closes (or ``timeout`` passes)."""
    s.settimeout(timeout)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = s.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def closed_within(s: socket.socket, timeout: float) -> bool:
    """Whether the server closes ``s`` (EOF or reset, no data) within ``timeout``."""
    s.settimeout(timeout)
    try:
        return s.recv(65536) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def parse_responses(data: bytes, methods: tuple[str, ...] = ()
                    ) -> list[tuple[int, dict[str, str], bytes]]:
    """The HTTP answers in ``data`` (h11 as the client side), in order; ``methods``:
    those of the requests they answer, where known (an answer to HEAD has no body),
    GET for the rest."""
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(data)
    conn.receive_data(b"")
    out: list[tuple[int, dict[str, str], bytes]] = []
    status, headers, body = 0, {}, bytearray()
    asked = iter(methods)

    def ask() -> None:  # h11's client side parses answers to requests it sent
        conn.send(h11.Request(method=next(asked, "GET"), target="/", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())

    ask()
    while True:
        try:
            ev = conn.next_event()
        except h11.RemoteProtocolError:
            break
        if isinstance(ev, h11.Response):
            status = ev.status_code
            headers = {k.decode().lower(): v.decode() for k, v in ev.headers}
            body = bytearray()
        elif isinstance(ev, h11.Data):
            body += ev.data
        elif isinstance(ev, h11.EndOfMessage):
            out.append((status, headers, bytes(body)))
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
                ask()
            else:
                break
        else:
            break
    return out


def raw_exchange(path: Path | str, data: bytes, *, method: str | None = None,
                 target: str | None = None, ops: list[tuple[str, str]] | None = None,
                 timeout: float = 5.0,
                 shut: bool = True) -> list[tuple[int, dict[str, str], bytes]]:
    """Send ``data``, half-close, read the answers and check each against the
    document (``method``/``target``, or ``ops`` for several pipelined
    requests, name the operation where it is known)."""
    with raw(path, timeout) as s:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
            if shut:
                s.shutdown(socket.SHUT_WR)
        answers = parse_responses(read_all(s, timeout))
    for i, (status, headers, body) in enumerate(answers):
        m, t = ops[i] if ops and i < len(ops) else (method, target)
        CHECKER.check(m, t, status, headers, body)
    return answers
