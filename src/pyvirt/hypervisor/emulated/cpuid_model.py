"""What CPUID tells a guest of the software CPU.

The engine's own answers (unicorn's default x86-64 model: GenuineIntel,
family 6 model 0x3c, "Intel Core Processor (Haswell)") are the base; this
model edits them into something coherent with what the engine can execute and
what the VMM emulates:

* leaf 1: APIC ID = vCPU index; hypervisor bit set; TSC-deadline timer set
  (``lapic.LocalApic`` implements it); cleared: XSAVE/OSXSAVE (leaf 0xD
  advertises an AVX state component that the engine's XSETBV rejects without
  AVX, so Linux would fault enabling it: FXSAVE is used instead), x2APIC
  (Linux 6.1 turns it off again without interrupt remapping or a hypervisor
  that vouches for it), MONITOR/MWAIT, VMX/SMX, PCID, AVX/F16C/FMA (TCG in this
  QEMU has none of them), MCE/MCA (no machine-check banks to report), PDCM.
* leaves 5 (MONITOR), 0xA (PMU), 0xB (topology), 0xD (XSAVE) and 0xE-0x14:
  zero. Leaf 6 keeps only ARAT (the LAPIC timer runs in every C-state).
* leaf 0x15: the TSC as (numerator / denominator) x crystal clock, the crystal
  being the LAPIC timer's 1 GHz input. Linux then knows both the TSC and the
  APIC timer frequency (``X86_FEATURE_TSC_KNOWN_FREQ``, ``lapic_timer_period``)
  and skips PIT calibration, which is slow and noisy on an emulated CPU.
  Linux multiplies crystal_khz x numerator in 32 bits, so the ratio is chosen
  with numerator <= 2**32 / crystal_khz.
* leaf 0x16: base/max MHz and bus MHz, for tools that read them.
* leaf 7 EDX[29]: IA32_ARCH_CAPABILITIES (``ARCH_CAPABILITIES``, served by the
  backend's MSR router). An emulator does not speculate, so it reports the
  "not affected" bits: without RDCL_NO Linux assumes Meltdown and turns on
  page-table isolation, whose CR3 switch on every kernel entry flushes the
  engine's TLB (the guest ran measurably slower); likewise MDS/TAA/ITS/BHI.
* 0x8000_0007 EDX[8]: invariant TSC (the host's RDTSC, which is constant here).
* 0x4000_0000: zero, no paravirt interface (there is no kvmclock here).
"""

from __future__ import annotations

from fractions import Fraction

__all__ = ["ARCH_CAPABILITIES", "MSR_IA32_ARCH_CAPABILITIES", "CpuidModel", "tsc_ratio"]

Regs = tuple[int, int, int, int]

MAX_BASIC_LEAF = 0x16
MAX_EXT_LEAF = 0x8000_0008

# leaf 1 ECX
ECX_MONITOR = 1 << 3
ECX_DTES64 = 1 << 2
ECX_DSCPL = 1 << 4
ECX_VMX = 1 << 5
ECX_SMX = 1 << 6
ECX_EST = 1 << 7
ECX_TM2 = 1 << 8
ECX_FMA = 1 << 12
ECX_PDCM = 1 << 15
ECX_PCID = 1 << 17
ECX_X2APIC = 1 << 21
ECX_TSC_DEADLINE = 1 << 24
ECX_XSAVE = 1 << 26
ECX_OSXSAVE = 1 << 27
ECX_AVX = 1 << 28
ECX_F16C = 1 << 29
ECX_HYPERVISOR = 1 << 31
# leaf 1 EDX
EDX_MCE = 1 << 7
EDX_MCA = 1 << 14
EDX_ACPI = 1 << 22
EDX_TM = 1 << 29
EDX_PBE = 1 << 31

ECX_CLEAR = (ECX_MONITOR | ECX_DTES64 | ECX_DSCPL | ECX_VMX | ECX_SMX | ECX_EST | ECX_TM2
             | ECX_FMA | ECX_PDCM | ECX_PCID | ECX_X2APIC | ECX_XSAVE | ECX_OSXSAVE | ECX_AVX
             | ECX_F16C)
EDX_CLEAR = EDX_MCE | EDX_MCA | EDX_ACPI | EDX_TM | EDX_PBE

# leaf 7 EBX: only what this TCG executes (FSGSBASE, BMI1, SMEP, BMI2, ADX, SMAP);
# never HLE/RTM/AVX2/INVPCID/MPX/AVX-512. Not ERMS either: with it Linux clears
# and copies with byte-wise "rep stosb/movsb" (clear_page_erms, clear_user,
# copy_user_enhanced_fast_string), which TCG runs one byte per loop iteration;
# without it Linux uses 8-byte "rep stosq/movsq": a guest dd from /dev/zero ran
# 8x faster (384 -> 3000+ MiB/s).
L7_EBX_KEEP = (1 << 0) | (1 << 3) | (1 << 7) | (1 << 8) | (1 << 19) | (1 << 20)
L7_EDX_ARCH_CAPABILITIES = 1 << 29
LEAF6_ARAT = 1 << 2

MSR_IA32_ARCH_CAPABILITIES = 0x10A
#: RDCL_NO, SKIP_L1DFL_VMENTRY, SSB_NO, MDS_NO, PSCHANGE_MC_NO, TAA_NO,
#: SBDR_SSDP_NO, FBSDP_NO, PSDP_NO, BHI_NO, PBRSB_NO, GDS_NO, RFDS_NO, ITS_NO
ARCH_CAPABILITIES = ((1 << 0) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 8)
                     | (1 << 13) | (1 << 14) | (1 << 15) | (1 << 20) | (1 << 24) | (1 << 26)
                     | (1 << 27) | (1 << 62))
INVARIANT_TSC = 1 << 8

#: Linux computes ``crystal_khz * numerator`` in an unsigned int.
_U32 = 1 << 32


def tsc_ratio(tsc_hz: int, crystal_hz: int) -> tuple[int, int]:
    """(denominator, numerator) with numerator/denominator ~ tsc_hz/crystal_hz and
    (crystal_hz // 1000) * numerator < 2**32."""
    crystal_khz = crystal_hz // 1000
    if crystal_khz <= 0 or tsc_hz <= 0:
        raise ValueError("TSC and crystal frequencies must be positive")
    max_num = (_U32 - 1) // crystal_khz
    target = Fraction(tsc_hz // 1000, crystal_khz)
    if target > max_num:
        raise ValueError(f"TSC {tsc_hz} Hz is too fast for a {crystal_hz} Hz crystal")
    # best rational approximation with a bounded numerator: bound the denominator
    # so that numerator = denominator * target stays within max_num
    best = target.limit_denominator(max(1, int(max_num / target)))
    while best.numerator > max_num:
        best = target.limit_denominator(max(1, best.denominator - 1))
    return best.denominator, best.numerator


class CpuidModel:
    """``model(leaf, subleaf, native_regs) -> regs``, the engine's CPUID callback.

    ``crystal_hz`` is the LAPIC timer's input clock; ``apic_id`` the vCPU's.
    """

    __slots__ = ("_leaf15", "apic_id", "crystal_hz", "tsc_hz")

    def __init__(self, tsc_hz: int, crystal_hz: int, apic_id: int = 0) -> None:
        self.tsc_hz = tsc_hz
        self.crystal_hz = crystal_hz
        self.apic_id = apic_id
        den, num = tsc_ratio(tsc_hz, crystal_hz)
        self._leaf15: Regs = (den, num, crystal_hz, 0)

    @property
    def reported_tsc_khz(self) -> int:
        """What Linux 6.1 ``native_calibrate_tsc`` computes from leaf 0x15."""
        den, num, ecx, _ = self._leaf15
        return (ecx // 1000) * num // den

    def __call__(self, leaf: int, sub: int, native: Regs) -> Regs:
        eax, ebx, ecx, edx = native
        if leaf == 0:
            return (MAX_BASIC_LEAF, ebx, ecx, edx)
        if leaf == 1:
            ebx = (ebx & 0x00FF_FFFF) | ((self.apic_id & 0xFF) << 24)
            ecx = (ecx & ~ECX_CLEAR) | ECX_HYPERVISOR | ECX_TSC_DEADLINE
            return (eax, ebx, ecx, edx & ~EDX_CLEAR)
        if leaf == 4:
            # one core per package, one thread per cache: EAX[31:26] = EAX[25:14] = 0
            return (eax & 0x3FFF, ebx, ecx, edx) if eax & 0x1F else (0, 0, 0, 0)
        if leaf == 6:
            return (eax & LEAF6_ARAT, 0, 0, 0)
        if leaf == 7:
            if sub != 0:
                return (0, 0, 0, 0)
            return (0, ebx & L7_EBX_KEEP, 0, L7_EDX_ARCH_CAPABILITIES)
        if leaf == 0x15:
            return self._leaf15
        if leaf == 0x16:
            mhz = self.tsc_hz // 1_000_000
            return (mhz, mhz, self.crystal_hz // 1_000_000, 0)
        if leaf in (2, 3):
            return native
        if leaf <= MAX_BASIC_LEAF:
            return (0, 0, 0, 0)  # 5, 8-0x14: MONITOR, PMU, topology, XSAVE, ...: none
        if 0x4000_0000 <= leaf <= 0x4FFF_FFFF:
            return (0, 0, 0, 0)
        if leaf == 0x8000_0000:
            return (MAX_EXT_LEAF, ebx, ecx, edx)
        if leaf == 0x8000_0007:
            return (0, 0, 0, INVARIANT_TSC)
        if 0x8000_0001 <= leaf <= MAX_EXT_LEAF:
            return native
        return (0, 0, 0, 0)
