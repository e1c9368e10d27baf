"""The default NAT network through the daemon (issue #12): two VMs defined with
``{"network": "default"}`` get leases from the daemon's dnsmasq, reach each
other, and reach a server on the host.

The "host" is a network namespace the test creates: the daemon runs in it
(``ip netns exec``), so its bridge, nftables table, dnsmasq and TAPs live there,
and the real host's interfaces are never touched (checked before and after).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_support import (
    ConsoleReader,
    daemon_running,
    remove_root,
    short_root,
    wait_for,
)
from tests.netns import NetNs, available

pytestmark = [
    pytest.mark.guest,
    pytest.mark.slow,
    pytest.mark.skipif(available() is not None, reason=str(available())),
]

READY = b"PYVIRT-READY"
SERVER = "10.200.0.1"


def _host_links() -> set[str]:
    out = subprocess.run(["ip", "-j", "link"], capture_output=True, text=True, check=True)
    return {link["ifname"] for link in json.loads(out.stdout)}


@pytest.fixture
def host_ns() -> Iterator[NetNs]:
    with NetNs() as ns:
        ns.run("ip link set lo up")
        # an "uplink" of the host (a veth pair within the namespace: no dummy module here)
        ns.run("ip link add uplink type veth peer name uplink-peer")
        ns.run(f"ip addr add {SERVER}/24 dev uplink")
        ns.run("ip link set uplink up")
        ns.run("ip link set uplink-peer up")
        yield ns


@pytest.fixture
def daemon(host_ns: NetNs, test_guest: Path) -> Iterator[tuple[Any, Path]]:
    from pyvirt.client import Client

    root = short_root("pvn")
    try:
        with daemon_running(root, wrap=["ip", "netns", "exec", host_ns.name]), \
                Client(f"unix://{root / 'run' / 'pyvirtd.sock'}", timeout=180) as c:
            yield c, root
            for d in c.list_domains():
                if d["state"] != "shut off":
                    with contextlib.suppress(Exception):
                        c.destroy(d["name"])
    finally:
        remove_root(root)


def test_default_network_leases_vm_to_vm_and_host(daemon: tuple[Any, Path], host_ns: NetNs,
                                                  tmp_path: Path) -> None:
    c, _root = daemon
    before = _host_links()
    net = c.net_info("default")
    assert net["active"] and net["mode"] == "nat", net
    # a server on the host: a web server in the daemon's namespace, outside the subnet
    www = tmp_path / "www"
    www.mkdir()
    (www / "hello.txt").write_text("HELLO-FROM-HOST\n")
    os.chmod(tmp_path, 0o755)
    server = host_ns.popen([sys.executable, "-m", "http.server", "8000", "--bind", SERVER,
                            "--directory", str(www)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        for n in ("n1", "n2"):
            c.define({"name": n, "memory": "128M", "accel": "emu",
                      "nics": [{"network": "default"}]})
            c.start(n)
        cons = {n: ConsoleReader(Path(c.domain(n)["console_socket"])) for n in ("n1", "n2")}
        for con in cons.values():
            con.expect(READY, 240)
        ifaces = {n: c.iface_list(n) for n in ("n1", "n2")}
        for n, lst in ifaces.items():
            assert len(lst) == 1 and lst[0]["type"] == "network" and \
                lst[0]["source"] == "default", (n, lst)
        macs = {n: ifaces[n][0]["mac"].lower() for n in ifaces}

        def leased() -> dict[str, str] | None:
            by_mac = {x["mac"].lower(): x["ip"] for x in c.net_leases("default")}
            got = {n: by_mac.get(m) for n, m in macs.items()}
            return got if all(got.values()) else None  # type: ignore[return-value]

        ips = wait_for(leased, 120, "both VMs' DHCP leases", interval=0.5)
        subnet = net["ipv4"].rsplit(".", 1)[0]
        assert all(ip.startswith(subnet + ".") for ip in ips.values()), (ips, net)

        # VM to VM, both ways, through the bridge
        for a, b in (("n1", "n2"), ("n2", "n1")):
            mark = cons[a].mark()
            cons[a].send(f"ping -c 2 -W 3 {ips[b]} >/dev/null && echo PING-OK-$((40+2))\n"
                         .encode())
            cons[a].expect(b"PING-OK-42", 60, since=mark)
        # VM to the host's server, through the gateway
        mark = cons["n1"].mark()
        cons["n1"].send(f"wget -q -O - http://{SERVER}:8000/hello.txt\n".encode())
        cons["n1"].expect(b"HELLO-FROM-HOST", 60, since=mark)
        for con in cons.values():
            con.sock.close()
        # a managed save and restore: the VM comes back on a new TAP of the same
        # network (handed to the new VMM) with its address, and reaches n2 again
        tap_before = c.iface_list("n1")[0]["interface"]
        c.wait_task(c.save("n1"))
        assert (c.domain("n1")["state"], c.domain("n1")["reason"]) == ("shut off", "saved")
        c.start("n1")
        assert (c.domain("n1")["state"], c.domain("n1")["reason"]) == ("running", "restored")
        after = c.iface_list("n1")[0]
        assert after["mac"].lower() == macs["n1"] and after["source"] == "default", after
        con = ConsoleReader(Path(c.domain("n1")["console_socket"]))
        mark = con.mark()
        con.send(f"ping -c 2 -W 3 {ips['n2']} >/dev/null && echo BACK-OK-$((40+2))\n".encode())
        con.expect(b"BACK-OK-42", 60, since=mark)
        con.sock.close()
        links = {x["ifname"] for x in json.loads(host_ns.run("ip -j link").stdout)}
        assert after["interface"] in links and (tap_before == after["interface"]
                                                or tap_before not in links), links
    finally:
        server.terminate()
        server.wait(10)
    assert _host_links() == before, "the real host's interfaces changed"
    # the TAPs went away with the VMs
    for n in ("n1", "n2"):
        c.destroy(n)
    links = json.loads(host_ns.run("ip -j link").stdout)
    assert not [x["ifname"] for x in links if x["ifname"].startswith("pvt")], links
