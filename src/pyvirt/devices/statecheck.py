"""Checks for restored device state: every value in a record is hostile.

A state file is checksummed, but a record may still come from another
machine layout, a bug, or a crafted file. A device's ``restore_state`` checks
each field with these before changing anything, so a bad record fails with
one ``StateError`` naming the part and the field, never with an exception
deep inside the device or an unbounded allocation.
"""

from __future__ import annotations

import math

from pyvirt.state import StateError

__all__ = ["check_bits", "check_bool", "check_bytes", "check_float", "check_int"]


def _bad(part: str, field: str, why: str) -> StateError:
    return StateError(f"{part}: saved state field {field} {why}")


def check_int(part: str, field: str, value: object, lo: int, hi: int) -> int:
    """``value`` as an int in [lo, hi]."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(part, field, f"is {type(value).__name__}, not an integer")
    if not lo <= value <= hi:
        raise _bad(part, field, f"= {value:#x} is outside {lo:#x}..{hi:#x}")
    return value


def check_bits(part: str, field: str, value: object, allowed: int) -> int:
    """``value`` as a non-negative int with no bit outside ``allowed``."""
    v = check_int(part, field, value, 0, allowed)
    if v & ~allowed:
        raise _bad(part, field, f"= {v:#x} has bits outside {allowed:#x}")
    return v


def check_bool(part: str, field: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _bad(part, field, f"is {type(value).__name__}, not a boolean")
    return value


def check_float(part: str, field: str, value: object, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(part, field, f"is {type(value).__name__}, not a number")
    v = float(value)
    if not math.isfinite(v) or not lo <= v <= hi:
        raise _bad(part, field, f"= {v!r} is outside {lo!r}..{hi!r}")
    return v


def check_bytes(part: str, field: str, value: object, *, length: int | None = None,
                max_len: int | None = None) -> bytes:
    """``value`` as bytes of exactly ``length`` or at most ``max_len`` bytes."""
    if not isinstance(value, bytes | bytearray):
        raise _bad(part, field, f"is {type(value).__name__}, not bytes")
    if length is not None and len(value) != length:
        raise _bad(part, field, f"holds {len(value)} bytes, not {length}")
    if max_len is not None and len(value) > max_len:
        raise _bad(part, field, f"holds {len(value)} bytes, more than {max_len}")
    return bytes(value)
