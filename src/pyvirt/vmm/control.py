"""The running VM as a controllable object: its states, its actions, and the
``VmControl`` protocol the API server (``pyvirt.api``) drives.

States and the actions legal in each (anything else is refused with
``ActionRefused``, which changes nothing; the API answers it with 409)::

    created --start--> running <--pause/resume--> paused
    running, paused --force-stop--> stopped      (also: the guest powers off)
    running --(a vCPU fails or the guest triple-faults)--> crashed

    action         legal in            effect
    start          created             vCPUs run
    pause          running             every vCPU parked, device I/O paused
    resume         paused              device I/O resumed, vCPUs run again
    power-button   running             ACPI power button press (SCI)
    ctrl-alt-del   running             Ctrl+Alt+Del on the i8042 keyboard
    reset          running, paused     the machine is reset in place (state kept)
    force-stop     any but stopped     the VM stops now, as pulling the plug
    snapshot       paused              configuration, device/vCPU state, RAM to a directory
    disk-overlay   paused              a new qcow2 overlay over a disk's top image; the disk
                                       goes on writing there (the old top becomes read-only)
    nic-link       created, running,   a NIC's link up or down (the guest sees the carrier
                   paused              change; a cable pulled and plugged back)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from pyvirt.errors import PyvirtError

__all__ = ["ACTIONS", "ActionRefused", "MetricFamily", "VmControl", "VmState", "legal_states"]


class VmState(enum.StrEnum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    CRASHED = "crashed"


class ActionRefused(PyvirtError):
    """An action that is not legal in the VM's current state (HTTP 409)."""

    exit_status = 2


_R, _P, _C = VmState.RUNNING, VmState.PAUSED, VmState.CREATED
#: action -> the states it is legal in
ACTIONS: dict[str, frozenset[VmState]] = {
    "start": frozenset({_C}),
    "pause": frozenset({_R}),
    "resume": frozenset({_P}),
    "power-button": frozenset({_R}),
    "ctrl-alt-del": frozenset({_R}),
    "reset": frozenset({_R, _P}),
    "force-stop": frozenset({_C, _R, _P, VmState.CRASHED}),
    "snapshot": frozenset({_P}),
    "disk-overlay": frozenset({_P}),
    "nic-link": frozenset({_C, _R, _P}),
}


def legal_states(action: str) -> frozenset[VmState]:
    return ACTIONS[action]


def refuse_unless(action: str, state: VmState) -> None:
    """Raise ``ActionRefused`` saying why ``action`` is not legal in ``state``."""
    allowed = ACTIONS[action]
    if state in allowed:
        return
    if action in ("snapshot", "disk-overlay") and state is VmState.RUNNING:
        raise ActionRefused(f"{action}: the VM is running; pause it first")
    if action == "resume" and state is VmState.RUNNING:
        raise ActionRefused("resume: the VM is not paused")
    if action == "pause" and state is VmState.PAUSED:
        raise ActionRefused("pause: the VM is already paused")
    if state is VmState.PAUSED:
        raise ActionRefused(f"{action}: the VM is paused; resume it first")
    names = " or ".join(sorted(s.value for s in allowed))
    raise ActionRefused(f"{action}: the VM is {state.value} (only possible when {names})")


@dataclass(frozen=True)
class MetricFamily:
    """One Prometheus metric family: ``samples`` are (labels, value)."""

    name: str
    type: str  # "counter" | "gauge"
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)


class VmControl(Protocol):
    """What the API server can do to a VM. Called on the event loop's thread."""

    def info(self) -> dict[str, object]: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def power_button(self) -> None: ...

    def reset(self) -> None: ...

    def ctrl_alt_del(self) -> None: ...

    def force_stop(self) -> None: ...

    def snapshot(self, path: str) -> dict[str, object]: ...

    def set_nic_link(self, nic: int, up: bool) -> None: ...

    def disk_overlay(self, disk: int, path: str) -> dict[str, object]: ...

    def metrics(self) -> list[MetricFamily]: ...
