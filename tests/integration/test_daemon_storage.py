"""Storage through a real daemon (``pyvirt daemon --root``, in a network
namespace of its own) and ``pyvirt.Client``, with one real VM: the default
guest on the software CPU booting with a volume as its disk.

A raw volume gets its content by upload; a qcow2 overlay clone of it is the
VM's disk; the guest reads the uploaded bytes and writes its own; meanwhile
deleting or resizing what the VM uses is refused; afterwards the base is
untouched, the overlay holds the guest's write, and qemu-img calls every image
clean. Errors come back with their HTTP status, code and field.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirt.guest import READY_LINE
from tests.daemon_support import (
    BOOT,
    ConsoleReader,
    daemon_env,
    daemon_running,
    ensure_guest,
    guest_marks,
    remove_root,
    short_root,
    wait_for,
)

pytestmark = guest_marks()

ENV = daemon_env()
MiB = 1 << 20
MAGIC = b"PYVIRT-VOLUME-OK"


@pytest.fixture(scope="module", autouse=True)
def _guest() -> None:
    ensure_guest()


@pytest.fixture
def root() -> Iterator[Path]:
    r = short_root("pvs")
    try:  # a network namespace of its own: the default network never reaches the host
        with daemon_running(r, wrap=["unshare", "--net", "--"]):
            yield r
    finally:
        remove_root(r)


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=True)


def _say(con: ConsoleReader, command: str, needle: bytes, timeout: float = 120) -> None:
    mark = con.mark()
    con.send(command.encode() + b"\n")
    con.expect(needle, timeout, since=mark)


def test_volumes_through_the_daemon_and_a_booted_guest(root: Path, tmp_path: Path) -> None:
    from pyvirt.client import Client, ClientError

    c = Client(f"unix://{root / 'run' / 'pyvirtd.sock'}")
    pools = {p["name"]: p for p in c.pool_list()}
    assert pools["default"]["state"] == "active" and pools["default"]["capacity"] > 0
    images = Path(pools["default"]["path"])

    # errors: status, code and field from the daemon
    with pytest.raises(ClientError) as ei:
        c.vol_create("default", "../etc", MiB, "raw")
    assert (ei.value.status, ei.value.code, ei.value.field) == (400, "invalid-argument", "name")
    with pytest.raises(ClientError) as ei:
        c.vol_info("nope", "x")
    assert (ei.value.status, ei.value.message) == (404, "storage pool 'nope' not found")

    # a raw volume filled by upload (streamed), then a qcow2 overlay over it
    c.wait_task(c.vol_create("default", "base", 4 * MiB, "raw"))
    content = MAGIC + bytes(512 - len(MAGIC)) + os.urandom(3 * MiB)
    src = tmp_path / "content.bin"
    src.write_bytes(content)
    with open(src, "rb") as f:
        vol = c.vol_upload("default", "base", f)
    assert vol["capacity"] == len(content) and vol["format"] == "raw"
    assert (images / "base").read_bytes() == content
    task = c.wait_task(c.vol_clone("default", "base", "disk", mode="overlay"))
    assert task["state"] == "done"
    info = json.loads(qemu_img("info", "--output", "json", str(images / "disk")).stdout)
    assert info["full-backing-filename"] == str(images / "base")
    assert info["backing-filename-format"] == "raw"

    c.define({"name": "st1", "accel": "emu", "memory": "256M", "sandbox": "off",
              "disks": [{"volume": "default/disk"}]})
    c.start("st1")
    dom = c.domain("st1")
    con = ConsoleReader(Path(dom["console_socket"]))
    try:
        con.expect(READY_LINE.encode(), BOOT)
        _say(con, "head -c 16 /dev/vda; echo", MAGIC)
        # while the VM runs: its disk and the disk's base cannot go away
        with pytest.raises(ClientError) as ei:
            c.vol_delete("default", "disk")
        assert ei.value.status == 409
        assert ei.value.message == "storage volume 'default/disk' is in use by domain 'st1'"
        with pytest.raises(ClientError) as ei:
            c.vol_delete("default", "base")
        assert ei.value.message == ("storage volume 'default/base' is the backing file of "
                                    "storage volume 'default/disk'")
        with pytest.raises(ClientError) as ei:
            c.vol_resize("default", "disk", 8 * MiB)
        assert ei.value.status == 409 and "in use by" in ei.value.message
        with pytest.raises(ClientError) as ei:
            c.vol_upload("default", "disk", b"x" * 512)
        assert ei.value.status == 409
        # the needle is not in the command: the console echoes what it is sent
        _say(con, "printf GUEST-WROTE-THIS > /dev/vda; sync; echo wrote-$((40+2))", b"wrote-42")
        c.destroy("st1")
    finally:
        con.close()
    wait_for(lambda: c.domain("st1")["state"] == "shut off", 60, "the domain to stop")

    # the guest's write is in the overlay only; every image is clean
    assert (images / "base").read_bytes()[:16] == MAGIC
    flat = tmp_path / "flat.raw"
    qemu_img("convert", "-O", "raw", str(images / "disk"), str(flat))
    assert flat.read_bytes()[:16] == b"GUEST-WROTE-THIS"
    assert flat.read_bytes()[512:] == content[512:]
    qemu_img("check", str(images / "disk"))

    # stopped: a copy flattens it, resize grows it, delete order is enforced
    tid = c.vol_clone("default", "disk", "copy", mode="copy")
    assert c.wait_task(tid)["state"] == "done"
    qemu_img("check", str(images / "copy"))
    qemu_img("compare", str(images / "disk"), str(images / "copy"))
    c.vol_resize("default", "disk", 16 * MiB)
    assert c.vol_info("default", "disk")["capacity"] == 16 * MiB
    c.undefine("st1")
    c.vol_delete("default", "disk")
    c.vol_delete("default", "base")
    assert sorted(v["name"] for v in c.vol_list("default")) == ["copy"]
    assert not [n for n in os.listdir(images) if n.startswith(".")]
