"""``open_disk``: the one factory for disk backends, and format probing.

Probing rules (a guest owns the bytes of a writable disk, so it could write a
qcow2 header into a raw image, with a "backing file" naming any host file, and
have the next start open that file for it):

- no format given: the first 4 bytes decide, qcow2 (``QFI\\xfb``) or raw; but a
  WRITABLE image that looks like qcow2 is refused until the user says which
  format it is. Read-only images (and backing files, always read-only) may be
  probed;
- a format given: used as is, and ``qcow2`` on a file without the magic is an
  error naming the config field.

A qcow2 image's backing files are opened here too, read-only (shared lock),
by the same rules, each named in errors by the chain that leads to it
(``disks[0].path: backing file base.qcow2: ...``). A file twice in one chain
(a loop) and a chain deeper than ``ChainLimits.max_depth`` are refused.

Import-light: the qcow2 code is imported only when a qcow2 image is opened.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Collection, Mapping
from pathlib import Path

from pyvirt.disk.backend import ChainLimits, DiskBackend, DiskError, ImageFile
from pyvirt.disk.lock import open_image_file
from pyvirt.disk.raw import RawDisk
from pyvirt.hostfile import FileIdentity

__all__ = ["FORMATS", "QCOW2_MAGIC", "open_disk", "open_overlay", "probe_format"]

QCOW2_MAGIC = b"QFI\xfb"
FORMATS = ("raw", "qcow2")


def probe_format(fd: int) -> str:
    """"qcow2" when the file starts with the qcow2 magic, else "raw".

    Reads one aligned page (the fd may have O_DIRECT set)."""
    buf = mmap.mmap(-1, mmap.PAGESIZE)  # page-aligned, as O_DIRECT wants
    try:
        n = os.preadv(fd, [buf], 0)
        return "qcow2" if n >= 4 and buf[:4] == QCOW2_MAGIC else "raw"
    finally:
        buf.close()


def format_field(what: str) -> str:
    """The config field naming the format of the image named ``what``:
    ``disks[1].path`` -> ``disks[1].format``."""
    return what[:-len(".path")] + ".format" if what.endswith(".path") else f"{what}: format"


def open_disk(path: Path, *, format: str | None = None, readonly: bool = False,
              direct: bool = False, what: str = "disk",
              others: Mapping[FileIdentity, str] | None = None, backing: bool = True,
              limits: ChainLimits | None = None,
              allow_self_shared: Collection[FileIdentity] = ()) -> DiskBackend:
    """Open the disk image ``path`` (and its backing chain), locked; see the module docstring.

    ``what`` names the image in errors (a config field such as
    ``disks[1].path``). ``others``: the files already open for this VM (every
    layer of every disk), by identity, with their names; the same file again
    is refused unless this use and every earlier one are read-only, which the
    caller says by listing the identity in ``allow_self_shared`` (two overlays
    over one base image). ``backing=False``: a qcow2 image's backing chain is
    not opened (its unallocated clusters then read as zeros). Every error is a
    one-line ``DiskError``, with nothing left open.
    """
    if format is not None and format not in FORMATS:
        raise DiskError(f"{format_field(what)}: unknown format {format!r} (expected raw or qcow2)")
    return _open(path, format, readonly=readonly, direct=direct, what=what, others=others,
                 shared=allow_self_shared, backing=backing,
                 limits=limits if limits is not None else ChainLimits(), depth=0)


def _open(path: Path, format: str | None, *, readonly: bool, direct: bool, what: str,
          others: Mapping[FileIdentity, str] | None, shared: Collection[FileIdentity],
          backing: bool, limits: ChainLimits, depth: int) -> DiskBackend:
    if depth > limits.max_depth:
        raise DiskError(f"{what}: the backing chain is deeper than {limits.max_depth} images")
    file = open_image_file(path, readonly=readonly, direct=direct, what=what, others=others,
                           allow_self_shared=shared)
    try:
        if file.identity in limits.seen:
            raise DiskError(f"{what}: {path} is already in this backing chain (a loop)")
        try:
            found = probe_format(file.fd)
        except OSError as exc:
            raise DiskError(f"{what}: {path}: cannot read: {exc.strerror}") from None
        fmt = _decide(format, found, readonly=readonly, path=path, what=what, depth=depth)
        limits.seen.add(file.identity)
    except BaseException:
        file.close()
        raise
    if fmt == "raw":
        return RawDisk(file)
    return _open_qcow2(file, what=what, others=others, shared=shared, backing=backing,
                       limits=limits, depth=depth)


def _decide(format: str | None, found: str, *, readonly: bool, path: Path, what: str,
            depth: int) -> str:
    if format is None:
        if found == "qcow2" and not readonly:
            raise DiskError(f"{format_field(what)}: {path} starts with a qcow2 header but no "
                            "format was given; say format=qcow2 (or format=raw to give the "
                            "guest these bytes as they are)")
        return found
    if format == "qcow2" and found != "qcow2":
        if depth:
            raise DiskError(f"{what}: {path}: the image names its backing format qcow2, but "
                            "this file has no qcow2 header")
        raise DiskError(f"{format_field(what)}: {path} is not a qcow2 image (no qcow2 header)")
    if format not in FORMATS:  # a backing format recorded in an image: anything
        raise DiskError(f"{what}: {path}: unsupported backing format {format!r}")
    return format


def _open_qcow2(file: ImageFile, *, what: str, others: Mapping[FileIdentity, str] | None,
                shared: Collection[FileIdentity], backing: bool, limits: ChainLimits,
                depth: int) -> DiskBackend:
    try:
        from pyvirt.disk.qcow2 import Qcow2Disk
    except BaseException:
        file.close()
        raise

    def open_backing(bpath: Path, bformat: str | None, bwhat: str) -> DiskBackend:
        # backing files: read-only, with this disk's cache mode (as QEMU's chains)
        return _open(bpath, bformat, readonly=True, direct=file.direct, what=bwhat,
                     others=others, shared=shared, backing=True, limits=limits,
                     depth=depth + 1)

    path = file.path
    try:  # Qcow2Disk.open owns `file` from here (closes it on error)
        return Qcow2Disk.open(file, what=what, open_backing=open_backing if backing else None,
                              limits=limits)
    except DiskError:
        raise
    except (OSError, ValueError, OverflowError, ArithmeticError) as exc:
        # a hostile image must never take us down with a traceback
        raise DiskError(f"{what}: {path}: cannot open as qcow2: {exc}") from None


def open_overlay(top: DiskBackend, path: Path, *, what: str,
                 limits: ChainLimits | None = None) -> DiskBackend:
    """Create a qcow2 image at ``path`` (which must not exist) over ``top`` (an open
    disk: its absolute path and format recorded as the backing file) and open
    it writable with ``top``'s open chain as its backing. ``top`` itself is not
    touched (the caller downgrades it: ``make_readonly``). On any failure the
    new file is removed and ``top`` is left as it was; errors are one
    ``DiskError`` line naming ``what``."""
    from pyvirt.disk.qcow2 import Qcow2Disk, create_qcow2

    lim = limits if limits is not None else ChainLimits()
    if len(top.chain()) >= lim.max_depth:
        raise DiskError(f"{what}: the backing chain would be deeper than {lim.max_depth} images")
    backing = os.path.abspath(top.path)
    try:
        create_qcow2(path, top.size, backing=backing, backing_format=top.format)
    except DiskError as exc:
        raise DiskError(f"{what}: {path}: {exc}") from None
    except OSError as exc:
        raise DiskError(f"{what}: {path}: cannot create: {exc.strerror or exc}") from None
    disk: Qcow2Disk | None = None
    try:
        file = open_image_file(path, readonly=False, direct=top.direct, what=what,
                               others={top.identity: str(top.path)})
        disk = Qcow2Disk.open(file, what=what, open_backing=None, limits=lim)
        if disk.size != top.size:
            raise DiskError(f"{what}: {path}: the new image has {disk.size} bytes, "
                            f"not {top.size}")
        disk.backing = top
        return disk
    except BaseException:
        if disk is not None:
            disk.close()  # no backing yet: top stays open
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
