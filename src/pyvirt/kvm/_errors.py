"""``KvmError`` and the one place where a failed KVM call becomes one."""

from __future__ import annotations

import enum
import errno as errno_mod
import os

from pyvirt.errors import PyvirtError

__all__ = ["KvmError", "KvmErrorKind", "ioctl_error", "open_error"]


class KvmErrorKind(enum.Enum):
    NO_DEVICE = "no-device"  # /dev/kvm does not exist
    PERMISSION = "permission"  # /dev/kvm exists but we may not open it
    API_VERSION = "api-version"  # KVM_GET_API_VERSION is not 12
    MISSING_CAPABILITY = "missing-capability"  # KVM_CHECK_EXTENSION said 0
    IOCTL = "ioctl"  # any other ioctl (or the kvm_run mmap) failed: see ``ioctl``/``errno``


class KvmError(PyvirtError):
    """A KVM call failed. ``kind`` is for matching; ``str()`` is for people."""

    def __init__(
        self,
        kind: KvmErrorKind,
        message: str,
        *,
        ioctl: str | None = None,
        errno: int | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        #: kernel name of the failed ioctl (e.g. "KVM_CREATE_IRQCHIP"), if one failed
        self.ioctl = ioctl
        #: the errno it failed with, if any
        self.errno = errno


# Why a given errno usually happens, for the message: KVM's own errnos are terse.
_HINTS: dict[tuple[str | None, int], str] = {
    ("KVM_CREATE_IRQCHIP", errno_mod.EEXIST): "the VM already has an interrupt controller",
    ("KVM_CREATE_PIT2", errno_mod.EEXIST): "the VM already has a PIT",
    ("KVM_CREATE_PIT2", errno_mod.ENOENT): "create the in-kernel irqchip first",
    ("KVM_CREATE_VCPU", errno_mod.EEXIST): "a vCPU with this index already exists",
    ("KVM_CREATE_VCPU", errno_mod.EINVAL): "the vCPU index is beyond KVM_CAP_MAX_VCPU_ID",
    ("KVM_SET_USER_MEMORY_REGION", errno_mod.EEXIST): "the range overlaps another memory slot",
    ("KVM_SET_USER_MEMORY_REGION", errno_mod.EINVAL): (
        "addresses and size must be page aligned and the slot number valid"
    ),
    ("KVM_GET_SUPPORTED_CPUID", errno_mod.E2BIG): "max_entries is too small",
    ("KVM_IRQ_LINE", errno_mod.ENXIO): "create the in-kernel irqchip first",
    ("KVM_IRQFD", errno_mod.EBUSY): "the eventfd is already bound to a GSI",
    ("KVM_IOEVENTFD", errno_mod.EEXIST): "the address is already bound to an eventfd",
    (None, errno_mod.ENOMEM): "the host is out of memory",
}


def ioctl_error(name: str, err: OSError | int) -> KvmError:
    """The ``KvmError`` for ioctl (or mmap) ``name`` failing with ``err``."""
    code = err if isinstance(err, int) else (err.errno or 0)
    ename = errno_mod.errorcode.get(code, str(code))
    message = f"{name} failed: {os.strerror(code)} ({ename})"
    hint = _HINTS.get((name, code)) or _HINTS.get((None, code))
    if hint:
        message += f": {hint}"
    return KvmError(KvmErrorKind.IOCTL, message, ioctl=name, errno=code)


def open_error(path: str, err: OSError) -> KvmError:
    """The ``KvmError`` for failing to open the KVM device node."""
    if isinstance(err, FileNotFoundError):
        return KvmError(
            KvmErrorKind.NO_DEVICE,
            f"{path} does not exist: KVM is not available "
            "(load kvm_intel/kvm_amd, or use accel emu)",
            errno=err.errno,
        )
    if isinstance(err, PermissionError):
        return KvmError(
            KvmErrorKind.PERMISSION,
            f"permission denied on {path}: add the user to the kvm group",
            errno=err.errno,
        )
    return KvmError(
        KvmErrorKind.NO_DEVICE,
        f"cannot open {path}: {os.strerror(err.errno or 0)}",
        errno=err.errno,
    )
