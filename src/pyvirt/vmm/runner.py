"""``run_vm``: one VM in the foreground, across guest reboots, with its console."""

from __future__ import annotations

import logging
import signal
import sys

from pyvirt.hypervisor import select_backend
from pyvirt.vmm.config import ConfigError, VmConfig
from pyvirt.vmm.console import Console
from pyvirt.vmm.machine import Machine, Outcome, RunResult, build_machine

__all__ = ["format_registers", "run_vm"]

log = logging.getLogger(__name__)


def format_registers(regs: dict[str, int]) -> str:
    items = [f"{k.upper():>6}={v:016x}" for k, v in regs.items()]
    return "\n".join("  ".join(items[i : i + 4]) for i in range(0, len(items), 4))


def run_vm(config: VmConfig) -> int:
    """Boot ``config`` and return the process exit status."""
    hv, choice = select_backend(config.accel)
    if config.cpus > hv.max_vcpus():
        what = ("the software CPU runs" if choice.name == "emu"
                else "this host's KVM allows at most")
        raise ConfigError(f"--cpus {config.cpus}: {what} {hv.max_vcpus()} vCPU"
                          f"{'s' if hv.max_vcpus() > 1 else ''}")
    console = Console(config.console)
    if config.verbose:
        console.message(f"accelerator: {choice.name} ({choice.reason})")
        description = getattr(hv, "description", "")
        if description:
            console.message(f"engine: {description}")
    # SIGINT/SIGTERM stop the VM cleanly, also between two boots of a rebooting guest
    stopping: list[str] = []
    current: list[Machine] = []

    def on_signal(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        stopping.append(name)
        if current:
            current[0].request(RunResult(Outcome.STOPPED, f"terminating on {name}"))

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    console.open()
    try:
        boots = 0
        while True:
            boots += 1
            if stopping:
                return _report(console, RunResult(Outcome.STOPPED,
                                                  f"terminating on {stopping[0]}"))
            machine = build_machine(config, hv, console)
            current[:] = [machine]
            try:
                if stopping:
                    machine.request(RunResult(Outcome.STOPPED, f"terminating on {stopping[0]}"))
                result = machine.run()
            finally:
                current.clear()
                machine.close()
            if result.outcome is Outcome.RESET and config.on_reboot == "restart":
                if config.verbose:
                    console.message(f"guest reset: restarting (boot {boots + 1})")
                continue
            return _report(console, result)
    finally:
        console.close()
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _report(console: Console, result: RunResult) -> int:
    if result.outcome in (Outcome.POWEROFF, Outcome.RESET):
        return 0
    if result.outcome is Outcome.STOPPED:
        console.message(result.detail)
        return 0
    console.close()  # leave raw mode before printing a multi-line report
    sys.stderr.write(f"pyvirt: guest crashed: {result.detail}\n")
    if result.registers:
        sys.stderr.write(format_registers(result.registers) + "\n")
    return 1
