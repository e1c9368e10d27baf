"""``pyvirt run --sandbox``: the running VMM is confined, and the VM still works.

The probe (``PYVIRT_TEST_SANDBOX_PROBE``, a test-only hook) makes the VMM,
right after the sandbox is applied, print its privileges, try to open each
path it is given, and make a forbidden syscall (socket(AF_INET)), which kills
it with SIGSYS. Then real guests run under the sandbox: the Debian kernel on
the software CPU with disks, rng and the virtio console across a reboot, and
the KVM test guest (its own virtio-blk driver, resets, console to a file).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvirt.guest import READY_LINE, GuestImage
from pyvirt.sandbox import PROBE_ENV, landlock, seccomp
from tests.conftest import pyvirt_cmd, run_pyvirt
from tests.integration.test_emu_boot import EmuVm, image, vm_factory
from tests.integration.test_kvm_virtio import SECTOR, check_common, make_image

__all__ = ["image", "vm_factory"]  # fixtures re-exported for pytest

READY = READY_LINE.encode()
APPLIED = "sandbox: no_new_privs, landlock (ABI {abi}), capabilities dropped, seccomp allow-list"

pytestmark = pytest.mark.skipif(
    landlock.abi_version() == 0 or seccomp.available() is not None,
    reason="the host lacks Landlock or seccomp (tests/unit/test_sandbox.py covers mode auto)")


def applied_line() -> str:
    return APPLIED.format(abi=landlock.abi_version())


def probe(args: list[str], paths: list[Path]) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(pyvirt_cmd("run", *args), input=b"", capture_output=True, timeout=180,
                       env={**os.environ, PROBE_ENV: os.pathsep.join(map(str, paths))})
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(errors="replace"),
                                       r.stderr.decode(errors="replace"))


def check_probe(r: subprocess.CompletedProcess[str], outside: Path, inside: Path) -> None:
    """Privileges gone, a file outside the VM's set denied, one inside allowed,
    and the forbidden syscall killed the process (nothing printed after it)."""
    err = r.stderr
    assert r.returncode == -signal.SIGSYS, (r.returncode, err)
    for line in ("NoNewPrivs=1", "Seccomp=2", "CapEff=0000000000000000",
                 "CapPrm=0000000000000000", "CapBnd=0000000000000000",
                 f"open {outside}: denied (Permission denied)", f"open {inside}: allowed"):
        assert f"sandbox-probe: {line}\n" in err, err
    assert err.rstrip().endswith("sandbox-probe: socket(AF_INET): trying"), err


@pytest.mark.kvm
def test_probe_under_kvm(test_guest: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("not the VM's")
    r = probe(["--accel", "kvm", "--kernel", str(test_guest), "--memory", "64M",
               "--cmdline", "test=boot", "--sandbox", "on"], [outside, test_guest])
    check_probe(r, outside, test_guest)


@pytest.mark.kvm
def test_probe_sees_no_sandbox_with_sandbox_off(test_guest: Path, tmp_path: Path) -> None:
    """The control: the same probe without the sandbox opens the file and makes
    the call (exit 3), so the test above fails when the sandbox is missing."""
    outside = tmp_path / "outside.txt"
    outside.write_text("not the VM's")
    r = probe(["--accel", "kvm", "--kernel", str(test_guest), "--memory", "64M",
               "--cmdline", "test=boot", "--sandbox", "off"], [outside])
    assert r.returncode == 3, r.stderr
    assert f"sandbox-probe: open {outside}: allowed\n" in r.stderr
    assert "sandbox-probe: Seccomp=0\n" in r.stderr
    assert "sandbox-probe: socket(AF_INET): allowed\n" in r.stderr


@pytest.mark.guest
def test_probe_on_the_software_cpu(image: GuestImage, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("not the VM's")
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    r = probe(["--accel", "emu", "--memory", "256M", "--disk", f"path={disk}"],
              [outside, disk, image.kernel])  # --sandbox left at its default (auto)
    check_probe(r, outside, disk)
    assert f"sandbox-probe: open {image.kernel}: allowed\n" in r.stderr


@pytest.mark.kvm
def test_kvm_guest_disk_and_resets_under_the_sandbox(test_guest: Path, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    before = make_image(img)
    r = run_pyvirt("run", "--accel", "kvm", "--kernel", str(test_guest), "--memory", "128M",
                   "--cmdline", "test=virtio-blk", "--disk", f"path={img},serial=sbx",
                   "--sandbox", "on", "--verbose", timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert applied_line().encode() in r.stderr, r.stderr
    m = check_common(r.stdout, before)
    assert m.group(3) == b"wrote+read 8 sectors ok"
    assert img.read_bytes() != before  # the guest's writes reached the image

    # a reset rebuilds the machine (new VM fd, guest memory, kernel read again)
    p = subprocess.Popen(pyvirt_cmd("run", "--accel", "kvm", "--kernel", str(test_guest),
                                    "--memory", "64M", "--cmdline", "test=reset",
                                    "--sandbox", "on", "--console", f"file:{tmp_path / 'c'}"),
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = tmp_path / "c"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and p.poll() is None:
            if log.exists() and log.read_bytes().count(b"boot") >= 3:
                break
            time.sleep(0.1)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert log.read_bytes().count(b"boot") >= 3, (log.read_bytes()[-500:], err)
    assert p.returncode == 0, err
    assert b"terminating on SIGTERM" in err


@pytest.mark.kvm
def test_kvm_guest_on_a_qcow2_chain_under_the_sandbox(test_guest: Path, tmp_path: Path) -> None:
    """qcow2 at run time under seccomp and Landlock: the guest reads through an
    overlay into a zstd-compressed qcow2 base (the codec imported lazily, after
    the sandbox), writes (cluster allocation, COW, refcounts), flushes; the VMM
    survives, the overlay passes ``qemu-img check`` and holds what a raw disk holds."""
    import shutil

    from tests.integration.test_kvm_virtio import PATTERN

    qemu_img = shutil.which("qemu-img")
    assert qemu_img is not None, "qemu-img (the referee) is needed"
    src = tmp_path / "src.raw"
    before = make_image(src)
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run([qemu_img, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
                    "compression_type=zstd", str(src), str(base)], check=True)
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                    str(top)], check=True)
    r = run_pyvirt("run", "--accel", "kvm", "--kernel", str(test_guest), "--memory", "128M",
                   "--cmdline", "test=virtio-blk", "--disk", f"path={top},format=qcow2,serial=q",
                   "--sandbox", "on", "--verbose", timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert applied_line().encode() in r.stderr, r.stderr
    m = check_common(r.stdout, before)
    assert m.group(3) == b"wrote+read 8 sectors ok"
    check = subprocess.run([qemu_img, "check", "-f", "qcow2", str(top)], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    out = tmp_path / "out.raw"
    subprocess.run([qemu_img, "convert", "-f", "qcow2", "-O", "raw", str(top), str(out)],
                   check=True)
    want = bytearray(before)
    want[16 * SECTOR:24 * SECTOR] = PATTERN  # what the guest writes (guest.c)
    assert out.read_bytes() == bytes(want)
    subprocess.run([qemu_img, "compare", "-f", "raw", "-F", "qcow2", str(src), str(base)],
                   check=True)  # the base untouched


@pytest.mark.guest
@pytest.mark.slow
def test_linux_with_disks_rng_console_and_reboot_under_the_sandbox(
        image: GuestImage, vm_factory: type[EmuVm], tmp_path: Path) -> None:
    scratch = tmp_path / "scratch.img"
    scratch.write_bytes(bytes(1 << 20))
    ro = tmp_path / "ro.img"
    ro.write_bytes(b"RO-DISK-CONTENT\n" + bytes((1 << 20) - 16))
    vm: EmuVm = vm_factory("--console", "virtio", "--sandbox", "on", "--verbose",
                           "--disk", f"path={scratch}", "--disk", f"path={ro},readonly=on")
    vm.wait_for(READY)
    vm.send("printf 'written-under-sandbox\\n' | dd of=/dev/vda bs=512 conv=sync,fsync "
            "2>/dev/null")
    vm.send('echo "R""O=$(head -c 15 /dev/vdb)"')
    vm.send('echo "RNG=$(head -c 16 /dev/hwrng | od -An -tx1 | tr -d " ")"')
    vm.send("reboot")
    vm.wait_for(READY, count=2)
    vm.send('echo "AGAIN=$(head -c 21 /dev/vda)"')
    text = vm.output_then_poweroff()
    assert applied_line() in text, text[-3000:]
    assert "started before the sandbox" not in text  # every thread is confined
    assert "RO=RO-DISK-CONTENT" in text, text[-3000:]
    assert "AGAIN=written-under-sandbox" in text, text[-3000:]
    rng = [ln for ln in text.splitlines() if ln.startswith("RNG=")]
    assert rng and len(rng[-1]) == 4 + 32, text[-3000:]
    assert text.count(READY_LINE) == 2  # two boots: the reboot rebuilt the machine
    assert scratch.read_bytes().startswith(b"written-under-sandbox\n")


def without_landlock(*args: str) -> subprocess.CompletedProcess[bytes]:
    """``pyvirt ARGS`` on a host without Landlock (its ABI probe answers 0)."""
    code = ("import sys; from pyvirt.sandbox import landlock; landlock.abi_version = lambda: 0; "
            "from pyvirt.cli.main import main; sys.argv[0] = 'pyvirt'; main()")
    return subprocess.run([sys.executable, "-c", code, *args], input=b"", capture_output=True,
                          timeout=120)


@pytest.mark.kvm
def test_sandbox_on_fails_cleanly_where_a_part_is_missing(test_guest: Path,
                                                          tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    r = without_landlock("run", "--accel", "kvm", "--kernel", str(test_guest), "--memory", "64M",
                         "--cmdline", "test=boot", "--console", f"file:{log}", "--sandbox", "on")
    assert r.returncode == 1, r.stderr
    assert r.stderr == (b"pyvirt: error: sandbox=on: landlock cannot be applied: the kernel "
                        b"has no Landlock (or it is disabled)\n")
    assert not log.exists()  # failed before anything was written


@pytest.mark.kvm
def test_sandbox_auto_says_what_is_missing_and_runs(test_guest: Path) -> None:
    r = without_landlock("run", "--accel", "kvm", "--kernel", str(test_guest), "--memory", "64M",
                         "--cmdline", "test=boot", "--verbose")
    assert r.returncode == 0, r.stderr
    assert (b"sandbox: no_new_privs, capabilities dropped, seccomp allow-list; no landlock "
            b"(the kernel has no Landlock (or it is disabled))") in r.stderr, r.stderr


def test_sandbox_flag_is_checked() -> None:
    r = run_pyvirt("run", "--sandbox", "maybe")
    assert r.returncode == 2
    assert b"'maybe' is not one of 'auto', 'on', 'off'" in r.stderr
    assert b"Traceback" not in r.stderr
