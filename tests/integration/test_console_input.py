"""The README's own example: commands piped into ``pyvirt run`` before the guest boots
reach its shell whole, on the serial console and on the virtio console (hvc0).

Input that is all there before boot meets every step of the guest bringing its
console up: Linux's 8250 probe and port start-up resetting the UART FIFO, the
virtio console's port being added, the tty being opened and closed. The serial
port lost the first two bytes (``ame -a`` ran), hvc0 lost everything. Each is
booted several times in a row, as the loss was 3 runs out of 3.
"""

from __future__ import annotations

import subprocess

import pytest

from pyvirt.guest import GuestImage, build_default_guest, guest_is_built
from tests.conftest import run_pyvirt

pytest.importorskip("unicorn")

from pyvirt.hypervisor.emulated import engine

pytestmark = [
    pytest.mark.guest,
    pytest.mark.slow,
    pytest.mark.skipif(not engine.available(), reason="unicorn lacks pyvirt's patches"),
]

BOOT_TIMEOUT = 240.0  # boot + command + power-off on a software CPU, busy 2-core box
README_INPUT = b"uname -a; poweroff\n"
RUNS = 3


@pytest.fixture(scope="module")
def image() -> GuestImage:
    if not guest_is_built():
        return build_default_guest(log=lambda msg: print(msg, flush=True))
    return build_default_guest(log=lambda _msg: None)


@pytest.mark.parametrize("run", range(RUNS))
@pytest.mark.parametrize("console", ["serial", "virtio"])
def test_input_piped_before_boot_reaches_the_shell(image: GuestImage, console: str,
                                                   run: int) -> None:
    args = ["run", "--accel", "emu"] + (["--console", "virtio"] if console == "virtio" else [])
    try:
        r = run_pyvirt(*args, input=README_INPUT, timeout=BOOT_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        seen = (exc.stdout or b"")[-3000:].decode(errors="replace")
        pytest.fail(f"no power-off within {BOOT_TIMEOUT:.0f}s: the shell never got "
                    f"the command; output ends:\n{seen}")
    out = r.stdout.decode(errors="replace")
    tail = (out + r.stderr.decode(errors="replace"))[-3000:]
    # uname -a's own line (the kernel log says "Linux version ...", never this), so
    # the shell ran the command whole; then poweroff ran too: exit status 0.
    assert f"Linux pyvirt {image.kernel_version} " in out, tail
    assert "not found" not in out, tail
    assert r.returncode == 0, tail
