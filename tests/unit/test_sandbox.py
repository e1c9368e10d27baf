"""The sandbox module, each case applied in a child process (never to pytest).

A child runs a small script: apply a policy, then try what the sandbox must
allow and what it must forbid, printing one line per attempt. Forbidden
syscalls kill the child with SIGSYS (the default action); with
``seccomp_kill=False`` they fail with EPERM instead.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pyvirt import sandbox
from pyvirt.sandbox import landlock, seccomp

ROOT = Path(__file__).resolve().parents[2]
AS_ROOT = os.geteuid() == 0

needs_landlock = pytest.mark.skipif(landlock.abi_version() == 0,
                                    reason="this kernel has no Landlock")
needs_seccomp = pytest.mark.skipif(seccomp.available() is not None,
                                   reason=f"no seccomp here: {seccomp.available()}")

PRELUDE = """
import os, sys, socket, threading
from pathlib import Path
from pyvirt import sandbox
def say(*a):
    print(*a, flush=True)
def attempt(name, fn):
    try:
        fn()
        say(name, "ok")
    except OSError as exc:
        say(name, "denied", exc.errno)
"""


def child(body: str, *, policy: str = "sandbox.SandboxPolicy(mode='on')",
          setup: str = "") -> subprocess.CompletedProcess[str]:
    """Run ``setup``, apply ``policy`` (Python source), then ``body``."""
    script = PRELUDE + textwrap.dedent(setup) + textwrap.dedent(f"""
        report = sandbox.apply({policy})
        say("applied:", report.summary())
        """) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def ro_policy(*ro: Path, rw: tuple[Path, ...] = (), kill: bool = True) -> str:
    """A policy that lets the interpreter run (runtime paths) plus ``ro``/``rw``."""
    ro_s = "".join(f"Path({str(p)!r}), " for p in ro)
    rw_s = "".join(f"Path({str(p)!r}), " for p in rw)
    return (f"sandbox.SandboxPolicy(mode='on', read_only=({ro_s}"
            f"*sandbox.runtime_read_paths(),), read_write=({rw_s}), "
            f"devices=(Path('/dev/null'),), seccomp_kill={kill})")


def lines(r: subprocess.CompletedProcess[str]) -> list[str]:
    return r.stdout.splitlines()


@needs_landlock
@needs_seccomp
def test_landlock_limits_the_file_system_to_the_policy(tmp_path: Path) -> None:
    given = tmp_path / "given"
    given.mkdir()
    (given / "kernel").write_text("kernel")
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    r = child(f"""
        attempt("read-given", lambda: open({str(given / 'kernel')!r}).read())
        attempt("write-given", lambda: open({str(given / 'kernel')!r}, "a"))
        attempt("create-in-given", lambda: open({str(given / 'new')!r}, "w"))
        attempt("write-disk", lambda: open({str(disk)!r}, "r+b").write(b"x"))
        attempt("read-outside", lambda: open({str(outside)!r}).read())
        attempt("list-parent", lambda: os.listdir({str(tmp_path)!r}))
        attempt("dev-null", lambda: open("/dev/null", "wb").write(b"x"))
        attempt("etc-shadow", lambda: open("/etc/shadow").read())
        """, policy=ro_policy(given, rw=(disk,)))
    assert r.returncode == 0, r.stderr
    eacces = str(errno.EACCES)
    assert lines(r)[1:] == [
        "read-given ok", f"write-given denied {eacces}", f"create-in-given denied {eacces}",
        "write-disk ok", f"read-outside denied {eacces}", f"list-parent denied {eacces}",
        "dev-null ok", f"etc-shadow denied {eacces}"]


@needs_landlock
@needs_seccomp
def test_files_opened_before_keep_working(tmp_path: Path) -> None:
    """Landlock checks opening paths: the VMM's already-open disks stay usable."""
    f = tmp_path / "open-before"
    f.write_bytes(b"abc")
    r = child("""
        os.pwrite(fd, b"xyz", 0)
        say("read", os.pread(fd, 3, 0).decode())
        attempt("reopen", lambda: open(PATH, "rb"))
        """, setup=f"PATH = {str(f)!r}\nfd = os.open(PATH, os.O_RDWR)\n",
        policy=ro_policy())
    assert r.returncode == 0, r.stderr
    assert lines(r)[1:] == ["read xyz", f"reopen denied {errno.EACCES}"]


@needs_seccomp
@pytest.mark.parametrize("name,code", [
    ("socket(AF_INET)", "socket.socket(socket.AF_INET, socket.SOCK_STREAM)"),
    ("fork", "os.fork()"),
    ("execve", "os.execv('/bin/true', ['true'])"),
    ("spawn", "import subprocess; subprocess.run(['/bin/true'])"),
    ("kill another process", "os.kill(os.getppid(), 0)"),
    ("ptrace", "import ctypes; ctypes.CDLL(None).ptrace(0, 0, 0, 0)"),
    # TIOCSTI pushes input into a terminal: the classic escape from a sandbox
    ("ioctl TIOCSTI", "import fcntl; fcntl.ioctl(pty_slave, 0x5412, b'x')"),
    ("mount", "import ctypes; ctypes.CDLL(None).mount(b'none', b'/mnt', b'tmpfs', 0, None)"),
])
def test_forbidden_syscall_kills_the_process(name: str, code: str) -> None:
    r = child(f"""
        say("trying")
        {code}
        say("survived")
        """, policy=ro_policy(), setup="import pty\n_, pty_slave = pty.openpty()\n")
    assert lines(r) and lines(r)[-1] == "trying", (r.stdout, r.stderr)
    assert r.returncode == -signal.SIGSYS, (name, r.returncode, r.stderr)


@needs_seccomp
def test_eperm_mode_fails_the_call_and_keeps_the_process() -> None:
    r = child("""
        attempt("inet", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        attempt("fork", os.fork)
        """, policy=ro_policy(kill=False))
    assert r.returncode == 0, r.stderr
    assert lines(r)[1:] == [f"inet denied {errno.EPERM}", f"fork denied {errno.EPERM}"]


@needs_seccomp
def test_what_the_vmm_needs_still_works(tmp_path: Path) -> None:
    """Threads (clone3 answered ENOSYS, glibc falls back to clone with
    CLONE_THREAD), AF_UNIX sockets (the API), signals to our own threads (the
    vCPU kick), KVM ioctls on an fd opened before, terminal ioctls, lazy
    imports of C extensions, /proc/self."""
    kvm = os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)
    setup = f"kvm = os.open('/dev/kvm', os.O_RDWR) if {kvm!r} else None\n"
    r = child("""
        import signal, time, fcntl
        got = []
        signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
        ev = threading.Event()
        t = threading.Thread(target=ev.wait); t.start()
        signal.pthread_kill(t.ident, signal.SIGUSR1)
        ev.set(); t.join()
        say("thread+tgkill ok")
        a, b = socket.socketpair(socket.AF_UNIX)
        a.send(b"ping"); say("unix", b.recv(4).decode())
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.close()
        if kvm is not None:
            say("kvm api", fcntl.ioctl(kvm, 0xAE00))  # KVM_GET_API_VERSION
        else:
            say("kvm api", 12)
        import lzma, decimal  # extension modules loaded after the sandbox
        say("lzma", len(lzma.compress(b"x" * 100)) > 0)
        say("isatty", os.isatty(1))
        with open("/proc/self/status") as f:
            say("status", "Seccomp:\\t2" in f.read())
        """, setup=setup, policy=ro_policy())
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert lines(r)[1:] == ["thread+tgkill ok", "unix ping", "kvm api 12", "lzma True",
                            "isatty False", "status True"]


@needs_seccomp
def test_tsync_covers_a_thread_started_before() -> None:
    """The software CPU's timer thread may exist before the sandbox: seccomp
    reaches it (TSYNC) and kills the process when it misbehaves."""
    r = child("""
        go.set()
        t.join(10)
        say("survived")
        """, setup="""
        go = threading.Event()
        def early():
            go.wait()
            say("early thread trying")
            socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            say("early thread survived")
        t = threading.Thread(target=early); t.start()
        """, policy=ro_policy())
    assert lines(r)[-1] == "early thread trying", (r.stdout, r.stderr)
    assert r.returncode == -signal.SIGSYS


@needs_seccomp
def test_privileges_are_gone() -> None:
    r = child("""
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("NoNewPrivs", "Seccomp", "CapPrm", "CapEff", "CapInh", "CapAmb",
                         "CapBnd"):
                    say(k, v.strip())
        """, policy=ro_policy())
    assert r.returncode == 0, r.stderr
    got = dict(line.split(" ", 1) for line in lines(r)[1:])
    assert got["NoNewPrivs"] == "1" and got["Seccomp"] == "2"
    for k in ("CapPrm", "CapEff", "CapInh", "CapAmb"):
        assert int(got[k], 16) == 0, (k, got)
    if AS_ROOT:  # emptying the bounding set needs CAP_SETPCAP
        assert int(got["CapBnd"], 16) == 0, got


def test_mode_on_refuses_before_changing_anything() -> None:
    """An explicit --sandbox on a host without Landlock: one clear error, and the
    process is left as it was (no no_new_privs, no filter)."""
    r = child("""
        """, setup="""
        from pyvirt.sandbox import landlock
        landlock.abi_version = lambda: 0
        try:
            sandbox.apply(sandbox.SandboxPolicy(mode="on"))
        except sandbox.SandboxError as exc:
            say("error:", exc)
        with open("/proc/self/status") as f:
            st = f.read()
        say("untouched", "NoNewPrivs:\\t0" in st and "Seccomp:\\t0" in st)
        sys.exit(0)
        """)
    assert r.returncode == 0, r.stderr
    assert lines(r) == ["error: sandbox=on: landlock cannot be applied: the kernel has no "
                        "Landlock (or it is disabled)", "untouched True"]


@needs_seccomp
def test_mode_auto_leaves_out_what_the_host_lacks(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("x")
    r = child(f"""
        say(report.skipped)
        attempt("outside", lambda: open({str(outside)!r}).read())
        """, setup="""
        from pyvirt.sandbox import landlock
        landlock.abi_version = lambda: 0
        """, policy=ro_policy().replace("mode='on'", "mode='auto'"))
    assert r.returncode == 0, r.stderr
    out = lines(r)
    assert "landlock (ABI" not in out[0] and "seccomp allow-list" in out[0]
    assert out[1] == "{'landlock': 'the kernel has no Landlock (or it is disabled)'}"
    assert out[2] == "outside ok"  # no Landlock: said so, and the rest still applied


def test_mode_off_applies_nothing() -> None:
    report = sandbox.apply(sandbox.SandboxPolicy(mode="off"))
    assert report.applied == [] and "sandbox" in report.skipped


def test_missing_policy_path_is_one_clear_error(tmp_path: Path) -> None:
    gone = tmp_path / "gone.img"
    r = child("", setup=f"""
        try:
            sandbox.apply(sandbox.SandboxPolicy(mode="auto", read_write=(Path({str(gone)!r}),)))
        except sandbox.SandboxError as exc:
            say("error:", exc)
        sys.exit(0)
        """)
    assert lines(r) == [f"error: sandbox: {gone}: no such file (the policy names it)"]


def test_handled_rights_follow_the_abi() -> None:
    assert landlock.handled_fs(0) == 0
    assert landlock.handled_fs(1) == (1 << 13) - 1
    assert landlock.handled_fs(2) & landlock.REFER
    assert not landlock.handled_fs(2) & landlock.TRUNCATE
    assert landlock.handled_fs(3) & landlock.TRUNCATE
    assert not landlock.handled_fs(4) & landlock.IOCTL_DEV
    assert landlock.handled_fs(5) & landlock.IOCTL_DEV
    assert landlock.handled_fs(7) == landlock.handled_fs(5)
    assert landlock._ruleset_size(3) == 8 and landlock._ruleset_size(4) == 16
    assert landlock._ruleset_size(6) == 24


@needs_seccomp
def test_allow_list_names_are_known_to_libseccomp() -> None:
    import pyseccomp

    arch = pyseccomp.system_arch()
    unknown = [n for n in seccomp.allowed_syscalls() if pyseccomp.resolve_syscall(arch, n) < 0]
    assert unknown == []
    for never in ("execve", "execveat", "fork", "vfork", "ptrace", "mount", "kill",
                  "process_vm_writev", "init_module", "bpf", "setns", "unshare", "prctl"):
        assert never not in seccomp.allowed_syscalls()


def test_policy_for_vm(tmp_path: Path) -> None:
    from pyvirt.vmm.config import VmConfig, parse_console, parse_disk

    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"i")
    rw, ro = tmp_path / "rw.img", tmp_path / "ro.img"
    rw.write_bytes(b"\0" * 512)
    ro.write_bytes(b"\0" * 512)
    log = tmp_path / "console.log"
    cfg = VmConfig(kernel=kernel, initrd=initrd, disks=(parse_disk(f"path={rw}"),
                                                         parse_disk(f"path={ro},readonly=on")),
                   console=parse_console(f"file:{log}"))
    pol = sandbox.policy_for_vm(cfg, mode="on", kvm=True)
    assert pol.mode == "on"
    assert {kernel, initrd, ro} <= set(pol.read_only)
    assert pol.read_write == (rw, log)
    assert Path("/dev/kvm") in pol.devices
    assert Path(sys.base_prefix) in pol.read_only
    assert Path.cwd() not in pol.read_only or Path.cwd() == Path("/")
    pol = sandbox.policy_for_vm(VmConfig(kernel=kernel), mode="auto", kvm=False)
    assert pol.read_write == () and Path("/dev/kvm") not in pol.devices
