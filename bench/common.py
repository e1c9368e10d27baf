"""Helpers shared by the benchmarks: medians, child RSS, a table printer."""

from __future__ import annotations

import os
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Row:
    metric: str
    pyvirt: list[float] = field(default_factory=list)
    other: list[float] = field(default_factory=list)
    other_name: str = "QEMU"
    unit: str = "s"
    target: str = ""

    def median(self, xs: Sequence[float]) -> float:
        return statistics.median(xs) if xs else float("nan")

    def line(self) -> str:
        a, b = self.median(self.pyvirt), self.median(self.other)
        ratio = a / b if self.other and b else float("nan")
        return (f"{self.metric:<44} {a:>10.4g} {self.unit:<4} {self.other_name:>6} "
                f"{b:>10.4g} {self.unit:<4} ratio {ratio:>6.3f}  {self.target}")


def print_rows(title: str, rows: list[Row]) -> None:
    print(f"\n== {title} (medians)")
    for r in rows:
        print(r.line())
    sys.stdout.flush()


def read_until(fd: int, needle: bytes, timeout: float,
               fail: Sequence[bytes] = ()) -> tuple[bytes, float | None]:
    """Read until ``needle``; returns (data, time.perf_counter() when it appeared).

    Gives up early (time None) when one of ``fail`` shows up: a guest that
    reported an error will not print the needle, so waiting is only wasted time.
    """
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        if any(f in seen for f in fail):
            return seen, None
        left = deadline - time.monotonic()
        if left <= 0:
            return seen, None
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            return seen, None
        chunk = os.read(fd, 65536)
        if not chunk:
            return seen, None
        seen += chunk
    return seen, time.perf_counter()


def peak_rss_kib(p: subprocess.Popen[bytes]) -> int:
    """Wait for ``p`` and return its peak RSS (ru_maxrss, KiB)."""
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return int(ru.ru_maxrss)


def build_test_guest(out: Path) -> Path:
    subprocess.run(["sh", str(ROOT / "tests/guests/build.sh"), str(out)], check=True)
    return out / "testguest.elf"


def build_c(src: Path, out: Path) -> Path:
    subprocess.run(["gcc", "-O2", "-o", str(out), str(src)], check=True)
    return out
