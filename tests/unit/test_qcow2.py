"""The qcow2 backend against the referee, qemu-img (and qemu-io to make images).

Images qemu-img makes read back equal to ``qemu-img convert -O raw``; images we
write pass ``qemu-img check`` and ``qemu-img compare`` against a bytearray model.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvirt.disk.backend import ChainLimits, CorruptImage, DiskBackend, DiskError, ImageFile
from pyvirt.disk.qcow2 import Qcow2Disk, create_qcow2
from pyvirt.disk.raw import RawDisk
from pyvirt.hostfile import identity

MiB = 1 << 20


def run(*args: str) -> str:
    p = subprocess.run(args, capture_output=True, text=True, check=False)
    assert p.returncode == 0, f"{args}: {p.stdout}{p.stderr}"
    return p.stdout


def qio(path: Path, *cmds: str, fmt: str = "qcow2") -> None:
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run(*args, str(path))


def image_file(path: Path, readonly: bool) -> ImageFile:
    fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
    st_ = os.fstat(fd)
    return ImageFile(path, fd, identity(st_), readonly, False, False, st_.st_size)


def open_any(path: Path, fmt: str | None, what: str, readonly: bool = True) -> DiskBackend:
    if fmt is None:
        with open(path, "rb") as f:
            fmt = "qcow2" if f.read(4) == b"QFI\xfb" else "raw"
    if fmt == "raw":
        return RawDisk(image_file(path, readonly))
    return Qcow2Disk.open(image_file(path, readonly), what=what, open_backing=open_any,
                          limits=ChainLimits())


def open_q(path: Path, *, readonly: bool = False, backing: bool = True,
           limits: ChainLimits | None = None) -> Qcow2Disk:
    return Qcow2Disk.open(image_file(path, readonly), what="disk",
                          open_backing=open_any if backing else None,
                          limits=limits or ChainLimits())


def read_all(d: DiskBackend, chunk: int = 3 * 65536 + 512) -> bytes:
    out = bytearray(d.size)
    mv = memoryview(out)
    for off in range(0, d.size, chunk):
        n = min(chunk, d.size - off)
        # two views per request: the scatter path is exercised too
        half = n // 2 // 512 * 512
        d.readv([mv[off:off + half], mv[off + half:off + n]], off)
    return bytes(out)


def as_raw(path: Path, tmp: Path) -> bytes:
    out = tmp / (path.name + ".ref.raw")
    run("qemu-img", "convert", "-O", "raw", str(path), str(out))
    return out.read_bytes()


def check_clean(path: Path) -> dict[str, object]:
    p = subprocess.run(["qemu-img", "check", "--output", "json", str(path)],
                       capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    res: dict[str, object] = json.loads(p.stdout)
    assert not res.get("corruptions") and not res.get("leaks"), res
    return res


def compare(path: Path, model: bytes | bytearray, tmp: Path) -> None:
    raw = tmp / "model.raw"
    raw.write_bytes(model)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(path), str(raw))


def pattern_raw(path: Path, size: int, seed: int = 7) -> bytes:
    """Random, zero and compressible regions mixed."""
    r = random.Random(seed)
    buf = bytearray(size)
    pos = 0
    while pos < size:
        n = min(size - pos, r.choice([512, 4096, 65536, 200_000]))
        kind = r.randrange(3)
        if kind == 0:
            buf[pos:pos + n] = r.randbytes(n)
        elif kind == 1:
            buf[pos:pos + n] = bytes([r.randrange(256)]) * n
        pos += n
    path.write_bytes(buf)
    return bytes(buf)


# ---------------------------------------------------------------- reading


CONVERT_OPTS = {
    "v2": ["-o", "compat=0.10"],
    "v3": [],
    "c512": ["-o", "cluster_size=512"],
    "c4k": ["-o", "cluster_size=4096"],
    "c2m": ["-o", "cluster_size=2M"],
    "zlib": ["-c"],
    "zstd": ["-c", "-o", "compression_type=zstd"],
    "zstd512": ["-c", "-o", "compression_type=zstd,cluster_size=512"],
    "extl2": ["-o", "extended_l2=on"],
    "lazy": ["-o", "lazy_refcounts=on"],
    "refbits1": ["-o", "refcount_bits=1"],
    "refbits64": ["-o", "refcount_bits=64"],
}


@pytest.mark.parametrize("name", sorted(CONVERT_OPTS))
def test_qemu_images_read_back(tmp_path: Path, name: str) -> None:
    src = tmp_path / "src.raw"
    data = pattern_raw(src, 3 * MiB + 4096)
    img = tmp_path / "img.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", *CONVERT_OPTS[name], str(src), str(img))
    d = open_q(img, readonly=True)
    try:
        assert d.size == len(data)
        assert read_all(d) == data
        assert read_all(d, 4096) == data
    finally:
        d.close()


@pytest.mark.parametrize("prealloc", ["metadata", "full"])
def test_preallocated_images(tmp_path: Path, prealloc: str) -> None:
    img = tmp_path / "p.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-o", f"preallocation={prealloc}", str(img), "2M")
    qio(img, "write -P 0x5a 65536 4096")
    d = open_q(img)
    try:
        assert read_all(d) == as_raw(img, tmp_path)
        d.writev([memoryview(b"\x11" * 512)], 512)
    finally:
        d.close()
    check_clean(img)
    model = bytearray(2 * MiB)
    model[65536:65536 + 4096] = b"\x5a" * 4096
    model[512:1024] = b"\x11" * 512
    compare(img, model, tmp_path)


def test_zero_clusters_subclusters_and_chain(tmp_path: Path) -> None:
    """Zero flags, extended-L2 subclusters and a 3-deep chain over raw, with
    relative and absolute backing names."""
    base = tmp_path / "base.raw"
    pattern_raw(base, 2 * MiB, seed=1)
    sub = tmp_path / "sub"
    sub.mkdir()
    l1 = sub / "l1.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-b", "../base.raw", "-F", "raw", str(l1), "3M")
    qio(l1, "write -P 0x11 0 100k", "write -z 200k 64k", "write -P 0x12 2560k 8k")
    l2 = tmp_path / "l2.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-o", "extended_l2=on", "-b", str(l1), "-F", "qcow2",
        str(l2), "3M")
    qio(l2, "write -P 0x21 4k 2k", "write -z 70k 4k", "write -P 0x22 130k 1k", "discard 0 4k")
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-b", "l2.qcow2", "-F", "qcow2", str(top), "4M")
    qio(top, "write -P 0x31 1M 64k", "write -z 5k 1k", "write -z 1536k 128k")
    d = open_q(top, readonly=True)
    try:
        assert [x.path for x in d.chain()] == [top, l2, l1, sub / "../base.raw"]
        assert read_all(d) == as_raw(top, tmp_path)
        assert read_all(d, 512) == as_raw(top, tmp_path)
        e = d.block_status(1 * MiB, 64 * 1024)
        assert (e.depth, e.data, e.present) == (0, True, True) and e.host_offset is not None
        e = d.block_status(1536 * 1024, 128 * 1024)
        assert (e.depth, e.zero, e.data, e.length) == (0, True, False, 128 * 1024)
        e = d.block_status(130 * 1024, 4096)
        assert (e.depth, e.data, e.length) == (1, True, 2048)  # a subcluster of l2
        e = d.block_status(70 * 1024, 4096)
        assert (e.depth, e.zero, e.data, e.length) == (1, True, False, 4096)
        e = d.block_status(2560 * 1024, 512)
        assert e.depth == 2 and e.data
        e = d.block_status(3 * MiB + 512, 4096)  # past every layer
        assert not e.present and e.zero and e.depth == 4
    finally:
        d.close()
    # without its backing chain: the unallocated parts read as zeros
    d = open_q(top, readonly=True, backing=False)
    try:
        data = read_all(d)
        assert data[1 * MiB:1 * MiB + 65536] == b"\x31" * 65536
        assert data[128 * 1024:192 * 1024] == bytes(65536)
        assert not d.block_status(130 * 1024, 4096).present
    finally:
        d.close()


def test_info_and_create_match_qemu(tmp_path: Path) -> None:
    cases: list[tuple[dict[str, object], list[str]]] = [
        ({}, []),
        ({"version": 2}, ["-o", "compat=0.10"]),
        ({"cluster_size": 512, "refcount_bits": 1}, ["-o", "cluster_size=512,refcount_bits=1"]),
        ({"lazy_refcounts": True, "compression_type": "zstd"},
         ["-o", "lazy_refcounts=on,compression_type=zstd"]),
        ({"extended_l2": True}, ["-o", "extended_l2=on"]),
        ({"preallocation": "metadata", "cluster_size": 4096},
         ["-o", "preallocation=metadata,cluster_size=4096"]),
        ({"preallocation": "full", "refcount_bits": 8},
         ["-o", "preallocation=full,refcount_bits=8"]),
        ({"backing": "b.raw", "backing_format": "raw"}, ["-b", "b.raw", "-F", "raw"]),
    ]
    (tmp_path / "b.raw").write_bytes(bytes(MiB))
    for i, (kw, opts) in enumerate(cases):
        ours = tmp_path / f"ours{i}.qcow2"
        theirs = tmp_path / f"theirs{i}.qcow2"
        create_qcow2(ours, 5 * MiB + 512, **kw)  # type: ignore[arg-type]
        run("qemu-img", "create", "-f", "qcow2", *opts, str(theirs), str(5 * MiB + 512))
        check_clean(ours)
        a = json.loads(run("qemu-img", "info", "--output", "json", str(ours)))
        b = json.loads(run("qemu-img", "info", "--output", "json", str(theirs)))
        for k in ("virtual-size", "cluster-size", "format-specific", "backing-filename",
                  "backing-filename-format", "dirty-flag"):
            assert a.get(k) == b.get(k), (kw, k, a.get(k), b.get(k))
        d = open_q(ours, readonly=True)
        assert d.info() == b["format-specific"]["data"]
        d.close()
        run("qemu-img", "compare", str(ours), str(theirs))
    with pytest.raises(DiskError):
        create_qcow2(tmp_path / "ours0.qcow2", MiB)  # exists


# ---------------------------------------------------------------- writing


def _random_ops(d: Qcow2Disk, model: bytearray, r: random.Random, count: int,
                max_len: int) -> None:
    size = len(model)
    for _ in range(count):
        op = r.random()
        off = r.randrange(0, size // 512) * 512
        n = min(size - off, r.randrange(1, max_len // 512 + 1) * 512)
        if op < 0.6:
            data = r.randbytes(n) if r.random() < 0.7 else bytes([r.randrange(256)]) * n
            split = r.randrange(0, n // 512 + 1) * 512
            mv = memoryview(data)
            d.writev([mv[:split], mv[split:]], off)
            model[off:off + n] = data
        elif op < 0.75:
            d.write_zeroes(off, n, unmap=r.random() < 0.5)
            model[off:off + n] = bytes(n)
        elif op < 0.9:
            d.discard(off, n)
            # whole clusters then read as zero (no backing) — track them
            cs = d.cluster_size
            s = -(-off // cs) * cs
            e = (off + n) // cs * cs if off + n < size else size
            if s < e:
                model[s:e] = bytes(e - s)
        else:
            d.flush()


@pytest.mark.parametrize("version,cluster,refbits,lazy", [
    (3, 512, 16, False), (3, 65536, 16, False), (2, 4096, 16, False),
    (3, 512, 1, False), (3, 1024, 64, True), (3, 512, 2, False),
])
def test_random_writes_match_model(tmp_path: Path, version: int, cluster: int, refbits: int,
                                   lazy: bool) -> None:
    img = tmp_path / "w.qcow2"
    size = 24 * MiB if cluster == 512 else 8 * MiB
    create_qcow2(img, size, cluster_size=cluster, version=version, refcount_bits=refbits,
                 lazy_refcounts=lazy)
    model = bytearray(size)
    r = random.Random(cluster * 7 + version + refbits)
    d = open_q(img, limits=ChainLimits(cache_bytes=64 * 1024))  # small caches: evictions
    try:
        _random_ops(d, model, r, 600, 200_000)
        d.flush()
        assert read_all(d) == bytes(model)
    finally:
        d.close()
    res = check_clean(img)
    if cluster == 512:
        # enough clusters for several refcount blocks and a moved refcount table
        assert res["image-end-offset"] > 8 * MiB  # type: ignore[operator]
    compare(img, model, tmp_path)
    # reopen and keep going (free clusters get reused)
    d = open_q(img)
    try:
        _random_ops(d, model, r, 200, 100_000)
    finally:
        d.close()
    check_clean(img)
    compare(img, model, tmp_path)


@pytest.mark.parametrize("version", [3, 2])
def test_cow_over_backing_chain(tmp_path: Path, version: int) -> None:
    base = tmp_path / "base.raw"
    base_data = pattern_raw(base, 3 * MiB, seed=3)
    mid = tmp_path / "mid.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.raw",
        "-F", "raw", str(mid), "3M")
    qio(mid, "write -P 0x44 8k 16k", "write -z 64k 8k")
    top = tmp_path / "top.qcow2"
    create_qcow2(top, 4 * MiB, cluster_size=4096, backing="mid.qcow2", backing_format="qcow2",
                 version=version)
    model = bytearray(as_raw(mid, tmp_path)) + bytearray(MiB)
    assert bytes(model[:3 * MiB]) != base_data
    d = open_q(top)
    try:
        assert read_all(d) == bytes(model)
        r = random.Random(5)
        for _ in range(300):
            off = r.randrange(0, 4 * MiB // 512) * 512
            n = min(4 * MiB - off, r.randrange(1, 40) * 512)
            op = r.random()
            if op < 0.7:
                data = r.randbytes(n)
                d.writev([memoryview(data)], off)
                model[off:off + n] = data
            elif op < 0.85:
                d.write_zeroes(off, n, unmap=True)
                model[off:off + n] = bytes(n)
            else:
                # whole clusters read as zeros (v3: zero flag); v2 has no zero
                # flag, so QEMU's discard does nothing there (never the backing data)
                d.discard(off, n)
                s, e = -(-off // 4096) * 4096, (off + n) // 4096 * 4096
                if off + n == 4 * MiB:
                    e = 4 * MiB
                if s < e and version == 3:
                    model[s:e] = bytes(e - s)
        assert read_all(d) == bytes(model)
    finally:
        d.close()
    check_clean(top)
    run("qemu-img", "compare", "-F", "raw", str(top), str(_write(tmp_path / "m.raw", model)))


def _write(path: Path, data: bytes | bytearray) -> Path:
    path.write_bytes(data)
    return path


def test_writes_over_compressed_and_zero_allocated(tmp_path: Path) -> None:
    src = tmp_path / "s.raw"
    data = bytearray(pattern_raw(src, 2 * MiB, seed=9))
    for comp in ("zlib", "zstd"):
        img = tmp_path / f"c-{comp}.qcow2"
        run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"compression_type={comp}",
            str(src), str(img))
        qio(img, "write -P 0x77 1M 64k", "write -z 1M 64k")  # zero flag on an allocated cluster
        model = bytearray(data)
        model[MiB:MiB + 65536] = bytes(65536)
        d = open_q(img)
        try:
            d.writev([memoryview(b"\x99" * 1024)], 4096)  # COW of a compressed cluster
            model[4096:5120] = b"\x99" * 1024
            d.writev([memoryview(b"\x98" * 512)], MiB + 512)  # into "zero, allocated"
            model[MiB + 512:MiB + 1024] = b"\x98" * 512
            assert read_all(d) == bytes(model)
        finally:
            d.close()
        check_clean(img)
        compare(img, model, tmp_path)


def test_concurrent_readers_and_writers(tmp_path: Path) -> None:
    img = tmp_path / "t.qcow2"
    create_qcow2(img, 16 * MiB, cluster_size=4096)
    d = open_q(img)
    errors: list[BaseException] = []
    # each thread owns its stripe: the final content is deterministic
    stripes = 8

    def worker(k: int) -> None:
        try:
            r = random.Random(k)
            for _ in range(300):
                blk = r.randrange(0, 16 * MiB // 65536 // stripes) * stripes + k
                off = blk * 65536 + r.randrange(0, 60) * 512
                n = r.randrange(1, 8) * 512
                d.writev([memoryview(bytes([k + 1]) * n)], off)
                buf = bytearray(n)
                d.readv([memoryview(buf)], off)
                assert buf == bytes([k + 1]) * n
                if r.random() < 0.05:
                    d.flush()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(stripes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    d.close()
    assert not errors, errors
    check_clean(img)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.sampled_from("wzdf"), st.integers(0, 255), st.integers(1, 24),
                          st.integers(0, 255)), max_size=40))
def test_hypothesis_write_model(tmp_path_factory: pytest.TempPathFactory,
                                ops: list[tuple[str, int, int, int]]) -> None:
    tmp = tmp_path_factory.mktemp("hyp")
    img = tmp / "h.qcow2"
    size = 256 * 1024
    create_qcow2(img, size, cluster_size=1024, refcount_bits=4)
    model = bytearray(size)
    d = open_q(img, limits=ChainLimits(cache_bytes=8192))
    try:
        for op, blk, count, val in ops:
            off = blk * 1024
            n = min(size - off, count * 512)
            if op == "w":
                d.writev([memoryview(bytes([val]) * n)], off)
                model[off:off + n] = bytes([val]) * n
            elif op == "z":
                d.write_zeroes(off, n, unmap=bool(val & 1))
                model[off:off + n] = bytes(n)
            elif op == "d":
                d.discard(off, n)
                e = (off + n) // 1024 * 1024
                model[off:e] = bytes(max(0, e - off))
            else:
                d.flush()
        assert read_all(d, 7 * 512) == bytes(model)
    finally:
        d.close()
    check_clean(img)
    compare(img, model, tmp)


# ---------------------------------------------------------------- features


def _header_word(path: Path, off: int, fmt: str = ">Q") -> int:
    with open(path, "rb") as f:
        f.seek(off)
        return int(struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0])


def test_lazy_refcounts_dirty_bit(tmp_path: Path) -> None:
    img = tmp_path / "l.qcow2"
    create_qcow2(img, 4 * MiB, lazy_refcounts=True)
    d = open_q(img)
    assert _header_word(img, 72) & 1 == 0
    d.writev([memoryview(b"\x01" * 4096)], 0)
    assert _header_word(img, 72) & 1 == 1  # set on disk before the first write
    info = json.loads(run("qemu-img", "info", "-U", "--output", "json", str(img)))
    assert info["dirty-flag"] is True
    d.close()
    assert _header_word(img, 72) & 1 == 0
    check_clean(img)
    # without lazy refcounts no dirty bit at all
    img2 = tmp_path / "n.qcow2"
    create_qcow2(img2, 4 * MiB)
    d = open_q(img2)
    d.writev([memoryview(b"\x01" * 4096)], 0)
    assert _header_word(img2, 72) & 1 == 0
    d.close()


def test_dirty_image_opens(tmp_path: Path) -> None:
    """A dirty image opens read-only as is, and writable after a repair."""
    img = tmp_path / "dirty.qcow2"
    create_qcow2(img, 4 * MiB, lazy_refcounts=True)
    d = open_q(img)
    d.writev([memoryview(b"\x02" * 65536)], 0)
    d.flush()
    d._dirty_on_disk = False
    d.close()
    assert _header_word(img, 72) & 1
    ro = open_q(img, readonly=True)
    assert ro.dirty and read_all(ro)[:65536] == b"\x02" * 65536
    ro.close()
    d = open_q(img)
    assert not d.dirty
    assert read_all(d)[:65536] == b"\x02" * 65536
    d.close()
    assert _header_word(img, 72) & 1 == 0
    check_clean(img)


def test_resize_grows_and_moves_l1(tmp_path: Path) -> None:
    img = tmp_path / "r.qcow2"
    create_qcow2(img, MiB, cluster_size=512)
    d = open_q(img)
    d.writev([memoryview(b"\x03" * 4096)], MiB - 4096)
    old_l1 = _header_word(img, 40)
    d.resize(64 * MiB)  # 512 B clusters: the L1 must move to a bigger place
    assert d.size == 64 * MiB
    assert _header_word(img, 40) != old_l1
    d.writev([memoryview(b"\x04" * 4096)], 64 * MiB - 4096)
    d.resize(64 * MiB + 512)
    d.close()
    check_clean(img)
    model = bytearray(64 * MiB + 512)
    model[MiB - 4096:MiB] = b"\x03" * 4096
    model[64 * MiB - 4096:64 * MiB] = b"\x04" * 4096
    compare(img, model, tmp_path)
    info = json.loads(run("qemu-img", "info", "--output", "json", str(img)))
    assert info["virtual-size"] == 64 * MiB + 512


def test_set_backing(tmp_path: Path) -> None:
    (tmp_path / "a.raw").write_bytes(b"\x05" * MiB)
    (tmp_path / "b.raw").write_bytes(b"\x06" * MiB)
    img = tmp_path / "o.qcow2"
    create_qcow2(img, MiB, backing="a.raw", backing_format="raw")
    d = open_q(img, backing=False)
    d.set_backing("b.raw", "raw")
    d.close()
    info = json.loads(run("qemu-img", "info", "--output", "json", str(img)))
    assert info["backing-filename"] == "b.raw" and info["backing-filename-format"] == "raw"
    d = open_q(img, readonly=True)
    assert read_all(d) == b"\x06" * MiB
    d.close()
    d = open_q(img, backing=False)
    with pytest.raises(DiskError):
        d.set_backing("x" * 2000, None)
    d.set_backing(None, None)
    d.close()
    assert "backing-filename" not in json.loads(run("qemu-img", "info", "--output", "json",
                                                    str(img)))
    check_clean(img)


def test_autoclear_bits_cleared_on_writable_open(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    create_qcow2(img, MiB)
    with open(img, "r+b") as f:
        f.seek(88)
        f.write(struct.pack(">Q", 0x81))
    open_q(img, readonly=True).close()
    assert _header_word(img, 88) == 0x81
    open_q(img).close()
    assert _header_word(img, 88) == 0


def test_readonly_and_extl2_writable_refused(tmp_path: Path) -> None:
    img = tmp_path / "x.qcow2"
    create_qcow2(img, MiB, extended_l2=True)
    with pytest.raises(DiskError, match="read-only support"):
        open_q(img)
    d = open_q(img, readonly=True)
    with pytest.raises(PermissionError):
        d.writev([memoryview(bytes(512))], 0)
    with pytest.raises(ValueError):
        d.readv([memoryview(bytearray(1024))], MiB - 512)
    d.close()
    d.close()  # idempotent


# ---------------------------------------------------------------- hostile


def _patched(tmp: Path, name: str, edits: list[tuple[int, bytes]], **kw: object) -> Path:
    img = tmp / name
    create_qcow2(img, 4 * MiB, **kw)  # type: ignore[arg-type]
    with open(img, "r+b") as f:
        for off, data in edits:
            f.seek(off)
            f.write(data)
    return img


@pytest.mark.parametrize("edits,match", [
    ([(0, b"QFI\xfc")], "no qcow2 header"),
    ([(4, struct.pack(">I", 4))], "version"),
    ([(20, struct.pack(">I", 22))], "cluster_bits"),
    ([(20, struct.pack(">I", 8))], "cluster_bits"),
    ([(72, struct.pack(">Q", 1 << 9))], "incompatible"),
    ([(72, struct.pack(">Q", 1 << 2))], "external data file"),
    ([(32, struct.pack(">I", 1))], "encrypted"),
    ([(96, struct.pack(">I", 7))], "refcount_order"),
    ([(24, struct.pack(">Q", 1 << 60))], "virtual size"),
    ([(36, struct.pack(">I", 0))], "l1_size"),
    ([(36, struct.pack(">I", 5 << 20))], "l1_size"),
    ([(40, struct.pack(">Q", 0))], "L1 table"),
    ([(40, struct.pack(">Q", 0x10001))], "L1 table"),
    ([(40, struct.pack(">Q", 0x10000))], "overlap"),
    ([(56, struct.pack(">I", 1000))], "refcount_table_clusters"),
    ([(48, struct.pack(">Q", 1 << 62))], "refcount table"),
    ([(8, struct.pack(">QI", 0xFFF0, 100))], "backing file name"),
    ([(8, struct.pack(">QI", 200, 2000))], "backing file name"),
    ([(100, struct.pack(">I", 0x20000))], "header_length"),
    ([(112, struct.pack(">II", 0x1234, 0xFFFF))], "header extension"),
    ([(72, struct.pack(">Q", 2))], "marked corrupt"),
])
def test_hostile_headers(tmp_path: Path, edits: list[tuple[int, bytes]], match: str) -> None:
    img = _patched(tmp_path, "h.qcow2", edits)
    with pytest.raises(DiskError, match=match):
        open_q(img)


def _l1_entry(img: Path) -> int:
    return _header_word(img, _header_word(img, 40))


def test_hostile_entries_fail_the_request(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                          ) -> None:
    img = tmp_path / "e.qcow2"
    create_qcow2(img, 4 * MiB, cluster_size=4096)
    d = open_q(img)
    d.writev([memoryview(b"\x01" * 8192)], 0)
    d.close()
    l2 = _l1_entry(img) & 0x00FFFFFFFFFFFE00
    bad_entries = [
        (1 << 63) | 0,  # COPIED without an offset is "unallocated": fine
        (1 << 63) | 0x1000,  # the refcount table cluster
        (1 << 63) | 0x1200,  # not cluster aligned
        (1 << 62) | (0x7FF << 53),  # compressed past the end of the file
        (1 << 63) | (l2 + 0x800),  # unaligned (inside the L2 table)
    ]
    for i, entry in enumerate(bad_entries):
        with open(img, "r+b") as f:
            f.seek(l2)
            f.write(struct.pack(">Q", entry))
        d = open_q(img)
        buf = bytearray(4096)
        if i == 0:
            d.readv([memoryview(buf)], 0)
            assert buf == bytes(4096)
        else:
            with pytest.raises(CorruptImage):
                d.readv([memoryview(buf)], 0)
            with pytest.raises(CorruptImage):
                d.writev([memoryview(bytes(512))], 0)
        # the rest of the image still works
        d.readv([memoryview(buf)], 4096)
        assert buf == b"\x01" * 4096
        d.close()
    # a refcount table entry pointing nowhere sane: allocation fails, no crash
    rt = _header_word(img, 48)
    with open(img, "r+b") as f:
        f.seek(rt)
        f.write(struct.pack(">Q", 0x1001))
        f.seek(l2)
        f.write(struct.pack(">Q", 0))
    d = open_q(img)
    with pytest.raises(CorruptImage):
        d.writev([memoryview(bytes(4096))], 2 * MiB)
    d.close()


def test_refcount_overflow_fails_the_request(tmp_path: Path) -> None:
    """A refcount at its maximum is never wrapped: freeing into it is refused."""
    img = tmp_path / "o.qcow2"
    create_qcow2(img, MiB, cluster_size=512, refcount_bits=1)
    d = open_q(img)
    with pytest.raises(CorruptImage):
        d._set_refcount(0, 2)
    d.close()


def test_compressed_garbage(tmp_path: Path) -> None:
    src = tmp_path / "s.raw"
    src.write_bytes(b"compressible " * (MiB // 13) + bytes(MiB % 13))
    img = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", str(src), str(img))
    d = open_q(img, readonly=True)
    e = d._entry(5)[0]  # guest cluster 5: a compressed one
    d.close()
    assert e & (1 << 62)
    coff = e & ((1 << (62 - (16 - 8))) - 1)
    with open(img, "r+b") as f:  # clobber its compressed data
        f.seek(coff)
        f.write(b"\xff" * 64)
    d = open_q(img, readonly=True)
    with pytest.raises(CorruptImage):
        d.readv([memoryview(bytearray(4096))], 5 * 65536)
    buf = bytearray(65536)
    d.readv([memoryview(buf)], 0)  # the others still read
    assert buf[:13] == b"compressible "
    d.close()


def test_bounded_caches(tmp_path: Path) -> None:
    img = tmp_path / "b.qcow2"
    create_qcow2(img, 64 * MiB, cluster_size=512)
    d = open_q(img, limits=ChainLimits(cache_bytes=16 * 1024))
    for off in range(0, 64 * MiB, 256 * 1024):
        d.writev([memoryview(b"\x01" * 512)], off)
    assert len(d._l2_cache) <= d._l2_max and len(d._rb_cache) <= d._rb_max
    assert d._l2_max * 512 <= 16 * 1024
    d.close()
    check_clean(img)


def iter_extents(d: DiskBackend) -> Iterator[tuple[int, int, bool, bool, int]]:
    off = 0
    while off < d.size:
        e = d.block_status(off, d.size - off)
        assert e.offset == off and e.length > 0
        yield e.offset, e.length, e.data, e.zero, e.depth
        off += e.length


def test_block_status_matches_qemu_map(tmp_path: Path) -> None:
    base = tmp_path / "b.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(base), "2M")
    qio(base, "write -P 1 0 128k", "write -z 512k 64k")
    top = tmp_path / "t.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", str(top), "2M")
    qio(top, "write -P 2 64k 64k", "write -z 1M 128k")
    d = open_q(top, readonly=True)
    ours = list(iter_extents(d))
    d.close()
    theirs = json.loads(run("qemu-img", "map", "--output", "json", str(top)))
    # qemu-img map merges differently; compare per 64 KiB cluster
    def per_cluster(ext: list[tuple[int, int, bool, bool, int]]) -> list[tuple[bool, bool, int]]:
        out = []
        for _off, ln, data, zero, depth in ext:
            out += [(data, zero, depth if data or (zero and depth < 2) else -1)] * (ln // 65536)
        return out
    q = [(m["start"], m["length"], m["data"], m["zero"],
          m["depth"] if m.get("present", True) else 2) for m in theirs]
    assert per_cluster(ours) == per_cluster(q)


def test_read_cached(tmp_path: Path) -> None:
    img = tmp_path / "rc.qcow2"
    create_qcow2(img, MiB)
    d = open_q(img)
    try:
        buf = bytearray(4096)
        assert not d.read_cached([memoryview(buf)], 0)  # unallocated: not served here
        d.writev([memoryview(b"\x07" * 4096)], 8192)
        served = d.read_cached([memoryview(buf)], 8192)
        assert served and buf == b"\x07" * 4096  # just written: in the page cache
        assert not d.read_cached([memoryview(bytearray(65536))], 8192)  # spans two clusters
    finally:
        d.close()


def test_internal_snapshots_read_only(tmp_path: Path) -> None:
    img = tmp_path / "s.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(img), "1M")
    qio(img, "write -P 1 0 128k")
    run("qemu-img", "snapshot", "-c", "snap", str(img))
    qio(img, "write -P 2 64k 128k")
    with pytest.raises(DiskError, match="snapshots"):
        open_q(img)
    d = open_q(img, readonly=True)
    try:
        assert read_all(d) == as_raw(img, tmp_path)
    finally:
        d.close()


def test_flush_covers_a_write_that_completed_during_an_earlier_flush(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyvirt.disk.qcow2 as qmod

    img = tmp_path / "f.qcow2"
    create_qcow2(img, MiB)
    d = open_q(img)
    d.writev([memoryview(bytes(4096))], 0)  # allocated: later writes go in place
    d.flush()
    started, release = threading.Event(), threading.Event()
    syncs: list[int] = []

    class SlowOs:
        def __getattr__(self, name: str) -> object:
            return getattr(os, name)

        def pwritev(self, fd: int, views: list[memoryview], off: int) -> int:
            started.set()
            release.wait(10)
            return os.pwritev(fd, views, off)

        def fdatasync(self, fd: int) -> None:
            syncs.append(fd)
            os.fdatasync(fd)

    monkeypatch.setattr(qmod, "os", SlowOs())
    t = threading.Thread(target=d.writev, args=([memoryview(b"\x01" * 512)], 0))
    t.start()
    assert started.wait(10)
    d.flush()  # runs while the write is in flight
    release.set()
    t.join()
    syncs.clear()
    d.flush()  # the write completed before this flush: it must be made durable
    assert syncs
    monkeypatch.setattr(qmod, "os", os)
    d.close()


@pytest.mark.parametrize("backing", [False, True])
def test_shrink(tmp_path: Path, backing: bool) -> None:
    img = tmp_path / "s.qcow2"
    (tmp_path / "b.raw").write_bytes(b"\x0b" * 8 * MiB)
    create_qcow2(img, 8 * MiB, cluster_size=4096, backing="b.raw" if backing else None,
                 backing_format="raw" if backing else None)
    d = open_q(img)
    model = bytearray(b"\x0b" * 8 * MiB if backing else bytes(8 * MiB))
    r = random.Random(4)
    for _ in range(200):
        off = r.randrange(0, 8 * MiB // 512) * 512
        n = min(8 * MiB - off, r.randrange(1, 64) * 512)
        data = r.randbytes(n)
        d.writev([memoryview(data)], off)
        model[off:off + n] = data
    d.resize(3 * MiB + 1536)  # mid-cluster
    del model[3 * MiB + 1536:]
    assert read_all(d) == bytes(model)
    d.close()
    check_clean(img)
    info = json.loads(run("qemu-img", "info", "--output", "json", str(img)))
    assert info["virtual-size"] == 3 * MiB + 1536
    compare_args = ["qemu-img", "compare", "-F", "raw", str(img),
                    str(_write(tmp_path / "m.raw", model))]
    run(*compare_args)
    if not backing:
        d = open_q(img)
        d.resize(8 * MiB)  # what came back reads as zeros
        assert read_all(d)[3 * MiB + 1536:] == bytes(5 * MiB - 1536)
        d.close()
        check_clean(img)


def test_unknown_header_extension_kept(tmp_path: Path) -> None:
    img = tmp_path / "u.qcow2"
    create_qcow2(img, MiB, backing="a.raw", backing_format="raw")
    (tmp_path / "a.raw").write_bytes(bytes(MiB))
    d = open_q(img, backing=False)
    d._h.extensions.append((0x12345678, b"opaque data"))
    d.set_backing("a.raw", "raw")  # writes the header with the extension
    d.close()
    d = open_q(img, backing=False)
    assert (0x12345678, b"opaque data") in d._h.extensions
    d.set_backing("../elsewhere/a.raw", None)
    d.close()
    d = open_q(img, readonly=True, backing=False)
    assert (0x12345678, b"opaque data") in d._h.extensions
    assert (d.backing_name, d.backing_format) == ("../elsewhere/a.raw", None)
    d.close()
    d = open_q(img, backing=False)
    d.set_backing(None, None)
    d.close()
    check_clean(img)


# ------------------------------------------- discard, cache=none, punch, resize


def _qmap(path: Path) -> list[tuple[int, bool, bool, bool, int]]:
    """qemu-img map per 4 KiB cluster: (start, data, zero, present, depth)."""
    out = []
    for m in json.loads(run("qemu-img", "map", "--output", "json", str(path))):
        for c in range(m["start"], m["start"] + m["length"], 4096):
            out.append((c, m["data"], m["zero"], m["present"], m["depth"]))
    return out


@pytest.mark.parametrize("version,backing,full", [
    (3, True, False), (2, True, False), (3, False, False), (3, True, True),
])
def test_discard_semantics_as_qemu(tmp_path: Path, version: int, backing: bool,
                                   full: bool) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x5a" * 2 * MiB)
    kw: dict[str, object] = {"backing": "base.raw", "backing_format": "raw"} if backing else {}
    ops = ["write -P 0x11 0 256k", "write -P 0x22 1M 64k"]
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    for p in (ours, theirs):
        create_qcow2(p, 2 * MiB, cluster_size=4096, version=version, **kw)  # type: ignore[arg-type]
        qio(p, *ops)
    # QEMU's discard (qemu-io's discard is a guest discard, not a full one)
    qio(theirs, "discard 64k 128k", "discard 1M 64k", "discard 1536k 64k")
    d = open_q(ours)
    try:
        for off, n in ((64 * 1024, 128 * 1024), (MiB, 65536), (1536 * 1024, 65536)):
            d.discard(off, n, full=full)
        got = read_all(d)
    finally:
        d.close()
    check_clean(ours)
    below = b"\x5a" if backing else b"\0"
    model = bytearray(below * 2 * MiB)
    model[0:256 * 1024] = b"\x11" * 256 * 1024
    model[MiB:MiB + 65536] = b"\x22" * 65536
    if full or version == 3 or not backing:  # v2 over a backing file: nothing happens
        for off, n in ((64 * 1024, 128 * 1024), (MiB, 65536), (1536 * 1024, 65536)):
            model[off:off + n] = (below if full or not backing else b"\0") * n
    assert got == bytes(model)
    run("qemu-img", "compare", "-F", "raw", str(ours), str(_write(tmp_path / "m.raw", model)))
    if not full:
        if backing:
            assert _qmap(ours) == _qmap(theirs)  # the same entries as QEMU's
        else:  # QEMU makes them "zero" entries, we unallocated (as asked): the same reads
            run("qemu-img", "compare", str(ours), str(theirs))
    else:  # full: nothing of ours left in the discarded ranges
        m = {c: (data, present, depth) for c, data, _z, present, depth in _qmap(ours)}
        assert m[64 * 1024][2] == 1 and m[MiB][2] == 1


def _o_direct_dir() -> Path:
    """A directory on a file system with O_DIRECT (tmpfs has none)."""
    import tempfile

    for cand in (Path.home() / ".cache" / "pyvirt", Path("/var/tmp")):
        try:
            cand.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=cand)
        except OSError:
            continue
        try:
            os.close(fd)
            fd = os.open(name, os.O_RDWR | os.O_DIRECT)
            os.close(fd)
            return cand
        except OSError:
            pass
        finally:
            os.unlink(name)
    raise AssertionError("no directory with O_DIRECT support for the cache=none test")


@pytest.fixture
def direct_dir() -> Iterator[Path]:
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="qcow2-direct-", dir=_o_direct_dir()))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("cluster", [65536, 1024])
def test_cache_none_uses_o_direct(direct_dir: Path, tmp_path: Path, cluster: int,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl

    import pyvirt.disk.qcow2 as qmod
    from pyvirt.disk.open import open_disk

    direct_io: dict[str, int] = {"preadv": 0, "pwritev": 0}
    data_fds: set[int] = set()

    class CountingOs:  # data transfers that really went through the O_DIRECT fd
        def __getattr__(self, name: str) -> object:
            real = getattr(os, name)
            if name not in direct_io:
                return real

            def call(fd: int, *a: object) -> object:
                got = real(fd, *a)
                if fd in data_fds:
                    direct_io[name] += 1
                return got
            return call

    monkeypatch.setattr(qmod, "os", CountingOs())

    base = direct_dir / "base.raw"
    base_data = pattern_raw(base, 4 * MiB, seed=11)
    img = direct_dir / "d.qcow2"
    create_qcow2(img, 4 * MiB, cluster_size=cluster, backing="base.raw", backing_format="raw")
    d = open_disk(img, format="qcow2", direct=True)
    assert isinstance(d, Qcow2Disk)
    data_fds.add(d._dfd)
    try:
        assert d.direct
        assert fcntl.fcntl(d._dfd, fcntl.F_GETFL) & os.O_DIRECT  # guest data: direct
        assert not fcntl.fcntl(d._fd, fcntl.F_GETFL) & os.O_DIRECT  # metadata: buffered
        assert not d.read_cached([memoryview(bytearray(4096))], 0)
        model = bytearray(base_data)
        r = random.Random(cluster)
        for _ in range(300):
            off = r.randrange(0, 4 * MiB // 512) * 512
            n = min(4 * MiB - off, r.randrange(1, 300) * 512)
            op = r.random()
            if op < 0.6:
                # page-aligned (direct as is) and misaligned (bounce) guest buffers
                raw = bytearray(n + 1) if r.random() < 0.5 else bytearray(n)
                raw[:n] = r.randbytes(n)
                mv = memoryview(raw)[len(raw) - n:]
                d.writev([mv], off)
                model[off:off + n] = raw[len(raw) - n:]
            elif op < 0.75:
                d.write_zeroes(off, n, unmap=r.random() < 0.5)
                model[off:off + n] = bytes(n)
            elif op < 0.85:
                d.discard(off, n)  # v3 over a backing file: zeros
                s, e = -(-off // cluster) * cluster, (off + n) // cluster * cluster
                if s < e:
                    model[s:e] = bytes(e - s)
            elif op < 0.95:
                buf = bytearray(n + 1)
                d.readv([memoryview(buf)[1:]], off)
                assert buf[1:] == model[off:off + n]
            else:
                d.flush()
        assert read_all(d) == bytes(model)
    finally:
        d.close()
    assert direct_io["preadv"] > 50 and direct_io["pwritev"] > 50, direct_io
    check_clean(img)
    run("qemu-img", "compare", "-F", "raw", str(img), str(_write(tmp_path / "m.raw", model)))


def _allocated(path: Path, start: int, end: int) -> int:
    """Bytes of [start, end) of a file that are not holes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        total, off = 0, start
        while off < end:
            try:
                data = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            if data >= end:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            total += hole - data
            off = hole
        return total
    finally:
        os.close(fd)


def test_freed_clusters_are_punched(tmp_path: Path) -> None:
    img = tmp_path / "p.qcow2"
    create_qcow2(img, 64 * MiB)
    d = open_q(img)
    try:
        data = random.Random(1).randbytes(MiB)
        for off in range(0, 32 * MiB, MiB):
            d.writev([memoryview(data)], off)
        d.flush()
        before = os.stat(img).st_blocks * 512
        assert before >= 32 * MiB
        d.discard(0, 30 * MiB)  # guest discard (no backing file: unallocated)
        d.flush()
        after = os.stat(img).st_blocks * 512
        assert after < before - 29 * MiB, (before, after)
        assert read_all(d)[:31 * MiB] == bytes(30 * MiB) + data[:MiB]
    finally:
        d.close()
    check_clean(img)
    # COW replacing clusters: compressed clusters overwritten give their space back
    src = tmp_path / "s.raw"
    r = random.Random(3)
    src.write_bytes(b"".join(r.randbytes(2048) + bytes(2048) for _ in range(16 * MiB // 4096)))
    comp = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", str(src), str(comp))
    old_end = os.stat(comp).st_size
    meta_end = 5 * 65536  # header, refcount table and block, L1, L2: below 5 clusters
    assert _allocated(comp, meta_end, old_end) > 7 * MiB  # about half of 16 MiB
    d = open_q(comp)
    try:
        fresh = r.randbytes(16 * MiB)
        d.writev([memoryview(fresh)], 0)  # every new cluster lies past old_end
        d.flush()
        assert read_all(d) == fresh
    finally:
        d.close()
    check_clean(comp)
    assert _allocated(comp, meta_end, old_end) < MiB  # the old compressed clusters: holes


@pytest.mark.parametrize("version,old", [(3, MiB), (2, MiB), (3, MiB + 1536)])
def test_resize_over_a_larger_backing_file_reads_zeros(tmp_path: Path, version: int,
                                                       old: int) -> None:
    base = tmp_path / "b.raw"
    base.write_bytes(b"\x5a" * 3 * MiB)
    img = tmp_path / "g.qcow2"
    create_qcow2(img, old, backing="b.raw", backing_format="raw", version=version)
    d = open_q(img)
    try:
        d.writev([memoryview(b"\x01" * 4096)], old - 4096)  # COW of the last cluster
        d.resize(4 * MiB)
        got = read_all(d)
    finally:
        d.close()
    model = bytearray(b"\x5a" * old + bytes(4 * MiB - old))
    model[old - 4096:old] = b"\x01" * 4096
    assert got == bytes(model)
    check_clean(img)
    run("qemu-img", "compare", "-F", "raw", str(img), str(_write(tmp_path / "m.raw", model)))


def test_img_resize_and_commit_as_qemu_img(tmp_path: Path) -> None:
    from tests.conftest import run_pyvirt

    base = tmp_path / "b.raw"
    base.write_bytes(b"\x5a" * 3 * MiB)
    img = tmp_path / "g.qcow2"
    create_qcow2(img, MiB, backing="b.raw", backing_format="raw")
    out = run_pyvirt("img", "resize", str(img), "+2M", timeout=120)
    assert out.returncode == 0, out.stderr
    model = b"\x5a" * MiB + bytes(2 * MiB)
    run("qemu-img", "compare", "-F", "raw", str(img), str(_write(tmp_path / "m.raw", model)))
    # commit empties the top with a full discard: nothing of it left, it reads as the base
    qio(img, "write -P 0x33 0 128k")
    out = run_pyvirt("img", "commit", str(img), timeout=120)
    assert out.returncode == 0, out.stderr
    check_clean(img)
    top = json.loads(run("qemu-img", "map", "--output", "json", str(img)))
    assert not [e for e in top if e["depth"] == 0 and e["present"]], top
    run("qemu-img", "compare", str(img), str(base))


@pytest.mark.parametrize("backing", [False, True])
def test_parallel_partial_writes_into_one_new_cluster_lose_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backing: bool) -> None:
    """Allocating writes move their data outside the metadata lock; two writes
    into different sectors of one still-unallocated cluster must not both
    copy-on-write the old content (the later mapping would drop the other's
    data): the second waits for the first. The data write is slowed down so
    that the writes really overlap in time."""
    import time

    cs = 65536
    img = tmp_path / "p.qcow2"
    expect = bytearray(4 * cs)
    if backing:
        base = tmp_path / "b.raw"
        content = bytes(random.Random(5).randbytes(4 * cs))
        base.write_bytes(content)
        expect[:] = content
        create_qcow2(img, 4 * cs, backing="b.raw", backing_format="raw")
    else:
        create_qcow2(img, 4 * cs)
    d = open_q(img)
    real = Qcow2Disk._data_write

    def slow(self: Qcow2Disk, sub: list[memoryview], host: int, n: int) -> None:
        time.sleep(0.002)
        real(self, sub, host, n)

    monkeypatch.setattr(Qcow2Disk, "_data_write", slow)
    errors: list[BaseException] = []
    sectors = list(range(4 * cs // 512))
    random.Random(1).shuffle(sectors)

    def worker(k: int) -> None:
        try:
            for s in sectors[k::16]:
                d.writev([memoryview(bytes([s % 251 + 1]) * 512)], s * 512)
        except BaseException as exc:
            errors.append(exc)

    for s in sectors:
        expect[s * 512:(s + 1) * 512] = bytes([s % 251 + 1]) * 512
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    buf = bytearray(4 * cs)
    d.readv([memoryview(buf)], 0)
    d.close()
    assert buf == expect
    info = check_clean(img)
    assert info.get("leaks", 0) == 0, info
