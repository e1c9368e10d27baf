"""Fixtures of the browser tests (tests/web): ``web_daemon`` (module scope: a real
pyvirtd with its web listener and the users admin/alice), ``browser`` (session
scope: Debian's chromium, headless, driven by Playwright; never a downloaded
browser), ``page`` (a fresh context and page per test; console errors and
requests to any other host are collected and fail the test). Helpers live in
tests/web/support.py (``login``, ``define_vm``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.web.support import CHROMIUM, WebDaemon


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/web/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.web)


@pytest.fixture(scope="module")
def web_daemon() -> Iterator[WebDaemon]:
    d = WebDaemon()
    try:
        yield d
    finally:
        d.close()


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                               args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


class PageProblems:
    """What a page did wrong: console errors, uncaught exceptions, requests that
    left for another host. ``allow(substring)`` tolerates an expected console error
    (e.g. the 401 of a deliberately expired session)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.foreign: list[str] = []
        # an API answer of 4xx is part of the app's flow (not logged in yet, a field
        # error shown next to its field); chromium logs each as a console error
        self.allowed: list[str] = ["Failed to load resource: the server responded with a "
                                   "status of 4"]

    def allow(self, text: str) -> None:
        self.allowed.append(text)

    def unexpected(self) -> list[str]:
        return [e for e in self.errors if not any(a in e for a in self.allowed)]


@pytest.fixture
def page_problems() -> PageProblems:
    return PageProblems()


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest,
         page_problems: PageProblems) -> Iterator[Any]:
    """A fresh context (no cookies) and page; at the end, no console error and no
    request to a host other than the daemon's."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    pg.set_default_timeout(15000)
    probs = page_problems

    def on_console(msg: Any) -> None:
        if msg.type == "error":
            probs.errors.append(f"console: {msg.text}")

    def on_request(req: Any) -> None:
        host = urlsplit(req.url).hostname
        if req.url.startswith(("http:", "https:", "ws:", "wss:")) and host not in (
                "127.0.0.1", "localhost"):
            probs.foreign.append(req.url)

    pg.on("console", on_console)
    pg.on("pageerror", lambda exc: probs.errors.append(f"page error: {exc}"))
    pg.on("request", on_request)
    try:
        yield pg
    finally:
        ctx.close()
    failed = request.node.stash.get(_FAILED, False)
    if not failed:
        assert not probs.foreign, f"requests to other hosts: {probs.foreign}"
        assert not probs.unexpected(), f"errors in the page: {probs.unexpected()}"


_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    if rep.when == "call" and rep.failed:
        item.stash[_FAILED] = True
    return rep
