"""Checks for saved state read back from a file (treated as hostile).

Every field of an interrupt-controller or vCPU record is checked before it is
used: a value out of range is a ``StateError`` naming the part and the field,
never an exception from deep inside a device or an unbounded allocation.
"""

from __future__ import annotations

from pyvirt.state import StateError

__all__ = ["bits_from_bytes", "bits_to_bytes", "check_bool", "check_int", "check_len"]

#: bounds for times carried relative to the moment of saving (ns): ~146 years
MAX_REL_NS = 1 << 62


def check_int(part: str, field: str, value: object, lo: int, hi: int) -> int:
    """``value`` as an int in [lo, hi] (``bool`` is not an int here)."""
    if type(value) is not int or not lo <= value <= hi:
        raise StateError(f"{part}: saved state field {field} = {value!r} is out of range "
                         f"{lo:#x}..{hi:#x}")
    return value


def check_bool(part: str, field: str, value: object) -> bool:
    if type(value) is not bool:
        raise StateError(f"{part}: saved state field {field} = {value!r} is not a boolean")
    return value


def check_len(part: str, field: str, value: tuple[object, ...] | list[object] | bytes,
              n: int) -> None:
    if len(value) != n:
        raise StateError(f"{part}: saved state field {field} has {len(value)} entries, "
                         f"expected {n}")


def bits_to_bytes(bits: int, nbytes: int) -> bytes:
    return bits.to_bytes(nbytes, "little")


def bits_from_bytes(part: str, field: str, data: object, nbytes: int) -> int:
    if type(data) is not bytes or len(data) != nbytes:
        raise StateError(f"{part}: saved state field {field} must be {nbytes} bytes")
    return int.from_bytes(data, "little")
