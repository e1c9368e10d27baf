"""virtio-console (virtio 1.2, 5.3): one port, the guest's ``hvc0``.

Queue 0 (receiveq) carries input to the guest, queue 1 (transmitq) its
output. Input from the user is buffered here (up to ``INPUT_LIMIT`` bytes;
``enqueue_input`` says how much it took, like the serial port) and handed to
the I/O thread through an eventfd, which copies it into whatever receive
buffers the driver has posted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
from collections.abc import Callable

from pyvirt.virtio import DEVICE_ID_CONSOLE
from pyvirt.virtio.device import (
    Transport,
    VirtioDevice,
    copy_from_chain,
    copy_to_chain,
    serve_queue,
)
from pyvirt.virtio.queue import Chain, SplitQueue

__all__ = ["ConsoleDevice"]

log = logging.getLogger(__name__)

INPUT_LIMIT = 64 << 10
RX, TX = 0, 1


class ConsoleDevice(VirtioDevice):
    device_id = DEVICE_ID_CONSOLE
    name = "virtio-console"
    pci_class = 0x078000  # communication controller, other

    def __init__(self, write: Callable[[bytes], None]) -> None:
        super().__init__([64, 64])
        self._write = write
        self._input = bytearray()
        self._lock = threading.Lock()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._rx: SplitQueue | None = None

    def config_space(self) -> bytes:
        return struct.pack("<HHII", 0, 0, 1, 0)  # cols, rows, max_nr_ports, emerg_wr

    def enqueue_input(self, data: bytes) -> int:
        """Buffer user input for the guest (any thread); returns bytes accepted."""
        with self._lock:
            n = max(0, min(len(data), INPUT_LIMIT - len(self._input)))
            self._input += data[:n]
        if n:
            os.eventfd_write(self._wake, 1)
        return n

    def activate(self, transport: object, queues: object, driver_features: int) -> None:
        super().activate(transport, queues, driver_features)  # type: ignore[arg-type]
        self._rx = queues[RX]  # type: ignore[index]

    def extra_fds(self) -> list[tuple[int, Callable[[], None]]]:
        return [(self._wake, self._on_wake)]

    def _on_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake)
        if self._rx is not None and self._rx.ready:
            self._fill_rx(self._rx)

    def process(self, q: SplitQueue) -> None:
        if q.index == RX:
            self._fill_rx(q)
        else:
            self._drain_tx(q)

    def _drain_tx(self, q: SplitQueue) -> None:
        transport = self.transport
        if transport is not None:
            serve_queue(transport, q, self.name, lambda chain: self._output(transport, chain))

    def _output(self, transport: Transport, chain: Chain) -> int:
        data = copy_from_chain(transport.memory, chain, limit=1 << 20)
        if data:
            self._write(data)
        return 0

    def _fill_rx(self, q: SplitQueue) -> None:
        transport = self.transport
        if transport is None:
            return
        done: list[tuple[int, int]] = []
        while True:
            with self._lock:
                if not self._input:
                    break
            chain = q.pop()
            if chain is None:
                if q.enable_notifications():
                    continue
                break
            if chain.error is not None:
                log.warning("%s: bad descriptor chain: %s", self.name, chain.error)
                done.append((chain.head, 0))
                continue
            with self._lock:
                n = copy_to_chain(transport.memory, chain, self._input[:chain.writable_len])
                del self._input[:n]
            for addr, length in chain.writable:
                transport.note_dma_write(addr, length)
            done.append((chain.head, n))
        if done:
            transport.complete(q, done)

    def reset(self) -> None:
        super().reset()
        self._rx = None

    def close(self) -> None:
        if self._wake >= 0:
            os.close(self._wake)
            self._wake = -1
