"""The x86-64 guest-physical memory map, shared by both CPU backends.

    0x0000_0000  real-mode IVT / BDA (left zero)
    0x0000_0500  GDT                (GDT_ADDR)
    0x0000_0520  IDT (empty)        (IDT_ADDR)
    0x0000_7000  boot_params "zero page" (ZERO_PAGE_ADDR)
    0x0000_8ff0  initial stack top  (BOOT_STACK_ADDR)
    0x0000_9000  PML4, 0xa000 PDPT, 0xb000.. PDs (identity map of 0..4 GiB+)
    0x0002_0000  kernel command line (CMDLINE_ADDR, CMDLINE_MAX bytes)
    0x0009_fc00  EBDA start: end of low usable RAM
    0x000e_0000  ACPI tables (RSDP found by the kernel's BIOS-area scan too)
    0x0010_0000  high memory (usable)
    0x0100_0000  kernel load address (16 MiB, the x86-64 LOAD_PHYSICAL_ADDR)
    ...          initrd: page-aligned, as high as allowed below min(RAM end, initrd_addr_max)
    0xc000_0000  PCI hole: the 32-bit PCI MMIO window (RAM above this moves to 4 GiB+)
    0xe000_0000  PCI ECAM, bus 0 only (1 MiB; MCFG; reserved in e820)
    0xfec0_0000  IOAPIC
    0xfee0_0000  LAPIC
    max(32 GiB, RAM end) .. +32 GiB: the 64-bit PCI MMIO window (``pci_mmio64_window``)
"""

from __future__ import annotations

GDT_ADDR = 0x500
IDT_ADDR = 0x520
ZERO_PAGE_ADDR = 0x7000
BOOT_STACK_ADDR = 0x8FF0
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000  # four page directories: 0xb000..0xefff map 0..4 GiB with 2 MiB pages
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000  # bytes, including the terminating NUL
EBDA_START = 0x9FC00
ACPI_TABLES_ADDR = 0xE0000
ACPI_TABLES_END = 0x100000
HIGH_MEMORY_START = 0x100000
KERNEL_LOAD_ADDR = 0x100_0000
MMIO_32_START = 0xC000_0000
PCI_MMIO32_START = MMIO_32_START
PCI_MMIO32_END = 0xE000_0000
PCI_ECAM_ADDR = 0xE000_0000
PCI_ECAM_SIZE = 1 << 20  # bus 0 only: 32 devices x 8 functions x 4 KiB
PCI_MMIO64_MIN_START = 32 << 30
PCI_MMIO64_SIZE = 32 << 30
PCI_INTX_GSI_BASE = 16  # INTx lines of PCI slots use IOAPIC pins 16-23
PCI_INTX_GSI_COUNT = 8
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000
ACPI_PM_BASE = 0x600  # PM1a event block (4 bytes), control block at +4, timer at +8
ACPI_PM_LEN = 0x10
RESET_PORT = 0xCF9  # FADT RESET_REG (I/O) writes 0x06 here to reboot
COM1_PORT = 0x3F8
COM1_IRQ = 4
SCI_IRQ = 9
# SLP_TYP value in the DSDT's \_S5 package; writing it with SLP_EN to PM1a_CNT powers off
ACPI_S5_SLP_TYP = 5
ACPI_PM_TMR_HZ = 3_579_545


def pci_mmio64_window(ram_end: int) -> tuple[int, int]:
    """(start, size) of the 64-bit PCI MMIO window: above RAM, 1 GiB aligned."""
    gib = 1 << 30
    start = max(PCI_MMIO64_MIN_START, (ram_end + gib - 1) // gib * gib)
    return start, PCI_MMIO64_SIZE
