"""The VM page's edits on a shut-off VM (no boot): disks added, grown and removed with
their volume, autostart, a clone made through its dialog, an API error shown next to
the field it names; a viewer sees the page but every change is disabled."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.daemon_support import wait_for
from tests.web.support import ADMIN, WebDaemon, define_vm, login

pytestmark = [pytest.mark.web]

UI = 30_000
GIB = 1 << 30
VIEWER = ("vera", "vera-password-1")


def test_disks_autostart_and_clone(web_daemon: WebDaemon, page: Any) -> None:
    c = web_daemon.client
    name = "web-edit"
    define_vm(c, name)
    login(page, *ADMIN, url=web_daemon.url)
    page.goto(f"{web_daemon.url}/#/vms/{name}/disks")

    # add: a field error from the page first, then a real disk
    page.get_by_label("Size (GiB)").fill("0")
    page.get_by_role("button", name="Add disk").click()
    page.locator("[data-error-for=size_bytes]").get_by_text("GiB").wait_for()
    page.get_by_label("Size (GiB)").fill("1")
    page.get_by_role("button", name="Add disk").click()
    row = page.locator("tr[data-disk='0']")
    row.get_by_text("1.0 GiB").wait_for(timeout=UI)
    pool, vol = c.domain(name)["definition"]["disks"][0]["volume"].split("/", 1)

    # grow it to 2 GiB; shrinking is refused in the page
    row.get_by_role("button", name="Resize").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("New size (GiB)").fill("0.5")
    dialog.get_by_role("button", name="Resize").click()
    dialog.get_by_text("Grow only").wait_for()
    dialog.get_by_label("New size (GiB)").fill("2")
    dialog.get_by_role("button", name="Resize").click()
    dialog.wait_for(state="detached", timeout=UI)
    row.get_by_text("2.0 GiB").wait_for(timeout=UI)
    assert next(v for v in c.vol_list(pool) if v["name"] == vol)["capacity"] == 2 * GIB

    # autostart from the overview
    page.get_by_role("tab", name="Overview").click()
    page.get_by_label("Start with the daemon (autostart)").check()
    wait_for(lambda: c.domain(name)["autostart"], 15, "autostart on")

    # clone through its dialog: the page of the clone opens; its disk is a copy
    page.get_by_role("button", name="Clone", exact=True).click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("New name").fill("bad name!")
    dialog.get_by_role("button", name="Clone").click()
    dialog.locator("[data-error-for=name]").get_by_text("Letters").wait_for()
    dialog.get_by_label("New name").fill(f"{name}-copy")
    dialog.get_by_role("button", name="Clone").click()
    page.wait_for_url(re.compile(rf"#/vms/{name}-copy$"), timeout=60_000)
    assert page.get_by_role("heading", level=1).text_content() == f"{name}-copy"
    copy = c.domain(f"{name}-copy")
    assert copy["uuid"] != c.domain(name)["uuid"]
    assert copy["definition"]["disks"][0]["volume"] != f"{pool}/{vol}"

    # remove the original's disk together with its volume
    page.goto(f"{web_daemon.url}/#/vms/{name}/disks")
    page.locator("tr[data-disk='0']").get_by_role("button", name="Remove").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Also delete its volume").check()
    dialog.get_by_role("button", name="Remove").click()
    page.get_by_text("No disks.").wait_for(timeout=UI)
    assert not c.domain(name)["definition"].get("disks")
    assert all(v["name"] != vol for v in c.vol_list(pool))


def test_viewer_sees_but_cannot_change(web_daemon: WebDaemon, page: Any) -> None:
    c = web_daemon.client
    name = "web-view"
    define_vm(c, name)
    c.user_add(VIEWER[0], VIEWER[1], role="viewer")
    c.user_grant(VIEWER[0], name)
    login(page, *VIEWER, url=web_daemon.url)
    page.goto(f"{web_daemon.url}/#/vms/{name}")
    page.locator("main [data-field=state]").get_by_text("shut off").wait_for(timeout=UI)
    for label in ("Start", "Clone", "Delete"):
        assert page.get_by_role("button", name=label, exact=True).is_disabled()
    page.get_by_role("tab", name="Snapshots").click()
    assert page.get_by_role("button", name="Take snapshot").is_disabled()
    page.get_by_role("tab", name="Disks").click()
    assert page.get_by_role("button", name="Add disk").is_disabled()



def test_network_tab_without_networks(web_daemon: WebDaemon, page: Any) -> None:
    # this harness's daemon runs --no-networks (a NIC on a network needs a bridge on the
    # host): the tab says so and offers nothing it cannot do
    c = web_daemon.client
    name = "web-nic"
    define_vm(c, name)
    login(page, *ADMIN, url=web_daemon.url)
    page.goto(f"{web_daemon.url}/#/vms/{name}/network")
    page.get_by_text("No network interfaces.").wait_for(timeout=UI)
    page.get_by_label("Network", exact=True).get_by_text("no network defined").wait_for(
        state="attached", timeout=UI)
    assert page.get_by_role("button", name="Add interface").is_disabled()
