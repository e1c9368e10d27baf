"""pyvirt.kvm: a typed ctypes mirror of <linux/kvm.h> and thin fd wrappers.

- ``pyvirt.kvm._abi``: raw structures, constants and ioctl numbers (kernel names)
- ``pyvirt.kvm.fd``: ``Kvm`` (/dev/kvm), ``VmFd``, ``VcpuFd`` — one method per ioctl
- ``pyvirt.kvm.exits``: the kvm_run fast path (offsets, ``struct.Struct``s) and
  ``decode_exit`` into dataclasses
- ``KvmError``: every failure, with a matchable ``kind``
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pyvirt.kvm import _abi as abi
from pyvirt.kvm._errors import KvmError, KvmErrorKind
from pyvirt.kvm.fd import (
    KVM_DEVICE,
    Kvm,
    VcpuFd,
    VmFd,
    irq_routing_irqchip,
    irq_routing_msi,
)

__all__ = [
    "KVM_DEVICE",
    "Kvm",
    "KvmError",
    "KvmErrorKind",
    "KvmExit",
    "VcpuFd",
    "VmFd",
    "abi",
    "decode_exit",
    "irq_routing_irqchip",
    "irq_routing_msi",
]

if TYPE_CHECKING:
    from pyvirt.kvm.exits import KvmExit, decode_exit


def __getattr__(name: str) -> Any:
    # the typed exit dataclasses are for tests and slow paths: keep them off start-up
    if name in ("KvmExit", "decode_exit"):
        from pyvirt.kvm import exits

        return getattr(exits, name)
    raise AttributeError(f"module 'pyvirt.kvm' has no attribute {name!r}")
