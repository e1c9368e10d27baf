"""The software CPU backend's pure pieces: CPUID model, MSR routing, MMIO holes,
segment conversion, the host TSC. No guest is booted here."""

from __future__ import annotations

import platform
import threading
from collections.abc import Iterator

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
    assert holes == [(512 << 20, 0xFEE0_0000), (0xFEE0_1000, 1 << 32)]


def test_mmio_holes_split_ram() -> None:
    holes = backend.mmio_holes([(0, 0xC000_0000), (1 << 32, 1 << 30)])
    assert holes == [(0xC000_0000, 0xFEE0_0000), (0xFEE0_1000, 1 << 32)]


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
        with pytest.raises(HypervisorError, match="--cpus 2: the software CPU runs 1 vCPU"):
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
