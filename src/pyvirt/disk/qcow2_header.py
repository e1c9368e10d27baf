"""The qcow2 header: parsing with every field checked, and serialising.

Layout per QEMU's docs/interop/qcow2.txt (big endian): a fixed header (72
bytes for version 2; ``header_length`` bytes for version 3), then header
extensions (type, length, data padded to 8 bytes) up to an end marker, then
the backing file name. All of it lies in the first cluster.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pyvirt.disk.backend import DiskError

__all__ = ["FEATURE_TABLE", "Qcow2Header", "parse_header"]

MAGIC = b"QFI\xfb"

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = 0x1F
COMPAT_LAZY_REFCOUNTS = 1 << 0

EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857

V2_HEADER_LEN = 72
V3_HEADER_LEN = 112  # with the compression type byte and padding, as QEMU >= 5.1 writes

MAX_BACKING_NAME = 1023
#: QEMU's own caps (block/qcow2.h QCOW_MAX_L1_SIZE, QCOW_MAX_REFTABLE_SIZE):
#: images beyond them are not ones qemu-img makes or opens either
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
#: 32 PiB: far beyond any disk we run, and it keeps every guest offset well
#: under the 2^56 host-offset field so offset arithmetic never wraps
MAX_VIRTUAL_SIZE = 1 << 55
#: L2 entries and refcount-table entries carry host offsets in bits 9..55
MAX_HOST_OFFSET = 1 << 56

_FIXED = struct.Struct(">4sIQIIQIIQQIIQ")  # the 72 bytes every version has
_V3 = struct.Struct(">QQQII")  # features, refcount_order, header_length

#: QEMU's feature name table (what ``qemu-img create`` writes)
FEATURE_TABLE: list[tuple[int, int, str]] = [
    (0, 0, "dirty bit"), (0, 1, "corrupt bit"), (0, 2, "external data file"),
    (0, 3, "compression type"), (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"), (2, 0, "bitmaps"), (2, 1, "raw external data"),
]


def feature_table_bytes() -> bytes:
    return b"".join(struct.pack(">BB46s", t, b, n.encode()) for t, b, n in FEATURE_TABLE)


@dataclass
class Qcow2Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LEN
    compression_type: int = 0
    backing_name: str | None = None
    backing_format: str | None = None
    #: header extensions other than the backing format, kept as they are
    #: (type, data), in order; the feature name table is one of them
    extensions: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    def fixed_bytes(self) -> bytes:
        """The header_length bytes of the fixed header."""
        out = _FIXED.pack(MAGIC, self.version, self.backing_file_offset, self.backing_file_size,
                          self.cluster_bits, self.size, self.crypt_method, self.l1_size,
                          self.l1_table_offset, self.refcount_table_offset,
                          self.refcount_table_clusters, self.nb_snapshots, self.snapshots_offset)
        if self.version >= 3:
            out += _V3.pack(self.incompatible, self.compatible, self.autoclear,
                            self.refcount_order, self.header_length)
            if self.header_length > 104:
                out += bytes([self.compression_type])
            out = out.ljust(self.header_length, b"\0")
        return out

    def layout(self) -> bytes:
        """Fixed header, extensions, end marker and backing name; sets the
        backing file offset/size fields to match."""
        exts = []
        if self.backing_format is not None:
            exts.append((EXT_BACKING_FORMAT, self.backing_format.encode()))
        exts.extend(self.extensions)
        body = b""
        for etype, data in exts:
            body += struct.pack(">II", etype, len(data)) + data + b"\0" * (-len(data) % 8)
        body += struct.pack(">II", EXT_END, 0)
        hlen = self.header_length if self.version >= 3 else V2_HEADER_LEN
        if self.backing_name is not None:
            name = self.backing_name.encode()
            self.backing_file_offset = hlen + len(body)
            self.backing_file_size = len(name)
        else:
            name = b""
            self.backing_file_offset = 0
            self.backing_file_size = 0
        return self.fixed_bytes() + body + name


def _bad(what: str, msg: str) -> DiskError:
    return DiskError(f"{what}: not a usable qcow2 image: {msg}")


def parse_header(buf: bytes, what: str, host_size: int) -> Qcow2Header:
    """Parse and check the header from the image's first bytes (at least the
    first cluster, or the whole file when shorter)."""
    if len(buf) < V2_HEADER_LEN or buf[:4] != MAGIC:
        raise _bad(what, "no qcow2 header")
    f = _FIXED.unpack_from(buf, 0)
    h = Qcow2Header(version=f[1], backing_file_offset=f[2], backing_file_size=f[3],
                    cluster_bits=f[4], size=f[5], crypt_method=f[6], l1_size=f[7],
                    l1_table_offset=f[8], refcount_table_offset=f[9],
                    refcount_table_clusters=f[10], nb_snapshots=f[11], snapshots_offset=f[12])
    if h.version not in (2, 3):
        raise _bad(what, f"version {h.version} (2 and 3 are supported)")
    if not 9 <= h.cluster_bits <= 21:
        raise _bad(what, f"cluster_bits {h.cluster_bits} outside 9..21")
    cs = h.cluster_size
    if len(buf) < min(cs, host_size):
        raise _bad(what, "the header cluster is truncated")
    if h.version >= 3:
        if len(buf) < 104:
            raise _bad(what, "the version 3 header is truncated")
        (h.incompatible, h.compatible, h.autoclear, h.refcount_order,
         h.header_length) = _V3.unpack_from(buf, V2_HEADER_LEN)
        if h.header_length < 104 or h.header_length % 8 or h.header_length > min(cs, len(buf)):
            raise _bad(what, f"header_length {h.header_length} is invalid")
        if h.header_length > 104:
            h.compression_type = buf[104]
    else:
        h.header_length = V2_HEADER_LEN
    unknown = h.incompatible & ~INCOMPAT_KNOWN
    if unknown:
        raise _bad(what, f"unsupported incompatible features 0x{unknown:x}")
    if h.incompatible & INCOMPAT_DATA_FILE:
        raise _bad(what, "an external data file is not supported")
    if h.crypt_method:
        raise _bad(what, "encrypted images are not supported")
    if h.refcount_order > 6:
        raise _bad(what, f"refcount_order {h.refcount_order} is above 6")
    if h.compression_type not in (0, 1):
        raise _bad(what, f"unknown compression type {h.compression_type}")
    if h.compression_type and not h.incompatible & INCOMPAT_COMPRESSION:
        raise _bad(what, "a compression type without its incompatible feature bit")
    if h.incompatible & INCOMPAT_EXTL2 and h.cluster_bits < 14:
        raise _bad(what, "extended L2 entries with clusters under 16 KiB")
    if h.size > MAX_VIRTUAL_SIZE:
        raise _bad(what, f"virtual size {h.size} is above {MAX_VIRTUAL_SIZE}")
    l2_entries = cs // (16 if h.incompatible & INCOMPAT_EXTL2 else 8)
    need_l1 = -(-h.size // (cs * l2_entries))
    if h.l1_size < need_l1:
        raise _bad(what, f"l1_size {h.l1_size} does not cover the virtual size ({need_l1} needed)")
    if h.l1_size * 8 > MAX_L1_BYTES:
        raise _bad(what, f"l1_size {h.l1_size} is above QEMU's limit")
    if h.refcount_table_clusters == 0 or h.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise _bad(what, f"refcount_table_clusters {h.refcount_table_clusters} is invalid")
    ranges = [("the refcount table", h.refcount_table_offset, h.refcount_table_clusters * cs)]
    if h.l1_size:
        ranges.append(("the L1 table", h.l1_table_offset, h.l1_size * 8))
    for name, off, length in ranges:
        if off % cs or off < cs or off + length > MAX_HOST_OFFSET:
            raise _bad(what, f"{name} offset 0x{off:x} is invalid")
        if off + length > host_size:  # qemu-img writes whole table clusters
            raise _bad(what, f"{name} at 0x{off:x} runs past the end of the file")
    if len(ranges) == 2:
        (_, a, al), (_, b, bl) = ranges
        if a < b + bl and b < a + al:
            raise _bad(what, "the L1 table and the refcount table overlap")
    if h.nb_snapshots and (h.snapshots_offset % cs or h.snapshots_offset < cs
                           or h.snapshots_offset >= MAX_HOST_OFFSET):
        raise _bad(what, "the snapshot table offset is invalid")
    # header extensions end at the backing name, or at the end of the first cluster
    ext_end = min(cs, len(buf))
    if h.backing_file_offset:
        if h.backing_file_size == 0 or h.backing_file_size > MAX_BACKING_NAME:
            raise _bad(what, f"backing file name length {h.backing_file_size} is invalid")
        if h.backing_file_offset + h.backing_file_size > ext_end:
            raise _bad(what, "the backing file name lies outside the header cluster")
        raw = bytes(buf[h.backing_file_offset:h.backing_file_offset + h.backing_file_size])
        try:
            h.backing_name = raw.decode()
        except UnicodeDecodeError:
            raise _bad(what, "the backing file name is not UTF-8") from None
        if "\0" in h.backing_name:
            raise _bad(what, "the backing file name contains NUL")
        ext_end = min(ext_end, h.backing_file_offset)
    pos = h.header_length
    while True:
        if pos + 8 > ext_end:
            if pos == ext_end:
                break  # old images may have no end marker before the name
            raise _bad(what, "header extensions run past the header cluster")
        etype, elen = struct.unpack_from(">II", buf, pos)
        pos += 8
        if etype == EXT_END:
            break
        if pos + elen > ext_end:
            raise _bad(what, f"header extension 0x{etype:x} runs past the header cluster")
        data = bytes(buf[pos:pos + elen])
        pos += elen + (-elen % 8)
        if etype == EXT_BACKING_FORMAT:
            try:
                h.backing_format = data.decode().rstrip("\0") or None
            except UnicodeDecodeError:
                raise _bad(what, "the backing format is not UTF-8") from None
        else:
            h.extensions.append((etype, data))
    return h
