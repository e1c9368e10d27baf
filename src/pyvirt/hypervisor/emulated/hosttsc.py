"""The host's time stamp counter, read from Python, and its frequency.

The engine's RDTSC is the host TSC (plus an offset the guest may write through
IA32_TSC), so everything that converts between guest TSC ticks and host time
(the LAPIC's TSC-deadline timer, CPUID leaf 0x15) must use the very same
counter: ``rdtsc()`` runs the instruction itself from a tiny executable
mapping, and ``tsc_hz()`` measures its rate once per process.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import platform
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["rdtsc", "tsc_hz"]

# rdtsc; shl rdx, 32; or rax, rdx; ret
_RDTSC_CODE = bytes.fromhex("0f31" "48c1e220" "4809d0" "c3")


@functools.cache
def _rdtsc_fn() -> Callable[[], int]:
    if platform.machine() not in ("x86_64", "AMD64"):
        raise OSError("the host TSC is x86-64 only")
    buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    buf.write(_RDTSC_CODE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    fn = ctypes.CFUNCTYPE(ctypes.c_uint64)(addr)
    fn._pyvirt_keep = buf  # type: ignore[attr-defined]  # the code must outlive the pointer
    return fn


def rdtsc() -> int:
    """The host TSC now (what a guest RDTSC returns with a zero offset)."""
    return int(_rdtsc_fn()())


def _sample() -> tuple[int, int, int]:
    """(tsc, monotonic_ns, bracket width in ticks): the narrowest of a few tries."""
    best: tuple[int, int, int] | None = None
    for _ in range(20):
        t0 = rdtsc()
        ns = time.monotonic_ns()
        t1 = rdtsc()
        if best is None or t1 - t0 < best[2]:
            best = ((t0 + t1) // 2, ns, t1 - t0)
    assert best is not None
    return best


@functools.cache
def tsc_hz(sysfs: Path = Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz"),
           calibrate_ns: int = 20_000_000) -> int:
    """Host TSC frequency in Hz, rounded to kHz (the precision Linux keeps).

    Trusts the kernel's value when it exports one; otherwise measures RDTSC
    against CLOCK_MONOTONIC over ``calibrate_ns`` (taking the narrowest
    brackets at both ends, so the error is a few ppm).
    """
    try:
        khz = int(sysfs.read_text().strip())
        if khz > 0:
            return khz * 1000
    except (OSError, ValueError):
        pass
    tsc0, ns0, _ = _sample()
    time.sleep(calibrate_ns / 1e9)
    tsc1, ns1, _ = _sample()
    hz = (tsc1 - tsc0) * 1_000_000_000 // max(ns1 - ns0, 1)
    return round(hz / 1000) * 1000
