"""The Debian root filesystem image: built, fsck-clean, and booted under QEMU (TCG).

``pyvirt.guest.rootfs`` debootstraps Debian 12 into an ext4 image; the default
guest's initramfs mounts it as ``root=/dev/vda`` and switch_roots into its
``/sbin/pyvirt-init``. QEMU is the reference VMM here, as in test_guest_image.py.
The image is built through the public API when the cache lacks a current one
(debootstrap: about a minute, needs root and a Debian mirror).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pyvirt.guest import READY_LINE, GuestImage, build_default_guest, guest_is_built
from pyvirt.guest.rootfs import ROOTFS_LABEL, build_rootfs, rootfs_is_built
from tests.integration.test_guest_image import BOOT_TIMEOUT, QEMU, Qemu

pytestmark = [
    pytest.mark.guest,
    pytest.mark.slow,
    pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed"),
]


def _tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.path.exists(p)), None
    )


@pytest.fixture(scope="module")
def image() -> GuestImage:
    quiet = guest_is_built()
    return build_default_guest(log=(lambda _m: None) if quiet else print)


@pytest.fixture(scope="module")
def rootfs() -> Path:
    if not rootfs_is_built():
        if os.geteuid() != 0:
            pytest.skip("the rootfs image is not built and building it needs root")
        if _tool("debootstrap") is None:
            pytest.skip("the rootfs image is not built and debootstrap is not installed")
        return build_rootfs(log=lambda msg: print(msg, flush=True)).path
    return build_rootfs(log=lambda _m: None).path


def _boot(image: GuestImage, disk: Path, append: str, drive_opts: str) -> Qemu:
    return Qemu(
        image,
        f"console=ttyS0 panic=-1 root=/dev/vda {append}".strip(),
        ["-M", "q35",
         "-drive", f"file={disk},if=none,id=d0,format=raw,{drive_opts}",
         "-device", "virtio-blk-pci,drive=d0"],
    )  # fmt: skip


def _poweroff_exits(vm: Qemu) -> None:
    try:
        rc = vm.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"QEMU did not exit after poweroff; output ends:\n{vm.output[-3000:]}")
    assert rc == 0


def test_image_is_clean_ext4(rootfs: Path) -> None:
    e2fsck = _tool("e2fsck")
    if e2fsck is None:
        pytest.skip("e2fsck (e2fsprogs) is not installed")
    r = subprocess.run([e2fsck, "-fn", str(rootfs)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    blkid = subprocess.run(
        [_tool("blkid") or "blkid", "-o", "value", "-s", "LABEL", str(rootfs)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert blkid.stdout.strip() == ROOTFS_LABEL


def test_boot_debian_shell_poweroff(image: GuestImage, rootfs: Path) -> None:
    """No init= given: /init finds /sbin/pyvirt-init; bash on ttyS0 with job control."""
    vm = _boot(image, rootfs, "", "snapshot=on")
    try:
        ready_s = vm.wait_for(READY_LINE, BOOT_TIMEOUT)
        print(f"Debian rootfs: ready line after {ready_s:.1f}s (QEMU TCG)")
        # $((...)) makes the guest compute the markers, so the echoed input never matches.
        vm.send(
            "echo DEB-$(cat /etc/debian_version); fio --version; tty; hostname;"
            " echo PID1=$(cat /proc/1/comm); echo JOBS=$(set -o | grep -c 'monitor.*on');"
            " grep ' / ' /proc/mounts; echo END-$((6*7)); poweroff\n"
        )
        vm.wait_for("END-42", 120)
        _poweroff_exits(vm)
        after = vm.output.split(READY_LINE, 1)[1]
        assert "\nDEB-12." in after
        assert "\nfio-3." in after
        assert "\n/dev/ttyS0\n" in after
        assert "\npyvirt\n" in after
        assert "\nPID1=pyvirt-init\n" in after
        assert "\nJOBS=1\n" in after
        assert "/dev/vda / ext4 rw" in after
        assert "reboot: Power down" in after
    finally:
        vm.close()


def test_init_argument_and_read_only_disk(image: GuestImage, rootfs: Path) -> None:
    """init=/bin/bash replaces pyvirt-init; a write-protected disk is mounted read-only."""
    vm = _boot(image, rootfs, "init=/bin/bash", "readonly=on")
    try:
        vm.wait_for("EXT4-fs (vda): mounted filesystem", BOOT_TIMEOUT, whole_line=False)
        # bash as PID 1 on /dev/console: no job control, no ready line; input is typed
        # ahead of it until it reads.
        vm.send(
            "echo PID1=$(cat /proc/$$/comm)-$$; grep ' / ' /proc/mounts;"
            " echo BYE-$((2+3)); echo o > /proc/sysrq-trigger\n"
        )
        vm.wait_for("BYE-5", 120, whole_line=False)
        _poweroff_exits(vm)
        out = vm.output
        assert "PID1=bash-1" in out
        assert "/dev/vda / ext4 ro" in out
    finally:
        vm.close()


def test_pyvirt_boots_debian_from_its_virtio_disk(image: GuestImage, rootfs: Path,
                                                  tmp_path: Path) -> None:
    """The same image under pyvirt's software CPU: our virtio-blk carries the
    root file system (read-only image, so the cached one is never changed)."""
    from tests.integration.test_emu_boot import EmuVm, marker

    vm = EmuVm("--cmdline", "root=/dev/vda", "--disk", f"path={rootfs},readonly=on")
    try:
        vm.wait_for(READY_LINE.encode())
        vm.send(f"echo {marker('DEB')}$(cat /etc/debian_version) "
                f"{marker('PID1')}$(cat /proc/1/comm) {marker('FIO')}$(fio --version)")
        vm.send("grep ' / ' /proc/mounts | sed 's/^/ROOTMNT /'")
        text = vm.output_then_poweroff()
    finally:
        vm.close()
    assert "DEB=12." in text and "PID1=pyvirt-init" in text and "FIO=fio-3." in text, text[-2000:]
    assert "ROOTMNT /dev/vda / ext4 ro" in text, text[-2000:]


def test_fio_qd32_random_io_verifies(image: GuestImage, rootfs: Path) -> None:
    """32 requests in flight on the software CPU: fio writes 4 KiB blocks at
    random offsets with a CRC in each, reads them all back and checks them,
    then runs random reads; no request may fail and Linux's virtio ring code
    must see a sane used ring throughout (a used index that a vCPU could read
    half-written made it report 'id N is not a head!' and break the queue)."""
    from pyvirt.paths import cache_dir
    from tests.integration.test_emu_boot import EmuVm, marker

    # on the cache's disk: tmpfs has no O_DIRECT (cache=none)
    work = Path(cache_dir()) / f"fio-test-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    scratch = work / "scratch.raw"
    with scratch.open("wb") as f:
        f.truncate(256 << 20)
    common = ("--filename=/dev/vdb --direct=1 --ioengine=libaio --iodepth=32 --bs=4k "
              "--size=64M")
    vm = EmuVm("--memory", "1G", "--cmdline", "root=/dev/vda",
               "--disk", f"path={rootfs},readonly=on",
               "--disk", f"path={scratch},cache=none")
    try:
        vm.wait_for(READY_LINE.encode())
        vm.send(f"fio --name=wv {common} --rw=randwrite --verify=crc32c --do_verify=1 "
                f"--verify_fatal=1 --randrepeat=0 >/tmp/wv.log 2>&1; echo {marker('WV')}$?")
        vm.send(f"fio --name=rr {common} --rw=randread --time_based --runtime=3 "
                f">/tmp/rr.log 2>&1; echo {marker('RR')}$?")
        vm.send("grep -h -E 'err=|IOPS=' /tmp/wv.log /tmp/rr.log")
        vm.send(f"echo {marker('KMSG')}$(dmesg | grep -c -E 'virtio_bl[k]|I/O erro[r]')")
        text = vm.output_then_poweroff(timeout=240)
    finally:
        vm.close()
        shutil.rmtree(work, ignore_errors=True)
    assert "not a head" not in text and "I/O error" not in text, text[-3000:]
    assert "WV=0" in text and "RR=0" in text, text[-3000:]
    # the two probe lines at boot ("1/0/0 ... queues", "[vdb] ... blocks") and nothing more
    assert "KMSG=4" in text, text[-3000:]
    assert " err= 0" in text and " err= 1" not in text, text[-3000:]


def test_pyvirt_power_button_shuts_debian_down_cleanly(image: GuestImage, rootfs: Path,
                                                       tmp_path: Path) -> None:
    """The ACPI power button (the API's power-button action) reaches the Debian
    guest: pyvirt-init's acpid powers it off cleanly (root read-only first), so a
    written file is on the disk and e2fsck finds the file system clean."""
    from tests.integration.test_lifecycle_emu import Vmm

    disk = tmp_path / "rootfs.ext4"
    subprocess.run(["cp", "--sparse=always", str(rootfs), str(disk)], check=True)
    vm = Vmm(tmp_path / "api.sock", "--accel", "emu", "--memory", "512M",
             "--cmdline", "root=/dev/vda pyvirt.noecho", "--disk", f"path={disk}")
    try:
        vm.wait_for(READY_LINE.encode())
        vm.send("echo written > /root/pb.txt && echo \"WRI\"\"TTEN\"")
        vm.wait_for(b"WRITTEN")
        vm.drain(0.5)
        vm.api.power_button()
        assert vm.exit_status(timeout=90) == 0, vm.text[-3000:]
        assert "reboot: Power down" in vm.text, vm.text[-2000:]
    finally:
        vm.kill()
    fsck = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    cat = subprocess.run(["debugfs", "-R", "cat /root/pb.txt", str(disk)], capture_output=True,
                         text=True, check=True)
    assert cat.stdout.strip() == "written"
