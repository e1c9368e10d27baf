"""The web listener's login, sessions, CSRF and authorisation against a real
daemon (``pyvirt daemon --web``), with httpx as the browser: no guest boots
(domains are defined, never started)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pyvirt.manager.web import STATIC_DIR
from tests.daemon_support import daemon_env, remove_root, short_root
from tests.web.support import ADMIN, ALICE, WebDaemon, api_session, define_vm, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wd() -> Iterator[WebDaemon]:
    d = WebDaemon()
    try:
        c = d.client
        define_vm(c, "secret", description="admin's own")
        define_vm(c, "shared")
        c.user_add("vic", "viewer-password-1", role="viewer")
        c.user_add("bob", "bob-password-12", role="user")
        c.user_grant("alice", "shared")
        c.user_grant("vic", "shared")
        yield d
    finally:
        d.close()


def _login(url: str, user: str, password: str, **kw: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/session", json={"user": user, "password": password},
                      timeout=60, **kw)


# ------------------------------------------------------------------ static files

def test_static_files_and_security_headers(wd: WebDaemon) -> None:
    r = httpx.get(wd.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    index = (STATIC_DIR / "index.html").read_bytes()
    inline = re.search(rb'<script type="importmap">(.*?)</script>', index, re.S)
    assert inline is not None
    digest = base64.b64encode(hashlib.sha256(inline.group(1)).digest()).decode()
    assert f"script-src 'self' 'sha256-{digest}';" in csp
    for part in ("default-src 'self'", "frame-ancestors 'none'", "base-uri 'none'",
                 "connect-src 'self'", "form-action 'self'"):
        assert part in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert "strict-transport-security" not in r.headers  # plain HTTP
    app = httpx.get(wd.url + "/static/api.js")
    assert app.headers["content-type"].startswith("text/javascript")
    assert app.headers["cache-control"] == "no-cache" and app.headers["etag"]
    again = httpx.get(wd.url + "/static/api.js", headers={"if-none-match": app.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    mjs = httpx.get(wd.url + "/static/vendor/preact/dist/preact.mjs")
    assert mjs.status_code == 200 and mjs.headers["content-type"].startswith("text/javascript")
    assert "max-age" in mjs.headers["cache-control"]
    # every answer carries the headers, the API's errors too
    api = httpx.get(wd.url + "/v1/domains")
    assert api.headers["x-content-type-options"] == "nosniff"
    assert "content-security-policy" in api.headers


@pytest.mark.parametrize("path", [
    "/static/../manager/web.py", "/static/%2e%2e/manager/web.py",
    "/static/vendor/../../manager/auth.py", "/static/vendor/%2e%2e/%2e%2e/__init__.py",
    "/static/vendor/", "/static/vendor", "/static/", "/static//etc/passwd",
    "/static/vendor/xterm/.vendored", "/static/..%2fweb.py", "/static/a%00b.js",
    "/static/vendor\\..\\..\\__init__.py", "/static/vendor/preact/../../../manager/db.py",
])
def test_static_path_escapes_are_refused(wd: WebDaemon, path: str) -> None:
    # sent as written on a socket: an HTTP client would normalise the dots away
    with socket.create_connection(("127.0.0.1", wd.port), timeout=30) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                  .encode())
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    status = answer.split(b"\r\n", 1)[0]
    assert status.split()[1] in (b"404", b"400"), (path, answer[:300])
    assert b"import" not in answer and b"def " not in answer


def test_static_refuses_writes(wd: WebDaemon) -> None:
    assert httpx.post(wd.url + "/static/api.js").status_code == 405


# ------------------------------------------------------------------ login

def test_no_session_is_401_and_version_is_open(wd: WebDaemon) -> None:
    r = httpx.get(wd.url + "/v1/domains")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthenticated"
    assert r.json()["error"]["message"] == "log in first"
    assert httpx.get(wd.url + "/v1/version").status_code == 200
    forged = httpx.get(wd.url + "/v1/domains", cookies={"pyvirt_session": "x" * 43})
    assert forged.status_code == 401


def test_wrong_password_then_throttled(wd: WebDaemon) -> None:
    wrong = _login(wd.url, "bob", "not-bobs-password")
    assert wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "bad-credentials"
    assert "set-cookie" not in wrong.headers
    unknown = _login(wd.url, "nobody", "not-bobs-password")
    assert unknown.status_code == 401 and unknown.json() == wrong.json()
    for _ in range(4):
        assert _login(wd.url, "bob", "not-bobs-password").status_code == 401
    slowed = _login(wd.url, "bob", "not-bobs-password")
    assert slowed.status_code == 429
    assert slowed.json()["error"]["code"] == "too-many-attempts"
    assert 0 < int(slowed.headers["retry-after"]) <= 300
    # even the right password waits now: the attempts are not tried at all
    assert _login(wd.url, "bob", "bob-password-12").status_code == 429
    # another user from the same address is not held up
    assert _login(wd.url, *ALICE).status_code == 200


def test_login_session_logout(wd: WebDaemon) -> None:
    r = _login(wd.url, *ALICE)
    assert r.status_code == 200
    body = r.json()
    assert body["user"] == "alice" and body["role"] == "user"
    assert body["idle_timeout_s"] == 1800 and body["expires"] > time.time() + 1700
    cookie = r.headers["set-cookie"]
    attrs = [a.strip() for a in cookie.split(";")]
    assert attrs[0].startswith("pyvirt_session=") and len(attrs[0]) > 40
    assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= set(attrs)
    assert "Secure" not in attrs  # plain HTTP on loopback
    with httpx.Client(base_url=wd.url, cookies=r.cookies) as c:
        s = c.get("/v1/session")
        assert s.status_code == 200 and s.json()["csrf"] == body["csrf"]
        assert c.get("/v1/domains").status_code == 200
        assert c.delete("/v1/session").status_code == 403  # CSRF applies to logout too
        out = c.delete("/v1/session", headers={"x-csrf-token": body["csrf"]})
        assert out.status_code == 204 and "Max-Age=0" in out.headers["set-cookie"]
    gone = httpx.get(wd.url + "/v1/domains", cookies=r.cookies)
    assert gone.status_code == 401


def test_an_open_event_stream_ends_at_logout(wd: WebDaemon) -> None:
    r = _login(wd.url, *ALICE)
    csrf = r.json()["csrf"]
    with httpx.Client(base_url=wd.url, cookies=r.cookies, timeout=30) as c, \
            c.stream("GET", "/v1/events") as stream:
        assert stream.status_code == 200
        out = httpx.delete(wd.url + "/v1/session", cookies=r.cookies,
                           headers={"x-csrf-token": csrf})
        assert out.status_code == 204
        t0 = time.monotonic()
        with contextlib.suppress(httpx.HTTPError):
            for _ in stream.iter_bytes():  # keep-alives until the daemon ends it
                assert time.monotonic() - t0 < 20, "the stream outlived its session"
        # ended within the recheck interval (5 s), not by the client's timeout
        assert time.monotonic() - t0 < 15


def test_login_body_is_checked(wd: WebDaemon) -> None:
    r = httpx.post(wd.url + "/v1/session", content=b"{nope")
    assert r.status_code == 400
    r = httpx.post(wd.url + "/v1/session", json={"user": "alice"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "password"
    r = httpx.post(wd.url + "/v1/session", content=b"x" * 100000)
    assert r.status_code == 413


# ------------------------------------------------------------------ CSRF

def test_csrf_token_and_origin(wd: WebDaemon) -> None:
    with api_session(wd.url, *ALICE) as c:
        token = c.headers.pop("x-csrf-token")
        missing = c.post("/v1/domains/shared/suspend")
        assert missing.status_code == 403 and missing.json()["error"]["code"] == "csrf"
        wrong = c.post("/v1/domains/shared/suspend", headers={"x-csrf-token": token[:-1] + "A"})
        assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "csrf"
        evil = c.post("/v1/domains/shared/suspend",
                      headers={"x-csrf-token": token, "origin": "http://evil.example"})
        assert evil.status_code == 403 and evil.json()["error"]["code"] == "csrf"
        # the right token and our own origin get through (to the Manager: not running)
        ok = c.post("/v1/domains/shared/suspend",
                    headers={"x-csrf-token": token, "origin": wd.url})
        assert ok.status_code == 409, ok.text
        # a cross-site login is refused too (login CSRF)
        assert c.post("/v1/session", json={"user": ALICE[0], "password": ALICE[1]},
                      headers={"origin": "http://evil.example"}).status_code == 403


def test_console_websocket_needs_our_origin(wd: WebDaemon) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    r = _login(wd.url, *ALICE)
    cookie = f"pyvirt_session={r.cookies['pyvirt_session']}"
    url = wd.url.replace("http", "ws") + "/v1/domains/shared/console"
    for origin in (None, "http://evil.example"):
        headers = {"cookie": cookie, **({"origin": origin} if origin else {})}
        with connect(url, additional_headers=headers, origin=None) as ws:
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=10)
            assert ws.close_code == 4403
    v = _login(wd.url, "vic", "viewer-password-1")
    headers = {"cookie": f"pyvirt_session={v.cookies['pyvirt_session']}", "origin": wd.url}
    with connect(url, additional_headers=headers) as ws:  # a viewer has no console
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.close_code == 4403
    with connect(wd.url.replace("http", "ws") + "/v1/domains/secret/console",
                 additional_headers={"cookie": cookie, "origin": wd.url}) as ws:
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.close_code == 4404  # hidden = missing


# ------------------------------------------------------------------ visibility

def test_user_sees_only_granted_domains(wd: WebDaemon) -> None:
    with api_session(wd.url, *ALICE) as c:
        names = [d["name"] for d in c.get("/v1/domains").json()]
        assert "shared" in names and "secret" not in names
        hidden = c.get("/v1/domains/secret")
        missing = c.get("/v1/domains/nosuch")
        assert hidden.status_code == missing.status_code == 404
        assert hidden.json()["error"] == {**missing.json()["error"],
                                          "message": "domain 'secret' not found"}
        uuid = wd.client.domain("secret")["uuid"]
        for path in ("/v1/domains/secret/stats", "/v1/domains/secret/snapshots",
                     f"/v1/domains/{uuid}", "/v1/domains/secret/disks"):
            assert c.get(path).status_code == 404, path
        for path in ("/v1/domains/secret/start", "/v1/domains/secret/clone"):
            assert c.post(path, json={}).status_code == 404, path
        assert c.delete("/v1/domains/secret").status_code == 404
        assert wd.client.domain("secret")["name"] == "secret"
        # admin-only places
        for method, path in (("GET", "/v1/users"), ("POST", "/v1/restore"),
                             ("POST", "/v1/pools"), ("DELETE", "/v1/users/vic"),
                             ("POST", "/v1/networks")):
            r = c.request(method, path, json={})
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", path
        assert c.get("/v1/pools").status_code == 200


def test_events_and_tasks_are_filtered(wd: WebDaemon) -> None:
    got: list[dict[str, Any]] = []
    with api_session(wd.url, *ALICE) as c:
        last = wd.client.request("GET", "/v1/events/log", query={"limit": 1})
        since = max([e["id"] for e in last] or [0])
        done = threading.Event()

        def read() -> None:
            with c.stream("GET", f"/v1/events?since={since}", timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        got.append(json.loads(line[6:]))
                        if got[-1]["object"] == "shared" and got[-1]["event"] == "defined":
                            done.set()
                            return

        t = threading.Thread(target=read, daemon=True)
        t.start()
        # events of both, the one she may see last: the stream is in order, so
        # any of the hidden one's would have come before it
        wd.client.define(wd.client.domain("secret")["definition"])
        wd.client.define(wd.client.domain("shared")["definition"])
        assert done.wait(60), got
        assert {e["object"] for e in got} == {"shared"}, got
        assert "secret" in {e["object"] for e in wd.client.event_log(limit=10)}
        log = c.get("/v1/events/log?limit=1000").json()
        assert log and {e["object"] for e in log} == {"shared"}
        assert c.get("/v1/events/log?object=secret").json() == []
        # a snapshot task of a hidden domain is not listed nor readable
        tid = wd.client.request("POST", "/v1/domains/secret/snapshots", {"name": "s1"})["task"]
        wd.client.wait_task(tid)
        assert tid not in [t["id"] for t in c.get("/v1/tasks").json()]
        assert c.get(f"/v1/tasks/{tid}").status_code == 404
        assert wd.client.task(tid)["state"] == "done"
        # a task about her own domain is
        tid2 = c.post("/v1/domains/shared/snapshots", json={"name": "s2"}).json()["task"]
        wd.client.wait_task(tid2)
        assert tid2 in [t["id"] for t in c.get("/v1/tasks").json()]
        assert c.get(f"/v1/tasks/{tid2}").status_code == 200


def test_viewer_reads_but_cannot_act(wd: WebDaemon) -> None:
    with api_session(wd.url, "vic", "viewer-password-1") as c:
        assert [d["name"] for d in c.get("/v1/domains").json()] == ["shared"]
        assert c.get("/v1/domains/shared").status_code == 200
        assert c.get("/v1/domains/shared/snapshots").status_code == 200
        for method, path in (("POST", "/v1/domains/shared/start"),
                             ("POST", "/v1/domains/shared/snapshots"),
                             ("PUT", "/v1/domains/shared/autostart"),
                             ("DELETE", "/v1/domains/shared"),
                             ("PUT", "/v1/domains/shared"),
                             ("POST", "/v1/domains"),
                             ("POST", "/v1/pools/default/volumes")):
            r = c.request(method, path, json={})
            assert r.status_code == 403, (method, path, r.text)
            assert r.json()["error"]["code"] == "forbidden"
        assert c.get("/v1/domains/secret").status_code == 404


def test_user_defines_only_safe_domains_and_owns_them(wd: WebDaemon) -> None:
    with api_session(wd.url, *ALICE) as c:
        for doc, field in (({"kernel": "/etc/shadow"}, "kernel"),
                           ({"initrd": "/etc/shadow"}, "initrd"),
                           ({"disks": [{"path": "/etc/shadow"}]}, "disks[0].path"),
                           ({"sandbox": "off"}, "sandbox"),
                           ({"vsock": {"cid": 3, "path": "/tmp/x"}}, "vsock")):
            r = c.post("/v1/domains", json={"name": "bad", "memory": "128M", **doc})
            assert r.status_code == 403, (doc, r.text)
            assert r.json()["error"]["field"] == field
        # a taken name is refused, never replaced
        r = c.post("/v1/domains", json={"name": "secret", "memory": "128M"})
        assert r.status_code == 409
        assert wd.client.domain("secret")["description"] == "admin's own"
        r = c.post("/v1/domains", json={"name": "alices", "memory": "128M", "accel": "emu"})
        assert r.status_code == 201, r.text
        assert "alices" in [d["name"] for d in c.get("/v1/domains").json()]
        assert c.get("/v1/domains/alices").status_code == 200
        users = {u["name"]: u for u in wd.client.user_list()}
        assert "alices" in users["alice"]["grants"]
    # another account does not see it
    with api_session(wd.url, "vic", "viewer-password-1") as b:
        assert b.get("/v1/domains/alices").status_code == 404


def test_session_survives_a_daemon_restart(wd: WebDaemon) -> None:
    r = _login(wd.url, *ALICE)
    wd.stop()
    wd.start()
    again = httpx.get(wd.url + "/v1/session", cookies=r.cookies)
    assert again.status_code == 200 and again.json()["csrf"] == r.json()["csrf"]


def test_users_api_and_cli(wd: WebDaemon) -> None:
    env = daemon_env()
    uri = f"unix://{wd.socket}"

    def pv(*args: str, input: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pyvirt", "-c", uri, "user", *args],
                              capture_output=True, text=True, env=env, input=input,
                              timeout=120)

    r = pv("add", "carol", "--role", "viewer", "--password-stdin", input="carol-password-1\n")
    assert r.returncode == 0, r.stderr
    assert _login(wd.url, "carol", "carol-password-1").status_code == 200
    r = pv("add", "Carol!", "--password-stdin", input="carol-password-1\n")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "name" in r.stderr
    r = pv("add", "dave", "--password-stdin", input="short\n")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "password" in r.stderr
    assert pv("grant", "carol", "shared").returncode == 0
    listed = pv("list").stdout
    assert re.search(r"carol\s+viewer\s+shared", listed), listed
    assert pv("grant", "carol", "nosuch").returncode != 0
    s = _login(wd.url, "carol", "carol-password-1")
    assert pv("passwd", "carol", "--password-stdin", input="carol-password-2\n").returncode == 0
    # a new password ends the old sessions
    assert httpx.get(wd.url + "/v1/domains", cookies=s.cookies).status_code == 401
    assert _login(wd.url, "carol", "carol-password-2").status_code == 200
    assert pv("revoke", "carol", "shared").returncode == 0
    assert pv("del", "carol").returncode == 0
    assert _login(wd.url, "carol", "carol-password-2").status_code == 401
    # the API names the fields it refuses
    with api_session(wd.url, *ADMIN) as c:
        for body, field in (({"name": "x", "role": "root", "password": "p" * 10}, "role"),
                            ({"name": "9x", "role": "user", "password": "p" * 10}, "name"),
                            ({"name": "x", "role": "user", "password": "p"}, "password")):
            r = c.post("/v1/users", json=body)
            assert r.status_code == 400 and r.json()["error"]["field"] == field, r.text
        assert c.post("/v1/users", json={"name": "alice", "password": "p" * 10}).status_code \
            == 409


# ------------------------------------------------------------------ flags, TLS, expiry

def test_non_loopback_web_without_tls_is_refused() -> None:
    root = short_root("pvw")
    try:
        r = subprocess.run([sys.executable, "-m", "pyvirt", "daemon", "--root", str(root),
                            "--no-networks", "--web", f"0.0.0.0:{free_port()}"],
                           capture_output=True, text=True, env=daemon_env(), timeout=60)
        assert r.returncode == 2
        assert r.stderr.count("\n") == 1 and "needs TLS" in r.stderr, r.stderr
        assert not (root / "run" / "pyvirtd.sock").exists()
    finally:
        remove_root(root)


def test_tls_secure_cookie_and_idle_expiry(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    d = WebDaemon(extra=["--web-cert", str(cert), "--web-key", str(key),
                         "--web-session-idle", "3"], tls=True)
    try:
        r = _login(d.url, *ALICE, verify=False)
        assert r.status_code == 200 and r.json()["idle_timeout_s"] == 3
        attrs = [a.strip() for a in r.headers["set-cookie"].split(";")]
        assert "Secure" in attrs and "HttpOnly" in attrs
        assert r.headers["strict-transport-security"].startswith("max-age=")
        with httpx.Client(base_url=d.url, cookies=r.cookies, verify=False) as c:
            assert c.get("/v1/domains").status_code == 200
            time.sleep(1.5)
            assert c.get("/v1/domains").status_code == 200  # a request restarts the idle time
            time.sleep(3.5)  # no request for longer than the idle time
            gone = c.get("/v1/session")
            assert gone.status_code == 401
            assert gone.json()["error"]["code"] == "session-expired"
            assert c.get("/v1/domains").json()["error"]["code"] == "session-expired"
    finally:
        d.close()
