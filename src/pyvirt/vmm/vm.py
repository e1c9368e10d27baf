"""``VirtualMachine``: the running VM as a controllable object (``VmControl``).

It owns the state machine (``pyvirt.vmm.control``) over one ``Machine`` and
carries out the actions: pause/resume (vCPUs parked, device I/O paused),
reset in place, the ACPI power button, Ctrl+Alt+Del, force-stop, snapshots,
and the guest's own requests (a reboot resets in place; a power-off or a
crash ends the VM). Everything here runs on the event loop's (main) thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

from pyvirt.errors import UserInputError
from pyvirt.vmm.control import ActionRefused, MetricFamily, VmState, refuse_unless
from pyvirt.vmm.machine import Machine, Outcome, RunResult

__all__ = ["VirtualMachine"]

log = logging.getLogger(__name__)


class VirtualMachine:
    def __init__(self, machine: Machine, *, backend: str, backend_detail: str = "",
                 snapshot_root: Path | None = None,
                 on_message: Any = None) -> None:
        self.machine = machine
        self.backend = backend
        self.backend_detail = backend_detail
        self.state = VmState.CREATED
        self.boot_count = 1
        self.snapshot_root = snapshot_root
        self._started_at = time.monotonic()
        self._running_since: float | None = None
        self._run_time = 0.0
        # the last few only: an API client pausing in a loop must not grow them
        self.pause_latencies: deque[float] = deque(maxlen=64)
        self.resume_latencies: deque[float] = deque(maxlen=64)
        self._message = on_message or (lambda text: None)
        machine.on_request = self._on_request

    # ---- the state machine

    def _require(self, action: str) -> None:
        refuse_unless(action, self.state)

    def start(self) -> None:
        self._require("start")
        self.machine.resume()
        self._set_running()

    def start_paused(self) -> None:
        """A restored VM that waits for ``resume`` (``--restore`` without ``--resume``)."""
        self._require("start")
        self.state = VmState.PAUSED

    def _set_running(self) -> None:
        self.state = VmState.RUNNING
        self._running_since = time.monotonic()

    def _leave_running(self, to: VmState) -> None:
        if self._running_since is not None:
            self._run_time += time.monotonic() - self._running_since
            self._running_since = None
        self.state = to

    def pause(self) -> None:
        self._require("pause")
        took = self.machine.pause()
        self.pause_latencies.append(took)
        self._leave_running(VmState.PAUSED)

    def resume(self) -> None:
        self._require("resume")
        took = self.machine.resume()
        self.resume_latencies.append(took)
        self._set_running()

    def power_button(self) -> None:
        self._require("power-button")
        pm: Any = self.machine.devices["acpi_pm"]
        pm.press_power_button()

    def ctrl_alt_del(self) -> None:
        self._require("ctrl-alt-del")
        kbd: Any = self.machine.devices["i8042"]
        kbd.send_ctrl_alt_del()

    def reset(self) -> None:
        self._require("reset")
        was_running = self.state is VmState.RUNNING
        if was_running:
            self.machine.pause()
        self._reset_in_place()
        if was_running:
            self.machine.resume()
        else:
            self.state = VmState.PAUSED

    def force_stop(self) -> None:
        self._require("force-stop")
        self.machine.finish(RunResult(Outcome.STOPPED, "stopped (force-stop)"))
        self._leave_running(VmState.STOPPED)

    def snapshot(self, path: str) -> dict[str, object]:
        self._require("snapshot")
        from pyvirt.vmm.snapshot import SnapshotError, write_snapshot

        if "\0" in path or not path:
            raise SnapshotError("snapshot.path: not a usable path")
        target = Path(os.path.abspath(path))
        root = self.snapshot_root
        if root is not None and not target.is_relative_to(root):
            raise SnapshotError(f"snapshot.path: {target} is outside the snapshot directory "
                                f"{root}, the only place this sandboxed VMM may write "
                                "(see --snapshot-root)")
        return write_snapshot(self.machine, self.snapshot_config_doc(), self.backend,
                              self.backend_detail, target)

    def disk_overlay(self, disk: int, path: str) -> dict[str, object]:
        """A new qcow2 image at ``path`` over disk ``disk``'s top image, on which the
        disk goes on (paused only: nothing in flight). The old top is flushed,
        recorded as the backing file (absolute name and format) and kept open as
        the new image's backing chain, read-only from now on. Any failure leaves
        the old top in use and no new file behind. ``path`` must not exist and
        lies beneath the snapshot root when there is one (the sandbox)."""
        self._require("disk-overlay")
        import dataclasses

        from pyvirt.disk.backend import DiskError
        from pyvirt.disk.open import open_overlay

        m = self.machine
        disks = m.resources.disks
        if not 0 <= disk < len(disks):
            raise UserInputError(f"disk: the VM has no disk {disk} "
                                 f"({f'0 to {len(disks) - 1}' if disks else 'it has none'})")
        if "\0" in path or not os.path.isabs(path) or path == "/":
            raise UserInputError(f"path: must be the absolute path of a file to create, "
                                 f"not {path[:200]!r}")
        target = Path(os.path.abspath(path))
        root = self.snapshot_root
        if root is not None and not target.is_relative_to(root):
            raise UserInputError(f"path: {target} is outside the snapshot directory {root}, "
                                 "the only place this sandboxed VMM may write "
                                 "(see --snapshot-root)")
        if os.path.lexists(target):
            raise UserInputError(f"path: {target} exists")
        old = disks[disk]
        spec = m.config.disks[disk]
        name = f"vd{chr(ord('a') + disk)}"
        if old.readonly:
            raise UserInputError(f"disk: disk {disk} ({name}, {old.path}) is read-only: "
                                 "it needs no overlay")
        device: Any = m.devices.get(f"disk-{name}")
        if device is None or not device.quiesce(5.0):
            raise ActionRefused(f"disk-overlay: disk {disk} ({name}) still has requests "
                                "in flight")
        what = f"disks[{disk}]"
        try:
            old.flush()
        except OSError as exc:
            raise DiskError(f"{what}: flushing {old.path} failed: "
                            f"{exc.strerror or exc}") from None
        new = open_overlay(old, target, what=what)
        try:
            old_any: Any = old
            old_any.make_readonly()
        except BaseException as exc:
            new_any: Any = new
            new_any.backing = None  # the old top stays the disk's: close only the new file
            new.close()
            with contextlib.suppress(OSError):
                os.unlink(target)
            if isinstance(exc, OSError):
                raise DiskError(f"{what}: {old.path}: cannot stop writing it: "
                                f"{exc.strerror or exc}") from None
            raise
        device.disk = new
        disks[disk] = new
        new_disks = list(m.config.disks)
        new_disks[disk] = dataclasses.replace(spec, path=target, format="qcow2")
        m.config = m.resources.config = dataclasses.replace(m.config, disks=tuple(new_disks))
        log.info("%s: now on the overlay %s over %s", name, target, old.path)
        return {"disk": disk, "path": str(target), "backing": os.path.abspath(old.path)}

    def set_nic_link(self, nic: int, up: bool) -> None:
        """Pull a NIC's cable out (``up`` False) or plug it back: the guest's driver sees
        the carrier change (virtio-net STATUS, a config interrupt)."""
        self._require("nic-link")
        device: Any = self.machine.devices.get(f"nic-{nic}")
        if device is None:
            count = len(self.machine.config.nics)
            raise UserInputError(f"nic: the VM has no NIC {nic} "
                                 f"({f'0 to {count - 1}' if count else 'it has none'})")
        device.set_link(up)

    def nics(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for i, nic in enumerate(self.machine.config.nics):
            device: Any = self.machine.devices.get(f"nic-{i}")
            out.append({"index": i, "kind": nic.kind, "mac": nic.mac,
                        "link_up": bool(device is not None and device.link_up)})
        return out

    def snapshot_config_doc(self) -> dict[str, Any]:
        """The configuration a snapshot keeps: paths made absolute (it may be restored
        from another directory) and the backend it ran on (auto could pick another)."""
        doc = self.config_doc()
        doc["accel"] = self.backend
        for key in ("kernel", "initrd"):
            if doc.get(key):
                doc[key] = os.path.abspath(doc[key])
        console = doc.get("console") or {}
        if console.get("path"):
            console["path"] = os.path.abspath(console["path"])
        for disk in doc.get("disks") or []:
            disk["path"] = os.path.abspath(disk["path"])
        return doc

    # ---- the guest's own requests (the loop thread)

    def _on_request(self, result: RunResult) -> bool:
        """True when the VM goes on (a reboot reset in place)."""
        if result.outcome is Outcome.RESET and self.machine.config.on_reboot == "restart":
            self.machine.pause()
            self._reset_in_place()
            if self.machine.config.verbose:
                self._message(f"guest reset: restarting (boot {self.boot_count})")
            if self.state is VmState.RUNNING:
                self.machine.resume()
            return True
        if result.outcome is Outcome.CRASH:
            self._leave_running(VmState.CRASHED)
        else:
            self._leave_running(VmState.STOPPED)
        return False

    def _reset_in_place(self) -> None:
        self.machine.reset_in_place()
        self.boot_count += 1

    # ---- reading

    def config_doc(self) -> dict[str, Any]:
        cfg: Any = self.machine.config
        doc: dict[str, Any] = cfg.to_dict()
        return doc

    def uptime(self) -> float:
        return time.monotonic() - self._started_at

    def info(self) -> dict[str, object]:
        from pyvirt.vmm.snapshot import pyvirt_version

        run_time = self._run_time
        if self._running_since is not None:
            run_time += time.monotonic() - self._running_since
        return {
            "state": self.state.value,
            "uptime_s": round(self.uptime(), 3),
            "run_time_s": round(run_time, 3),
            "backend": self.backend,
            "pyvirt_version": pyvirt_version(),
            "boot_count": self.boot_count,
            "config": self.config_doc(),
            "nics": self.nics(),
        }

    def metrics(self) -> list[MetricFamily]:
        fams: list[MetricFamily] = []
        fams.append(MetricFamily("pyvirt_vm_state", "gauge",
                                 "1 for the state the VM is in, 0 for the others",
                                 [({"state": s.value}, 1.0 if s is self.state else 0.0)
                                  for s in VmState]))
        fams.append(MetricFamily("pyvirt_vm_uptime_seconds", "gauge",
                                 "seconds since the VMM started the VM",
                                 [({}, round(self.uptime(), 3))]))
        fams.append(MetricFamily("pyvirt_vm_boots_total", "counter",
                                 "boots of the guest (1 + resets in place)",
                                 [({}, float(self.boot_count))]))
        fams.append(MetricFamily("pyvirt_vmm_rss_bytes", "gauge",
                                 "resident memory of the VMM process (guest RAM included)",
                                 [({}, float(_rss_bytes()))]))
        if self.pause_latencies:
            fams.append(MetricFamily("pyvirt_vm_last_pause_seconds", "gauge",
                                     "how long the last pause took to park every vCPU",
                                     [({}, self.pause_latencies[-1])]))
        exits: list[tuple[dict[str, str], float]] = []
        devs: dict[str, list[tuple[dict[str, str], float]]] = {}
        for part, counters in self.machine.metrics().items():
            for key, value in sorted(counters.items()):
                if part.startswith("vcpu") and part[4:].isdigit():
                    kind = key.removeprefix("exits_")
                    exits.append(({"vcpu": part[4:], "kind": kind}, float(value)))
                else:
                    devs.setdefault(key, []).append(({"device": part}, float(value)))
        if exits:
            fams.append(MetricFamily("pyvirt_vcpu_exits_total", "counter",
                                     "vCPU exits (or software CPU callbacks) by kind", exits))
        for key, samples in sorted(devs.items()):
            fams.append(MetricFamily(f"pyvirt_device_{key}_total", "counter",
                                     f"device counter {key}", samples))
        return fams


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


__all__ += ["ActionRefused"]
