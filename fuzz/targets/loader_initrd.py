"""Placing an initrd (``load_initrd``) for a fuzzer-chosen kernel (end, reserved end,
initrd_addr_max) and a fuzzer-chosen initrd file, from empty to far larger than
RAM (sparse files, so a huge one costs no disk).

Documented outcome: ``LoaderError`` (empty, does not fit). Invariants: a placed
initrd is page-aligned, in the low RAM region, above the kernel's reserved end,
at or below initrd_addr_max; placing it must not read more of the file than
fits in RAM (bounded memory)."""

from __future__ import annotations

from pathlib import Path

from fuzz.common import Provider, check
from fuzz.loading import INITRD, RAM, memory, write_file
from pyvirt.arch.x86_64 import layout
from pyvirt.loader import KernelImage, LoaderError, load_initrd

MAX_LEN = 512
#: check the process RSS after every input: one huge read is the finding here
RSS_EVERY = 1
#: an initrd that fits is at most 64 MiB: reading more is the defect
RSS_LIMIT_MB = 512


def one_input(data: bytes) -> None:
    fdp = Provider(data)
    mem = memory()
    end = layout.KERNEL_LOAD_ADDR + fdp.ConsumeIntInRange(0, RAM) if fdp.ConsumeIntInRange(
        0, 7) else fdp.ConsumeUInt(8)
    kernel = KernelImage(
        kind="elf", entry=layout.KERNEL_LOAD_ADDR, load_addr=layout.KERNEL_LOAD_ADDR, end=end,
        setup_header=None, protocol_version=0x20F,
        initrd_addr_max=fdp.ConsumeUInt(4) if fdp.ConsumeBool() else 0x7FFF_FFFF,
        cmdline_size=2047, pvh_entry=None, source=Path("vmlinux"),
        reserved_end=end + fdp.ConsumeIntInRange(0, 1 << 24))
    k = fdp.ConsumeIntInRange(0, 3)
    size = (fdp.ConsumeIntInRange(0, 8192), fdp.ConsumeIntInRange(0, RAM),
            fdp.ConsumeIntInRange(0, 1 << 30), RAM + fdp.ConsumeIntInRange(-4096, 4096))[k]
    write_file(INITRD, fdp.ConsumeBytes(64), max(size, 0))
    try:
        addr, n = load_initrd(mem, INITRD, kernel)
    except LoaderError:
        return
    check(addr % 0x1000 == 0, "initrd not page-aligned")
    check(mem.check_range(addr, n) and addr + n <= mem.regions[0].end, "initrd outside low RAM")
    check(addr >= max(kernel.end, kernel.reserved_end), "initrd over the kernel")
    check(addr + n - 1 <= kernel.initrd_addr_max, "initrd above initrd_addr_max")
