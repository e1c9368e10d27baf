"""Loading an ELF64 vmlinux (``load_kernel`` → ``parse_elf``, ``load_elf_segments``),
then the command line and zero page (``setup_linux_boot``), for fuzzer-made ELF
files (headers, program headers, PVH notes, segment placement) in 64 MiB of RAM.

Documented outcome: ``LoaderError`` (a ``UserInputError``) naming the file and
the problem. Invariants: a loaded kernel lies in RAM, clear of the VMM's own
ranges, and its entry is inside what was loaded."""

from __future__ import annotations

from fuzz.common import Provider
from fuzz.kernels import elf
from fuzz.loading import boot

MAX_LEN = 8192


def one_input(data: bytes) -> None:
    fdp = Provider(data)
    blob = elf(fdp) if fdp.ConsumeIntInRange(0, 15) else fdp.ConsumeBytes(MAX_LEN)
    boot(fdp, blob)
