"""Management benchmark (issue #12): pyvirtd and its CLI.

A daemon (``pyvirt daemon --root DIR``) runs in a network namespace of its own
(its default NAT network's bridge never reaches the host's interfaces):

1. ``pyvirt list --all`` with 100 defined VMs, end to end (a new process per
   call, as a user types it), against ``virsh list --all`` with 100 defined
   domains on libvirtd (9.0, Debian's; started in a namespace of its own the
   same way) when libvirt is installed;
2. start -> the guest's ready line through the daemon (``Client.start``, then
   its console over the API's WebSocket) against ``pyvirt run`` in the
   foreground (the ready line on its stdout): the daemon's overhead; sides
   alternate;
3. the daemon's RSS with 20 VMs defined and running;
4. API latency (p50, p99) with 50 concurrent clients doing lifecycle
   operations (info, suspend/resume, list) on 4 running VMs for 30 s.

All guests: the default guest, 128 MiB, no NIC, on the software CPU.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import ROOT, Row, read_until

VMS_LISTED = 100
VMS_RUNNING = 20
CLIENTS = 50
LOAD_SECONDS = 30.0


def _pyvirt() -> list[str]:
    return [sys.executable, "-m", "pyvirt"]


@contextlib.contextmanager
def _netns(name: str) -> Iterator[str]:
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
                       check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@contextlib.contextmanager
def daemon(ns: str) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    root = Path(tempfile.mkdtemp(prefix="pvb", dir="/tmp"))
    os.chmod(root, 0o711)  # VMMs run as the VM user: it must reach state/vms/UUID
    log = open(root / "daemon.log", "wb")  # noqa: SIM115
    p = subprocess.Popen(["ip", "netns", "exec", ns, *_pyvirt(), "daemon", "--root",
                          str(root)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    sock = root / "run" / "pyvirtd.sock"
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start: "
                                   f"{(root / 'daemon.log').read_text()[-2000:]}")
            time.sleep(0.1)
        yield sock, p
    finally:
        from pyvirt.client import Client

        with contextlib.suppress(Exception), Client(f"unix://{sock}", timeout=60) as c:
            for d in c.list_domains():
                if d["state"] != "shut off":
                    with contextlib.suppress(Exception):
                        c.destroy(d["name"])
            # networks (dnsmasq) outlive a daemon on purpose: stop them, or they stay
            for n in c.net_list():
                if n.get("active"):
                    with contextlib.suppress(Exception):
                        c.net_stop(n["name"])
        p.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(30)
        if p.poll() is None:
            p.kill()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def _definition(name: str) -> dict[str, Any]:
    return {"name": name, "memory": "128M", "nics": [], "accel": "emu"}


def _time_cmd(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t0


# ---- 1. list

def _list_rows(sock: Path, runs: int) -> list[Row]:
    from pyvirt.client import Client

    with Client(f"unix://{sock}") as c:
        for i in range(VMS_LISTED):
            c.define(_definition(f"list{i:03d}"))
    row = Row(f"list --all, {VMS_LISTED} defined VMs", unit="s", other_name="virsh",
              target="<= 0.100 s")
    virsh = _Libvirt() if shutil.which("virsh") and shutil.which("libvirtd") else None
    try:
        if virsh is not None:
            virsh.define(VMS_LISTED)
        pyv = [*_pyvirt(), "-c", f"unix://{sock}", "list", "--all"]
        pyv_bin = shutil.which("pyvirt") or str(Path(sys.executable).parent / "pyvirt")
        if Path(pyv_bin).exists():
            pyv = [pyv_bin, "-c", f"unix://{sock}", "list", "--all"]
        for _ in range(max(runs, 5) * 2):
            row.pyvirt.append(_time_cmd(pyv))
            if virsh is not None:
                row.other.append(_time_cmd(["virsh", "-c", "qemu:///system", "list", "--all"]))
    finally:
        if virsh is not None:
            virsh.close()
    return [row]


class _Libvirt:
    """libvirtd in a network namespace of its own, with throw-away domains."""

    def __init__(self) -> None:
        self.ns = f"pvlv{os.getpid()}"
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        for d in ("/var/log/libvirt", "/var/run/libvirt"):
            os.makedirs(d, exist_ok=True)
        # Debian's libvirt runs QEMU as libvirt-qemu: its package creates the user;
        # without the package's postinst (no systemd here) we make it
        if subprocess.run(["id", "libvirt-qemu"], capture_output=True).returncode:
            subprocess.run(["groupadd", "-rf", "libvirt-qemu"], check=False)
            subprocess.run(["useradd", "-r", "-g", "libvirt-qemu", "-s", "/usr/sbin/nologin",
                            "libvirt-qemu"], check=False)
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, "libvirtd"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while subprocess.run(["virsh", "-c", "qemu:///system", "version"],
                             capture_output=True).returncode:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("libvirtd did not start")
            time.sleep(0.2)
        self.names: list[str] = []

    def define(self, n: int) -> None:
        with tempfile.TemporaryDirectory() as d:
            for i in range(n):
                name = f"pvbench{i:03d}"
                xml = Path(d) / f"{name}.xml"
                xml.write_text(f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>128"
                               "</memory><os><type arch='x86_64'>hvm</type></os></domain>")
                subprocess.run(["virsh", "-c", "qemu:///system", "define", str(xml)],
                               check=True, stdout=subprocess.DEVNULL)
                self.names.append(name)

    def close(self) -> None:
        for name in self.names:
            subprocess.run(["virsh", "-c", "qemu:///system", "undefine", name],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(20)
        subprocess.run(["ip", "netns", "del", self.ns], check=False)


# ---- 2. start -> ready

def _ready_via_daemon(sock: Path, name: str) -> float:
    from pyvirt.client import Client
    from pyvirt.guest import READY_LINE

    with Client(f"unix://{sock}", timeout=120) as c:
        t0 = time.perf_counter()
        c.start(name)
        seen = b""
        with c.console(name) as ws:
            while READY_LINE.encode() not in seen:
                msg = ws.recv(timeout=120)
                seen += msg if isinstance(msg, bytes) else msg.encode()
        t = time.perf_counter() - t0
        c.destroy(name)
    return t


def _ready_via_run() -> float:
    from pyvirt.guest import READY_LINE

    t0 = time.perf_counter()
    p = subprocess.Popen([*_pyvirt(), "run", "--memory", "128M", "--net", "none",
                          "--accel", "emu"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert p.stdout is not None
    _, when = read_until(p.stdout.fileno(), READY_LINE.encode(), 120)
    p.kill()
    p.wait()
    if when is None:
        raise RuntimeError("pyvirt run: no ready line")
    return when - t0


def _start_rows(sock: Path, runs: int) -> list[Row]:
    from pyvirt.client import Client

    with Client(f"unix://{sock}") as c:
        c.define(_definition("ready"))
    row = Row("start -> ready line (daemon vs pyvirt run)", other_name="run",
              target="<= 1.10x")
    for _ in range(runs):
        row.pyvirt.append(_ready_via_daemon(sock, "ready"))
        row.other.append(_ready_via_run())
    return [row]


# ---- 3 + 4. RSS with 20 VMs, latency under load

def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _daemon_pid(p: subprocess.Popen[bytes]) -> int:
    # `ip netns exec` execs the daemon: same pid
    return p.pid


def _load_rows(sock: Path, p: subprocess.Popen[bytes]) -> list[Row]:
    from pyvirt.client import Client

    names = [f"run{i:02d}" for i in range(VMS_RUNNING)]
    with Client(f"unix://{sock}", timeout=300) as c:
        for n in names:
            c.define(_definition(n))
        for n in names:
            c.start(n)
        rss = _rss_kib(_daemon_pid(p))
        running = sum(1 for d in c.list_domains() if d["state"] == "running")
        for n in names[4:]:
            c.destroy(n)
    rows = [Row(f"daemon RSS, {running} VMs running", pyvirt=[rss / 1024], unit="MiB",
                other_name="-")]
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = time.monotonic() + LOAD_SECONDS

    def client(i: int) -> None:
        from pyvirt.client import ClientError

        vm = names[i % 4]
        mine: list[float] = []
        with Client(f"unix://{sock}", timeout=60) as c:
            k = 0
            while time.monotonic() < stop:
                op = k % 4
                k += 1
                t0 = time.perf_counter()
                try:
                    if op == 0:
                        c.domain(vm)
                    elif op == 1:
                        c.suspend(vm)
                    elif op == 2:
                        c.resume(vm)
                    else:
                        c.list_domains()
                except ClientError as exc:
                    if exc.code != "operation-invalid":  # suspend of a paused VM: legal refusal
                        with lock:
                            errors.append(str(exc))
                mine.append(time.perf_counter() - t0)
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat.sort()
    p50 = statistics.median(lat) if lat else float("nan")
    p99 = lat[int(len(lat) * 0.99)] if lat else float("nan")
    rows.append(Row(f"API latency p50, {CLIENTS} clients ({len(lat)} requests)",
                    pyvirt=[p50 * 1000], unit="ms", other_name="-"))
    rows.append(Row(f"API latency p99 ({len(errors)} errors)", pyvirt=[p99 * 1000], unit="ms",
                    other_name="-"))
    return rows


def run(runs: int) -> list[Row]:
    rows: list[Row] = []
    with _netns(f"pvbd{os.getpid()}") as ns, daemon(ns) as (sock, p):
        rows += _list_rows(sock, runs)
        rows += _start_rows(sock, runs)
        rows += _load_rows(sock, p)
    return rows
