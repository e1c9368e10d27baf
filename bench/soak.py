"""``make soak``: N consecutive boots of the default guest; every failure is printed.

A boot passes when the guest reaches its shell (the ready line), runs a
command, and ``poweroff`` ends pyvirt with exit status 0 within the time limit.
Exit status: 0 when all N passed, 1 otherwise.

    python -m bench.soak [--boots 100] [--accel emu] [--timeout 120]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, read_until


def one_boot(accel: str, timeout: float, log_path: Path) -> tuple[bool, str, float]:
    ok, why, t, log = _one_boot(accel, timeout)
    if not ok:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_bytes(log)
        why += f" (full console log: {log_path})"
    return ok, why, t


def _one_boot(accel: str, timeout: float) -> tuple[bool, str, float, bytes]:
    from pyvirt.guest import READY_LINE

    t0 = time.perf_counter()
    p = subprocess.Popen([str(ROOT / ".venv/bin/pyvirt"), "run", "--accel", accel,
                          "--memory", "512M", "--on-reboot", "exit"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdin is not None and p.stdout is not None
    out, t_ready = read_until(p.stdout.fileno(), READY_LINE.encode(), timeout)
    if t_ready is None:
        p.kill()
        _, err = p.communicate()
        return False, f"no ready line; tail: {out[-300:]!r} {err[-300:]!r}", 0.0, out + err
    p.stdin.write(b"echo soak-$((6*7)); poweroff\n")
    p.stdin.flush()
    try:
        rest, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        rest, err = p.communicate()
        return False, f"no power-off; tail: {rest[-300:]!r}", 0.0, out + rest + err
    if b"soak-42" not in rest:
        return False, f"command did not run; tail: {rest[-300:]!r}", 0.0, out + rest + err
    if p.returncode != 0:
        return False, f"exit status {p.returncode}: {err[-300:]!r}", 0.0, out + rest + err
    return True, "", t_ready - t0, b""


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.soak")
    ap.add_argument("--boots", type=int, default=100)
    ap.add_argument("--accel", default="auto")
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--logs", type=Path, default=Path(tempfile.gettempdir()) / "pyvirt-soak",
                    help="where the console logs of failed boots go")
    args = ap.parse_args()
    failures = 0
    times = []
    for i in range(1, args.boots + 1):
        ok, why, t = one_boot(args.accel, args.timeout, args.logs / f"boot-{i}.log")
        if ok:
            times.append(t)
        else:
            failures += 1
            print(f"boot {i}: FAILED: {why}", flush=True)
        if i % 10 == 0 or not ok:
            print(f"{i}/{args.boots} boots, {failures} failures", flush=True)
    times.sort()
    med = times[len(times) // 2] if times else float("nan")
    print(f"soak: {args.boots - failures} passed, {failures} failed "
          f"(median boot to shell {med:.2f} s)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
