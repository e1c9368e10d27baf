"""One class per KVM file descriptor, one method per ioctl (types, not policy).

``Kvm`` is ``/dev/kvm``, ``VmFd`` a VM, ``VcpuFd`` a vCPU with its mmap'd
``struct kvm_run``. Every failure is raised as ``KvmError`` through
``pyvirt.kvm._errors`` so messages are uniform. ``VcpuFd.run()`` releases the
GIL while the guest runs, so other threads (device back ends) run meanwhile.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

from pyvirt.kvm import _abi
from pyvirt.kvm._abi import (
    KVM_EXIT_INTR,
    KVM_RUN,
    kvm_clock_data,
    kvm_cpuid_entry2,
    kvm_debugregs,
    kvm_fpu,
    kvm_irq_routing_entry,
    kvm_irqchip,
    kvm_lapic_state,
    kvm_pit_state2,
    kvm_regs,
    kvm_run,
    kvm_sregs,
    kvm_vcpu_events,
    kvm_xcrs,
    kvm_xsave,
)
from pyvirt.kvm._errors import KvmError, KvmErrorKind, ioctl_error, open_error

__all__ = [
    "KVM_DEVICE",
    "ZERO_ARG",
    "Kvm",
    "VcpuFd",
    "VmFd",
    "irq_routing_irqchip",
    "irq_routing_msi",
    "libc_ioctl",
]

KVM_DEVICE = "/dev/kvm"

_libc = ctypes.CDLL(None, use_errno=True)
_libc_ioctl = _libc.ioctl
_libc_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc_ioctl.restype = ctypes.c_int

# KVM_RUN's hot path. fcntl.ioctl costs ~0.8 us more per call here than C when
# given an int (it first tries, and fails, to parse the int as a buffer), and
# KVM_RUN rejects a buffer (its argument must be 0). A ctypes call without
# argtypes is the cheapest way left (~0.25 us over C); CDLL (not PyDLL)
# releases the GIL for the call. Call as ``libc_ioctl(fd, KVM_RUN, ZERO_ARG)``
# (ints below 2**31 only); on -1 the errno is ``ctypes.get_errno()``.
libc_ioctl = ctypes.CDLL(None, use_errno=True).ioctl
#: KVM_RUN's argument: a full 64-bit zero, as the kernel requires
ZERO_ARG = ctypes.c_ulong(0)


def _ioctl(fd: int, request: int, arg: Any = 0) -> int:
    """ioctl with an int argument or an in/out buffer (a ctypes object); raises KvmError."""
    try:
        return int(fcntl.ioctl(fd, request, arg))
    except OSError as err:
        raise ioctl_error(_abi.IOCTL_NAMES.get(request, hex(request)), err) from None


def _ioctl_ulong(fd: int, request: int, value: int) -> int:
    # fcntl.ioctl's integer argument is a C int; addresses such as the TSS's
    # (0xfffbd000) need the full unsigned long, so go through libc directly.
    ret: int = _libc_ioctl(fd, request, value)
    if ret < 0:
        raise ioctl_error(_abi.IOCTL_NAMES.get(request, hex(request)), ctypes.get_errno())
    return ret


class _Fd:
    """An owned file descriptor: close() once, context manager, fileno()."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown os may be gone
            self.close()


def _cap_name(cap: int) -> str:
    return _abi.CAP_NAMES.get(cap, f"capability {cap}")


class _ExtensionMixin(_Fd):
    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 if absent, else 1 or a capability-specific value."""
        return _ioctl(self._fd, _abi.KVM_CHECK_EXTENSION, cap)

    def require_extension(self, cap: int) -> int:
        """``check_extension`` that raises ``KvmError`` (MISSING_CAPABILITY) on 0."""
        value = self.check_extension(cap)
        if value <= 0:
            raise KvmError(
                KvmErrorKind.MISSING_CAPABILITY, f"KVM lacks capability {_cap_name(cap)}"
            )
        return value


class Kvm(_ExtensionMixin):
    """``/dev/kvm``: system ioctls. Opening checks the API version."""

    def __init__(self, path: str = KVM_DEVICE) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise open_error(path, err) from None
        super().__init__(fd)
        version = self.get_api_version()
        if version != _abi.KVM_API_VERSION:
            self.close()
            raise KvmError(
                KvmErrorKind.API_VERSION,
                f"{path} speaks KVM API version {version}, pyvirt needs {_abi.KVM_API_VERSION}",
            )

    def get_api_version(self) -> int:
        return _ioctl(self._fd, _abi.KVM_GET_API_VERSION)

    def get_vcpu_mmap_size(self) -> int:
        """Bytes to mmap from a vCPU fd: kvm_run plus the pages after it (PIO data...)."""
        return _ioctl(self._fd, _abi.KVM_GET_VCPU_MMAP_SIZE)

    def get_supported_cpuid(self, max_entries: int = 256) -> list[kvm_cpuid_entry2]:
        buf = _abi.flex(_abi.kvm_cpuid2, max_entries)()
        buf.nent = max_entries
        _ioctl(self._fd, _abi.KVM_GET_SUPPORTED_CPUID, buf)
        return [_copy(entry) for entry in buf.entries[: buf.nent]]

    def get_msr_index_list(self) -> list[int]:
        """MSR indices KVM_GET_MSRS/KVM_SET_MSRS accept."""
        probe = _abi.kvm_msr_list(nmsrs=0)
        with contextlib.suppress(OSError):  # E2BIG, expected: probe.nmsrs now holds the count
            fcntl.ioctl(self._fd, _abi.KVM_GET_MSR_INDEX_LIST, probe)
        buf = _abi.flex(_abi.kvm_msr_list, probe.nmsrs)()
        buf.nmsrs = probe.nmsrs
        _ioctl(self._fd, _abi.KVM_GET_MSR_INDEX_LIST, buf)
        return list(buf.indices[: buf.nmsrs])

    def create_vm(self, machine_type: int = 0) -> VmFd:
        fd = _ioctl(self._fd, _abi.KVM_CREATE_VM, machine_type)
        try:
            mmap_size = self.get_vcpu_mmap_size()
        except KvmError:
            os.close(fd)
            raise
        return VmFd(fd, mmap_size)


_S = TypeVar("_S", bound=ctypes.Structure)


def _copy(struct: _S) -> _S:
    """A detached copy of a ctypes structure (not a view into a shared buffer)."""
    return type(struct).from_buffer_copy(struct)


def irq_routing_irqchip(gsi: int, irqchip: int, pin: int) -> kvm_irq_routing_entry:
    """A GSI routing entry to pin ``pin`` of irqchip ``KVM_IRQCHIP_*``."""
    entry = kvm_irq_routing_entry(gsi=gsi, type=_abi.KVM_IRQ_ROUTING_IRQCHIP)
    entry.u.irqchip.irqchip = irqchip
    entry.u.irqchip.pin = pin
    return entry


def irq_routing_msi(
    gsi: int, address: int, data: int, devid: int | None = None
) -> kvm_irq_routing_entry:
    """A GSI routing entry that sends an MSI (64-bit ``address``)."""
    entry = kvm_irq_routing_entry(gsi=gsi, type=_abi.KVM_IRQ_ROUTING_MSI)
    entry.u.msi.address_lo = address & 0xFFFFFFFF
    entry.u.msi.address_hi = address >> 32
    entry.u.msi.data = data
    if devid is not None:
        entry.flags = _abi.KVM_MSI_VALID_DEVID
        entry.u.msi.devid = devid
    return entry


class VmFd(_ExtensionMixin):
    """A VM: memory slots, interrupt controllers, vCPUs."""

    def __init__(self, fd: int, vcpu_mmap_size: int) -> None:
        super().__init__(fd)
        self.vcpu_mmap_size = vcpu_mmap_size

    def set_user_memory_region(
        self,
        slot: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        flags: int = 0,
    ) -> None:
        """Map (or with memory_size=0 remove) a slot of host memory at a guest address."""
        region = _abi.kvm_userspace_memory_region(
            slot=slot,
            flags=flags,
            guest_phys_addr=guest_phys_addr,
            memory_size=memory_size,
            userspace_addr=userspace_addr,
        )
        _ioctl(self._fd, _abi.KVM_SET_USER_MEMORY_REGION, region)

    def set_tss_addr(self, addr: int) -> None:
        """Three pages of guest-physical space KVM may use for real-mode emulation (VMX)."""
        _ioctl_ulong(self._fd, _abi.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        _ioctl(self._fd, _abi.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr))

    def create_irqchip(self) -> None:
        """In-kernel PIC pair, IOAPIC and a LAPIC per vCPU (create before vCPUs)."""
        _ioctl(self._fd, _abi.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = 0) -> None:
        _ioctl(self._fd, _abi.KVM_CREATE_PIT2, _abi.kvm_pit_config(flags=flags))

    def irq_line(self, irq: int, level: int) -> None:
        """Set GSI ``irq`` to ``level`` (0/1) on the in-kernel irqchip."""
        _ioctl(self._fd, _abi.KVM_IRQ_LINE, _abi.kvm_irq_level(irq=irq, level=level))

    def irq_line_status(self, irq: int, level: int) -> int:
        """KVM_IRQ_LINE_STATUS: >0 delivered, 0 masked/coalesced, <0 not delivered."""
        arg = _abi.kvm_irq_level(irq=irq, level=level)
        _ioctl(self._fd, _abi.KVM_IRQ_LINE_STATUS, arg)
        return int(arg.status)

    def create_vcpu(self, index: int) -> VcpuFd:
        fd = _ioctl(self._fd, _abi.KVM_CREATE_VCPU, index)
        try:
            return VcpuFd(fd, index, self.vcpu_mmap_size)
        except BaseException:
            os.close(fd)
            raise

    def irqfd(self, fd: int, gsi: int, flags: int = 0, resamplefd: int = 0) -> None:
        """Bind eventfd ``fd`` to ``gsi`` (a write raises the interrupt), or unbind (DEASSIGN)."""
        arg = _abi.kvm_irqfd(fd=fd, gsi=gsi, flags=flags, resamplefd=resamplefd)
        _ioctl(self._fd, _abi.KVM_IRQFD, arg)

    def ioeventfd(
        self, fd: int, addr: int, length: int, datamatch: int = 0, flags: int = 0
    ) -> None:
        """Signal eventfd ``fd`` on a guest write to ``addr`` (port with FLAG_PIO) in-kernel."""
        arg = _abi.kvm_ioeventfd(datamatch=datamatch, addr=addr, len=length, fd=fd, flags=flags)
        _ioctl(self._fd, _abi.KVM_IOEVENTFD, arg)

    def set_gsi_routing(self, entries: Sequence[kvm_irq_routing_entry]) -> None:
        """Replace the whole GSI routing table (see ``irq_routing_irqchip``/``_msi``)."""
        buf = _abi.flex(_abi.kvm_irq_routing, len(entries))()
        buf.nr = len(entries)
        for i, entry in enumerate(entries):
            buf.entries[i] = entry
        _ioctl(self._fd, _abi.KVM_SET_GSI_ROUTING, buf)

    def signal_msi(self, address: int, data: int, flags: int = 0, devid: int = 0) -> int:
        """Inject an MSI: >0 delivered, 0 blocked by the guest."""
        arg = _abi.kvm_msi(
            address_lo=address & 0xFFFFFFFF,
            address_hi=address >> 32,
            data=data,
            flags=flags,
            devid=devid,
        )
        return _ioctl(self._fd, _abi.KVM_SIGNAL_MSI, arg)

    def get_clock(self) -> kvm_clock_data:
        data = kvm_clock_data()
        _ioctl(self._fd, _abi.KVM_GET_CLOCK, data)
        return data

    def set_clock(self, data: kvm_clock_data) -> None:
        _ioctl(self._fd, _abi.KVM_SET_CLOCK, data)

    def get_irqchip(self, chip_id: int) -> kvm_irqchip:
        """KVM_GET_IRQCHIP for ``KVM_IRQCHIP_PIC_MASTER``/``_PIC_SLAVE``/``_IOAPIC``."""
        chip = kvm_irqchip(chip_id=chip_id)
        _ioctl(self._fd, _abi.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: kvm_irqchip) -> None:
        _ioctl(self._fd, _abi.KVM_SET_IRQCHIP, chip)

    def get_pit2(self) -> kvm_pit_state2:
        state = kvm_pit_state2()
        _ioctl(self._fd, _abi.KVM_GET_PIT2, state)
        return state

    def set_pit2(self, state: kvm_pit_state2) -> None:
        _ioctl(self._fd, _abi.KVM_SET_PIT2, state)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        _ioctl(self._fd, _abi.KVM_ENABLE_CAP, _enable_cap(cap, args, flags))


def _enable_cap(cap: int, args: Sequence[int], flags: int) -> _abi.kvm_enable_cap:
    if len(args) > 4:
        raise ValueError("KVM_ENABLE_CAP takes at most 4 arguments")
    arg = _abi.kvm_enable_cap(cap=cap, flags=flags)
    for i, value in enumerate(args):
        arg.args[i] = value
    return arg


_EXIT_REASON_INDEX = _abi.kvm_run.exit_reason.offset // 4


class VcpuFd(_Fd):
    """A vCPU and its shared ``struct kvm_run`` page.

    ``run_struct`` is the mapping as a ctypes ``kvm_run``; ``run_view`` is the
    whole mapping (kvm_run plus the PIO data page after it) as a writable
    memoryview, for ``struct.unpack_from`` and in-place I/O data (see
    ``pyvirt.kvm.exits``).
    """

    def __init__(self, fd: int, index: int, mmap_size: int) -> None:
        super().__init__(fd)
        self.index = index
        try:
            self._mmap = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as err:
            raise ioctl_error("mmap(kvm_run)", err) from None
        self.run_view: memoryview = memoryview(self._mmap)
        self.run_struct: kvm_run = kvm_run.from_buffer(self._mmap)
        self._u32 = self.run_view.cast("I")

    def close(self) -> None:
        if self.closed:
            return
        # If someone still holds a view (a data slice, the ctypes struct), the
        # pages stay mapped until that goes away; the fd can be closed anyway.
        with contextlib.suppress(BufferError):
            self._u32.release()
            self.run_view.release()
        del self.run_struct
        with contextlib.suppress(BufferError):
            self._mmap.close()
        super().close()

    # ----- KVM_RUN

    def run(self) -> int:
        """KVM_RUN until the next exit; returns ``kvm_run.exit_reason`` (KVM_EXIT_*).

        A signal or ``immediate_exit`` interrupting the call returns KVM_EXIT_INTR
        rather than raising. The GIL is released while the guest runs.
        """
        if libc_ioctl(self._fd, KVM_RUN, ZERO_ARG) < 0:
            code = ctypes.get_errno()
            if code == errno.EINTR:
                return KVM_EXIT_INTR
            raise ioctl_error("KVM_RUN", code)
        return self._u32[_EXIT_REASON_INDEX]

    @property
    def immediate_exit(self) -> bool:
        return bool(self.run_struct.immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self.run_struct.immediate_exit = 1 if value else 0

    # ----- registers

    def get_regs(self) -> kvm_regs:
        regs = kvm_regs()
        _ioctl(self._fd, _abi.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: kvm_regs) -> None:
        _ioctl(self._fd, _abi.KVM_SET_REGS, regs)

    def get_sregs(self) -> kvm_sregs:
        sregs = kvm_sregs()
        _ioctl(self._fd, _abi.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: kvm_sregs) -> None:
        _ioctl(self._fd, _abi.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> kvm_fpu:
        fpu = kvm_fpu()
        _ioctl(self._fd, _abi.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: kvm_fpu) -> None:
        _ioctl(self._fd, _abi.KVM_SET_FPU, fpu)

    def get_xcrs(self) -> kvm_xcrs:
        xcrs = kvm_xcrs()
        _ioctl(self._fd, _abi.KVM_GET_XCRS, xcrs)
        return xcrs

    def set_xcrs(self, xcrs: kvm_xcrs) -> None:
        _ioctl(self._fd, _abi.KVM_SET_XCRS, xcrs)

    def get_xsave(self) -> kvm_xsave:
        """KVM_GET_XSAVE: the 4 KiB XSAVE image (fails where the guest's is larger)."""
        xsave = kvm_xsave()
        _ioctl(self._fd, _abi.KVM_GET_XSAVE, xsave)
        return xsave

    def get_xsave2(self, size: int) -> ctypes.Structure:
        """KVM_GET_XSAVE2 into ``size`` bytes (the VM's KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2))."""
        extra = max(0, size - ctypes.sizeof(kvm_xsave) + 3) // 4
        buf = _abi.flex(kvm_xsave, extra)()
        _ioctl(self._fd, _abi.KVM_GET_XSAVE2, buf)
        return buf

    def set_xsave(self, xsave: ctypes.Structure) -> None:
        """KVM_SET_XSAVE; ``xsave`` must be as large as KVM's XSAVE size for this VM."""
        _ioctl(self._fd, _abi.KVM_SET_XSAVE, xsave)

    def get_debugregs(self) -> kvm_debugregs:
        regs = kvm_debugregs()
        _ioctl(self._fd, _abi.KVM_GET_DEBUGREGS, regs)
        return regs

    def set_debugregs(self, regs: kvm_debugregs) -> None:
        _ioctl(self._fd, _abi.KVM_SET_DEBUGREGS, regs)

    def get_tsc_khz(self) -> int:
        """The guest TSC frequency in kHz (KVM_CAP_GET_TSC_KHZ)."""
        return _ioctl(self._fd, _abi.KVM_GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        """Scale the guest TSC to ``khz`` (KVM_CAP_TSC_CONTROL)."""
        _ioctl(self._fd, _abi.KVM_SET_TSC_KHZ, khz)

    def kvmclock_ctrl(self) -> None:
        """Tell the guest's kvmclock it was paused (no soft-lockup warnings; KVM_CAP_KVMCLOCK_CTRL).
        Fails with EINVAL when the guest has not enabled kvmclock."""
        _ioctl(self._fd, _abi.KVM_KVMCLOCK_CTRL)

    # ----- CPUID and MSRs

    def set_cpuid2(self, entries: Sequence[kvm_cpuid_entry2]) -> None:
        buf = _abi.flex(_abi.kvm_cpuid2, len(entries))()
        buf.nent = len(entries)
        for i, entry in enumerate(entries):
            buf.entries[i] = entry
        _ioctl(self._fd, _abi.KVM_SET_CPUID2, buf)

    def get_cpuid2(self, max_entries: int = 256) -> list[kvm_cpuid_entry2]:
        buf = _abi.flex(_abi.kvm_cpuid2, max_entries)()
        buf.nent = max_entries
        _ioctl(self._fd, _abi.KVM_GET_CPUID2, buf)
        return [_copy(entry) for entry in buf.entries[: buf.nent]]

    def get_msrs(self, indices: Sequence[int]) -> dict[int, int]:
        """Read MSRs by index; raises ``KvmError`` naming the first one KVM refuses."""
        buf = _abi.flex(_abi.kvm_msrs, len(indices))()
        buf.nmsrs = len(indices)
        for i, index in enumerate(indices):
            buf.entries[i].index = index
        done = _ioctl(self._fd, _abi.KVM_GET_MSRS, buf)
        if done < len(indices):
            raise KvmError(
                KvmErrorKind.IOCTL,
                f"KVM_GET_MSRS failed: KVM refuses MSR {indices[done]:#x}",
                ioctl="KVM_GET_MSRS",
            )
        return {e.index: e.data for e in buf.entries[: len(indices)]}

    def set_msrs(self, msrs: Mapping[int, int] | Iterable[tuple[int, int]]) -> None:
        """Write MSRs; raises ``KvmError`` naming the first one KVM refuses."""
        items = list(msrs.items() if isinstance(msrs, Mapping) else msrs)
        buf = _abi.flex(_abi.kvm_msrs, len(items))()
        buf.nmsrs = len(items)
        for i, (index, value) in enumerate(items):
            buf.entries[i].index = index
            buf.entries[i].data = value
        done = _ioctl(self._fd, _abi.KVM_SET_MSRS, buf)
        if done < len(items):
            index, value = items[done]
            raise KvmError(
                KvmErrorKind.IOCTL,
                f"KVM_SET_MSRS failed: KVM refuses MSR {index:#x} = {value:#x}",
                ioctl="KVM_SET_MSRS",
            )

    # ----- interrupt and power state

    def get_mp_state(self) -> int:
        """KVM_MP_STATE_* (needs the in-kernel irqchip)."""
        state = _abi.kvm_mp_state()
        _ioctl(self._fd, _abi.KVM_GET_MP_STATE, state)
        return int(state.mp_state)

    def set_mp_state(self, mp_state: int) -> None:
        _ioctl(self._fd, _abi.KVM_SET_MP_STATE, _abi.kvm_mp_state(mp_state=mp_state))

    def get_lapic(self) -> kvm_lapic_state:
        state = kvm_lapic_state()
        _ioctl(self._fd, _abi.KVM_GET_LAPIC, state)
        return state

    def set_lapic(self, state: kvm_lapic_state) -> None:
        _ioctl(self._fd, _abi.KVM_SET_LAPIC, state)

    def get_vcpu_events(self) -> kvm_vcpu_events:
        events = kvm_vcpu_events()
        _ioctl(self._fd, _abi.KVM_GET_VCPU_EVENTS, events)
        return events

    def set_vcpu_events(self, events: kvm_vcpu_events) -> None:
        _ioctl(self._fd, _abi.KVM_SET_VCPU_EVENTS, events)

    def nmi(self) -> None:
        """Queue an NMI (KVM_NMI)."""
        _ioctl(self._fd, _abi.KVM_NMI)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        _ioctl(self._fd, _abi.KVM_ENABLE_CAP, _enable_cap(cap, args, flags))
