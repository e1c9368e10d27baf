"""What lives as long as the VM, end to end: disk locks across guest reboots and
beside an initrd of the same file, stopping during set-up, and the terminal on
SIGHUP/SIGQUIT.

The lock tests boot the Debian guest on the software CPU; the signal tests use
the small test guest (tests/guests) on the software CPU, which boots in a
fraction of a second.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pyvirt.guest import READY_LINE, GuestImage
from tests.conftest import pyvirt_cmd, read_until
from tests.integration.test_emu_boot import EmuVm, image, vm_factory

__all__ = ["image", "vm_factory"]  # fixtures re-exported for pytest

READY = READY_LINE.encode()
_FLOCK = struct.Struct("@hhqqi4x")


def _try_lock(fd: int) -> bool:
    """Take an exclusive OFD lock on ``fd`` (as a second VM would); True if we got it."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
    except OSError:
        return False
    return True


@pytest.mark.guest
@pytest.mark.slow
def test_guest_reboot_keeps_the_disk_locked(image: GuestImage, vm_factory: type[EmuVm],
                                            tmp_path: Path) -> None:
    """Another process trying all through a guest reboot never gets the image,
    and the VM lives on (the disk used to be closed and reopened per boot)."""
    disk = tmp_path / "data.img"
    disk.write_bytes(bytes(1 << 20))
    vm = vm_factory("--disk", f"path={disk}")
    vm.wait_for(READY)
    fd = os.open(disk, os.O_RDWR)
    got = threading.Event()
    stop = threading.Event()

    def grab() -> None:
        while not stop.is_set():
            if _try_lock(fd):  # and keep it, as a second VM would
                got.set()
                return
            time.sleep(0.001)

    t = threading.Thread(target=grab)
    t.start()
    try:
        vm.send("reboot")
        vm.wait_for(READY, count=2)
    finally:
        stop.set()
        t.join()
    try:
        assert not got.is_set(), "another process took the image during the guest's reboot"
        assert vm.text.count("Linux version") == 2
        vm.output_then_poweroff()
    finally:
        os.close(fd)


@pytest.mark.guest
@pytest.mark.slow
def test_initrd_that_is_also_a_writable_disk_stays_locked(
        image: GuestImage, vm_factory: type[EmuVm], tmp_path: Path) -> None:
    """Reading the initrd (open, read, close) used to drop the disk's POSIX lock."""
    initrd = tmp_path / "initrd.img"
    shutil.copyfile(image.initrd, initrd)
    vm = vm_factory("--kernel", str(image.kernel), "--initrd", str(initrd),
                    "--disk", f"path={initrd}")
    vm.wait_for(READY)
    fd = os.open(initrd, os.O_RDWR)
    try:
        assert not _try_lock(fd), "the image lock was lost while the VM runs"
    finally:
        os.close(fd)
    vm.output_then_poweroff()


_SLOW_SETUP = """
import sys, time
import pyvirt.vmm.machine as machine

def slow_attach_kernel(*args, **kwargs):
    sys.stderr.write("SLOW-STEP\\n")
    sys.stderr.flush()
    time.sleep(300)  # a set-up step that takes its time (or blocks)
    raise AssertionError("not interrupted")

machine.attach_kernel = slow_attach_kernel
from pyvirt.cli.main import main
sys.argv[0] = "pyvirt"
main()
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=lambda s: s.name)
def test_signal_during_a_slow_set_up_step(test_guest: Path, tmp_path: Path,
                                          sig: signal.Signals) -> None:
    """A stop signal while setting up ends pyvirt at once with 128 + the signal,
    one line, the disk unlocked and the console file never created."""
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    log = tmp_path / "console.log"
    p = subprocess.Popen([sys.executable, "-c", _SLOW_SETUP, "run", "--accel", "emu",
                          "--kernel", str(test_guest), "--memory", "64M",
                          "--disk", f"path={disk}", "--console", f"file:{log}"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    assert p.stderr is not None
    try:
        assert b"SLOW-STEP" in read_until(p.stderr.fileno(), b"SLOW-STEP", timeout=60)
        t0 = time.monotonic()
        p.send_signal(sig)
        rc = p.wait(timeout=20)
        assert time.monotonic() - t0 < 10
        err = p.stderr.read().decode()
    finally:
        if p.poll() is None:
            p.kill()
        p.communicate()
    assert rc == 128 + sig, err
    assert err.strip() == f"pyvirt: terminating on {sig.name} during set-up", err
    assert not log.exists()
    fd = os.open(disk, os.O_RDWR)
    try:
        assert _try_lock(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT], ids=lambda s: s.name)
def test_hangup_restores_the_terminal(test_guest: Path, sig: signal.Signals) -> None:
    """SIGHUP (the terminal went away) and SIGQUIT stop the VM like SIGTERM: the
    terminal leaves raw mode and pyvirt exits 0, as on any stop by signal."""
    import pty
    import termios

    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    p = subprocess.Popen(pyvirt_cmd("run", "--accel", "emu", "--kernel", str(test_guest),
                                    "--memory", "64M", "--cmdline", "test=halt"),
                         stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    try:
        assert b"halting" in read_until(master, b"halting")
        assert not termios.tcgetattr(slave)[3] & termios.ICANON  # raw while running
        p.send_signal(sig)
        assert p.wait(timeout=30) == 0
        assert termios.tcgetattr(slave) == before
        assert f"terminating on {sig.name}".encode() in read_until(master, sig.name.encode(), 5)
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
        os.close(slave)
