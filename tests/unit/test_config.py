from __future__ import annotations

from pathlib import Path

import pytest

from pyvirt.hypervisor import HostVirt, HypervisorError, choose
from pyvirt.vmm.config import ConfigError, VmConfig, parse_console, parse_disk, parse_size
from pyvirt.vmm.console import Console


@pytest.mark.parametrize("text,value", [("512M", 512 << 20), ("2G", 2 << 30), ("1GiB", 1 << 30),
                                        ("2048", 2048 << 20), ("64m", 64 << 20),
                                        ("1048576K", 1 << 30)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["12Q", "", "-1G", "1.5G", "G", "ten"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="--memory"):
        parse_size(text)


def test_config_rejects_bad_values(tmp_path: Path) -> None:
    k = tmp_path / "k"
    k.write_bytes(b"x")
    with pytest.raises(ConfigError, match="no such file"):
        VmConfig(kernel=tmp_path / "missing")
    with pytest.raises(ConfigError, match="not a regular file"):
        VmConfig(kernel=tmp_path)
    with pytest.raises(ConfigError, match="--cpus 0"):
        VmConfig(kernel=k, cpus=0)
    with pytest.raises(ConfigError, match="too small"):
        VmConfig(kernel=k, memory=0)
    with pytest.raises(ConfigError, match="more than the host"):
        VmConfig(kernel=k, memory=10 << 40)
    with pytest.raises(ConfigError, match="--cpus 999"):
        VmConfig(kernel=k, cpus=999)
    VmConfig(kernel=k, memory=64 << 20, cpus=2)


def test_console_specs(tmp_path: Path) -> None:
    assert parse_console("stdio").kind == "stdio"
    assert parse_console("none").kind == "none"
    spec = parse_console(f"file:{tmp_path}/log")
    assert spec.kind == "file" and spec.path == tmp_path / "log"
    for bad in ("file:", "tty", f"file:{tmp_path}/nodir/log"):
        with pytest.raises(ConfigError, match="--console"):
            parse_console(bad)


def test_console_file_checks_create_nothing(tmp_path: Path) -> None:
    import os

    with pytest.raises(ConfigError, match=r"^--console file:\S+: \S+ is a directory, not a"):
        parse_console(f"file:{tmp_path}")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="is a named pipe"):
        parse_console(f"file:{fifo}")
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    assert parse_console(f"file:{keep}").path == keep
    parse_console(f"file:{tmp_path}/new.log")
    assert keep.read_text() == "precious" and not (tmp_path / "new.log").exists()


def test_disk_given_twice_under_two_names(tmp_path: Path) -> None:
    import os

    k = tmp_path / "k"
    k.write_bytes(b"x")
    a = tmp_path / "a.img"
    a.write_bytes(bytes(4096))
    os.link(a, tmp_path / "b.img")
    with pytest.raises(ConfigError, match=r"b\.img: the same image as --disk .*a\.img"):
        VmConfig(kernel=k, disks=(parse_disk(str(a)), parse_disk(f"path={tmp_path}/b.img")))


def test_disk_that_is_not_a_file(tmp_path: Path) -> None:
    import os

    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ConfigError, match=r"is a named pipe \(FIFO\), not a regular file or block"):
        parse_disk(f"path={tmp_path}/fifo,readonly=on")
    with pytest.raises(ConfigError, match="is a directory"):
        parse_disk(str(tmp_path))


def test_console_escape_sequences() -> None:
    c = Console(parse_console("none"))
    assert c._filter_escapes(b"ab\x01\x01c") == b"ab\x01c"
    assert not c.quit_requested
    assert c._filter_escapes(b"ls\x01") == b"ls"
    assert c._filter_escapes(b"x-ignored") == b""
    assert c.quit_requested


PVM = HostVirt(True, True, "kvm_pvm", None)
INTEL = HostVirt(True, True, "kvm_intel", "vmx")
NOKVM = HostVirt(False, False, None, None)
NOPERM = HostVirt(True, False, "kvm_intel", "vmx")


def test_auto_picks_kvm_only_on_hardware_virtualization() -> None:
    assert choose("auto", INTEL).name == "kvm"
    pvm = choose("auto", PVM)
    assert pvm.name == "emu" and "PVM" in pvm.reason
    assert choose("auto", NOKVM).name == "emu"
    assert "permission" in choose("auto", NOPERM).reason
    # vmx in the flags but no vendor module loaded yet: /dev/kvm comes from elsewhere
    assert choose("auto", HostVirt(True, True, None, "svm")).name == "kvm"


def test_forced_backends() -> None:
    assert choose("kvm", PVM).name == "kvm" and "PVM" in choose("kvm", PVM).reason
    assert choose("emu", INTEL).name == "emu"
    with pytest.raises(HypervisorError, match="does not exist"):
        choose("kvm", NOKVM)
    with pytest.raises(HypervisorError, match="permission denied"):
        choose("kvm", NOPERM)
