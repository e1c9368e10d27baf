"""The KVM backend: in-kernel LAPIC/IOAPIC/PIC/PIT, vCPUs in ``KVM_RUN``.

The vCPU loop is the hot path: one ``KVM_RUN`` ioctl (which releases the GIL),
then the exit decoded with one precompiled ``struct`` unpack from the mmap'd
``kvm_run`` page, and port I/O dispatched to the bus with the data as a
zero-copy memoryview into that page. Everything the VMM must act on is
returned as a ``VcpuExit``.

Kicking: ``kick()`` sets ``kvm_run.immediate_exit`` (so a vCPU about to enter
the guest returns at once) and sends SIGUSR1 to the vCPU's thread (so one
inside the guest leaves with EINTR). The VMM installs a no-op SIGUSR1 handler.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import struct
import threading
from collections.abc import Callable

from pyvirt.arch.x86_64.cpu_state import CpuState, Segment
from pyvirt.arch.x86_64.cpuid import CpuidEntry, shape_cpuid
from pyvirt.arch.x86_64.msr import boot_msrs
from pyvirt.devices.bus import Bus
from pyvirt.hypervisor.base import ExitKind, HypervisorError, VcpuExit
from pyvirt.kvm import Kvm, KvmError, VcpuFd, VmFd
from pyvirt.kvm import _abi as abi
from pyvirt.kvm._errors import ioctl_error
from pyvirt.kvm.fd import ZERO_ARG, irq_routing_irqchip, irq_routing_msi, libc_ioctl
from pyvirt.memory import GuestMemory

__all__ = ["KvmHypervisor", "KvmIrqLine", "KvmVcpu", "KvmVm"]

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
                f"--cpus {num_cpus}: this host's KVM allows at most {self.max_vcpus()} vCPUs")
        return KvmVm(self.kvm, memory, pio, mmio, num_cpus)


class KvmIrqLine:
    """A GSI on the in-kernel PIC/IOAPIC, driven with KVM_IRQ_LINE on level changes."""

    def __init__(self, vm: VmFd, gsi: int) -> None:
        self._vm = vm
        self._gsi = gsi
        self._level = False
        self._lock = threading.Lock()

    def set_level(self, level: bool) -> None:
        if level is self._level:
            return
        with self._lock:
            if level is not self._level:
                self._level = level
                self._vm.irq_line(self._gsi, 1 if level else 0)


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


class KvmVm:
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
                    return VcpuExit(ExitKind.KICKED)
                if err == errno.EAGAIN:
                    # an application processor woke up but still waits for
                    # INIT/SIPI (KVM_MP_STATE_UNINITIALIZED): enter again
                    continue
                raise ioctl_error("KVM_RUN", err)
            reason, direction, size, port, count, off = unpack_exit(run_buf, 8)
            if reason == EXIT_IO:
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
            return VcpuExit(ExitKind.KICKED)
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
