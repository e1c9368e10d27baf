"""virtio-rng (virtio 1.2, 5.4): entropy from the host's ``getrandom``.

One request queue; each chain's device-writable buffers are filled with
random bytes (at most 64 KiB per request, so a driver cannot make us hold
the I/O thread for long).
"""

from __future__ import annotations

import logging
import os

from pyvirt.virtio import DEVICE_ID_RNG
from pyvirt.virtio.device import VirtioDevice, copy_to_chain
from pyvirt.virtio.queue import SplitQueue

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
        if transport is None:
            return
        mem = transport.memory
        done: list[tuple[int, int]] = []
        while True:
            chain = q.pop()
            if chain is None:
                if done:
                    transport.complete(q, done)
                    done = []
                if not q.enable_notifications():
                    return
                continue
            if chain.error is not None:
                log.warning("%s: bad descriptor chain: %s", self.name, chain.error)
                done.append((chain.head, 0))
                continue
            want = min(chain.writable_len, MAX_REQUEST)
            data = os.getrandom(want) if want else b""
            n = copy_to_chain(mem, chain, data)
            for addr, length in chain.writable:
                transport.note_dma_write(addr, length)
            self.bytes_served += n
            done.append((chain.head, n))
