"""Network benchmark: iperf3, ping and vsock in the Debian rootfs guest, pyvirt vs QEMU.

Both sides boot the default guest's kernel and initramfs with the Debian root
filesystem image read-only on virtio-blk (``root=/dev/vda ro``) on the software CPU
(pyvirt ``--accel emu``, QEMU 7.2 ``-accel tcg``), 1 vCPU, 1 GiB, one virtio-net NIC,
inside a network namespace this benchmark creates and deletes (the host's own
interfaces are never touched). In that namespace:

- ``pvnb0``, a persistent TAP at 10.0.2.2/24 (the guest is 10.0.2.15/24 by
  ``pyvirt.ip=`` on its command line). pyvirt ``--net tap=pvnb0``; QEMU
  ``-netdev tap,ifname=pvnb0,script=no,downscript=no,vhost=off`` on
  ``virtio-net-pci``;
- ``pvnbup`` (one end of a veth pair) at 192.0.2.1/24 with the default route:
  what passt copies into the guest by DHCP (its gateway, 192.0.2.254, is the
  namespace's loopback seen from the guest). User mode: pyvirt
  ``--net user,hostfwd=tcp::5202-:5201`` (passt); QEMU on passt
  (``passt -s SOCK -t 5202:5201`` + ``-netdev stream,addr.type=unix``: QEMU 7.2's
  stream netdev speaks passt's framing) and on QEMU's own slirp
  (``-netdev user,hostfwd=tcp::5202-:5201``); the guest takes a DHCP lease;
- an ``iperf3 -s`` on port 5201 for the whole run, and the clients on the host side.

Measured per VM (each ``RUN_S`` seconds): iperf3 TCP guest→host (``iperf3 -c GW``
in the guest) and host→guest (TAP: ``-R``; user mode: a host client through the
port forward into an ``iperf3 -s`` in the guest), the receiver's figure; on the TAP
200 pings from the host to the guest 10 ms apart (median and p99 RTT of each run);
pyvirt only, with ``--vsock``: a guest→host and a host→guest vsock stream (a small
Python helper in the guest; the host side is the Unix socket) beside the host's
own loopback TCP iperf3 figure. Sides alternate within each round; rows are
medians over the runs, ratios pyvirt / other (throughput: higher is better).

``NET_BENCH_ROOTFS=PATH`` boots another image than ``rootfs_image()`` (it needs
iperf3, python3 and busybox, and must bring eth0 up from ``pyvirt.ip=`` or DHCP).
``NET_BENCH_PYVIRT_ARGS="..."`` adds flags to pyvirt's command line (such as
``--sandbox off``); ``NET_BENCH_LOGS=DIR`` keeps each VM's console there.
Needs root (namespaces, a TAP), ``qemu-system-x86_64``, ``passt`` and ``iperf3``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import socket
import statistics
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from bench.common import ROOT, Row, read_until

NETNS = "pyvirt-netbench"
TAP = "pvnb0"
HOST_IP = "10.0.2.2"
GUEST_IP = "10.0.2.15"
PREFIX = 24
# the namespace's "uplink" for passt: its address and route are what the guest gets
UPLINK = "pvnbup"
UPLINK_IP = "192.0.2.1"
UPLINK_GW = "192.0.2.254"
IPERF_PORT = 5201
FWD_PORT = 5202  # host port forwarded to the guest's IPERF_PORT in user mode
VSOCK_CID = 3
VSOCK_G2H_PORT = 5000  # guest connects here: the host listens at f"{path}_5000"
VSOCK_H2G_PORT = 5001  # guest listens here: the host says "CONNECT 5001"
PINGS = 200
PING_INTERVAL = 0.01
RUN_S = 10
MEMORY = "1G"
CMDLINE = "console=ttyS0 reboot=k panic=-1"
GUEST_ARGS = "root=/dev/vda ro quiet pyvirt.noecho"
BOOT_TIMEOUT = 180.0

BEGIN = b"NB-BEGIN-42"
END = b"NB-END-43"

# The guest side of the vsock streams (python3 is in the rootfs: fio depends on it).
_VSOCK_HELPER = """\
import socket, sys, time
mode, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
if mode == "send":
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    s.connect((2, port))
    buf, end = bytes(1 << 18), time.monotonic() + secs
    while time.monotonic() < end:
        s.sendall(buf)
    s.close()
else:
    ls = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    ls.bind((socket.VMADDR_CID_ANY, port))
    ls.listen(1)
    print("VSOCK-LISTENING", flush=True)
    c, _ = ls.accept()
    n, buf = 0, bytearray(1 << 18)
    while True:
        k = c.recv_into(buf)
        if not k:
            break
        n += k
    c.sendall(b"%d\\n" % n)
    c.close()
"""


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def _in_ns(*args: str) -> list[str]:
    return ["ip", "netns", "exec", NETNS, *args]


@contextlib.contextmanager
def namespace() -> Iterator[None]:
    """The namespace with the TAP, the uplink and the iperf3 server, torn down after."""
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)  # a stale one of ours
    _sh("ip", "netns", "add", NETNS)
    server: subprocess.Popen[bytes] | None = None
    try:
        for cmd in (
            ["ip", "link", "set", "lo", "up"],
            ["ip", "tuntap", "add", "dev", TAP, "mode", "tap"],
            ["ip", "addr", "add", f"{HOST_IP}/{PREFIX}", "dev", TAP],
            ["ip", "link", "set", TAP, "up"],
            # a veth pair (the kernel may lack the dummy driver), both ends in here
            ["ip", "link", "add", UPLINK, "type", "veth", "peer", "name", f"{UPLINK}p"],
            ["ip", "addr", "add", f"{UPLINK_IP}/24", "dev", UPLINK],
            ["ip", "link", "set", f"{UPLINK}p", "up"],
            ["ip", "link", "set", UPLINK, "up"],
            ["ip", "route", "add", "default", "via", UPLINK_GW, "dev", UPLINK],
        ):
            _sh(*_in_ns(*cmd))
        server = subprocess.Popen(_in_ns("iperf3", "-s", "-p", str(IPERF_PORT)),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        yield
    finally:
        if server is not None:
            server.terminate()
            server.wait()
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)


def _iperf_bps(report: dict[str, object]) -> float:
    """The receiver's figure, Mbit/s, from an iperf3 JSON report."""
    if report.get("error"):
        raise RuntimeError(f"iperf3: {report['error']}")
    try:
        end = report["end"]
        assert isinstance(end, dict)
        return float(end["sum_received"]["bits_per_second"]) / 1e6
    except (KeyError, TypeError, AssertionError):
        raise RuntimeError(f"iperf3: a report without its sum: {str(report)[:300]}") from None


def host_iperf(host: str, port: int, secs: int) -> float:
    """An iperf3 client in the namespace, to ``host:port``; Mbit/s received."""
    p = subprocess.run(_in_ns("iperf3", "-c", host, "-p", str(port), "-t", str(secs),
                              "-i", "0", "-J", "--connect-timeout", "5000"),
                       capture_output=True, text=True, timeout=secs + 60)
    try:
        report = json.loads(p.stdout)
    except ValueError:
        raise RuntimeError(f"iperf3 -c {host}:{port}: {p.stdout[-300:]!r}"
                           f" {p.stderr[-300:]!r}") from None
    return _iperf_bps(report)


def host_ping(addr: str) -> tuple[float, float]:
    """(median, p99) round trip in ms of PINGS pings to ``addr`` from the namespace."""
    import sys

    p = subprocess.run(_in_ns(sys.executable, "-m", "bench.net_bench", "--ping", addr),
                       capture_output=True, text=True, timeout=PINGS * 2 + 30, cwd=ROOT)
    rtts = sorted(float(x) for x in p.stdout.split())
    if len(rtts) < PINGS // 2:
        raise RuntimeError(f"ping {addr}: {len(rtts)} of {PINGS} answered {p.stderr[-300:]}")
    p99 = rtts[min(len(rtts) - 1, -(-len(rtts) * 99 // 100) - 1)]
    return statistics.median(rtts), p99


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def pinger(addr: str, count: int = PINGS, interval: float = PING_INTERVAL) -> None:
    """ICMP echo on a raw socket (run inside the namespace; the host has no ping(8)):
    prints the round trip in ms of each answered echo, one a line."""
    ident = os.getpid() & 0xFFFF
    sent: dict[int, float] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        nxt = time.perf_counter()
        seq = 0
        deadline = nxt + count * interval + 1.0
        answered = 0
        while answered < count and time.perf_counter() < deadline:
            now = time.perf_counter()
            if seq < count and now >= nxt:
                head = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
                payload = bytes(56)
                pkt = struct.pack("!BBHHH", 8, 0, _checksum(head + payload), ident, seq)
                sent[seq] = time.perf_counter()
                s.sendto(pkt + payload, (addr, 0))
                seq += 1
                nxt += interval
                continue
            wait = (nxt if seq < count else deadline) - time.perf_counter()
            r, _, _ = select.select([s], [], [], max(wait, 0))
            if not r:
                continue
            data = s.recv(2048)
            t = time.perf_counter()
            ihl = (data[0] & 0x0F) * 4
            typ, _code, _ck, rid, rseq = struct.unpack_from("!BBHHH", data, ihl)
            if typ == 0 and rid == ident and rseq in sent:
                print(f"{(t - sent.pop(rseq)) * 1e3:.4f}")
                answered += 1


#: console lines after which a run cannot produce figures (a soft-lockup warning on a
#: loaded host is not one: the guest goes on)
GUEST_ERRORS = (b"Kernel panic", b"Oops: ", b"BUG: kernel", b"BUG: unable", b"is not a head")


class Console:
    """A child's stdout with what has been read so far."""

    def __init__(self, p: subprocess.Popen[bytes]) -> None:
        assert p.stdout is not None
        self.fd = p.stdout.fileno()
        self.buf = b""

    def wait(self, needle: bytes, timeout: float) -> None:
        if needle in self.buf:
            return
        chunk, _t = read_until(self.fd, needle, timeout, GUEST_ERRORS)
        self.buf += chunk
        if needle not in self.buf:
            errors = [e.decode() for e in GUEST_ERRORS if e in self.buf]
            why = (f"the guest reported {', '.join(errors)}" if errors
                   else f"no {needle.decode()!r} within {timeout:.0f}s")
            raise RuntimeError(f"{why}; the console ends: {self.buf[-600:]!r}")


class Guest:
    """A VMM whose serial console is a shell in the guest."""

    def __init__(self, cmd: list[str], log: Path | None = None) -> None:
        from pyvirt.guest import READY_LINE

        self.cmd = cmd
        self.log = log
        self.p = subprocess.Popen(_in_ns(*cmd), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.con = Console(self.p)
        self._n = 0
        try:
            self.con.wait(READY_LINE.encode(), BOOT_TIMEOUT)
        except BaseException:
            self._end()
            raise

    def send(self, line: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(line.encode() + b"\n")
        self.p.stdin.flush()

    def run(self, shell: str, timeout: float) -> str:
        """Run ``shell``; its output (stdout and stderr) up to the end marker."""
        self._n += 1
        # $((...)) makes the guest compute the markers: an echoed line never matches
        self.send(f"{{ {shell} ; }} >/tmp/nb.out 2>&1; echo NB-BEGIN-$((6*7)).{self._n};"
                  f" cat /tmp/nb.out; echo NB-END-$((6*7+1)).{self._n}")
        end = END + f".{self._n}".encode()
        self.con.wait(end, timeout)
        text = self.con.buf.replace(b"\r", b"")
        start = text.rfind(BEGIN + f".{self._n}\n".encode())
        return text[start:text.rfind(end)].split(b"\n", 1)[1].decode(errors="replace")

    def iperf(self, args: str, secs: int) -> float:
        out = self.run(f"iperf3 {args} -t {secs} -i 0 -J --connect-timeout 5000", secs * 3 + 60)
        try:
            report = json.loads(out)
        except ValueError:
            raise RuntimeError(f"guest iperf3 {args}: {out[-300:]!r}") from None
        return _iperf_bps(report)

    def wait_address(self, timeout: float = 30) -> str:
        """eth0's IPv4 address once it has one (DHCP runs in the background)."""
        out = self.run(f"for i in $(seq {int(timeout * 5)}); do a=$(busybox ip -4 -o addr show"
                       " eth0 | awk '{print $4}'); [ -n \"$a\" ] && break; sleep 0.2; done;"
                       " echo ADDR=$a GW=$(busybox ip route | awk '/^default/{print $3}')",
                       timeout + 30)
        fields = dict(w.split("=", 1) for w in out.split() if "=" in w)
        if not fields.get("ADDR"):
            raise RuntimeError(f"the guest's eth0 got no address within {timeout:.0f}s")
        return fields.get("GW", "")

    def close(self) -> None:
        try:
            if self.p.poll() is None:
                self.send("poweroff")
                self.con.wait(b"reboot: Power down", 60)
                assert self.p.stdin is not None
                self.p.stdin.close()
                if self.p.wait(timeout=60) != 0:
                    raise RuntimeError(f"{self.cmd[0]} exited with status {self.p.returncode}")
        finally:
            self._end()

    def _end(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        if self.log is not None:
            self.log.write_bytes(self.con.buf)


def install_helper(g: Guest) -> None:
    """The vsock helper into the guest's /tmp, through the console in lines a tty takes."""
    b64 = base64.b64encode(_VSOCK_HELPER.encode()).decode()
    g.run(": >/tmp/vs.b64", 30)
    for i in range(0, len(b64), 512):
        g.run(f"echo {b64[i:i + 512]} >>/tmp/vs.b64", 30)
    g.run("base64 -d /tmp/vs.b64 >/tmp/vs.py", 30)


def vsock_g2h(g: Guest, uds: Path, secs: int) -> float:
    """Guest → host vsock stream for ``secs``: MiB/s counted by the host."""
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(f"{uds}_{VSOCK_G2H_PORT}")
    ls.listen(1)
    ls.settimeout(60)
    got: dict[str, float] = {}

    def receive() -> None:
        c, _ = ls.accept()
        buf = bytearray(1 << 20)
        n, t0 = 0, 0.0
        while k := c.recv_into(buf):
            if not n:
                t0 = time.perf_counter()
            n += k
        got["mibs"] = n / (time.perf_counter() - t0) / (1 << 20)
        c.close()

    t = threading.Thread(target=receive)
    t.start()
    try:
        g.run(f"python3 /tmp/vs.py send {VSOCK_G2H_PORT} {secs}", secs * 3 + 60)
        t.join(60)
    finally:
        ls.close()
        os.unlink(f"{uds}_{VSOCK_G2H_PORT}")
    if "mibs" not in got:
        raise RuntimeError("vsock guest→host: nothing arrived")
    return got["mibs"]


def vsock_h2g(g: Guest, uds: Path, secs: int) -> float:
    """Host → guest vsock stream for ``secs``: MiB/s the guest received over the time
    from the first byte sent to the guest's count arriving back."""
    g.send(f"python3 /tmp/vs.py recv {VSOCK_H2G_PORT} 0 &")
    g.con.wait(b"VSOCK-LISTENING", 60)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect(str(uds))
        s.sendall(f"CONNECT {VSOCK_H2G_PORT}\n".encode())
        hello = s.recv(64)
        if not hello.startswith(b"OK "):
            raise RuntimeError(f"vsock CONNECT answered {hello!r}")
        buf = bytes(1 << 18)
        t0 = time.perf_counter()
        end = t0 + secs
        while time.perf_counter() < end:
            s.sendall(buf)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = s.recv(64)
            if not chunk:
                break
            answer += chunk
        dt = time.perf_counter() - t0
    g.run("wait", 30)
    return int(answer) / dt / (1 << 20)


def loopback_mibs(secs: int) -> float:
    """The namespace's loopback TCP, iperf3, MiB/s."""
    return host_iperf("127.0.0.1", IPERF_PORT, secs) * 1e6 / 8 / (1 << 20)


# --- the two VMMs' command lines ----------------------------------------------------


def qemu_cmd(kernel: Path, initrd: Path, rootfs: Path, netdev: str,
             guest_args: str) -> list[str]:
    return [
        "qemu-system-x86_64", "-accel", "tcg", "-M", "pc", "-m", MEMORY, "-smp", "1",
        "-nographic", "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", f"{CMDLINE} {guest_args}",
        "-drive", f"file={rootfs},if=none,id=root,format=raw,readonly=on",
        "-device", "virtio-blk-pci,drive=root",
        "-netdev", netdev, "-device", "virtio-net-pci,netdev=n0",
    ]  # fmt: skip


def pyvirt_cmd(kernel: Path, initrd: Path, rootfs: Path, net: str, guest_args: str,
               extra: Sequence[str] = ()) -> list[str]:
    return [
        str(ROOT / ".venv/bin/pyvirt"), "run", "--accel", "emu", "--memory", MEMORY,
        "--kernel", str(kernel), "--initrd", str(initrd), "--cmdline", guest_args,
        "--disk", f"path={rootfs},readonly=on", "--net", net, *extra,
        *os.environ.get("NET_BENCH_PYVIRT_ARGS", "").split(),
    ]  # fmt: skip


@contextlib.contextmanager
def passt_socket(tmp: Path) -> Iterator[Path]:
    """A passt in the namespace on a Unix socket (one client), for QEMU's stream netdev."""
    # passt drops root for nobody before it binds: a folder nobody may write to
    folder = tmp / "passt"
    folder.mkdir(exist_ok=True)
    shutil.chown(folder, "nobody")
    sock = folder / "passt.sock"
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    # -m 65520: the MTU pyvirt's passt offers (newer passt's default), for a like-for-like run
    p = subprocess.Popen(_in_ns("passt", "-f", "-q", "-1", "-s", str(sock), "-m", "65520",
                                "-t", f"{FWD_PORT}:{IPERF_PORT}"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if p.poll() is not None or time.monotonic() > deadline:
                err = p.stderr.read().decode() if p.stderr and p.poll() is not None else ""
                raise RuntimeError(f"passt did not start: {err.strip()[-300:]}")
            time.sleep(0.05)
        yield sock
    finally:
        if p.poll() is None:
            p.terminate()
        p.wait()


# --- one VM's measurements ----------------------------------------------------------


def tap_run(cmd: list[str], secs: int, uds: Path | None, log: Path | None,
            ways: str = "g2h,h2g") -> dict[str, float]:
    g = Guest(cmd, log)
    try:
        g.wait_address()
        f = {}
        if "g2h" in ways:
            f["tap_g2h"] = g.iperf(f"-c {HOST_IP}", secs)
        if "h2g" in ways:
            f["tap_h2g"] = g.iperf(f"-c {HOST_IP} -R", secs)
        f["ping_med"], f["ping_p99"] = host_ping(GUEST_IP)
        if uds is not None:
            install_helper(g)
            f["vsock_g2h"] = vsock_g2h(g, uds, secs)
            f["vsock_h2g"] = vsock_h2g(g, uds, secs)
    finally:
        g.close()
    return f


def user_run(cmd: list[str], secs: int, log: Path | None) -> dict[str, float]:
    g = Guest(cmd, log)
    try:
        gw = g.wait_address()
        f = {"user_g2h": g.iperf(f"-c {gw}", secs)}
        g.send(f"iperf3 -s -1 -p {IPERF_PORT} >/dev/null 2>&1 &")
        g.run("sleep 1", 30)
        f["user_h2g"] = host_iperf("127.0.0.1", FWD_PORT, secs)
        g.run("wait", 30)
    finally:
        g.close()
    return f


def _rootfs_has_iperf3(rootfs: Path) -> bool:
    """Whether the image's manifest lists iperf3 (an image built before #10 has none)."""
    try:
        packages = json.loads(rootfs.with_name("rootfs.json").read_text()).get("packages", {})
    except (OSError, ValueError):
        return False
    return "iperf3" in packages


#: what ``--paths`` may name (the default is all of them)
PATHS = ("tap", "user", "vsock")


def run(runs: int, secs: int = RUN_S, *, paths: Sequence[str] = PATHS,
        pyvirt_only: bool = False, ways: str = "g2h,h2g") -> list[Row]:
    """``paths``: which NICs to measure (vsock rides on the TAP VM); ``pyvirt_only``:
    no QEMU side; ``ways``: the TAP's iperf3 directions. ``NET_BENCH_PROFILE=DIR``
    runs each pyvirt under ``py-spy record`` (collapsed stacks in DIR)."""
    from pyvirt.guest.build import build_default_guest
    from pyvirt.guest.rootfs import build_rootfs

    if os.geteuid() != 0:
        print("net: needs root (a network namespace and a TAP): not measured")
        return []
    tools = ["passt", "iperf3", "ip"] + ([] if pyvirt_only else ["qemu-system-x86_64"])
    for tool in tools:
        if shutil.which(tool) is None:
            print(f"net: {tool} is not installed: not measured")
            return []
    g = build_default_guest()
    override = os.environ.get("NET_BENCH_ROOTFS")
    rootfs = Path(override) if override else build_rootfs().path
    if not override and not _rootfs_has_iperf3(rootfs):
        print(f"net: the rootfs image {rootfs} has no iperf3 (rebuild it: python -m "
              "pyvirt.guest.rootfs): not measured")
        return []
    profile = os.environ.get("NET_BENCH_PROFILE")
    tap_args = f"{GUEST_ARGS} pyvirt.ip={GUEST_IP}/{PREFIX}"
    logs = os.environ.get("NET_BENCH_LOGS")
    logdir = Path(logs) if logs else None

    samples: dict[tuple[str, str], list[float]] = {}
    failed: dict[str, int] = {}

    def note(side: str, figures: dict[str, float]) -> None:
        for k, v in figures.items():
            samples.setdefault((side, k), []).append(v)

    with tempfile.TemporaryDirectory(prefix="net-bench-") as tmpname, namespace():
        tmp = Path(tmpname)
        tmp.chmod(0o711)  # passt (as nobody) reaches its folder in here
        uds = tmp / "vsock.sock"
        # a private (sparse) copy: nothing else on the host can hold a conflicting lock
        private = tmp / "rootfs.ext4"
        subprocess.run(["cp", "--sparse=always", str(rootfs), str(private)], check=True)
        rootfs = private

        def log(name: str, i: int) -> Path | None:
            return logdir / f"{name}-{i}.log" if logdir else None

        def pyvirt(name: str, i: int, cmd: list[str]) -> list[str]:
            if not profile:
                return cmd
            out = Path(profile) / f"{name}-{i}.txt"
            return [str(ROOT / ".venv/bin/py-spy"), "record", "--threads", "--format", "raw",
                    "-r", "200", "-o", str(out), "--", *cmd]

        want_tap = "tap" in paths or "vsock" in paths
        tap_ways = ways if "tap" in paths else ""
        vsock = uds if "vsock" in paths else None

        # (side, a callable measuring one VM of run i)
        sides: list[tuple[str, Callable[[int], dict[str, float]]]] = []
        if want_tap:
            sides.append(("pyvirt-tap", lambda i: tap_run(
                pyvirt("pyvirt-tap", i, pyvirt_cmd(
                    g.kernel, g.initrd, rootfs, f"tap={TAP}", tap_args,
                    ["--vsock", f"cid={VSOCK_CID},path={uds}"])),
                secs, vsock, log("pyvirt-tap", i), tap_ways)))
        if "tap" in paths and not pyvirt_only:
            sides.append(("qemu-tap", lambda i: tap_run(
                qemu_cmd(g.kernel, g.initrd, rootfs,
                         f"tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off", tap_args),
                secs, None, log("qemu-tap", i), tap_ways)))
        if "user" in paths:
            sides.append(("pyvirt-user", lambda i: user_run(
                pyvirt("pyvirt-user", i, pyvirt_cmd(
                    g.kernel, g.initrd, rootfs,
                    f"user,hostfwd=tcp::{FWD_PORT}-:{IPERF_PORT}", GUEST_ARGS)),
                secs, log("pyvirt-user", i))))

        def qemu_passt(i: int) -> dict[str, float]:
            with passt_socket(tmp) as sock:
                return user_run(qemu_cmd(g.kernel, g.initrd, rootfs,
                                         f"stream,id=n0,server=off,addr.type=unix,"
                                         f"addr.path={sock}", GUEST_ARGS),
                                secs, log("qemu-passt", i))

        if "user" in paths and not pyvirt_only:
            sides.append(("qemu-passt", qemu_passt))
            sides.append(("qemu-slirp", lambda i: user_run(
                qemu_cmd(g.kernel, g.initrd, rootfs,
                         f"user,id=n0,hostfwd=tcp::{FWD_PORT}-:{IPERF_PORT}", GUEST_ARGS),
                secs, log("qemu-slirp", i))))

        for i in range(runs):
            for name, measure in sides:
                try:
                    figures = measure(i)
                # say so, and keep the other runs' figures (socket timeouts are OSErrors)
                except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as err:
                    failed[name] = failed.get(name, 0) + 1
                    print(f"net: {name} run {i + 1} failed: {err}", flush=True)
                    continue
                note(name, figures)
                print(f"net: {name} run {i + 1}: "
                      + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()), flush=True)
            if vsock is not None:
                try:
                    note("host", {"loopback": loopback_mibs(secs)})
                except (RuntimeError, ValueError, subprocess.SubprocessError) as err:
                    print(f"net: loopback iperf3 failed: {err}", flush=True)
            print(f"net: round {i + 1} of {runs} done", flush=True)

    def row(metric: str, key: str, other: str, unit: str, other_name: str = "QEMU",
            mine: str = "") -> Row:
        side = mine or ("pyvirt-tap" if key.startswith(("tap", "ping", "vsock"))
                        else "pyvirt-user")
        return Row(metric, samples.get((side, key), []), samples.get((other, key), []),
                   other_name=other_name, unit=unit)

    rows = [
        row("iperf3 TCP guest→host, TAP (higher better)", "tap_g2h", "qemu-tap", "Mb/s"),
        row("iperf3 TCP host→guest, TAP (higher better)", "tap_h2g", "qemu-tap", "Mb/s"),
        row("ping host→guest median RTT, TAP", "ping_med", "qemu-tap", "ms"),
        row("ping host→guest p99 RTT, TAP", "ping_p99", "qemu-tap", "ms"),
        row("user guest→host, QEMU on passt (higher b.)", "user_g2h", "qemu-passt", "Mb/s"),
        row("user host→guest fwd, QEMU on passt", "user_h2g", "qemu-passt", "Mb/s"),
        row("user guest→host, QEMU's slirp", "user_g2h", "qemu-slirp", "Mb/s", "slirp"),
        row("user host→guest fwd, QEMU's slirp", "user_h2g", "qemu-slirp", "Mb/s", "slirp"),
        Row("vsock guest→host; other: host loopback TCP",
            samples.get(("pyvirt-tap", "vsock_g2h"), []),
            samples.get(("host", "loopback"), []), other_name="lo", unit="MiB/s"),
        Row("vsock host→guest; other: host loopback TCP",
            samples.get(("pyvirt-tap", "vsock_h2g"), []),
            samples.get(("host", "loopback"), []), other_name="lo", unit="MiB/s"),
    ]
    fail_pyvirt = failed.get("pyvirt-tap", 0) + failed.get("pyvirt-user", 0)
    fail_qemu = sum(v for k, v in failed.items() if k.startswith("qemu"))
    # what --paths/--pyvirt-only left out is not a row of nan
    rows = [r for r in rows if r.pyvirt or r.other]
    rows.append(Row("runs that failed", [float(fail_pyvirt)], [float(fail_qemu)], unit=""))
    return rows


def main() -> None:
    import argparse
    import sys

    from bench.common import print_rows

    if sys.argv[1:2] == ["--ping"]:  # host_ping's helper, inside the namespace
        pinger(sys.argv[2])
        return

    ap = argparse.ArgumentParser(prog="python -m bench.net_bench")
    ap.add_argument("--runs", type=int, default=3, help="runs per side (alternating)")
    ap.add_argument("--seconds", type=int, default=RUN_S, help="length of each stream")
    ap.add_argument("--paths", default=",".join(PATHS),
                    help=f"comma-separated, of {', '.join(PATHS)} (default: all)")
    ap.add_argument("--ways", default="g2h,h2g",
                    help="the TAP's iperf3 directions: g2h, h2g or both (default)")
    ap.add_argument("--pyvirt-only", action="store_true", help="no QEMU side")
    args = ap.parse_args()
    paths = [p for p in args.paths.split(",") if p]
    bad = [p for p in paths if p not in PATHS]
    if bad or not paths:
        ap.error(f"--paths: unknown path {bad[0] if bad else '(none)'!r}; "
                 f"choose from {', '.join(PATHS)}")
    print_rows("networking, Debian rootfs guest, software CPU",
               run(args.runs, args.seconds, paths=paths, pyvirt_only=args.pyvirt_only,
                   ways=args.ways))


if __name__ == "__main__":
    main()
