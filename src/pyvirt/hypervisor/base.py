"""The seam between the VMM and a CPU backend.

The VMM hands a backend the guest memory and the two buses; the backend owns
the CPU loop and dispatches port I/O and MMIO to the buses itself (KVM: on
``KVM_EXIT_IO``/``KVM_EXIT_MMIO``; the software CPU: from its I/O hooks), so
the hot path never leaves the backend. ``Vcpu.run()`` returns only for what
the VMM must act on, as a ``VcpuExit``. Devices never know which backend runs
them: they see bus offsets and ``IrqLine``s.

Backends: ``pyvirt.hypervisor.kvm`` (in-kernel LAPIC/IOAPIC/PIC/PIT) and
``pyvirt.hypervisor.emulated`` (software CPU; interrupt controllers in Python).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol

from pyvirt.arch.x86_64.cpu_state import CpuState
from pyvirt.devices.bus import Bus
from pyvirt.devices.irq import IrqLine, MsiRoute
from pyvirt.errors import PyvirtError
from pyvirt.memory import GuestMemory

__all__ = ["ExitKind", "Hypervisor", "HypervisorError", "Vcpu", "VcpuExit", "Vm"]


class HypervisorError(PyvirtError):
    """No usable CPU backend, or the backend failed to set up the VM."""


class ExitKind(enum.Enum):
    KICKED = "kicked"  # kick() was called: the VMM wants the thread back (pause/stop)
    SHUTDOWN = "shutdown"  # triple fault / shutdown state
    RESET = "reset"  # the guest asked for a reset (kernel-reported system event)
    POWEROFF = "poweroff"  # the guest powered off (kernel-reported system event)
    INTERNAL_ERROR = "internal-error"  # the backend cannot go on with this vCPU
    HALTED = "halted"  # the vCPU halted with interrupts off and nothing can wake it


@dataclass(frozen=True)
class VcpuExit:
    kind: ExitKind
    detail: str = ""
    registers: dict[str, int] = field(default_factory=dict)


class Vcpu(Protocol):
    index: int

    def set_boot_state(self, state: CpuState) -> None:
        """Registers for the boot processor. Application processors wait for INIT/SIPI."""
        ...

    def run(self) -> VcpuExit:
        """Run guest code on the calling thread until the VMM must act. Releases the GIL."""
        ...

    def kick(self) -> None:
        """Thread-safe and async-signal-safe: make a running ``run()`` return KICKED soon."""
        ...

    def registers(self) -> dict[str, int]:
        """General, control and segment registers by name, for crash reports."""
        ...

    def save_state(self) -> Any:
        """The vCPU's saved state (a ``pyvirt.state`` record); only while parked."""
        ...

    def restore_state(self, state: Any) -> None:
        """Load ``save_state``'s record (parked; the vCPU may have run before)."""
        ...

    def metrics(self) -> dict[str, int]:
        """Monotonic counters: exits by kind (``exits_io``, ``exits_mmio``, ...)."""
        ...


class Vm(Protocol):
    def irq_line(self, gsi: int) -> IrqLine:
        """The guest interrupt pin ``gsi`` (ISA IRQs 0-15 = GSIs 0-15 on the IOAPIC)."""
        ...

    def msi_route(self) -> MsiRoute:
        """A new message-signalled interrupt source (one MSI-X vector)."""
        ...

    def add_ioeventfd(self, addr: int, length: int, fd: int) -> bool:
        """Have guest writes of ``length`` bytes to MMIO ``addr`` signal eventfd ``fd``
        without leaving the hypervisor. False when the backend cannot: the write
        then reaches the device on the MMIO bus as usual."""
        ...

    def remove_ioeventfd(self, addr: int, length: int, fd: int) -> None: ...

    def note_dma_write(self, gpa: int, size: int) -> None:
        """A device wrote guest RAM from the host (any thread). The software CPU
        drops translated code there; hardware needs nothing."""
        ...

    def save_state(self) -> Any:
        """VM-level state (interrupt controllers, PIT, clock); vCPUs parked."""
        ...

    def restore_state(self, state: Any) -> None: ...

    def create_vcpu(self, index: int) -> Vcpu: ...

    def close(self) -> None: ...


class Hypervisor(Protocol):
    name: str

    def create_vm(self, memory: GuestMemory, pio: Bus, mmio: Bus, *, num_cpus: int) -> Vm: ...

    def max_vcpus(self) -> int: ...
