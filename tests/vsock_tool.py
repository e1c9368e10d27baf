"""``tests/guests/vsock/vsock-io.c`` for the vsock tests: ``build_vsock_tool`` compiles
it (static, so it runs in the default guest's initramfs as well as on the host),
``pattern`` is the byte stream its ``send`` writes, and ``parse_report`` reads its
one-line result."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path

__all__ = ["PERIOD", "SOURCE", "build_vsock_tool", "parse_report", "pattern"]

SOURCE = Path(__file__).resolve().parent / "guests" / "vsock" / "vsock-io.c"
PERIOD = 65521  # prime: see the C file's comment


@functools.lru_cache(maxsize=8)
def _table(seed: int) -> bytes:
    x = (0x9E3779B9 ^ (seed * 0x85EBCA6B)) & 0xFFFF_FFFF or 1
    out = bytearray(PERIOD)
    for k in range(PERIOD):
        x ^= (x << 13) & 0xFFFF_FFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFF_FFFF
        out[k] = x >> 24
    return bytes(out)


def pattern(n: int, seed: int = 1, offset: int = 0) -> bytes:
    """Bytes ``offset``..``offset + n`` of ``vsock-io send N SEED``'s stream."""
    t = _table(seed)
    start = offset % PERIOD
    reps = (start + n) // PERIOD + 1
    return (t * reps)[start:start + n]


def build_vsock_tool(tmpdir: Path) -> Path:
    """Compile ``vsock-io`` into ``tmpdir`` (gcc -static); returns its path."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("gcc is needed to build tests/guests/vsock/vsock-io.c")
    out = Path(tmpdir) / "vsock-io"
    subprocess.run([gcc, "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out),
                    str(SOURCE)], check=True, capture_output=True, text=True)
    return out


_REPORT = re.compile(r"^(sent|recv|echo) bytes=(\d+) sha256=([0-9a-f]{64})$", re.M)


def parse_report(text: str) -> tuple[str, int, str]:
    """(action, bytes, sha256 hex) from the tool's output."""
    m = _REPORT.search(text)
    if m is None:
        raise ValueError(f"no vsock-io report in {text!r}")
    return m.group(1), int(m.group(2)), m.group(3)
