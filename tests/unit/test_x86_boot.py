"""Long-mode boot state: GDT decode, page-table walk, control registers, MSRs."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from pyvirt.arch.x86_64 import msr
from pyvirt.arch.x86_64.boot import (
    BOOT_CS_SELECTOR,
    BOOT_DS_SELECTOR,
    BOOT_GDT,
    boot_cpu_state,
    decode_descriptor,
    encode_descriptor,
    setup_long_mode_memory,
)
from pyvirt.arch.x86_64.cpu_state import Segment
from pyvirt.arch.x86_64.layout import (
    BOOT_STACK_ADDR,
    GDT_ADDR,
    IDT_ADDR,
    PD_ADDR,
    PML4_ADDR,
    ZERO_PAGE_ADDR,
)
from pyvirt.memory import GuestMemory


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.create(2 << 20)
    m.write(PD_ADDR + 0x4000, b"\xAA" * 16)  # canary just past the fourth PD
    setup_long_mode_memory(m)
    yield m
    m.close()


def walk(mem: GuestMemory, vaddr: int) -> int | None:
    """Translate with 4-level paging (SDM Vol. 3A, 4.5); None if not present."""
    table = PML4_ADDR
    for shift in (39, 30, 21):
        entry = mem.read_u64(table + ((vaddr >> shift) & 0x1FF) * 8)
        if not entry & 1:
            return None
        assert entry & 2, "writable"
        addr = entry & 0x000F_FFFF_FFFF_F000
        if shift == 21:
            assert entry & 0x80, "2 MiB page expected"
            return (entry & 0x000F_FFFF_FFE0_0000) | (vaddr & 0x1F_FFFF)
        if shift == 30:
            assert not entry & 0x80, "no 1 GiB pages"
        table = addr
    raise AssertionError("unreachable")


@pytest.mark.parametrize("addr", [0, 0x1000, ZERO_PAGE_ADDR, 0x100_0000, 0x1234_5678,
                                  0xBFFF_FFFF, 0xC000_0000, 0xFEC0_0000, 0xFEE0_0000,
                                  0xFEE0_0FF0, 0xFFFF_FFFF])
def test_identity_map(mem: GuestMemory, addr: int) -> None:
    assert walk(mem, addr) == addr


@pytest.mark.parametrize("addr", [0x1_0000_0000, 0x1_4000_0000, 0x80_0000_0000])
def test_above_4g_unmapped(mem: GuestMemory, addr: int) -> None:
    assert walk(mem, addr) is None


def test_page_tables_stay_in_place(mem: GuestMemory) -> None:
    assert mem.read(PD_ADDR + 0x4000, 16) == b"\xAA" * 16


def test_gdt_descriptors(mem: GuestMemory) -> None:
    raw = struct.unpack("<4Q", mem.read(GDT_ADDR, 32))
    assert raw == BOOT_GDT
    assert raw[0] == 0 and raw[1] == 0
    code = decode_descriptor(raw[BOOT_CS_SELECTOR >> 3])
    assert (code.base, code.limit, code.type, code.dpl) == (0, 0xFFFFF, 0xB, 0)
    assert code.present and code.s and code.l and code.g and not code.db
    data = decode_descriptor(raw[BOOT_DS_SELECTOR >> 3])
    assert (data.base, data.limit, data.type, data.dpl) == (0, 0xFFFFF, 0x3, 0)
    assert data.present and data.s and data.db and data.g and not data.l
    assert raw[2] == 0x00AF9B000000FFFF and raw[3] == 0x00CF93000000FFFF
    assert GDT_ADDR + 32 <= IDT_ADDR
    assert mem.read(IDT_ADDR, 16) == bytes(16)


def test_descriptor_round_trip() -> None:
    seg = Segment(base=0x1234_5678, limit=0xABCDE, type=0x3, dpl=3, db=True, g=True, avl=True)
    assert decode_descriptor(encode_descriptor(seg)) == seg
    for raw in BOOT_GDT[2:]:
        assert encode_descriptor(decode_descriptor(raw)) == raw


def test_boot_cpu_state() -> None:
    st = boot_cpu_state(0x100_0200, ZERO_PAGE_ADDR)
    assert st.rip == 0x100_0200 and st.rsi == ZERO_PAGE_ADDR and st.rsp == BOOT_STACK_ADDR
    assert st.rflags == 0x2  # IF clear
    # CR0: PE, PG; NE/WP/MP/ET set; CD/NW clear
    assert st.cr0 & 1 and st.cr0 & (1 << 31)
    assert st.cr0 & (1 << 5) and st.cr0 & (1 << 16) and st.cr0 & (1 << 4)
    assert not st.cr0 & ((1 << 29) | (1 << 30))
    assert st.cr3 == PML4_ADDR
    assert st.cr4 & (1 << 5)
    assert not st.cr4 & (1 << 12)  # not LA57: 4-level paging
    assert st.efer & msr.EFER_LME and st.efer & msr.EFER_LMA
    assert not st.efer & (msr.EFER_SCE | msr.EFER_NXE)

    assert st.cs.selector == 0x10 and st.cs.l and not st.cs.db and st.cs.type == 0xB
    assert st.cs.present and st.cs.s and st.cs.g and st.cs.limit == 0xFFFFF
    for seg in (st.ds, st.es, st.fs, st.gs, st.ss):
        assert (seg.selector, seg.type, seg.limit, seg.base) == (0x18, 3, 0xFFFFF, 0)
        assert seg.present and seg.db and seg.g and seg.s and not seg.unusable
    assert (st.tr.type, st.tr.s, st.tr.present, st.tr.unusable) == (0xB, False, True, False)
    assert st.tr.selector & 4 == 0  # TI = 0
    assert st.tr.limit >= 0x67
    assert (st.gdt.base, st.gdt.limit) == (GDT_ADDR, 0x1F)
    assert (st.idt.base, st.idt.limit) == (IDT_ADDR, 0)


def test_boot_msrs() -> None:
    st = boot_cpu_state(0, 0)
    m = st.msrs
    assert m[msr.IA32_MTRR_DEF_TYPE] == 0xC06
    assert m[msr.IA32_MISC_ENABLE] & 1
    for index in (msr.IA32_SYSENTER_CS, msr.IA32_SYSENTER_ESP, msr.IA32_SYSENTER_EIP,
                  msr.IA32_STAR, msr.IA32_LSTAR, msr.IA32_CSTAR, msr.IA32_FMASK,
                  msr.IA32_KERNEL_GS_BASE):
        assert m[index] == 0
    fixed = [0x250, 0x258, 0x259, *range(0x268, 0x270)]
    assert all(m[i] == 0x0606060606060606 for i in fixed)
    assert msr.IA32_EFER not in m  # EFER travels in the special registers
    # each call hands out its own dict
    m[0x1234] = 1
    assert 0x1234 not in boot_cpu_state(0, 0).msrs
