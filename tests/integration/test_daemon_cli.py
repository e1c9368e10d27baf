"""The real ``pyvirt`` command against a real daemon (``pyvirt daemon --root``,
in a network namespace of its own so that its default network never touches
the host's interfaces), with one real VM: the default guest on the software CPU.

One boot is shared by the lifecycle steps (it is seconds idle, far more under
load): create -> list -> console in a pseudo-terminal (the ready line, a command,
Ctrl-]) -> suspend/resume -> events -> shutdown (ACPI) -> the illegal
transitions. ``pyvirt list --all`` is timed against 100 defined domains.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirt.guest import READY_LINE
from tests.daemon_support import (
    BOOT,
    daemon_env,
    ensure_guest,
    guest_marks,
    remove_root,
    short_root,
    spawn_daemon,
    stop_daemon,
)

pytestmark = guest_marks()

ENV = daemon_env()


class Daemon:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.sock = root / "run" / "pyvirtd.sock"
        self.uri = f"unix://{self.sock}"
        # a network namespace of its own: the default NAT network's bridge,
        # nftables table and dnsmasq live there, never on the host
        self.proc = spawn_daemon(root, wrap=["unshare", "--net", "--"])

    def logged(self) -> str:
        return (self.root / "daemon.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        # networks outlive the daemon by design: stop them first (their dnsmasq
        # would otherwise keep the test's namespace alive)
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                from pyvirt.client import Client

                with Client(self.uri) as c:
                    for n in c.net_list():
                        if n.get("active"):
                            c.net_stop(n["name"])
        for pidfile in self.root.glob("run/net/*/dnsmasq.pid"):
            with contextlib.suppress(ValueError, OSError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
        stop_daemon(self.proc)

    def pv(self, *args: str, ok: bool = True, timeout: float = 120,
           input: str | None = None) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "pyvirt", "-c", self.uri, *args],
                           capture_output=True, text=True, timeout=timeout, env=ENV,
                           input=input)
        if ok and r.returncode != 0:
            raise AssertionError(f"pyvirt {' '.join(args)}: exit {r.returncode}\n"
                                 f"{r.stdout}{r.stderr}\ndaemon:\n{self.logged()}")
        return r


@pytest.fixture(scope="module", autouse=True)
def _guest() -> None:
    ensure_guest()


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    root = short_root("pvc")
    root.chmod(0o711)  # the VMMs run as the VM user, who must reach state/vms/UUID
    d = Daemon(root)
    try:
        yield d
    finally:
        d.stop()
        remove_root(root)


class Pty:
    """``pyvirt console`` on a pseudo-terminal, as a user runs it."""

    def __init__(self, argv: list[str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: becomes pyvirt
            os.execve(sys.executable, [sys.executable, "-m", "pyvirt", *argv], ENV)
        self.data = b""

    def expect(self, needle: bytes, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.data:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{needle!r} not seen; got {self.data[-2000:]!r}")
            ready, _, _ = select.select([self.fd], [], [], min(left, 1.0))
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # the child ended: the pty's other side is gone
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"{needle!r} not seen before the end; "
                                         f"got {self.data[-2000:]!r}")
                self.data += chunk

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                with contextlib.suppress(OSError):
                    self.data += os.read(self.fd, 65536)
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            with contextlib.suppress(OSError):
                ready, _, _ = select.select([self.fd], [], [], 0.2)
                if ready:
                    self.data += os.read(self.fd, 65536)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        raise AssertionError(f"pyvirt console did not end; got {self.data[-2000:]!r}")


def _lines(r: subprocess.CompletedProcess[str]) -> list[str]:
    return r.stdout.splitlines()


def test_cli_lifecycle_against_the_daemon(daemon: Daemon) -> None:
    pv = daemon.pv
    assert pv("list", "--all").stdout == " Id   Name   State\n" + "-" * 20 + "\n\n"
    assert "default" in pv("pool-list").stdout

    # create on a terminal, as virt-install: a volume in the default pool, defined,
    # started, and the console attached (the ready line, a command, Ctrl-] leaves)
    con = Pty(["-c", daemon.uri, "create", "--name", "t1", "--memory", "256", "--accel", "emu",
               "--disk", "size=16M", "--network", "none"])
    try:
        con.expect(b"Domain 't1' defined\r\nDomain 't1' started\r\n"
                   b"Connected to domain 't1'\r\nEscape character is ^] (Ctrl + ])", BOOT)
        con.expect(READY_LINE.encode(), BOOT)
        con.send(b"echo cli-$((6*7))\r")
        con.expect(b"cli-42", 60)
        con.send(b"\x1d")
        assert con.wait() == 0
    finally:
        con.kill()
    listed = _lines(pv("list"))
    assert listed[0] == " Id   Name   State" and listed[2].split()[1:] == ["t1", "running"]
    assert pv("domstate", "t1", "--reason").stdout == "running (booted)\n\n"
    blk = _lines(pv("domblklist", "t1"))
    assert blk[2].split()[0] == "vda" and blk[2].endswith("/t1.qcow2")
    vols = json.loads(pv("vol-list", "default", "--json").stdout)
    assert [v["name"] for v in vols] == ["t1.qcow2"]
    assert vols[0]["capacity"] == 16 << 20
    info = dict(line.split(":", 1) for line in _lines(pv("dominfo", "t1")) if ":" in line)
    assert info["State"].strip() == "running" and info["Max memory"].strip() == "262144 KiB"

    # `console` again: the backlog (the ready line) first, then live; Ctrl-] leaves
    con = Pty(["-c", daemon.uri, "console", "t1"])
    try:
        con.expect(b"Connected to domain 't1'\r\nEscape character is ^] (Ctrl + ])", 60)
        con.expect(READY_LINE.encode(), 60)
        con.send(b"echo again-$((6*7))\r")
        con.expect(b"again-42", 60)
        con.send(b"\x1d")
        assert con.wait() == 0
    finally:
        con.kill()

    # events as virsh prints them, while the domain is paused and resumed
    ev = subprocess.Popen([sys.executable, "-m", "pyvirt", "-c", daemon.uri, "event",
                           "--loop", "--domain", "t1"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        time.sleep(3)  # subscribed (the event stream starts with what happens next)
        assert pv("suspend", "t1").stdout == "Domain 't1' suspended\n\n"
        assert pv("domstate", "t1", "--reason").stdout == "paused (user)\n\n"
        r = pv("suspend", "t1", ok=False)
        assert (r.returncode, r.stdout) == (1, "")
        assert r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1
        assert pv("resume", "t1").stdout == "Domain 't1' resumed\n\n"
        # a snapshot (a task followed to its end), then a managed save and the
        # start that resumes from it
        assert pv("snapshot-create-as", "t1", "s1", "first", timeout=BOOT).stdout == (
            "Domain snapshot s1 created\n\n")
        snaps = _lines(pv("snapshot-list", "t1"))
        assert snaps[0] == " Name   Creation Time               State"
        assert snaps[2].split()[0] == "s1" and snaps[2].split()[-1] == "running"
        assert pv("snapshot-current", "t1", "--name").stdout == "s1\n\n"
        assert pv("managedsave", "t1", timeout=BOOT).stdout == (
            "\nDomain 't1' state saved by pyvirt\n\n")
        assert pv("domstate", "t1", "--reason").stdout == "shut off (saved)\n\n"
        assert "Managed save:   yes" in _lines(pv("dominfo", "t1"))
        assert pv("start", "t1", timeout=BOOT).stdout == "Domain 't1' started\n\n"
        assert pv("domstate", "t1", "--reason").stdout == "running (restored)\n\n"
        assert pv("shutdown", "t1", "--timeout", "120", timeout=180).stdout == (
            "Domain 't1' is being shutdown\n\n")
        time.sleep(2)
    finally:
        ev.send_signal(signal.SIGINT)
        out, err = ev.communicate(timeout=30)
    lines = out.splitlines()
    assert lines[:2] == ["event 'lifecycle' for domain 't1': Suspended Paused",
                         "event 'lifecycle' for domain 't1': Resumed Unpaused"], out + err
    want = iter(["event 'lifecycle' for domain 't1': Stopped Saved",
                 "event 'lifecycle' for domain 't1': Started Restored",
                 "event 'lifecycle' for domain 't1': Stopped Shutdown",
                 "event loop interrupted"])
    assert all(w in lines for w in want), out + err  # in this order
    assert lines[-1] == f"events received: {len(lines) - 2}", out + err

    assert pv("domstate", "t1", "--reason").stdout == "shut off (shutdown)\n\n"
    listed = _lines(pv("list", "--all"))
    assert listed[2].split() == ["-", "t1", "shut", "off"]
    # illegal transitions: one error line, exit 1
    for verb in ("destroy", "suspend", "reboot", "console"):
        r = pv(verb, "t1", ok=False)
        assert r.returncode == 1 and r.stdout == "", (verb, r.stdout)
        assert r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1, r.stderr
    r = pv("dominfo", "nosuch", ok=False)
    assert (r.returncode, r.stderr) == (1, "error: domain 'nosuch' not found\n")
    assert pv("undefine", "t1", "--remove-all-storage").stdout == (
        "Domain 't1' has been undefined\n\n")
    assert json.loads(pv("vol-list", "default", "--json").stdout) == [], daemon.logged()


def test_definitions_storage_and_list_speed(daemon: Daemon, tmp_path: Path) -> None:
    pv = daemon.pv
    # define from YAML, dumpdef round trip, edit through $EDITOR
    f = tmp_path / "d1.yaml"
    f.write_text("name: d1\nmemory: 256M\ncpus: 1\naccel: emu\n")
    assert pv("define", str(f)).stdout == f"Domain 'd1' defined from {f}\n\n"
    dumped = pv("dumpdef", "d1").stdout
    assert "name: d1" in dumped
    editor = tmp_path / "ed.sh"
    editor.write_text("#!/bin/sh\nsed -i 's/^cpus: 1$/cpus: 2/' \"$1\"\n")
    editor.chmod(0o755)
    r = subprocess.run([sys.executable, "-m", "pyvirt", "-c", daemon.uri, "edit", "d1"],
                       capture_output=True, text=True, timeout=60,
                       env={**ENV, "EDITOR": str(editor), "VISUAL": ""})
    assert r.stdout == "Domain 'd1' definition edited.\n\n", r.stderr
    assert json.loads(pv("dumpdef", "d1", "--json").stdout)["cpus"] == 2
    # the daemon refuses a bad edit: asked again, "n" leaves it unchanged
    editor.write_text("#!/bin/sh\nsed -i 's/^cpus: 2$/cpus: -5/' \"$1\"\n")
    r = subprocess.run([sys.executable, "-m", "pyvirt", "-c", daemon.uri, "edit", "d1"],
                       capture_output=True, text=True, timeout=60, input="n\n",
                       env={**ENV, "EDITOR": str(editor), "VISUAL": ""})
    assert r.returncode == 1 and "Failed. Try again? [y,n,i,f,?]:" in r.stdout
    assert r.stderr.splitlines()[0].startswith("error: cpus")
    assert json.loads(pv("dumpdef", "d1", "--json").stdout)["cpus"] == 2

    # volumes: create, info, resize, clone, delete; sizes as virsh prints them
    assert pv("vol-create-as", "default", "v1.qcow2", "64M").stdout == "Vol v1.qcow2 created\n\n"
    info = _lines(pv("vol-info", "v1.qcow2"))
    assert "Capacity:       64.00 MiB" in info
    assert pv("vol-resize", "v1.qcow2", "128M").returncode == 0
    assert json.loads(pv("vol-info", "v1.qcow2", "--json").stdout)["capacity"] == 128 << 20
    assert pv("vol-clone", "v1.qcow2", "v2.qcow2", "--mode", "overlay").returncode == 0
    path = pv("vol-path", "v2.qcow2").stdout.strip()
    qi = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-U", path],
                                   capture_output=True, text=True, check=True).stdout)
    assert qi["format"] == "qcow2" and qi["backing-filename"].endswith("v1.qcow2")
    assert pv("vol-delete", "v2.qcow2").stdout == "Vol v2.qcow2 deleted\n\n"
    r = pv("vol-create-as", "default", "v1.qcow2", "1M", ok=False)
    assert r.returncode == 1 and r.stderr.startswith("error: ")

    # a disk-only snapshot of a shut-off domain; undefine --remove-all-storage then
    # removes the pool volume the domain was defined with
    assert pv("vol-create-as", "default", "d2.qcow2", "16M").returncode == 0
    f2 = tmp_path / "d2.json"
    f2.write_text(json.dumps({"name": "d2", "memory": "128M",
                              "disks": [{"volume": "default/d2.qcow2"}]}))
    pv("define", str(f2))
    assert pv("snapshot-create-as", "d2", "s1", "--disk-only").stdout == (
        "Domain snapshot s1 created\n\n")
    assert _lines(pv("snapshot-list", "d2", "--tree")) == ["s1", "", ""]
    assert pv("undefine", "d2", "--remove-all-storage").returncode == 0
    names = [v["name"] for v in json.loads(pv("vol-list", "default", "--json").stdout)]
    assert "d2.qcow2" not in names, "undefine --remove-all-storage left the volume behind"

    # the default NAT network, in the daemon's own network namespace
    nets = _lines(pv("net-list"))
    assert nets[0] == " Name      State    Autostart   Persistent"
    assert nets[2].split() == ["default", "active", "yes", "yes"]
    assert "Bridge:         pyvirt0" in _lines(pv("net-info", "default"))
    assert _lines(pv("net-dhcp-leases", "default"))[0].split()[:2] == ["Expiry", "Time"]

    # pyvirt list --all with 100 defined domains, through the real command
    from pyvirt.client import Client

    c = Client(daemon.uri)
    for i in range(100):
        c.define({"name": f"many{i:03d}", "memory": "128M"})
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        r = pv("list", "--all")
        best = min(best, time.perf_counter() - t0)
    assert len(_lines(r)) == 2 + 101 + 1
    print(f"pyvirt list --all, 101 domains: best of 5 {best * 1000:.0f} ms")
    # the target is 100 ms on an idle machine (docs/benchmarks.md); a shared,
    # loaded test machine gets a generous bound
    assert best < 2.0


def test_remote_uri_missing_daemon_is_one_line(tmp_path: Path) -> None:
    sock = tmp_path / "none.sock"
    r = subprocess.run([sys.executable, "-m", "pyvirt", "-c", f"unix://{sock}", "list"],
                       capture_output=True, text=True, timeout=60, env=ENV)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("error: cannot connect to the daemon")
    assert len(r.stderr.splitlines()) == 1

