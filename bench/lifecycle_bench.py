"""Lifecycle benchmark (issue #9): pause, resume, snapshot and restore, pyvirt vs QEMU TCG.

Both sides boot the default guest (same kernel, initramfs, command line, 512 MiB,
1 vCPU) on the software CPU; pyvirt is driven over its control API
(``--api-socket``, :class:`pyvirt.api.client.VmClient`), QEMU over QMP. Sides
alternate within each round; each run is one VM's whole life:

1. boot to the ready line;
2. 20 pause/resume cycles with the guest idle, 20 more with a shell busy loop
   (``while :; do :; done &``): the client's round trip of pause (pyvirt
   ``PUT /vm/pause`` / QMP ``stop``) and of resume (``PUT /vm/resume`` / ``cont``);
   pyvirt's own measure (``pyvirt_vm_last_pause_seconds``) is read after each;
3. 64 MiB of non-zero data into the guest's tmpfs, a console ticker loop
   started, the VM paused, then the snapshot: pyvirt ``PUT /vm/snapshot``
   (round trip) vs QEMU ``migrate`` to ``exec:cat > FILE`` (until
   ``query-migrate`` says completed, bandwidth cap lifted as ``virsh save``
   does); the on-disk size (``st_blocks``) of what each wrote;
4. the VM killed, then the restore in a fresh process: pyvirt ``run --restore DIR
   --resume`` until ``GET /vm`` says running, QEMU ``-incoming "exec:cat FILE"``
   until ``query-status`` says running (it stays paused after a migration of a
   paused VM, so ``cont`` is sent once it is, as libvirt does); the CPU time
   the new process used until then (``schedstat``: what host load barely
   moves); and the time until the ticker's next line reaches the console pipe.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import ROOT, Row

CMDLINE = "console=ttyS0 reboot=k panic=-1"
MEMORY = "512M"
CYCLES = 20
FILL = 64 << 20
TICK = b"TICK"


class Console:
    """Drains a child's stdout on a thread (a guest printing without pause must
    never block on a full pipe) and says when a string first appeared."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._data = bytearray()
        self._ends: list[int] = []    # end offset of each chunk read ...
        self._times: list[float] = []  # ... and when (perf_counter)
        self._cond = threading.Condition()
        self._eof = False
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        while True:
            try:
                chunk = os.read(self._fd, 1 << 16)
            except OSError:
                chunk = b""
            t = time.perf_counter()
            with self._cond:
                if not chunk:
                    self._eof = True
                else:
                    self._data += chunk
                    self._ends.append(len(self._data))
                    self._times.append(t)
                self._cond.notify_all()
            if not chunk:
                return

    @property
    def mark(self) -> int:
        with self._cond:
            return len(self._data)

    def wait_for(self, needle: bytes, timeout: float, start: int = 0) -> float:
        """perf_counter time at which ``needle`` (searched from offset ``start``)
        was read; raises RuntimeError after ``timeout`` or at end of output."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                i = self._data.find(needle, start)
                if i >= 0:
                    k = bisect.bisect_left(self._ends, i + len(needle))
                    return self._times[k]
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    tail = bytes(self._data[-400:])
                    raise RuntimeError(f"no {needle!r} on the console "
                                       f"({'output ended' if self._eof else 'timed out'}); "
                                       f"last output: {tail!r}")
                self._cond.wait(left)


class Qmp:
    """A minimal QMP client: one command at a time, events skipped."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._f = self.sock.makefile("rb")
        self._read()  # the greeting
        self.cmd("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self._f.readline()
        if not line:
            raise RuntimeError("QMP: connection closed")
        return dict(json.loads(line))

    def cmd(self, name: str, **args: object) -> Any:
        msg: dict[str, object] = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._read()
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise RuntimeError(f"QMP {name}: {r['error']}")
            # an event: skip

    def close(self) -> None:
        self._f.close()
        self.sock.close()


def _await_socket(path: str, p: subprocess.Popen[bytes], what: str,
                  timeout: float = 60.0) -> None:
    """Poll (a stat every 0.5 ms: cheaper for the child than failed connects)
    until ``path`` exists."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if p.poll() is not None:
            raise RuntimeError(f"{what} exited ({p.returncode}) before its socket appeared")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: no socket {path}")
        time.sleep(0.0005)


def _connect_qmp(path: str, p: subprocess.Popen[bytes]) -> Qmp:
    _await_socket(path, p, "QEMU")
    while True:
        try:
            return Qmp(path)
        except ConnectionRefusedError:  # bound, not listening yet
            time.sleep(0.0005)


def _tree_blocks(path: Path) -> int:
    """Bytes allocated on disk (st_blocks * 512) under ``path``."""
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def _cpu_s(pid: int) -> float:
    """CPU time the process's threads have run so far (``schedstat``, ns
    resolution): unlike wall time, barely moved by other load on the host."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):  # the thread just ended
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def _spawn(cmd: list[str]) -> tuple[subprocess.Popen[bytes], Console]:
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    assert p.stdout is not None
    return p, Console(p.stdout.fileno())


def _type(p: subprocess.Popen[bytes], line: str) -> None:
    assert p.stdin is not None
    p.stdin.write(line.encode() + b"\n")
    p.stdin.flush()


def _reap(p: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


class Result:
    """One run's numbers for one side."""

    def __init__(self) -> None:
        self.pause: dict[str, list[float]] = {"idle": [], "busy": []}
        self.resume: dict[str, list[float]] = {"idle": [], "busy": []}
        self.pause_own: dict[str, list[float]] = {"idle": [], "busy": []}
        self.snap_s = float("nan")
        self.snap_bytes = float("nan")
        self.restore_s = float("nan")
        self.restore_out_s = float("nan")
        self.restore_cpu_s = float("nan")


def _cycles(res: Result, kind: str, pause: Callable[[], None], resume: Callable[[], None],
            own: Callable[[], float | None]) -> None:
    for _ in range(CYCLES):
        time.sleep(0.02)  # let the guest run between cycles
        t0 = time.perf_counter()
        pause()
        t1 = time.perf_counter()
        res.pause[kind].append(t1 - t0)
        v = own()
        if v is not None:
            res.pause_own[kind].append(v)
        time.sleep(0.005)
        t0 = time.perf_counter()
        resume()
        res.resume[kind].append(time.perf_counter() - t0)


def _guest_work(p: subprocess.Popen[bytes], con: Console, res: Result,
                pause: Callable[[], None], resume: Callable[[], None],
                own: Callable[[], float | None]) -> None:
    """Steps 2 and 3 up to the pause before the snapshot (shared by both sides)."""
    _cycles(res, "idle", pause, resume, own)
    m = con.mark
    _type(p, "while :; do :; done & echo BUSY-$((6*7))")
    con.wait_for(b"BUSY-42", 60, m)
    _cycles(res, "busy", pause, resume, own)
    m = con.mark
    _type(p, f"kill $!; dd if=/dev/urandom of=/tmp/fill bs=1M count={FILL >> 20} 2>/dev/null; "
             f"echo FILLED-$((6*7))")
    con.wait_for(b"FILLED-42", 120, m)
    m = con.mark
    _type(p, f"while :; do echo {TICK.decode()}; done")
    con.wait_for(TICK + b"\r\n" + TICK, 60, m)
    time.sleep(0.1)
    pause()


# ---- QEMU

def _qemu_cmd(kernel: Path, initrd: Path, qmp: str) -> list[str]:
    return ["qemu-system-x86_64", "-accel", "tcg", "-M", "pc", "-m", MEMORY, "-smp", "1",
            "-nographic", "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", CMDLINE, "-qmp", f"unix:{qmp},server=on,wait=off"]


def _qemu_run(work: Path, kernel: Path, initrd: Path, ready: bytes) -> Result:
    res = Result()
    sock = str(work / "qmp.sock")
    p, con = _spawn(_qemu_cmd(kernel, initrd, sock))
    try:
        con.wait_for(ready, 180)
        q = _connect_qmp(sock, p)
        _guest_work(p, con, res, lambda: q.cmd("stop"), lambda: q.cmd("cont"), lambda: None)
        # the snapshot: migrate the stopped VM into a file
        img = work / "qemu.mig"
        q.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        t0 = time.perf_counter()
        q.cmd("migrate", uri=f"exec:cat > {img}")
        while True:
            st = q.cmd("query-migrate").get("status")
            if st == "completed":
                break
            if st in ("failed", "cancelled"):
                raise RuntimeError(f"QEMU migrate: {st}")
            time.sleep(0.0005)
        res.snap_s = time.perf_counter() - t0
        res.snap_bytes = _tree_blocks(img)
        q.close()
    finally:
        p.kill()
        _reap(p)
    # the restore, in a fresh process
    sock2 = str(work / "qmp2.sock")
    t0 = time.perf_counter()
    p, con = _spawn([*_qemu_cmd(kernel, initrd, sock2), "-incoming", f"exec:cat {img}"])
    try:
        q = _connect_qmp(sock2, p)
        while True:
            st = q.cmd("query-status")["status"]
            if st == "running":
                break
            if st == "paused":  # migrated in; the source was paused, so it stays so
                q.cmd("cont")
                continue
            time.sleep(0.0005)
        res.restore_s = time.perf_counter() - t0
        res.restore_cpu_s = _cpu_s(p.pid)
        res.restore_out_s = con.wait_for(TICK, 30) - t0
        q.cmd("quit")
        q.close()
    finally:
        _reap(p)
    img.unlink()
    return res


# ---- pyvirt

def _pyvirt_run(work: Path, ready: bytes) -> Result:
    from pyvirt.api.client import ApiConnectionError, VmClient

    res = Result()
    exe = str(ROOT / ".venv/bin/pyvirt")
    sock = work / "api.sock"
    p, con = _spawn([exe, "run", "--accel", "emu", "--memory", MEMORY,
                     "--api-socket", str(sock)])
    snap = work / "snap"
    try:
        con.wait_for(ready, 180)
        with VmClient(sock) as vm:
            vm.info()  # the client's first request imports httpx: not part of any timing

            def own() -> float | None:
                return vm.metrics().get("pyvirt_vm_last_pause_seconds")

            _guest_work(p, con, res, vm.pause, vm.resume, own)
            t0 = time.perf_counter()
            vm.snapshot(snap)
            res.snap_s = time.perf_counter() - t0
            res.snap_bytes = _tree_blocks(snap)
    finally:
        p.kill()
        _reap(p)
    sock.unlink(missing_ok=True)
    # the restore, in a fresh process
    t0 = time.perf_counter()
    p, con = _spawn([exe, "run", "--restore", str(snap), "--resume", "--api-socket", str(sock)])
    try:
        _await_socket(str(sock), p, "pyvirt --restore")
        with VmClient(sock, timeout=30) as vm:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if vm.info()["state"] == "running":
                        break
                except ApiConnectionError:  # bound, not listening yet
                    vm.close()
                    if p.poll() is not None or time.monotonic() > deadline:
                        raise
                    time.sleep(0.0005)
            res.restore_s = time.perf_counter() - t0
            res.restore_cpu_s = _cpu_s(p.pid)
            res.restore_out_s = con.wait_for(TICK, 30) - t0
            vm.stop()
    finally:
        _reap(p)
    shutil.rmtree(snap)
    return res


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run(runs: int) -> list[Row]:
    from pyvirt.guest import READY_LINE
    from pyvirt.guest.build import build_default_guest

    g = build_default_guest()
    ready = READY_LINE.encode()
    # Restore is mostly Python start-up: time it with bytecode compiled, as an
    # installed pyvirt has (PYTHONDONTWRITEBYTECODE or a fresh edit would
    # otherwise add a compile of every changed module to each start).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "src/pyvirt")],
                   check=True)
    rows = {
        "pause_idle": Row("pause round trip, idle (QEMU: QMP stop)", unit="ms"),
        "pause_busy": Row("pause round trip, guest in a busy loop", unit="ms"),
        "own_idle": Row("pause, the VMM's own measure, idle", unit="ms"),
        "own_busy": Row("pause, the VMM's own measure, busy loop", unit="ms"),
        "resume_idle": Row("resume round trip, idle (QEMU: QMP cont)", unit="ms"),
        "resume_busy": Row("resume round trip, guest in a busy loop", unit="ms"),
        "snap_s": Row("snapshot, 512M/64M filled (QEMU: migrate)", unit="ms"),
        "snap_mib": Row("snapshot size on disk (QEMU: its file)", unit="MiB"),
        "restore": Row("restore: process start -> running", unit="ms", target="target <= 50"),
        "restore_cpu": Row("restore: VMM CPU time until running", unit="ms"),
        "restore_out": Row("restore: process start -> guest output", unit="ms"),
    }

    def add(r: Result, side: str) -> None:
        def put(key: str, v: float) -> None:
            getattr(rows[key], side).append(v)

        for kind in ("idle", "busy"):
            # one value per run: the median of its cycles
            put(f"pause_{kind}", _median(r.pause[kind]) * 1e3)
            put(f"resume_{kind}", _median(r.resume[kind]) * 1e3)
            if r.pause_own[kind]:
                put(f"own_{kind}", _median(r.pause_own[kind]) * 1e3)
        put("snap_s", r.snap_s * 1e3)
        put("snap_mib", r.snap_bytes / (1 << 20))
        put("restore", r.restore_s * 1e3)
        put("restore_cpu", r.restore_cpu_s * 1e3)
        put("restore_out", r.restore_out_s * 1e3)

    with tempfile.TemporaryDirectory(prefix="pyvirt-life-") as tmp:
        work = Path(tmp)
        for i in range(runs):
            sides = ["other", "pyvirt"] if i % 2 == 0 else ["pyvirt", "other"]
            for side in sides:
                if side == "other":
                    add(_qemu_run(work, g.kernel, g.initrd, ready), "other")
                else:
                    add(_pyvirt_run(work, ready), "pyvirt")
    return list(rows.values())
