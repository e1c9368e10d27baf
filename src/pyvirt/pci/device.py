"""A PCI function: its configuration space, BARs and capability list.

Configuration space is a byte array with two masks beside it: ``wmask`` (bits
the guest may write) and ``w1c`` (bits a write of 1 clears). Everything the
device model does not intercept is plain masked storage, so a device only
writes the registers that mean something to it (PCI Local Bus 3.0, chapter 6).

BARs are declared with ``add_bar``; the root complex (``pyvirt.pci.root``)
places them, and maps/unmaps them on the MMIO bus whenever the guest moves a
BAR or flips the command register's decode bits, calling ``bar_moved`` so a
device can re-register its ioeventfds.

Saved state: ``save_pci_state``/``restore_pci_state`` (``PciState``) carry the
whole configuration space; BAR placement and decoding are in it (the BAR
registers and the command register), so restoring puts each BAR back on the
bus where the record says, or takes it off. A device type adds its own state
on top and calls these from its ``save_state``/``restore_state``.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from pyvirt.devices.bus import BusDevice
from pyvirt.devices.statecheck import check_bytes
from pyvirt.state import StateError, check_version

__all__ = ["CONFIG_SPACE_SIZE", "Bar", "BarKind", "PciDevice", "PciState"]

log = logging.getLogger(__name__)

CONFIG_SPACE_SIZE = 4096  # PCI Express extended configuration space (ECAM)
LEGACY_CONFIG_SIZE = 256

# Type 0 header offsets (PCI Local Bus 3.0, 6.1)
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

CMD_IO = 1 << 0
CMD_MEMORY = 1 << 1
CMD_BUS_MASTER = 1 << 2
CMD_SERR = 1 << 8
CMD_INTX_DISABLE = 1 << 10
STATUS_INTERRUPT = 1 << 3
STATUS_CAP_LIST = 1 << 4

BAR_IO = 0x1
BAR_MEM64 = 0x4
BAR_PREFETCH = 0x8


class BarKind(enum.Enum):
    IO = "io"
    MEM32 = "mem32"
    MEM64 = "mem64"


@dataclass
class Bar:
    index: int
    size: int
    kind: BarKind
    region: BusDevice
    prefetchable: bool = False
    #: the address the guest programmed (or the root assigned); 0 = none
    address: int = 0
    #: where it is mapped on the bus now, None when it is not decoded
    mapped_at: int | None = None

    @property
    def type_bits(self) -> int:
        if self.kind is BarKind.IO:
            return BAR_IO
        bits = BAR_MEM64 if self.kind is BarKind.MEM64 else 0
        return bits | (BAR_PREFETCH if self.prefetchable else 0)


#: (offset, size) of a config write the device wants to hear about, after storage
ConfigHook = Callable[[int, int], None]


@dataclass(frozen=True)
class PciState:
    version: int
    config: bytes  # the whole 4 KiB configuration space


class PciDevice:
    """One PCI function with a type 0 header. Subclasses add BARs and capabilities."""

    PCI_STATE_VERSION: ClassVar[int] = 1

    def __init__(self, *, vendor_id: int, device_id: int, class_code: int, revision: int = 0,
                 subsystem_vendor_id: int = 0, subsystem_id: int = 0,
                 interrupt_pin: int = 0, name: str = "pci") -> None:
        self.name = name
        self.config = bytearray(CONFIG_SPACE_SIZE)
        self.wmask = bytearray(CONFIG_SPACE_SIZE)
        self.w1c = bytearray(CONFIG_SPACE_SIZE)
        self.bars: dict[int, Bar] = {}
        self.lock = threading.RLock()
        self._cap_tail: int | None = None  # offset of the last capability's next pointer
        self._cap_end = 0x40
        self._write_hooks: list[tuple[int, int, ConfigHook]] = []
        #: set by the root complex: remap this device's BARs after a change
        self.on_decode_change: Callable[[PciDevice], None] | None = None
        self.put(VENDOR_ID, 2, vendor_id)
        self.put(DEVICE_ID, 2, device_id)
        self.put(REVISION_ID, 1, revision)
        self.put(CLASS_PROG, 3, class_code)
        self.put(SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self.put(SUBSYSTEM_ID, 2, subsystem_id)
        self.put(INTERRUPT_PIN, 1, interrupt_pin)
        self.put(HEADER_TYPE, 1, 0)
        writable_cmd = CMD_IO | CMD_MEMORY | CMD_BUS_MASTER | CMD_SERR | CMD_INTX_DISABLE
        self.set_wmask(COMMAND, 2, writable_cmd)
        self.set_wmask(INTERRUPT_LINE, 1, 0xFF)
        self.w1c[STATUS + 1] = 0xF9  # the error bits of the status register (RW1C)

    # ---- raw helpers (callers hold ``lock`` once the VM runs)

    def put(self, offset: int, size: int, value: int) -> None:
        self.config[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(
            size, "little")

    def get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset:offset + size], "little")

    def set_wmask(self, offset: int, size: int, mask: int) -> None:
        self.wmask[offset:offset + size] = mask.to_bytes(size, "little")

    def hook_writes(self, offset: int, size: int, hook: ConfigHook) -> None:
        """Call ``hook(offset, size)`` after a guest write touching [offset, offset+size)."""
        self._write_hooks.append((offset, offset + size, hook))

    # ---- BARs and capabilities (set up before the VM runs)

    def add_bar(self, index: int, size: int, kind: BarKind, region: BusDevice, *,
                prefetchable: bool = False) -> Bar:
        if not 0 <= index <= 5 or (kind is BarKind.MEM64 and index == 5):
            raise ValueError(f"BAR index {index} invalid for {kind.value}")
        if size & (size - 1) or size < (4 if kind is BarKind.IO else 16):
            raise ValueError(f"BAR size {size:#x} must be a power of two")
        taken = set(self.bars) | {b.index + 1 for b in self.bars.values()
                                  if b.kind is BarKind.MEM64}
        if index in taken or (kind is BarKind.MEM64 and index + 1 in taken):
            raise ValueError(f"BAR {index} already in use")
        bar = Bar(index, size, kind, region, prefetchable)
        self.bars[index] = bar
        off = BAR0 + 4 * index
        self.put(off, 4, bar.type_bits)
        low_mask = ~(size - 1) & 0xFFFF_FFFF & ~(0x3 if kind is BarKind.IO else 0xF)
        self.set_wmask(off, 4, low_mask)
        if kind is BarKind.MEM64:
            self.set_wmask(off + 4, 4, (~(size - 1) >> 32) & 0xFFFF_FFFF)
        return bar

    def add_capability(self, cap_id: int, body: bytes, *, wmask: bytes | None = None) -> int:
        """Append a capability (id, next, then ``body``); returns its offset."""
        length = 2 + len(body)
        off = self._cap_end
        if off + length > LEGACY_CONFIG_SIZE:
            raise ValueError("capabilities do not fit the 256-byte config space")
        self.config[off] = cap_id
        self.config[off + 1] = 0
        self.config[off + 2:off + length] = body
        if wmask is not None:
            if len(wmask) != len(body):
                raise ValueError("capability wmask must match the body")
            self.wmask[off + 2:off + length] = wmask
        if self._cap_tail is None:
            self.put(CAPABILITIES_POINTER, 1, off)
            self.put(STATUS, 2, self.get(STATUS, 2) | STATUS_CAP_LIST)
        else:
            self.config[self._cap_tail] = off
        self._cap_tail = off + 1
        self._cap_end = (off + length + 3) & ~3
        return off

    def set_bar_address(self, index: int, address: int) -> None:
        """Program a BAR as firmware would (the root's allocator calls this)."""
        bar = self.bars[index]
        off = BAR0 + 4 * index
        self.put(off, 4, (address & 0xFFFF_FFFF & ~(bar.size - 1)) | bar.type_bits)
        if bar.kind is BarKind.MEM64:
            self.put(off + 4, 4, address >> 32)
        bar.address = address

    def bar_address(self, bar: Bar) -> int:
        off = BAR0 + 4 * bar.index
        low = self.get(off, 4) & (~0x3 if bar.kind is BarKind.IO else ~0xF) & 0xFFFF_FFFF
        if bar.kind is BarKind.MEM64:
            return low | (self.get(off + 4, 4) << 32)
        return low

    # ---- guest access (vCPU threads)

    def config_read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4) or offset % size or offset + size > CONFIG_SPACE_SIZE:
            return (1 << (8 * min(size, 4))) - 1
        with self.lock:
            self.before_read(offset, size)
            return self.get(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4) or offset % size or offset + size > CONFIG_SPACE_SIZE:
            return
        decode_changed = False
        with self.lock:
            for i in range(size):
                o = offset + i
                b = (value >> (8 * i)) & 0xFF
                old = self.config[o]
                new = (old & ~self.wmask[o]) | (b & self.wmask[o])
                new &= ~(b & self.w1c[o])
                self.config[o] = new & 0xFF
            end = offset + size
            if (offset < BAR0 + 24 and end > BAR0) or (offset < COMMAND + 2 and end > COMMAND):
                decode_changed = True
            for start, stop, hook in self._write_hooks:
                if offset < stop and end > start:
                    hook(offset, size)
        if decode_changed and self.on_decode_change is not None:
            self.on_decode_change(self)

    def before_read(self, offset: int, size: int) -> None:
        """Refresh registers computed on demand (called with ``lock`` held)."""

    def bar_moved(self, bar: Bar, old: int | None, new: int | None) -> None:
        """The root mapped ``bar`` at ``new`` (None: unmapped). Called without ``lock``."""

    def set_intx_status(self, asserted: bool) -> None:
        with self.lock:
            status = self.get(STATUS, 2)
            status = status | STATUS_INTERRUPT if asserted else status & ~STATUS_INTERRUPT
            self.put(STATUS, 2, status)

    @property
    def command(self) -> int:
        return self.get(COMMAND, 2)

    # ---- saved state (the VM is paused)

    def save_pci_state(self) -> PciState:
        """The configuration space, BAR placement and decode bits included."""
        with self.lock:
            return PciState(version=self.PCI_STATE_VERSION, config=bytes(self.config))

    def check_pci_state(self, state: PciState) -> bytes:
        """Validate ``state`` for this function without changing anything (a device
        checks all its parts before restoring any); returns the config bytes."""
        part = f"pci {self.name}"
        check_version(part, state.version, self.PCI_STATE_VERSION)
        config = check_bytes(part, "config", state.config, length=CONFIG_SPACE_SIZE)
        with self.lock:
            # all 4096 bytes at once, as little-endian integers (bit 8*off is byte off)
            writable = int.from_bytes(self.wmask, "little") | int.from_bytes(self.w1c, "little")
            writable |= STATUS_INTERRUPT << (8 * STATUS)  # the device drives it
            diff = int.from_bytes(config, "little") ^ int.from_bytes(self.config, "little")
            diff &= ~writable
        if diff:
            off = ((diff & -diff).bit_length() - 1) // 8
            raise StateError(
                f"{part}: saved state field config[{off:#x}] = {config[off]:#x} "
                f"differs from this device's read-only bits ({self.config[off]:#x})")
        return config

    def restore_pci_state(self, state: PciState) -> None:
        """Load the configuration space and map or unmap the BARs to match it.

        Every bit the guest cannot write (identity, class, BAR types and sizes,
        the capability list) must equal this function's: a record of another
        device or layout is refused with a ``StateError`` naming the offset.
        Write hooks are not called: a device restores what they drive (MSI-X,
        ...) from its own state.
        """
        config = self.check_pci_state(state)
        with self.lock:
            self.config[:] = config
            for bar in self.bars.values():
                bar.address = self.bar_address(bar)
        if self.on_decode_change is not None:
            self.on_decode_change(self)
