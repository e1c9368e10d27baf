"""Long-mode boot state: GDT, empty IDT, identity page tables, vCPU registers.

This is the state the Linux x86-64 "64-bit Boot Protocol" asks for
(Documentation/arch/x86/boot.rst): long mode with paging, an identity map
covering the kernel, boot_params, command line and initrd, a GDT with 4 GiB
flat ``__BOOT_CS`` (0x10, execute/read) and ``__BOOT_DS`` (0x18, read/write)
descriptors, CS = 0x10, DS/ES/SS = 0x18, interrupts disabled, RSI = boot_params.
Small ELF64 test guests are entered the same way.

GDT at GDT_ADDR (0x500), 4 entries, GDTR.limit = 0x1F::

    0x00  null
    0x08  null (unused; keeps the Linux __BOOT_CS/__BOOT_DS selector numbers)
    0x10  64-bit code: base 0, limit 0xFFFFF, G=1, L=1, P=1, DPL 0, type 0xB
    0x18  data:        base 0, limit 0xFFFFF, G=1, D/B=1, P=1, DPL 0, type 0x3

A 64-bit TSS descriptor is 16 bytes and layout.py leaves only 32 bytes between
GDT_ADDR and IDT_ADDR, so the TSS has no GDT entry: TR is loaded only through
its hidden part (selector 0, busy 64-bit TSS, base 0, limit 0x67), which is all
VM entry checks (SDM Vol. 3C, 27.3.1.2: TR usable, type 11 in IA-32e mode,
S = 0, present, TI = 0). Nothing reads the TSS until the guest loads its own
TR; Linux does so while setting up its per-CPU GDT.

The IDT is empty (IDTR = IDT_ADDR, limit 0): any exception before the guest
installs its own IDT escalates to a triple fault (a KVM shutdown exit), which
is the clearest failure for a broken guest.

Page tables: PML4 (PML4_ADDR) -> PDPT (PDPT_ADDR) -> 4 page directories
(PD_ADDR..+0x3FFF) of 2 MiB pages identity-mapping 0-4 GiB, the 3-4 GiB MMIO
hole (IOAPIC, LAPIC) included. Nothing at or above 4 GiB is mapped; Linux
builds its own page tables before touching memory there.
"""

from __future__ import annotations

import struct

from pyvirt.arch.x86_64.cpu_state import CpuState, DescriptorTable, Segment
from pyvirt.arch.x86_64.layout import (
    BOOT_STACK_ADDR,
    GDT_ADDR,
    IDT_ADDR,
    PD_ADDR,
    PDPT_ADDR,
    PML4_ADDR,
)
from pyvirt.arch.x86_64.msr import EFER_LMA, EFER_LME, boot_msrs
from pyvirt.memory import GuestMemory

__all__ = [
    "BOOT_CS_SELECTOR",
    "BOOT_DS_SELECTOR",
    "BOOT_GDT",
    "boot_cpu_state",
    "decode_descriptor",
    "encode_descriptor",
    "setup_long_mode_memory",
]

BOOT_CS_SELECTOR = 0x10
BOOT_DS_SELECTOR = 0x18

#: The boot GDT as raw descriptors (Intel SDM Vol. 3A, 3.4.5).
BOOT_GDT: tuple[int, ...] = (
    0,
    0,
    0x00AF_9B00_0000_FFFF,  # 0x10 code64
    0x00CF_9300_0000_FFFF,  # 0x18 data
)
GDT_LIMIT = len(BOOT_GDT) * 8 - 1
IDT_LIMIT = 0  # empty

# CR0 (SDM Vol. 3A, 2.5). PE and PG are what long mode requires; ET is
# hardwired to 1 on modern CPUs; NE selects native x87 error reporting (there
# is no FERR#/IGNNE# wiring to emulate); MP pairs with NE; WP makes supervisor
# writes honour read-only pages. Linux's startup_64 rewrites CR0 itself to
# exactly this set plus AM; CD/NW from the reset value are cleared so the
# guest runs with caches enabled.
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
BOOT_CR0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG

# CR4: PAE is required for long mode. OSFXSR/OSXMMEXCPT let a test guest
# compiled for x86-64 use SSE (compilers emit it freely) before it sets CR4 up;
# Linux overwrites CR4 early in startup_64.
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
BOOT_CR4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT

# EFER: LME enables IA-32e mode, LMA is what the CPU reports once paging is on
# (KVM wants both set when entering a vCPU directly in long mode). SCE/NXE are
# left to the guest.
BOOT_EFER = EFER_LME | EFER_LMA

# Paging-structure entry bits (SDM Vol. 3A, 4.5).
PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_PAGE_SIZE = 1 << 7  # in a PDE: maps a 2 MiB page
PAGE_SIZE = 0x1000
LARGE_PAGE_SIZE = 2 << 20
IDENTITY_MAP_END = 4 << 30  # first byte not mapped
NUM_PDS = IDENTITY_MAP_END >> 30  # each PD maps 1 GiB

TSS_LIMIT = 0x67  # 104-byte 64-bit TSS, no I/O permission bitmap
TSS_TYPE_BUSY_64 = 0xB


def encode_descriptor(seg: Segment) -> int:
    """A code/data segment descriptor for ``seg`` (SDM Vol. 3A, Figure 3-8).

    ``seg.limit`` is the raw 20-bit descriptor limit (in 4 KiB units when
    ``seg.g``), as in ``cpu_state.Segment``.
    """
    if seg.limit > 0xFFFFF or seg.base > 0xFFFF_FFFF:
        raise ValueError("segment base/limit do not fit an 8-byte descriptor")
    access = (seg.type & 0xF) | (int(seg.s) << 4) | ((seg.dpl & 3) << 5) | (int(seg.present) << 7)
    flags = int(seg.avl) | (int(seg.l) << 1) | (int(seg.db) << 2) | (int(seg.g) << 3)
    return ((seg.limit & 0xFFFF) | ((seg.base & 0xFF_FFFF) << 16) | (access << 40)
            | (((seg.limit >> 16) & 0xF) << 48) | (flags << 52)
            | (((seg.base >> 24) & 0xFF) << 56))


def decode_descriptor(raw: int, selector: int = 0) -> Segment:
    """The inverse of ``encode_descriptor`` (8-byte code/data descriptors)."""
    access = (raw >> 40) & 0xFF
    flags = (raw >> 52) & 0xF
    return Segment(
        base=((raw >> 16) & 0xFF_FFFF) | (((raw >> 56) & 0xFF) << 24),
        limit=(raw & 0xFFFF) | (((raw >> 48) & 0xF) << 16),
        selector=selector,
        type=access & 0xF,
        s=bool(access & 0x10),
        dpl=(access >> 5) & 3,
        present=bool(access & 0x80),
        avl=bool(flags & 1),
        l=bool(flags & 2),
        db=bool(flags & 4),
        g=bool(flags & 8),
    )


def setup_long_mode_memory(mem: GuestMemory) -> None:
    """Write the boot GDT, the empty IDT and the 0-4 GiB identity map."""
    if GDT_ADDR + len(BOOT_GDT) * 8 > IDT_ADDR:
        raise AssertionError("boot GDT overlaps the IDT; fix layout.py")
    mem.write(GDT_ADDR, struct.pack(f"<{len(BOOT_GDT)}Q", *BOOT_GDT))
    mem.write(IDT_ADDR, bytes(16))  # one not-present gate's worth of zeros

    pml4 = bytearray(PAGE_SIZE)
    struct.pack_into("<Q", pml4, 0, PDPT_ADDR | PTE_PRESENT | PTE_WRITABLE)
    mem.write(PML4_ADDR, pml4)

    pdpt = bytearray(PAGE_SIZE)
    for i in range(NUM_PDS):
        struct.pack_into("<Q", pdpt, i * 8, (PD_ADDR + i * PAGE_SIZE) | PTE_PRESENT | PTE_WRITABLE)
    mem.write(PDPT_ADDR, pdpt)

    entries_per_pd = PAGE_SIZE // 8
    for i in range(NUM_PDS):
        base = i << 30
        pd = struct.pack(f"<{entries_per_pd}Q", *(
            (base + j * LARGE_PAGE_SIZE) | PTE_PRESENT | PTE_WRITABLE | PTE_PAGE_SIZE
            for j in range(entries_per_pd)))
        mem.write(PD_ADDR + i * PAGE_SIZE, pd)


def boot_cpu_state(entry: int, boot_params: int) -> CpuState:
    """Registers for the boot vCPU entering a 64-bit kernel at ``entry``."""
    code = decode_descriptor(BOOT_GDT[BOOT_CS_SELECTOR >> 3], BOOT_CS_SELECTOR)
    data_desc = BOOT_GDT[BOOT_DS_SELECTOR >> 3]
    return CpuState(
        rip=entry,
        rsi=boot_params,  # boot.rst: %rsi holds the base address of struct boot_params
        rsp=BOOT_STACK_ADDR,
        rflags=0x2,  # bit 1 is reserved-as-1; IF = 0
        cs=code,
        ds=decode_descriptor(data_desc, BOOT_DS_SELECTOR),
        es=decode_descriptor(data_desc, BOOT_DS_SELECTOR),
        fs=decode_descriptor(data_desc, BOOT_DS_SELECTOR),
        gs=decode_descriptor(data_desc, BOOT_DS_SELECTOR),
        ss=decode_descriptor(data_desc, BOOT_DS_SELECTOR),
        tr=Segment(base=0, limit=TSS_LIMIT, selector=0, type=TSS_TYPE_BUSY_64,
                   present=True, s=False),
        gdt=DescriptorTable(GDT_ADDR, GDT_LIMIT),
        idt=DescriptorTable(IDT_ADDR, IDT_LIMIT),
        cr0=BOOT_CR0,
        cr3=PML4_ADDR,
        cr4=BOOT_CR4,
        efer=BOOT_EFER,
        msrs=boot_msrs(),
    )
