"""A hostile guest: ``tests/guests/stress/hammer`` run as root in the default
Linux guest on the software CPU, throwing random port I/O, MMIO, PCI config
accesses and garbage virtio rings at the VMM (issue #17, "Hardening").

The program is built with the host's gcc (``-static``) and handed to the guest
in a second cpio archive appended to the default initramfs (Linux unpacks
concatenated archives as one). The VM gets a scratch disk; a sentinel file
beside it must keep its hash and the disk its size. While the guest runs, the
VMM's RSS is sampled every second from the host.

    python -m bench.hostile [--seconds 300] [--wild-seconds 60] [--seed N]

Exit status 0 when the VMM survived (see ``Session.problems``), 1 otherwise.
``tests/integration/test_guest_stress.py`` runs a short session in CI.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HAMMER_SRC = ROOT / "tests/guests/stress"
BOOT_TIMEOUT = 240.0  # a software CPU on a busy 2-core box
SAFE_PHASES = "pio,pcicfg,mmio,rings"
DISK_BYTES = 8 << 20
SENTINEL_BYTES = 1 << 20
#: iomem=relaxed: /dev/mem may map regions a driver claimed (the APICs, the BARs);
#: pyvirt.noecho: the shell does not echo our commands back
GUEST_CMDLINE = "iomem=relaxed pyvirt.noecho"


def build_hammer(out: Path) -> Path:
    subprocess.run(["sh", str(HAMMER_SRC / "build.sh"), str(out)], check=True)
    return out / "hammer"


def combined_initrd(base: Path, hammer: Path, out: Path) -> Path:
    """The default initramfs with a second archive holding ``/hammer`` appended."""
    from pyvirt.guest.cpio import CpioWriter

    extra = io.BytesIO()
    with CpioWriter(extra) as cpio:
        cpio.add_file("hammer", hammer.read_bytes(), mode=0o755)
    data = base.read_bytes()
    # the kernel looks for the next archive's magic at a 4-byte boundary (it skips NULs)
    out.write_bytes(data + b"\0" * (-len(data) % 4) + extra.getvalue())
    return out


def vm_rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Session:
    """What one hostile run saw. ``problems`` is empty when the VMM held."""

    seed: int
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    rss_kib: list[tuple[float, int]] = field(default_factory=list)  # (seconds, KiB)
    rss_start_kib: int = 0
    died_at: float | None = None  # seconds into the run when the VMM was found gone
    safe_done: bool = False
    wild_done: bool | None = None  # None: no wild run
    exit_status: int | None = None
    exit_seconds: float | None = None  # SIGTERM to exit
    host_unharmed: bool = True
    problems: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace").replace("\r", "")

    @property
    def rss_peak_kib(self) -> int:
        return max((kib for _, kib in self.rss_kib), default=0)

    def hammer_lines(self) -> list[str]:
        return re.findall(r"^HAMMER.*$", self.text, re.M)


class _Vm:
    """``pyvirt run`` with both pipes drained by threads and its RSS sampled."""

    def __init__(self, args: list[str], session: Session) -> None:
        self.s = session
        self.proc = subprocess.Popen([sys.executable, "-m", "pyvirt", "run", *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.t0 = time.monotonic()
        self.cond = threading.Condition()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._drain, args=(pipe, buf), daemon=True)
                        for pipe, buf in ((self.proc.stdout, session.stdout),
                                          (self.proc.stderr, session.stderr))]
        self.threads.append(threading.Thread(target=self._sample, daemon=True))
        for t in self.threads:
            t.start()

    def _drain(self, pipe: io.BufferedReader | None, buf: bytearray) -> None:
        assert pipe is not None
        while chunk := os.read(pipe.fileno(), 65536):
            with self.cond:
                buf += chunk
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def _sample(self) -> None:
        while not self.stop.wait(1.0):
            kib = vm_rss_kib(self.proc.pid)
            if kib is None or self.proc.poll() is not None:
                if self.s.died_at is None and not self.stop.is_set():
                    self.s.died_at = time.monotonic() - self.t0
                return
            self.s.rss_kib.append((time.monotonic() - self.t0, kib))

    def wait_for(self, needle: bytes, timeout: float, count: int = 1) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.s.stdout.count(needle) < count:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return self.s.stdout.count(needle) >= count
                self.cond.wait(min(left, 1.0))
        return True

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def terminate(self, timeout: float) -> None:
        """SIGTERM, then wait; the VMM must answer even with a wedged guest."""
        self.stop.set()
        t = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.s.exit_status = self.proc.wait(timeout)
            self.s.exit_seconds = time.monotonic() - t
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for th in self.threads:
            th.join(10)


def run_session(*, seconds: float, wild_seconds: float, seed: int, rss_slack_mib: int,
                workdir: Path, log: bool = False, hammer_env: str = "") -> Session:
    """Boot, hammer, check. Needs the default guest built (``make guest``).

    ``hammer_env``: ``NAME=VALUE ...`` for the program (see hammer.c: HAMMER_WILD,
    HAMMER_TRACE narrow down what wedges a guest).
    """
    from pyvirt.guest import READY_LINE
    from pyvirt.guest.build import build_default_guest

    image = build_default_guest(log=lambda _msg: None)
    hammer = build_hammer(workdir / "hammer-build")
    initrd = combined_initrd(image.initrd, hammer, workdir / "initrd-hammer.img")
    disk = workdir / "scratch.img"
    disk.write_bytes(os.urandom(DISK_BYTES))
    sentinel = workdir / "sentinel.bin"  # beside the disk: the guest must not reach it
    sentinel.write_bytes(os.urandom(SENTINEL_BYTES))
    sentinel_sum = _sha256(sentinel)

    s = Session(seed=seed)
    vm = _Vm(["--accel", "emu", "--memory", "512M", "--initrd", str(initrd),
              "--disk", f"path={disk}", "--cmdline", GUEST_CMDLINE], s)

    def note(msg: str) -> None:
        if log:
            print(f"[{time.monotonic() - vm.t0:6.1f}s] {msg}", flush=True)

    try:
        if not vm.wait_for(READY_LINE.encode(), BOOT_TIMEOUT):
            s.problems.append(f"no ready line within {BOOT_TIMEOUT:.0f}s")
            return s
        s.rss_start_kib = vm_rss_kib(vm.proc.pid) or 0
        note(f"booted; VMM RSS {s.rss_start_kib // 1024} MiB; hammering for {seconds:.0f}s")
        vm.send(f"{hammer_env} /hammer {seed} {seconds:.0f} {SAFE_PHASES}".strip())
        # the program itself stops after `seconds`; the rest is slack for a slow host
        s.safe_done = vm.wait_for(b"HAMMER-DONE", seconds * 2 + 120)
        if not s.safe_done:
            s.problems.append("HAMMER-DONE of the safe phases not seen")
        if wild_seconds > 0 and s.safe_done:
            note(f"safe phases done; wild phase for {wild_seconds:.0f}s")
            vm.send(f"{hammer_env} /hammer {seed + 1} {wild_seconds:.0f} wild".strip())
            # a wedged guest is allowed here; a dead or unresponsive VMM is not
            s.wild_done = vm.wait_for(b"HAMMER-DONE", wild_seconds * 2 + 60, count=2)
        if s.died_at is not None or vm.proc.poll() is not None:
            s.problems.append(f"the VMM exited during the run (status {vm.proc.poll()})")
        # the host side: the file beside the disk and the disk's size
        if _sha256(sentinel) != sentinel_sum or disk.stat().st_size != DISK_BYTES:
            s.host_unharmed = False
            s.problems.append("the sentinel file changed or the disk's size did")
    finally:
        vm.terminate(timeout=30)
        note(f"exit status {s.exit_status} after SIGTERM ({s.exit_seconds}s)")
    if s.exit_status is None:
        s.problems.append("pyvirt did not exit within 30s of SIGTERM")
    elif s.exit_status != 0:
        s.problems.append(f"pyvirt exit status {s.exit_status} after SIGTERM")
    bound = s.rss_start_kib + rss_slack_mib * 1024
    if s.rss_peak_kib > bound:
        s.problems.append(f"VMM RSS peaked at {s.rss_peak_kib // 1024} MiB, over the bound "
                          f"{bound // 1024} MiB (start {s.rss_start_kib // 1024} MiB)")
    err = s.stderr.decode(errors="replace")
    for bad in ("Traceback", "internal error", "Exception in thread"):
        if bad in err or bad in s.text:
            s.problems.append(f"{bad!r} in pyvirt's output")
    if _sha256(sentinel) != sentinel_sum:
        s.host_unharmed = False
        if "sentinel" not in " ".join(s.problems):
            s.problems.append("the sentinel file changed")
    return s


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.hostile")
    ap.add_argument("--seconds", type=float, default=300, help="safe phases, in total")
    ap.add_argument("--wild-seconds", type=float, default=60,
                    help="then the interrupt controllers and MSI-X tables (0: skip)")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--rss-slack", type=int, default=64, help="MiB over the booted RSS")
    ap.add_argument("--hammer-env", default="",
                    help="e.g. 'HAMMER_WILD=lapic HAMMER_TRACE=1' (see hammer.c)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pyvirt-hostile-") as tmp:
        s = run_session(seconds=args.seconds, wild_seconds=args.wild_seconds, seed=args.seed,
                        rss_slack_mib=args.rss_slack, workdir=Path(tmp), log=True,
                        hammer_env=args.hammer_env)
    for line in s.hammer_lines():
        print(f"  guest: {line}")
    print(f"seed {s.seed}: RSS start {s.rss_start_kib // 1024} MiB, peak "
          f"{s.rss_peak_kib // 1024} MiB; wild phase "
          f"{'skipped' if s.wild_done is None else 'done' if s.wild_done else 'wedged the guest'}")
    err = s.stderr.decode(errors="replace").strip()
    if err:
        print("pyvirt stderr (last 20 lines):\n  " + "\n  ".join(err.splitlines()[-20:]))
    for p in s.problems:
        print(f"PROBLEM: {p}")
    print("hostile: " + ("FAILED" if s.problems else "passed"))
    sys.exit(1 if s.problems else 0)


if __name__ == "__main__":
    main()
