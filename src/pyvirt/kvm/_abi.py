"""Raw ctypes mirror of the parts of ``<linux/kvm.h>`` (x86-64) that pyvirt uses.

Names follow the kernel header exactly so the ABI test can generate C from the
tables at the bottom (``STRUCTS``, ``IOCTLS``, ``EXIT_REASONS``, ``CAPS``,
``CONSTANTS``) and compare sizes, offsets and numbers with the host's header.
Nothing here does any I/O; the wrappers live in ``pyvirt.kvm.fd``.
"""

from __future__ import annotations

import ctypes
from ctypes import c_char, c_int32, c_uint8, c_uint16, c_uint32, c_uint64
from typing import Any

from pyvirt.kvm._ioctl import _IO, _IOR, _IOW, _IOWR

KVMIO = 0xAE
KVM_API_VERSION = 12

# --------------------------------------------------------------------------- structures


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    ]


class kvm_regs(ctypes.Structure):
    _fields_ = [
        (name, c_uint64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    ]  # fmt: skip


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        ("type", c_uint8),
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        *[(name, kvm_segment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")],
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        *[(name, c_uint64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")],
        ("interrupt_bitmap", c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (c_uint8 * 16) * 8),
        ("fcw", c_uint16),
        ("fsw", c_uint16),
        ("ftwx", c_uint8),
        ("pad1", c_uint8),
        ("last_opcode", c_uint16),
        ("last_ip", c_uint64),
        ("last_dp", c_uint64),
        ("xmm", (c_uint8 * 16) * 16),
        ("mxcsr", c_uint32),
        ("pad2", c_uint32),
    ]


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


# Variable-length structures: the header is mirrored with a zero-length array
# (same size and offsets as the C flexible array); ``flex()`` builds a type
# with room for n entries.


class kvm_msrs(ctypes.Structure):
    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32), ("entries", kvm_msr_entry * 0)]


class kvm_msr_list(ctypes.Structure):
    _fields_ = [("nmsrs", c_uint32), ("indices", c_uint32 * 0)]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", c_uint32),
        ("index", c_uint32),
        ("flags", c_uint32),
        ("eax", c_uint32),
        ("ebx", c_uint32),
        ("ecx", c_uint32),
        ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    ]


class kvm_cpuid2(ctypes.Structure):
    _fields_ = [("nent", c_uint32), ("padding", c_uint32), ("entries", kvm_cpuid_entry2 * 0)]


class kvm_irq_level(ctypes.Structure):
    class _u(ctypes.Union):
        _fields_ = [("irq", c_uint32), ("status", c_int32)]

    _anonymous_ = ("_u",)
    _fields_ = [("_u", _u), ("level", c_uint32)]


class kvm_pit_config(ctypes.Structure):
    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", c_uint32)]


class kvm_irqfd(ctypes.Structure):
    _fields_ = [
        ("fd", c_uint32),
        ("gsi", c_uint32),
        ("flags", c_uint32),
        ("resamplefd", c_uint32),
        ("pad", c_uint8 * 16),
    ]


class kvm_ioeventfd(ctypes.Structure):
    _fields_ = [
        ("datamatch", c_uint64),
        ("addr", c_uint64),
        ("len", c_uint32),
        ("fd", c_int32),
        ("flags", c_uint32),
        ("pad", c_uint8 * 36),
    ]


class kvm_irq_routing_irqchip(ctypes.Structure):
    _fields_ = [("irqchip", c_uint32), ("pin", c_uint32)]


class kvm_irq_routing_msi(ctypes.Structure):
    class _u(ctypes.Union):
        _fields_ = [("pad", c_uint32), ("devid", c_uint32)]

    _anonymous_ = ("_u",)
    _fields_ = [("address_lo", c_uint32), ("address_hi", c_uint32), ("data", c_uint32), ("_u", _u)]


class kvm_irq_routing_s390_adapter(ctypes.Structure):
    # mirrored only because its u64 members set the union's (and entry's) alignment
    _fields_ = [
        ("ind_addr", c_uint64),
        ("summary_addr", c_uint64),
        ("ind_offset", c_uint64),
        ("summary_offset", c_uint32),
        ("adapter_id", c_uint32),
    ]


class kvm_irq_routing_entry(ctypes.Structure):
    class _u(ctypes.Union):
        _fields_ = [
            ("irqchip", kvm_irq_routing_irqchip),
            ("msi", kvm_irq_routing_msi),
            ("adapter", kvm_irq_routing_s390_adapter),
            ("pad", c_uint32 * 8),
        ]

    _fields_ = [
        ("gsi", c_uint32),
        ("type", c_uint32),
        ("flags", c_uint32),
        ("pad", c_uint32),
        ("u", _u),
    ]


class kvm_irq_routing(ctypes.Structure):
    _fields_ = [("nr", c_uint32), ("flags", c_uint32), ("entries", kvm_irq_routing_entry * 0)]


class kvm_msi(ctypes.Structure):
    _fields_ = [
        ("address_lo", c_uint32),
        ("address_hi", c_uint32),
        ("data", c_uint32),
        ("flags", c_uint32),
        ("devid", c_uint32),
        ("pad", c_uint8 * 12),
    ]


KVM_APIC_REG_SIZE = 0x400


class kvm_lapic_state(ctypes.Structure):
    _fields_ = [("regs", c_uint8 * KVM_APIC_REG_SIZE)]


class kvm_clock_data(ctypes.Structure):
    _fields_ = [
        ("clock", c_uint64),
        ("flags", c_uint32),
        ("pad0", c_uint32),
        ("realtime", c_uint64),
        ("host_tsc", c_uint64),
        ("pad", c_uint32 * 4),
    ]


class kvm_vcpu_events(ctypes.Structure):
    class _exception(ctypes.Structure):
        _fields_ = [
            ("injected", c_uint8),
            ("nr", c_uint8),
            ("has_error_code", c_uint8),
            ("pending", c_uint8),
            ("error_code", c_uint32),
        ]

    class _interrupt(ctypes.Structure):
        _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("soft", c_uint8), ("shadow", c_uint8)]

    class _nmi(ctypes.Structure):
        _fields_ = [
            ("injected", c_uint8),
            ("pending", c_uint8),
            ("masked", c_uint8),
            ("pad", c_uint8),
        ]

    class _smi(ctypes.Structure):
        _fields_ = [
            ("smm", c_uint8),
            ("pending", c_uint8),
            ("smm_inside_nmi", c_uint8),
            ("latched_init", c_uint8),
        ]

    class _triple_fault(ctypes.Structure):
        _fields_ = [("pending", c_uint8)]

    _fields_ = [
        ("exception", _exception),
        ("interrupt", _interrupt),
        ("nmi", _nmi),
        ("sipi_vector", c_uint32),
        ("flags", c_uint32),
        ("smi", _smi),
        ("triple_fault", _triple_fault),
        ("reserved", c_uint8 * 26),
        ("exception_has_payload", c_uint8),
        ("exception_payload", c_uint64),
    ]


KVM_MAX_XCRS = 16


class kvm_xcr(ctypes.Structure):
    _fields_ = [("xcr", c_uint32), ("reserved", c_uint32), ("value", c_uint64)]


class kvm_xcrs(ctypes.Structure):
    _fields_ = [
        ("nr_xcrs", c_uint32),
        ("flags", c_uint32),
        ("xcrs", kvm_xcr * KVM_MAX_XCRS),
        ("padding", c_uint64 * 16),
    ]


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [
        ("cap", c_uint32),
        ("flags", c_uint32),
        ("args", c_uint64 * 4),
        ("pad", c_uint8 * 64),
    ]


class kvm_debugregs(ctypes.Structure):
    _fields_ = [
        ("db", c_uint64 * 4),
        ("dr6", c_uint64),
        ("dr7", c_uint64),
        ("flags", c_uint64),
        ("reserved", c_uint64 * 9),
    ]


KVM_XSAVE_REGION_WORDS = 1024  # the fixed 4 KiB; KVM_CAP_XSAVE2 may report more


class kvm_xsave(ctypes.Structure):
    # ``extra`` is the flexible tail KVM_GET_XSAVE2 fills when the size
    # KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) reports is over 4096 (``flex()``).
    _fields_ = [("region", c_uint32 * KVM_XSAVE_REGION_WORDS), ("extra", c_uint32 * 0)]


class kvm_pic_state(ctypes.Structure):
    _fields_ = [
        (name, c_uint8)
        for name in (
            "last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select",
            "poll", "special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi",
            "special_fully_nested_mode", "init4", "elcr", "elcr_mask",
        )
    ]  # fmt: skip


KVM_IOAPIC_NUM_PINS = 24


class kvm_ioapic_state(ctypes.Structure):
    # each redirection entry as its raw 64 bits (the C union's ``bits``): the
    # bitfield view cannot be checked with offsetof, and raw bits are what we save
    _fields_ = [
        ("base_address", c_uint64),
        ("ioregsel", c_uint32),
        ("id", c_uint32),
        ("irr", c_uint32),
        ("pad", c_uint32),
        ("redirtbl", c_uint64 * KVM_IOAPIC_NUM_PINS),
    ]


class kvm_irqchip(ctypes.Structure):
    class _chip(ctypes.Union):
        _fields_ = [
            ("dummy", c_char * 512),
            ("pic", kvm_pic_state),
            ("ioapic", kvm_ioapic_state),
        ]

    _fields_ = [("chip_id", c_uint32), ("pad", c_uint32), ("chip", _chip)]


class kvm_pit_channel_state(ctypes.Structure):
    _fields_ = [
        ("count", c_uint32),
        ("latched_count", c_uint16),
        ("count_latched", c_uint8),
        ("status_latched", c_uint8),
        ("status", c_uint8),
        ("read_state", c_uint8),
        ("write_state", c_uint8),
        ("write_latch", c_uint8),
        ("rw_mode", c_uint8),
        ("mode", c_uint8),
        ("bcd", c_uint8),
        ("gate", c_uint8),
        ("count_load_time", ctypes.c_int64),
    ]


class kvm_pit_state2(ctypes.Structure):
    _fields_ = [
        ("channels", kvm_pit_channel_state * 3),
        ("flags", c_uint32),
        ("reserved", c_uint32 * 9),
    ]


# ----- struct kvm_run (the page shared with the kernel, mmap'd from the vCPU fd)


class kvm_run_hw(ctypes.Structure):
    _fields_ = [("hardware_exit_reason", c_uint64)]


class kvm_run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class kvm_run_ex(ctypes.Structure):
    _fields_ = [("exception", c_uint32), ("error_code", c_uint32)]


class kvm_run_io(ctypes.Structure):
    _fields_ = [
        ("direction", c_uint8),
        ("size", c_uint8),
        ("port", c_uint16),
        ("count", c_uint32),
        ("data_offset", c_uint64),  # from the start of kvm_run
    ]


class kvm_debug_exit_arch(ctypes.Structure):
    _fields_ = [
        ("exception", c_uint32),
        ("pad", c_uint32),
        ("pc", c_uint64),
        ("dr6", c_uint64),
        ("dr7", c_uint64),
    ]


class kvm_run_debug(ctypes.Structure):
    _fields_ = [("arch", kvm_debug_exit_arch)]


class kvm_run_mmio(ctypes.Structure):
    _fields_ = [
        ("phys_addr", c_uint64),
        ("data", c_uint8 * 8),
        ("len", c_uint32),
        ("is_write", c_uint8),
    ]


class kvm_run_hypercall(ctypes.Structure):
    _fields_ = [
        ("nr", c_uint64),
        ("args", c_uint64 * 6),
        ("ret", c_uint64),
        ("longmode", c_uint32),
        ("pad", c_uint32),
    ]


class kvm_run_tpr_access(ctypes.Structure):
    _fields_ = [("rip", c_uint64), ("is_write", c_uint32), ("pad", c_uint32)]


class kvm_run_internal(ctypes.Structure):
    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class kvm_run_emulation_failure(ctypes.Structure):
    # the C anonymous union holds a single anonymous struct: flattened here
    _fields_ = [
        ("suberror", c_uint32),
        ("ndata", c_uint32),
        ("flags", c_uint64),
        ("insn_size", c_uint8),
        ("insn_bytes", c_uint8 * 15),
    ]


class kvm_run_system_event(ctypes.Structure):
    class _u(ctypes.Union):
        _fields_ = [("flags", c_uint64), ("data", c_uint64 * 16)]

    _anonymous_ = ("_u",)
    _fields_ = [("type", c_uint32), ("ndata", c_uint32), ("_u", _u)]


class kvm_run_eoi(ctypes.Structure):
    _fields_ = [("vector", c_uint8)]


class kvm_run_msr(ctypes.Structure):
    _fields_ = [
        ("error", c_uint8),
        ("pad", c_uint8 * 7),
        ("reason", c_uint32),
        ("index", c_uint32),
        ("data", c_uint64),
    ]


class kvm_run_notify(ctypes.Structure):
    _fields_ = [("flags", c_uint32)]


class kvm_run_exit_union(ctypes.Union):
    _fields_ = [
        ("hw", kvm_run_hw),
        ("fail_entry", kvm_run_fail_entry),
        ("ex", kvm_run_ex),
        ("io", kvm_run_io),
        ("debug", kvm_run_debug),
        ("mmio", kvm_run_mmio),
        ("hypercall", kvm_run_hypercall),
        ("tpr_access", kvm_run_tpr_access),
        ("internal", kvm_run_internal),
        ("emulation_failure", kvm_run_emulation_failure),
        ("system_event", kvm_run_system_event),
        ("eoi", kvm_run_eoi),
        ("msr", kvm_run_msr),
        ("notify", kvm_run_notify),
        ("padding", c_char * 256),  # fixes the union's size
    ]


SYNC_REGS_SIZE_BYTES = 2048


class kvm_run(ctypes.Structure):
    _anonymous_ = ("_u",)
    _fields_ = [
        # in
        ("request_interrupt_window", c_uint8),
        ("immediate_exit", c_uint8),
        ("padding1", c_uint8 * 6),
        # out
        ("exit_reason", c_uint32),
        ("ready_for_interrupt_injection", c_uint8),
        ("if_flag", c_uint8),
        ("flags", c_uint16),
        # in (before KVM_RUN), out (after)
        ("cr8", c_uint64),
        ("apic_base", c_uint64),
        ("_u", kvm_run_exit_union),
        ("kvm_valid_regs", c_uint64),
        ("kvm_dirty_regs", c_uint64),
        ("s", c_uint8 * SYNC_REGS_SIZE_BYTES),  # sync regs: unused by pyvirt
    ]


_flex_cache: dict[tuple[type[ctypes.Structure], int], type[ctypes.Structure]] = {}


def flex(base: type[ctypes.Structure], n: int) -> type[ctypes.Structure]:
    """A copy of variable-length ``base`` whose last (flexible array) field holds ``n`` items."""
    key = (base, n)
    cached = _flex_cache.get(key)
    if cached is not None:
        return cached
    *head, last = base._fields_
    array: Any = last[1]  # the zero-length array standing for the flexible member
    sized = type(base.__name__ + f"_{n}", (ctypes.Structure,), {
        "_fields_": [*head, (last[0], array._type_ * n)],
    })  # fmt: skip
    _flex_cache[key] = sized
    return sized


# --------------------------------------------------------------------------- constants

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IOAPIC_EOI = 26
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_NOTIFY = 37

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3
KVM_SYSTEM_EVENT_WAKEUP = 4
KVM_SYSTEM_EVENT_SUSPEND = 5

KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_PIT = 11
KVM_CAP_NOP_IO_DELAY = 12
KVM_CAP_MP_STATE = 14
KVM_CAP_COALESCED_MMIO = 15
KVM_CAP_SYNC_MMU = 16
KVM_CAP_USER_NMI = 22
KVM_CAP_SET_GUEST_DEBUG = 23
KVM_CAP_REINJECT_CONTROL = 24
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQ_INJECT_STATUS = 26
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_SET_BOOT_CPU_ID = 34
KVM_CAP_PIT_STATE2 = 35
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_INTERNAL_ERROR_DATA = 40
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_INTR_SHADOW = 49
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_TSC_DEADLINE_TIMER = 72
KVM_CAP_KVMCLOCK_CTRL = 76
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_READONLY_MEM = 81
KVM_CAP_IOEVENTFD_NO_LENGTH = 100
KVM_CAP_DISABLE_QUIRKS = 116
KVM_CAP_SPLIT_IRQCHIP = 121
KVM_CAP_IOEVENTFD_ANY_LENGTH = 122
KVM_CAP_MAX_VCPU_ID = 128
KVM_CAP_X2APIC_API = 129
KVM_CAP_MSI_DEVID = 131
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_X86_DISABLE_EXITS = 143
KVM_CAP_EXIT_HYPERCALL = 201
KVM_CAP_XSAVE2 = 208
KVM_CAP_VM_TSC_CONTROL = 214
KVM_CAP_SYSTEM_EVENT_DATA = 215

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

KVM_PIT_SPEAKER_DUMMY = 1

KVM_PIT_FLAGS_HPET_LEGACY = 0x1
KVM_PIT_FLAGS_SPEAKER_DATA_ON = 0x2

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4

KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1

KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2

KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2

KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
KVM_NR_IRQCHIPS = 3

KVM_MSI_VALID_DEVID = 1 << 0

KVM_CLOCK_TSC_STABLE = 2
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3

KVM_VCPUEVENT_VALID_NMI_PENDING = 0x1
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x2
KVM_VCPUEVENT_VALID_SHADOW = 0x4
KVM_VCPUEVENT_VALID_SMM = 0x8
KVM_VCPUEVENT_VALID_PAYLOAD = 0x10
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x20

KVM_X86_SHADOW_INT_MOV_SS = 0x01
KVM_X86_SHADOW_INT_STI = 0x02

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0  # sic: the kernel's spelling

KVM_X2APIC_API_USE_32BIT_IDS = 1 << 0
KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK = 1 << 1

KVM_X86_DISABLE_EXITS_MWAIT = 1 << 0
KVM_X86_DISABLE_EXITS_HLT = 1 << 1
KVM_X86_DISABLE_EXITS_PAUSE = 1 << 2
KVM_X86_DISABLE_EXITS_CSTATE = 1 << 3

# --------------------------------------------------------------------------- ioctls

# /dev/kvm
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, kvm_msr_list)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, kvm_cpuid2)
# VM fd
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, c_uint64)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_IRQ_LINE = _IOW(KVMIO, 0x61, kvm_irq_level)
KVM_GET_IRQCHIP = _IOWR(KVMIO, 0x62, kvm_irqchip)
KVM_SET_IRQCHIP = _IOR(KVMIO, 0x63, kvm_irqchip)  # sic: _IOR in the kernel header
KVM_IRQ_LINE_STATUS = _IOWR(KVMIO, 0x67, kvm_irq_level)
KVM_SET_GSI_ROUTING = _IOW(KVMIO, 0x6A, kvm_irq_routing)
KVM_IRQFD = _IOW(KVMIO, 0x76, kvm_irqfd)
KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, kvm_pit_config)
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, kvm_ioeventfd)
KVM_SET_CLOCK = _IOW(KVMIO, 0x7B, kvm_clock_data)
KVM_GET_CLOCK = _IOR(KVMIO, 0x7C, kvm_clock_data)
KVM_GET_PIT2 = _IOR(KVMIO, 0x9F, kvm_pit_state2)
KVM_SET_PIT2 = _IOW(KVMIO, 0xA0, kvm_pit_state2)
KVM_SIGNAL_MSI = _IOW(KVMIO, 0xA5, kvm_msi)
# vCPU fd
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, kvm_sregs)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, kvm_msrs)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, kvm_msrs)
KVM_GET_FPU = _IOR(KVMIO, 0x8C, kvm_fpu)
KVM_SET_FPU = _IOW(KVMIO, 0x8D, kvm_fpu)
KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, kvm_lapic_state)
KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, kvm_lapic_state)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, kvm_cpuid2)
KVM_GET_CPUID2 = _IOWR(KVMIO, 0x91, kvm_cpuid2)
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, kvm_mp_state)
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, kvm_mp_state)
KVM_NMI = _IO(KVMIO, 0x9A)
KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, kvm_vcpu_events)
KVM_GET_DEBUGREGS = _IOR(KVMIO, 0xA1, kvm_debugregs)
KVM_SET_DEBUGREGS = _IOW(KVMIO, 0xA2, kvm_debugregs)
KVM_SET_TSC_KHZ = _IO(KVMIO, 0xA2)
KVM_GET_TSC_KHZ = _IO(KVMIO, 0xA3)
KVM_GET_XSAVE = _IOR(KVMIO, 0xA4, kvm_xsave)
KVM_SET_XSAVE = _IOW(KVMIO, 0xA5, kvm_xsave)
KVM_KVMCLOCK_CTRL = _IO(KVMIO, 0xAD)
KVM_GET_XSAVE2 = _IOR(KVMIO, 0xCF, kvm_xsave)
# VM fd, and vCPU fd for vCPU capabilities
KVM_ENABLE_CAP = _IOW(KVMIO, 0xA3, kvm_enable_cap)
KVM_GET_XCRS = _IOR(KVMIO, 0xA6, kvm_xcrs)
KVM_SET_XCRS = _IOW(KVMIO, 0xA7, kvm_xcrs)

# --------------------------------------------------------------------------- tables


def _named(prefix: str) -> dict[str, int]:
    return {k: v for k, v in globals().items() if k.startswith(prefix) and isinstance(v, int)}


#: every top-level structure mirrored here, keyed by its C type name
STRUCTS: dict[str, type[ctypes.Structure]] = {
    f"struct {cls.__name__}": cls
    for cls in (
        kvm_userspace_memory_region, kvm_regs, kvm_segment, kvm_dtable, kvm_sregs, kvm_fpu,
        kvm_msr_entry, kvm_msrs, kvm_msr_list, kvm_cpuid_entry2, kvm_cpuid2, kvm_irq_level,
        kvm_pit_config, kvm_mp_state, kvm_irqfd, kvm_ioeventfd, kvm_irq_routing_irqchip,
        kvm_irq_routing_msi, kvm_irq_routing_entry, kvm_irq_routing, kvm_msi, kvm_lapic_state,
        kvm_clock_data, kvm_vcpu_events, kvm_xcr, kvm_xcrs, kvm_enable_cap,
        kvm_debug_exit_arch, kvm_run, kvm_debugregs, kvm_xsave, kvm_pic_state,
        kvm_ioapic_state, kvm_irqchip, kvm_pit_channel_state, kvm_pit_state2,
    )
}  # fmt: skip

_IOCTL_NAMES = (
    "KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_GET_MSR_INDEX_LIST", "KVM_CHECK_EXTENSION",
    "KVM_GET_VCPU_MMAP_SIZE", "KVM_GET_SUPPORTED_CPUID", "KVM_CREATE_VCPU",
    "KVM_SET_USER_MEMORY_REGION", "KVM_SET_TSS_ADDR", "KVM_SET_IDENTITY_MAP_ADDR",
    "KVM_CREATE_IRQCHIP", "KVM_IRQ_LINE", "KVM_IRQ_LINE_STATUS", "KVM_SET_GSI_ROUTING",
    "KVM_IRQFD", "KVM_CREATE_PIT2", "KVM_IOEVENTFD", "KVM_SET_CLOCK", "KVM_GET_CLOCK",
    "KVM_SIGNAL_MSI", "KVM_RUN", "KVM_GET_REGS", "KVM_SET_REGS", "KVM_GET_SREGS",
    "KVM_SET_SREGS", "KVM_GET_MSRS", "KVM_SET_MSRS", "KVM_GET_FPU", "KVM_SET_FPU",
    "KVM_GET_LAPIC", "KVM_SET_LAPIC", "KVM_SET_CPUID2", "KVM_GET_CPUID2", "KVM_GET_MP_STATE",
    "KVM_SET_MP_STATE", "KVM_NMI", "KVM_GET_VCPU_EVENTS", "KVM_SET_VCPU_EVENTS",
    "KVM_ENABLE_CAP", "KVM_GET_XCRS", "KVM_SET_XCRS", "KVM_GET_IRQCHIP", "KVM_SET_IRQCHIP",
    "KVM_GET_PIT2", "KVM_SET_PIT2", "KVM_GET_DEBUGREGS", "KVM_SET_DEBUGREGS",
    "KVM_SET_TSC_KHZ", "KVM_GET_TSC_KHZ", "KVM_GET_XSAVE", "KVM_SET_XSAVE",
    "KVM_KVMCLOCK_CTRL", "KVM_GET_XSAVE2",
)  # fmt: skip
#: ioctl request numbers by kernel name
IOCTLS: dict[str, int] = {name: globals()[name] for name in _IOCTL_NAMES}
#: request number -> name, for error messages
IOCTL_NAMES: dict[int, str] = {v: k for k, v in IOCTLS.items()}
#: KVM_EXIT_* reasons (not the KVM_EXIT_IO_* directions)
EXIT_REASONS: dict[str, int] = {
    k: v for k, v in _named("KVM_EXIT_").items() if not k.startswith("KVM_EXIT_IO_")
}
EXIT_REASON_NAMES: dict[int, str] = {v: k for k, v in EXIT_REASONS.items()}
#: KVM_CAP_* capability numbers
CAPS: dict[str, int] = _named("KVM_CAP_")
CAP_NAMES: dict[int, str] = {v: k for k, v in CAPS.items()}
#: the remaining mirrored constants (flags, sub-codes, states)
CONSTANTS: dict[str, int] = {
    k: v
    for prefix in (
        "KVM_API_VERSION", "KVMIO", "KVM_EXIT_IO_", "KVM_INTERNAL_ERROR_", "KVM_SYSTEM_EVENT_",
        "KVM_MEM_", "KVM_PIT_SPEAKER_", "KVM_PIT_FLAGS_", "KVM_MP_STATE_", "KVM_IRQFD_FLAG_",
        "KVM_IOEVENTFD_FLAG_", "KVM_IRQ_ROUTING_", "KVM_IRQCHIP_", "KVM_MSI_VALID_",
        "KVM_CLOCK_", "KVM_VCPUEVENT_VALID_", "KVM_CPUID_FLAG_", "KVM_X2APIC_API_",
        "KVM_X86_DISABLE_EXITS_", "KVM_NR_INTERRUPTS", "KVM_APIC_REG_SIZE", "KVM_MAX_XCRS",
        "SYNC_REGS_SIZE_BYTES", "KVM_IOAPIC_NUM_PINS", "KVM_NR_IRQCHIPS", "KVM_X86_SHADOW_INT_",
    )
    for k, v in _named(prefix).items()
}  # fmt: skip
