"""Model-specific register numbers and the MSR values every vCPU boots with.

Numbers from the Intel SDM Vol. 4 ("Model-Specific Registers"), chapter 2.1
(architectural MSRs).
"""

from __future__ import annotations

__all__ = [
    "BOOT_MSRS",
    "boot_msrs",
]

IA32_TSC = 0x10
IA32_APIC_BASE = 0x1B
IA32_SYSENTER_CS = 0x174
IA32_SYSENTER_ESP = 0x175
IA32_SYSENTER_EIP = 0x176
IA32_MISC_ENABLE = 0x1A0
IA32_MTRRCAP = 0xFE
IA32_MTRR_FIX64K_00000 = 0x250
IA32_MTRR_FIX16K_80000 = 0x258
IA32_MTRR_FIX16K_A0000 = 0x259
IA32_MTRR_FIX4K_C0000 = 0x268  # ... through 0x26F (IA32_MTRR_FIX4K_F8000)
IA32_MTRR_FIX4K_F8000 = 0x26F
IA32_PAT = 0x277
IA32_MTRR_DEF_TYPE = 0x2FF
IA32_EFER = 0xC000_0080
IA32_STAR = 0xC000_0081
IA32_LSTAR = 0xC000_0082
IA32_CSTAR = 0xC000_0083
IA32_FMASK = 0xC000_0084  # a.k.a. SFMASK
IA32_FS_BASE = 0xC000_0100
IA32_GS_BASE = 0xC000_0101
IA32_KERNEL_GS_BASE = 0xC000_0102

# IA32_EFER bits (SDM Vol. 3A, 2.2.1).
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11

# IA32_MISC_ENABLE bit 0: fast-string REP MOVS/STOS enabled (SDM Vol. 4, Table 2-2).
MISC_ENABLE_FAST_STRING = 1 << 0

# IA32_MTRR_DEF_TYPE (SDM Vol. 3A, 12.11.2.1): bits 7:0 default type, bit 10
# FE (fixed ranges enabled), bit 11 E (MTRRs enabled).
MTRR_TYPE_UC = 0
MTRR_TYPE_WB = 6
MTRR_DEF_TYPE_FE = 1 << 10
MTRR_DEF_TYPE_E = 1 << 11
MTRR_DEF_TYPE_BOOT = MTRR_DEF_TYPE_E | MTRR_DEF_TYPE_FE | MTRR_TYPE_WB  # 0xC06

#: All eight 1-byte fields of a fixed-range MTRR set to write-back.
MTRR_FIXED_ALL_WB = int.from_bytes(bytes([MTRR_TYPE_WB]) * 8, "little")

_FIXED_MTRRS = (IA32_MTRR_FIX64K_00000, IA32_MTRR_FIX16K_80000, IA32_MTRR_FIX16K_A0000,
                *range(IA32_MTRR_FIX4K_C0000, IA32_MTRR_FIX4K_F8000 + 1))

#: MSR index -> value programmed on every vCPU before it first runs.
#: The syscall/sysenter MSRs and KERNEL_GS_BASE start at 0 (the kernel sets
#: them). MTRRs are enabled with write-back as the default type; because FE is
#: set, the 11 fixed-range MTRRs (covering 0-1 MiB) are set to write-back too,
#: otherwise their reset value (0 = UC) would make the low 1 MiB - boot page
#: tables, zero page, ACPI tables - uncacheable. IA32_TSC is deliberately not
#: included: writing 0 on each vCPU at slightly different times is what KVM's
#: TSC synchronisation has to paper over; KVM starts every vCPU's TSC sensibly.
BOOT_MSRS: dict[int, int] = {
    IA32_SYSENTER_CS: 0,
    IA32_SYSENTER_ESP: 0,
    IA32_SYSENTER_EIP: 0,
    IA32_STAR: 0,
    IA32_LSTAR: 0,
    IA32_CSTAR: 0,
    IA32_FMASK: 0,
    IA32_KERNEL_GS_BASE: 0,
    IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
    **{index: MTRR_FIXED_ALL_WB for index in _FIXED_MTRRS},
    IA32_MTRR_DEF_TYPE: MTRR_DEF_TYPE_BOOT,
}


def boot_msrs() -> dict[int, int]:
    """A fresh copy of ``BOOT_MSRS`` (callers may add to it)."""
    return dict(BOOT_MSRS)
