"""Tests for pyvirt's unicorn patch series (third_party/unicorn/patches).

Each test runs a small machine-code snippet in a real long-mode setup (page
tables, GDT, IDT, TSS) and fails on stock unicorn. Snippets are assembled with
GNU as at test time (skipped without binutils); the library must be the
patched build (third_party/unicorn/build.sh), else the module is skipped.
"""

from __future__ import annotations

import mmap
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from pyvirt.hypervisor.emulated import _uc

pytest.importorskip("unicorn")
# A stock unicorn must fail these tests, not skip them: install the patched
# build with third_party/unicorn/build.sh.
if not _uc.available():
    pytest.fail("unicorn lacks pyvirt's patches: run third_party/unicorn/build.sh", pytrace=False)
if shutil.which("as") is None or shutil.which("objcopy") is None:
    pytest.skip("needs GNU as/objcopy to assemble snippets", allow_module_level=True)

from pyvirt.hypervisor.emulated.engine import (
    CODE64_FLAGS,
    DATA_FLAGS,
    TSS64_FLAGS,
    Engine,
    LongModeState,
    MsrResult,
    RunExit,
    Segment,
)

RAM = 2 << 20
PML4, PDPT, PD = 0x1000, 0x2000, 0x3000
GDT, IDT, TSS = 0x4000, 0x5000, 0x6000
RES = 0x9000  # results written by handlers
CODE = 0x10000
HANDLERS = 0x20000
USER_CODE = 0x30000
KSTACK, ISTSTACK, USTACK = 0x80000, 0x70000, 0x60000
KCS, KDS, UDS, UCS, TSS_SEL = 0x08, 0x10, 0x18 | 3, 0x20 | 3, 0x28


def asm(src: str, base: int) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d)
        (p / "a.s").write_text(".intel_syntax noprefix\n.code64\n" + src + "\n")
        subprocess.run(["as", "--64", "-o", str(p / "a.o"), str(p / "a.s")], check=True)
        subprocess.run(
            ["objcopy", "-O", "binary", "-j", ".text", str(p / "a.o"), str(p / "a.bin")],
            check=True,
        )
        return (p / "a.bin").read_bytes()


def _desc(base: int, limit: int, flags: int) -> bytes:
    lo = (limit & 0xFFFF) | ((base & 0xFFFF) << 16)
    hi = ((base >> 16) & 0xFF) | (flags & 0x00F0FF00) | (limit & 0xF0000) | (base & 0xFF000000)
    return struct.pack("<II", lo, hi)


# A handler stub per vector: record (vector, [rsp], [rsp+8], [rsp+16], cr2) and hlt.
def _handler(vec: int) -> str:
    return f"""
    mov qword ptr [{RES:#x}], {vec}
    mov rax, [rsp]
    mov [{RES + 8:#x}], rax
    mov rax, [rsp+8]
    mov [{RES + 16:#x}], rax
    mov rax, [rsp+16]
    mov [{RES + 24:#x}], rax
    mov rax, cr2
    mov [{RES + 32:#x}], rax
    mov [{RES + 40:#x}], rsp
    hlt
    """


class Guest:
    """2 MiB of identity-mapped RAM with GDT/IDT/TSS, at CPL 0 in 64-bit mode."""

    def __init__(self, halt: str = "return", handlers: dict[int, str] | None = None) -> None:
        self.mem = mmap.mmap(-1, RAM)
        self.eng = Engine(halt=halt)
        addr = _addr_of(self.mem)
        self.eng.map_ram(0, RAM, addr)
        w = self.write
        w(PML4, struct.pack("<Q", PDPT | 7))
        w(PDPT, struct.pack("<Q", PD | 7))
        w(PD, struct.pack("<Q", 0 | 0x87))  # 2 MiB page, user-accessible
        gdt = b"\0" * 8
        gdt += _desc(0, 0xFFFFF, CODE64_FLAGS)
        gdt += _desc(0, 0xFFFFF, DATA_FLAGS)
        gdt += _desc(0, 0xFFFFF, DATA_FLAGS | (3 << 13))
        gdt += _desc(0, 0xFFFFF, CODE64_FLAGS | (3 << 13))
        gdt += _desc(TSS, 0x67, 0x8900) + struct.pack("<Q", 0)
        w(GDT, gdt)
        tss = bytearray(0x68)
        struct.pack_into("<Q", tss, 4, KSTACK)  # RSP0
        struct.pack_into("<Q", tss, 0x24, ISTSTACK)  # IST1
        w(TSS, bytes(tss))
        # IDT: every vector gets a stub; handlers may be replaced per test.
        hs = {v: _handler(v) for v in range(256)}
        hs.update(handlers or {})
        idt = bytearray(256 * 16)
        off = HANDLERS
        for v in range(256):
            code = asm(hs[v], off)
            w(off, code)
            ist = 1 if v == 2 else 0  # NMI on IST1
            dpl = 3 if v in (0x80, 3) else 0
            gate = (off & 0xFFFF) | (KCS << 16) | (ist << 32) | ((0x8E | (dpl << 5)) << 40)
            gate |= ((off >> 16) & 0xFFFF) << 48
            struct.pack_into("<QQ", idt, v * 16, gate, off >> 32)
            off += (len(code) + 15) & ~15
        w(IDT, bytes(idt))
        self.eng.set_long_mode(
            LongModeState(
                rip=CODE,
                cr3=PML4,
                rsp=KSTACK,
                gdt_base=GDT,
                gdt_limit=len(gdt) - 1,
                idt_base=IDT,
                idt_limit=len(idt) - 1,
                cs=Segment(KCS, flags=CODE64_FLAGS),
                ss=Segment(KDS),
                data=Segment(KDS),
                tr=Segment(TSS_SEL, TSS, 0x67, TSS64_FLAGS),
            )
        )

    def write(self, addr: int, data: bytes) -> None:
        self.mem[addr : addr + len(data)] = data

    def q(self, addr: int) -> int:
        return int(struct.unpack_from("<Q", self.mem, addr)[0])

    def load(self, src: str, at: int = CODE) -> None:
        self.write(at, asm(src, at))

    def result(self) -> tuple[int, int, int, int, int]:
        return tuple(self.q(RES + 8 * i) for i in range(5))  # type: ignore[return-value]


def _addr_of(m: mmap.mmap) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(m))


# --- patch 1: segment caches, exit reasons, kick ------------------------------


def test_load_segment_sets_cpl_and_64bit_code() -> None:
    g = Guest()
    # mov rax, imm64 only decodes as such in 64-bit code; CPL 0 needed for hlt.
    g.load(f"mov rax, 0x1122334455667788\nmov [{RES:#x}], rax\nhlt")
    assert g.eng.run() is RunExit.HALTED
    assert g.q(RES) == 0x1122334455667788
    assert g.eng.reg("rip") == CODE + len(
        asm(f"mov rax, 0x1122334455667788\nmov [{RES:#x}], rax\nhlt", CODE)
    )


def test_kick_before_run_is_not_lost() -> None:
    g = Guest()
    g.load("1: jmp 1b")
    g.eng.stop()
    assert g.eng.run() is RunExit.STOPPED


def test_stop_from_other_thread_many_times() -> None:
    g = Guest()
    g.load(f"1: inc qword ptr [{RES:#x}]\nadd rbx, 1\njmp 1b")
    for _ in range(200):
        t = threading.Timer(0.001, g.eng.stop)
        t.start()
        assert g.eng.run() is RunExit.STOPPED
        t.join()
    assert g.q(RES) == g.eng.reg("rbx") > 0


# --- patch 2: native exception delivery -------------------------------------


def test_divide_error_goes_through_idt() -> None:
    g = Guest()
    g.load("xor edx, edx\nmov eax, 1\nxor ecx, ecx\ndiv ecx\nhlt")
    assert g.eng.run() is RunExit.HALTED
    vec, rip, cs, _, _ = g.result()
    assert vec == 0
    assert rip == CODE + 9  # faulting div
    assert cs == KCS


def test_page_fault_error_code_and_cr2_and_no_false_double_fault() -> None:
    g = Guest()
    # Two faults in a row: the second must be #PF again, not #DF.
    handlers = {
        14: f"""
        inc qword ptr [{RES + 48:#x}]
        mov rax, [rsp]
        mov [{RES + 8:#x}], rax
        mov rax, cr2
        mov [{RES + 32:#x}], rax
        add qword ptr [rsp+8], 8   # skip the 8-byte faulting mov
        add rsp, 8                 # drop error code
        iretq
        """
    }
    g = Guest(handlers=handlers)
    g.load("mov rax, qword ptr [0x40000010]\nmov rax, qword ptr [0x40000020]\nhlt")
    assert g.eng.run() is RunExit.HALTED
    assert g.q(RES + 48) == 2
    assert g.q(RES + 8) == 0  # not-present read from CPL 0
    assert g.q(RES + 32) == 0x40000020


def test_int3_and_int_n_and_ud2() -> None:
    g = Guest()
    g.load("int3\nhlt")
    assert g.eng.run() is RunExit.HALTED
    assert g.result()[:2] == (3, CODE + 1)  # trap: RIP after int3
    g = Guest()
    g.load("int 0x80\nhlt")
    g.eng.run()
    assert g.result()[:2] == (0x80, CODE + 2)
    g = Guest()
    g.load("ud2\nhlt")
    g.eng.run()
    assert g.result()[:2] == (6, CODE)


def test_user_mode_fault_switches_to_rsp0() -> None:
    g = Guest()
    user = asm("mov rax, 1\nhlt", USER_CODE)  # hlt at CPL3 -> #GP(0)
    g.write(USER_CODE, user)
    g.load(
        f"""
        push {UDS}
        push {USTACK}
        push 0x2
        push {UCS}
        push {USER_CODE}
        iretq
        """
    )
    g.eng.run()
    vec, err, rip, cs, _ = g.result()
    assert vec == 13 and err == 0
    assert rip == USER_CODE + 7 and cs == UCS
    assert g.q(RES + 40) == KSTACK - 48  # ss, rsp, rflags, cs, rip, error code


def test_triple_fault_is_shutdown() -> None:
    g = Guest()
    g.load(f"lidt [{RES + 0x100:#x}]\nint3")  # zero-limit IDT
    assert g.eng.run() is RunExit.SHUTDOWN


# --- patch 3: external interrupts ----------------------------------------------


def test_external_interrupt_respects_if_and_sti_shadow() -> None:
    g = Guest(handlers={0x40: f"inc qword ptr [{RES + 56:#x}]\nmov [{RES + 8:#x}], rbx\niretq"})
    acks: list[int] = []

    def ack() -> int:
        acks.append(1)
        return 0x40

    g.eng.set_irq_callback(ack)
    g.load(
        """
        cli
        mov rbx, 1
        mov rbx, 2
        sti
        mov rbx, 3
        mov rbx, 4
        cli
        hlt
        """
    )
    g.eng.raise_irq()
    assert g.eng.run() is RunExit.HALTED
    assert acks == [1]
    assert g.q(RES + 56) == 1
    assert g.q(RES + 8) == 3  # taken after the instruction following sti


def test_irq_from_another_thread_interrupts_a_loop() -> None:
    g = Guest(halt="return", handlers={0x41: f"mov qword ptr [{RES + 64:#x}], 1\nhlt"})
    g.eng.set_irq_callback(lambda: 0x41)
    g.load("sti\n1: jmp 1b")
    t = threading.Timer(0.05, g.eng.raise_irq)
    t.start()
    assert g.eng.run() is RunExit.HALTED
    t.join()
    assert g.q(RES + 64) == 1


def test_nmi_uses_ist() -> None:
    g = Guest()
    g.load("cli\n1: jmp 1b")
    threading.Timer(0.02, g.eng.raise_nmi).start()
    assert g.eng.run() is RunExit.HALTED
    assert g.result()[0] == 2
    assert g.q(RES + 40) == ISTSTACK - 40


# --- patch 4: hlt ------------------------------------------------------------------


def test_hlt_blocks_until_interrupt() -> None:
    g = Guest(halt="block", handlers={0x42: f"inc qword ptr [{RES + 72:#x}]\niretq"})
    g.eng.set_irq_callback(lambda: 0x42)
    g.load(f"sti\nhlt\nmov qword ptr [{RES + 80:#x}], 1\n1: jmp 1b")
    threading.Timer(0.2, g.eng.raise_irq).start()
    threading.Timer(0.4, g.eng.stop).start()
    t0 = time.process_time()
    assert g.eng.run() is RunExit.STOPPED
    assert g.q(RES + 72) == 1 and g.q(RES + 80) == 1
    assert time.process_time() - t0 < 0.35  # slept in hlt, spun only ~0.2 s after


def test_hlt_block_stop_keeps_vcpu_halted() -> None:
    g = Guest(halt="block")
    g.load("cli\nhlt\nmov qword ptr [0x9000], 7")
    threading.Timer(0.05, g.eng.stop).start()
    assert g.eng.run() is RunExit.STOPPED
    assert g.eng.halted
    g.eng.stop()
    assert g.eng.run() is RunExit.STOPPED
    assert g.q(RES) == 0


def test_hlt_return_mode_resumes_with_interrupt() -> None:
    g = Guest(halt="return", handlers={0x43: f"inc qword ptr [{RES + 72:#x}]\niretq"})
    g.eng.set_irq_callback(lambda: 0x43)
    g.load(f"sti\nhlt\nmov qword ptr [{RES + 80:#x}], 1\ncli\nhlt")
    assert g.eng.run() is RunExit.HALTED
    assert g.eng.run() is RunExit.HALTED  # nothing pending: still halted
    assert g.q(RES + 80) == 0
    g.eng.raise_irq()
    assert g.eng.run() is RunExit.HALTED
    assert g.q(RES + 72) == 1 and g.q(RES + 80) == 1


# --- patch 5: syscall/sysret, sysenter --------------------------------------------


def test_syscall_sysret_roundtrip() -> None:
    g = Guest()
    kentry = 0x38000
    g.write(
        kentry,
        asm(f"mov [{RES + 88:#x}], rcx\nmov [{RES + 96:#x}], r11\nmov rax, 0x55\nsysretq", kentry),
    )
    g.write(USER_CODE, asm(f"stc\nsyscall\nmov [{RES + 104:#x}], rax\nint3", USER_CODE))
    g.eng.wrmsr(0xC0000081, (KCS << 32) | (0x10 << 48))  # STAR
    g.eng.wrmsr(0xC0000082, kentry)  # LSTAR
    g.eng.wrmsr(0xC0000084, 0x47700)  # FMASK like Linux (TF|DF|IF|IOPL|AC|NT)
    g.load(f"push {UDS}\npush {USTACK}\npush 0x203\npush {UCS}\npush {USER_CODE}\niretq")
    g.eng.run()
    assert g.q(RES + 88) == USER_CODE + 3  # return RIP in RCX
    assert g.q(RES + 96) & 0x201 == 0x201  # R11 = user RFLAGS (IF, CF)
    assert g.q(RES + 104) == 0x55
    vec, rip, cs, _, _ = g.result()
    assert (vec, rip, cs) == (3, USER_CODE + 3 + 8 + 1, UCS)


def test_syscall_without_sce_is_ud() -> None:
    g = Guest()
    g.eng.wrmsr(0xC0000080, 0x100)  # EFER.LME only (LMA stays)
    g.load("syscall\nhlt")
    g.eng.run()
    assert g.result()[:2] == (6, CODE)


# --- patch 6: MSRs -----------------------------------------------------------------


def test_unknown_msr_raises_gp_and_callback_msrs() -> None:
    g = Guest()
    seen: list[tuple[int, bool, int]] = []

    def cb(msr: int, is_write: bool, value: int) -> tuple[MsrResult, int]:
        seen.append((msr, is_write, value))
        if msr == 0x6E0:
            return MsrResult.HANDLED, 0xABCDEF
        if msr == 0x808:
            return MsrResult.HANDLED, 0
        return MsrResult.NATIVE, 0

    g.eng.set_msr_callback(cb)
    g.load(
        f"""
        mov ecx, 0x6e0
        rdmsr
        mov [{RES + 112:#x}], eax
        mov ecx, 0x808
        mov eax, 0x20
        xor edx, edx
        wrmsr
        mov ecx, 0xc0000082
        mov eax, 0x1234
        wrmsr
        rdmsr
        mov [{RES + 120:#x}], eax
        mov ecx, 0x12345678
        rdmsr
        hlt
        """
    )
    g.eng.run()
    assert g.q(RES + 112) == 0xABCDEF
    assert (0x808, True, 0x20) in seen
    assert g.q(RES + 120) == 0x1234
    vec, err, _, _, _ = g.result()
    assert vec == 13 and err == 0
    assert g.eng.rdmsr(0xC0000082) == 0x1234


# --- patch 7: CPUID -----------------------------------------------------------


def test_cpuid_override() -> None:
    g = Guest()
    g.eng.set_cpuid({0x40000000: (0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D)})
    g.load(
        f"""
        mov eax, 0x40000000
        cpuid
        mov [{RES + 128:#x}], ebx
        mov eax, 0
        cpuid
        mov [{RES + 136:#x}], eax
        hlt
        """
    )
    g.eng.run()
    assert g.q(RES + 128) == 0x4B4D564B
    assert g.q(RES + 136) >= 1  # untouched leaf keeps the engine's answer


# --- patch 11: invalidate translated code by guest-physical address ------------------

FUNC = 0x40000


def _stale_code_guest() -> Guest:
    g = Guest(halt="return", handlers={
        0x43: f"mov rax, {FUNC:#x}\ncall rax\nmov [{RES + 96:#x}], rax\nhlt"})
    g.load(f"mov rax, {FUNC:#x}\ncall rax\nmov [{RES + 88:#x}], rax\nsti\nhlt\n1: jmp 1b")
    g.load("mov rax, 1\nret", at=FUNC)
    assert g.eng.run() is RunExit.HALTED
    assert g.q(RES + 88) == 1
    g.load("mov rax, 2\nret", at=FUNC)  # the host rewrites code behind the CPU's back
    return g


def test_invalidate_phys_drops_stale_code() -> None:
    g = _stale_code_guest()
    g.eng.set_irq_callback(lambda: 0x43)
    g.eng.raise_irq()
    assert g.eng.run() is RunExit.HALTED
    assert g.q(RES + 96) == 1  # without invalidation the old translation runs

    g = _stale_code_guest()
    g.eng.invalidate_phys(FUNC, 16)
    g.eng.set_irq_callback(lambda: 0x43)
    g.eng.raise_irq()
    assert g.eng.run() is RunExit.HALTED
    assert g.q(RES + 96) == 2


def test_invalidate_phys_from_the_interrupt_ack_callback() -> None:
    """How the VMM uses it: drop DMA'd ranges when the completion interrupt is
    taken. The call must not disturb the interrupt being delivered (the
    virtual-address uc_ctl_remove_cache turned it into a double fault), also
    for a physical address that no page table maps."""
    g = _stale_code_guest()

    def ack() -> int:
        g.eng.invalidate_phys(0x1F0000, 4096)  # RAM, but not where anything ran
        g.eng.invalidate_phys(RAM + (1 << 30), 4096)  # not RAM at all: ignored
        g.eng.invalidate_phys(FUNC, 16)
        return 0x43

    g.eng.set_irq_callback(ack)
    g.eng.raise_irq()
    assert g.eng.run() is RunExit.HALTED
    assert g.result()[0] == 0  # no exception vector was recorded
    assert g.q(RES + 96) == 2


# --- patch 13: ioeventfds ------------------------------------------------------

MMIO = 0x200000  # the second 2 MiB page: an MMIO region (mapped by the test)


def _mmio_guest(writes: list[tuple[int, int, int]]) -> Guest:
    g = Guest()
    g.write(PD + 8, struct.pack("<Q", MMIO | 0x87))  # identity-map [2 MiB, 4 MiB)
    g.eng.map_mmio(MMIO, 0x1000, lambda off, size: 0,
                   lambda off, size, value: writes.append((off, size, value)))
    return g


def test_ioeventfd_signals_without_the_mmio_callback() -> None:
    import os

    writes: list[tuple[int, int, int]] = []
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        g = _mmio_guest(writes)
        g.eng.add_ioeventfd(MMIO + 0x10, 2, fd)
        with pytest.raises(Exception, match="add_ioeventfd"):
            g.eng.add_ioeventfd(MMIO + 0x10, 4, fd)  # that address is taken
        g.load(f"""
            mov word ptr [{MMIO + 0x10:#x}], 5
            mov word ptr [{MMIO + 0x10:#x}], 6
            mov word ptr [{MMIO + 0x20:#x}], 7
            mov dword ptr [{MMIO + 0x10:#x}], 8
            hlt""")
        assert g.eng.run() is RunExit.HALTED
        # the two 16-bit writes only counted; another address and another size
        # reach the region as before
        assert os.eventfd_read(fd) == 2
        assert writes == [(0x20, 2, 7), (0x10, 4, 8)]

        g = _mmio_guest(writes)
        g.eng.add_ioeventfd(MMIO + 0x10, 2, fd)
        g.eng.remove_ioeventfd(MMIO + 0x10, 2, fd)
        writes.clear()
        g.load(f"mov word ptr [{MMIO + 0x10:#x}], 9\nhlt")
        assert g.eng.run() is RunExit.HALTED
        assert writes == [(0x10, 2, 9)]
        with pytest.raises(BlockingIOError):
            os.eventfd_read(fd)

        g = _mmio_guest(writes)
        g.eng.add_ioeventfd(MMIO + 0x18, 0, fd)  # length 0: any size
        writes.clear()
        g.load(f"mov byte ptr [{MMIO + 0x18:#x}], 1\nmov qword ptr [{MMIO + 0x18:#x}], 2\nhlt")
        assert g.eng.run() is RunExit.HALTED
        assert os.eventfd_read(fd) == 2 and writes == []
    finally:
        os.close(fd)
