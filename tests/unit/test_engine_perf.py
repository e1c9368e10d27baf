"""Performance guard for unicorn patch 0009 (third_party/unicorn/patches).

Without UC_HOOK_MEM_* hooks a guest load/store must be an inline TLB lookup
plus the host access, with no exit-check helper call after it (the call also
spills and reloads every guest register). Stock unicorn and series 0001-0008
emit that call after every access whether or not memory hooks exist.

The check is relative, so a loaded machine does not break it: the same loop
of memory loads runs on two fresh engines, one with no hooks and one with a
UC_HOOK_MEM_READ_UNMAPPED hook that never fires (all accesses are mapped).
That hook keeps the per-access check (the path for hook users) but does not
change the inline fast path. With 0009 the hook-free run is about 2x faster;
without it both runs execute identical code. Runs against whatever unicorn
the running environment loads (LIBUNICORN_PATH included).

The other tests check that the fault paths which relied on the removed
check still stop at the faulting instruction with nothing after it run.
"""

from __future__ import annotations

import struct
import time
from typing import Any

import pytest

unicorn = pytest.importorskip("unicorn")
from unicorn import x86_const as X  # noqa: E402 - after importorskip on purpose

CODE = 0x1000
DATA = 0x100000
ITERS = 1_000_000


def _loop(n_loads: int) -> bytes:
    """mov ecx, ITERS; 1: add rax, [rsi+8*k] (k < n_loads); dec ecx; jnz 1b."""
    body = b"".join(b"\x48\x03\x46" + bytes([8 * k]) for k in range(n_loads))
    body += b"\xff\xc9"  # dec ecx
    tail = b"\x0f\x85" + struct.pack("<i", -(len(body) + 6))  # jnz rel32 back to loop
    return b"\xb9" + struct.pack("<I", ITERS) + body + tail


def _engine(code: bytes, hook: bool) -> Any:
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    uc.mem_map(CODE, 0x1000)
    uc.mem_map(DATA, 0x1000, unicorn.UC_PROT_READ | unicorn.UC_PROT_WRITE)
    uc.mem_write(CODE, code)
    uc.mem_write(DATA, bytes(range(256)) * 16)
    if hook:
        uc.hook_add(unicorn.UC_HOOK_MEM_READ_UNMAPPED, lambda *a: False)
    return uc


def _run(code: bytes, hook: bool) -> float:
    uc = _engine(code, hook)
    uc.reg_write(X.UC_X86_REG_RSI, DATA)
    uc.reg_write(X.UC_X86_REG_RAX, 0)
    t0 = time.perf_counter()
    uc.emu_start(CODE, CODE + len(code))
    dt = time.perf_counter() - t0
    assert uc.reg_read(X.UC_X86_REG_RCX) == 0
    return dt


def test_loads_without_mem_hooks_have_no_helper_call() -> None:
    code = _loop(16)
    _run(code, False)  # warm up (library load, allocator)
    plain, hooked = [], []
    for _ in range(5):  # interleaved, best of 5: robust against a busy host
        plain.append(_run(code, False))
        hooked.append(_run(code, True))
    ratio = min(plain) / min(hooked)
    # 0009: ~0.45; without it: ~1.0 (identical generated code).
    assert ratio < 0.75, (
        f"hook-free loads not faster than with a memory hook (ratio {ratio:.2f}, "
        f"{min(plain) * 1e3:.1f} ms vs {min(hooked) * 1e3:.1f} ms): the per-access "
        "exit-check helper call is still emitted (unicorn patch 0009 missing?)"
    )


# Faults that relied on the removed check: with and without memory hooks,
# emulation stops at the faulting instruction, the instructions before it
# in the same block ran once, the ones after it not at all.
FAULT_CASES = {
    # inc rbx; mov [rdi], rax; inc rdx
    "write-unmapped": (
        b"\x48\xff\xc3" + b"\x48\x89\x07" + b"\x48\xff\xc2",
        0x200000,
        unicorn.UC_ERR_WRITE_UNMAPPED,
        unicorn.UC_HOOK_MEM_WRITE_UNMAPPED,
    ),
    # inc rbx; mov [rdi], rax; inc rdx  (DATA is read-only here)
    "write-prot": (
        b"\x48\xff\xc3" + b"\x48\x89\x07" + b"\x48\xff\xc2",
        DATA + 0x800,
        unicorn.UC_ERR_WRITE_PROT,
        unicorn.UC_HOOK_MEM_WRITE_PROT,
    ),
    # inc rbx; add [rdi], rax; inc rdx
    "rmw-unmapped": (
        b"\x48\xff\xc3" + b"\x48\x01\x07" + b"\x48\xff\xc2",
        0x200000,
        unicorn.UC_ERR_READ_UNMAPPED,
        unicorn.UC_HOOK_MEM_READ_UNMAPPED,
    ),
    # inc rbx; mov rax, [rdi]; inc rdx
    "read-unmapped": (
        b"\x48\xff\xc3" + b"\x48\x8b\x07" + b"\x48\xff\xc2",
        0x200000,
        unicorn.UC_ERR_READ_UNMAPPED,
        unicorn.UC_HOOK_MEM_READ_UNMAPPED,
    ),
}


@pytest.mark.parametrize("hook", [False, True], ids=["no-hooks", "with-hook"])
@pytest.mark.parametrize("case", sorted(FAULT_CASES))
def test_faulting_access_stops_at_the_instruction(case: str, hook: bool) -> None:
    code, addr, err, hook_type = FAULT_CASES[case]
    code = b"\x90" * 4 + code + b"\xf4"  # nops, snippet, hlt
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    uc.mem_map(CODE, 0x1000)
    perms = unicorn.UC_PROT_READ if case == "write-prot" else unicorn.UC_PROT_ALL
    uc.mem_map(DATA, 0x1000, perms)
    uc.mem_write(CODE, code)
    if hook:
        uc.hook_add(hook_type, lambda *a: False)  # not handled: the fault stands
    uc.reg_write(X.UC_X86_REG_RDI, addr)
    uc.reg_write(X.UC_X86_REG_RAX, 0x1234)
    with pytest.raises(unicorn.UcError) as ei:
        uc.emu_start(CODE, CODE + len(code))
    assert ei.value.errno == err
    assert uc.reg_read(X.UC_X86_REG_RIP) == CODE + 4 + 3  # the faulting instruction
    assert uc.reg_read(X.UC_X86_REG_RBX) == 1  # before it: ran once
    assert uc.reg_read(X.UC_X86_REG_RDX) == 0  # after it: not run
    if case == "write-prot":
        assert uc.mem_read(addr, 8) == bytes(8)
