"""Backend-neutral x86-64 CPU register state (what a vCPU starts with).

``pyvirt.arch.x86_64.boot`` fills one for the boot processor; each backend
converts it (KVM: ``kvm_regs``/``kvm_sregs``; the software CPU: engine
registers).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Segment:
    base: int = 0
    limit: int = 0xFFFF
    selector: int = 0
    type: int = 0  # 4-bit descriptor type (e.g. 0xb = execute/read accessed)
    present: bool = True
    dpl: int = 0
    db: bool = False  # default operation size (32-bit) for code/data
    s: bool = True  # code/data (True) vs system segment
    l: bool = False  # noqa: E741 - the architectural name: 64-bit code segment
    g: bool = False  # granularity: limit in 4 KiB units
    avl: bool = False
    unusable: bool = False


@dataclass
class DescriptorTable:
    base: int = 0
    limit: int = 0


@dataclass
class CpuState:
    # general purpose
    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2
    # segments
    cs: Segment = field(default_factory=Segment)
    ds: Segment = field(default_factory=Segment)
    es: Segment = field(default_factory=Segment)
    fs: Segment = field(default_factory=Segment)
    gs: Segment = field(default_factory=Segment)
    ss: Segment = field(default_factory=Segment)
    tr: Segment = field(default_factory=lambda: Segment(type=0xB, s=False))
    ldt: Segment = field(default_factory=lambda: Segment(type=0x2, s=False, unusable=True))
    gdt: DescriptorTable = field(default_factory=DescriptorTable)
    idt: DescriptorTable = field(default_factory=DescriptorTable)
    # control
    cr0: int = 0x60000010
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    #: extra MSRs to program at boot: index -> value
    msrs: dict[int, int] = field(default_factory=dict)
