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
  * guest writes to IA32_TSC (MSR 0x10) change the engine's TSC offset but not
    what the LAPIC's TSC-deadline timer compares against; Linux does not write
    it on a single CPU.
  * writes into guest RAM from the host (device DMA) bypass TCG's
    self-modifying-code tracking: devices report them (``Vm.note_dma_write``),
    the ranges are queued and dropped on the vCPU thread by engine patch 0011
    when the CPU next takes an interrupt (the completion interrupt) or stops.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import unicorn

from pyvirt.arch.x86_64.cpu_state import CpuState
from pyvirt.arch.x86_64.cpu_state import Segment as CpuSegment
from pyvirt.arch.x86_64.layout import LAPIC_ADDR
from pyvirt.devices.bus import Bus, BusDevice
from pyvirt.devices.irq import IrqLine
from pyvirt.hypervisor.base import ExitKind, HypervisorError, VcpuExit
from pyvirt.hypervisor.emulated import _uc, hosttsc
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
)
from pyvirt.hypervisor.emulated.engine import Segment as EngineSegment
from pyvirt.hypervisor.emulated.irqchip import LAPIC_MMIO_SIZE, EmulatedIrqChip
from pyvirt.hypervisor.emulated.lapic import APIC_BUS_HZ, ApicBus, ApicMsrFault, LocalApic
from pyvirt.memory import GuestMemory

__all__ = [
    "ENGINE_DESCRIPTION",
    "PHYS_ADDR_BITS",
    "EmulatedHypervisor",
    "EmulatedVcpu",
    "EmulatedVm",
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


class MsrRouter:
    """The engine's MSR callback: LAPIC MSRs to the LAPIC, the rest native."""

    __slots__ = ("lapic",)

    def __init__(self, lapic: LocalApic) -> None:
        self.lapic = lapic

    def __call__(self, msr: int, is_write: bool, value: int) -> tuple[MsrResult, int]:
        if not LocalApic.handles_msr(msr):
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

    __slots__ = ("base", "bus", "device", "views")

    def __init__(self, base: int, *, bus: Bus | None = None,
                 device: BusDevice | None = None) -> None:
        self.base = base
        self.bus = bus
        self.device = device
        buf = bytearray(8)
        mv = memoryview(buf)
        self.views = {n: mv[:n] for n in (1, 2, 4, 8)}

    def read(self, off: int, size: int) -> int:
        data = self.views.get(size) or memoryview(bytearray(size))
        data[:] = b"\xff" * size  # bytes a device leaves alone read as all-ones
        if self.device is not None:
            self.device.read(off, data)
        else:
            assert self.bus is not None
            self.bus.read(self.base + off, data)
        return int.from_bytes(data, "little")

    def write(self, off: int, size: int, value: int) -> None:
        data = self.views.get(size) or memoryview(bytearray(size))
        data[:] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        if self.device is not None:
            self.device.write(off, data)
        else:
            assert self.bus is not None
            self.bus.write(self.base + off, data)


class _PortIo:
    """Engine IN/OUT hooks dispatching to the pio bus with reusable buffers."""

    __slots__ = ("bus", "views")

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        mv = memoryview(bytearray(4))
        self.views = {1: mv[:1], 2: mv[:2], 4: mv[:4]}

    def inp(self, port: int, size: int) -> int:
        data = self.views[size]
        data[:] = b"\xff" * size
        found = self.bus.lookup(port)
        if found is None:
            self.bus.read(port, data)
        else:
            found[0].read(found[1], data)
        return int.from_bytes(data, "little")

    def out(self, port: int, size: int, value: int) -> None:
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
                "--accel emu: the installed unicorn lacks pyvirt's patches "
                "(run third_party/unicorn/build.sh .venv/bin/python)")

    def max_vcpus(self) -> int:
        return 1

    def create_vm(self, memory: GuestMemory, pio: Bus, mmio: Bus, *, num_cpus: int) -> EmulatedVm:
        if num_cpus > self.max_vcpus():
            raise HypervisorError(f"--cpus {num_cpus}: the software CPU runs 1 vCPU for now")
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


class EmulatedVm:
    def __init__(self, memory: GuestMemory, pio: Bus, mmio: Bus, num_cpus: int) -> None:
        self.memory = memory
        self.pio = pio
        self.mmio = mmio
        self.num_cpus = num_cpus
        self.tsc_hz = hosttsc.tsc_hz()
        self.chip = EmulatedIrqChip(num_cpus, tsc_hz=self.tsc_hz, now_tsc=hosttsc.rdtsc,
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
    def __init__(self, vm: EmulatedVm, index: int) -> None:
        self.vm = vm
        self.index = index
        self._run_lock = threading.Lock()
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
        lw = _BusWindow(LAPIC_ADDR, device=lapic)
        eng.map_mmio(LAPIC_ADDR, LAPIC_MMIO_SIZE, lw.read, lw.write)
        pio = _PortIo(vm.pio)
        eng.set_pio_handlers(pio.inp, pio.out)
        eng.set_msr_callback(MsrRouter(lapic))
        eng.set_cpuid(CpuidModel(vm.tsc_hz, APIC_BUS_HZ, apic_id=i))
        eng.set_irq_callback(self._make_ack(chip, eng, i, vm))
        chip.set_notify(i, self._make_notify(lapic, eng))

    @staticmethod
    def _make_ack(chip: EmulatedIrqChip, eng: Engine, i: int,
                  vm: EmulatedVm) -> Callable[[], int]:
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
            if has_interrupt(i):
                raise_irq()
            return v

        return ack

    @staticmethod
    def _make_notify(lapic: LocalApic, eng: Engine) -> Callable[[], None]:
        raise_irq = eng.raise_irq

        def notify() -> None:
            # may run on any thread with PIT/PIC/IOAPIC locks held (never the
            # LAPIC's): only touch the engine, and the LAPIC's NMI latch
            if lapic.nmi_pending() and lapic.take_nmi():
                eng.raise_nmi()
            raise_irq()

        return notify

    def set_boot_state(self, state: CpuState) -> None:
        eng = self.engine
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
            while True:
                try:
                    r = eng.run()
                except EngineError as exc:
                    return VcpuExit(ExitKind.INTERNAL_ERROR, f"engine: {exc}", self.registers())
                if r is RunExit.STOPPED:
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

    def kick(self) -> None:
        self.engine.stop()

    def registers(self) -> dict[str, int]:
        try:
            return self.engine.registers()
        except Exception:  # a closed engine: nothing to report
            return {}

    def close(self) -> None:
        self.vm.chip.set_notify(self.index, None)
        self.engine.stop()
        # a vCPU thread that never came back still uses the engine: leak it then
        if self._run_lock.acquire(timeout=2.0):
            try:
                self.engine.close()
            finally:
                self._run_lock.release()
        else:
            log.warning("vCPU %d still running; its engine is not freed", self.index)
