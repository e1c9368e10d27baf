"""Writing a new qcow2 image, laid out as ``qemu-img create`` does.

Cluster 0 the header, then the refcount table, the refcount blocks, the L1
table, and with preallocation the L2 tables and the data clusters.
"""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path

from pyvirt.disk.backend import DiskError
from pyvirt.disk.qcow2_header import (
    COMPAT_LAZY_REFCOUNTS,
    EXT_FEATURE_TABLE,
    INCOMPAT_COMPRESSION,
    INCOMPAT_EXTL2,
    MAX_BACKING_NAME,
    MAX_VIRTUAL_SIZE,
    V2_HEADER_LEN,
    V3_HEADER_LEN,
    Qcow2Header,
    feature_table_bytes,
)

__all__ = ["create_qcow2"]

_COPIED = 1 << 63


def _refblock(count: int, start: int, entries: int, bits: int, cs: int) -> bytes:
    """A refcount block whose clusters [start, start+entries) below ``count`` are 1."""
    n = max(0, min(entries, count - start))
    if bits >= 8:
        return ((1).to_bytes(bits // 8, "big") * n).ljust(cs, b"\0")
    per = 8 // bits
    byte = sum(1 << (k * bits) for k in range(per))
    out = bytearray(cs)
    full, rest = divmod(n, per)
    out[:full] = bytes([byte]) * full
    if rest:
        out[full] = sum(1 << (k * bits) for k in range(rest))
    return bytes(out)


def create_qcow2(path: Path, size: int, *, cluster_size: int = 65536, backing: str | None = None,
                 backing_format: str | None = None, version: int = 3,
                 lazy_refcounts: bool = False, refcount_bits: int = 16,
                 preallocation: str = "off", extended_l2: bool = False,
                 compression_type: str = "zlib") -> None:
    """Write a new image at ``path`` (which must not exist)."""
    cs = cluster_size
    if cs < 512 or cs > 2 << 20 or cs & (cs - 1):
        raise DiskError(f"cluster_size {cs} must be a power of two from 512 to 2 MiB")
    if size < 0 or size > MAX_VIRTUAL_SIZE:
        raise DiskError(f"size {size} must be from 0 to {MAX_VIRTUAL_SIZE}")
    size = -(-size // 512) * 512
    if version not in (2, 3):
        raise DiskError(f"version {version} must be 2 or 3")
    if refcount_bits not in (1, 2, 4, 8, 16, 32, 64):
        raise DiskError(f"refcount_bits {refcount_bits} must be a power of two up to 64")
    if preallocation not in ("off", "metadata", "full"):
        raise DiskError(f"preallocation {preallocation!r} must be off, metadata or full")
    if compression_type not in ("zlib", "zstd"):
        raise DiskError(f"compression_type {compression_type!r} must be zlib or zstd")
    if version == 2 and (lazy_refcounts or refcount_bits != 16 or extended_l2
                         or compression_type != "zlib"):
        raise DiskError("lazy_refcounts, refcount_bits other than 16, extended_l2 and zstd "
                        "need version 3")
    if extended_l2 and cs < 16384:
        raise DiskError("extended_l2 needs a cluster_size of at least 16 KiB")
    if backing is not None and (not backing or len(backing.encode()) > MAX_BACKING_NAME):
        raise DiskError(f"backing file name must be 1..{MAX_BACKING_NAME} bytes")
    if backing is None and backing_format is not None:
        raise DiskError("backing_format without a backing file")
    if backing is not None and preallocation != "off":
        raise DiskError("preallocation and a backing file cannot be combined")
    cb = cs.bit_length() - 1
    esize = 16 if extended_l2 else 8
    l2_entries = cs // esize
    l1_size = -(-size // (cs * l2_entries))
    l1_clusters = max(1, -(-l1_size * 8 // cs))
    data_clusters = -(-size // cs) if preallocation != "off" else 0
    l2_clusters = -(-data_clusters // l2_entries)
    rb_entries = cs * 8 // refcount_bits
    n_rt, n_rb = 1, 1
    while True:
        total = 1 + n_rt + n_rb + l1_clusters + l2_clusters + data_clusters
        need_rb = -(-total // rb_entries)
        need_rt = -(-need_rb * 8 // cs)
        if need_rb == n_rb and need_rt == n_rt:
            break
        n_rb, n_rt = max(n_rb, need_rb), max(n_rt, need_rt)
    if n_rt * cs > 8 << 20 or l1_size * 8 > 32 << 20:
        raise DiskError(f"size {size} with cluster_size {cs} needs tables beyond QEMU's limits")
    rt_off = cs
    rb_off = rt_off + n_rt * cs
    l1_off = rb_off + n_rb * cs
    l2_off = l1_off + l1_clusters * cs
    data_off = l2_off + l2_clusters * cs

    h = Qcow2Header(version=version, backing_file_offset=0, backing_file_size=0,
                    cluster_bits=cb, size=size, crypt_method=0, l1_size=l1_size,
                    l1_table_offset=l1_off, refcount_table_offset=rt_off,
                    refcount_table_clusters=n_rt, nb_snapshots=0, snapshots_offset=0)
    if version == 3:
        h.header_length = V3_HEADER_LEN
        h.refcount_order = refcount_bits.bit_length() - 1
        h.compatible = COMPAT_LAZY_REFCOUNTS if lazy_refcounts else 0
        h.incompatible = (INCOMPAT_EXTL2 if extended_l2 else 0) | (
            INCOMPAT_COMPRESSION if compression_type == "zstd" else 0)
        h.compression_type = 1 if compression_type == "zstd" else 0
        h.extensions.append((EXT_FEATURE_TABLE, feature_table_bytes()))
    else:
        h.header_length = V2_HEADER_LEN
    h.backing_name = backing
    h.backing_format = backing_format
    head = h.layout()
    if len(head) > cs:
        raise DiskError("the backing file name does not fit in the header cluster")

    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise DiskError(f"cannot create {path}: {exc.strerror}") from None
    try:
        os.pwrite(fd, head.ljust(cs, b"\0"), 0)
        rt = bytearray(n_rt * cs)
        for k in range(n_rb):
            struct.pack_into(">Q", rt, k * 8, rb_off + k * cs)
        os.pwrite(fd, rt, rt_off)
        for k in range(n_rb):
            os.pwrite(fd, _refblock(total, k * rb_entries, rb_entries, refcount_bits, cs),
                      rb_off + k * cs)
        l1 = bytearray(l1_clusters * cs)
        for i in range(l2_clusters):
            struct.pack_into(">Q", l1, i * 8, (l2_off + i * cs) | _COPIED)
        os.pwrite(fd, l1, l1_off)
        for i in range(l2_clusters):
            l2 = bytearray(cs)
            first = i * l2_entries
            for j in range(min(l2_entries, data_clusters - first)):
                struct.pack_into(">Q", l2, j * esize, (data_off + (first + j) * cs) | _COPIED)
                if extended_l2:
                    struct.pack_into(">Q", l2, j * esize + 8, 0xFFFFFFFF)
            os.pwrite(fd, l2, l2_off + i * cs)
        end = data_off + data_clusters * cs
        if preallocation == "full":
            chunk = bytes(1 << 20)
            pos = data_off
            while pos < end:
                pos += os.pwrite(fd, chunk[:min(len(chunk), end - pos)], pos)
        os.ftruncate(fd, end)
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise DiskError(f"cannot write {path}: {exc.strerror}") from None
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)
