"""A TAP device as a NIC's host side (``TapBackend``), opened by ``open_tap``.

The TAP is opened with ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`` and a 12-byte
vnet header (``TUNSETVNETHDRSZ``), so every frame read or written carries
``struct virtio_net_hdr_v1`` in front, exactly what the virtio-net device
shares with the guest: checksum and segmentation offloads cross the host
untouched (the kernel checks a header we write and refuses a bad one with
EINVAL; ``TUNSETOFFLOAD`` tells it which offloaded frames the guest takes).
Frames move with ``readv``/``writev`` straight between the TAP and the
memoryviews handed in (guest memory): no copy, no allocation per frame.

``open_tap(name)``: an existing TAP is attached; an absent one is created when
``create`` (not persistent: it vanishes when our fd closes) and brought up;
``bridge`` puts it on that bridge. Netlink (pyroute2) is imported only when a
TAP is created or a bridge named, never on the start-up path of a VM that
only attaches an existing TAP. ``close`` undoes what we did: a TAP we created
goes away with the fd (and with it its bridge port); a bridge membership we
added to an existing TAP is removed through an rtnetlink socket opened at
set-up (the sandbox allows no new sockets but AF_UNIX). That last step needs
CAP_NET_ADMIN, which ``pyvirt run --sandbox`` drops: a sandboxed VMM leaves
an existing TAP on the bridge (as QEMU's bridge helper does), best effort.

Measured here (Linux 6.x): a read into buffers shorter than the frame fills
them, drops the rest and returns only what it copied; ``recv_into`` reads a
spill buffer behind short buffers so that the caller sees the frame's full
length, as ``NetBackend.recv_into`` promises. The largest frame tun hands out
is bounded by the device's ``gso_max_size`` (65536 by default) plus the
Ethernet and VLAN headers, under ``MAX_FRAME``.

Errors: one ``NetConfigError`` line naming the configuration field (``what``)
for anything the user can fix (no permission, busy, not a TAP, no such
bridge); ``NetBackendError`` once the TAP is gone while the VM runs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any

from pyvirt.net.backend import VNET_HDR_LEN, NetBackendError
from pyvirt.net.errors import NetConfigError

__all__ = ["MAX_FRAME", "TUN_F_CSUM", "TUN_F_TSO4", "TUN_F_TSO6", "TUN_F_TSO_ECN", "TUN_F_UFO",
           "TapBackend", "open_tap"]

# <linux/if_tun.h>: _IOW('T', nr, int) / _IOR('T', nr, unsigned int)
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10

_IFNAMSIZ = 16
# <linux/netlink.h>, <linux/rtnetlink.h>, <linux/if_link.h>
_RTM_NEWLINK = 16
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
_NLMSG_ERROR = 0x2
_IFLA_MASTER = 10
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, then ifr_flags in the union (40 bytes)

#: the largest frame recv_into returns, vnet header included (see the module docstring)
MAX_FRAME = VNET_HDR_LEN + 65550


class TapBackend:
    """One TAP fd (non-blocking, close-on-exec), frames with a vnet header."""

    vnet_hdr = True
    max_frame = MAX_FRAME

    def __init__(self, fd: int, ifname: str, *, created: bool) -> None:
        self.name = f"tap:{ifname}"
        self.ifname = ifname
        #: we created the interface (it goes away with our fd)
        self.created = created
        self._fd = fd
        #: an rtnetlink socket kept for close(), with the TAP's index to take off the
        #: bridge we put it on (only for a TAP that is not ours)
        self._netlink: socket.socket | None = None
        self._unbridge_index: int | None = None
        self._tx_dropped = 0
        self._tx_eagain = 0
        self._spill = memoryview(bytearray(MAX_FRAME))

    def fileno(self) -> int:
        return self._fd

    def recv_into(self, bufs: Sequence[memoryview]) -> int | None:
        try:
            if sum(map(len, bufs)) >= MAX_FRAME:
                return os.readv(self._fd, bufs)
            # tun cuts a frame to the buffers and returns only what it copied: the
            # spill buffer behind them catches the rest, so a long frame shows
            return os.readv(self._fd, [*bufs, self._spill])
        except BlockingIOError:
            return None
        except OSError as exc:  # EBADFD: the interface was deleted under us
            raise NetBackendError(f"{self.name}: reading failed: {exc.strerror}") from exc

    def send(self, bufs: Sequence[memoryview]) -> bool:
        try:
            os.writev(self._fd, bufs)
            return True
        except BlockingIOError:
            self._tx_eagain += 1
            return False
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.EIO, errno.EFAULT, errno.EMSGSIZE,
                             errno.ENOMEM, errno.ENOBUFS):
                # a frame the kernel refuses (bad vnet header, too short or long,
                # the interface down): this frame is lost, the NIC goes on
                self._tx_dropped += 1
                return True
            raise NetBackendError(f"{self.name}: writing failed: {exc.strerror}") from exc

    def set_offloads(self, *, csum: bool, tso4: bool, tso6: bool, ecn: bool,
                     ufo: bool) -> None:
        flags = ((TUN_F_CSUM if csum else 0) | (TUN_F_TSO4 if tso4 else 0)
                 | (TUN_F_TSO6 if tso6 else 0) | (TUN_F_TSO_ECN if ecn else 0)
                 | (TUN_F_UFO if ufo else 0))
        if not csum:
            flags = 0  # the kernel refuses TSO without CSUM
        try:
            fcntl.ioctl(self._fd, TUNSETOFFLOAD, flags)
        except OSError as exc:
            if flags & TUN_F_UFO and exc.errno == errno.EINVAL:
                # kernels 4.14-6.1 dropped UFO; the rest still stands
                fcntl.ioctl(self._fd, TUNSETOFFLOAD, flags & ~TUN_F_UFO)
                return
            raise NetBackendError(f"{self.name}: TUNSETOFFLOAD failed: {exc.strerror}") from exc

    def stats(self) -> dict[str, int]:
        return {"tx_dropped_refused": self._tx_dropped, "tx_full": self._tx_eagain}

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        netlink, self._netlink = self._netlink, None
        try:
            if netlink is not None and self._unbridge_index is not None:
                with contextlib.suppress(OSError):  # the TAP may be gone already
                    _set_nomaster(netlink, self._unbridge_index)
        finally:
            if netlink is not None:
                netlink.close()
            os.close(fd)


def open_tap(name: str, *, create: bool = True, bridge: str | None = None,
             what: str) -> TapBackend:
    """Attach the TAP ``name`` (or create it when absent and ``create``), with a
    vnet header; with ``bridge``, make it a port of that bridge. Errors are one
    ``NetConfigError`` line starting with ``what``."""
    _check_ifname(name, what, "TAP")
    from pyvirt.hostfile import handed_taps

    if name in handed_taps and bridge is None:
        return _handed_tap(name, handed_taps[name], what)
    if bridge is not None:
        _check_ifname(bridge, what, "bridge")
        if not _exists(bridge):
            raise NetConfigError(what, f"no such bridge {bridge!r}")
    existed = _exists(name)
    if not existed and not create:
        raise NetConfigError(what, f"no such TAP {name!r}")
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise NetConfigError(what, "cannot open TAP: /dev/net/tun is missing (load the tun "
                                 "module)") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise NetConfigError(what, f"cannot open TAP {name}: permission denied on "
                                 "/dev/net/tun (needs access to it, and CAP_NET_ADMIN or a "
                                 "TAP owned by this user)") from None
        raise NetConfigError(what, f"cannot open /dev/net/tun: {exc.strerror}") from None
    backend: TapBackend | None = None
    try:
        try:
            fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(name.encode(),
                                                    IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        except OSError as exc:
            raise NetConfigError(what, _tunsetiff_problem(name, exc.errno, existed)) from None
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
        created = not existed
        if created:
            # TUNSETIFF made it; never persistent, so it vanishes with the fd even
            # if something set the flag meanwhile
            fcntl.ioctl(fd, TUNSETPERSIST, 0)
        backend = TapBackend(fd, name, created=created)
        if created or bridge is not None:
            _configure_link(backend, bridge, what)
        return backend
    except BaseException:
        if backend is not None:
            backend.close()
        else:
            os.close(fd)
        raise


def _handed_tap(name: str, handed_fd: int, what: str) -> TapBackend:
    """The TAP the daemon opened for us (``--fd tap:IFNAME=N``): checked with
    TUNGETIFF to be that interface, with a vnet header and no packet info; the
    daemon made it and put it on its bridge, so nothing else is configured."""
    fd = os.dup(handed_fd)  # ours to close; non-inheritable
    try:
        try:
            raw = fcntl.ioctl(fd, TUNGETIFF, bytes(_IFREQ.size))
        except OSError as exc:
            raise NetConfigError(what, f"the fd handed for TAP {name} is not an attached TAP "
                                 f"(TUNGETIFF: {exc.strerror})") from None
        got, flags = _IFREQ.unpack(raw)
        got_name = got.split(b"\0", 1)[0].decode(errors="replace")
        if got_name != name:
            raise NetConfigError(what, f"the fd handed for TAP {name} is TAP {got_name!r}")
        want = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
        if flags & want != want:
            raise NetConfigError(what, f"the fd handed for TAP {name} was not opened with "
                                 "IFF_TAP | IFF_NO_PI | IFF_VNET_HDR")
        try:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            os.set_blocking(fd, False)
        except OSError as exc:
            raise NetConfigError(what, f"TAP {name}: {exc.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
    return TapBackend(fd, name, created=False)


def _configure_link(backend: TapBackend, bridge: str | None, what: str) -> None:
    """Bring a TAP we created up and put it on ``bridge`` (netlink, pyroute2)."""
    try:
        # only here: netlink is not on the start-up path (no stubs: typed as Any)
        from pyroute2 import IPRoute  # type: ignore[import-untyped]
        from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]
    except ImportError as exc:
        raise NetConfigError(what, f"cannot configure TAP {backend.ifname}: pyroute2 is not "
                             f"installed ({exc})") from None
    ipr = IPRoute()
    try:
        try:
            index = _ifindex(ipr, backend.ifname, what)
            if bridge is not None:
                br_index = _ifindex(ipr, bridge, what)
                br_link = ipr.get_links(br_index)[0]
                info = br_link.get_attr("IFLA_LINKINFO")
                if info is None or info.get_attr("IFLA_INFO_KIND") != "bridge":
                    raise NetConfigError(what, f"{bridge!r} is not a bridge")
                master = ipr.get_links(index)[0].get_attr("IFLA_MASTER")
                if master != br_index:
                    if master and not backend.created:
                        raise NetConfigError(what, f"TAP {backend.ifname} is already a port "
                                             f"of another bridge, not {bridge!r}")
                    if not backend.created:  # our fd's close removes a TAP we made
                        backend._netlink = _netlink_socket()
                        backend._unbridge_index = index
                    ipr.link("set", index=index, master=br_index)
            if backend.created:
                ipr.link("set", index=index, state="up")
        except NetlinkError as exc:
            code = exc.code
            if code in (errno.EPERM, errno.EACCES):
                raise NetConfigError(what, f"cannot configure TAP {backend.ifname}: permission "
                                     "denied (needs CAP_NET_ADMIN)") from None
            raise NetConfigError(what, f"cannot configure TAP {backend.ifname}"
                                 f"{' on bridge ' + bridge if bridge else ''}: "
                                 f"{os.strerror(code)}") from None
    except BaseException:
        ipr.close()
        raise
    ipr.close()


def _netlink_socket() -> socket.socket:
    # a plain rtnetlink socket: it stays in the namespace it was made in (pyroute2's
    # sync IPRoute opens one per calling thread), and close() may run where no
    # new socket can be opened (the sandbox allows only AF_UNIX)
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)


def _set_nomaster(sock: socket.socket, index: int) -> None:
    """RTM_NEWLINK with IFLA_MASTER 0: take the interface off its bridge."""
    # nlmsghdr, ifinfomsg, rtattr IFLA_MASTER (u32)
    msg = struct.pack("=IHHII", 16 + 16 + 8, _RTM_NEWLINK, _NLM_F_REQUEST | _NLM_F_ACK, 1, 0)
    msg += struct.pack("=BxHiII", 0, 0, index, 0, 0) + struct.pack("=HHI", 8, _IFLA_MASTER, 0)
    sock.settimeout(1.0)
    sock.send(msg)
    reply = sock.recv(4096)
    if len(reply) >= 20 and struct.unpack_from("=H", reply, 4)[0] == _NLMSG_ERROR:
        code = -struct.unpack_from("=i", reply, 16)[0]
        if code:
            raise OSError(code, os.strerror(code))


def _ifindex(ipr: Any, name: str, what: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:  # deleted between our check and now
        raise NetConfigError(what, f"no such interface {name!r}")
    return int(found[0])


def _exists(name: str) -> bool:
    """In this thread's network namespace (sysfs would show the one it was mounted in)."""
    import socket

    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def _check_ifname(name: str, what: str, kind: str) -> None:
    if (not name or len(name.encode()) >= _IFNAMSIZ or name in (".", "..")
            or any(c in name for c in "/:") or any(c.isspace() or not c.isprintable()
                                                   for c in name)):
        raise NetConfigError(what, f"{name[:40]!r} is not a valid {kind} interface name "
                             "(1-15 characters, no '/', ':' or spaces)")


def _tunsetiff_problem(name: str, code: int | None, existed: bool) -> str:
    if code in (errno.EPERM, errno.EACCES):
        return (f"cannot open TAP {name}: permission denied (needs CAP_NET_ADMIN or a TAP "
                "owned by this user)")
    if code == errno.EBUSY:
        return f"cannot open TAP {name}: it is in use by another process"
    if code == errno.EINVAL and existed:
        return (f"cannot open TAP {name}: the interface exists and is not a TAP (or not "
                "one with IFF_NO_PI/IFF_VNET_HDR support)")
    return f"cannot open TAP {name}: {os.strerror(code or errno.EIO)}"
