"""Page-aligned bounce buffers for O_DIRECT transfers of unaligned guest buffers
(raw and qcow2 under ``cache=none``). Import-light."""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["aligned_buffer", "gather", "scatter"]


@contextmanager
def aligned_buffer(n: int) -> Iterator[memoryview]:
    """``n`` bytes of anonymous, page-aligned memory (as O_DIRECT wants), freed on exit."""
    buf = mmap.mmap(-1, max(n, mmap.PAGESIZE))
    try:
        mv = memoryview(buf)[:n]
        try:
            yield mv
        finally:
            mv.release()
    finally:
        buf.close()


def gather(views: list[memoryview], into: memoryview) -> None:
    """Copy ``views`` one after another into ``into``."""
    pos = 0
    for v in views:
        into[pos:pos + len(v)] = v
        pos += len(v)


def scatter(src: memoryview, views: list[memoryview]) -> None:
    """Copy ``src`` out over ``views`` one after another."""
    pos = 0
    for v in views:
        v[:] = src[pos:pos + len(v)]
        pos += len(v)
