"""The create wizard (issue #13): the page checks its fields before anything is sent
(an empty name, more CPUs than the host allows, a disk of 0 GiB); an error of the
API (a name that already exists) is shown next to the field it names and changes
nothing; "Create and start" with a new 1 GiB qcow2 disk in the default pool makes
the volume (qemu-img is the referee), defines and starts the VM (a real guest on
the software CPU) and lands on its console."""

from __future__ import annotations

import contextlib
import json
import subprocess
from typing import Any

import pytest

from tests.web.support import ADMIN, ALICE, WebDaemon, define_vm, login

GiB = 1 << 30


def error_at(page: Any, field: str) -> Any:
    return page.locator(f'[data-error-for="{field}"]')


def open_wizard(page: Any, url: str) -> None:
    page.goto(url + "/#/new")
    login(page, *ADMIN)
    page.get_by_role("heading", name="New virtual machine", level=1).wait_for()
    # the host's limits are shown once /v1/host answered
    page.get_by_text("on this host").first.wait_for()


def test_fields_are_checked_in_the_page(web_daemon: WebDaemon, page: Any) -> None:
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST"
            and "/v1/session" not in r.url else None)
    open_wizard(page, web_daemon.url)
    host = web_daemon.client.host()
    page.get_by_role("button", name="Create", exact=True).click()
    name_err = error_at(page, "name")
    name_err.wait_for()
    assert "Enter a name" in name_err.inner_text()
    # the field says it is invalid and points at its message; focus went there
    name = page.get_by_label("Name", exact=True)
    assert name.get_attribute("aria-invalid") == "true"
    assert page.evaluate("document.activeElement.id") == "wz-name"

    name.fill("bad name!")
    page.get_by_role("button", name="Create", exact=True).click()
    page.wait_for_function(
        "() => document.querySelector('[data-error-for=name]').textContent.includes('letters')")

    name.fill("fine1")
    max_cpus = page.get_by_label("CPUs").get_attribute("max")
    # the limit shown is the host's
    # "Automatic" means what this host gives its VMs: here the software CPU, one vCPU
    assert max_cpus is not None
    assert int(max_cpus) == host["limits"]["max_vcpus_by_accel"]["auto"]
    if host["limits"]["accel_auto"] == "emu":
        assert int(max_cpus) == 1
    page.get_by_label("CPUs").fill(str(int(max_cpus) + 1))
    page.get_by_label("Memory (MiB)").fill("15")
    page.get_by_role("button", name="Add disk").click()
    page.get_by_label("Size (GiB)").fill("0")
    page.get_by_role("button", name="Create", exact=True).click()
    cpus_err = error_at(page, "cpus")
    cpus_err.wait_for()
    assert f"At most {max_cpus}" in cpus_err.inner_text()
    assert error_at(page, "name").is_hidden()
    assert "16 MiB" in error_at(page, "memory").inner_text()
    assert "above 0" in error_at(page, "disks[0].size").inner_text()
    # nothing was sent: no volume, no domain
    assert posts == []
    assert all(d["name"] != "fine1" for d in web_daemon.client.list_domains())


def test_api_error_shows_at_its_field(web_daemon: WebDaemon, page: Any) -> None:
    c = web_daemon.client
    define_vm(c, "taken", description="the original")
    answers: list[int] = []
    page.on("response", lambda r: answers.append(r.status)
            if r.request.method == "POST" and r.url.endswith("/v1/domains") else None)
    open_wizard(page, web_daemon.url)
    page.get_by_label("Name", exact=True).fill("taken")
    page.get_by_label("Description").fill("a replacement")
    page.get_by_role("button", name="Create", exact=True).click()
    err = error_at(page, "name")
    err.wait_for()
    assert "already exists" in err.inner_text()
    # the daemon refused it (the page did not guess), and the original is untouched
    assert answers == [409]
    d = c.domain("taken")
    assert d["description"] == "the original"
    assert page.evaluate("location.hash") == "#/new"
    c.undefine("taken")


@pytest.mark.guest
@pytest.mark.slow
def test_create_and_start_with_a_new_disk_opens_the_console(
        web_daemon: WebDaemon, page: Any) -> None:
    c = web_daemon.client
    open_wizard(page, web_daemon.url)
    try:
        page.get_by_label("Name", exact=True).fill("wiz1")
        page.get_by_label("Default guest").check()
        page.get_by_label("Memory (MiB)").fill("256")
        page.get_by_label("Accelerator").select_option("emu")
        page.get_by_role("button", name="Add disk").click()
        disk = page.locator("fieldset[data-disk='0']")
        assert disk.get_by_label("Pool").input_value() == "default"
        disk.get_by_label("Size (GiB)").fill("1")
        page.get_by_label("Network").select_option("")
        page.get_by_role("button", name="Create and start").click()
        page.wait_for_function("() => location.hash === '#/vms/wiz1/console'", timeout=120000)

        d = c.domain("wiz1")
        assert d["state"] == "running", d
        assert d["definition"]["disks"] == [{"volume": "default/wiz1.qcow2"}]
        assert d["definition"]["accel"] == "emu"
        assert d["definition"]["memory"] == 256 << 20
        vol = c.vol_info("default", "wiz1.qcow2")
        assert vol["format"] == "qcow2" and vol["capacity"] == GiB
        info = json.loads(subprocess.run(
            ["qemu-img", "info", "--output=json", "-U", vol["path"]],
            check=True, capture_output=True, text=True).stdout)
        assert info["format"] == "qcow2"
        assert info["virtual-size"] == GiB
    finally:
        # leave the console page first: its reconnects would race the removal
        page.goto("about:blank")
        with contextlib.suppress(Exception):
            c.destroy("wiz1")
        with contextlib.suppress(Exception):
            c.undefine("wiz1", remove_storage=True)


def test_existing_image_as_copy_or_overlay(web_daemon: WebDaemon, page: Any) -> None:
    """The image is taken as a full copy or as the backing file of a new qcow2
    overlay: the original stays as it was (the defined VM is not started)."""
    c = web_daemon.client
    c.wait_task(c.vol_create("default", "base.qcow2", 64 << 20))
    base = c.vol_info("default", "base.qcow2")
    open_wizard(page, web_daemon.url)
    try:
        for name, mode in (("img-copy", "Import a copy"), ("img-over", "Backing file (overlay)")):
            page.evaluate("location.hash = '#/new'")
            page.get_by_label("Name", exact=True).wait_for()
            page.get_by_label("Name", exact=True).fill(name)
            page.get_by_label("Existing disk image").check()
            page.get_by_label("Volume").select_option("base.qcow2")
            page.get_by_label(mode).check()
            page.get_by_role("button", name="Create", exact=True).click()
            page.wait_for_function(f"() => location.hash === '#/vms/{name}'", timeout=60000)
            d = c.domain(name)
            assert d["state"] == "shut off"
            assert d["definition"]["disks"] == [{"volume": f"default/{name}.qcow2"}]
            vol = c.vol_info("default", f"{name}.qcow2")
            info = json.loads(subprocess.run(
                ["qemu-img", "info", "--output=json", "-U", vol["path"]],
                check=True, capture_output=True, text=True).stdout)
            assert info["format"] == "qcow2" and info["virtual-size"] == 64 << 20
            if mode.startswith("Backing"):
                assert info.get("full-backing-filename") == base["path"], info
            else:
                assert "backing-filename" not in info, info
        assert c.vol_info("default", "base.qcow2")["path"] == base["path"]
    finally:
        for name in ("img-copy", "img-over"):
            with contextlib.suppress(Exception):
                c.undefine(name, remove_storage=True)
        with contextlib.suppress(Exception):
            c.vol_delete("default", "base.qcow2")


def test_a_user_may_not_boot_host_files(web_daemon: WebDaemon, page: Any) -> None:
    page.goto(web_daemon.url + "/#/new")
    login(page, *ALICE)
    page.get_by_role("heading", name="New virtual machine", level=1).wait_for()
    assert page.get_by_label("Kernel and initrd").is_disabled()
    assert page.get_by_label("ISO image").is_disabled()
    assert page.get_by_label("Default guest").is_checked()
