"""Linux kernel loading for x86-64: bzImage / ELF vmlinux, initrd, command line, zero page.

Follows the Linux x86 boot protocol (Documentation/arch/x86/boot.rst), 64-bit
entry: the VMM enters ``KernelImage.entry`` in long mode with identity-mapped
paging and RSI = the zero page address returned by ``setup_linux_boot``.
"""

from __future__ import annotations

from pyvirt.loader.bootparams import (
    E820_ACPI,
    E820_RAM,
    E820_RESERVED,
    E820Entry,
    build_boot_params,
    e820_map,
    setup_linux_boot,
)
from pyvirt.loader.cmdline import Cmdline
from pyvirt.loader.errors import LoaderError
from pyvirt.loader.kernel import KernelImage, load_initrd, load_kernel

__all__ = [
    "E820_ACPI",
    "E820_RAM",
    "E820_RESERVED",
    "Cmdline",
    "E820Entry",
    "KernelImage",
    "LoaderError",
    "build_boot_params",
    "e820_map",
    "load_initrd",
    "load_kernel",
    "setup_linux_boot",
]
