"""PCI bus 0: the host bridge, both configuration mechanisms, BAR placement
and decoding, and INTx routing.

- Configuration mechanism #1 (PCI Local Bus 3.0, 3.2.2.3.2): a dword address
  register at 0xCF8 (bit 31 enable, bus/device/function/register) and a data
  window at 0xCFC-0xCFF. 0xCF9 stays the reset control register: the address
  register is inserted as a one-byte range that takes dword accesses.
- ECAM (PCI Express 4.0, 7.2.2): 4 KiB of extended configuration space per
  function at ``PCI_ECAM_ADDR``, announced by MCFG (``pyvirt.pci.acpi``).
- BARs: placed at build time as firmware would (32-bit BARs in the 32-bit
  window below 4 GiB, 64-bit BARs in the window above RAM), then decoded on the
  MMIO bus only while the command register enables it; a guest that moves a
  BAR moves its mapping.
- INTx: slot ``s`` pin INTA..INTD goes to IOAPIC GSI 16 + (s + pin) % 8, which
  the DSDT's ``_PRT`` tells the guest.

Only function 0 of each of the 32 device slots is populated.

A BAR that cannot be decoded where the guest put it (it overlaps another
range) is tried again whenever a mapping leaves the bus, so a guest (or a
restore) that swaps two BARs through an overlapping step ends with both
decoded, as on hardware.

Saved state (``PciRootState``): the host bridge's configuration space and the
CONFIG_ADDRESS register. Each plugged function saves its own (``PciDevice.
save_pci_state`` from its ``save_state``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from pyvirt.arch.x86_64 import layout
from pyvirt.devices.bus import Bus, BusOverlapError
from pyvirt.devices.irq import IrqLine
from pyvirt.devices.statecheck import check_bits
from pyvirt.pci.device import CMD_IO, CMD_MEMORY, Bar, BarKind, PciDevice, PciState
from pyvirt.state import check_version

__all__ = ["BarAllocator", "ConfigAddressPort", "ConfigDataPort", "Ecam", "HostBridge",
           "PciRoot", "PciRootState", "intx_gsi"]

log = logging.getLogger(__name__)

NUM_SLOTS = 32
CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_DATA_PORT = 0xCFC
_CONFIG_ADDRESS_MASK = 0x80FF_FFFC  # enable, bus, device, function, dword register

# The host bridge's identity: Red Hat's "QEMU PCIe Host bridge" IDs are the
# ones guests know for a generic virtual bridge; class 06/00/00 (host bridge).
HOST_BRIDGE_VENDOR = 0x1B36
HOST_BRIDGE_DEVICE = 0x0008
CLASS_HOST_BRIDGE = 0x060000


def intx_gsi(slot: int, pin: int) -> int:
    """The GSI of INTA..INTD (pin 0..3) of device ``slot``: the _PRT swizzle."""
    return layout.PCI_INTX_GSI_BASE + (slot + pin) % layout.PCI_INTX_GSI_COUNT


class HostBridge(PciDevice):
    def __init__(self) -> None:
        super().__init__(vendor_id=HOST_BRIDGE_VENDOR, device_id=HOST_BRIDGE_DEVICE,
                         class_code=CLASS_HOST_BRIDGE, name="host-bridge")
        self.set_wmask(0x04, 2, 0)  # nothing to enable on the bridge itself


@dataclass
class _Window:
    start: int
    end: int
    next: int


class BarAllocator:
    """Naturally aligned bump allocation in a 32-bit and a 64-bit window."""

    def __init__(self, mmio32: tuple[int, int], mmio64: tuple[int, int]) -> None:
        self.mmio32 = _Window(mmio32[0], mmio32[1], mmio32[0])
        self.mmio64 = _Window(mmio64[0], mmio64[1], mmio64[0])

    def allocate(self, size: int, *, high: bool) -> int:
        windows = [self.mmio64, self.mmio32] if high else [self.mmio32]
        for w in windows:
            addr = (w.next + size - 1) // size * size
            if addr + size <= w.end:
                w.next = addr + size
                return addr
        raise ValueError(f"no room for a {size:#x}-byte BAR in the PCI windows")


@dataclass(frozen=True)
class PciRootState:
    version: int
    host_bridge: PciState
    config_address: int  # the 0xCF8 register


class PciRoot:
    STATE_VERSION: ClassVar[int] = 1
    state_type: ClassVar[type] = PciRootState

    def __init__(self, mmio: Bus, irq_line: Callable[[int], IrqLine], ram_end: int) -> None:
        self.mmio = mmio
        self._irq_line = irq_line
        self.slots: list[PciDevice | None] = [None] * NUM_SLOTS
        #: 0xCF8, put on the port bus by ``attach_pci_root``
        self.config_address = ConfigAddressPort()
        self.mmio64_window = layout.pci_mmio64_window(ram_end)
        start64, size64 = self.mmio64_window
        self.allocator = BarAllocator((layout.PCI_MMIO32_START, layout.PCI_MMIO32_END),
                                      (start64, start64 + size64))
        self._map_lock = threading.Lock()
        self.add(0, HostBridge())

    def add(self, slot: int | None, dev: PciDevice) -> int:
        """Plug ``dev`` into ``slot`` (the first free one if None), place its BARs."""
        if slot is None:
            free = [s for s in range(1, NUM_SLOTS) if self.slots[s] is None]
            if not free:
                raise ValueError("all 31 PCI slots are in use")
            slot = free[0]
        if not 0 <= slot < NUM_SLOTS or self.slots[slot] is not None:
            raise ValueError(f"PCI slot {slot} is not free")
        self.slots[slot] = dev
        # place the largest BARs first so natural alignment wastes least
        for bar in sorted(dev.bars.values(), key=lambda b: -b.size):
            if bar.kind is BarKind.IO:
                raise ValueError("I/O BARs are not supported")
            dev.set_bar_address(bar.index, self.allocator.allocate(
                bar.size, high=bar.kind is BarKind.MEM64))
        if dev.bars:
            dev.put(0x04, 2, dev.command | CMD_MEMORY)  # decoding on, as firmware leaves it
        dev.on_decode_change = self._update_decoding
        self._update_decoding(dev)
        return slot

    def intx_line(self, slot: int, pin: int = 0) -> IrqLine:
        return self._irq_line(intx_gsi(slot, pin))

    def device(self, bus: int, slot: int, function: int) -> PciDevice | None:
        if bus != 0 or function != 0 or not 0 <= slot < NUM_SLOTS:
            return None
        return self.slots[slot]

    def config_read(self, bus: int, slot: int, function: int, reg: int, size: int) -> int:
        dev = self.device(bus, slot, function)
        if dev is None:
            return (1 << (8 * size)) - 1
        return dev.config_read(reg, size)

    def config_write(self, bus: int, slot: int, function: int, reg: int, size: int,
                     value: int) -> None:
        dev = self.device(bus, slot, function)
        if dev is not None:
            dev.config_write(reg, size, value)

    # ---- saved state (the VM is paused)

    def save_state(self) -> PciRootState:
        bridge = self.slots[0]
        assert bridge is not None
        return PciRootState(version=self.STATE_VERSION, host_bridge=bridge.save_pci_state(),
                            config_address=self.config_address.value)

    def restore_state(self, state: PciRootState) -> None:
        check_version("pci", state.version, self.STATE_VERSION)
        value = check_bits("pci", "config_address", state.config_address,
                           _CONFIG_ADDRESS_MASK)
        bridge = self.slots[0]
        assert bridge is not None
        bridge.restore_pci_state(state.host_bridge)
        self.config_address.value = value

    # ---- BAR decoding

    def _update_decoding(self, dev: PciDevice) -> None:
        with self._map_lock:
            moves = self._decode(dev)
            if any(old is not None for _, _, old, _ in moves):
                # A range left the bus: a BAR that overlapped it may fit now.
                for other in self.slots:
                    if other is not None and other is not dev:
                        moves += self._decode(other)
        for d, bar, old, new in moves:
            d.bar_moved(bar, old, new)

    def _decode(self, dev: PciDevice) -> list[tuple[PciDevice, Bar, int | None, int | None]]:
        """Map ``dev``'s BARs as its registers say (``_map_lock`` held); the moves made."""
        moves: list[tuple[PciDevice, Bar, int | None, int | None]] = []
        with dev.lock:
            command = dev.command
            for bar in dev.bars.values():
                enabled = bool(command & (CMD_IO if bar.kind is BarKind.IO else CMD_MEMORY))
                want: int | None = dev.bar_address(bar) if enabled else None
                if want is not None and not self._plausible(want, bar.size):
                    want = None
                if want == bar.mapped_at:
                    continue
                old = bar.mapped_at
                if old is not None:
                    self.mmio.remove(old)
                    bar.mapped_at = None
                if want is not None:
                    try:
                        self.mmio.insert(bar.region, want, bar.size, f"{dev.name}-bar{bar.index}")
                        bar.mapped_at = want
                    except BusOverlapError as exc:
                        log.info("%s BAR%d not decoded: %s", dev.name, bar.index, exc)
                if bar.mapped_at != old:
                    moves.append((dev, bar, old, bar.mapped_at))
        return moves

    @staticmethod
    def _plausible(addr: int, size: int) -> bool:
        # 0 means "not programmed"; an address must not wrap or leave the
        # physical address space (a half-written 64-bit BAR during sizing)
        return addr > 0 and addr + size <= (1 << 46)


class ConfigAddressPort:
    """0xCF8: the CONFIG_ADDRESS register (dword accesses only)."""

    def __init__(self) -> None:
        self.value = 0

    def read(self, offset: int, data: memoryview) -> None:
        if offset == 0 and len(data) == 4:
            data[:] = self.value.to_bytes(4, "little")
        else:
            data[:] = b"\xff" * len(data)

    def write(self, offset: int, data: memoryview) -> None:
        if offset == 0 and len(data) == 4:
            self.value = int.from_bytes(data, "little") & _CONFIG_ADDRESS_MASK


class ConfigDataPort:
    """0xCFC-0xCFF: the CONFIG_DATA window for the register CONFIG_ADDRESS selects."""

    def __init__(self, root: PciRoot, address: ConfigAddressPort) -> None:
        self.root = root
        self.address = address

    def _target(self, offset: int, size: int) -> tuple[int, int, int, int] | None:
        a = self.address.value
        if not a & 0x8000_0000 or offset % size:
            return None
        return (a >> 16) & 0xFF, (a >> 11) & 0x1F, (a >> 8) & 0x7, (a & 0xFC) + offset

    def read(self, offset: int, data: memoryview) -> None:
        size = len(data)
        t = self._target(offset, size) if size in (1, 2, 4) else None
        value = (1 << (8 * size)) - 1 if t is None else self.root.config_read(*t, size)
        data[:] = value.to_bytes(size, "little")

    def write(self, offset: int, data: memoryview) -> None:
        size = len(data)
        t = self._target(offset, size) if size in (1, 2, 4) else None
        if t is not None:
            self.root.config_write(*t, size, int.from_bytes(data, "little"))


class Ecam:
    """The memory-mapped configuration space (bus 0 only)."""

    def __init__(self, root: PciRoot) -> None:
        self.root = root

    @staticmethod
    def _decode(offset: int) -> tuple[int, int, int, int]:
        return offset >> 20, (offset >> 15) & 0x1F, (offset >> 12) & 0x7, offset & 0xFFF

    def read(self, offset: int, data: memoryview) -> None:
        size = len(data)
        if size not in (1, 2, 4) or offset % size:
            data[:] = b"\xff" * size
            return
        data[:] = self.root.config_read(*self._decode(offset), size).to_bytes(size, "little")

    def write(self, offset: int, data: memoryview) -> None:
        size = len(data)
        if size in (1, 2, 4) and not offset % size:
            self.root.config_write(*self._decode(offset), size, int.from_bytes(data, "little"))


def attach_pci_root(pio: Bus, mmio: Bus, irq_line: Callable[[int], IrqLine],
                    ram_end: int) -> PciRoot:
    """Create bus 0 and put both configuration mechanisms on the buses."""
    root = PciRoot(mmio, irq_line, ram_end)
    addr = root.config_address
    pio.insert(addr, CONFIG_ADDRESS_PORT, 1, "pci-config-address")
    pio.insert(ConfigDataPort(root, addr), CONFIG_DATA_PORT, 4, "pci-config-data")
    mmio.insert(Ecam(root), layout.PCI_ECAM_ADDR, layout.PCI_ECAM_SIZE, "pci-ecam")
    return root
