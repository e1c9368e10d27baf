"""Domain definitions: parsing, field-named errors, resolution into a VmConfig;
the VMM process helpers (start time, exit file, exit classification)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyvirt.manager.domain import disk_target, load_definition_text, parse_definition, resolve
from pyvirt.manager.errors import InvalidArgument, NotFound
from pyvirt.manager.vmproc import (
    ExitRecord,
    VmmProcess,
    classify_exit,
    last_log_line,
    process_alive,
    read_exit_file,
    start_ticks,
)


def test_minimal_definition_defaults() -> None:
    d = parse_definition({"name": "web1"})
    assert d.name == "web1" and d.description == "" and d.autostart is False
    assert len(d.uuid) == 36 and d.memory == 512 << 20 and d.cpus == 1
    doc = d.to_doc()
    assert doc["name"] == "web1" and doc["uuid"] == d.uuid and "kernel" not in doc
    # to_doc is a fixed point: the stored document parses to the same definition
    assert parse_definition(doc).to_doc() == doc


def test_size_strings_and_uuid_canonical() -> None:
    d = parse_definition({"name": "a", "memory": "1G", "uuid": "12345678123456781234567812345678"})
    assert d.memory == 1 << 30 and d.to_doc()["memory"] == 1 << 30
    assert d.uuid == "12345678-1234-5678-1234-567812345678"


@pytest.mark.parametrize(("doc", "field", "words"), [
    ([], None, "is an object"),
    ({}, "name", "required"),
    ({"name": "bad name"}, "name", "letters, digits"),
    ({"name": "a", "console": {"kind": "stdio"}}, "console", "daemon owns the console"),
    ({"name": "a", "verbose": True}, "verbose", "not accepted"),
    ({"name": "a", "bogus": 1}, "bogus", "unknown field"),
    ({"name": "a", "uuid": "xyz"}, "uuid", "not a UUID"),
    ({"name": "a", "autostart": "yes"}, "autostart", "true or false"),
    ({"name": "a", "memory": "lots"}, "memory", "not a size"),
    ({"name": "a", "memory": 1000}, "memory", "too small"),
    ({"name": "a", "cpus": 0}, "cpus", "at least one"),
    ({"name": "a", "disks": [{"path": "/x", "serial": "has space"}]}, "disks[0].serial",
     "printable"),
    ({"name": "a", "disks": [{"path": "/x"}, {"volume": "noslash"}]}, "disks[1].volume",
     "POOL/VOLUME"),
    ({"name": "a", "disks": [{"volume": "p/../../etc"}]}, "disks[0].volume", "POOL/VOLUME"),
    ({"name": "a", "disks": [{"volume": "p/v", "path": "/x"}]}, "disks[0].path",
     "come from its pool"),
    ({"name": "a", "disks": [{"volume": "p/v", "cache": "maybe"}]}, "disks[0].cache",
     "none or writeback"),
    ({"name": "a", "nics": [{"network": "default", "tap": "x"}]}, "nics[0].tap",
     "unknown field"),
    ({"name": "a", "nics": [{"network": "default", "mac": "01:00:00:00:00:01"}]},
     "nics[0].mac", "multicast"),
    ({"name": "a", "nics": [{"network": "bad/name"}]}, "nics[0].network", "network name"),
    # a trailing newline is not a name's last character ("$" would have allowed it)
    ({"name": "a", "disks": [{"volume": "p/v\n"}]}, "disks[0].volume", "POOL/VOLUME"),
    ({"name": "a", "nics": [{"network": "default\n"}]}, "nics[0].network", "network name"),
    ({"name": "a", "nics": [{"kind": "carrier-pigeon"}]}, "nics[0].kind", "tap or user"),
    ({"name": "a", "disks": [{"path": "/x"}] * 25}, "disks", "at most 24"),
    ({"name": "a", "description": "x" * 5000}, "description", "at most"),
])
def test_errors_name_the_field(doc: object, field: str | None, words: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_definition(doc)
    assert info.value.field == field
    msg = str(info.value)
    assert "\n" not in msg and words in msg
    if field is not None:
        assert msg.startswith(f"{field}: ")
    assert "--" not in msg  # never a flag


def test_resolve_volumes_networks_default_guest(tmp_path: Path) -> None:
    d = parse_definition({"name": "vm", "disks": [{"volume": "default/root", "serial": "r1"},
                                                  {"path": "/data.img", "readonly": True}],
                          "nics": [{"network": "default"}, {"kind": "user"}]})
    kernel, initrd = tmp_path / "k", tmp_path / "i"

    def volume(pool: str, vol: str) -> tuple[Path, str]:
        assert (pool, vol) == ("default", "root")
        return tmp_path / "root.qcow2", "qcow2"

    cfg = resolve(d, console=tmp_path / "c.sock", volume=volume,
                  default_guest=lambda: (kernel, initrd), taps={0: "pvt12345678"})
    assert cfg.kernel == kernel and cfg.initrd == initrd and cfg.name == "vm"
    assert cfg.console.kind == "socket" and cfg.console.path == tmp_path / "c.sock"
    assert cfg.disks[0].path == tmp_path / "root.qcow2" and cfg.disks[0].format == "qcow2"
    assert cfg.disks[0].serial == "r1" and cfg.disks[1].readonly
    assert cfg.nics[0].kind == "tap" and cfg.nics[0].tap == "pvt12345678"
    assert cfg.nics[0].mac == d.nic_macs()[0]  # stable: derived from the name
    assert cfg.nics[1].kind == "user"

    def missing(pool: str, vol: str) -> tuple[Path, str]:
        raise NotFound(f"storage pool '{pool}' not found")

    with pytest.raises(InvalidArgument) as info:
        resolve(d, console=None, volume=missing)
    assert str(info.value) == "disks[0].volume: storage pool 'default' not found"


def test_disk_targets() -> None:
    assert [disk_target(i) for i in (0, 1, 25, 26, 27)] == ["vda", "vdb", "vdz", "vdaa", "vdab"]


def test_load_definition_text() -> None:
    assert load_definition_text('{"name": "a"}') == {"name": "a"}
    assert load_definition_text("name: a\nmemory: 1G\n") == {"name": "a", "memory": "1G"}
    with pytest.raises(InvalidArgument, match="neither JSON nor YAML"):
        load_definition_text("name: [a")
    with pytest.raises(InvalidArgument, match="larger than"):
        load_definition_text("x" * ((1 << 20) + 1))


# ---- vmproc


def test_start_ticks_identify_a_process(tmp_path: Path) -> None:
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        ticks = start_ticks(p.pid)
        assert ticks is not None and process_alive(p.pid, ticks)
        assert not process_alive(p.pid, ticks + 1)  # same pid, other start: not ours
        assert VmmProcess.adopt(p.pid, ticks + 1) is None
        proc = VmmProcess.adopt(p.pid, ticks)
        assert proc is not None and proc.alive()
        proc.kill()
        p.wait(10)
        assert not proc.alive() and start_ticks(p.pid) is None
        proc.close()
    finally:
        p.kill()
        p.wait()


def test_spawn_own_session_and_reap(tmp_path: Path) -> None:
    log = tmp_path / "vmm.log"
    proc = VmmProcess.spawn([sys.executable, "-c", "import os,sys; print(os.getsid(0)); "
                             "sys.stderr.write('pyvirt: error: disks[0].path: x: no such "
                             "file\\n'); sys.exit(2)"], log_path=log, cwd=tmp_path)
    assert proc.pidfd is not None
    os.waitid(os.P_PIDFD, proc.pidfd, os.WEXITED | os.WNOWAIT)
    assert proc.reap() == 2 and not proc.alive()
    sid = int(log.read_text().splitlines()[0])
    assert sid == proc.pid != os.getsid(0)  # a session of its own
    assert last_log_line(log) == "disks[0].path: x: no such file"
    proc.close()


def test_exit_file_records(tmp_path: Path) -> None:
    f = tmp_path / "exit.json"
    assert read_exit_file(f) is None
    f.write_bytes(b"")
    assert read_exit_file(f) is None  # what SIGKILL leaves
    f.write_text("{not json")
    assert read_exit_file(f) is None
    f.write_text(json.dumps({"outcome": "crash", "detail": "triple\nfault", "exit_status": 1,
                             "boot_count": 2}))
    assert read_exit_file(f) == ExitRecord("crash", "triple fault", 1, 2)
    f.write_bytes(b" " * (70 << 10))
    assert read_exit_file(f) is None


@pytest.mark.parametrize(("record", "asked", "code", "expected"), [
    (ExitRecord("poweroff", "", 0, 1), None, 0, ("shut off", "shutdown")),
    (ExitRecord("poweroff", "", 0, 1), "shutdown", 0, ("shut off", "shutdown")),
    (ExitRecord("stopped", "", 0, 1), "destroy", 0, ("shut off", "destroyed")),
    (ExitRecord("stopped", "terminating on SIGTERM", 0, 1), None, 0, ("shut off", "shutdown")),
    (ExitRecord("stopped", "", 0, 1), "save", 0, ("shut off", "saved")),
    (ExitRecord("crash", "triple fault", 1, 1), None, 1, ("crashed", "panicked")),
    (ExitRecord("error", "kernel: x: no such file", 2, 0), None, 2, ("shut off", "failed")),
    (None, None, -9, ("crashed", "vmm-died")),
    (None, "destroy", -9, ("shut off", "destroyed")),
    (None, None, None, ("crashed", "vmm-died")),
])
def test_classify_exit(record: ExitRecord | None, asked: str | None, code: int | None,
                       expected: tuple[str, str]) -> None:
    state, reason, detail = classify_exit(record, asked=asked, exit_code=code)
    assert (state, reason) == expected
    if record is None and code == -9 and asked is None:
        assert detail == "the VMM process was killed by SIGKILL"
