"""The machine: config → builder → running VM, and its lifecycle.

``build_machine`` assembles a VM from small ``attach_*`` steps (memory,
legacy devices, kernel, ACPI, boot CPU). ``Machine.run`` starts one thread per
vCPU and runs the event loop on the calling (main) thread until the guest
powers off, resets, crashes, or the user stops it.

Threads and locks (see docs/design.md):
- main thread: the event loop (console input, the wake-up eventfd, signals);
  owns the lifecycle. Never touches device state except through device
  methods, which lock.
- one thread per vCPU: ``Vcpu.run()`` (releases the GIL inside KVM_RUN / the
  engine), dispatching I/O to devices on the buses.
- ``Machine._lock`` guards ``_outcome`` only; device locks are never held
  while taking it (devices call ``request_*`` after releasing their own lock).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import queue
import selectors
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pyvirt.arch.x86_64 import layout
from pyvirt.devices.bus import Bus
from pyvirt.hypervisor import ExitKind, Hypervisor, Vcpu, VcpuExit, Vm
from pyvirt.memory import GuestMemory
from pyvirt.vmm.config import VmConfig
from pyvirt.vmm.console import Console

if TYPE_CHECKING:
    from pyvirt.pci.root import PciRoot
    from pyvirt.virtio.pci import VirtioPciDevice
    from pyvirt.vmm.resources import VmResources

__all__ = ["Machine", "Outcome", "RunResult", "build_machine"]

log = logging.getLogger(__name__)

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
    """One boot of the VM. The files it uses (disks, kernel, console) belong to
    ``resources``, which outlives it: closing a machine never closes them."""

    def __init__(self, config: VmConfig, hv: Hypervisor, resources: VmResources) -> None:
        self.config = config
        self.hv = hv
        self.resources = resources
        self.console: Console = resources.console
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
        self.boot_params = 0
        self.pci: PciRoot | None = None
        self.pci_devices: list[VirtioPciDevice] = []

    # ---- requests from devices, vCPU threads and signal handlers (any thread)

    def request(self, result: RunResult) -> None:
        """Ask the loop to stop the VM with ``result``; the first request wins."""
        with self._lock:
            if self._outcome is None:
                self._outcome = result
        self._events.put(result)
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

    # ---- running

    def _vcpu_thread(self, vcpu: Vcpu) -> None:
        try:
            while True:
                ex: VcpuExit = vcpu.run()
                if ex.kind is ExitKind.KICKED:
                    if self._outcome is not None:
                        return
                    continue
                self._handle_exit(vcpu, ex)
                return
        except Exception as exc:  # a VMM bug must stop this VM cleanly, not hang it
            log.exception("vCPU %d failed", vcpu.index)
            self.request(RunResult(Outcome.CRASH, f"vCPU {vcpu.index}: internal error: {exc}"))

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

    def run(self) -> RunResult:
        """Run until the guest stops. Must be called on the main thread."""
        old_usr1 = signal.signal(signal.SIGUSR1, _kick_signal_handler)
        sel = selectors.DefaultSelector()
        try:
            sel.register(self._wake_fd, selectors.EVENT_READ, "wake")
            in_fd = self.console.input_fd
            if in_fd is not None:
                try:
                    sel.register(in_fd, selectors.EVENT_READ, "input")
                except (ValueError, PermissionError):
                    in_fd = None  # e.g. /dev/null or a regular file: nothing to wait for
                    self._feed_all_input()
            for vcpu in self.vcpus:
                t = threading.Thread(target=self._vcpu_thread, args=(vcpu,),
                                     name=f"vcpu{vcpu.index}", daemon=True)
                self._threads.append(t)
                t.start()
            while self._outcome is None:
                timeout = 0.01 if self._pending_input else None
                for key, _ in sel.select(timeout):
                    if key.data == "wake":
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(self._wake_fd)
                    elif key.data == "input" and not self._on_input():
                        sel.unregister(key.fd)
                if self._pending_input:
                    self._push_input()
        finally:
            self._stop_vcpus()
            sel.close()
            signal.signal(signal.SIGUSR1, old_usr1)
        assert self._outcome is not None
        return self._outcome

    def _on_input(self) -> bool:
        data = self.console.read_input()
        if self.console.quit_requested:
            self.request(RunResult(Outcome.STOPPED, "quit from the console"))
            return False
        if data is None:
            return False
        self._pending_input += data
        self._push_input()
        return True

    def _feed_all_input(self) -> None:
        while (data := self.console.read_input()) is not None and data:
            self._pending_input += data

    def _push_input(self) -> None:
        target = self.devices.get("console-input") or self.devices.get("serial")
        if target is None or not self._pending_input:
            return
        accepted: int = target.enqueue_input(self._pending_input)  # type: ignore[attr-defined]
        self._pending_input = self._pending_input[accepted:]

    def _stop_vcpus(self) -> None:
        if self._outcome is None:
            with self._lock:
                self._outcome = RunResult(Outcome.STOPPED, "stopped")
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

    def close(self) -> None:
        for dev in self.pci_devices:
            try:
                dev.close()
            except Exception:  # closing one device must not leak the others
                log.exception("closing %s", dev.name)
        self.pci_devices.clear()
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        os.close(self._wake_fd)


# ---- the builder ----------------------------------------------------------


def attach_memory(m: Machine) -> GuestMemory:
    m.memory = GuestMemory.create(m.config.memory)
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
    m.pio.insert(ResetControl(m.request_reset), layout.RESET_PORT, 1, "reset")
    for base, length, name in legacy_ignore_ranges():
        try:
            m.pio.insert(PortSink(), base, length, name)
        except ValueError:
            log.debug("sink %s at %#x overlaps a device; skipped", name, base)
    m.devices.update(serial=serial, i8042=i8042, rtc=rtc, acpi_pm=pm)


def attach_pci(m: Machine, vm: Vm, mem: GuestMemory) -> None:
    """PCI bus 0 and the virtio devices: disks (vda, vdb, ...), rng, console."""
    from pyvirt.pci.root import attach_pci_root

    root = m.pci = attach_pci_root(m.pio, m.mmio, vm.irq_line, mem.end)
    cfg = m.config
    if not (cfg.disks or cfg.rng or cfg.console.kind == "virtio"):
        return
    from pyvirt.virtio.device import VirtioDevice
    from pyvirt.virtio.pci import VirtioPciDevice

    def plug(device: VirtioDevice, name: str) -> None:
        slot = len(m.pci_devices) + 1
        pdev = VirtioPciDevice(device, vm=vm, memory=mem, intx=root.intx_line(slot), name=name)
        m.pci_devices.append(pdev)
        root.add(slot, pdev)

    if cfg.disks:
        from pyvirt.virtio.blk import BlockDevice

        # the images were opened and locked once for the VM's life (VmResources)
        for i, (disk, image) in enumerate(zip(cfg.disks, m.resources.disks, strict=True)):
            name = f"vd{chr(ord('a') + i)}"
            blk = BlockDevice(image, serial=disk.serial, discard=disk.discard,
                              name=f"virtio-blk-{name}")
            plug(blk, f"virtio-blk-{name}")
            m.devices[f"disk-{name}"] = blk
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


def attach_vcpus(m: Machine, vm: Vm, entry: int) -> None:
    from pyvirt.arch.x86_64.boot import boot_cpu_state

    m.vcpus = [vm.create_vcpu(i) for i in range(m.config.cpus)]
    m.vcpus[0].set_boot_state(boot_cpu_state(entry, m.boot_params))


def build_machine(config: VmConfig, hv: Hypervisor, resources: VmResources,
                  log_step: Callable[[str], None] | None = None) -> Machine:
    """One boot's machine over the VM's already opened ``resources``."""
    m = Machine(config, hv, resources)
    try:
        mem = attach_memory(m)
        vm = hv.create_vm(mem, m.pio, m.mmio, num_cpus=config.cpus)
        m.vm = vm
        attach_legacy_devices(m, vm)
        attach_pci(m, vm, mem)
        entry = attach_kernel(m, mem)
        attach_vcpus(m, vm, entry)
    except BaseException:
        m.close()
        raise
    return m
