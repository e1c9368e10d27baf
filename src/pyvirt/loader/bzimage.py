"""bzImage parsing and host-side payload decompression.

Offsets and rules are from the Linux x86 boot protocol,
Documentation/arch/x86/boot.rst ("The real-mode kernel header" and "Details of
header fields"). All offsets below are file offsets, which equal offsets in
``struct boot_params`` because the setup header lives at 0x1f1 in both.
"""

from __future__ import annotations

import bz2
import contextlib
import importlib
import logging
import lzma
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyvirt.loader.errors import LoaderError

__all__ = [
    "BzImageHeader",
    "decompress_payload",
    "parse_bzimage",
    "payload_format",
    "vmlinux_from_bzimage",
]

log = logging.getLogger(__name__)

HDR_START = 0x1F1  # struct setup_header in the file and in boot_params
HDR_MAX_END = 0x290  # boot_params: the setup header area ends here (edd_mbr_sig_buffer)
HDRS_MAGIC = b"HdrS"  # "header" field at 0x202
BOOT_FLAG = 0xAA55  # "boot_flag" at 0x1fe
MIN_VERSION = 0x20A  # 2.10: pref_address, init_size; payload_offset/length
LOADED_HIGH = 0x01  # loadflags bit 0: protected-mode code loads at 0x100000+ (bzImage)
XLF_KERNEL_64 = 0x01  # xloadflags bit 0: has the 64-bit entry point at load address + 0x200
XLF_CAN_BE_LOADED_ABOVE_4G = 0x02

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class BzImageHeader:
    """The setup header fields the loader uses (boot.rst offsets in comments)."""

    setup_sects: int  # 0x1f1; 0 means 4
    syssize: int  # 0x1f4, in 16-byte paragraphs
    version: int  # 0x206
    loadflags: int  # 0x211
    initrd_addr_max: int  # 0x22c
    kernel_alignment: int  # 0x230
    relocatable: bool  # 0x234
    xloadflags: int  # 0x236
    cmdline_size: int  # 0x238
    payload_offset: int  # 0x248, from the start of the protected-mode code
    payload_length: int  # 0x24c
    pref_address: int  # 0x258
    init_size: int  # 0x260
    header_bytes: bytes  # 0x1f1 .. end of the header, to copy into the zero page

    @property
    def setup_size(self) -> int:
        """Bytes of boot sector + real-mode setup before the protected-mode code."""
        return (self.setup_sects + 1) * 512

    @property
    def version_str(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"


def is_bzimage(data: bytes | memoryview) -> bool:
    return len(data) >= 0x206 and bytes(data[0x202:0x206]) == HDRS_MAGIC


def parse_bzimage(data: bytes | memoryview, path: Path) -> BzImageHeader:
    """Validate the real-mode header of a bzImage for the 64-bit boot protocol."""
    if not is_bzimage(data):
        raise LoaderError("not a bzImage (no \"HdrS\" header magic at 0x202)", path)
    if len(data) < 0x26C:
        raise LoaderError(f"truncated bzImage: file has only {len(data)} bytes", path)
    boot_flag = _U16.unpack_from(data, 0x1FE)[0]
    if boot_flag != BOOT_FLAG:
        raise LoaderError(f"bad bzImage boot_flag {boot_flag:#06x} (expected 0xaa55)", path)
    version = _U16.unpack_from(data, 0x206)[0]
    vstr = f"{version >> 8}.{version & 0xFF:02d}"
    if version < MIN_VERSION:
        raise LoaderError(f"boot protocol {vstr} is too old (need >= 2.10, Linux 2.6.31+)",
                          path)
    loadflags = data[0x211]
    if not loadflags & LOADED_HIGH:
        raise LoaderError("zImage (loaded low) kernels are not supported; need a bzImage",
                          path)
    xloadflags = _U16.unpack_from(data, 0x236)[0]
    if not xloadflags & XLF_KERNEL_64:
        raise LoaderError("kernel has no 64-bit entry point (XLF_KERNEL_64 not set in "
                          "xloadflags): a 32-bit kernel?", path)
    setup_sects = data[0x1F1] or 4  # boot.rst: "If this field is 0, the real value is 4."
    setup_size = (setup_sects + 1) * 512
    syssize = _U32.unpack_from(data, 0x1F4)[0]
    if len(data) < setup_size:
        raise LoaderError(f"truncated bzImage: setup says {setup_sects} sectors but file has "
                          f"{len(data)} bytes", path)
    if len(data) < setup_size + syssize * 16:
        raise LoaderError(f"truncated bzImage: setup + kernel need {setup_size + syssize * 16} "
                          f"bytes but file has {len(data)}", path)
    # boot.rst: "the end of setup header can be calculated as 0x0202 + byte value at 0x0201".
    hdr_end = min(0x202 + data[0x201], HDR_MAX_END, setup_size)
    return BzImageHeader(
        setup_sects=setup_sects,
        syssize=syssize,
        version=version,
        loadflags=loadflags,
        initrd_addr_max=_U32.unpack_from(data, 0x22C)[0],
        kernel_alignment=_U32.unpack_from(data, 0x230)[0],
        relocatable=bool(data[0x234]),
        xloadflags=xloadflags,
        cmdline_size=_U32.unpack_from(data, 0x238)[0] if version >= 0x206 else 255,
        payload_offset=_U32.unpack_from(data, 0x248)[0],
        payload_length=_U32.unpack_from(data, 0x24C)[0],
        pref_address=_U64.unpack_from(data, 0x258)[0],
        init_size=_U32.unpack_from(data, 0x260)[0],
        header_bytes=bytes(data[HDR_START:hdr_end]),
    )


# Magic numbers of the formats the kernel can compress its payload with
# (arch/x86/boot/compressed/Makefile: gzip, bzip2, lzma, xz, lzo, lz4, zstd).
_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bzip2"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x89LZO", "lzo"),
)


def payload_format(payload: bytes | memoryview) -> str:
    """The compression format of a bzImage payload ("unknown" if not recognised)."""
    head = bytes(payload[:8])
    for magic, name in _MAGICS:
        if head.startswith(magic):
            return name
    return "unknown"


def _zstd_module() -> Any:
    """A zstd decompressor module: stdlib ``compression.zstd`` (3.14+) or ``zstandard``."""
    for name in ("compression.zstd", "zstandard"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


#: the most a payload may decompress to. A real vmlinux is tens of MiB (Debian's:
#: 63 MiB); without a bound a small compressed "kernel" (a decompression bomb)
#: could take gigabytes of host memory before anything else is checked.
MAX_VMLINUX_BYTES = 512 << 20


def decompress_payload(payload: bytes | memoryview, path: Path,
                       limit: int = MAX_VMLINUX_BYTES) -> bytes | None:
    """Decompress a bzImage payload on the host; None if its format is not supported here.

    The kernel appends the uncompressed size (4 bytes) after most formats
    (``size_append`` in scripts/Makefile.lib), so every decoder here stops at
    the end of the compressed stream and ignores what follows. Output beyond
    ``limit`` bytes is refused (``LoaderError``) without being produced.
    """
    fmt = payload_format(payload)
    raw = bytes(payload)
    out: bytes
    try:
        if fmt == "gzip":
            z = zlib.decompressobj(wbits=31)
            out = z.decompress(raw, limit + 1)
        elif fmt in ("xz", "lzma"):
            lz_fmt = lzma.FORMAT_XZ if fmt == "xz" else lzma.FORMAT_ALONE
            out = lzma.LZMADecompressor(format=lz_fmt).decompress(raw, limit + 1)
        elif fmt == "bzip2":
            out = bz2.BZ2Decompressor().decompress(raw, limit + 1)
        elif fmt == "zstd":
            mod = _zstd_module()
            if mod is None:
                log.info("%s: zstd payload and no zstd module; booting via the bzImage "
                         "decompressor", path)
                return None
            if mod.__name__ == "zstandard":
                import io

                with mod.ZstdDecompressor().stream_reader(io.BytesIO(raw)) as reader:
                    out = reader.read(limit + 1)
            else:
                out = mod.ZstdDecompressor().decompress(raw, limit + 1)
        else:
            log.info("%s: %s payload cannot be decompressed on the host", path, fmt)
            return None
    except (zlib.error, lzma.LZMAError, OSError, ValueError, EOFError) as e:
        raise LoaderError(f"corrupt {fmt} kernel payload: {e}", path) from e
    except Exception as e:  # zstandard.ZstdError and friends are not OSError subclasses
        if fmt == "zstd":
            raise LoaderError(f"corrupt zstd kernel payload: {e}", path) from e
        raise
    if len(out) > limit:
        raise LoaderError(f"the {fmt} kernel payload decompresses to more than "
                          f"{limit >> 20} MiB", path)
    return out


def vmlinux_from_bzimage(data: bytes, header: BzImageHeader, path: Path,
                         cache: Path | None) -> bytes | None:
    """The ELF vmlinux inside a bzImage (decompressed or from ``cache``), or None.

    The decompressed payload is the ELF (``vmlinux.bin``, stripped) possibly
    followed by relocation data (``vmlinux.relocs``, CONFIG_RELOCATABLE); the
    ELF parser only looks at what its headers point to, so the tail is harmless.
    """
    start = header.setup_size + header.payload_offset
    end = start + header.payload_length
    if header.payload_length == 0 or end > len(data):
        log.info("%s: no usable payload_offset/payload_length", path)
        return None
    cached: Path | None = None
    if cache is not None:
        import hashlib  # only for bzImages with a cache: off the ELF start-up path

        cached = cache / f"{hashlib.sha256(data).hexdigest()}.vmlinux"
        try:
            blob = cached.read_bytes()
        except OSError:
            pass
        else:
            if blob[:4] == b"\x7fELF":
                return blob
            log.warning("%s: ignoring bad cached vmlinux %s", path, cached)
    blob_or_none = decompress_payload(memoryview(data)[start:end], path)
    if blob_or_none is None:
        return None
    if blob_or_none[:4] != b"\x7fELF":
        log.info("%s: decompressed payload is not an ELF file", path)
        return None
    if cached is not None:
        _write_atomic(cached, blob_or_none)
    return blob_or_none


def _write_atomic(dest: Path, blob: bytes) -> None:
    """Write via a temporary file + rename, so readers never see a partial file.

    The cache is only a speed-up: failing to write it is logged, not raised.
    """
    tmp = ""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        tmp = ""
    except OSError as e:
        log.warning("cannot write vmlinux cache %s: %s", dest, e)
    finally:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
