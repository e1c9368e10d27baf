from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvirt.memory import PCI_HOLE_END, PCI_HOLE_START, GuestMemory, GuestMemoryError


def test_small_guest_is_one_region() -> None:
    mem = GuestMemory.create(64 << 20)
    assert [(r.guest_addr, r.size) for r in mem] == [(0, 64 << 20)]
    assert mem.size == 64 << 20 and mem.end == 64 << 20


def test_large_guest_skips_pci_hole() -> None:
    mem = GuestMemory.create(PCI_HOLE_START + (1 << 30))
    assert [(r.guest_addr, r.size) for r in mem] == [
        (0, PCI_HOLE_START), (PCI_HOLE_END, 1 << 30)]
    assert not mem.check_range(PCI_HOLE_START, 1)
    assert mem.check_range(PCI_HOLE_END, 4096)
    mem.write_u64(PCI_HOLE_END + 8, 0x1122334455667788)
    assert mem.read_u64(PCI_HOLE_END + 8) == 0x1122334455667788
    mem.close()


def test_typed_accessors_roundtrip() -> None:
    mem = GuestMemory.create(1 << 20)
    mem.write_u8(0, 0x1FF)
    mem.write_u16(2, 0xBEEF)
    mem.write_u32(4, 0xDEADBEEF)
    mem.write(16, b"hello")
    assert (mem.read_u8(0), mem.read_u16(2), mem.read_u32(4)) == (0xFF, 0xBEEF, 0xDEADBEEF)
    assert mem.read(16, 5) == b"hello"
    v = mem.view(16, 5)
    v[0] = ord("j")
    assert mem.read(16, 5) == b"jello"


@pytest.mark.parametrize("addr,length", [(-1, 1), ((1 << 20) - 3, 4), (1 << 20, 1), (0, -1),
                                         (1 << 62, 8)])
def test_out_of_range_is_refused(addr: int, length: int) -> None:
    mem = GuestMemory.create(1 << 20)
    with pytest.raises(GuestMemoryError):
        mem.view(addr, length)
    assert not mem.check_range(addr, length)


@given(st.integers(min_value=-(1 << 64), max_value=1 << 64), st.integers(0, 1 << 21))
def test_hostile_ranges_never_escape(addr: int, length: int) -> None:
    mem = GuestMemory.create(1 << 20)
    try:
        v = mem.view(addr, length)
    except GuestMemoryError:
        return
    assert addr >= 0 and addr + length <= 1 << 20 and len(v) == length


def test_bad_sizes() -> None:
    for size in (0, -4096, 4097):
        with pytest.raises(ValueError):
            GuestMemory.create(size)
