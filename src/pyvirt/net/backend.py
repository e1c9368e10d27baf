"""The host side of a NIC, as the virtio-net device sees it.

A backend moves whole Ethernet frames. With ``vnet_hdr`` each frame is
preceded by the 12-byte ``struct virtio_net_hdr_v1`` (virtio 1.2, 5.1.6: flags,
gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers) in both
directions, exactly as a TAP opened with ``IFF_VNET_HDR`` and
``TUNSETVNETHDRSZ`` 12 reads and writes it: the device then offers checksum
and segmentation offloads and passes headers through (after checking them).
Without it (passt) frames are bare; the device offers no offloads and strips
or adds the header itself.

Threads: every method but ``close`` is called on the device I/O thread only
(the device's loop), never concurrently.

Readiness: the device watches ``fileno()`` on its loop (``FdWatch``): for
reading while the guest has receive buffers, for writing only after ``send``
returned False. ``fileno`` never changes while the backend is open.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["VNET_HDR_LEN", "NetBackend", "NetBackendError"]

#: struct virtio_net_hdr_v1 (with num_buffers): what the device and a vnet_hdr backend use
VNET_HDR_LEN = 12


class NetBackendError(Exception):
    """The host side failed for good (passt exited, the TAP went away): the NIC's
    link goes down; the VM goes on."""


class NetBackend(Protocol):
    #: for logs and metrics: "tap:tap0", "user"
    name: str
    #: frames carry a virtio_net_hdr_v1 in front (see the module docstring)
    vnet_hdr: bool
    #: the largest frame ``recv_into`` can return, header included (65550 + 12 for a
    #: TAP with offloads, 65535 for passt's framing)
    max_frame: int

    def fileno(self) -> int:
        """The fd to poll (EPOLLIN: frames waiting; EPOLLOUT: room after a full send)."""
        ...

    def recv_into(self, bufs: Sequence[memoryview]) -> int | None:
        """Read one frame, scattered over ``bufs`` in order. Returns its length
        (header included), None when no frame waits. A frame longer than the
        buffers is cut to fit and its full length returned: the caller sees
        ``n > sum(len(b) for b in bufs)`` and drops it. Raises
        ``NetBackendError`` when the backend is gone for good."""
        ...

    def send(self, bufs: Sequence[memoryview]) -> bool:
        """Send one frame gathered from ``bufs``. False: the host side is full, the
        frame was not taken (send it again once ``fileno`` is writable). A frame the
        host refuses (too long, malformed) counts as sent and dropped. Raises
        ``NetBackendError`` when the backend is gone for good."""
        ...

    def set_offloads(self, *, csum: bool, tso4: bool, tso6: bool, ecn: bool,
                     ufo: bool) -> None:
        """What the guest can take on receive (its GUEST_* features), so the host
        sends only such frames (TUNSETOFFLOAD). Only for ``vnet_hdr`` backends."""
        ...

    def stats(self) -> dict[str, int]:
        """The backend's own counters (frames dropped by the host side, ...)."""
        ...

    def close(self) -> None:
        """Give the fd (and any helper process) back; idempotent."""
        ...
