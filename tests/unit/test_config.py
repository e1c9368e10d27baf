from __future__ import annotations

import re
from pathlib import Path

import pytest

from pyvirt.hypervisor import HostVirt, HypervisorError, choose
from pyvirt.vmm.config import (
    ConfigError,
    ConsoleSpec,
    DiskSpec,
    VmConfig,
    check_host,
    parse_console,
    parse_disk,
    parse_size,
)
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
    with pytest.raises(ConfigError, match=r"^cpus: need at least one vCPU$") as ei:
        VmConfig(kernel=k, cpus=0)
    assert ei.value.field == "cpus"
    with pytest.raises(ConfigError, match=r"^memory: too small \(at least 16M\)$"):
        VmConfig(kernel=k, memory=0)
    with pytest.raises(ConfigError, match=r"^memory: must be a multiple of 2 MiB$"):
        VmConfig(kernel=k, memory=(64 << 20) + 4096)
    with pytest.raises(ConfigError, match=r"^cpus: at most 255 vCPUs"):
        VmConfig(kernel=k, cpus=999)
    with pytest.raises(ConfigError, match=r"^accel: expected auto, kvm or emu"):
        VmConfig(kernel=k, accel="fast")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^kernel: the path contains a NUL byte$"):
        VmConfig(kernel=Path("/tmp/a\0b"))
    VmConfig(kernel=k, memory=64 << 20, cpus=2)


def test_values_are_checked_without_the_host(tmp_path: Path) -> None:
    """Constructing a config looks at no file: a config for another host (or
    one restored from a snapshot) can be built and checked here."""
    cfg = VmConfig(kernel=tmp_path / "missing", memory=10 << 40,
                   disks=(DiskSpec(tmp_path / "nodisk"),),
                   console=ConsoleSpec("file", tmp_path / "nodir" / "log"))
    with pytest.raises(ConfigError, match=r"^kernel: \S+missing: no such file$"):
        check_host(cfg)


def test_host_checks_name_fields(tmp_path: Path) -> None:
    k = tmp_path / "k"
    k.write_bytes(b"x")
    img = tmp_path / "a.img"
    img.write_bytes(bytes(4096))
    cases = [
        (VmConfig(kernel=tmp_path), "kernel", "is a directory, not a regular file"),
        (VmConfig(kernel=k, initrd=tmp_path / "no"), "initrd", "no such file"),
        (VmConfig(kernel=k, memory=10 << 40), "memory", "10T is more than the host's"),
        (VmConfig(kernel=k, disks=(DiskSpec(img), DiskSpec(tmp_path / "x.img"))),
         "disks[1].path", "x.img: no such file"),
        (VmConfig(kernel=k, console=ConsoleSpec("file", tmp_path / "nodir" / "log")),
         "console.path", "does not exist"),
        (VmConfig(kernel=k, console=ConsoleSpec("file", tmp_path)),
         "console.path", "is a directory, not a regular file"),
    ]
    for cfg, field, needle in cases:
        with pytest.raises(ConfigError) as ei:
            check_host(cfg)
        assert ei.value.field == field, ei.value
        assert str(ei.value).startswith(f"{field}: ") and needle in str(ei.value), ei.value
        assert "--" not in str(ei.value)
    check_host(VmConfig(kernel=k, initrd=k, disks=(DiskSpec(img),),
                        console=ConsoleSpec("file", tmp_path / "new.log")))
    assert not (tmp_path / "new.log").exists()  # checked, not created


def test_console_specs(tmp_path: Path) -> None:
    assert parse_console("stdio").kind == "stdio"
    assert parse_console("none").kind == "none"
    spec = parse_console(f"file:{tmp_path}/log")
    assert spec.kind == "file" and spec.path == tmp_path / "log"
    for bad in ("file:", "tty"):
        with pytest.raises(ConfigError, match="--console"):
            parse_console(bad)


def test_console_file_checks_create_nothing(tmp_path: Path) -> None:
    import os

    k = tmp_path / "k"
    k.write_bytes(b"x")

    def check(console: str) -> None:
        check_host(VmConfig(kernel=k, console=parse_console(console)))

    with pytest.raises(ConfigError, match=r"^console\.path: \S+ is a directory, not a"):
        check(f"file:{tmp_path}")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="is a named pipe"):
        check(f"file:{fifo}")
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    check(f"file:{keep}")
    check(f"file:{tmp_path}/new.log")
    assert keep.read_text() == "precious" and not (tmp_path / "new.log").exists()


def test_disk_given_twice_under_two_names(tmp_path: Path) -> None:
    import os

    k = tmp_path / "k"
    k.write_bytes(b"x")
    a = tmp_path / "a.img"
    a.write_bytes(bytes(4096))
    os.link(a, tmp_path / "b.img")
    cfg = VmConfig(kernel=k, disks=(parse_disk(str(a)), parse_disk(f"path={tmp_path}/b.img")))
    with pytest.raises(ConfigError,
                       match=r"^disks\[1\]\.path: \S+b\.img: the same image as disks\[0\]\.path$"):
        check_host(cfg)


def test_disk_that_is_not_a_file(tmp_path: Path) -> None:
    import os

    k = tmp_path / "k"
    k.write_bytes(b"x")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ConfigError, match=r"is a named pipe \(FIFO\), not a regular file or block"):
        check_host(VmConfig(kernel=k, disks=(parse_disk(f"path={tmp_path}/fifo,readonly=on"),)))
    with pytest.raises(ConfigError, match="is a directory"):
        check_host(VmConfig(kernel=k, disks=(parse_disk(str(tmp_path)),)))


def test_disk_spec_parser_names_the_flag() -> None:
    for spec, needle in [("path=a,serial=has space", "serial must be 1-20"),
                         ("path=a,cache=fast", "cache='fast' must be none or writeback"),
                         ("path=a,frob=1", "unknown option 'frob'"),
                         ("readonly=on", "path=FILE is required"),
                         ("path=a\0b", "the path contains a NUL byte"),
                         ("path=a,format=vmdk", "format='vmdk' must be raw or qcow2")]:
        with pytest.raises(ConfigError, match=f"^--disk {re.escape(spec)}: ") as ei:
            parse_disk(spec)
        assert needle in str(ei.value)


def test_disk_format() -> None:
    """format= on the command line and in a JSON config; unset means probed."""
    assert parse_disk("path=a").format is None
    assert parse_disk("path=a,format=qcow2").format == "qcow2"
    assert parse_disk("a,format=raw").to_dict()["format"] == "raw"
    doc = {"kernel": "/k", "disks": [{"path": "/a"}, {"path": "/b", "format": "qcow2"}]}
    cfg = VmConfig.from_dict(doc)
    assert [d.format for d in cfg.disks] == [None, "qcow2"]
    assert VmConfig.from_dict(cfg.to_dict()) == cfg
    for bad, why in [("qcow3", "expected raw or qcow2"), (2, "expected a string")]:
        doc["disks"][1]["format"] = bad  # type: ignore[index]
        with pytest.raises(ConfigError, match=r"^disks\[1\]\.format: ") as ei:
            VmConfig.from_dict(doc)
        assert why in str(ei.value)


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
