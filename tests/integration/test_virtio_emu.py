"""PCI + virtio with the real Debian kernel on the software CPU.

The stock ``virtio_pci`` module binds to our devices without any special
command-line option; each test checks what the guest sees and what reaches
the host: disk sizes, serials and read-only flags in sysfs, an ext4 image
made on the host, written in the guest and checked on the host with
``e2fsck -fn`` and ``debugfs``, a random pattern with the same sha256 on both
sides, a read-only disk that refuses writes, the image lock against a second
VM, ``/dev/hwrng``, and a shell on ``hvc0``.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import pytest

from pyvirt.guest import READY_LINE, GuestImage
from tests.conftest import run_pyvirt
from tests.integration.test_emu_boot import EmuVm, image, marker, vm_factory

__all__ = ["image", "vm_factory"]  # fixtures re-exported for pytest

pytestmark = [pytest.mark.guest, pytest.mark.slow]

READY = READY_LINE.encode()
PATTERN_BYTES = 1 << 20


def _ext4(path: Path, size_mb: int, content: Path) -> None:
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "pyvirt-test", "-d", str(content),
                    str(path), f"{size_mb}M"], check=True)


def _field(text: str, name: str) -> str:
    m = re.search(rf"^{name}=(.*)$", text, re.M)
    assert m, f"{name}= not in guest output:\n{text[-3000:]}"
    return m.group(1).strip()


@pytest.fixture
def disks(tmp_path: Path) -> dict[str, Path]:
    content = tmp_path / "content"
    content.mkdir()
    (content / "hello.txt").write_text("made on the host\n")
    fs = tmp_path / "fs.ext4"
    _ext4(fs, 32, content)
    scratch = tmp_path / "scratch.img"
    scratch.write_bytes(bytes(4 << 20))
    ro = tmp_path / "ro.img"
    ro.write_bytes(b"\xa5" * (2 << 20))
    disc = tmp_path / "discard.img"
    disc.write_bytes(b"\xff" * (4 << 20))
    return {"fs": fs, "scratch": scratch, "ro": ro, "discard": disc}


def test_disks_rng_and_lock(image: GuestImage, vm_factory: type[EmuVm],
                            disks: dict[str, Path]) -> None:
    ro_before = hashlib.sha256(disks["ro"].read_bytes()).hexdigest()
    vm = vm_factory(
        "--disk", f"path={disks['fs']},serial=fs-disk",
        "--disk", f"path={disks['scratch']},cache=none,serial=scratch",
        "--disk", f"path={disks['ro']},readonly=on,serial=ro-disk",
        "--disk", f"path={disks['discard']},discard=on")
    vm.wait_for(READY)

    # while it runs, a second VM must not get the writable image
    second = run_pyvirt("run", "--accel", "emu", "--disk", f"path={disks['fs']}",
                        "--console", "none", timeout=60)
    assert second.returncode == 2, second.stderr
    err = second.stderr.decode()
    assert "in use by process" in err and str(vm.proc.pid) in err, err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    # ... nor may a reader open the image another VM writes
    third = run_pyvirt("run", "--accel", "emu", "--disk", f"path={disks['scratch']},readonly=on",
                       "--console", "none", timeout=60)
    assert third.returncode == 2 and b"in use by process" in third.stderr, third.stderr

    for dev in ("vda", "vdb", "vdc"):
        for what in ("size", "ro", "serial"):
            vm.send(f"echo {marker(what.upper() + '_' + dev)}$(cat /sys/block/{dev}/{what})")
    vm.send("mount -t ext4 /dev/vda /mnt && echo \"$(cat /mnt/hello.txt)\" | "
            "sed 's/^/HOSTFILE=/'")
    vm.send("echo written in the guest > /mnt/guest.txt && umount /mnt && echo UMOUNT=$?")
    vm.send(f"dd if=/dev/urandom of=/tmp/pat bs=64k count={PATTERN_BYTES >> 16} 2>/dev/null")
    vm.send("dd if=/tmp/pat of=/dev/vdb bs=64k oflag=direct conv=fsync 2>/dev/null; "
            f"echo {marker('PATSUM')}$(sha256sum /tmp/pat | cut -c1-64)")
    vm.send(f"dd if=/dev/vdb bs=64k count={PATTERN_BYTES >> 16} iflag=direct 2>/dev/null | "
            f"sha256sum | cut -c1-64 | sed 's/^/READBACK=/'")
    vm.send("dd if=/dev/zero of=/dev/vdc bs=512 count=1 oflag=direct 2>/dev/null; "
            f"echo {marker('ROWRITE')}$?")
    vm.send(f"echo {marker('RNG')}$(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | "
            "od -An -tx1 | wc -w)")
    vm.send(f"echo {marker('RNGNAME')}$(cat /sys/class/misc/hw_random/rng_current)")
    vm.send(f"echo {marker('DISCMAX')}$(cat /sys/block/vdd/queue/discard_max_bytes)"
            f" {marker('NODISC')}$(cat /sys/block/vdb/queue/discard_max_bytes)")
    vm.send(f"blkdiscard /dev/vdd; echo {marker('DISCARD')}$?")
    text = vm.output_then_poweroff(timeout=120)

    assert _field(text, "SIZE_vda") == str((32 << 20) // 512)
    assert _field(text, "SIZE_vdb") == str((4 << 20) // 512)
    assert _field(text, "SIZE_vdc") == str((2 << 20) // 512)
    assert [_field(text, f"RO_{d}") for d in ("vda", "vdb", "vdc")] == ["0", "0", "1"]
    assert [_field(text, f"SERIAL_{d}") for d in ("vda", "vdb", "vdc")] == [
        "fs-disk", "scratch", "ro-disk"]
    assert _field(text, "HOSTFILE") == "made on the host"
    assert _field(text, "UMOUNT") == "0"
    host_sum = hashlib.sha256(disks["scratch"].read_bytes()[:PATTERN_BYTES]).hexdigest()
    assert _field(text, "PATSUM") == host_sum
    assert _field(text, "READBACK") == host_sum
    assert _field(text, "ROWRITE") != "0"
    assert hashlib.sha256(disks["ro"].read_bytes()).hexdigest() == ro_before
    assert _field(text, "RNG") == "32"
    assert _field(text, "RNGNAME").startswith("virtio_rng")
    assert "Call Trace" not in vm.text
    discmax = re.search(r"DISCMAX=(\d+) NODISC=(\d+)", text)
    assert discmax and int(discmax.group(1)) > 0 and discmax.group(2) == "0", text[-2000:]
    assert _field(text, "DISCARD") == "0"
    assert disks["discard"].read_bytes() == bytes(4 << 20)  # punched: reads as zeros
    assert disks["discard"].stat().st_blocks * 512 < (1 << 20)  # and no longer allocated

    fsck = subprocess.run(["e2fsck", "-fn", str(disks["fs"])], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    cat = subprocess.run(["debugfs", "-R", "cat /guest.txt", str(disks["fs"])],
                         capture_output=True, text=True, check=True)
    assert cat.stdout == "written in the guest\n"


def test_shell_on_virtio_console(image: GuestImage, vm_factory: type[EmuVm]) -> None:
    vm = vm_factory("--console", "virtio", "--no-rng")
    vm.wait_for(READY)
    vm.send(f"echo {marker('TTY')}$(tty) {marker('CONS')}$(cut -d' ' -f1 /proc/consoles)")
    text = vm.output_then_poweroff()
    assert _field(text, "TTY").split()[0] == "/dev/hvc0"
    assert "CONS=hvc0" in text


def test_intx_fallback_through_prt(image: GuestImage, vm_factory: type[EmuVm],
                                   disks: dict[str, Path]) -> None:
    """With MSI off (``pci=nomsi``) the devices interrupt through INTx: the
    DSDT's _PRT routes them to IOAPIC GSIs 16-23, level-triggered."""
    disks["scratch"].write_bytes(bytes(range(256)) * ((4 << 20) // 256))
    vm = vm_factory("--cmdline", "pci=nomsi", "--disk", f"path={disks['scratch']}")
    vm.wait_for(READY)
    vm.send("grep -E 'virtio[0-9]' /proc/interrupts | sed 's/^/IRQLINE /'")
    vm.send("dd if=/dev/vda bs=64k count=16 iflag=direct 2>/dev/null | sha256sum | "
            "cut -c1-64 | sed 's/^/SUM=/'")
    vm.send(f"echo {marker('RNG')}$(dd if=/dev/hwrng bs=16 count=1 2>/dev/null | "
            "od -An -tx1 | wc -w)")
    text = vm.output_then_poweroff()
    lines = re.findall(r"^IRQLINE\s+(\d+):\s+(\d+)\s+IO-APIC\s+\S+-fasteoi\s+(virtio\d)$",
                       text, re.M)
    # blk, the default NIC (its DHCP exchange interrupts too) and rng; no MSI-X
    assert len(lines) == 3, text[-3000:]
    for gsi, count, _ in lines:
        assert 16 <= int(gsi) <= 23 and int(count) > 0
    assert _field(text, "SUM") == hashlib.sha256(
        disks["scratch"].read_bytes()[:1 << 20]).hexdigest()
    assert _field(text, "RNG") == "16"
