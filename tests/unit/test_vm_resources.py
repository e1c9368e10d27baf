"""VmResources: the files a VM holds for its whole life (kernel, initrd, disks, console)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyvirt.errors import UserInputError
from pyvirt.loader import LoaderError
from pyvirt.vmm.config import ConfigError, VmConfig, parse_console, parse_disk
from pyvirt.vmm.console import Console
from pyvirt.vmm.resources import VmResources


def _locked_by_us(path: Path) -> bool:
    """Whether another process is refused an exclusive lock on ``path`` (an OFD
    lock over the whole file, so any of the lock bytes pyvirt or QEMU hold conflicts)."""
    code = ("import fcntl, os, struct, sys\nfd = os.open(sys.argv[1], os.O_RDWR)\n"
            "try:\n fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack('@hhqqi4x', fcntl.F_WRLCK,"
            " 0, 0, 0, 0))\nexcept OSError:\n sys.exit(3)\n")
    r = subprocess.run([sys.executable, "-c", code, str(path)], timeout=30, check=False)
    return r.returncode == 3


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "kernel"
    k.write_bytes(b"k" * 4096)
    return k


def _disk(tmp_path: Path, name: str = "disk.img") -> Path:
    p = tmp_path / name
    p.write_bytes(bytes(64 << 10))
    return p


def test_disks_are_opened_once_and_held_until_close(tmp_path: Path, kernel: Path) -> None:
    img = _disk(tmp_path)
    cfg = VmConfig(kernel=kernel, disks=(parse_disk(str(img)),), console=parse_console("none"))
    with VmResources.open(cfg) as res:
        (image,) = res.disks
        assert image.fd >= 0 and not image.readonly
        assert _locked_by_us(img)
    assert image.fd == -1 and not _locked_by_us(img)


def test_initrd_that_is_also_a_writable_disk_keeps_the_lock(tmp_path: Path,
                                                            kernel: Path) -> None:
    img = _disk(tmp_path)
    cfg = VmConfig(kernel=kernel, initrd=img, disks=(parse_disk(str(img)),),
                   console=parse_console("none"))
    with VmResources.open(cfg) as res:
        assert res.initrd is not None
        assert res.initrd.read(cfg.memory) == bytes(64 << 10)
        img.read_bytes()  # anything else in the process opening and closing it
        assert _locked_by_us(img)


def test_a_file_swapped_for_a_hard_link_of_another_disk(tmp_path: Path, kernel: Path) -> None:
    """Config checks names; the resources check the opened files themselves."""
    a, b = _disk(tmp_path, "a.img"), _disk(tmp_path, "b.img")
    cfg = VmConfig(kernel=kernel, disks=(parse_disk(str(a)), parse_disk(str(b))),
                   console=parse_console("none"))
    b.unlink()
    os.link(a, b)
    with pytest.raises(UserInputError, match=r"^disks\[1\]\.path: \S+b\.img is the same file "
                                             r"as disks\[0\]\.path \(\S+a\.img\)$"):
        VmResources.open(cfg)
    assert not _locked_by_us(a)  # the first disk was closed again


def test_kernel_swapped_for_a_fifo_is_refused(tmp_path: Path, kernel: Path) -> None:
    cfg = VmConfig(kernel=kernel, console=parse_console("none"))
    kernel.unlink()
    os.mkfifo(kernel)
    with pytest.raises(LoaderError, match=r"^kernel: \S+ is a named pipe \(FIFO\), not a "
                                          "regular file$"):
        VmResources.open(cfg)


def test_boot_file_larger_than_ram(tmp_path: Path, kernel: Path) -> None:
    cfg = VmConfig(kernel=kernel, console=parse_console("none"))
    with VmResources.open(cfg) as res, pytest.raises(LoaderError, match="larger than the guest"):
        assert res.kernel is not None
        res.kernel.read(100)


def test_console_file_is_written_only_by_start(tmp_path: Path, kernel: Path) -> None:
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    cfg = VmConfig(kernel=kernel, console=parse_console(f"file:{keep}"))
    with VmResources.open(cfg) as res:
        assert keep.read_text() == "precious"
        res.start()
        assert keep.read_text() == ""
        res.console.write(b"guest output")
    assert keep.read_text() == "guest output"


def test_console_file_that_cannot_be_opened(tmp_path: Path, kernel: Path) -> None:
    target = tmp_path / "out"
    cfg = VmConfig(kernel=kernel, console=parse_console(f"file:{target}"))
    target.mkdir()  # after the config was checked
    with VmResources.open(cfg) as res, pytest.raises(
            ConfigError, match=r"^console\.path: \S+out is a directory, not a regular file$"):
        res.start()
    target.rmdir()
    os.mkfifo(target)  # a FIFO without a reader: open() would wait for ever
    with VmResources.open(cfg) as res, pytest.raises(ConfigError, match="named pipe"):
        res.start()


def test_console_close_survives_a_terminal_that_is_gone() -> None:
    import pty
    import termios

    master, slave = pty.openpty()
    c = Console(parse_console("stdio"), stdin_fd=slave, stdout_fd=slave)
    c.open()
    assert not termios.tcgetattr(slave)[3] & termios.ICANON
    os.close(slave)  # the saved attributes can no longer be restored
    os.close(master)
    c.close()  # no exception
    c.message("still fine")


def test_console_input_from_a_terminal_that_hung_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """A terminal that is gone reads as EOF or fails with EIO (an orphaned
    reader): both end the input, neither takes the event loop down."""
    import errno
    import pty

    master, slave = pty.openpty()
    c = Console(parse_console("stdio"), stdin_fd=slave, stdout_fd=slave)
    os.close(master)
    try:
        assert c.read_input() is None  # EOF

        def eio(fd: int, n: int) -> bytes:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "read", eio)
        assert c.read_input() is None
    finally:
        os.close(slave)
