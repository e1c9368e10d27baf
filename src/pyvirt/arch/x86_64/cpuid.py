"""Shape the CPUID table a vCPU sees from what the hypervisor supports.

``shape_cpuid`` is pure: it takes the backend's supported entries (for KVM,
``KVM_GET_SUPPORTED_CPUID``) and returns the entries for one vCPU
(``KVM_SET_CPUID2``). What it changes, and why:

* Topology: one socket, ``num_cpus`` cores, one thread per core; the vCPU's
  (x2)APIC ID is its index. Leaf 1 EBX, leaf 4 EAX[31:26]/[25:14], leaves 0xB
  and 0x1F (rebuilt), and on AMD leaf 0x8000_0008 ECX and 0x8000_001E.
* Leaf 1 ECX[31] (hypervisor present) is set.
* Dropped features (the VMM does not emulate them or we do not want the guest
  to use them): VMX/SVM (no nested virtualisation), SMX, MONITOR/MWAIT and
  AMD MONITORX (the guest should idle with HLT, which exits to the VMM/KVM),
  EST/TM/TM2/ACPI-thermal/PBE/DS/DTES64/DS-CPL (power/thermal/debug-store MSRs
  we do not emulate), PDCM and every PMU leaf (we expose no PMU: leaf 0xA,
  0x1C arch LBR, 0x23 and AMD 0x8000_0022 are zeroed), Intel PT (leaf 0x14)
  and SGX (leaf 0x12).
* KVM paravirt leaves 0x4000_0000/0x4000_0001, filtered to ``KVM_FEATURES_KEPT``
  (see there), or removed when ``kvm_paravirt`` is False.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

__all__ = [
    "INDEX_SIGNIFICANT_LEAVES",
    "KVM_CPUID_FLAG_SIGNIFCANT_INDEX",
    "KVM_FEATURES_KEPT",
    "MAX_CPUS",
    "CpuidEntry",
    "cpuid_entry_flags",
    "shape_cpuid",
]

#: ``struct kvm_cpuid_entry2.flags`` bit: the leaf's output depends on ECX
#: (the name is spelled this way in the KVM API headers).
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1

#: Leaves whose output depends on the sub-leaf index in ECX (Intel SDM Vol. 2A,
#: CPUID; AMD APM Vol. 3, E.4.15 for 0x8000_001D).
INDEX_SIGNIFICANT_LEAVES = frozenset({0x4, 0x7, 0xB, 0xD, 0x1F, 0x8000_001D})

#: xAPIC IDs are 8 bits (leaf 1 EBX[31:24]) and 0xFF is the broadcast ID.
MAX_CPUS = 255

KVM_CPUID_SIGNATURE = 0x4000_0000
KVM_CPUID_FEATURES = 0x4000_0001
_KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"

# KVM paravirt feature bits, leaf 0x4000_0001 EAX (Linux Documentation/virt/kvm/x86/cpuid.rst).
KVM_FEATURE_CLOCKSOURCE = 1 << 0
KVM_FEATURE_NOP_IO_DELAY = 1 << 1
KVM_FEATURE_MMU_OP = 1 << 2
KVM_FEATURE_CLOCKSOURCE2 = 1 << 3
KVM_FEATURE_ASYNC_PF = 1 << 4
KVM_FEATURE_STEAL_TIME = 1 << 5
KVM_FEATURE_PV_EOI = 1 << 6
KVM_FEATURE_PV_UNHALT = 1 << 7
KVM_FEATURE_PV_TLB_FLUSH = 1 << 9
KVM_FEATURE_ASYNC_PF_VMEXIT = 1 << 10
KVM_FEATURE_PV_SEND_IPI = 1 << 11
KVM_FEATURE_POLL_CONTROL = 1 << 12
KVM_FEATURE_PV_SCHED_YIELD = 1 << 13
KVM_FEATURE_ASYNC_PF_INT = 1 << 14
KVM_FEATURE_MSI_EXT_DEST_ID = 1 << 15
KVM_FEATURE_HC_MAP_GPA_RANGE = 1 << 16
KVM_FEATURE_MIGRATION_CONTROL = 1 << 17
KVM_FEATURE_CLOCKSOURCE_STABLE_BIT = 1 << 24

#: Paravirt features offered when KVM supports them. All of these are handled
#: entirely inside KVM (MSRs/hypercalls it implements), so the VMM needs no
#: code for them; PV_EOI and PV_UNHALT need the in-kernel LAPIC, which pyvirt
#: uses. Not kept: MMU_OP (obsolete, never implemented), MSI_EXT_DEST_ID (the
#: VMM's IOAPIC/MSI routing would have to understand the extra destination
#: bits; with <= 255 vCPUs they are not needed), HC_MAP_GPA_RANGE (the
#: hypercall exits to the VMM, which does not handle it) and MIGRATION_CONTROL
#: (SEV live migration). The "realtime" hint (EDX) is cleared: we cannot
#: promise vCPUs are never preempted.
KVM_FEATURES_KEPT = (
    KVM_FEATURE_CLOCKSOURCE | KVM_FEATURE_NOP_IO_DELAY | KVM_FEATURE_CLOCKSOURCE2
    | KVM_FEATURE_ASYNC_PF | KVM_FEATURE_STEAL_TIME | KVM_FEATURE_PV_EOI
    | KVM_FEATURE_PV_UNHALT | KVM_FEATURE_PV_TLB_FLUSH | KVM_FEATURE_ASYNC_PF_VMEXIT
    | KVM_FEATURE_PV_SEND_IPI | KVM_FEATURE_POLL_CONTROL | KVM_FEATURE_PV_SCHED_YIELD
    | KVM_FEATURE_ASYNC_PF_INT | KVM_FEATURE_CLOCKSOURCE_STABLE_BIT
)

# Leaf 1 feature bits (Intel SDM Vol. 2A, CPUID, Tables 3-10/3-11).
_L1_ECX_DTES64 = 1 << 2
_L1_ECX_MONITOR = 1 << 3
_L1_ECX_DS_CPL = 1 << 4
_L1_ECX_VMX = 1 << 5
_L1_ECX_SMX = 1 << 6
_L1_ECX_EST = 1 << 7
_L1_ECX_TM2 = 1 << 8
_L1_ECX_PDCM = 1 << 15
_L1_ECX_HYPERVISOR = 1 << 31
_L1_ECX_DROP = (_L1_ECX_DTES64 | _L1_ECX_MONITOR | _L1_ECX_DS_CPL | _L1_ECX_VMX
                | _L1_ECX_SMX | _L1_ECX_EST | _L1_ECX_TM2 | _L1_ECX_PDCM)
_L1_EDX_DS = 1 << 21
_L1_EDX_ACPI = 1 << 22  # thermal monitor/clock control MSRs, not the ACPI tables
_L1_EDX_HTT = 1 << 28
_L1_EDX_TM = 1 << 29
_L1_EDX_PBE = 1 << 31
_L1_EDX_DROP = _L1_EDX_DS | _L1_EDX_ACPI | _L1_EDX_TM | _L1_EDX_PBE

# Leaf 7 sub-leaf 0.
_L7_EBX_SGX = 1 << 2
_L7_EBX_INTEL_PT = 1 << 25
_L7_ECX_SGX_LC = 1 << 30
_L7_EDX_ARCH_LBR = 1 << 19

# Leaf 0x8000_0001 ECX (AMD APM Vol. 3, E.4.2).
_X1_ECX_SVM = 1 << 2
_X1_ECX_PERFCTR_CORE = 1 << 23
_X1_ECX_PERFCTR_NB = 1 << 24
_X1_ECX_PERFCTR_LLC = 1 << 28
_X1_ECX_MONITORX = 1 << 29
_X1_ECX_DROP = (_X1_ECX_SVM | _X1_ECX_PERFCTR_CORE | _X1_ECX_PERFCTR_NB
                | _X1_ECX_PERFCTR_LLC | _X1_ECX_MONITORX)

#: Leaves returned as all-zero: MONITOR/MWAIT (5), PMU (0xA, 0x1C arch LBR,
#: 0x23 arch perfmon extensions, AMD 0x8000_0022), SVM (0x8000_000A).
_ZEROED_LEAVES = frozenset({0x5, 0xA, 0x1C, 0x23, 0x8000_000A, 0x8000_0022})
#: Leaves removed entirely with their features: SGX (0x12), Intel PT (0x14).
_REMOVED_LEAVES = frozenset({0x12, 0x14})

# Leaf 0xB/0x1F level types (SDM Vol. 2A, CPUID leaf 0BH).
_LEVEL_SMT = 1
_LEVEL_CORE = 2


@dataclass
class CpuidEntry:
    """One ``struct kvm_cpuid_entry2`` (less padding)."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


def cpuid_entry_flags(function: int) -> int:
    """The ``flags`` a leaf needs: SIGNIFCANT_INDEX for sub-leaf-indexed leaves."""
    return KVM_CPUID_FLAG_SIGNIFCANT_INDEX if function in INDEX_SIGNIFICANT_LEAVES else 0


def _regs_to_str(*regs: int) -> bytes:
    return b"".join(r.to_bytes(4, "little") for r in regs)


def _str_to_regs(text: bytes) -> tuple[int, int, int]:
    b, c, d = (int.from_bytes(text[i:i + 4], "little") for i in (0, 4, 8))
    return b, c, d


def _id_bits(count: int) -> int:
    """Bits needed to number ``count`` IDs: ceil(log2(count)), 0 for one."""
    return (count - 1).bit_length()


def _vendor(entries: Iterable[CpuidEntry]) -> bytes:
    for e in entries:
        if e.function == 0:
            return _regs_to_str(e.ebx, e.edx, e.ecx)
    return b""


def _cache_sharing(eax: int, shift: int) -> int:
    """Leaf 4 / 0x8000_001D EAX with bits 25:14 (logical processors sharing
    this cache - 1) matching our topology: L1/L2 are private to a core (one
    thread), L3 is shared by the whole package. A null cache type (EAX[4:0] =
    0) ends the list and is left alone."""
    if not eax & 0x1F:
        return eax
    level = (eax >> 5) & 0x7
    sharing = min((1 << shift) - 1, 0xFFF) if level >= 3 else 0
    return (eax & ~(0xFFF << 14)) | (sharing << 14)


def _topology_leaf(function: int, apic_id: int, num_cpus: int) -> list[CpuidEntry]:
    """Leaf 0xB / 0x1F: SMT level (1 thread), core level (num_cpus), then the
    terminating invalid level. EAX[4:0] is the shift of the x2APIC ID to the
    next level's ID; EBX[15:0] the logical processors at that level; ECX[15:8]
    the level type, ECX[7:0] the sub-leaf; EDX the x2APIC ID (SDM Vol. 2A)."""
    flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    return [
        CpuidEntry(function, 0, flags, 0, 1, (_LEVEL_SMT << 8) | 0, apic_id),
        CpuidEntry(function, 1, flags, _id_bits(num_cpus), num_cpus,
                   (_LEVEL_CORE << 8) | 1, apic_id),
        CpuidEntry(function, 2, flags, 0, 0, 2, apic_id),
    ]


def shape_cpuid(supported: list[CpuidEntry], *, vcpu_index: int, num_cpus: int,
                kvm_paravirt: bool = True) -> list[CpuidEntry]:
    """The CPUID entries for vCPU ``vcpu_index`` of ``num_cpus`` (new objects)."""
    if not 1 <= num_cpus <= MAX_CPUS:
        raise ValueError(f"num_cpus must be 1..{MAX_CPUS}, got {num_cpus}")
    if not 0 <= vcpu_index < num_cpus:
        raise ValueError(f"vcpu_index {vcpu_index} out of range for {num_cpus} vCPUs")
    apic_id = vcpu_index
    shift = _id_bits(num_cpus)  # APIC ID bits for the cores of the one package
    vendor = _vendor(supported)
    is_amd = vendor in (b"AuthenticAMD", b"HygonGenuine")
    max_basic = next((e.eax for e in supported if e.function == 0), 0)

    out: list[CpuidEntry] = []
    for src in supported:
        fn = src.function
        if fn in _REMOVED_LEAVES or fn in (0xB, 0x1F):
            continue  # 0xB / 0x1F are rebuilt below
        if fn in (KVM_CPUID_SIGNATURE, KVM_CPUID_FEATURES) and not kvm_paravirt:
            continue
        e = replace(src, flags=src.flags | cpuid_entry_flags(fn))
        if fn in _ZEROED_LEAVES:
            e.eax = e.ebx = e.ecx = e.edx = 0
        elif fn == 1:
            # EBX[31:24] initial APIC ID, EBX[23:16] addressable logical
            # processor IDs in the package (valid when HTT is set).
            logical = min(1 << shift, 0xFF)
            e.ebx = (e.ebx & 0x0000_FFFF) | (logical << 16) | (apic_id << 24)
            e.ecx = (e.ecx & ~_L1_ECX_DROP) | _L1_ECX_HYPERVISOR
            e.edx &= ~_L1_EDX_DROP
            if num_cpus > 1:
                e.edx |= _L1_EDX_HTT
            else:
                e.edx &= ~_L1_EDX_HTT
        elif fn == 4:
            # EAX[31:26]: addressable core IDs in the package - 1 (SDM Vol. 2A).
            if e.eax & 0x1F:
                cores = min((1 << shift) - 1, 0x3F)
                e.eax = (_cache_sharing(e.eax, shift) & 0x03FF_FFFF) | (cores << 26)
        elif fn == 0x8000_001D:
            # AMD cache topology: the same EAX[25:14] sharing field (APM Vol. 3, E.4.15).
            e.eax = _cache_sharing(e.eax, shift)
        elif fn == 7 and src.index == 0:
            e.ebx &= ~(_L7_EBX_SGX | _L7_EBX_INTEL_PT)
            e.ecx &= ~_L7_ECX_SGX_LC
            e.edx &= ~_L7_EDX_ARCH_LBR
        elif fn == 0x8000_0001:
            e.ecx &= ~_X1_ECX_DROP
        elif fn == 0x8000_0008:
            # AMD: ECX[7:0] NC = cores - 1, ECX[15:12] ApicIdCoreIdSize (APM
            # Vol. 3, E.4.7). Reserved (zero) on Intel.
            e.ecx = ((num_cpus - 1) | (shift << 12)) if is_amd else 0
        elif fn == 0x8000_001E and is_amd:
            # AMD extended APIC ID, core ID (one thread per core), node 0.
            e.eax = apic_id
            e.ebx = apic_id & 0xFF
            e.ecx = 0
        elif fn == KVM_CPUID_SIGNATURE:
            e.eax = KVM_CPUID_FEATURES
            e.ebx, e.ecx, e.edx = _str_to_regs(_KVM_SIGNATURE)
        elif fn == KVM_CPUID_FEATURES:
            e.eax &= KVM_FEATURES_KEPT
            e.ebx = e.ecx = e.edx = 0
        out.append(e)

    if max_basic >= 0xB:
        out.extend(_topology_leaf(0xB, apic_id, num_cpus))
    if max_basic >= 0x1F and any(e.function == 0x1F for e in supported):
        out.extend(_topology_leaf(0x1F, apic_id, num_cpus))
    if kvm_paravirt:
        present = {e.function for e in out}
        if KVM_CPUID_SIGNATURE not in present:
            sig = _str_to_regs(_KVM_SIGNATURE)
            out.append(CpuidEntry(KVM_CPUID_SIGNATURE, 0, 0, KVM_CPUID_FEATURES, *sig))
        if KVM_CPUID_FEATURES not in present:
            # Nothing known to be supported: advertise no paravirt features.
            out.append(CpuidEntry(KVM_CPUID_FEATURES, 0, 0, 0, 0, 0, 0))
    out.sort(key=lambda x: (x.function, x.index))
    return out
