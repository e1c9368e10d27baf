"""Copying a disk image's content (``pyvirt img convert``, the daemon's volume copies).

Works on open backends (``pyvirt.disk.open_disk``): the source is read
through its whole backing chain (flattened), extent by extent, so holes and
zero clusters are skipped rather than read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from pyvirt.disk.backend import DiskBackend, Extent

__all__ = ["CHUNK", "copy_content", "extents", "read_range"]

CHUNK = 1 << 20  # bytes read/written at a time


def extents(disk: DiskBackend, start: int = 0, end: int | None = None) -> Iterator[Extent]:
    """``disk``'s block status from ``start`` to ``end``, extent by extent; an
    extent of length 0 (a backend bug) cannot make this loop forever."""
    end = disk.size if end is None else end
    offset = start
    while offset < end:
        ext = disk.block_status(offset, end - offset)
        if ext.length <= 0:
            ext = Extent(offset, min(512, end - offset), data=True, zero=False, present=True,
                         depth=0)
        yield ext
        offset += ext.length


def read_range(disk: DiskBackend, offset: int, length: int) -> bytearray:
    buf = bytearray(length)
    if length:
        disk.readv([memoryview(buf)], offset)
    return buf


def copy_content(src: DiskBackend, dst: DiskBackend, *, sparse: int, base: DiskBackend | None,
          tick: Callable[[int], None]) -> None:
    """Copy ``src``'s content onto the new image ``dst`` (zeros where it is
    not written); ``sparse``: zero runs of this many bytes are not written (0:
    write everything); ``base``: ``dst``'s backing file, only what differs
    from it is written."""
    step = sparse if sparse else 4096
    for ext in extents(src):
        known_zero = ext.zero and not ext.data
        if known_zero and sparse and base is None:
            tick(ext.length)
            continue
        offset, end = ext.offset, ext.offset + ext.length
        while offset < end:
            n = min(CHUNK, end - offset)
            data = bytearray(n) if known_zero else read_range(src, offset, n)
            old: bytearray | None
            if base is not None:
                old = read_range(base, offset, min(n, max(0, base.size - offset)))
                old += bytes(n - len(old))
            else:
                old = bytearray(n) if sparse else None  # what the new image reads
            if old is not None and data == old:
                offset += n
                tick(n)
                continue
            # pieces aligned to `step` in the guest view; bytes compares run in C
            pos = 0
            run_start = -1
            while pos < n:
                k = min(step - (offset + pos) % step, n - pos)
                same = old is not None and data[pos:pos + k] == old[pos:pos + k]
                if not same and run_start < 0:
                    run_start = pos
                if same and run_start >= 0:
                    dst.writev([memoryview(data)[run_start:pos]], offset + run_start)
                    run_start = -1
                pos += k
            if run_start >= 0:
                dst.writev([memoryview(data)[run_start:n]], offset + run_start)
            offset += n
            tick(n)
