"""The default guest boots under QEMU (TCG): ready line, modules, shell over serial, poweroff.

QEMU is the reference here, so a failure points at the guest image rather than at
pyvirt's VMM. The guest is built through the public API when it is not in the cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirt.guest import READY_LINE, GuestImage, build_default_guest, guest_is_built

QEMU = shutil.which("qemu-system-x86_64")

pytestmark = [
    pytest.mark.guest,
    pytest.mark.slow,
    pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed"),
]

BOOT_TIMEOUT = 240.0  # TCG on a busy 2-core CI box
EXPECTED_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "vmw_vsock_virtio_transport",
    "ext4",
)


class Qemu:
    """QEMU with the serial console on stdin/stdout, read by a thread into a buffer."""

    def __init__(
        self, image: GuestImage, append: str, extra: list[str] | None = None, *, hvc: bool = False
    ) -> None:
        assert QEMU is not None
        if hvc:
            # stdio on a virtio console instead of the serial port
            io_args = ["-display", "none", "-serial", "none", "-monitor", "none",
                       "-device", "virtio-serial-pci", "-chardev", "stdio,id=c0",
                       "-device", "virtconsole,chardev=c0"]  # fmt: skip
        else:
            io_args = ["-nographic"]
        cmd = [
            QEMU, "-accel", "tcg", "-m", "512", *io_args, "-no-reboot",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", append, *(extra or []),
        ]  # fmt: skip
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            with self._cond:
                self._buf += chunk
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return self._buf.decode(errors="replace").replace("\r", "")

    def wait_for(self, text: str, timeout: float, *, whole_line: bool = True) -> float:
        """Seconds since start when ``text`` appeared in the output (as a line by default)."""
        needle = (f"\n{text}\n" if whole_line else text).encode()
        deadline = time.monotonic() + timeout
        with self._cond:
            while needle not in self._buf.replace(b"\r", b""):
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    tail = self._buf[-3000:].decode(errors="replace")
                    pytest.fail(f"no {text!r} line within {timeout:.0f}s; output ends:\n{tail}")
                self._cond.wait(min(left, 1.0))
        return time.monotonic() - self.started

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(timeout=5)


@pytest.fixture(scope="module")
def image() -> GuestImage:
    # Build through the API (a no-op when the cache already holds a current build).
    if not guest_is_built():
        return build_default_guest(log=lambda msg: print(msg, flush=True))
    return build_default_guest(log=lambda _msg: None)


@pytest.fixture
def qemu(image: GuestImage) -> Iterator[Qemu]:
    vm = Qemu(image, "console=ttyS0 panic=-1")
    try:
        yield vm
    finally:
        vm.close()


def test_boot_modules_shell_poweroff(image: GuestImage, qemu: Qemu) -> None:
    ready_s = qemu.wait_for(READY_LINE, BOOT_TIMEOUT)
    print(f"ready line after {ready_s:.1f}s (QEMU TCG)")
    # $((...)) makes the guest compute the markers, so the echoed input never matches.
    qemu.send(
        "uname -r; hostname; echo PS1=[$PS1]; lsmod; ls /sys/module; echo END-$((6*7)); poweroff\n"
    )
    qemu.wait_for("END-42", 120)
    try:
        rc = qemu.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"QEMU did not exit after poweroff; output ends:\n{qemu.output[-3000:]}")
    assert rc == 0
    out = qemu.output
    after = out[out.index(READY_LINE) :]
    assert f"\n{image.kernel_version}\n" in after
    assert "\npyvirt\n" in after
    assert "PS1=[# ]" in after
    lsmod = {line.split()[0] for line in after.splitlines() if line.strip()}
    missing = [m for m in EXPECTED_MODULES if m not in lsmod]
    assert not missing, f"modules not loaded: {missing}"
    assert "Requesting system poweroff" in after or "reboot: Power down" in after


def test_input_sent_right_after_ready_line_is_not_lost(image: GuestImage) -> None:
    # Lines sent the moment the ready line shows, before the shell runs, must all run.
    # The echo-free mode (pyvirt.noecho) is meant for scripts: only output comes back.
    vm = Qemu(image, "console=ttyS0 panic=-1 pyvirt.noecho")
    try:
        vm.wait_for(READY_LINE, BOOT_TIMEOUT)
        vm.send("echo A-$((1+1))\n")
        vm.send("cat /proc/sys/kernel/hostname\n")
        vm.send("echo B-$((2+2)); poweroff\n")
        # the prompt precedes each output line here (no echoed newline)
        vm.wait_for("B-4", 120, whole_line=False)
        assert vm.proc.wait(timeout=120) == 0
        after = vm.output.split(READY_LINE, 1)[1]
        assert "# A-2\n" in after and "# pyvirt\n" in after
        # Input typed ahead of the shell is echoed by the tty before stty -echo runs;
        # what follows the first prompt is just output.
        assert "echo" not in after.split("# ", 1)[1]
    finally:
        vm.close()


def test_hvc0_console(image: GuestImage) -> None:
    """console=hvc0: the ready line and the shell move to the virtio console."""
    vm = Qemu(image, "console=hvc0 panic=-1", hvc=True)
    try:
        vm.wait_for(READY_LINE, BOOT_TIMEOUT)
        vm.send("cat /sys/class/tty/console/active; echo H-$((5+5)); poweroff\n")
        vm.wait_for("H-10", 120)
        assert vm.proc.wait(timeout=120) == 0
        assert "\nhvc0\n" in vm.output
    finally:
        vm.close()


def _mkfs_ext4() -> str | None:
    return shutil.which("mkfs.ext4") or (
        "/usr/sbin/mkfs.ext4" if Path("/usr/sbin/mkfs.ext4").exists() else None
    )


@pytest.mark.skipif(_mkfs_ext4() is None, reason="mkfs.ext4 (e2fsprogs) is not installed")
def test_root_on_virtio_disk_switch_root(image: GuestImage, tmp_path: Path) -> None:
    """root=/dev/vda: /init mounts the ext4 disk and switch_roots into its /sbin/init."""
    rootfs = tmp_path / "rootfs"
    for d in ("bin", "sbin", "proc", "sys", "dev", "etc"):
        (rootfs / d).mkdir(parents=True)
    # The disk's init is a script printing a marker, then powering off via sysrq.
    init = rootfs / "sbin" / "init"
    init.write_text(
        "#!/bin/sh\necho ON-DISK-ROOT-$((3*3)) $(cat /etc/marker)\n"
        "echo o > /proc/sysrq-trigger\nsleep 30\n"
    )
    init.chmod(0o755)
    (rootfs / "etc" / "marker").write_text("disk-marker\n")
    gz = image.initrd
    # Reuse the initramfs' busybox as the disk's /bin/sh.
    busybox = _busybox_from_initrd(gz, tmp_path)
    shutil.copy(busybox, rootfs / "bin" / "busybox")
    (rootfs / "bin" / "sh").symlink_to("busybox")
    (rootfs / "bin" / "cat").symlink_to("busybox")
    (rootfs / "bin" / "sleep").symlink_to("busybox")
    disk = tmp_path / "root.ext4"
    mkfs = _mkfs_ext4()
    assert mkfs is not None
    subprocess.run(
        [mkfs, "-q", "-F", "-d", str(rootfs), str(disk), "32M"], check=True, capture_output=True
    )
    vm = Qemu(
        image,
        "console=ttyS0 panic=-1 root=/dev/vda",
        ["-drive", f"file={disk},format=raw,if=virtio"],
    )
    try:
        vm.wait_for("ON-DISK-ROOT-9 disk-marker", BOOT_TIMEOUT)
        assert vm.proc.wait(timeout=60) == 0
    finally:
        vm.close()


def _busybox_from_initrd(initrd: Path, tmp_path: Path) -> Path:
    import gzip
    import io

    data = gzip.decompress(initrd.read_bytes())
    stream = io.BytesIO(data)
    while True:
        header = stream.read(110)
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        size, namesize = fields[6], fields[11]
        name = stream.read(namesize)[:-1].decode()
        stream.read(-(110 + namesize) % 4)
        body = stream.read(size)
        stream.read(-size % 4)
        if name == "bin/busybox":
            out = tmp_path / "busybox"
            out.write_bytes(body)
            out.chmod(0o755)
            return out
        assert name != "TRAILER!!!", "no bin/busybox in the initramfs"
