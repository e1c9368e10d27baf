"""Virtual networks, the pure parts: definitions checked field by field, the
generated nftables script and dnsmasq configuration, the lease file parsed
as the hostile input it is, and ``Networks``' bookkeeping against a fake host
(the real bridge, nft and dnsmasq are tests/integration/test_daemon_network.py)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest

from pyvirt.manager.db import Store
from pyvirt.manager.errors import AlreadyExists, InvalidArgument, NotFound, OperationInvalid
from pyvirt.manager.events import EventBus
from pyvirt.manager.network import (
    Networks,
    _Active,
    _is_ours,
    _proc_stat,
    dnsmasq_config,
    nft_ruleset,
    parse_leases,
    parse_network,
)
from pyvirt.manager.paths import DaemonPaths

GOOD = {"name": "lab", "mode": "nat", "bridge": "pvlab0", "ipv4": "10.20.0.1/24",
        "dhcp": {"start": "10.20.0.100", "end": "10.20.0.199"}}


def _bad(change: dict[str, Any], drop: tuple[str, ...] = ()) -> str:
    doc = {k: v for k, v in {**GOOD, **change}.items() if k not in drop}
    with pytest.raises(InvalidArgument) as err:
        parse_network(doc)
    msg = str(err.value)
    assert "\n" not in msg and "--" not in msg
    return msg


def test_a_good_definition_round_trips() -> None:
    d = parse_network(GOOD)
    assert d.to_doc() == {**GOOD, "uuid": d.uuid, "autostart": True}
    assert parse_network(d.to_doc()) == d
    assert str(d.subnet) == "10.20.0.0/24"
    iso = parse_network({"name": "l2", "mode": "isolated", "bridge": "pvl2"})
    assert iso.ipv4 is None and iso.dhcp is None


@pytest.mark.parametrize(("change", "drop", "starts"), [
    ({"name": "a/b"}, (), "name: must be 1-64"),
    ({"name": ""}, (), "name: "),
    ({"name": "x" * 65}, (), "name: "),
    ({"name": 7}, (), "name: "),
    ({}, ("name",), "name: "),
    ({"uuid": "nope"}, (), "uuid: is not a UUID"),
    ({"mode": "bridge"}, (), "mode: must be 'nat' or 'isolated'"),
    ({"bridge": "pvlab0123456789x"}, (), "bridge: must be an interface name of 1-15"),
    ({"bridge": 'a"b'}, (), "bridge: "),
    ({"bridge": "br 0"}, (), "bridge: "),
    ({"bridge": "br\n0"}, (), "bridge: "),
    ({"ipv4": "10.20.0.1"}, (), "ipv4: must be the bridge's address and prefix"),
    ({"ipv4": "10.20.0.300/24"}, (), "ipv4: '10.20.0.300/24' is not an IPv4"),
    ({"ipv4": "10.20.0.1/31"}, (), "ipv4: the prefix must be between /8 and /30"),
    ({"ipv4": "10.0.0.1/7"}, (), "ipv4: the prefix"),
    ({"ipv4": "10.20.0.0/24"}, (), "ipv4: 10.20.0.0 is the subnet's network"),
    ({"ipv4": "10.20.0.255/24"}, (), "ipv4: 10.20.0.255 is the subnet's network or broadcast"),
    ({"ipv4": "127.0.0.1/8"}, (), "ipv4: 127.0.0.1 cannot be"),
    ({"ipv4": "224.0.0.1/24"}, (), "ipv4: 224.0.0.1 cannot be"),
    ({"ipv4": "169.254.0.1/16"}, (), "ipv4: 169.254.0.1 cannot be"),
    ({}, ("ipv4", "dhcp"), "ipv4: a NAT network needs an address"),
    ({"mode": "isolated"}, ("ipv4",), "dhcp: DHCP needs the network's ipv4"),
    ({"dhcp": {"start": "10.20.0.100"}}, (), "dhcp: must be {"),
    ({"dhcp": {"start": "10.20.0.100", "end": "10.20.0.199", "x": 1}}, (), "dhcp: must be"),
    ({"dhcp": "10.20.0.100-200"}, (), "dhcp: must be"),
    ({"dhcp": {"start": "10.21.0.100", "end": "10.20.0.199"}}, (),
     "dhcp.start: 10.21.0.100 is not a host address of 10.20.0.0/24"),
    ({"dhcp": {"start": "10.20.0.100", "end": "10.20.0.255"}}, (),
     "dhcp.end: 10.20.0.255 is not a host address"),
    ({"dhcp": {"start": "10.20.0.100", "end": 5}}, (), "dhcp.end: '5' is not an IPv4"),
    ({"dhcp": {"start": "10.20.0.200", "end": "10.20.0.100"}}, (),
     "dhcp: the range starts after it ends"),
    ({"dhcp": {"start": "10.20.0.1", "end": "10.20.0.100"}}, (),
     "dhcp: the range holds the network's own address 10.20.0.1"),
    ({"autostart": "yes"}, (), "autostart: must be true or false"),
    ({"forward": "nat"}, (), "forward: unknown field"),
])
def test_bad_definitions_are_one_line_naming_the_field(change: dict[str, Any],
                                                        drop: tuple[str, ...],
                                                        starts: str) -> None:
    msg = _bad(change, drop)
    assert msg.startswith(starts), msg


def test_not_a_mapping() -> None:
    with pytest.raises(InvalidArgument, match="must be an object"):
        parse_network(["default"])


def test_ruleset_replaces_only_our_table() -> None:
    empty = nft_ruleset([])
    # deleting our table whether or not it exists, naming nothing else
    assert empty == "add table inet pyvirt\ndelete table inet pyvirt\n"
    text = nft_ruleset([_Active("default", "nat", "pyvirt0", "192.168.124.0/24"),
                        _Active("iso", "isolated", "pyvirt1", "10.77.0.0/24")])
    lines = [ln.strip() for ln in text.splitlines()]
    assert lines[:3] == ["add table inet pyvirt", "delete table inet pyvirt",
                         "table inet pyvirt {"]
    assert sum("table" in ln for ln in lines) == 3
    assert 'oifname != "pyvirt0" ip saddr 192.168.124.0/24 masquerade' in lines
    assert not any("10.77.0.0/24 masquerade" in ln for ln in lines)
    # accepts come before every reject: a reject of one network never shadows them
    first_reject = min(i for i, ln in enumerate(lines) if ln.endswith("reject"))
    last_accept = max(i for i, ln in enumerate(lines) if ln.endswith("accept"))
    assert last_accept < first_reject
    for br in ("pyvirt0", "pyvirt1"):
        assert f'iifname "{br}" reject' in lines and f'oifname "{br}" reject' in lines
    only_iso = nft_ruleset([_Active("iso", "isolated", "pyvirt1", None)])
    assert "postrouting" not in only_iso and "masquerade" not in only_iso


def test_dnsmasq_configuration(tmp_path: Path) -> None:
    conf = dnsmasq_config(parse_network(GOOD), tmp_path)
    lines = conf.splitlines()
    for want in ("interface=pvlab0", "listen-address=10.20.0.1", "bind-interfaces",
                 "no-hosts", "except-interface=lo", f"pid-file={tmp_path / 'dnsmasq.pid'}",
                 f"dhcp-leasefile={tmp_path / 'leases'}",
                 "dhcp-range=10.20.0.100,10.20.0.199,255.255.255.0,1h",
                 "dhcp-lease-max=100"):
        assert want in lines, conf
    assert "no-resolv" not in lines and "dhcp-option=3" not in lines
    iso = dnsmasq_config(parse_network({**GOOD, "mode": "isolated", "ipv4": "10.0.0.1/8",
                                        "dhcp": {"start": "10.0.0.2",
                                                 "end": "10.255.255.254"}}), tmp_path)
    # a huge range: dnsmasq's table stays bounded; no router, no upstream DNS
    assert "dhcp-lease-max=4096" in iso.splitlines()
    assert "no-resolv" in iso.splitlines() and "dhcp-option=3" in iso.splitlines()


def test_leases_parsed_defensively() -> None:
    text = "\n".join([
        "2000000000 52:54:00:12:34:56 192.168.124.57 vm-one 01:52:54:00:12:34:56",
        "0 52:54:00:AA:BB:CC 192.168.124.9 * *",                   # infinite, no name
        "1000 52:54:00:00:00:01 192.168.124.10 old *",              # expired
        "2000000000 zz:54:00:00:00:01 192.168.124.11 bad-mac *",
        "2000000000 52:54:00:00:00:02 192.168.124.300 bad-ip *",
        "2000000000 52:54:00:00:00:03 192.168.124.12 $(reboot) *",  # a hostile name
        "2000000000 52:54:00:00:00:04 192.168.124.13 " + "h" * 500 + " *",
        "notanumber 52:54:00:00:00:05 192.168.124.14 x *",
        "duid 00:01:00:01:2c:5f",
        "short line",
        "",
        "\x00\xff garbage",
    ])
    got = parse_leases(text, now=1_800_000_000)
    assert got == [
        {"mac": "52:54:00:aa:bb:cc", "ip": "192.168.124.9", "hostname": None,
         "client_id": None, "expires": 0},
        {"mac": "52:54:00:00:00:03", "ip": "192.168.124.12", "hostname": None,
         "client_id": None, "expires": 2000000000},
        {"mac": "52:54:00:00:00:04", "ip": "192.168.124.13", "hostname": None,
         "client_id": None, "expires": 2000000000},
        {"mac": "52:54:00:12:34:56", "ip": "192.168.124.57", "hostname": "vm-one",
         "client_id": "01:52:54:00:12:34:56", "expires": 2000000000},
    ]


def test_process_identity_is_pid_start_time_and_command_line(tmp_path: Path) -> None:
    st = _proc_stat(os.getpid())
    assert st is not None and st[0] in "RS"
    # our own process is not a dnsmasq on that configuration, nor with other ticks
    assert not _is_ours(os.getpid(), st[1], tmp_path / "dnsmasq.conf")
    assert not _is_ours(1 << 22, 0, tmp_path / "dnsmasq.conf")
    assert not _is_ours(0, 0, tmp_path / "dnsmasq.conf")
    assert _proc_stat(1 << 22) is None


class FakeHost(Networks):
    """Networks over a host that has ``routes`` and ``interfaces`` (nothing touched)."""

    routes: list[tuple[IPv4Network, str]] = []
    interfaces: set[str] = set()

    def _host_routes(self, exclude_bridge: str | None) -> list[tuple[IPv4Network, str]]:
        return [(n, d) for n, d in self.routes if d != exclude_bridge]

    def _interface_exists(self, name: str) -> bool:
        return name in self.interfaces


@pytest.fixture
def nets() -> Iterator[FakeHost]:
    root = Path(tempfile.mkdtemp(prefix="pv", dir="/tmp"))
    paths = DaemonPaths.for_root(root)
    paths.ensure()
    store = Store(paths.db)
    n = FakeHost(store, paths, EventBus(store))
    n.routes = [(IPv4Network("10.30.0.0/16"), "eth0")]
    n.interfaces = {"eth0", "pyvirt0"}
    yield n
    store.close()
    import shutil
    shutil.rmtree(root, ignore_errors=True)


def test_define_checks_other_networks_and_the_host(nets: FakeHost) -> None:
    a = nets.define({"name": "a", "ipv4": "10.40.0.1/24"})
    # the first free bridge name: pyvirt0 exists on the host
    assert a["bridge"] == "pyvirt1" and a["state"] == "inactive" and a["autostart"] is True
    b = nets.define({"name": "b", "mode": "isolated"})
    assert b["bridge"] == "pyvirt2"
    refused = {
        "ipv4: 10.40.0.0/16 overlaps network 'a' (10.40.0.0/24)":
            {"name": "c", "ipv4": "10.40.0.1/16"},
        "ipv4: 10.30.5.0/24 overlaps the host's route 10.30.0.0/16 on eth0":
            {"name": "c", "ipv4": "10.30.5.1/24"},
        "bridge: 'pyvirt1' is the bridge of network 'a'":
            {"name": "c", "ipv4": "10.50.0.1/24", "bridge": "pyvirt1"},
        "bridge: an interface named 'eth0' already exists on the host":
            {"name": "c", "ipv4": "10.50.0.1/24", "bridge": "eth0"},
    }
    for message, doc in refused.items():
        with pytest.raises(InvalidArgument) as err:
            nets.define(doc)
        assert str(err.value) == message
    assert [n["name"] for n in nets.list()] == ["a", "b"]
    # redefining keeps the uuid and the bridge; another uuid is refused
    again = nets.define({"name": "a", "ipv4": "10.41.0.1/24", "autostart": False})
    assert (again["uuid"], again["bridge"], again["ipv4"], again["autostart"]) == (
        a["uuid"], "pyvirt1", "10.41.0.1/24", False)
    with pytest.raises(AlreadyExists, match="network 'a' already exists with uuid"):
        nets.define({"name": "a", "ipv4": "10.41.0.1/24",
                     "uuid": "00000000-0000-0000-0000-000000000001"})
    with pytest.raises(AlreadyExists, match="network 'a' already has uuid"):
        nets.define({"name": "z", "ipv4": "10.42.0.1/24", "uuid": a["uuid"]})
    events = [e["event"] for e in nets.events.recent(kind="network")]
    assert events == ["defined", "defined", "defined"]


def test_state_rules(nets: FakeHost) -> None:
    nets.define({"name": "a", "ipv4": "10.40.0.1/24"})
    with pytest.raises(OperationInvalid, match="network 'a' is not active"):
        nets.stop("a")
    with pytest.raises(OperationInvalid, match="network 'a' is not active"):
        nets.attach("a", "vm", None, owner_uid=None)
    with pytest.raises(NotFound, match="network 'nope' not found"):
        nets.start("nope")
    with pytest.raises(NotFound):
        nets.leases("nope")
    assert nets.leases("a") == []
    with pytest.raises(InvalidArgument, match="mac: 'nonsense' is not a MAC"):
        nets.attach("a", "vm", "nonsense", owner_uid=None)
    # detach only ever deletes our own TAPs
    for name in ("eth0", "pvt1234", "pvt0123456789", "../pvt01234567", "pvtABCDEF01"):
        with pytest.raises(InvalidArgument, match="is not a TAP of pyvirt's networks"):
            nets.detach(name)
    nets.set_autostart("a", False)
    assert nets.info("a")["autostart"] is False
    nets.undefine("a")
    with pytest.raises(NotFound):
        nets.info("a")


def test_leases_file_is_read_bounded(nets: FakeHost) -> None:
    nets.define({"name": "a", "ipv4": "10.40.0.1/24"})
    run = nets.paths.net_run("a")
    run.mkdir(parents=True)
    line = "0 52:54:00:00:00:01 10.40.0.5 h *\n"
    # a lease file grown huge: only the first MiB is read
    (run / "leases").write_text(line + "x" * (4 << 20) + "\n0 52:54:00:00:00:02 10.40.0.6 h *\n")
    assert [x["ip"] for x in nets.leases("a")] == ["10.40.0.5"]
