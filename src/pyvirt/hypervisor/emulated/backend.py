"""The software CPU backend: pyvirt's patched unicorn (QEMU TCG) behind the seam.

Status: the default guest (Debian 6.1 + busybox) boots to its shell in
about 4.3-4.9 s on the 2-core dev box, against 5.7 s for
``qemu-system-x86_64 -accel tcg`` with the bzImage (docs/benchmarks.md);
reboot (restart and exit) works. Engine patches 0001-0010
(third_party/unicorn/README.md); 0010 fixed the ~1% of boots that oopsed
(stale translated code after writes through an alias mapping). Next speed-up
(not done): stores to pages the CPU also sees as executable take unicorn's
slow notdirty path (~25% of boot time); mark such pages fast once they hold
no translated code, as QEMU does.

``EmulatedHypervisor`` ("emu") is what ``--accel emu`` (and ``auto`` on a host
without hardware virtualization) runs. One ``Engine`` per vCPU executes guest
code; the interrupt controllers are ``EmulatedIrqChip`` (Python); port I/O and
MMIO reach the VMM's buses from the engine's hooks on the vCPU thread.

Wiring:
  * guest RAM: every ``GuestMemory`` region is mapped zero-copy into the engine.
  * the rest of the guest-physical address space, up to the CPU's physical
    address width (``PHYS_ADDR_BITS``, what CPUID 0x80000008 reports), is MMIO
    dispatching to the mmio ``Bus``: devices (PCI BARs wherever the guest puts
    them) answer, every other address reads all-ones and drops writes, as on a
    PC. The vCPU's LAPIC page (0xFEE00000) goes to ``chip.lapic(i)``. Without
    this an access to a hole would stop the engine (unicorn's
    UC_ERR_READ_UNMAPPED) and with it the VM. The CPU cannot produce a higher
    address: its page walk treats PTE bits at and above PHYS_ADDR_BITS as
    reserved (#PF with the RSVD bit set, the guest's to handle), and Linux
    refuses such a /dev/mem mapping itself.
  * interrupts: the chip's ``notify`` only raises the engine's INTR pin
    (thread-safe); the engine's acknowledge callback asks the chip for the
    vector and re-raises the pin while more are deliverable.
  * MSRs: IA32_APIC_BASE, IA32_TSC_DEADLINE and the x2APIC range go to the
    LAPIC; IA32_BIOS_SIGN_ID (microcode probe) and IA32_ARCH_CAPABILITIES are
    answered here; everything else is the engine's own MSR set (#GP if unknown).
  * CPUID: ``cpuid_model.CpuidModel`` (TSC/crystal frequencies through leaf 0x15).
  * time: RDTSC is the host TSC; the LAPIC reads the same counter
    (``hosttsc.rdtsc``) so TSC-deadline timers fire when the guest expects.

Limits / notes for whoever continues:
  * one vCPU: unicorn's TCG is single-threaded per instance and one instance
    cannot invalidate another's translated code, so SMP would need either one
    engine shared by round-robin or cross-engine TB invalidation (a C patch).
  * guest TSC = host TSC + ``EmulatedVm.tsc_offset``: the engine keeps its own
    copy of the offset (QEMU's ``tsc_offset``), the LAPIC reads the VM's; a
    guest write to IA32_TSC (MSR 0x10) updates both (``MsrRouter``).
  * saved state: ``EmulatedVcpu.save_state`` is the engine's raw CPU context
    (``Engine.context_bytes``, tied to the engine build) plus the halted flag
    and the guest TSC; ``EmulatedVm.save_state`` the interrupt controllers and
    timers. Restoring moves the guest TSC and every timer on by the wall-clock
    time since the save (see ``EmulatedVm.restore_state``). A vCPU restored
    halted waits for its interrupt in Python (``EmulatedVcpu.run``): unicorn
    cannot be put into HLT from outside.
  * writes into guest RAM from the host (device DMA) bypass TCG's
    self-modifying-code tracking: devices report them (``Vm.note_dma_write``),
    the ranges are queued and dropped on the vCPU thread by engine patch 0011
    when the CPU next takes an interrupt (the completion interrupt) or stops.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import unicorn

from pyvirt.arch.x86_64.cpu_state import CpuState
from pyvirt.arch.x86_64.cpu_state import Segment as CpuSegment
from pyvirt.arch.x86_64.layout import LAPIC_ADDR
from pyvirt.devices.bus import Bus, BusDevice
from pyvirt.devices.irq import IrqLine
from pyvirt.hypervisor.base import ExitKind, HypervisorError, VcpuExit
from pyvirt.hypervisor.emulated import _uc, hosttsc
from pyvirt.hypervisor.emulated._staterec import check_bool, check_int
from pyvirt.hypervisor.emulated.cpuid_model import (
    ARCH_CAPABILITIES,
    MSR_IA32_ARCH_CAPABILITIES,
    CpuidModel,
)
from pyvirt.hypervisor.emulated.engine import (
    Engine,
    EngineError,
    LongModeState,
    MsrResult,
    RunExit,
    build_identity,
)
from pyvirt.hypervisor.emulated.engine import Segment as EngineSegment
from pyvirt.hypervisor.emulated.irqchip import LAPIC_MMIO_SIZE, EmulatedIrqChip, IrqChipState
from pyvirt.hypervisor.emulated.lapic import APIC_BUS_HZ, ApicBus, ApicMsrFault, LocalApic
from pyvirt.memory import GuestMemory
from pyvirt.state import StateError, check_version

__all__ = [
    "ENGINE_DESCRIPTION",
    "PHYS_ADDR_BITS",
    "EmulatedHypervisor",
    "EmulatedVcpu",
    "EmulatedVcpuState",
    "EmulatedVm",
    "EmulatedVmState",
    "MsrRouter",
    "mmio_holes",
    "segment_flags",
]

log = logging.getLogger(__name__)

#: The engine's physical address width: QEMU's TCG_PHYS_ADDR_BITS, what its
#: CPUID 0x80000008 EAX[7:0] tells the guest and the bound its page walk
#: enforces (tests/unit/test_emu_backend.py checks both on the engine).
PHYS_ADDR_BITS = 40
PHYS_LIMIT = 1 << PHYS_ADDR_BITS
#: Pending DMA invalidations (one per buffer segment: a busy disk queues
#: thousands between two interrupts). Past this many the queue is coalesced,
#: and collapsed to one covering span if that is not enough, so a guest that
#: keeps devices busy with interrupts off cannot grow it: dropping more
#: translated code than was overwritten is only slower, never wrong.
MAX_DMA_RANGES = 8192


def _patch_series() -> str:
    """The pyvirt patches the installed engine was built with (from build.sh's list)."""
    try:
        listing = Path(unicorn.__file__).parent / "lib" / "pyvirt-patches.list"
        numbers = sorted(line.split("-", 1)[0] for line in listing.read_text().split())
    except (OSError, TypeError):
        return "an unknown patch series"
    if not numbers:
        return "no patches"
    return f"patches {numbers[0]}-{numbers[-1]}" if len(numbers) > 1 else f"patch {numbers[0]}"


_PATCHES = _patch_series()
ENGINE_DESCRIPTION = (f"unicorn {getattr(unicorn, '__version__', '?')} (QEMU TCG) "
                      f"with pyvirt {_PATCHES}")


def mmio_holes(ram: list[tuple[int, int]], *, lapic: int = LAPIC_ADDR,
               lapic_size: int = LAPIC_MMIO_SIZE,
               limit: int = PHYS_LIMIT) -> list[tuple[int, int]]:
    """[start, end) ranges below ``limit`` covered neither by RAM nor by the LAPIC page:
    together with those, the whole guest-physical address space."""
    taken = sorted([(a, a + n) for a, n in ram] + [(lapic, lapic + lapic_size)])
    holes: list[tuple[int, int]] = []
    cur = 0
    for start, end in taken:
        if start > cur:
            holes.append((cur, min(start, limit)))
        cur = max(cur, end)
        if cur >= limit:
            break
    if cur < limit:
        holes.append((cur, limit))
    return [(s, e) for s, e in holes if e > s]


def segment_flags(seg: CpuSegment) -> int:
    """The descriptor's high dword attribute bits (what the engine's segment cache takes)."""
    return (((seg.type & 0xF) << 8) | (int(seg.s) << 12) | ((seg.dpl & 3) << 13)
            | (int(seg.present) << 15) | (int(seg.avl) << 20) | (int(seg.l) << 21)
            | (int(seg.db) << 22) | (int(seg.g) << 23))


def _engine_segment(seg: CpuSegment) -> EngineSegment:
    # CpuState holds the raw descriptor limit; the cache wants bytes
    limit = ((seg.limit << 12) | 0xFFF) if seg.g else seg.limit
    return EngineSegment(seg.selector, seg.base, limit & 0xFFFF_FFFF, segment_flags(seg))


#: IA32_BIOS_SIGN_ID: Linux writes 0 and reads back the microcode revision
#: (0 here: there is no microcode); the engine's MSR set lacks it.
MSR_BIOS_SIGN_ID = 0x8B
MSR_IA32_TSC = 0x10

#: A restore refuses a saved TSC rate further than this from the host's
#: (relative): the guest calibrated its clocks against the saved rate and the
#: engine's RDTSC runs at the host's, unscaled.
TSC_HZ_TOLERANCE = 0.001


class MsrRouter:
    """The engine's MSR callback: LAPIC MSRs to the LAPIC, the rest native.

    ``vm`` (optional) follows guest writes of IA32_TSC, so the LAPIC's
    TSC-deadline timer reads the same guest TSC as RDTSC."""

    __slots__ = ("count", "lapic", "vm")

    def __init__(self, lapic: LocalApic, vm: EmulatedVm | None = None) -> None:
        self.lapic = lapic
        self.vm = vm
        self.count = 0

    def __call__(self, msr: int, is_write: bool, value: int) -> tuple[MsrResult, int]:
        self.count += 1
        if not LocalApic.handles_msr(msr):
            if msr == MSR_IA32_TSC and is_write and self.vm is not None:
                self.vm.tsc_offset = value - hosttsc.rdtsc()  # the engine sets its own
                return MsrResult.NATIVE, 0
            if msr == MSR_BIOS_SIGN_ID:
                return MsrResult.HANDLED, 0
            if msr == MSR_IA32_ARCH_CAPABILITIES:  # read-only
                return (MsrResult.GP, 0) if is_write else (MsrResult.HANDLED, ARCH_CAPABILITIES)
            return MsrResult.NATIVE, 0
        if is_write:
            return (MsrResult.HANDLED if self.lapic.write_msr(msr, value) else MsrResult.GP), 0
        try:
            return MsrResult.HANDLED, self.lapic.read_msr(msr)
        except ApicMsrFault:
            return MsrResult.GP, 0


class _BusWindow:
    """Engine MMIO callbacks for [base, base+size) forwarding to a bus or device.

    One reusable buffer per access width keeps the hot path allocation-free
    (apart from the int the engine wants back).
    """

    __slots__ = ("base", "bus", "count", "device", "views")

    def __init__(self, base: int, *, bus: Bus | None = None,
                 device: BusDevice | None = None) -> None:
        self.count = 0  # accesses (metrics)
        self.base = base
        self.bus = bus
        self.device = device
        buf = bytearray(8)
        mv = memoryview(buf)
        self.views = {n: mv[:n] for n in (1, 2, 4, 8)}

    def read(self, off: int, size: int) -> int:
        self.count += 1
        data = self.views.get(size) or memoryview(bytearray(size))
        data[:] = b"\xff" * size  # bytes a device leaves alone read as all-ones
        if self.device is not None:
            self.device.read(off, data)
        else:
            assert self.bus is not None
            self.bus.read(self.base + off, data)
        return int.from_bytes(data, "little")

    def write(self, off: int, size: int, value: int) -> None:
        self.count += 1
        data = self.views.get(size) or memoryview(bytearray(size))
        data[:] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        if self.device is not None:
            self.device.write(off, data)
        else:
            assert self.bus is not None
            self.bus.write(self.base + off, data)


class _PortIo:
    """Engine IN/OUT hooks dispatching to the pio bus with reusable buffers."""

    __slots__ = ("bus", "count", "views")

    def __init__(self, bus: Bus) -> None:
        self.count = 0  # IN/OUT instructions (metrics)
        self.bus = bus
        mv = memoryview(bytearray(4))
        self.views = {1: mv[:1], 2: mv[:2], 4: mv[:4]}

    def inp(self, port: int, size: int) -> int:
        self.count += 1
        data = self.views[size]
        data[:] = b"\xff" * size
        found = self.bus.lookup(port)
        if found is None:
            self.bus.read(port, data)
        else:
            found[0].read(found[1], data)
        return int.from_bytes(data, "little")

    def out(self, port: int, size: int, value: int) -> None:
        self.count += 1
        data = self.views[size]
        data[:] = value.to_bytes(size, "little")
        found = self.bus.lookup(port)
        if found is None:
            self.bus.write(port, data)
        else:
            found[0].write(found[1], data)


def _coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Overlapping and touching (gpa, size) ranges merged; one covering span
    when more than half of ``MAX_DMA_RANGES`` remain."""
    merged: list[tuple[int, int]] = []
    cur_start, cur_end = -1, -1
    for a, n in sorted(ranges):
        if a <= cur_end:
            cur_end = max(cur_end, a + n)
            continue
        if cur_end > cur_start:
            merged.append((cur_start, cur_end - cur_start))
        cur_start, cur_end = a, a + n
    if cur_end > cur_start:
        merged.append((cur_start, cur_end - cur_start))
    if len(merged) > MAX_DMA_RANGES // 2:
        start = merged[0][0]
        merged = [(start, max(a + n for a, n in merged) - start)]
    return merged


class EmulatedHypervisor:
    name = "emu"
    description = ENGINE_DESCRIPTION

    def __init__(self) -> None:
        from pyvirt.hypervisor.emulated import engine

        if not engine.available():
            raise HypervisorError(
                "accel: emu: the installed unicorn lacks pyvirt's patches "
                "(run third_party/unicorn/build.sh .venv/bin/python)")

    def max_vcpus(self) -> int:
        return 1

    def create_vm(self, memory: GuestMemory, pio: Bus, mmio: Bus, *, num_cpus: int) -> EmulatedVm:
        if num_cpus > self.max_vcpus():
            raise HypervisorError(f"cpus: {num_cpus}: the software CPU runs 1 vCPU for now")
        return EmulatedVm(memory, pio, mmio, num_cpus)


class EmulatedMsiRoute:
    """An MSI-X vector under the software CPU: the message goes to our LAPICs.

    Address (Intel SDM 11.11.1): 0xFEE in bits 31:20, destination ID in 19:12,
    redirection hint bit 3, destination mode bit 2 (1 = logical). Data
    (11.11.2): vector in 7:0, delivery mode in 10:8, trigger mode bit 15.
    """

    def __init__(self, bus: ApicBus) -> None:
        self._bus = bus
        self._msg: tuple[int, bool, int, int, bool] | None = None
        self.sent = 0

    def update(self, address: int, data: int) -> None:
        if address >> 20 != 0xFEE:
            self._msg = None  # not an interrupt message: dropped, as by the chipset
            return
        self._msg = ((address >> 12) & 0xFF, bool(address & 0x4), (data >> 8) & 7,
                     data & 0xFF, bool(data & 0x8000))

    def trigger(self) -> None:
        msg = self._msg
        if msg is None:
            return
        dest, logical, mode, vector, level = msg
        self.sent += 1
        self._bus.deliver(dest=dest, logical=logical, mode=mode, vector=vector,
                          trigger_level=level, short_dest=True)

    def close(self) -> None:
        self._msg = None


@dataclass(frozen=True)
class EmulatedVmState:
    """The VM-level state of the software CPU machine: the interrupt
    controllers and timers, and the guest's clock at the save."""

    version: int
    num_cpus: int
    tsc_hz: int
    guest_tsc: int  # the guest TSC when saved ...
    wall_ns: int  # ... and the host's wall clock then (time.time_ns)
    chip: IrqChipState


@dataclass(frozen=True)
class EmulatedVcpuState:
    version: int
    index: int
    engine: str  # engine.build_identity(): the context's layout
    context: bytes  # Engine.context_bytes()
    halted: bool  # in HLT, waiting for an interrupt
    tsc_hz: int
    guest_tsc: int
    wall_ns: int


def _check_clock(part: str, tsc_hz: object, guest_tsc: object, wall_ns: object,
                 host_hz: int) -> None:
    hz = check_int(part, "tsc_hz", tsc_hz, 1, 1 << 40)
    check_int(part, "guest_tsc", guest_tsc, 0, (1 << 64) - 1)
    check_int(part, "wall_ns", wall_ns, 0, (1 << 63) - 1)
    if abs(hz - host_hz) > host_hz * TSC_HZ_TOLERANCE:
        raise StateError(f"{part}: saved on a host whose TSC runs at {hz} Hz; this host's "
                         f"runs at {host_hz} Hz (the software CPU does not scale the TSC)")


class EmulatedVm:
    STATE_VERSION: ClassVar[int] = 1
    state_type: ClassVar[type] = EmulatedVmState

    def __init__(self, memory: GuestMemory, pio: Bus, mmio: Bus, num_cpus: int) -> None:
        self.memory = memory
        self.pio = pio
        self.mmio = mmio
        self.num_cpus = num_cpus
        self.tsc_hz = hosttsc.tsc_hz()
        #: guest TSC = host TSC + tsc_offset (what the LAPIC reads; each engine
        #: keeps the same offset itself)
        self.tsc_offset = 0
        self.chip = EmulatedIrqChip(num_cpus, tsc_hz=self.tsc_hz, now_tsc=self.guest_tsc,
                                    apic_bus_hz=APIC_BUS_HZ)
        try:
            for base, length, dev, name in self.chip.pio_devices():
                pio.insert(dev, base, length, name)
            for base, length, dev, name in self.chip.mmio_devices():
                mmio.insert(dev, base, length, name)
        except BaseException:
            self.chip.close()
            raise
        self.vcpus: list[EmulatedVcpu] = []
        self._dma_lock = threading.Lock()
        self._dma_ranges: list[tuple[int, int]] = []
        self._ioeventfd_lock = threading.Lock()
        self._ioeventfds: list[tuple[int, int, int]] = []  # (gpa, len, fd)

    def irq_line(self, gsi: int) -> IrqLine:
        return self.chip.irq_line(gsi)

    def guest_tsc(self) -> int:
        """The guest's TSC now (RDTSC in the guest returns the same)."""
        return hosttsc.rdtsc() + self.tsc_offset

    # -- saved state ---------------------------------------------------------

    def save_state(self) -> EmulatedVmState:
        """Interrupt controllers, timers and the guest clock; vCPUs parked."""
        return EmulatedVmState(version=self.STATE_VERSION, num_cpus=self.num_cpus,
                               tsc_hz=self.tsc_hz, guest_tsc=self.guest_tsc(),
                               wall_ns=time.time_ns(), chip=self.chip.save_state())

    def restore_state(self, st: EmulatedVmState) -> None:
        """The controllers and timers as saved, on a clock moved on by the
        wall-clock time since the save (vCPUs parked; restore guest memory
        before this and before ``EmulatedVcpu.restore_state``).

        The guest TSC continues at ``guest_tsc + elapsed * tsc_hz`` (never
        backwards: a host clock behind the save's counts as no time), armed
        timers fire at most once for the gap and periodic ones keep their
        phase without catching up. A TSC rate other than this host's (beyond
        ``TSC_HZ_TOLERANCE``) is refused rather than scaled. The vCPUs' INTR
        pins are recomputed and translated code is dropped.
        """
        part = "vm"
        check_version(part, st.version, self.STATE_VERSION)
        if st.num_cpus != self.num_cpus:
            raise StateError(f"{part}: saved with {st.num_cpus} vCPUs; this VM has "
                             f"{self.num_cpus}")
        elapsed = self.move_clock(part, st.tsc_hz, st.guest_tsc, st.wall_ns)
        for v in self.vcpus:
            v.engine.lower_irq()  # the chip raises it again where deliverable
        self.chip.restore_state(st.chip, elapsed)
        with self._dma_lock:
            self._dma_ranges = []
        for v in self.vcpus:
            v.engine.flush_code()  # guest memory may be another's now

    def move_clock(self, part: str, tsc_hz: object, guest_tsc: object,
                   wall_ns: object) -> int:
        """Set the guest TSC to ``guest_tsc`` moved on by the wall time since
        ``wall_ns`` (on the LAPIC side and in every engine); return that time."""
        _check_clock(part, tsc_hz, guest_tsc, wall_ns, self.tsc_hz)
        assert isinstance(guest_tsc, int) and isinstance(wall_ns, int)
        elapsed = max(0, time.time_ns() - wall_ns)
        tsc = guest_tsc + elapsed * self.tsc_hz // 1_000_000_000
        if tsc >> 64:
            raise StateError(f"{part}: the guest TSC would overflow (saved {guest_tsc}, "
                             f"{elapsed} ns ago)")
        self.tsc_offset = tsc - hosttsc.rdtsc()
        for v in self.vcpus:
            v.engine.wrmsr(MSR_IA32_TSC, (hosttsc.rdtsc() + self.tsc_offset) % (1 << 64))
        return elapsed

    def create_vcpu(self, index: int) -> EmulatedVcpu:
        if not 0 <= index < self.num_cpus:
            raise HypervisorError(f"vCPU {index} out of range (the VM has {self.num_cpus})")
        v = EmulatedVcpu(self, index)
        with self._ioeventfd_lock:
            for addr, length, fd in self._ioeventfds:
                v.engine.add_ioeventfd(addr, length, fd)
            self.vcpus.append(v)
        return v

    def invalidate_code(self, gpa: int, size: int) -> None:
        """Drop translated code for [gpa, gpa+size) now (on the vCPU thread, or
        while no vCPU runs)."""
        end = gpa + size
        for r in self.memory.regions:
            # the engine stops at the end of the RAM region ``gpa`` is in
            lo, hi = max(gpa, r.guest_addr), min(end, r.guest_addr + r.size)
            if lo < hi:
                for v in self.vcpus:
                    v.engine.invalidate_phys(lo, hi - lo)

    def note_dma_write(self, gpa: int, size: int) -> None:
        """The host wrote guest RAM (device DMA): translated code there is stale.

        Any thread. The engine's code cache is not thread-safe, so the range is
        queued and dropped on the vCPU thread when the CPU next accepts an
        interrupt (the completion interrupt that tells the guest the data is
        there) or stops. A driver that polls for completions with interrupts
        off could run stale code from such a page until then."""
        with self._dma_lock:
            self._dma_ranges.append((gpa, size))
            if len(self._dma_ranges) >= MAX_DMA_RANGES:
                self._dma_ranges = _coalesce(self._dma_ranges)

    def apply_dma_invalidations(self) -> None:
        if not self._dma_ranges:
            return
        with self._dma_lock:
            ranges, self._dma_ranges = self._dma_ranges, []
        for gpa, size in ranges:
            self.invalidate_code(gpa, size)

    def msi_route(self) -> EmulatedMsiRoute:
        return EmulatedMsiRoute(self.chip.apic_bus)

    def add_ioeventfd(self, addr: int, length: int, fd: int) -> bool:
        # the engine signals the eventfd itself (patch 0013): a kick costs the
        # vCPU one write(2), no callback into Python
        with self._ioeventfd_lock:
            if (addr, length, fd) in self._ioeventfds:
                raise HypervisorError(f"ioeventfd at {addr:#x} is already there")
            done: list[EmulatedVcpu] = []
            try:
                for v in self.vcpus:
                    v.engine.add_ioeventfd(addr, length, fd)
                    done.append(v)
            except BaseException:
                for v in done:
                    v.engine.remove_ioeventfd(addr, length, fd)
                raise
            self._ioeventfds.append((addr, length, fd))
        return True

    def remove_ioeventfd(self, addr: int, length: int, fd: int) -> None:
        with self._ioeventfd_lock:
            if (addr, length, fd) not in self._ioeventfds:
                return
            self._ioeventfds.remove((addr, length, fd))
            for v in self.vcpus:
                v.engine.remove_ioeventfd(addr, length, fd)

    def close(self) -> None:
        self.chip.close()
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()


class EmulatedVcpu:
    STATE_VERSION: ClassVar[int] = 1
    state_type: ClassVar[type] = EmulatedVcpuState

    def __init__(self, vm: EmulatedVm, index: int) -> None:
        self.vm = vm
        self.index = index
        self._run_lock = threading.Lock()
        # halted in Python (restored in HLT; see run()): woken by notify/kick
        self._soft_halted = False
        self._wake = threading.Event()
        self._kicked = False
        self._nmi_raised = False
        # counters (metrics): plain ints bumped on paths that already cost µs
        self.interrupts = 0
        self.nmis = 0
        self.kicks = 0
        self._io: list[_PortIo] = []
        self._mmio: list[_BusWindow] = []
        self._msr: MsrRouter | None = None
        eng = self.engine = Engine(halt="block")
        try:
            self._setup(eng)
        except BaseException:
            eng.close()
            raise

    def _setup(self, eng: Engine) -> None:
        vm, chip, i = self.vm, self.vm.chip, self.index
        for region in vm.memory.regions:
            eng.map_ram(region.guest_addr, region.size, region.host_addr)
        lapic = chip.lapic(i)
        ram = [(r.guest_addr, r.size) for r in vm.memory.regions]
        # everything else goes to the bus (the 64-bit PCI window included):
        # one region above RAM up to the physical address width
        for start, end in mmio_holes(ram):
            w = _BusWindow(start, bus=vm.mmio)
            eng.map_mmio(start, end - start, w.read, w.write)
            self._mmio.append(w)
        lw = _BusWindow(LAPIC_ADDR, device=lapic)
        eng.map_mmio(LAPIC_ADDR, LAPIC_MMIO_SIZE, lw.read, lw.write)
        self._mmio.append(lw)
        pio = _PortIo(vm.pio)
        eng.set_pio_handlers(pio.inp, pio.out)
        self._io.append(pio)
        self._msr = MsrRouter(lapic, vm)
        eng.set_msr_callback(self._msr)
        eng.set_cpuid(CpuidModel(vm.tsc_hz, APIC_BUS_HZ, apic_id=i))
        eng.set_irq_callback(self._make_ack(chip, eng, i, vm, self))
        chip.set_notify(i, self._make_notify(lapic, eng, self))

    def metrics(self) -> dict[str, int]:
        """Monotonic counters: exits to Python by kind (``exits_io`` port I/O,
        ``exits_mmio`` MMIO incl. the LAPIC page, ``exits_msr``, ``exits_cpuid``),
        ``interrupts`` and ``nmis`` delivered, ``kicks``. HLT is not counted: it
        sleeps inside the engine without leaving it."""
        return {
            "exits_io": sum(p.count for p in self._io),
            "exits_mmio": sum(w.count for w in self._mmio),
            "exits_msr": self._msr.count if self._msr is not None else 0,
            "exits_cpuid": self.engine.cpuid_exits,
            "interrupts": self.interrupts,
            "nmis": self.nmis,
            "kicks": self.kicks,
        }

    @staticmethod
    def _make_ack(chip: EmulatedIrqChip, eng: Engine, i: int,
                  vm: EmulatedVm, vcpu: EmulatedVcpu) -> Callable[[], int]:
        interrupt_for_cpu = chip.interrupt_for_cpu
        has_interrupt = chip.has_interrupt
        raise_irq = eng.raise_irq

        def ack() -> int:
            if vm._dma_ranges:  # on this (the vCPU) thread, before the guest looks
                vm.apply_dma_invalidations()
            # the engine lowered INTR before calling us; raise it again while
            # another interrupt is deliverable (e.g. a higher-priority class).
            # Only after a delivery: if the chip claims an interrupt it then
            # does not hand out (a guest-made state, e.g. LINT0 ExtINT with an
            # odd polarity), re-raising would acknowledge forever without
            # running the guest. A later interrupt raises INTR through notify.
            v = interrupt_for_cpu(i)
            if v is None:
                return -1
            vcpu.interrupts += 1
            if has_interrupt(i):
                raise_irq()
            return v

        return ack

    @staticmethod
    def _make_notify(lapic: LocalApic, eng: Engine, vcpu: EmulatedVcpu) -> Callable[[], None]:
        raise_irq = eng.raise_irq

        def notify() -> None:
            # may run on any thread with PIT/PIC/IOAPIC locks held (never the
            # LAPIC's): only touch the engine, the LAPIC's NMI latch and the
            # vCPU's wake-up flags
            if lapic.nmi_pending() and lapic.take_nmi():
                vcpu.nmis += 1
                vcpu._nmi_raised = True
                eng.raise_nmi()
            raise_irq()
            if vcpu._soft_halted:
                vcpu._wake.set()

        return notify

    def set_boot_state(self, state: CpuState) -> None:
        eng = self.engine
        # a reboot in place: out of HLT, and no translated code of the last boot
        # (the host loaded the kernel again, which TCG's SMC tracking cannot see;
        # its cached code held the text Linux had patched at run time)
        eng.unhalt()
        self._soft_halted = self._nmi_raised = False
        eng.flush_code()
        tr = state.tr
        eng.set_long_mode(LongModeState(
            rip=state.rip, cr3=state.cr3, rsp=state.rsp, rsi=state.rsi, rflags=state.rflags,
            gdt_base=state.gdt.base, gdt_limit=state.gdt.limit,
            idt_base=state.idt.base, idt_limit=state.idt.limit,
            cs=_engine_segment(state.cs), ss=_engine_segment(state.ss),
            data=_engine_segment(state.ds),
            tr=None if tr.unusable else _engine_segment(tr),
            efer=state.efer, cr0=state.cr0, cr4=state.cr4))
        for name in ("rax", "rbx", "rcx", "rdx", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12",
                     "r13", "r14", "r15"):
            value = getattr(state, name)
            if value:
                eng.set_reg(name, value)
        for seg_name in ("es", "fs", "gs"):
            seg = getattr(state, seg_name)
            if seg != state.ds:
                eng.set_segment(getattr(_uc, f"SEG_{seg_name.upper()}"), _engine_segment(seg))
        for msr, value in state.msrs.items():
            try:
                eng.wrmsr(msr, value)
            except Exception as exc:  # the engine's MSR set lacks it: not fatal for a boot
                log.debug("vCPU %d: boot MSR %#x not settable: %s", self.index, msr, exc)

    def run(self) -> VcpuExit:
        eng = self.engine
        with self._run_lock:
            if self._soft_halted and not self._soft_halt_wait():
                return VcpuExit(ExitKind.KICKED)
            while True:
                try:
                    r = eng.run()
                except EngineError as exc:
                    return VcpuExit(ExitKind.INTERNAL_ERROR, f"engine: {exc}", self.registers())
                if r is RunExit.STOPPED:
                    self._kicked = False
                    self.vm.apply_dma_invalidations()
                    return VcpuExit(ExitKind.KICKED)
                if r is RunExit.SHUTDOWN:
                    return VcpuExit(ExitKind.SHUTDOWN, "triple fault (shutdown)",
                                    self.registers())
                if r is RunExit.ERROR:
                    return VcpuExit(ExitKind.INTERNAL_ERROR, self._error_detail(),
                                    self.registers())
                if r is RunExit.HALTED:  # only in "return" halt mode: wait is ours
                    return VcpuExit(ExitKind.HALTED, "hlt", self.registers())
                # DONE: the engine hit an instruction count we never set: go on

    def _error_detail(self) -> str:
        err = getattr(self.engine, "last_error", None)
        regs = self.registers()
        where = f" at rip {regs.get('rip', 0):#x}" if regs else ""
        what = str(err) if err is not None else "unknown engine error"
        hint = ""
        if err is not None and "UNMAPPED" in str(err).upper():
            hint = " (guest-physical address beyond the CPU's physical address width)"
        return f"software CPU stopped: {what}{where}{hint}"

    def _soft_halt_wait(self) -> bool:
        """HLT for a vCPU restored halted (the engine itself cannot be put into
        HLT): sleep until an interrupt it would take (IF=1) or an NMI is
        pending, then let the engine take it, as it would leave HLT (RIP
        already points after the HLT). False when kicked first (still halted)."""
        eng = self.engine
        while True:
            self._wake.clear()
            if self._kicked:
                eng.run()  # consumes the engine's sticky kick: returns before any insn
                self._kicked = False
                return False
            if self._nmi_raised or (eng.reg("rflags") & 0x200
                                    and self.vm.chip.has_interrupt(self.index)):
                self._soft_halted = False
                return True
            self._wake.wait()

    def kick(self) -> None:
        self.kicks += 1
        self._kicked = True
        self.engine.stop()
        self._wake.set()

    # -- saved state ---------------------------------------------------------

    def save_state(self) -> EmulatedVcpuState:
        """The whole CPU context (``Engine.context_bytes``), whether it is in
        HLT, and the guest TSC. Only while parked (``run()`` not running)."""
        if not self._run_lock.acquire(blocking=False):
            raise HypervisorError(f"vCPU {self.index} is running: park it before saving")
        try:
            eng = self.engine
            return EmulatedVcpuState(
                version=self.STATE_VERSION, index=self.index,
                engine=build_identity(eng.context_size()),
                context=eng.context_bytes(), halted=self._soft_halted or eng.halted,
                tsc_hz=self.vm.tsc_hz, guest_tsc=eng.rdmsr(MSR_IA32_TSC),
                wall_ns=time.time_ns())
        finally:
            self._run_lock.release()

    def restore_state(self, st: EmulatedVcpuState) -> None:
        """Load a saved CPU (parked; fresh or used). Refused (``StateError``)
        when saved by another engine build, for another vCPU, or on a host
        whose TSC rate differs. The guest TSC moves on by the wall time since
        the save (``EmulatedVm.move_clock``); a vCPU saved in HLT stays there
        until an interrupt; INTR is raised if one is deliverable.

        The raw context is checked only for its build and size: its contents
        are trusted as the checksummed snapshot's."""
        part = f"vcpu{self.index}"
        check_version(part, st.version, self.STATE_VERSION)
        check_int(part, "index", st.index, self.index, self.index)
        ours = build_identity(self.engine.context_size())
        if st.engine != ours:
            raise StateError(f"{part}: saved by another software CPU engine ({st.engine}); "
                             f"this one is {ours}")
        if type(st.context) is not bytes or len(st.context) != self.engine.context_size():
            raise StateError(f"{part}: saved CPU context has the wrong size")
        check_bool(part, "halted", st.halted)
        _check_clock(part, st.tsc_hz, st.guest_tsc, st.wall_ns, self.vm.tsc_hz)
        if not self._run_lock.acquire(blocking=False):
            raise HypervisorError(f"vCPU {self.index} is running: park it before restoring")
        try:
            eng = self.engine
            try:
                eng.unhalt()
                eng.set_context_bytes(st.context)
            except EngineError as exc:
                raise StateError(f"{part}: the engine refused the saved CPU context: "
                                 f"{exc}") from None
            self.vm.move_clock(part, st.tsc_hz, st.guest_tsc, st.wall_ns)
            self._soft_halted = st.halted
            self._nmi_raised = False
            eng.lower_irq()
            if self.vm.chip.has_interrupt(self.index):
                eng.raise_irq()
        finally:
            self._run_lock.release()

    def registers(self) -> dict[str, int]:
        try:
            return self.engine.registers()
        except Exception:  # a closed engine: nothing to report
            return {}

    def close(self) -> None:
        self.vm.chip.set_notify(self.index, None)
        self.kick()  # also wakes a vCPU halted in Python (_soft_halt_wait)
        # a vCPU thread that never came back still uses the engine: leak it then
        if self._run_lock.acquire(timeout=2.0):
            try:
                self.engine.close()
            finally:
                self._run_lock.release()
        else:
            log.warning("vCPU %d still running; its engine is not freed", self.index)
