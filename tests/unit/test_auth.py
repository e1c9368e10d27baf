"""Accounts, sessions, the login throttle and the path policy (pyvirt.manager.auth),
on a real database with a fake clock; the web listener's static files and CSRF
check (pyvirt.manager.web) without a server."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import uuid as uuidlib
from pathlib import Path
from typing import Any

import pytest

from pyvirt.manager import auth
from pyvirt.manager.db import MIGRATIONS, Store
from pyvirt.manager.errors import AlreadyExists, InvalidArgument, NotFound


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = Store(tmp_path / "pyvirt.db")
    yield s
    s.close()


def _user(store: Store, name: str, role: str) -> None:
    """An account without the cost of hashing (the policy never reads the hash)."""
    with store.write() as db:
        db.execute("INSERT INTO users (name, hash, role, created, updated) "
                   "VALUES (?, 'x', ?, 0, 0)", (name, role))


def _domain(store: Store, name: str) -> str:
    u = str(uuidlib.uuid4())
    with store.write() as db:
        db.execute("INSERT INTO domains (uuid, name, definition, created, updated) "
                   "VALUES (?, ?, '{}', 0, 0)", (u, name))
    return u


class FakeManager:
    """What auth reads of a Manager: its store, storage and users_of."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.storage = None

    def users_of(self, path: Any) -> list[str]:
        return []


# ------------------------------------------------------------------ validation

@pytest.mark.parametrize("name", ["a", "_x", "alice", "a.b-c_9", "a" * 32])
def test_user_names_accepted(name: str) -> None:
    assert auth.check_user_name(name) == name


@pytest.mark.parametrize("name", ["", "A", "9a", "-a", ".a", "a b", "a/b", "a" * 33, "é",
                                  "a\n", None, 3])
def test_user_names_refused(name: object) -> None:
    with pytest.raises(InvalidArgument) as e:
        auth.check_user_name(name)
    assert e.value.field == "name"


def test_password_length_bounds() -> None:
    assert auth.check_password("x" * 8)
    assert auth.check_password("x" * 1024)
    for bad in ("x" * 7, "x" * 1025, "", None):
        with pytest.raises(InvalidArgument) as e:
            auth.check_password(bad)
        assert e.value.field == "password"


# ------------------------------------------------------------------ accounts

def test_hash_verify_and_rehash(store: Store) -> None:
    acc = auth.Accounts(store)
    acc.user_add("alice", "user", "alice-password-1")
    with store.read() as db:
        stored = db.execute("SELECT hash FROM users").fetchone()[0]
    assert stored.startswith("$argon2id$") and "alice-password-1" not in stored
    assert acc.verify("alice", "alice-password-1") == "user"
    assert acc.verify("alice", "alice-password-2") is None
    assert acc.verify("nobody", "alice-password-1") is None
    # a hash made with weaker parameters is replaced at the next good login
    from argon2 import PasswordHasher

    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash("alice-password-1")
    with store.write() as db:
        db.execute("UPDATE users SET hash = ? WHERE name = 'alice'", (weak,))
    assert acc.verify("alice", "alice-password-1") == "user"
    with store.read() as db:
        now = db.execute("SELECT hash FROM users").fetchone()[0]
    assert now != weak and not PasswordHasher().check_needs_rehash(now)


def test_users_crud_and_grants(store: Store) -> None:
    acc = auth.Accounts(store)
    acc.user_add("alice", "user", "alice-password-1")
    with pytest.raises(AlreadyExists):
        acc.user_add("alice", "viewer", "alice-password-1")
    with pytest.raises(InvalidArgument) as e:
        acc.user_add("bob", "root", "bob-password-1")
    assert e.value.field == "role"
    u = _domain(store, "web1")
    _domain(store, "web2")
    acc.grant("alice", "web1")
    acc.grant("alice", u)  # by uuid: the same grant
    assert acc.user_list() == [{"name": "alice", "role": "user",
                                "created": acc.user_list()[0]["created"], "grants": ["web1"]}]
    assert acc.visible("alice") == ({"web1"}, {u})
    with pytest.raises(NotFound):
        acc.grant("alice", "nosuch")
    with pytest.raises(NotFound):
        acc.grant("nobody", "web1")
    # an undefined domain's grants go with it
    with store.write() as db:
        db.execute("DELETE FROM domains WHERE uuid = ?", (u,))
    assert acc.visible("alice") == (set(), set())
    acc.grant("alice", "web2")
    acc.revoke("alice", "web2")
    assert acc.visible("alice")[0] == set()
    acc.user_set("alice", role="viewer")
    assert acc.user_get("alice")["role"] == "viewer"
    acc.user_delete("alice")
    with pytest.raises(NotFound):
        acc.user_delete("alice")


def test_session_idle_and_absolute_expiry(store: Store) -> None:
    clock = Clock()
    acc = auth.Accounts(store, clock=clock, idle_s=100, lifetime_s=1000)
    acc.user_add("alice", "user", "alice-password-1")
    token, s = acc.session_create("alice")
    with store.read() as db:
        row = db.execute("SELECT * FROM sessions").fetchone()
    assert row["id_hash"] != token and token not in json.dumps(dict(row))
    assert len(token) >= 43  # 32 random bytes
    assert s.to_doc(100) == {"user": "alice", "role": "user", "csrf": s.csrf,
                             "expires": clock.t + 100, "idle_timeout_s": 100}
    # each request restarts the idle time...
    for _ in range(10):
        clock.t += 99
        got = acc.session_lookup(token)
        assert isinstance(got, auth.Session), clock.t
    # ...until the absolute end
    clock.t += 20
    assert acc.session_lookup(token) == "expired"
    token2, _ = acc.session_create("alice")
    clock.t += 100
    assert acc.session_lookup(token2) == "expired"
    assert acc.session_lookup("not-a-token") is None
    assert acc.session_lookup("x" * 5000) is None


def test_sessions_survive_reopen_and_end_with_password_or_user(tmp_path: Path) -> None:
    s1 = Store(tmp_path / "db")
    acc = auth.Accounts(s1)
    acc.user_add("alice", "user", "alice-password-1")
    token, _ = acc.session_create("alice")
    s1.close()
    s2 = Store(tmp_path / "db")
    acc2 = auth.Accounts(s2)
    assert isinstance(acc2.session_lookup(token), auth.Session)
    acc2.user_set("alice", password="alice-password-2")
    assert acc2.session_lookup(token) is None
    token, _ = acc2.session_create("alice")
    acc2.session_delete(token)
    assert acc2.session_lookup(token) is None
    token, _ = acc2.session_create("alice")
    acc2.user_delete("alice")
    assert acc2.session_lookup(token) is None
    s2.close()


def test_sessions_are_bounded(store: Store) -> None:
    clock = Clock()
    acc = auth.Accounts(store, clock=clock)
    acc.user_add("alice", "user", "alice-password-1")
    for _ in range(auth.SESSIONS_PER_USER + 20):
        clock.t += 1
        acc.session_create("alice")
    with store.read() as db:
        assert db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] \
            == auth.SESSIONS_PER_USER
    # long-expired ones are purged at the next login
    clock.t += auth.EXPIRED_KEEP_S + auth.LIFETIME_S + 1
    acc.session_create("alice")
    with store.read() as db:
        assert db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 1


def test_login_throttle() -> None:
    clock = Clock(0)
    t = auth.LoginThrottle(limit=5, window_s=300, clock=clock)
    for _ in range(4):
        t.failed("alice\0127.0.0.1")
    assert t.retry_after("alice\0127.0.0.1") == 0
    t.failed("alice\0127.0.0.1")
    clock.t = 10
    assert t.retry_after("alice\0127.0.0.1") == 290
    assert t.retry_after("alice\0127.0.0.2") == 0
    clock.t = 301
    assert t.retry_after("alice\0127.0.0.1") == 0
    t.failed("x")
    t.succeeded("x")
    assert t.retry_after("x") == 0
    t.MAX_KEYS = 100  # type: ignore[misc]
    for i in range(500):
        t.failed(f"k{i}")
    assert len(t._fails) <= 100


# ------------------------------------------------------------------ migrations

def test_migration_3_on_an_existing_v2_database(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path, isolation_level=None)
    for script in MIGRATIONS[:2]:
        db.executescript(script)
    db.execute("PRAGMA user_version=2")
    db.execute("INSERT INTO domains (uuid, name, definition, created, updated) "
               "VALUES ('u1', 'old', '{}', 0, 0)")
    db.close()
    s = Store(path)
    try:
        assert s.schema_version() == 3 == len(MIGRATIONS)
        acc = auth.Accounts(s)
        acc.user_add("alice", "user", "alice-password-1")
        acc.grant("alice", "old")
        assert acc.visible("alice") == ({"old"}, {"u1"})
    finally:
        s.close()


# ------------------------------------------------------------------ the path policy

ALICE = auth.Principal("alice", "user", "session")
VIC = auth.Principal("vic", "viewer", "session")

POLICY = [
    # (principal, method, path, expected: None | "404" | "403")
    (ALICE, "GET", "/v1/domains", None),
    (ALICE, "POST", "/v1/domains", None),
    (VIC, "POST", "/v1/domains", "403"),
    (ALICE, "GET", "/v1/domains/mine", None),
    (ALICE, "POST", "/v1/domains/mine/start", None),
    (ALICE, "DELETE", "/v1/domains/mine", None),
    (ALICE, "WEBSOCKET", "/v1/domains/mine/console", None),
    (ALICE, "POST", "/v1/domains/mine/clone", None),
    (ALICE, "GET", "/v1/domains/theirs", "404"),
    (ALICE, "GET", "/v1/domains/theirs/stats", "404"),
    (ALICE, "POST", "/v1/domains/theirs/start", "404"),
    (ALICE, "WEBSOCKET", "/v1/domains/theirs/console", "404"),
    (ALICE, "GET", "/v1/domains/nosuch", "404"),
    (VIC, "GET", "/v1/domains/mine", None),
    (VIC, "GET", "/v1/domains/mine/snapshots", None),
    (VIC, "POST", "/v1/domains/mine/start", "403"),
    (VIC, "PUT", "/v1/domains/mine/autostart", "403"),
    (VIC, "DELETE", "/v1/domains/mine", "403"),
    (VIC, "WEBSOCKET", "/v1/domains/mine/console", "403"),
    (VIC, "GET", "/v1/domains/theirs", "404"),
    (ALICE, "GET", "/v1/pools", None),
    (ALICE, "GET", "/v1/pools/default/volumes", None),
    (ALICE, "POST", "/v1/pools/default/volumes", None),
    (VIC, "POST", "/v1/pools/default/volumes", "403"),
    (ALICE, "POST", "/v1/pools", "403"),
    (ALICE, "DELETE", "/v1/pools/default", "403"),
    (ALICE, "DELETE", "/v1/pools/default/volumes/v", "403"),
    (ALICE, "PUT", "/v1/pools/default/volumes/v/data", "403"),
    (ALICE, "POST", "/v1/pools/default/import", "403"),
    (ALICE, "GET", "/v1/networks", None),
    (ALICE, "POST", "/v1/networks/default/stop", "403"),
    (ALICE, "POST", "/v1/restore", "403"),
    (ALICE, "GET", "/v1/users", "403"),
    (ALICE, "POST", "/v1/users", "403"),
    (ALICE, "GET", "/v1/tasks", None),
    (ALICE, "GET", "/v1/tasks/3", None),
    (ALICE, "GET", "/v1/events", None),
    (ALICE, "GET", "/v1/events/log", None),
    (ALICE, "GET", "/v1/host", None),
    (ALICE, "GET", "/v1/metrics/stream", None),
    (ALICE, "GET", "/v1/anything-new", "403"),
    (auth.ANONYMOUS, "GET", "/v1/domains", "403"),
    (auth.Principal("t", "admin", "token"), "DELETE", "/v1/pools/default", None),
    (auth.ADMIN, "GET", "/v1/domains/theirs", None),
]


@pytest.mark.parametrize(("who", "method", "path", "expected"), POLICY)
def test_path_policy(store: Store, who: auth.Principal, method: str, path: str,
                     expected: str | None) -> None:
    acc = auth.accounts(m := FakeManager(store))
    _user(store, "alice", "user")
    _user(store, "vic", "viewer")
    _domain(store, "mine")
    _domain(store, "theirs")
    acc.grant("alice", "mine")
    acc.grant("vic", "mine")
    got = auth.authorize(m, who, method, path)
    if expected is None:
        assert got is None
    else:
        assert got is not None and str(got.status) == expected
        assert got.code == ("not-found" if expected == "404" else "forbidden")
    if expected == "404":
        assert got is not None and got.message == f"domain '{path.split('/')[3]}' not found"


def test_visibility_by_uuid_and_visible_names(store: Store) -> None:
    m = FakeManager(store)
    acc = auth.accounts(m)
    _user(store, "alice", "user")
    u = _domain(store, "mine")
    other = _domain(store, "theirs")
    acc.grant("alice", "mine")
    assert auth.authorize(m, ALICE, "GET", f"/v1/domains/{u}") is None
    assert auth.authorize(m, ALICE, "GET", f"/v1/domains/{other}") is not None
    assert auth.visible_names(m, ALICE) == {"mine"}
    assert auth.visible_names(m, auth.ADMIN) is None
    assert auth.visible_names(m, auth.ANONYMOUS) == set()
    auth.grant_on_create(m, ALICE, "theirs")
    assert auth.visible_names(m, ALICE) == {"mine", "theirs"}
    auth.grant_on_create(m, auth.ADMIN, "mine")  # the admin needs none


@pytest.mark.parametrize(("doc", "field"), [
    ({"kernel": "/boot/vmlinuz"}, "kernel"),
    ({"initrd": "/boot/initrd"}, "initrd"),
    ({"disks": [{"path": "/dev/sda"}]}, "disks[0].path"),
    ({"disks": [{"volume": "p/v"}, {"path": "/x", "readonly": True}]}, "disks[1].path"),
    ({"nics": [{"kind": "tap", "ifname": "eth0"}]}, "nics[0]"),
    ({"vsock": {"cid": 3, "path": "/run/x"}}, "vsock"),
    ({"sandbox": "off"}, "sandbox"),
])
def test_user_definitions_without_host_paths(store: Store, doc: dict[str, Any],
                                             field: str) -> None:
    m = FakeManager(store)
    with pytest.raises(auth.Forbidden) as e:
        auth.check_definition(m, ALICE, {"name": "x", **doc})
    assert e.value.field == field and e.value.status == 403
    auth.check_definition(m, auth.ADMIN, {"name": "x", **doc})  # the admin may


def test_user_definition_of_a_volume_another_domain_uses(store: Store) -> None:
    class Storage:
        def vol_path(self, pool: str, vol: str) -> tuple[Path, str]:
            return Path(f"/pools/{pool}/{vol}"), "qcow2"

    m = FakeManager(store)
    m.storage = Storage()  # type: ignore[assignment]
    m.users_of = lambda path: ["theirs"] if str(path).endswith("/taken") else []  # type: ignore[method-assign]
    auth.check_definition(m, ALICE, {"name": "x", "disks": [{"volume": "p/free"}],
                                     "nics": [{"network": "default"}], "sandbox": "auto"})
    with pytest.raises(auth.Forbidden) as e:
        auth.check_definition(m, ALICE, {"name": "x", "disks": [{"volume": "p/free"},
                                                                 {"volume": "p/taken"}]})
    assert e.value.field == "disks[1].volume"
    with pytest.raises(auth.Forbidden) as e:
        auth.check_volume_create(m, ALICE, "p", "taken")
    assert e.value.field == "backing"
    auth.check_volume_create(m, ALICE, "p", "free")
    # its own domain's volume (a redefinition) is fine
    auth.check_definition(m, ALICE, {"name": "theirs", "disks": [{"volume": "p/taken"}]})


# ------------------------------------------------------------------ the web app's parts

def test_static_resolve_refuses_escapes(tmp_path: Path) -> None:
    from pyvirt.manager.web import _Static

    root = tmp_path / "static"
    (root / "vendor").mkdir(parents=True)
    (root / "app.js").write_text("x")
    (root / ".hidden").write_text("x")
    (tmp_path / "secret.txt").write_text("secret")
    os.symlink(tmp_path / "secret.txt", root / "link.js")
    os.symlink(root / "app.js", root / "vendor" / "inside.js")
    st = _Static(root)
    assert st.resolve("app.js") == (root / "app.js").resolve()
    assert st.resolve("vendor/inside.js") == (root / "app.js").resolve()
    for bad in ("../secret.txt", "link.js", ".hidden", "vendor", "vendor/", "", "/etc/passwd",
                "vendor/../app.js", "a\\b", "app.js\0", "./app.js", "nosuch.js"):
        assert st.resolve(bad) is None, bad


def test_csp_hashes_the_import_map(tmp_path: Path) -> None:
    import base64
    import hashlib

    from pyvirt.manager.web import _Static

    (tmp_path / "index.html").write_text('<script type="importmap">{"imports": {}}</script>')
    csp = _Static(tmp_path).csp()
    digest = base64.b64encode(hashlib.sha256(b'{"imports": {}}').digest()).decode()
    assert f"script-src 'self' 'sha256-{digest}';" in csp
    assert "frame-ancestors 'none'" in csp


def test_csrf_compare_and_origin(store: Store) -> None:
    from pyvirt.manager.web import WebApp

    app = WebApp(lambda *a: None, FakeManager(store))  # type: ignore[arg-type]
    p = auth.Principal("alice", "user", "session", csrf="tok-123")

    def scope(**headers: str) -> dict[str, Any]:
        return {"headers": [(k.replace("_", "-").encode(), v.encode())
                            for k, v in headers.items()]}

    assert app._csrf(scope(x_csrf_token="tok-123"), p) is None
    for bad in ("tok-124", "", "tok-1234", "TOK-123"):
        got = app._csrf(scope(x_csrf_token=bad), p)
        assert got is not None and got[0] == 403 and b'"csrf"' in got[2]
    assert app._csrf(scope(), p) is not None
    assert app._origin_ok(scope(host="127.0.0.1:8080"))  # no Origin: not a browser's CORS
    assert app._origin_ok(scope(host="127.0.0.1:8080", origin="http://127.0.0.1:8080"))
    assert not app._origin_ok(scope(host="127.0.0.1:8080", origin="http://evil.example"))
    assert not app._origin_ok(scope(host="127.0.0.1:8080", origin="https://127.0.0.1:8080"))
    assert not app._origin_ok(scope(host="127.0.0.1:8080", origin="null"))


def test_login_answers_alike_for_unknown_user(store: Store) -> None:
    from pyvirt.manager.web import WebApp

    m = FakeManager(store)
    auth.accounts(m).user_add("alice", "user", "alice-password-1")
    app = WebApp(lambda *a: None, m)  # type: ignore[arg-type]

    async def login(user: str, password: str) -> tuple[int, bytes]:
        body = json.dumps({"user": user, "password": password}).encode()
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(msg: Any) -> None:
            sent.append(msg)

        await app({"type": "http", "method": "POST", "path": "/v1/session", "headers": [],
                   "client": ("10.0.0.1", 5)}, receive, send)
        return sent[0]["status"], sent[1]["body"]

    wrong = asyncio.run(login("alice", "wrong-password"))
    unknown = asyncio.run(login("zed", "wrong-password"))
    assert wrong == unknown and wrong[0] == 401
    status, body = asyncio.run(login("alice", "alice-password-1"))
    assert status == 200 and json.loads(body)["user"] == "alice"


# ---- long connections end with their session (web.py ``_watched``)

def _watched_app(store: Store, clock: Clock) -> tuple[Any, str, list[dict[str, Any]]]:
    """A WebApp (rechecking every 20 ms) over an inner app that records what it
    receives until a disconnect; the session's token; the inner app's log."""
    from pyvirt.manager.web import WebApp

    m = FakeManager(store)
    acc = auth.accounts(m)
    acc.clock = clock
    _user(store, "alice", "admin")
    token, _ = acc.session_create("alice")
    got: list[dict[str, Any]] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            await receive()  # connect
            await send({"type": "websocket.accept"})
        while True:
            msg = await receive()
            got.append(msg)
            if msg["type"] in ("websocket.disconnect", "http.disconnect"):
                return

    app = WebApp(inner, m, idle_s=100, recheck_s=0.02)  # type: ignore[arg-type]
    return app, token, got


def _conn(kind: str, token: str) -> dict[str, Any]:
    headers = [(b"cookie", f"pyvirt_session={token}".encode()), (b"host", b"h:1"),
               (b"origin", b"http://h:1")]
    if kind == "websocket":
        return {"type": "websocket", "path": "/v1/domains/vm/console", "headers": headers}
    return {"type": "http", "method": "GET", "path": "/v1/events", "headers": headers}


@pytest.mark.parametrize("kind", ["websocket", "http"])
def test_a_long_connection_ends_with_its_session(store: Store, kind: str) -> None:
    clock = Clock()
    app, token, got = _watched_app(store, clock)
    sent: list[dict[str, Any]] = []

    async def run() -> None:
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        if kind == "websocket":
            q.put_nowait({"type": "websocket.connect"})

        async def send(msg: Any) -> None:
            sent.append(msg)

        task = asyncio.ensure_future(app(_conn(kind, token), q.get, send))
        await asyncio.sleep(0.1)
        assert not task.done()  # the session lives: so does the connection
        auth.accounts(app.manager).session_delete(token)  # logged out elsewhere
        await asyncio.wait_for(task, 2)

    asyncio.run(run())
    assert got[-1]["type"] == ("websocket.disconnect" if kind == "websocket"
                               else "http.disconnect")
    if kind == "websocket":
        assert sent[-1] == {"type": "websocket.close", "code": 4401,
                            "reason": "session-expired"}


def test_console_input_keeps_the_session_alive(store: Store) -> None:
    clock = Clock()
    app, token, got = _watched_app(store, clock)
    acc = auth.accounts(app.manager)

    async def run() -> None:
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        q.put_nowait({"type": "websocket.connect"})

        async def send(msg: Any) -> None:
            pass

        task = asyncio.ensure_future(app(_conn("websocket", token), q.get, send))
        # 5 minutes of typing only in the console, in steps of 60 s (idle: 100 s)
        for _ in range(5):
            q.put_nowait({"type": "websocket.receive", "bytes": b"x"})
            await asyncio.sleep(0.1)  # the watcher sees the input and touches
            clock.t += 60
        assert not task.done()
        assert isinstance(acc.session_lookup(token, touch=False), auth.Session)
        # no input: the session expires, and the console with it
        clock.t += 120
        await asyncio.wait_for(task, 2)

    asyncio.run(run())
    assert got[-1]["type"] == "websocket.disconnect"
