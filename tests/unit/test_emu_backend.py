"""The software CPU backend's pure pieces: CPUID model, MSR routing, MMIO holes,
segment conversion, the host TSC; and the backend's memory map, DMA queue and
guest-physical address width proven with short machine-code snippets on a real
EmulatedVm. No Linux guest is booted here."""

from __future__ import annotations

import dataclasses
import platform
import shutil
import struct
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvirt.arch.x86_64.boot import boot_cpu_state
from pyvirt.hypervisor.emulated import cpuid_model as cm
from pyvirt.hypervisor.emulated.cpuid_model import CpuidModel, tsc_ratio
from pyvirt.hypervisor.emulated.lapic import ApicBus, LocalApic
from pyvirt.hypervisor.emulated.timers import ManualClock, TimerService

pytest.importorskip("unicorn")

from pyvirt.hypervisor.emulated import backend
from pyvirt.hypervisor.emulated.engine import CODE64_FLAGS, DATA_FLAGS, MsrResult

TSC_HZ = 2_596_132_000
BUS_HZ = 1_000_000_000

# What the engine answers natively (measured; see third_party/unicorn/README.md).
NATIVE = {
    0: (0xD, 0x756E6547, 0x6C65746E, 0x49656E69),
    1: (0x306C4, 0x800, 0xC6D82203, 0x078BFBFD),
    7: (0, 0x389, 0, 0),
    0xD: (7, 0x240, 0x340, 0),
    0x8000_0000: (0x8000_0008, 0x756E6547, 0x6C65746E, 0x49656E69),
    0x8000_0001: (0x306C4, 0, 0x21, 0x28100800),
}


def ask(model: CpuidModel, leaf: int, sub: int = 0) -> tuple[int, int, int, int]:
    return model(leaf, sub, NATIVE.get(leaf, (0, 0, 0, 0)))


@pytest.fixture
def model() -> CpuidModel:
    return CpuidModel(TSC_HZ, BUS_HZ)


def test_max_leaves_and_vendor_kept(model: CpuidModel) -> None:
    eax, ebx, ecx, edx = ask(model, 0)
    assert eax == 0x16
    assert (ebx, ecx, edx) == NATIVE[0][1:]  # GenuineIntel
    assert ask(model, 0x8000_0000)[0] == 0x8000_0008


def test_leaf1_features(model: CpuidModel) -> None:
    eax, ebx, ecx, edx = ask(model, 1)
    assert eax == 0x306C4
    assert ecx & cm.ECX_HYPERVISOR and ecx & cm.ECX_TSC_DEADLINE
    for bit in (cm.ECX_XSAVE, cm.ECX_OSXSAVE, cm.ECX_AVX, cm.ECX_X2APIC, cm.ECX_MONITOR,
                cm.ECX_VMX, cm.ECX_PCID):
        assert not ecx & bit
    assert not edx & (cm.EDX_MCE | cm.EDX_MCA)
    assert edx & (1 << 9)  # APIC
    assert ebx >> 24 == 0
    assert CpuidModel(TSC_HZ, BUS_HZ, apic_id=3)(1, 0, NATIVE[1])[1] >> 24 == 3


def test_no_xsave_no_paravirt_no_pmu(model: CpuidModel) -> None:
    assert ask(model, 0xD) == (0, 0, 0, 0)
    assert ask(model, 0xA) == (0, 0, 0, 0)
    assert ask(model, 5) == (0, 0, 0, 0)
    assert ask(model, 0x4000_0000) == (0, 0, 0, 0)
    assert ask(model, 0x4000_0001) == (0, 0, 0, 0)


def test_leaf7_only_executable_features(model: CpuidModel) -> None:
    _, ebx, ecx, edx = ask(model, 7)
    assert ebx == 0x189  # FSGSBASE BMI1 SMEP BMI2 (no ERMS: see cpuid_model)
    assert ecx == 0
    assert edx == cm.L7_EDX_ARCH_CAPABILITIES
    assert ask(model, 7, 1) == (0, 0, 0, 0)
    assert model(7, 0, (0, 0xFFFF_FFFF, 0, 0))[1] == cm.L7_EBX_KEEP


def test_arch_capabilities_say_not_affected() -> None:
    assert cm.ARCH_CAPABILITIES & 1  # RDCL_NO: no Meltdown, so no page-table isolation
    assert not cm.ARCH_CAPABILITIES & (1 << 1)  # no IBRS_ALL: we have no SPEC_CTRL


def test_leaf15_gives_linux_the_tsc_frequency(model: CpuidModel) -> None:
    den, num, crystal, _ = ask(model, 0x15)
    assert crystal == BUS_HZ
    # Linux 6.1 native_calibrate_tsc: 32-bit crystal_khz * numerator / denominator
    khz = ((crystal // 1000) * num & 0xFFFF_FFFF) // den
    assert abs(khz - TSC_HZ // 1000) <= 2
    assert model.reported_tsc_khz == khz
    assert ask(model, 0x16) == (2596, 2596, 1000, 0)
    assert ask(model, 0x8000_0007)[3] & cm.INVARIANT_TSC


@pytest.mark.parametrize("tsc", [1_000_000_000, 1_999_999_000, 2_596_132_000, 3_700_001_000,
                                 4_294_000_000])
def test_tsc_ratio_fits_32_bits(tsc: int) -> None:
    den, num = tsc_ratio(tsc, BUS_HZ)
    assert (BUS_HZ // 1000) * num < 1 << 32
    got = (BUS_HZ // 1000) * num // den
    assert abs(got - tsc // 1000) / (tsc // 1000) < 2e-6


def test_tsc_ratio_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        tsc_ratio(0, BUS_HZ)
    with pytest.raises(ValueError):
        tsc_ratio(5 * 10**12, BUS_HZ)  # 5000 x the crystal: the numerator cannot fit


# -- MSR routing ----------------------------------------------------------------


@pytest.fixture
def lapic() -> Iterator[LocalApic]:
    timers = TimerService(ManualClock(), start=False)
    apic = LocalApic(0, bus=ApicBus(), timers=timers, tsc_hz=TSC_HZ, now_tsc=lambda: 0,
                     bsp=True)
    yield apic
    apic.close()


def test_msr_router(lapic: LocalApic) -> None:
    r = backend.MsrRouter(lapic)
    assert r(0x1B, False, 0) == (MsrResult.HANDLED, 0xFEE00900)
    assert r(0xC000_0080, False, 0)[0] is MsrResult.NATIVE  # EFER: the engine's
    assert r(0x10, True, 5)[0] is MsrResult.NATIVE  # TSC: the engine's
    assert r(0x8B, True, 0)[0] is MsrResult.HANDLED  # microcode revision probe
    assert r(0x8B, False, 0) == (MsrResult.HANDLED, 0)
    assert r(0x10A, False, 0) == (MsrResult.HANDLED, cm.ARCH_CAPABILITIES)
    assert r(0x10A, True, 0)[0] is MsrResult.GP
    # x2APIC registers #GP while the LAPIC is in xAPIC mode
    assert r(0x802, False, 0)[0] is MsrResult.GP
    assert r(0x1B, True, 0xFEE00900 | (1 << 10))[0] is MsrResult.HANDLED  # enter x2APIC
    assert r(0x802, False, 0) == (MsrResult.HANDLED, 0)  # x2APIC ID
    assert r(0x1B, True, 0xFEE00D01)[0] is MsrResult.GP  # reserved bit 0


# -- memory map and segments -----------------------------------------------------


def test_mmio_holes_small_ram() -> None:
    holes = backend.mmio_holes([(0, 512 << 20)])
    assert holes == [(512 << 20, 0xFEE0_0000), (0xFEE0_1000, 1 << 40)]
    assert backend.mmio_holes([(0, 512 << 20)], limit=1 << 32) == [
        (512 << 20, 0xFEE0_0000), (0xFEE0_1000, 1 << 32)]


def test_mmio_holes_split_ram() -> None:
    holes = backend.mmio_holes([(0, 0xC000_0000), (1 << 32, 1 << 30)])
    # everything above RAM (the 64-bit PCI window included) up to the CPU's width
    assert holes == [(0xC000_0000, 0xFEE0_0000), (0xFEE0_1000, 1 << 32),
                     (5 << 30, 1 << backend.PHYS_ADDR_BITS)]


def test_segment_flags_match_engine_constants() -> None:
    st = boot_cpu_state(0x100_0000, 0x7000)
    assert backend.segment_flags(st.cs) == CODE64_FLAGS
    assert backend.segment_flags(st.ds) == DATA_FLAGS


# -- the hypervisor object ---------------------------------------------------------


def test_description_names_the_engine() -> None:
    assert "unicorn" in backend.ENGINE_DESCRIPTION
    assert "QEMU TCG" in backend.ENGINE_DESCRIPTION
    assert backend.EmulatedHypervisor.description == backend.ENGINE_DESCRIPTION
    assert backend.EmulatedHypervisor.name == "emu"


def test_smp_is_refused() -> None:
    from pyvirt.devices.bus import Bus
    from pyvirt.hypervisor.base import HypervisorError
    from pyvirt.hypervisor.emulated import engine
    from pyvirt.memory import GuestMemory

    if not engine.available():
        pytest.skip("unicorn lacks pyvirt's patches")
    hv = backend.EmulatedHypervisor()
    assert hv.max_vcpus() == 1
    mem = GuestMemory.create(16 << 20)
    try:
        with pytest.raises(HypervisorError, match="cpus: 2: the software CPU runs 1 vCPU"):
            hv.create_vm(mem, Bus("pio"), Bus("mmio"), num_cpus=2)
    finally:
        mem.close()


# -- host TSC ------------------------------------------------------------------------

x86_only = pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 host only")


@x86_only
def test_rdtsc_advances() -> None:
    from pyvirt.hypervisor.emulated.hosttsc import rdtsc

    a = rdtsc()
    b = rdtsc()
    assert b > a > 0
    seen: list[int] = []
    t = threading.Thread(target=lambda: seen.append(rdtsc()))
    t.start()
    t.join()
    assert seen[0] > 0


@x86_only
def test_tsc_hz_is_plausible(tmp_path: object) -> None:
    from pathlib import Path

    from pyvirt.hypervisor.emulated.hosttsc import tsc_hz

    fake = Path(str(tmp_path)) / "tsc_freq_khz"
    fake.write_text("2400000\n")
    assert tsc_hz(fake) == 2_400_000_000
    measured = tsc_hz(Path("/nonexistent"))
    assert 200_000_000 < measured < 10_000_000_000
    assert measured % 1000 == 0


# -- the guest-physical address space on a real EmulatedVm ----------------------------

needs_as = pytest.mark.skipif(shutil.which("as") is None or shutil.which("objcopy") is None,
                              reason="needs GNU as/objcopy to assemble snippets")

STOP_PORT = 0x501  # an OUT here kicks the vCPU: the snippet is done
RESULTS = 0x20_0000  # snippets store what they read here
CODE = 0x30_0000
PF_HANDLER = 0x31_0000
SNIPPET_IDT = 0x32_0000
HIGH_PD = 0x10_0000  # page directory for virtual 4-5 GiB: 2 MiB pages anywhere physical
HIGH_VIRT = 4 << 30


def asm(src: str) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d)
        (p / "a.s").write_text(".intel_syntax noprefix\n.code64\n" + src + "\n")
        subprocess.run(["as", "--64", "-o", str(p / "a.o"), str(p / "a.s")], check=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(p / "a.o"),
                        str(p / "a.bin")], check=True)
        return (p / "a.bin").read_bytes()


class _Stop:
    def __init__(self) -> None:
        self.vcpu: Any = None

    def read(self, offset: int, data: memoryview) -> None:
        pass

    def write(self, offset: int, data: memoryview) -> None:
        self.vcpu.kick()


class Recorder:
    def __init__(self, fill: int) -> None:
        self.fill = fill
        self.log: list[tuple[str, int, bytes]] = []

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = self.fill.to_bytes(8, "little")[:len(data)]
        self.log.append(("r", offset, bytes(data)))

    def write(self, offset: int, data: memoryview) -> None:
        self.log.append(("w", offset, bytes(data)))


def run_snippet(code: str, high_pages: list[int], mmio: Any = None,
                pf_handler: bool = False) -> tuple[Any, bytes]:
    """Run ``code`` at CPL 0 with virtual HIGH_VIRT + i * 2 MiB mapped to
    physical ``high_pages[i]`` on a 16 MiB EmulatedVm; it ends with an OUT to
    STOP_PORT. Returns the exit and 64 bytes from RESULTS."""
    from pyvirt.arch.x86_64.boot import setup_long_mode_memory
    from pyvirt.arch.x86_64.cpu_state import DescriptorTable
    from pyvirt.arch.x86_64.layout import PDPT_ADDR, ZERO_PAGE_ADDR
    from pyvirt.devices.bus import Bus
    from pyvirt.memory import GuestMemory

    mem = GuestMemory.create(16 << 20)
    vm = None
    try:
        setup_long_mode_memory(mem)
        mem.write(PDPT_ADDR + 4 * 8, struct.pack("<Q", HIGH_PD | 3))
        mem.write(HIGH_PD, b"".join(struct.pack("<Q", pa | 0x83) for pa in high_pages))
        # the kick takes effect at the next translation block: spin until then
        mem.write(CODE, asm(code + f"\nmov dx, {STOP_PORT:#x}\nout dx, al\n1: jmp 1b\n"))
        state = boot_cpu_state(CODE, ZERO_PAGE_ADDR)
        if pf_handler:  # #PF: store the error code and CR2, then stop
            mem.write(PF_HANDLER, asm(f"""
                pop rax
                mov [{RESULTS + 56:#x}], rax
                mov rax, cr2
                mov [{RESULTS + 48:#x}], rax
                mov dx, {STOP_PORT:#x}
                out dx, al
                1: jmp 1b
            """))
            gate = struct.pack("<HHBBHII", PF_HANDLER & 0xFFFF, 0x10, 0, 0x8E,
                               PF_HANDLER >> 16, 0, 0)
            mem.write(SNIPPET_IDT + 14 * 16, gate)
            state = dataclasses.replace(state, idt=DescriptorTable(SNIPPET_IDT, 256 * 16 - 1))
        stop = _Stop()
        pio = Bus("pio")
        pio.insert(stop, STOP_PORT, 1, "stop")
        vm = backend.EmulatedHypervisor().create_vm(mem, pio, mmio or Bus("mmio"), num_cpus=1)
        stop.vcpu = vcpu = vm.create_vcpu(0)
        vcpu.set_boot_state(state)
        exit_ = vcpu.run()
        return exit_, bytes(mem.view(RESULTS, 64))
    finally:
        if vm is not None:
            vm.close()
        mem.close()


@needs_as
def test_unmapped_guest_physical_reads_all_ones_and_drops_writes() -> None:
    """Issue #17: a read of 0x1_0000_0000 in a small guest stopped the engine
    (UC_ERR_READ_UNMAPPED) and ended the VM."""
    from pyvirt.devices.bus import Bus
    from pyvirt.hypervisor.base import ExitKind

    top = (1 << backend.PHYS_ADDR_BITS) - (2 << 20)  # the last 2 MiB below the width
    mmio = Bus("mmio")
    exit_, res = run_snippet(f"""
        mov rax, {HIGH_VIRT:#x}
        mov dword ptr [rax], 0x12345678
        mov ecx, [rax]
        mov [{RESULTS:#x}], rcx
        mov rax, {HIGH_VIRT + (2 << 20) + 8:#x}
        mov qword ptr [rax], -2
        mov rcx, [rax]
        mov [{RESULTS + 8:#x}], rcx
        mov rax, {HIGH_VIRT + (4 << 20) + (2 << 20) - 8:#x}
        mov rcx, [rax]
        mov [{RESULTS + 16:#x}], rcx
        mov byte ptr [rax], 0
        mov cl, [rax]
        mov [{RESULTS + 24:#x}], cl
    """, [1 << 32, 48 << 30, top], mmio=mmio)
    assert exit_.kind is ExitKind.KICKED, exit_
    assert struct.unpack_from("<QQQB", res) == (
        0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF, 0xFF)
    # through the bus, so they are counted
    assert mmio.unclaimed[("write", 1 << 32)] == 1 and mmio.unclaimed[("read", 1 << 32)] == 1
    # the engine splits a qword MMIO read in two dword reads; then the byte read
    assert mmio.unclaimed[("read", top + (2 << 20) - 8)] == 2
    assert mmio.unclaimed[("write", top + (2 << 20) - 8)] == 1


@needs_as
def test_a_device_anywhere_in_the_address_space_is_reached() -> None:
    """64-bit BARs go where the guest puts them: the engine maps all of it to the bus."""
    from pyvirt.devices.bus import Bus
    from pyvirt.hypervisor.base import ExitKind

    mmio = Bus("mmio")
    low, high = Recorder(0x1122334455667788), Recorder(0xA5A5A5A5A5A5A5A5)
    mmio.insert(low, 0x8_0000_1000, 0x1000, "in-window")  # the 64-bit PCI window
    mmio.insert(high, 0xF0_0000_0000, 0x1000, "far")  # far above it
    exit_, res = run_snippet(f"""
        mov rax, {HIGH_VIRT + 0x1000:#x}
        mov ecx, [rax + 8]
        mov [{RESULTS:#x}], rcx
        mov word ptr [rax + 4], 0xbeef
        mov rax, {HIGH_VIRT + (2 << 20):#x}
        mov ecx, [rax + 0x10]
        mov [{RESULTS + 8:#x}], rcx
    """, [0x8_0000_0000, 0xF0_0000_0000], mmio=mmio)
    assert exit_.kind is ExitKind.KICKED, exit_
    assert struct.unpack_from("<QQ", res) == (0x55667788, 0xA5A5A5A5)
    assert low.log == [("r", 8, (0x55667788).to_bytes(4, "little")),
                       ("w", 4, b"\xef\xbe")]
    assert high.log == [("r", 0x10, b"\xa5" * 4)]
    assert not mmio.unclaimed


@needs_as
def test_physical_address_width_is_what_cpuid_says_and_the_page_walk_enforces() -> None:
    """No address at or above 2**PHYS_ADDR_BITS can reach the engine: CPUID tells
    the guest the width, and a PTE pointing above it faults (#PF, RSVD) in the
    guest instead of stopping the engine."""
    from pyvirt.hypervisor.base import ExitKind

    beyond = 1 << backend.PHYS_ADDR_BITS
    exit_, res = run_snippet(f"""
        mov eax, 0x80000008
        cpuid
        mov [{RESULTS:#x}], rax
        mov rax, {HIGH_VIRT + (2 << 20) + 0x40:#x}
        mov rcx, [rax]
        mov qword ptr [{RESULTS + 8:#x}], 1
    """, [1 << 32, beyond], pf_handler=True)
    assert exit_.kind is ExitKind.KICKED, exit_
    phys_bits, = struct.unpack_from("<Q", res)
    assert phys_bits & 0xFF == backend.PHYS_ADDR_BITS
    _, reached, cr2, error = struct.unpack_from("<QQ", res) + struct.unpack_from("<QQ", res, 48)
    assert reached == 0  # the load faulted
    assert cr2 == HIGH_VIRT + (2 << 20) + 0x40
    assert error & 0b1001 == 0b1001  # present, reserved bit set


def test_dma_invalidation_queue_is_bounded() -> None:
    """A guest that keeps devices busy with interrupts off queues DMA ranges
    that only an interrupt or a stop drains: the queue must stay bounded and
    still cover every byte written (split at RAM region boundaries)."""
    from pyvirt.devices.bus import Bus
    from pyvirt.hypervisor.emulated import engine
    from pyvirt.memory import GuestMemory

    if not engine.available():
        pytest.fail("unicorn lacks pyvirt's patches: run third_party/unicorn/build.sh")
    mem = GuestMemory.create(16 << 20)
    vm = backend.EmulatedHypervisor().create_vm(mem, Bus("pio"), Bus("mmio"), num_cpus=1)
    try:
        done: list[tuple[int, int]] = []

        class FakeEngine:
            def invalidate_phys(self, gpa: int, size: int) -> None:
                done.append((gpa, size))

        vm.vcpus.append(type("FakeVcpu", (), {"engine": FakeEngine(), "close": lambda s: None})())
        written = [((i * 7919) % 4000 * 4096, 512) for i in range(100_000)]
        for gpa, size in written:
            vm.note_dma_write(gpa, size)
            assert len(vm._dma_ranges) <= backend.MAX_DMA_RANGES
        vm.note_dma_write(0, 8)
        vm.apply_dma_invalidations()
        assert not vm._dma_ranges
        covered = sorted(done)
        for gpa, size in [*written[::997], (0, 8)]:
            assert any(a <= gpa and gpa + size <= a + n for a, n in covered), hex(gpa)
    finally:
        vm.vcpus.clear()
        vm.close()
        mem.close()


def test_dma_invalidation_is_split_at_ram_regions() -> None:
    from pyvirt.devices.bus import Bus
    from pyvirt.memory import GuestMemory

    # 3.5 GiB of RAM is reserved, not touched: split at the PCI hole
    mem = GuestMemory.create(0xE000_0000)
    vm = backend.EmulatedHypervisor().create_vm(mem, Bus("pio"), Bus("mmio"), num_cpus=1)
    try:
        done: list[tuple[int, int]] = []
        eng = type("FakeEngine", (), {"invalidate_phys": lambda s, a, n: done.append((a, n))})()
        vm.vcpus.append(type("FakeVcpu", (), {"engine": eng, "close": lambda s: None})())
        vm.invalidate_code(0xBFFF_F000, (4 << 30) + 0x2000 - 0xBFFF_F000)
        assert done == [(0xBFFF_F000, 0x1000), (1 << 32, 0x2000)]
    finally:
        vm.vcpus.clear()
        vm.close()
        mem.close()


def test_acknowledge_never_spins_on_an_interrupt_the_chip_does_not_hand_out() -> None:
    """A chip that says "pending" but yields no vector at acknowledge (a
    guest-made inconsistency) must not get INTR raised again: that livelocked
    the vCPU thread in acknowledges without running the guest."""
    from pyvirt.hypervisor.emulated.backend import EmulatedVcpu

    raised: list[int] = []

    class Chip:
        def __init__(self, vector: int | None) -> None:
            self.vector = vector

        def interrupt_for_cpu(self, i: int) -> int | None:
            return self.vector

        def has_interrupt(self, i: int) -> bool:
            return True

    class Eng:
        def raise_irq(self) -> None:
            raised.append(1)

    class Vm:
        _dma_ranges: list[object] = []

    class Vcpu:
        interrupts = 0

    vcpu = Vcpu()
    ack = EmulatedVcpu._make_ack(Chip(None), Eng(), 0, Vm(), vcpu)  # type: ignore[arg-type]
    assert ack() == -1
    assert raised == []
    ack = EmulatedVcpu._make_ack(Chip(0x30), Eng(), 0, Vm(), vcpu)  # type: ignore[arg-type]
    assert ack() == 0x30
    assert raised == [1]  # a real delivery with more pending re-raises INTR
    assert vcpu.interrupts == 1  # counted (metrics) only when delivered
