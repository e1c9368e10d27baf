"""The dashboard (issue #13): host CPU, memory and disk regions, each with a chart
whose drawn samples (data-points) grow live from the daemon's metrics stream with
no reload; VMs by state from the live domain list; recent tasks and events."""

from __future__ import annotations

from typing import Any

from tests.web.support import ADMIN, WebDaemon, define_vm, login

CHARTS = {"Host CPU": "host-cpu", "Host memory": "host-mem", "Host disk": "host-disk"}


def points(page: Any, chart: str) -> int:
    return int(page.locator(f"[data-chart={chart}]").get_attribute("data-points") or 0)


def test_host_charts_grow_live(web_daemon: WebDaemon, page: Any) -> None:
    c = web_daemon.client
    page.goto(web_daemon.url + "/")
    login(page, *ADMIN)
    page.get_by_role("heading", name="Dashboard", level=1).wait_for()
    for region, chart in CHARTS.items():
        r = page.get_by_role("region", name=region)
        assert r.is_visible()
        assert r.locator(f"[data-chart={chart}]").count() == 1
    page.evaluate("window.__sameDocument = true")
    page.wait_for_function("() => Number(document.querySelector('[data-chart=host-cpu]')"
                           ".dataset.points) >= 1", timeout=20000)
    before = {chart: points(page, chart) for chart in CHARTS.values()}
    # the daemon samples every 2 s: a few more samples arrive over the stream
    page.wait_for_function(
        "(b) => ['host-cpu', 'host-mem', 'host-disk'].every(c => Number(document.querySelector("
        "`[data-chart=${c}]`).dataset.points) >= b[c] + 2)", arg=before, timeout=30000)
    # a chart draws its samples: uPlot's canvas is there and has a size
    box = page.locator("[data-chart=host-cpu] canvas").bounding_box()
    assert box is not None and box["width"] > 100 and box["height"] > 50
    assert page.evaluate("window.__sameDocument") is True

    # VMs by state and recent events follow the event stream
    by_state = page.get_by_role("region", name="Virtual machines by state")
    shut_off = by_state.locator("li", has_text="shut off").locator(".count")
    n = int(shut_off.inner_text())
    define_vm(c, "dash1")
    page.wait_for_function("(n) => [...document.querySelectorAll('.bystate li')].some(li => "
                           "li.textContent.startsWith('shut off') && "
                           "Number(li.querySelector('.count').textContent) === n + 1)", arg=n)
    events = page.get_by_role("region", name="Recent events")
    events.get_by_role("link", name="dash1").wait_for()
    assert "defined" in events.inner_text()
    # a task (a new volume) shows in Recent tasks, pushed by its events
    tid = c.vol_create("default", "dash1.qcow2", 1 << 20)
    c.wait_task(tid)
    tasks = page.get_by_role("region", name="Recent tasks")
    tasks.locator("li", has_text=f"#{tid}").wait_for()
    assert "done" in tasks.locator("li", has_text=f"#{tid}").inner_text()
    c.undefine("dash1")
    c.vol_delete("default", "dash1.qcow2")
