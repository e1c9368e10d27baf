"""Block benchmark: fio in the Debian rootfs guest on scratch virtio disks, pyvirt vs QEMU.

Both sides boot the default guest's kernel and initramfs on the software CPU
(pyvirt ``--accel emu``, QEMU ``-accel tcg``), 1 vCPU, 1 GiB, with virtio-blk
disks: the Debian root filesystem image read-only as /dev/vda (``pyvirt guest
build --rootfs``) and one 1 GiB scratch disk per image kind (``--images``), as
/dev/vdb, /dev/vdc, ... with host caching off (pyvirt ``cache=none``; QEMU
``cache=none,aio=threads``, i.e. O_DIRECT on the host):

* ``raw``: a raw file filled with data up front;
* ``qcow2-fresh``: a new, empty qcow2 image (every first write allocates);
* ``qcow2-allocated``: a qcow2 image holding data in every cluster (writes land
  in place);
* ``qcow2-chain``: a new qcow2 image over an empty qcow2 over a raw file of data
  (reads go through the chain; the first write to a cluster copies it up).

Both sides get the same files, made by qemu-img; the new images are made again
before every run. Once the guest's shell is up, fio runs four jobs one after
the other on each scratch disk, each with O_DIRECT, libaio, iodepth 32, 1 s ramp
and 5 s measured: sequential 1 MiB read and write, random 4 KiB read and write.
Its JSON report comes back over the serial console and is parsed here. Runs
alternate between the sides; rows are medians, ratios pyvirt / QEMU
(throughput: higher is better). Also measured: process start to the ready line
with root on virtio-blk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
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
#: the scratch disks' kinds, in the order they are attached (vdb, vdc, ...)
IMAGES = ("raw", "qcow2-fresh", "qcow2-allocated", "qcow2-chain")

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
    figures: dict[str, dict[str, float]]  # image kind -> fio job -> MiB/s or kIOPS


class _Console:
    """A child's stdout with what has been read so far."""

    def __init__(self, p: subprocess.Popen[bytes]) -> None:
        assert p.stdout is not None
        self.fd = p.stdout.fileno()
        self.buf = b""

    def wait(self, needle: bytes, timeout: float, count: int = 1) -> float | None:
        """perf_counter() when ``needle`` showed for the ``count``th time (None when
        already there or never)."""
        if self.buf.count(needle) >= count:
            return None
        # the earlier ones are in buf already: read_until waits for the next one
        chunk, t = read_until(self.fd, needle, timeout, GUEST_ERRORS)
        self.buf += chunk
        if self.buf.count(needle) < count:
            errors = [e.decode() for e in GUEST_ERRORS if e in self.buf]
            why = (f"the guest reported {', '.join(errors)}" if errors
                   else f"no {needle.decode()!r} within {timeout:.0f}s")
            raise RuntimeError(f"{why}; the console ends: {self.buf[-800:]!r}")
        return t


def run_guest(cmd: list[str], disks: Sequence[str] = ("raw",), *, fio: bool = True,
              log: Path | None = None) -> Result:
    """Boot, run fio on each scratch disk (``disks``: their kinds, attached as vdb,
    vdc, ... in this order; unless ``fio`` is false), power off; the figures of one run.

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
        figures: dict[str, dict[str, float]] = {}
        for i, kind in enumerate(disks if fio else ()):
            p.stdin.write(fio_command(f"/dev/vd{chr(ord('b') + i)}").encode())
            p.stdin.flush()
            con.wait(END, BOOT_TIMEOUT + len(JOBS) * (RAMP_S + RUNTIME_S) * 4, count=i + 1)
            figures[kind] = parse_fio(con.buf)
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


def _fmt(path: Path) -> str:
    return "qcow2" if path.suffix == ".qcow2" else "raw"


def qemu_cmd(kernel: Path, initrd: Path, rootfs: Path, scratch: Path | Sequence[Path], *,
             aio: str = "threads") -> list[str]:
    disks = [scratch] if isinstance(scratch, Path) else list(scratch)
    return [
        "qemu-system-x86_64", "-accel", "tcg", "-M", "pc", "-m", MEMORY, "-smp", "1",
        "-nographic", "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", f"{CMDLINE} {GUEST_ARGS}",
        # locking off: pyvirt's shared lock on an image (another VM using the rootfs)
        # would make QEMU refuse even to read it
        "-drive", f"file={rootfs},if=none,id=root,format=raw,readonly=on,file.locking=off",
        "-device", "virtio-blk-pci,drive=root",
        *(arg for i, d in enumerate(disks) for arg in (
            "-drive", f"file={d},if=none,id=scratch{i},format={_fmt(d)},cache=none,aio={aio}",
            "-device", f"virtio-blk-pci,drive=scratch{i}")),
    ]  # fmt: skip


def pyvirt_cmd(kernel: Path, initrd: Path, rootfs: Path,
               scratch: Path | Sequence[Path]) -> list[str]:
    disks = [scratch] if isinstance(scratch, Path) else list(scratch)
    return [
        str(ROOT / ".venv/bin/pyvirt"), "run", "--accel", "emu", "--memory", MEMORY,
        "--kernel", str(kernel), "--initrd", str(initrd), "--cmdline", GUEST_ARGS,
        "--disk", f"path={rootfs},readonly=on",
        *(arg for d in disks for arg in ("--disk", f"path={d},format={_fmt(d)},cache=none")),
    ]  # fmt: skip


def pyvirt_has_disks() -> bool:
    """Whether this pyvirt's ``run`` takes ``--disk`` (virtio-blk)."""
    try:
        out = subprocess.run([str(ROOT / ".venv/bin/pyvirt"), "run", "--help"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "--disk" in out


def _qemu_img(*args: str, cwd: Path | None = None) -> None:
    r = subprocess.run(["qemu-img", *args], capture_output=True, text=True, cwd=cwd)
    if r.returncode:
        raise RuntimeError(f"qemu-img {' '.join(args)}: {r.stderr.strip()}")


class Scratch:
    """The scratch disks of the chosen kinds in ``tmp``, made with qemu-img."""

    def __init__(self, tmp: Path, kinds: Sequence[str]) -> None:
        self.tmp = tmp
        self.kinds = list(kinds)
        self.paths: list[Path] = []
        for kind in self.kinds:
            match kind:
                case "raw":
                    path = tmp / "scratch.raw"
                    make_scratch(path)
                case "qcow2-fresh":
                    path = tmp / "fresh.qcow2"
                case "qcow2-allocated":
                    path = tmp / "allocated.qcow2"
                    make_scratch(tmp / "data.raw")
                    _qemu_img("convert", "-O", "qcow2", str(tmp / "data.raw"), str(path))
                    (tmp / "data.raw").unlink()
                case "qcow2-chain":
                    path = tmp / "top.qcow2"
                    make_scratch(tmp / "base.raw")  # its own: the raw disk is written to
                    _qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
                              "mid.qcow2", cwd=tmp)
                case _:
                    raise ValueError(f"unknown image kind {kind!r} (known: {', '.join(IMAGES)})")
            self.paths.append(path)
        self.renew()

    def renew(self) -> None:
        """New empty images for the kinds that must start empty in every run."""
        for kind, path in zip(self.kinds, self.paths, strict=True):
            if kind == "qcow2-fresh":
                path.unlink(missing_ok=True)
                _qemu_img("create", "-q", "-f", "qcow2", str(path), str(SCRATCH_BYTES))
            elif kind == "qcow2-chain":
                path.unlink(missing_ok=True)
                _qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
                          path.name, cwd=self.tmp)


def run(runs: int, images: Sequence[str] = IMAGES) -> list[tuple[str, list[Row]]]:
    """``(image kind, its rows)`` for each kind; the boot time and the failed runs
    with the first kind's."""
    from pyvirt.guest.build import build_default_guest
    from pyvirt.guest.rootfs import build_rootfs
    from pyvirt.paths import cache_dir

    g = build_default_guest()
    rootfs = build_rootfs().path
    with_pyvirt = pyvirt_has_disks()
    if not with_pyvirt:
        print("blk: pyvirt run has no --disk option yet: QEMU side only")
    if any(k != "raw" for k in images) and shutil.which("qemu-img") is None:
        raise RuntimeError("blk: the qcow2 images need qemu-img")
    rows: dict[tuple[str, str], Row] = {}
    for kind in images:
        for name, _rw, _bs, title, unit in JOBS:
            rows[kind, name] = Row(f"{title} (higher is better)", unit=unit)
    boot = Row("boot to Debian shell, root on virtio-blk", unit="s")
    # on the cache's disk, not /tmp: tmpfs has no O_DIRECT
    with tempfile.TemporaryDirectory(prefix="blk-bench-", dir=cache_dir()) as tmp:
        scratch = Scratch(Path(tmp), images)
        sides = [("QEMU", qemu_cmd(g.kernel, g.initrd, rootfs, scratch.paths))]
        if with_pyvirt:
            sides.append(("pyvirt", pyvirt_cmd(g.kernel, g.initrd, rootfs, scratch.paths)))
        # warm-up: page cache, pyvirt's extracted vmlinux; and a pyvirt whose disks do not
        # work yet leaves the QEMU figures standing
        for name, cmd in list(sides):
            try:
                run_guest(cmd, images, fio=False)
            except RuntimeError as err:
                if name != "pyvirt":
                    raise
                print(f"blk: pyvirt does not boot the Debian rootfs, QEMU side only: {err}")
                sides.remove((name, cmd))
        failed = {name: 0 for name, _cmd in sides}
        for i in range(runs):
            for name, cmd in sides:
                scratch.renew()  # the same new images for each side
                try:
                    res = run_guest(cmd, images)
                except RuntimeError as err:  # say so, and keep the other runs' figures
                    failed[name] += 1
                    print(f"blk: {name} run {i + 1} failed: {err}", flush=True)
                    continue
                (boot.pyvirt if name == "pyvirt" else boot.other).append(res.ready_s)
                for kind, figures in res.figures.items():
                    for job, value in figures.items():
                        row = rows[kind, job]
                        (row.pyvirt if name == "pyvirt" else row.other).append(value)
    fails = Row("runs that failed", [float(failed.get("pyvirt", 0))],
                [float(failed["QEMU"])], unit="")
    sections = [(kind, [rows[kind, name] for name, *_ in JOBS]) for kind in images]
    sections[0][1].extend((boot, fails))
    return sections
