"""The VM page without a boot: axe-core finds no serious violation on any tab (light
and dark), it fits a 375 px wide phone, and it works by keyboard alone (tabs by arrow
keys, dialogs close with Escape and give focus back, Esc Esc leaves the terminal)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.web.support import ADMIN, WebDaemon, define_vm, login

pytestmark = [pytest.mark.web]

TABS = ["overview", "console", "graphs", "disks", "network", "snapshots", "tasks"]
UI = 30_000


@pytest.fixture(scope="module")
def vm(web_daemon: WebDaemon) -> str:
    name = "web-a11y"
    define_vm(web_daemon.client, name, description="checked by axe")
    return name


def axe_serious(page: Any, url: str) -> list[str]:
    """axe-core's serious and critical violations on the page as it is now."""
    if not page.evaluate("() => typeof window.axe === 'object'"):
        page.add_script_tag(url=f"{url}/static/vendor/axe-core/axe.min.js")
    found = page.evaluate("""async () => {
        const r = await axe.run(document, {resultTypes: ['violations']});
        return r.violations.filter(v => v.impact === 'serious' || v.impact === 'critical')
          .map(v => v.id + ': ' + v.help + ' @ '
               + v.nodes.slice(0, 3).map(n => n.target.join(' ')).join(', '));
    }""")
    return list(found)


def focus_is(page: Any, js_test: str) -> None:
    """Wait until the focused element passes ``js_test`` (a JS expression on ``el``)."""
    page.wait_for_function("() => { const el = document.activeElement;"
                           f" return !!el && ({js_test}); }}")


def open_tab(page: Any, url: str, name: str, tab: str) -> None:
    page.goto(f"{url}/#/vms/{name}/{tab}")
    page.locator(f"#tab-{tab}[aria-selected=true]").wait_for(timeout=UI)
    page.locator("main [data-field=state]").wait_for(timeout=UI)


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_every_tab_is_axe_clean(web_daemon: WebDaemon, vm: str, page: Any, scheme: str) -> None:
    page.emulate_media(color_scheme=scheme)
    login(page, *ADMIN, url=web_daemon.url)
    problems = {}
    for tab in TABS:
        open_tab(page, web_daemon.url, vm, tab)
        page.wait_for_timeout(300)  # the panel's first answers
        found = axe_serious(page, web_daemon.url)
        if found:
            problems[tab] = found
    # a dialog too
    page.get_by_role("button", name="Delete", exact=True).click()
    page.get_by_role("dialog").wait_for()
    found = axe_serious(page, web_daemon.url)
    if found:
        problems["delete dialog"] = found
    assert not problems, problems


def test_phone_width_has_no_sideways_scroll(web_daemon: WebDaemon, vm: str, page: Any) -> None:
    page.set_viewport_size({"width": 375, "height": 740})
    login(page, *ADMIN, url=web_daemon.url)
    wide = {}
    for tab in TABS:
        open_tab(page, web_daemon.url, vm, tab)
        page.wait_for_timeout(300)
        w = page.evaluate("() => document.documentElement.scrollWidth")
        if w > 375:
            wide[tab] = w
    assert not wide, f"wider than the phone: {wide}"
    # every action stays reachable
    for label in ("Start", "Clone", "Delete"):
        assert page.get_by_role("button", name=label, exact=True).is_visible()


def test_keyboard_alone(web_daemon: WebDaemon, vm: str, page: Any) -> None:
    login(page, *ADMIN, url=web_daemon.url)
    open_tab(page, web_daemon.url, vm, "overview")

    # tabs: one tab stop, arrow keys move between them (and to the page they name)
    page.locator("#tab-overview").focus()
    page.keyboard.press("ArrowRight")
    page.wait_for_url(f"**/#/vms/{vm}/console")
    focus_is(page, "el.id === 'tab-console'")
    assert page.locator("[role=tab][tabindex='0']").count() == 1

    # the terminal: Esc Esc leaves it for the "Leave console" button
    page.locator("[data-testid=console] .xterm").click()
    focus_is(page, "!!el.closest('.xterm')")
    page.keyboard.press("Escape")
    page.keyboard.press("Escape")
    focus_is(page, "el.textContent === 'Leave console'")
    # ... and that button hands focus back to the tabs
    page.keyboard.press("Enter")
    focus_is(page, "el.id === 'tab-console'")

    # a dialog: focus goes in, Escape closes it, focus comes back to its button
    delete = page.get_by_role("button", name="Delete", exact=True)
    delete.focus()
    page.keyboard.press("Enter")
    dialog = page.get_by_role("dialog")
    dialog.wait_for()
    focus_is(page, "!!el.closest('[role=dialog]')")
    page.keyboard.press("Escape")
    dialog.wait_for(state="detached")
    focus_is(page, "el.textContent === 'Delete'")
    assert web_daemon.client.domain(vm)["state"] == "shut off"


def test_console_fits_its_panel(web_daemon: WebDaemon, vm: str, page: Any) -> None:
    login(page, *ADMIN, url=web_daemon.url)
    open_tab(page, web_daemon.url, vm, "console")
    cols = "() => window.__pyvirtConsole ? window.__pyvirtConsole.term.cols : 0"
    page.wait_for_function(f"() => ({cols})() > 100")  # 1280 px: a wide terminal
    wide = page.evaluate(cols)
    page.set_viewport_size({"width": 375, "height": 740})
    page.wait_for_function(f"() => ({cols})() > 0 && ({cols})() < 50")  # refitted, not clipped
    box = page.locator("[data-testid=console]").bounding_box()
    assert box is not None and box["x"] + box["width"] <= 375
    page.set_viewport_size({"width": 1280, "height": 900})
    page.wait_for_function(f"() => ({cols})() === {wide}")
