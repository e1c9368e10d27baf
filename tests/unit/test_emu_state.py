"""Saved state of the software CPU on a real guest program: a vCPU that counts
in a register and in memory while a LAPIC periodic timer interrupts it is
kicked (parked), saved (vCPU + VM-level state + a copy of RAM), encoded and
decoded, and restored into a fresh VM and into the same, used VM; the count
continues where it stopped and the timer keeps firing. Also: parking inside
HLT, kick latency, metrics, and records that must be refused."""

from __future__ import annotations

import dataclasses
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("unicorn")

from pyvirt.arch.x86_64.boot import boot_cpu_state, setup_long_mode_memory
from pyvirt.arch.x86_64.cpu_state import DescriptorTable
from pyvirt.arch.x86_64.layout import ZERO_PAGE_ADDR
from pyvirt.devices.bus import Bus
from pyvirt.hypervisor.base import ExitKind, VcpuExit
from pyvirt.hypervisor.emulated import backend, engine
from pyvirt.hypervisor.emulated.backend import (
    EmulatedVcpu,
    EmulatedVcpuState,
    EmulatedVm,
    EmulatedVmState,
)
from pyvirt.memory import GuestMemory
from pyvirt.state import StateError, decode, encode

pytestmark = [
    pytest.mark.skipif(not engine.available(), reason="unicorn lacks pyvirt's patches"),
    pytest.mark.skipif(shutil.which("as") is None or shutil.which("objcopy") is None,
                       reason="needs GNU as/objcopy to assemble the guest"),
]

MEM = 16 << 20
COUNTER = 0x20_0000  # the main loop's count (also kept in RBX)
TICKS = 0x20_0008  # timer interrupts taken
CODE = 0x30_0000
HANDLER = 0x31_0000
IDT = 0x32_0000
STACK = 0x40_0000
VECTOR = 0x30
PERIOD_NS = 1_000_000  # LAPIC timer: 1 ms (bus 1 GHz, divide by 1)


def asm(src: str) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d)
        (p / "a.s").write_text(".intel_syntax noprefix\n.code64\n" + src + "\n")
        subprocess.run(["as", "--64", "-o", str(p / "a.o"), str(p / "a.s")], check=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(p / "a.o"),
                        str(p / "a.bin")], check=True)
        return (p / "a.bin").read_bytes()


def guest_code(*, busy: bool, timer: bool = True) -> bytes:
    setup = f"""
        mov rsp, {STACK:#x}
        mov rdi, 0xfee00000
        mov dword ptr [rdi + 0xf0], 0x1ff
    """
    if timer:
        setup += f"""
        mov dword ptr [rdi + 0x3e0], 0xb
        mov dword ptr [rdi + 0x320], {0x20000 | VECTOR:#x}
        mov dword ptr [rdi + 0x380], {PERIOD_NS}
        """
    if busy:
        loop = f"""
        sti
        xor ebx, ebx
    1:  inc rbx
        mov [{COUNTER:#x}], rbx
        jmp 1b
        """
    else:  # halted between interrupts; counts wake-ups
        loop = f"""
        sti
    1:  hlt
        inc qword ptr [{COUNTER:#x}]
        jmp 1b
        """
    return asm(setup + loop)


HANDLER_CODE = f"""
    push rdi
    inc qword ptr [{TICKS:#x}]
    mov rdi, 0xfee00000
    mov dword ptr [rdi + 0xb0], 0
    pop rdi
    iretq
"""


class Guest:
    """One EmulatedVm + vCPU over its own 16 MiB of RAM."""

    def __init__(self, ram: bytes | None = None) -> None:
        self.mem = GuestMemory.create(MEM)
        if ram is not None:
            self.mem.write(0, ram)
        self.vm: EmulatedVm = backend.EmulatedHypervisor().create_vm(
            self.mem, Bus("pio"), Bus("mmio"), num_cpus=1)
        self.vcpu: EmulatedVcpu = self.vm.create_vcpu(0)
        self.exit: VcpuExit | None = None
        self.returned_at = 0.0
        self._thread: threading.Thread | None = None

    def boot(self, code: bytes) -> None:
        setup_long_mode_memory(self.mem)
        self.mem.write(CODE, code)
        self.mem.write(HANDLER, asm(HANDLER_CODE))
        gate = struct.pack("<HHBBHII", HANDLER & 0xFFFF, 0x10, 0, 0x8E, HANDLER >> 16, 0, 0)
        self.mem.write(IDT + VECTOR * 16, gate)
        state = dataclasses.replace(boot_cpu_state(CODE, ZERO_PAGE_ADDR),
                                    idt=DescriptorTable(IDT, 256 * 16 - 1))
        self.vcpu.set_boot_state(state)

    def start(self) -> None:
        def body() -> None:
            self.exit = self.vcpu.run()
            self.returned_at = time.perf_counter()

        self.exit = None
        self._thread = threading.Thread(target=body, daemon=True)
        self._thread.start()

    def park(self) -> float:
        """Kick and wait: returns the kick -> run() return latency in seconds."""
        assert self._thread is not None
        t0 = time.perf_counter()
        self.vcpu.kick()
        self._thread.join(10)
        assert not self._thread.is_alive(), "the vCPU did not come back from a kick"
        assert self.exit is not None and self.exit.kind is ExitKind.KICKED, self.exit
        return self.returned_at - t0

    def run_for(self, seconds: float) -> float:
        self.start()
        time.sleep(seconds)
        return self.park()

    def u64(self, addr: int) -> int:
        return int(struct.unpack("<Q", bytes(self.mem.view(addr, 8)))[0])

    def ram(self) -> bytes:
        return bytes(self.mem.view(0, MEM))

    def close(self) -> None:
        self.vm.close()
        self.mem.close()


def roundtrip(vcpu_state: object, vm_state: object) -> tuple[Any, Any]:
    return (decode(encode(vcpu_state), EmulatedVcpuState, part="vcpu0"),
            decode(encode(vm_state), EmulatedVmState, part="vm"))


def test_counter_and_timer_continue_in_a_fresh_vm() -> None:
    g = Guest()
    try:
        g.boot(guest_code(busy=True))
        g.run_for(0.3)
        count, ticks = g.u64(COUNTER), g.u64(TICKS)
        assert count > 1000 and ticks > 10
        assert g.vcpu.registers()["rbx"] == count  # parked between two loop iterations
        rip = g.vcpu.registers()["rip"]
        vs, ms = roundtrip(g.vcpu.save_state(), g.vm.save_state())
        assert vs.halted is False
        assert ms.chip.lapics[0].timer_armed
        ram = g.ram()
    finally:
        g.close()
    time.sleep(0.05)  # wall time passes between save and restore
    h = Guest(ram)
    try:
        h.vm.restore_state(ms)
        h.vcpu.restore_state(vs)
        regs = h.vcpu.registers()
        assert regs["rbx"] == count and regs["rip"] == rip
        # the guest TSC went on by the wall time since the save, not backwards
        assert h.vcpu.engine.rdmsr(0x10) >= vs.guest_tsc + 0.05 * h.vm.tsc_hz * 0.9
        assert h.vm.chip.timers.pending() == 1  # the LAPIC timer is armed again
        h.run_for(0.3)
        assert h.u64(COUNTER) > count  # RBX came back: the count did not restart
        assert h.vcpu.registers()["rbx"] == h.u64(COUNTER)
        # the timer keeps firing; the 50 ms gap is one interrupt, not fifty
        assert ticks + 10 < h.u64(TICKS) < ticks + 1 + 400
    finally:
        h.close()


def test_guest_clock_moves_on_by_the_time_since_the_save() -> None:
    """Saved "2 s ago" (the records' wall clock moved back): the guest TSC
    continues 2 s later than at the save, in the engine and on the LAPIC's
    side alike, and the timer does not catch up the 2000 periods it missed."""
    g = Guest()
    try:
        g.boot(guest_code(busy=True))
        g.run_for(0.1)
        ticks = g.u64(TICKS)
        vs, ms = g.vcpu.save_state(), g.vm.save_state()
        ram = g.ram()
    finally:
        g.close()
    ago = 2_000_000_000
    vs = dataclasses.replace(vs, wall_ns=vs.wall_ns - ago)
    ms = dataclasses.replace(ms, wall_ns=ms.wall_ns - ago)
    h = Guest(ram)
    try:
        h.vm.restore_state(ms)
        h.vcpu.restore_state(vs)
        hz = h.vm.tsc_hz
        engine_tsc = h.vcpu.engine.rdmsr(0x10)
        lapic_tsc = h.vm.guest_tsc()
        assert engine_tsc >= vs.guest_tsc + 2 * hz
        assert engine_tsc < vs.guest_tsc + 3 * hz
        assert abs(lapic_tsc - engine_tsc) < hz // 100  # one clock for RDTSC and the LAPIC
        h.run_for(0.2)
        assert ticks + 10 < h.u64(TICKS) < ticks + 1 + 400  # not ~2000 overdue ones
    finally:
        h.close()


def test_restore_into_the_same_used_vm() -> None:
    g = Guest()
    try:
        g.boot(guest_code(busy=True))
        g.run_for(0.2)
        count, ticks = g.u64(COUNTER), g.u64(TICKS)
        vs, ms = roundtrip(g.vcpu.save_state(), g.vm.save_state())
        ram = g.ram()
        g.run_for(0.2)
        assert g.u64(COUNTER) > count
        # reset in place: RAM back first, then the VM and the vCPU
        g.mem.write(0, ram)
        g.vm.restore_state(ms)
        g.vcpu.restore_state(vs)
        assert g.vcpu.registers()["rbx"] == count
        assert g.u64(TICKS) == ticks
        assert g.vm.chip.timers.pending() == 1  # the old timer cancelled, the saved one armed
        g.run_for(0.2)
        assert g.u64(COUNTER) > count
        assert g.vcpu.registers()["rbx"] == g.u64(COUNTER)
        assert g.u64(TICKS) > ticks + 5
    finally:
        g.close()


def test_parked_in_hlt_stays_halted_until_an_interrupt() -> None:
    """No timer: the guest sleeps in HLT. A kick returns KICKED; running again,
    before and after a save/restore into a fresh VM, it stays in HLT until an
    interrupt comes, and then continues right after the HLT."""
    g = Guest()
    try:
        g.boot(guest_code(busy=False, timer=False))
        g.run_for(0.1)
        assert g.vcpu.engine.halted and g.u64(COUNTER) == 0
        g.run_for(0.1)  # run() again: still halted
        assert g.u64(COUNTER) == 0
        vs, ms = roundtrip(g.vcpu.save_state(), g.vm.save_state())
        assert vs.halted is True
        ram = g.ram()
    finally:
        g.close()
    h = Guest(ram)
    try:
        h.vm.restore_state(ms)
        h.vcpu.restore_state(vs)
        h.run_for(0.1)
        assert h.u64(COUNTER) == 0 and h.u64(TICKS) == 0  # still in HLT
        h.start()
        time.sleep(0.05)
        h.vm.chip.lapic(0).accept(VECTOR, False)  # an interrupt wakes it
        deadline = time.monotonic() + 5
        while h.u64(COUNTER) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        h.park()
        assert h.u64(TICKS) == 1 and h.u64(COUNTER) == 1  # handler, then after the HLT
        assert h.vcpu.save_state().halted  # and back in HLT (the engine's own, now)
        assert h.vcpu.engine.halted
    finally:
        h.close()


def _wakes_with(counter: int, ticks: int) -> bool:
    """The halted guest woke for (nearly) every tick. A tick whose interrupt lands
    between the handler's IRET and the next HLT (the vCPU thread preempted by a
    loaded host) is handled without a wake-up of its own, and a kick can end a HLT
    with no tick: a few such, no more than a tenth (CI saw 192 wakes for 198 ticks,
    and 401 for 400 after a restore)."""
    return abs(counter - ticks) <= max(1, ticks // 10)


def test_halted_guest_with_timer_keeps_waking_after_restore() -> None:
    g = Guest()
    try:
        g.boot(guest_code(busy=False))
        g.run_for(0.2)
        ticks = g.u64(TICKS)
        assert ticks > 10 and _wakes_with(g.u64(COUNTER), ticks)
        vs, ms = roundtrip(g.vcpu.save_state(), g.vm.save_state())
        ram = g.ram()
    finally:
        g.close()
    h = Guest(ram)
    try:
        h.vm.restore_state(ms)
        h.vcpu.restore_state(vs)
        h.run_for(0.2)
        assert h.u64(TICKS) > ticks + 10
        assert _wakes_with(h.u64(COUNTER), h.u64(TICKS))
    finally:
        h.close()


def test_kick_latency_busy_and_halted() -> None:
    """Kick -> run() returns KICKED: measured on a busy guest and on one
    sleeping in HLT; the bound is generous (a loaded 2-core host)."""
    lat: dict[str, list[float]] = {"busy": [], "halted": []}
    for kind in ("busy", "halted"):
        g = Guest()
        try:
            g.boot(guest_code(busy=kind == "busy", timer=kind == "busy"))
            for _ in range(20):
                lat[kind].append(g.run_for(0.01))
        finally:
            g.close()
    for kind, xs in lat.items():
        xs.sort()
        print(f"kick latency {kind}: median {xs[len(xs) // 2] * 1e6:.0f} us, "
              f"max {xs[-1] * 1e6:.0f} us")
        assert xs[len(xs) // 2] < 0.05 and xs[-1] < 0.5


def test_metrics_count_exits() -> None:
    g = Guest()
    try:
        g.boot(asm(f"""
            mov rsp, {STACK:#x}
            mov ecx, 0x1b
            rdmsr
            xor eax, eax
            cpuid
            mov dx, 0x80
            out dx, al
            mov rdi, 0xfee00000
            mov eax, [rdi + 0x30]
            mov eax, [0x10000000]
            1: jmp 1b
        """))
        before = g.vcpu.metrics()
        assert set(before) >= {"exits_io", "exits_mmio", "exits_msr", "exits_cpuid",
                               "interrupts"}
        g.run_for(0.1)
        m = g.vcpu.metrics()
        assert m["exits_io"] == before["exits_io"] + 1
        assert m["exits_mmio"] == before["exits_mmio"] + 2  # LAPIC + a hole
        assert m["exits_msr"] == before["exits_msr"] + 1
        assert m["exits_cpuid"] == before["exits_cpuid"] + 1
        assert m["kicks"] == before["kicks"] + 1
    finally:
        g.close()


def test_interrupts_are_counted() -> None:
    g = Guest()
    try:
        g.boot(guest_code(busy=True))
        g.run_for(0.1)
        ticks = g.u64(TICKS)
        # a kick may land between the acknowledge and the handler's first insn
        assert ticks > 0 and g.vcpu.metrics()["interrupts"] in (ticks, ticks + 1)
    finally:
        g.close()


# -- records that must be refused ---------------------------------------------------


@pytest.fixture(scope="module")
def saved() -> Any:
    g = Guest()
    try:
        g.boot(guest_code(busy=True))
        g.run_for(0.05)
        yield g.vcpu.save_state(), g.vm.save_state()
    finally:
        g.close()


@pytest.fixture()
def fresh() -> Any:
    h = Guest()
    yield h
    h.close()


@pytest.mark.parametrize("change,match", [
    ({"version": 2}, "version 2"),
    ({"index": 1}, "index"),
    ({"engine": "unicorn 2.1.4 patches 0001 build 0 context 1"}, "another software CPU engine"),
    ({"context": b"\0" * 100}, "wrong size"),
    ({"tsc_hz": 3_000_000_000_000}, "tsc_hz|TSC runs"),
    ({"halted": 1}, "halted"),
    ({"wall_ns": -1}, "wall_ns"),
    ({"guest_tsc": 1 << 64}, "guest_tsc"),
])
def test_bad_vcpu_records_are_refused(saved: Any, fresh: Guest, change: dict[str, object],
                                      match: str) -> None:
    vs, _ = saved
    with pytest.raises(StateError, match=match):
        fresh.vcpu.restore_state(dataclasses.replace(vs, **change))


def test_tsc_rate_of_another_host_is_refused(saved: Any, fresh: Guest) -> None:
    _, ms = saved
    hz = fresh.vm.tsc_hz
    with pytest.raises(StateError, match="TSC runs at"):
        fresh.vm.restore_state(dataclasses.replace(ms, tsc_hz=int(hz * 1.01)))
    fresh.vm.restore_state(dataclasses.replace(ms, tsc_hz=hz + hz // 10_000))  # within 0.1%


def test_bad_vm_records_are_refused(saved: Any, fresh: Guest) -> None:
    _, ms = saved
    lapic = dataclasses.replace(ms.chip.lapics[0], irr=b"\1")
    for bad, match in ((dataclasses.replace(ms, version=0), "vm"),
                       (dataclasses.replace(ms, num_cpus=2), "2 vCPUs"),
                       (dataclasses.replace(ms, chip=dataclasses.replace(ms.chip, lapics=())),
                        "lapics"),
                       (dataclasses.replace(ms, chip=dataclasses.replace(ms.chip,
                                                                         lapics=(lapic,))),
                        "lapic0.*irr")):
        with pytest.raises(StateError, match=match):
            fresh.vm.restore_state(bad)


def test_garbage_bytes_are_a_state_error() -> None:
    with pytest.raises(StateError, match="vcpu0"):
        decode(b"\x93\x01\x02", EmulatedVcpuState, part="vcpu0")
    with pytest.raises(StateError, match="vm"):
        decode(encode({"version": 1}), EmulatedVmState, part="vm")


def test_saving_a_running_vcpu_is_refused(fresh: Guest) -> None:
    from pyvirt.hypervisor.base import HypervisorError

    fresh.boot(guest_code(busy=True))
    fresh.start()
    time.sleep(0.05)
    try:
        with pytest.raises(HypervisorError, match="running"):
            fresh.vcpu.save_state()
    finally:
        fresh.park()


def test_context_layout_assumptions() -> None:
    """The context header size the engine assumes, and that a saved context
    holds no host pointers (the breakpoint slots are zeroed)."""
    import ctypes

    eng = engine.Engine()
    try:
        ctx = ctypes.c_void_p()
        assert eng._lib.uc_context_alloc(eng._h, ctypes.byref(ctx)) == 0
        try:
            assert ctx.value is not None
            stored = ctypes.c_size_t.from_address(ctx.value).value
        finally:
            eng._lib.uc_context_free(ctx)
        assert stored == eng.context_size()
        assert int(eng._lib.uc_context_size(eng._h)) - stored == engine._CONTEXT_HEADER
        off = eng._breakpoint_offset()
        data = eng.context_bytes()
        assert data[off:off + 32] == bytes(32)
        assert data[-8:] == bytes(8)  # retaddr
        assert engine.build_identity(len(data)).endswith(f"context {len(data)}")
    finally:
        eng.close()


# -- a reboot in place: set_boot_state on a used vCPU ---------------------------------


def test_boot_state_on_a_used_vcpu_drops_old_code_and_hlt() -> None:
    """Reset in place reloads the kernel from the host (no SMC tracking sees
    it) and points the used vCPU at it. Translated code of the previous boot
    must not run, and a vCPU parked in HLT must leave it."""
    g = Guest()
    try:
        g.boot(asm(f"mov qword ptr [{COUNTER:#x}], 0x1111\n1: hlt\njmp 1b"))
        g.run_for(0.1)
        assert g.u64(COUNTER) == 0x1111 and g.vcpu.engine.halted
        g.boot(asm(f"mov qword ptr [{COUNTER:#x}], 0x2222\n1: hlt\njmp 1b"))  # same address
        g.run_for(0.1)
        assert g.u64(COUNTER) == 0x2222
    finally:
        g.close()
