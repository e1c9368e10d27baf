"""KVM saved state, parking and exit metrics, with the test guest in this process.

The guest (tests/guests, ``test=count``) counts in a page of its memory as
fast as it can while its LAPIC timer ticks every 1 ms, and records the largest
TSC gap between two ticks. The test kicks the vCPU out of ``KVM_RUN`` (parks
it), saves the vCPU and VM state and a copy of guest RAM, builds a FRESH VM
over a copy of that memory, restores, runs: both counts go on from where they
stopped and the guest's TSC moved on by the wall-clock time the snapshot was
parked, no more. Records round-trip through ``pyvirt.state``; a used VM takes
its own earlier state back; bad records are ``StateError``s.
"""

from __future__ import annotations

import dataclasses
import signal
import statistics
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirt.arch.x86_64.boot import boot_cpu_state, setup_long_mode_memory
from pyvirt.arch.x86_64.msr import IA32_TSC
from pyvirt.devices.bus import Bus
from pyvirt.devices.legacy.serial import Serial16550
from pyvirt.hypervisor.base import ExitKind, VcpuExit
from pyvirt.hypervisor.kvm import KvmHypervisor, KvmVcpu, KvmVcpuState, KvmVm, KvmVmState
from pyvirt.kvm import abi
from pyvirt.loader import Cmdline, load_kernel, setup_linux_boot
from pyvirt.memory import GuestMemory
from pyvirt.state import StateError, decode, encode

pytestmark = pytest.mark.kvm

MEM = 32 << 20
COUNT_AREA = 0x30000  # tests/guests/guest.c
COUNT_MAGIC = 0x544E554F43564B50
_AREA = struct.Struct("<6Q")  # magic, counter, ticks, last_tsc, max_gap, backwards


class _Port:
    """A port sink; ``on_write`` runs on the vCPU thread."""

    def __init__(self, on_write: object = None) -> None:
        self.writes = 0
        self.on_write = on_write

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = b"\xff" * len(data)

    def write(self, offset: int, data: memoryview) -> None:
        self.writes += 1
        if callable(self.on_write):
            self.on_write()


class GuestVm:
    """One KVM VM running the test guest on one vCPU in a thread of this process."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.pio, self.mmio = Bus("pio"), Bus("mmio")
        self.console = bytearray()
        self.vm: KvmVm = KvmHypervisor().create_vm(memory, self.pio, self.mmio, num_cpus=1)
        self.pio.insert(Serial16550(self.vm.irq_line(4), self.console.extend), 0x3F8, 8,
                        "serial0")
        self.vcpu: KvmVcpu = self.vm.create_vcpu(0)
        self.powered_off = False
        self.pio.insert(_Port(self._poweroff), 0x604, 2, "pm1a-cnt")
        self.thread: threading.Thread | None = None
        self.exit: VcpuExit | None = None
        self.left_at = 0.0

    @classmethod
    def boot(cls, guest: Path, test: str) -> GuestVm:
        mem = GuestMemory.create(MEM)
        kernel = load_kernel(mem, guest)
        setup_long_mode_memory(mem)
        bp = setup_linux_boot(mem, kernel, Cmdline(f"test={test}"), None, None)
        t = cls(mem)
        t.vcpu.set_boot_state(boot_cpu_state(kernel.entry, bp))
        return t

    def _poweroff(self) -> None:
        self.powered_off = True
        self.vcpu.kick()  # the guest halts with interrupts off: come back out

    def _run(self) -> None:
        self.exit = self.vcpu.run()
        self.left_at = time.perf_counter()

    def start(self) -> None:
        assert self.thread is None
        self.exit = None
        self.thread = threading.Thread(target=self._run, name="vcpu0", daemon=True)
        self.thread.start()

    def park(self) -> float:
        """kick(); wait for run() to return KICKED; the kick-to-return latency (s)."""
        assert self.thread is not None
        t0 = time.perf_counter()
        self.vcpu.kick()
        self.thread.join(10)
        assert not self.thread.is_alive(), "the vCPU did not leave KVM_RUN after a kick"
        self.thread = None
        assert self.exit is not None and self.exit.kind is ExitKind.KICKED, self.exit
        return self.left_at - t0

    def area(self) -> tuple[int, ...]:
        return _AREA.unpack(self.memory.read(COUNT_AREA, _AREA.size))

    def wait_ticks(self, n: int, timeout: float = 20) -> tuple[int, ...]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            a = self.area()
            if a[0] == COUNT_MAGIC and a[2] >= n:
                return a
            time.sleep(0.01)
        raise AssertionError(f"guest did not reach {n} ticks: {self.area()}, console "
                             f"{bytes(self.console)!r}")

    def close(self) -> None:
        if self.thread is not None:
            self.park()
        self.vm.close()
        self.memory.close()


@pytest.fixture(scope="module", autouse=True)
def kick_signal() -> Iterator[None]:
    # what the VMM installs: SIGUSR1 only interrupts KVM_RUN
    old = signal.signal(signal.SIGUSR1, lambda *_: None)
    yield
    signal.signal(signal.SIGUSR1, old)


@pytest.fixture
def running(test_guest: Path) -> Iterator[GuestVm]:
    t = GuestVm.boot(test_guest, "count")
    t.start()
    t.wait_ticks(20)
    yield t
    t.close()


def _fresh_from(image: bytes) -> GuestVm:
    mem = GuestMemory.create(MEM)
    mem.write(0, image)
    return GuestVm(mem)


def _khz(t: GuestVm) -> int:
    return t.vcpu.fd.get_tsc_khz()


# --------------------------------------------------------------------------- parking


def test_parked_vcpu_stays_parked_and_resumes(running: GuestVm) -> None:
    running.park()
    a = running.area()
    time.sleep(0.2)
    assert running.area() == a  # nothing runs: neither the loop nor the timer
    running.start()
    b = running.wait_ticks(a[2] + 20)
    assert b[1] > a[1] and b[2] > a[2]


def test_kick_before_run_returns_at_once(test_guest: Path) -> None:
    """A kick that lands before the thread enters KVM_RUN (immediate_exit)."""
    t = GuestVm.boot(test_guest, "count")
    try:
        t.vcpu.kick()
        t0 = time.perf_counter()
        ex = t.vcpu.run()
        assert ex.kind is ExitKind.KICKED
        assert time.perf_counter() - t0 < 1
        assert t.area()[0] != COUNT_MAGIC  # the guest did not get to run
        t.start()  # and the next run() enters the guest normally
        t.wait_ticks(5)
    finally:
        t.close()


@pytest.mark.parametrize("test", ["count", "count-hlt"])
def test_kick_latency(test_guest: Path, test: str) -> None:
    """kick() -> run() returned KICKED, for a vCPU spinning in the guest and for
    one asleep in HLT inside KVM_RUN (the in-kernel LAPIC: HLT never exits)."""
    t = GuestVm.boot(test_guest, test)
    try:
        t.start()
        t.wait_ticks(10)
        samples = []
        for _ in range(30):
            time.sleep(0.003)
            samples.append(t.park())
            t.start()
        t.wait_ticks(t.area()[2] + 2)  # it still runs after all that
        med, worst = statistics.median(samples), max(samples)
        print(f"\nkick->KICKED ({test}): median {med * 1e6:.0f} us, max {worst * 1e6:.0f} us")
        assert worst < 0.5  # generous: a loaded 2-core host
        assert t.vcpu.metrics()["exits_intr"] >= 30
    finally:
        t.close()


# --------------------------------------------------------------------------- save/restore


def test_restore_into_a_fresh_vm_continues_counting(running: GuestVm) -> None:
    running.park()
    t_park = time.perf_counter()
    khz = _khz(running)  # a vCPU ioctl: waits while the vCPU is in KVM_RUN
    before = running.area()
    vm_rec = running.vm.save_state()
    cpu_rec = running.vcpu.save_state()
    image = bytearray(running.memory.read(0, MEM))
    # round trip through the snapshot encoding
    vm_rec2 = decode(encode(vm_rec), KvmVmState, part="kvm-vm")
    cpu_rec2 = decode(encode(cpu_rec), KvmVcpuState, part="vcpu0")
    assert vm_rec2 == vm_rec and cpu_rec2 == cpu_rec
    saved = dict(cpu_rec.msrs)
    for msr in (IA32_TSC, 0x6E0, 0x277, 0x2FF, 0x4B564D00, 0x4B564D01, 0x174, 0xC0000082):
        assert msr in saved, hex(msr)  # TSC, TSC_DEADLINE, PAT, MTRR, kvmclock, SYSCALL
    assert cpu_rec.xsave is not None and len(cpu_rec.xsave) >= 4096
    # the max-gap statistic from here on covers only the restore
    struct.pack_into("<Q", image, COUNT_AREA + 32, 0)
    running.close()

    time.sleep(0.5)  # the snapshot sits on the shelf: guest time must cover this
    fresh = _fresh_from(bytes(image))
    try:
        fresh.vm.restore_state(vm_rec2)
        fresh.vcpu.restore_state(cpu_rec2)
        tsc_now = fresh.vcpu.fd.get_msrs([IA32_TSC])[IA32_TSC]
        # kvmclock too moved on by the shelf time (the guest's wall clock follows)
        clock_shelf = (fresh.vm.fd.get_clock().clock - vm_rec.clock_ns) / 1e9
        assert 0.45 < clock_shelf < time.perf_counter() - t_park + 0.05, clock_shelf
        fresh.start()
        t_run = time.perf_counter()
        fresh.wait_ticks(before[2] + 1, timeout=20)
        t_seen = time.perf_counter()  # the first tick after the restore is before this
        after = fresh.wait_ticks(before[2] + 50)
        assert fresh.console == b""  # no reboot: a fresh boot would print "count: running"
        # no reset: both counters continue from the saved values
        assert after[1] > before[1] and after[2] > before[2]
        assert after[5] == 0  # the TSC never went backwards
        # the TSC moved on by the shelf time (not frozen, not more)
        shelf = (tsc_now - saved[IA32_TSC]) / khz / 1e3
        assert 0.45 < shelf < time.perf_counter() - t_park + 0.05, shelf
        # the guest's largest tick gap is the pause itself, no more (the last
        # tick before the kick came shortly before t_park)
        gap = after[4] / khz / 1e3
        assert gap <= (t_seen - t_park) + 0.25, (gap, t_seen - t_park)
        assert gap >= 0.45, gap
        # and no burst of catch-up ticks: ~1 per ms since the restore
        fresh.park()
        ran = time.perf_counter() - t_run
        end = fresh.area()
        assert end[2] - before[2] <= ran * 1000 * 1.2 + 20, (end[2] - before[2], ran)
        print(f"\nrestore: shelf {shelf:.3f} s, largest tick gap {gap:.3f} s, "
              f"{end[2] - before[2]} ticks in {ran:.3f} s")
    finally:
        fresh.close()


def test_restore_into_the_same_used_vm(running: GuestVm) -> None:
    running.park()
    before = running.area()
    vm_rec = running.vm.save_state()
    cpu_rec = running.vcpu.save_state()
    image = running.memory.read(0, MEM)
    running.start()
    running.wait_ticks(before[2] + 100)  # run on well past the save
    running.park()
    assert running.area()[2] >= before[2] + 100

    running.memory.write(0, image)
    running.vm.restore_state(vm_rec)
    running.vcpu.restore_state(cpu_rec)
    again = running.vcpu.save_state()
    # exactly as the record says (the TSC has moved on by design; the LAPIC's
    # current count and the time stamps run with time)
    for field in ("regs", "sregs", "xsave", "xcrs", "debugregs", "events", "mp_state"):
        assert getattr(again, field) == getattr(cpu_rec, field), field
    moved = {IA32_TSC}
    assert {k: v for k, v in again.msrs if k not in moved} == {
        k: v for k, v in cpu_rec.msrs if k not in moved}
    assert dict(again.msrs)[IA32_TSC] >= dict(cpu_rec.msrs)[IA32_TSC]
    vm_again = running.vm.save_state()
    assert (vm_again.pic_master, vm_again.pic_slave) == (vm_rec.pic_master, vm_rec.pic_slave)
    assert vm_again.ioapic == vm_rec.ioapic
    assert vm_again.clock_ns >= vm_rec.clock_ns
    running.start()
    after = running.wait_ticks(before[2] + 20)
    assert after[2] < before[2] + 100  # it went back to the saved counts, then on
    assert after[1] > before[1]


def test_vm_restore_makes_irq_lines_resend(running: GuestVm,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """After the irqchip is replaced, a device re-raising its line must reach
    KVM even if the line's cached level says it is already high."""
    running.park()
    rec = running.vm.save_state()  # GSI 9 low
    sent: list[tuple[int, int]] = []
    real = running.vm.fd.irq_line
    monkeypatch.setattr(running.vm.fd, "irq_line",
                        lambda gsi, level: (sent.append((gsi, level)), real(gsi, level)))
    line = running.vm.irq_line(9)
    line.set_level(True)
    running.vm.restore_state(rec)
    line.set_level(True)  # the device's restore: its line is high
    assert sent == [(9, 1), (9, 1)]
    line.set_level(False)
    assert sent[-1] == (9, 0)


def test_pause_clock_stops_kvmclock(running: GuestVm) -> None:
    running.park()
    vm = running.vm
    vm.pause_clock()
    c0 = vm.fd.get_clock().clock
    time.sleep(0.3)
    vm.resume_clock()
    c1 = vm.fd.get_clock().clock
    assert c1 - c0 < 0.1e9, (c1 - c0) / 1e9  # the 0.3 s paused did not count
    running.start()
    running.wait_ticks(running.area()[2] + 5)


# --------------------------------------------------------------------------- bad records


def test_bad_records_are_state_errors(running: GuestVm) -> None:
    running.park()
    vm_rec = running.vm.save_state()
    cpu_rec = running.vcpu.save_state()
    r = dataclasses.replace
    bad_cpu = [
        (r(cpu_rec, version=99), "version 99"),
        (r(cpu_rec, index=3), "vCPU 3"),
        (r(cpu_rec, mp_state=1000), "mp_state"),
        (r(cpu_rec, regs=cpu_rec.regs[:-1]), "regs holds"),
        (r(cpu_rec, sregs=b""), "sregs holds"),
        (r(cpu_rec, lapic=cpu_rec.lapic + b"\0"), "lapic holds"),
        (r(cpu_rec, xsave=bytes(100)), "xsave holds"),
        (r(cpu_rec, xsave=bytes(1 << 20)), "xsave holds"),
        (r(cpu_rec, xsave=None, fpu=None), "neither xsave nor fpu"),
        (r(cpu_rec, msrs=tuple((0x10, i) for i in range(5000))), "msrs has 5000"),
        (r(cpu_rec, msrs=((0x10, 1 << 64),)), "out of range"),
        (r(cpu_rec, msrs=((1 << 32, 0),)), "out of range"),
        (r(cpu_rec, xcrs=((0, 1),) * 17), "xcrs has 17"),
        (r(cpu_rec, tsc_khz=-1), "tsc_khz"),
        # KVM's own checks: an MSR it does not know, XCR0 without x87
        (r(cpu_rec, msrs=(*cpu_rec.msrs, (0x4000_1234, 0))), "KVM refused the saved msrs"),
        (r(cpu_rec, xcrs=((0, 0),)), "KVM refused the saved xcrs"),
    ]
    if not running.vcpu.vm.tsc_control:
        bad_cpu.append((r(cpu_rec, tsc_khz=cpu_rec.tsc_khz * 2), "cannot scale the TSC"))
    for rec, needle in bad_cpu:
        with pytest.raises(StateError, match=needle):
            running.vcpu.restore_state(rec)
    # a TSC far ahead of this host's: real KVM sets it; PVM cannot offset the
    # guest TSC (the write is taken and ignored), so the guest's TSC would go
    # backwards: refused
    ahead = tuple((k, v + (1 << 50) if k == IA32_TSC else v) for k, v in cpu_rec.msrs)
    fd = running.vcpu.fd
    probe = fd.get_msrs([IA32_TSC])[IA32_TSC] + (1 << 50)
    fd.set_msrs({IA32_TSC: probe})
    if abs(fd.get_msrs([IA32_TSC])[IA32_TSC] - probe) > 1 << 40:  # ignored: PVM
        with pytest.raises(StateError, match="TSC would go backwards"):
            running.vcpu.restore_state(r(cpu_rec, msrs=ahead))
    else:
        running.vcpu.restore_state(r(cpu_rec, msrs=ahead))
        assert fd.get_msrs([IA32_TSC])[IA32_TSC] >= dict(ahead)[IA32_TSC]
    ioapic = abi.kvm_ioapic_state.from_buffer_copy(vm_rec.ioapic)
    ioapic.base_address = 0xD000_0000
    bad_vm = [
        (r(vm_rec, version=0), "version 0"),
        (r(vm_rec, pic_master=b"\0" * 3), "pic_master holds"),
        (r(vm_rec, ioapic=bytes(ioapic)), "base_address"),
        (r(vm_rec, pit=vm_rec.pit[:10]), "pit holds"),
        (r(vm_rec, clock_ns=-5), "clock_ns"),
    ]
    for vrec, needle in bad_vm:
        with pytest.raises(StateError, match=needle):
            running.vm.restore_state(vrec)
    # garbage bytes where a record should be
    with pytest.raises(StateError, match="vcpu0"):
        decode(encode(cpu_rec)[:-7], KvmVcpuState, part="vcpu0")
    with pytest.raises(StateError, match="kvm-vm"):
        decode(b"\x93\x01\x02\x03", KvmVmState, part="kvm-vm")
    # after all that the real record still restores and the guest runs on
    a = running.area()
    running.vm.restore_state(vm_rec)
    running.vcpu.restore_state(cpu_rec)
    running.start()
    b = running.wait_ticks(a[2] + 20)
    assert b[1] > a[1]


# --------------------------------------------------------------------------- metrics


def test_metrics_count_exits_by_kind(running: GuestVm) -> None:
    running.park()
    m = running.vcpu.metrics()
    assert set(m) == {"exits_io", "exits_mmio", "exits_hlt", "exits_intr",
                      "exits_system_event", "exits_other"}
    assert m["exits_io"] >= len("count: running\n")  # the UART, polled: several per byte
    assert m["exits_intr"] == 1
    running.start()
    running.wait_ticks(running.area()[2] + 5)
    running.park()
    m2 = running.vcpu.metrics()
    assert m2["exits_intr"] == 2 and all(m2[k] >= m[k] for k in m)


def test_pio_exits_are_counted(test_guest: Path) -> None:
    t = GuestVm.boot(test_guest, "pio")
    try:
        sink = _Port()
        t.pio.insert(sink, 0x80, 1, "sink")
        ex = t.vcpu.run()
        assert ex.kind is ExitKind.KICKED and t.powered_off
        assert sink.writes == 200_000 and b"pio done" in t.console
        m = t.vcpu.metrics()
        assert m["exits_io"] >= 200_000
        assert m["exits_system_event"] + m["exits_other"] == 0  # poweroff is a port write
    finally:
        t.close()
