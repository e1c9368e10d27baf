"""The VM as a controllable object, end to end with real Linux on the software CPU.

Every API answer is validated against the OpenAPI document
(``tests.api_support.checked_client``). A guest runs a counter loop that
prints ``tick N`` on the console and appends N to a file on an ext4 virtio
disk. Driven through the control API (a real ``pyvirt run --api-socket``):
pause (the console goes quiet), resume, snapshot, kill -9, restore in a new
process: the counter continues from where it stopped, the disk file has no
gap, ``e2fsck -fn`` is clean and the guest's clock is the host's. Then:
snapshot -> restore 20 times in a row, two clones of one snapshot, the
refusals of a bad snapshot, the ACPI power button, Ctrl+Alt+Del and reset
(in place).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirt.guest import READY_LINE, GuestImage, build_default_guest, guest_is_built
from tests.api_support import checked_client
from tests.conftest import pyvirt_cmd, read_until
from tests.integration.test_emu_boot import EmuVm

pytest.importorskip("unicorn")
from pyvirt.api.client import ApiError, VmClient
from pyvirt.hypervisor.emulated import engine

pytestmark = [
    pytest.mark.guest,
    pytest.mark.slow,
    pytest.mark.skipif(not engine.available(), reason="unicorn lacks pyvirt's patches"),
]

BOOT_TIMEOUT = 180.0
READY = READY_LINE.encode()
TICK = re.compile(rb"tick (\d+)\r?\n")


@pytest.fixture(scope="module")
def image() -> GuestImage:
    if not guest_is_built():
        return build_default_guest(log=lambda msg: print(msg, flush=True))
    return build_default_guest(log=lambda _msg: None)


def make_disk(path: Path, size_mb: int = 64) -> Path:
    with open(path, "wb") as f:
        f.truncate(size_mb << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(path)], check=True)
    return path


class Vmm(EmuVm):
    """One ``pyvirt run`` process with stdin/stdout on pipes and an API socket."""

    def __init__(self, sock: Path, *args: str) -> None:  # not EmuVm's: other options
        self.sock = sock
        self.proc = subprocess.Popen(
            pyvirt_cmd("run", "--api-socket", str(sock), *args),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.out = b""
        self._api: VmClient | None = None

    def drain(self, seconds: float) -> bytes:
        """Whatever the guest prints in the next ``seconds``."""
        assert self.proc.stdout is not None
        got = b""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            got += read_until(self.proc.stdout.fileno(), b"\0never\0", left)
        self.out += got
        return got

    @property
    def api(self) -> VmClient:
        if self._api is None:
            deadline = time.monotonic() + 30
            while not self.sock.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            self._api = checked_client(self.sock)  # every answer checked against OpenAPI
        return self._api

    def ticks(self) -> list[int]:
        return [int(n) for n in TICK.findall(self.out)]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate()
        if self._api is not None:
            self._api.close()


@pytest.fixture
def vmms() -> Iterator[list[Vmm]]:
    made: list[Vmm] = []
    yield made
    for v in made:
        v.kill()


COUNTER = ("mount /dev/vda /mnt && i=0 && "
           "while true; do i=$((i+1)); echo $i >> /mnt/counter; echo \"tick $i\"; "
           "sleep 0.3; done &")


def boot(vmms: list[Vmm], tmp: Path, disk: Path, *extra: str, name: str = "api") -> Vmm:
    v = Vmm(tmp / f"{name}.sock", "--accel", "emu", "--memory", "512M",
            "--disk", f"path={disk}", "--cmdline", "pyvirt.noecho", *extra)
    vmms.append(v)
    v.wait_for(READY)
    return v


def restore(vmms: list[Vmm], tmp: Path, snap: Path, *extra: str, name: str) -> Vmm:
    v = Vmm(tmp / f"{name}.sock", "--restore", str(snap), *extra)
    vmms.append(v)
    return v


def test_pause_resume_snapshot_kill_restore(image: GuestImage, tmp_path: Path,
                                            vmms: list[Vmm]) -> None:
    disk = make_disk(tmp_path / "disk.img")
    v = boot(vmms, tmp_path, disk)
    v.send(COUNTER)
    v.wait_for(b"tick 5\r\n", timeout=60)
    assert v.api.info()["state"] == "running"

    v.api.pause()
    assert v.api.info()["state"] == "paused"
    v.drain(0.3)  # a line already on its way out
    quiet = v.drain(1.5)
    assert b"tick" not in quiet, "the guest printed while paused"
    with pytest.raises(ApiError) as refused:
        v.api.pause()
    assert refused.value.status == 409

    v.api.resume()
    before = max(v.ticks())
    v.wait_for(f"tick {before + 2}\r\n".encode(), timeout=30)

    v.api.pause()
    v.drain(0.3)
    last = max(v.ticks())
    snap = tmp_path / "snap"
    result = v.api.snapshot(str(snap))
    assert snap.is_dir() and (snap / "manifest.json").exists()
    assert result["memory_bytes_written"] < 512 << 20  # sparse
    assert (snap / "memory.bin").stat().st_blocks * 512 < 200 << 20
    v.kill()  # kill -9: nothing after the snapshot is written anywhere

    time.sleep(3)  # the restored guest's clock must catch up with these
    r = restore(vmms, tmp_path, snap, "--resume", name="restored")
    r.wait_for(f"tick {last + 3}\r\n".encode(), timeout=60)
    after = r.ticks()
    assert after[0] == last + 1, f"the counter went on from {after[0]}, not {last + 1}"
    assert after == list(range(last + 1, last + 1 + len(after)))
    r.send("kill %1; wait; echo \"EP\"\"OCH=$(date +%s)\"")
    r.wait_for(b"EPOCH=", timeout=30)
    r.drain(0.2)
    epoch = int(re.search(rb"EPOCH=(\d+)", r.out).group(1))  # type: ignore[union-attr]
    assert abs(epoch - time.time()) <= 2.0, "the restored guest's clock is not the host's"
    r.send("umount /mnt; poweroff")
    assert r.exit_status() == 0, r.text[-3000:]

    fsck = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    dump = subprocess.run(["debugfs", "-R", "cat /counter", str(disk)], capture_output=True,
                          text=True, check=True).stdout.split()
    numbers = [int(x) for x in dump]
    assert numbers == list(range(1, len(numbers) + 1)), "a gap or a repeat in the disk file"
    assert numbers[-1] >= last + 3


def test_snapshot_restore_twenty_times(image: GuestImage, tmp_path: Path,
                                       vmms: list[Vmm]) -> None:
    disk = make_disk(tmp_path / "disk.img", 32)
    v = boot(vmms, tmp_path, disk)
    v.send(COUNTER)
    v.wait_for(b"tick 2\r\n", timeout=60)
    current = v
    seen: list[int] = []
    for n in range(20):
        current.api.pause()
        current.drain(0.2)
        seen.extend(current.ticks())
        snap = tmp_path / "snap"  # the same directory each time: replaced whole
        current.api.snapshot(str(snap))
        current.kill()
        current = restore(vmms, tmp_path, snap, "--resume", name=f"r{n}")
        last = seen[-1]
        current.wait_for(f"tick {last + 1}\r\n".encode(), timeout=60)
    seen.extend(current.ticks())
    uniq = sorted(set(seen))
    assert uniq == list(range(1, uniq[-1] + 1)), "the counter skipped"
    current.send("kill %1; umount /mnt; poweroff")
    assert current.exit_status() == 0, current.text[-2000:]
    fsck = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout


def test_clones_and_refusals(image: GuestImage, tmp_path: Path, vmms: list[Vmm]) -> None:
    disk = make_disk(tmp_path / "disk.img", 32)
    v = boot(vmms, tmp_path, disk)
    v.send(COUNTER)
    v.wait_for(b"tick 2\r\n", timeout=60)
    v.api.pause()
    snap = tmp_path / "snap"
    v.api.snapshot(str(snap))
    v.kill()

    # two clones of one snapshot, each on its own copy of the disk
    clones = []
    for name in ("a", "b"):
        copy = tmp_path / f"disk-{name}.img"
        shutil.copy(disk, copy)
        clones.append(restore(vmms, tmp_path, snap, "--resume", "--disk", f"path={copy}",
                              name=f"clone-{name}"))
    for c in clones:
        c.wait_for(b"tick 4\r\n", timeout=60)
    # the same disk twice is refused by its lock
    dup = subprocess.run(pyvirt_cmd("run", "--restore", str(snap), "--disk",
                                    f"path={tmp_path / 'disk-a.img'}"),
                         capture_output=True, text=True, timeout=60)
    assert dup.returncode == 2 and "in use by process" in dup.stderr, dup.stderr
    for c in clones:
        c.kill()

    def refused(target: Path, *extra: str) -> str:
        p = subprocess.run(pyvirt_cmd("run", "--restore", str(target), *extra),
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2, (p.returncode, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert "Traceback" not in p.stderr
        return p.stderr

    def variant(name: str) -> Path:
        out = tmp_path / name
        shutil.copytree(snap, out)
        return out

    bad = variant("corrupt")
    data = bytearray((bad / "state.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "state.bin").write_bytes(bytes(data))
    assert "checksum" in refused(bad)

    bad = variant("truncated")
    with open(bad / "memory.bin", "r+b") as f:
        f.truncate(100 << 20)
    assert "truncated" in refused(bad)

    bad = variant("nomem")
    (bad / "memory.bin").unlink()
    assert "memory.bin is missing" in refused(bad)

    bad = variant("version")
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["pyvirt_version"] = "0.0.1"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    assert "pyvirt '0.0.1'" in refused(bad)

    bad = variant("backend")
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["backend"] = "kvm"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    assert "backend" in refused(bad)

    with open(disk, "r+b") as f:
        f.truncate(48 << 20)
    assert "size changed" in refused(snap)

    assert "not a directory" in refused(tmp_path / "nowhere")


def test_power_button_powers_off_cleanly(image: GuestImage, tmp_path: Path,
                                         vmms: list[Vmm]) -> None:
    disk = make_disk(tmp_path / "disk.img", 32)
    v = boot(vmms, tmp_path, disk)
    v.send("mount /dev/vda /mnt && echo data > /mnt/f && echo \"MOUN\"\"TED\"")
    v.wait_for(b"MOUNTED")
    v.drain(0.5)
    # sandboxed (auto): snapshots go beneath the API socket's directory only
    v.api.pause()
    with pytest.raises(ApiError) as outside:
        v.api.snapshot("/var/tmp/pyvirt-test-outside-root")
    assert outside.value.status == 400 and "outside the snapshot directory" in str(outside.value)
    assert not Path("/var/tmp/pyvirt-test-outside-root").exists()
    with pytest.raises(ApiError) as not_running:
        v.api.power_button()
    assert not_running.value.status == 409 and "paused" in str(not_running.value)
    v.api.resume()
    v.api.power_button()
    assert v.exit_status(timeout=60) == 0, v.text[-3000:]
    assert "reboot: Power down" in v.text, v.text[-2000:]
    fsck = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout


def test_ctrl_alt_del_and_reset_in_place(image: GuestImage, tmp_path: Path,
                                         vmms: list[Vmm]) -> None:
    disk = make_disk(tmp_path / "disk.img", 32)
    v = boot(vmms, tmp_path, disk)
    pid = v.proc.pid
    rss_before = _rss(pid)
    v.api.ctrl_alt_del()  # inittab: ::ctrlaltdel:/sbin/reboot
    v.wait_for(READY, count=2)
    assert v.api.info()["boot_count"] == 2
    v.api.reset()
    v.wait_for(READY, count=3)
    info = v.api.info()
    assert info["boot_count"] == 3 and info["state"] == "running"
    # reset in place: the same process, RAM not allocated again
    assert v.proc.pid == pid
    assert _rss(pid) < rss_before + (64 << 20)
    # the command line against the real VM
    ctl = subprocess.run(pyvirt_cmd("ctl", str(v.sock), "info", "--json"), capture_output=True,
                         text=True, timeout=60)
    assert ctl.returncode == 0 and json.loads(ctl.stdout)["boot_count"] == 3, ctl.stderr
    bad = subprocess.run(pyvirt_cmd("ctl", str(v.sock), "resume"), capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "not paused" in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    metrics = subprocess.run(pyvirt_cmd("ctl", str(v.sock), "metrics"), capture_output=True,
                             text=True, timeout=60)
    assert 'pyvirt_vm_boots_total 3' in metrics.stdout, metrics.stdout[:2000]
    assert 'pyvirt_vcpu_exits_total{vcpu="0",kind="io"}' in metrics.stdout
    v.api.pause()
    v.api.reset()  # legal while paused: stays paused
    assert v.api.info()["state"] == "paused"
    v.api.resume()
    v.wait_for(READY, count=4)
    v.api.stop()
    assert v.exit_status() == 0


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
