"""Helpers for the daemon's tests: short temporary roots, a Manager on them,
a console reader, and a fake VMM (``python tests/daemon_support.py ARGS``)
that speaks the VMM's command line, API and exit file without a guest, for
the Manager's pure lifecycle logic.

Other helpers may be added at the END of this file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

FAKE_VMM = Path(__file__).resolve()


def short_root(prefix: str = "pv") -> Path:
    """A short temporary directory (Unix socket paths must fit in 107 bytes)."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(root, 0o711)  # VMMs may run as the VM user (pyvirt-vm): it must get through
    return root


def wait_for(pred: Callable[[], Any], timeout: float = 30.0, what: str = "condition",
             interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def same_user_privilege() -> Any:
    """VMMs as the test's own user, no cgroup: the Manager's tests need no VM user
    (this host's interpreter lives under /root, which pyvirt-vm cannot reach;
    the privilege tests cover the other case)."""
    from pyvirt.manager.privilege import Privilege

    return Privilege(os.geteuid(), os.getegid(), drop=False, reason="tests: the test's user",
                     cgroups=None, cgroup_reason="tests: no cgroup")


@contextlib.contextmanager
def manager_on(root: Path, *, fake: bool = False, privilege: Any = None) -> Iterator[Any]:
    """A started Manager on ``root`` (networks off); ``fake``: the fake VMM;
    ``privilege`` None: ``same_user_privilege()``. Closed on exit (the VMs it
    started keep running: kill them in the test)."""
    from pyvirt.manager.manager import Manager
    from pyvirt.manager.paths import DaemonPaths

    m = Manager(DaemonPaths.for_root(root), start_networks=False,
                privilege=privilege if privilege is not None else same_user_privilege())
    if fake:
        m.vmm_command = [sys.executable, str(FAKE_VMM)]
    m.startup()
    try:
        yield m
    finally:
        m.close()


def kill_all_vmms(root: Path) -> None:
    """SIGKILL every VMM whose runstate under ``root`` names a live process that
    started when recorded (what a test leaves behind on failure)."""
    import sqlite3

    from pyvirt.manager.vmproc import process_alive

    db = root / "state" / "pyvirt.db"
    if not db.exists():
        return
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT pid, start_ticks FROM runstate WHERE pid IS NOT NULL"
                           ).fetchall()
    finally:
        con.close()
    for pid, ticks in rows:
        if process_alive(pid, ticks):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)


def remove_root(root: Path) -> None:
    kill_all_vmms(root)
    kill_network_daemons(root)
    shutil.rmtree(root, ignore_errors=True)


class ConsoleReader:
    """A connection to a VM's console socket; everything it received so far in
    ``text``. ``expect(needle)`` waits for it (after ``start``, the backlog
    included)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.data = b""
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True, name="console")
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                chunk = b""
            with self._cond:
                if not chunk:
                    self._closed = True
                    self._cond.notify_all()
                    return
                self.data += chunk
                self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.data)

    def expect(self, needle: bytes, timeout: float = 120.0, since: int = 0) -> bytes:
        deadline = time.monotonic() + timeout
        with self._cond:
            while needle not in self.data[since:]:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    tail = self.data[-2000:].decode("utf-8", "replace")
                    raise AssertionError(f"{needle!r} not seen on the console "
                                         f"({'closed' if self._closed else 'timeout'}); "
                                         f"last output:\n{tail}")
                self._cond.wait(min(left, 1.0))
            return self.data[since:]

    def send(self, text: bytes) -> None:
        self.sock.sendall(text)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)


# ---- the fake VMM: `python tests/daemon_support.py run-options...`


class _FakeVm:
    """The VmControl protocol over a bare state machine; the guest "powers off"
    when asked, unless its cmdline says ``ignore-acpi``."""

    def __init__(self, config: dict[str, Any], exit_file: Path | None,
                 paused: bool) -> None:
        from pyvirt.vmm.control import VmState

        self.config = config
        self.exit_file = exit_file
        self.state = VmState.PAUSED if paused else VmState.RUNNING
        self.boot_count = 1
        #: when the process ends (a moment after the answer, as a real VMM's teardown)
        self.end_at: float | None = None
        self.started = time.monotonic()

    def _act(self, action: str) -> None:
        from pyvirt.vmm.control import refuse_unless

        refuse_unless(action, self.state)

    def end(self, outcome: str, detail: str) -> None:
        from pyvirt.vmm.control import VmState

        self.state = VmState.STOPPED
        if self.exit_file is not None:
            doc = {"outcome": outcome, "detail": detail, "exit_status": 0,
                   "time": time.time(), "boot_count": self.boot_count}
            self.exit_file.write_text(json.dumps(doc))
        self.end_at = time.monotonic() + 0.2

    @property
    def finished(self) -> bool:
        return self.end_at is not None and time.monotonic() >= self.end_at

    def info(self) -> dict[str, object]:
        return {"state": self.state.value, "uptime_s": time.monotonic() - self.started,
                "run_time_s": 0.0, "backend": "fake", "pyvirt_version": "fake",
                "boot_count": self.boot_count, "config": self.config, "nics": []}

    def pause(self) -> None:
        from pyvirt.vmm.control import VmState

        self._act("pause")
        self.state = VmState.PAUSED

    def resume(self) -> None:
        from pyvirt.vmm.control import VmState

        self._act("resume")
        self.state = VmState.RUNNING

    def power_button(self) -> None:
        self._act("power-button")
        if "ignore-acpi" not in str(self.config.get("cmdline", "")):
            self.end("poweroff", "the guest powered off")

    def reset(self) -> None:
        self._act("reset")
        self.boot_count += 1

    def ctrl_alt_del(self) -> None:
        self._act("ctrl-alt-del")
        self.boot_count += 1

    def force_stop(self) -> None:
        self._act("force-stop")
        self.end("stopped", "stopped through the API")

    def snapshot(self, path: str) -> dict[str, object]:
        self._act("snapshot")
        p = Path(path)
        p.mkdir()
        (p / "manifest.json").write_text(json.dumps({"config": self.config}))
        return {"path": path, "memory_bytes_written": 0, "seconds": 0.0}

    def set_nic_link(self, nic: int, up: bool) -> None:
        raise NotImplementedError

    def metrics(self) -> list[Any]:
        from pyvirt.vmm.control import MetricFamily

        return [MetricFamily("pyvirt_vm_boots_total", "counter", "boots",
                             [({}, float(self.boot_count))])]


def fake_vmm_main(args: list[str]) -> int:
    from pyvirt.api.server import ApiServer
    from pyvirt.eventloop import EventLoop

    opts: dict[str, str] = {}
    flags = set()
    i = 1 if args and args[0] == "run" else 0
    while i < len(args):
        if args[i] == "--resume":
            flags.add("resume")
            i += 1
            continue
        opts.setdefault(args[i], args[i + 1])
        i += 2
    exit_file = Path(opts["--exit-file"]) if "--exit-file" in opts else None
    if exit_file is not None:
        exit_file.write_bytes(b"")
    if "--restore" in opts:
        config = json.loads((Path(opts["--restore"]) / "manifest.json").read_text())["config"]
        paused = "resume" not in flags
    else:
        config = json.loads(Path(opts["--config"]).read_text())
        paused = False
    cmdline = str(config.get("cmdline", ""))
    if "fail-setup" in cmdline:
        msg = "kernel: /nonexistent/vmlinuz: no such file"
        sys.stderr.write(f"pyvirt: error: {msg}\n")
        if exit_file is not None:
            exit_file.write_text(json.dumps({"outcome": "error", "detail": msg,
                                             "exit_status": 2, "time": time.time(),
                                             "boot_count": 0}))
        return 2
    if "no-exit-file" in cmdline:
        exit_file = None
    vm = _FakeVm(config, exit_file, paused)
    loop = EventLoop("fake-vmm")
    server = ApiServer(Path(opts["--api-socket"]), vm, loop)  # type: ignore[arg-type]
    try:
        loop.run_until(lambda: vm.finished, tick=0.05)
    finally:
        server.close()
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(fake_vmm_main(sys.argv[1:]))


def kill_network_daemons(root: Path) -> None:
    """SIGKILL every dnsmasq started for a network under ``root``: it outlives the
    daemon on purpose, and would keep a test's deleted namespace alive."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.startswith(f"--conf-file={root}/".encode()) for a in argv):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), 9)


def spawn_daemon(root: Path, *, wrap: list[str] | None = None,
                 extra: list[str] | None = None) -> subprocess.Popen[bytes]:
    """``pyvirt daemon --root ROOT`` (its output appended to ROOT/daemon.log),
    ``wrap`` put in front (``unshare --net --``, ``ip netns exec NS``: a
    namespace of its own for its networks), once its socket answers."""
    env = {k: v for k, v in os.environ.items() if k != "PYVIRT_URI"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src")
    with open(root / "daemon.log", "ab") as log:
        proc = subprocess.Popen([*(wrap or []), sys.executable, "-m", "pyvirt", "daemon",
                                 "--root", str(root), *(extra or [])],
                                stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env)
    sock = root / "run" / "pyvirtd.sock"
    try:
        wait_for(lambda: sock.exists() or proc.poll() is not None, 60, "the daemon's socket")
    except BaseException:
        stop_daemon(proc)
        raise
    if proc.poll() is not None:
        raise AssertionError(f"the daemon ended: {daemon_log(root)}")
    return proc


def daemon_log(root: Path) -> str:
    return (root / "daemon.log").read_text(errors="replace")[-5000:]


def stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, SIGKILL after 30 s (its VMs keep running: ``remove_root`` ends them)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def daemon_running(root: Path, *, wrap: list[str] | None = None,
                   extra: list[str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """``spawn_daemon`` for a block; stopped at its end (its log printed with
    ``PYVIRT_KEEP_LOGS=1``)."""
    proc = spawn_daemon(root, wrap=wrap, extra=extra)
    try:
        yield proc
    finally:
        stop_daemon(proc)
        if os.environ.get("PYVIRT_KEEP_LOGS"):
            print(daemon_log(root))


# ---- what the daemon's guest-booting test modules share

#: seconds a default-guest boot may take (~4 s idle, far more under load)
BOOT = 240.0
REPO = FAKE_VMM.parents[1]


def daemon_env() -> dict[str, str]:
    """The environment for ``python -m pyvirt`` child processes: this tree's
    sources, and no PYVIRT_URI from the caller's shell."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    env.pop("PYVIRT_URI", None)
    return env


def guest_marks(*, needs_root: bool = True) -> list[Any]:
    """``pytestmark`` for a module that boots the default guest on the software
    CPU through a daemon: guest + slow; skipped (with the reason) without
    unicorn's patches, or, with ``needs_root``, when not root (the daemon runs in
    a network namespace of its own). Call at import: a missing unicorn skips
    the whole module."""
    import pytest

    pytest.importorskip("unicorn")
    from pyvirt.hypervisor.emulated import engine

    marks = [pytest.mark.guest, pytest.mark.slow,
             pytest.mark.skipif(not engine.available(), reason="unicorn lacks pyvirt's patches")]
    if needs_root:
        marks.append(pytest.mark.skipif(os.geteuid() != 0, reason="the daemon runs in its own "
                                        "network namespace (needs root)"))
    return marks


def ensure_guest() -> None:
    """Build the default guest when it is not built yet (a module fixture's body)."""
    from pyvirt.guest import build_default_guest, guest_is_built

    if not guest_is_built():
        build_default_guest(log=lambda msg: print(msg, flush=True))


def root_fixture(prefix: str) -> Any:
    """A module's ``root`` fixture: a short root (``prefix`` names the module in
    /tmp), removed afterwards with whatever VMMs and dnsmasq it left running.
    In the module: ``root = root_fixture("pvd")``."""
    import pytest

    @pytest.fixture
    def root() -> Iterator[Path]:
        r = short_root(prefix)
        try:
            yield r
        finally:
            remove_root(r)

    return root


def fake_kernel_fixture() -> Any:
    """A module's ``kernel`` fixture for the fake VMM (which never reads it)."""
    import pytest

    @pytest.fixture
    def kernel(tmp_path: Path) -> str:
        k = tmp_path / "vmlinuz"
        k.write_bytes(b"not a kernel: the fake VMM never reads it")
        return str(k)

    return kernel
