"""virtio-rng (virtio 1.2, 5.4): entropy from the host's ``getrandom``.

One request queue; each chain's device-writable buffers are filled with
random bytes (at most 64 KiB per request, so a driver cannot make us hold
the event loop for long). It keeps no state of its own to save.
"""

from __future__ import annotations

import logging
import os

from pyvirt.virtio import DEVICE_ID_RNG
from pyvirt.virtio.device import Transport, VirtioDevice, copy_to_chain, serve_queue
from pyvirt.virtio.queue import Chain, SplitQueue

__all__ = ["RngDevice"]

log = logging.getLogger(__name__)

MAX_REQUEST = 64 << 10


class RngDevice(VirtioDevice):
    device_id = DEVICE_ID_RNG
    name = "virtio-rng"
    pci_class = 0x00FF00

    def __init__(self) -> None:
        super().__init__([64])
        self.bytes_served = 0

    def process(self, q: SplitQueue) -> None:
        transport = self.transport
        if transport is not None:
            serve_queue(transport, q, self.name, lambda chain: self._fill(transport, chain))

    def _fill(self, transport: Transport, chain: Chain) -> int:
        want = min(chain.writable_len, MAX_REQUEST)
        n = copy_to_chain(transport.memory, chain, os.getrandom(want) if want else b"")
        for addr, length in chain.writable:
            transport.note_dma_write(addr, length)
        self.bytes_served += n
        return n

    def metrics(self) -> dict[str, int]:
        return {"bytes": self.bytes_served}
