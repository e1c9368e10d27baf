"""Loading a kernel (bzImage or ELF) and an initrd into guest RAM."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pyvirt.arch.x86_64 import layout
from pyvirt.loader.bzimage import BzImageHeader, is_bzimage, parse_bzimage, vmlinux_from_bzimage
from pyvirt.loader.elf import check_segment_placement, is_elf, load_elf_segments, parse_elf
from pyvirt.loader.errors import LoaderError
from pyvirt.memory import PCI_HOLE_START, GuestMemory

__all__ = ["KernelImage", "load_initrd", "load_kernel"]

log = logging.getLogger(__name__)

PAGE = 0x1000
#: boot.rst: the 64-bit entry point is at the protected-mode load address + 0x200.
ENTRY_64_OFFSET = 0x200
#: Values for a bare ELF (no setup header): what a 64-bit Linux would advertise.
#: initrd_addr_max 0x7fffffff is the x86-64 kernel's own value; cmdline_size
#: is COMMAND_LINE_SIZE (2048) minus the NUL.
ELF_PROTOCOL_VERSION = 0x20F
ELF_INITRD_ADDR_MAX = 0x7FFF_FFFF
ELF_CMDLINE_SIZE = 2047


@dataclass(frozen=True)
class KernelImage:
    """A kernel placed in guest RAM and what booting it needs."""

    kind: Literal["bzimage", "elf"]
    entry: int  # guest-physical 64-bit entry; enter in long mode with RSI = zero page
    load_addr: int  # lowest guest-physical address loaded
    end: int  # one past the highest byte loaded (including ELF bss)
    setup_header: bytes | None  # bzImage bytes 0x1f1..end of header, for the zero page
    protocol_version: int  # e.g. 0x20f for 2.15
    initrd_addr_max: int  # highest address the initrd's last byte may occupy
    cmdline_size: int  # longest command line the kernel accepts, without the NUL
    pvh_entry: int | None  # XEN_ELFNOTE_PHYS32_ENTRY, when the ELF has it
    source: Path
    #: one past the highest address the kernel touches before it reads the
    #: e820 map: load_addr + init_size for a bzImage (boot.rst: the decompressor
    #: works in [load address, load address + init_size)); initrds go above it.
    reserved_end: int = 0
    xloadflags: int = 0  # bzImage xloadflags (boot.rst), 0 for a bare ELF

    @property
    def protocol_str(self) -> str:
        return f"{self.protocol_version >> 8}.{self.protocol_version & 0xFF:02d}"


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except IsADirectoryError as e:
        raise LoaderError(f"{what} is a directory, not a file", path) from e
    except OSError as e:
        raise LoaderError(f"cannot read {what}: {e.strerror or e}", path) from e


def load_kernel(mem: GuestMemory, path: Path, *, vmlinux_cache: Path | None = None,
                direct_elf: bool = True, data: bytes | None = None) -> KernelImage:
    """Load a bzImage or ELF64 vmlinux into ``mem``.

    With ``direct_elf`` a bzImage's payload is decompressed on the host and its
    ELF vmlinux loaded at its link address, skipping the guest-side
    decompressor; the bzImage's setup header is kept for the zero page. When
    the payload format cannot be decoded here, the bzImage is loaded as is.
    ``vmlinux_cache`` is a directory holding decompressed vmlinux files keyed
    by the bzImage's sha256. ``data``: the file's bytes, already read (``path``
    then only names it in messages).
    """
    if data is None:
        data = _read(path, "kernel")
    if is_bzimage(data):
        hdr = parse_bzimage(data, path)
        if direct_elf:
            t0 = time.monotonic()
            vmlinux = vmlinux_from_bzimage(data, hdr, path, vmlinux_cache)
            if vmlinux is not None:
                log.debug("%s: vmlinux ready in %.3fs", path, time.monotonic() - t0)
                return _load_elf(mem, vmlinux, path, hdr)
        return _load_bzimage(mem, data, hdr, path)
    if is_elf(data):
        return _load_elf(mem, data, path, None)
    raise LoaderError("not a Linux kernel (no bzImage header and not an ELF file)", path)


def _load_bzimage(mem: GuestMemory, data: bytes, hdr: BzImageHeader, path: Path) -> KernelImage:
    # boot.rst: a relocatable kernel may go anywhere kernel_alignment-aligned,
    # but pref_address (2.10+) is where it prefers to run; using it also avoids
    # the decompressor relocating itself.
    load_addr = hdr.pref_address or layout.KERNEL_LOAD_ADDR
    code = memoryview(data)[hdr.setup_size:]
    check_segment_placement(mem, load_addr, len(code), path, "protected-mode kernel")
    mem.write(load_addr, code)
    end = load_addr + len(code)
    return KernelImage(
        kind="bzimage",
        entry=load_addr + ENTRY_64_OFFSET,
        load_addr=load_addr,
        end=end,
        setup_header=hdr.header_bytes,
        protocol_version=hdr.version,
        initrd_addr_max=hdr.initrd_addr_max,
        cmdline_size=hdr.cmdline_size,
        pvh_entry=None,
        source=path,
        reserved_end=max(end, load_addr + hdr.init_size),
        xloadflags=hdr.xloadflags,
    )


def _load_elf(mem: GuestMemory, data: bytes, path: Path,
              hdr: BzImageHeader | None) -> KernelImage:
    image = parse_elf(data, path)
    load_elf_segments(mem, data, image, path)
    reserved_end = image.end
    if hdr is not None:
        # Keep clear of what the bzImage would have used too; costs nothing.
        reserved_end = max(reserved_end, image.load_addr + hdr.init_size)
    return KernelImage(
        kind="elf",
        entry=image.entry,
        load_addr=image.load_addr,
        end=image.end,
        setup_header=hdr.header_bytes if hdr else None,
        protocol_version=hdr.version if hdr else ELF_PROTOCOL_VERSION,
        initrd_addr_max=hdr.initrd_addr_max if hdr else ELF_INITRD_ADDR_MAX,
        cmdline_size=hdr.cmdline_size if hdr else ELF_CMDLINE_SIZE,
        pvh_entry=image.pvh_entry,
        source=path,
        reserved_end=reserved_end,
        xloadflags=hdr.xloadflags if hdr else 0,
    )


def _align_up(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


def load_initrd(mem: GuestMemory, path: Path, kernel: KernelImage, *,
                data: bytes | None = None) -> tuple[int, int]:
    """Copy an initrd into RAM; returns (guest address, size).

    boot.rst ("initrd_addr_max"): the initrd must end at or below
    initrd_addr_max; like other loaders we put it page-aligned as high as
    possible, in the low RAM region (below the PCI hole) and above the kernel.
    ``data``: the file's bytes, already read.
    """
    low = mem.regions[0]
    limit = min(low.end, PCI_HOLE_START, kernel.initrd_addr_max + 1)
    floor = _align_up(max(kernel.end, kernel.reserved_end), PAGE)

    def place(size: int) -> int:
        addr = (limit - size) & ~(PAGE - 1)
        if addr < floor:
            room = max(0, limit - floor)
            raise LoaderError(f"initrd of {size} bytes does not fit in guest RAM: only {room} "
                              f"bytes free between the kernel's end {floor:#x} and "
                              f"{limit:#x}", path)
        return addr

    if data is None:
        # the size first: a huge file (a disk image by mistake) must fail here, not
        # after filling the host's memory (found by fuzz/targets/loader_initrd.py)
        with contextlib.suppress(OSError):
            place(path.stat().st_size)
        data = _read(path, "initrd")
    size = len(data)
    if size == 0:
        raise LoaderError("initrd is empty", path)
    addr = place(size)
    mem.write(addr, data)
    return addr, size
