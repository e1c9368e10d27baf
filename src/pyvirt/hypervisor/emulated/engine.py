"""A typed wrapper over pyvirt's patched unicorn: one x86-64 system vCPU.

The patch series in ``third_party/unicorn/patches`` turns unicorn's x86 into a
real system CPU (QEMU's own exception/interrupt delivery, SYSCALL/SYSENTER,
RDMSR/WRMSR with #GP, HLT that sleeps, thread-safe interrupts and kicks).
``third_party/unicorn/build.sh`` installs it into the venv.

API (all addresses are guest-physical unless said otherwise)::

    eng = Engine()
    eng.map_ram(gpa, size, host_addr)         # zero-copy over our mmap (page aligned)
    eng.map_mmio(gpa, size, read, write)      # read(off, size) -> int; write(off, size, value)
    eng.set_pio_handlers(inp, out)            # inp(port, size) -> int; out(port, size, value)
    eng.set_irq_callback(ack)                 # ack() -> vector 0..255, or -1 (spurious)
    eng.set_msr_callback(cb)                  # cb(msr, is_write, value) -> MsrResult
    eng.set_cpuid(table | callback)           # override CPUID answers
    eng.set_long_mode(LongModeState(...))     # CR0/3/4, EFER, GDT/IDT/TR, CS/SS caches, RIP/RSP
    eng.raise_irq() / eng.lower_irq()         # INTR pin, any thread
    eng.raise_nmi()                           # any thread
    reason = eng.run()                        # -> RunExit (STOPPED/HALTED/SHUTDOWN/...)
    eng.stop()                                # any thread: run() returns STOPPED soon
    eng.registers()                           # dict for crash reports
    eng.context_bytes() / set_context_bytes() # the whole CPU context (saved state)
    eng.unhalt()                              # leave HLT without running guest code

Threading: ``run()`` releases the GIL (ctypes) and calls back into Python for
I/O, MMIO, MSR, CPUID and interrupt acknowledgement on the calling thread.
``raise_irq``/``lower_irq``/``raise_nmi``/``stop`` are safe from any thread.
With ``halt="block"`` (default) a guest ``hlt`` sleeps inside ``run()`` until
an interrupt is raised (then the guest continues in its handler) or ``stop()``
is called (``run()`` returns STOPPED with the vCPU still halted); with
``halt="return"`` ``run()`` returns HALTED instead and the next ``run()``
delivers a pending interrupt or returns HALTED again at once.

A triple fault returns SHUTDOWN. An exception raised by a Python callback stops
the vCPU and is re-raised from ``run()``.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import unicorn
from unicorn import x86_const as x86
from unicorn.unicorn_py3.unicorn import Uc, UcError

from pyvirt.arch.x86_64.boot import (
    CR0_ET,
    CR0_MP,
    CR0_NE,
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_OSFXSR,
    CR4_OSXMMEXCPT,
    CR4_PAE,
)
from pyvirt.arch.x86_64.msr import EFER_LMA, EFER_LME, EFER_NXE, EFER_SCE
from pyvirt.arch.x86_64.msr import IA32_EFER as MSR_EFER
from pyvirt.hypervisor.emulated import _uc

__all__ = [
    "CODE64_FLAGS",
    "DATA_FLAGS",
    "Engine",
    "EngineError",
    "LongModeState",
    "MsrResult",
    "RunExit",
    "Segment",
    "available",
    "build_identity",
]

# Descriptor-cache flag words (the descriptor's high dword) for flat segments.
CODE64_FLAGS = 0x00A09B00  # P, DPL0, S, code exec/read accessed, L=1, G=1
DATA_FLAGS = 0x00C09300  # P, DPL0, S, data read/write accessed, D/B=1, G=1
TSS64_FLAGS = 0x00008B00  # P, DPL0, busy 64-bit TSS

CR4_PGE = 1 << 7  # the only control bit this layer uses that arch/x86_64/boot.py does not

_UNTIL_NEVER = 0xFFFF_FFFF_FFFF_FFFF

# struct uc_context's header before its data[] (uc_priv.h: size_t, two enums,
# int, bool, two pointers) on LP64
_CONTEXT_HEADER = 40
# cpu_breakpoint[4] / cpu_watchpoint[4]: host pointers inside CPUX86State
_BREAKPOINT_PTRS = 4 * 8
# CPUX86State.retaddr (uintptr_t), the last field before end_reset_fields
_RETADDR = 8
# offsets found once per process (the layout is the build's)
_layout: dict[str, int] = {}


@functools.cache
def _build_stamp() -> str:
    from pathlib import Path

    lib_dir = Path(unicorn.__file__).parent / "lib"
    try:
        stamp = (lib_dir / "pyvirt-patches.stamp").read_text().strip()
    except OSError:
        stamp = "unstamped"
    try:
        patches = ",".join(sorted(line.split("-", 1)[0] for line in
                                  (lib_dir / "pyvirt-patches.list").read_text().split()))
    except OSError:
        patches = "?"
    return (f"unicorn {getattr(unicorn, '__version__', '?')} patches {patches} "
            f"build {stamp[:16]}")


def build_identity(context_size: int) -> str:
    """What a saved CPU context depends on: the unicorn version, the exact
    patched build (build.sh's stamp: sdist + build script + patches) and the
    context size (``Engine.context_size``). Another build's context is refused."""
    return f"{_build_stamp()} context {context_size}"


class EngineError(Exception):
    """The engine failed (unicorn error, unpatched library, bad argument)."""


class RunExit(enum.Enum):
    STOPPED = "stopped"  # stop() was called (or a callback raised)
    HALTED = "halted"  # hlt with halt="return": wait for an interrupt, then run() again
    SHUTDOWN = "shutdown"  # triple fault
    ERROR = "error"  # unicorn error, e.g. access to unmapped guest-physical memory
    DONE = "done"  # until/count reached (only with run(count=...))


class MsrResult(enum.IntEnum):
    NATIVE = _uc.MSR_NATIVE  # not ours: the engine's own MSR set (or #GP)
    HANDLED = _uc.MSR_HANDLED  # done (for reads, the value is returned alongside)
    GP = _uc.MSR_GP  # raise #GP(0) in the guest


# (result, value): value is what a read returns; ignored for writes.
MsrCallback = Callable[[int, bool, int], tuple[MsrResult, int]]
CpuidCallback = Callable[[int, int, tuple[int, int, int, int]], tuple[int, int, int, int]]


@dataclass(frozen=True)
class Segment:
    selector: int
    base: int = 0
    limit: int = 0xFFFFFFFF
    flags: int = DATA_FLAGS


@dataclass(frozen=True)
class LongModeState:
    """Register state for entering a 64-bit kernel directly (paging on, CPL 0)."""

    rip: int
    cr3: int
    rsp: int = 0
    rsi: int = 0
    rflags: int = 0x2
    gdt_base: int = 0
    gdt_limit: int = 0
    idt_base: int = 0
    idt_limit: int = 0
    cs: Segment = Segment(0x10, flags=CODE64_FLAGS)
    ss: Segment = Segment(0x18)
    data: Segment = Segment(0x18)  # DS/ES/FS/GS
    tr: Segment | None = None  # 64-bit TSS: needed for IST / ring changes
    efer: int = EFER_LME | EFER_LMA | EFER_SCE | EFER_NXE
    cr0: int = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    cr4: int = CR4_PAE | CR4_PGE | CR4_OSFXSR | CR4_OSXMMEXCPT


def available() -> bool:
    """True when the installed unicorn is pyvirt's patched build."""
    return _uc.available()


_GPRS = {
    "rax": x86.UC_X86_REG_RAX,
    "rbx": x86.UC_X86_REG_RBX,
    "rcx": x86.UC_X86_REG_RCX,
    "rdx": x86.UC_X86_REG_RDX,
    "rsi": x86.UC_X86_REG_RSI,
    "rdi": x86.UC_X86_REG_RDI,
    "rbp": x86.UC_X86_REG_RBP,
    "rsp": x86.UC_X86_REG_RSP,
    "r8": x86.UC_X86_REG_R8,
    "r9": x86.UC_X86_REG_R9,
    "r10": x86.UC_X86_REG_R10,
    "r11": x86.UC_X86_REG_R11,
    "r12": x86.UC_X86_REG_R12,
    "r13": x86.UC_X86_REG_R13,
    "r14": x86.UC_X86_REG_R14,
    "r15": x86.UC_X86_REG_R15,
    "rip": x86.UC_X86_REG_RIP,
    "rflags": x86.UC_X86_REG_RFLAGS,
    "cr0": x86.UC_X86_REG_CR0,
    "cr2": x86.UC_X86_REG_CR2,
    "cr3": x86.UC_X86_REG_CR3,
    "cr4": x86.UC_X86_REG_CR4,
    "cs": x86.UC_X86_REG_CS,
    "ss": x86.UC_X86_REG_SS,
    "ds": x86.UC_X86_REG_DS,
    "es": x86.UC_X86_REG_ES,
    "fs": x86.UC_X86_REG_FS,
    "gs": x86.UC_X86_REG_GS,
    "fs_base": x86.UC_X86_REG_FS_BASE,
    "gs_base": x86.UC_X86_REG_GS_BASE,
}


class Engine:
    """One x86-64 vCPU on the patched unicorn. See the module docstring."""

    def __init__(self, *, halt: str = "block") -> None:
        self._lib = _uc.lib()  # raises ImportError on an unpatched unicorn
        # The binding is untyped; keep it behind Any.
        self.uc: Any = Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        self._h = self.uc._uch
        self._keep: list[Any] = []  # ctypes callbacks must outlive the engine
        self._error: BaseException | None = None
        try:  # no exit addresses: the guest may execute anywhere
            self.uc.ctl_exits_enabled(True)
            self.uc.ctl_set_exits([])
            self._until = 0
        except (AttributeError, UcError):
            self._until = _UNTIL_NEVER
        mode = {"block": _uc.HALT_BLOCK, "return": _uc.HALT_RETURN}.get(halt)
        if mode is None:
            raise EngineError(f"halt must be 'block' or 'return', not {halt!r}")
        self._check(self._lib.uc_x86_set_halt_mode(self._h, mode), "set_halt_mode")
        self._halt_mode = mode
        #: CPUID instructions answered (the callback's count; metrics)
        self.cpuid_exits = 0

    # -- memory --------------------------------------------------------

    def map_ram(
        self, gpa: int, size: int, host_addr: int, *, perms: int = unicorn.UC_PROT_ALL
    ) -> None:
        """Back [gpa, gpa+size) with host memory at ``host_addr`` (no copy; 4 KiB aligned)."""
        self.uc.mem_map_ptr(gpa, size, perms, host_addr)

    def map_mmio(
        self,
        gpa: int,
        size: int,
        read: Callable[[int, int], int],
        write: Callable[[int, int, int], None],
    ) -> None:
        """Trap [gpa, gpa+size): ``read(offset, size)``, ``write(offset, size, value)``."""

        def _read(_uc: Any, off: int, sz: int, _ud: Any) -> int:
            try:
                return read(off, sz)
            except BaseException as e:
                self._fail(e)
                return 0

        def _write(_uc: Any, off: int, sz: int, value: int, _ud: Any) -> None:
            try:
                write(off, sz, value)
            except BaseException as e:
                self._fail(e)

        self.uc.mmio_map(gpa, size, _read, None, _write, None)

    def unmap(self, gpa: int, size: int) -> None:
        self.uc.mem_unmap(gpa, size)

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(self.uc.mem_read(gpa, size))

    def write(self, gpa: int, data: bytes) -> None:
        self.uc.mem_write(gpa, data)

    # -- devices and callbacks ----------------------------------------

    def set_pio_handlers(
        self, inp: Callable[[int, int], int], out: Callable[[int, int, int], None]
    ) -> None:
        """Port I/O: ``inp(port, size) -> value`` for IN/INS, ``out(port, size, value)``."""

        def _in(_uc: Any, port: int, size: int, _ud: Any) -> int:
            try:
                return inp(port, size) & ((1 << (8 * size)) - 1)
            except BaseException as e:
                self._fail(e)
                return 0

        def _out(_uc: Any, port: int, size: int, value: int, _ud: Any) -> None:
            try:
                out(port, size, value)
            except BaseException as e:
                self._fail(e)

        self.uc.hook_add(unicorn.UC_HOOK_INSN, _in, None, 1, 0, x86.UC_X86_INS_IN)
        self.uc.hook_add(unicorn.UC_HOOK_INSN, _out, None, 1, 0, x86.UC_X86_INS_OUT)

    def set_irq_callback(self, ack: Callable[[], int] | None) -> None:
        """``ack()`` runs when the vCPU accepts the INTR line (IF=1, no shadow).

        The line is lowered first; return the vector, or -1 if nothing is
        pending after all. If more are pending, call ``raise_irq()`` again.
        """
        if ack is None:
            self._check(self._lib.uc_x86_set_irq_callback(self._h, _uc.IRQ_CB(), None), "irq")
            return

        def _cb(_h: Any, _ud: Any) -> int:
            try:
                return int(ack())
            except BaseException as e:
                self._fail(e)
                return -1

        cfn = _uc.IRQ_CB(_cb)
        self._keep.append(cfn)
        self._check(self._lib.uc_x86_set_irq_callback(self._h, cfn, None), "irq")

    def set_msr_callback(self, cb: MsrCallback | None) -> None:
        """``cb(msr, is_write, value) -> (MsrResult, read_value)`` for every RDMSR/WRMSR."""
        if cb is None:
            self._check(self._lib.uc_x86_set_msr_callback(self._h, _uc.MSR_CB(), None), "msr")
            return

        def _cb(_h: Any, msr: int, is_write: int, pval: Any, _ud: Any) -> int:
            try:
                res, val = cb(msr, bool(is_write), int(pval[0]))
                if res == MsrResult.HANDLED and not is_write:
                    pval[0] = val & 0xFFFF_FFFF_FFFF_FFFF
                return int(res)
            except BaseException as e:
                self._fail(e)
                return int(MsrResult.GP)

        cfn = _uc.MSR_CB(_cb)
        self._keep.append(cfn)
        self._check(self._lib.uc_x86_set_msr_callback(self._h, cfn, None), "msr")

    def set_cpuid(
        self,
        override: Mapping[tuple[int, int] | int, tuple[int, int, int, int]] | CpuidCallback | None,
    ) -> None:
        """Override CPUID: a table {leaf or (leaf, subleaf): (eax, ebx, ecx, edx)}
        (leaves not listed keep the engine's answer) or a callback
        ``cb(leaf, subleaf, native_regs) -> regs``."""
        if override is None:
            self._check(self._lib.uc_x86_set_cpuid_callback(self._h, _uc.CPUID_CB(), None), "cpuid")
            return
        if callable(override):
            fn: CpuidCallback = override
        else:
            table = dict(override)

            def fn(
                leaf: int, sub: int, regs: tuple[int, int, int, int]
            ) -> tuple[int, int, int, int]:
                return table.get((leaf, sub), table.get(leaf, regs))

        def _cb(_h: Any, leaf: int, sub: int, regs: Any, _ud: Any) -> None:
            self.cpuid_exits += 1
            try:
                out = fn(leaf, sub, (regs[0], regs[1], regs[2], regs[3]))
                for i in range(4):
                    regs[i] = out[i] & 0xFFFF_FFFF
            except BaseException as e:
                self._fail(e)

        cfn = _uc.CPUID_CB(_cb)
        self._keep.append(cfn)
        self._check(self._lib.uc_x86_set_cpuid_callback(self._h, cfn, None), "cpuid")

    # -- interrupts and control (thread-safe) --------------------------

    def raise_irq(self) -> None:
        """Assert INTR (level): taken when IF=1 and not in an interrupt shadow."""
        self._check(self._lib.uc_x86_raise_irq(self._h, _uc.IRQ_HARD), "raise_irq")

    def lower_irq(self) -> None:
        self._check(self._lib.uc_x86_lower_irq(self._h, _uc.IRQ_HARD), "lower_irq")

    def raise_nmi(self) -> None:
        self._check(self._lib.uc_x86_raise_irq(self._h, _uc.IRQ_NMI), "raise_nmi")

    def invalidate_phys(self, gpa: int, size: int) -> None:
        """Drop translated code for guest-physical [gpa, gpa+size) (patch 0011).
        Only on the thread that runs the engine (a callback) or while it is stopped."""
        self._lib.uc_x86_invalidate_phys(self._h, gpa, size)

    def add_ioeventfd(self, gpa: int, length: int, fd: int) -> None:
        """Guest writes of ``length`` bytes (0: any) to MMIO ``gpa`` signal eventfd
        ``fd`` inside the engine instead of calling the MMIO handler (patch 0013).
        Any thread; ``fd`` must stay open until removed and the vCPU stopped."""
        self._check(self._lib.uc_x86_add_ioeventfd(self._h, gpa, length, fd), "add_ioeventfd")

    def remove_ioeventfd(self, gpa: int, length: int, fd: int) -> None:
        self._check(self._lib.uc_x86_remove_ioeventfd(self._h, gpa, length, fd),
                    "remove_ioeventfd")

    def stop(self) -> None:
        """Make the current (or, if none is running, the next) ``run()`` return STOPPED."""
        self._lib.uc_x86_kick(self._h)

    @property
    def halted(self) -> bool:
        return bool(self._lib.uc_x86_is_halted(self._h))

    # -- state -----------------------------------------------------------

    def set_segment(self, seg: int, s: Segment) -> None:
        """Load segment ``seg`` (``_uc.SEG_*``) including its descriptor cache."""
        err = self._lib.uc_x86_load_segment(self._h, seg, s.selector, s.base, s.limit, s.flags)
        self._check(err, "load_segment")

    def set_long_mode(self, st: LongModeState) -> None:
        """Enter 64-bit mode at CPL 0 with paging on (CR3 must point at valid tables)."""
        w = self.uc.reg_write
        w(x86.UC_X86_REG_CR4, st.cr4)
        w(x86.UC_X86_REG_MSR, (MSR_EFER, st.efer & ~EFER_LMA))
        w(x86.UC_X86_REG_CR3, st.cr3)
        w(x86.UC_X86_REG_CR0, st.cr0)  # PG with EFER.LME sets EFER.LMA
        w(x86.UC_X86_REG_GDTR, (0, st.gdt_base, st.gdt_limit, 0))
        w(x86.UC_X86_REG_IDTR, (0, st.idt_base, st.idt_limit, 0))
        if st.tr is not None:
            w(x86.UC_X86_REG_TR, (st.tr.selector, st.tr.base, st.tr.limit, st.tr.flags))
        self.set_segment(_uc.SEG_CS, st.cs)
        self.set_segment(_uc.SEG_SS, st.ss)
        for seg in (_uc.SEG_DS, _uc.SEG_ES, _uc.SEG_FS, _uc.SEG_GS):
            self.set_segment(seg, st.data)
        w(x86.UC_X86_REG_RFLAGS, st.rflags)
        w(x86.UC_X86_REG_RSP, st.rsp)
        w(x86.UC_X86_REG_RSI, st.rsi)
        w(x86.UC_X86_REG_RIP, st.rip)

    def reg(self, name: str) -> int:
        return int(self.uc.reg_read(_GPRS[name]))

    def set_reg(self, name: str, value: int) -> None:
        self.uc.reg_write(_GPRS[name], value)

    def rdmsr(self, msr: int) -> int:
        """Read an MSR of the engine's own set (not the callback's)."""
        return int(self.uc.reg_read(x86.UC_X86_REG_MSR, msr))

    def wrmsr(self, msr: int, value: int) -> None:
        self.uc.reg_write(x86.UC_X86_REG_MSR, (msr, value))

    def registers(self) -> dict[str, int]:
        out = {name: self.reg(name) for name in _GPRS}
        out["efer"] = self.rdmsr(MSR_EFER)
        return out

    # -- the whole CPU context (saved state) --------------------------------

    def context_size(self) -> int:
        """Bytes of QEMU's ``CPUX86State`` that ``uc_context_save`` copies (up to
        ``end_reset_fields``): build-dependent, part of ``build_identity``."""
        total = int(self._lib.uc_context_size(self._h))
        return total - _CONTEXT_HEADER

    def context_bytes(self) -> bytes:
        """The engine's CPU context: every register QEMU keeps in ``CPUX86State``
        (GPRs, RIP/RFLAGS, segment registers with their descriptor caches,
        GDTR/IDTR/LDTR/TR, CR0-8, DR0-7, EFER and the MSR set, FPU/SSE state,
        hflags/hflags2 with the interrupt shadow and NMI blocking, TSC offset).

        The layout is that of this build (``build_identity``). Its host
        addresses are zeroed, so a saved context holds none: the four pointers
        to QEMU breakpoint objects (armed by DR7) and ``retaddr`` (the last
        field: a helper's return address, set before each use). Not included: the halted flag and
        pending INTR/NMI requests (``CPUState``, not ``CPUX86State``).
        Only while the engine is stopped."""
        data = bytearray(self._raw_context())
        off = self._breakpoint_offset()
        data[off:off + _BREAKPOINT_PTRS] = bytes(_BREAKPOINT_PTRS)
        data[-_RETADDR:] = bytes(_RETADDR)
        return bytes(data)

    def set_context_bytes(self, data: bytes) -> None:
        """Load a context from ``context_bytes`` (same build: the caller checks
        ``build_identity``). Only while the engine is stopped.

        The breakpoint pointers and, when this engine has any breakpoint armed,
        DR7 are kept from this engine, so QEMU's breakpoint list stays consistent;
        the guest's armed hardware breakpoints are therefore not carried over
        (DR0-3/DR6/DR7 values are; Linux re-arms them by writing DR7). The TLB
        and the translated code are dropped: CR3 and guest memory may differ."""
        size = self.context_size()
        if len(data) != size:
            raise EngineError(f"CPU context is {len(data)} bytes; this engine's is {size}")
        cur = self._raw_context()
        off = self._breakpoint_offset()
        new = bytearray(data)
        keep = cur[off:off + _BREAKPOINT_PTRS]
        new[off:off + _BREAKPOINT_PTRS] = keep
        new[-_RETADDR:] = cur[-_RETADDR:]
        if any(keep):
            dr7 = off - 8  # dr[7], the last of dr[0..7] just before the pointers
            new[dr7:dr7 + 8] = cur[dr7:dr7 + 8]
        ctx = ctypes.c_void_p()
        self._check(self._lib.uc_context_alloc(self._h, ctypes.byref(ctx)), "context_alloc")
        try:
            assert ctx.value is not None
            ctypes.memmove(ctx.value + _CONTEXT_HEADER, bytes(new), size)
            self._check(self._lib.uc_context_restore(self._h, ctx), "context_restore")
        finally:
            self._lib.uc_context_free(ctx)
        # the raw copy bypassed cpu_x86_update_cr*: flush the softmmu TLB and
        # recompute what QEMU derives from CR0/CR3/CR4 by writing them back
        for reg in (x86.UC_X86_REG_CR4, x86.UC_X86_REG_CR3, x86.UC_X86_REG_CR0):
            self.uc.reg_write(reg, self.uc.reg_read(reg))
        self.flush_code()

    def flush_code(self) -> None:
        """Drop all translated code (guest RAM was rewritten from the host
        wholesale: a restore, a reboot's kernel load). Only while stopped."""
        self.uc.ctl_flush_tb()

    def _raw_context(self) -> bytes:
        size = self.context_size()
        ctx = ctypes.c_void_p()
        self._check(self._lib.uc_context_alloc(self._h, ctypes.byref(ctx)), "context_alloc")
        try:
            self._check(self._lib.uc_context_save(self._h, ctx), "context_save")
            assert ctx.value is not None
            return ctypes.string_at(ctx.value + _CONTEXT_HEADER, size)
        finally:
            self._lib.uc_context_free(ctx)

    def _breakpoint_offset(self) -> int:
        """Offset of ``cpu_breakpoint[4]`` in the context: right after ``dr[8]``,
        which is found by writing marker values to DR0-7 (a plain store through
        the register API) and looking for them."""
        cached: int | None = _layout.get("breakpoints")
        if cached is not None:
            return cached
        regs = [getattr(x86, f"UC_X86_REG_DR{i}") for i in range(8)]
        saved = [int(self.uc.reg_read(r)) for r in regs]
        markers = [0x5059_5649_5254_0000 | (0xA5 << 8) | i for i in range(8)]
        try:
            for r, m in zip(regs, markers, strict=True):
                self.uc.reg_write(r, m)
            raw = self._raw_context()
        finally:
            for r, v in zip(regs, saved, strict=True):
                self.uc.reg_write(r, v)
        pattern = b"".join(m.to_bytes(8, "little") for m in markers)
        at = raw.find(pattern)
        if at < 0 or raw.find(pattern, at + 1) >= 0:
            raise EngineError("cannot locate DR0-7 in the engine's CPU context")
        _layout["breakpoints"] = at + len(pattern)
        return at + len(pattern)

    def unhalt(self) -> None:
        """Leave the halted state without executing guest code (unicorn clears
        ``halted`` when a run starts in stock halt mode; a pending kick then
        stops that run before its first instruction)."""
        if not self.halted:
            return
        self._check(self._lib.uc_x86_set_halt_mode(self._h, _uc.HALT_STOCK), "set_halt_mode")
        try:
            self._lib.uc_x86_kick(self._h)
            with contextlib.suppress(UcError):
                self.uc.emu_start(self.reg("rip"), self._until, 0, 0)
        finally:
            self._check(self._lib.uc_x86_set_halt_mode(self._h, self._halt_mode),
                        "set_halt_mode")
        if self.halted:
            raise EngineError("the vCPU is still halted")

    # -- running -----------------------------------------------------------

    def run(self, count: int = 0) -> RunExit:
        """Run on the calling thread until stop()/halt/shutdown/error (or ``count`` insns)."""
        self._error = None
        rip = self.reg("rip")
        try:
            self.uc.emu_start(rip, self._until, 0, count)
        except UcError as e:
            reason = self._lib.uc_x86_exit_reason(self._h)
            if reason == _uc.EXIT_SHUTDOWN:
                return RunExit.SHUTDOWN
            if self._error is not None:
                raise self._error from e
            self.last_error: Exception | None = e
            return RunExit.ERROR
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        reason = self._lib.uc_x86_exit_reason(self._h)
        if reason == _uc.EXIT_STOP:
            return RunExit.STOPPED
        if reason == _uc.EXIT_HLT:
            return RunExit.HALTED
        if reason == _uc.EXIT_SHUTDOWN:
            return RunExit.SHUTDOWN
        return RunExit.DONE

    def close(self) -> None:
        """Free the unicorn instance now (not at garbage collection): it maps
        host memory (guest RAM) that the caller is about to unmap."""
        finalizer = getattr(self.uc, "_Uc__finalizer", None)
        if finalizer is not None:
            finalizer()
        self._keep.clear()

    # -- internals -------------------------------------------------------

    def _fail(self, e: BaseException) -> None:
        # Runs inside a callback: remember the first error and get out.
        if self._error is None:
            self._error = e
        self._lib.uc_x86_kick(self._h)

    def _check(self, err: int, what: str) -> None:
        if err != 0:
            raise EngineError(f"{what}: {UcError(err)}")
