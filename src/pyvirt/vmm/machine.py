"""The machine: config -> builder -> a VM whose vCPUs park, reset and restore.

``build_machine`` assembles a VM from small ``attach_*`` steps (memory,
legacy devices, PCI and virtio, vCPUs, then the kernel and the boot CPU) and
captures every part's power-on state. ``Machine`` then lives as long as the
VM: ``start`` (vCPU threads, parked), ``resume``/``pause``, ``save_state``/
``restore_state``, ``reset_in_place``; ``pyvirt.vmm.vm.VirtualMachine`` is the
state machine on top.

Threads and locks (see docs/design.md):
- main thread: the control event loop (console input, the wake-up eventfd,
  the API); owns the lifecycle. Never touches device state except through
  device methods, which lock.
- the device I/O thread (``io_loop``): the virtio queues' work.
- one thread per vCPU: ``Vcpu.run()`` (releases the GIL inside KVM_RUN / the
  engine), dispatching I/O to devices on the buses; parked on ``_gate``.
- ``Machine._lock`` guards ``_outcome`` only; device locks are never held
  while taking it (devices call ``request_*`` after releasing their own lock).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import queue
import select
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyvirt.arch.x86_64 import layout
from pyvirt.devices.bus import Bus
from pyvirt.eventloop import EventLoop, Token
from pyvirt.hypervisor import ExitKind, Hypervisor, Vcpu, VcpuExit, Vm
from pyvirt.memory import GuestMemory
from pyvirt.vmm.config import VmConfig
from pyvirt.vmm.console import Console, SocketConsole

if TYPE_CHECKING:
    from pyvirt.pci.root import PciRoot
    from pyvirt.virtio.pci import VirtioPciDevice
    from pyvirt.vmm.resources import VmResources

__all__ = ["Machine", "MachineState", "Outcome", "PauseTimeout", "RunResult", "build_machine"]

log = logging.getLogger(__name__)

_SEPARATE_IO_LOOP = os.environ.get("PYVIRT_IO_LOOP", "separate") == "separate"

#: What every guest gets on its command line before the user's --cmdline.
BASE_CMDLINE = "console=ttyS0 reboot=k panic=-1"


class Outcome(enum.Enum):
    POWEROFF = "poweroff"
    RESET = "reset"
    CRASH = "crash"  # triple fault / internal error
    STOPPED = "stopped"  # signal or console quit


@dataclass(frozen=True)
class RunResult:
    outcome: Outcome
    detail: str = ""
    registers: dict[str, int] | None = None


def _kick_signal_handler(signum: int, frame: object) -> None:
    """SIGUSR1 only exists to make KVM_RUN return EINTR on a vCPU thread."""


class Machine:
    """The VM's machine for its whole life: memory, vCPUs and devices are built
    once; a guest reboot resets them in place (``reset_in_place``) instead of
    building a new one. The files it uses (disks, kernel, console) belong to
    ``resources``, which outlives it: closing a machine never closes them.

    vCPU threads are started once (``start``) and park while the VM is paused
    (``pause``), while it resets, and after an exit that stops the VM; they end
    only when the machine stops (``finish``). The event loop (``loop``, run by
    the caller on the main thread) carries the wake-up eventfd, console input,
    and the devices' own fds.
    """

    def __init__(self, config: VmConfig, hv: Hypervisor, resources: VmResources,
                 loop: EventLoop | None = None) -> None:
        self.config = config
        self.hv = hv
        self.resources = resources
        self.console: Console = resources.console
        self.loop = loop if loop is not None else EventLoop("machine")
        self._own_loop = loop is None
        #: the devices' queue work: one loop on one thread for every device
        #: (``io_thread``), apart from the main loop so the VMM's control work
        #: and the guest's I/O never wait for each other
        self.io_loop = EventLoop("devices") if _SEPARATE_IO_LOOP else self.loop
        self._io_thread: threading.Thread | None = None
        self._io_stop = False
        self.memory: GuestMemory | None = None
        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        self.vm: Vm | None = None
        self.vcpus: list[Vcpu] = []
        self.devices: dict[str, object] = {}
        self._events: queue.SimpleQueue[RunResult] = queue.SimpleQueue()
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._lock = threading.Lock()
        self._outcome: RunResult | None = None
        self._threads: list[threading.Thread] = []
        self._pending_input = b""
        self._input_retrying = False
        self.boot_params = 0
        self.pci: PciRoot | None = None
        self.pci_devices: list[VirtioPciDevice] = []
        #: called on the loop thread for every request (a guest reset, power-off,
        #: crash, signal); returns True when it handled it and the VM goes on
        self.on_request: Callable[[RunResult], bool] | None = None
        # parking: vCPU threads wait on _gate while _park is set
        self._gate = threading.Condition(threading.Lock())
        self._park = True  # vCPUs start parked: start() releases them
        self._quit = False
        self._parked: set[int] = set()
        self._input_token: Token | None = None
        self._wake_token: Token | None = None
        self._io_paused = False
        self.last_pause_s = 0.0
        self.initial_state: MachineState | None = None  # set by build_machine

    # ---- requests from devices, vCPU threads and signal handlers (any thread)

    def request(self, result: RunResult) -> None:
        """Ask the loop to act on ``result`` (stop, reset, crash)."""
        self._events.put(result)
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake_fd, 1)

    def request_poweroff(self) -> None:
        self.request(RunResult(Outcome.POWEROFF, "the guest powered off"))

    def request_reset(self) -> None:
        self.request(RunResult(Outcome.RESET, "the guest reset"))

    def on_acpi_sleep(self, slp_typ: int) -> None:
        if slp_typ == layout.ACPI_S5_SLP_TYP:
            self.request_poweroff()
        else:
            log.info("guest asked for ACPI sleep type %d, which is not supported", slp_typ)

    @property
    def finished(self) -> bool:
        return self._outcome is not None

    @property
    def outcome(self) -> RunResult | None:
        return self._outcome

    def finish(self, result: RunResult) -> None:
        """The VM stops with ``result`` (the first one wins)."""
        with self._lock:
            if self._outcome is None:
                self._outcome = result

    # ---- vCPU threads

    def _vcpu_thread(self, vcpu: Vcpu) -> None:
        i = vcpu.index
        gate = self._gate
        try:
            while True:
                if self._park or self._quit:
                    with gate:
                        self._parked.add(i)
                        gate.notify_all()
                        while self._park and not self._quit:
                            gate.wait()
                        self._parked.discard(i)
                        if self._quit:
                            return
                ex: VcpuExit = vcpu.run()
                if ex.kind is ExitKind.KICKED:
                    continue
                # the VM must act: every vCPU parks until it has
                with gate:
                    self._park = True
                self._handle_exit(vcpu, ex)
        except Exception as exc:  # a VMM bug must stop this VM cleanly, not hang it
            log.exception("vCPU %d failed", i)
            with gate:
                self._park = True
            self.request(RunResult(Outcome.CRASH, f"vCPU {i}: internal error: {exc}"))
            with gate:
                self._parked.add(i)
                gate.notify_all()
                while not self._quit:
                    gate.wait()

    def _handle_exit(self, vcpu: Vcpu, ex: VcpuExit) -> None:
        if ex.kind is ExitKind.POWEROFF:
            self.request_poweroff()
        elif ex.kind is ExitKind.RESET:
            self.request_reset()
        elif ex.kind is ExitKind.SHUTDOWN:
            self.request(RunResult(Outcome.CRASH,
                                   f"vCPU {vcpu.index}: {ex.detail or 'triple fault (shutdown)'}",
                                   ex.registers or vcpu.registers()))
        else:
            self.request(RunResult(Outcome.CRASH, f"vCPU {vcpu.index}: {ex.kind.value}: "
                                   f"{ex.detail}", ex.registers or vcpu.registers()))

    def start(self) -> None:
        """Register the loop's fds and start the vCPU threads (parked: ``resume``
        lets them run). Must be called on the loop's (main) thread."""
        self._wake_token = self.loop.add(self._wake_fd, self._on_wake, name="machine-wake")
        in_fd = self.console.input_fd
        if isinstance(self.console, SocketConsole):  # it reads its clients itself
            self.console.attach(self.loop, self.console_input)
        if in_fd is not None:
            try:
                self._input_token = self.loop.add(in_fd, self._on_input_ready,
                                                  name="console-input")
            except (ValueError, PermissionError):
                self._feed_all_input()  # e.g. /dev/null or a regular file: nothing to wait for
        if self.io_loop is not self.loop:
            self._io_thread = threading.Thread(target=self._io_main, name="devices",
                                               daemon=True)
            self._io_thread.start()
        for vcpu in self.vcpus:
            t = threading.Thread(target=self._vcpu_thread, args=(vcpu,),
                                 name=f"vcpu{vcpu.index}", daemon=True)
            self._threads.append(t)
            t.start()

    def _io_main(self) -> None:
        self.io_loop.run_until(lambda: self._io_stop)

    def _stop_io_thread(self) -> None:
        t = self._io_thread
        if t is not None:
            self._io_stop = True
            self.io_loop.wake()
            t.join(5.0)
            self._io_thread = None

    def pause(self, timeout: float = 10.0) -> float:
        """Park every vCPU, then pause device I/O. Returns the seconds it took
        (the pause latency). Any thread but a vCPU's."""
        t0 = time.perf_counter()
        with self._gate:
            self._park = True
        deadline = t0 + timeout
        kicked_at = 0.0
        with self._gate:
            while len(self._parked) < len(self._threads):
                now = time.perf_counter()
                if now > deadline:
                    missing = sorted({v.index for v in self.vcpus} - self._parked)
                    raise PauseTimeout(f"vCPU(s) {missing} did not stop within {timeout} s")
                if now - kicked_at > 0.002:  # a kick can land just before run(): repeat
                    for v in self.vcpus:
                        if v.index not in self._parked:
                            v.kick()
                    kicked_at = now
                self._gate.wait(0.001)
        self._pause_io()
        self.last_pause_s = time.perf_counter() - t0
        return self.last_pause_s

    def resume(self) -> float:
        """Resume device I/O, then let the vCPUs run. Returns the seconds until
        every vCPU thread left its park."""
        t0 = time.perf_counter()
        self._resume_io()
        with self._gate:
            self._park = False
            self._gate.notify_all()
        self._push_input()
        # wait (briefly) until they left the park: that is "running again"
        deadline = t0 + 1.0
        while self._parked and time.perf_counter() < deadline:
            time.sleep(0.0002)
        return time.perf_counter() - t0

    @property
    def running(self) -> bool:
        return not self._park

    def _pause_io(self) -> None:
        if self._io_paused:
            return
        self._io_paused = True
        for dev in self.pci_devices:
            dev.pause_io()

    def _resume_io(self) -> None:
        if not self._io_paused:
            return
        self._io_paused = False
        for dev in self.pci_devices:
            dev.resume_io()

    # ---- the loop's handlers (main thread)

    def _on_wake(self, events: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake_fd)
        while True:
            try:
                result = self._events.get_nowait()
            except queue.Empty:
                return
            if self._outcome is not None:
                continue
            handler = self.on_request
            if handler is not None and handler(result):
                continue
            self.finish(result)

    def _on_input_ready(self, events: int) -> None:
        data = self.console.read_input()
        if self.console.quit_requested:
            self.request(RunResult(Outcome.STOPPED, "quit from the console"))
            self._drop_input()
            return
        if data is None:
            self._drop_input()
            return
        self._pending_input += data
        self._push_input()
        if self._pending_input and self._input_token is not None:
            # the guest is not taking it yet: stop reading until it does
            self.loop.modify(self._input_token, 0)
            self.loop.call_later(0.01, self._retry_input, name="console-input-retry")

    def _retry_input(self) -> None:
        self._push_input()
        if self._pending_input:
            self.loop.call_later(0.01, self._retry_input, name="console-input-retry")
        elif self._input_token is not None:
            self.loop.modify(self._input_token, select.EPOLLIN)

    def _drop_input(self) -> None:
        if self._input_token is not None:
            self.loop.remove(self._input_token)
            self._input_token = None

    def _feed_all_input(self) -> None:
        while (data := self.console.read_input()) is not None and data:
            self._pending_input += data
        if self._pending_input:
            self.loop.call_later(0.01, self._retry_input, name="console-input-retry")

    def console_input(self, data: bytes) -> int:
        """Input from a console that reads its own fds (the socket console), on the
        loop thread: queued for the guest. Returns the bytes still waiting (the
        console stops reading when they pile up)."""
        self._pending_input += data
        self._push_input()
        if self._pending_input and not self._input_retrying:
            self._input_retrying = True
            self.loop.call_later(0.01, self._retry_console_input, name="console-input-retry")
        return len(self._pending_input)

    def _retry_console_input(self) -> None:
        self._input_retrying = False
        self.console_input(b"")

    def _push_input(self) -> None:
        if self._park or not self._pending_input:
            return  # paused: the guest takes nothing (its memory must not change)
        target = self.devices.get("console-input") or self.devices.get("serial")
        if target is None:
            return
        accepted: int = target.enqueue_input(self._pending_input)  # type: ignore[attr-defined]
        self._pending_input = self._pending_input[accepted:]

    # ---- state

    def save_state(self) -> MachineState:
        """Every device's, the VM's and every vCPU's state (the VM must be paused)."""
        from pyvirt.state import encode

        devices = {name: encode(dev.save_state())  # type: ignore[attr-defined]
                   for name, dev in self.stateful_devices()}
        assert self.vm is not None
        return MachineState(
            devices=devices,
            vm=encode(self.vm.save_state()),  # type: ignore[attr-defined]
            vcpus=[encode(v.save_state()) for v in self.vcpus],  # type: ignore[attr-defined]
        )

    def restore_state(self, state: MachineState) -> None:
        """Put every part back as ``state`` says (the VM must be paused): the
        VM-level parts (interrupt controllers, clocks), the devices, the vCPUs."""
        from pyvirt.state import StateError, decode

        parts = dict(self.stateful_devices())
        if set(parts) != set(state.devices):
            missing = sorted(set(parts) ^ set(state.devices))
            raise StateError(f"the saved machine does not match this one: devices {missing}")
        if len(state.vcpus) != len(self.vcpus):
            raise StateError(f"the saved machine has {len(state.vcpus)} vCPUs, this one "
                             f"{len(self.vcpus)}")
        # decode everything first: a bad record changes nothing
        records = {name: decode(state.devices[name], dev.state_type,  # type: ignore[attr-defined]
                                part=name) for name, dev in parts.items()}
        assert self.vm is not None
        vm_any: Any = self.vm
        vm_rec = decode(state.vm, vm_any.state_type, part="vm")
        vcpu_recs = [decode(data, v.state_type, part=f"vcpu{v.index}")  # type: ignore[attr-defined]
                     for v, data in zip(self.vcpus, state.vcpus, strict=True)]
        # the interrupt controllers first: a device re-drives its IRQ line to the
        # level it saved, which the restored controller then sees as no new edge
        vm_any.restore_state(vm_rec)
        for name, dev in parts.items():
            dev.restore_state(records[name])  # type: ignore[attr-defined]
        for v, rec in zip(self.vcpus, vcpu_recs, strict=True):
            v.restore_state(rec)  # type: ignore[attr-defined]

    def stateful_devices(self) -> list[tuple[str, object]]:
        """(name, part) for every device with saved state, in a fixed order."""
        out: list[tuple[str, object]] = []
        for name in ("serial", "i8042", "rtc", "acpi_pm", "reset_control"):
            dev = self.devices.get(name)
            if dev is not None and hasattr(dev, "save_state"):
                out.append((name, dev))
        if self.pci is not None and hasattr(self.pci, "save_state"):
            out.append(("pci-root", self.pci))
        out.extend((dev.name, dev) for dev in self.pci_devices)
        return out

    def reset_in_place(self) -> None:
        """A guest reboot: with every vCPU parked, put devices, interrupt controllers
        and vCPUs back to their power-on state, zero RAM (the mapping stays), load
        the kernel again and point the boot vCPU at it."""
        from pyvirt.arch.x86_64.boot import boot_cpu_state

        assert self.initial_state is not None and self.memory is not None
        self._pause_io()
        # what the old boot asked for after its first reset request is void (Linux
        # pulses the keyboard controller's reset line ten times when rebooting);
        # the host's own requests (a stop signal, Ctrl-A x) stand
        kept: list[RunResult] = []
        while True:
            try:
                result = self._events.get_nowait()
            except queue.Empty:
                break
            if result.outcome is Outcome.STOPPED:
                kept.append(result)
        for result in kept:
            self.request(result)
        self.restore_state(self.initial_state)
        self.memory.discard()
        entry = attach_kernel(self, self.memory)
        self.vcpus[0].set_boot_state(boot_cpu_state(entry, self.boot_params))

    def metrics(self) -> dict[str, dict[str, int]]:
        """Counters by part: ``vcpu0``, device names."""
        out: dict[str, dict[str, int]] = {}
        for v in self.vcpus:
            fn = getattr(v, "metrics", None)
            if fn is not None:
                out[f"vcpu{v.index}"] = fn()
        for name, dev in list(self.devices.items()) + [(d.name, d) for d in self.pci_devices]:
            fn = getattr(dev, "metrics", None)
            if fn is not None and name not in out:
                out[name] = fn()
        return out

    # ---- stopping

    def stop_vcpus(self) -> None:
        """End every vCPU thread (the machine is finished)."""
        if self._outcome is None:
            self.finish(RunResult(Outcome.STOPPED, "stopped"))
        with self._gate:
            self._quit = True
            self._gate.notify_all()
        for t, vcpu in zip(self._threads, self.vcpus, strict=False):
            for _ in range(200):
                if not t.is_alive():
                    break
                vcpu.kick()
                t.join(0.01)
        for t in self._threads:
            t.join(1.0)
            if t.is_alive():
                log.warning("%s did not stop", t.name)
        self._threads = []

    def run(self) -> RunResult:
        """Start, run the loop until the VM stops, stop: the simple foreground use
        (``run_vm`` drives the pieces itself). Must be called on the main thread."""
        old_usr1 = signal.signal(signal.SIGUSR1, _kick_signal_handler)
        try:
            self.start()
            self.resume()
            self.loop.run_until(lambda: self._outcome is not None)
        finally:
            self.stop_vcpus()
            signal.signal(signal.SIGUSR1, old_usr1)
        assert self._outcome is not None
        return self._outcome

    def close(self) -> None:
        if self._threads:
            self.stop_vcpus()
        for tok in (self._input_token, self._wake_token):
            if tok is not None:
                self.loop.remove(tok)
        self._input_token = self._wake_token = None
        for dev in self.pci_devices:
            try:
                dev.close()
            except Exception:  # closing one device must not leak the others
                log.exception("closing %s", dev.name)
        self.pci_devices.clear()
        self._stop_io_thread()
        if self.io_loop is not self.loop:
            self.io_loop.close()
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        os.close(self._wake_fd)
        if self._own_loop:
            self.loop.close()


class PauseTimeout(Exception):
    """A vCPU did not park in time (a VMM bug: the machine is stopped)."""


@dataclass
class MachineState:
    """Every part's encoded record (``pyvirt.state``), by part name."""

    devices: dict[str, bytes]
    vm: bytes
    vcpus: list[bytes]


# ---- the builder ----------------------------------------------------------


def attach_memory(m: Machine, backing_fd: int | None = None) -> GuestMemory:
    m.memory = GuestMemory.create(m.config.memory, backing_fd=backing_fd)
    return m.memory


def attach_legacy_devices(m: Machine, vm: Vm) -> None:
    from pyvirt.devices.legacy.acpi_pm import AcpiPm, ResetControl
    from pyvirt.devices.legacy.i8042 import I8042
    from pyvirt.devices.legacy.misc import PortSink, legacy_ignore_ranges
    from pyvirt.devices.legacy.rtc import CmosRtc
    from pyvirt.devices.legacy.serial import Serial16550

    serial = Serial16550(vm.irq_line(layout.COM1_IRQ), m.console.write)
    m.pio.insert(serial, layout.COM1_PORT, 8, "serial0")
    i8042 = I8042(m.request_reset, vm.irq_line(1))
    # two 1-byte ports, so 0x61 (the PIT's speaker/gate port) stays free
    m.pio.insert(i8042, 0x60, 1, "i8042-data")
    m.pio.insert(i8042.command_port(), 0x64, 1, "i8042-cmd")
    rtc = CmosRtc(irq=vm.irq_line(8))
    m.pio.insert(rtc, 0x70, 2, "rtc")
    pm = AcpiPm(vm.irq_line(layout.SCI_IRQ), m.on_acpi_sleep)
    m.pio.insert(pm, layout.ACPI_PM_BASE, layout.ACPI_PM_LEN, "acpi-pm")
    reset_control = ResetControl(m.request_reset)
    m.pio.insert(reset_control, layout.RESET_PORT, 1, "reset")
    for base, length, name in legacy_ignore_ranges():
        try:
            m.pio.insert(PortSink(), base, length, name)
        except ValueError:
            log.debug("sink %s at %#x overlaps a device; skipped", name, base)
    m.devices.update(serial=serial, i8042=i8042, rtc=rtc, acpi_pm=pm,
                     reset_control=reset_control)


def attach_pci(m: Machine, vm: Vm, mem: GuestMemory) -> None:
    """PCI bus 0 and the virtio devices: disks (vda, vdb, ...), NICs (eth0, ...), rng,
    console, vsock."""
    from pyvirt.pci.root import attach_pci_root

    root = m.pci = attach_pci_root(m.pio, m.mmio, vm.irq_line, mem.end)
    cfg = m.config
    if not (cfg.disks or cfg.nics or cfg.rng or cfg.console.kind == "virtio"
            or cfg.vsock is not None):
        return
    from pyvirt.virtio.device import VirtioDevice
    from pyvirt.virtio.pci import VirtioPciDevice

    def plug(device: VirtioDevice, name: str) -> None:
        slot = len(m.pci_devices) + 1
        pdev = VirtioPciDevice(device, vm=vm, memory=mem, intx=root.intx_line(slot), name=name,
                               loop=m.io_loop)
        m.pci_devices.append(pdev)
        root.add(slot, pdev)

    if cfg.disks:
        from pyvirt.virtio.blk import BlockDevice

        # the images were opened and locked once for the VM's life (VmResources)
        for i, (spec, disk) in enumerate(zip(cfg.disks, m.resources.disks, strict=True)):
            name = f"vd{chr(ord('a') + i)}"
            blk = BlockDevice(disk, serial=spec.serial, discard=spec.discard,
                              name=f"virtio-blk-{name}")
            plug(blk, f"virtio-blk-{name}")
            m.devices[f"disk-{name}"] = blk
    if cfg.nics:
        from pyvirt.net.mac import parse_mac
        from pyvirt.virtio.net import NetDevice

        # the backends (TAP, passt) were opened once for the VM's life (VmResources)
        for i, (nic, backend) in enumerate(zip(cfg.nics, m.resources.nics, strict=True)):
            assert nic.mac is not None  # VmConfig fills every MAC
            net = NetDevice(backend, mac=parse_mac(nic.mac), name=f"virtio-net-{i}")
            plug(net, f"virtio-net-{i}")
            m.devices[f"nic-{i}"] = net
    if cfg.rng:
        from pyvirt.virtio.rng import RngDevice

        rng = RngDevice()
        plug(rng, "virtio-rng")
        m.devices["rng"] = rng
    if cfg.console.kind == "virtio":
        from pyvirt.virtio.console import ConsoleDevice

        con = ConsoleDevice(m.console.write)
        plug(con, "virtio-console")
        m.devices["console-input"] = con
    if cfg.vsock is not None:
        from pyvirt.virtio.vsock import VsockDevice

        listener = m.resources.vsock_listener
        assert listener is not None  # bound by VmResources
        vsock = VsockDevice(guest_cid=cfg.vsock.cid, listener=listener,
                            uds_path=cfg.vsock.path)
        plug(vsock, "virtio-vsock")
        m.devices["vsock"] = vsock


def attach_kernel(m: Machine, mem: GuestMemory) -> int:
    """Load kernel + initrd, write ACPI tables, boot params; returns the entry point."""
    from pyvirt.arch.x86_64.acpi import build_acpi_tables
    from pyvirt.arch.x86_64.boot import setup_long_mode_memory
    from pyvirt.loader import Cmdline, load_initrd, load_kernel, setup_linux_boot

    cfg = m.config
    res = m.resources
    assert res.kernel is not None
    # read from the files opened at start (no path lookup, no blocking open)
    kernel = load_kernel(mem, res.kernel.path, vmlinux_cache=_vmlinux_cache(),
                         data=res.kernel.read(cfg.memory))
    initrd = None
    if res.initrd is not None:
        initrd = load_initrd(mem, res.initrd.path, kernel, data=res.initrd.read(cfg.memory))
    extra_tables, dsdt_extra = [], []
    if m.pci is not None:
        from pyvirt.pci.acpi import build_mcfg, pci_dsdt_objects

        extra_tables.append(build_mcfg())
        dsdt_extra.extend(pci_dsdt_objects(m.pci.mmio64_window))
    rsdp = build_acpi_tables(mem, num_cpus=cfg.cpus, extra_tables=extra_tables,
                             dsdt_extra=dsdt_extra)
    setup_long_mode_memory(mem)
    cmdline = Cmdline()
    base = BASE_CMDLINE
    if cfg.console.kind == "virtio":
        base = base.replace("console=ttyS0", "console=hvc0")
    for part in (base, cfg.cmdline):
        if part.strip():
            cmdline.append(part)
    m.boot_params = setup_linux_boot(mem, kernel, cmdline, initrd, rsdp)
    return kernel.entry


def _vmlinux_cache() -> Path | None:
    from pyvirt.paths import cache_dir

    return cache_dir() / "vmlinux"


def attach_boot_cpu(m: Machine, entry: int) -> None:
    from pyvirt.arch.x86_64.boot import boot_cpu_state

    m.vcpus[0].set_boot_state(boot_cpu_state(entry, m.boot_params))


def build_machine(config: VmConfig, hv: Hypervisor, resources: VmResources,
                  loop: EventLoop | None = None, *, memory_fd: int | None = None) -> Machine:
    """The VM's machine over its already opened ``resources``.

    With ``memory_fd`` (a snapshot's memory file) RAM is mapped from it and no
    kernel is loaded: the caller restores the saved state next. Either way the
    power-on state of every part is captured (``initial_state``) for a reset in
    place.
    """
    m = Machine(config, hv, resources, loop)
    try:
        mem = attach_memory(m, memory_fd)
        vm = hv.create_vm(mem, m.pio, m.mmio, num_cpus=config.cpus)
        m.vm = vm
        attach_legacy_devices(m, vm)
        attach_pci(m, vm, mem)
        m.vcpus = [vm.create_vcpu(i) for i in range(config.cpus)]
        m.initial_state = m.save_state()
        if memory_fd is None:
            entry = attach_kernel(m, mem)
            attach_boot_cpu(m, entry)
    except BaseException:
        m.close()
        raise
    return m

