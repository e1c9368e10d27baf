"""Check and repair a qcow2 image's metadata: an independent walker.

This module reads the on-disk format itself (header, L1/L2 tables, refcount
table and blocks, snapshots, bitmaps) without importing ``qcow2.py``, so it
cross-checks that writer. It counts what ``qemu-img check`` counts (QEMU's
block/qcow2-refcount.c is the model): every host cluster referenced by the
metadata gets a computed refcount; the stored refcount is compared with it:
stored < computed is a corruption, stored > computed a leak; OFLAG_COPIED
bits that disagree with "refcount == 1" are corruptions too.

Memory is bounded by the host file: the computed refcount array has one
entry per host cluster, tables are read one cluster at a time, and an L2
table shared by several L1 tables (snapshots) is walked once with a
multiplicity. Values read from the image only ever index into that array
after a bounds check; references past the end of the file are reported, not
counted. Reads past the end of the file see zeros (as QEMU's do).

Repair (``repair="leaks"``: lower leaked refcounts; ``"all"``: also raise
too-low ones, rebuild the refcount structure when it is broken -- a new
table and blocks written after the end of the file, the header switched to
them last, the old clusters freed -- and fix OFLAG_COPIED) is followed by a
second, read-only check whose counts are returned with the fixed counts, as
``qemu-img check -r`` reports. A clean result clears the dirty and corrupt
bits.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["CheckResult", "check_qcow2"]

_MAGIC = b"QFI\xfb"
_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # L1/L2/reftable entry offset bits 9-55
_L1E_RESERVED = 0x7F00_0000_0000_01FF
_L2E_RESERVED = 0x3F00_0000_0000_01FE
_COPIED = 1 << 63
_COMPRESSED = 1 << 62
_ZERO = 1
_INCOMPAT_DIRTY = 1 << 0
_INCOMPAT_CORRUPT = 1 << 1
_INCOMPAT_DATA_FILE = 1 << 2
_INCOMPAT_EXTL2 = 1 << 4
_EXT_BITMAPS = 0x23852875
_AUTOCLEAR_BITMAPS = 1 << 0
# QEMU's own limits (block/qcow2.h): anything bigger is not an image QEMU opens
_MAX_L1_BYTES = 32 << 20
_MAX_REFTABLE_BYTES = 8 << 20
_MAX_SNAPSHOTS = 65536
_MAX_HOST_CLUSTERS = (1 << 31) - 1
#: the most memory the computed refcounts may take (a 64 KiB-cluster image file
#: of 16 TiB with 16-bit refcounts)
_CHECK_MEMORY = 512 << 20
_MAX_MESSAGES = 200


class _Abort(Exception):
    """The check cannot go on (a check error was counted)."""


@dataclass
class CheckResult:
    """What ``qemu-img check --output json`` reports (``to_json`` gives its keys)."""

    filename: str = ""
    format: str = "qcow2"
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    #: what was found, one line each (qemu-img prints these on stderr); bounded
    messages: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.messages) < _MAX_MESSAGES:
            self.messages.append(text)
        elif len(self.messages) == _MAX_MESSAGES:
            self.messages.append("(further messages suppressed)")

    def to_json(self) -> dict[str, object]:
        """The document ``qemu-img check --output json`` prints (zero-valued
        optional members left out, as there)."""
        out: dict[str, object] = {}
        for key in ("image_end_offset", "total_clusters", "allocated_clusters",
                    "fragmented_clusters", "compressed_clusters"):
            if getattr(self, key):
                out[key.replace("_", "-")] = getattr(self, key)
        out["check-errors"] = self.check_errors
        for key in ("leaks", "leaks_fixed", "corruptions", "corruptions_fixed"):
            if getattr(self, key):
                out[key.replace("_", "-")] = getattr(self, key)
        out["filename"] = self.filename
        out["format"] = self.format
        return out


@dataclass
class _Header:
    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_offset: int
    reftable_offset: int
    reftable_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompat: int
    autoclear: int
    refcount_order: int
    header_length: int
    crypt_method: int

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompat & _INCOMPAT_EXTL2)


class _Image:
    """Raw access to the image file: reads past its end give zeros."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.host_size = os.fstat(fd).st_size

    def read(self, offset: int, length: int) -> bytes:
        if offset >= self.host_size or length <= 0:
            return bytes(max(length, 0))
        data = os.pread(self.fd, length, offset)
        return data + bytes(length - len(data)) if len(data) < length else data

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            done = os.pwrite(self.fd, view, offset)
            view, offset = view[done:], offset + done
        self.host_size = max(self.host_size, offset)


def _parse_header(img: _Image, res: CheckResult) -> _Header:
    raw = img.read(0, 112)
    if raw[:4] != _MAGIC:
        raise _fail(res, "not a qcow2 image (no QFI\\xfb magic)")
    (version, _bfo, _bfs, cluster_bits, size, crypt, l1_size, l1_offset, rt_offset,
     rt_clusters, nb_snap, snap_offset) = struct.unpack_from(">IQIIQIIQQIIQ", raw, 4)
    if version not in (2, 3):
        raise _fail(res, f"unsupported qcow2 version {version}")
    incompat = autoclear = 0
    refcount_order, header_length = 4, 72
    if version == 3:
        incompat, _compat, autoclear, refcount_order, header_length = struct.unpack_from(
            ">QQQII", raw, 72)
    if not 9 <= cluster_bits <= 21:
        raise _fail(res, f"cluster size 2^{cluster_bits} is out of range")
    if refcount_order > 6:
        raise _fail(res, f"refcount order {refcount_order} is out of range")
    if header_length > 1 << cluster_bits or header_length < 72:
        raise _fail(res, f"header length {header_length} is out of range")
    if crypt:
        raise _fail(res, "encrypted images are not supported")
    if incompat & ~0x1F:
        raise _fail(res, f"unsupported incompatible features {incompat & ~0x1F:#x}")
    if incompat & _INCOMPAT_DATA_FILE:
        raise _fail(res, "images with an external data file are not supported")
    return _Header(version, cluster_bits, size, l1_size, l1_offset, rt_offset, rt_clusters,
                   nb_snap, snap_offset, incompat, autoclear, refcount_order, header_length,
                   crypt)


def _fail(res: CheckResult, text: str) -> _Abort:
    res.check_errors += 1
    res.note(f"ERROR: {text}")
    return _Abort(text)


def _decode_refblock(buf: bytes, order: int) -> list[int]:
    """The refcounts in one refcount block (``order``: log2 of the bit width)."""
    if order == 3:
        return list(buf)
    if order >= 4:
        code = {4: "H", 5: "I", 6: "Q"}[order]
        arr = array(code, buf)
        arr.byteswap()  # big endian on disk
        return arr.tolist()
    bits = 1 << order
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    return [(byte >> (bits * k)) & mask for byte in buf for k in range(per_byte)]


def _encode_refblock(values: list[int] | array[int], order: int) -> bytes:
    if order == 3:
        return bytes(values)
    if order >= 4:
        arr = array({4: "H", 5: "I", 6: "Q"}[order], values)
        arr.byteswap()
        return arr.tobytes()
    bits = 1 << order
    per_byte = 8 // bits
    out = bytearray(len(values) // per_byte)
    for i, v in enumerate(values):
        out[i // per_byte] |= v << (bits * (i % per_byte))
    return bytes(out)


class _Checker:
    def __init__(self, img: _Image, hdr: _Header, res: CheckResult) -> None:
        self.img, self.hdr, self.res = img, hdr, res
        self.cs = hdr.cluster_size
        self.cbits = hdr.cluster_bits
        self.order = hdr.refcount_order
        self.refcount_max = (1 << (1 << self.order)) - 1
        self.rb_bits = self.cbits + 3 - self.order  # log2(entries per refblock)
        self.nb_clusters = -(-img.host_size // self.cs)
        # saturating counts: a count above refcount_max is an overflow anyway
        code = "B" if self.order <= 3 else "H" if self.order == 4 else "L" if self.order == 5 \
            else "Q"
        # one count per host cluster of the file's apparent size (a sparse hostile
        # file can claim terabytes): at most _CHECK_MEMORY bytes of counts
        if self.nb_clusters > min(_MAX_HOST_CLUSTERS, _CHECK_MEMORY // array(code).itemsize):
            raise _fail(res, f"the image file has too many clusters to check "
                        f"({self.nb_clusters}; the limit is "
                        f"{_CHECK_MEMORY // array(code).itemsize} at this refcount width)")
        self.computed: array[int] = array(code, bytes((self.nb_clusters + 1)
                                                      * array(code).itemsize))
        self.rebuild = False
        self.reftable: list[int] = []
        self.refstruct: list[int] = []  # clusters counted as refcount structure
        self.l1: list[int] = []

    # -- computed refcounts ---------------------------------------------------

    def inc(self, offset: int, length: int, what: str) -> None:
        if length <= 0:
            return
        if offset < 0 or offset + length - self.img.host_size >= self.cs:
            # as QEMU: not counted (the array stays sized by the file)
            self.res.corruptions += 1
            self.res.note(f"ERROR: {what} at offset {offset:#x} size {length:#x} exceeds the "
                          "end of the file by one cluster or more")
            return
        first = offset >> self.cbits
        last = (offset + length - 1) >> self.cbits
        # a range ending less than a cluster past the end may reach one more
        self.nb_clusters = max(self.nb_clusters, last + 1)
        for k in range(first, last + 1):
            value = self.computed[k]
            if value >= self.refcount_max:
                self.res.corruptions += 1
                self.res.note(f"ERROR: overflow cluster offset={k << self.cbits:#x}")
                continue
            self.computed[k] = value + 1

    def read_table(self, offset: int, entries: int) -> list[int]:
        return list(struct.unpack(f">{entries}Q", self.img.read(offset, entries * 8)))

    def walk_l1(self, offset: int, size: int, multiplicity: dict[int, list[int]],
                active: bool) -> list[int]:
        """Count an L1 table and its L2 tables; remember each L2 table's
        (total, active) uses so it is walked once."""
        if size == 0:
            return []
        self.inc(offset, size * 8, "L1 table")
        table = self.read_table(offset, size)
        for entry in table:
            if not entry:
                continue
            if entry & _L1E_RESERVED:
                self.res.corruptions += 1
                self.res.note(f"ERROR found L1 entry with reserved bits set: {entry:x}")
            l2 = entry & _OFFSET_MASK
            self.inc(l2, self.cs, "L2 table")
            if l2 & (self.cs - 1):
                self.res.corruptions += 1
                self.res.note(f"ERROR l2_offset={l2:x}: Table is not cluster aligned; "
                              "L1 entry corrupted")
            if l2 >= self.img.host_size:
                continue  # reads as zeros: nothing to walk
            uses = multiplicity.setdefault(l2, [0, 0])
            uses[0] += 1
            if active:
                uses[1] += 1
        return table

    def walk_l2(self, l2: int, uses: int, active_uses: int) -> None:
        res = self.res
        ext = self.hdr.extended_l2
        n = self.cs // (16 if ext else 8)
        words = self.read_table(l2, n * (2 if ext else 1))
        csize_bits = self.cbits - 8
        cshift = 62 - csize_bits
        coff_mask = (1 << cshift) - 1
        next_contiguous = 0
        allocated = fragmented = compressed = 0
        for i in range(n):
            entry = words[2 * i] if ext else words[i]
            bitmap = words[2 * i + 1] if ext else 0
            if entry & _COMPRESSED:
                if entry & _COPIED:
                    res.corruptions += 1
                    res.note(f"ERROR: coffset={entry & coff_mask:#x}: copied flag must never "
                             "be set for compressed clusters")
                    entry &= ~_COPIED
                if bitmap:
                    res.corruptions += 1
                    res.note(f"ERROR compressed cluster {i} with non-zero subcluster "
                             f"allocation bitmap, entry={entry:#x}")
                    continue
                coffset = entry & coff_mask
                nsect = ((entry >> cshift) & ((1 << csize_bits) - 1)) + 1
                csize = nsect * 512 - (coffset & 511)
                for _ in range(uses):
                    self.inc(coffset, csize, "compressed cluster")
                allocated += 1
                compressed += 1
                fragmented += 1  # QEMU: compressed clusters count as fragmented
                continue
            if entry & _L2E_RESERVED:
                res.corruptions += 1
                res.note(f"ERROR found l2 entry with reserved bits set: {entry:x}")
            offset = entry & _OFFSET_MASK
            zero_flag = bool(entry & _ZERO) and not ext
            if offset == 0:
                if ext and bitmap & 0xFFFF_FFFF:
                    res.corruptions += 1
                    res.note("ERROR: Unallocated cluster has non-zero subcluster "
                             "allocation map")
                continue
            if ext and (bitmap >> 32) & bitmap:
                res.corruptions += 1
                res.note(f"ERROR offset={offset:x}: Allocated cluster has corrupted "
                         "subcluster allocation bitmap")
            if offset & (self.cs - 1):
                res.corruptions += 1
                kind = "Preallocated" if zero_flag else "Data"
                res.note(f"ERROR offset={offset:x}: {kind} cluster is not properly aligned; "
                         "L2 entry corrupted.")
            allocated += 1
            if next_contiguous and offset != next_contiguous:
                fragmented += 1
            next_contiguous = offset + self.cs
            for _ in range(uses):
                self.inc(offset, self.cs, "data cluster")
        res.allocated_clusters += allocated * active_uses
        res.fragmented_clusters += fragmented * active_uses
        res.compressed_clusters += compressed * active_uses

    def walk_snapshots(self, multiplicity: dict[int, list[int]]) -> None:
        hdr, res = self.hdr, self.res
        if hdr.nb_snapshots == 0:
            return
        if hdr.nb_snapshots > _MAX_SNAPSHOTS:
            raise _fail(res, f"too many snapshots ({hdr.nb_snapshots})")
        pos = hdr.snapshots_offset
        if pos & 7 or pos >= self.img.host_size:
            raise _fail(res, f"snapshot table offset {pos:#x} is invalid")
        l1_budget = self.img.host_size + _MAX_L1_BYTES
        tables: list[tuple[int, int]] = []
        for _ in range(hdr.nb_snapshots):
            fixed = self.img.read(pos, 40)
            l1_off, l1_size, id_len, name_len, _ds, _dn, _vm, _vs, extra = struct.unpack(
                ">QIHHIIQII", fixed)
            if extra > 1024 or pos >= self.img.host_size:
                raise _fail(res, "the snapshot table is damaged")
            pos += 40 + extra + id_len + name_len
            pos = (pos + 7) & ~7
            if l1_size * 8 > _MAX_L1_BYTES or l1_off & (self.cs - 1):
                raise _fail(res, f"snapshot L1 table at {l1_off:#x} is invalid")
            l1_budget -= l1_size * 8
            if l1_budget < 0:
                raise _fail(res, "the snapshots' L1 tables are larger than the file")
            tables.append((l1_off, l1_size))
        self.inc(hdr.snapshots_offset, pos - hdr.snapshots_offset, "snapshot table")
        for l1_off, l1_size in tables:
            self.walk_l1(l1_off, l1_size, multiplicity, active=False)

    def walk_bitmaps(self) -> None:
        """Persistent dirty bitmaps: their directory and tables (as QEMU counts)."""
        hdr = self.hdr
        if hdr.version < 3 or not hdr.autoclear & _AUTOCLEAR_BITMAPS:
            return
        for ext_type, data in self.extensions():
            if ext_type != _EXT_BITMAPS or len(data) < 24:
                continue
            nb, _r, dir_size, dir_off = struct.unpack_from(">IIQQ", data)
            if dir_size > 64 << 20 or nb > 65535:
                raise _fail(self.res, "the bitmap directory is too large")
            self.inc(dir_off, dir_size, "bitmap directory")
            raw = self.img.read(dir_off, dir_size)
            pos = 0
            for _ in range(nb):
                if pos + 24 > len(raw):
                    break
                t_off, t_size, _flags, _ty, _g, name_len, extra = struct.unpack_from(
                    ">QIIBBHI", raw, pos)
                pos = (pos + 24 + extra + name_len + 7) & ~7
                if t_size * 8 > _MAX_L1_BYTES:
                    raise _fail(self.res, "a bitmap table is too large")
                self.inc(t_off, t_size * 8, "bitmap table")
                for entry in self.read_table(t_off, t_size):
                    if entry & _OFFSET_MASK:
                        self.inc(entry & _OFFSET_MASK, self.cs, "bitmap data")

    def extensions(self) -> Iterator[tuple[int, bytes]]:
        pos = self.hdr.header_length
        while pos + 8 <= self.cs:
            ext_type, length = struct.unpack(">II", self.img.read(pos, 8))
            if ext_type == 0 or pos + 8 + length > self.cs:
                return
            yield ext_type, self.img.read(pos + 8, length)
            pos += 8 + ((length + 7) & ~7)

    def load_reftable(self) -> None:
        hdr = self.hdr
        nbytes = hdr.reftable_clusters * self.cs
        if nbytes > _MAX_REFTABLE_BYTES:
            raise _fail(self.res, f"refcount table too large ({hdr.reftable_clusters} clusters)")
        if hdr.reftable_offset & (self.cs - 1):
            raise _fail(self.res, f"refcount table offset {hdr.reftable_offset:#x} unaligned")
        self.reftable = self.read_table(hdr.reftable_offset, nbytes // 8)

    def check_refblocks(self) -> None:
        for i, offset in enumerate(self.reftable):
            cluster = offset >> self.cbits
            if offset & (self.cs - 1):
                self.res.corruptions += 1
                self.res.note(f"ERROR refcount block {i} is not cluster aligned; refcount "
                              "table entry corrupted")
                self.rebuild = True
                continue
            if cluster >= self.nb_clusters:
                self.res.corruptions += 1
                self.res.note(f"ERROR refcount block {i} is outside image")
                self.rebuild = True
                continue
            if offset:
                self.inc(offset, self.cs, "refcount block")
                self.refstruct.append(cluster)
                if self.computed[cluster] != 1:
                    self.res.corruptions += 1
                    self.res.note(f"ERROR refcount block {i} refcount="
                                  f"{self.computed[cluster]}")
                    self.rebuild = True

    def calculate(self) -> None:
        hdr = self.hdr
        self.inc(0, self.cs, "header")
        if hdr.l1_size * 8 > _MAX_L1_BYTES:
            raise _fail(self.res, f"active L1 table too large ({hdr.l1_size} entries)")
        if hdr.l1_offset & (self.cs - 1) and hdr.l1_size:
            raise _fail(self.res, f"L1 table offset {hdr.l1_offset:#x} unaligned")
        multiplicity: dict[int, list[int]] = {}
        self.l1 = self.walk_l1(hdr.l1_offset, hdr.l1_size, multiplicity, active=True)
        self.walk_snapshots(multiplicity)
        for l2, (uses, active_uses) in sorted(multiplicity.items()):
            self.walk_l2(l2, uses, active_uses)
        self.load_reftable()
        self.inc(hdr.reftable_offset, len(self.reftable) * 8, "refcount table")
        last = min(self.nb_clusters, (hdr.reftable_offset + len(self.reftable) * 8 - 1
                                      >> self.cbits) + 1) if self.reftable else 0
        self.refstruct.extend(range(hdr.reftable_offset >> self.cbits, last))
        self.walk_bitmaps()
        self.check_refblocks()

    # -- stored refcounts -----------------------------------------------------

    def stored_blocks(self) -> Iterator[tuple[int, list[int] | None]]:
        """(first cluster, refcounts) per refcount block over the host clusters;
        None where the block cannot be read (unaligned)."""
        per = 1 << self.rb_bits
        for first in range(0, self.nb_clusters, per):
            index = first >> self.rb_bits
            offset = self.reftable[index] if index < len(self.reftable) else 0
            # only the entries for clusters of the file (a refcount block may
            # describe millions more)
            need = min(per, self.nb_clusters - first)
            if offset == 0:
                yield first, [0] * need
            elif offset & (self.cs - 1):
                yield first, None
            else:
                nbytes = -(-(need << self.order) // 8)
                yield first, _decode_refblock(self.img.read(offset, nbytes), self.order)[:need]

    def compare(self, fix: str | None) -> int:
        """Compare stored and computed refcounts; fix what ``fix`` allows.
        Returns the highest cluster in use."""
        res = self.res
        highest = 0
        per = 1 << self.rb_bits
        for first, stored in self.stored_blocks():
            end = min(first + per, self.nb_clusters)
            if stored is None:
                res.check_errors += end - first
                res.note(f"ERROR: can't get refcounts for clusters {first}..{end - 1}")
                continue
            dirty = False
            for k in range(first, end):
                have, want = stored[k - first], self.computed[k]
                if have or want:
                    highest = k
                if have == want:
                    continue
                if have == 0:
                    self.rebuild = True
                can_fix = have > 0 and (
                    (have > want and fix in ("leaks", "all")) or (have < want and fix == "all"))
                if can_fix:
                    res.note(f"Repairing cluster {k} refcount={have} reference={want}")
                    stored[k - first] = want
                    dirty = True
                    if have > want:
                        res.leaks_fixed += 1
                    else:
                        res.corruptions_fixed += 1
                    continue
                kind = "ERROR" if have < want else "Leaked"
                res.note(f"{kind} cluster {k} refcount={have} reference={want}")
                if have < want:
                    res.corruptions += 1
                else:
                    res.leaks += 1
            if dirty:
                offset = self.reftable[first >> self.rb_bits]
                if self.order < 3:  # keep the other entries sharing the last byte
                    per_byte = 8 >> self.order
                    tail = len(stored) % per_byte
                    if tail:
                        last = self.img.read(offset + len(stored) // per_byte, 1)
                        rest = _decode_refblock(last, self.order)[tail:]
                        stored = stored + rest
                self.img.write(offset, _encode_refblock(stored, self.order))
        return highest

    def stored_refcount(self, cluster: int) -> int | None:
        index = cluster >> self.rb_bits
        if index >= len(self.reftable):
            return 0
        offset = self.reftable[index]
        if offset == 0:
            return 0
        if offset & (self.cs - 1):
            return None
        bits = 1 << self.order
        pos = (cluster & ((1 << self.rb_bits) - 1)) * bits
        raw = self.img.read(offset + pos // 8, max(bits // 8, 1))
        if bits >= 8:
            return int.from_bytes(raw, "big")
        return (raw[0] >> (pos % 8)) & ((1 << bits) - 1)

    def check_copied(self, fix: bool) -> None:
        """OFLAG_COPIED must be set exactly where the stored refcount is 1."""
        res = self.res
        ext = self.hdr.extended_l2
        n = self.cs // (16 if ext else 8)
        l1_dirty = False
        for i, entry in enumerate(self.l1):
            l2 = entry & _OFFSET_MASK
            if not l2:
                continue
            refcount = self.stored_refcount(l2 >> self.cbits)
            if refcount is not None and (refcount == 1) != bool(entry & _COPIED):
                res.note(f"{'Repairing' if fix else 'ERROR'} OFLAG_COPIED L2 cluster: "
                         f"l1_index={i} l1_entry={entry:x} refcount={refcount}")
                if fix:
                    self.l1[i] = entry | _COPIED if refcount == 1 else entry & ~_COPIED
                    l1_dirty = True
                    res.corruptions_fixed += 1
                else:
                    res.corruptions += 1
            if l2 & (self.cs - 1) or l2 >= self.img.host_size:
                continue
            words = self.read_table(l2, n * (2 if ext else 1))
            l2_dirty = False
            for j in range(n):
                e = words[2 * j] if ext else words[j]
                if e & _COMPRESSED or not e & _OFFSET_MASK:
                    continue
                rc = self.stored_refcount((e & _OFFSET_MASK) >> self.cbits)
                if rc is None or (rc == 1) == bool(e & _COPIED):
                    continue
                res.note(f"{'Repairing' if fix else 'ERROR'} OFLAG_COPIED data cluster: "
                         f"l2_entry={e:x} refcount={rc}")
                if fix:
                    words[2 * j if ext else j] = e | _COPIED if rc == 1 else e & ~_COPIED
                    l2_dirty = True
                    res.corruptions_fixed += 1
                else:
                    res.corruptions += 1
            if l2_dirty and self.overlaps_metadata(l2):
                raise _fail(res, f"L2 table at {l2:#x} overlaps other metadata; not written")
            if l2_dirty:
                self.img.write(l2, struct.pack(f">{len(words)}Q", *words))
        if l1_dirty:
            l1_first = self.hdr.l1_offset >> self.cbits
            l1_last = (self.hdr.l1_offset + len(self.l1) * 8 - 1) >> self.cbits
            if l1_first == 0 or any(l1_first <= c <= l1_last for c in self.refstruct):
                raise _fail(res, "the L1 table overlaps other metadata; not written")
            self.img.write(self.hdr.l1_offset, struct.pack(f">{len(self.l1)}Q", *self.l1))

    def overlaps_metadata(self, offset: int) -> bool:
        cluster = offset >> self.cbits
        l1_first = self.hdr.l1_offset >> self.cbits
        l1_last = (self.hdr.l1_offset + len(self.l1) * 8 - 1) >> self.cbits
        return cluster == 0 or cluster in self.refstruct or l1_first <= cluster <= l1_last

    # -- rebuilding the refcount structure --------------------------------------

    def rebuild_refcounts(self) -> None:
        """Write a new refcount table and blocks after the end of the file from
        the computed refcounts, then point the header at them."""
        computed = self.computed
        for cluster in self.refstruct:  # the old structure is freed
            if cluster < self.nb_clusters and computed[cluster]:
                computed[cluster] -= 1
        start = self.nb_clusters  # first cluster of the new structure
        per = 1 << self.rb_bits
        nrb = nrt = 1
        while True:  # the new clusters must describe themselves
            total = start + nrb + nrt
            need_rb = -(-total // per)
            need_rt = -(-need_rb * 8 // self.cs)
            if need_rb <= nrb and need_rt <= nrt:
                break
            nrb, nrt = max(nrb, need_rb), max(nrt, need_rt)
        if nrt * self.cs > _MAX_REFTABLE_BYTES:
            raise _fail(self.res, "the rebuilt refcount table would be too large")
        total = start + nrb + nrt
        reftable = [0] * (nrt * self.cs // 8)
        for b in range(nrb):
            first = b * per
            values = [
                (computed[k] if k < self.nb_clusters else 1)
                for k in range(first, min(first + per, total))]
            values += [0] * (-len(values) % 8)  # whole bytes
            offset = (start + b) << self.cbits
            encoded = _encode_refblock(values, self.order)
            self.img.write(offset, encoded + bytes(self.cs - len(encoded)))
            reftable[b] = offset
        rt_offset = (start + nrb) << self.cbits
        self.img.write(rt_offset, struct.pack(f">{len(reftable)}Q", *reftable))
        os.fsync(self.img.fd)
        # the switch: one write of the two header fields, after the new data is durable
        self.img.write(48, struct.pack(">QI", rt_offset, nrt))
        os.fsync(self.img.fd)
        for cluster in sorted(set(self.refstruct)):
            if cluster < self.nb_clusters and cluster != 0 and not computed[cluster]:
                _punch(self.img.fd, cluster << self.cbits, self.cs)
        self.hdr.reftable_offset, self.hdr.reftable_clusters = rt_offset, nrt
        self.refstruct = list(range(start, total))
        self.load_reftable()


def _punch(fd: int, offset: int, length: int) -> None:
    """Free the host space of a cluster no longer in use (best effort: a
    file system without hole punching keeps the bytes, harmlessly)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        falloc_punch = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        libc.fallocate(fd, falloc_punch, ctypes.c_int64(offset), ctypes.c_int64(length))


def _run(img: _Image, res: CheckResult, repair: str | None) -> _Header:
    hdr = _parse_header(img, res)
    res.total_clusters = -(-hdr.size // hdr.cluster_size)
    chk = _Checker(img, hdr, res)
    chk.calculate()
    before = (res.corruptions, res.leaks, res.check_errors)
    highest = chk.compare(None)
    if repair == "all" and chk.rebuild:
        res.note("Rebuilding refcount structure")
        chk.rebuild_refcounts()
    elif repair and chk.rebuild:
        raise _fail(res, "need to rebuild refcount structures (use repair all)")
    elif repair and (res.corruptions, res.leaks, res.check_errors) != before:
        res.corruptions, res.leaks, res.check_errors = before
        highest = chk.compare(repair)
    chk.check_copied(repair == "all")
    res.image_end_offset = (highest + 1) * hdr.cluster_size
    return hdr


@contextlib.contextmanager
def _buffered(fd: int) -> Iterator[None]:
    """Clear O_DIRECT for the duration (our reads are not sector-aligned buffers)."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if flags & os.O_DIRECT:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
    try:
        yield
    finally:
        if flags & os.O_DIRECT:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def check_qcow2(fd: int, *, repair: str | None = None, filename: str = "") -> CheckResult:
    """Check the qcow2 image open on ``fd`` (writable when ``repair`` is given).

    ``repair``: None, ``"leaks"`` or ``"all"``. The result counts what a
    second, read-only check still finds, plus what was fixed (as
    ``qemu-img check -r`` reports). Never raises for a damaged image: the
    damage is counted (``check_errors`` when the check could not complete).
    """
    if repair not in (None, "leaks", "all"):
        raise ValueError(f"repair must be None, 'leaks' or 'all', not {repair!r}")
    with _buffered(fd):
        first = CheckResult(filename=filename)
        try:
            _run(_Image(fd), first, repair)
        except _Abort:
            return first
        except OSError as exc:
            first.check_errors += 1
            first.note(f"ERROR: I/O error: {exc.strerror or exc}")
            return first
        if not repair:
            return first
        os.fsync(fd)
        final = CheckResult(filename=filename)
        try:
            hdr = _run(_Image(fd), final, None)
        except (_Abort, OSError) as exc:
            if isinstance(exc, OSError):
                final.check_errors += 1
            return final
        fixed_c = first.corruptions_fixed + max(0, first.corruptions - final.corruptions)
        fixed_l = first.leaks_fixed + max(0, first.leaks - final.leaks)
        final.corruptions_fixed, final.leaks_fixed = fixed_c, fixed_l
        final.messages = first.messages + final.messages
        if final.corruptions == 0 and final.check_errors == 0 and hdr.version == 3 and \
                hdr.incompat & (_INCOMPAT_DIRTY | _INCOMPAT_CORRUPT):
            incompat = hdr.incompat & ~(_INCOMPAT_DIRTY | _INCOMPAT_CORRUPT)
            os.pwrite(fd, struct.pack(">Q", incompat), 72)
            os.fsync(fd)
        return final
