"""The daemon's virtual networks with their real parts (a Linux bridge, nftables,
dnsmasq, TAPs), every one inside network namespaces the test creates.

The code under test runs on a thread inside the test's "host" namespace
(``NetNs.call``), as the daemon would run in its own. The VMs are plain
``pyvirt run`` processes in that namespace on the TAPs ``Networks.attach``
made (the Manager's glue is tested with the daemon).

- start, re-adoption after a daemon restart, a killed dnsmasq restarted by
  ``supervise``, a bridge lost behind our back, isolated networks, definitions
  refused against other networks and the host's routes and interfaces, and
  stop leaving the namespace's links and nftables ruleset exactly as they were;
- end to end (default guest, software CPU): two VMs get leases from dnsmasq
  (``leases()`` shows them), reach each other, and reach a TCP server in a
  second namespace (the "internet") through NAT, which sees the masqueraded
  address; then everything is torn down.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvirt.guest import READY_LINE, GuestImage
from pyvirt.manager.db import Store
from pyvirt.manager.errors import InvalidArgument, OperationInvalid
from pyvirt.manager.events import EventBus
from pyvirt.manager.network import Networks
from pyvirt.manager.paths import DaemonPaths
from tests.conftest import pyvirt_cmd
from tests.daemon_support import kill_network_daemons
from tests.netns import NetNs, available

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and bridges need root"),
]

# a foreign table that must survive everything we do
FOREIGN = """table inet other {
  chain input { type filter hook input priority 10; policy accept; tcp dport 9999 drop; }
}
"""


@pytest.fixture
def ns() -> Iterator[NetNs]:
    why = available()
    if why is not None:
        pytest.fail(why)
    with NetNs() as n:
        yield n


@pytest.fixture
def root() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="pv", dir="/tmp"))
    yield d
    # a test that failed half-way leaves its dnsmasq running (it outlives the
    # daemon on purpose, and would keep the deleted namespace alive): end ours
    kill_network_daemons(d)
    subprocess.run(["rm", "-rf", str(d)], check=False)


class Daemon:
    """One daemon's network part (store + events + Networks) over ``root``; a
    second one over the same root is the daemon restarted."""

    def __init__(self, ns: NetNs, root: Path) -> None:
        self.ns = ns
        self.paths = DaemonPaths.for_root(root)
        self.paths.ensure()
        self.store = Store(self.paths.db)
        self.events = EventBus(self.store)
        self.nets = Networks(self.store, self.paths, self.events)

    def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.ns.call(getattr(self.nets, method), *args, **kwargs)

    def close(self) -> None:
        self.nets.close()
        self.store.close()

    def events_of(self, name: str) -> list[str]:
        return [e["event"] for e in self.events.recent(kind="network", obj=name)]


def _links(ns: NetNs) -> list[tuple[Any, ...]]:
    """What identifies the namespace's links (counters and timers left out)."""
    return sorted((ln["ifname"], tuple(ln.get("flags", ())), ln.get("master"), ln.get("mtu"),
                   ln.get("address"), ln.get("operstate"))
                  for ln in json.loads(ns.run("ip -j link").stdout))


def _dnsmasq_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX" and "dnsmasq" in stat


def _wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while _dnsmasq_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _dnsmasq_alive(pid)


def test_start_readopt_supervise_isolated_refusals_and_clean_stop(ns: NetNs,
                                                                    root: Path) -> None:
    ns.run(["nft", "-f", "-"], input=FOREIGN.encode())
    ns.run("ip link add pvdummy0 type veth peer name pvdummy1")
    ns.run("ip addr add 10.88.1.1/24 dev pvdummy0")
    ns.run("ip link set pvdummy0 up")
    ruleset_before = ns.run("nft list ruleset").stdout
    links_before = _links(ns)
    host_forward = Path("/proc/sys/net/ipv4/ip_forward").read_text()

    d1 = Daemon(ns, root)
    d1("startup")  # first start: "default" defined and started
    info = d1("info", "default")
    assert (info["state"], info["bridge"], info["ipv4"], info["mode"]) == (
        "active", "pyvirt0", "192.168.124.1/24", "nat")
    pid = info["dnsmasq_pid"]
    assert _dnsmasq_alive(pid)
    addr = ns.run("ip -j addr show pyvirt0").stdout
    assert '"local":"192.168.124.1"' in addr.replace(" ", "")
    ruleset = ns.run("nft list table inet pyvirt").stdout
    assert 'oifname != "pyvirt0" ip saddr 192.168.124.0/24 masquerade' in ruleset
    assert ns.run("cat /proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"
    # the foreign table is untouched; the host's own namespace too
    assert FOREIGN.split("{")[0] in ns.run("nft list ruleset").stdout
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == host_forward
    conf = (d1.paths.net_run("default") / "dnsmasq.conf").read_text()
    assert "interface=pyvirt0" in conf and "no-hosts" in conf
    assert "dhcp-range=192.168.124.2,192.168.124.254,255.255.255.0,1h" in conf
    # dnsmasq answers DHCP on the bridge only: it listens on the bridge's address
    sockets = ns.run("ss -lnup").stdout
    assert "0.0.0.0%pyvirt0:67" in sockets, sockets
    assert "192.168.124.1:53" in sockets, sockets

    # the daemon restarts: the network is adopted as it runs, not restarted
    d1.close()
    d2 = Daemon(ns, root)
    d2("startup")
    assert d2("info", "default")["dnsmasq_pid"] == pid
    assert _dnsmasq_alive(pid)
    assert d2.events_of("default")[-1] == "started"  # nothing more since

    # dnsmasq killed: supervise starts it again
    os.kill(pid, signal.SIGKILL)
    _wait_gone(pid)
    d2("supervise")
    new_pid = d2("info", "default")["dnsmasq_pid"]
    assert new_pid != pid and _dnsmasq_alive(new_pid)
    assert d2.events_of("default")[-1] == "dnsmasq-restarted"

    # refusals, each one line naming the field
    cases = [
        ({"name": "n1", "ipv4": "192.168.124.129/25"}, "ipv4: 192.168.124.128/25 overlaps "
         "network 'default' (192.168.124.0/24)"),
        ({"name": "n1", "ipv4": "10.88.0.1/16"}, "ipv4: 10.88.0.0/16 overlaps the host's "
         "route 10.88.1.0/24 on pvdummy0"),
        ({"name": "n1", "ipv4": "10.66.0.1/24", "bridge": "pyvirt0"},
         "bridge: 'pyvirt0' is the bridge of network 'default'"),
        ({"name": "n1", "ipv4": "10.66.0.1/24", "bridge": "pvdummy0"},
         "bridge: an interface named 'pvdummy0' already exists on the host"),
        ({"name": "n1", "ipv4": "10.66.0.1/24", "bridge": "a-very-long-bridge"},
         "bridge: must be an interface name of 1-15"),
        ({"name": "../x", "ipv4": "10.66.0.1/24"}, "name: must be 1-64 characters"),
    ]
    for doc, message in cases:
        with pytest.raises(InvalidArgument) as err:
            d2("define", doc)
        assert str(err.value).startswith(message), str(err.value)
        assert "\n" not in str(err.value)
    assert [n["name"] for n in d2("list")] == ["default"]

    # an isolated network: its own bridge (the next free name), no NAT
    iso = d2("define", {"name": "iso", "mode": "isolated", "ipv4": "10.77.0.1/24",
                        "dhcp": {"start": "10.77.0.10", "end": "10.77.0.20"},
                        "autostart": False})
    assert iso["bridge"] == "pyvirt1" and iso["state"] == "inactive"
    d2("start", "iso")
    ruleset = ns.run("nft list table inet pyvirt").stdout
    assert 'iifname "pyvirt1" reject' in ruleset and 'oifname "pyvirt1" reject' in ruleset
    assert "10.77.0.0/24 masquerade" not in ruleset
    assert "192.168.124.0/24 masquerade" in ruleset
    with pytest.raises(OperationInvalid, match="network 'iso' is already active"):
        d2("start", "iso")
    with pytest.raises(OperationInvalid, match="network 'iso' is active: stop it first"):
        d2("undefine", "iso")

    # a bridge deleted behind the daemon's back: supervise starts the network
    # again, and so does the next daemon
    ns.run("ip link del pyvirt1")
    d2("supervise")
    assert d2.events_of("iso")[-1] == "restarted"
    assert d2("info", "iso")["state"] == "active"
    assert "pyvirt1" in ns.run("ip -br link").stdout
    assert 'iifname "pyvirt1" reject' in ns.run("nft list table inet pyvirt").stdout
    d2.close()
    ns.run("ip link del pyvirt1")
    d3 = Daemon(ns, root)
    d3("startup")
    assert d3("info", "iso")["state"] == "active"
    assert "restarted" in d3.events_of("iso")
    assert "pyvirt1" in ns.run("ip -br link").stdout

    # a TAP for a VM: on the bridge, up, ours; detached, gone
    att = d3("attach", "default", "vm1", "52:54:00:aa:bb:cc", owner_uid=65534)
    link = json.loads(ns.run(f"ip -j -d link show {att.tap}").stdout)[0]
    assert link["master"] == "pyvirt0" and link["linkinfo"]["info_kind"] == "tun"
    tun = link["linkinfo"]["info_data"]
    assert (tun["type"], tun["user"], tun["vnet_hdr"], tun["pi"], tun["multi_queue"],
            tun["persist"]) == ("tap", "nobody", True, False, False, True)
    assert att.tap in d3("info", "default")["taps"]
    d3("detach", att.tap)
    d3("detach", att.tap)  # idempotent
    assert att.tap not in ns.run("ip -br link").stdout
    d3("define", {"name": "n2", "ipv4": "10.55.0.1/24", "autostart": False})
    with pytest.raises(OperationInvalid, match="network 'n2' is not active"):
        d3("attach", "n2", "vm1", None, owner_uid=None)

    # stop: bridges, rules, dnsmasq gone; the namespace exactly as before (the
    # lease file kept for the next start)
    dn_pids = [d3("info", n)["dnsmasq_pid"] for n in ("default", "iso")]
    for name in ("default", "iso"):
        d3("stop", name)
    for p in dn_pids:
        _wait_gone(p)
    assert ns.run("nft list ruleset").stdout == ruleset_before
    assert _links(ns) == links_before
    assert (d3.paths.net_run("default") / "leases").exists()
    assert not (d3.paths.net_run("default") / "dnsmasq.conf").exists()
    with pytest.raises(OperationInvalid, match="network 'default' is not active"):
        d3("stop", "default")
    d3("undefine", "iso")
    assert [n["name"] for n in d3("list")] == ["default", "n2"]
    d3.close()


# ---- end to end with two real VMs

_SERVER = """
import socket, sys
srv = socket.create_server(("10.99.0.2", 8000))
print("LISTENING", flush=True)
for _ in range(2):
    conn, peer = srv.accept()
    conn.settimeout(30)
    data = b""
    while b"\\n" not in data:
        chunk = conn.recv(100)
        if not chunk:
            break
        data += chunk
    conn.sendall(b"pong\\n")
    conn.close()
    print("FROM", peer[0], data.decode().strip(), flush=True)
"""


@pytest.mark.guest
@pytest.mark.slow
def test_two_vms_dhcp_ping_and_nat_to_the_outside(ns: NetNs, root: Path) -> None:
    pytest.importorskip("unicorn")
    from pyvirt.guest import build_default_guest, guest_is_built
    from tests.integration.test_net import NsVm, _line

    image: GuestImage = build_default_guest(log=lambda _m: None) if guest_is_built() else \
        build_default_guest(log=print)
    assert image.kernel.exists()

    with NetNs() as wan:
        # the "internet": a second namespace behind a veth, with no route back to
        # the VMs' subnet: only NAT makes its answers reach them
        ns.run(f"ip link add pvwan0 type veth peer name pvwan1 netns {wan.name}")
        ns.run("ip addr add 10.99.0.1/24 dev pvwan0")
        ns.run("ip link set pvwan0 up")
        wan.run("ip addr add 10.99.0.2/24 dev pvwan1")
        wan.run("ip link set pvwan1 up")
        ruleset_before = ns.run("nft list ruleset").stdout
        links_before = _links(ns)

        d = Daemon(ns, root)
        d("startup")
        taps = [d("attach", "default", f"vm{i}", f"52:54:00:00:00:0{i}", owner_uid=None)
                for i in (1, 2)]
        server = wan.popen(["python3", "-c", _SERVER], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
        _line(server, b"LISTENING")

        class Shim:  # NsVm wants .cmd()
            name = ns.name

            @staticmethod
            def cmd(*args: str) -> list[str]:
                return ["ip", "netns", "exec", ns.name, *args]

        class HandedVm(NsVm):
            """Handed its TAP as an open fd (``--fd tap:IFNAME=N``), as the daemon does."""

            def __init__(self, fd: int, *extra: str) -> None:
                cmd = pyvirt_cmd("run", "--accel", "emu", "--memory", "512M", "--cmdline",
                                 "pyvirt.noecho", "--fd", f"tap:{taps[1].tap}={fd}", *extra)
                self.proc = subprocess.Popen(Shim.cmd(*cmd), stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                             pass_fds=(fd,))
                self.out = b""

        # vm1 opens its TAP by name, vm2 gets an fd of it (opened in the namespace)
        fd = ns.call(taps[1].open_fd)
        vms: list[NsVm] = []
        try:
            vms.append(NsVm(Shim, "--net", f"tap={taps[0].tap},mac={taps[0].mac}",  # type: ignore[arg-type]
                            "--name", "vm1"))
            vms.append(HandedVm(fd, "--net", f"tap={taps[1].tap},mac={taps[1].mac}",
                                "--name", "vm2"))
        finally:
            os.close(fd)
        try:
            for vm in vms:
                vm.wait_for(READY_LINE.encode())
            ips = [vm.ask("for i in $(seq 90); do a=$(ip -4 -o addr show eth0 | "
                          "sed -n 's/.*inet \\([0-9.]*\\).*/\\1/p'); [ -n \"$a\" ] && break; "
                          "sleep 1; done; echo $a", "LEASE") for vm in vms]
            for ip in ips:
                assert re.fullmatch(r"192\.168\.124\.\d+", ip), ips
            # dnsmasq's leases, through leases()
            deadline = time.monotonic() + 30
            while True:
                leases = {x["mac"]: x["ip"] for x in d("leases", "default")}
                if len(leases) == 2 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert leases == {"52:54:00:00:00:01": ips[0], "52:54:00:00:00:02": ips[1]}
            # the two VMs reach each other, and the gateway
            assert vms[0].ask(f"ping -c 3 -W 5 {ips[1]} | grep -c 'bytes from'", "AB") == "3"
            assert vms[1].ask("ping -c 2 -W 5 192.168.124.1 | grep -c 'bytes from'",
                              "GW") == "2"
            # out through NAT: the server sees the host's address on its side
            for i, vm in enumerate(vms, 1):
                got = vm.ask(f"echo hello-{i} | nc -w 20 10.99.0.2 8000", f"NAT{i}")
                assert got == "pong", vm.text[-2000:]
                assert _line(server, b"FROM") == f"FROM 10.99.0.1 hello-{i}"
            for vm in vms:
                vm.send("poweroff")
            for vm in vms:
                assert vm.exit_status() == 0, vm.text[-3000:]
        finally:
            for vm in vms:
                vm.close()
        for a in taps:
            d("detach", a.tap)
        pid = d("info", "default")["dnsmasq_pid"]
        d("stop", "default")
        _wait_gone(pid)
        assert ns.run("nft list ruleset").stdout == ruleset_before
        assert _links(ns) == links_before
        d.close()
