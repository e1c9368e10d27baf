"""PCI configuration space and BARs: bus 0 (host bridge + a virtio-pci device) reached
through 0xCF8/0xCFC and the ECAM exactly as a guest would, with fuzzer-chosen
addresses, widths and values, BAR moves (32/64-bit halves, overlaps, decode
on/off) and accesses to wherever the BAR is mapped now (virtio common config,
ISR, device config, notify, MSI-X table and PBA).

Documented outcomes: all-ones for absent functions and bad widths, ignored
writes, a BAR that is not decoded where it cannot be. Invariants: a decoded BAR
is on the MMIO bus at the address its registers say; the bus never holds two
overlapping ranges; reads fill exactly the access width."""

from __future__ import annotations

from itertools import pairwise

from fuzz.common import NullVm, Provider, check, guest_memory
from pyvirt.arch.x86_64 import layout
from pyvirt.devices.bus import Bus
from pyvirt.eventloop import EventLoop
from pyvirt.pci.device import BAR0
from pyvirt.pci.root import CONFIG_ADDRESS_PORT, CONFIG_DATA_PORT, attach_pci_root
from pyvirt.virtio.pci import VirtioPciDevice
from pyvirt.virtio.rng import RngDevice

MAX_LEN = 2048
_mem = guest_memory()
_loop = EventLoop("fuzz")  # never run: a device the input drives to DRIVER_OK registers here
_ECAM = layout.PCI_ECAM_ADDR


def _config_address(fdp: Provider, slot: int) -> int:
    kind = fdp.ConsumeIntInRange(0, 7)
    if kind == 0:
        return fdp.ConsumeUInt(4)
    s = (0, slot, fdp.ConsumeIntInRange(0, 31))[fdp.ConsumeIntInRange(0, 2)]
    reg = fdp.ConsumeIntInRange(0, 255)
    return 0x8000_0000 | s << 11 | (fdp.ConsumeIntInRange(0, 7) if kind == 1 else 0) << 8 | reg


def _bar_value(fdp: Provider, root_window: tuple[int, int]) -> int:
    kind = fdp.ConsumeIntInRange(0, 3)
    if kind == 0:
        return fdp.ConsumeUInt(4)
    if kind == 1:
        return 0xFFFF_FFFF  # sizing
    base = (layout.PCI_MMIO32_START, root_window[0], 0, _ECAM)[fdp.ConsumeIntInRange(0, 3)]
    addr = base + 0x8000 * fdp.ConsumeIntInRange(0, 64)
    return addr & 0xFFFF_FFFF if fdp.ConsumeBool() else addr >> 32


def one_input(data: bytes) -> None:
    fdp = Provider(data)
    pio, mmio = Bus("pio"), Bus("mmio")
    vm = NullVm(_mem)
    root = attach_pci_root(pio, mmio, vm.irq_line, _mem.end)
    dev = VirtioPciDevice(RngDevice(), vm=vm, memory=_mem,  # type: ignore[arg-type]
                          intx=vm.irq_line(16), loop=_loop)
    slot = root.add(None, dev)
    buf = bytearray(8)
    try:
        while fdp.remaining_bytes():
            op = fdp.ConsumeIntInRange(0, 7)
            width = (1, 2, 4, 8, 3)[fdp.ConsumeIntInRange(0, 4)]
            write = fdp.ConsumeBool()
            view = memoryview(buf)[:width]
            if op == 0:  # CONFIG_ADDRESS
                view[:] = _config_address(fdp, slot).to_bytes(8, "little")[:width] \
                    if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeBytes(width).ljust(width, b"\0")
                off = 0 if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 3)
                (pio.write if write else pio.read)(CONFIG_ADDRESS_PORT + off, view)
            elif op in (1, 2):  # CONFIG_DATA
                off = fdp.ConsumeIntInRange(0, 3)
                if write:
                    view[:] = fdp.ConsumeBytes(width).ljust(width, b"\0")
                    pio.write(CONFIG_DATA_PORT + off, view)
                else:
                    pio.read(CONFIG_DATA_PORT + off, view)
            elif op in (3, 4):  # ECAM, often a BAR or the command register of our slot
                s = slot if fdp.ConsumeIntInRange(0, 3) else fdp.ConsumeIntInRange(0, 255)
                reg = (BAR0 + 4 * fdp.ConsumeIntInRange(0, 5), 0x04, fdp.ConsumeIntInRange(
                    0, 0xFFF))[fdp.ConsumeIntInRange(0, 2)]
                addr = _ECAM + (s << 15) + reg
                if write:
                    value = _bar_value(fdp, root.mmio64_window) if reg >= BAR0 and reg < BAR0 + 24 \
                        else fdp.ConsumeUInt(4)
                    view[:] = value.to_bytes(8, "little")[:width]
                    mmio.write(addr, view)
                else:
                    mmio.read(addr, view)
            else:  # BAR0 wherever it is now, or anywhere
                at = dev.bar.mapped_at
                if at is not None and fdp.ConsumeIntInRange(0, 7):
                    addr = at + fdp.ConsumeIntInRange(0, 0x8000 + 8)
                else:
                    addr = fdp.ConsumeUInt(8)
                if write:
                    view[:] = fdp.ConsumeBytes(width).ljust(width, b"\0")
                    mmio.write(addr, view)
                else:
                    mmio.read(addr, view)
            check(len(view) == width, "access width changed")
            for bar in dev.bars.values():
                if bar.mapped_at is not None:
                    found = mmio.lookup(bar.mapped_at)
                    check(found is not None and found[0] is bar.region and found[1] == 0,
                          f"BAR{bar.index} not on the bus at {bar.mapped_at:#x}")
                    check(bar.mapped_at == dev.bar_address(bar), "BAR mapped off its register")
        ranges = mmio._ranges
        for a, b in pairwise(ranges):
            check(a.base + a.length <= b.base, "overlapping MMIO ranges")
    finally:
        dev.close()
