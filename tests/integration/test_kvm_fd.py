"""pyvirt.kvm against the real /dev/kvm: the wrappers, and what this host's KVM can do.

Each guest is a few hand-assembled bytes run in a 4 MiB VM: 64-bit long mode
(identity-mapped 4 GiB with 2 MiB pages, so the LAPIC/IOAPIC MMIO is reachable),
32-bit protected mode or real mode. Tests needing /dev/kvm are marked ``kvm``:
they skip without it unless PYVIRT_REQUIRE_KVM=1, which makes them fail.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from pyvirt.kvm import Kvm, KvmError, KvmErrorKind, abi, irq_routing_irqchip
from pyvirt.kvm._errors import ioctl_error, open_error
from pyvirt.kvm.exits import (
    EXIT_IO,
    EXIT_REASON_OFFSET,
    IO_FIELDS,
    IO_OFFSET,
    MMIO_DATA_OFFSET,
    HltExit,
    InternalErrorExit,
    IoExit,
    KvmExit,
    MmioExit,
    ShutdownExit,
    decode_exit,
)
from pyvirt.kvm.fd import VcpuFd, VmFd

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def kvm() -> Iterator[Kvm]:
    """/dev/kvm; skips without it unless PYVIRT_REQUIRE_KVM=1 (then fails)."""
    if not os.path.exists("/dev/kvm"):
        if os.environ.get("PYVIRT_REQUIRE_KVM") == "1":
            pytest.fail("/dev/kvm is absent and PYVIRT_REQUIRE_KVM=1")
        pytest.skip("/dev/kvm is absent")
    with Kvm() as handle:
        yield handle


# --------------------------------------------------------------------------- guest builder

GDT = 0x500
PML4 = 0x1000
IDT = 0x8000
CODE = 0x10000
HANDLER = 0x11000
STACK = 0x80000
CODE64_SEL, DATA_SEL, CODE32_SEL = 0x08, 0x10, 0x18
PORT = 0x10  # the guests report here

HLT = bytes([0xF4])
CLI_HLT = bytes([0xFA, 0xF4])


def out_al(value: int, port: int = PORT) -> bytes:
    """mov al, value; out port, al"""
    return bytes([0xB0, value, 0xE6, port])


def mov_mem32(addr: int, value: int) -> bytes:
    """mov eax, addr; mov dword [rax], value  (64-bit mode; addr < 4 GiB)"""
    return b"\xb8" + addr.to_bytes(4, "little") + b"\xc7\x00" + value.to_bytes(4, "little")


class Guest:
    """A 1-vCPU VM with RAM at guest-physical 0."""

    def __init__(
        self, kvm: Kvm, *, mem_size: int = 4 << 20, irqchip: bool = False, pit: bool = False
    ) -> None:
        self.vm: VmFd = kvm.create_vm()
        self.vm.set_tss_addr(0xFFFBD000)
        if irqchip:
            self.vm.create_irqchip()
        if pit:
            self.vm.create_pit2(abi.KVM_PIT_SPEAKER_DUMMY)
        self.mem = mmap.mmap(-1, mem_size)
        self._anchor = ctypes.c_char.from_buffer(self.mem)
        self.vm.set_user_memory_region(0, 0, mem_size, ctypes.addressof(self._anchor))
        self.vcpu: VcpuFd = self.vm.create_vcpu(0)

    def close(self) -> None:
        self.vcpu.close()
        self.vm.close()

    def write(self, gpa: int, data: bytes) -> None:
        self.mem[gpa : gpa + len(data)] = data

    def _tables(self) -> None:
        descriptors = (0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00CF9B000000FFFF)
        self.write(GDT, struct.pack("<4Q", *descriptors))
        self.write(PML4, struct.pack("<Q", 0x2000 | 3))
        self.write(0x2000, struct.pack("<4Q", *[(0x3000 + i * 0x1000) | 3 for i in range(4)]))
        for i in range(4):  # 2 MiB pages, present | writable | large
            pd = [((i << 30) + (j << 21)) | 0x83 for j in range(512)]
            self.write(0x3000 + i * 0x1000, struct.pack("<512Q", *pd))

    @staticmethod
    def _flat(seg: abi.kvm_segment, selector: int, type_: int, *, l: int = 0, db: int = 1) -> None:  # noqa: E741
        seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFFFFFF, selector, type_
        seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g = 1, 0, db, 1, l, 1
        seg.avl = seg.unusable = 0

    def long_mode(self, code: bytes, entry: int = CODE) -> None:
        self._tables()
        self.write(entry, code)
        s = self.vcpu.get_sregs()
        self._flat(s.cs, CODE64_SEL, 0xB, l=1, db=0)
        for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
            self._flat(seg, DATA_SEL, 0x3)
        s.gdt.base, s.gdt.limit = GDT, 4 * 8 - 1
        s.idt.base, s.idt.limit = IDT, 256 * 16 - 1
        s.cr0 = 0x80050033  # PG WP NE ET MP PE
        s.cr3 = PML4
        s.cr4 = 0x20  # PAE
        s.efer = 0x500  # LMA LME
        self.vcpu.set_sregs(s)
        self.vcpu.set_regs(abi.kvm_regs(rip=entry, rsp=STACK, rflags=2))

    def protected_mode(self, code: bytes, entry: int = CODE) -> None:
        self._tables()
        self.write(entry, code)
        s = self.vcpu.get_sregs()
        self._flat(s.cs, CODE32_SEL, 0xB)
        for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
            self._flat(seg, DATA_SEL, 0x3)
        s.gdt.base, s.gdt.limit = GDT, 4 * 8 - 1
        s.cr0 = 0x11  # ET PE
        self.vcpu.set_sregs(s)
        self.vcpu.set_regs(abi.kvm_regs(rip=entry, rsp=STACK, rflags=2))

    def real_mode(self, code: bytes, segment: int = 0, ip: int = 0x7C00) -> None:
        self.write(segment * 16 + ip, code)
        s = self.vcpu.get_sregs()
        s.cs.selector, s.cs.base = segment, segment * 16
        self.vcpu.set_sregs(s)
        self.vcpu.set_regs(abi.kvm_regs(rip=ip, rflags=2))

    def idt_gate(self, vector: int, handler: int) -> None:
        """A 64-bit interrupt gate."""
        gate = struct.pack(
            "<HHBBHII", handler & 0xFFFF, CODE64_SEL, 0, 0x8E, (handler >> 16) & 0xFFFF,
            handler >> 32, 0,
        )  # fmt: skip
        self.write(IDT + vector * 16, gate)

    def run(self) -> KvmExit:
        self.vcpu.run()
        return decode_exit(self.vcpu.run_view)

    def outputs(self, limit: int = 100) -> tuple[list[int], KvmExit]:
        """Values the guest writes to PORT until any other exit."""
        values: list[int] = []
        for _ in range(limit):
            exit_ = self.run()
            if not (isinstance(exit_, IoExit) and exit_.port == PORT and exit_.is_out):
                return values, exit_
            values.append(int.from_bytes(exit_.data, "little"))
        raise AssertionError(f"more than {limit} outputs: {values[:10]}...")


@pytest.fixture
def guest(kvm: Kvm) -> Iterator[Guest]:
    g = Guest(kvm)
    yield g
    g.close()


@pytest.fixture
def irq_guest(kvm: Kvm) -> Iterator[Guest]:
    g = Guest(kvm, irqchip=True)
    yield g
    g.close()


def _run_in_thread(g: Guest) -> tuple[threading.Thread, dict[str, object]]:
    result: dict[str, object] = {}

    def body() -> None:
        result["reason"] = g.vcpu.run()

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, result


# --------------------------------------------------------------------------- errors (no KVM needed)


def test_missing_device_message() -> None:
    with pytest.raises(KvmError) as info:
        Kvm("/nonexistent/kvm")
    assert info.value.kind is KvmErrorKind.NO_DEVICE
    assert "does not exist: KVM is not available (load kvm_intel/kvm_amd, or use accel emu)" in (
        str(info.value)
    )


def test_permission_message() -> None:
    err = open_error("/dev/kvm", PermissionError(errno.EACCES, "denied"))
    assert err.kind is KvmErrorKind.PERMISSION
    assert str(err) == "permission denied on /dev/kvm: add the user to the kvm group"


def test_ioctl_error_names_the_ioctl_and_errno() -> None:
    err = ioctl_error("KVM_CREATE_IRQCHIP", OSError(errno.EEXIST, "File exists"))
    assert (err.kind, err.ioctl, err.errno) == (KvmErrorKind.IOCTL, "KVM_CREATE_IRQCHIP", 17)
    assert str(err).startswith("KVM_CREATE_IRQCHIP failed: File exists (EEXIST)")


# --------------------------------------------------------------------------- system and VM ioctls


@pytest.mark.kvm
def test_api_version_and_mmap_size(kvm: Kvm) -> None:
    assert kvm.get_api_version() == 12
    assert kvm.get_vcpu_mmap_size() >= ctypes.sizeof(abi.kvm_run)


@pytest.mark.kvm
def test_capabilities_pyvirt_relies_on(kvm: Kvm) -> None:
    for cap in (
        abi.KVM_CAP_USER_MEMORY, abi.KVM_CAP_IRQCHIP, abi.KVM_CAP_PIT2, abi.KVM_CAP_IRQFD,
        abi.KVM_CAP_IOEVENTFD, abi.KVM_CAP_IRQ_ROUTING, abi.KVM_CAP_SIGNAL_MSI,
        abi.KVM_CAP_IMMEDIATE_EXIT, abi.KVM_CAP_MP_STATE, abi.KVM_CAP_SET_TSS_ADDR,
    ):  # fmt: skip
        assert kvm.require_extension(cap) >= 1
    assert kvm.check_extension(abi.KVM_CAP_MAX_VCPUS) >= kvm.check_extension(abi.KVM_CAP_NR_VCPUS)


@pytest.mark.kvm
def test_require_extension_message(kvm: Kvm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Kvm, "check_extension", lambda self, cap: 0)
    with pytest.raises(KvmError) as info:
        kvm.require_extension(abi.KVM_CAP_IRQCHIP)
    assert info.value.kind is KvmErrorKind.MISSING_CAPABILITY
    assert str(info.value) == "KVM lacks capability KVM_CAP_IRQCHIP"


@pytest.mark.kvm
def test_supported_cpuid_and_msr_index_list(kvm: Kvm) -> None:
    entries = kvm.get_supported_cpuid()
    assert 0 in {e.function for e in entries}
    with pytest.raises(KvmError) as info:
        kvm.get_supported_cpuid(max_entries=1)
    assert info.value.errno == errno.E2BIG
    msrs = kvm.get_msr_index_list()
    assert 0x10 in msrs  # IA32_TSC


@pytest.mark.kvm
def test_ioctl_failure_is_a_kvm_error(guest: Guest) -> None:
    with pytest.raises(KvmError) as info:
        guest.vm.create_vcpu(0)  # same index twice
    assert (info.value.ioctl, info.value.errno) == ("KVM_CREATE_VCPU", errno.EEXIST)


@pytest.mark.kvm
def test_irqchip_pit2_and_routing(kvm: Kvm) -> None:
    g = Guest(kvm, irqchip=True, pit=True)
    try:
        with pytest.raises(KvmError) as info:
            g.vm.create_irqchip()
        assert info.value.errno == errno.EEXIST
        g.vm.irq_line(4, 1)
        g.vm.irq_line(4, 0)
        g.vm.irq_line_status(4, 0)  # the status (delivered/coalesced) varies
        routes = [irq_routing_irqchip(gsi, abi.KVM_IRQCHIP_IOAPIC, gsi) for gsi in range(24)]
        g.vm.set_gsi_routing(routes)
        clock = g.vm.get_clock()
        g.vm.set_clock(abi.kvm_clock_data(clock=clock.clock))
        assert g.vcpu.get_mp_state() == abi.KVM_MP_STATE_RUNNABLE
    finally:
        g.close()


# --------------------------------------------------------------------------- vCPU state


@pytest.mark.kvm
def test_register_state_round_trips(irq_guest: Guest) -> None:
    vcpu = irq_guest.vcpu
    regs = vcpu.get_regs()
    regs.rax, regs.r15, regs.rip = 0x1234, 0xFEDC, 0x7C00
    vcpu.set_regs(regs)
    assert (vcpu.get_regs().rax, vcpu.get_regs().r15) == (0x1234, 0xFEDC)
    sregs = vcpu.get_sregs()
    assert (sregs.cs.selector, sregs.cs.base) == (0xF000, 0xFFFF0000)  # reset state
    vcpu.set_sregs(sregs)
    fpu = vcpu.get_fpu()
    fpu.mxcsr = 0x1F80
    vcpu.set_fpu(fpu)
    vcpu.set_msrs({0x174: 0x10})  # IA32_SYSENTER_CS
    assert vcpu.get_msrs([0x174]) == {0x174: 0x10}
    with pytest.raises(KvmError, match="refuses MSR 0xdeadbeef"):
        vcpu.set_msrs({0xDEADBEEF: 1})
    lapic = vcpu.get_lapic()
    vcpu.set_lapic(lapic)
    events = vcpu.get_vcpu_events()
    vcpu.set_vcpu_events(events)
    xcrs = vcpu.get_xcrs()
    vcpu.set_xcrs(xcrs)
    vcpu.set_mp_state(abi.KVM_MP_STATE_RUNNABLE)
    assert vcpu.immediate_exit is False


# --------------------------------------------------------------------------- running guests


@pytest.mark.kvm
def test_long_mode_port_io(guest: Guest) -> None:
    guest.long_mode(out_al(1) + out_al(2, 0x11) + HLT)
    assert guest.vcpu.run() == abi.KVM_EXIT_IO
    view = guest.vcpu.run_view
    direction, size, port, count, offset = IO_FIELDS.unpack_from(view, IO_OFFSET)
    assert (direction, size, port, count) == (abi.KVM_EXIT_IO_OUT, 1, PORT, 1)
    assert view[offset] == 1
    assert guest.vcpu.run() == abi.KVM_EXIT_IO
    reason, _, _, port, _, offset = EXIT_IO.unpack_from(view, EXIT_REASON_OFFSET)
    assert (reason, port, view[offset]) == (abi.KVM_EXIT_IO, 0x11, 2)
    assert guest.vcpu.run_struct.io.port == 0x11
    assert isinstance(guest.run(), HltExit)


@pytest.mark.kvm
def test_in_data_is_filled_in_place(guest: Guest) -> None:
    # mov dx, 0x60; in eax, dx; out 0x10, eax; hlt
    guest.long_mode(b"\x66\xba\x60\x00\xed\xe7\x10" + HLT)
    exit_ = guest.run()
    assert isinstance(exit_, IoExit) and not exit_.is_out and (exit_.port, exit_.size) == (0x60, 4)
    view = guest.vcpu.run_view
    view[exit_.data_offset : exit_.data_offset + 4] = (0xCAFEF00D).to_bytes(4, "little")
    values, last = guest.outputs()
    assert values == [0xCAFEF00D] and isinstance(last, HltExit)


@pytest.mark.kvm
def test_mmio_exit_and_read_in_place(guest: Guest) -> None:
    # mov eax, 0xd0000000; mov dword [rax], 0x55; mov ebx, [rax]; mov eax, ebx; out 0x10, eax
    code = mov_mem32(0xD0000000, 0x55) + b"\x8b\x18\x89\xd8\xe7\x10" + HLT
    guest.long_mode(code)
    write = guest.run()
    assert write == MmioExit(0xD0000000, 4, True, (0x55).to_bytes(4, "little"))
    read = guest.run()
    assert isinstance(read, MmioExit) and not read.is_write and read.length == 4
    guest.vcpu.run_view[MMIO_DATA_OFFSET : MMIO_DATA_OFFSET + 4] = b"\x78\x56\x34\x12"
    values, _ = guest.outputs()
    assert values == [0x12345678]


@pytest.mark.kvm
def test_protected_mode_32bit(guest: Guest) -> None:
    guest.protected_mode(b"\xb8\x78\x56\x34\x12\xe7\x10" + HLT)  # mov eax, imm; out 0x10, eax
    values, last = guest.outputs()
    assert values == [0x12345678] and isinstance(last, HltExit)


@pytest.mark.kvm
def test_real_mode_via_cs_base(guest: Guest) -> None:
    guest.real_mode(out_al(1) + HLT, segment=0x700, ip=0x100)
    values, last = guest.outputs()
    assert values == [1] and isinstance(last, HltExit)
    assert guest.vcpu.get_regs().rip == 0x105


@pytest.mark.kvm
def test_real_mode_from_the_reset_vector(guest: Guest) -> None:
    rom = mmap.mmap(-1, 0x10000)
    anchor = ctypes.c_char.from_buffer(rom)
    rom[0xFFF0 : 0xFFF0 + 5] = out_al(1) + HLT
    guest.vm.set_user_memory_region(1, 0xFFFF0000, 0x10000, ctypes.addressof(anchor))
    values, last = guest.outputs()
    assert values == [1] and isinstance(last, HltExit)


@pytest.mark.kvm
def test_hlt_without_irqchip_exits(guest: Guest) -> None:
    guest.long_mode(CLI_HLT)
    assert guest.vcpu.run() == abi.KVM_EXIT_HLT


@pytest.mark.kvm
def test_hlt_with_irqchip_blocks_until_a_signal(irq_guest: Guest) -> None:
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: None)
    try:
        _blocked_hlt_is_kicked(irq_guest)
    finally:
        signal.signal(signal.SIGUSR1, previous)


def _blocked_hlt_is_kicked(irq_guest: Guest) -> None:
    irq_guest.long_mode(out_al(1) + CLI_HLT)
    assert isinstance(irq_guest.run(), IoExit)
    thread, result = _run_in_thread(irq_guest)
    thread.join(0.5)
    assert thread.is_alive(), "hlt with IF=0 should block in the kernel"
    assert thread.ident is not None
    signal.pthread_kill(thread.ident, signal.SIGUSR1)
    thread.join(5)
    assert result == {"reason": abi.KVM_EXIT_INTR}
    assert irq_guest.vcpu.get_mp_state() == abi.KVM_MP_STATE_HALTED


@pytest.mark.kvm
def test_immediate_exit(guest: Guest) -> None:
    guest.long_mode(out_al(1) + HLT)
    guest.vcpu.immediate_exit = True
    assert guest.vcpu.run() == abi.KVM_EXIT_INTR
    guest.vcpu.immediate_exit = False
    assert guest.vcpu.run() == abi.KVM_EXIT_IO


PIC_INIT = (
    out_al(0x11, 0x20) + out_al(0x20, 0x21) + out_al(0x04, 0x21) + out_al(0x01, 0x21)
    + out_al(0xFD, 0x21)  # unmask IRQ1 only
    + out_al(0xFF, 0xA1)
)  # fmt: skip
STI_HLT = bytes([0xFB, 0xF4])
# with the in-kernel irqchip a final hlt would block: end with an output elsewhere
DONE = out_al(0, 0x11) + CLI_HLT
IRETQ = bytes([0x48, 0xCF])


def _wake_test(g: Guest, fire: Callable[[], object]) -> tuple[list[int], float]:
    """Run to the guest's 'ready' output, fire the interrupt from a thread, time the hlt."""
    exit_ = g.run()
    assert isinstance(exit_, IoExit) and exit_.data == b"\x42"
    timer = threading.Timer(0.3, fire)
    timer.start()
    start = time.monotonic()
    values, _ = g.outputs()
    return values, time.monotonic() - start


@pytest.mark.kvm
def test_pic_interrupt_wakes_hlt(irq_guest: Guest) -> None:
    g = irq_guest
    g.idt_gate(0x21, HANDLER)
    g.write(HANDLER, out_al(0x20, 0x20) + out_al(0x44) + IRETQ)  # EOI; report
    g.long_mode(PIC_INIT + out_al(0x42) + STI_HLT + out_al(0x43) + DONE)

    def fire() -> None:
        g.vm.irq_line(1, 1)
        g.vm.irq_line(1, 0)

    values, waited = _wake_test(g, fire)
    assert values == [0x44, 0x43]
    assert waited >= 0.25


# LAPIC enable (SVR = 0x1ff) and IOAPIC pin 4 -> vector 0x30, edge, physical dest 0
LAPIC_IOAPIC_INIT = (
    mov_mem32(0xFEE000F0, 0x1FF)
    + mov_mem32(0xFEC00000, 0x10 + 2 * 4) + mov_mem32(0xFEC00010, 0x30)
    + mov_mem32(0xFEC00000, 0x11 + 2 * 4) + mov_mem32(0xFEC00010, 0)
    + out_al(0xFF, 0x21) + out_al(0xFF, 0xA1)  # mask the PICs
)  # fmt: skip
LAPIC_EOI = mov_mem32(0xFEE000B0, 0)


def _ioapic_guest(g: Guest) -> None:
    g.idt_gate(0x30, HANDLER)
    g.idt_gate(0x31, HANDLER + 0x100)
    g.write(HANDLER, LAPIC_EOI + out_al(0x44) + IRETQ)
    g.write(HANDLER + 0x100, LAPIC_EOI + out_al(0x45) + IRETQ)
    g.long_mode(LAPIC_IOAPIC_INIT + out_al(0x42) + STI_HLT + out_al(0x43) + DONE)


@pytest.mark.kvm
def test_ioapic_interrupt_wakes_hlt(irq_guest: Guest) -> None:
    g = irq_guest
    _ioapic_guest(g)

    def fire() -> None:
        g.vm.irq_line(4, 1)
        g.vm.irq_line(4, 0)

    values, waited = _wake_test(g, fire)
    assert values == [0x44, 0x43]
    assert waited >= 0.25


@pytest.mark.kvm
def test_irqfd_interrupt_wakes_hlt(irq_guest: Guest) -> None:
    g = irq_guest
    _ioapic_guest(g)
    efd = os.eventfd(0)
    try:
        g.vm.irqfd(efd, 4)
        values, _ = _wake_test(g, lambda: os.eventfd_write(efd, 1))
        assert values == [0x44, 0x43]
        g.vm.irqfd(efd, 4, flags=abi.KVM_IRQFD_FLAG_DEASSIGN)
    finally:
        os.close(efd)


@pytest.mark.kvm
def test_signal_msi_wakes_hlt(irq_guest: Guest) -> None:
    g = irq_guest
    _ioapic_guest(g)
    delivered: list[int] = []
    values, _ = _wake_test(g, lambda: delivered.append(g.vm.signal_msi(0xFEE00000, 0x31)))
    assert values == [0x45, 0x43]
    assert delivered == [1]


@pytest.mark.kvm
def test_ioeventfd_swallows_the_write(guest: Guest) -> None:
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        guest.vm.ioeventfd(efd, 0x500, 1, flags=abi.KVM_IOEVENTFD_FLAG_PIO)
        # mov dx, 0x500; out dx, al; out 0x10, al; hlt
        guest.long_mode(b"\x66\xba\x00\x05\xb0\x07\xee\xe6\x10" + HLT)
        values, last = guest.outputs()
        assert values == [7] and isinstance(last, HltExit)
        assert os.eventfd_read(efd) == 1
    finally:
        os.close(efd)


@pytest.mark.kvm
def test_triple_fault_is_shutdown(guest: Guest) -> None:
    guest.long_mode(b"\x0f\x0b")  # ud2 with an empty IDT
    sregs = guest.vcpu.get_sregs()
    sregs.idt.base, sregs.idt.limit = 0, 0
    guest.vcpu.set_sregs(sregs)
    assert isinstance(guest.run(), ShutdownExit)


@pytest.mark.kvm
def test_set_cpuid2_with_the_supported_table(kvm: Kvm, guest: Guest) -> None:
    supported = kvm.get_supported_cpuid()
    for entry in supported:  # a marker the guest can read back
        if entry.function == 0x40000000:
            entry.ebx, entry.ecx, entry.edx = struct.unpack("<3I", b"PYVIRTPYVIRT")
    guest.vcpu.set_cpuid2(supported)
    assert len(guest.vcpu.get_cpuid2()) == len(supported)
    # mov eax, 0x40000000; cpuid; out ebx, ecx, edx to 0x10; hlt
    code = b"\xb8\x00\x00\x00\x40\x0f\xa2\x89\xd8\xe7\x10\x89\xc8\xe7\x10\x89\xd0\xe7\x10" + HLT
    guest.long_mode(code)
    values, _ = guest.outputs()
    assert struct.pack("<3I", *values) == b"PYVIRTPYVIRT"


@pytest.mark.kvm
def test_instructions_the_emulator_cannot_run(kvm: Kvm) -> None:
    """int3 in ring 0: an internal error on PVM, a #BP (here: shutdown) with hardware KVM."""
    g = Guest(kvm)
    try:
        g.long_mode(b"\xcc")
        sregs = g.vcpu.get_sregs()
        sregs.idt.limit = 0
        g.vcpu.set_sregs(sregs)
        exit_ = g.run()
        assert isinstance(exit_, InternalErrorExit | ShutdownExit)
        if isinstance(exit_, InternalErrorExit):
            assert exit_.suberror == abi.KVM_INTERNAL_ERROR_EMULATION
    finally:
        g.close()
