"""Snapshots on disk: write one from a paused machine, read one back.

A snapshot is a directory::

    manifest.json   what it is: format and pyvirt version, backend, the VM's
                    configuration, the disks' sizes, sizes and sha256 of the
                    other files
    state.bin       every device's, the VM's and every vCPU's state record
                    (``pyvirt.state``; msgpack)
    memory.bin      guest RAM, regions one after another: a sparse file (zero
                    pages are holes), mapped privately on restore so RAM is
                    read from it only as the guest touches it

It is written under a temporary name beside the target and renamed into place
once every file is written and synced: a crash leaves a hidden ``.NAME.tmp-PID``
directory, never a half snapshot under the real name. An existing snapshot at
the target is replaced the same way (it stays whole until the rename).

Reading checks everything before anything is built: the format and pyvirt
version, the backend, the state file's size and checksum, the memory file's
presence and size. Each problem is one ``SnapshotError`` line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyvirt.errors import UserInputError

if TYPE_CHECKING:
    from pyvirt.vmm.config import VmConfig
    from pyvirt.vmm.machine import Machine, MachineState

__all__ = ["FORMAT", "FORMAT_VERSION", "LoadedSnapshot", "SnapshotError", "read_snapshot",
           "write_snapshot"]

FORMAT = "pyvirt-snapshot"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE = "state.bin"
MEMORY = "memory.bin"
#: a state file is kilobytes to a few megabytes; anything far larger is not ours
MAX_STATE_BYTES = 256 << 20
MAX_MANIFEST_BYTES = 1 << 20


class SnapshotError(UserInputError):
    """A snapshot cannot be written there, or cannot be restored."""


def pyvirt_version() -> str:
    """``pyvirt.__version__`` (importlib.metadata would cost a restore ~15 ms;
    tests/unit/test_snapshot_format.py checks the two agree)."""
    import pyvirt

    return pyvirt.__version__


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_snapshot_dir(path: Path) -> bool:
    try:
        names = set(os.listdir(path))
    except OSError:
        return False
    return not names or MANIFEST in names


def write_snapshot(machine: Machine, config_doc: dict[str, Any], backend: str,
                   backend_detail: str, path: Path) -> dict[str, object]:
    """Write a snapshot of the paused ``machine`` to directory ``path``."""
    from pyvirt.state import encode

    t0 = time.perf_counter()
    path = Path(os.path.abspath(path))
    parent = path.parent
    if not parent.is_dir():
        raise SnapshotError(f"snapshot.path: directory {parent} does not exist")
    exists = path.exists() or path.is_symlink()
    if exists and (path.is_symlink() or not path.is_dir() or not _is_snapshot_dir(path)):
        raise SnapshotError(f"snapshot.path: {path} exists and is not a pyvirt snapshot "
                                "(or an empty directory)")
    tmp = parent / f".{path.name}.tmp-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(tmp)
    try:
        os.mkdir(tmp, 0o700)
    except OSError as exc:
        raise SnapshotError(f"snapshot.path: cannot create {tmp}: {exc.strerror}") from None
    try:
        state = machine.save_state()
        state_bytes = encode({"devices": state.devices, "vm": state.vm, "vcpus": state.vcpus})
        _write_file(tmp / STATE, state_bytes)
        assert machine.memory is not None
        fd = os.open(tmp / MEMORY, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            written = machine.memory.dump(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        disks = [{"path": str(img.path), "size": img.size}
                 for img in machine.resources.disks]
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "pyvirt_version": pyvirt_version(),
            "backend": backend,
            "backend_detail": backend_detail,
            "created_unix_ns": time.time_ns(),
            "config": config_doc,
            "disks": disks,
            "state": {"file": STATE, "size": len(state_bytes),
                      "sha256": hashlib.sha256(state_bytes).hexdigest()},
            "memory": {"file": MEMORY, "size": machine.memory.size,
                       "regions": [[r.guest_addr, r.size] for r in machine.memory.regions]},
        }
        _write_file(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        _fsync_dir(tmp)
        old = None
        if path.exists():
            old = parent / f".{path.name}.old-{os.getpid()}"
            os.rename(path, old)
        os.rename(tmp, path)
        _fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": str(path), "memory_bytes_written": written,
            "state_bytes": len(state_bytes), "seconds": round(time.perf_counter() - t0, 6)}


@dataclass
class LoadedSnapshot:
    path: Path
    manifest: dict[str, Any]
    config: VmConfig
    state: MachineState
    memory_fd: int

    def close(self) -> None:
        if self.memory_fd >= 0:
            os.close(self.memory_fd)
            self.memory_fd = -1


def _read_small(path: Path, limit: int, what: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SnapshotError(f"{what}: {path.name} is missing") from None
    except OSError as exc:
        raise SnapshotError(f"{what}: {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SnapshotError(f"{what}: {path.name} is not a regular file")
        if st.st_size > limit:
            raise SnapshotError(f"{what}: {path.name} is {st.st_size} bytes: not a pyvirt "
                                "snapshot file")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_snapshot(path: Path, *, overrides: dict[str, Any] | None = None) -> LoadedSnapshot:
    """Open and check the snapshot at ``path``; ``overrides`` replace top-level
    fields of its configuration (e.g. ``console``, ``disks`` for a clone)."""
    from pyvirt.state import decode
    from pyvirt.vmm.config import ConfigError, VmConfig
    from pyvirt.vmm.machine import MachineState

    what = f"snapshot {path}"
    if not path.is_dir():
        raise SnapshotError(f"{what}: not a directory")
    raw = _read_small(path / MANIFEST, MAX_MANIFEST_BYTES, what)
    try:
        manifest = json.loads(raw)
        if not isinstance(manifest, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        raise SnapshotError(f"{what}: manifest.json is corrupt ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise SnapshotError(f"{what}: not a pyvirt snapshot")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SnapshotError(f"{what}: snapshot format version {manifest.get('format_version')!r};"
                            f" this pyvirt reads version {FORMAT_VERSION}")
    if manifest.get("pyvirt_version") != pyvirt_version():
        raise SnapshotError(f"{what}: made by pyvirt {manifest.get('pyvirt_version')!r}; this is "
                            f"pyvirt {pyvirt_version()} (a snapshot is restored by the version "
                            "that made it)")
    try:
        st_info, mem_info = manifest["state"], manifest["memory"]
        doc = dict(manifest["config"])
        state_size, state_sha = int(st_info["size"]), str(st_info["sha256"])
        mem_size = int(mem_info["size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(f"{what}: manifest.json is incomplete ({exc})") from None
    state_bytes = _read_small(path / STATE, MAX_STATE_BYTES, what)
    if len(state_bytes) != state_size:
        raise SnapshotError(f"{what}: state.bin is {len(state_bytes)} bytes, the manifest says "
                            f"{state_size}: truncated or replaced")
    if hashlib.sha256(state_bytes).hexdigest() != state_sha:
        raise SnapshotError(f"{what}: state.bin does not match its checksum: corrupted")
    if overrides:
        doc.update(overrides)
    try:
        config = VmConfig.from_dict(doc)  # type: ignore[attr-defined]
    except ConfigError as exc:
        raise SnapshotError(f"{what}: configuration: {exc}") from None
    if config.memory != mem_size:
        raise SnapshotError(f"{what}: memory size {mem_size} does not match the configuration")
    raw_state = decode(state_bytes, dict[str, Any], part="snapshot")
    try:
        state = MachineState(devices=dict(raw_state["devices"]), vm=bytes(raw_state["vm"]),
                             vcpus=[bytes(v) for v in raw_state["vcpus"]])
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(f"{what}: state.bin is incomplete ({exc})") from None
    try:
        fd = os.open(path / MEMORY, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SnapshotError(f"{what}: memory.bin is missing") from None
    except OSError as exc:
        raise SnapshotError(f"{what}: memory.bin: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size != mem_size:
        os.close(fd)
        raise SnapshotError(f"{what}: memory.bin is {st.st_size} bytes, expected {mem_size}: "
                            "truncated or replaced")
    return LoadedSnapshot(path, manifest, config, state, fd)


def check_disks(snap: LoadedSnapshot, sizes: list[int]) -> None:
    """The disks being reopened must have the sizes they had at the snapshot."""
    saved = snap.manifest.get("disks") or []
    if len(saved) != len(sizes):
        raise SnapshotError(f"snapshot {snap.path}: it has {len(saved)} disks, the "
                            f"configuration {len(sizes)}")
    for i, (d, size) in enumerate(zip(saved, sizes, strict=True)):
        if int(d.get("size", -1)) != size:
            raise SnapshotError(f"disks[{i}]: the image is {size} bytes, it was "
                                f"{d.get('size')} when the snapshot was taken: size changed")


def check_backend(snap: LoadedSnapshot, backend: str, detail: str) -> None:
    if snap.manifest.get("backend") != backend:
        raise SnapshotError(f"snapshot {snap.path}: taken on the {snap.manifest.get('backend')}"
                            f" backend; this VM would run on {backend}")
    if backend == "emu" and snap.manifest.get("backend_detail") != detail:
        raise SnapshotError(f"snapshot {snap.path}: taken with another software CPU build "
                            f"({snap.manifest.get('backend_detail')}; this is {detail})")
