"""Many tabs of the GUI in one browser stay alive.

A browser holds at most 6 HTTP/1.1 connections to a host. The pages' live
streams (events, metrics) are WebSockets, which that limit does not count: with
them on server-sent events, each open tab held two connections and the fourth
tab could not even load its page. Eight tabs here, each on a live page, each
seeing a domain defined through the API appear in its list.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.web.support import ADMIN, WebDaemon, define_vm, login

pytestmark = [pytest.mark.web]

TABS = 8


def test_eight_live_tabs_in_one_browser(web_daemon: WebDaemon, page: Any) -> None:
    login(page, *ADMIN, url=web_daemon.url)
    ctx = page.context
    tabs = [page]
    routes = ["#/vms", "#/", "#/vms", "#/vms", "#/", "#/vms", "#/vms", "#/vms"]
    page.goto(f"{web_daemon.url}/{routes[0]}")
    for route in routes[1:]:
        tab = ctx.new_page()
        tab.set_default_timeout(15000)
        tab.goto(f"{web_daemon.url}/{route}")
        tabs.append(tab)
    assert len(tabs) == TABS
    for tab in tabs:  # every tab loaded its page (the shell's Log out button)
        tab.get_by_role("button", name="Log out").wait_for()
    # the streams are WebSockets, not server-sent events
    assert page.evaluate("performance.getEntriesByType('resource')"
                         ".filter(r => /\\/v1\\/(events|metrics\\/stream)(\\?|$)/"
                         ".test(r.name)).length") == 0

    define_vm(web_daemon.client, "tabs-new")
    for i, (tab, route) in enumerate(zip(tabs, routes, strict=True)):
        if route == "#/vms":
            tab.locator('tr[data-vm="tabs-new"]').wait_for(timeout=15000)
        else:  # the dashboard: the VM's "defined" event in Recent events
            tab.get_by_role("region", name="Recent events").get_by_text(
                "tabs-new").first.wait_for(timeout=15000)
        assert tab.get_by_role("button", name="Log out").is_visible(), i
    web_daemon.client.undefine("tabs-new")
