"""Fuzzer-made kernel files: ELF64 executables and bzImages whose fields are mostly
plausible (so the loaders get past their first checks) and sometimes anything."""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct

from fuzz.common import Provider
from pyvirt.arch.x86_64 import layout

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
KERNEL_VIRT = 0xFFFF_FFFF_8000_0000


def _pick(fdp: Provider, usual: int, size: int) -> int:
    """``usual`` most of the time, any ``size``-byte value sometimes."""
    return usual if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeUInt(size)


def _paddr(fdp: Provider) -> int:
    k = fdp.ConsumeIntInRange(0, 7)
    if k == 0:
        return fdp.ConsumeUInt(8)
    if k == 1:  # low memory, where the VMM keeps its tables
        return fdp.ConsumeIntInRange(0, 0x10_0000)
    if k == 2:  # near the end of RAM
        return (64 << 20) - fdp.ConsumeIntInRange(0, 0x10_0000)
    return layout.KERNEL_LOAD_ADDR + 0x1000 * fdp.ConsumeIntInRange(0, 64)


def elf(fdp: Provider) -> bytes:
    """An ELF64 file: header, program headers (PT_LOAD, PT_NOTE with a PVH note, other),
    then segment contents."""
    nph = fdp.ConsumeIntInRange(0, 4)
    phoff = _pick(fdp, 64, 8)
    ident = b"\x7fELF" + bytes([_pick(fdp, 2, 1), _pick(fdp, 1, 1), 1]) + bytes(9)
    body = bytearray()
    phdrs = bytearray()
    data_at = 64 + nph * _PHDR.size
    entry = 0
    for _ in range(nph):
        kind = fdp.ConsumeIntInRange(0, 7)
        if kind == 0:  # a Xen PVH entry note
            desc = fdp.ConsumeIntInRange(0, 2) * 4
            note = struct.pack("<III", 4, desc, _pick(fdp, 18, 4)) + b"Xen\0" + \
                fdp.ConsumeBytes(desc).ljust(desc, b"\0")
            seg = note[:fdp.ConsumeIntInRange(0, len(note))] if fdp.ConsumeIntInRange(0, 7) == 0 \
                else note
            phdrs += _PHDR.pack(4, 0, data_at + len(body), 0, 0, len(seg), len(seg), 4)
            body += seg
            continue
        ptype = (1, 1, 1, 1, 1, 2, 6)[fdp.ConsumeIntInRange(0, 6)] if kind != 7 else (
            fdp.ConsumeUInt(4))
        filesz = fdp.ConsumeIntInRange(0, 256)
        memsz = filesz + (fdp.ConsumeIntInRange(0, 0x40_0000) if fdp.ConsumeBool() else 0)
        memsz = _pick(fdp, memsz, 8)
        paddr = _paddr(fdp)
        vaddr = (paddr + KERNEL_VIRT) & 0xFFFF_FFFF_FFFF_FFFF if fdp.ConsumeBool() else paddr
        offset = _pick(fdp, data_at + len(body), 8)
        phdrs += _PHDR.pack(ptype, 5, offset, vaddr, paddr, filesz, memsz, 0x20_0000)
        body += fdp.ConsumeBytes(filesz).ljust(filesz, b"\0")
        if not entry or fdp.ConsumeBool():
            entry = (vaddr if fdp.ConsumeBool() else paddr) + fdp.ConsumeIntInRange(0, 0x300)
    entry = _pick(fdp, entry & 0xFFFF_FFFF_FFFF_FFFF, 8)  # vaddr + offset may wrap
    ehdr = _EHDR.pack(ident, _pick(fdp, 2, 2), _pick(fdp, 62, 2), 1, entry, phoff, 0, 0, 64,
                      _pick(fdp, _PHDR.size, 2), _pick(fdp, nph, 2), 64, 0, 0)
    out = bytearray(ehdr) + phdrs + body
    if phoff != 64:  # a program header table somewhere else
        out[64:64 + len(phdrs)] = bytes(len(phdrs))
    return bytes(out)


def _compress(fdp: Provider, blob: bytes) -> bytes:
    fmt = fdp.ConsumeIntInRange(0, 9)
    if fmt == 0:
        out = gzip.compress(blob, compresslevel=1, mtime=0)
    elif fmt == 1:
        out = lzma.compress(blob, format=lzma.FORMAT_XZ, preset=0)
    elif fmt == 2:
        out = lzma.compress(blob, format=lzma.FORMAT_ALONE, preset=0)
    elif fmt == 3:
        out = bz2.compress(blob, compresslevel=1)
    elif fmt == 4:
        import zstandard

        out = zstandard.ZstdCompressor(level=1).compress(blob)
    elif fmt == 5:  # formats the host does not decode
        out = (b"\x02\x21\x4c\x18", b"\x89LZO")[fdp.ConsumeIntInRange(0, 1)] + blob
    elif fmt == 6:
        out = blob  # not compressed at all
    else:
        out = gzip.compress(blob, compresslevel=1, mtime=0)
    if fdp.ConsumeIntInRange(0, 7) == 0:  # corrupt or truncate the stream
        b = bytearray(out)
        if b and fdp.ConsumeBool():
            b[fdp.ConsumeIntInRange(0, len(b) - 1)] ^= 1 << fdp.ConsumeIntInRange(0, 7)
        else:
            del b[fdp.ConsumeIntInRange(0, len(b)):]
        out = bytes(b)
    return out + struct.pack("<I", len(blob))  # size_append, as the kernel build does


def bzimage(fdp: Provider) -> bytes:
    """A bzImage: boot sector + setup (the setup header at 0x1f1), then the protected-mode
    part holding a compressed ELF payload."""
    setup_sects = _pick(fdp, fdp.ConsumeIntInRange(0, 4), 1)
    setup_size = ((setup_sects or 4) + 1) * 512
    payload = _compress(fdp, elf(fdp))
    lead = fdp.ConsumeIntInRange(0, 64)
    pm = bytearray(fdp.ConsumeBytes(lead).ljust(lead, b"\0")) + payload
    pm += bytes(max(0, 0x200 - len(pm)) if fdp.ConsumeBool() else 0)
    img = bytearray(setup_size)
    img[0x1F1] = setup_sects & 0xFF
    struct.pack_into("<I", img, 0x1F4, _pick(fdp, (len(pm) + 15) // 16, 4))
    struct.pack_into("<H", img, 0x1FE, _pick(fdp, 0xAA55, 2))
    img[0x201] = _pick(fdp, 0x6A, 1)  # the jump: the header ends at 0x202 + this
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x206, _pick(fdp, 0x20F, 2))
    img[0x211] = _pick(fdp, 0x01, 1)
    struct.pack_into("<I", img, 0x22C, _pick(fdp, 0x7FFF_FFFF, 4))
    struct.pack_into("<I", img, 0x230, _pick(fdp, 0x20_0000, 4))
    img[0x234] = 1
    struct.pack_into("<H", img, 0x236, _pick(fdp, 0x3, 2))
    struct.pack_into("<I", img, 0x238, _pick(fdp, 2047, 4))
    struct.pack_into("<I", img, 0x248, _pick(fdp, lead, 4))
    struct.pack_into("<I", img, 0x24C, _pick(fdp, len(payload), 4))
    struct.pack_into("<Q", img, 0x258, _pick(fdp, layout.KERNEL_LOAD_ADDR, 8))
    struct.pack_into("<I", img, 0x260, _pick(fdp, 0x20_0000 + len(pm), 4))
    out = bytes(img) + bytes(pm)
    if fdp.ConsumeIntInRange(0, 15) == 0:
        out = out[:fdp.ConsumeIntInRange(0, len(out))]
    return out
