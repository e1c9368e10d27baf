"""``pyvirt run --config FILE`` boots the default guest on the software CPU from a
JSON document alone: console to a file, a disk, and the guest powering itself off."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

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

BOOT_TIMEOUT = 240.0  # a software CPU on a busy 2-core box


@pytest.fixture(scope="module")
def image() -> GuestImage:
    if not guest_is_built():
        return build_default_guest(log=lambda msg: print(msg, flush=True))
    return build_default_guest(log=lambda _msg: None)


def test_config_file_boots_and_powers_off(image: GuestImage, tmp_path: Path) -> None:
    disk = tmp_path / "data.img"
    disk.write_bytes(bytes(1 << 20))
    log = tmp_path / "console.log"
    (tmp_path / "vm.json").write_text(json.dumps({
        "kernel": str(image.kernel), "initrd": str(image.initrd),
        # busybox poweroff as the first process: -f powers off at once (ACPI S5)
        "cmdline": "rdinit=/sbin/poweroff -f",
        "memory": "256M", "accel": "emu", "console": {"kind": "file", "path": str(log)},
        "disks": [{"path": str(disk), "serial": "cfgdisk"}], "rng": False,
        "on_reboot": "exit",
    }))
    try:
        r = run_pyvirt("run", "--config", str(tmp_path / "vm.json"), timeout=BOOT_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no power-off within {BOOT_TIMEOUT:.0f}s; console ends:\n"
                    f"{log.read_text(errors='replace')[-3000:] if log.exists() else ''}")
    text = log.read_text(errors="replace")
    assert r.returncode == 0, (r.stderr.decode(errors="replace"), text[-3000:])
    assert r.stdout == b""  # the console went to the file, not the terminal
    assert f"Linux version {image.kernel_version}" in text, text[-3000:]
    # the document's devices: its disk (virtio-blk, 1af4:1042), and no rng (1af4:1044)
    assert "[1af4:1042]" in text and "[1af4:1044]" not in text, text[-3000:]
    assert "reboot: Power down" in text, text[-3000:]
