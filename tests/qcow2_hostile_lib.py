"""Building hostile qcow2 images and driving pyvirt over them (tests/unit/test_qcow2_hostile.py,
tests/unit/test_qcow2_fuzz.py).

Images start as real ones made by qemu-img/qemu-io (the referee) and are then
damaged field by field; ``exercise`` opens one the way a VM would and runs
every kind of request over it, checking that only the documented errors come
out: ``DiskError`` (one line) at open, ``OSError`` EIO (``CorruptImage``) for a
request. Anything else escapes as a test failure.
"""

from __future__ import annotations

import errno
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAGIC = b"QFI\xfb"

#: the v2/v3 header's fixed fields: name -> (offset, struct format)
FIELDS: dict[str, tuple[int, str]] = {
    "magic": (0, ">I"),
    "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"),
    "refcount_order": (96, ">I"),
    "header_length": (100, ">I"),
}

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4

L2_COPIED = 1 << 63
L2_COMPRESSED = 1 << 62
L2_ZERO = 1
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00

EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857


def qemu_img(*args: str | Path) -> str:
    proc = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, f"qemu-img {args}: {proc.stderr}"
    return proc.stdout


def qemu_io(path: Path, *commands: str, fmt: str = "qcow2") -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    proc = subprocess.run([*argv, str(path)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout + proc.stderr


def make_qcow2(path: Path, size: int, *, cluster_size: int = 65536, compat: str = "1.1",
               backing: str | None = None, backing_fmt: str | None = None,
               opts: str = "", unsafe: bool = False) -> Path:
    o = f"cluster_size={cluster_size},compat={compat}" + (f",{opts}" if opts else "")
    argv: list[str | Path] = ["create", "-q", "-f", "qcow2", "-o", o]
    if backing is not None:
        argv += ["-b", backing, "-F", backing_fmt or "qcow2"]
        if unsafe:
            argv.append("-u")
    qemu_img(*argv, path, str(size))
    return path


# ---- the header and the metadata it points at ---------------------------------------------


def get(path: Path | bytes, name: str) -> int:
    off, fmt = FIELDS[name]
    data = path if isinstance(path, bytes) else _pread(path, off + struct.calcsize(fmt), 0)
    return int(struct.unpack_from(fmt, data, off)[0])


def put(path: Path, name: str, value: int) -> None:
    off, fmt = FIELDS[name]
    poke(path, off, struct.pack(fmt, value))


def poke(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def poke_u64(path: Path, offset: int, value: int) -> None:
    poke(path, offset, struct.pack(">Q", value))


def peek_u64(path: Path, offset: int) -> int:
    return int(struct.unpack(">Q", _pread(path, 8, offset))[0])


def _pread(path: Path, n: int, off: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


@dataclass
class Layout:
    """Where an image's metadata lies (from its header and tables)."""

    cluster_size: int
    cluster_bits: int
    l1_offset: int
    l1_size: int
    l2_offsets: list[int]  # one per non-empty L1 entry, in L1 order
    reftable_offset: int
    refblock_offsets: list[int]
    refcount_order: int
    extended_l2: bool
    header_length: int

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    def l1_entry(self, index: int) -> int:
        return self.l1_offset + 8 * index

    def l2_entry(self, path: Path, guest_offset: int) -> int:
        """The file offset of the L2 entry mapping ``guest_offset``."""
        per_l2 = self.cluster_size // self.l2_entry_size
        l1_index, l2_index = divmod(guest_offset >> self.cluster_bits, per_l2)
        l2 = peek_u64(path, self.l1_entry(l1_index)) & OFFSET_MASK
        assert l2, f"no L2 table for guest offset {guest_offset:#x}"
        return l2 + self.l2_entry_size * l2_index

    def metadata_offsets(self) -> list[int]:
        """Every metadata cluster: header, L1, L2s, refcount table and blocks."""
        out = [0, self.l1_offset, self.reftable_offset, *self.l2_offsets, *self.refblock_offsets]
        return sorted({o for o in out if o >= 0})


def layout(path: Path) -> Layout:
    head = _pread(path, 112, 0)
    cluster_bits = get(head, "cluster_bits")
    cs = 1 << cluster_bits
    version = get(head, "version")
    l1_off, l1_size = get(head, "l1_table_offset"), get(head, "l1_size")
    rt_off, rt_clusters = get(head, "refcount_table_offset"), get(head, "refcount_table_clusters")
    l1 = _pread(path, 8 * l1_size, l1_off)
    l2s = [e & OFFSET_MASK for (e,) in struct.iter_unpack(">Q", l1) if e & OFFSET_MASK]
    rt = _pread(path, rt_clusters * cs, rt_off)
    rbs = [e & ~(cs - 1) for (e,) in struct.iter_unpack(">Q", rt) if e]
    incompat = get(head, "incompatible_features") if version >= 3 else 0
    return Layout(cs, cluster_bits, l1_off, l1_size, l2s, rt_off, rbs,
                  get(head, "refcount_order") if version >= 3 else 4,
                  bool(incompat & INCOMPAT_EXTL2),
                  get(head, "header_length") if version >= 3 else 72)


def extensions(path: Path) -> Iterator[tuple[int, int, int]]:
    """(file offset of the extension's header, type, length) for each header extension."""
    lay = layout(path)
    off = lay.header_length
    data = _pread(path, lay.cluster_size, 0)
    while off + 8 <= len(data):
        typ, length = struct.unpack_from(">II", data, off)
        if typ == 0:
            return
        yield off, typ, length
        off += 8 + ((length + 7) & ~7)


def copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


# ---- driving pyvirt ------------------------------------------------------------------------


class Unexpected(AssertionError):
    """pyvirt let out something other than the documented errors."""


#: more errnos to let through (exploring past a known finding; empty in the tests)
EXTRA_ERRNOS: set[int] = set()


def _allowed(exc: BaseException, *, at_open: bool = False) -> bool:
    """DiskError only at open (one line); a request: OSError EIO (``CorruptImage``)."""
    from pyvirt.disk import DiskError

    if isinstance(exc, DiskError):
        if not at_open:
            return False
        if "\n" in str(exc):
            raise Unexpected(f"DiskError is not one line: {exc!r}") from exc
        return True
    return isinstance(exc, OSError) and (exc.errno == errno.EIO or exc.errno in EXTRA_ERRNOS)


@dataclass
class Outcome:
    refused: str | None = None  # the DiskError at open
    failed: int = 0  # requests that failed with EIO
    done: int = 0  # requests that succeeded
    size: int = 0

    def __bool__(self) -> bool:
        return self.refused is None


def attempt(fn: Any, *args: Any, **kw: Any) -> tuple[bool, Any]:
    """(True, result) or (False, the allowed error); anything else raises ``Unexpected``."""
    try:
        return True, fn(*args, **kw)
    except Exception as exc:
        if not _allowed(exc):
            raise Unexpected(f"{fn.__name__}{args}: {type(exc).__name__}: {exc}") from exc
        return False, exc


def open_image(path: Path, *, writable: bool, what: str = "disks[0].path",
               limits: Any = None) -> tuple[Any, str | None]:
    """(the open disk, None) or (None, the one-line DiskError)."""
    from pyvirt.disk import DiskError, open_disk

    try:
        return open_disk(path, format="qcow2", readonly=not writable, what=what,
                         limits=limits), None
    except DiskError as exc:
        _allowed(exc, at_open=True)
        return None, str(exc)
    except Exception as exc:
        raise Unexpected(f"open_disk: {type(exc).__name__}: {exc}") from exc


def exercise(path: Path, *, writable: bool, max_read: int = 4 << 20, steps: int = 512,
             ranges: list[tuple[int, int]] | None = None, what: str = "disks[0].path") -> Outcome:
    """Open ``path`` and run every kind of request over it (reads of up to ``max_read``
    bytes: the whole disk when small, else its head and tail; ``block_status`` over the
    whole disk in at most ``steps`` extents; when writable: writes read back at once,
    write_zeroes, discard, flush); then close. Only documented errors may come out;
    the header's identifying fields are never overwritten."""
    before = _pread(path, 32, 0)
    disk, refused = open_image(path, writable=writable, what=what)
    if disk is None:
        assert refused
        assert what in refused or path.name in refused, f"names neither field nor file: {refused}"
        return Outcome(refused=refused)
    out = Outcome(size=disk.size)
    try:
        size = disk.size
        assert size >= 0 and size % 512 == 0, size
        for off, length in (ranges or _read_ranges(size, max_read)):
            ok, _ = attempt(disk.readv, [memoryview(bytearray(length))], off)
            out.done += ok
            out.failed += not ok
        _walk_status(disk, size, steps, out)
        if writable and size:
            gran = max(512, min(int(getattr(disk, "cluster_size", 65536)), 1 << 21))
            for off, length in _write_ranges(size, gran):
                data = bytes([(off >> 9) & 0xFF or 1]) * length
                ok, _ = attempt(disk.writev, [memoryview(data)], off)
                if ok:
                    buf = bytearray(length)
                    rok, _ = attempt(disk.readv, [memoryview(buf)], off)
                    if rok and buf != data:
                        raise Unexpected(f"wrote {length} bytes at {off:#x}, read back others")
                out.done += ok
                out.failed += not ok
            for fn, args, kw in ((disk.write_zeroes, (0, min(size, gran)), {"unmap": False}),
                                 (disk.write_zeroes, (size - min(size, gran), min(size, gran)),
                                  {"unmap": True}),
                                 (disk.discard, (0, min(size, 2 * gran)), {}),
                                 (disk.flush, (), {})):
                ok, _ = attempt(fn, *args, **kw)
                out.done += ok
                out.failed += not ok
    finally:
        attempt(disk.close)
        attempt(disk.close)  # idempotent
    after = _pread(path, 32, 0)
    if after[:8] != before[:8] or after[20:32] != before[20:32]:
        raise Unexpected(f"the header was overwritten: {before.hex()} -> {after.hex()}")
    return out


def _read_ranges(size: int, max_read: int) -> list[tuple[int, int]]:
    chunk = 1 << 20
    if size <= max_read:
        return [(o, min(chunk, size - o)) for o in range(0, size, chunk)]
    half = (max_read // 2) & ~511
    tail = (size - half) & ~511
    return [(0, half), (tail, size - tail), ((size // 2) & ~511, 512)]


def _write_ranges(size: int, gran: int) -> list[tuple[int, int]]:
    out = [(0, min(size, 4096)), (min(gran, size - 512) & ~511, 512)]
    if size > 2 * gran:
        out += [((size // 2) & ~511, min(gran + 512, size - (size // 2 & ~511))),
                (size - 512, 512)]
    return out


def _walk_status(disk: Any, size: int, steps: int, out: Outcome) -> None:
    off = 0
    gran = int(getattr(disk, "cluster_size", 512)) or 512
    for _ in range(steps):
        if off >= size:
            return
        ok, ext = attempt(disk.block_status, off, size - off)
        if not ok:
            out.failed += 1
            off = (off // gran + 1) * gran
            continue
        out.done += 1
        if ext.offset != off or not 0 < ext.length <= size - off:
            raise Unexpected(f"block_status({off:#x}) -> {ext}")
        off += ext.length


def check_image(path: Path, *, repair: str | None = None) -> Any:
    """``check_qcow2`` over ``path``: a ``CheckResult`` whatever the image holds."""
    from pyvirt.disk.qcow2_check import CheckResult, check_qcow2

    fd = os.open(path, os.O_RDWR if repair else os.O_RDONLY)
    try:
        res = check_qcow2(fd, repair=repair, filename=str(path))
    except Exception as exc:
        raise Unexpected(f"check_qcow2(repair={repair}): {type(exc).__name__}: {exc}") from exc
    finally:
        os.close(fd)
    assert isinstance(res, CheckResult), res
    return res
