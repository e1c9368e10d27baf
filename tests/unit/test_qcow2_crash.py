"""Crash consistency of the qcow2 writer, with ``qemu-img check`` as the referee.

Every write and sync the backend issues to the image is recorded. A crash
image is then built for every write: (a) every write up to it reached the disk
(in-order persistence), and (b) only the last synced state plus that one write
reached the disk (the page cache wrote a later block before earlier unsynced
ones). Each must check clean of corruption (leaked clusters are allowed).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest

import pyvirt.disk.qcow2 as qmod
from pyvirt.disk.backend import ChainLimits, ImageFile
from pyvirt.disk.qcow2 import Qcow2Disk, create_qcow2
from pyvirt.hostfile import identity

MiB = 1 << 20


class _RecordingOs:
    """``os`` for the qcow2 module: records writes and syncs on one fd."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.events: list[tuple[str, int, bytes]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def pwrite(self, fd: int, data: Any, off: int) -> int:
        n = os.pwrite(fd, data, off)
        if fd == self.fd:
            self.events.append(("w", off, bytes(memoryview(data)[:n])))
        return n

    def pwritev(self, fd: int, views: list[Any], off: int) -> int:
        n = os.pwritev(fd, views, off)
        if fd == self.fd:
            self.events.append(("w", off, b"".join(bytes(v) for v in views)[:n]))
        return n

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)
        if fd == self.fd:
            self.events.append(("s", 0, b""))

    fsync = fdatasync


def _apply(buf: bytearray, off: int, data: bytes) -> None:
    if off + len(data) > len(buf):
        buf.extend(bytes(off + len(data) - len(buf)))
    buf[off:off + len(data)] = data


def _check(path: Path) -> dict[str, Any]:
    p = subprocess.run(["qemu-img", "check", "--output", "json", str(path)],
                       capture_output=True, text=True, check=False)
    # 0: clean; 3: leaked clusters only. 2 (corruptions) or 1 fail.
    assert p.returncode in (0, 3), p.stdout + p.stderr
    res: dict[str, Any] = json.loads(p.stdout)
    assert not res.get("corruptions"), res
    return res


def _run_workload(monkeypatch: pytest.MonkeyPatch, img: Path, seed: int,
                  ops: int) -> tuple[bytes, list[tuple[str, int, bytes]]]:
    fd = os.open(img, os.O_RDWR)
    st = os.fstat(fd)
    d = Qcow2Disk.open(ImageFile(img, fd, identity(st), False, False, False, st.st_size),
                       what="disk", open_backing=None, limits=ChainLimits(cache_bytes=8192))
    initial = img.read_bytes()
    rec = _RecordingOs(fd)
    monkeypatch.setattr(qmod, "os", rec)
    r = random.Random(seed)
    size = d.size
    for off in range(0, size, 64 * 1024):  # the whole disk allocated
        d.writev([memoryview(r.randbytes(64 * 1024))], off)
    for _ in range(ops):
        off = r.randrange(0, size // 512) * 512
        n = min(size - off, r.randrange(1, 64) * 512)
        x = r.random()
        if x < 0.65:
            d.writev([memoryview(r.randbytes(n))], off)
        elif x < 0.75:
            d.write_zeroes(off, n, unmap=r.random() < 0.5)
        elif x < 0.9:
            d.discard(off, n)
        else:
            d.flush()
    d.resize(size * 4)  # the L1 moves
    for _ in range(ops // 4):
        off = r.randrange(size // 512, 4 * size // 512) * 512
        d.writev([memoryview(r.randbytes(512))], off)
    d.close()
    monkeypatch.setattr(qmod, "os", os)
    return initial, rec.events


@pytest.mark.parametrize("seed,cluster,refbits", [(1, 512, 64), (2, 512, 1), (3, 4096, 16)])
def test_crash_at_every_write_is_never_corrupt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               seed: int, cluster: int, refbits: int) -> None:
    img = tmp_path / "c.qcow2"
    # 512 B clusters and 64-bit refcounts (a refcount table cluster covers 2 MiB):
    # new L2 tables, several refcount blocks and a moved refcount table all
    # happen within a few hundred writes
    create_qcow2(img, 2 * MiB if cluster == 512 else 8 * MiB, cluster_size=cluster,
                 refcount_bits=refbits)
    initial, events = _run_workload(monkeypatch, img, seed, 160)
    final = _check(img)
    assert final.get("leaks", 0) == 0
    writes = [i for i, e in enumerate(events) if e[0] == "w"]
    assert len(writes) > 100
    if refbits == 64:
        assert any(e[0] == "w" and e[1] == 48 for e in events), "the refcount table never moved"
    # the small (header, L1, refcount table) writes, and a sample of the rest
    small = [i for i in writes if len(events[i][2]) < cluster]
    rest = [i for i in writes if len(events[i][2]) >= cluster]
    step = max(1, len(small) // 80)
    picks = sorted(set(small[::step] + small[-5:] + random.Random(seed).sample(rest, 80)))
    current = bytearray(initial)
    synced = bytearray(initial)
    pending: list[tuple[int, bytes]] = []
    crash = tmp_path / "crash.qcow2"
    checked = 0
    pick_set = set(picks)
    for i, (kind, off, data) in enumerate(events):
        if kind == "s":
            for o, dd in pending:
                _apply(synced, o, dd)
            pending.clear()
            continue
        _apply(current, off, data)
        pending.append((off, data))
        if i not in pick_set:
            continue
        crash.write_bytes(current)
        _check(crash)
        reordered = bytearray(synced)
        _apply(reordered, off, data)
        crash.write_bytes(reordered)
        _check(crash)
        checked += 2
    assert checked >= 150


def test_recorder_sees_a_bad_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness can fail: an L2 entry written before its refcount is
    caught. (Writes an image by hand in the wrong order.)"""
    img = tmp_path / "bad.qcow2"
    create_qcow2(img, MiB, cluster_size=512)
    fd = os.open(img, os.O_RDWR)
    try:
        # point L1[0] at a cluster past the end whose refcount is 0
        l1 = int.from_bytes(os.pread(fd, 8, 40), "big")
        end = os.fstat(fd).st_size
        os.pwrite(fd, bytes(512), end)
        os.pwrite(fd, (end | 1 << 63).to_bytes(8, "big"), l1)
    finally:
        os.close(fd)
    p = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, check=False)
    assert p.returncode == 2


