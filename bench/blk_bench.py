"""Block benchmark: fio in the Debian rootfs guest on a scratch virtio disk, pyvirt vs QEMU.

Both sides boot the default guest's kernel and initramfs on the software CPU
(pyvirt ``--accel emu``, QEMU ``-accel tcg``), 1 vCPU, 1 GiB, with two virtio-blk
disks: the Debian root filesystem image read-only as /dev/vda (``pyvirt guest
build --rootfs``) and a 1 GiB raw scratch file, filled with data up front, as
/dev/vdb with host caching off (pyvirt ``cache=none``; QEMU ``cache=none,aio=threads``,
i.e. O_DIRECT on the host). Once the guest's shell is up, fio runs four jobs one
after the other on /dev/vdb, each with O_DIRECT, libaio, iodepth 32, 1 s ramp and
5 s measured: sequential 1 MiB read and write, random 4 KiB read and write. Its JSON
report comes back over the serial console and is parsed here. Runs alternate
between the sides; rows are medians, ratios pyvirt / QEMU (throughput: higher is
better). Also measured: process start to the ready line with root on virtio-blk.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import ROOT, Row, read_until

CMDLINE = "console=ttyS0 reboot=k panic=-1"
# ro: both sides see the same, unchanged root image; quiet: no kernel lines in the JSON
GUEST_ARGS = "root=/dev/vda ro quiet pyvirt.noecho"
MEMORY = "1G"
SCRATCH_BYTES = 1 << 30
IODEPTH = 32
RAMP_S = 1
RUNTIME_S = 5
BOOT_TIMEOUT = 180.0

#: (fio job name, rw, block size, row title, unit)
JOBS = (
    ("seqread", "read", "1M", "fio seq read 1M qd32", "MiB/s"),
    ("seqwrite", "write", "1M", "fio seq write 1M qd32", "MiB/s"),
    ("randread", "randread", "4k", "fio rand read 4k qd32", "kIOPS"),
    ("randwrite", "randwrite", "4k", "fio rand write 4k qd32", "kIOPS"),
)

BEGIN = b"FIO-BEGIN-42"
END = b"FIO-END-43"
#: kernel messages after which the run cannot produce figures: stop waiting
GUEST_ERRORS = (b"I/O error", b"is not a head", b"Kernel panic", b"BUG: ", b"Oops: ")


def fio_command(device: str = "/dev/vdb") -> str:
    """The guest shell line: fio's JSON to a file, then the file between markers."""
    common = (f"--filename={device} --direct=1 --ioengine=libaio --iodepth={IODEPTH} "
              f"--time_based --runtime={RUNTIME_S} --ramp_time={RAMP_S} --randrepeat=0 "
              "--norandommap")
    jobs = " ".join(f"--name={name} --stonewall --rw={rw} --bs={bs}"
                    for name, rw, bs, _title, _unit in JOBS)
    # $((...)) makes the guest compute the markers: an echo of this line never matches.
    return (f"fio --output-format=json --output=/tmp/fio.json {common} {jobs} >/dev/null 2>&1;"
            f" echo FIO-RC=$?; echo FIO-BEGIN-$((6*7)); cat /tmp/fio.json;"
            f" echo FIO-END-$((6*7+1))\n")


def parse_fio(console: bytes) -> dict[str, float]:
    """``{job name: MiB/s or kIOPS}`` from fio's JSON between the markers on the console."""
    text = console.replace(b"\r", b"")
    start = text.rfind(BEGIN + b"\n")
    end = text.find(END, start)
    if start < 0 or end < 0:
        raise RuntimeError(f"no fio report on the console; it ends: {text[-800:]!r}")
    report = json.loads(text[start + len(BEGIN) + 1 : end])
    figures: dict[str, float] = {}
    for job in report["jobs"]:
        if job.get("error"):
            raise RuntimeError(f"fio job {job['jobname']} failed: error {job['error']}")
        name = job["jobname"]
        side = job["write"] if "write" in name else job["read"]
        if name.startswith("seq"):
            figures[name] = side["bw"] / 1024  # KiB/s -> MiB/s
        else:
            figures[name] = side["iops"] / 1000
    return figures


@dataclass
class Result:
    ready_s: float
    figures: dict[str, float]


class _Console:
    """A child's stdout with what has been read so far."""

    def __init__(self, p: subprocess.Popen[bytes]) -> None:
        assert p.stdout is not None
        self.fd = p.stdout.fileno()
        self.buf = b""

    def wait(self, needle: bytes, timeout: float) -> float | None:
        """perf_counter() when ``needle`` showed (None when already there or never)."""
        if needle in self.buf:
            return None
        chunk, t = read_until(self.fd, needle, timeout, GUEST_ERRORS)
        self.buf += chunk
        if needle not in self.buf:
            errors = [e.decode() for e in GUEST_ERRORS if e in self.buf]
            why = (f"the guest reported {', '.join(errors)}" if errors
                   else f"no {needle.decode()!r} within {timeout:.0f}s")
            raise RuntimeError(f"{why}; the console ends: {self.buf[-800:]!r}")
        return t


def run_guest(cmd: list[str], *, fio: bool = True, log: Path | None = None) -> Result:
    """Boot, run fio (unless ``fio`` is false), power off; the figures of one run.

    ``log``: where to write everything the console showed (also when the run fails).
    """
    from pyvirt.guest import READY_LINE

    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    assert p.stdin is not None
    con = _Console(p)
    try:
        t1 = con.wait(READY_LINE.encode(), BOOT_TIMEOUT)
        ready_s = (t1 or time.perf_counter()) - t0
        figures: dict[str, float] = {}
        if fio:
            p.stdin.write(fio_command().encode())
            p.stdin.flush()
            con.wait(END, BOOT_TIMEOUT + len(JOBS) * (RAMP_S + RUNTIME_S) * 4)
            figures = parse_fio(con.buf)
        p.stdin.write(b"poweroff\n")
        p.stdin.flush()
        con.wait(b"reboot: Power down", 60)
        p.stdin.close()
        if p.wait(timeout=60) != 0:
            raise RuntimeError(f"{cmd[0]} exited with status {p.returncode}")
        return Result(ready_s, figures)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if log is not None:
            log.write_bytes(con.buf)


def make_scratch(path: Path, size: int = SCRATCH_BYTES) -> None:
    """A raw image with data in every block (no holes: reads must reach the disk)."""
    chunk = os.urandom(1 << 20)
    with path.open("wb") as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def qemu_cmd(kernel: Path, initrd: Path, rootfs: Path, scratch: Path, *,
             aio: str = "threads") -> list[str]:
    return [
        "qemu-system-x86_64", "-accel", "tcg", "-M", "pc", "-m", MEMORY, "-smp", "1",
        "-nographic", "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", f"{CMDLINE} {GUEST_ARGS}",
        "-drive", f"file={rootfs},if=none,id=root,format=raw,readonly=on",
        "-device", "virtio-blk-pci,drive=root",
        "-drive", f"file={scratch},if=none,id=scratch,format=raw,cache=none,aio={aio}",
        "-device", "virtio-blk-pci,drive=scratch",
    ]  # fmt: skip


def pyvirt_cmd(kernel: Path, initrd: Path, rootfs: Path, scratch: Path) -> list[str]:
    return [
        str(ROOT / ".venv/bin/pyvirt"), "run", "--accel", "emu", "--memory", MEMORY,
        "--kernel", str(kernel), "--initrd", str(initrd), "--cmdline", GUEST_ARGS,
        "--disk", f"path={rootfs},readonly=on",
        "--disk", f"path={scratch},cache=none",
    ]  # fmt: skip


def pyvirt_has_disks() -> bool:
    """Whether this pyvirt's ``run`` takes ``--disk`` (virtio-blk)."""
    try:
        out = subprocess.run([str(ROOT / ".venv/bin/pyvirt"), "run", "--help"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "--disk" in out


def run(runs: int) -> list[Row]:
    from pyvirt.guest.build import build_default_guest
    from pyvirt.guest.rootfs import build_rootfs
    from pyvirt.paths import cache_dir

    g = build_default_guest()
    rootfs = build_rootfs().path
    with_pyvirt = pyvirt_has_disks()
    if not with_pyvirt:
        print("blk: pyvirt run has no --disk option yet: QEMU side only")
    rows = {name: Row(f"{title} (higher is better)", unit=unit)
            for name, _rw, _bs, title, unit in JOBS}
    boot = Row("boot to Debian shell, root on virtio-blk", unit="s")
    # on the cache's disk, not /tmp: tmpfs has no O_DIRECT
    with tempfile.TemporaryDirectory(prefix="blk-bench-", dir=cache_dir()) as tmp:
        scratch = Path(tmp) / "scratch.raw"
        make_scratch(scratch)
        sides = [("QEMU", qemu_cmd(g.kernel, g.initrd, rootfs, scratch))]
        if with_pyvirt:
            sides.append(("pyvirt", pyvirt_cmd(g.kernel, g.initrd, rootfs, scratch)))
        # warm-up: page cache, pyvirt's extracted vmlinux; and a pyvirt whose disks do not
        # work yet leaves the QEMU figures standing
        for name, cmd in list(sides):
            try:
                run_guest(cmd, fio=False)
            except RuntimeError as err:
                if name != "pyvirt":
                    raise
                print(f"blk: pyvirt does not boot the Debian rootfs, QEMU side only: {err}")
                sides.remove((name, cmd))
        failed = {name: 0 for name, _cmd in sides}
        for i in range(runs):
            for name, cmd in sides:
                try:
                    res = run_guest(cmd)
                except RuntimeError as err:  # say so, and keep the other runs' figures
                    failed[name] += 1
                    print(f"blk: {name} run {i + 1} failed: {err}", flush=True)
                    continue
                (boot.pyvirt if name == "pyvirt" else boot.other).append(res.ready_s)
                for job, value in res.figures.items():
                    row = rows[job]
                    (row.pyvirt if name == "pyvirt" else row.other).append(value)
    fails = Row("runs that failed", [float(failed.get("pyvirt", 0))],
                [float(failed["QEMU"])], unit="")
    return [*rows.values(), boot, fails]
