"""The Linux ``_IOC`` request-number encoding (``<asm-generic/ioctl.h>``, as used on x86-64).

A request number packs the direction, the size of the argument structure, the
driver's type byte and a command number, so deriving numbers from the ctypes
structures (rather than copying them) catches a mis-sized mirror at once.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, TypeAlias

__all__ = ["IOC_NONE", "IOC_READ", "IOC_WRITE", "_IO", "_IOC", "_IOR", "_IOW", "_IOWR"]

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_DIRBITS = 2

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

IOC_NONE = 0
IOC_WRITE = 1  # userspace writes, the kernel reads
IOC_READ = 2  # the kernel writes, userspace reads

if TYPE_CHECKING:
    _CType: TypeAlias = type[ctypes._SimpleCData[int]] | type[ctypes.Structure] | type[ctypes.Union]


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit in {_IOC_SIZEBITS} bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(type_: int, nr: int) -> int:
    return _IOC(IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, argtype: _CType) -> int:
    return _IOC(IOC_READ, type_, nr, ctypes.sizeof(argtype))


def _IOW(type_: int, nr: int, argtype: _CType) -> int:
    return _IOC(IOC_WRITE, type_, nr, ctypes.sizeof(argtype))


def _IOWR(type_: int, nr: int, argtype: _CType) -> int:
    return _IOC(IOC_READ | IOC_WRITE, type_, nr, ctypes.sizeof(argtype))
