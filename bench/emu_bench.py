"""Software-CPU benchmark: the default guest booted to its shell, pyvirt vs QEMU TCG.

Both boot the same kernel and initramfs with the same command line, memory and
vCPUs, serial console on a pipe; runs alternate. Measured per run: time from
process start to the ready line, the guest's own uptime at that point
(``/proc/uptime``, asked right after the line), and peak RSS. QEMU runs twice
per round: with the bzImage (its guest-side decompressor runs) and with the
ELF vmlinux through its PVH entry (as pyvirt enters the ELF directly).
"""

from __future__ import annotations

import re
import subprocess
import time

from bench.common import ROOT, Row, peak_rss_kib, read_until

CMDLINE = "console=ttyS0 reboot=k panic=-1"
MEMORY = "512M"


def _boot(cmd: list[str], ready: bytes) -> tuple[float, float, float]:
    """(seconds to ready, guest uptime at ready, peak RSS MiB)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    assert p.stdin is not None and p.stdout is not None
    out, t1 = read_until(p.stdout.fileno(), ready, 120)
    if t1 is None:
        p.kill()
        p.wait()
        raise RuntimeError(f"{cmd[0]}: no ready line; last output: {out[-500:]!r}")
    p.stdin.write(b"cat /proc/uptime; poweroff\n")
    p.stdin.flush()
    more, _ = read_until(p.stdout.fileno(), b"\n", 60)
    rest, _ = read_until(p.stdout.fileno(), b"reboot: Power down", 60)
    m = re.search(rb"(\d+\.\d+) \d+\.\d+", out + more + rest)
    p.stdin.close()
    rss = peak_rss_kib(p) / 1024
    return t1 - t0, float(m.group(1)) if m else float("nan"), rss


def run(runs: int) -> list[Row]:
    from pyvirt.guest import READY_LINE
    from pyvirt.guest.build import build_default_guest
    from pyvirt.paths import cache_dir

    g = build_default_guest()
    ready = READY_LINE.encode()
    pyvirt = [str(ROOT / ".venv/bin/pyvirt"), "run", "--accel", "emu", "--memory", MEMORY]
    # the vmlinux pyvirt's loader extracted (warm the cache with one boot first)
    _boot(pyvirt, ready)
    elfs = sorted((cache_dir() / "vmlinux").glob("*.vmlinux"), key=lambda p: p.stat().st_mtime)
    vmlinux = elfs[-1] if elfs else None
    qemu = ["qemu-system-x86_64", "-accel", "tcg", "-M", "pc", "-m", MEMORY, "-smp", "1",
            "-nographic", "-no-reboot", "-initrd", str(g.initrd), "-append", CMDLINE]
    t_bz = Row("boot to shell, vs QEMU TCG bzImage", unit="s", target="target <= 1.0")
    t_elf = Row("boot to shell, vs QEMU TCG ELF (PVH)", unit="s", other_name="QEMU")
    up_bz = Row("guest uptime at ready, vs QEMU bzImage", unit="s")
    rss = Row("peak RSS, vs QEMU bzImage", unit="MiB")
    for _ in range(runs):
        a = _boot([*qemu, "-kernel", str(g.kernel)], ready)
        b = _boot(pyvirt, ready)
        t_bz.other.append(a[0])
        up_bz.other.append(a[1])
        rss.other.append(a[2])
        t_bz.pyvirt.append(b[0])
        t_elf.pyvirt.append(b[0])
        up_bz.pyvirt.append(b[1])
        rss.pyvirt.append(b[2])
        if vmlinux is not None:
            t_elf.other.append(_boot([*qemu, "-kernel", str(vmlinux)], ready)[0])
    return [t_bz, t_elf, up_bz, rss]
