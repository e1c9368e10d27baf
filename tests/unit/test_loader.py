"""pyvirt.loader: bzImage / ELF kernels and initrd placement, with synthetic images."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvirt.loader import KernelImage, LoaderError, load_initrd, load_kernel
from pyvirt.loader import bzimage as bzmod
from pyvirt.memory import PCI_HOLE_END, PCI_HOLE_START, GuestMemory

MiB = 1 << 20
GiB = 1 << 30

# ---------------------------------------------------------------- synthetic ELF


@dataclass
class Seg:
    paddr: int
    data: bytes
    memsz: int | None = None
    vaddr: int | None = None
    p_type: int = 1  # PT_LOAD


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    def pad(b: bytes) -> bytes:
        return b + bytes(-len(b) % 4)
    return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def make_elf(segs: list[Seg], entry: int, *, ei_class: int = 2, ei_data: int = 1,
             e_type: int = 2, machine: int = 62, notes: bytes = b"") -> bytes:
    """An ELF64 executable: header, program headers, then each segment's bytes."""
    all_segs = list(segs)
    if notes:
        all_segs.append(Seg(0, notes, p_type=4))
    phoff = 64
    off = phoff + 56 * len(all_segs)
    phdrs = b""
    body = b""
    for s in all_segs:
        memsz = s.memsz if s.memsz is not None else len(s.data)
        vaddr = s.vaddr if s.vaddr is not None else s.paddr
        phdrs += struct.pack("<IIQQQQQQ", s.p_type, 5, off + len(body), vaddr, s.paddr,
                             len(s.data), memsz, 0x1000)
        body += s.data
    ident = b"\x7fELF" + bytes([ei_class, ei_data, 1]) + bytes(9)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, e_type, machine, 1, entry, phoff, 0, 0,
                       64, 56, len(all_segs), 64, 0, 0)
    return ehdr + phdrs + body


def tiny_elf(base: int = 0x100000) -> bytes:
    code = b"\xfa\xf4" + b"\x90" * 62  # cli; hlt; nops
    return make_elf([Seg(base, code, memsz=0x2000)], base)


# ---------------------------------------------------------------- synthetic bzImage


def make_bzimage(payload: bytes, *, setup_sects: int = 4, version: int = 0x20F,
                 xloadflags: int = 0x7F, loadflags: int = 0x01, magic: bytes = b"HdrS",
                 boot_flag: int = 0xAA55, pref_address: int = 0x100_0000,
                 init_size: int = 0x40_0000, stub: int = 0x400) -> bytes:
    """Boot sector + setup + protected-mode code (a stub, then the payload)."""
    setup = bytearray((setup_sects or 4) * 512 + 512)
    pm = b"\xcc" * stub + payload + bytes(-(stub + len(payload)) % 16)
    setup[0x1F1] = setup_sects
    struct.pack_into("<I", setup, 0x1F4, len(pm) // 16)
    struct.pack_into("<H", setup, 0x1FE, boot_flag)
    setup[0x200] = 0xEB
    setup[0x201] = 0x6A  # jump over the header: its end is 0x202 + 0x6a = 0x26c
    setup[0x202:0x206] = magic
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x214, 0x100000)
    struct.pack_into("<I", setup, 0x22C, 0x7FFF_FFFF)
    struct.pack_into("<I", setup, 0x230, 0x20_0000)
    setup[0x234] = 1
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, 2047)
    struct.pack_into("<II", setup, 0x248, stub, len(payload))
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + pm


def kernel_elf() -> bytes:
    """A small 'vmlinux': linked high with physical 0x1000000, like Linux."""
    text = b"\x48\x31\xc0\xf4" + bytes(0x1000 - 4)
    data = b"D" * 0x100
    return make_elf(
        [Seg(0x100_0000, text, vaddr=0xFFFF_FFFF_8100_0000),
         Seg(0x100_2000, data, memsz=0x3000, vaddr=0xFFFF_FFFF_8100_2000)],
        entry=0x100_0000,
        notes=note(b"Xen\0", 18, struct.pack("<Q", 0x100_0040)),
    ) + b"RELOCS" * 10  # the decompressed payload may carry relocations after the ELF


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.create(256 * MiB)
    yield m
    m.close()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


# ---------------------------------------------------------------- ELF


def test_tiny_elf_at_1mib(mem: GuestMemory, tmp_path: Path) -> None:
    elf = tiny_elf()
    mem.write(0x100040, b"\xff" * 16)  # bss must be zeroed even if RAM was dirty
    k = load_kernel(mem, write(tmp_path, "g.elf", elf))
    assert k.kind == "elf"
    assert (k.entry, k.load_addr, k.end) == (0x100000, 0x100000, 0x102000)
    assert k.setup_header is None
    assert k.pvh_entry is None
    assert mem.read(0x100000, 2) == b"\xfa\xf4"
    assert mem.read(0x100040, 0x1FC0) == bytes(0x1FC0)


def test_tiny_elf_at_16mib(mem: GuestMemory, tmp_path: Path) -> None:
    k = load_kernel(mem, write(tmp_path, "g.elf", tiny_elf(0x100_0000)))
    assert k.entry == 0x100_0000
    assert k.protocol_version >= 0x20E
    assert k.cmdline_size == 2047


def test_elf_virtual_entry_is_translated(mem: GuestMemory, tmp_path: Path) -> None:
    elf = make_elf([Seg(0x200_0000, b"\x90" * 0x100, vaddr=0xFFFF_FFFF_8200_0000)],
                   entry=0xFFFF_FFFF_8200_0010)
    k = load_kernel(mem, write(tmp_path, "v", elf))
    assert k.entry == 0x200_0010


def test_elf_physical_entry_like_vmlinux(mem: GuestMemory, tmp_path: Path) -> None:
    k = load_kernel(mem, write(tmp_path, "v", kernel_elf()))
    assert k.entry == 0x100_0000
    assert k.pvh_entry == 0x100_0040
    assert k.end == 0x100_5000
    assert mem.read(0x100_2000, 0x100) == b"D" * 0x100
    assert mem.read(0x100_2100, 0x2F00) == bytes(0x2F00)


def test_elf_pvh_note_32bit(mem: GuestMemory, tmp_path: Path) -> None:
    notes = note(b"GNU\0", 3, b"x" * 20) + note(b"Xen\0", 18, struct.pack("<I", 0x100123))
    elf = make_elf([Seg(0x100000, b"\x90" * 0x200)], 0x100000, notes=notes)
    assert load_kernel(mem, write(tmp_path, "v", elf)).pvh_entry == 0x100123


@pytest.mark.parametrize(("kwargs", "msg"), [
    ({"ei_class": 1}, "32-bit"),
    ({"ei_data": 2}, "big-endian"),
    ({"machine": 3}, "not x86-64"),
    ({"e_type": 3}, "DYN"),
    ({"e_type": 1}, "REL"),
])
def test_elf_rejects_wrong_kind(mem: GuestMemory, tmp_path: Path, kwargs: dict[str, int],
                                msg: str) -> None:
    elf = make_elf([Seg(0x100000, b"\x90")], 0x100000, **kwargs)  # type: ignore[arg-type]
    p = write(tmp_path, "bad.elf", elf)
    with pytest.raises(LoaderError, match=msg) as ei:
        load_kernel(mem, p)
    assert str(ei.value).startswith(f"{p}: ")
    assert "\n" not in str(ei.value)


def test_elf_segment_outside_ram(mem: GuestMemory, tmp_path: Path) -> None:
    elf = make_elf([Seg(0x100000, b"\x90"), Seg(0x2000_0000, b"\x90" * 16)], 0x100000)
    with pytest.raises(LoaderError, match=r"ELF segment 1 \[0x20000000, 0x20000010\) is "
                                          r"outside guest RAM \(256 MiB\)"):
        load_kernel(mem, write(tmp_path, "k", elf))
    assert mem.read(0x100000, 1) == b"\0"  # nothing written when any segment is bad


def test_elf_kernel_too_large(mem: GuestMemory, tmp_path: Path) -> None:
    elf = make_elf([Seg(0x100_0000, b"\x90", memsz=250 * MiB)], 0x100_0000)
    with pytest.raises(LoaderError, match="kernel too large for 256 MiB of guest RAM"):
        load_kernel(mem, write(tmp_path, "k", elf))


def test_elf_segment_over_vmm_area(mem: GuestMemory, tmp_path: Path) -> None:
    elf = make_elf([Seg(0x7000, b"\x90" * 16)], 0x7000)
    with pytest.raises(LoaderError, match="overlaps the VMM's zero page"):
        load_kernel(mem, write(tmp_path, "k", elf))


def test_elf_trampoline_below_zero_page_is_fine(mem: GuestMemory, tmp_path: Path) -> None:
    # The test guest links an AP trampoline at 0x6000 (tests/guests/guest.ld).
    elf = make_elf([Seg(0x6000, b"\xfa" * 64), Seg(0x100000, b"\x90" * 64)], 0x100000)
    k = load_kernel(mem, write(tmp_path, "k", elf))
    assert k.load_addr == 0x6000
    assert mem.read(0x6000, 1) == b"\xfa"


def test_elf_truncated_segment(mem: GuestMemory, tmp_path: Path) -> None:
    elf = make_elf([Seg(0x100000, b"\x90" * 0x1000)], 0x100000)[:-0x800]
    with pytest.raises(LoaderError, match="truncated ELF file: segment 0"):
        load_kernel(mem, write(tmp_path, "k", elf))


def test_elf_filesz_above_memsz(mem: GuestMemory, tmp_path: Path) -> None:
    elf = make_elf([Seg(0x100000, b"\x90" * 0x100, memsz=0x10)], 0x100000)
    with pytest.raises(LoaderError, match="file size 0x100 > memory size 0x10"):
        load_kernel(mem, write(tmp_path, "k", elf))


def test_elf_entry_outside_segments(mem: GuestMemory, tmp_path: Path) -> None:
    elf = make_elf([Seg(0x100000, b"\x90" * 0x100)], 0x300000)
    with pytest.raises(LoaderError, match="entry point 0x300000 is not inside"):
        load_kernel(mem, write(tmp_path, "k", elf))


def test_elf_without_load_segments(mem: GuestMemory, tmp_path: Path) -> None:
    elf = make_elf([Seg(0x100000, b"\x90", p_type=6)], 0x100000)
    with pytest.raises(LoaderError, match="no loadable"):
        load_kernel(mem, write(tmp_path, "k", elf))


def test_elf_header_only(mem: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match="truncated ELF file: program headers"):
        load_kernel(mem, write(tmp_path, "k", tiny_elf()[:80]))


# ---------------------------------------------------------------- not a kernel / IO


def test_not_a_kernel(mem: GuestMemory, tmp_path: Path) -> None:
    p = write(tmp_path, "foo", b"hello world" * 100)
    with pytest.raises(LoaderError) as ei:
        load_kernel(mem, p)
    assert str(ei.value) == f"{p}: not a Linux kernel (no bzImage header and not an ELF file)"
    assert ei.value.exit_status == 2


def test_missing_kernel_file(mem: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match="cannot read kernel"):
        load_kernel(mem, tmp_path / "nope")
    with pytest.raises(LoaderError, match="is a directory"):
        load_kernel(mem, tmp_path)


# ---------------------------------------------------------------- bzImage, plain path


def test_bzimage_plain_path(mem: GuestMemory, tmp_path: Path) -> None:
    img = make_bzimage(gzip.compress(kernel_elf()))
    k = load_kernel(mem, write(tmp_path, "bz", img), direct_elf=False)
    assert k.kind == "bzimage"
    assert k.load_addr == 0x100_0000
    assert k.entry == 0x100_0200  # boot.rst: 64-bit entry at load address + 0x200
    pm = img[5 * 512:]
    assert k.end == 0x100_0000 + len(pm)
    assert mem.read(0x100_0000, len(pm)) == pm
    assert k.setup_header == img[0x1F1:0x26C]
    assert (k.protocol_version, k.protocol_str) == (0x20F, "2.15")
    assert k.cmdline_size == 2047
    assert k.initrd_addr_max == 0x7FFF_FFFF
    assert k.reserved_end == 0x100_0000 + 0x40_0000


def test_bzimage_setup_sects_zero_means_four(mem: GuestMemory, tmp_path: Path) -> None:
    img = make_bzimage(gzip.compress(kernel_elf()), setup_sects=0)
    k = load_kernel(mem, write(tmp_path, "bz", img), direct_elf=False)
    assert mem.read(k.load_addr, 16) == img[5 * 512:5 * 512 + 16]


def test_bzimage_pref_address_zero_uses_default(mem: GuestMemory, tmp_path: Path) -> None:
    img = make_bzimage(b"\x00" * 64, pref_address=0)
    k = load_kernel(mem, write(tmp_path, "bz", img), direct_elf=False)
    assert k.load_addr == 0x100_0000


@pytest.mark.parametrize(("kwargs", "msg"), [
    ({"version": 0x208}, r"boot protocol 2\.08 is too old \(need >= 2\.10"),
    ({"xloadflags": 0}, "no 64-bit entry point"),
    ({"loadflags": 0}, "zImage"),
    ({"boot_flag": 0x1234}, "bad bzImage boot_flag 0x1234"),
])
def test_bzimage_rejected(mem: GuestMemory, tmp_path: Path, kwargs: dict[str, int],
                          msg: str) -> None:
    img = make_bzimage(gzip.compress(kernel_elf()), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(LoaderError, match=msg):
        load_kernel(mem, write(tmp_path, "bz", img))


def test_bzimage_bad_magic_is_not_a_kernel(mem: GuestMemory, tmp_path: Path) -> None:
    img = make_bzimage(gzip.compress(kernel_elf()), magic=b"HdrX")
    with pytest.raises(LoaderError, match="not a Linux kernel"):
        load_kernel(mem, write(tmp_path, "bz", img))


def test_bzimage_truncated_setup(mem: GuestMemory, tmp_path: Path) -> None:
    img = make_bzimage(b"x" * 64, setup_sects=28)[:3000]
    p = write(tmp_path, "bz", img)
    with pytest.raises(LoaderError) as ei:
        load_kernel(mem, p)
    assert str(ei.value) == (f"{p}: truncated bzImage: setup says 28 sectors but file has "
                             "3000 bytes")


def test_bzimage_truncated_kernel(mem: GuestMemory, tmp_path: Path) -> None:
    img = make_bzimage(b"x" * 4096)
    with pytest.raises(LoaderError, match=r"truncated bzImage: setup \+ kernel need"):
        load_kernel(mem, write(tmp_path, "bz", img[:-100]))


def test_bzimage_too_large(tmp_path: Path) -> None:
    small = GuestMemory.create(17 * MiB)
    try:
        img = make_bzimage(os.urandom(2 * MiB))
        with pytest.raises(LoaderError, match="kernel too large for 17 MiB of guest RAM"):
            load_kernel(small, write(tmp_path, "bz", img), direct_elf=False)
    finally:
        small.close()


# ---------------------------------------------------------------- bzImage, direct ELF


def _lzma_alone(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_ALONE)


def _xz_kernel_style(data: bytes) -> bytes:
    # scripts/xz_wrap.sh: CRC32 check, x86 BCJ filter, LZMA2; then size_append.
    filters = [{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2}]
    xz = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, filters=filters)
    return xz + struct.pack("<I", len(data))


@pytest.mark.parametrize("compress", [
    lambda d: gzip.compress(d) + struct.pack("<I", len(d)),
    _xz_kernel_style,
    _lzma_alone,
    bz2.compress,
], ids=["gzip", "xz", "lzma", "bzip2"])
def test_bzimage_direct_elf(mem: GuestMemory, tmp_path: Path, compress: object) -> None:
    assert callable(compress)
    img = make_bzimage(compress(kernel_elf()))
    k = load_kernel(mem, write(tmp_path, "bz", img))
    assert k.kind == "elf"
    assert k.entry == 0x100_0000
    assert k.pvh_entry == 0x100_0040
    assert k.setup_header == img[0x1F1:0x26C]  # kept for the zero page
    assert k.protocol_version == 0x20F
    assert k.reserved_end == 0x100_0000 + 0x40_0000
    assert mem.read(0x100_2000, 4) == b"DDDD"


def test_direct_elf_falls_back_without_zstd(mem: GuestMemory, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bzmod, "_zstd_module", lambda: None)
    img = make_bzimage(b"\x28\xb5\x2f\xfd" + b"\0" * 60)
    k = load_kernel(mem, write(tmp_path, "bz", img))
    assert (k.kind, k.entry) == ("bzimage", 0x100_0200)


def test_direct_elf_falls_back_for_lz4(mem: GuestMemory, tmp_path: Path) -> None:
    img = make_bzimage(b"\x02\x21\x4c\x18" + b"\0" * 60)
    assert load_kernel(mem, write(tmp_path, "bz", img)).kind == "bzimage"


def test_direct_elf_corrupt_payload(mem: GuestMemory, tmp_path: Path) -> None:
    payload = bytearray(gzip.compress(kernel_elf()))
    payload[20:40] = b"\xff" * 20
    with pytest.raises(LoaderError, match="corrupt gzip kernel payload"):
        load_kernel(mem, write(tmp_path, "bz", make_bzimage(bytes(payload))))


def test_direct_elf_payload_not_elf_falls_back(mem: GuestMemory, tmp_path: Path) -> None:
    img = make_bzimage(gzip.compress(b"not an elf" * 10))
    assert load_kernel(mem, write(tmp_path, "bz", img)).kind == "bzimage"


def test_vmlinux_cache(mem: GuestMemory, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    img = make_bzimage(gzip.compress(kernel_elf()))
    p = write(tmp_path, "bz", img)
    cache = tmp_path / "cache" / "vmlinux"
    load_kernel(mem, p, vmlinux_cache=cache)
    entry = cache / f"{hashlib.sha256(img).hexdigest()}.vmlinux"
    assert entry.read_bytes() == kernel_elf()
    assert [f.name for f in cache.iterdir()] == [entry.name]  # no temp files left

    def boom(*_a: object) -> bytes:
        raise AssertionError("decompressed despite the cache")
    monkeypatch.setattr(bzmod, "decompress_payload", boom)
    k = load_kernel(mem, p, vmlinux_cache=cache)
    assert (k.kind, k.entry) == ("elf", 0x100_0000)


def test_vmlinux_cache_bad_entry_is_replaced(mem: GuestMemory, tmp_path: Path) -> None:
    img = make_bzimage(gzip.compress(kernel_elf()))
    cache = tmp_path / "c"
    cache.mkdir()
    entry = cache / f"{hashlib.sha256(img).hexdigest()}.vmlinux"
    entry.write_bytes(b"garbage")
    k = load_kernel(mem, write(tmp_path, "bz", img), vmlinux_cache=cache)
    assert k.kind == "elf"
    assert entry.read_bytes()[:4] == b"\x7fELF"


def test_vmlinux_cache_unwritable(mem: GuestMemory, tmp_path: Path) -> None:
    img = make_bzimage(gzip.compress(kernel_elf()))
    blocker = write(tmp_path, "file", b"")  # a file where the cache directory should be
    k = load_kernel(mem, write(tmp_path, "bz", img), vmlinux_cache=blocker / "sub")
    assert k.kind == "elf"


# ---------------------------------------------------------------- initrd


def _kernel(end: int = 0x200_0000, initrd_addr_max: int = 0x7FFF_FFFF,
            reserved_end: int = 0) -> KernelImage:
    return KernelImage(kind="elf", entry=0x100_0000, load_addr=0x100_0000, end=end,
                       setup_header=None, protocol_version=0x20F,
                       initrd_addr_max=initrd_addr_max, cmdline_size=2047, pvh_entry=None,
                       source=Path("k"), reserved_end=reserved_end)


def test_initrd_placed_high(mem: GuestMemory, tmp_path: Path) -> None:
    data = os.urandom(10_000)
    addr, size = load_initrd(mem, write(tmp_path, "i", data), _kernel())
    assert size == 10_000
    assert addr % 4096 == 0
    assert addr + size <= 256 * MiB
    assert addr == (256 * MiB - 10_000) & ~0xFFF
    assert mem.read(addr, size) == data


def test_initrd_below_pci_hole(tmp_path: Path) -> None:
    big = GuestMemory.create(3 * GiB + 512 * MiB)
    try:
        addr, size = load_initrd(big, write(tmp_path, "i", b"x" * 5000), _kernel())
        # initrd_addr_max 0x7fffffff is lower than the hole: the last byte at or below it.
        assert addr + size <= 0x8000_0000
        assert addr == (0x8000_0000 - 5000) & ~0xFFF
        k = _kernel(initrd_addr_max=0xFFFF_FFFF)
        addr, size = load_initrd(big, write(tmp_path, "i", b"x" * 5000), k)
        assert addr + size <= PCI_HOLE_START
        assert addr < PCI_HOLE_END
    finally:
        big.close()


def test_initrd_respects_initrd_addr_max(mem: GuestMemory, tmp_path: Path) -> None:
    addr, size = load_initrd(mem, write(tmp_path, "i", b"x" * 100),
                             _kernel(initrd_addr_max=0x37F_FFFF))
    assert addr + size <= 0x380_0000
    assert addr == 0x380_0000 - 0x1000


def test_initrd_does_not_fit(mem: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match="does not fit in guest RAM"):
        load_initrd(mem, write(tmp_path, "i", b"x" * (200 * MiB)), _kernel(end=0x600_0000))


def test_initrd_stays_above_reserved_end(mem: GuestMemory, tmp_path: Path) -> None:
    k = _kernel(end=0x200_0000, reserved_end=0xF00_0000)
    with pytest.raises(LoaderError, match="does not fit"):
        load_initrd(mem, write(tmp_path, "i", b"x" * (20 * MiB)), k)


def test_initrd_empty_or_missing(mem: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match="initrd is empty"):
        load_initrd(mem, write(tmp_path, "i", b""), _kernel())
    with pytest.raises(LoaderError, match="cannot read initrd"):
        load_initrd(mem, tmp_path / "missing", _kernel())


# ---------------------------------------------------------------- the real Debian kernel


def _real_kernel() -> Path | None:
    candidates = []
    if os.environ.get("PYVIRT_TEST_VMLINUZ"):
        candidates.append(Path(os.environ["PYVIRT_TEST_VMLINUZ"]))
    if os.environ.get("PYVIRT_CACHE_DIR"):
        candidates.append(Path(os.environ["PYVIRT_CACHE_DIR"]) / "guest" / "vmlinuz")
    candidates.append(Path.home() / ".cache" / "pyvirt" / "guest" / "vmlinuz")
    return next((c for c in candidates if c.is_file()), None)


@pytest.mark.guest
def test_real_debian_kernel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _real_kernel()
    if path is None:
        pytest.skip("no Debian kernel at $PYVIRT_CACHE_DIR/guest/vmlinuz or ~/.cache/pyvirt")
    m = GuestMemory.create(256 * MiB)
    try:
        k = load_kernel(m, path, direct_elf=False)
        assert (k.kind, k.entry) == ("bzimage", 0x100_0000 + 0x200)
        assert k.protocol_version >= 0x20F

        t0 = time.monotonic()
        k = load_kernel(m, path, vmlinux_cache=tmp_path)
        cold = time.monotonic() - t0
        t0 = time.monotonic()
        k2 = load_kernel(m, path, vmlinux_cache=tmp_path)
        warm = time.monotonic() - t0
        assert k == k2
        assert (k.kind, k.entry) == ("elf", 0x100_0000)  # startup_64, physical
        assert k.setup_header is not None
        assert k.pvh_entry is not None
        assert m.read(k.entry, 16) != bytes(16)  # startup_64's code is there
        assert k.pvh_entry != k.entry
        raw = path.read_bytes()
        payload_at = (raw[0x1F1] + 1) * 512 + struct.unpack_from("<I", raw, 0x248)[0]
        fmt = bzmod.payload_format(raw[payload_at:payload_at + 8])
        assert fmt in ("xz", "gzip", "lzma", "zstd", "bzip2")
        with capsys.disabled():
            print(f"\n[loader] {path}: payload {fmt}, load+decompress {cold:.2f}s, "
                  f"cached {warm:.2f}s")
    finally:
        m.close()


def test_direct_elf_zstd(mem: GuestMemory, tmp_path: Path) -> None:
    zstandard = pytest.importorskip("zstandard")
    elf = kernel_elf()
    payload = zstandard.ZstdCompressor(level=19).compress(elf) + struct.pack("<I", len(elf))
    k = load_kernel(mem, write(tmp_path, "bz", make_bzimage(payload)))
    assert (k.kind, k.entry) == ("elf", 0x100_0000)


@pytest.mark.parametrize("fmt", ["gzip", "xz", "bzip2", "zstd"])
def test_decompression_bomb_is_refused_without_being_inflated(fmt: str) -> None:
    """A small payload that inflates past the bound fails with one LoaderError;
    exactly the bound still decompresses."""
    limit = 1 << 20

    def pack(n: int) -> bytes:
        data = b"\0" * n
        if fmt == "gzip":
            return gzip.compress(data)
        if fmt == "xz":
            return lzma.compress(data, format=lzma.FORMAT_XZ)
        if fmt == "bzip2":
            return bz2.compress(data)
        import zstandard

        return bytes(zstandard.ZstdCompressor().compress(data))

    ok = bzmod.decompress_payload(pack(limit), Path("k"), limit)
    assert ok is not None and len(ok) == limit
    with pytest.raises(LoaderError, match="decompresses to more than 1 MiB"):
        bzmod.decompress_payload(pack(limit + 1), Path("k"), limit)
    bomb = pack(64 * limit)  # 64 MiB of zeros in a few KiB
    assert len(bomb) < 256 * 1024
    with pytest.raises(LoaderError, match="more than"):
        bzmod.decompress_payload(bomb, Path("k"), limit)
