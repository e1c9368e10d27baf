"""A stand-in for a NIC's host side: one end of a ``SOCK_SEQPACKET`` socket pair.

A seqpacket socket moves one whole message per send/recv, as a TAP moves one
frame per write/read, and it is non-blocking with real readiness (EPOLLIN,
EPOLLOUT when the peer's queue is full), so the device's event handling runs
against the kernel, not a mock. The test holds the other end (``peer``) and
plays the host network: what it sends the guest receives, and what the guest
transmits it reads.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

from pyvirt.net.backend import VNET_HDR_LEN, NetBackendError

__all__ = ["SeqpacketBackend"]


class SeqpacketBackend:
    """A ``NetBackend`` over a seqpacket pair; ``vnet_hdr`` frames carry the 12-byte
    header as a TAP with ``IFF_VNET_HDR`` would."""

    def __init__(self, *, vnet_hdr: bool = True, max_frame: int | None = None,
                 sndbuf: int | None = None) -> None:
        self.name = "fake:seqpacket"
        self.vnet_hdr = vnet_hdr
        self.max_frame = max_frame if max_frame is not None else (
            65550 + VNET_HDR_LEN if vnet_hdr else 65535)
        self.sock, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.setblocking(False)
        if sndbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self.peer.settimeout(5)
        self.offloads: list[dict[str, bool]] = []
        self.recv_calls = 0
        self.send_full = 0  # sends refused for lack of room
        self.fail: str | None = None  # set: every call raises NetBackendError

    def fileno(self) -> int:
        return self.sock.fileno()

    def _check(self) -> None:
        if self.fail is not None:
            raise NetBackendError(self.fail)

    def recv_into(self, bufs: Sequence[memoryview]) -> int | None:
        self._check()
        self.recv_calls += 1
        try:
            n, _anc, flags, _addr = self.sock.recvmsg_into(bufs, 0, socket.MSG_TRUNC)
        except BlockingIOError:
            return None
        if flags & socket.MSG_TRUNC:
            return sum(len(b) for b in bufs) + 1  # cut: longer than the buffers
        return n

    def send(self, bufs: Sequence[memoryview]) -> bool:
        self._check()
        try:
            self.sock.sendmsg(bufs)
        except BlockingIOError:
            self.send_full += 1
            return False
        return True

    def set_offloads(self, *, csum: bool, tso4: bool, tso6: bool, ecn: bool,
                     ufo: bool) -> None:
        self._check()
        self.offloads.append({"csum": csum, "tso4": tso4, "tso6": tso6, "ecn": ecn,
                              "ufo": ufo})

    def stats(self) -> dict[str, int]:
        return {"send_full": self.send_full}

    def close(self) -> None:
        self.sock.close()
        self.peer.close()
