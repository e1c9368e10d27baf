"""Regression tests for patch 0010 (stale translated code after writes through an alias).

The "1 boot in 100 crashes with memory corruption" bug of ``--accel emu``:
unicorn tracks self-modifying code per *virtual* page only. A guest write
through another virtual address of the same physical page (Linux: the direct
map, the vmalloc RW mapping a module is copied through, text_poke's alias)
could stop invalidating the translated blocks (TBs) of that page, so the CPU
went on executing the page's *old* code. Linux reuses module memory (freed
init sections, rmmod/insmod) at the same addresses, and the stale code then
called/stored to the previous module's addresses (use-after-free, RCU
callbacks on reused memory, writes to read-only pages).

Both tests map the same 2 MiB of RAM twice: identity (executable) and at
``ALIAS`` with NX (so unicorn's TLB entry for the alias is a pure data
entry). ``FUNC`` is ``mov eax, 1; ret``; the snippet calls it, patches its
immediate to 2 through the alias, calls it again. A real CPU (and QEMU)
returns 2 the second time; unpatched unicorn returned 1.
"""

from __future__ import annotations

import ctypes
import mmap
import struct

import pytest

from pyvirt.hypervisor.emulated import _uc

pytest.importorskip("unicorn")
if not _uc.available():
    pytest.fail("unicorn lacks pyvirt's patches: run third_party/unicorn/build.sh", pytrace=False)

from pyvirt.hypervisor.emulated.engine import Engine, LongModeState, RunExit

RAM = 2 << 20
PML4, PDPT, PD, PD_ALIAS = 0x1000, 0x2000, 0x3000, 0x4000
CODE = 0x10000  # the test snippet (its own page)
FUNC = 0x11000  # the function that gets patched (another page)
ALIAS = 0x4000_0000  # second mapping of physical 0..2 MiB, NX
STACK = 0x80000
NX = 1 << 63

_MOV_RAX_FUNC_CALL_RAX = b"\x48\xc7\xc0" + struct.pack("<I", FUNC) + b"\xff\xd0"
_FUNC_BYTES = b"\xb8\x01\x00\x00\x00\xc3"  # mov eax, 1; ret
_PATCH_IMM = b"\xc7\x43\x01\x02\x00\x00\x00"  # mov dword ptr [rbx+1], 2
_TOUCH = b"\xc6\x83\x00\x08\x00\x00\x01"  # mov byte ptr [rbx+0x800], 1 (no code there)


def _snippet(touch_first: bool) -> bytes:
    code = b"\x48\xbb" + struct.pack("<Q", ALIAS + FUNC)  # movabs rbx, ALIAS+FUNC
    if touch_first:
        code += _TOUCH  # the alias's TLB entry is used for a write before FUNC runs
    code += _MOV_RAX_FUNC_CALL_RAX + b"\x41\x89\xc4"  # call FUNC; mov r12d, eax
    if not touch_first:
        code += _TOUCH  # ... or only after FUNC's page holds translated code
    code += _PATCH_IMM
    code += _MOV_RAX_FUNC_CALL_RAX + b"\x41\x89\xc5"  # call FUNC; mov r13d, eax
    return code + b"\xf4"  # hlt


def _run(code: bytes) -> tuple[int, int]:
    mem = mmap.mmap(-1, RAM)
    eng = Engine(halt="return")
    try:
        eng.map_ram(0, RAM, ctypes.addressof(ctypes.c_char.from_buffer(mem)))
        mem[PML4:PML4 + 8] = struct.pack("<Q", PDPT | 3)
        mem[PDPT:PDPT + 16] = struct.pack("<QQ", PD | 3, PD_ALIAS | 3)
        mem[PD:PD + 8] = struct.pack("<Q", 0 | 0x83)  # 2 MiB page, RW, executable
        mem[PD_ALIAS:PD_ALIAS + 8] = struct.pack("<Q", 0 | 0x83 | NX)  # same page, RW, NX
        mem[CODE:CODE + len(code)] = code
        mem[FUNC:FUNC + len(_FUNC_BYTES)] = _FUNC_BYTES
        eng.set_long_mode(LongModeState(rip=CODE, cr3=PML4, rsp=STACK))
        assert eng.run() is RunExit.HALTED
        assert mem[FUNC + 1] == 2  # the patch landed in RAM either way
        return eng.reg("r12"), eng.reg("r13")
    finally:
        eng.close()
        del eng
        mem.close()


def test_alias_write_after_code_is_translated_invalidates_it() -> None:
    # the alias TLB entry was written through (and marked dirty) while FUNC's
    # page held no code; translating FUNC must re-arm SMC detection on it
    assert _run(_snippet(touch_first=True)) == (1, 2)


def test_alias_write_to_page_with_code_keeps_detecting_smc() -> None:
    # the first alias write to a page that holds code must not turn off SMC
    # detection for later writes through the alias
    assert _run(_snippet(touch_first=False)) == (1, 2)
