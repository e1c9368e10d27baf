"""PCI and virtio under KVM, driven by the test guest's own virtio-blk driver.

``test=virtio-blk`` (tests/guests/guest.c) is a small virtio 1.2 modern PCI
driver written to the spec: it finds 1af4:1042 with configuration mechanism
#1, walks the capability list through ECAM, sizes BAR0 and moves it from the
64-bit window into the 32-bit one (re-registering the notify ioeventfd),
enables MSI-X vector 0 (a KVM GSI route fed by an irqfd), negotiates
VERSION_1 + EVENT_IDX + INDIRECT_DESC, and runs one split queue: four
requests posted before one kick (read sector 0, GET_ID, two 4-sector writes
at sector 16, one through an indirect table), FLUSH, then reads sectors 16-23
back, sleeping in hlt until the MSI arrives.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_pyvirt

pytestmark = pytest.mark.kvm

SECTOR = 512
SECTOR0 = b"pyvirt test image, sector zero.\n"
#: what the guest writes at sector 16 (8 sectors): guest.c pattern()
PATTERN = bytes(((i * 7) ^ (i >> 9) ^ 0xA5) & 0xFF for i in range(8 * SECTOR))
SUMMARY = re.compile(rb"virtio-blk: capacity=(\d+) sectors serial=(\S*) (.*), irqs=(\d+)\r?\n")


def fnv1a(data: bytes) -> int:
    h = 2166136261
    for b in data:
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


def make_image(path: Path, size: int = 1 << 20) -> bytes:
    """A 1 MiB image: text + a byte pattern in sector 0, 0x5A filler elsewhere."""
    img = bytearray(b"\x5a" * size)
    img[:SECTOR] = SECTOR0 + bytes((i * 13) & 0xFF for i in range(len(SECTOR0), SECTOR))
    path.write_bytes(img)
    return bytes(img)


def boot(guest: Path, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return run_pyvirt("run", "--accel", "kvm", "--kernel", str(guest), "--memory", "128M",
                      "--cmdline", "test=virtio-blk", *extra, timeout=timeout)


def check_common(out: bytes, image: bytes) -> re.Match[bytes]:
    """What every run must show: the BAR move, sector 0, and the summary line."""
    assert b"FAIL" not in out, out
    bar = re.search(rb"BAR0 ([0-9a-f]{16}) -> ([0-9a-f]{16}) size 00008000", out)
    assert bar, out
    assert int(bar.group(1), 16) >= 1 << 32  # the VMM placed it in the 64-bit window
    assert int(bar.group(2), 16) == 0xD000_0000
    assert f"sector0 fnv1a={fnv1a(image[:SECTOR]):08x} ".encode() in out
    assert b"text=" + SECTOR0.rstrip() in out
    assert b"event_idx=1 indirect=1" in out
    m = SUMMARY.search(out)
    assert m, out
    assert int(m.group(1)) == len(image) // SECTOR
    assert int(m.group(4)) > 0  # completions came as MSI-X interrupts
    return m


def test_virtio_blk_write_flush_read_back(test_guest: Path, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    before = make_image(img)
    r = boot(test_guest, "--disk", f"path={img},serial=pyvirt-test-1")
    assert r.returncode == 0, (r.stdout, r.stderr)
    m = check_common(r.stdout, before)
    assert m.group(2) == b"pyvirt-test-1"
    assert m.group(3) == b"wrote+read 8 sectors ok"
    assert b"read-only" not in r.stdout
    after = img.read_bytes()
    assert after[16 * SECTOR:24 * SECTOR] == PATTERN  # the guest's data reached the file
    assert after[:16 * SECTOR] == before[:16 * SECTOR]  # and nothing else changed
    assert after[24 * SECTOR:] == before[24 * SECTOR:]


def test_virtio_blk_read_only_disk_rejects_writes(test_guest: Path, tmp_path: Path) -> None:
    img = tmp_path / "ro.img"
    before = make_image(img)
    r = boot(test_guest, "--disk", f"path={img},readonly=on,serial=ro-disk")
    assert r.returncode == 0, (r.stdout, r.stderr)
    out = r.stdout
    assert b"virtio-blk: read-only device (VIRTIO_BLK_F_RO)" in out
    assert b"write sectors 16-19 status=1 (IOERR) len=1" in out
    assert b"write sectors 20-23 status=1 (IOERR) len=1" in out
    m = check_common(out, before)
    assert m.group(2) == b"ro-disk"
    assert m.group(3) == b"read-only: writes rejected with IOERR, data unchanged"
    assert img.read_bytes() == before


# Runs pyvirt with the notify path and the routing calls recorded: a kick that
# reached user space would show up as a BAR0 write at the notify offset.
_INSTRUMENTED = r"""
import atexit, sys
import pyvirt.hypervisor.kvm as kvm
import pyvirt.virtio.pci as vp
events = []
bar_write = vp.VirtioPciDevice.bar_write
def traced_bar_write(self, off, data):
    if vp.NOTIFY_OFF <= off < vp.NOTIFY_OFF + vp.NOTIFY_MULT * len(self.queues):
        events.append(f"notify-exit {self.name}")
    return bar_write(self, off, data)
vp.VirtioPciDevice.bar_write = traced_bar_write
add, remove, set_msi = kvm.KvmVm.add_ioeventfd, kvm.KvmVm.remove_ioeventfd, kvm.KvmVm._set_msi
def traced_add(self, addr, length, fd):
    events.append(f"ioeventfd+ {addr:#x} {length}")
    return add(self, addr, length, fd)
def traced_remove(self, addr, length, fd):
    events.append(f"ioeventfd- {addr:#x} {length}")
    return remove(self, addr, length, fd)
def traced_set_msi(self, gsi, address, data):
    events.append(f"msi gsi={gsi} {address:#x} {data:#x}")
    return set_msi(self, gsi, address, data)
kvm.KvmVm.add_ioeventfd = traced_add
kvm.KvmVm.remove_ioeventfd = traced_remove
kvm.KvmVm._set_msi = traced_set_msi
atexit.register(lambda: print("\n".join(["EVENTS"] + events), file=sys.stderr))
from pyvirt.cli.main import main
sys.argv[0] = "pyvirt"
main()
"""


def test_virtio_blk_kicks_and_interrupts_stay_in_the_kernel(test_guest: Path,
                                                             tmp_path: Path) -> None:
    """The moved BAR's notify address is an ioeventfd (no kick exits to us) and
    the MSI-X entry became a KVM MSI route with the guest's message."""
    img = tmp_path / "disk.img"
    before = make_image(img)
    r = subprocess.run(
        [sys.executable, "-c", _INSTRUMENTED, "run", "--accel", "kvm", "--kernel",
         str(test_guest), "--memory", "128M", "--cmdline", "test=virtio-blk", "--no-rng",
         "--net", "none", "--disk", f"path={img}"],
        capture_output=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, (r.stdout, r.stderr)
    check_common(r.stdout, before)
    events = r.stderr.decode().split("EVENTS\n", 1)[1].splitlines()
    old = re.search(rb"BAR0 ([0-9a-f]{16})", r.stdout)
    assert old
    old_notify = int(old.group(1), 16) + 0x3000
    assert events[:3] == [f"ioeventfd+ {old_notify:#x} 2", f"ioeventfd- {old_notify:#x} 2",
                          "ioeventfd+ 0xd0003000 2"], events
    kicks = re.search(rb"kicks=(\d+)", r.stdout)
    assert kicks and int(kicks.group(1)) > 0
    assert not [e for e in events if e.startswith("notify-exit")], events
    msi = [e for e in events if e.startswith("msi ")]
    assert len(msi) == 1 and msi[0].endswith(" 0xfee00000 0x50"), events
