"""qcow2 disks under real Linux on the software CPU, refereed by qemu-img.

One boot of the Debian rootfs guest (boots are the expensive part), whose root
file system is a qcow2 overlay made by ``pyvirt img create`` over the cached
raw rootfs image, with three qcow2 data disks:

* vdb: fresh (``qemu-img create``), host cache off (O_DIRECT under the qcow2
  code);
* vdc: preallocated metadata (``preallocation=metadata``);
* vdd: the top of a three-deep chain, raw base of random data <- qcow2 <- qcow2
  (16 KiB clusters, compat 0.10) <- qcow2, recorded with relative backing
  names (the VMM's working directory is elsewhere), the middle layers holding
  data of their own; host cache off.

On each data disk the guest runs fio at iodepth 32 with CRC verification:
random 4 KiB writes over 16 MiB (concurrent first writes to one cluster), then
4 KiB every 32 KiB over the next 16 MiB (every cluster partly written: the
rest must come from the backing file or be zeros); writes 8 MiB, discards it,
overwrites 1 MiB in the middle; then reads the whole disk back (O_DIRECT) into
a sha256. After the ACPI power button: ``qemu-img check`` clean, qemu-img's
view of each image hashes to what the guest read, the parts the guest never
wrote still read as before the boot, the discarded clusters are no longer
allocated in the image, the chain's lower files and the rootfs are unchanged,
and the file written on the root file system is in the overlay.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pyvirt.guest import READY_LINE, GuestImage
from tests.conftest import run_pyvirt
from tests.integration.test_emu_boot import marker
from tests.integration.test_lifecycle_emu import Vmm
from tests.integration.test_rootfs import image, rootfs  # noqa: F401  (fixtures)

pytest.importorskip("unicorn")
from pyvirt.hypervisor.emulated import engine

pytestmark = [
    pytest.mark.guest,
    pytest.mark.slow,
    pytest.mark.skipif(not engine.available(), reason="unicorn lacks pyvirt's patches"),
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed"),
]

MiB = 1 << 20
SIZE = 64 * MiB
STRIDE = 32 << 10  # the holes job: 4 KiB written every STRIDE in [16, 32) MiB
WRITTEN = 32 * MiB  # [32, 40) MiB: written, discarded, [34, 35) written again
DISCARDED = ((32 * MiB, 2 * MiB), (35 * MiB, 5 * MiB))
UNTOUCHED = 40 * MiB  # [40, 64) MiB: never written by the guest
DATA_DISKS = ("vdb", "vdc", "vdd")
NOTE = "written through the qcow2 overlay"

FIO = ("fio --filename=/dev/{d} --direct=1 --ioengine=libaio --iodepth=32 --bs=4k "
       "--verify=crc32c --do_verify=1 --verify_fatal=1 --randrepeat=0 "
       "--name=rand --rw=randwrite --offset=0 --size=16M "
       f"--name=holes --stonewall --rw=write:{STRIDE - 4096} --offset=16M --size=16M "
       ">/tmp/fio-{d}.log 2>&1")


def _qemu_img(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(4 * MiB):
            h.update(block)
    return h.hexdigest()


def _to_raw(img: Path, out: Path, *share: str) -> Path:
    r = _qemu_img("convert", *share, "-O", "raw", str(img), str(out))
    assert r.returncode == 0, r.stderr
    return out


@dataclass
class Run:
    """One boot's results: the console, the images, what they held before it."""

    dir: Path
    text: str = ""
    disks: dict[str, Path] = field(default_factory=dict)  # data disk -> its image
    before: dict[str, Path] = field(default_factory=dict)  # data disk -> raw of its view
    unchanged: dict[Path, str] = field(default_factory=dict)  # file -> sha256 before
    overlay: Path = Path()


def _make_chain(d: Path) -> Path:
    """base.raw <- c1.qcow2 <- c2.qcow2 <- c3.qcow2, relative names, data in c1 and c2."""
    with (d / "base.raw").open("wb") as f:
        f.write(hashlib.shake_256(b"pyvirt base").digest(SIZE))
    steps = (("c1.qcow2", "base.raw", "raw", "cluster_size=65536"),
             ("c2.qcow2", "c1.qcow2", "qcow2", "cluster_size=16384,compat=0.10"),
             ("c3.qcow2", "c2.qcow2", "qcow2", "cluster_size=65536"))
    for name, backing, fmt, opts in steps:
        r = _qemu_img("create", "-q", "-f", "qcow2", "-o", opts, "-b", backing, "-F", fmt,
                      name, cwd=d)
        assert r.returncode == 0, r.stderr
    # data in the middle layers, in the region fio overwrites, in the partly written one,
    # and in the untouched one (overlapping, so reads resolve at different depths)
    for name, writes in (("c1.qcow2", ("-P 0x11 1M 1M", "-P 0x33 20M 2M", "-P 0x55 40M 4M")),
                         ("c2.qcow2", ("-P 0x22 1536K 1M", "-P 0x44 21M 3M",
                                       "-P 0x66 42M 4M"))):
        for w in writes:
            r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write {w}", name], cwd=d,
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stdout + r.stderr
    return d / "c3.qcow2"


@pytest.fixture(scope="module")
def run(image: GuestImage, rootfs: Path, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
        ) -> Iterator[Run]:
    from pyvirt.paths import cache_dir

    # on the cache's disk: the cache=none disks need O_DIRECT, which tmpfs lacks
    work = Path(cache_dir()) / f"disk-images-test-{tmp_path_factory.getbasetemp().name}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        yield _boot(work, rootfs)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _boot(work: Path, root: Path) -> Run:
    res = Run(work)
    res.overlay = work / "overlay.qcow2"
    made = run_pyvirt("img", "create", "-f", "qcow2", "-b", str(root), "-F", "raw",
                      str(res.overlay))
    assert made.returncode == 0, made.stderr.decode()
    res.unchanged[root] = _sha256(root)

    fresh, prealloc = work / "fresh.qcow2", work / "prealloc.qcow2"
    assert _qemu_img("create", "-q", "-f", "qcow2", str(fresh), "64M").returncode == 0
    assert _qemu_img("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata",
                     str(prealloc), "64M").returncode == 0
    chain = _make_chain(work)
    for name in ("base.raw", "c1.qcow2", "c2.qcow2"):
        res.unchanged[work / name] = _sha256(work / name)
    res.disks = {"vdb": fresh, "vdc": prealloc, "vdd": chain}
    for dev, img in res.disks.items():
        res.before[dev] = _to_raw(img, work / f"before-{dev}.raw")

    vm = Vmm(work / "api.sock", "--accel", "emu", "--memory", "1G", "--net", "none",
             "--cmdline", "root=/dev/vda pyvirt.noecho",
             "--disk", f"path={res.overlay},format=qcow2",
             "--disk", f"path={fresh},format=qcow2,cache=none,discard=on",
             "--disk", f"path={prealloc},format=qcow2,discard=on",
             "--disk", f"path={chain},format=qcow2,cache=none,discard=on")
    try:
        vm.wait_for(READY_LINE.encode())
        vm.send(f"echo '{NOTE}' > /root/overlay.txt && sync && echo {marker('NOTE')}$?")
        for d in DATA_DISKS:
            vm.send(f"{FIO.format(d=d)}; echo {marker('FIO')}{d}-$?; "
                    f"grep -h -E 'err=|verify' /tmp/fio-{d}.log; "
                    f"dd if=/dev/urandom of=/dev/{d} bs=1M seek=32 count=8 oflag=direct "
                    f"status=none; blkdiscard -o $((32<<20)) -l $((8<<20)) /dev/{d}; "
                    f"echo {marker('DISCARD')}{d}-$?; "
                    f"dd if=/dev/urandom of=/dev/{d} bs=1M seek=34 count=1 oflag=direct "
                    f"status=none; "
                    f"echo {marker('SHA')}{d}-$(dd if=/dev/{d} bs=1M iflag=direct "
                    f"status=none | sha256sum)")
        vm.send('echo "ALL""DONE"')
        vm.wait_for(b"ALLDONE", timeout=600)
        vm.drain(0.5)
        res.text = vm.text
        print("".join(line for line in res.text.splitlines(keepends=True)
                      if re.search(r"(NOTE|FIO|DISCARD|SHA)=|\s*(rand|holes):.*err=", line)))
        vm.api.power_button()  # pyvirt-init's acpid: root read-only, then power off
        assert vm.exit_status(timeout=120) == 0, vm.text[-3000:]
        assert "reboot: Power down" in vm.text, vm.text[-2000:]
    finally:
        vm.kill()
    return res


# The cached rootfs may be open read-only in other tests' VMs meanwhile; pyvirt's shared
# lock covers the whole file, so QEMU would refuse even to read it without -U.
SHARE = "-U"


def _check_clean(img: Path, *share: str) -> None:
    r = _qemu_img("check", *share, "--output", "json", str(img))
    assert r.returncode == 0, f"qemu-img check {img.name}: {r.returncode}\n{r.stdout}{r.stderr}"
    report = json.loads(r.stdout)
    for key in ("corruptions", "leaks", "check-errors"):
        assert report.get(key, 0) == 0, report


def test_root_file_system_on_a_qcow2_overlay(run: Run, rootfs: Path) -> None:  # noqa: F811
    assert "NOTE=0" in run.text, run.text[-3000:]
    assert _sha256(rootfs) == run.unchanged[rootfs], "the raw rootfs under the overlay changed"
    _check_clean(run.overlay, SHARE)
    info = json.loads(_qemu_img("info", SHARE, "--output", "json", str(run.overlay)).stdout)
    assert info["backing-filename"] == str(rootfs) and info["backing-filename-format"] == "raw"
    assert info["format-specific"]["data"]["corrupt"] is False
    flat = _to_raw(run.overlay, run.dir / "overlay.raw", SHARE)
    fsck = subprocess.run(["e2fsck", "-fn", str(flat)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    cat = subprocess.run(["debugfs", "-R", "cat /root/overlay.txt", str(flat)],
                         capture_output=True, text=True, check=True)
    assert cat.stdout.strip() == NOTE


@pytest.mark.parametrize("dev", DATA_DISKS)
def test_fio_discard_overwrite_then_qemu_img_agrees(run: Run, dev: str) -> None:
    text = run.text
    assert f"FIO={dev}-0" in text and f"DISCARD={dev}-0" in text, text[-4000:]
    assert "verify: bad" not in text and "I/O error" not in text, text[-4000:]
    assert len(re.findall(r" err= 0", text)) == 2 * len(DATA_DISKS), text[-4000:]
    guest = re.search(rf"^SHA={dev}-([0-9a-f]{{64}})", text, re.M)
    assert guest, text[-3000:]
    img = run.disks[dev]
    _check_clean(img)

    seen = _to_raw(img, run.dir / f"after-{dev}.raw")
    assert _sha256(seen) == guest.group(1), f"qemu-img reads {img.name} unlike the guest did"
    with seen.open("rb") as after, run.before[dev].open("rb") as before:
        # the holes job's 28 KiB gaps: copied from the backing file (or zeros), untouched
        for off in range(16 * MiB, 32 * MiB, STRIDE):
            after.seek(off + 4096)
            before.seek(off + 4096)
            assert after.read(STRIDE - 4096) == before.read(STRIDE - 4096), (
                f"{img.name}: the unwritten part of {off + 4096:#x} changed")
        after.seek(UNTOUCHED)
        before.seek(UNTOUCHED)
        assert after.read() == before.read(), f"{img.name}: data the guest never wrote changed"

    # the discarded clusters: not allocated with data in this image any more (a zero
    # cluster, or unallocated so reads fall through to the backing file)
    r = _qemu_img("map", "--output", "json", str(img))
    assert r.returncode == 0, r.stderr
    for start, length in DISCARDED:
        for ext in json.loads(r.stdout):
            if ext["start"] < start + length and start < ext["start"] + ext["length"]:
                assert not (ext["depth"] == 0 and ext["data"]), (
                    f"{img.name}: discarded [{start:#x}, +{length:#x}) still allocated: {ext}")


def test_backing_files_unchanged(run: Run) -> None:
    for path, sha in run.unchanged.items():
        assert _sha256(path) == sha, f"{path.name} changed"
