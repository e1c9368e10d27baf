"""pyvirt.Client against the real API app (a fake Manager behind it) served by
uvicorn on a Unix socket and on TCP + TLS: calls, error mapping, keep-alive,
events, tasks, uploads, consoles, and the transports' failures."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from pyvirt.client import Client, ClientError, ConnectionFailed, TaskFailed, default_uri
from pyvirt.manager.api import make_app, require_token
from pyvirt.manager.paths import DaemonPaths
from tests.unit.test_manager_api import DOMAIN, EVENT, SUMMARY, TASK, FakeManager, echo_console


class Served:
    """The API app served by uvicorn on a thread (its own event loop)."""

    def __init__(self, app: Any, **config: Any) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_config=None,
                                                    ws="websockets-sansio", **config))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()),
                                       daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def tmp() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="pv", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def fake() -> FakeManager:
    return FakeManager()


@pytest.fixture
def uds(tmp: Path, fake: FakeManager) -> Iterator[str]:
    path = tmp / "d.sock"
    with Served(make_app(fake), uds=str(path), timeout_keep_alive=1):
        yield f"unix://{path}"


def test_calls_and_answers(uds: str, fake: FakeManager) -> None:
    with Client(uds) as c:
        assert c.version()["api_version"] == 1
        assert c.list_domains() == [SUMMARY]
        assert c.list_domains(all=False) == [SUMMARY]
        assert c.define({"name": "web1"})["uuid"] == DOMAIN["uuid"]
        assert c.domain("web1")["name"] == "web1"
        assert c.start("web1", paused=True)["state"] == "running"
        assert c.shutdown("web1", timeout=5) is None
        c.destroy("web1")
        assert c.save("web1") == 7
        assert c.snapshot_create("web1", "s1") == 8
        c.set_autostart("web1", True)
        c.undefine("web1", remove_storage=True)
        assert c.vol_create("default", "a", 1 << 20, "raw") == 9
        c.net_set_autostart("default", False)
        c.managedsave_remove("web1")
        c.pool_set_autostart("default", False)
        assert c.event_log(kind="domain")[0] == EVENT
        assert c.task(7)["state"] == "running"
    assert fake.calls == [
        ("list_domains", (), {"all": True}), ("list_domains", (), {"all": False}),
        ("define", ({"name": "web1"},), {}), ("get", ("web1",), {}),
        ("start", ("web1",), {"paused": True}), ("shutdown", ("web1",), {"timeout": 5.0}),
        ("destroy", ("web1",), {}), ("save", ("web1", None), {}),
        ("snapshot_create", ("web1", "s1", ""), {}), ("set_autostart", ("web1", True), {}),
        ("undefine", ("web1",), {"remove_storage": True, "keep_snapshots": False}),
        ("storage.vol_create", ("default", "a", 1 << 20, "raw"),
         {"backing": None, "prealloc": False}),
        ("networks.set_autostart", ("default", False), {}),
        ("managed_save_remove", ("web1",), {}),
        ("storage.pool_info", ("default",), {}),
        ("storage.pool_define", ({"name": "default", "type": "dir", "path": "/p",
                                  "autostart": False},), {}),
        ("events.recent", (), {"limit": 100, "kind": "domain", "obj": None}),
        ("tasks.get", (7,), {})]


def test_names_are_quoted_into_the_path(uds: str, fake: FakeManager) -> None:
    with Client(uds) as c, pytest.raises(ClientError) as exc:
        c.domain("a/../b")
    assert exc.value.status == 404  # one path segment that names no route: not ../b
    assert fake.calls == []


@pytest.mark.parametrize(("name", "status", "code", "exit_status"), [
    ("missing", 404, "not-found", 2), ("running", 409, "operation-invalid", 2),
    ("badfield", 400, "invalid-argument", 2), ("broken", 500, "operation-failed", 1),
    ("slow", 504, "timeout", 1), ("bug", 500, "internal-error", 1),
])
def test_errors_become_client_errors(uds: str, name: str, status: int, code: str,
                                     exit_status: int) -> None:
    with Client(uds) as c, pytest.raises(ClientError) as exc:
        c.start(name)
    e = exc.value
    assert (e.status, e.code, e.exit_status) == (status, code, exit_status)
    assert "\n" not in str(e)
    if name == "badfield":
        assert e.field == "memory" and str(e) == "memory: must be positive"


def test_missing_socket_and_not_a_daemon(tmp: Path) -> None:
    path = tmp / "none.sock"
    with pytest.raises(ConnectionFailed) as exc:
        Client(f"unix://{path}").list_domains()
    assert str(exc.value) == (f"cannot connect to the daemon at unix://{path}: "
                              "no such file (is pyvirtd running?)")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(tmp / "dead.sock"))  # bound, never listening: refused
    with pytest.raises(ConnectionFailed, match="connection refused"):
        Client(f"unix://{tmp}/dead.sock").list_domains()
    dead.close()


@pytest.mark.parametrize(("uri", "message"), [
    ("http://host", "the scheme must be unix, ssh or https"),
    ("unix://relative", "expected unix:///path/to/pyvirtd.sock"),
    ("ssh:///x", "no host"),
    ("ssh://h?bogus=1", "unknown parameter 'bogus'"),
    ("https://h:99999", "bad port"),
    ("https://h?ca=/nonexistent/ca.pem", "CA file /nonexistent/ca.pem: no such file"),
])
def test_bad_uris(uri: str, message: str) -> None:
    with pytest.raises(ConnectionFailed) as exc:
        Client(uri)
    assert message in str(exc.value)


def test_default_uri_is_the_daemons_default_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYVIRT_URI", raising=False)
    assert default_uri() == f"unix://{DaemonPaths.default().socket}"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert default_uri() == f"unix://{DaemonPaths.default().socket}"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_uri() == f"unix://{DaemonPaths.default().socket}"
    monkeypatch.setenv("PYVIRT_URI", "ssh://h")
    assert default_uri() == "ssh://h" and Client().uri == "ssh://h"


def test_keep_alive_and_an_idle_connection_closed_by_the_daemon(uds: str) -> None:
    with Client(uds) as c:
        c.list_domains()
        first = c._conn
        assert first is not None and first.sock is not None
        c.list_domains()
        assert c._conn is first  # the same connection
        time.sleep(1.6)  # the server's keep-alive timeout (1 s) closes it
        assert c.list_domains() == [SUMMARY]  # sent again on a new connection
        assert c._conn is not first


def test_events_stream(uds: str, fake: FakeManager) -> None:
    with Client(uds) as c:
        got = list(c.events(since=0))
    assert [e["id"] for e in got] == [1, 2]
    assert got[0] == EVENT
    assert ("events.subscribe", (0,), {}) in fake.calls


class Progress(FakeManager):
    def __init__(self, fail: bool) -> None:
        super().__init__()
        self.states = [{**TASK, "progress": 0.0}, {**TASK, "progress": 0.5},
                       {**TASK, "progress": 0.5},
                       {**TASK, "state": "failed", "error": "disk full"} if fail
                       else {**TASK, "state": "done", "progress": 1.0, "result": {"ok": 1}}]
        outer = self

        class Tasks:
            def get(self, tid: int) -> dict[str, Any]:
                return outer.states.pop(0) if len(outer.states) > 1 else outer.states[0]

        self.tasks = Tasks()  # type: ignore[assignment]


@pytest.mark.parametrize("fail", [False, True])
def test_wait_task(tmp: Path, fail: bool) -> None:
    path = tmp / "d.sock"
    seen: list[float] = []
    with Served(make_app(Progress(fail)), uds=str(path)), Client(f"unix://{path}") as c:
        if fail:
            with pytest.raises(TaskFailed, match=r"^disk full$") as exc:
                c.wait_task(7, on_progress=lambda t: seen.append(t["progress"]))
            assert exc.value.exit_status == 1
        else:
            t = c.wait_task(7, on_progress=lambda t: seen.append(t["progress"]))
            assert t["state"] == "done" and t["result"] == {"ok": 1}
    assert seen[:2] == [0.0, 0.5] and len(seen) == 3  # one call per change


def test_upload_streams_a_file(uds: str, fake: FakeManager, tmp: Path) -> None:
    data = os.urandom(3 << 20)
    (tmp / "img").write_bytes(data)
    with Client(uds) as c, open(tmp / "img", "rb") as f:
        assert c.vol_upload("default", "a.qcow2", f)["uploaded"] == len(data)
        # a stream of unknown length goes chunked
        assert c.vol_upload("default", "b", io.BufferedReader(io.BytesIO(data)))  # type: ignore[arg-type]
    assert fake.calls[0] == ("storage.vol_upload", ("default", "a.qcow2", len(data), len(data)),
                             {})
    assert fake.calls[1] == ("storage.vol_upload", ("default", "b", len(data), None), {})


def test_console(tmp: Path) -> None:
    with echo_console() as console:
        path = tmp / "d.sock"
        with Served(make_app(FakeManager(console=console)), uds=str(path)), \
                Client(f"unix://{path}") as c:
            ws = c.console("web1")
            assert ws.recv(5) == b"login: "
            ws.send(b"root\r")
            assert ws.recv(5) == b"ROOT\r"
            ws.close()
            with pytest.raises(ClientError) as exc:
                c.console("missing")
            assert exc.value.status == 404 and exc.value.code == "not-found"


def _cert(tmp: Path) -> tuple[Path, Path]:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    "/CN=pyvirt-test", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(tmp / "key.pem"), "-out", str(tmp / "cert.pem")],
                   check=True, capture_output=True)
    return tmp / "cert.pem", tmp / "key.pem"


def test_https_with_a_token(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with echo_console() as console:
        _https_with_a_token(tmp, FakeManager(console=console), monkeypatch)


def _https_with_a_token(tmp: Path, fake: FakeManager, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = _cert(tmp)
    (tmp / "token").write_text("s3cret-token-0123456789\n")
    with socket.socket() as s:  # a free loopback port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("PYVIRT_TOKEN", raising=False)
    app = require_token(make_app(fake), "s3cret-token-0123456789")
    with Served(app, host="127.0.0.1", port=port, ssl_certfile=str(cert), ssl_keyfile=str(key)):
        base = f"https://127.0.0.1:{port}?ca={cert}"
        with Client(f"{base}&token_file={tmp}/token") as c:
            assert c.list_domains() == [SUMMARY]
        for token in (None, "wrong"):
            if token:
                monkeypatch.setenv("PYVIRT_TOKEN", token)
            with Client(base) as c, pytest.raises(ClientError) as exc:
                c.list_domains()
            assert exc.value.status == 401 and exc.value.code == "unauthorized"
            with Client(base) as c, pytest.raises(ClientError) as exc:
                c.console("web1")
            assert exc.value.status == 401
        monkeypatch.setenv("PYVIRT_TOKEN", "s3cret-token-0123456789")
        with Client(base) as c:
            assert c.domain("web1")["name"] == "web1"
            with c.console("web1") as ws:  # wss:// with the token
                assert ws.recv(5) == b"login: "
        with Client(f"https://127.0.0.1:{port}") as c, pytest.raises(ConnectionFailed) as e:
            c.list_domains()  # the self-signed certificate is not trusted without ?ca=
        assert "certificate" in str(e.value)
    assert [name for name, *_ in fake.calls] == ["list_domains", "get", "console_path"]


def test_ssh_failure_is_ssh_s_own_last_line(tmp: Path) -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = Client(f"ssh://root@127.0.0.1:{port}/x.sock?no_verify=1", timeout=10)
    tunnel = c._tunnel
    assert tunnel is not None
    assert "-p" in tunnel.argv and str(port) in tunnel.argv
    assert oct(os.stat(tunnel.dir).st_mode & 0o777) == "0o700"
    with pytest.raises(ConnectionFailed) as exc:
        c.list_domains()
    assert str(exc.value).startswith(f"cannot connect to the daemon at ssh://root@127.0.0.1:"
                                     f"{port}/x.sock?no_verify=1: ssh: connect to host")
    assert "Connection refused" in str(exc.value)
    assert not os.path.exists(tunnel.dir)  # the private directory went with ssh


def test_ssh_argv() -> None:
    c = Client("ssh://alice@example.org:2222/srv/p.sock?keyfile=/k&known_hosts=/kh")
    t = c._tunnel
    assert t is not None
    argv = t.argv
    assert argv[:2] == ["ssh", "-N"]
    assert "ExitOnForwardFailure=yes" in argv and "BatchMode=yes" in argv
    assert argv[argv.index("-p") + 1] == "2222" and argv[argv.index("-i") + 1] == "/k"
    assert "UserKnownHostsFile=/kh" in argv and "StrictHostKeyChecking=yes" in argv
    assert argv[-4:] == ["-L", f"{t.local}:/srv/p.sock", "--", "alice@example.org"]
    c.close()
    assert not os.path.exists(t.dir)
    c = Client("ssh://host")
    assert c._tunnel is not None and c._tunnel.argv[-3].endswith(":/run/pyvirt/pyvirtd.sock")
    c.close()


def test_import_pyvirt_client_stays_light() -> None:
    heavy = ("fastapi", "pydantic", "starlette", "uvicorn", "websockets", "httpx", "anyio",
             "sqlite3", "click")
    code = ("import sys, pyvirt; assert 'pyvirt.client' not in sys.modules; "
            "from pyvirt import Client; import pyvirt.client; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_idle_client_close_is_idempotent(uds: str) -> None:
    c = Client(uds)
    c.close()
    c.close()
    with contextlib.closing(Client(uds)) as c2:
        assert c2.list_domains() == [SUMMARY]


def test_real_daemon_stale_socket_kill_restart_and_sigterm(tmp: Path) -> None:
    """``pyvirt daemon`` (no VMs): after a SIGKILL its socket and pid file are left
    behind; the next daemon replaces them, and SIGTERM ends it within the grace
    time even while an event stream is open, removing both."""
    sock, pidfile = tmp / "run" / "pyvirtd.sock", tmp / "run" / "pyvirtd.pid"
    argv = [sys.executable, "-m", "pyvirt", "daemon", "--root", str(tmp), "--no-networks"]

    def start() -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=open(tmp / "log", "ab"))  # noqa: SIM115
        deadline = time.monotonic() + 60
        while True:
            assert p.poll() is None, (tmp / "log").read_text()
            with contextlib.suppress(ConnectionFailed), Client(f"unix://{sock}") as c:
                c.version()
                return p
            assert time.monotonic() < deadline, "the daemon did not answer"
            time.sleep(0.1)

    first = start()
    assert pidfile.read_text().strip() == str(first.pid)
    first.kill()
    first.wait()
    assert sock.exists() and pidfile.exists()  # what SIGKILL leaves
    second = start()
    assert pidfile.read_text().strip() == str(second.pid)
    events: list[dict[str, Any]] = []
    with Client(f"unix://{sock}") as c:
        c.define({"name": "idle1", "memory": "64M"})
        stream = threading.Thread(target=lambda: events.extend(c.events(since=0)), daemon=True)
        stream.start()
        wait = time.monotonic() + 30
        while not any(e["event"] == "defined" and e["object"] == "idle1" for e in events):
            assert time.monotonic() < wait
            time.sleep(0.05)
        began = time.monotonic()
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
        assert time.monotonic() - began < 15
        stream.join(10)
        assert not stream.is_alive()  # the stream ended with the daemon
    assert not sock.exists() and not pidfile.exists()
    log = (tmp / "log").read_text()
    assert "Traceback" not in log, log
    assert "pyvirtd stopping (VMs keep running)" in log
