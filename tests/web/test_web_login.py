"""The login page and the shell (issue #13): logging in shows the shell (main
navigation, the user's name, "Log out"); a wrong password is refused with an
alert and no shell; an expired session sends the page back to the login page,
which says so, and logging in again returns to the page the user was on."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.web.support import ADMIN, ALICE, WebDaemon, login


def test_login_shows_the_shell_and_logout_ends_it(web_daemon: WebDaemon, page: Any) -> None:
    page.goto(web_daemon.url + "/")
    # not logged in: the login page (whatever page was asked for)
    page.get_by_label("User name").wait_for()
    assert page.evaluate("location.hash") == "#/login"
    login(page, *ALICE)
    nav = page.get_by_role("navigation", name="Main")
    for link in ("Dashboard", "Virtual machines", "New virtual machine"):
        assert nav.get_by_role("link", name=link).is_visible()
    assert page.locator("[data-field=user]").inner_text() == "alice"
    assert page.get_by_role("heading", level=1).inner_text() == "Dashboard"
    # the session cookie is HttpOnly: the page's script cannot read it
    assert "pyvirt_session" not in page.evaluate("document.cookie")
    cookies = {c["name"]: c for c in page.context.cookies()}
    assert cookies["pyvirt_session"]["httpOnly"]
    nav.get_by_role("link", name="Virtual machines").click()
    page.get_by_role("heading", name="Virtual machines", level=1).wait_for()
    page.get_by_role("button", name="Log out").click()
    page.get_by_label("User name").wait_for()
    assert page.evaluate("location.hash") == "#/login"
    # the session is gone on the daemon too: a reload stays logged out
    page.reload()
    page.get_by_label("User name").wait_for()
    assert page.get_by_role("button", name="Log out").count() == 0


def test_wrong_password_shows_an_alert(web_daemon: WebDaemon, page: Any) -> None:
    page.goto(web_daemon.url + "/#/login")
    login(page, ADMIN[0], "not-the-password", expect_ok=False)
    alert = page.get_by_role("alert")
    alert.wait_for()
    assert "Wrong user name or password" in alert.inner_text()
    assert page.get_by_role("button", name="Log out").count() == 0
    # the password field is emptied, the user name kept; the right one then works
    assert page.get_by_label("Password").input_value() == ""
    assert page.get_by_label("User name").input_value() == ADMIN[0]
    login(page, *ADMIN)
    assert page.locator("[data-field=user]").inner_text() == "admin"


@pytest.fixture(scope="module")
def short_idle_daemon() -> Iterator[WebDaemon]:
    d = WebDaemon(extra=["--web-session-idle", "3"])
    try:
        yield d
    finally:
        d.close()


def test_expired_session_says_so_and_returns_to_the_page(
        short_idle_daemon: WebDaemon, page: Any, page_problems: Any) -> None:
    # the streams of an expired session are refused (401): chromium logs that
    page_problems.allow("EventSource")
    url = short_idle_daemon.url
    page.goto(url + "/#/vms")
    login(page, *ALICE)
    # after login: back on the page that was asked for
    page.wait_for_function("() => location.hash === '#/vms'")
    page.get_by_role("heading", name="Virtual machines", level=1).wait_for()
    # idle longer than the daemon's idle timeout (the page's event stream is not a
    # request that extends it), then use the app
    time.sleep(4.5)
    nav = page.get_by_role("navigation", name="Main")
    nav.get_by_role("link", name="New virtual machine").click()
    alert = page.get_by_role("alert")
    alert.wait_for(timeout=20000)
    assert re.search(r"Your session expired", alert.inner_text())
    assert page.evaluate("location.hash") == "#/login"
    login(page, *ALICE)
    # the page the user went to when the session was found expired
    page.wait_for_function("() => location.hash === '#/new'")
    page.get_by_role("heading", name="New virtual machine", level=1).wait_for()
