"""Bad input from users: one line naming the problem, exit status 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_pyvirt


def one_line_error(r: object, *needles: str) -> None:
    import subprocess

    assert isinstance(r, subprocess.CompletedProcess)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 or lines[0].startswith("Usage:"), err
    for n in needles:
        assert n in err, err


@pytest.fixture
def kernel_file(tmp_path: Path) -> Path:
    k = tmp_path / "notakernel"
    k.write_bytes(b"hello, I am not a kernel" * 100)
    return k


def test_missing_kernel(tmp_path: Path) -> None:
    one_line_error(run_pyvirt("run", "--kernel", str(tmp_path / "nope")), "no such file")


def test_not_a_kernel(kernel_file: Path) -> None:
    one_line_error(run_pyvirt("run", "--kernel", str(kernel_file), "--accel", "kvm"),
                   "not a Linux kernel")


def test_truncated_bzimage(tmp_path: Path) -> None:
    import struct

    img = bytearray(0x400)
    img[0x1F1] = 30  # setup_sects
    img[0x1FE:0x200] = b"\x55\xaa"
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x206, 0x20F)
    struct.pack_into("<I", img, 0x1F4, 0x10000)  # syssize in 16-byte paragraphs
    k = tmp_path / "bzImage"
    k.write_bytes(bytes(img))
    one_line_error(run_pyvirt("run", "--kernel", str(k), "--accel", "kvm"), "truncated")


@pytest.mark.parametrize("mem,needle", [("0", "too small"), ("10T", "more than the host"),
                                        ("12Q", "not a size")])
def test_bad_memory(kernel_file: Path, mem: str, needle: str) -> None:
    one_line_error(run_pyvirt("run", "--kernel", str(kernel_file), "--memory", mem), needle)


def test_zero_cpus(kernel_file: Path) -> None:
    one_line_error(run_pyvirt("run", "--kernel", str(kernel_file), "--cpus", "0"), "--cpus 0")


@pytest.mark.kvm
def test_more_cpus_than_kvm_allows(test_guest: Path) -> None:
    one_line_error(run_pyvirt("run", "--kernel", str(test_guest), "--accel", "kvm",
                              "--cpus", "300", "--memory", "64M"), "at most")


def test_bad_console(kernel_file: Path) -> None:
    one_line_error(run_pyvirt("run", "--kernel", str(kernel_file), "--console", "tty9"),
                   "--console")


def test_bad_cmdline(test_guest: Path) -> None:
    one_line_error(run_pyvirt("run", "--kernel", str(test_guest), "--accel", "kvm",
                              "--cmdline", 'init="/bin/sh'), "quote")


def test_more_cpus_than_the_software_cpu_runs(test_guest: Path) -> None:
    one_line_error(run_pyvirt("run", "--kernel", str(test_guest), "--accel", "emu",
                              "--cpus", "2", "--memory", "64M"), "software CPU runs 1 vCPU")
