"""The default Linux guest on the software CPU (``--accel emu``), end to end.

Boots the Debian kernel + busybox initramfs as a user would (``pyvirt run``
with commands piped in once the ready line shows), checks the shell answers,
then power-off and the two ``--on-reboot`` behaviours.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from pyvirt.guest import READY_LINE, GuestImage, build_default_guest, guest_is_built
from tests.conftest import pyvirt_cmd, read_until

pytest.importorskip("unicorn")

from pyvirt.hypervisor.emulated import engine
from pyvirt.hypervisor.emulated.backend import ENGINE_DESCRIPTION

pytestmark = [
    pytest.mark.guest,
    pytest.mark.slow,
    pytest.mark.skipif(not engine.available(), reason="unicorn lacks pyvirt's patches"),
]

BOOT_TIMEOUT = 180.0  # a software CPU on a busy 2-core box
READY = READY_LINE.encode()


@pytest.fixture(scope="module")
def image() -> GuestImage:
    if not guest_is_built():
        return build_default_guest(log=lambda msg: print(msg, flush=True))
    return build_default_guest(log=lambda _msg: None)


class EmuVm:
    """``pyvirt run --accel emu`` with stdin/stdout on pipes (stderr merged)."""

    def __init__(self, *extra: str) -> None:
        self.proc = subprocess.Popen(
            pyvirt_cmd("run", "--accel", "emu", "--memory", "512M", *extra),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.out = b""

    def wait_for(self, needle: bytes, timeout: float = BOOT_TIMEOUT, count: int = 1) -> None:
        """Until ``needle`` has appeared ``count`` times in the output."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while self.out.count(needle) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            chunk = read_until(self.proc.stdout.fileno(), needle, left)
            if not chunk:
                break
            self.out += chunk
        if self.out.count(needle) < count:
            tail = self.out[-3000:].decode(errors="replace")
            pytest.fail(f"{needle!r} x{count} not seen within {timeout:.0f}s; output ends:\n{tail}")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def exit_status(self, timeout: float = 60) -> int:
        try:
            rest, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rest, _ = self.proc.communicate()
            pytest.fail(f"pyvirt did not exit; output ends:\n{self.text[-3000:]}")
        self.out += rest
        return self.proc.returncode

    @property
    def text(self) -> str:
        return self.out.decode(errors="replace").replace("\r", "")

    def output_then_poweroff(self, timeout: float = 60) -> str:
        """Wait until the guest has run every line sent so far, then power it
        off (exit status 0 required); the console text up to that point."""
        self.send('echo "DONE-""MARK"')
        self.wait_for(b"DONE-MARK", timeout=timeout)
        text = self.text
        self.send("poweroff")
        assert self.exit_status() == 0, self.text[-3000:]
        return text

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def vm_factory() -> Iterator[type[EmuVm]]:
    made: list[EmuVm] = []

    class Tracked(EmuVm):
        def __init__(self, *extra: str) -> None:
            super().__init__(*extra)
            made.append(self)

    yield Tracked
    for vm in made:
        vm.close()


def marker(name: str) -> str:
    """``echo "N""AME=..."``: the tty echo of the command never matches ``NAME=``."""
    return f'"{name[0]}""{name[1:]}="'


def test_boot_shell_and_poweroff(image: GuestImage, vm_factory: type[EmuVm]) -> None:
    vm = vm_factory()
    vm.wait_for(READY)
    vm.send(f"echo {marker('UNAME')}$(uname -r)")
    vm.send(f"echo {marker('NPROC')}$(grep -c ^processor /proc/cpuinfo)")
    vm.send(f"echo {marker('EPOCH')}$(date +%s)")
    vm.send('echo "DONE-""MARK"')
    vm.wait_for(b"DONE-MARK", timeout=60)
    host_now = time.time()
    text = vm.text
    uname = re.search(r"^UNAME=(\S+)$", text, re.M)
    assert uname and uname.group(1) == image.kernel_version, text[-2000:]
    nproc = re.search(r"^NPROC=(\d+)$", text, re.M)
    assert nproc and int(nproc.group(1)) == 1, text[-2000:]
    epoch = re.search(r"^EPOCH=(\d+)$", text, re.M)
    assert epoch and abs(int(epoch.group(1)) - host_now) < 60, text[-2000:]
    vm.send("poweroff")
    assert vm.exit_status() == 0, vm.text[-3000:]
    assert "unchecked MSR access" not in vm.text
    assert "Call Trace" not in vm.text


def test_reboot_restarts_then_poweroff(image: GuestImage, vm_factory: type[EmuVm]) -> None:
    vm = vm_factory("--on-reboot", "restart")
    vm.wait_for(READY)
    vm.send("reboot")
    vm.wait_for(READY, count=2)
    vm.send("poweroff")
    assert vm.exit_status() == 0, vm.text[-3000:]
    assert vm.text.count("Linux version") == 2


def test_reboot_exit_and_verbose(image: GuestImage, vm_factory: type[EmuVm]) -> None:
    vm = vm_factory("--on-reboot", "exit", "--verbose")
    vm.wait_for(READY)
    vm.send("reboot")
    assert vm.exit_status() == 0, vm.text[-3000:]
    text = vm.text
    assert text.count("Linux version") == 1
    assert "accelerator: emu" in text
    assert ENGINE_DESCRIPTION in text  # printed by the runner from EmulatedHypervisor.description
