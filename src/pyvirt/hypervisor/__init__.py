"""CPU backends behind one machine model, and the choice between them.

``select_backend("auto")`` picks KVM only where ``/dev/kvm`` is backed by real
hardware virtualization (VT-x/AMD-V: the ``kvm_intel``/``kvm_amd`` module, or
``vmx``/``svm`` in the CPU flags without PVM). A PVM-backed ``/dev/kvm``
(``/sys/module/kvm_pvm``) interprets guest ring-0 code instruction by
instruction, far too slow for a stock kernel, so ``auto`` takes the software
CPU there. ``kvm`` and ``emu`` force a backend.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pyvirt.hypervisor.base import (
    ExitKind,
    Hypervisor,
    HypervisorError,
    Vcpu,
    VcpuExit,
    Vm,
)

__all__ = [
    "BackendChoice",
    "ExitKind",
    "HostVirt",
    "Hypervisor",
    "HypervisorError",
    "Vcpu",
    "VcpuExit",
    "Vm",
    "probe_host",
    "select_backend",
]

KVM_DEVICE = "/dev/kvm"


@dataclass(frozen=True)
class HostVirt:
    """What the host offers, as far as choosing a backend goes."""

    kvm_device: bool  # /dev/kvm exists
    kvm_accessible: bool  # and we may open it read-write
    vendor_module: str | None  # kvm_intel, kvm_amd, kvm_pvm or None
    cpu_flag: str | None  # vmx or svm when the CPU advertises it

    @property
    def hardware_kvm(self) -> bool:
        if not self.kvm_accessible:
            return False
        if self.vendor_module in ("kvm_intel", "kvm_amd"):
            return True
        return self.vendor_module is None and self.cpu_flag is not None


def probe_host(sys_module: Path = Path("/sys/module"),
               cpuinfo: Path = Path("/proc/cpuinfo"), kvm_device: str = KVM_DEVICE) -> HostVirt:
    vendor = None
    for name in ("kvm_intel", "kvm_amd", "kvm_pvm"):
        if (sys_module / name).exists():
            vendor = name
            break
    flag = None
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    flag = "vmx" if "vmx" in flags else "svm" if "svm" in flags else None
                    break
    except OSError:
        pass
    exists = os.path.exists(kvm_device)
    return HostVirt(exists, exists and os.access(kvm_device, os.R_OK | os.W_OK), vendor, flag)


@dataclass(frozen=True)
class BackendChoice:
    name: str  # "kvm" or "emu"
    reason: str


def choose(accel: str, host: HostVirt) -> BackendChoice:
    """Pure decision logic (unit-tested): which backend ``accel`` means on ``host``."""
    if accel == "kvm":
        if not host.kvm_device:
            raise HypervisorError(
                f"accel: kvm: {KVM_DEVICE} does not exist (load kvm_intel or kvm_amd, "
                "or use accel emu)")
        if not host.kvm_accessible:
            raise HypervisorError(
                f"accel: kvm: permission denied on {KVM_DEVICE} (add the user to the kvm group)")
        if host.vendor_module == "kvm_pvm":
            return BackendChoice("kvm", f"forced by accel kvm ({KVM_DEVICE} is PVM: guest "
                                        "kernel code is interpreted, expect it to be slow)")
        return BackendChoice("kvm", "forced by accel kvm")
    if accel == "emu":
        return BackendChoice("emu", "forced by accel emu")
    if accel != "auto":
        raise HypervisorError(f"accel: expected auto, kvm or emu (not {accel!r})")
    if host.hardware_kvm:
        what = host.vendor_module or host.cpu_flag
        return BackendChoice("kvm", f"{KVM_DEVICE} is backed by hardware virtualization ({what})")
    if not host.kvm_device:
        why = f"{KVM_DEVICE} does not exist"
    elif not host.kvm_accessible:
        why = f"no permission on {KVM_DEVICE}"
    elif host.vendor_module == "kvm_pvm":
        why = f"{KVM_DEVICE} is PVM (kvm_pvm), not hardware virtualization"
    else:
        why = "the CPU has no vmx/svm"
    return BackendChoice("emu", f"{why}: using the software CPU")


def select_backend(accel: str) -> tuple[Hypervisor, BackendChoice]:
    """Instantiate the chosen backend. Imports only the one that is used."""
    choice = choose(accel, probe_host())
    if choice.name == "kvm":
        from pyvirt.hypervisor.kvm import KvmHypervisor

        return KvmHypervisor(), choice
    from pyvirt.hypervisor.emulated.backend import EmulatedHypervisor

    return EmulatedHypervisor(), choice
