"""Hostile qcow2 images (``open_disk`` → ``Qcow2Disk``, and ``check_qcow2``): the fuzzer
either writes a whole small image (512-byte clusters, seeded with images qemu-img made:
v2, v3, compressed zlib/zstd, a zero cluster, a backing file) or edits a larger seed
(64 KiB and 32 KiB clusters, extended L2, a 2-deep chain, a dirty lazy-refcounts image)
at offsets biased toward its metadata (header fields, L1, L2, refcount table and blocks).

Each image is opened read-only (reads of its head and tail, ``block_status`` over it),
then writable (writes read back at once, write-zeroes, discard, flush, close); on
some inputs it is checked with ``check_qcow2`` in between and repaired at the end.

Documented outcomes: ``DiskError`` at open (one line), ``OSError`` EIO (``CorruptImage``)
for a request. Anything else is a finding; so is a write that reads back differently,
a header overwritten, or a backing file written."""

from __future__ import annotations

import atexit
import errno
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fuzz.common import Finding, Provider, check

# imported here, not lazily: the runner instruments only what a target imports at load
from pyvirt.disk import DiskError, open_disk
from pyvirt.disk.backend import ChainLimits
from pyvirt.disk.qcow2 import Qcow2Disk  # noqa: F401
from pyvirt.disk.qcow2_check import check_qcow2

MAX_LEN = 16384
#: reads and the metadata caches are bounded: a few MiB per input at most
RSS_LIMIT_MB = 1024

# in memory where possible: every close flushes (fdatasync)
_dir = Path(tempfile.mkdtemp(prefix="pyvirt-fuzz-qcow2-",
                             dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
atexit.register(shutil.rmtree, _dir, True)
_work = _dir / "work"


def _qemu(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=60)


def _make(name: str, size: str, opts: str, *io: str, backing: str | None = None) -> Path:
    p = _dir / "seeds" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts]
    if backing:
        argv += ["-b", backing, "-F", "qcow2"]
    _qemu(*argv, str(p), size)
    for cmd in io:
        _qemu("qemu-io", "-f", "qcow2", "-c", cmd, str(p))
    return p


def _compressed(name: str, opts: str) -> Path:
    raw = _dir / "seeds" / f"{name}.raw"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_bytes(b"\x01" * 512 + b"\x02" * 512 + bytes(3072))
    p = _dir / "seeds" / name
    _qemu("qemu-img", "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", opts,
          str(raw), str(p))
    return p


def _whole_seeds() -> list[bytes]:
    """Whole images small enough to be fuzzer input (512-byte clusters)."""
    base = _make("tiny-base", "64K", "cluster_size=512", "write -P 0x0b 0 2k")
    imgs = [
        _make("tiny-v3", "64K", "cluster_size=512", "write -P 0x11 0 1k", "write -z 1k 512",
              "write -P 0x12 40k 512"),
        _make("tiny-v2", "64K", "cluster_size=512,compat=0.10", "write -P 0x21 0 1536"),
        _make("tiny-rc1", "32K", "cluster_size=512,refcount_bits=1", "write -P 0x31 0 1k"),
        _compressed("tiny-zlib", "cluster_size=512,compression_type=zlib"),
        _compressed("tiny-zstd", "cluster_size=512,compression_type=zstd"),
        _make("tiny-top", "64K", "cluster_size=512", "write -P 0x41 512 512",
              backing=base.name),  # relative: found beside the input's copy
    ]
    return [p.read_bytes() for p in imgs]


def _edit_seeds() -> list[tuple[Path, list[int]]]:
    """Larger seeds, edited in place: (the top image, metadata offsets to aim at)."""
    mid_base = _make("chain-base", "1M", "cluster_size=4096", "write -P 0x51 0 64k")
    mid = _make("chain-mid", "1M", "cluster_size=65536", "write -P 0x52 16k 8k",
                backing=str(mid_base))
    dirty = _make("dirty", "1M", "cluster_size=4096,lazy_refcounts=on", "write -P 0x61 0 20k")
    with dirty.open("r+b") as f:  # not closed cleanly: the dirty bit stays set
        f.seek(72)
        bits = struct.unpack(">Q", f.read(8))[0]
        f.seek(72)
        f.write(struct.pack(">Q", bits | 1))
    out = []
    for p in (
        _make("v3-64k", "2M", "cluster_size=65536", "write -P 0x71 0 70k", "write -z 1M 64k"),
        _make("extl2", "1M", "cluster_size=32768,extended_l2=on", "write -P 0x72 0 3k",
              "write -P 0x73 40k 1k", "write -z 64k 2k"),
        _make("chain-top", "1M", "cluster_size=16384", "write -P 0x53 20k 4k",
              backing=str(mid)),
        dirty,
    ):
        out.append((p, _metadata(p.read_bytes())))
    return out


def _metadata(img: bytes) -> list[int]:
    """File offsets of header fields and of the entries of the L1, L2 and refcount tables."""
    cb = struct.unpack_from(">I", img, 20)[0]
    cs = 1 << cb
    l1_size, l1_off, rt_off, rt_clusters = struct.unpack_from(">IQQI", img, 36)
    offs = list(range(0, 104, 4))
    l1 = [struct.unpack_from(">Q", img, l1_off + 8 * i)[0] & 0x00FF_FFFF_FFFF_FE00
          for i in range(l1_size)]
    rt = [struct.unpack_from(">Q", img, rt_off + 8 * i)[0]
          for i in range(min(rt_clusters * cs // 8, 64))]
    offs += range(l1_off, l1_off + 8 * l1_size, 8)
    offs += range(rt_off, rt_off + 8 * len(rt), 8)
    for table in [t for t in l1 + rt if t and t + cs <= len(img)]:
        offs += range(table, table + min(cs, 1024), 8)
    return offs


_WHOLE = _whole_seeds()
_TINY_BASE = (_dir / "seeds" / "tiny-base").read_bytes()
_EDIT = _edit_seeds()

_INTERESTING = [0, 1, 0x200, 0x10000, 1 << 40, 1 << 56, 1 << 62, 1 << 63, (1 << 63) | 0x10000,
                (1 << 63) | (1 << 62), (1 << 64) - 1, 0xFFFF_FFFF, 0x8000_0000]


def seeds() -> list[bytes]:
    # atheris takes integers from the end of the input, bytes from its start
    # (the last byte: check and repair; the one before: whole image or edits)
    return [img + b"\x00\x00" for img in _WHOLE] + [bytes([i, 1, 0]) for i in range(len(_EDIT))]


def _image(fdp: Provider) -> Path:
    """Write this input's image (and the files its chain needs) under ``_work``."""
    _work.mkdir(exist_ok=True)
    (_work / "tiny-base").unlink(missing_ok=True)
    if fdp.ConsumeIntInRange(0, 1) == 0:
        # the seeds' backing file, by its relative name, as tiny-top records it
        (_work / "tiny-base").write_bytes(_TINY_BASE)
        top = _work / "top"
        top.write_bytes(fdp.ConsumeBytes(fdp.remaining_bytes()))
        return top
    src, meta = _EDIT[fdp.ConsumeIntInRange(0, len(_EDIT) - 1)]
    img = bytearray(src.read_bytes())
    for _ in range(fdp.ConsumeIntInRange(0, 16)):
        if fdp.remaining_bytes() < 2:
            break
        where = fdp.ConsumeIntInRange(0, 3)
        off = (meta[fdp.ConsumeIntInRange(0, len(meta) - 1)] if where else
               fdp.ConsumeIntInRange(0, len(img) - 1))
        how = fdp.ConsumeIntInRange(0, 3)
        if how == 0:
            val = _INTERESTING[fdp.ConsumeIntInRange(0, len(_INTERESTING) - 1)]
            data = struct.pack(">Q", val)
        elif how == 1:
            data = struct.pack(">Q", fdp.ConsumeIntInRange(0, (1 << 64) - 1))
        elif how == 2:
            data = struct.pack(">I", fdp.ConsumeIntInRange(0, (1 << 32) - 1))
        else:
            data = bytes([fdp.ConsumeIntInRange(0, 255)])
        img[off:off + len(data)] = data[:max(0, len(img) - off)]
    top = _work / "top"
    top.write_bytes(img)
    return top


def _one_line(exc: DiskError) -> None:
    check("\n" not in str(exc), f"DiskError is not one line: {exc!r}")


def _allowed(fn: Callable[..., Any], *args: Any, **kw: Any) -> tuple[bool, Any]:
    """A request: it works or fails with EIO (``open_disk``: or a one-line ``DiskError``)."""
    try:
        return True, fn(*args, **kw)
    except DiskError as exc:
        if fn is not open_disk:
            raise Finding(f"{fn.__name__}: DiskError from a request: {exc}") from exc
        _one_line(exc)
        return False, exc
    except OSError as exc:
        if exc.errno != errno.EIO:
            raise Finding(f"{fn.__name__}: OSError that is not EIO: {exc!r}") from exc
        return False, exc


def _requests(disk: Any, writable: bool) -> None:
    size = disk.size
    check(size >= 0 and size % 512 == 0, f"size {size}")
    head = min(size, 64 << 10)
    reads = [(0, head)]
    if size > head:
        reads.append(((size - head) & ~511, size - ((size - head) & ~511)))
    for off, n in reads:
        _allowed(disk.readv, [memoryview(bytearray(n))], off)
    off = 0
    for _ in range(64):
        if off >= size:
            break
        ok, ext = _allowed(disk.block_status, off, size - off)
        if not ok:
            off += 512
            continue
        check(ext.offset == off and 0 < ext.length <= size - off,
              f"block_status({off}) -> {ext}")
        off += ext.length
    if not writable or not size:
        return
    for off, n in ((0, min(size, 1536)), ((size // 2) & ~511, 512), (size - 512, 512)):
        data = bytes([(off >> 9) % 251 + 1]) * n
        ok, _ = _allowed(disk.writev, [memoryview(data)], off)
        if ok:
            buf = bytearray(n)
            rok, _ = _allowed(disk.readv, [memoryview(buf)], off)
            check(not rok or buf == data, f"wrote {n} at {off}, read back other data")
    _allowed(disk.write_zeroes, 0, min(size, 1024), unmap=False)
    _allowed(disk.discard, 0, min(size, 1 << 16))
    _allowed(disk.flush)


def _head(path: Path) -> bytes:
    with path.open("rb") as f:  # not read_bytes(): a hostile write may leave a huge file
        return f.read(32)


def _use(path: Path, writable: bool) -> None:
    head = _head(path)
    backing = _TINY_BASE if (_work / "tiny-base").exists() else None
    ok, disk = _allowed(open_disk, path, format="qcow2", readonly=not writable,
                        what="disks[0].path", limits=ChainLimits(cache_bytes=4 << 20))
    if not ok:
        check(str(disk).startswith("disks[0]"), f"DiskError names no field: {disk}")
        return
    try:
        _requests(disk, writable)
    finally:
        _allowed(disk.close)
    after = _head(path)
    check(after[:8] == head[:8] and after[20:32] == head[20:32], "the header was overwritten")
    if backing is not None:
        base = _work / "tiny-base"
        check(base.stat().st_size == len(backing) and base.read_bytes() == backing,
              "a backing file was written")


def _check(path: Path, repair: str | None) -> None:
    fd = os.open(path, os.O_RDWR if repair else os.O_RDONLY)
    try:
        check_qcow2(fd, repair=repair, filename=str(path))
    finally:
        os.close(fd)


def one_input(data: bytes) -> None:
    fdp = Provider(data)
    # check_qcow2 walks everything: on one input in two (and repairs on one in four)
    check = fdp.ConsumeIntInRange(0, 3)
    top = _image(fdp)
    _use(top, writable=False)
    if check < 2:
        _check(top, None)
    _use(top, writable=True)
    if check == 0:
        _check(top, "all")
