"""The browser tests' harness: a real pyvirtd with its web listener, two accounts,
and helpers for Playwright pages (tests/web/conftest.py holds the fixtures).

Names used by every browser test (keep them stable): ``WebDaemon`` (``.url``,
``.root``, ``.client``, ``.stop()``, ``.start()``), ``login(page, user, password)``,
``define_vm(client, name, **overrides)``, ``ADMIN``/``ALICE`` (name, password).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.daemon_support import (
    daemon_log,
    remove_root,
    short_root,
    spawn_daemon,
    stop_daemon,
    wait_for,
)

ADMIN = ("admin", "admin-password-1")
ALICE = ("alice", "alice-password-1")
CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WebDaemon:
    """``pyvirt daemon --root ROOT --no-networks --web 127.0.0.1:PORT`` (in a network
    namespace of its own when root: its VMs' NICs never touch the host's), with the
    users of ``ADMIN`` and ``ALICE`` made through the API. ``stop()``/``start()``
    restart it on the same root and port (sessions survive)."""

    def __init__(self, *, extra: list[str] | None = None, root: Path | None = None,
                 tls: bool = False) -> None:
        self.root = root or short_root("pvw")
        self.port = free_port()
        self.tls = tls
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None
        self._client: Any = None
        self.start()
        self.client.user_add(ADMIN[0], ADMIN[1], role="admin")
        self.client.user_add(ALICE[0], ALICE[1], role="user")

    @property
    def socket(self) -> Path:
        return self.root / "run" / "pyvirtd.sock"

    @property
    def client(self) -> Any:
        """A ``pyvirt.client.Client`` on the daemon's Unix socket (the admin)."""
        if self._client is None:
            from pyvirt.client import Client

            self._client = Client(f"unix://{self.socket}", timeout=120)
        return self._client

    def start(self) -> None:
        # the daemon binds its web port before the Unix socket: answered = ready
        self.proc = spawn_daemon(self.root, extra=["--no-networks", "--web",
                                                   f"127.0.0.1:{self.port}", *self.extra])
        wait_for(self._answers, 30, "the web listener")

    def _answers(self) -> bool:
        import ssl

        ctx = ssl._create_unverified_context() if self.tls else None  # a test's own cert
        try:
            with urllib.request.urlopen(f"{self.url}/v1/version", timeout=5,
                                        context=ctx) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None
        if self.proc is not None:
            stop_daemon(self.proc)
            self.proc = None

    def log(self) -> str:
        return daemon_log(self.root)

    def close(self) -> None:
        self.stop()
        if os.environ.get("PYVIRT_KEEP_LOGS"):
            print(self.log())
        remove_root(self.root)


def define_vm(client: Any, name: str, **overrides: Any) -> dict[str, Any]:
    """Define (not start) a default-guest domain on the software CPU."""
    doc: dict[str, Any] = {"name": name, "memory": "256M", "cpus": 1, "accel": "emu",
                           **overrides}
    return client.define(doc)  # type: ignore[no-any-return]


def login(page: Any, user: str, password: str, *, url: str | None = None,
          expect_ok: bool = True) -> None:
    """Log in through the login page (``url``: the daemon's, when the page is not on it
    yet); with ``expect_ok``, wait until the shell's "Log out" button shows."""
    if url is not None:
        page.goto(f"{url}/#/login")
    page.get_by_label("User name").fill(user)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    if expect_ok:
        page.get_by_role("button", name="Log out").wait_for(timeout=15000)


@contextlib.contextmanager
def api_session(url: str, user: str, password: str) -> Iterator[Any]:
    """An ``httpx.Client`` logged in on the web listener (cookie + X-CSRF-Token set),
    for a ``with`` block."""
    import httpx

    with httpx.Client(base_url=url, timeout=60, verify=False) as c:
        r = c.post("/v1/session", json={"user": user, "password": password})
        if r.status_code != 200:
            raise AssertionError(f"login of {user}: {r.status_code} {r.text}")
        c.headers["X-CSRF-Token"] = r.json()["csrf"]
        yield c


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)
