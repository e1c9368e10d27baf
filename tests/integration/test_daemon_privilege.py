"""Least privilege for daemon-started VMMs, for real: a VMM started the way the
daemon starts it (``Privilege.spawn_kwargs``, handed files, a cgroup) runs as
``pyvirt-vm``, boots the default guest from files only root can open, carries
no_new_privs and the seccomp filter, sits in its cgroup under its memory limit,
and cannot open a root-only file it was not given.

The spawning runs in a helper process (this module run as a script) in a
private mount namespace: on a host whose Python lives under a directory the VM
user cannot search (here: a pyenv in /root, mode 0700), the helper lays a
searchable directory over it holding only the way to the interpreter, as a
packaged install (/usr/bin/python3) would be reachable anyway. Everything the
VMM is given still sits where only root reaches it (the default guest in
/root/.cache, disks in a 0700 directory), so it has them through the fds alone.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvirt.manager import privilege as pv

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux unshare is missing"),
]

READY = b"PYVIRT-READY"
BOOT_TIMEOUT = 180.0


@pytest.fixture(scope="module")
def vm_user() -> pwd.struct_passwd:
    """The user and group ``make setup`` creates, by the code it runs."""
    pv.ensure_users()
    assert pv.ensure_users() == []  # idempotent
    return pwd.getpwnam(pv.VM_USER)


@pytest.fixture
def root() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="pv", dir="/tmp"))
    os.chmod(d, 0o711)  # the daemon's state and run dirs below are reachable, as /var/lib is
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def private_disks(root: Path) -> tuple[Path, Path]:
    """A qcow2 overlay over a raw base, both 0600 root in a 0700 directory."""
    from pyvirt.disk.qcow2_create import create_qcow2

    d = root / "private"
    d.mkdir(mode=0o700)
    base, top = d / "base.raw", d / "top.qcow2"
    base.write_bytes(bytes(8 << 20))
    create_qcow2(top, 8 << 20, backing="base.raw", backing_format="raw")
    for f in (base, top):
        os.chmod(f, 0o600)
    return base, top


class Vmm:
    """A VMM the helper started (not this process's child)."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.pid: int = info["pid"]
        self.info = info
        self.console = Path(info["console"])
        self.log = Path(info["log"])

    def status(self) -> dict[str, str]:
        out = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            out[key] = value.strip()
        return out

    def alive(self) -> bool:
        try:
            return self.status()["State"][0] != "Z"
        except (OSError, KeyError):
            return False

    def wait_gone(self, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def wait_console(self, needle: bytes, timeout: float = BOOT_TIMEOUT) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.console.read_bytes() if self.console.exists() else b""
            if needle in text:
                return text
            if not self.alive():
                break
            time.sleep(0.2)
        log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
        pytest.fail(f"{needle!r} not on the console; VMM log ends:\n{log}")

    @property
    def cgroup(self) -> pv.Cgroup:
        return pv.Cgroup(Path(self.info["cgroup"]), self.info["cgroup_version"], 0)

    def stop(self) -> bool:
        """Ends the VMM; True when its cgroup is gone with it."""
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            if not self.wait_gone(30):
                os.kill(self.pid, signal.SIGKILL)
                self.wait_gone(10)
        return self.cgroup.remove()


def helper(spec: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    """Runs ``_helper`` (below) in a private mount namespace; its last line."""
    spec = {"cgroup_parent": pv.own_cgroup(), **spec}
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-m",
                        "tests.integration.test_daemon_privilege", json.dumps(spec)],
                       capture_output=True, text=True, timeout=timeout,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout.splitlines()[-1])
    return out


def spawn(root: Path, config: dict[str, Any], env: dict[str, str] | None = None) -> Vmm:
    return Vmm(helper({"mode": "spawn", "root": str(root), "uuid": str(uuid.uuid4()),
                       "config": config, "env": env or {}}))


def guest_config(root: Path, disks: list[dict[str, Any]], sandbox: str) -> dict[str, Any]:
    from pyvirt.guest import build_default_guest

    image = build_default_guest(log=lambda _m: None)
    return {"kernel": str(image.kernel), "initrd": str(image.initrd), "memory": 256 << 20,
            "accel": "emu", "disks": disks, "sandbox": sandbox,
            "console": {"kind": "file", "path": "VMDIR/console.log"}}


@pytest.mark.guest
def test_the_vmm_runs_as_the_vm_user_confined_in_its_cgroup(
        vm_user: pwd.struct_passwd, root: Path, private_disks: tuple[Path, Path]) -> None:
    base, top = private_disks
    cfg = guest_config(root, [{"path": str(top), "format": "qcow2"}], sandbox="auto")
    vmm = spawn(root, cfg)
    try:
        text = vmm.wait_console(READY)
        assert b"[vda] 16384 512-byte logical blocks" in text  # the disk reached the guest
        st = vmm.status()
        assert st["Uid"].split() == [str(vm_user.pw_uid)] * 4
        assert st["Gid"].split() == [str(vm_user.pw_gid)] * 4
        assert st["NoNewPrivs"] == "1"
        assert st["Seccomp"] == "2"  # the VMM's own sandbox, applied as that user
        assert st["CapEff"] == "0000000000000000"
        cg = vmm.cgroup
        assert vmm.pid in cg.pids()  # joined before exec by the preexec (no add() called)
        expected = (256 << 20) + pv.DEFAULT_OVERHEAD + pv.TCG_BUFFER
        assert vmm.info["limit"] == expected
        assert cg.read_limit() == expected
        line = f"/{cg.path.name}"
        assert any(entry.endswith(line) and ("memory" in entry or entry.startswith("0::"))
                   for entry in Path(f"/proc/{vmm.pid}/cgroup").read_text().splitlines())
        # the guest's writes went through the handed O_RDWR fd into the root-only overlay
        assert base.stat().st_uid == top.stat().st_uid == 0
    finally:
        removed = vmm.stop()
    assert removed and not vmm.cgroup.path.exists()  # removed once the VMM ended


@pytest.mark.guest
def test_the_vmm_cannot_open_a_root_only_file_it_was_not_given(
        vm_user: pwd.struct_passwd, root: Path, private_disks: tuple[Path, Path]) -> None:
    """The sandbox is off here: what stops the VMM is its user alone (and
    NoNewPrivs comes from the spawn, not from the sandbox)."""
    from pyvirt.sandbox import PROBE_ENV

    _base, top = private_disks
    secret = root / "secret.txt"  # in a searchable directory: only the file's mode stops it
    secret.write_text("root's")
    os.chmod(secret, 0o600)
    cfg = guest_config(root, [{"path": str(top), "format": "qcow2"}], sandbox="off")
    vmm = spawn(root, cfg, env={PROBE_ENV: os.pathsep.join(map(str, (secret, top)))})
    try:
        assert vmm.wait_gone(BOOT_TIMEOUT)
    finally:
        assert vmm.stop()
    log = vmm.log.read_text(errors="replace")
    for line in ("NoNewPrivs=1", "Seccomp=0", f"open {secret}: denied (Permission denied)",
                 f"open {top}: denied (Permission denied)", "socket(AF_INET): allowed"):
        assert f"sandbox-probe: {line}\n" in log, log


@pytest.mark.guest
def test_a_vm_the_manager_starts_runs_as_the_vm_user(vm_user: pwd.struct_passwd,
                                                     root: Path) -> None:
    """The same through the Manager (Privilege.detect, define, start, destroy)."""
    seen = helper({"mode": "manager", "root": str(root)}, timeout=BOOT_TIMEOUT + 60)
    assert seen["reason"] == f"VMMs run as user {pv.VM_USER} (uid {vm_user.pw_uid})"
    assert seen["Uid"].split() == [str(vm_user.pw_uid)] * 4
    assert (seen["NoNewPrivs"], seen["Seccomp"]) == ("1", "2")
    assert seen["in_cgroup"] and seen["limit"] == (256 << 20) + pv.DEFAULT_OVERHEAD + pv.TCG_BUFFER
    assert seen["state_after"] == "shut off"
    assert not seen["cgroup_left"]  # removed when the VM ended


def test_the_api_socket_group(vm_user: pwd.struct_passwd) -> None:
    import grp

    priv = pv.Privilege.detect()
    assert priv.api_socket_group() == grp.getgrnam(pv.API_GROUP).gr_gid
    assert vm_user.pw_shell == "/usr/sbin/nologin"
    assert not Path(vm_user.pw_dir).exists()


# ---------------------------------------------------------------------- the helper

def _shadow(blocked: Path, keep: list[Path], under: Path) -> None:
    """Lay a searchable directory over ``blocked`` holding only the entries on
    the way to ``keep`` (bind mounts of the real ones); this namespace only."""
    shadow = Path(tempfile.mkdtemp(prefix="shadow", dir=under))  # removed with the test's root
    os.chmod(shadow, 0o711)
    for name in sorted({p.relative_to(blocked).parts[0] for p in keep
                        if p.is_relative_to(blocked) and p != blocked}):
        src = blocked / name
        dst = shadow / name
        if src.is_dir():
            dst.mkdir()
        else:
            dst.touch()
        subprocess.run(["mount", "--rbind", str(src), str(dst)], check=True)
    subprocess.run(["mount", "--rbind", str(shadow), str(blocked)], check=True)


def _make_reachable(also: list[Path], under: Path) -> None:
    """Shadow what keeps the VM user from the interpreter (keeping ``also``)."""
    vm = pwd.getpwnam(pv.VM_USER)
    runtime = pv._runtime_paths()
    for p in runtime:
        why = pv._unreachable(p, vm.pw_uid, (vm.pw_gid,))
        if why is not None:
            blocked = Path(why.split(" (mode")[0])
            _shadow(blocked, [Path(os.path.realpath(x)) for x in runtime] + runtime + also,
                    under)


def _manager(spec: dict[str, Any]) -> dict[str, Any]:
    import time as _time

    from pyvirt.guest import build_default_guest
    from pyvirt.manager.manager import Manager
    from pyvirt.manager.paths import DaemonPaths

    # the daemon resolves the default guest itself: its directory stays visible
    _make_reachable([build_default_guest(log=lambda _m: None).kernel.parent],
                    Path(spec["root"]))
    priv = pv.Privilege.detect(cgroup_parent=spec["cgroup_parent"])
    m = Manager(DaemonPaths.for_root(Path(spec["root"])), privilege=priv, start_networks=False)
    m.startup()
    try:
        m.define({"name": "least", "memory": "256M", "accel": "emu"})
        info = m.start("least")
        pid = info["pid"]
        seen: dict[str, Any] = {"reason": priv.reason}
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("Uid", "NoNewPrivs", "Seccomp"):
                seen[key] = value.strip()
        cg = priv.cgroup_for(info["uuid"])
        assert cg is not None, priv.cgroup_reason
        deadline = _time.monotonic() + 10  # Seccomp shows 2 once set-up is done
        while seen.get("Seccomp") != "2" and _time.monotonic() < deadline:
            _time.sleep(0.2)
            st = Path(f"/proc/{pid}/status").read_text()
            seen["Seccomp"] = st.split("Seccomp:")[1].split()[0]
        seen["in_cgroup"] = pid in cg.pids()
        seen["limit"] = cg.read_limit()
        m.destroy("least")
        seen["state_after"] = m.get("least")["state"]
        seen["cgroup_left"] = cg.path.exists()
        return seen
    finally:
        m.close()


def _helper(spec: dict[str, Any]) -> None:
    if spec["mode"] == "manager":
        print(json.dumps(_manager(spec)))
        return
    from pyvirt.manager.paths import DaemonPaths
    from pyvirt.vmm.config import VmConfig

    paths = DaemonPaths.for_root(Path(spec["root"]))
    paths.ensure()
    uid = spec["uuid"]
    vm_dir, vm_run = paths.vm_dir(uid), paths.vm_run(uid)
    doc = json.loads(json.dumps(spec["config"]).replace("VMDIR", str(vm_dir)))
    config = VmConfig.from_dict(doc)
    # the files first, as the daemon (root) sees them; then the VM user's view
    handed = pv.Privilege(0, 0).open_files(config)
    _make_reachable([], Path(spec["root"]))
    priv = pv.Privilege.detect(cgroup_parent=spec["cgroup_parent"])
    assert priv.drop, priv.reason
    priv.prepare_vm_dirs(vm_dir, vm_run)
    cache = priv.prepare_cache_dir(paths.state)
    cfg_file = vm_run / "config.json"
    priv.write_file(cfg_file, config.to_json().encode())
    limit = pv.memory_limit_for(config)
    cg = priv.cgroup_create(uid, limit)
    assert cg is not None, priv.cgroup_reason
    log_path = vm_dir / "vmm.log"
    with handed, open(log_path, "ab") as log:
        kw = priv.spawn_kwargs(handed, cgroup=cg, cache_dir=cache, env=spec["env"])
        proc = subprocess.Popen([sys.executable, "-m", "pyvirt", "run", "--config", str(cfg_file),
                                 "--snapshot-root", str(vm_dir), *handed.args],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, **kw)
    print(json.dumps({"pid": proc.pid, "cgroup": str(cg.path), "cgroup_version": cg.version,
                      "limit": cg.read_limit(), "console": str(vm_dir / "console.log"),
                      "log": str(log_path)}))


if __name__ == "__main__":
    _helper(json.loads(sys.argv[1]))
