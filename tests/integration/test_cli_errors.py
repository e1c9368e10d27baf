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


# ---- files that are not what they should be, and nothing written before all is checked


@pytest.mark.parametrize("where", ["kernel", "initrd", "disk-ro", "disk-rw", "console"])
def test_fifo_is_refused_without_hanging(kernel_file: Path, tmp_path: Path, where: str) -> None:
    """open() of a FIFO waits for a writer for ever (and SIGTERM could not stop it)."""
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    args = {"kernel": ["--kernel", str(fifo)],
            "initrd": ["--kernel", str(kernel_file), "--initrd", str(fifo)],
            "disk-ro": ["--kernel", str(kernel_file), "--disk", f"path={fifo},readonly=on"],
            "disk-rw": ["--kernel", str(kernel_file), "--disk", f"path={fifo}"],
            "console": ["--kernel", str(kernel_file), "--console", f"file:{fifo}"]}[where]
    one_line_error(run_pyvirt("run", "--accel", "emu", *args, timeout=60), str(fifo),
                   "FIFO" if where.startswith(("disk", "console")) else "not a regular file")


def test_console_file_is_a_directory(kernel_file: Path, tmp_path: Path) -> None:
    one_line_error(run_pyvirt("run", "--kernel", str(kernel_file), "--console",
                              f"file:{tmp_path}"), "is a directory")


def test_console_file_that_cannot_be_written(test_guest: Path) -> None:
    """Even root cannot write a read-only sysfs attribute (though access() says it
    may): found only when pyvirt opens it, just before the guest runs; one line."""
    target = "/sys/kernel/uevent_seqnum"
    one_line_error(run_pyvirt("run", "--accel", "emu", "--kernel", str(test_guest),
                              "--memory", "64M", "--console", f"file:{target}"),
                   target, "ermission denied")


@pytest.mark.parametrize("later", ["not-a-kernel", "disk-in-use"])
def test_console_file_untouched_when_a_later_check_fails(kernel_file: Path, test_guest: Path,
                                                         tmp_path: Path, later: str) -> None:
    import fcntl
    import os
    import struct

    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    fd = os.open(disk, os.O_RDWR)
    try:
        if later == "not-a-kernel":
            args = ["--kernel", str(kernel_file)]
            needle = "not a Linux kernel"
        else:  # this test process holds the image, as another VM would
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("@hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
            args = ["--kernel", str(test_guest), "--disk", f"path={disk}"]
            needle = f"in use by process {os.getpid()}"
        one_line_error(run_pyvirt("run", "--accel", "emu", "--memory", "64M",
                                  "--console", f"file:{keep}", *args), needle)
    finally:
        os.close(fd)
    assert keep.read_text() == "precious"


def test_same_disk_under_two_names(kernel_file: Path, tmp_path: Path) -> None:
    import os

    a = tmp_path / "a.img"
    a.write_bytes(bytes(4096))
    os.link(a, tmp_path / "b.img")
    one_line_error(run_pyvirt("run", "--kernel", str(kernel_file), "--disk", f"path={a}",
                              "--disk", f"path={tmp_path}/b.img,readonly=on"),
                   "b.img: the same image as --disk")


def test_line_breaks_in_user_input_stay_one_line(kernel_file: Path, tmp_path: Path) -> None:
    """An error quoting user text with a newline or escape sequence in it is
    still one line, with the control characters shown escaped."""
    r = run_pyvirt("run", "--kernel", str(kernel_file),
                   "--disk", f"path={tmp_path}/no\nsuch\x1b[2Jdisk")
    one_line_error(r, "no such file", "\\n", "\\x1b")


def test_nul_in_a_path_is_refused_with_one_line() -> None:
    from pyvirt.vmm.config import ConfigError, parse_console, parse_disk

    with pytest.raises(ConfigError, match="NUL byte"):
        parse_disk("path=/tmp/a\0b")
    with pytest.raises(ConfigError, match="NUL byte"):
        parse_console("file:/tmp/a\0b")


# ---- errors name the flag the user typed; from a config file, the file and the field


@pytest.mark.parametrize("args,line", [
    (["--memory", "8M"], "--memory 8M: too small (at least 16M)"),
    (["--cpus", "300"], "--cpus 300: at most 255 vCPUs are supported"),
    (["--disk", "path=x.img"], "--disk path=x.img: x.img: no such file"),
    (["--disk", "path=x.img,serial=a b"],
     "--disk path=x.img,serial=a b: serial must be 1-20 printable ASCII characters, no spaces"),
])
def test_errors_name_the_flag(kernel_file: Path, tmp_cwd: Path, args: list[str],
                              line: str) -> None:
    r = run_pyvirt("run", "--kernel", str(kernel_file), *args)
    one_line_error(r)
    assert r.stderr.decode().strip() == f"pyvirt: error: {line}"


def write_config(path: Path, **fields: object) -> Path:
    import json

    path.write_text(json.dumps(fields))
    return path


def test_config_file_errors_name_file_and_field(kernel_file: Path, tmp_cwd: Path) -> None:
    (tmp_cwd / "a.img").write_bytes(bytes(4096))
    k = str(kernel_file)
    cases = [
        (dict(kernel=k, disks=[{"path": "a.img"}, {"path": "nope.img"}]),
         "vm.json: disks[1].path: nope.img: no such file"),
        (dict(kernel=k, frobnicate=1), "vm.json: frobnicate: unknown field"),
        (dict(kernel=k, memory="8M"), "vm.json: memory: too small (at least 16M)"),
        (dict(kernel=k, cpus="2"), "vm.json: cpus: expected an integer, not a string"),
        (dict(kernel=k, console={"kind": "tty"}),
         "vm.json: console.kind: expected stdio, virtio, none, file or socket (not 'tty')"),
        (dict(kernel=k, console={"kind": "file", "path": "nodir/log"}),
         "vm.json: console.path: nodir/log: directory nodir does not exist"),
        (dict(kernel=k, memory=10 << 40), "vm.json: memory: 10T is more than the host's"),
        (dict(kernel=k, accel="emu", cpus=2),
         "vm.json: cpus: the software CPU runs 1 vCPU"),
    ]
    for fields, line in cases:
        write_config(tmp_cwd / "vm.json", **fields)
        r = run_pyvirt("run", "--config", "vm.json")
        one_line_error(r)
        assert r.stderr.decode().startswith(f"pyvirt: error: {line}"), (fields, r.stderr)
    (tmp_cwd / "vm.json").write_text('{"kernel": ')
    one_line_error(run_pyvirt("run", "--config", "vm.json"), "pyvirt: error: vm.json: not JSON")
    one_line_error(run_pyvirt("run", "--config", "missing.json"),
                   "pyvirt: error: --config missing.json: no such file")


def test_config_file_with_other_flags_is_refused(kernel_file: Path, tmp_cwd: Path) -> None:
    write_config(tmp_cwd / "vm.json", kernel=str(kernel_file))
    one_line_error(run_pyvirt("run", "--config", "vm.json", "--cpus", "1", "--no-rng"),
                   "--config: --cpus, --rng cannot be given with it")


def test_print_config_is_the_document_config_takes(tmp_cwd: Path) -> None:
    import json

    from pyvirt.vmm.config import VmConfig

    (tmp_cwd / "a.img").write_bytes(bytes(4096))
    r = run_pyvirt("run", "--print-config", "--kernel", "k", "--memory", "1G",
                   "--disk", "path=a.img,readonly=on,serial=S1", "--console", "file:out.log",
                   "--on-reboot", "exit")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["memory"] == 1 << 30 and doc["console"] == {"kind": "file", "path": "out.log"}
    assert doc["disks"] == [{"path": "a.img", "readonly": True, "serial": "S1",
                             "cache": "writeback", "discard": False, "format": None}]
    cfg = VmConfig.from_json(r.stdout)
    assert cfg.on_reboot == "exit" and str(cfg.kernel) == "k"
    (tmp_cwd / "vm.json").write_bytes(r.stdout)
    again = run_pyvirt("run", "--config", "vm.json", "--print-config")
    assert again.returncode == 0 and json.loads(again.stdout) == doc
    # nothing was looked at, nothing created
    assert not (tmp_cwd / "out.log").exists()
