"""Hostile qcow2 images: every header field, table and offset an image hands us is
checked (issue #11, docs/security.md "Hostile disk images").

Each case starts from a real image made by qemu-img and damages one thing. The
outcome must be a one-line ``DiskError`` at open that says what is wrong, or the
requests that touch the damage fail with EIO while the others still work;
never another exception, a hang (pytest-timeout), a write over the header or
unbounded memory. ``check_qcow2`` over the same image gives a result, never an
exception.
"""

from __future__ import annotations

import errno
import os
import re
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.qcow2_hostile_lib import (
    INCOMPAT_COMPRESSION,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    L2_COMPRESSED,
    L2_COPIED,
    L2_ZERO,
    OFFSET_MASK,
    Layout,
    attempt,
    check_image,
    copy,
    exercise,
    extensions,
    get,
    layout,
    make_qcow2,
    open_image,
    peek_u64,
    poke,
    poke_u64,
    put,
    qemu_img,
    qemu_io,
)

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
WHAT = "disks[0].path"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A v3 image, 64 KiB clusters, 4 MiB, with data in its first and third MiB."""
    p = make_qcow2(tmp_path_factory.mktemp("hostile") / "base.qcow2", 4 * MiB)
    qemu_io(p, "write -P 0x5a 0 128k", "write -P 0xa5 2M 64k")
    return p


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 KiB clusters, 1 GiB virtual: two L1 entries, so damage to one L2 table leaves the
    other whole. Data: 0x11 over [0, 128K), 0x22 over [512M, 512M + 128K)."""
    p = make_qcow2(tmp_path_factory.mktemp("small") / "small.qcow2", 1 << 30)
    qemu_io(p, "write -P 0x11 0 128k", "write -P 0x22 512M 128k")
    return p


def _refused(path: Path, *, writable: bool, pattern: str) -> str:
    """Open must fail with one DiskError line naming the field/file and matching ``pattern``."""
    disk, msg = open_image(path, writable=writable, what=WHAT)
    if disk is not None:
        disk.close()
        pytest.fail(f"{path.name} opened (writable={writable}); expected a refusal ~ {pattern}")
    assert msg is not None and "\n" not in msg
    assert WHAT in msg or path.name in msg, msg
    assert re.search(pattern, msg, re.I), f"{msg!r} does not say {pattern!r}"
    return msg


def _checked(path: Path, *, damaged: bool) -> None:
    res = check_image(path)
    if damaged:
        assert res.corruptions + res.check_errors > 0, res
    repaired = copy(path, path.with_suffix(".repair"))
    check_image(repaired, repair="all")
    check_image(repaired)


# ---- header fields ---------------------------------------------------------------------------

def _l1_at_reftable(p: Path) -> None:
    put(p, "l1_table_offset", get(p, "refcount_table_offset"))


def _ext_len(value: int) -> Callable[[Path], None]:
    def patch(p: Path) -> None:
        off, _, _ = next(iter(extensions(p)))
        poke(p, off + 4, struct.pack(">I", value))
    return patch


def _field(name: str, value: int) -> Callable[[Path], None]:
    return lambda p: put(p, name, value)


def _incompat(bits: int) -> Callable[[Path], None]:
    return lambda p: put(p, "incompatible_features", get(p, "incompatible_features") | bits)


def _compression_type(value: int) -> Callable[[Path], None]:
    def patch(p: Path) -> None:
        _incompat(INCOMPAT_COMPRESSION)(p)
        poke(p, 104, bytes([value]))
    return patch


# (id, damage, what the refusal must say). Each is refused at open, read-only and writable.
REFUSED: list[tuple[str, Callable[[Path], None], str]] = [
    ("version-1", _field("version", 1), r"version"),
    ("version-4", _field("version", 4), r"version"),
    ("cluster_bits-8", _field("cluster_bits", 8), r"cluster"),
    ("cluster_bits-22", _field("cluster_bits", 22), r"cluster"),
    ("cluster_bits-63", _field("cluster_bits", 63), r"cluster"),
    ("size-2^63", _field("size", 1 << 63), r"size|big|large|L1"),
    ("size-unaligned", _field("size", (1 << 62) + 1), r"size|big|large|L1"),
    ("l1_size-2^31", _field("l1_size", 1 << 31), r"L1"),
    ("l1_size-0", _field("l1_size", 0), r"L1|size"),
    ("l1-past-eof", _field("l1_table_offset", 1 << 40), r"L1"),
    ("l1-unaligned", lambda p: put(p, "l1_table_offset", get(p, "l1_table_offset") + 8), r"L1"),
    ("reftable-clusters-huge", _field("refcount_table_clusters", 1 << 31), r"refcount"),
    ("reftable-past-eof", _field("refcount_table_offset", 1 << 40), r"refcount"),
    ("reftable-unaligned", lambda p: put(p, "refcount_table_offset", 0x10008), r"refcount"),
    ("refcount_order-7", _field("refcount_order", 7), r"refcount"),
    ("backing-offset-past-eof", lambda p: (put(p, "backing_file_offset", 1 << 40),
                                           put(p, "backing_file_size", 8)), r"backing"),
    ("backing-offset-in-header", lambda p: (put(p, "backing_file_offset", 8),
                                            put(p, "backing_file_size", 16)), r"backing"),
    ("backing-size-2^31", lambda p: (put(p, "backing_file_offset", 0x200),
                                     put(p, "backing_file_size", 1 << 31)), r"backing"),
    ("header_length-100", _field("header_length", 100), r"header"),
    ("header_length-past-cluster", _field("header_length", 65536 + 8), r"header"),
    ("extension-runs-off", _ext_len(0xFFFF_FFF0), r"extension|header"),
    ("extension-past-cluster", _ext_len(65536), r"extension|header"),
    ("incompatible-unknown", _incompat(1 << 20), r"feature|incompatible|unsupported"),
    ("external-data-file", _incompat(INCOMPAT_DATA_FILE), r"data.file|external|feature"),
    ("compression-type-unknown", _compression_type(7), r"compression"),
    ("crypt-aes", _field("crypt_method", 1), r"encrypt|crypt|AES"),
    ("crypt-luks", _field("crypt_method", 2), r"encrypt|crypt|LUKS"),
]


@pytest.mark.parametrize(("damage", "says"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
@pytest.mark.parametrize("writable", [False, True], ids=["ro", "rw"])
def test_bad_header_is_refused_at_open(base: Path, tmp_path: Path, damage: Callable[[Path], None],
                                       says: str, writable: bool) -> None:
    p = copy(base, tmp_path / "h.qcow2")
    damage(p)
    before = p.read_bytes()
    tracemalloc.start()
    try:
        _refused(p, writable=writable, pattern=says)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB, f"refusing took {peak >> 20} MiB"  # nothing sized by the header
    assert p.read_bytes() == before, "a refused image was written"
    _checked(p, damaged=False)  # a result; what it makes of a header pyvirt refuses is C's call


# QEMU opens these and catches the overlap when it would write; refusing at open is as good
CONTAINED: list[tuple[str, Callable[[Path], None]]] = [
    ("l1-overlaps-reftable", _l1_at_reftable),
    ("l1-in-header", _field("l1_table_offset", 0)),
    ("reftable-in-header", _field("refcount_table_offset", 0)),
    ("reftable-overlaps-l1", lambda p: put(p, "refcount_table_offset",
                                           get(p, "l1_table_offset"))),
    ("snapshots-2^31", lambda p: (put(p, "nb_snapshots", 1 << 31),
                                  put(p, "snapshots_offset", 0x30000))),
    ("snapshots-past-eof", lambda p: (put(p, "nb_snapshots", 1),
                                      put(p, "snapshots_offset", 1 << 40))),
]


@pytest.mark.parametrize("damage", [c[1] for c in CONTAINED], ids=[c[0] for c in CONTAINED])
@pytest.mark.parametrize("writable", [False, True], ids=["ro", "rw"])
def test_overlapping_tables_are_refused_or_contained(base: Path, tmp_path: Path,
                                                     damage: Callable[[Path], None],
                                                     writable: bool) -> None:
    p = copy(base, tmp_path / "o.qcow2")
    damage(p)
    exercise(p, writable=writable)
    check_image(p)


def test_corrupt_bit_opens_read_only_only(base: Path, tmp_path: Path) -> None:
    p = copy(base, tmp_path / "c.qcow2")
    _incompat(INCOMPAT_CORRUPT)(p)
    before = p.read_bytes()
    msg = _refused(p, writable=True, pattern=r"corrupt")
    assert "check" in msg, msg  # tells the user the way out
    assert p.read_bytes() == before
    disk, msg2 = open_image(p, writable=False)
    assert disk is not None, msg2
    try:
        buf = bytearray(128 << 10)
        disk.readv([memoryview(buf)], 0)
        assert buf == b"\x5a" * len(buf)
    finally:
        disk.close()
    assert p.read_bytes() == before


def test_dirty_image_opens_read_only_without_writing(base: Path, tmp_path: Path) -> None:
    p = copy(base, tmp_path / "d.qcow2")
    _incompat(INCOMPAT_DIRTY)(p)
    before = p.read_bytes()
    disk, msg = open_image(p, writable=False)
    assert disk is not None, msg
    disk.close()
    assert p.read_bytes() == before


# ---- damage found while serving requests ---------------------------------------------------

def _read(disk: object, off: int, length: int) -> tuple[bool, bytes]:
    buf = bytearray(length)
    ok, _ = attempt(disk.readv, [memoryview(buf)], off)  # type: ignore[attr-defined]
    return ok, bytes(buf)


def _damaged_request_fails_others_work(p: Path, bad: tuple[int, int],
                                       good: list[tuple[int, int, int]], *,
                                       writable: bool = False, must_fail: bool = True) -> None:
    """Reading ``bad`` fails with EIO (or the image is refused at open); each (off, len,
    byte) of ``good`` still reads back, before and after the failure."""
    disk, msg = open_image(p, writable=writable)
    if disk is None:
        assert msg and (WHAT in msg or p.name in msg), msg
        return
    try:
        for off, length, byte in good:
            assert _read(disk, off, length) == (True, bytes([byte]) * length), hex(off)
        for _ in range(2):  # the failure is not cached into something else
            ok, _ = _read(disk, *bad)
            assert not (ok and must_fail), f"read of damaged {bad[0]:#x}+{bad[1]:#x} succeeded"
        for off, length, byte in good:
            assert _read(disk, off, length) == (True, bytes([byte]) * length), hex(off)
        ok, ext = attempt(disk.block_status, 0, disk.size)
        assert ok or isinstance(ext, OSError)
    finally:
        disk.close()


G = 512 * MiB
GOOD_SMALL = [(0, 64 << 10, 0x11), (G + (64 << 10), 64 << 10, 0x22)]
K64 = 64 << 10


def _l1_damage(index: int, value: int) -> Callable[[Path, Layout], None]:
    return lambda p, lay: poke_u64(p, lay.l1_entry(index), value)


def _l2_damage(guest: int, value: int) -> Callable[[Path, Layout], None]:
    return lambda p, lay: poke_u64(p, lay.l2_entry(p, guest), value)


# (id, damage, the guest range it hits, whether reading it must fail). ``small`` keeps 0x11
# in [0, 64K) and 0x22 in [512M + 64K, 512M + 128K) whatever is done to L1 entry 1 (which
# maps [512M, 1G)) or to the L2 entries of the clusters at 64K and 512M. Where QEMU reads
# on (it ignores reserved bits when reading), either answer is allowed, bounded.
RUNTIME: list[tuple[str, Callable[[Path, Layout], None], tuple[int, int], bool]] = [
    ("l1-past-eof", _l1_damage(1, L2_COPIED | (1 << 40)), (G, 4096), True),
    ("l1-into-header-unaligned", _l1_damage(1, L2_COPIED | 0x200), (G, 4096), True),
    ("l1-unaligned", _l1_damage(1, L2_COPIED | 0x30200), (G, 4096), True),
    ("l1-reserved-bits", _l1_damage(1, L2_COPIED | (1 << 60) | 0x30000), (G, 4096), False),
    ("l2-past-2^56", _l2_damage(K64, L2_COPIED | (1 << 56) | (1 << 16)), (K64, 512), False),
    ("l2-past-eof", _l2_damage(K64, L2_COPIED | (OFFSET_MASK & ~0xFFFF)), (K64, 512), True),
    ("l2-at-1TiB", _l2_damage(K64, L2_COPIED | (1 << 40)), (K64, 512), True),
    ("l2-unaligned", _l2_damage(K64, L2_COPIED | (1 << 16) | 0x400), (K64, 512), True),
    ("l2-into-header", _l2_damage(G, L2_COPIED | 0x200), (G, 512), True),
    ("compressed-past-eof", _l2_damage(K64, L2_COMPRESSED | (1 << 45)), (K64, 512), True),
    ("zero-with-unaligned", _l2_damage(G, L2_ZERO | 0x10200), (G, 512), True),
]


def _status_stops_before_damage(p: Path) -> None:
    """[128K, 512M) is unallocated and whole in every case: its status is known even when
    the range asked for runs on into the damage at 512M."""
    disk, _ = open_image(p, writable=False)
    if disk is None:
        return
    try:
        ok, ext = attempt(disk.block_status, 128 << 10, disk.size - (128 << 10))
        assert ok, f"block_status of a whole range failed for damage further on: {ext}"
        assert ext.offset == 128 << 10 and ext.offset + ext.length <= G and not ext.data, ext
    finally:
        disk.close()


@pytest.mark.parametrize(("damage", "bad", "must_fail"), [c[1:] for c in RUNTIME],
                         ids=[c[0] for c in RUNTIME])
@pytest.mark.parametrize("writable", [False, True], ids=["ro", "rw"])
def test_runtime_damage_fails_only_its_requests(small: Path, tmp_path: Path,
                                                damage: Callable[[Path, Layout], None],
                                                bad: tuple[int, int], must_fail: bool,
                                                writable: bool) -> None:
    p = copy(small, tmp_path / "r.qcow2")
    damage(p, layout(p))
    # damage to L1 entry 1 takes all of [512M, 1G) with it
    good = GOOD_SMALL[:1] if bad[0] == G and bad[1] == 4096 else GOOD_SMALL
    _damaged_request_fails_others_work(p, bad, good, writable=writable, must_fail=must_fail)
    _status_stops_before_damage(p)
    size = p.stat().st_size
    exercise(p, writable=writable)
    # nothing written where the damage points (1 TiB, 2^56): the file does not jump
    assert p.stat().st_size < size + 16 * MiB, p.stat().st_size
    d = copy(small, tmp_path / "d.qcow2")
    damage(d, layout(d))
    _checked(d, damaged=True)


def test_undamaged_control(small: Path, tmp_path: Path) -> None:
    # the harness over the image the damage cases start from: everything works
    for writable in (False, True):
        out = exercise(copy(small, tmp_path / "x.qcow2"), writable=writable)
        assert out and out.failed == 0 and out.done > 0, out
    _checked(small, damaged=False)
    assert check_image(small).corruptions == 0


def _compressed(tmp_path: Path, ctype: str, cluster: int = 65536) -> Path:
    raw = tmp_path / "raw.img"
    raw.write_bytes(b"\x33" * cluster + b"\x44" * cluster + bytes(2 * MiB - 2 * cluster))
    out = tmp_path / f"c-{ctype}.qcow2"
    qemu_img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o",
             f"compression_type={ctype},cluster_size={cluster}", raw, out)
    return out


def _bomb(ctype: str, inflated: int) -> bytes:
    if ctype == "zlib":
        c = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate, as QEMU writes
        return c.compress(bytes(inflated)) + c.flush()
    import zstandard

    return zstandard.ZstdCompressor(level=19).compress(bytes(inflated))


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_bomb_and_absurd_descriptors(tmp_path: Path, ctype: str) -> None:
    src = _compressed(tmp_path, ctype)
    lay = layout(src)
    cb = lay.cluster_bits
    x = 62 - (cb - 8)  # compressed descriptor: offset below bit x, sector count above
    entry_at = lay.l2_entry(src, 65536)
    assert peek_u64(src, entry_at) & L2_COMPRESSED, "qemu-img did not compress"
    good = [(0, 65536, 0x33)]

    # a bomb: 64 MiB of zeros squeezed into under two clusters, for a 64 KiB cluster
    bomb = _bomb(ctype, 64 * MiB)
    assert len(bomb) < 2 * 65536 - 512, len(bomb)
    p = copy(src, tmp_path / "bomb.qcow2")
    end = (os.path.getsize(p) + 511) & ~511
    poke(p, end, bomb + bytes(-len(bomb) % 512))
    sectors = (len(bomb) + 511) // 512
    poke_u64(p, entry_at, L2_COMPRESSED | ((sectors - 1) << x) | end)
    for writable in (False, True):
        disk, msg = open_image(copy(p, tmp_path / "b2.qcow2"), writable=writable)
        assert disk is not None, msg
        try:
            tracemalloc.start()
            try:
                ok, data = _read(disk, 65536, 65536)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert peak < 16 * MiB, f"the bomb took {peak >> 20} MiB"
            assert not ok or data == bytes(65536)  # EIO, or the cluster's worth as QEMU does
            assert _read(disk, 0, 65536) == (True, b"\x33" * 65536)
        finally:
            disk.close()
    _checked(p, damaged=False)

    # the largest sector count the descriptor holds, running far past the end of the file
    q = copy(src, tmp_path / "absurd.qcow2")
    host = peek_u64(q, entry_at) & ((1 << x) - 1)
    poke_u64(q, entry_at, L2_COMPRESSED | (((1 << (62 - x)) - 1) << x) | host)
    exercise(q, writable=False)
    disk, msg = open_image(q, writable=False)
    assert disk is not None, msg
    try:
        ok, data = _read(disk, 65536, 65536)  # EIO, or the stream's data as QEMU reads it
        assert not ok or data == b"\x44" * 65536
        assert _read(disk, 0, 65536) == (True, b"\x33" * 65536)
    finally:
        disk.close()
    exercise(q, writable=True)
    _checked(copy(q, tmp_path / "q2.qcow2"), damaged=False)

    # past the end of the file
    r = copy(src, tmp_path / "past.qcow2")
    poke_u64(r, entry_at, L2_COMPRESSED | (1 << x) | (1 << (x - 2)))
    _damaged_request_fails_others_work(r, (65536, 65536), good)
    exercise(r, writable=True)


def test_extended_l2_alloc_and_zero_both_set(tmp_path: Path) -> None:
    p = make_qcow2(tmp_path / "e.qcow2", MiB, opts="extended_l2=on")
    qemu_io(p, "write -P 0x66 0 128k")
    lay = layout(p)
    assert lay.extended_l2
    entry = lay.l2_entry(p, 65536)
    bitmap = peek_u64(p, entry + 8)
    assert bitmap & 1, hex(bitmap)  # subcluster 0 allocated
    poke_u64(p, entry + 8, bitmap | (1 << 32))  # ... and zero: invalid
    _damaged_request_fails_others_work(p, (65536, 2048), [(0, 65536, 0x66)])
    exercise(copy(p, tmp_path / "e2.qcow2"), writable=True)
    _checked(p, damaged=True)


def test_refcount_block_pointing_at_header_or_l1(base: Path, tmp_path: Path) -> None:
    for value in (0x100, layout(base).l1_offset, 1 << 40):
        p = copy(base, tmp_path / f"rb-{value:x}.qcow2")
        poke_u64(p, layout(p).reftable_offset, value)
        exercise(p, writable=False)
        out = exercise(p, writable=True)
        # a write needing a new cluster cannot be served from a bogus refcount block
        assert not out or out.failed > 0 or value == layout(base).l1_offset, out
        check_image(p)


def test_refcount_overflow(tmp_path: Path) -> None:
    # refcount_bits=1: every cluster is at its maximum once used; writes, rewrites and
    # discards must still give an image qemu-img calls clean
    p = make_qcow2(tmp_path / "r1.qcow2", 2 * MiB, cluster_size=4096, opts="refcount_bits=1")
    qemu_io(p, "write -P 0x77 0 64k")
    out = exercise(p, writable=True)
    assert out and out.failed == 0, out
    qemu_img("check", "-q", p)

    # 16-bit refcounts: a data cluster at 65535 (shared, no COPIED): a write must copy it,
    # never bump the count past its width
    q = make_qcow2(tmp_path / "r16.qcow2", MiB, cluster_size=4096)
    qemu_io(q, "write -P 0x78 0 8k")
    lay = layout(q)
    e = lay.l2_entry(q, 0)
    host = peek_u64(q, e) & OFFSET_MASK
    poke_u64(q, e, host)  # COPIED cleared: refcount > 1
    cidx = host >> lay.cluster_bits
    per_block = lay.cluster_size * 8 >> lay.refcount_order
    rb = peek_u64(q, lay.reftable_offset + 8 * (cidx // per_block))
    poke(q, rb + 2 * (cidx % per_block), b"\xff\xff")
    disk, msg = open_image(q, writable=True)
    assert disk is not None, msg
    try:
        ok, _ = attempt(disk.writev, [memoryview(b"\x79" * 512)], 0)
        if ok:
            assert _read(disk, 0, 1024) == (True, b"\x79" * 512 + b"\x78" * 512)
        assert _read(disk, 4096, 4096) == (True, b"\x78" * 4096)
    finally:
        disk.close()
    assert peek_u64(q, e) & OFFSET_MASK != host or not ok, "wrote in place into a shared cluster"
    check_image(q)


# ---- backing chains --------------------------------------------------------------------------

def _chain_refused(top: Path, pattern: str) -> None:
    for writable in (False, True):
        _refused(top, writable=writable, pattern=pattern)


def test_backing_loops_are_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    make_qcow2(a, MiB, backing="b.qcow2", unsafe=True)
    make_qcow2(b, MiB, backing="a.qcow2", unsafe=True)
    _chain_refused(a, r"loop|twice|cycle|itself|already|chain")
    s = make_qcow2(tmp_path / "self.qcow2", MiB, backing="self.qcow2", unsafe=True)
    _chain_refused(s, r"loop|twice|cycle|itself|already|chain")
    # the same file under another name (a hard link) is the same file
    os.link(a, tmp_path / "alias.qcow2")
    c = make_qcow2(tmp_path / "c.qcow2", MiB, backing="alias.qcow2", unsafe=True)
    qemu_img("rebase", "-u", "-b", "c.qcow2", "-F", "qcow2", b)
    _chain_refused(c, r"loop|twice|cycle|itself|already|chain")
    for p in (a, s, c):
        check_image(p)


def test_backing_chain_depth_is_capped(tmp_path: Path) -> None:
    base = tmp_path / "l0.img"
    base.write_bytes(bytes(MiB))
    prev, fmt = "l0.img", "raw"
    for i in range(1, 67):
        make_qcow2(tmp_path / f"l{i}.qcow2", MiB, backing=prev, backing_fmt=fmt, unsafe=True)
        prev, fmt = f"l{i}.qcow2", "qcow2"
    # 63 backing files below the top: under the cap of 64 however it is counted; 65: over
    disk, msg = open_image(tmp_path / "l63.qcow2", writable=False)
    assert disk is not None, msg
    assert len(disk.chain()) == 64
    disk.close()
    for top in ("l65.qcow2", "l66.qcow2"):
        tracemalloc.start()
        try:
            _chain_refused(tmp_path / top, r"deep|depth|chain|levels|64")
        finally:
            tracemalloc.stop()
    check_image(tmp_path / "l66.qcow2")


@pytest.mark.parametrize("kind", ["fifo", "directory", "chardev", "nul", "missing", "empty"])
def test_backing_that_is_not_a_file(tmp_path: Path, kind: str) -> None:
    names = {"fifo": "pipe", "directory": "dir", "chardev": "/dev/zero", "nul": "a\x00b",
             "missing": "nothere.qcow2", "empty": ""}
    if kind == "fifo":
        os.mkfifo(tmp_path / "pipe")
    elif kind == "directory":
        (tmp_path / "dir").mkdir()
    top = make_qcow2(tmp_path / "top.qcow2", MiB, backing="x" * 16, backing_fmt="raw",
                     unsafe=True)
    name = names[kind].encode()
    off = get(top, "backing_file_offset")
    poke(top, off, name + bytes(16 - len(name)))
    put(top, "backing_file_size", len(name))
    if kind == "empty":  # no backing file, as QEMU reads it, or refused
        disk, msg = open_image(top, writable=False)
        if disk is None:
            assert msg and re.search("backing", msg), msg
        else:
            assert len(disk.chain()) == 1
            disk.close()
        return
    _chain_refused(top, {"fifo": r"fifo|regular|not a|special", "directory": r"director|regular",
                         "chardev": r"device|regular|not a|character",
                         "nul": r"NUL|null|\\x00|\\0|invalid|character",
                         "missing": r"not found|no such|exist|missing"}[kind])
    assert "\x00" not in _refused(top, writable=False, pattern=r".")
    check_image(top)


def test_backing_opened_read_only_and_untouched(tmp_path: Path) -> None:
    b = make_qcow2(tmp_path / "b.qcow2", MiB)
    qemu_io(b, "write -P 0x42 0 1M")
    top = make_qcow2(tmp_path / "t.qcow2", MiB, backing="b.qcow2")
    before = b.read_bytes()
    out = exercise(top, writable=True)
    assert out and out.failed == 0, out
    assert b.read_bytes() == before
    qemu_img("check", "-q", top)


# ---- memory: caches are bounded whatever the image says -------------------------------------

def _many_l2(path: Path, size: int) -> Layout:
    """An image of ``size`` whose every L1 entry points at its own L2 table, every L2 entry
    a zero cluster: 512-byte clusters, so 64 entries per L2."""
    make_qcow2(path, size, cluster_size=512)
    lay = layout(path)
    end = (os.path.getsize(path) + 511) & ~511
    l2 = struct.pack(">Q", L2_ZERO) * 64
    l1 = bytearray()
    with open(path, "r+b") as f:
        f.seek(end)
        for i in range(lay.l1_size):
            f.write(l2)
            l1 += struct.pack(">Q", L2_COPIED | (end + 512 * i))
        f.seek(lay.l1_offset)
        f.write(l1)
    return lay


def test_metadata_cache_is_bounded(tmp_path: Path) -> None:
    from pyvirt.disk import open_disk
    from pyvirt.disk.backend import ChainLimits

    p = tmp_path / "many.qcow2"
    size = 512 * MiB  # 1M L2 entries in 16384 L2 tables: 8 MiB of L2
    lay = _many_l2(p, size)
    assert lay.l1_size == 16384
    cache = 1 * MiB
    buf = bytearray(512)
    view = memoryview(buf)
    disk = open_disk(p, format="qcow2", readonly=True, what=WHAT,
                     limits=ChainLimits(cache_bytes=cache))
    try:
        tracemalloc.start()
        try:
            # a read in every L2 table's span loads all 16384 of them, each once
            for off in range(0, size, 64 * 512):
                disk.readv([view], off + 512 * (off >> 15 & 63))
                assert not any(buf)
            ext = disk.block_status(0, size)  # the first 65536 entries, one extent
            assert ext.zero and not ext.data and ext.offset == 0, ext
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        off = ext.length  # the rest untraced (tracemalloc makes it 10x slower)
        while off < size:
            ext = disk.block_status(off, size - off)
            assert ext.zero and not ext.data and ext.offset == off, ext
            off += ext.length
    finally:
        disk.close()
    # the 1 MiB cache plus bookkeeping: never the 8 MiB of L2 the image holds
    assert peak < cache + 2 * MiB, f"peak {peak / MiB:.1f} MiB reading through 8 MiB of L2"


def test_l1_entries_sharing_one_l2_are_served(tmp_path: Path) -> None:
    # every L1 entry points at the same L2 table (refcount 1): reads work, writes either
    # work or fail with EIO, nothing loops
    p = make_qcow2(tmp_path / "share.qcow2", MiB, cluster_size=512)
    qemu_io(p, "write -P 0x55 0 512")
    lay = layout(p)
    first = peek_u64(p, lay.l1_entry(0))
    for i in range(1, lay.l1_size):
        poke_u64(p, lay.l1_entry(i), first)
    exercise(p, writable=False)
    exercise(p, writable=True)
    check_image(p)


def test_allowed_errors_are_eio() -> None:
    # the harness itself: CorruptImage is an OSError with EIO, the one run-time error allowed
    from pyvirt.disk import CorruptImage

    assert CorruptImage("x").errno == errno.EIO
