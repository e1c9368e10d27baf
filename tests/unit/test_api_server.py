"""The control API end to end over its real socket: every endpoint through the
typed client (httpx) and raw HTTP, every answer validated against the OpenAPI
document; the socket file's life; the document's agreement with the server."""

from __future__ import annotations

import logging
import os
import socket
import stat
import threading
from pathlib import Path

import jsonschema
import pytest

from pyvirt.api import _routes, openapi
from pyvirt.api.client import ApiConnectionError, ApiError, VmClient
from pyvirt.api.server import ApiServer, ApiSocketError
from pyvirt.errors import PyvirtError, UserInputError
from pyvirt.eventloop import EventLoop
from pyvirt.vmm.control import ActionRefused, MetricFamily, VmState
from tests.api_support import (
    CHECKER,
    FakeControl,
    checked_client,
    raw_exchange,
    serving,
    short_tmpdir,
)


def test_every_endpoint_through_the_client() -> None:
    ctl = FakeControl()
    with serving(ctl) as srv, checked_client(srv.path) as vm:
        info = vm.info()
        assert info["state"] == "running" and info["backend"] == "emu"
        assert info["config"]["kernel"] == "/boot/vmlinuz"  # a Path, sent as a string
        vm.power_button()
        vm.ctrl_alt_del()
        vm.reset()
        vm.pause()
        assert vm.info()["state"] == "paused"
        snap = short_tmpdir()
        res = vm.snapshot(snap / "s1")
        assert res == {"path": str(snap / "s1"), "memory_bytes_written": 64 << 20,
                       "seconds": 0.25}
        vm.reset()  # legal while paused
        vm.set_nic_link(0, False)  # legal while paused too
        vm.resume()
        vm.set_nic_link(0, True)
        with pytest.raises(ApiError) as bad:
            vm.set_nic_link(3, True)
        assert bad.value.status == 400 and "no NIC 3" in str(bad.value)
        m = vm.metrics()
        assert m.get("pyvirt_vcpu_exits_total", kind="io") == 1234
        assert m.get("pyvirt_device_bytes_read_total", device='vda "root"\\\n') == 4096
        assert m.get("pyvirt_vm_state", state="running") == 1
        assert m.get("pyvirt_nothing") is None
        assert vm.version() == {"pyvirt_version": "0.1.0", "api_version": openapi.API_VERSION}
        assert vm.openapi() == openapi.document()
        vm.stop()
        assert vm.info()["state"] == "stopped"
        # one keep-alive connection carried all of it
        assert len(srv.connections) == 1
        snap.rmdir()
    assert ctl.calls == ["info", "power_button", "ctrl_alt_del", "reset", "pause", "info",
                         "snapshot", "reset", "set_nic_link", "resume", "set_nic_link",
                         "set_nic_link", "metrics", "force_stop", "info"]
    # VmControl is only ever called on the event loop's thread
    assert len(ctl.threads) == 1 and threading.get_ident() not in ctl.threads


@pytest.mark.parametrize(("state", "call", "message"), [
    (VmState.RUNNING, "resume", "resume: the VM is not paused"),
    (VmState.PAUSED, "pause", "pause: the VM is already paused"),
    (VmState.PAUSED, "power_button", "power-button: the VM is paused; resume it first"),
    (VmState.STOPPED, "ctrl_alt_del", "ctrl-alt-del: the VM is stopped"),
    (VmState.STOPPED, "stop", "force-stop: the VM is stopped"),
    (VmState.RUNNING, "snapshot", "snapshot: the VM is running; pause it first"),
])
def test_an_illegal_action_is_409_and_changes_nothing(state: VmState, call: str,
                                                      message: str) -> None:
    ctl = FakeControl(state)
    with serving(ctl) as srv, checked_client(srv.path) as vm:
        args = ("/tmp/pv-never",) if call == "snapshot" else ()
        with pytest.raises(ApiError) as err:
            getattr(vm, call)(*args)
        assert err.value.status == 409 and err.value.exit_status == 2
        assert str(err.value).startswith(message)
        assert vm.info()["state"] == state.value


def test_error_statuses_from_the_controller(caplog: pytest.LogCaptureFixture) -> None:
    ctl = FakeControl(VmState.PAUSED)
    with serving(ctl) as srv, checked_client(srv.path) as vm:
        with pytest.raises(ApiError) as err:
            vm.snapshot("/")  # the server's own check
        assert err.value.status == 400 and "must be an absolute path" in str(err.value)
        existing = short_tmpdir()
        with pytest.raises(ApiError) as err:
            vm.snapshot(existing)  # UserInputError from the controller -> 400
        assert err.value.status == 400 and "already exists" in str(err.value)
        with pytest.raises(ApiError) as err:  # another PyvirtError -> 500, its message
            vm.snapshot("/nonexistent-dir-pv/snap")
        assert err.value.status == 500 and err.value.exit_status == 1
        assert "cannot write: No such file or directory" in str(err.value)
        existing.rmdir()

        ctl.fail_with = RuntimeError("secret internals")
        with caplog.at_level(logging.ERROR, logger="pyvirt.api.server"), \
                pytest.raises(ApiError) as err:
            vm.pause()
        assert err.value.status == 500
        assert "secret" not in str(err.value)
        assert str(err.value) == "PUT /vm/pause: internal error in the VMM (see its log)"
        assert "secret internals" in caplog.text and "Traceback" in caplog.text

        ctl.fail_with = None
        ctl.families = [MetricFamily("bad name", "gauge", "", [({}, 1)])]
        with pytest.raises(ApiError) as err:
            vm.metrics()
        assert err.value.status == 500
        ctl.families = None
        assert vm.metrics().get("pyvirt_uptime_seconds") == 12.5  # and it goes on serving


def test_json_bodies_are_strict() -> None:
    ctl = FakeControl(VmState.PAUSED)
    with serving(ctl) as srv, checked_client(srv.path) as vm:
        def put(path: str, body: bytes, ctype: str = "application/json") -> tuple[int, str]:
            try:
                r = vm._client().put(path, content=body, headers={"content-type": ctype})
            except ApiError as exc:  # pragma: no cover - _client() does not raise
                return exc.status, exc.fault_message
            return r.status_code, r.json()["fault_message"] if r.content else ""

        assert put("/vm/snapshot", b'{"path": "/a/b", "paht": 1}') == (
            400, "PUT /vm/snapshot: unknown field `paht`")
        assert put("/vm/snapshot", b'{"path": 7}') == (
            400, "PUT /vm/snapshot: path: expected `str`, got `int`")
        assert put("/vm/snapshot", b"{}") == (400, "PUT /vm/snapshot: missing field `path`")
        assert put("/vm/snapshot", b"[]")[0] == 400
        assert put("/vm/snapshot", b"")[1] == "PUT /vm/snapshot needs a JSON body"
        assert put("/vm/snapshot", b'{"path": "relative/dir"}')[0] == 400
        assert put("/vm/snapshot", b'{"path": "/a\\u0000b"}') == (
            400, "path: contains a NUL character")
        assert put("/vm/snapshot", b'{"path": "/' + b"a" * 5000 + b'"}')[0] == 400
        assert put("/vm/snapshot", b'{"path": "/x"', )[1].startswith(
            "PUT /vm/snapshot: the body is not valid JSON")
        assert put("/vm/snapshot", b"\xff\xfe")[0] == 400
        assert put("/vm/nic-link", b'{"nic": 0, "up": "yes"}') == (
            400, "PUT /vm/nic-link: up: expected `bool`, got `str`")
        assert put("/vm/nic-link", b'{"nic": -1, "up": true}') == (
            400, "nic: -1 is not a NIC index")
        assert put("/vm/nic-link", b'{"up": true}') == (
            400, "PUT /vm/nic-link: missing field `nic`")
        assert put("/vm/resume", b'{"now": true}') == (400, "PUT /vm/resume: unknown field `now`")
        assert put("/vm/resume", b'{"path": "/x"}', "text/plain") == (
            415, "PUT /vm/resume: the body must be application/json (not text/plain)")
        assert put("/vm/resume", b"{}", "application/json; charset=utf-8") == (204, "")
        assert ctl.calls == ["resume"]  # nothing else reached the controller
        r = vm._client().request("GET", "/vm", content=b"{}",
                                 headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["fault_message"] == "GET /vm takes no request body"


def test_unknown_paths_and_methods() -> None:
    with serving() as srv, checked_client(srv.path) as vm:
        c = vm._client()
        r = c.get("/vm/pause")
        assert r.status_code == 405 and r.headers["allow"] == "PUT"
        assert r.json()["fault_message"] == "GET is not allowed on /vm/pause (only PUT)"
        assert c.delete("/vm").headers["allow"] == "GET"
        assert c.request("HEAD", "/metrics").status_code == 405
        r = c.get("/nope/../vm")
        assert r.status_code in (200, 404)  # httpx normalises the dot segments
        r = c.get("/api/v1/vm.info")
        assert r.status_code == 404 and r.json()["fault_message"] == "no such path: /api/v1/vm.info"
        assert c.get("/vm?verbose=1").status_code == 200  # a query string is ignored
        with pytest.raises(ApiError) as err:
            vm.request("GET", "/" + "x" * 1000)
        assert err.value.status == 404 and len(err.value.fault_message) < 300


def test_every_documented_answer_is_served() -> None:
    """Each (path, method, status) of the document, provoked for real; the table
    must cover the whole document, so a new status cannot be documented and
    never tested (nor served and never documented: the checker)."""
    json_h = "Content-Type: application/json\r\n"

    def req(method: str, path: str, body: bytes = b"", headers: str = json_h) -> bytes:
        return (f"{method} {path} HTTP/1.1\r\nHost: x\r\n{headers if body else ''}"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    snapdir = short_tmpdir()
    cases: dict[tuple[str, str, str], tuple[FakeControl, bytes]] = {}
    broken = FakeControl()
    broken.fail_with = RuntimeError("x")
    doc = openapi.document()
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            m = method.upper()
            for status in op["responses"]:
                ctl = FakeControl(VmState.PAUSED if path in ("/vm/snapshot", "/vm/resume",
                                                             "/vm/disk-overlay")
                                  else VmState.RUNNING)
                body = (b'{"path": "%s/new"}' % str(snapdir).encode()
                        if path == "/vm/snapshot" else
                        b'{"disk": 0, "path": "%s/ov.qcow2"}' % str(snapdir).encode()
                        if path == "/vm/disk-overlay" else
                        b'{"nic": 0, "up": false}' if path == "/vm/nic-link" else b"")
                if status in ("200", "204"):
                    data = req(m, path, body)
                elif status == "400":
                    data = req(m, path, b'{"bogus": 1}')
                elif status == "409":
                    ctl = FakeControl(VmState.STOPPED)
                    data = req(m, path, body)
                elif status == "415":
                    data = req(m, path, b"{}", "Content-Type: text/plain\r\n")
                elif status == "500":
                    ctl = broken
                    data = req(m, path, body)
                else:  # pragma: no cover - the table must grow with the document
                    raise AssertionError(f"no case for {m} {path} -> {status}")
                cases[(m, path, status)] = (ctl, data)
    for (m, path, status), (ctl, data) in cases.items():
        with serving(ctl) as srv:
            answers = raw_exchange(srv.path, data, method=m, target=path)
        assert [a[0] for a in answers] == [int(status)], (m, path, status, answers)
    snapdir.rmdir()

    any_request = {
        "400": b"NOT HTTP\r\n\r\n",
        "404": b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n",
        "405": b"POST /vm HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        "411": b"PUT /vm/pause HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "413": b"PUT /vm/pause HTTP/1.1\r\nHost: x\r\nContent-Length: 65537\r\n\r\n",
        "415": req("PUT", "/vm/pause", b"{}", "Content-Type: text/json\r\n"),
        "431": b"GET /vm HTTP/1.1\r\nHost: x\r\nX-Big: " + b"y" * 17000 + b"\r\n\r\n",
        "500": b"GET /vm HTTP/1.1\r\nHost: x\r\n\r\n",
        "505": b"GET /vm HTTP/2.0\r\nHost: x\r\n\r\n",
    }
    assert set(any_request) | {"503"} == set(doc["x-any-request-responses"])
    for status, data in any_request.items():
        with serving(broken if status == "500" else FakeControl()) as srv:
            answers = raw_exchange(srv.path, data)
        assert [a[0] for a in answers] == [int(status)], (status, answers)
    # 503 (too many connections): test_api_edge.test_connections_over_the_limit_get_503


def test_the_document_matches_the_server() -> None:
    doc = openapi.document()
    assert doc["openapi"] == "3.1.0"
    documented = {(p, m.upper()) for p, ops in doc["paths"].items() for m in ops}
    served = {(p, m) for p, ms in _routes.ROUTES.items() for m in ms}
    assert documented == served
    for name, schema in doc["components"]["schemas"].items():
        jsonschema.Draft202012Validator.check_schema(schema), name
    # every $ref resolves
    def refs(node: object) -> list[str]:
        if isinstance(node, dict):
            return [v for k, v in node.items() if k == "$ref"] + [
                r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []
    for ref in refs(doc):
        CHECKER._resolve(ref.removeprefix("#"))
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))
    import json
    assert json.loads(openapi.document_json()) == doc


def test_the_document_is_valid_openapi_3_1() -> None:
    from openapi_spec_validator import validate

    validate(openapi.document())


def test_the_checker_catches_an_undocumented_answer() -> None:
    # the checker itself must be able to fail
    with pytest.raises(AssertionError, match="not in the OpenAPI document"):
        CHECKER.check("GET", "/vm", 418, {}, b"")
    with pytest.raises(jsonschema.ValidationError):
        CHECKER.check("GET", "/vm", 200, {"content-type": "application/json"},
                      b'{"state": "sleeping"}')
    with pytest.raises(jsonschema.ValidationError):
        CHECKER.check("PUT", "/vm/pause", 409, {"content-type": "application/json"},
                      b'{"fault_message": "x", "extra": 1}')
    with pytest.raises(AssertionError, match="header Allow missing"):
        CHECKER.check("POST", "/vm", 405, {"content-type": "application/json"},
                      b'{"fault_message": "x"}')


# ---- the socket file


def test_socket_is_0600_whatever_the_umask() -> None:
    old = os.umask(0)
    try:
        with serving() as srv:
            assert stat.S_IMODE(os.stat(srv.path).st_mode) == 0o600
            assert stat.S_ISSOCK(os.stat(srv.path).st_mode)
    finally:
        os.umask(old)


def test_close_removes_the_socket_but_not_a_replacement() -> None:
    d = short_tmpdir()
    path = d / "api.sock"
    loop = EventLoop("t")
    srv = ApiServer(path, FakeControl(), loop)
    srv.close()
    assert not path.exists()
    srv.close()  # twice is fine
    srv = ApiServer(path, FakeControl(), loop)
    path.unlink()
    path.write_text("someone else's")
    srv.close()
    assert path.read_text() == "someone else's"
    path.unlink()
    loop.close()
    d.rmdir()


def test_a_stale_socket_is_replaced() -> None:
    d = short_tmpdir()
    path = d / "api.sock"
    old = socket.socket(socket.AF_UNIX)
    old.bind(str(path))
    old.close()  # the file stays: a VMM that died
    with serving(path=path) as srv, checked_client(srv.path) as vm:
        assert vm.info()["state"] == "running"
    assert not path.exists()
    d.rmdir()


@pytest.mark.parametrize("what", ["file", "dir", "live", "long", "nodir"])
def test_unusable_socket_paths_are_refused(what: str) -> None:
    d = short_tmpdir()
    path = d / "api.sock"
    live = None
    if what == "file":
        path.write_text("keep me")
        msg = "exists and is not a socket"
    elif what == "dir":
        path.mkdir()
        msg = "exists and is not a socket"
    elif what == "live":
        live = socket.socket(socket.AF_UNIX)
        live.bind(str(path))
        live.listen(1)
        msg = "another process is listening on it"
    elif what == "long":
        path = d / ("x" * 120)
        msg = "longer than 107 bytes"
    else:
        path = d / "missing" / "api.sock"
        msg = "cannot create the socket: No such file or directory"
    loop = EventLoop("t")
    with pytest.raises(ApiSocketError, match=msg) as err:
        ApiServer(path, FakeControl(), loop)
    assert isinstance(err.value, UserInputError) and err.value.exit_status == 2
    assert str(err.value).startswith(f"api_socket {path}: ")
    assert loop.registrations() == []
    if what == "file":
        assert path.read_text() == "keep me"
        path.unlink()
    elif what == "dir":
        path.rmdir()
    elif what == "live":
        assert live is not None
        live.close()
        path.unlink()
    loop.close()
    d.rmdir()


# ---- the client's own errors


def test_client_connection_errors() -> None:
    d = short_tmpdir()
    with pytest.raises(ApiConnectionError, match=r"cannot connect to .*: no such file$"):
        VmClient(d / "nope.sock").info()
    (d / "file").write_text("")
    with pytest.raises(ApiConnectionError, match=r": not a socket$"):
        VmClient(d / "file").pause()
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(d / "dead.sock"))
    s.close()
    with pytest.raises(ApiConnectionError, match="connection refused"):
        VmClient(d / "dead.sock").info()
    # a listener that never answers: the timeout
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(d / "mute.sock"))
    s.listen(1)
    with pytest.raises(ApiConnectionError, match="timed out"):
        VmClient(d / "mute.sock", timeout=0.3).info()
    s.close()
    for f in d.iterdir():
        f.unlink()
    d.rmdir()
    assert ApiConnectionError("x").exit_status == 1
    assert issubclass(ApiError, PyvirtError) and issubclass(ActionRefused, PyvirtError)
    assert ApiError(503, "x").exit_status == 1 and ApiError(404, "x").exit_status == 2


def test_api_modules_stay_off_the_boot_path() -> None:
    """Creating the server imports neither h11 nor msgspec nor httpx: they load
    with the first connection (server) or request (client)."""
    import subprocess
    import sys

    code = (
        "import sys, tempfile, pathlib\n"
        "from pyvirt.eventloop import EventLoop\n"
        "from pyvirt.api.server import ApiServer\n"
        "class C: pass\n"
        "d = pathlib.Path(tempfile.mkdtemp(dir='/tmp'))\n"
        "s = ApiServer(d / 's', C(), EventLoop())\n"
        "s.close(); d.rmdir()\n"
        "print(sorted(m for m in ('h11', 'msgspec', 'httpx', 'jsonschema') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
