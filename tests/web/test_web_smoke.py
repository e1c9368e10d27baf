"""The harness works: the daemon's web listener serves the app, the page loads
with no console error and no request to another host (tests/web/conftest.py)."""

from __future__ import annotations

from typing import Any

from tests.web.support import WebDaemon


def test_page_loads_and_stays_on_its_host(web_daemon: WebDaemon, page: Any) -> None:
    seen: list[str] = []
    page.on("request", lambda req: seen.append(req.url))
    resp = page.goto(web_daemon.url + "/")
    assert resp is not None and resp.status == 200
    # not logged in: the app shows its login page
    page.get_by_label("User name").wait_for()
    assert page.title()
    assert any("/static/app.js" in u for u in seen)
    assert all(u.startswith(web_daemon.url) or u.startswith("data:") for u in seen), seen
