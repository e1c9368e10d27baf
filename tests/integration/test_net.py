"""Networking end to end: the real guest kernel's virtio-net on the software CPU.

Every TAP test runs in a network namespace the test creates (``ip netns``) with a
bridge and real host-side parts: dnsmasq for DHCP, DNS and TFTP, Python servers for
TCP. pyvirt runs inside the namespace (``ip netns exec``), creates its TAP and puts it
on the bridge. The user-mode tests run passt as any user would (no privileges, no
interface touched) in the host's namespace.

- TAP: a DHCP lease from dnsmasq, ping both ways, DNS and a TFTP download (UDP) with
  its sha256, 16 MiB TCP each way with sha256s, the link pulled and plugged back
  through the API (the guest's carrier follows; traffic stops and comes back);
- two VMs on one bridge reach each other (ping, TCP);
- user mode (passt): a DHCP lease, a name resolved, an HTTP download from a server
  on the host with its sha256, a host port forward to a server in the guest.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirt.guest import READY_LINE, GuestImage
from tests.conftest import pyvirt_cmd
from tests.integration.test_emu_boot import EmuVm, image, marker

__all__ = ["image"]  # fixtures re-exported for pytest

pytestmark = [
    pytest.mark.guest,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and TAPs need root"),
]

READY = READY_LINE.encode()
BLOB = 16 << 20


def _field(text: str, name: str) -> str:
    m = re.search(rf"^{name}=(.*)$", text, re.M)
    assert m, f"{name}= not in guest output:\n{text[-3000:]}"
    return m.group(1).strip()


class NetNs:
    """A throw-away network namespace with a bridge ``br0`` at 10.0.0.1/24."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.procs: list[subprocess.Popen[bytes]] = []
        subprocess.run(["ip", "netns", "add", name], check=True)
        try:
            for cmd in ("ip link set lo up", "ip link add br0 type bridge",
                        "ip addr add 10.0.0.1/24 dev br0", "ip link set br0 up"):
                self.run(*cmd.split())
        except BaseException:
            self.close()
            raise

    def cmd(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, *args: str, timeout: float = 60) -> str:
        proc = subprocess.run(self.cmd(*args), capture_output=True, text=True,
                              timeout=timeout, check=False)
        assert proc.returncode == 0, f"{' '.join(args)}: {proc.stderr or proc.stdout}"
        return proc.stdout

    def popen(self, *args: str, **kw: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(self.cmd(*args), **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def python(self, code: str, *args: str) -> subprocess.Popen[bytes]:
        """A Python helper inside the namespace; its stdout is a pipe."""
        return self.popen(sys.executable, "-c", textwrap.dedent(code), *args,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(Exception):
                proc.communicate(timeout=10)
        subprocess.run(["ip", "netns", "del", self.name], check=False)


@pytest.fixture
def netns() -> Iterator[NetNs]:
    ns = NetNs(f"pvt{os.getpid()}x{time.monotonic_ns() % 100000}")
    try:
        yield ns
    finally:
        ns.close()


class NsVm(EmuVm):
    """``pyvirt run --accel emu`` inside a network namespace (or the host's, ns None)."""

    def __init__(self, ns: NetNs | None, *extra: str, cmdline: str = "") -> None:
        # no echo: what the guest prints is only the commands' output
        cmd = pyvirt_cmd("run", "--accel", "emu", "--memory", "512M",
                         "--cmdline", f"pyvirt.noecho {cmdline}".strip(), *extra)
        self.proc = subprocess.Popen(ns.cmd(*cmd) if ns is not None else cmd,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.out = b""

    def ask(self, command: str, name: str, timeout: float = 120) -> str:
        """Run ``command`` in the guest; its output (one line) as ``NAME=...`` on a
        line of its own (the shell's prompt may come before it: a newline first)."""
        self.send(f"echo; echo {marker(name)}$({command})")
        pattern = re.compile(rf"\n{name}=(.*)\n".encode())
        deadline = time.monotonic() + timeout
        while (m := pattern.search(self.out)) is None and time.monotonic() < deadline:
            self.wait_for(f"{name}=".encode(), timeout=max(1.0, deadline - time.monotonic()))
            if pattern.search(self.out) is None:
                self.wait_for(b"\n", count=self.out.count(b"\n") + 1,
                              timeout=max(1.0, deadline - time.monotonic()))
        assert m is not None, f"{name}= not printed:\n{self.text[-3000:]}"
        return m.group(1).decode(errors="replace").strip()


@pytest.fixture
def vms() -> Iterator[list[NsVm]]:
    made: list[NsVm] = []
    yield made
    for vm in made:
        vm.close()


def _dnsmasq(ns: NetNs, tmp: Path) -> Path:
    """DHCP (10.0.0.50-99), DNS (files.pyvirt.test) and TFTP from ``tmp/tftp`` on br0."""
    tftp = tmp / "tftp"
    tftp.mkdir()
    ns.popen("dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--user=root",
             "--interface=br0", "--bind-interfaces", "--dhcp-range=10.0.0.50,10.0.0.99,1h",
             "--dhcp-option=option:router,10.0.0.1", f"--dhcp-leasefile={tmp / 'leases'}",
             "--address=/files.pyvirt.test/10.0.0.1", "--enable-tftp",
             f"--tftp-root={tftp}", f"--pid-file={tmp / 'dnsmasq.pid'}",
             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return tftp


_SINK = """
    import hashlib, socket, sys
    size, port = int(sys.argv[1]), int(sys.argv[2])
    srv = socket.create_server(("0.0.0.0", port))
    print("LISTENING", flush=True)
    conn, _ = srv.accept()
    h, got = hashlib.sha256(), 0
    while got < size:
        chunk = conn.recv(1 << 16)
        if not chunk:
            break
        h.update(chunk)
        got += len(chunk)
    conn.close()
    print(f"GOT {got} {h.hexdigest()}", flush=True)
"""

_SOURCE = """
    import socket, sys, time
    host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    data = open(path, "rb").read()
    deadline = time.monotonic() + 120
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    conn.settimeout(None)
    conn.sendall(data)
    conn.close()
    print("SENT", len(data), flush=True)
"""


def _line(proc: subprocess.Popen[bytes], prefix: bytes, timeout: float = 180) -> str:
    assert proc.stdout is not None
    from tests.conftest import read_until

    seen = read_until(proc.stdout.fileno(), b"\n", timeout) if prefix == b"" else b""
    deadline = time.monotonic() + timeout
    while prefix not in seen and time.monotonic() < deadline:
        chunk = read_until(proc.stdout.fileno(), prefix, deadline - time.monotonic())
        if not chunk:
            break
        seen += chunk
    if prefix in seen and not seen.endswith(b"\n"):
        seen += read_until(proc.stdout.fileno(), b"\n", 10)
    line = next((ln for ln in seen.decode().splitlines() if ln.startswith(prefix.decode())), "")
    assert line, f"{prefix!r} not printed: {seen.decode(errors='replace')[-1000:]}"
    return line


def test_tap_dhcp_ping_dns_tftp_tcp_and_link(image: GuestImage, netns: NetNs, vms: list[NsVm],
                                             tmp_path: Path) -> None:
    tftp = _dnsmasq(netns, tmp_path)
    blob = os.urandom(4 << 20)
    (tftp / "blob").write_bytes(blob)
    api = tmp_path / "api.sock"
    vm = NsVm(netns, "--net", "tap=pvtap0,bridge=br0", "--api-socket", str(api))
    vms.append(vm)
    vm.wait_for(READY)
    # the lease (udhcpc may have gone to the background: wait for it)
    ip = vm.ask("for i in $(seq 60); do a=$(ip -4 -o addr show eth0 | "
                "sed -n 's/.*inet \\([0-9.]*\\).*/\\1/p'); [ -n \"$a\" ] && break; sleep 1; "
                "done; echo $a", "LEASE")
    assert re.fullmatch(r"10\.0\.0\.(5\d|[6-9]\d)", ip), vm.text[-3000:]
    assert "pvtap0" in netns.run("ip", "link", "show", "master", "br0")
    assert vm.ask("ping -c 3 -W 5 10.0.0.1 | grep -c 'bytes from'", "PINGS") == "3"
    out = netns.run("ping", "-c", "5", "-i", "0.2", "-W", "5", ip)
    assert " 0% packet loss" in out, out
    # UDP: DNS from dnsmasq, then a TFTP download
    assert "10.0.0.1" in vm.ask("nslookup files.pyvirt.test 10.0.0.1 | tail -n +3 | "
                                "grep -o '10.0.0.1' | head -1", "DNS")
    got = vm.ask("tftp -g -r blob -l /tmp/tblob 10.0.0.1 && sha256sum /tmp/tblob | "
                 "cut -d' ' -f1", "TFTP", timeout=300)
    assert got == hashlib.sha256(blob).hexdigest()

    # TCP host -> guest: the guest's nc writes what it gets to a file
    (tmp_path / "down.bin").write_bytes(data := os.urandom(BLOB))
    # background work as a grandchild "(cmd &)": see pyvirt.noecho in pyvirt.guest.build
    vm.send("(nc -l -p 5000 > /tmp/down.bin &)")
    src = netns.python(_SOURCE, ip, "5000", str(tmp_path / "down.bin"))
    _line(src, b"SENT", timeout=300)
    got = vm.ask("while pidof nc >/dev/null; do sleep 0.2; done; "
                 "sha256sum /tmp/down.bin | cut -d' ' -f1", "DOWN", timeout=300)
    assert got == hashlib.sha256(data).hexdigest()
    # TCP guest -> host: the host reads exactly BLOB bytes, then closes
    sink = netns.python(_SINK, str(BLOB), "5001")
    _line(sink, b"LISTENING")
    want = vm.ask("dd if=/dev/urandom of=/tmp/up.bin bs=1M count=16 2>/dev/null; "
                  "sha256sum /tmp/up.bin | cut -d' ' -f1", "UPSUM")
    vm.send("nc 10.0.0.1 5001 < /tmp/up.bin")
    assert _line(sink, b"GOT", timeout=300) == f"GOT {BLOB} {want}"

    # the cable pulled and plugged back through the API: the guest's carrier follows
    ctl = [*pyvirt_cmd("ctl", str(api))]
    assert subprocess.run([*ctl, "link", "0", "down"], capture_output=True,
                          timeout=30).returncode == 0
    assert vm.ask("sleep 1; cat /sys/class/net/eth0/carrier", "CARRIER0") == "0"
    assert vm.ask("ping -c 1 -W 2 10.0.0.1 >/dev/null 2>&1 && echo ok || echo lost",
                  "PINGDOWN") == "lost"
    info = subprocess.run([*ctl, "info", "--json"], capture_output=True, text=True,
                          timeout=30)
    assert '"link_up": false' in info.stdout, info.stdout + info.stderr
    assert subprocess.run([*ctl, "link", "0", "up"], capture_output=True,
                          timeout=30).returncode == 0
    assert vm.ask("sleep 1; cat /sys/class/net/eth0/carrier", "CARRIER1") == "1"
    assert vm.ask("ping -c 2 -W 5 10.0.0.1 | grep -c 'bytes from'", "PINGUP") == "2"
    bad = subprocess.run([*ctl, "link", "3", "down"], capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode != 0 and "no NIC 3" in bad.stderr, bad.stderr
    metrics = subprocess.run([*ctl, "metrics"], capture_output=True, text=True, timeout=30)
    assert "virtio-net-0" in metrics.stdout
    vm.send("poweroff")
    assert vm.exit_status() == 0, vm.text[-3000:]
    # the TAP pyvirt created went away with it
    assert "pvtap0" not in netns.run("ip", "link", "show")


def test_two_vms_on_one_bridge(image: GuestImage, netns: NetNs, vms: list[NsVm]) -> None:
    a = NsVm(netns, "--net", "tap=pvtapa,bridge=br0", "--name", "vm-a",
             cmdline="pyvirt.ip=10.0.0.2/24,10.0.0.1")
    vms.append(a)
    b = NsVm(netns, "--net", "tap=pvtapb,bridge=br0", "--name", "vm-b",
             cmdline="pyvirt.ip=10.0.0.3/24,10.0.0.1")
    vms.append(b)
    a.wait_for(READY)
    b.wait_for(READY)
    mac_a = a.ask("cat /sys/class/net/eth0/address", "MACA")
    mac_b = b.ask("cat /sys/class/net/eth0/address", "MACB")
    assert mac_a != mac_b and mac_a.startswith("52:54:00:")
    assert a.ask("ping -c 3 -W 5 10.0.0.3 | grep -c 'bytes from'", "AB") == "3"
    b.send("mkdir -p /www && echo from-b-$((6*7)) > /www/i && httpd -p 7000 -h /www")
    assert b.ask("sleep 1; echo ok", "LISTEN") == "ok"
    assert a.ask("wget -q -O - http://10.0.0.3:7000/i", "FROMB") == "from-b-42"
    for vm in (a, b):
        vm.send("poweroff")
        assert vm.exit_status() == 0, vm.text[-3000:]


_HTTP = """
    import functools, http.server, sys
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    print("PORT", srv.server_address[1], flush=True)
    srv.serve_forever()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(shutil.which("passt") is None, reason="passt is not installed")
def test_user_mode_dhcp_dns_http_and_hostfwd(image: GuestImage, vms: list[NsVm],
                                             tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    blob = os.urandom(4 << 20)
    (www / "blob").write_bytes(blob)
    http = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_HTTP), str(www)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        port = int(_line(http, b"PORT").split()[1])
        fwd = _free_port()
        vm = NsVm(None, "--net", f"user,hostfwd=tcp:127.0.0.1:{fwd}-:8080")
        vms.append(vm)
        vm.wait_for(READY)
        ip = vm.ask("ip -4 -o addr show eth0 | sed -n 's/.*inet \\([0-9.]*\\).*/\\1/p'",
                    "LEASE")
        assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+", ip), vm.text[-3000:]
        gw = vm.ask("ip route | sed -n 's/^default via \\([0-9.]*\\).*/\\1/p'", "GW")
        assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+", gw), vm.text[-3000:]
        # a name the host resolves, resolved by the guest through passt's DNS
        host_name = "deb.debian.org"
        try:
            socket.gethostbyname(host_name)
        except OSError:
            host_name = "localhost"
        resolved = vm.ask(f"nslookup {host_name} 2>&1 | tail -n +3 | grep -c Address",
                          "RESOLVED")
        assert int(resolved) >= 1, vm.text[-3000:]
        # the host's loopback is the gateway's address to the guest (passt's default)
        got = vm.ask(f"wget -q -O /tmp/blob http://{gw}:{port}/blob && "
                     "sha256sum /tmp/blob | cut -d' ' -f1", "HTTP", timeout=300)
        assert got == hashlib.sha256(blob).hexdigest()
        # a host port forward reaches busybox httpd in the guest
        vm.send("mkdir -p /www && echo served-by-guest > /www/index.html && "
                "httpd -p 8080 -h /www")
        assert vm.ask("sleep 1; echo ok", "HTTPD") == "ok"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{fwd}/index.html",
                                            timeout=30) as resp:
                    assert resp.read() == b"served-by-guest\n"
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        vm.send("poweroff")
        assert vm.exit_status() == 0, vm.text[-3000:]
    finally:
        http.kill()
        http.communicate()


# ---- vsock: the guest's AF_VSOCK against Firecracker-style Unix sockets on the host

VSOCK_BIG = 100 << 20


@pytest.fixture(scope="module")
def vsock_initrd(image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default initramfs with ``/usr/bin/vsock-io`` appended as a second archive
    (the kernel unpacks concatenated archives in order)."""
    import gzip
    import io

    from pyvirt.guest.cpio import CpioWriter
    from tests.vsock_tool import build_vsock_tool

    tmp = tmp_path_factory.mktemp("vsock")
    tool = build_vsock_tool(tmp)
    raw = io.BytesIO()
    with CpioWriter(raw) as cpio:
        cpio.add_file("usr/bin/vsock-io", tool.read_bytes(), 0o755)
    out = tmp / "initrd-vsock.cpio.gz"
    out.write_bytes(image.initrd.read_bytes() + gzip.compress(raw.getvalue(), mtime=0))
    (tmp / "host-vsock-io").write_bytes(tool.read_bytes())
    (tmp / "host-vsock-io").chmod(0o755)
    return out


def _host_tool(initrd: Path) -> str:
    return str(initrd.parent / "host-vsock-io")


def test_vsock_streams_both_ways(image: GuestImage, vsock_initrd: Path, vms: list[NsVm],
                                 tmp_path: Path) -> None:
    from tests.vsock_tool import parse_report, pattern

    tool = _host_tool(vsock_initrd)
    uds = tmp_path / "v.sock"
    vm = NsVm(None, "--net", "none", "--kernel", str(image.kernel), "--initrd",
              str(vsock_initrd), "--vsock", f"cid=7,path={uds}")
    vms.append(vm)
    vm.wait_for(READY)
    # guest -> host: 100 MiB to the host's listener at uds_5000
    host = subprocess.Popen([tool, "uds-listen", f"{uds}_5000", "recv"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _line(host, b"listening")
    sent = vm.ask(f"vsock-io connect 2 5000 send {VSOCK_BIG} 7", "G2H", timeout=600)
    out, _ = host.communicate(timeout=120)
    assert parse_report(sent)[1:] == parse_report(out.decode())[1:]
    assert parse_report(sent)[1:] == (VSOCK_BIG, hashlib.sha256(
        pattern(VSOCK_BIG, 7)).hexdigest())

    # host -> guest: CONNECT 6000 through uds, 100 MiB to the guest's listener
    vm.send("(vsock-io listen 6000 recv > /tmp/h2g.txt 2>&1 &)")
    assert vm.ask("sleep 1; cat /tmp/h2g.txt", "LISTENING") == "listening"
    host = subprocess.run([tool, "uds-connect", str(uds), "6000", "send", str(VSOCK_BIG), "9"],
                          capture_output=True, text=True, timeout=600)
    assert host.returncode == 0, host.stderr
    got = vm.ask("until grep -q 'bytes=' /tmp/h2g.txt; do sleep 0.2; done; tail -1 /tmp/h2g.txt",
                 "H2G", timeout=600)
    assert parse_report(got)[1:] == parse_report(host.stdout)[1:]
    assert parse_report(got)[1] == VSOCK_BIG

    # several at once, both ways
    listeners = [subprocess.Popen([tool, "uds-listen", f"{uds}_{5100 + i}", "recv"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for i in range(3)]
    for proc in listeners:
        _line(proc, b"listening")
    vm.send("(vsock-io listen 6100 recv > /tmp/in.txt 2>&1 &)")
    assert vm.ask("sleep 1; head -1 /tmp/in.txt", "ILISTEN") == "listening"
    vm.send("for i in 0 1 2; do (vsock-io connect 2 $((5100 + i)) send 8388608 $((20 + i)) "
            "> /tmp/multi$i.txt 2>&1 &); done")
    inbound = subprocess.run([tool, "uds-connect", str(uds), "6100", "send", "8388608", "30"],
                             capture_output=True, text=True, timeout=600)
    assert inbound.returncode == 0, inbound.stderr
    for i, proc in enumerate(listeners):
        out, _ = proc.communicate(timeout=300)
        assert parse_report(out.decode())[1:] == (8 << 20, hashlib.sha256(
            pattern(8 << 20, 20 + i)).hexdigest())
    got = vm.ask("until grep -q 'bytes=' /tmp/in.txt; do sleep 0.2; done; tail -1 /tmp/in.txt",
                 "INBOUND", timeout=300)
    assert parse_report(got)[1:] == parse_report(inbound.stdout)[1:]
    assert parse_report(got)[1] == 8 << 20

    # a host peer that vanishes mid-stream: the guest's sender fails, the VM goes on
    host = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import os, socket, sys
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(sys.argv[1]); srv.listen(1)
        print("listening", flush=True)
        conn, _ = srv.accept()
        got = 0
        while got < (4 << 20):
            got += len(conn.recv(1 << 16))
        os._exit(0)  # gone without a goodbye, mid-stream
    """), f"{uds}_5200"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _line(host, b"listening")
    status = vm.ask(f"vsock-io connect 2 5200 send {VSOCK_BIG} 3 >/dev/null 2>&1; echo $?",
                    "VANISHED", timeout=600)
    assert status == "1"
    host.communicate(timeout=30)
    # ... and the next stream is fine
    host = subprocess.Popen([tool, "uds-listen", f"{uds}_5300", "recv"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _line(host, b"listening")
    sent = vm.ask("vsock-io connect 2 5300 send 1048576 5", "AFTER", timeout=300)
    out, _ = host.communicate(timeout=60)
    assert parse_report(sent)[1:] == parse_report(out.decode())[1:]
    vm.send("poweroff")
    assert vm.exit_status() == 0, vm.text[-3000:]
    # the listener went with the VM (its file stays when the sandbox forbids removing it:
    # the next VM on this path replaces a socket file nobody listens on)
    with socket.socket(socket.AF_UNIX) as probe, pytest.raises(OSError):
        probe.connect(str(uds))
