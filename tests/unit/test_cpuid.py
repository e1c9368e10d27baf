"""CPUID shaping against synthetic ``KVM_GET_SUPPORTED_CPUID`` output."""

from __future__ import annotations

import copy

import pytest

from pyvirt.arch.x86_64.cpuid import (
    KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
    KVM_FEATURE_CLOCKSOURCE2,
    KVM_FEATURE_HC_MAP_GPA_RANGE,
    KVM_FEATURE_MSI_EXT_DEST_ID,
    KVM_FEATURE_NOP_IO_DELAY,
    CpuidEntry,
    cpuid_entry_flags,
    shape_cpuid,
)

SIG = KVM_CPUID_FLAG_SIGNIFCANT_INDEX


def _vendor_regs(vendor: bytes) -> tuple[int, int, int]:
    b, d, c = (int.from_bytes(vendor[i:i + 4], "little") for i in (0, 4, 8))
    return b, c, d


def intel_supported() -> list[CpuidEntry]:
    b, c, d = _vendor_regs(b"GenuineIntel")
    e = CpuidEntry
    return [
        e(0, 0, 0, 0x1F, b, c, d),
        # ECX: SSE3, MONITOR(3), VMX(5), SMX(6), EST(7), PDCM(15), x2APIC(21), AVX(28)
        # EDX: FPU, TSC, ACPI(22), SSE2(26), HTT(28), TM(29)
        e(1, 0, 0, 0x000806F8, 0x00FF0800 | (0x12 << 24),
          (1 << 0) | (1 << 3) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 15) | (1 << 21) | (1 << 28),
          (1 << 0) | (1 << 4) | (1 << 22) | (1 << 26) | (1 << 28) | (1 << 29)),
        e(4, 0, SIG, 0x1C004121, 0x02C0003F, 0x3F, 0),  # L1d
        e(4, 1, SIG, 0x1C004122, 0x01C0003F, 0x3F, 0),  # L1i
        e(4, 2, SIG, 0x1C004143, 0x03C0003F, 0x3FF, 0),  # L2
        e(4, 3, SIG, 0x1C07C163, 0x03C0003F, 0xFFFF, 6),  # L3
        e(4, 4, SIG, 0, 0, 0, 0),
        e(5, 0, 0, 0x40, 0x40, 3, 0x11142120),
        e(6, 0, 0, 4, 0, 0, 0),
        # leaf 7: EBX SGX(2), AVX2(5), INTEL_PT(25); ECX SGX_LC(30); EDX arch LBR(19)
        e(7, 0, SIG, 1, (1 << 2) | (1 << 5) | (1 << 25), 1 << 30, 1 << 19),
        e(7, 1, SIG, 0, 0, 0, 0),
        e(0xA, 0, 0, 0x07300805, 0, 0, 0x603),
        e(0xB, 0, SIG, 1, 2, 0x100, 0x12),
        e(0xB, 1, SIG, 7, 64, 0x201, 0x12),
        e(0xD, 0, SIG, 0x7, 0x340, 0x340, 0),
        e(0xD, 1, SIG, 0xF, 0, 0, 0),
        e(0x12, 0, SIG, 1, 0, 0, 0),
        e(0x14, 0, SIG, 1, 0, 0, 0),
        e(0x1F, 0, SIG, 1, 2, 0x100, 0x12),
        e(0x1F, 1, SIG, 4, 16, 0x201, 0x12),
        e(0x1F, 2, SIG, 7, 64, 0x502, 0x12),
        e(0x4000_0000, 0, 0, 0x4000_0001, 0x4B4D564B, 0x564B4D56, 0x4D),
        e(0x4000_0001, 0, 0, 0x0101_FEFB, 0, 0, 1),
        e(0x8000_0000, 0, 0, 0x8000_0008, 0, 0, 0),
        e(0x8000_0001, 0, 0, 0, 0, 0x121, 0x2C100800),
        e(0x8000_0008, 0, 0, 0x3030, 0x200, 0x7, 0),
    ]


def amd_supported() -> list[CpuidEntry]:
    b, c, d = _vendor_regs(b"AuthenticAMD")
    e = CpuidEntry
    return [
        e(0, 0, 0, 0x10, b, c, d),
        e(1, 0, 0, 0x00A00F11, 0x00100800, 1 << 0, 1 << 28),
        e(0x8000_0000, 0, 0, 0x8000_0021, 0, 0, 0),
        # SVM(2), PerfCtrExtCore(23), MONITORX(29)
        e(0x8000_0001, 0, 0, 0, 0, (1 << 2) | (1 << 23) | (1 << 29) | 1, 0),
        e(0x8000_0008, 0, 0, 0x3030, 0x1234, 0x3F, 0),
        e(0x8000_000A, 0, 0, 1, 0x8000, 0, 0x1FFF),
        e(0x8000_001D, 0, SIG, 0x4121, 0x1C0003F, 0x3F, 0),  # L1d shared by 2 threads
        e(0x8000_001D, 1, SIG, 0x4163, 0x3C0003F, 0x7FFF, 1),  # L3 shared by 2 threads
        e(0x8000_001D, 2, SIG, 0, 0, 0, 0),
        e(0x8000_001E, 0, 0, 0x22, 0x101, 0, 0),
    ]


def find(entries: list[CpuidEntry], function: int, index: int = 0) -> CpuidEntry:
    matches = [x for x in entries if x.function == function and x.index == index]
    assert len(matches) == 1, (hex(function), index)
    return matches[0]


def has(entries: list[CpuidEntry], function: int) -> bool:
    return any(x.function == function for x in entries)


def test_pure() -> None:
    supported = intel_supported()
    before = copy.deepcopy(supported)
    out = shape_cpuid(supported, vcpu_index=1, num_cpus=4)
    assert supported == before
    assert not any(o is s for o in out for s in supported)


@pytest.mark.parametrize(("vcpu", "ncpu"), [(0, 1), (1, 2), (5, 6), (63, 64), (254, 255)])
def test_leaf1_topology(vcpu: int, ncpu: int) -> None:
    out = shape_cpuid(intel_supported(), vcpu_index=vcpu, num_cpus=ncpu)
    l1 = find(out, 1)
    assert l1.ebx >> 24 == vcpu
    logical = (l1.ebx >> 16) & 0xFF
    assert logical >= min(ncpu, 255) and (logical & (logical - 1) == 0 or logical == 255)
    assert l1.ebx & 0xFFFF == 0x0800  # CLFLUSH size / brand kept
    assert bool(l1.edx & (1 << 28)) == (ncpu > 1)  # HTT
    assert l1.ecx & (1 << 31)  # hypervisor


def test_leaf1_dropped_features() -> None:
    l1 = find(shape_cpuid(intel_supported(), vcpu_index=0, num_cpus=2), 1)
    for bit in (3, 5, 6, 7, 15):  # MONITOR, VMX, SMX, EST, PDCM
        assert not l1.ecx & (1 << bit), bit
    for bit in (0, 21, 28):  # SSE3, x2APIC, AVX kept
        assert l1.ecx & (1 << bit), bit
    assert not l1.edx & ((1 << 22) | (1 << 29))  # ACPI thermal, TM
    assert l1.edx & (1 << 26)  # SSE2 kept


@pytest.mark.parametrize("function", [0xB, 0x1F])
@pytest.mark.parametrize(("vcpu", "ncpu", "shift"), [(0, 1, 0), (2, 3, 2), (7, 8, 3), (8, 9, 4)])
def test_x2apic_topology(function: int, vcpu: int, ncpu: int, shift: int) -> None:
    out = shape_cpuid(intel_supported(), vcpu_index=vcpu, num_cpus=ncpu)
    levels = sorted((x for x in out if x.function == function), key=lambda x: x.index)
    assert [x.index for x in levels] == [0, 1, 2]
    smt, core, end = levels
    assert (smt.eax & 0x1F, smt.ebx & 0xFFFF, smt.ecx) == (0, 1, 0x100)
    assert (core.eax & 0x1F, core.ebx & 0xFFFF, core.ecx) == (shift, ncpu, 0x201)
    assert (end.eax, end.ebx, end.ecx & 0xFF00, end.ecx & 0xFF) == (0, 0, 0, 2)
    assert all(x.edx == vcpu for x in levels)
    assert all(x.flags & SIG for x in levels)


def test_no_leaf_1f_when_unsupported() -> None:
    supported = [x for x in intel_supported() if x.function != 0x1F]
    out = shape_cpuid(supported, vcpu_index=0, num_cpus=2)
    assert not has(out, 0x1F)
    assert has(out, 0xB)


def test_leaf4_cores_and_sharing() -> None:
    out = shape_cpuid(intel_supported(), vcpu_index=0, num_cpus=6)
    for idx, sharing in ((0, 0), (1, 0), (2, 0), (3, 7)):
        eax = find(out, 4, idx).eax
        assert eax >> 26 == 7, idx  # 8 addressable core IDs - 1
        assert (eax >> 14) & 0xFFF == sharing, idx
        assert eax & 0x3FFF == intel_supported()[2 + idx].eax & 0x3FFF  # type/level kept
    assert find(out, 4, 4).eax == 0


def test_pmu_monitor_pt_sgx() -> None:
    out = shape_cpuid(intel_supported(), vcpu_index=0, num_cpus=2)
    for fn in (0x5, 0xA):
        x = find(out, fn)
        assert (x.eax, x.ebx, x.ecx, x.edx) == (0, 0, 0, 0)
    assert not has(out, 0x12) and not has(out, 0x14)
    l7 = find(out, 7, 0)
    assert l7.ebx == 1 << 5 and l7.ecx == 0 and l7.edx == 0


def test_index_flags() -> None:
    out = shape_cpuid(intel_supported(), vcpu_index=0, num_cpus=2)
    for x in out:
        assert bool(x.flags & SIG) == (x.function in (4, 7, 0xB, 0xD, 0x1F)), hex(x.function)
    assert cpuid_entry_flags(0x8000_001D) == SIG
    assert cpuid_entry_flags(1) == 0
    keys = [(x.function, x.index) for x in out]
    assert len(keys) == len(set(keys))


def test_kvm_paravirt_leaves() -> None:
    out = shape_cpuid(intel_supported(), vcpu_index=0, num_cpus=2)
    sig = find(out, 0x4000_0000)
    raw = b"".join(r.to_bytes(4, "little") for r in (sig.ebx, sig.ecx, sig.edx))
    assert raw == b"KVMKVMKVM\0\0\0"
    assert sig.eax == 0x4000_0001
    feat = find(out, 0x4000_0001)
    assert feat.eax & KVM_FEATURE_CLOCKSOURCE2 and feat.eax & KVM_FEATURE_NOP_IO_DELAY
    assert not feat.eax & (KVM_FEATURE_MSI_EXT_DEST_ID | KVM_FEATURE_HC_MAP_GPA_RANGE)
    assert feat.edx == 0  # no realtime hint

    off = shape_cpuid(intel_supported(), vcpu_index=0, num_cpus=2, kvm_paravirt=False)
    assert not has(off, 0x4000_0000) and not has(off, 0x4000_0001)
    assert find(off, 1).ecx & (1 << 31)


def test_paravirt_leaves_added_when_missing() -> None:
    supported = [x for x in intel_supported() if x.function < 0x4000_0000 or
                 x.function >= 0x8000_0000]
    out = shape_cpuid(supported, vcpu_index=0, num_cpus=1)
    assert find(out, 0x4000_0000).eax == 0x4000_0001
    assert find(out, 0x4000_0001).eax == 0


def test_intel_extended() -> None:
    out = shape_cpuid(intel_supported(), vcpu_index=0, num_cpus=4)
    x8 = find(out, 0x8000_0008)
    assert x8.eax == 0x3030 and x8.ecx == 0


def test_amd() -> None:
    out = shape_cpuid(amd_supported(), vcpu_index=3, num_cpus=5)
    x1 = find(out, 0x8000_0001)
    assert x1.ecx == 1  # SVM, PerfCtrExtCore, MONITORX dropped
    x8 = find(out, 0x8000_0008)
    assert x8.ecx & 0xFF == 4 and (x8.ecx >> 12) & 0xF == 3
    assert x8.ebx == 0x1234
    svm = find(out, 0x8000_000A)
    assert (svm.eax, svm.ebx, svm.ecx, svm.edx) == (0, 0, 0, 0)
    assert find(out, 0x8000_001D, 0).eax == 0x0121  # private L1
    assert find(out, 0x8000_001D, 1).eax == (7 << 14) | 0x163  # L3: 8 IDs in the package
    assert find(out, 0x8000_001D, 2).eax == 0
    assert all(find(out, 0x8000_001D, i).flags & SIG for i in range(3))
    ext = find(out, 0x8000_001E)
    assert ext.eax == 3 and ext.ebx & 0xFF == 3 and (ext.ebx >> 8) & 0xFF == 0
    assert find(out, 0xB, 1).edx == 3  # max basic leaf 0x10 >= 0xB: topology leaf built
