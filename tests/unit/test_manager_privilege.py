"""``pyvirt.manager.privilege``: the files handed to a VMM, who it runs as, its
cgroup, its environment. The real VMM under all of it runs in
tests/integration/test_daemon_privilege.py."""

from __future__ import annotations

import fcntl
import grp
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirt.disk.qcow2_create import create_qcow2
from pyvirt.manager import privilege as pv
from pyvirt.manager.errors import InvalidArgument, OperationFailed
from pyvirt.manager.privilege import HandedFiles, Privilege, memory_limit_for
from pyvirt.vmm.config import DiskSpec, VmConfig


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def access(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "vmlinuz"
    k.write_bytes(b"kernel")
    return k


def config(kernel: Path, *disks: DiskSpec, initrd: Path | None = None,
           accel: str = "emu") -> VmConfig:
    return VmConfig(kernel=kernel, initrd=initrd, disks=disks, accel=accel)  # type: ignore[arg-type]


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A temporary directory other users can reach (pytest's sits in a 0700 one)."""
    d = Path(tempfile.mkdtemp(prefix="pvt", dir="/tmp"))
    os.chmod(d, 0o711)
    yield d
    shutil.rmtree(d)


def me() -> Privilege:
    return Privilege(os.getuid(), os.getgid(), reason="test")


# ------------------------------------------------------------------ handed files

def test_kernel_initrd_and_raw_disks_with_their_access_modes(kernel: Path, tmp_path: Path) -> None:
    initrd, rw, ro = tmp_path / "initrd", tmp_path / "rw.img", tmp_path / "ro.img"
    for f in (initrd, rw, ro):
        f.write_bytes(bytes(4096))
    cfg = config(kernel, DiskSpec(rw), DiskSpec(ro, readonly=True), initrd=initrd)
    with me().open_files(cfg) as handed:
        got = {f.key: f for f in handed.files}
        assert list(got) == [str(kernel), str(initrd), str(rw), str(ro)]
        assert [access(got[str(p)].fds[0]) for p in (kernel, initrd, rw, ro)] == [
            os.O_RDONLY, os.O_RDONLY, os.O_RDWR, os.O_RDONLY]
        assert all(len(f.fds) == 1 for f in handed.files)
        fds = handed.fds
        assert handed.args == [a for f in handed.files for a in ("--fd", f"{f.key}={f.fds[0]}")]
        for fd in fds:  # not inherited by accident: only pass_fds hands them over
            assert not os.get_inheritable(fd)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_a_qcow2_chain_is_walked_top_writable_backing_read_only(kernel: Path,
                                                                tmp_path: Path) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    base, mid, top = sub / "base.raw", sub / "mid.qcow2", tmp_path / "top.qcow2"
    base.write_bytes(bytes(1 << 20))
    create_qcow2(mid, 1 << 20, backing="base.raw", backing_format="raw")  # relative to sub/
    create_qcow2(top, 1 << 20, backing=str(mid), backing_format="qcow2")  # absolute
    with me().open_files(config(kernel, DiskSpec(top, format="qcow2"))) as handed:
        got = {f.key: f for f in handed.files}
        assert list(got) == [str(kernel), str(top), str(mid), str(base)]
        assert access(got[str(top)].fds[0]) == os.O_RDWR
        assert access(got[str(mid)].fds[0]) == os.O_RDONLY
        assert access(got[str(base)].fds[0]) == os.O_RDONLY
        assert os.fstat(got[str(base)].fds[0]).st_ino == base.stat().st_ino


def test_cache_none_hands_qcow2_files_a_second_open_file(kernel: Path, tmp_path: Path) -> None:
    base, top, raw = tmp_path / "base.qcow2", tmp_path / "top.qcow2", tmp_path / "r.img"
    create_qcow2(base, 1 << 20)
    create_qcow2(top, 1 << 20, backing=str(base), backing_format="qcow2")
    raw.write_bytes(bytes(4096))
    cfg = config(kernel, DiskSpec(top, format="qcow2", cache="none"), DiskSpec(raw, cache="none"))
    with me().open_files(cfg) as handed:
        got = {f.key: f for f in handed.files}
        assert len(got[str(top)].fds) == len(got[str(base)].fds) == 2
        assert len(got[str(raw)].fds) == 1  # raw needs no metadata descriptor
        a, b = got[str(top)].fds
        assert access(a) == access(b) == os.O_RDWR
        # two open file descriptions: the VMM's O_DIRECT on the first leaves the second
        fcntl.fcntl(a, fcntl.F_SETFL, fcntl.fcntl(a, fcntl.F_GETFL) | os.O_NONBLOCK)
        assert not fcntl.fcntl(b, fcntl.F_GETFL) & os.O_NONBLOCK
        assert f"{top}={a},{b}" in handed.args


def test_a_base_shared_by_two_overlays_is_handed_once(kernel: Path, tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    create_qcow2(base, 1 << 20)
    tops = [tmp_path / "a.qcow2", tmp_path / "b.qcow2"]
    for t in tops:
        create_qcow2(t, 1 << 20, backing=str(base), backing_format="qcow2")
    cfg = config(kernel, *(DiskSpec(t, format="qcow2") for t in tops))
    with me().open_files(cfg) as handed:
        assert [f.key for f in handed.files].count(str(base)) == 1
        assert len(handed.files) == 4


def test_a_writable_unformatted_qcow2_is_refused_and_its_backing_not_followed(
        kernel: Path, tmp_path: Path) -> None:
    """A guest can write a qcow2 header naming any host file into a raw disk:
    the daemon must not open that file for it (the VMM refuses the image too)."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"x" * 4096)
    disk = tmp_path / "guest.img"
    create_qcow2(disk, 1 << 20, backing=str(secret), backing_format="raw")
    before = open_fds()
    with pytest.raises(InvalidArgument) as e:
        me().open_files(config(kernel, DiskSpec(disk)))
    assert e.value.field == "disks[0].format"
    assert "starts with a qcow2 header but no format was given" in str(e.value)
    assert open_fds() == before
    # given as raw: the header is the guest's data, nothing behind it is opened
    with me().open_files(config(kernel, DiskSpec(disk, format="raw"))) as handed:
        assert [f.key for f in handed.files] == [str(kernel), str(disk)]


def test_read_only_probing_follows_the_chain(kernel: Path, tmp_path: Path) -> None:
    base, top = tmp_path / "base.raw", tmp_path / "top.qcow2"
    base.write_bytes(bytes(1 << 20))
    create_qcow2(top, 1 << 20, backing=str(base), backing_format="raw")
    with me().open_files(config(kernel, DiskSpec(top, readonly=True))) as handed:
        assert [f.key for f in handed.files] == [str(kernel), str(top), str(base)]


def test_a_backing_loop_is_refused_with_nothing_left_open(kernel: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    create_qcow2(a, 1 << 20, backing=str(b), backing_format="qcow2")
    create_qcow2(b, 1 << 20, backing=str(tmp_path / "." / "a.qcow2"), backing_format="qcow2")
    before = open_fds()
    with pytest.raises(InvalidArgument, match="a loop") as e:
        me().open_files(config(kernel, DiskSpec(a, format="qcow2")))
    assert e.value.field == "disks[0].path"
    assert open_fds() == before


def test_a_hostile_header_is_an_error_naming_the_disk(kernel: Path, tmp_path: Path) -> None:
    top = tmp_path / "top.qcow2"
    create_qcow2(top, 1 << 20)
    with open(top, "r+b") as f:
        f.seek(20)
        f.write((40).to_bytes(4, "big"))  # cluster_bits 40
    before = open_fds()
    with pytest.raises(InvalidArgument, match="cluster_bits 40") as e:
        me().open_files(config(kernel, DiskSpec(top, format="qcow2", readonly=True)))
    assert e.value.field == "disks[0].path"
    assert open_fds() == before


def test_missing_files_name_their_field(kernel: Path, tmp_path: Path) -> None:
    ok = tmp_path / "ok.img"
    ok.write_bytes(bytes(512))
    before = open_fds()
    with pytest.raises(InvalidArgument) as e:
        me().open_files(config(kernel, DiskSpec(ok), DiskSpec(tmp_path / "gone.img")))
    assert e.value.field == "disks[1].path"
    assert str(e.value) == f"disks[1].path: {tmp_path / 'gone.img'}: no such file"
    with pytest.raises(InvalidArgument) as e:
        me().open_files(config(tmp_path / "nokernel"))
    assert e.value.field == "kernel"
    with pytest.raises(InvalidArgument, match="a directory") as e:
        me().open_files(config(kernel, initrd=tmp_path))
    assert e.value.field == "initrd"
    top = tmp_path / "top.qcow2"
    create_qcow2(top, 1 << 20, backing="missing.raw", backing_format="raw")
    with pytest.raises(InvalidArgument, match=r"backing file missing\.raw") as e:
        me().open_files(config(kernel, DiskSpec(top, format="qcow2")))
    assert e.value.field == "disks[0].path"
    assert open_fds() == before


def test_taps_are_handed_and_closed_with_the_rest(tmp_path: Path) -> None:
    handed = HandedFiles()
    fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    handed.add("tap:pvt12345678", fd)
    assert handed.args == ["--fd", f"tap:pvt12345678={fd}"]
    with pytest.raises(ValueError, match="twice"):
        handed.add("tap:pvt12345678", os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
    private = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    handed.keep_private(private)
    assert handed.fds == [fd]  # the private one is never passed
    handed.close()
    for n in (fd, private):
        with pytest.raises(OSError):
            os.fstat(n)


# ------------------------------------------------------------------ who VMMs run as

def test_a_daemon_that_is_not_root_runs_vmms_as_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1234)
    p = Privilege.detect()
    assert (p.drop, p.vm_uid, p.cgroups) == (False, 1234, None)
    assert "the daemon is not root" in p.reason
    assert "no cgroup" in " ".join(p.notes())


@pytest.mark.skipif(os.geteuid() != 0, reason="detect() as root")
def test_root_without_the_vm_user_runs_vmms_as_root() -> None:
    p = Privilege.detect(user="pyvirt-no-such-user")
    assert (p.drop, p.vm_uid) == (False, 0)
    assert p.reason == ("VMMs run as root: user 'pyvirt-no-such-user' does not exist "
                        "(make setup creates it)")


@pytest.mark.skipif(os.geteuid() != 0, reason="detect() as root")
def test_the_vm_user_must_reach_the_python_installation(open_tmp: Path) -> None:
    hidden = open_tmp / "hidden"
    (hidden / "bin").mkdir(parents=True)
    os.chmod(hidden, 0o700)
    p = Privilege.detect(user="nobody", runtime=[hidden / "bin"])
    assert (p.drop, p.vm_uid) == (False, 0)
    assert p.reason.startswith("VMMs run as root: user nobody cannot run pyvirt from here: "
                               f"{hidden} (mode 0700, owner root) is not searchable")
    p = Privilege.detect(user="nobody", runtime=[Path("/usr/bin/env")])
    assert p.drop and p.vm_uid == pwd.getpwnam("nobody").pw_uid
    assert p.reason == f"VMMs run as user nobody (uid {p.vm_uid})"


@pytest.mark.skipif(os.geteuid() != 0, reason="detect() as root")
def test_kvm_group_access_becomes_a_supplementary_group(tmp_path: Path) -> None:
    dev = tmp_path / "kvm"
    dev.touch()
    gid = grp.getgrnam("nogroup").gr_gid
    os.chown(dev, 0, gid)
    os.chmod(dev, 0o660)
    p = Privilege.detect(user="nobody", runtime=[], kvm_device=dev)
    assert gid in p.extra_gids and not p.host_notes and p.kvm_reachable
    os.chmod(dev, 0o600)
    p = Privilege.detect(user="nobody", runtime=[], kvm_device=dev)
    assert gid not in p.extra_gids and not p.kvm_reachable  # GET /v1/host: auto is emu
    assert p.host_notes == (f"{dev} is not accessible to nobody (mode 0600, group nogroup): "
                            "its VMs use the software CPU",)


# ------------------------------------------------------------------ cgroups

def fake_v2(root: Path, subtree: str) -> None:
    root.mkdir(exist_ok=True)
    (root / "cgroup.controllers").write_text("cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text(subtree + "\n")


def fake_v1_memory(root: Path) -> None:
    (root / "memory").mkdir(parents=True)
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="cgroups are root's")
def test_cgroup_v2_when_it_hands_memory_to_children(tmp_path: Path) -> None:
    fake_v2(tmp_path, "cpu memory")
    fake_v1_memory(tmp_path)
    p = Privilege.detect(user="pyvirt-no-such-user", cgroup_root=tmp_path, cgroup_parent="/")
    cg = p.cgroup_create("0123456789ab-cdef", 300 << 20)
    assert cg is not None and cg.version == 2
    assert cg.path == tmp_path / "pyvirt.slice" / "vm-01234567"
    assert (cg.path / "memory.max").read_text() == str(300 << 20)
    assert (cg.path / "memory.oom.group").read_text() == "1"
    assert (tmp_path / "pyvirt.slice" / "cgroup.subtree_control").read_text() == "+memory"
    assert p.cgroup_for("0123456789ab-cdef") == pv.Cgroup(cg.path, 2, 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="cgroups are root's")
def test_cgroup_v1_memory_when_v2_lacks_the_controller(tmp_path: Path) -> None:
    fake_v2(tmp_path / "unified", "")
    fake_v1_memory(tmp_path)
    (tmp_path / "memory" / "job").mkdir()
    p = Privilege.detect(user="pyvirt-no-such-user", cgroup_root=tmp_path, cgroup_parent="/job")
    cg = p.cgroup_create("abcdef01-2345", 5 << 30)
    assert cg is not None and cg.version == 1
    assert cg.path == tmp_path / "memory" / "job" / "pyvirt.slice" / "vm-abcdef01"
    assert cg.read_limit() == 5 << 30
    (cg.path / "memory.limit_in_bytes").unlink()  # a real cgroup dir is empty to rmdir
    assert cg.remove() and not cg.path.exists()
    assert cg.remove()  # gone already: fine


@pytest.mark.skipif(os.geteuid() != 0, reason="cgroups are root's")
def test_no_memory_cgroup_is_recorded_not_fatal(tmp_path: Path) -> None:
    fake_v2(tmp_path, "cpu")
    p = Privilege.detect(user="pyvirt-no-such-user", cgroup_root=tmp_path, cgroup_parent="/")
    assert p.cgroups is None
    assert p.cgroup_reason == (f"no memory cgroup for VMs: cgroup v2 at {tmp_path} does not "
                               "enable the memory controller; no cgroup v1 memory hierarchy")
    assert p.cgroup_create("abcdef01", 1 << 30) is None
    assert p.cgroup_reason in p.notes()


def test_memory_limit_is_guest_ram_plus_overhead() -> None:
    k = Path("/k")
    assert memory_limit_for(VmConfig(kernel=k, memory=1 << 30, accel="kvm")) == (
        (1 << 30) + pv.DEFAULT_OVERHEAD)
    # the software CPU (or maybe it) adds its translation buffer
    for accel in ("emu", "auto"):
        assert memory_limit_for(VmConfig(kernel=k, memory=1 << 30, accel=accel),  # type: ignore[arg-type]
                                overhead=1) == (1 << 30) + 1 + pv.TCG_BUFFER


# ------------------------------------------------------------------ spawning

def test_the_environment_is_clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for k in [k for k in os.environ if k.startswith("PYVIRT_")]:  # CI's PYVIRT_REQUIRE_KVM
        monkeypatch.delenv(k)
    for k, v in (("PYVIRT_TOKEN", "secret"), ("PYVIRT_URI", "unix:///x"),
                 ("PYVIRT_IO_LOOP", "main"), ("PYVIRT_CACHE_DIR", "/root/.cache"),
                 ("SSH_AUTH_SOCK", "/tmp/agent"),
                 ("PATH", "/root/bin:/usr/bin")):
        monkeypatch.setenv(k, v)
    dropped = Privilege(995, 994, drop=True)
    env = dropped.environment(tmp_path, {"PYVIRT_TEST_SANDBOX_PROBE": "/x"})
    assert env == {"PATH": pv._SAFE_PATH, "LANG": "C.UTF-8", "PYVIRT_IO_LOOP": "main",
                   "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path),
                   "PYVIRT_TEST_SANDBOX_PROBE": "/x"}
    assert me().environment()["PATH"] == "/root/bin:/usr/bin"


def test_spawn_kwargs(tmp_path: Path) -> None:
    p = Privilege(995, 994, (36,), drop=True)
    with HandedFiles() as handed:
        handed.add("tap:x", os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC))
        kw = p.spawn_kwargs(handed, cache_dir=tmp_path)
        assert kw["pass_fds"] == tuple(handed.fds)
    assert (kw["user"], kw["group"], kw["extra_groups"]) == (995, 994, [36])
    assert kw["start_new_session"] and kw["close_fds"] and kw["umask"] == 0o077
    assert kw["cwd"] == "/" and callable(kw["preexec_fn"])
    assert "user" not in me().spawn_kwargs(HandedFiles())


def test_a_spawned_vmm_gets_no_new_privileges_and_only_its_fds(tmp_path: Path) -> None:
    import subprocess
    import sys

    stray = os.open("/dev/null", os.O_RDONLY)  # inheritable, not handed: must not reach it
    try:
        with HandedFiles() as handed:
            given = tmp_path / "given"
            given.write_text("hi")
            handed.add(str(given), os.open(given, os.O_RDONLY | os.O_CLOEXEC))
            fd = handed.fds[0]
            code = ("import os,resource;s=open('/proc/self/status').read();"
                    "print([l for l in s.splitlines() if l.startswith(('NoNewPrivs','Umask'))]);"
                    f"print(os.read({fd},2), resource.getrlimit(resource.RLIMIT_CORE));"
                    f"os.fstat({stray})")
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               **me().spawn_kwargs(handed))
    finally:
        os.close(stray)
    assert "['Umask:\\t0077', 'NoNewPrivs:\\t1']" in r.stdout, r.stderr
    assert "b'hi' (0, 0)" in r.stdout
    assert "Bad file descriptor" in r.stderr


def test_vm_dirs_and_files_for_the_vmm(tmp_path: Path) -> None:
    p = me()
    vm_dir, vm_run = tmp_path / "vms" / "u", tmp_path / "run"
    (tmp_path / "vms").mkdir()
    p.prepare_vm_dirs(vm_dir, vm_run)
    for d in (vm_dir, vm_run, p.prepare_cache_dir(tmp_path)):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    cfg = vm_run / "config.json"
    p.write_file(cfg, b"{}")
    p.write_file(cfg, b'{"a": 1}')
    assert cfg.read_bytes() == b'{"a": 1}' and stat.S_IMODE(cfg.stat().st_mode) == 0o600
    assert sorted(os.listdir(vm_run)) == ["config.json"]


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_vm_dirs_belong_to_the_vm_user_who_must_reach_them(open_tmp: Path) -> None:
    tmp_path = open_tmp
    nobody = pwd.getpwnam("nobody")
    p = Privilege(nobody.pw_uid, nobody.pw_gid, drop=True)
    p.prepare_vm_dirs(tmp_path / "v", tmp_path / "r")
    assert (tmp_path / "v").stat().st_uid == nobody.pw_uid
    p.write_file(tmp_path / "r" / "config.json", b"{}")
    assert (tmp_path / "r" / "config.json").stat().st_uid == nobody.pw_uid
    os.chmod(tmp_path, 0o700)
    with pytest.raises(OperationFailed, match=f"cannot reach {tmp_path / 'w'}: {tmp_path} "
                                              r"\(mode 0700, owner root\) is not searchable"):
        p.prepare_vm_dirs(tmp_path / "w", tmp_path / "r")


def test_api_socket_group() -> None:
    assert Privilege(0, 0, api_group="root").api_socket_group() == 0
    assert Privilege(0, 0, api_group="pyvirt-no-such-group").api_socket_group() is None


def test_ensure_users_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(OperationFailed, match="needs root"):
        pv.ensure_users()


def test_own_cgroup_is_where_the_memory_controller_places_us() -> None:
    lines = dict(line.split(":", 2)[1:] for line in
                 Path("/proc/self/cgroup").read_text().splitlines())
    assert pv.own_cgroup() == lines.get("memory", lines.get("", "/"))
    # the tests' daemons keep their VMs inside the test's cgroup (tests/conftest.py)
    assert os.environ["PYVIRT_CGROUP_PARENT"] == pv.own_cgroup()
