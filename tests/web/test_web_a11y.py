"""Accessibility of the main pages (issue #13): axe-core (vendored from npm, test
only) reports no "serious" or "critical" violation on the login page, the dashboard,
the VM list and the wizard, in light and dark colour schemes; at a phone's
375x667 nothing overflows horizontally; the skip link leads to the content."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.web.support import ADMIN, WebDaemon, define_vm, login

AXE = Path(__file__).resolve().parents[2] / "src/pyvirt/web/static/vendor/axe-core/axe.min.js"
PAGES = {"dashboard": ("#/", "Dashboard"), "list": ("#/vms", "Virtual machines"),
         "wizard": ("#/new", "New virtual machine")}


@pytest.fixture(scope="module")
def daemon_with_vms(web_daemon: WebDaemon) -> WebDaemon:
    for i in range(3):
        define_vm(web_daemon.client, f"a11y-{i}", description=f"machine {i}")
    return web_daemon


def axe_problems(page: Any) -> list[str]:
    """Run axe-core in the page (injected through the driver: the app's CSP allows no
    foreign script) and return its serious and critical violations, one line each."""
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        page.evaluate(AXE.read_text())
    res = page.evaluate("() => axe.run(document, {resultTypes: ['violations']})")
    assert res["testEngine"]["name"] == "axe-core" and res["passes"], "axe did not run"
    out = []
    for v in res["violations"]:
        if v["impact"] in ("serious", "critical"):
            targets = [n["target"] for n in v["nodes"]][:5]
            out.append(f"{v['impact']} {v['id']}: {v['help']} at {json.dumps(targets)}")
    return out


def open_page(page: Any, url: str, route: str, heading: str) -> None:
    page.evaluate(f"location.hash = {json.dumps(route)}")
    page.get_by_role("heading", name=heading, level=1).wait_for()
    page.wait_for_timeout(600)  # the first data and charts are in


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_axe_finds_no_serious_violation(daemon_with_vms: WebDaemon, page: Any,
                                        scheme: str) -> None:
    assert AXE.is_file(), f"{AXE} is missing (python -m pyvirt.web.vendor)"
    page.emulate_media(color_scheme=scheme)
    page.goto(daemon_with_vms.url + "/#/login")
    page.get_by_label("User name").wait_for()
    problems = {"login": axe_problems(page)}
    # the login page with its failure alert shown
    login(page, ADMIN[0], "wrong-password", expect_ok=False)
    page.get_by_role("alert").wait_for()
    problems["login-error"] = axe_problems(page)
    login(page, *ADMIN)
    for name, (route, heading) in PAGES.items():
        open_page(page, daemon_with_vms.url, route, heading)
        problems[name] = axe_problems(page)
    # the wizard with its field errors shown
    page.get_by_role("button", name="Create", exact=True).click()
    page.locator("[data-error-for=name]").wait_for()
    problems["wizard-errors"] = axe_problems(page)
    bad = {k: v for k, v in problems.items() if v}
    assert not bad, json.dumps(bad, indent=1)


def test_phone_width_has_no_horizontal_overflow(daemon_with_vms: WebDaemon, page: Any) -> None:
    page.set_viewport_size({"width": 375, "height": 667})
    page.goto(daemon_with_vms.url + "/#/login")
    page.get_by_label("User name").wait_for()
    widths = {"login": page.evaluate("document.documentElement.scrollWidth")}
    login(page, *ADMIN)
    for name, (route, heading) in PAGES.items():
        open_page(page, daemon_with_vms.url, route, heading)
        if name == "wizard":
            page.get_by_role("button", name="Add disk").click()
            page.get_by_label("Existing disk image").check()
        widths[name] = page.evaluate("document.documentElement.scrollWidth")
        # every element of the page fits: none ends right of the viewport
        wide = page.evaluate("""() => [...document.querySelectorAll('main *')]
            .filter(e => e.getClientRects().length && e.getBoundingClientRect().right > 376)
            .slice(0, 5).map(e => e.tagName + '.' + e.className + ' ' + Math.round(
                e.getBoundingClientRect().right))""")
        assert wide == [], f"{name}: {wide}"
    assert all(w <= 375 for w in widths.values()), widths


def test_keyboard_skip_link_and_navigation(daemon_with_vms: WebDaemon, page: Any) -> None:
    page.goto(daemon_with_vms.url + "/")
    login(page, *ADMIN)
    page.get_by_role("heading", name="Dashboard", level=1).wait_for()
    page.evaluate("document.activeElement.blur()")
    page.keyboard.press("Tab")
    skip = page.get_by_role("link", name="Skip to content")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    assert skip.is_visible()  # shown when focused
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"
    # the main navigation by keyboard: Tab to "Virtual machines", Enter
    page.get_by_role("navigation", name="Main").get_by_role(
        "link", name="Virtual machines").focus()
    page.keyboard.press("Enter")
    page.get_by_role("heading", name="Virtual machines", level=1).wait_for()
    # the focus ring is visible (an outline, not removed)
    page.get_by_label("Search").focus()
    outline = page.evaluate(
        "getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("none", ""), outline
