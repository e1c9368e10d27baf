"""Storage pools and volumes (pyvirt.manager.storage), with qemu-img as the referee.

Real store, event bus and tasks on a temporary root; images written by pyvirt
are checked with ``qemu-img info``/``check``/``compare``.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvirt.manager.db import Store
from pyvirt.manager.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    OperationFailed,
    OperationInvalid,
)
from pyvirt.manager.events import EventBus
from pyvirt.manager.paths import DaemonPaths
from pyvirt.manager.storage import Storage
from pyvirt.manager.tasks import Tasks

MiB = 1 << 20


class Env:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths = DaemonPaths.for_root(root)
        self.paths.ensure()
        self.store = Store(self.paths.db)
        self.events = EventBus(self.store)
        self.tasks = Tasks(self.store, self.events)
        self.st = Storage(self.store, self.paths, self.events, self.tasks)
        self.users: dict[str, list[str]] = {}
        self.st.set_user_lookup(lambda p: self.users.get(str(p), []))
        self.st.startup()

    @property
    def pool(self) -> Path:
        return self.paths.pool_default()

    def wait(self, tid: int) -> dict[str, Any]:
        task = self.tasks.wait(tid, timeout=60)
        return task

    def done(self, tid: int) -> dict[str, Any]:
        task = self.wait(tid)
        assert task["state"] == "done", task
        return task

    def restart(self) -> Env:
        self.store.close()
        return Env(self.root)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.store.close()


def qinfo(path: Path) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "--output", "json", str(path)],
                         capture_output=True, text=True, check=True)
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def qcheck(path: Path) -> None:
    res = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def leftovers(pool: Path) -> list[str]:
    return sorted(n for n in os.listdir(pool) if n.startswith("."))


# -- pools ------------------------------------------------------------------------------


def test_default_pool_created_once_active_with_statvfs(env: Env) -> None:
    pools = env.st.pool_list()
    assert [p["name"] for p in pools] == ["default"]
    p = pools[0]
    assert p["state"] == "active" and p["autostart"] and p["type"] == "dir"
    assert p["path"] == str(env.pool) and env.pool.is_dir()
    sv = os.statvfs(env.pool)
    assert p["capacity"] == sv.f_blocks * sv.f_frsize
    assert p["allocation"] == (sv.f_blocks - sv.f_bfree) * sv.f_frsize
    assert abs(p["available"] - sv.f_bavail * sv.f_frsize) < 64 * MiB
    # undefined by the user: not created again at the next start
    env.st.pool_stop("default")
    assert env.st.pool_info("default")["capacity"] is None
    env.st.pool_undefine("default")
    env2 = env.restart()
    try:
        assert env2.st.pool_list() == []
    finally:
        env2.store.close()
        env.store = env2.store


def test_pool_define_checks_fields(env: Env, tmp_path: Path) -> None:
    bad: list[tuple[object, str]] = [
        ({"name": "../x", "path": "/tmp/x"}, "name: "),
        ({"name": "a", "path": "rel/dir"}, "path: 'rel/dir' is not an absolute path"),
        ({"name": "a", "path": "/"}, "path: "),
        ({"name": "a", "path": "/tmp/x", "colour": 1}, "colour: unknown field"),
        ({"name": "a", "path": "/tmp/x", "type": "lvm"}, "type: unsupported pool type"),
        ({"name": "a", "path": "/tmp/x", "autostart": "yes"}, "autostart: "),
        ("not a dict", "a pool definition is an object"),
    ]
    for doc, msg in bad:
        with pytest.raises(InvalidArgument) as ei:
            env.st.pool_define(doc)
        assert str(ei.value).startswith(msg), (doc, str(ei.value))
    with pytest.raises(AlreadyExists, match=r"storage pool 'default' already uses"):
        env.st.pool_define({"name": "other", "path": str(env.pool)})
    with pytest.raises(NotFound, match=r"storage pool 'nope' not found"):
        env.st.pool_start("nope")


def test_pool_lifecycle_and_states(env: Env, tmp_path: Path) -> None:
    d = tmp_path / "p2" / "deep"
    out = env.st.pool_define({"name": "p2", "path": str(d), "autostart": False})
    assert out["path"] == str(d) and out["autostart"] is False
    assert env.st.pool_info("p2")["state"] == "inactive"
    with pytest.raises(OperationInvalid, match=r"storage pool 'p2' is not active"):
        env.st.vol_list("p2")
    with pytest.raises(OperationInvalid, match=r"is not active"):
        env.st.pool_stop("p2")
    env.st.pool_start("p2")  # creates the directory
    assert d.is_dir() and (d.stat().st_mode & 0o777) == 0o711
    with pytest.raises(OperationInvalid, match=r"is already active"):
        env.st.pool_start("p2")
    with pytest.raises(OperationInvalid, match=r"storage pool 'p2' is still active"):
        env.st.pool_undefine("p2")
    env.st.pool_stop("p2")
    env.st.pool_undefine("p2")
    assert d.is_dir()  # files stay, as libvirt's
    kinds = [(e["object"], e["event"]) for e in env.events.recent(kind="pool")]
    assert ("p2", "started") in kinds and ("p2", "undefined") in kinds


def test_vanished_pool_directory_makes_it_inactive_at_start(env: Env, tmp_path: Path) -> None:
    d = tmp_path / "gone"
    env.st.pool_define({"name": "gone", "path": str(d), "autostart": False})
    env.st.pool_start("gone")
    d.rmdir()
    env2 = env.restart()
    try:
        assert env2.st.pool_info("gone")["state"] == "inactive"
        assert any(e["event"] == "stopped" for e in env2.events.recent(kind="pool", obj="gone"))
    finally:
        env2.store.close()
        env.store = env2.store


def test_pool_directory_replaced_by_a_symlink_is_refused(env: Env, tmp_path: Path) -> None:
    d = tmp_path / "sp"
    env.st.pool_define({"name": "sp", "path": str(d)})
    env.st.pool_start("sp")
    d.rmdir()
    (tmp_path / "elsewhere").mkdir()
    d.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OperationFailed, match=r"no longer a directory of its own"):
        env.st.vol_list("sp")


# -- creating volumes ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("prealloc", [False, True])
def test_vol_create_passes_qemu_img(env: Env, fmt: str, prealloc: bool) -> None:
    task = env.done(env.st.vol_create("default", "v1", 64 * MiB + 1, fmt, prealloc=prealloc))
    path = env.pool / "v1"
    assert task["result"]["path"] == str(path)
    info = qinfo(path)
    assert info["format"] == fmt and info["virtual-size"] == 64 * MiB + 512
    if fmt == "qcow2":
        qcheck(path)
    vol = env.st.vol_info("default", "v1")
    assert vol["capacity"] == 64 * MiB + 512 and vol["format"] == fmt
    assert vol["allocation"] == path.stat().st_blocks * 512
    if prealloc:
        assert vol["allocation"] >= 64 * MiB
    else:
        assert vol["allocation"] < MiB
    assert (path.stat().st_mode & 0o777) == 0o600
    assert leftovers(env.pool) == []
    assert env.st.vol_path("default", "v1") == (path, fmt)
    with pytest.raises(AlreadyExists, match=r"storage volume 'default/v1' already exists"):
        env.st.vol_create("default", "v1", MiB, fmt)


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "", "-x", "x" * 129, "a\0b"])
def test_volume_names_never_leave_the_pool(env: Env, name: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^name: a volume name is"):
        env.st.vol_create("default", name, MiB, "raw")
    with pytest.raises(InvalidArgument, match=r"^volume: "):
        env.st.vol_info("default", name)
    assert os.listdir(env.pool) == []


def test_create_checks_capacity_format_backing(env: Env) -> None:
    with pytest.raises(InvalidArgument, match=r"^capacity: "):
        env.st.vol_create("default", "v", -1, "raw")
    with pytest.raises(InvalidArgument, match=r"^capacity: "):
        env.st.vol_create("default", "v", True, "raw")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=r"^format: unknown format 'vmdk'"):
        env.st.vol_create("default", "v", MiB, "vmdk")
    with pytest.raises(InvalidArgument, match=r"^backing: only a qcow2 volume"):
        env.st.vol_create("default", "v", MiB, "raw", backing="x")
    with pytest.raises(InvalidArgument, match=r"^backing: storage volume 'default/x' not found"):
        env.st.vol_create("default", "v", MiB, "qcow2", backing="x")
    with pytest.raises(NotFound, match=r"storage pool 'nope' not found"):
        env.st.vol_create("nope", "v", MiB, "raw")


def test_symlinks_in_a_pool_are_not_volumes(env: Env, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 4096)
    (env.pool / "link").symlink_to(secret)
    assert env.st.vol_list("default") == []
    with pytest.raises(NotFound, match=r"symbolic links are never followed"):
        env.st.vol_path("default", "link")
    with pytest.raises(NotFound):
        env.st.vol_delete("default", "link")
    with pytest.raises(AlreadyExists):  # the link is never replaced nor written through
        env.st.vol_create("default", "link", MiB, "raw")
    assert secret.read_bytes() == b"s" * 4096


def test_overlay_and_copy_clones(env: Env) -> None:
    env.done(env.st.vol_create("default", "base", 8 * MiB, "qcow2"))
    # data in the base, written through pyvirt's own backend
    from pyvirt.disk.open import open_disk

    d = open_disk(env.pool / "base", format="qcow2")
    d.writev([memoryview(b"\xab" * (2 * MiB))], MiB)
    d.close()
    ov = env.done(env.st.vol_clone("default", "base", "ov", mode="overlay"))["result"]
    info = qinfo(env.pool / "ov")
    assert info["full-backing-filename"] == str(env.pool / "base")
    assert info["backing-filename-format"] == "qcow2"
    assert ov["backing"] == str(env.pool / "base") and ov["capacity"] == 8 * MiB
    qcheck(env.pool / "ov")
    tid = env.st.vol_clone("default", "ov", "full", mode="copy")
    task = env.done(tid)
    assert task["result"]["format"] == "qcow2" and task["result"]["backing"] is None
    qcheck(env.pool / "full")
    qemu_img("compare", str(env.pool / "ov"), str(env.pool / "full"))
    assert "backing-filename" not in qinfo(env.pool / "full")
    assert any(e["event"] == "progress" for e in env.events.recent(kind="task", obj=str(tid)))
    with pytest.raises(InvalidArgument, match=r"^mode: 'deep' is not overlay or copy"):
        env.st.vol_clone("default", "base", "x", mode="deep")
    # a raw copy stays raw
    env.done(env.st.vol_create("default", "r", 4 * MiB, "raw"))
    env.done(env.st.vol_clone("default", "r", "r2", mode="copy"))
    assert qinfo(env.pool / "r2")["format"] == "raw"
    assert leftovers(env.pool) == []


def test_failed_copy_leaves_no_volume(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    env.done(env.st.vol_create("default", "src", 4 * MiB, "raw"))
    import pyvirt.disk.copy as copymod

    def boom(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(copymod, "copy_content", boom)
    task = env.wait(env.st.vol_clone("default", "src", "dst", mode="copy"))
    assert task["state"] == "failed"
    assert task["error"] == ("vol-clone of storage volume 'default/dst' failed: "
                             "No space left on device")
    assert sorted(os.listdir(env.pool)) == ["src"]
    with pytest.raises(NotFound):
        env.st.vol_info("default", "dst")


def test_daemon_death_during_a_copy_leaves_no_volume(env: Env,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    env.done(env.st.vol_create("default", "src", 4 * MiB, "raw"))
    import pyvirt.disk.copy as copymod

    started, never = threading.Event(), threading.Event()
    real = copymod.copy_content

    def stuck(*args: Any, **kwargs: Any) -> None:
        real(*args, **kwargs)  # the staged file is fully written, not yet in place
        started.set()
        never.wait(30)
        raise OSError(5, "the daemon died")

    monkeypatch.setattr(copymod, "copy_content", stuck)
    tid = env.st.vol_clone("default", "src", "dst", mode="copy")
    assert started.wait(30)
    assert any(".dst.part-" in n for n in os.listdir(env.pool))
    # a new daemon on the same state: the task failed, its partial file removed
    store2 = Store(env.paths.db)
    try:
        ev2 = EventBus(store2)
        tasks2 = Tasks(store2, ev2)
        assert len(tasks2.recover()) == 1
        st2 = Storage(store2, env.paths, ev2, tasks2)
        st2.startup()
        assert sorted(os.listdir(env.pool)) == ["src"]
        assert [v["name"] for v in st2.vol_list("default")] == ["src"]
    finally:
        never.set()
        for t in threading.enumerate():  # the old daemon's thread ends before the store closes
            if t.name == f"task-{tid}":
                t.join(30)
        store2.close()


# -- the recorded format ---------------------------------------------------------------


def test_format_is_recorded_never_probed(env: Env, tmp_path: Path) -> None:
    """A guest writes a qcow2 header naming a host file into its raw volume:
    the volume stays raw for the next start."""
    env.done(env.st.vol_create("default", "guestdisk", 16 * MiB, "raw"))
    evil = tmp_path / "evil.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", str(evil), "16M")
    with open(env.pool / "guestdisk", "r+b") as f:
        f.write(evil.read_bytes())
    assert qinfo(env.pool / "guestdisk")["format"] == "qcow2"  # what probing would say
    assert env.st.vol_path("default", "guestdisk") == (env.pool / "guestdisk", "raw")
    assert env.st.vol_info("default", "guestdisk")["format"] == "raw"
    env.st.pool_refresh("default")
    env2 = env.restart()
    try:
        assert env2.st.vol_path("default", "guestdisk")[1] == "raw"
    finally:
        env2.store.close()
        env.store = env2.store


def test_files_put_in_a_pool_are_adopted_on_refresh(env: Env) -> None:
    qemu_img("create", "-f", "qcow2", str(env.pool / "handmade"), "3M")
    env.st.pool_refresh("default")
    vols = {v["name"]: v for v in env.st.vol_list("default")}
    assert vols["handmade"]["format"] == "qcow2" and vols["handmade"]["capacity"] == 3 * MiB
    (env.pool / "handmade").unlink()
    env.st.pool_refresh("default")
    assert env.st.vol_list("default") == []


def test_qcow2_volume_backed_outside_the_pools_is_refused(env: Env, tmp_path: Path) -> None:
    outside = tmp_path / "outside.raw"
    outside.write_bytes(bytes(MiB))
    qemu_img("create", "-f", "qcow2", "-b", str(outside), "-F", "raw",
             str(env.pool / "sneaky"), "1M")
    env.st.pool_refresh("default")
    with pytest.raises(OperationInvalid, match=rf"backing file {outside} is outside every "
                                               r"storage pool"):
        env.st.vol_path("default", "sneaky")


# -- resize, delete -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_resize_grows_only(env: Env, fmt: str) -> None:
    env.done(env.st.vol_create("default", "g", 4 * MiB, fmt))
    env.st.vol_resize("default", "g", 10 * MiB)
    assert qinfo(env.pool / "g")["virtual-size"] == 10 * MiB
    if fmt == "qcow2":
        qcheck(env.pool / "g")
    assert env.st.vol_info("default", "g")["capacity"] == 10 * MiB
    with pytest.raises(InvalidArgument, match=r"^capacity: .*shrinking a volume is not supported"):
        env.st.vol_resize("default", "g", 4 * MiB)
    assert qinfo(env.pool / "g")["virtual-size"] == 10 * MiB


def test_resize_and_delete_refused_while_a_process_has_it_open(env: Env) -> None:
    env.done(env.st.vol_create("default", "busy", 4 * MiB, "qcow2"))
    from pyvirt.disk.open import open_disk

    d = open_disk(env.pool / "busy", format="qcow2")  # as a running VMM holds it
    try:
        with pytest.raises(OperationInvalid, match=r"in use by"):
            env.st.vol_resize("default", "busy", 8 * MiB)
        with pytest.raises(OperationInvalid, match=r"in use by"):
            env.st.vol_delete("default", "busy")
        with pytest.raises(OperationInvalid, match=r"in use by"):
            env.st.vol_upload("default", "busy", [b"x" * 512], 512)
        with pytest.raises(OperationInvalid, match=r"in use by"):
            env.st.vol_clone("default", "busy", "ov", mode="overlay")
    finally:
        d.close()
    assert (env.pool / "busy").exists()


def test_delete_refused_while_a_domain_or_an_overlay_uses_it(env: Env) -> None:
    env.done(env.st.vol_create("default", "base", 4 * MiB, "qcow2"))
    env.done(env.st.vol_clone("default", "base", "ov", mode="overlay"))
    env.users[str(env.pool / "ov")] = ["web1"]
    with pytest.raises(OperationInvalid,
                       match=r"storage volume 'default/ov' is in use by domain 'web1'"):
        env.st.vol_delete("default", "ov")
    with pytest.raises(OperationInvalid, match=r"is the backing file of storage volume "
                                               r"'default/ov'"):
        env.st.vol_delete("default", "base")
    env.users.clear()
    env.st.vol_delete("default", "ov")
    env.st.vol_delete("default", "base")
    assert os.listdir(env.pool) == []
    with pytest.raises(NotFound, match=r"storage volume 'default/base' not found"):
        env.st.vol_delete("default", "base")
    evs = [e["event"] for e in env.events.recent(kind="volume", obj="default/base")]
    assert evs == ["created", "deleted"]


# -- import ----------------------------------------------------------------------------


def test_import_copy_and_move(env: Env, tmp_path: Path) -> None:
    raw = tmp_path / "disk.img"
    with open(raw, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(3 * MiB)
        f.write(b"\x5a" * MiB)
    env.done(env.st.vol_import("default", "imp", str(raw)))
    qemu_img("compare", "-f", "raw", "-F", "raw", str(raw), str(env.pool / "imp"))
    assert (env.pool / "imp").stat().st_blocks * 512 < 4 * MiB  # holes kept
    q = tmp_path / "q.qcow2"
    qemu_img("create", "-f", "qcow2", str(q), "6M")
    env.done(env.st.vol_import("default", "moved", str(q), mode="move"))
    assert not q.exists()
    assert env.st.vol_path("default", "moved") == (env.pool / "moved", "qcow2")
    qcheck(env.pool / "moved")
    with pytest.raises(InvalidArgument, match=r"^source: .*: no such file"):
        env.st.vol_import("default", "x", str(tmp_path / "missing"))
    with pytest.raises(InvalidArgument, match=r"^source: 'rel' is not an absolute path"):
        env.st.vol_import("default", "x", "rel")
    with pytest.raises(InvalidArgument, match=r"^source: .* is already volume 'default/imp'"):
        env.st.vol_import("default", "x", str(env.pool / "imp"))
    with pytest.raises(InvalidArgument, match=r"^mode: "):
        env.st.vol_import("default", "x", str(raw), mode="link")


def test_import_qcow2_backing_must_lie_in_a_pool(env: Env, tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(2 * MiB))
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(top))
    with pytest.raises(InvalidArgument, match=rf"^source: backing file {base} is outside every "
                                              r"storage pool"):
        env.st.vol_import("default", "top", str(top))
    assert os.listdir(env.pool) == []
    # the same backing file imported first: the chain then stays in the pools,
    # and the relative name (wrong from the pool's directory) is made absolute
    env.done(env.st.vol_import("default", "base.raw", str(base), format="raw"))
    os.unlink(base)
    pool_dir = env.pool
    top2 = tmp_path / "top2.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(pool_dir / "base.raw"), "-F", "raw", str(top2))
    env.done(env.st.vol_import("default", "top2", str(top2)))
    info = qinfo(pool_dir / "top2")
    assert info["full-backing-filename"] == str(pool_dir / "base.raw")
    qcheck(pool_dir / "top2")
    # a raw volume whose guest wrote a qcow2 header into it, named as a qcow2
    # backing file: what the pool records wins, the image is refused
    planted = tmp_path / "planted.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", str(planted), "2M")
    with open(pool_dir / "base.raw", "r+b") as f:
        f.write(planted.read_bytes())
    top3 = tmp_path / "top3.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(pool_dir / "base.raw"), "-F", "qcow2", "-u",
             str(top3), "2M")
    with pytest.raises(InvalidArgument, match=r"reads its backing file as qcow2, but volume "
                                              r"'default/base.raw' is raw"):
        env.st.vol_import("default", "top3", str(top3))


def test_import_relative_backing_is_made_absolute(env: Env, tmp_path: Path) -> None:
    other = tmp_path / "pool2"
    env.st.pool_define({"name": "p2", "path": str(other)})
    env.st.pool_start("p2")
    env.done(env.st.vol_create("p2", "base", 2 * MiB, "qcow2"))
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    top = src_dir / "top.qcow2"  # its relative backing name means pool2/base from here only
    qemu_img("create", "-f", "qcow2", "-b", "../pool2/base", "-F", "qcow2", str(top))
    env.done(env.st.vol_import("default", "top", str(top)))
    info = qinfo(env.pool / "top")
    assert info["backing-filename"] == str(other / "base")
    qcheck(env.pool / "top")


def test_import_of_a_damaged_qcow2_is_refused(env: Env, tmp_path: Path) -> None:
    q = tmp_path / "bad.qcow2"
    qemu_img("create", "-f", "qcow2", str(q), "4M")
    data = bytearray(q.read_bytes())
    # point the L1 table's first entry at a cluster past the end of the file
    l1 = int.from_bytes(data[40:48], "big")
    data[l1:l1 + 8] = ((1 << 63) | (1 << 40)).to_bytes(8, "big")
    q.write_bytes(bytes(data))
    task = env.wait(env.st.vol_import("default", "bad", str(q)))
    assert task["state"] == "failed"
    assert task["error"].startswith("source: the qcow2 image is damaged (2 errors"), task
    assert os.listdir(env.pool) == []


# -- upload ----------------------------------------------------------------------------


def test_upload_raw(env: Env) -> None:
    env.done(env.st.vol_create("default", "u", 4 * MiB, "raw"))
    payload = os.urandom(MiB + 100)
    vol = env.st.vol_upload("default", "u", [payload[:5000], payload[5000:]], len(payload))
    assert vol["capacity"] == MiB + 512  # whole sectors
    got = (env.pool / "u").read_bytes()
    assert got[:len(payload)] == payload and got[len(payload):] == bytes(412)
    assert qinfo(env.pool / "u")["format"] == "raw"
    # a file-like stream, no declared length
    import io

    env.st.vol_upload("default", "u", io.BytesIO(b"\1" * 2048), None)
    assert (env.pool / "u").read_bytes() == b"\1" * 2048


def test_upload_length_must_match(env: Env) -> None:
    env.done(env.st.vol_create("default", "u", MiB, "raw"))
    before = (env.pool / "u").read_bytes()
    with pytest.raises(InvalidArgument, match=r"^length: the upload to storage volume 'default/u' "
                                              r"ended after 1000 of the 4096 bytes declared"):
        env.st.vol_upload("default", "u", [b"a" * 1000], 4096)
    with pytest.raises(InvalidArgument, match=r"^length: .* sent more than the 100 bytes"):
        env.st.vol_upload("default", "u", [b"a" * 1000], 100)
    with pytest.raises(InvalidArgument, match=r"^length: .* do not fit in storage pool"):
        env.st.vol_upload("default", "u", [b""], 1 << 62)
    assert (env.pool / "u").read_bytes() == before
    assert leftovers(env.pool) == []


def test_upload_qcow2_is_checked(env: Env, tmp_path: Path) -> None:
    env.done(env.st.vol_create("default", "q", MiB, "qcow2"))
    good = tmp_path / "good.qcow2"
    qemu_img("create", "-f", "qcow2", str(good), "5M")
    env.st.vol_upload("default", "q", [good.read_bytes()], good.stat().st_size)
    assert env.st.vol_info("default", "q")["capacity"] == 5 * MiB
    qcheck(env.pool / "q")
    evil = tmp_path / "evil.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", str(evil), "1M")
    with pytest.raises(InvalidArgument, match=r"backing file /etc/passwd is outside every "
                                              r"storage pool"):
        env.st.vol_upload("default", "q", [evil.read_bytes()], evil.stat().st_size)
    with pytest.raises(InvalidArgument, match=r"^data: the image is not qcow2 \(storage volume "
                                              r"'default/q' is a qcow2 volume\)"):
        env.st.vol_upload("default", "q", [b"not qcow2" * 100], 900)
    broken = bytearray(good.read_bytes())
    broken[20:24] = (30).to_bytes(4, "big")  # cluster_bits out of range
    with pytest.raises(InvalidArgument, match=r"^data: the image: not a usable qcow2 image: "
                                              r"cluster_bits 30"):
        env.st.vol_upload("default", "q", [bytes(broken)], len(broken))
    assert env.st.vol_info("default", "q")["capacity"] == 5 * MiB
    assert leftovers(env.pool) == []


def test_interrupted_upload_leaves_no_partial_file(env: Env) -> None:
    env.done(env.st.vol_create("default", "u", MiB, "raw"))

    def stream() -> Iterator[bytes]:
        yield b"x" * 4096
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        env.st.vol_upload("default", "u", stream(), 8192)
    assert leftovers(env.pool) == []
    assert (env.pool / "u").stat().st_size == MiB


def test_import_move_of_a_file_with_another_name_copies_it(env: Env, tmp_path: Path) -> None:
    """A moved file that still has another name (someone could write the
    volume through it) is copied, then its moved name removed."""
    src = tmp_path / "img.raw"
    src.write_bytes(b"\x11" * MiB)
    os.link(src, tmp_path / "other-name")
    env.done(env.st.vol_import("default", "mv", str(src), mode="move"))
    assert not src.exists()
    vol = env.pool / "mv"
    assert vol.stat().st_ino != (tmp_path / "other-name").stat().st_ino
    assert vol.stat().st_nlink == 1 and vol.read_bytes() == b"\x11" * MiB
    # a file with one name moves by link: the same inode, no copy
    lone = tmp_path / "lone.raw"
    lone.write_bytes(b"\x22" * MiB)
    ino = lone.stat().st_ino
    env.done(env.st.vol_import("default", "mv2", str(lone), mode="move"))
    assert not lone.exists() and (env.pool / "mv2").stat().st_ino == ino
    assert leftovers(env.pool) == []
