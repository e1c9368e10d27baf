"""The default Linux guest on the KVM backend, where ``--accel auto`` would choose KVM.

On hosts whose /dev/kvm is PVM (this project's machines) a stock kernel's
ring-0 code is interpreted instruction by instruction and cannot boot in
useful time, so there this test is skipped by design and the KVM backend is
proven by tests/integration/test_kvm_guests.py; real Linux boots are proven on
the software CPU (test_emu_boot.py). On a VT-x/AMD-V host this runs.
"""

from __future__ import annotations

import subprocess

import pytest

from pyvirt.hypervisor import probe_host
from tests.conftest import pyvirt_cmd, read_until

pytestmark = [pytest.mark.kvm, pytest.mark.guest]


@pytest.mark.skipif(not probe_host().hardware_kvm,
                    reason="/dev/kvm is not hardware virtualization here (auto picks emu)")
def test_default_guest_on_kvm_to_shell_and_poweroff() -> None:
    from pyvirt.guest import READY_LINE
    from pyvirt.guest.build import build_default_guest

    g = build_default_guest()
    p = subprocess.Popen(pyvirt_cmd("run", "--accel", "kvm", "--cpus", "2", "--memory", "512M"),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stdin is not None
    out = read_until(p.stdout.fileno(), READY_LINE.encode(), 120)
    assert READY_LINE.encode() in out, out[-2000:]
    p.stdin.write(b"uname -r; grep -c ^processor /proc/cpuinfo; poweroff\n")
    p.stdin.flush()
    rest, _ = p.communicate(timeout=120)
    text = (out + rest).decode(errors="replace")
    assert g.kernel_version in text
    assert p.returncode == 0
