"""The snapshot directory (``pyvirt.vmm.snapshot``) and guest memory's sparse
dump, private file mapping and in-place discard (``pyvirt.memory``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

import pyvirt
from pyvirt.memory import GuestMemory
from pyvirt.vmm.machine import MachineState
from pyvirt.vmm.snapshot import SnapshotError, pyvirt_version, read_snapshot, write_snapshot

MIB = 1 << 20


def test_version_is_the_package_version() -> None:
    assert pyvirt_version() == pyvirt.__version__ == version("pyvirt")


@dataclass
class _Res:
    disks: list[Any] = field(default_factory=list)


class StandIn:
    """What ``write_snapshot`` reads from a machine: saved state, RAM, resources."""

    def __init__(self, memory: GuestMemory, fail: bool = False) -> None:
        self.memory = memory
        self.resources = _Res()
        self.fail = fail

    def save_state(self) -> MachineState:
        if self.fail:
            raise RuntimeError("device exploded while saving")
        return MachineState(devices={"serial": b"\x01\x02"}, vm=b"vm", vcpus=[b"cpu0"])


def _doc(kernel: Path, memory: int) -> dict[str, Any]:
    return {"kernel": str(kernel), "memory": memory, "accel": "emu",
            "console": {"kind": "none", "path": None}}


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "vmlinuz"
    k.write_bytes(b"k")
    return k


def _snapshot(tmp_path: Path, kernel: Path, name: str = "snap") -> Path:
    mem = GuestMemory.create(32 * MIB)
    mem.write(5 * MIB + 17, b"hello")
    mem.write(31 * MIB, b"end")
    target = tmp_path / name
    result = write_snapshot(StandIn(mem), _doc(kernel, 32 * MIB), "emu", "engine X", target)  # type: ignore[arg-type]
    mem.close()
    assert result["path"] == str(target)
    assert int(result["memory_bytes_written"]) == 2 * 4096  # two non-zero pages
    return target


def test_round_trip_and_sparse_memory(tmp_path: Path, kernel: Path) -> None:
    snap = _snapshot(tmp_path, kernel)
    assert sorted(os.listdir(snap)) == ["manifest.json", "memory.bin", "state.bin"]
    st = os.stat(snap / "memory.bin")
    assert st.st_size == 32 * MIB and st.st_blocks * 512 <= 64 * 1024  # holes
    loaded = read_snapshot(snap)
    try:
        assert loaded.state.devices == {"serial": b"\x01\x02"}
        assert loaded.state.vcpus == [b"cpu0"] and loaded.state.vm == b"vm"
        assert loaded.config.memory == 32 * MIB
        mem = GuestMemory.create(32 * MIB, backing_fd=loaded.memory_fd)
        assert mem.read(5 * MIB + 17, 5) == b"hello" and mem.read(31 * MIB, 3) == b"end"
        mem.write(6 * MIB, b"guest")  # private: the file never changes
        mem.discard()  # a reset in place: zeros, same mapping
        assert mem.read(5 * MIB + 17, 5) == bytes(5)
        mem.close()
        with open(snap / "memory.bin", "rb") as f:
            f.seek(6 * MIB)
            assert f.read(5) == bytes(5)
    finally:
        loaded.close()


def test_a_failed_write_leaves_nothing(tmp_path: Path, kernel: Path) -> None:
    mem = GuestMemory.create(8 * MIB)
    with pytest.raises(RuntimeError):
        write_snapshot(StandIn(mem, fail=True), _doc(kernel, 8 * MIB), "emu", "", tmp_path / "s")  # type: ignore[arg-type]
    mem.close()
    assert sorted(os.listdir(tmp_path)) == ["vmlinuz"]


def test_replaces_a_snapshot_but_not_other_directories(tmp_path: Path, kernel: Path) -> None:
    snap = _snapshot(tmp_path, kernel)
    first = json.loads((snap / "manifest.json").read_text())["created_unix_ns"]
    _snapshot(tmp_path, kernel)  # the same target again: replaced whole
    assert json.loads((snap / "manifest.json").read_text())["created_unix_ns"] > first
    assert sorted(os.listdir(tmp_path)) == ["snap", "vmlinuz"]  # no .tmp or .old left
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"x")
    with pytest.raises(SnapshotError, match="exists and is not a pyvirt snapshot"):
        _snapshot(tmp_path, kernel, "photos")
    assert (other / "cat.jpg").read_bytes() == b"x"
    with pytest.raises(SnapshotError, match="does not exist"):
        _snapshot(tmp_path, kernel, "no/such/dir")


@pytest.mark.parametrize(("damage", "message"), [
    (lambda s: (s / "manifest.json").write_text("{not json"), "manifest.json is corrupt"),
    (lambda s: (s / "manifest.json").unlink(), "manifest.json is missing"),
    (lambda s: _edit(s, format="qcow2"), "not a pyvirt snapshot"),
    (lambda s: _edit(s, format_version=99), "format version 99"),
    (lambda s: _edit(s, pyvirt_version="9.9"), "made by pyvirt '9.9'"),
    (lambda s: _edit(s, state={"size": 1}), "manifest.json is incomplete"),
    (lambda s: (s / "state.bin").write_bytes(b"\x00" * 3), "truncated or replaced"),
    (lambda s: _flip(s / "state.bin"), "checksum"),
    (lambda s: (s / "memory.bin").unlink(), "memory.bin is missing"),
    (lambda s: os.truncate(s / "memory.bin", MIB), "truncated or replaced"),
    (lambda s: _edit(s, config={"kernel": "/k", "cpus": "two"}), "configuration: cpus"),
])
def test_a_damaged_snapshot_is_refused(tmp_path: Path, kernel: Path, damage: Any,
                                       message: str) -> None:
    snap = _snapshot(tmp_path, kernel)
    damage(snap)
    with pytest.raises(SnapshotError, match=message) as err:
        read_snapshot(snap)
    assert "\n" not in str(err.value)


def _edit(snap: Path, **fields: Any) -> None:
    m = json.loads((snap / "manifest.json").read_text())
    m.update(fields)
    (snap / "manifest.json").write_text(json.dumps(m))


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_dump_skips_untouched_memory_quickly(tmp_path: Path) -> None:
    mem = GuestMemory.create(256 * MIB)
    for addr in range(0, 16 * MIB, 4096):
        mem.write(addr, b"\x01")
    fd = os.open(tmp_path / "m", os.O_RDWR | os.O_CREAT)
    try:
        written = mem.dump(fd)
        assert written == 16 * MIB
        assert os.fstat(fd).st_blocks * 512 <= 17 * MIB
    finally:
        os.close(fd)
        mem.close()


def test_the_boot_path_imports_no_api_or_snapshot_code() -> None:
    """The VMM's start-up budget: booting (cli + runner) must not import the API
    server, the HTTP and serialisation libraries, or the snapshot code."""
    import subprocess
    import sys

    code = ("import sys, pyvirt.cli.main, pyvirt.vmm.runner, pyvirt.vmm.machine; "
            "print(' '.join(sorted(sys.modules)))")
    mods = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True).stdout.split())
    for name in ("h11", "httpx", "msgspec", "json", "pyvirt.api", "pyvirt.api.server",
                 "pyvirt.vmm.snapshot", "pyvirt.state", "hashlib"):
        assert name not in mods, f"{name} is imported on the boot path"
