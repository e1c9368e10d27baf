"""The qcow2 backend: an image of L1/L2-mapped clusters over an optional backing chain.

Format per QEMU's docs/interop/qcow2.txt (versions 2 and 3). Reads: normal,
zero, unallocated (backing file or zeros), compressed (zlib, zstd) and
extended-L2 (subcluster) clusters. Writes: in place into clusters we own
(COPIED), else a new cluster with copy-on-write of the untouched part.

Crash safety (a crash at any moment leaves leaked clusters at worst, as in
QEMU): the L2 and refcount-block caches are write-back, and

* a refcount increment reaches the disk before any L2/L1 entry that points at
  the new cluster (dirty refcount blocks are written and synced before any
  dirty L2 table is written: ``_write_l2``);
* guest data is written before the L2 entry that maps it (the entry is set
  only after the data write returned, and L2 tables go out after a sync);
* a new L2 table is on disk before the L1 entry points at it (L1 is
  write-through, after a sync);
* a cluster is freed (refcount decremented) only after the L2/L1 change that
  dropped its last reference is on disk: frees are queued and applied in
  ``flush`` after the L2 sync, and only when no unlocked data I/O is in flight
  (so a freed cluster is never reused while a read or write still targets it).

Freed host clusters (refcount 0) are punched out of the host file
(``fallocate`` PUNCH_HOLE, as QEMU's ``pass-discard-request=on``) when the
free is applied, so the host file gives the space back.

``cache=none`` (O_DIRECT): the image file's fd (``ImageFile.fd``, which holds
the OFD lock) keeps O_DIRECT and carries guest data of allocated clusters
(reads, in-place writes, whole-cluster allocating writes; an unaligned buffer
goes through an aligned bounce buffer, and a range the device cannot do
directly through the page cache). A second open file description of the same
file without O_DIRECT (``/proc/self/fd/N``) carries metadata, COW-assembled
clusters and compressed reads. The two stay coherent because Linux keeps direct
and buffered I/O of one inode coherent per range: a direct read first writes
back dirty cached pages of its range, a direct write writes them back and then
invalidates them. So a cluster freed as metadata (written buffered) and reused
for data (written direct) never has a stale cached page that could later
overwrite it or be read instead of it, and a data cluster reused as metadata
is read fresh from the disk; a punched range is dropped from the cache too.
One ``fdatasync`` covers both descriptions (it syncs the inode).

Threads: ``_lock`` guards every piece of metadata (caches, tables, the free
queue). Reads and in-place writes of allocated clusters look up under it and do
their data I/O outside it (counted in ``_inflight``); allocating writes,
discards and zeroing hold it throughout. Lock order: ``_lock`` then a backing
file's own locks.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyvirt.disk.backend import ChainLimits, CorruptImage, DiskBackend, DiskError, Extent, ImageFile
from pyvirt.disk.bounce import aligned_buffer, gather, scatter
from pyvirt.disk.qcow2_create import create_qcow2
from pyvirt.disk.qcow2_header import (
    COMPAT_LAZY_REFCOUNTS,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    INCOMPAT_EXTL2,
    MAX_BACKING_NAME,
    MAX_HOST_OFFSET,
    MAX_VIRTUAL_SIZE,
    Qcow2Header,
    parse_header,
)
from pyvirt.hostfile import handed_second

__all__ = ["Qcow2Disk", "create_qcow2"]

log = logging.getLogger(__name__)

OpenBacking = Callable[[Path, "str | None", str], DiskBackend]

COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO_FLAG = 1
OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFTABLE_MASK = 0xFFFFFFFFFFFFFE00

# piece kinds of a mapped guest range
_DATA, _ZERO, _BACK, _COMP = 0, 1, 2, 3

_Q = struct.Struct(">Q")
_QQ = struct.Struct(">QQ")
#: the most frees queued before a writer waits for in-flight I/O to drain
_MAX_PENDING_FREES = 1 << 16
#: clusters one block_status call looks at (bounded work per call)
_STATUS_SCAN = 1 << 16


class _Cursor:
    """Hands out consecutive byte ranges of a list of views."""

    __slots__ = ("i", "pos", "views")

    def __init__(self, views: list[memoryview]) -> None:
        self.views = views
        self.i = 0
        self.pos = 0

    def take(self, n: int) -> list[memoryview]:
        out: list[memoryview] = []
        views = self.views
        while n > 0:
            v = views[self.i]
            avail = len(v) - self.pos
            if avail <= n:
                out.append(v[self.pos:] if self.pos else v)
                n -= avail
                self.i += 1
                self.pos = 0
            else:
                out.append(v[self.pos:self.pos + n])
                self.pos += n
                n = 0
        return out


def _zero_views(views: list[memoryview]) -> None:
    for v in views:
        v[:] = bytes(len(v))


@dataclass(slots=True)
class _Alloc:
    """One guest cluster's part of a write (see Qcow2Disk._plan_allocating)."""

    gci: int  # the guest cluster being allocated; -1: in place, in a cluster we own
    host: int  # where the data goes
    length: int
    views: list[memoryview]  # the guest's data
    buf: bytearray | None  # the whole new cluster (copy-on-write), or None: views as they are


class Qcow2Disk:
    """One open qcow2 image (see the module docstring)."""

    format = "qcow2"

    def __init__(self, file: ImageFile, header: Qcow2Header, *, what: str,
                 meta_fd: int = -1) -> None:
        self._file = file
        #: metadata, COW and compressed I/O (buffered); owned when not file.fd
        self._fd = meta_fd if meta_fd >= 0 else file.fd
        #: guest data of allocated clusters (file.fd: O_DIRECT under cache=none)
        self._dfd = file.fd
        self._what = what
        self._h = header
        self.path = file.path
        self.readonly = file.readonly
        self.direct = self._dfd != self._fd
        self.identity = file.identity
        self.version = header.version
        self.cluster_bits = cb = header.cluster_bits
        self.cluster_size = cs = 1 << cb
        self.discard_granularity = cs
        self.refcount_bits = 1 << header.refcount_order
        self.backing_name = header.backing_name
        self.backing_format = header.backing_format
        self.backing: DiskBackend | None = None
        self.dirty = bool(header.incompatible & INCOMPAT_DIRTY)
        self.corrupt = bool(header.incompatible & INCOMPAT_CORRUPT)
        self.lazy_refcounts = bool(header.compatible & COMPAT_LAZY_REFCOUNTS)
        self.extended_l2 = bool(header.incompatible & INCOMPAT_EXTL2)
        self.compression_type = "zstd" if header.compression_type == 1 else "zlib"
        # the protocol wants whole sectors; qemu-img rounds sizes up the same way
        self.size = -(-header.size // 512) * 512
        self._esize = 16 if self.extended_l2 else 8
        self._l2_entries = cs // self._esize
        self._l2_bits = self._l2_entries.bit_length() - 1
        self._csize_shift = 62 - (cb - 8)
        self._csize_mask = (1 << (cb - 8)) - 1
        self._rb_bits = cb + 3 - header.refcount_order  # log2(refcounts per block)
        self._ref_max = (1 << self.refcount_bits) - 1
        self._v3_zero = header.version >= 3 and not self.extended_l2
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        #: guest clusters whose allocating write is moving data outside the lock:
        #: their L2 entries change when it ends, so other writers, discards and
        #: zeroing of them wait (readers see the old mapping meanwhile)
        self._allocating: set[int] = set()
        self._inflight = 0
        self._file_end = file.host_size  # grows as we write new clusters
        self._drainers = 0  # threads waiting in _drain
        self._l1_entries = 0
        self._l1lo = self._l1hi = self._rtlo = self._rthi = 0
        self._l1 = bytearray()
        self._rt = bytearray()
        self._rt_entries = 0
        self._l2_cache: OrderedDict[int, bytearray] = OrderedDict()
        self._l2_dirty: set[int] = set()
        self._rb_cache: OrderedDict[int, bytearray] = OrderedDict()
        self._rb_dirty: set[int] = set()
        self._l2_max = 16
        #: guest cluster -> host offset of plain data clusters we own (COPIED),
        #: checked: the per-request fast path; dropped by _set_entry
        self._hot: dict[int, int] = {}
        self._hot_max = 4096
        self._rb_max = 16
        self._pending_frees: list[int] = []
        self._free_cursor = 1
        self._data_dirty = False
        self._dirty_on_disk = self.dirty
        self._closed = False
        self._corrupt_logged = False
        self._punch_ok = True  # until the file system says it cannot
        self._punch_logged = False

    # ------------------------------------------------------------------ open

    @classmethod
    def open(cls, file: ImageFile, *, what: str, open_backing: OpenBacking | None,
             limits: ChainLimits) -> Qcow2Disk:
        """Open ``file`` (ownership passes here: closed on error and in ``close``)."""
        disk: Qcow2Disk | None = None
        meta_fd = -1
        try:
            if file.direct:
                meta_fd = cls._buffered_fd(file, what)
            fd = meta_fd if meta_fd >= 0 else file.fd
            header = cls._read_header(file, what, fd)
            if not file.readonly and header.incompatible & INCOMPAT_DIRTY:
                cls._repair(file, what, fd)
                header = cls._read_header(file, what, fd)
            disk = cls(file, header, what=what, meta_fd=meta_fd)
            disk._setup(limits)
            if open_backing is not None and header.backing_name is not None:
                name = header.backing_name
                bpath = Path(name)
                if not bpath.is_absolute():
                    bpath = file.path.parent / bpath
                disk.backing = open_backing(bpath, header.backing_format,
                                            f"{what}: backing file {name}")
            if not file.readonly:
                disk._open_writable()
            return disk
        except BaseException:
            if disk is not None and disk.backing is not None:
                disk.backing.close()
            if meta_fd >= 0:
                os.close(meta_fd)
            file.close()
            raise

    @staticmethod
    def _buffered_fd(file: ImageFile, what: str) -> int:
        """A second open file description of ``file`` without O_DIRECT, for
        metadata (not block aligned). It takes no lock: the image's OFD lock
        belongs to ``file.fd``, open as long as this one (a record lock, the
        fallback without OFD locks, drops when either closes: both close together)."""
        flags = (os.O_RDONLY if file.readonly else os.O_RDWR) | os.O_CLOEXEC | os.O_NOCTTY
        try:
            # the daemon's second fd when it handed the file (the VMM may not open it)
            fd = handed_second(file.path, readonly=file.readonly)
            if fd is None:
                fd = os.open(f"/proc/self/fd/{file.fd}", flags)
        except OSError as exc:
            raise DiskError(f"{what}: {file.path}: cannot reopen for metadata I/O "
                            f"(cache=none): {exc.strerror}") from None
        try:
            a, b = os.fstat(fd), os.fstat(file.fd)
        except OSError as exc:
            os.close(fd)
            raise DiskError(f"{what}: {file.path}: {exc.strerror}") from None
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
            os.close(fd)
            raise DiskError(f"{what}: {file.path}: reopening it gave another file")
        return fd

    @staticmethod
    def _read_header(file: ImageFile, what: str, fd: int) -> Qcow2Header:
        try:
            first = os.pread(fd, 4096, 0)
            if len(first) >= 24 and 9 <= first[23] <= 21 and first[20:23] == b"\0\0\0":
                cs = 1 << first[23]
                if cs > len(first):
                    first = os.pread(fd, cs, 0)
        except OSError as exc:
            raise DiskError(f"{what}: cannot read {file.path}: {exc.strerror}") from None
        return parse_header(first, what, file.host_size)

    @staticmethod
    def _repair(file: ImageFile, what: str, fd: int) -> None:
        """A dirty image (lazy refcounts, not closed cleanly) opened writable:
        rebuild its refcounts first, as QEMU does."""
        try:
            from pyvirt.disk.qcow2_check import check_qcow2
        except ImportError:
            raise DiskError(f"{what}: {file.path} was not closed cleanly (dirty bit) and "
                            "cannot be repaired here; open it read-only") from None
        try:
            check_qcow2(fd, repair="all", filename=str(file.path))
        except (OSError, ValueError) as exc:
            raise DiskError(f"{what}: repairing the dirty image {file.path} failed: "
                            f"{exc}") from None

    def _setup(self, limits: ChainLimits) -> None:
        h = self._h
        cs = self.cluster_size
        what = self._what
        if not self.readonly:
            if self.corrupt:
                raise DiskError(f"{what}: {self.path} is marked corrupt; "
                                f"`pyvirt img check -r all {self.path}` first")
            if self.extended_l2:
                raise DiskError(f"{what}: {self.path} has extended L2 entries (subclusters): "
                                "read-only support; open it read-only")
            if h.nb_snapshots:
                raise DiskError(f"{what}: {self.path} has internal snapshots: read-only support")
        # the metadata caches share the budget: L2 tables 5/8, refcount
        # blocks 1/4, the fast-path map about 1/10 (some 100 bytes an entry)
        budget = max(limits.cache_bytes, 8 * cs)
        self._l2_max = max(4, budget * 5 // 8 // cs)
        self._rb_max = max(4, budget // 4 // cs)
        self._hot_max = max(256, budget // 1024)
        self._l1 = self._read_exact(h.l1_table_offset, h.l1_size * 8)
        self._rt = self._read_exact(h.refcount_table_offset, h.refcount_table_clusters * cs)
        self._rt_entries = len(self._rt) // 8
        self._update_bounds()

    def _read_exact(self, offset: int, length: int) -> bytearray:
        """Bytes of a table; past the end of the file they read as zero."""
        buf = bytearray(length)
        done = 0
        while done < length:
            try:
                got = os.preadv(self._fd, [memoryview(buf)[done:]], offset + done)
            except OSError as exc:
                raise DiskError(f"{self._what}: cannot read {self.path}: {exc.strerror}") from None
            if got <= 0:
                break
            done += got
        return buf

    def _open_writable(self) -> None:
        h = self._h
        if h.version >= 3 and h.autoclear:
            # we keep no bitmaps: once we write, any the image has are stale
            h.autoclear = 0
            os.pwrite(self._fd, _Q.pack(0), 88)
            os.fdatasync(self._fd)

    # ----------------------------------------------------------- public API

    def chain(self) -> list[DiskBackend]:
        out: list[DiskBackend] = [self]
        if self.backing is not None:
            out.extend(self.backing.chain())
        return out

    def info(self) -> dict[str, object]:
        """What ``qemu-img info --output json`` prints as format-specific data."""
        if self.version < 3:
            return {"compat": "0.10", "compression-type": self.compression_type,
                    "refcount-bits": self.refcount_bits}
        return {"compat": "1.1", "compression-type": self.compression_type,
                "lazy-refcounts": self.lazy_refcounts, "refcount-bits": self.refcount_bits,
                "corrupt": self.corrupt, "extended-l2": self.extended_l2}

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"request [{offset}, +{length}) outside the disk ({self.size} bytes)")
        if self._closed:
            raise ValueError("the disk is closed")

    def _fast_host(self, offset: int, total: int, write: bool) -> int:
        """Host offset for a request inside one plain data cluster whose L2
        table is cached (the common case, kept short); 0 otherwise. Under _lock."""
        cs = self.cluster_size
        inoff = offset & (cs - 1)
        if inoff + total > cs:
            return 0
        gci = offset >> self.cluster_bits
        host = self._hot.get(gci)
        if host is not None:
            return host + inoff
        if self._esize != 8:
            return 0
        l1i = gci >> self._l2_bits
        if l1i >= self._l1_entries:
            return 0
        l2off = _Q.unpack_from(self._l1, l1i << 3)[0] & OFFSET_MASK
        tbl = self._l2_cache.get(l2off) if l2off else None
        if tbl is None:
            return 0
        self._l2_cache.move_to_end(l2off)
        e: int = _Q.unpack_from(tbl, (gci & (self._l2_entries - 1)) << 3)[0]
        host = e & OFFSET_MASK
        if not host or e & (COMPRESSED | ZERO_FLAG) or (write and not e & COPIED):
            return 0
        # the slow path names the damage
        if host & (cs - 1) or host < cs or self._l1lo <= host < self._l1hi \
                or self._rtlo <= host < self._rthi or host >= self._file_end:
            return 0
        if e & COPIED:
            if len(self._hot) >= self._hot_max:
                self._hot.clear()
            self._hot[gci] = host
        return host + inoff

    def _io_done(self, wrote: bool = False) -> None:
        with self._lock:
            self._inflight -= 1
            if wrote:
                # set again on completion: a flush that ran while this write was
                # in flight cleared the flag without covering it
                self._data_dirty = True
            if not self._inflight and self._drainers:
                self._cond.notify_all()

    def _drain(self) -> None:
        """Wait (under _lock) until no unlocked data I/O is in flight."""
        self._drainers += 1
        try:
            while self._inflight:
                self._cond.wait()
        finally:
            self._drainers -= 1

    def _update_bounds(self) -> None:
        h = self._h
        self._l1_entries = h.l1_size
        self._l1lo, self._l1hi = h.l1_table_offset, h.l1_table_offset + h.l1_size * 8
        self._rtlo, self._rthi = h.refcount_table_offset, h.refcount_table_offset + len(self._rt)

    def _request_len(self, views: list[memoryview], offset: int) -> int:
        """The bytes of a request (checked against the size; cheap for one view)."""
        total = len(views[0]) if len(views) == 1 else sum(len(v) for v in views)
        if offset < 0 or offset + total > self.size or self._closed:
            self._check_range(offset, total)
        return total

    def readv(self, views: list[memoryview], offset: int) -> None:
        total = self._request_len(views, offset)
        if not total:
            return
        with self._lock:
            host = self._fast_host(offset, total, False)
            if host:
                self._inflight += 1
        if host:
            try:
                self._data_read(views, host, total)
            finally:
                self._io_done()
            return
        with self._lock:
            pieces = self._map(offset, total)
            self._inflight += 1
        try:
            self._exec_read(views, pieces)
        finally:
            self._io_done()

    def read_cached(self, views: list[memoryview], offset: int) -> bool:
        """Only a read inside one plain data cluster whose L2 table is cached,
        and only from the page cache (RWF_NOWAIT); never under cache=none."""
        total = sum(len(v) for v in views)
        if self.direct or offset < 0 or offset + total > self.size or self._closed or not total:
            return False
        with self._lock:
            host = self._fast_host(offset, total, False)
            if host:
                self._inflight += 1
        if not host:
            return False
        try:
            return bool(os.preadv(self._fd, views, host, os.RWF_NOWAIT) == total)
        except OSError:  # EAGAIN: not cached; anything else: the slow path reports it
            return False
        finally:
            self._io_done()

    def writev(self, views: list[memoryview], offset: int) -> None:
        if self.readonly:
            raise PermissionError(errno.EROFS, f"{self.path} is open read-only")
        total = self._request_len(views, offset)
        if not total:
            return
        with self._lock:
            host = self._fast_host(offset, total, True)
            if host:
                self._inflight += 1
                self._data_dirty = True
        if host:
            try:
                self._data_write(views, host, total)
            finally:
                self._io_done(True)
            return
        cur = _Cursor(views)
        with self._lock:
            runs = self._inplace_runs(offset, total)
            self._data_dirty = True
            if runs is None:
                self._wait_allocating(offset, offset + total)
                self._mark_dirty()
                plan = self._plan_allocating(offset, total, cur)
            self._inflight += 1
        if runs is None:
            self._write_planned(plan)
            return
        try:
            for run_host, n in runs:
                self._data_write(cur.take(n), run_host, n)
        finally:
            self._io_done(True)

    def flush(self) -> None:
        if self.readonly:
            return
        with self._lock:
            self._flush_locked()

    def discard(self, offset: int, length: int, *, full: bool = False) -> None:
        """Free the whole clusters of the range, as QEMU (qcow2_co_pdiscard,
        discard_in_l2_slice): on a v3 image with a backing file they then read
        as zeros (zero flag), never as the backing file's older data; without a
        backing file, unallocated; a v2 image over a backing file has no zero
        flag, so the discard does nothing (QEMU 7.2 answers ENOTSUP, which its
        guest never sees). ``full`` (QEMU's full discard, ``img commit``
        emptying the top image): always unallocated."""
        if self.readonly:
            raise PermissionError(errno.EROFS, f"{self.path} is open read-only")
        self._check_range(offset, length)
        start, end = self._whole_clusters(offset, length)
        if start >= end or (not full and not self._v3_zero and self.backing_name is not None):
            return  # a discard is a hint: partial clusters are left alone
        with self._lock:
            self._mark_dirty()
            self._set_range(start, end, zero=False, unmap=True, full=full)
            self._bound_frees()

    def write_zeroes(self, offset: int, length: int, *, unmap: bool) -> None:
        if self.readonly:
            raise PermissionError(errno.EROFS, f"{self.path} is open read-only")
        self._check_range(offset, length)
        start, end = self._whole_clusters(offset, length)
        has_backing = self.backing_name is not None
        if start >= end or (not self._v3_zero and has_backing):
            self._write_real_zeros(offset, length)  # v2 over a backing file: no zero flag
            return
        if offset < start:
            self._write_real_zeros(offset, start - offset)
        with self._lock:
            self._mark_dirty()
            self._set_range(start, end, zero=True, unmap=unmap)
            self._bound_frees()
        if offset + length > end:
            self._write_real_zeros(end, offset + length - end)

    def block_status(self, offset: int, length: int) -> Extent:
        self._check_range(offset, length)
        if not length:
            raise ValueError("block_status of an empty range")
        cs = self.cluster_size
        length = min(length, _STATUS_SCAN * cs)
        with self._lock:
            pieces = self._map(offset, length, first_run=True)
        kind, goff, n, a, _b, _c = pieces[0]
        if kind == _DATA:
            return Extent(goff, n, data=True, zero=False, present=True, depth=0,
                          host_offset=a, file=self.path)
        if kind == _COMP:
            return Extent(goff, n, data=True, zero=False, present=True, depth=0,
                          file=self.path, compressed=True)
        if kind == _ZERO and a:  # the zero flag (or a v2 image's "reads as zero")
            return Extent(goff, n, data=False, zero=True, present=True, depth=0, file=self.path)
        bk = self.backing
        if bk is not None and goff < bk.size:
            e = bk.block_status(goff, min(n, bk.size - goff))
            return Extent(e.offset, e.length, data=e.data, zero=e.zero, present=e.present,
                          depth=e.depth + 1, host_offset=e.host_offset, file=e.file,
                          compressed=e.compressed)
        return Extent(goff, n, data=False, zero=True, present=False, depth=len(self.chain()))

    def set_backing(self, name: str | None, fmt: str | None) -> None:
        """Rewrite the backing file name and format in the header (``rebase -u``)."""
        if self.readonly:
            raise PermissionError(errno.EROFS, f"{self.path} is open read-only")
        if name is not None and (not name or len(name.encode()) > MAX_BACKING_NAME or "\0" in name):
            raise DiskError(f"{self._what}: backing file name must be 1..{MAX_BACKING_NAME} bytes")
        if name is None:
            fmt = None
        with self._lock:
            h = self._h
            old = (h.backing_name, h.backing_format, h.backing_file_offset, h.backing_file_size)
            h.backing_name, h.backing_format = name, fmt
            data = h.layout()
            if len(data) > self.cluster_size:
                h.backing_name, h.backing_format, h.backing_file_offset, h.backing_file_size = old
                raise DiskError(f"{self._what}: the backing file name does not fit in the header "
                                "cluster")
            os.pwrite(self._fd, data.ljust(min(self.cluster_size, max(len(data), 4096)), b"\0"), 0)
            os.fdatasync(self._fd)
            self.backing_name, self.backing_format = name, fmt

    def resize(self, new_size: int) -> None:
        if self.readonly:
            raise PermissionError(errno.EROFS, f"{self.path} is open read-only")
        if new_size % 512 or new_size < 0 or new_size > MAX_VIRTUAL_SIZE:
            raise DiskError(f"{self._what}: size {new_size} must be a multiple of 512 "
                            f"up to {MAX_VIRTUAL_SIZE}")
        if new_size < self.size:
            self._shrink(new_size)
            return
        old_size = self.size
        with self._lock:
            self._mark_dirty()
            self._grow(new_size)
        # QEMU >= 5.1: the new area reads as zeros, not as a longer backing
        # file's data (zero flags on v3; v2 gets real zeros). Opened without
        # its backing file, keeping them consistent is the caller's business (as QEMU).
        bk = self.backing
        if bk is not None and bk.size > old_size and new_size > old_size:
            self.write_zeroes(old_size, min(new_size, bk.size) - old_size, unmap=False)

    def _shrink(self, new_size: int) -> None:
        """Drop everything past ``new_size`` (as ``qemu-img resize --shrink``)."""
        cs = self.cluster_size
        cb = self.cluster_bits
        old_size = self.size
        tail = min(old_size, -(-new_size // cs) * cs)
        if tail > new_size:
            # the rest of the last cluster reads as zeros if the disk grows again
            self._write_real_zeros(new_size, tail - new_size)
        with self._lock:
            self._mark_dirty()
            h = self._h
            self._set_range(tail, -(-old_size // cs) * cs, zero=False, unmap=True, full=True)
            keep = -(-new_size // (cs * self._l2_entries))
            for l1i in range(keep, h.l1_size):
                l2off = _Q.unpack_from(self._l1, l1i * 8)[0] & OFFSET_MASK
                if l2off:
                    self._write_l1(l1i, 0)
                    self._l2_cache.pop(l2off, None)
                    self._l2_dirty.discard(l2off)
                    self._pending_frees.append(l2off >> cb)
            self._flush_locked()  # the dropped references are on disk first
            os.pwrite(self._fd, _Q.pack(new_size), 24)
            os.fdatasync(self._fd)
            h.size = self.size = new_size
            self._hot = {k: v for k, v in self._hot.items() if k < keep << self._l2_bits}
            self._flush_locked()

    def _settle(self) -> None:
        """Everything written out and the dirty bit cleared: the image as a clean
        close leaves it."""
        with self._lock:
            self._drain()
            self._flush_locked()
            self._flush_locked()  # writes the blocks the applied frees dirtied
            if self._dirty_on_disk:
                self._h.incompatible &= ~INCOMPAT_DIRTY
                os.pwrite(self._fd, _Q.pack(self._h.incompatible), 72)
                os.fdatasync(self._fd)
                self._dirty_on_disk = False

    def make_readonly(self) -> None:
        """Stop writing this image, which becomes the backing file of a new overlay
        (``pyvirt.disk.open.open_overlay``): settled as a close would, its lock
        downgraded to a reader's. Callers have no request in flight."""
        if self.readonly:
            return
        from pyvirt.disk.lock import relock_readonly

        self._settle()
        relock_readonly(self._file.fd)
        self.readonly = self._file.readonly = True

    def close(self) -> None:
        if self._closed:
            return
        try:
            if not self.readonly:
                self._settle()
        finally:
            self._closed = True
            try:
                if self.backing is not None:
                    self.backing.close()
            finally:
                try:
                    if self._fd != self._dfd:
                        os.close(self._fd)
                finally:
                    self._file.close()

    # --------------------------------------------------------- corruption

    def _corrupt(self, msg: str) -> CorruptImage:
        full = f"{self.path}: corrupt qcow2 image: {msg}"
        if not self._corrupt_logged:
            self._corrupt_logged = True
            log.warning("%s", full)  # the image's fault, not ours: a warning, once
        return CorruptImage(full)

    def _check_host(self, host: int, what: str, eof: bool = True) -> None:
        """A cluster an entry points at must not be the header or a table we
        hold, nor (``eof``) start past the end of the file: we extend the file
        before anything points there, so such an entry is damage."""
        cs = self.cluster_size
        h = self._h
        if host & (cs - 1) or host < cs:
            raise self._corrupt(f"{what} at 0x{host:x} is invalid")
        if eof and host >= self._file_end:
            raise self._corrupt(f"{what} at 0x{host:x} lies past the end of the file")
        if h.l1_table_offset <= host < h.l1_table_offset + h.l1_size * 8 or \
                h.refcount_table_offset <= host < h.refcount_table_offset + len(self._rt):
            raise self._corrupt(f"{what} at 0x{host:x} overlaps a metadata table")

    # ---------------------------------------------------------- L2 lookups

    def _l2_table(self, l2off: int) -> bytearray:
        return self._cached(self._l2_cache, l2off, "an L2 table", self._cache_insert_l2)

    def _cached(self, cache: OrderedDict[int, bytearray], off: int, what: str,
                insert: Callable[[int, bytearray], None]) -> bytearray:
        """A metadata cluster from its LRU cache, or read (checked) and inserted."""
        tbl = cache.get(off)
        if tbl is not None:
            cache.move_to_end(off)
            return tbl
        self._check_host(off, what)
        tbl = self._pread_meta(off)
        insert(off, tbl)
        return tbl

    @staticmethod
    def _insert_lru(cache: OrderedDict[int, bytearray], limit: int, off: int, tbl: bytearray,
                    write_back: Callable[[int], None]) -> None:
        """Insert, evicting the least recently used (``write_back`` saves a dirty one)."""
        while len(cache) >= limit:
            old = next(iter(cache))
            write_back(old)
            del cache[old]
        cache[off] = tbl

    def _cache_insert_l2(self, l2off: int, tbl: bytearray) -> None:
        def write_back(old: int) -> None:
            if old in self._l2_dirty:
                self._write_l2([old])

        self._insert_lru(self._l2_cache, self._l2_max, l2off, tbl, write_back)

    def _pread_meta(self, off: int) -> bytearray:
        buf = bytearray(self.cluster_size)
        got = os.preadv(self._fd, [buf], off)
        if got < len(buf):
            got += max(0, os.preadv(self._fd, [memoryview(buf)[got:]], off + got))
        return buf  # past the end of the file: zeros

    def _entry(self, gci: int) -> tuple[int, int]:
        """(L2 entry, subcluster bitmap) of guest cluster ``gci``; (0, 0) unmapped."""
        l1i = gci >> self._l2_bits
        if l1i >= self._h.l1_size:
            return 0, 0
        l2off = _Q.unpack_from(self._l1, l1i * 8)[0] & OFFSET_MASK
        if not l2off:
            return 0, 0
        tbl = self._l2_table(l2off)
        idx = gci & (self._l2_entries - 1)
        if self._esize == 8:
            return _Q.unpack_from(tbl, idx * 8)[0], 0
        return _QQ.unpack_from(tbl, idx * 16)

    def _map(self, offset: int, length: int, first_run: bool = False
             ) -> list[tuple[int, int, int, int, int, int]]:
        """Split a guest range into pieces (kind, guest offset, length, a, b, c):
        _DATA a=host offset; _ZERO a=1 when this image says zero (0: unmapped, no
        backing); _BACK; _COMP a=host offset, b=compressed size, c=offset in the
        cluster. Adjacent pieces of one kind (contiguous on the host) are merged.
        ``first_run``: stop after the first run of one kind."""
        cs = self.cluster_size
        cb = self.cluster_bits
        pieces: list[tuple[int, int, int, int, int, int]] = []
        off = offset
        end = offset + length
        unmapped = _BACK if self.backing is not None else _ZERO
        try:
            while off < end:
                inoff = off & (cs - 1)
                n = min(cs - inoff, end - off)
                e, bm = self._entry(off >> cb)
                if e & COMPRESSED:
                    coff = e & ((1 << self._csize_shift) - 1)
                    csize = (((e >> self._csize_shift) & self._csize_mask) + 1) * 512 - (coff & 511)
                    if coff < cs or coff + csize > MAX_HOST_OFFSET:
                        raise self._corrupt(f"compressed cluster at 0x{coff:x} is invalid")
                    piece = (_COMP, off, n, coff, csize, inoff)
                elif self._esize == 16:
                    self._map_sub(pieces, off, n, inoff, e, bm, unmapped)
                    if first_run and len(pieces) > 1:
                        return pieces[:1]
                    off += n
                    continue
                elif e & ZERO_FLAG and self._v3_zero:
                    if e & OFFSET_MASK:  # "zero, allocated": still a cluster we may reuse
                        self._check_host(e & OFFSET_MASK, "a zero cluster")
                    piece = (_ZERO, off, n, 1, 0, 0)
                else:
                    host = e & OFFSET_MASK
                    if host:
                        self._check_host(host, "a data cluster")
                        piece = (_DATA, off, n, host + inoff, 0, 0)
                    else:
                        piece = (unmapped, off, n, 0, 0, 0)
                self._add_piece(pieces, piece)
                if first_run and len(pieces) > 1:
                    return pieces[:1]
                off += n
        except CorruptImage:
            if first_run and pieces:
                return pieces[:1]  # damage further on ends this extent, not the call
            raise
        return pieces

    @staticmethod
    def _add_piece(pieces: list[tuple[int, int, int, int, int, int]],
                   piece: tuple[int, int, int, int, int, int]) -> None:
        if pieces:
            last = pieces[-1]
            kind = piece[0]
            if kind == last[0] and kind != _COMP and (
                    (kind == _DATA and last[3] + last[2] == piece[3])
                    or (kind != _DATA and last[3] == piece[3])):
                pieces[-1] = (kind, last[1], last[2] + piece[2], last[3], 0, 0)
                return
        pieces.append(piece)

    def _map_sub(self, pieces: list[tuple[int, int, int, int, int, int]], off: int, n: int,
                 inoff: int, e: int, bm: int, unmapped: int) -> None:
        """Extended L2: split one cluster's part by subcluster (32 per cluster)."""
        sc = self.cluster_size // 32
        host = e & OFFSET_MASK
        if host:
            self._check_host(host, "a data cluster")
        if bm & (bm >> 32) & 0xFFFFFFFF:
            raise self._corrupt("a subcluster is both allocated and zero")
        pos = inoff
        stop = inoff + n
        while pos < stop:
            i = pos // sc
            m = min((i + 1) * sc, stop) - pos
            goff = off + pos - inoff
            if bm >> (32 + i) & 1:
                piece = (_ZERO, goff, m, 1, 0, 0)
            elif bm >> i & 1:
                if not host:
                    raise self._corrupt("an allocated subcluster without a host cluster")
                piece = (_DATA, goff, m, host + pos, 0, 0)
            else:
                piece = (unmapped, goff, m, 0, 0, 0)
            self._add_piece(pieces, piece)
            pos += m

    # ---------------------------------------------------------------- reads

    def _exec_read(self, views: list[memoryview],
                   pieces: list[tuple[int, int, int, int, int, int]]) -> None:
        cur = _Cursor(views)
        for kind, goff, n, a, b, c in pieces:
            sub = cur.take(n)
            if kind == _DATA:
                self._data_read(sub, a, n)
            elif kind == _ZERO:
                _zero_views(sub)
            elif kind == _BACK:
                self._read_backing(sub, goff, n)
            else:
                data = self._decompress(a, b)
                pos = c
                for v in sub:
                    v[:] = data[pos:pos + len(v)]
                    pos += len(v)

    def _data_read(self, sub: list[memoryview], host: int, n: int) -> None:
        """Guest data from the host file: O_DIRECT under cache=none, through an
        aligned bounce buffer when the views are not aligned, through the page
        cache when the range itself cannot go direct (or reads short: EOF)."""
        if self.direct:
            try:
                if len(sub) <= 1024 and os.preadv(self._dfd, sub, host) >= n:
                    return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
            if self._bounce(sub, host, n, write=False):
                return
        self._pread_views(sub, host, n)

    def _data_write(self, sub: list[memoryview], host: int, n: int) -> None:
        """Guest data to the host file (as ``_data_read``)."""
        if self.direct:
            done = 0
            try:
                done = os.pwritev(self._dfd, sub, host) if len(sub) <= 1024 else 0
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
            if done >= n:
                return
            if not done and self._bounce(sub, host, n, write=True):
                return
            if done:  # short (out of space?): the rest through the page cache
                sub = [memoryview(b"".join(sub))[done:]]
                host += done
                n -= done
        self._pwrite_views(sub, host, n)

    def _bounce(self, sub: list[memoryview], host: int, n: int, *, write: bool) -> bool:
        """One direct transfer through a page-aligned buffer; False when the
        range cannot go direct (EINVAL: offset or length not aligned to the
        device's block) or a read came back short."""
        with aligned_buffer(n) as mv:
            try:
                if write:
                    gather(sub, mv)
                    done = 0
                    while done < n:
                        w = os.pwritev(self._dfd, [mv[done:]], host + done)
                        if w <= 0:
                            raise OSError(errno.EIO, f"{self.path}: short write")
                        done += w
                    return True
                if os.preadv(self._dfd, [mv], host) < n:
                    return False
                scatter(mv, sub)
                return True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                return False

    def _pread_views(self, sub: list[memoryview], host: int, n: int) -> None:
        got = os.preadv(self._fd, sub, host) if len(sub) <= 1024 else 0
        if got >= n:
            return
        # short (past the end of the file: zeros) or too many views: go piecewise
        pos = 0
        for v in sub:
            ln = len(v)
            if pos + ln <= got:
                pos += ln
                continue
            skip = max(0, got - pos)
            part = v[skip:]
            done = 0
            while done < len(part):
                r = os.preadv(self._fd, [part[done:]], host + pos + skip + done)
                if r <= 0:
                    part[done:] = bytes(len(part) - done)
                    break
                done += r
            pos += ln

    def _read_backing(self, sub: list[memoryview], goff: int, n: int) -> None:
        bk = self.backing
        m = 0 if bk is None else max(0, min(n, bk.size - goff))
        if m == n and bk is not None:
            bk.readv(sub, goff)
            return
        cur = _Cursor(sub)
        if m and bk is not None:
            bk.readv(cur.take(m), goff)
        _zero_views(cur.take(n - m))  # past the backing file's end: zeros

    def _decompress(self, coff: int, csize: int) -> bytes:
        cs = self.cluster_size
        data = os.pread(self._fd, csize, coff)
        if len(data) < csize:
            raise self._corrupt(f"compressed cluster at 0x{coff:x} runs past the end of the file")
        try:
            if self.compression_type == "zstd":
                import io

                import zstandard

                out = zstandard.ZstdDecompressor().stream_reader(
                    io.BytesIO(data), read_across_frames=False).read(cs)
            else:
                out = zlib.decompressobj(-12).decompress(data, cs)
        except Exception as exc:  # zlib.error, zstandard.ZstdError: damaged data
            raise self._corrupt(f"compressed cluster at 0x{coff:x}: {exc}") from None
        if len(out) != cs:
            raise self._corrupt(f"compressed cluster at 0x{coff:x} is not one cluster")
        return out

    # --------------------------------------------------------------- writes

    def _pwrite_views(self, sub: list[memoryview], host: int, n: int) -> None:
        done = os.pwritev(self._fd, sub, host) if len(sub) <= 1024 else 0
        if done < n:
            data = b"".join(sub)
            while done < n:
                done += os.pwrite(self._fd, data[done:], host + done)

    def _pwrite_all(self, data: bytes | bytearray, host: int) -> None:
        """Write new clusters (data or metadata); under _lock."""
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd, memoryview(data)[done:], host + done)
        self._file_end = max(self._file_end, host + done)

    def _inplace_runs(self, offset: int, length: int) -> list[tuple[int, int]] | None:
        """Host runs when every cluster of the range is ours to overwrite, else None."""
        cs = self.cluster_size
        cb = self.cluster_bits
        runs: list[tuple[int, int]] = []
        off = offset
        end = offset + length
        while off < end:
            inoff = off & (cs - 1)
            n = min(cs - inoff, end - off)
            e = self._entry(off >> cb)[0]
            if not e & COPIED or e & (COMPRESSED | ZERO_FLAG):
                return None
            host = e & OFFSET_MASK
            if not host:
                return None
            self._check_host(host, "a data cluster")
            if runs and runs[-1][0] + runs[-1][1] == host + inoff:
                runs[-1] = (runs[-1][0], runs[-1][1] + n)
            else:
                runs.append((host + inoff, n))
            off += n
        return runs

    def _mark_dirty(self) -> None:
        """Lazy refcounts: the dirty bit goes to disk before the first change."""
        if self.lazy_refcounts and not self._dirty_on_disk:
            self._h.incompatible |= INCOMPAT_DIRTY
            os.pwrite(self._fd, _Q.pack(self._h.incompatible), 72)
            os.fdatasync(self._fd)
            self._dirty_on_disk = True

    def _wait_allocating(self, start: int, end: int) -> None:
        """Wait (under _lock) until no allocating write is in flight on a guest
        cluster of [start, end): its L2 entries are about to change."""
        if not self._allocating:
            return
        cb = self.cluster_bits
        first, last = start >> cb, (max(end, start + 1) - 1) >> cb
        while any(first <= g <= last for g in self._allocating):
            self._cond.wait()

    def _plan_allocating(self, offset: int, length: int, cur: _Cursor) -> list[_Alloc]:
        """Under _lock: choose the host cluster of every guest cluster the write
        touches (allocating new ones: their refcounts are set now, so nothing
        else takes them), with copy-on-write data for partial clusters; mark the
        new ones as allocating. The data moves outside the lock (_write_planned)."""
        cs = self.cluster_size
        cb = self.cluster_bits
        plan: list[_Alloc] = []
        off = offset
        end = offset + length
        try:
            while off < end:
                inoff = off & (cs - 1)
                n = min(cs - inoff, end - off)
                sub = cur.take(n)
                gci = off >> cb
                e = self._entry(gci)[0]
                host = e & OFFSET_MASK
                if e & COPIED and host and not e & (COMPRESSED | ZERO_FLAG):
                    self._check_host(host, "a data cluster")
                    plan.append(_Alloc(-1, host + inoff, n, sub, None))
                    off += n
                    continue
                reuse = host if e & COPIED and host and e & ZERO_FLAG and not e & COMPRESSED \
                    else 0
                buf: bytearray | None = None
                if n != cs:
                    buf = bytearray(cs)
                    if not reuse and not (e & ZERO_FLAG and self._v3_zero
                                          and not e & COMPRESSED):
                        self._exec_read([memoryview(buf)], self._map(gci << cb, cs))
                    pos = inoff
                    for v in sub:
                        buf[pos:pos + len(v)] = v
                        pos += len(v)
                if reuse:
                    self._check_host(reuse, "a data cluster")
                    new = reuse
                else:
                    new = self._alloc_cluster() << cb
                self._allocating.add(gci)
                plan.append(_Alloc(gci, new, cs, sub, buf))
                off += n
        except BaseException:
            self._finish_locked(plan, done=False, counted=False)  # we hold _lock here
            raise
        return plan

    def _write_planned(self, plan: list[_Alloc]) -> None:
        """Outside the lock: the data of a planned write (contiguous whole
        clusters of guest data in one transfer), then its L2 entries."""
        done = False
        try:
            i = 0
            while i < len(plan):
                a = plan[i]
                if a.buf is not None:
                    self._pwrite_all(a.buf, a.host)
                    i += 1
                    continue
                views, host, n = list(a.views), a.host, a.length
                i += 1
                while i < len(plan) and plan[i].buf is None and plan[i].host == host + n:
                    views += plan[i].views
                    n += plan[i].length
                    i += 1
                self._data_write(views, host, n)
            done = True
        finally:
            self._finish_allocating(plan, done=done, counted=True)

    def _finish_allocating(self, plan: list[_Alloc], *, done: bool, counted: bool) -> None:
        with self._lock:
            self._finish_locked(plan, done=done, counted=counted)

    def _finish_locked(self, plan: list[_Alloc], *, done: bool, counted: bool) -> None:
        """Under _lock: map the planned clusters (data written: ``done``) or give
        them back; ``counted``: the data I/O was counted in _inflight."""
        cb = self.cluster_bits
        try:
            for a in plan:
                if a.gci < 0 or a.gci not in self._allocating:
                    continue
                if done:
                    self._file_end = max(self._file_end, a.host + self.cluster_size)
                    old = self._entry(a.gci)[0]  # now: a discard may have changed it
                    self._set_entry(a.gci, a.host | COPIED)
                    if old & OFFSET_MASK != a.host:
                        self._free_entry(old)
                elif self._entry(a.gci)[0] & OFFSET_MASK != a.host:
                    self._pending_frees.append(a.host >> cb)  # a leak at worst
            self._bound_frees()
        finally:
            for a in plan:
                self._allocating.discard(a.gci)
            if counted:
                self._inflight -= 1
                self._data_dirty = True  # as _io_done: a flush meanwhile did not cover it
            self._cond.notify_all()

    def _write_real_zeros(self, offset: int, length: int) -> None:
        chunk = 1 << 20
        zeros = memoryview(bytes(min(chunk, length)))
        while length > 0:
            n = min(chunk, length)
            self.writev([zeros[:n]], offset)
            offset += n
            length -= n

    def _whole_clusters(self, offset: int, length: int) -> tuple[int, int]:
        cs = self.cluster_size
        start = -(-offset // cs) * cs
        end = (offset + length) // cs * cs
        if offset + length == self.size:
            end = -(-self.size // cs) * cs  # the tail cluster counts as whole
        return start, end

    def _set_range(self, start: int, end: int, *, zero: bool, unmap: bool,
                   full: bool = False) -> None:
        """Discard (zero=False) or zero whole clusters [start, end). A discard
        leaves them unallocated (``full``, or nothing below shows through: no
        backing file), else reading as zeros (v3; ``discard`` keeps v2 over a
        backing file out of here)."""
        self._wait_allocating(start, end)  # entries an allocating write will set
        cb = self.cluster_bits
        no_backing = self.backing_name is None  # recorded: also when opened without it
        zero_discard = not zero and not full and not no_backing and self._v3_zero
        gci = start >> cb
        stop = end >> cb
        while gci < stop:
            l1i = gci >> self._l2_bits
            if l1i >= self._h.l1_size:
                break
            if not _Q.unpack_from(self._l1, l1i * 8)[0] & OFFSET_MASK and (
                    no_backing or not (zero or zero_discard)):
                gci = (l1i + 1) << self._l2_bits  # no L2 table: already unallocated
                continue
            e = self._entry(gci)[0]
            host = e & OFFSET_MASK
            if zero and self._v3_zero:
                if not unmap and e & COPIED and host and not e & COMPRESSED:
                    new = host | COPIED | ZERO_FLAG  # keep the allocation
                else:
                    new = ZERO_FLAG if not no_backing or e else 0
            elif zero_discard:
                new = ZERO_FLAG  # the host cluster goes; the backing file stays hidden
            else:
                new = 0
            if new != e:
                self._set_entry(gci, new)
                if not new & OFFSET_MASK:
                    self._free_entry(e)
            gci += 1

    def _free_entry(self, e: int) -> None:
        """Queue the host clusters an old L2 entry held (applied in flush)."""
        cb = self.cluster_bits
        if e & COMPRESSED:
            coff = e & ((1 << self._csize_shift) - 1)
            csize = (((e >> self._csize_shift) & self._csize_mask) + 1) * 512 - (coff & 511)
            self._pending_frees.extend(range(coff >> cb, ((coff + csize - 1) >> cb) + 1))
        elif e & OFFSET_MASK:
            self._pending_frees.append((e & OFFSET_MASK) >> cb)

    def _bound_frees(self) -> None:
        if len(self._pending_frees) > _MAX_PENDING_FREES:
            self._drain()
            self._flush_locked()

    def _set_entry(self, gci: int, value: int) -> None:
        self._hot.pop(gci, None)
        tbl, l2off = self._l2_for_write(gci >> self._l2_bits)
        _Q.pack_into(tbl, (gci & (self._l2_entries - 1)) * 8, value)
        self._l2_dirty.add(l2off)

    def _l2_for_write(self, l1i: int) -> tuple[bytearray, int]:
        """The L2 table of L1 entry ``l1i``, ours to modify (new or copied if need be)."""
        l1e = _Q.unpack_from(self._l1, l1i * 8)[0]
        old = l1e & OFFSET_MASK
        if old and l1e & COPIED:
            return self._l2_table(old), old
        if old and self._get_refcount(old >> self.cluster_bits) == 1:
            tbl = self._l2_table(old)
            self._write_l1(l1i, old | COPIED)
            return tbl, old
        new = self._alloc_cluster() << self.cluster_bits
        tbl = bytearray(self._l2_table(old)) if old else bytearray(self.cluster_size)
        # its refcount, then the table itself, reach the disk before the L1 entry
        self._write_refblocks()
        self._pwrite_all(tbl, new)
        os.fdatasync(self._fd)
        self._write_l1(l1i, new | COPIED)
        self._cache_insert_l2(new, tbl)
        if old:
            self._l2_cache.pop(old, None)
            self._l2_dirty.discard(old)
            self._pending_frees.append(old >> self.cluster_bits)
        return tbl, new

    def _write_l1(self, l1i: int, value: int) -> None:
        _Q.pack_into(self._l1, l1i * 8, value)
        os.pwrite(self._fd, _Q.pack(value), self._h.l1_table_offset + l1i * 8)
        self._data_dirty = True  # flush must sync it before frees it allows are applied

    def _write_refblocks(self) -> bool:
        if not self._rb_dirty:
            return False
        for off in sorted(self._rb_dirty):
            self._pwrite_all(self._rb_cache[off], off)
        self._rb_dirty.clear()
        return True

    def _write_l2(self, offsets: list[int]) -> None:
        """Write dirty L2 tables: the refcounts they depend on go first."""
        if self._write_refblocks():
            os.fdatasync(self._fd)
        elif self._data_dirty:
            os.fdatasync(self._fd)  # the guest data they map goes first too
        self._data_dirty = False
        for off in offsets:
            self._pwrite_all(self._l2_cache[off], off)
            self._l2_dirty.discard(off)

    def _flush_locked(self) -> None:
        synced = False
        if self._rb_dirty:
            self._write_refblocks()
            os.fdatasync(self._fd)
            synced = True
        if self._l2_dirty:
            self._write_l2(sorted(self._l2_dirty))
            os.fdatasync(self._fd)
            synced = True
        if self._data_dirty and not synced:
            os.fdatasync(self._fd)
        self._data_dirty = False
        # every L2 change is on disk now: the clusters they dropped may go
        if self._pending_frees and not self._inflight:
            frees, self._pending_frees = self._pending_frees, []
            freed: list[int] = []
            for ci in frees:
                r = self._get_refcount(ci)
                if r == 0:
                    log.warning("%s: freeing cluster %d whose refcount is already 0",
                                self.path, ci)
                    continue
                self._set_refcount(ci, r - 1)
                if r == 1:
                    freed.append(ci)
                    if ci < self._free_cursor:
                        self._free_cursor = ci
            self._punch(freed)

    def _punch(self, clusters: list[int]) -> None:
        """Give the host file's space of freed clusters back (PUNCH_HOLE). Safe
        here: nothing on disk references them any more (their L2/L1 change is
        synced), no unlocked I/O targets them (frees wait for ``_inflight``), and
        none is reused before this returns (we hold ``_lock``). A crash before
        their refcount 0 is written leaves leaked clusters of zeros: a leak.

        A damaged image may have had an entry pointing at our own metadata
        (the header, a table, a refcount block): its refcount drops, but such a
        cluster is never punched (zeroing it would spread the damage)."""
        if not clusters or not self._punch_ok:
            return
        from pyvirt.disk.raw import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, _fallocate

        cb = self.cluster_bits
        cs = self.cluster_size
        meta = {off >> cb for off in (*self._l2_cache, *self._rb_cache)}
        wanted = set(clusters)
        for (v,) in struct.iter_unpack(">Q", self._rt):  # refcount blocks (as QEMU's overlap check)
            if v & REFTABLE_MASK and (v & REFTABLE_MASK) >> cb in wanted:
                meta.add((v & REFTABLE_MASK) >> cb)
        clusters = sorted(
            ci for ci in wanted if ci and ci not in meta
            and not self._l1lo - cs < ci << cb < self._l1hi
            and not self._rtlo - cs < ci << cb < self._rthi)
        i = 0
        while i < len(clusters):
            j = i + 1
            while j < len(clusters) and clusters[j] == clusters[j - 1] + 1:
                j += 1
            try:
                _fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                           clusters[i] << cb, (j - i) << cb)
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    self._punch_ok = False  # no holes here: the space stays (a hint only)
                    return
                if not self._punch_logged:  # the free itself stands: only space is lost
                    self._punch_logged = True
                    log.warning("%s: cannot punch freed clusters: %s", self.path, exc.strerror)
                return
            i = j

    # ------------------------------------------------------------ refcounts

    def _rb_offset(self, ti: int) -> int:
        if ti >= self._rt_entries:
            return 0
        off: int = _Q.unpack_from(self._rt, ti * 8)[0] & REFTABLE_MASK
        if off and (off & (self.cluster_size - 1) or off >= MAX_HOST_OFFSET):
            raise self._corrupt(f"refcount block offset 0x{off:x} is invalid")
        return off

    def _refblock(self, off: int) -> bytearray:
        return self._cached(self._rb_cache, off, "a refcount block", self._rb_insert)

    def _rb_insert(self, off: int, blk: bytearray) -> None:
        def write_back(old: int) -> None:
            if old in self._rb_dirty:
                # an early refcount write is always safe: increments may only
                # leak, and decrements are applied after their L2 change is on disk
                self._pwrite_all(self._rb_cache[old], old)
                self._rb_dirty.discard(old)

        self._insert_lru(self._rb_cache, self._rb_max, off, blk, write_back)

    def _get_refcount(self, ci: int) -> int:
        off = self._rb_offset(ci >> self._rb_bits)
        if not off:
            return 0
        return self._rb_get(self._refblock(off), ci & ((1 << self._rb_bits) - 1))

    def _rb_get(self, blk: bytearray, i: int) -> int:
        bits = self.refcount_bits
        if bits >= 8:
            nb = bits >> 3
            return int.from_bytes(blk[i * nb:(i + 1) * nb], "big")
        per = 8 // bits
        return blk[i // per] >> ((i % per) * bits) & self._ref_max

    def _set_refcount(self, ci: int, value: int) -> None:
        if value > self._ref_max or value < 0:
            raise self._corrupt(f"refcount of cluster {ci} would overflow")
        off = self._rb_offset(ci >> self._rb_bits)
        if not off:
            raise self._corrupt(f"no refcount block for cluster {ci}")
        blk = self._refblock(off)
        i = ci & ((1 << self._rb_bits) - 1)
        bits = self.refcount_bits
        if bits >= 8:
            nb = bits >> 3
            blk[i * nb:(i + 1) * nb] = value.to_bytes(nb, "big")
        else:
            per = 8 // bits
            shift = (i % per) * bits
            blk[i // per] = (blk[i // per] & ~(self._ref_max << shift) & 0xFF) | (value << shift)
        self._rb_dirty.add(off)

    def _find_free(self, ci: int) -> int:
        """The first cluster at or after ``ci`` with refcount 0."""
        limit = MAX_HOST_OFFSET >> self.cluster_bits
        rbb = self._rb_bits
        bits = self.refcount_bits
        while ci < limit:
            off = self._rb_offset(ci >> rbb)
            if not off:
                return ci
            blk = self._refblock(off)
            i = ci & ((1 << rbb) - 1)
            if bits >= 8:
                nb = bits >> 3
                zero = bytes(nb)
                pos = i * nb
                while True:
                    pos = blk.find(zero, pos)
                    if pos < 0:
                        break
                    if pos % nb == 0:
                        return (ci & ~((1 << rbb) - 1)) + pos // nb
                    pos += nb - pos % nb
            else:
                for j in range(i, 1 << rbb):
                    if not self._rb_get(blk, j):
                        return (ci & ~((1 << rbb) - 1)) + j
            ci = ((ci >> rbb) + 1) << rbb
        raise OSError(errno.ENOSPC, f"{self.path}: no free cluster below 2^56")

    def _alloc_cluster(self) -> int:
        """A free host cluster, its refcount set to 1 (in the cache); its index."""
        ci = self._free_cursor
        while True:
            ci = self._find_free(ci)
            # a refcount of 0 on the header or a table we hold is damage, not room
            self._check_host(ci << self.cluster_bits, "a free cluster", eof=False)
            ti = ci >> self._rb_bits
            if ti >= self._rt_entries:
                self._grow_reftable(ti)
                continue
            if not self._rb_offset(ti):
                # a new refcount block, self-describing: it takes the first
                # cluster of the range it covers that is free (all of it is)
                self._new_refblock(ti, ci)
                ci += 1
                continue
            self._set_refcount(ci, 1)
            self._free_cursor = ci + 1
            return ci

    def _new_refblock(self, ti: int, ci: int) -> None:
        cb = self.cluster_bits
        blk = bytearray(self.cluster_size)
        off = ci << cb
        self._rb_insert(off, blk)
        self._pwrite_all(blk, off)  # zeros first: the rt entry must never see garbage
        _Q.pack_into(self._rt, ti * 8, off)
        self._set_refcount(ci, 1)
        self._write_refblocks()
        os.fdatasync(self._fd)
        os.pwrite(self._fd, _Q.pack(off), self._h.refcount_table_offset + ti * 8)

    def _grow_reftable(self, ti_needed: int) -> None:
        """Move the refcount table to a bigger one at the end of what it covers,
        with new refcount blocks describing the table and themselves."""
        cs = self.cluster_size
        cb = self.cluster_bits
        rbb = self._rb_bits
        per_rt = cs // 8
        old_clusters = len(self._rt) // cs
        # everything refcounted lies below the old coverage, so from there on all is free
        start = self._rt_entries << rbb
        n_rt = max(old_clusters * 2, -(-(ti_needed + 1) // per_rt))
        n_blocks = 0
        while True:
            last = start + n_rt + n_blocks - 1
            need_blocks = (last >> rbb) - (start >> rbb) + 1
            need_rt = -(-((last >> rbb) + 1) // per_rt)
            if need_blocks == n_blocks and need_rt <= n_rt:
                break
            n_blocks = need_blocks
            n_rt = max(n_rt, need_rt)
        if n_rt * cs > 8 << 20:
            raise OSError(errno.EFBIG, f"{self.path}: the refcount table would exceed 8 MiB")
        new_rt = bytearray(n_rt * cs)
        new_rt[:len(self._rt)] = self._rt
        blocks: dict[int, bytearray] = {}
        bstart = start + n_rt
        for k in range(n_blocks):
            ti = (start >> rbb) + k
            boff = (bstart + k) << cb
            _Q.pack_into(new_rt, ti * 8, boff)
            blocks[ti] = bytearray(cs)
        saved_rt, saved_entries = self._rt, self._rt_entries
        self._rt, self._rt_entries = new_rt, len(new_rt) // 8
        for k, ti in enumerate(sorted(blocks)):
            self._rb_insert((bstart + k) << cb, blocks[ti])
            self._rb_dirty.add((bstart + k) << cb)  # never dropped unwritten from the cache
        for ci in range(start, bstart + n_blocks):
            self._set_refcount(ci, 1)
        try:
            self._write_refblocks()
            self._pwrite_all(new_rt, start << cb)
            os.fdatasync(self._fd)
            os.pwrite(self._fd, struct.pack(">QI", start << cb, n_rt), 48)
            os.fdatasync(self._fd)
        except BaseException:
            self._rt, self._rt_entries = saved_rt, saved_entries
            raise
        old_off = self._h.refcount_table_offset
        self._h.refcount_table_offset = start << cb
        self._h.refcount_table_clusters = n_rt
        self._update_bounds()
        self._pending_frees.extend(range(old_off >> cb, (old_off >> cb) + old_clusters))

    # --------------------------------------------------------------- resize

    def _grow(self, new_size: int) -> None:
        h = self._h
        cs = self.cluster_size
        cb = self.cluster_bits
        need = -(-new_size // (cs * self._l2_entries))
        if need * 8 > 32 << 20:
            raise DiskError(f"{self._what}: size {new_size} needs an L1 table above 32 MiB")
        old_bytes = h.l1_size * 8
        room = -(-old_bytes // cs) * cs if h.l1_size else 0
        if need > h.l1_size and need * 8 > room:
            n = -(-need * 8 // cs)
            # a contiguous run: allocate one by one until n in a row come out
            run: list[int] = []
            while len(run) < n:
                ci = self._alloc_cluster()
                if run and ci != run[-1] + 1:
                    self._pending_frees.extend(run)
                    run = []
                run.append(ci)
            new_l1 = bytearray(n * cs)
            new_l1[:old_bytes] = self._l1
            off = run[0] << cb
            self._write_refblocks()
            self._pwrite_all(new_l1, off)
            os.fdatasync(self._fd)
            os.pwrite(self._fd, struct.pack(">QIIQ", new_size, 0, need, off), 24)
            os.fdatasync(self._fd)
            old_off = h.l1_table_offset
            if h.l1_size:
                self._pending_frees.extend(range(old_off >> cb, (old_off >> cb) + room // cs))
            h.l1_table_offset = off
            self._l1 = bytearray(new_l1[:need * 8])
            h.l1_size = need
        else:
            if need > h.l1_size:
                os.pwrite(self._fd, bytes((need - h.l1_size) * 8), h.l1_table_offset + old_bytes)
                os.fdatasync(self._fd)
                self._l1 += bytes((need - h.l1_size) * 8)
                h.l1_size = need
            os.pwrite(self._fd, struct.pack(">QIIQ", new_size, 0, h.l1_size, h.l1_table_offset), 24)
            os.fdatasync(self._fd)
        h.size = new_size
        self.size = new_size
        self._update_bounds()
