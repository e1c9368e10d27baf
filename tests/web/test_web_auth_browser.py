"""Login in the browser: a wrong password is refused with an alert; an expired
session (a daemon with a 3 s idle timeout) lands on the login page saying so, and
logging in again returns to the page the user was on."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.web.support import ALICE, WebDaemon, define_vm, login

IDLE_S = 3


@pytest.fixture(scope="module")
def web_daemon() -> Iterator[WebDaemon]:
    d = WebDaemon(extra=["--web-session-idle", str(IDLE_S)])
    try:
        define_vm(d.client, "granted")
        define_vm(d.client, "hidden")
        d.client.user_grant(ALICE[0], "granted")
        yield d
    finally:
        d.close()


def test_wrong_password_shows_an_alert(web_daemon: WebDaemon, page: Any) -> None:
    page.goto(web_daemon.url + "/#/login")
    login(page, ALICE[0], "not-her-password", expect_ok=False)
    alert = page.get_by_role("alert")
    alert.wait_for()
    assert re.search(r"wrong user name or password", alert.inner_text(), re.I)
    assert page.get_by_role("button", name="Log out").count() == 0
    assert not [c for c in page.context.cookies() if c["name"] == "pyvirt_session"]


def test_expired_session_goes_to_login_and_back(web_daemon: WebDaemon, page: Any) -> None:
    page.goto(web_daemon.url + "/#/login")
    login(page, *ALICE)
    cookie = next(c for c in page.context.cookies() if c["name"] == "pyvirt_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    page.goto(web_daemon.url + "/#/vms")
    # she sees the domain granted to her, never the other
    page.locator("tr[data-vm=granted]").wait_for()
    assert page.locator("tr[data-vm=hidden]").count() == 0
    # away from the app for longer than the idle timeout (no request at all)
    page.goto("about:blank")
    time.sleep(IDLE_S + 1)
    page.goto(web_daemon.url + "/#/vms")
    alert = page.get_by_role("alert")
    alert.wait_for()
    assert "Your session expired" in alert.inner_text()
    assert page.url.endswith("#/login") or page.get_by_label("Password").is_visible()
    login(page, *ALICE)
    page.wait_for_url(re.compile(r"#/vms$"))
    page.locator("tr[data-vm=granted]").wait_for()
