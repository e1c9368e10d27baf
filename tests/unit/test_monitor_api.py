"""The monitoring routes (api_monitor.py) over a real Monitor and a fake Manager:
the stream's frames filtered by what the principal may see, keep-alives, its
end when the daemon stops; the history's and clone's use of the principal."""

from __future__ import annotations

import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from pyvirt.manager import auth
from pyvirt.manager.api import close_streams, make_app
from pyvirt.manager.monitor import Monitor

USER = auth.Principal("alice", "user", "session")


class FakeManager:
    paths = None

    def __init__(self, tmp: Path) -> None:
        from pyvirt.manager.db import Store

        self.store = Store(tmp / "pyvirt.db")  # the accounts' (make_app asks for them)
        self.monitor = Monitor(tmp)
        self.calls: list[tuple[str, Any]] = []

    def metrics_history(self, visible: set[str] | None, domain: str | None) -> Any:
        self.calls.append(("metrics_history", (visible, domain)))
        return self.monitor.history(visible)

    def clone(self, name: str, new: str, description: str | None, *, allow_paths: bool,
              on_defined: Any) -> int:
        self.calls.append(("clone", (name, new, allow_paths)))
        on_defined(new)
        return 5


def as_user(app: Any) -> Any:
    """The app with every request made by alice (what A's middleware does)."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        scope.setdefault("state", {})["principal"] = USER
        await app(scope, receive, send)

    return wrapped


def feed(m: Monitor, stop: threading.Event, names: list[str]) -> None:
    """Sampling passes with fake domains (this process stands in for their VMMs)."""
    import os

    while not stop.is_set():
        m.begin()
        for n in names:
            m.domain("u-" + n, n, os.getpid(), None)
        m.end()
        time.sleep(0.05)


@pytest.fixture
def visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "visible_names",
                        lambda manager, p: None if p.admin else {"mine"})


def test_stream_filters_by_principal_and_ends_with_the_daemon(tmp_path: Path,
                                                              visible: None) -> None:
    fake = FakeManager(tmp_path)
    app = make_app(fake, keepalive_s=0.02)  # type: ignore[arg-type]
    stop = threading.Event()
    t = threading.Thread(target=feed, args=(fake.monitor, stop, ["mine", "theirs"]))
    t.start()
    try:
        with TestClient(as_user(app)) as c, c.stream("GET", "/v1/metrics/stream") as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            frames = 0
            seen: set[str] = set()
            for line in r.iter_lines():
                if line.startswith("data: "):
                    import json

                    f = json.loads(line[6:])
                    assert set(f) == {"t", "host", "domains"}
                    seen |= set(f["domains"])
                    frames += 1
                    if frames == 3:
                        close_streams(app)  # the daemon stops: the stream ends
                    assert frames < 100, "the stream did not end"
            assert seen == {"mine"} and frames >= 3
        with TestClient(app) as c, c.stream("GET", "/v1/metrics/stream") as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    assert '"theirs"' in line and '"mine"' in line  # the admin sees all
                    fake.monitor.close()
    finally:
        stop.set()
        t.join()
    assert fake.monitor.subscribers() == 0


def test_keepalive_when_no_pass_comes(tmp_path: Path) -> None:
    fake = FakeManager(tmp_path)
    app = make_app(fake, keepalive_s=0.02)  # type: ignore[arg-type]
    # closed once a keep-alive came (a fixed timer raced a slow start under load),
    # or after 10 s without one: then the assertion fails
    guard = threading.Timer(10, fake.monitor.close)
    guard.daemon = True
    guard.start()
    text = ""
    with TestClient(app) as c, c.stream("GET", "/v1/metrics/stream") as r:
        for chunk in r.iter_text():
            text += chunk
            if ": keep-alive" in text:
                fake.monitor.close()
    guard.cancel()
    assert ": keep-alive" in text


def test_history_and_clone_use_the_principal(tmp_path: Path, visible: None,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeManager(tmp_path)
    granted: list[tuple[str, str]] = []
    monkeypatch.setattr(auth, "grant_on_create",
                        lambda m, p, name: granted.append((p.name, name)))
    with TestClient(as_user(make_app(fake))) as c:  # type: ignore[arg-type]
        r = c.get("/v1/metrics/history", params={"domain": "theirs"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not-found"
        assert c.get("/v1/metrics/history").status_code == 200
        assert fake.calls == [("metrics_history", ({"mine"}, None))]
        r = c.post("/v1/domains/mine/clone", json={"name": "mine2"})
        assert r.status_code == 202 and r.json() == {"task": 5}
        assert ("clone", ("mine", "mine2", False)) in fake.calls  # no path disks for users
        assert granted == [("alice", "mine2")]
