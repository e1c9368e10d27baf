"""Loading fuzzer-made kernels and initrds from real files into real guest RAM."""

from __future__ import annotations

import atexit
import os
import tempfile
from pathlib import Path

from fuzz.common import Provider, check
from pyvirt.loader import Cmdline, LoaderError, load_initrd, load_kernel, setup_linux_boot
from pyvirt.loader.elf import VMM_RANGES
from pyvirt.memory import GuestMemory

RAM = 64 << 20
_dir = tempfile.TemporaryDirectory(prefix="pyvirt-fuzz-loader-")
atexit.register(_dir.cleanup)
KERNEL = Path(_dir.name) / "kernel"
INITRD = Path(_dir.name) / "initrd"
_mem: list[GuestMemory] = []


def memory() -> GuestMemory:
    if not _mem:
        _mem.append(GuestMemory.create(RAM))
    return _mem[0]


def write_file(path: Path, data: bytes, size: int | None = None) -> None:
    """``data``, then (sparse) zeros up to ``size``."""
    with open(path, "wb") as f:
        f.write(data)
        if size is not None and size > len(data):
            f.truncate(size)


def boot(fdp: Provider, kernel: bytes) -> None:
    """What ``build_machine`` does with a kernel file: load it, an initrd, the command line
    and the zero page. ``LoaderError`` is the documented failure."""
    mem = memory()
    write_file(KERNEL, kernel)
    try:
        k = load_kernel(mem, KERNEL, vmlinux_cache=None, direct_elf=fdp.ConsumeBool())
    except LoaderError:
        return
    if k.kind == "elf":
        check(k.load_addr <= k.entry < k.end, f"entry {k.entry:#x} outside the loaded image")
    check(mem.check_range(k.load_addr, k.end - k.load_addr) or k.kind == "elf",
          "kernel outside RAM")
    for lo, hi, name in VMM_RANGES:
        check(not (k.load_addr < hi and lo < k.end) or k.kind == "elf",
              f"kernel over the VMM's {name}")
    initrd = None
    if fdp.ConsumeBool():
        size = fdp.ConsumeIntInRange(1, 4096)
        write_file(INITRD, b"\x07" * size)
        try:
            initrd = load_initrd(mem, INITRD, k)
        except LoaderError:
            return
    try:
        setup_linux_boot(mem, k, Cmdline("console=ttyS0 panic=-1"), initrd,
                         0xE0000 if fdp.ConsumeBool() else None)
    except LoaderError:
        return


def cleanup() -> None:
    for p in (KERNEL, INITRD):
        if p.exists():
            os.unlink(p)
