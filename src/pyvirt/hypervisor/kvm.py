"""The KVM backend: in-kernel LAPIC/IOAPIC/PIC/PIT, vCPUs in ``KVM_RUN``.

The vCPU loop is the hot path: one ``KVM_RUN`` ioctl (which releases the GIL),
then the exit decoded with one precompiled ``struct`` unpack from the mmap'd
``kvm_run`` page, and port I/O dispatched to the bus with the data as a
zero-copy memoryview into that page. Everything the VMM must act on is
returned as a ``VcpuExit``.

Kicking: ``kick()`` sets ``kvm_run.immediate_exit`` (so a vCPU about to enter
the guest returns at once) and sends SIGUSR1 to the vCPU's thread (so one
inside the guest leaves with EINTR). The VMM installs a no-op SIGUSR1 handler.
Parking is the caller not calling ``run()`` again until it resumes.

Saved state (``pyvirt.state``): ``KvmVcpu.save_state``/``restore_state`` carry
what a vCPU holds in KVM (registers, FPU/XSAVE, XCRs, MSRs, LAPIC, pending
events, MP state, debug registers) and ``KvmVm.save_state``/``restore_state``
the VM-wide in-kernel parts (both PICs, the IOAPIC, the PIT, kvmclock). The
kernel structures are kept as their raw bytes (checked for length here, for
content by KVM: a refusal is a ``StateError`` naming the field). Time moves
on across a save: a restore advances kvmclock and each vCPU's TSC by the host
wall-clock time elapsed since the save, so the guest's clocks agree with the
host's (PVM cannot offset a guest's TSC: it takes the write and ignores it,
the guest runs on the host's TSC, so a restore there finds it moved on by
itself, and refuses one that would put it behind the saved TSC). An overdue
timer then fires once, not once per missed period (KVM keeps one pending
timer interrupt, and restarts a periodic LAPIC timer from the restore).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar, TypeVar

from pyvirt.arch.x86_64.cpu_state import CpuState, Segment
from pyvirt.arch.x86_64.cpuid import CpuidEntry, shape_cpuid
from pyvirt.arch.x86_64.msr import IA32_TSC, boot_msrs
from pyvirt.devices.bus import Bus
from pyvirt.hypervisor.base import ExitKind, HypervisorError, VcpuExit
from pyvirt.kvm import Kvm, KvmError, VcpuFd, VmFd
from pyvirt.kvm import _abi as abi
from pyvirt.kvm._errors import ioctl_error
from pyvirt.kvm.fd import ZERO_ARG, irq_routing_irqchip, irq_routing_msi, libc_ioctl
from pyvirt.memory import GuestMemory
from pyvirt.state import StateError, check_version

__all__ = ["KvmHypervisor", "KvmIrqLine", "KvmVcpu", "KvmVcpuState", "KvmVm", "KvmVmState"]

log = logging.getLogger(__name__)

# kvm_run: exit_reason at 8; the exit union at 32. From offset 8: exit_reason,
# then (at 32) io: direction u8, size u8, port u16, count u32, data_offset u64.
_EXIT_AND_IO = struct.Struct("<I20xBBHIQ")
# mmio: phys_addr u64, data[8], len u32, is_write u8
_MMIO = struct.Struct("<Q8sIB")
_SYSTEM_EVENT = struct.Struct("<IIQ")
_INTERNAL = struct.Struct("<II")
_FAIL_ENTRY = struct.Struct("<QI")
_IMMEDIATE_EXIT_OFF = 1  # byte offset of kvm_run.immediate_exit

PioFn = Callable[[int, memoryview], None]

TSS_ADDR = 0xFFFB_D000  # three pages KVM needs below 4 GiB on Intel (unused by the guest)
IDENTITY_MAP_ADDR = 0xFFFB_C000


class KvmHypervisor:
    name = "kvm"

    def __init__(self) -> None:
        try:
            self.kvm = Kvm()
        except KvmError as exc:
            raise HypervisorError(str(exc)) from exc

    def max_vcpus(self) -> int:
        n = self.kvm.check_extension(abi.KVM_CAP_MAX_VCPUS)
        return n or self.kvm.check_extension(abi.KVM_CAP_NR_VCPUS) or 1

    def create_vm(self, memory: GuestMemory, pio: Bus, mmio: Bus, *, num_cpus: int) -> KvmVm:
        if num_cpus > self.max_vcpus():
            raise HypervisorError(
                f"cpus: {num_cpus}: this host's KVM allows at most {self.max_vcpus()} vCPUs")
        return KvmVm(self.kvm, memory, pio, mmio, num_cpus)


class KvmIrqLine:
    """A GSI on the in-kernel PIC/IOAPIC, driven with KVM_IRQ_LINE on level changes."""

    def __init__(self, vm: VmFd, gsi: int) -> None:
        self._vm = vm
        self._gsi = gsi
        # the level last sent to KVM; None after a VM restore replaced the
        # irqchip state, so the next set_level reaches KVM whatever it is
        self._level: bool | None = False
        self._lock = threading.Lock()

    def set_level(self, level: bool) -> None:
        if level is self._level:
            return
        with self._lock:
            if level is not self._level:
                self._level = level
                self._vm.irq_line(self._gsi, 1 if level else 0)

    def forget_level(self) -> None:
        with self._lock:
            self._level = None


IOAPIC_PINS = 24


class KvmMsiRoute:
    """An MSI-X vector under KVM: a GSI routed to the message, fed by an irqfd."""

    def __init__(self, vm: KvmVm, gsi: int) -> None:
        self._vm = vm
        self.gsi = gsi
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            vm.fd.irqfd(self.fd, gsi)
        except BaseException:
            os.close(self.fd)
            raise

    def update(self, address: int, data: int) -> None:
        self._vm._set_msi(self.gsi, address, data)

    def trigger(self) -> None:
        os.eventfd_write(self.fd, 1)

    def close(self) -> None:
        if self.fd < 0:
            return
        if not self._vm.fd.closed:
            self._vm.fd.irqfd(self.fd, self.gsi, abi.KVM_IRQFD_FLAG_DEASSIGN)
        self._vm._drop_msi(self.gsi)
        os.close(self.fd)
        self.fd = -1


# MSRs a vCPU save adds to KVM_GET_MSR_INDEX_LIST (which lists what KVM
# saves, but not the MTRRs): IA32_MTRR_DEF_TYPE, the 11 fixed-range MTRRs and
# the variable pairs from 0x200 (how many: IA32_MTRRCAP bits 7:0). SDM Vol. 3A 12.11.
_MTRR_DEF_TYPE = 0x2FF
_MTRRCAP = 0xFE
_MTRR_FIXED = (0x250, 0x258, 0x259, *range(0x268, 0x270))
_MTRR_PHYS_BASE0 = 0x200
_MAX_SAVED_MSRS = 1024  # a record's bound; KVM knows well under 200
_MAX_XSAVE_BYTES = 1 << 16  # KVM_CAP_XSAVE2 sizes are a few KiB (AMX: ~11 KiB)
_TSC_KHZ_TOLERANCE_PPM = 250  # the drift NTP corrects; beyond it, scale or refuse
_IOAPIC_BASE = 0xFEC0_0000
_MP_STATE_MAX = 8  # KVM_MP_STATE_* (RUNNABLE .. AP_RESET_HOLD)


_S = TypeVar("_S", bound=ctypes.Structure)


def _blob(part: str, field: str, data: bytes, struct_type: type[_S]) -> _S:
    """A kernel structure from a record's bytes, which must be exactly its size."""
    if len(data) != ctypes.sizeof(struct_type):
        raise StateError(f"{part}: saved state field {field} holds {len(data)} bytes, "
                         f"not the {ctypes.sizeof(struct_type)} of struct "
                         f"{struct_type.__name__}")
    return struct_type.from_buffer_copy(data)


def _refused(part: str, field: str, exc: KvmError) -> StateError:
    return StateError(f"{part}: KVM refused the saved {field}: {exc}")


def _pairs(part: str, field: str, pairs: Iterable[tuple[int, int]], limit: int,
           index_bits: int) -> list[tuple[int, int]]:
    out = list(pairs)
    if len(out) > limit:
        raise StateError(f"{part}: saved state field {field} has {len(out)} entries "
                         f"(at most {limit})")
    for index, value in out:
        if not 0 <= index < 1 << index_bits or not 0 <= value < 1 << 64:
            raise StateError(f"{part}: saved state field {field}: entry "
                             f"({index:#x}, {value:#x}) is out of range")
    return out


@dataclass(frozen=True)
class KvmVmState:
    """The VM-wide in-kernel devices: kernel structures as raw bytes."""

    version: int
    pic_master: bytes  # struct kvm_pic_state
    pic_slave: bytes  # struct kvm_pic_state
    ioapic: bytes  # struct kvm_ioapic_state
    pit: bytes  # struct kvm_pit_state2
    clock_ns: int  # kvmclock (guest ns since boot) at the save
    realtime_ns: int  # host CLOCK_REALTIME at that moment


@dataclass(frozen=True)
class KvmVcpuState:
    """One vCPU as KVM holds it; kernel structures as raw bytes."""

    version: int
    index: int
    mp_state: int  # KVM_MP_STATE_*
    regs: bytes  # struct kvm_regs
    sregs: bytes  # struct kvm_sregs (holds EFER and the APIC base)
    xsave: bytes | None  # the KVM_GET_XSAVE(2) image (FPU, SSE, AVX...), if KVM has it
    fpu: bytes | None  # struct kvm_fpu, only where KVM lacks XSAVE
    xcrs: tuple[tuple[int, int], ...]  # (XCR number, value)
    debugregs: bytes  # struct kvm_debugregs
    lapic: bytes  # struct kvm_lapic_state
    msrs: tuple[tuple[int, int], ...]  # (index, value), IA32_TSC as read at the save
    events: bytes  # struct kvm_vcpu_events (pending exception/interrupt/NMI, shadow)
    tsc_khz: int  # the guest TSC frequency, 0 if KVM cannot tell
    realtime_ns: int  # host CLOCK_REALTIME when the TSC was read


class KvmVm:
    STATE_VERSION: ClassVar[int] = 1
    state_type: ClassVar[type] = KvmVmState

    def __init__(self, kvm: Kvm, memory: GuestMemory, pio: Bus, mmio: Bus, num_cpus: int) -> None:
        self.kvm = kvm
        self.memory = memory
        self.pio = pio
        self.mmio = mmio
        self.num_cpus = num_cpus
        self.fd = kvm.create_vm()
        try:
            for cap, name in ((abi.KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP"),
                              (abi.KVM_CAP_PIT2, "KVM_CAP_PIT2"),
                              (abi.KVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY")):
                if not kvm.check_extension(cap):
                    raise HypervisorError(f"KVM lacks capability {name}")
            self.fd.set_tss_addr(TSS_ADDR)
            self.fd.set_identity_map_addr(IDENTITY_MAP_ADDR)
            for slot, region in enumerate(memory.regions):
                self.fd.set_user_memory_region(slot, region.guest_addr, region.size,
                                               region.host_addr)
            self.fd.create_irqchip()
            self.fd.create_pit2(abi.KVM_PIT_SPEAKER_DUMMY)
            self.supported_cpuid = [
                CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                for e in kvm.get_supported_cpuid()]
        except BaseException:
            self.fd.close()
            raise
        self._lines: dict[int, KvmIrqLine] = {}
        self.vcpus: list[KvmVcpu] = []
        self._routing_lock = threading.Lock()
        self._next_gsi = IOAPIC_PINS
        self._msi: dict[int, tuple[int, int]] = {}
        # what a vCPU save needs to know about this KVM, found once
        xsave2 = self.fd.check_extension(abi.KVM_CAP_XSAVE2)
        has_xsave = self.fd.check_extension(abi.KVM_CAP_XSAVE) > 0
        self.xsave_size = xsave2 if xsave2 > 0 else (4096 if has_xsave else 0)
        self.clock_caps = self.fd.check_extension(abi.KVM_CAP_ADJUST_CLOCK)
        self.tsc_control = self.fd.check_extension(abi.KVM_CAP_TSC_CONTROL) > 0
        self.saved_msrs: list[int] | None = None  # filled by the first vCPU save
        self._paused_clock: int | None = None

    # ---- saved state (all vCPUs parked)

    def save_state(self) -> KvmVmState:
        try:
            chips = [bytes(self.fd.get_irqchip(chip).chip)
                     for chip in (abi.KVM_IRQCHIP_PIC_MASTER, abi.KVM_IRQCHIP_PIC_SLAVE,
                                  abi.KVM_IRQCHIP_IOAPIC)]
            pit = bytes(self.fd.get_pit2())
            clock = self.fd.get_clock()
        except KvmError as exc:
            raise HypervisorError(f"kvm-vm: cannot save state: {exc}") from exc
        realtime = time.clock_gettime_ns(time.CLOCK_REALTIME)
        if clock.flags & abi.KVM_CLOCK_REALTIME:
            realtime = int(clock.realtime)  # KVM's pair is read atomically: better
        return KvmVmState(
            self.STATE_VERSION,
            pic_master=chips[0][: ctypes.sizeof(abi.kvm_pic_state)],
            pic_slave=chips[1][: ctypes.sizeof(abi.kvm_pic_state)],
            ioapic=chips[2][: ctypes.sizeof(abi.kvm_ioapic_state)],
            pit=pit, clock_ns=int(clock.clock), realtime_ns=realtime)

    def restore_state(self, state: KvmVmState) -> None:
        """Leave the in-kernel PICs, IOAPIC and PIT as saved and kvmclock moved
        on by the host time elapsed since the save. The MSI routes are the
        devices' (their MSI-X restore calls ``KvmMsiRoute.update``)."""
        part = "kvm-vm"
        check_version(part, state.version, self.STATE_VERSION)
        pics = [_blob(part, name, data, abi.kvm_pic_state)
                for name, data in (("pic_master", state.pic_master),
                                   ("pic_slave", state.pic_slave))]
        ioapic = _blob(part, "ioapic", state.ioapic, abi.kvm_ioapic_state)
        if ioapic.base_address != _IOAPIC_BASE:  # KVM would move the IOAPIC out of sight
            raise StateError(f"{part}: saved state field ioapic.base_address = "
                             f"{ioapic.base_address:#x}, not {_IOAPIC_BASE:#x}")
        pit = _blob(part, "pit", state.pit, abi.kvm_pit_state2)
        for name, value in (("clock_ns", state.clock_ns), ("realtime_ns", state.realtime_ns)):
            if not 0 <= value < 1 << 63:
                raise StateError(f"{part}: saved state field {name} = {value} is out of range")
        field = ""
        try:
            for name, chip_id, pic in (("pic_master", abi.KVM_IRQCHIP_PIC_MASTER, pics[0]),
                                       ("pic_slave", abi.KVM_IRQCHIP_PIC_SLAVE, pics[1])):
                field = name
                chip = abi.kvm_irqchip(chip_id=chip_id)
                chip.chip.pic = pic
                self.fd.set_irqchip(chip)
            field = "ioapic"
            chip = abi.kvm_irqchip(chip_id=abi.KVM_IRQCHIP_IOAPIC)
            chip.chip.ioapic = ioapic
            self.fd.set_irqchip(chip)
            field = "pit"
            self.fd.set_pit2(pit)
            field = "clock_ns"
            self._set_clock_since(state.clock_ns, state.realtime_ns)
        except KvmError as exc:
            raise _refused(part, field, exc) from exc
        for line in self._lines.values():
            line.forget_level()  # the irqchip now holds the saved levels
        self._paused_clock = None

    def _set_clock_since(self, clock_ns: int, realtime_ns: int) -> None:
        """kvmclock = ``clock_ns`` plus the host wall-clock time since ``realtime_ns``."""
        if self.clock_caps & abi.KVM_CLOCK_REALTIME:
            # KVM adds the elapsed time itself, with no gap between reading
            # the host clock and setting the guest's
            self.fd.set_clock(abi.kvm_clock_data(clock=clock_ns, realtime=realtime_ns,
                                                 flags=abi.KVM_CLOCK_REALTIME))
            return
        elapsed = max(0, time.clock_gettime_ns(time.CLOCK_REALTIME) - realtime_ns)
        self.fd.set_clock(abi.kvm_clock_data(clock=clock_ns + elapsed))

    # ---- a paused guest's clock (optional: the VMM decides whether time stops)

    def pause_clock(self) -> None:
        """Stop kvmclock while the vCPUs are parked (``resume_clock`` restarts it
        where it stopped, as QEMU does on stop/cont) and tell a guest that uses
        kvmclock that it was paused (so it does not report soft lockups)."""
        if self._paused_clock is not None:
            return
        self._paused_clock = int(self.fd.get_clock().clock)
        for v in self.vcpus:
            v.notify_paused()

    def resume_clock(self) -> None:
        if self._paused_clock is None:
            return
        self.fd.set_clock(abi.kvm_clock_data(clock=self._paused_clock))
        self._paused_clock = None

    def msr_list(self, vcpu: VcpuFd) -> list[int]:
        """The MSRs a vCPU save carries: KVM_GET_MSR_INDEX_LIST (which names the
        kvmclock MSRs, TSC, TSC_ADJUST, TSC_DEADLINE, PAT, the SYSCALL and
        SYSENTER MSRs...) and the MTRRs, less any this KVM will not read back."""
        if self.saved_msrs is not None:
            return self.saved_msrs
        wanted = list(self.kvm.get_msr_index_list())
        try:
            vcnt = vcpu.get_msrs([_MTRRCAP])[_MTRRCAP] & 0xFF
        except KvmError:
            vcnt = 0
        for index in (_MTRR_DEF_TYPE, *_MTRR_FIXED,
                      *range(_MTRR_PHYS_BASE0, _MTRR_PHYS_BASE0 + 2 * vcnt)):
            if index not in wanted:
                wanted.append(index)
        readable = []
        for index in wanted:
            try:
                vcpu.get_msrs([index])
            except KvmError:
                continue  # listed, but depends on a CPU feature this guest lacks
            readable.append(index)
        self.saved_msrs = readable
        return readable

    def irq_line(self, gsi: int) -> KvmIrqLine:
        line = self._lines.get(gsi)
        if line is None:
            line = self._lines[gsi] = KvmIrqLine(self.fd, gsi)
        return line

    # ---- MSI routes and ioeventfds

    def msi_route(self) -> KvmMsiRoute:
        with self._routing_lock:
            gsi = self._next_gsi
            self._next_gsi += 1
            self._msi[gsi] = (0, 0)
            self._commit_routing_locked()
        return KvmMsiRoute(self, gsi)

    def _set_msi(self, gsi: int, address: int, data: int) -> None:
        with self._routing_lock:
            if self._msi.get(gsi) != (address, data):
                self._msi[gsi] = (address, data)
                self._commit_routing_locked()

    def _drop_msi(self, gsi: int) -> None:
        with self._routing_lock:
            if self._msi.pop(gsi, None) is not None and not self.fd.closed:
                self._commit_routing_locked()

    def _commit_routing_locked(self) -> None:
        # KVM_SET_GSI_ROUTING replaces the whole table: keep the default
        # routes KVM_CREATE_IRQCHIP installed (GSI 0-15 on both the PIC and
        # the IOAPIC, 16-23 on the IOAPIC) in front of the MSI routes.
        entries = []
        for gsi in range(IOAPIC_PINS):
            entries.append(irq_routing_irqchip(gsi, abi.KVM_IRQCHIP_IOAPIC, gsi))
            if gsi < 16:
                chip = abi.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else abi.KVM_IRQCHIP_PIC_SLAVE
                entries.append(irq_routing_irqchip(gsi, chip, gsi % 8))
        for gsi, (address, data) in sorted(self._msi.items()):
            entries.append(irq_routing_msi(gsi, address, data))
        self.fd.set_gsi_routing(entries)

    def add_ioeventfd(self, addr: int, length: int, fd: int) -> bool:
        self.fd.ioeventfd(fd, addr, length)
        return True

    def remove_ioeventfd(self, addr: int, length: int, fd: int) -> None:
        if not self.fd.closed:
            self.fd.ioeventfd(fd, addr, length, flags=abi.KVM_IOEVENTFD_FLAG_DEASSIGN)

    def note_dma_write(self, gpa: int, size: int) -> None:
        pass  # the CPU sees host writes to guest RAM like any other

    def create_vcpu(self, index: int) -> KvmVcpu:
        v = KvmVcpu(self, index)
        self.vcpus.append(v)
        return v

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
        self.fd.close()


class KvmVcpu:
    STATE_VERSION: ClassVar[int] = 1
    state_type: ClassVar[type] = KvmVcpuState

    # Exit counters (``metrics()``). Class-level zeros, so the first ``+= 1``
    # makes the instance's own; a plain int attribute increment is the
    # cheapest counter the hot loop can carry (see docs/benchmarks.md).
    exits_io: int = 0
    exits_mmio: int = 0
    exits_hlt: int = 0
    exits_intr: int = 0
    exits_system_event: int = 0
    exits_other: int = 0

    def __init__(self, vm: KvmVm, index: int) -> None:
        self.vm = vm
        self.index = index
        self.fd: VcpuFd = vm.fd.create_vcpu(index)
        self._tid: int | None = None
        self._pio_handlers: dict[int, tuple[PioFn, PioFn, int]] = {}
        self._pio_views: dict[int, memoryview] = {}
        entries = shape_cpuid(vm.supported_cpuid, vcpu_index=index, num_cpus=vm.num_cpus)
        self.fd.set_cpuid2([abi.kvm_cpuid_entry2(function=e.function, index=e.index,
                                                 flags=e.flags, eax=e.eax, ebx=e.ebx, ecx=e.ecx,
                                                 edx=e.edx) for e in entries])
        if index != 0:
            self.fd.set_msrs(boot_msrs())  # the BSP gets them with its boot state

    def set_boot_state(self, state: CpuState) -> None:
        sregs = self.fd.get_sregs()
        for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
            _set_segment(getattr(sregs, name), getattr(state, name))
        sregs.gdt.base, sregs.gdt.limit = state.gdt.base, state.gdt.limit
        sregs.idt.base, sregs.idt.limit = state.idt.base, state.idt.limit
        sregs.cr0, sregs.cr2, sregs.cr3 = state.cr0, state.cr2, state.cr3
        sregs.cr4, sregs.cr8, sregs.efer = state.cr4, state.cr8, state.efer
        self.fd.set_sregs(sregs)
        regs = self.fd.get_regs()
        for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
                     "r11", "r12", "r13", "r14", "r15", "rip", "rflags"):
            setattr(regs, name, getattr(state, name))
        self.fd.set_regs(regs)
        if state.msrs:
            self.fd.set_msrs(state.msrs)

    def _pio_handler(self, port: int) -> tuple[PioFn, PioFn, int] | None:
        """(read, write, offset) of the device at ``port``, None if nobody claims it.

        Only claimed ports are cached (the pio bus is fixed once vCPUs run), so
        the cache is bounded by what devices cover, not by how many ports the
        guest probes; an unclaimed access goes to the bus each time.
        """
        found = self.vm.pio.lookup(port)
        if found is None:
            return None
        dev, offset = found
        return dev.read, dev.write, offset

    def run(self) -> VcpuExit:
        """The hot loop. Returns only for what the VMM must handle."""
        self._tid = threading.get_ident()
        fd = self.fd.fileno()
        run_buf = self.fd.run_view  # writable memoryview of the kvm_run page
        # libc ioctl through ctypes: fcntl.ioctl costs ~0.5 us more per call
        # (it probes its int argument as a buffer first); ctypes releases the GIL.
        ioctl = libc_ioctl
        zero = ZERO_ARG
        get_errno = ctypes.get_errno
        KVM_RUN = abi.KVM_RUN
        unpack_exit = _EXIT_AND_IO.unpack_from  # exit_reason and the io fields, one call
        EXIT_IO = abi.KVM_EXIT_IO
        EXIT_MMIO = abi.KVM_EXIT_MMIO
        handlers = self._pio_handlers
        views = self._pio_views
        while True:
            if ioctl(fd, KVM_RUN, zero) < 0:
                err = get_errno()
                if err == errno.EINTR:
                    run_buf[_IMMEDIATE_EXIT_OFF] = 0
                    self.exits_intr += 1
                    return VcpuExit(ExitKind.KICKED)
                if err == errno.EAGAIN:
                    # an application processor woke up but still waits for
                    # INIT/SIPI (KVM_MP_STATE_UNINITIALIZED): enter again
                    continue
                raise ioctl_error("KVM_RUN", err)
            reason, direction, size, port, count, off = unpack_exit(run_buf, 8)
            if reason == EXIT_IO:
                self.exits_io += 1
                if count == 1:
                    # the common case: no allocation (cached view, cached handler)
                    data = views.get(off << 4 | size)
                    if data is None:
                        data = views[off << 4 | size] = run_buf[off : off + size]
                    h = handlers.get(port)
                    if h is None:
                        h = self._pio_handler(port)
                        if h is None:  # unclaimed: counted by the bus, not cached
                            if direction:
                                self.vm.pio.write(port, data)
                            else:
                                self.vm.pio.read(port, data)
                            continue
                        handlers[port] = h
                    if direction:  # KVM_EXIT_IO_OUT
                        h[1](h[2], data)
                    else:
                        h[0](h[2], data)
                else:
                    pio = self.vm.pio
                    for i in range(count):  # rep ins/outs: one element at a time
                        data = run_buf[off + i * size : off + (i + 1) * size]
                        if direction:
                            pio.write(port, data)
                        else:
                            pio.read(port, data)
                continue
            if reason == EXIT_MMIO:
                self.exits_mmio += 1
                addr, _, length, is_write = _MMIO.unpack_from(run_buf, 32)
                if length > 8:
                    return VcpuExit(ExitKind.INTERNAL_ERROR, f"MMIO access of {length} bytes",
                                    self.registers())
                data = run_buf[40 : 40 + length]
                if is_write:
                    self.vm.mmio.write(addr, data)
                else:
                    self.vm.mmio.read(addr, data)
                continue
            ex = self._slow_exit(reason)
            if ex is not None:
                return ex

    def _slow_exit(self, reason: int) -> VcpuExit | None:
        buf = self.fd.run_view
        if reason == abi.KVM_EXIT_INTR:
            buf[_IMMEDIATE_EXIT_OFF] = 0
            self.exits_intr += 1
            return VcpuExit(ExitKind.KICKED)
        if reason == abi.KVM_EXIT_SYSTEM_EVENT:
            self.exits_system_event += 1
        elif reason == abi.KVM_EXIT_HLT:
            self.exits_hlt += 1
        else:
            self.exits_other += 1
        if reason == abi.KVM_EXIT_SHUTDOWN:
            return VcpuExit(ExitKind.SHUTDOWN, "triple fault (shutdown)", self.registers())
        if reason == abi.KVM_EXIT_SYSTEM_EVENT:
            typ = _SYSTEM_EVENT.unpack_from(buf, 32)[0]
            if typ == abi.KVM_SYSTEM_EVENT_SHUTDOWN:
                return VcpuExit(ExitKind.POWEROFF)
            if typ == abi.KVM_SYSTEM_EVENT_RESET:
                return VcpuExit(ExitKind.RESET)
            return VcpuExit(ExitKind.INTERNAL_ERROR, f"system event {typ}", self.registers())
        if reason == abi.KVM_EXIT_HLT:
            return VcpuExit(ExitKind.HALTED, "hlt without an in-kernel irqchip", self.registers())
        if reason == abi.KVM_EXIT_INTERNAL_ERROR:
            sub, _ndata = _INTERNAL.unpack_from(buf, 32)
            what = {1: "emulation failure", 2: "simultaneous exceptions",
                    3: "delivery event"}.get(sub, f"suberror {sub}")
            return VcpuExit(ExitKind.INTERNAL_ERROR, f"KVM internal error: {what}",
                            self.registers())
        if reason == abi.KVM_EXIT_FAIL_ENTRY:
            code, cpu = _FAIL_ENTRY.unpack_from(buf, 32)
            return VcpuExit(ExitKind.INTERNAL_ERROR,
                            f"VM entry failed (hardware reason {code:#x}, cpu {cpu})",
                            self.registers())
        return VcpuExit(ExitKind.INTERNAL_ERROR, f"unhandled KVM exit reason {reason}",
                        self.registers())

    def metrics(self) -> dict[str, int]:
        """Exits by kind since the vCPU was created (monotonic counters). With the
        in-kernel irqchip HLT is handled inside KVM, so ``exits_hlt`` stays 0;
        ``exits_intr`` counts kicks (KVM_RUN interrupted by a signal)."""
        return {"exits_io": self.exits_io, "exits_mmio": self.exits_mmio,
                "exits_hlt": self.exits_hlt, "exits_intr": self.exits_intr,
                "exits_system_event": self.exits_system_event,
                "exits_other": self.exits_other}

    # ---- saved state (the vCPU parked: not inside run())

    def save_state(self) -> KvmVcpuState:
        """Everything KVM holds for this vCPU, read in the order Firecracker
        uses: MP state first (reading it may accept pending INIT/SIPI into the
        LAPIC), vCPU events last (the other reads may change what is pending)."""
        fd = self.fd
        vm = self.vm
        try:
            mp_state = fd.get_mp_state()
            regs = bytes(fd.get_regs())
            sregs = bytes(fd.get_sregs())
            xsave: bytes | None = None
            fpu: bytes | None = None
            if vm.xsave_size > 4096:
                xsave = bytes(fd.get_xsave2(vm.xsave_size))[: vm.xsave_size]
            elif vm.xsave_size:
                xsave = bytes(fd.get_xsave())
            else:
                fpu = bytes(fd.get_fpu())
            xc = fd.get_xcrs() if vm.xsave_size else None
            xcrs = tuple((int(xc.xcrs[i].xcr), int(xc.xcrs[i].value))
                         for i in range(min(xc.nr_xcrs, abi.KVM_MAX_XCRS))) if xc else ()
            debugregs = bytes(fd.get_debugregs())
            lapic = bytes(fd.get_lapic())
            indices = vm.msr_list(fd)
            values = fd.get_msrs(indices)
            realtime = time.clock_gettime_ns(time.CLOCK_REALTIME)  # with the TSC
            try:
                tsc_khz = fd.get_tsc_khz()
            except KvmError:
                tsc_khz = 0
            events = bytes(fd.get_vcpu_events())
        except KvmError as exc:
            raise HypervisorError(f"vcpu{self.index}: cannot save state: {exc}") from exc
        return KvmVcpuState(
            self.STATE_VERSION, index=self.index, mp_state=mp_state, regs=regs, sregs=sregs,
            xsave=xsave, fpu=fpu, xcrs=xcrs, debugregs=debugregs, lapic=lapic,
            msrs=tuple((i, values[i]) for i in indices), events=events, tsc_khz=tsc_khz,
            realtime_ns=realtime)

    def restore_state(self, state: KvmVcpuState) -> None:
        """Put the vCPU back as saved, its TSC moved on by the host time since
        the save. Order (Firecracker's, from what the ioctls depend on): MP
        state; regs before events (KVM_SET_REGS drops a pending exception);
        sregs (EFER, APIC base) before the LAPIC; the LAPIC before the MSRs
        (TSC_DEADLINE only sticks with the LAPIC timer in TSC-deadline mode);
        events last. The record is checked before the first ioctl; what only
        KVM can judge (register contents, a TSC it would not set) is a
        ``StateError`` part-way, after which the vCPU must be restored again
        or not run."""
        part = f"vcpu{self.index}"
        check_version(part, state.version, self.STATE_VERSION)
        if state.index != self.index:
            raise StateError(f"{part}: saved state is for vCPU {state.index}")
        if not 0 <= state.mp_state <= _MP_STATE_MAX:
            raise StateError(f"{part}: saved state field mp_state = {state.mp_state} is not "
                             "a KVM_MP_STATE")
        regs = _blob(part, "regs", state.regs, abi.kvm_regs)
        sregs = _blob(part, "sregs", state.sregs, abi.kvm_sregs)
        debugregs = _blob(part, "debugregs", state.debugregs, abi.kvm_debugregs)
        lapic = _blob(part, "lapic", state.lapic, abi.kvm_lapic_state)
        events = _blob(part, "events", state.events, abi.kvm_vcpu_events)
        vm = self.vm
        xsave_buf: ctypes.Structure | None = None
        fpu: ctypes.Structure | None = None
        if state.xsave is not None:
            if not vm.xsave_size:
                raise StateError(f"{part}: saved state has an XSAVE image, and this host's "
                                 "KVM has no KVM_CAP_XSAVE to restore it")
            if not 4096 <= len(state.xsave) <= min(vm.xsave_size, _MAX_XSAVE_BYTES):
                raise StateError(f"{part}: saved state field xsave holds {len(state.xsave)} "
                                 f"bytes; this host's KVM takes 4096 to {vm.xsave_size}")
            # shorter than KVM's size: the missing components are absent (zero)
            xsave_buf = abi.flex(abi.kvm_xsave, (vm.xsave_size - 4096 + 3) // 4)()
            ctypes.memmove(ctypes.addressof(xsave_buf), state.xsave, len(state.xsave))
        elif state.fpu is not None:
            fpu = _blob(part, "fpu", state.fpu, abi.kvm_fpu)
        else:
            raise StateError(f"{part}: saved state has neither xsave nor fpu")
        xcrs = _pairs(part, "xcrs", state.xcrs, abi.KVM_MAX_XCRS, 32)
        msrs = dict(_pairs(part, "msrs", state.msrs, _MAX_SAVED_MSRS, 32))
        if not 0 <= state.tsc_khz < 1 << 32 or not 0 <= state.realtime_ns < 1 << 63:
            raise StateError(f"{part}: saved state fields tsc_khz/realtime_ns are out of range")
        tsc_khz = self._match_tsc_khz(part, state.tsc_khz)
        if IA32_TSC in msrs and tsc_khz:
            # the guest's TSC runs on through the time the snapshot sat on
            # disk, as its kvmclock does (KvmVm.restore_state)
            elapsed = max(0, time.clock_gettime_ns(time.CLOCK_REALTIME) - state.realtime_ns)
            msrs[IA32_TSC] = min(msrs[IA32_TSC] + elapsed * tsc_khz // 1_000_000,
                                 (1 << 64) - 1)
        fd = self.fd
        field = ""
        try:
            field = "mp_state"
            fd.set_mp_state(state.mp_state)
            field = "regs"
            fd.set_regs(regs)
            field = "sregs"
            fd.set_sregs(sregs)
            if xsave_buf is not None:
                field = "xsave"
                fd.set_xsave(xsave_buf)
            else:
                field = "fpu"
                fd.set_fpu(fpu)  # type: ignore[arg-type]
            if xcrs:
                field = "xcrs"
                arg = abi.kvm_xcrs(nr_xcrs=len(xcrs))
                for i, (xcr, value) in enumerate(xcrs):
                    arg.xcrs[i].xcr, arg.xcrs[i].value = xcr, value
                fd.set_xcrs(arg)
            field = "debugregs"
            fd.set_debugregs(debugregs)
            field = "lapic"
            fd.set_lapic(lapic)
            field = "msrs"
            fd.set_msrs(msrs)
            if IA32_TSC in msrs:
                self._check_tsc(part, msrs[IA32_TSC], dict(state.msrs)[IA32_TSC], tsc_khz)
            field = "events"
            fd.set_vcpu_events(events)
        except KvmError as exc:
            raise _refused(part, field, exc) from exc

    def _check_tsc(self, part: str, wanted: int, saved: int, khz: int) -> None:
        """KVM may take a TSC write and ignore it: PVM runs the guest on the
        host's TSC, which cannot be offset. Ahead of the saved time line is
        harmless (time moved on); behind the saved TSC would make the guest's
        TSC go backwards, which no restore may do."""
        got = self.fd.get_msrs([IA32_TSC])[IA32_TSC]
        slack = max(khz, 1) * 1000  # one second of cycles
        if abs(got - wanted) <= slack:
            return
        if got < saved:
            raise StateError(
                f"{part}: this host's KVM does not set the guest TSC (it ignored "
                f"the write: PVM?) and its TSC ({got:#x}) is behind the saved one "
                f"({saved:#x}): the guest's TSC would go backwards")
        log.warning("%s: KVM ignored the TSC write (PVM?): the guest TSC is %.3f s off "
                    "the saved time line", part, (got - wanted) / slack)

    def _match_tsc_khz(self, part: str, saved_khz: int) -> int:
        """The guest TSC rate to use: the saved one, scaled to where KVM can;
        a restore that would change the guest's TSC rate is refused."""
        try:
            here = self.fd.get_tsc_khz()
        except KvmError:
            here = 0
        if not saved_khz or not here:
            return here or saved_khz
        if abs(here - saved_khz) * 1_000_000 <= saved_khz * _TSC_KHZ_TOLERANCE_PPM:
            return here
        if not self.vm.tsc_control:
            raise StateError(f"{part}: the saved guest TSC ran at {saved_khz} kHz, this "
                             f"host's at {here} kHz, and its KVM cannot scale the TSC "
                             "(no KVM_CAP_TSC_CONTROL)")
        try:
            self.fd.set_tsc_khz(saved_khz)
        except KvmError as exc:
            raise _refused(part, "tsc_khz", exc) from exc
        return saved_khz

    def notify_paused(self) -> None:
        """KVM_KVMCLOCK_CTRL: tell the guest's kvmclock it was paused. A guest
        that has not enabled kvmclock gets nothing (KVM says EINVAL)."""
        with contextlib.suppress(KvmError):
            self.fd.kvmclock_ctrl()

    def kick(self) -> None:
        self.fd.run_view[_IMMEDIATE_EXIT_OFF] = 1
        tid = self._tid
        if tid is not None:
            with contextlib.suppress(ProcessLookupError):  # the thread just ended
                signal.pthread_kill(tid, signal.SIGUSR1)

    def registers(self) -> dict[str, int]:
        out: dict[str, int] = {}
        try:
            regs = self.fd.get_regs()
            sregs = self.fd.get_sregs()
        except (KvmError, OSError):
            return out
        for name in ("rip", "rsp", "rflags", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp",
                     "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"):
            out[name] = int(getattr(regs, name))
        for name in ("cr0", "cr2", "cr3", "cr4", "efer"):
            out[name] = int(getattr(sregs, name))
        out["cs"] = int(sregs.cs.selector)
        out["ss"] = int(sregs.ss.selector)
        out["gdt_base"] = int(sregs.gdt.base)
        out["idt_base"] = int(sregs.idt.base)
        out["idt_limit"] = int(sregs.idt.limit)
        return out

    def close(self) -> None:
        for v in self._pio_views.values():
            v.release()  # cached slices of kvm_run would keep its mapping alive
        self._pio_views.clear()
        self.fd.close()


def _set_segment(dst: abi.kvm_segment, src: Segment) -> None:
    # kvm_segment.limit is in bytes; a Segment holds the raw descriptor limit
    limit = (src.limit << 12) | 0xFFF if src.g else src.limit
    dst.base, dst.limit, dst.selector, dst.type = src.base, limit, src.selector, src.type
    dst.present, dst.dpl, dst.db, dst.s = int(src.present), src.dpl, int(src.db), int(src.s)
    dst.l, dst.g, dst.avl, dst.unusable = int(src.l), int(src.g), int(src.avl), int(src.unusable)
