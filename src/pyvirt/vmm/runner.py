"""``run_vm``: one VM in the foreground, across guest reboots, with its console.

The VM's files (kernel, initrd, disks, console) are opened once by
``VmResources`` and live until the VM ends; so does its one ``Machine`` (a
guest reboot resets it in place) and the ``VirtualMachine`` that controls it,
driven by the main thread's event loop (console input, the control API, the
devices' fds). Stop signals are handled from the first line of ``run_vm`` to
its last (see ``_StopSignals``).

The exit file (``RunOptions.exit_file``, ``--exit-file``): created before
anything else (and so before the sandbox), it receives one JSON object in one
``write`` when the VMM ends, whatever the way: ``{"outcome": "poweroff" |
"reboot" | "stopped" | "crash" | "error", "detail": one line, "exit_status",
"time", "boot_count"}`` ("error": set-up failed, ``detail`` the error's line).
A VMM killed by SIGKILL leaves it empty, which tells its reader just that.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyvirt.errors import PyvirtError
from pyvirt.eventloop import EventLoop
from pyvirt.hypervisor import select_backend
from pyvirt.vmm.config import ConfigError, VmConfig, check_host
from pyvirt.vmm.console import Console
from pyvirt.vmm.machine import (
    Machine,
    Outcome,
    RunResult,
    _kick_signal_handler,
    build_machine,
)
from pyvirt.vmm.resources import VmResources
from pyvirt.vmm.vm import VirtualMachine

if TYPE_CHECKING:
    from pyvirt.vmm.snapshot import LoadedSnapshot

__all__ = ["STOP_SIGNALS", "ExitFile", "RunOptions", "SetupInterrupted", "format_registers",
           "run_vm"]

log = logging.getLogger(__name__)


def format_registers(regs: dict[str, int]) -> str:
    items = [f"{k.upper():>6}={v:016x}" for k, v in regs.items()]
    return "\n".join("  ".join(items[i : i + 4]) for i in range(0, len(items), 4))


#: the signals that stop pyvirt cleanly (terminal restored, disks unlocked, status
#: as documented): SIGHUP and SIGQUIT too, whose default actions would leave the
#: terminal in raw mode
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class SetupInterrupted(BaseException):
    """A stop signal arrived before the guest first ran. A BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` on the set-up path eats it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _StopSignals:
    """SIGINT/SIGTERM/SIGHUP/SIGQUIT for the whole of ``run_vm``.

    While a machine runs, a signal asks it to stop (the event loop winds it
    down). While setting up (before a boot runs) the handler raises
    ``SetupInterrupted``, which also breaks out of a blocking system call, so
    pyvirt stops at any point of set-up. Anywhere else (tearing a machine down)
    the signal is only noted and acted on at the next step.
    """

    def __init__(self) -> None:
        self.first: str | None = None
        self.machine: Machine | None = None
        self.raising = True  # run_vm starts by setting up
        self.guest_ran = False  # a machine has run: a stop is then a stop like any other
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        self._old = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.first is None:
            self.first = name
        machine = self.machine
        if machine is not None:
            machine.request(RunResult(Outcome.STOPPED, f"terminating on {name}"))
        elif self.raising:
            self.raising = False  # once: a second signal must not break the clean-up
            raise SetupInterrupted(signum)


class ExitFile:
    """The exit record's file (see the module docstring): opened at once, written once."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path
        self.written = False

    @classmethod
    def create(cls, path: Path) -> ExitFile:
        """Create (or truncate) ``path``; a ``ConfigError`` naming ``exit_file``."""
        from pyvirt.hostfile import open_host_file

        try:
            fd, _ = open_host_file(path, os.O_WRONLY | os.O_CREAT, what="exit_file",
                                   error=ConfigError)
        except ConfigError as exc:  # the field apart, so that a caller can name its flag
            raise ConfigError(str(exc).removeprefix("exit_file: "), "exit_file") from None
        try:
            os.ftruncate(fd, 0)
        except OSError as exc:
            os.close(fd)
            raise ConfigError(f"{path}: {exc.strerror}", "exit_file") from None
        return cls(fd, path)

    def write(self, outcome: str, detail: str, exit_status: int, boot_count: int) -> None:
        """The record, in one write (a reader sees all of it or nothing); only the
        first call writes."""
        if self.written or self.fd < 0:
            return
        self.written = True
        import json
        import time

        doc = {"outcome": outcome, "detail": _one_line(detail), "exit_status": exit_status,
               "time": time.time(), "boot_count": boot_count}
        data = (json.dumps(doc) + "\n").encode()
        try:
            os.pwrite(self.fd, data, 0)
        except OSError as exc:
            log.warning("cannot write the exit file %s: %s", self.path, exc.strerror)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _one_line(text: str) -> str:
    if not text.isprintable():
        text = "".join(c if c.isprintable() else " " for c in text)
    return text[:1000]


@dataclass(frozen=True)
class RunOptions:
    """How this process runs the VM (not part of the VM's configuration)."""

    #: serve the control API (``pyvirt.api``) on this Unix socket
    api_socket: Path | None = None
    #: restore this snapshot (``pyvirt.vmm.snapshot.read_snapshot``, already
    #: checked) instead of booting
    restore: LoadedSnapshot | None = None
    #: run the guest at once (a boot always does; a restore only with --resume)
    start: bool = True
    #: where snapshots may be written while sandboxed (None: the API socket's
    #: directory when there is an API, else anywhere without a sandbox)
    snapshot_root: Path | None = None
    #: write the exit record here (see the module docstring); an ``ExitFile``
    #: already created by the caller (the CLI, to record its own set-up errors) is
    #: written but not closed
    exit_file: Path | ExitFile | None = None


def run_vm(config: VmConfig, *, on_ready: Callable[[VmResources], None] | None = None,
           options: RunOptions | None = None) -> int:
    """Boot ``config`` (or restore ``options.restore``) and return the process
    exit status.

    ``on_ready`` is called once, at the one point where all set-up is done
    (every input checked, files open, disks locked, the machine built, the
    console file created and the terminal raw) and the guest is about to
    run for the first time: where a sandbox goes.

    A stop signal during a run ends it with 0 (as a power-off); before the
    guest first ran, pyvirt stops at once with 128 + the signal number, as a
    shell reports a command killed by it.
    """
    opts = options or RunOptions()
    exit_file: ExitFile | None = None
    owned = False
    with _StopSignals() as signals:
        try:
            if isinstance(opts.exit_file, ExitFile):
                exit_file = opts.exit_file
            elif opts.exit_file is not None:
                exit_file, owned = ExitFile.create(opts.exit_file), True
            record = _Record()
            try:
                status = _run(config, signals, on_ready, opts, record)
            except SetupInterrupted as exc:
                if signals.guest_ran:
                    sys.stderr.write(f"pyvirt: terminating on {exc}\n")
                    status = 0
                    record.set("stopped", f"terminating on {exc}")
                else:
                    sys.stderr.write(f"pyvirt: terminating on {exc} during set-up\n")
                    status = 128 + exc.signum
                    record.set("stopped", f"terminating on {exc} during set-up")
            except PyvirtError as exc:
                if exit_file is not None:
                    exit_file.write("error", str(exc), exc.exit_status, record.boot_count)
                raise
            except Exception as exc:
                if exit_file is not None:
                    exit_file.write("error", f"internal error: {exc}", 1, record.boot_count)
                raise
            if exit_file is not None:
                exit_file.write(record.outcome, record.detail, status, record.boot_count)
            return status
        finally:
            signals.raising = False
            if owned and exit_file is not None:
                exit_file.close()


class _Record:
    """How the run ended, for the exit file."""

    def __init__(self) -> None:
        self.outcome = "error"
        self.detail = "set-up did not complete"
        self.boot_count = 0
        self.vm: VirtualMachine | None = None

    def set(self, outcome: str, detail: str) -> None:
        self.outcome, self.detail = outcome, detail
        if self.vm is not None:
            self.boot_count = self.vm.boot_count


_OUTCOME_WORDS = {Outcome.POWEROFF: "poweroff", Outcome.RESET: "reboot",
                  Outcome.STOPPED: "stopped", Outcome.CRASH: "crash"}


def _run(config: VmConfig, signals: _StopSignals,
         on_ready: Callable[[VmResources], None] | None, opts: RunOptions,
         record: _Record) -> int:
    check_host(config)  # the user hears about files and RAM first, by field
    hv, choice = select_backend(config.accel)
    if config.cpus > hv.max_vcpus():
        what = ("the software CPU runs" if choice.name == "emu"
                else "this host's KVM allows at most")
        raise ConfigError(f"{what} {hv.max_vcpus()} vCPU"
                          f"{'s' if hv.max_vcpus() > 1 else ''}", "cpus")
    if config.sandbox == "on":  # fail before anything is opened or written
        from pyvirt.sandbox import require_all

        require_all(config.sandbox)
    detail = str(getattr(hv, "description", ""))
    snap = opts.restore
    if snap is not None:
        from pyvirt.vmm.snapshot import check_backend

        check_backend(snap, choice.name, detail)
    with VmResources.open(config) as res:
        console = res.console
        with contextlib.ExitStack() as stack:
            if snap is not None:
                from pyvirt.vmm.snapshot import check_disks

                check_disks(snap, [img.size for img in res.disks])
            if config.verbose:
                console.message(f"accelerator: {choice.name} ({choice.reason})")
                if detail:
                    console.message(f"engine: {detail}")
            loop = EventLoop("main")
            stack.callback(loop.close)
            signals.raising = True
            machine = build_machine(config, hv, res, loop,
                                    memory_fd=None if snap is None else snap.memory_fd)
            stack.callback(machine.close)
            if snap is not None:
                machine.restore_state(snap.state)
            root = opts.snapshot_root
            if root is None and opts.api_socket is not None and config.sandbox != "off":
                root = Path(os.path.abspath(opts.api_socket)).parent
            vm = VirtualMachine(machine, backend=choice.name, backend_detail=detail,
                                snapshot_root=root, on_message=console.message)
            record.vm = vm
            if opts.api_socket is not None:
                from pyvirt.api.server import ApiServer

                api = ApiServer(opts.api_socket, vm, loop)
                stack.callback(api.close)
            res.start()
            _sandbox(config, choice.name, console, snapshot_root=root)
            if on_ready is not None:
                on_ready(res)
            # from here a signal asks the machine to stop instead of raising
            old_usr1 = signal.signal(signal.SIGUSR1, _kick_signal_handler)
            stack.callback(signal.signal, signal.SIGUSR1, old_usr1)
            signals.raising = False
            signals.machine = machine
            signals.guest_ran = True
            stack.callback(setattr, signals, "machine", None)
            machine.start()
            stack.callback(machine.stop_vcpus)
            if snap is None or opts.start:
                vm.start()
            else:
                vm.start_paused()
            if signals.first is not None:  # came in between: noted only
                machine.request(RunResult(Outcome.STOPPED, f"terminating on {signals.first}"))
            loop.run_until(lambda: machine.finished)
            result = machine.outcome
            assert result is not None
            record.set(_OUTCOME_WORDS.get(result.outcome, "crash"), result.detail)
        return _report(console, result)


def _sandbox(config: VmConfig, backend: str, console: Console, *,
             snapshot_root: Path | None = None) -> None:
    """Confine this process (``pyvirt.sandbox``) once set-up is done, before the
    guest first runs; with a single thread, so every later thread is confined."""
    if config.sandbox != "off":
        from pyvirt import sandbox

        report = sandbox.apply(sandbox.policy_for_vm(config, mode=config.sandbox,
                                                     kvm=backend == "kvm",
                                                     snapshot_root=snapshot_root))
        if config.verbose:
            console.message(report.summary())
    if "PYVIRT_TEST_SANDBOX_PROBE" in os.environ:  # test-only: see pyvirt.sandbox.PROBE_ENV
        from pyvirt.sandbox import probe_from_env

        probe_from_env()


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
