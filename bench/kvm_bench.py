"""KVM-backend benchmarks with the small test guest (works on PVM hosts too).

- exit round trip: 200,000 port writes (``test=pio``), timed from the first
  port-0x80 exit to the last, in pyvirt (in this process, the real VMM code
  path) and in ``bench/c/kvm_pio.c`` (the smallest C VMM doing the same).
- VMM start: process start to the guest's first byte on the console, and RSS
  (peak, and peak minus the guest RAM actually touched), against QEMU's
  start-up to its QMP greeting (``-S``: ready to run its first instruction).
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, Row, build_c, build_test_guest, read_until

PIO_WRITES = 200_000


class _PioTimer:
    """Stands in for the port-0x80 sink: timestamps the first and last write."""

    def __init__(self) -> None:
        self.count = 0
        self.t0 = self.t1 = 0.0

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = b"\xff" * len(data)

    def write(self, offset: int, data: memoryview) -> None:
        self.count += 1
        if self.count == 1:
            self.t0 = time.perf_counter()
        elif self.count == PIO_WRITES:
            self.t1 = time.perf_counter()


def pyvirt_pio_seconds(guest: Path) -> float:
    from pyvirt.hypervisor import select_backend
    from pyvirt.vmm.config import ConsoleSpec, VmConfig
    from pyvirt.vmm.machine import Outcome, build_machine
    from pyvirt.vmm.resources import VmResources

    cfg = VmConfig(kernel=guest, memory=128 << 20, cmdline="test=pio", accel="kvm",
                   console=ConsoleSpec("none"))
    hv, _ = select_backend("kvm")
    with VmResources.open(cfg) as res:
        m = build_machine(cfg, hv, res)
        timer = _PioTimer()
        m.pio.remove(0x80)
        m.pio.insert(timer, 0x80, 1, "pio-timer")
        try:
            result = m.run()
        finally:
            m.close()
    if result.outcome is not Outcome.POWEROFF or timer.count != PIO_WRITES:
        raise RuntimeError(f"pio guest: {result} after {timer.count} writes")
    return timer.t1 - timer.t0


def c_pio_seconds(binary: Path, guest: Path) -> float:
    out = subprocess.run([str(binary), str(guest)], check=True, capture_output=True, text=True)
    secs, count = out.stdout.split()
    if int(count) != PIO_WRITES:
        raise RuntimeError(f"C harness saw {count} writes")
    return float(secs)


def _rss_kib(pid: int) -> tuple[int, int]:
    """(VmHWM, Rss of the guest RAM mapping) of a running pyvirt, in KiB."""
    hwm = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    guest = 0
    size = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if line.startswith("Size:"):
            size = int(line.split()[1])
        elif line.startswith("Rss:") and size == 128 * 1024:
            guest += int(line.split()[1])
    return hwm, guest


def pyvirt_start(guest: Path) -> tuple[float, int, int]:
    """(seconds to the first console byte, peak RSS KiB, peak RSS minus guest RAM KiB)."""
    t0 = time.perf_counter()
    p = subprocess.Popen([str(ROOT / ".venv/bin/pyvirt"), "run", "--accel", "kvm", "--kernel",
                          str(guest), "--memory", "128M", "--cmdline", "test=halt"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    assert p.stdout is not None
    _, t1 = read_until(p.stdout.fileno(), b"h", 30)
    hwm, guest_rss = _rss_kib(p.pid)
    p.send_signal(signal.SIGTERM)
    p.wait(30)
    if t1 is None:
        raise RuntimeError("pyvirt printed nothing")
    return t1 - t0, hwm, hwm - guest_rss


def qemu_start() -> tuple[float, int]:
    """(seconds to QEMU's QMP greeting with -S, peak RSS KiB) on the same KVM."""
    t0 = time.perf_counter()
    p = subprocess.Popen(["qemu-system-x86_64", "-accel", "kvm", "-M", "microvm", "-m", "128M",
                          "-nodefaults", "-no-user-config", "-display", "none", "-S",
                          "-qmp", "stdio"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    assert p.stdout is not None
    _, t1 = read_until(p.stdout.fileno(), b'{"QMP"', 30)
    hwm = 0
    for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    p.kill()
    p.wait()
    if t1 is None:
        raise RuntimeError("QEMU did not start")
    return t1 - t0, hwm


def run(runs: int) -> list[Row]:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("(no /dev/kvm: KVM benchmarks skipped)")
        return []
    tmp = Path(tempfile.mkdtemp(prefix="pyvirt-bench-"))
    guest = build_test_guest(tmp)
    cbin = build_c(ROOT / "bench/c/kvm_pio.c", tmp / "kvm_pio")
    exit_row = Row(f"exit round trip ({PIO_WRITES} PIO), us/exit", other_name="C",
                   unit="us", target="target <= 1.15")
    start_row = Row("VMM start to first guest output", unit="ms", target="target <= 50 ms")
    rss_row = Row("peak RSS (QEMU: at QMP ready)", unit="MiB")
    rss_net_row = Row("peak RSS minus guest RAM", unit="MiB", target="target <= 25 MiB")
    for _ in range(runs):  # alternate, so drift hits both sides alike
        exit_row.other.append(c_pio_seconds(cbin, guest) / PIO_WRITES * 1e6)
        exit_row.pyvirt.append(pyvirt_pio_seconds(guest) / PIO_WRITES * 1e6)
        qs, qrss = qemu_start()
        ps, prss, pnet = pyvirt_start(guest)
        start_row.pyvirt.append(ps * 1e3)
        start_row.other.append(qs * 1e3)
        rss_row.pyvirt.append(prss / 1024)
        rss_row.other.append(qrss / 1024)
        rss_net_row.pyvirt.append(pnet / 1024)
        rss_net_row.other.append(qrss / 1024)
    return [exit_row, start_row, rss_row, rss_net_row]
