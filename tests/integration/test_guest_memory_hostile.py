"""A hostile guest against the VMM's memory (issue #17, items 1 and 2), on the
real Linux guest under the software CPU.

* Unmapped guest-physical memory (above RAM, in the 64-bit PCI window but
  outside any BAR, just below the CPU's physical address width) reads as
  all-ones and drops writes, as on a PC: the VM keeps running and powers off
  with status 0. Addresses at or beyond the width are refused by Linux itself.
* Sweeping many distinct unclaimed MMIO addresses (``dd`` from /dev/mem over
  the PCI 32-bit window above the BARs) does not grow the VMM's RSS: the bus
  keeps bounded diagnostics, not one entry per address.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirt.guest import READY_LINE, GuestImage
from tests.integration.test_emu_boot import EmuVm, image, marker

pytest.importorskip("unicorn")

from pyvirt.hypervisor.emulated import engine
from pyvirt.hypervisor.emulated.backend import PHYS_ADDR_BITS

pytestmark = [
    pytest.mark.guest,
    pytest.mark.slow,
    pytest.mark.skipif(not engine.available(), reason="unicorn lacks pyvirt's patches"),
]

__all__ = ["image"]  # fixture re-exported for pytest

READY = READY_LINE.encode()


@pytest.fixture
def vm(image: GuestImage, request: pytest.FixtureRequest) -> Iterator[EmuVm]:
    memory = getattr(request, "param", "512M")
    v = EmuVm("--memory", memory)
    try:
        v.wait_for(READY)
        yield v
    finally:
        v.close()


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"^VmRSS:\s+(\d+) kB$", status, re.M)
    assert m, status
    return int(m.group(1))


def test_unmapped_physical_memory_reads_all_ones(vm: EmuVm) -> None:
    top = (1 << PHYS_ADDR_BITS) - 0x1000  # the last page below the width
    probes = {
        "ABOVE": 0x1_0000_0000,  # 512 MiB of RAM: nothing at 4 GiB
        "WIN64": 0xF_0000_0000,  # in the 64-bit PCI window, far from the BARs
        "TOP": top,
        "HOLE": 0xEFFF_F000,  # below 4 GiB, between the ECAM and the IOAPIC
    }
    for name, addr in probes.items():
        vm.send(f"devmem {addr:#x} 32 0x12345678; echo {marker(name)}$(devmem {addr:#x} 32)")
    vm.send(f"echo {marker('WIDE')}$(devmem {probes['ABOVE'] + 8:#x} 64)")
    vm.send(f"devmem {1 << PHYS_ADDR_BITS:#x} 32; echo {marker('BEYOND')}$?")
    text = vm.output_then_poweroff()
    for name in probes:
        got = re.search(rf"^{name}=(\S+)$", text, re.M)
        assert got and got.group(1) == "0xFFFFFFFF", (name, text[-2000:])
    wide = re.search(r"^WIDE=(\S+)$", text, re.M)
    assert wide and wide.group(1) == "0xFFFFFFFFFFFFFFFF", text[-2000:]
    # beyond the width: Linux refuses the mapping (devmem fails), nothing reaches the VMM
    beyond = re.search(r"^BEYOND=(\d+)$", text, re.M)
    assert beyond and beyond.group(1) != "0", text[-2000:]
    assert "guest crashed" not in vm.text and "UNMAPPED" not in vm.text


# Linux reads /dev/mem only below the end of RAM (valid_phys_addr_range): with
# 4 GiB the PCI hole (RAM resumes at 4 GiB) is inside.
@pytest.mark.parametrize("vm", ["4G"], indirect=True)
def test_sweeping_unclaimed_mmio_does_not_grow_the_vmm(vm: EmuVm) -> None:
    # 0xD000_0000: the PCI 32-bit window, far above the BARs (placed from 0xC000_0000)
    sweep = "dd if=/dev/mem of=/dev/null bs=4096 skip=$((0xd0000 + {skip})) count={count} 2>&1"
    vm.send(sweep.format(skip=0, count=16))  # warm-up: first-time allocations
    vm.send(f"echo {marker('WARM')}ok")
    vm.wait_for(b"WARM=ok", timeout=60)
    before = rss_kib(vm.proc.pid)
    vm.send(sweep.format(skip=16, count=1024))  # 4 MiB: ~1M distinct MMIO reads
    vm.send(f"echo {marker('SWEPT')}$?")
    vm.wait_for(b"SWEPT=0", timeout=120)  # dd succeeded
    grown = rss_kib(vm.proc.pid) - before
    text = vm.output_then_poweroff()
    assert "1024+0 records in" in text, text[-2000:]
    assert grown < 16 << 10, f"the VMM grew by {grown} KiB sweeping 4 MiB of unclaimed MMIO"
