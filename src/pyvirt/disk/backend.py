"""The disk-backend interface: what virtio-blk (and ``pyvirt img``) hold.

A backend is one open disk image of some format (raw file or block device,
qcow2 with its backing chain) presenting a flat array of ``size`` bytes. The
device layer checks every guest request against ``size`` and ``readonly``
before calling in; a backend still refuses out-of-range requests
(``ValueError``) rather than trusting its caller. Host failures are
``OSError``; a damaged image found at run time is ``CorruptImage`` (an
``OSError`` with EIO, so the device fails that request with IOERR and the VM
goes on).

Backends are called from several worker threads at once: each serialises
what must be serialised (metadata) itself.

Import-light: on the VMM's start-up path.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from pyvirt.errors import UserInputError
from pyvirt.hostfile import FileIdentity

__all__ = ["SECTOR", "CorruptImage", "DiskBackend", "DiskError", "Extent", "ImageFile"]

SECTOR = 512


class DiskError(UserInputError):
    """A disk image that cannot be used (missing, locked, unreadable, malformed).

    The message names the config field (``disks[1].path``) or the file."""


class CorruptImage(OSError):
    """Image metadata found damaged while serving a request: that request fails
    (EIO), the image is not touched further where that could spread the damage."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)


@dataclass
class ImageFile:
    """One open, locked host file (an image, or one file of a backing chain).

    Whoever opens it closes it; the lock (an OFD lock, see ``pyvirt.disk.lock``)
    lives exactly as long as ``fd``."""

    path: Path
    fd: int
    identity: FileIdentity
    readonly: bool
    direct: bool  # O_DIRECT is set on fd
    block_device: bool
    host_size: int  # bytes in the host file (or block device) when opened

    def close(self) -> None:
        if self.fd >= 0:
            import os

            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class Extent:
    """What ``block_status`` says of ``length`` bytes at ``offset`` (guest view).

    ``data``: reads come from some layer's data (not known-zero);
    ``zero``: reads return zeros; ``present``: some layer of the chain defines
    it (False: past every layer, reads as zero); ``depth``: the layer that
    defines it (0 this image, 1 its backing file, ...; the chain length when
    not present); ``host_offset``: where the data lies in that layer's file,
    when it is one contiguous, uncompressed range there, else None;
    ``file``: that layer's path (None when not present)."""

    offset: int
    length: int
    data: bool
    zero: bool
    present: bool
    depth: int
    host_offset: int | None = None
    file: Path | None = None
    compressed: bool = False


@runtime_checkable
class DiskBackend(Protocol):
    """One open disk image presenting ``size`` bytes (a multiple of 512)."""

    path: Path
    format: str  # "raw" | "qcow2"
    size: int
    readonly: bool
    direct: bool
    identity: FileIdentity
    #: discard granularity in bytes (the qcow2 cluster size, 512 for raw);
    #: discards smaller than it may do nothing
    discard_granularity: int

    def readv(self, views: list[memoryview], offset: int) -> None:
        """Fill ``views`` (in order) from ``offset``; may block; releases the GIL
        in its system calls. ``offset``+total must be within ``size``."""

    def writev(self, views: list[memoryview], offset: int) -> None:
        """Write ``views`` at ``offset`` (read-only backends raise ``PermissionError``)."""

    def read_cached(self, views: list[memoryview], offset: int) -> bool:
        """Serve a read without blocking, only from the page cache; False (the
        views' contents then undefined) when that is not possible."""

    def flush(self) -> None:
        """Make every completed write durable (data and metadata)."""

    def discard(self, offset: int, length: int) -> None:
        """The guest no longer needs this range (a hint: reads may then return
        zeros or the old data, never a backing file's older data; qcow2 as
        QEMU: v3 over a backing file reads zeros)."""

    def write_zeroes(self, offset: int, length: int, *, unmap: bool) -> None:
        """Make the range read as zeros (``unmap``: may free the space)."""

    def block_status(self, offset: int, length: int) -> Extent:
        """The first extent at ``offset`` (at most ``length`` bytes) of uniform status."""

    def resize(self, new_size: int) -> None:
        """Grow (or, for raw, shrink) the virtual size."""

    def close(self) -> None:
        """Flush what must be flushed (qcow2: caches, clear the dirty bit) and
        close every file, backing files included. Idempotent."""

    def chain(self) -> list[DiskBackend]:
        """This image and its backing files, top first."""


@dataclass
class ChainLimits:
    """Bounds on what an image may make us do (hostile images)."""

    max_depth: int = 64  # backing chain depth
    #: the most memory the qcow2 metadata caches may use per image
    cache_bytes: int = 32 << 20
    seen: set[FileIdentity] = field(default_factory=set)
