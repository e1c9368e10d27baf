"""The raw backend: a plain image file or a block device, byte for byte.

Data moves with one ``preadv``/``pwritev`` straight between the file and the
caller's views (views of guest RAM: no copy); the GIL is released inside the
system call, so several worker threads read and write at once. With
``O_DIRECT`` (``cache=none``) an unaligned request falls back to an aligned
bounce buffer. Discard punches holes and write-zeroes zeroes ranges with
``fallocate`` where the file system can, else writes zeros (block devices
always: the old behaviour of virtio-blk, kept). ``block_status`` asks the
file system for holes (SEEK_DATA/SEEK_HOLE).

A size that is not a multiple of 512 loses its last partial sector (logged).
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any

from pyvirt.disk.backend import SECTOR, DiskBackend, DiskError, Extent, ImageFile
from pyvirt.disk.bounce import aligned_buffer, gather, scatter
from pyvirt.hostfile import FileIdentity

__all__ = ["RawDisk", "create_raw"]

log = logging.getLogger(__name__)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_ZERO_CHUNK = 1 << 20


class RawDisk:
    """A raw image (implements ``DiskBackend``); owns ``file`` and closes it."""

    format = "raw"
    discard_granularity = SECTOR

    def __init__(self, file: ImageFile) -> None:
        self.file = file
        self.path: Path = file.path
        self.readonly = file.readonly
        self.direct = file.direct
        self.identity: FileIdentity = file.identity
        self.block_device = file.block_device
        size = file.host_size
        if size % SECTOR:
            log.warning("%s: size is not a multiple of 512; the last %d bytes are unused",
                        file.path, size % SECTOR)
        self.size = size - size % SECTOR

    @property
    def fd(self) -> int:
        return self.file.fd

    def __repr__(self) -> str:
        return f"RawDisk({str(self.path)!r}, size={self.size}, readonly={self.readonly})"

    # ---- data

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"{self.path}: {length} bytes at {offset} beyond {self.size}")

    def readv(self, views: list[memoryview], offset: int) -> None:
        self._check(offset, sum(len(v) for v in views))
        self._rw(list(views), offset, write=False)

    def writev(self, views: list[memoryview], offset: int) -> None:
        if self.readonly:
            raise PermissionError(errno.EROFS, f"{self.path} is read-only")
        self._check(offset, sum(len(v) for v in views))
        self._rw(list(views), offset, write=True)

    def read_cached(self, views: list[memoryview], offset: int) -> bool:
        length = sum(len(v) for v in views)
        if self.direct or offset < 0 or offset + length > self.size:
            return False
        try:
            return os.preadv(self.file.fd, views, offset, os.RWF_NOWAIT) == length
        except OSError:  # EAGAIN: not cached; anything else the blocking read reports
            return False

    def flush(self) -> None:
        if not self.readonly:
            os.fdatasync(self.file.fd)

    def discard(self, offset: int, length: int) -> None:
        self._check(offset, length)
        if self.readonly:
            raise PermissionError(errno.EROFS, f"{self.path} is read-only")
        self._zero(offset, length, punch=True, hint=True)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool) -> None:
        self._check(offset, length)
        if self.readonly:
            raise PermissionError(errno.EROFS, f"{self.path} is read-only")
        self._zero(offset, length, punch=unmap)

    def _zero(self, start: int, size: int, *, punch: bool, hint: bool = False) -> None:
        fd = self.file.fd
        if not size:
            return
        if not self.block_device:
            mode = (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) if punch else (
                FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
            try:
                _fallocate(fd, mode, start, size)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                if hint:
                    return  # discard is a hint: nothing to do where holes are unsupported
        chunk = memoryview(bytes(min(size, _ZERO_CHUNK)))
        done = 0
        while done < size:  # through _rw: O_DIRECT gets its aligned bounce buffer
            n = min(len(chunk), size - done)
            self._rw([chunk[:n]], start + done, write=True)
            done += n

    def _rw(self, views: list[memoryview], offset: int, *, write: bool) -> None:
        fd = self.file.fd
        try:
            self._vectored(fd, list(views), offset, write)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not self.direct:
                raise
            self._bounced(fd, views, offset, write)  # unaligned buffer under O_DIRECT

    @staticmethod
    def _vectored(fd: int, views: list[memoryview], offset: int, write: bool) -> None:
        # at most IOV_MAX (1024) buffers per call; virtio-blk's SEG_MAX keeps us far below
        views = views[:]
        while views:
            n = os.pwritev(fd, views, offset) if write else os.preadv(fd, views, offset)
            if n <= 0:
                if write:
                    raise OSError(errno.EIO, "short write")
                # reading past the end of a file that shrank: the rest reads as zeros
                for v in views:
                    v[:] = bytes(len(v))
                return
            offset += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]

    def _bounced(self, fd: int, views: list[memoryview], offset: int, write: bool) -> None:
        with aligned_buffer(sum(len(v) for v in views)) as mv:
            if write:
                gather(views, mv)
                self._vectored(fd, [mv], offset, True)
            else:
                self._vectored(fd, [mv], offset, False)
                scatter(mv, views)

    # ---- metadata

    def block_status(self, offset: int, length: int) -> Extent:
        self._check(offset, length)
        length = min(length, self.size - offset)
        data, end = True, offset + length
        if not self.block_device and length:
            try:
                nxt = os.lseek(self.file.fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data from here to the end of the file
                    nxt = end
                elif exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                    nxt = offset  # no hole support: all data
                else:
                    raise
            if nxt > offset:
                data, end = False, min(end, nxt)
            else:
                try:
                    end = min(end, os.lseek(self.file.fd, offset, os.SEEK_HOLE))
                except OSError as exc:
                    if exc.errno not in (errno.ENXIO, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
            # holes are file-system blocks, so this rarely matters: a partial
            # sector with data in it is data
            if data:
                end = min(offset + length, -(-end // SECTOR) * SECTOR)
            elif end - end % SECTOR > offset:
                end -= end % SECTOR
            elif end % SECTOR:
                data, end = True, min(offset + length, -(-end // SECTOR) * SECTOR)
        return Extent(offset, end - offset, data=data, zero=not data, present=True, depth=0,
                      host_offset=offset, file=self.path)

    def resize(self, new_size: int) -> None:
        if self.readonly:
            raise DiskError(f"{self.path}: opened read-only; cannot resize")
        if self.block_device:
            raise DiskError(f"{self.path}: a block device cannot be resized")
        if new_size < 0 or new_size % SECTOR:
            raise DiskError(f"{self.path}: new size {new_size} is not a multiple of 512")
        try:
            os.ftruncate(self.file.fd, new_size)
        except OSError as exc:
            raise DiskError(f"{self.path}: cannot resize: {exc.strerror}") from None
        self.size = new_size

    def make_readonly(self) -> None:
        """Stop writing this image, which becomes the backing file of a new overlay:
        synced, its lock downgraded to a reader's."""
        if self.readonly:
            return
        from pyvirt.disk.lock import relock_readonly

        os.fdatasync(self.file.fd)
        relock_readonly(self.file.fd)
        self.readonly = self.file.readonly = True

    def close(self) -> None:
        self.file.close()

    def chain(self) -> list[DiskBackend]:
        return [self]

    def __enter__(self) -> RawDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def create_raw(path: Path, size: int) -> None:
    """A new sparse raw image of ``size`` bytes rounded up to 512 (as qemu-img
    does); an existing path is refused."""
    if size < 0:
        raise DiskError(f"{path}: size {size} is negative")
    size = -(-size // SECTOR) * SECTOR
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOCTTY,
                     0o644)
    except FileExistsError:
        raise DiskError(f"{path}: already exists") from None
    except OSError as exc:
        raise DiskError(f"{path}: {exc.strerror}") from None
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        os.close(fd)
        os.unlink(path)
        raise DiskError(f"{path}: cannot create an image of {size} bytes: {exc.strerror}") from None
    os.close(fd)


_libc: Any = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if _libc.fallocate(fd, mode, offset, length) != 0:
        import ctypes

        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
