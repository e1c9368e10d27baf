"""The VMM as the daemon runs it, end to end with the default guest on the
software CPU: the console on a Unix socket (backlog, takeover), the exit file,
a qcow2 overlay put on a disk while paused (``PUT /vm/disk-overlay``), and
files handed as fds to a VMM that runs as a user who cannot open them.

The sandbox is on (``--sandbox on``: every part this host has) wherever a
guest boots, since the daemon runs every VMM sandboxed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirt.guest import READY_LINE, GuestImage, build_default_guest, guest_is_built

pytest.importorskip("unicorn")
from pyvirt.api.client import ApiError, VmClient
from pyvirt.hypervisor.emulated import engine
from pyvirt.sandbox import unavailable

pytestmark = [
    pytest.mark.guest,
    pytest.mark.slow,
    pytest.mark.skipif(not engine.available(), reason="unicorn lacks pyvirt's patches"),
]

BOOT_TIMEOUT = 180.0
READY = READY_LINE.encode()
SANDBOX = "on" if not unavailable() else "auto"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def image() -> GuestImage:
    if not guest_is_built():
        return build_default_guest(log=lambda msg: print(msg, flush=True))
    return build_default_guest(log=lambda _msg: None)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="pv", dir="/tmp"))  # sun_path is 108 bytes
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def connect(path: Path, proc: subprocess.Popen[bytes], timeout: float = 60) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return s
        except OSError:
            s.close()
            assert proc.poll() is None, f"the VMM exited with {proc.returncode}"
            assert time.monotonic() < deadline, "no console socket"
            time.sleep(0.05)


def read_until(s: socket.socket, needle: bytes, timeout: float = BOOT_TIMEOUT) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while needle not in buf:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} not seen; got {buf[-500:]!r}"
        s.settimeout(min(left, 1.0))
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            continue
        assert chunk, f"console closed before {needle!r}; got {buf[-500:]!r}"
        buf += chunk
    return buf


def closed_within(s: socket.socket, timeout: float) -> bool:
    """True when the peer closes ``s`` within ``timeout`` (data before that is read)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            if not s.recv(65536):
                return True
        except TimeoutError:
            return False
    return False


def qemu_img(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)


def sector(image: Path, fmt: str, n: int) -> bytes:
    out = image.with_name(image.name + ".raw")
    assert qemu_img("convert", "-f", fmt, "-O", "raw", image, out).returncode == 0
    with open(out, "rb") as f:
        f.seek(n * 512)
        data = f.read(512)
    out.unlink()
    return data


def test_console_socket_overlay_and_exit_file(image: GuestImage, short_dir: Path) -> None:
    d = short_dir
    base = d / "base.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", base, "64M").returncode == 0
    con, api, exit_file, ov = d / "con.sock", d / "api.sock", d / "exit.json", d / "ov.qcow2"
    log = open(d / "vmm.log", "wb")  # noqa: SIM115 - the VMM's, as the daemon does
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvirt", "run", "--accel", "emu", "--net", "none",
         "--sandbox", SANDBOX, "--console", f"socket:{con}", "--exit-file", str(exit_file),
         "--api-socket", str(api), "--snapshot-root", str(d),
         "--disk", f"path={base},format=qcow2"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        first = connect(con, proc)
        assert exit_file.read_bytes() == b""  # created at start, empty while it runs
        assert os.stat(con).st_mode & 0o777 == 0o600
        read_until(first, READY)
        first.sendall(b"echo hel''lo-$((6*7))\n")  # the echo of the command is not the answer
        read_until(first, b"hello-42", 60)

        # a second client takes over: the backlog (READY and the answer), the first closed
        second = connect(con, proc)
        backlog = read_until(second, b"hello-42", 30)
        assert READY in backlog
        assert closed_within(first, 10)
        first.close()

        vm = VmClient(api)
        with pytest.raises(ApiError) as err:
            vm.disk_overlay(0, ov)
        assert err.value.status == 409 and "pause it first" in err.value.fault_message
        vm.pause()
        with pytest.raises(ApiError) as err:
            vm.disk_overlay(0, base)
        assert err.value.status == 400 and "exists" in err.value.fault_message
        with pytest.raises(ApiError) as err:
            vm.disk_overlay(0, "/var/tmp/ov.qcow2")
        assert err.value.status == 400 and "outside the snapshot directory" in \
            err.value.fault_message
        with pytest.raises(ApiError) as err:
            vm.disk_overlay(3, d / "x.qcow2")
        assert err.value.status == 400 and "no disk 3" in err.value.fault_message
        assert vm.disk_overlay(0, ov) == {"disk": 0, "path": str(ov), "backing": str(base)}
        assert vm.info()["config"]["disks"][0]["path"] == str(ov)  # type: ignore[index]
        vm.resume()

        second.sendall(b"echo OVERLAID | dd of=/dev/vda bs=512 seek=8 conv=fsync 2>/dev/null;"
                       b" echo wr''ote\n")
        read_until(second, b"wrote", 60)
        second.sendall(b"poweroff -f\n")
        assert proc.wait(60) == 0
        assert closed_within(second, 10)
        second.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    record = json.loads(exit_file.read_text())
    assert record["outcome"] == "poweroff" and record["exit_status"] == 0
    assert record["boot_count"] == 1 and record["time"] > time.time() - 600
    assert not con.exists()  # ours, removed
    for f in (base, ov):
        check = qemu_img("check", f)
        assert check.returncode == 0, check.stdout + check.stderr
    info = json.loads(qemu_img("info", "--output", "json", ov).stdout)
    assert info["backing-filename"] == str(base)
    assert info["backing-filename-format"] == "qcow2"
    assert sector(ov, "qcow2", 8).startswith(b"OVERLAID\n")
    assert sector(base, "qcow2", 8) == bytes(512)  # the new data only in the overlay


def _boot_as_nobody(image: GuestImage, d: Path, disk: Path, disk_flags: int,
                    ) -> tuple[subprocess.Popen[bytes], Path, Path]:
    run = d / "run"
    run.mkdir()
    os.chown(run, 65534, 65534)
    con, exit_file = run / "con.sock", run / "exit.json"
    fds = [os.open(image.kernel, os.O_RDONLY), os.open(image.initrd, os.O_RDONLY),
           os.open(disk, disk_flags)]
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
           sys.executable, "-m", "pyvirt", "run", "--accel", "emu", "--net", "none",
           "--sandbox", SANDBOX, "--kernel", str(image.kernel), "--initrd", str(image.initrd),
           "--console", f"socket:{con}", "--exit-file", str(exit_file),
           "--disk", f"path={disk},format=qcow2",
           "--fd", f"{image.kernel}={fds[0]}", "--fd", f"{image.initrd}={fds[1]}",
           "--fd", f"{disk}={fds[2]}"]
    try:
        proc = subprocess.Popen(cmd, pass_fds=fds, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "HOME": str(run)})
    finally:
        for fd in fds:
            os.close(fd)
    return proc, con, exit_file


def test_handed_files_for_a_vmm_that_cannot_open_them(image: GuestImage,
                                                      short_dir: Path) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the VMM as another user")
    d = short_dir
    secret = d / "secret"
    secret.mkdir(mode=0o700)  # root's: the VMM (nobody) cannot even look inside
    disk = secret / "disk.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", disk, "64M").returncode == 0

    # the wrong access mode: one line, nothing booted, the exit file says why
    proc, _, exit_file = _boot_as_nobody(image, d, disk, os.O_RDONLY)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    lines = out.decode().strip().splitlines()
    assert lines == [f"pyvirt: error: --disk path={disk},format=qcow2: {disk}: the fd handed "
                     f"for it ({lines[0].split('(')[1].split(')')[0]}) is open read-only, but "
                     "it is used read-write (hand an fd opened O_RDWR)"]
    record = json.loads(exit_file.read_text())
    assert record["outcome"] == "error" and record["exit_status"] == 2
    assert record["detail"].startswith(f"disks[0].path: {disk}: the fd handed for it")
    shutil.rmtree(d / "run")

    proc, con, exit_file = _boot_as_nobody(image, d, disk, os.O_RDWR)
    try:
        s = connect(con, proc)
        read_until(s, READY)
        s.sendall(b"echo HANDED | dd of=/dev/vda bs=512 seek=8 conv=fsync 2>/dev/null;"
                  b" poweroff -f\n")
        assert proc.wait(BOOT_TIMEOUT) == 0
        s.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        out, _ = proc.communicate()
    assert json.loads(exit_file.read_text())["outcome"] == "poweroff", out
    assert qemu_img("check", disk).returncode == 0
    assert sector(disk, "qcow2", 8).startswith(b"HANDED\n")


def test_sigkill_leaves_the_exit_file_empty(image: GuestImage, short_dir: Path) -> None:
    con, exit_file = short_dir / "con.sock", short_dir / "exit.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvirt", "run", "--accel", "emu", "--net", "none",
         "--console", f"socket:{con}", "--exit-file", str(exit_file)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        cwd=ROOT)
    s = connect(con, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    s.close()
    assert exit_file.read_bytes() == b""  # the daemon reads: killed, no word from the VMM

    # SIGTERM while it runs: a clean stop, recorded
    exit_file.unlink()
    con.unlink()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvirt", "run", "--accel", "emu", "--net", "none",
         "--console", f"socket:{con}", "--exit-file", str(exit_file)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        cwd=ROOT)
    s = connect(con, proc)
    read_until(s, b"Linux version")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    s.close()
    record = json.loads(exit_file.read_text())
    assert record["outcome"] == "stopped" and record["detail"] == "terminating on SIGTERM"
    assert record["exit_status"] == 0 and record["boot_count"] == 1
