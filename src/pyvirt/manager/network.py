"""Virtual networks: libvirt's NAT and isolated networks, built from real parts.

A network started here is, in the daemon's network namespace:

- a Linux bridge (pyroute2, imported only when a network is touched) with the
  network's address, STP off, forwarding delay 0 and a fixed MAC (derived
  from the network's UUID, so ports joining never change it);
- rules in one nftables table, ``inet pyvirt``, which is ours alone: it is
  replaced as a whole in one ``nft -f -`` transaction (``add table`` +
  ``delete table`` + the new table) each time the set of active networks
  changes, and deleted with the last one; no other table and no other
  ruleset is ever read or written. A NAT network's subnet is masqueraded when
  it leaves through any interface but its bridge, and forwarding accepts its
  traffic out and the replies back; anything else forwarded to or from a
  network's bridge is rejected (an isolated network never leaves its bridge);
- ``net.ipv4.ip_forward`` set to 1 when a NAT network starts (never set back:
  other things may rely on it by then, as with libvirt);
- dnsmasq for DHCP and DNS, run from a configuration file we generate in
  ``paths.net_run(name)`` (bound to the bridge only, no /etc/hosts, nothing
  of the host's resolver changed). It daemonises, so it outlives pyvirtd as
  the VMs do: its first process exits only once the daemon is set up (its exit
  status and stderr line tell a failure), and we find it again by pid plus its
  start time in /proc (field 22 of /proc/PID/stat) and its command line.

A VM's NIC on a network is a persistent TAP ``pvtXXXXXXXX`` (``attach``)
with ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR``, owned by the VM's user, put on
the bridge and up; the daemon opens an fd of it for the VMM
(``Attachment.open_fd``, handed as ``--fd tap:IFNAME=N``). Stopping a network
tears down its bridge, rules and dnsmasq (the lease file is kept for the next
start); TAPs of running VMs stay (unplugged) and are put back on the bridge
when the network starts again. ``detach`` deletes a TAP.

``supervise`` (the Manager calls it every few seconds) starts a dead dnsmasq
again (at most every ``RESTART_BACKOFF_S``), and a network whose bridge was
deleted behind our back as a whole; ``startup`` does the same for networks
active when the previous daemon ended and rewrites the table (a firewall
reload may have flushed it).

Thread model: every public method takes ``Networks._lock`` (an RLock); no
method holds it while waiting for anything but a short netlink/nft/dnsmasq
call. Netlink sockets and child processes are made by the calling thread, so
they belong to that thread's network namespace (tests run us inside one).

Errors are ManagerErrors: ``InvalidArgument`` naming the definition's field
(``ipv4: ...``), ``NotFound``, ``OperationInvalid`` ("network 'x' is not
active"), ``OperationFailed`` with the one line a component gave.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pyvirt.manager.db import Store
from pyvirt.manager.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    OperationFailed,
    OperationInvalid,
)
from pyvirt.manager.events import EventBus
from pyvirt.manager.paths import DaemonPaths

__all__ = ["DEFAULT_NETWORK", "Attachment", "NetworkDef", "Networks", "dnsmasq_config",
           "nft_ruleset", "parse_leases", "parse_network"]

log = logging.getLogger("pyvirt.manager.network")

#: nftables: our one table (family inet, name)
TABLE = "pyvirt"
#: the network made on the daemon's first start (its subnet moves up if the host uses it)
DEFAULT_NETWORK: dict[str, Any] = {
    "name": "default", "mode": "nat", "bridge": "pyvirt0", "ipv4": "192.168.124.1/24",
    "dhcp": {"start": "192.168.124.2", "end": "192.168.124.254"}, "autostart": True}
_META_DEFAULT = "network.default-defined"
_FIELDS = frozenset({"name", "uuid", "mode", "bridge", "ipv4", "dhcp", "autostart"})
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
# names go into nft and dnsmasq text: a strict alphabet means nothing can be injected
_BRIDGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}\Z")
_TAP = re.compile(r"pvt[0-9a-f]{8}\Z")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}\Z")
_HOSTNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,62}\Z")
_CLIENT_ID = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){0,63}\Z")
#: dnsmasq's lease limit: the range's size, at most this (a guest inventing MACs
#: cannot grow dnsmasq's table beyond it)
LEASE_MAX = 4096
#: the lease file is read up to this size (dnsmasq writes ~100 bytes per lease)
LEASES_READ_MAX = 1 << 20
#: a dnsmasq that keeps dying is tried again at most this often
RESTART_BACKOFF_S = 10.0

# <linux/if_tun.h>
_TUNSETIFF = 0x400454CA
_TUNSETPERSIST = 0x400454CB
_TUNSETOWNER = 0x400454CC
_TUNSETVNETHDRSZ = 0x400454D8
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_IFREQ = struct.Struct("16sH22x")
_VNET_HDR_LEN = 12  # struct virtio_net_hdr_v1, as pyvirt.net.tap uses


# ---- definitions


@dataclass(frozen=True)
class NetworkDef:
    """A network's definition, checked (see ``parse_network``)."""

    name: str
    uuid: str
    mode: Literal["nat", "isolated"]
    bridge: str
    #: the bridge's address and the subnet (None: an isolated layer-2 network)
    ipv4: ipaddress.IPv4Interface | None
    dhcp: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address] | None
    autostart: bool

    def to_doc(self) -> dict[str, Any]:
        return {"name": self.name, "uuid": self.uuid, "mode": self.mode, "bridge": self.bridge,
                "ipv4": None if self.ipv4 is None else str(self.ipv4),
                "dhcp": None if self.dhcp is None else {"start": str(self.dhcp[0]),
                                                         "end": str(self.dhcp[1])},
                "autostart": self.autostart}

    @property
    def subnet(self) -> ipaddress.IPv4Network | None:
        return None if self.ipv4 is None else self.ipv4.network


def parse_network(doc: object, *, default_bridge: str | None = None) -> NetworkDef:
    """A definition document -> ``NetworkDef``; anything wrong is one
    ``InvalidArgument`` line that starts with the field. A missing ``bridge``
    takes ``default_bridge``; a missing ``uuid`` is generated. Checks against
    the host and the other networks are ``Networks.define``'s."""
    if not isinstance(doc, dict):
        raise InvalidArgument("a network definition must be an object (JSON or YAML mapping)")
    unknown = sorted(str(k) for k in doc if k not in _FIELDS)
    if unknown:
        raise InvalidArgument(f"unknown field (known: {', '.join(sorted(_FIELDS))})",
                              unknown[0][:64])
    name = doc.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidArgument("must be 1-64 characters of letters, digits, '.', '_', '-', "
                              "starting with a letter or digit", "name")
    raw_uuid = doc.get("uuid")
    if raw_uuid is None:
        uuid = str(uuidlib.uuid4())
    else:
        try:
            if not isinstance(raw_uuid, str):
                raise ValueError
            uuid = str(uuidlib.UUID(raw_uuid))
        except ValueError:
            raise InvalidArgument("is not a UUID", "uuid") from None
    mode = doc.get("mode", "nat")
    if mode not in ("nat", "isolated"):
        raise InvalidArgument(f"must be 'nat' or 'isolated', not {str(mode)[:40]!r}", "mode")
    bridge = doc.get("bridge", default_bridge)
    if not isinstance(bridge, str) or not _BRIDGE.match(bridge):
        raise InvalidArgument("must be an interface name of 1-15 letters, digits, '.', '_', "
                              "'-'", "bridge")
    ipv4 = _parse_ipv4(doc.get("ipv4"))
    if ipv4 is None and mode == "nat":
        raise InvalidArgument("a NAT network needs an address such as 192.168.124.1/24", "ipv4")
    dhcp = _parse_dhcp(doc.get("dhcp"), ipv4)
    autostart = doc.get("autostart", True)
    if not isinstance(autostart, bool):
        raise InvalidArgument("must be true or false", "autostart")
    return NetworkDef(name=name, uuid=uuid, mode=mode, bridge=bridge, ipv4=ipv4, dhcp=dhcp,
                      autostart=autostart)


def _parse_ipv4(raw: object) -> ipaddress.IPv4Interface | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or "/" not in raw:
        raise InvalidArgument("must be the bridge's address and prefix, like 192.168.124.1/24",
                              "ipv4")
    try:
        iface = ipaddress.IPv4Interface(raw)
    except ValueError:
        raise InvalidArgument(f"{raw[:40]!r} is not an IPv4 address/prefix", "ipv4") from None
    net = iface.network
    if not 8 <= net.prefixlen <= 30:
        raise InvalidArgument("the prefix must be between /8 and /30", "ipv4")
    if (iface.ip.is_loopback or iface.ip.is_multicast or iface.ip.is_link_local
            or iface.ip.is_reserved or iface.ip.is_unspecified):
        raise InvalidArgument(f"{iface.ip} cannot be a network's address (loopback, "
                              "multicast, link-local or reserved)", "ipv4")
    if iface.ip in (net.network_address, net.broadcast_address):
        raise InvalidArgument(f"{iface.ip} is the subnet's network or broadcast address",
                              "ipv4")
    return iface


def _parse_dhcp(raw: object, ipv4: ipaddress.IPv4Interface | None
                ) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address] | None:
    if raw is None:
        return None
    if ipv4 is None:
        raise InvalidArgument("DHCP needs the network's ipv4 address", "dhcp")
    if not isinstance(raw, dict) or set(raw) != {"start", "end"}:
        raise InvalidArgument('must be {"start": ADDRESS, "end": ADDRESS}', "dhcp")
    ends = []
    for key in ("start", "end"):
        value = raw[key]
        try:
            if not isinstance(value, str):
                raise ValueError
            addr = ipaddress.IPv4Address(value)
        except ValueError:
            raise InvalidArgument(f"{str(value)[:40]!r} is not an IPv4 address",
                                  f"dhcp.{key}") from None
        net = ipv4.network
        if addr not in net or addr in (net.network_address, net.broadcast_address):
            raise InvalidArgument(f"{addr} is not a host address of {net}", f"dhcp.{key}")
        ends.append(addr)
    start, end = ends
    if start > end:
        raise InvalidArgument(f"the range starts after it ends ({start} > {end})", "dhcp")
    if start <= ipv4.ip <= end:
        raise InvalidArgument(f"the range holds the network's own address {ipv4.ip}", "dhcp")
    return start, end


# ---- generated text: nftables rules, dnsmasq configuration, lease file


@dataclass(frozen=True)
class _Active:
    """What the rules of one active network need (from its run-time record)."""

    name: str
    mode: str
    bridge: str
    subnet: str | None


def nft_ruleset(nets: list[_Active]) -> str:
    """The ``nft -f -`` script that makes table ``inet pyvirt`` hold exactly the
    rules of ``nets`` (deleting the table when there are none). ``add`` then
    ``delete`` in one transaction: the table is replaced whether or not it
    existed, atomically, and nothing outside it is named."""
    lines = [f"add table inet {TABLE}", f"delete table inet {TABLE}"]
    if not nets:
        return "\n".join(lines) + "\n"
    accept: list[str] = []
    reject: list[str] = []
    nat: list[str] = []
    for n in sorted(nets, key=lambda n: n.name):
        br = f'"{n.bridge}"'
        # traffic between the network's own ports (br_netfilter) stays allowed
        accept.append(f"iifname {br} oifname {br} accept")
        if n.mode == "nat" and n.subnet is not None:
            accept.append(f"iifname {br} ip saddr {n.subnet} accept")
            accept.append(f"oifname {br} ip daddr {n.subnet} ct state established,related "
                          "accept")
            # multicast and broadcast are never translated (as libvirt)
            nat.append(f"oifname != {br} ip saddr {n.subnet} ip daddr 224.0.0.0/24 return")
            nat.append(f"oifname != {br} ip saddr {n.subnet} ip daddr 255.255.255.255 return")
            nat.append(f"oifname != {br} ip saddr {n.subnet} masquerade")
        # anything else into or out of the network (spoofed sources, new
        # connections from outside, an isolated network's traffic) is refused
        reject.append(f"iifname {br} reject")
        reject.append(f"oifname {br} reject")
    lines.append(f"table inet {TABLE} {{")
    lines.append("  chain forward {")
    lines.append("    type filter hook forward priority filter; policy accept;")
    lines.extend(f"    {r}" for r in accept + reject)
    lines.append("  }")
    if nat:
        lines.append("  chain postrouting {")
        lines.append("    type nat hook postrouting priority srcnat; policy accept;")
        lines.extend(f"    {r}" for r in nat)
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def dnsmasq_config(d: NetworkDef, run: Path) -> str:
    """dnsmasq's whole configuration for network ``d`` (``--conf-file=`` is the
    only file it reads: /etc/dnsmasq.conf is not)."""
    assert d.ipv4 is not None
    lines = [
        f"# generated by pyvirtd for network {d.name}: rewritten at each start",
        f"pid-file={run / 'dnsmasq.pid'}",
        "except-interface=lo",
        f"interface={d.bridge}",
        f"listen-address={d.ipv4.ip}",
        "bind-interfaces",
        "strict-order",
        "no-hosts",
        "domain-needed",
        "bogus-priv",
    ]
    if d.mode == "isolated":
        lines.append("no-resolv")  # nowhere to forward to
    if d.dhcp is not None:
        start, end = d.dhcp
        size = int(end) - int(start) + 1
        lines += [
            f"dhcp-range={start},{end},{d.ipv4.netmask},1h",
            f"dhcp-leasefile={run / 'leases'}",
            f"dhcp-lease-max={min(size, LEASE_MAX)}",
            "dhcp-authoritative",
        ]
        if d.mode == "isolated":
            lines.append("dhcp-option=3")  # no router: nothing to route to
    return "\n".join(lines) + "\n"


def parse_leases(text: str, *, now: float | None = None) -> list[dict[str, Any]]:
    """dnsmasq's lease file (``EXPIRY MAC IP HOSTNAME CLIENT-ID`` per line) ->
    ``[{"mac","ip","hostname","client_id","expires"}]`` sorted by address. Lines that do
    not parse (the guest chooses the hostname; the file may be mid-write) and
    expired leases are left out; ``expires`` 0 means never."""
    when = time.time() if now is None else now
    out: list[dict[str, Any]] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4 or parts[0] == "duid":
            continue
        try:
            expires = int(parts[0])
            ip = ipaddress.IPv4Address(parts[2])
        except ValueError:
            continue
        mac = parts[1].lower()
        if not _MAC.match(mac) or expires < 0 or (expires and expires < when):
            continue
        host = parts[3] if _HOSTNAME.match(parts[3]) else None
        client = parts[4].lower() if len(parts) > 4 and _CLIENT_ID.match(parts[4]) else None
        out.append({"mac": mac, "ip": str(ip), "hostname": host, "client_id": client,
                    "expires": expires})
    out.sort(key=lambda lease: ipaddress.IPv4Address(lease["ip"]))
    return out


# ---- processes


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of ``pid``, None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # the command name may hold spaces and ')': fields start after the last ')'
    fields = raw[raw.rfind(b")") + 2:].split()
    try:
        return fields[0].decode(), int(fields[19])
    except (IndexError, ValueError):
        return None


def _is_ours(pid: int, ticks: int, conf: Path) -> bool:
    """``pid`` is still the dnsmasq we started on ``conf`` (not dead, not a zombie,
    not a recycled pid)."""
    if pid <= 1:
        return False
    st = _proc_stat(pid)
    if st is None or st[0] in ("Z", "X") or st[1] != ticks:
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"--conf-file={conf}".encode() in argv


def _which(tool: str) -> str:
    # a daemon's PATH may lack the sbin directories
    found = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/local/sbin")
    if found is None:
        raise OperationFailed(f"{tool} is not installed (networks need it)")
    return found


def _first_line(text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0][:300] if lines else "no message"


# ---- netlink (pyroute2, lazily)


def _ipr() -> Any:
    try:
        # only here: the daemon imports this module at start, netlink is needed later
        from pyroute2 import IPRoute  # type: ignore[import-untyped]
    except ImportError as exc:
        raise OperationFailed(f"pyroute2 is not installed ({exc})") from None
    return IPRoute()


def _ifindex(name: str) -> int | None:
    """In the calling thread's namespace (sysfs would show the one it was mounted in)."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def _link_kind(ipr: Any, index: int) -> str | None:
    links = ipr.get_links(index)
    info = links[0].get_attr("IFLA_LINKINFO") if links else None
    return None if info is None else info.get_attr("IFLA_INFO_KIND")


def _netlink_error(exc: Exception) -> str:
    code = getattr(exc, "code", None)
    return os.strerror(code) if isinstance(code, int) and code > 0 else str(exc)


def _derive_mac(seed: str) -> str:
    digest = hashlib.sha256(f"pyvirt-bridge\0{seed}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


# ---- TAPs


def _tun_open(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, _IFREQ.pack(name.encode(),
                                                _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR))
        fcntl.ioctl(fd, _TUNSETVNETHDRSZ, struct.pack("i", _VNET_HDR_LEN))
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True)
class Attachment:
    """A VM's TAP on a network's bridge."""

    network: str
    tap: str
    bridge: str
    mac: str | None

    def open_fd(self) -> int:
        """A new fd of the TAP (non-blocking, close-on-exec, vnet header set) for
        handing to the VMM (``--fd tap:IFNAME=N``); the caller closes it. A TAP
        is single-queue: one fd at a time (EBUSY while a VMM holds one)."""
        try:
            return _tun_open(self.tap)
        except OSError as exc:
            raise OperationFailed(f"network '{self.network}': cannot open TAP {self.tap}: "
                                  f"{exc.strerror}") from None


# ---- the networks


class Networks:
    """The daemon's virtual networks (see the module docstring)."""

    def __init__(self, store: Store, paths: DaemonPaths, events: EventBus,
                 privilege: object | None = None) -> None:
        self.store = store
        self.paths = paths
        self.events = events
        self.privilege = privilege
        # serialises every change of networks, rules, dnsmasq and TAPs
        self._lock = threading.RLock()
        #: name -> monotonic time before which a dead dnsmasq is not restarted again
        self._backoff: dict[str, float] = {}

    # -- the store

    def _row(self, name: str) -> Any:
        with self.store.read() as db:
            row = db.execute("SELECT * FROM networks WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"network '{name[:64]}' not found")
        return row

    def _rows(self) -> list[Any]:
        with self.store.read() as db:
            return list(db.execute("SELECT * FROM networks ORDER BY name").fetchall())

    @staticmethod
    def _def(row: Any) -> NetworkDef:
        doc = json.loads(row["definition"])
        doc["autostart"] = bool(row["autostart"])
        return parse_network(doc)

    @staticmethod
    def _runtime(row: Any) -> dict[str, Any]:
        rt = json.loads(row["runtime"] or "{}")
        return rt if isinstance(rt, dict) else {}

    def _set_runtime(self, name: str, rt: dict[str, Any], active: bool | None = None) -> None:
        with self.store.write() as db:
            if active is None:
                db.execute("UPDATE networks SET runtime = ? WHERE name = ?",
                           (json.dumps(rt), name))
            else:
                db.execute("UPDATE networks SET runtime = ?, active = ? WHERE name = ?",
                           (json.dumps(rt), int(active), name))

    # -- the host (overridable in tests)

    def _host_routes(self, exclude_bridge: str | None) -> list[tuple[ipaddress.IPv4Network, str]]:
        """Subnets in use on the host: the main table's IPv4 routes (the default
        route aside) and every interface's IPv4 addresses, with their interface;
        ``exclude_bridge``'s own left out."""
        out: list[tuple[ipaddress.IPv4Network, str]] = []
        ipr = _ipr()
        try:
            names = {int(ln["index"]): str(ln.get_attr("IFLA_IFNAME"))
                     for ln in ipr.get_links()}
            for r in ipr.get_routes(family=socket.AF_INET):
                table = r.get_attr("RTA_TABLE") or r["table"]
                dst = r.get_attr("RTA_DST")
                if table != 254 or not r["dst_len"] or dst is None:
                    continue
                dev = names.get(int(r.get_attr("RTA_OIF") or 0), "?")
                with contextlib.suppress(ValueError):
                    out.append((ipaddress.IPv4Network(f"{dst}/{r['dst_len']}", strict=False),
                                dev))
            for a in ipr.get_addr(family=socket.AF_INET):
                addr = a.get_attr("IFA_ADDRESS")
                dev = names.get(int(a["index"]), "?")
                with contextlib.suppress(ValueError, TypeError):
                    out.append((ipaddress.IPv4Network(f"{addr}/{a['prefixlen']}",
                                                      strict=False), dev))
        finally:
            ipr.close()
        return [(net, dev) for net, dev in out if dev != exclude_bridge]

    def _interface_exists(self, name: str) -> bool:
        return _ifindex(name) is not None

    # -- checks

    def _check_conflicts(self, d: NetworkDef, *, host: bool, error: type[Exception]) -> None:
        """``d`` against the other networks and (``host``) the host's routes and
        interfaces; ``error`` is raised with one line naming the field."""
        def fail(field: str, detail: str) -> None:
            if error is InvalidArgument:
                raise InvalidArgument(detail, field)
            raise error(f"network '{d.name}': {field}: {detail}")

        own_rt: dict[str, Any] = {}
        for row in self._rows():
            if row["name"] == d.name:
                own_rt = self._runtime(row)
                continue
            other = self._def(row)
            if other.bridge == d.bridge:
                fail("bridge", f"'{d.bridge}' is the bridge of network '{other.name}'")
            if (d.subnet is not None and other.subnet is not None
                    and d.subnet.overlaps(other.subnet)):
                fail("ipv4", f"{d.subnet} overlaps network '{other.name}' ({other.subnet})")
        if not host:
            return
        running_bridge = own_rt.get("bridge") if own_rt.get("state") == "active" else None
        if d.subnet is not None:
            for net, dev in self._host_routes(exclude_bridge=running_bridge):
                if d.subnet.overlaps(net):
                    fail("ipv4", f"{d.subnet} overlaps the host's route {net} on {dev}")
        if d.bridge != running_bridge and self._interface_exists(d.bridge):
            fail("bridge", f"an interface named '{d.bridge}' already exists on the host")

    def _free_bridge(self) -> str:
        used = {self._def(r).bridge for r in self._rows()}
        for i in range(1000):
            name = f"pyvirt{i}"
            if name not in used and not self._interface_exists(name):
                return name
        raise OperationFailed("no free bridge name pyvirt0-pyvirt999")

    # -- definitions

    def define(self, doc: object) -> dict[str, Any]:
        """Define a network, or replace the definition of the one with that
        name (an active network keeps running as it is until it is restarted)."""
        with self._lock:
            name = doc.get("name") if isinstance(doc, dict) else None
            existing = None
            if isinstance(name, str):
                with contextlib.suppress(NotFound):
                    existing = self._row(name)
            default_bridge = (self._def(existing).bridge if existing is not None
                              else None)
            if isinstance(doc, dict) and "bridge" not in doc and default_bridge is None:
                default_bridge = self._free_bridge()
            d = parse_network(doc, default_bridge=default_bridge)
            if existing is not None:
                if isinstance(doc, dict) and "uuid" not in doc:
                    d = dataclasses.replace(d, uuid=existing["uuid"])
                elif d.uuid != existing["uuid"]:
                    raise AlreadyExists(f"network '{d.name}' already exists with uuid "
                                        f"{existing['uuid']}")
            else:
                with self.store.read() as db:
                    taken = db.execute("SELECT name FROM networks WHERE uuid = ?",
                                       (d.uuid,)).fetchone()
                if taken is not None:
                    raise AlreadyExists(f"network '{taken['name']}' already has uuid {d.uuid}")
            self._check_conflicts(d, host=True, error=InvalidArgument)
            body = json.dumps({k: v for k, v in d.to_doc().items() if k != "autostart"})
            with self.store.write() as db:
                if existing is None:
                    db.execute("INSERT INTO networks (name, uuid, definition, autostart) "
                               "VALUES (?, ?, ?, ?)", (d.name, d.uuid, body, int(d.autostart)))
                else:
                    db.execute("UPDATE networks SET definition = ?, autostart = ? "
                               "WHERE name = ?", (body, int(d.autostart), d.name))
            self.events.emit("network", d.name, "defined")
            return self.info(d.name)

    def undefine(self, name: str) -> None:
        with self._lock:
            row = self._row(name)
            if row["active"]:
                raise OperationInvalid(f"network '{name}' is active: stop it first")
            with self.store.write() as db:
                db.execute("DELETE FROM networks WHERE name = ?", (name,))
            shutil.rmtree(self.paths.net_run(name), ignore_errors=True)
            self.events.emit("network", name, "undefined")

    def set_autostart(self, name: str, on: bool) -> None:
        with self._lock:
            self._row(name)
            with self.store.write() as db:
                db.execute("UPDATE networks SET autostart = ? WHERE name = ?", (int(on), name))

    # -- reading

    def _summary(self, row: Any) -> dict[str, Any]:
        d = self._def(row)
        rt = self._runtime(row)
        doc = d.to_doc()
        active = bool(row["active"])
        dn = rt.get("dnsmasq") if active else None
        doc.update({"state": "active" if active else "inactive", "active": active,
                    "persistent": True,
                    # what runs (the definition may have been replaced meanwhile)
                    "running_bridge": rt.get("bridge") if active else None,
                    "dnsmasq_pid": dn.get("pid") if isinstance(dn, dict) else None,
                    "taps": sorted(rt.get("taps", {})) if active else []})
        return doc

    def info(self, name: str) -> dict[str, Any]:
        with self._lock:
            return self._summary(self._row(name))

    def leases(self, name: str) -> list[dict[str, Any]]:
        self._row(name)
        path = self.paths.net_run(name) / "leases"
        try:
            with open(path, "rb") as f:
                raw = f.read(LEASES_READ_MAX)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise OperationFailed(f"network '{name}': cannot read the leases: "
                                  f"{exc.strerror}") from None
        return parse_leases(raw.decode(errors="replace"))

    # -- start / stop

    def start(self, name: str) -> dict[str, Any]:
        with self._lock:
            row = self._row(name)
            if row["active"]:
                raise OperationInvalid(f"network '{name}' is already active")
            self._start(row)
            self.events.emit("network", name, "started")
            return self.info(name)

    def _start(self, row: Any) -> None:
        d = self._def(row)
        stale = self._runtime(row)
        taps: dict[str, Any] = dict(stale.get("taps") or {})
        if stale.get("bridge") or stale.get("dnsmasq"):
            # a start or stop the daemon did not finish (it died meanwhile)
            self._teardown(d.name, stale)
        self._check_conflicts(d, host=True, error=OperationInvalid)
        subnet = None if d.subnet is None else str(d.subnet)
        rt: dict[str, Any] = {"state": "starting", "bridge": d.bridge, "mode": d.mode,
                              "subnet": subnet, "dnsmasq": None, "taps": taps,
                              "started": time.time()}
        # recorded before anything is made, so a crash half-way is cleaned up next time
        self._set_runtime(d.name, rt, active=False)
        try:
            self._make_bridge(d)
            rt["taps"] = self._replug_taps(d, taps)
            if d.mode == "nat":
                self._ip_forward()
            self._apply_rules(extra=_Active(d.name, d.mode, d.bridge, subnet))
            if d.ipv4 is not None:
                rt["dnsmasq"] = self._start_dnsmasq(d)
            rt["state"] = "active"
            self._set_runtime(d.name, rt, active=True)
        except BaseException:
            rt["state"] = "stopping"
            with contextlib.suppress(Exception):
                self._teardown(d.name, rt)
            with contextlib.suppress(Exception):
                self._set_runtime(d.name, {"taps": rt["taps"]}, active=False)
            raise

    def stop(self, name: str) -> None:
        with self._lock:
            row = self._row(name)
            if not row["active"]:
                raise OperationInvalid(f"network '{name}' is not active")
            rt = self._runtime(row)
            rt["state"] = "stopping"
            self._set_runtime(name, rt, active=False)
            self._teardown(name, rt)
            taps = {t: v for t, v in (rt.get("taps") or {}).items()
                    if self._interface_exists(t)}
            self._set_runtime(name, {"taps": taps}, active=False)
            self._backoff.pop(name, None)
            self.events.emit("network", name, "stopped")

    def _teardown(self, name: str, rt: dict[str, Any]) -> None:
        """Undo what ``rt`` records (each step idempotent): dnsmasq, the bridge,
        the network's rules; the lease file stays."""
        run = self.paths.net_run(name)
        dn = rt.get("dnsmasq")
        if isinstance(dn, dict):
            self._stop_dnsmasq(int(dn.get("pid", 0)), int(dn.get("ticks", -1)),
                               run / "dnsmasq.conf")
        bridge = rt.get("bridge")
        if isinstance(bridge, str) and _BRIDGE.match(bridge):
            self._delete_link(bridge, "bridge")
        self._apply_rules(exclude=name)
        for f in ("dnsmasq.conf", "dnsmasq.pid"):
            with contextlib.suppress(FileNotFoundError):
                (run / f).unlink()

    # -- parts

    def _make_bridge(self, d: NetworkDef) -> None:
        ipr = _ipr()
        try:
            try:
                ipr.link("add", ifname=d.bridge, kind="bridge", br_stp_state=0,
                         br_forward_delay=0)
                index = int(ipr.link_lookup(ifname=d.bridge)[0])
                # a fixed MAC: a bridge otherwise takes its lowest port's, and changes
                ipr.link("set", index=index, address=_derive_mac(d.uuid))
                if d.ipv4 is not None:
                    ipr.addr("add", index=index, address=str(d.ipv4.ip),
                             prefixlen=d.ipv4.network.prefixlen,
                             broadcast=str(d.ipv4.network.broadcast_address))
                ipr.link("set", index=index, state="up")
            except Exception as exc:
                if isinstance(exc, OperationFailed):
                    raise
                raise OperationFailed(f"network '{d.name}': cannot create bridge {d.bridge}: "
                                      f"{_netlink_error(exc)}") from None
        finally:
            ipr.close()

    def _replug_taps(self, d: NetworkDef, taps: dict[str, Any]) -> dict[str, Any]:
        """Put the TAPs of VMs that outlived the network's last stop back on its bridge."""
        kept = {}
        for tap, info in taps.items():
            if not (isinstance(tap, str) and _TAP.match(tap)) or not self._interface_exists(tap):
                continue
            with contextlib.suppress(OperationFailed):
                self._plug(tap, d.bridge, None)
                kept[tap] = info
        return kept

    def _plug(self, tap: str, bridge: str, mac: str | None) -> None:
        ipr = _ipr()
        try:
            try:
                index = int(ipr.link_lookup(ifname=tap)[0])
                br_index = int(ipr.link_lookup(ifname=bridge)[0])
                kw: dict[str, Any] = {}
                if mac is not None:
                    # the TAP's own MAC must never become the guest's (as libvirt: 0xfe)
                    kw["address"] = "fe" + mac[2:]
                ipr.link("set", index=index, master=br_index, state="up", **kw)
            except Exception as exc:
                raise OperationFailed(f"cannot put TAP {tap} on bridge {bridge}: "
                                      f"{_netlink_error(exc)}") from None
        finally:
            ipr.close()

    def _delete_link(self, name: str, kind: str) -> bool:
        """Delete interface ``name`` if it is of ``kind``; False if it was not there."""
        ipr = _ipr()
        try:
            found = ipr.link_lookup(ifname=name)
            if not found:
                return False
            index = int(found[0])
            if _link_kind(ipr, index) != kind:
                log.warning("not deleting %s: it is not a %s", name, kind)
                return False
            try:
                ipr.link("del", index=index)
            except Exception as exc:
                if getattr(exc, "code", None) == errno.ENODEV:
                    return False
                raise OperationFailed(f"cannot delete {kind} {name}: "
                                      f"{_netlink_error(exc)}") from None
            return True
        finally:
            ipr.close()

    def _ip_forward(self) -> None:
        # /proc/sys/net is the opening thread's namespace
        path = "/proc/sys/net/ipv4/ip_forward"
        try:
            with open(path, "r+") as f:
                if f.read().strip() != "1":
                    f.seek(0)
                    f.write("1\n")
        except OSError as exc:
            raise OperationFailed(f"cannot enable IPv4 forwarding: {exc.strerror}") from None

    def _active(self) -> list[_Active]:
        out = []
        for row in self._rows():
            rt = self._runtime(row)
            # re-checked: these names go into the nft script
            if (row["active"] and rt.get("state") == "active"
                    and isinstance(rt.get("bridge"), str) and _BRIDGE.match(rt["bridge"])):
                out.append(_Active(row["name"], str(rt.get("mode", "nat")), rt["bridge"],
                                   rt.get("subnet")))
        return out

    def _apply_rules(self, *, extra: _Active | None = None, exclude: str | None = None) -> None:
        """Make table ``inet pyvirt`` hold the rules of the active networks (plus
        ``extra``, minus ``exclude``)."""
        nets = [n for n in self._active() if n.name not in (exclude, extra and extra.name)]
        if extra is not None:
            nets.append(extra)
        script = nft_ruleset(nets)
        try:
            r = subprocess.run([_which("nft"), "-f", "-"], input=script.encode(),
                               capture_output=True, timeout=30, close_fds=True)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise OperationFailed(f"nftables: cannot run nft: {exc}") from None
        if r.returncode != 0:
            raise OperationFailed(f"nftables: {_first_line(r.stderr)}")

    def _write_dnsmasq_conf(self, d: NetworkDef) -> None:
        run = self.paths.net_run(d.name)
        run.mkdir(parents=True, exist_ok=True)
        os.chmod(run, 0o755)
        tmp = run / "dnsmasq.conf.tmp"
        tmp.write_text(dnsmasq_config(d, run))
        tmp.replace(run / "dnsmasq.conf")

    def _start_dnsmasq(self, d: NetworkDef) -> dict[str, int]:
        self._write_dnsmasq_conf(d)
        return self._run_dnsmasq(d.name)

    def _run_dnsmasq(self, name: str) -> dict[str, int]:
        run = self.paths.net_run(name)
        conf = run / "dnsmasq.conf"
        pidfile = run / "dnsmasq.pid"
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()
        try:
            # it daemonises: this first process exits once dnsmasq is set up (status
            # and stderr say why not); the daemon is in its own session, outliving us
            r = subprocess.run([_which("dnsmasq"), f"--conf-file={conf}"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, timeout=30, close_fds=True,
                               start_new_session=True)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise OperationFailed(f"network '{name}': dnsmasq did not start: {exc}") from None
        if r.returncode != 0:
            raise OperationFailed(f"network '{name}': dnsmasq did not start: "
                                  f"{_first_line(r.stderr)}")
        deadline = time.monotonic() + 5
        while True:
            with contextlib.suppress(OSError, ValueError):
                pid = int(pidfile.read_text().strip())
                st = _proc_stat(pid)
                if st is not None and _is_ours(pid, st[1], conf):
                    return {"pid": pid, "ticks": st[1]}
            if time.monotonic() > deadline:
                raise OperationFailed(f"network '{name}': dnsmasq started but wrote no "
                                      f"pid file {pidfile}")
            time.sleep(0.02)

    @staticmethod
    def _stop_dnsmasq(pid: int, ticks: int, conf: Path) -> None:
        if not _is_ours(pid, ticks, conf):
            return
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if not _is_ours(pid, ticks, conf):
                    return
                time.sleep(0.02)
        raise OperationFailed(f"dnsmasq (pid {pid}) did not exit")

    # -- VMs' TAPs

    def attach(self, name: str, vm_name: str, mac: str | None, *,
               owner_uid: int | None) -> Attachment:
        """A new TAP for ``vm_name``'s NIC on network ``name`` (which must be
        active), on its bridge and up, owned by ``owner_uid``."""
        if mac is not None:
            mac = mac.lower()
            if not _MAC.match(mac):
                raise InvalidArgument(f"{mac[:40]!r} is not a MAC address", "mac")
        with self._lock:
            row = self._row(name)
            rt = self._runtime(row)
            if not row["active"] or not isinstance(rt.get("bridge"), str):
                raise OperationInvalid(f"network '{name}' is not active")
            bridge = rt["bridge"]
            tap = self._make_tap(owner_uid)
            try:
                self._plug(tap, bridge, mac)
                taps = dict(rt.get("taps") or {})
                taps[tap] = {"vm": vm_name, "mac": mac}
                rt["taps"] = taps
                self._set_runtime(name, rt)
            except BaseException:
                with contextlib.suppress(Exception):
                    self._delete_link(tap, "tun")
                raise
            return Attachment(network=name, tap=tap, bridge=bridge, mac=mac)

    @staticmethod
    def _make_tap(owner_uid: int | None) -> str:
        for _ in range(16):
            tap = f"pvt{secrets.token_hex(4)}"
            if _ifindex(tap) is None:
                break
        else:
            raise OperationFailed("no free TAP name")
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise OperationFailed(f"cannot open /dev/net/tun: {exc.strerror}") from None
        try:
            fcntl.ioctl(fd, _TUNSETIFF, _IFREQ.pack(tap.encode(),
                                                    _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR))
            if owner_uid is not None:
                fcntl.ioctl(fd, _TUNSETOWNER, owner_uid)
            fcntl.ioctl(fd, _TUNSETVNETHDRSZ, struct.pack("i", _VNET_HDR_LEN))
            # persistent: the TAP outlives this fd, until detach()
            fcntl.ioctl(fd, _TUNSETPERSIST, 1)
        except OSError as exc:
            raise OperationFailed(f"cannot create TAP {tap}: {exc.strerror}") from None
        finally:
            os.close(fd)
        return tap

    def detach(self, tap: str) -> None:
        """Delete a TAP made by ``attach`` (nothing if it is gone already)."""
        if not isinstance(tap, str) or not _TAP.match(tap):
            raise InvalidArgument(f"{str(tap)[:40]!r} is not a TAP of pyvirt's networks", "tap")
        with self._lock:
            self._delete_link(tap, "tun")
            for row in self._rows():
                rt = self._runtime(row)
                if tap in (rt.get("taps") or {}):
                    del rt["taps"][tap]
                    self._set_runtime(row["name"], rt)

    # -- the daemon's life

    def startup(self) -> None:
        """At daemon start: the default network on the very first start; active
        networks re-adopted (bridge there, dnsmasq alive) or restarted; the
        rules table rewritten (another tool may have flushed it); autostart."""
        with self._lock:
            self.paths.net_run("x").parent.mkdir(parents=True, exist_ok=True)
            if self.store.get_meta(_META_DEFAULT) is None:
                self._define_default()
            for row in self._rows():
                if row["active"]:
                    self._readopt(row)
            if self._active():
                with contextlib.suppress(OperationFailed):
                    if any(n.mode == "nat" for n in self._active()):
                        self._ip_forward()
                    self._apply_rules()
            for row in self._rows():
                if row["autostart"] and not row["active"]:
                    try:
                        self._start(row)
                        self.events.emit("network", row["name"], "started", "autostart")
                    except (OperationFailed, OperationInvalid) as exc:
                        log.warning("network %s: autostart failed: %s", row["name"], exc)
                        self.events.emit("network", row["name"], "start-failed", str(exc))

    def _define_default(self) -> None:
        if not self._rows():
            doc = dict(DEFAULT_NETWORK)
            # the host may use 192.168.124.0/24 already: take the next free /24
            for third in range(124, 140):
                doc["ipv4"] = f"192.168.{third}.1/24"
                doc["dhcp"] = {"start": f"192.168.{third}.2", "end": f"192.168.{third}.254"}
                try:
                    self.define(doc)
                    break
                except InvalidArgument as exc:
                    if exc.field != "ipv4":
                        log.warning("the default network cannot be defined: %s", exc)
                        break
        with self.store.write() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, '1')",
                       (_META_DEFAULT,))

    def _readopt(self, row: Any) -> None:
        name = row["name"]
        rt = self._runtime(row)
        bridge = rt.get("bridge")
        if isinstance(bridge, str) and self._interface_exists(bridge):
            self._supervise_one(row)
            return
        log.warning("network %s: its bridge is gone: starting it again", name)
        self._set_runtime(name, rt, active=False)
        try:
            self._start(self._row(name))
            self.events.emit("network", name, "restarted", "its bridge was gone")
        except (OperationFailed, OperationInvalid) as exc:
            self.events.emit("network", name, "start-failed", str(exc))

    def supervise(self) -> None:
        """Called every few seconds: a dead dnsmasq is started again; a network
        whose bridge was deleted behind our back is started again as a whole."""
        with self._lock:
            for row in self._rows():
                if row["active"]:
                    self._readopt(row)

    def _supervise_one(self, row: Any) -> None:
        name = row["name"]
        rt = self._runtime(row)
        dn = rt.get("dnsmasq")
        if not isinstance(dn, dict):
            return
        conf = self.paths.net_run(name) / "dnsmasq.conf"
        if _is_ours(int(dn.get("pid", 0)), int(dn.get("ticks", -1)), conf):
            return
        if time.monotonic() < self._backoff.get(name, 0.0):
            return
        self._backoff[name] = time.monotonic() + RESTART_BACKOFF_S
        try:
            # with the configuration it ran with (the definition may have changed since)
            if not conf.exists():
                d = dataclasses.replace(self._def(row), bridge=str(rt.get("bridge")))
                self._write_dnsmasq_conf(d)
            rt["dnsmasq"] = self._run_dnsmasq(name)
        except OperationFailed as exc:
            log.warning("network %s: dnsmasq cannot be restarted: %s", name, exc)
            self.events.emit("network", name, "dnsmasq-failed", str(exc))
            return
        self._set_runtime(name, rt)
        log.warning("network %s: dnsmasq had died; restarted (pid %d)", name,
                    rt["dnsmasq"]["pid"])
        self.events.emit("network", name, "dnsmasq-restarted",
                         f"pid {rt['dnsmasq']['pid']}")

    def close(self) -> None:
        """Nothing is torn down: networks outlive the daemon, as VMs do."""

    # last: the name shadows the builtin in the class body's annotations
    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self._summary(r) for r in self._rows()]
