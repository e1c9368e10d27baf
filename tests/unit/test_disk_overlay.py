"""``open_overlay`` + ``make_readonly``: what ``PUT /vm/disk-overlay`` does to a
disk (end to end in tests/integration/test_vmm_daemon_side.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pyvirt.disk.backend import DiskError
from pyvirt.disk.lock import open_image_file
from pyvirt.disk.open import open_disk, open_overlay


def qemu_img(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)


def read(disk: object, offset: int, n: int) -> bytes:
    buf = bytearray(n)
    disk.readv([memoryview(buf)], offset)  # type: ignore[attr-defined]
    return bytes(buf)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_overlay_takes_the_writes_the_old_top_is_kept(tmp_path: Path, fmt: str) -> None:
    base = tmp_path / f"base.{fmt}"
    assert qemu_img("create", "-q", "-f", fmt, base, "4M").returncode == 0
    disk = open_disk(base, format=fmt, what="disks[0].path")
    disk.writev([memoryview(b"\x01" * 4096)], 0)  # written, not flushed yet
    ov = tmp_path / "ov.qcow2"
    new = open_overlay(disk, ov, what="disks[0]")
    disk.make_readonly()  # type: ignore[attr-defined]
    try:
        assert disk.readonly and not new.readonly and new.size == disk.size
        new.writev([memoryview(b"\x02" * 4096)], 8192)
        assert read(new, 0, 4096) == b"\x01" * 4096  # from the old top
        assert read(new, 8192, 4096) == b"\x02" * 4096
        # the old top is a reader now: qemu-img may look at it, nobody may write it
        assert qemu_img("info", "-U", base).returncode == 0
        with pytest.raises(DiskError, match="in use by"):
            open_image_file(base, readonly=False, direct=False, what="x").close()
        ro = open_image_file(base, readonly=True, direct=False, what="x")
        ro.close()
    finally:
        new.close()  # closes the whole chain, the old top too
    info = qemu_img("info", "--output", "json", ov)
    assert f'"backing-filename": "{base}"' in info.stdout
    assert f'"backing-filename-format": "{fmt}"' in info.stdout
    for f in (base, ov):
        if f.suffix == ".qcow2":
            assert qemu_img("check", f).returncode == 0
    # the new data only in the overlay, the old in the base
    assert qemu_img("compare", "-f", fmt, "-F", "qcow2", base, ov).returncode == 1
    raw = tmp_path / "base.raw.out"
    qemu_img("convert", "-O", "raw", "-f", fmt, base, raw)
    data = raw.read_bytes()
    assert data[:4096] == b"\x01" * 4096 and data[8192:12288] == bytes(4096)


def test_a_failed_overlay_leaves_the_old_top_and_no_file(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", base, "4M").returncode == 0
    disk = open_disk(base, format="qcow2", what="disks[0].path")
    try:
        exists = tmp_path / "exists.qcow2"
        exists.write_bytes(b"mine")
        with pytest.raises(DiskError, match="disks\\[0\\]: "):
            open_overlay(disk, exists, what="disks[0]")
        assert exists.read_bytes() == b"mine"
        with pytest.raises(DiskError, match="disks\\[0\\]: "):
            open_overlay(disk, tmp_path / "nodir" / "ov.qcow2", what="disks[0]")
        with pytest.raises(DiskError):
            open_overlay(disk, base, what="disks[0]")  # the top itself: exists
        assert sorted(p.name for p in tmp_path.iterdir()) == ["base.qcow2", "exists.qcow2"]
        assert not disk.readonly
        disk.writev([memoryview(b"\x03" * 512)], 0)  # still writable, still ours
    finally:
        disk.close()
    assert qemu_img("check", base).returncode == 0
    os.unlink(exists)


def test_a_failure_after_the_create_removes_the_new_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pyvirt.disk import qcow2

    base = tmp_path / "base.raw"
    base.write_bytes(bytes(1 << 20))
    disk = open_disk(base, format="raw", what="disks[0].path")

    def broken(*args: object, **kw: object) -> object:
        raise DiskError("disks[0]: injected")

    monkeypatch.setattr(qcow2.Qcow2Disk, "open", broken)
    try:
        with pytest.raises(DiskError, match="injected"):
            open_overlay(disk, tmp_path / "ov.qcow2", what="disks[0]")
        assert not (tmp_path / "ov.qcow2").exists()
        assert not disk.readonly
    finally:
        disk.close()
