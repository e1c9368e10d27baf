"""What a virtio device type implements, and the thread its queue work runs on.

A device type (``blk``, ``rng``, ``console``) subclasses ``VirtioDevice``:
its feature bits, its config space, and ``process(queue)``, called on the
device's own I/O thread (``QueueWorker``) when the driver notifies a queue.
It talks back through the ``Transport`` it is given at activation:
``complete`` returns a chain to the used ring and interrupts the driver when
the ring's suppression rules allow; ``needs_reset`` breaks the device when
the driver broke a queue.

Threads: vCPU threads only touch the transport's registers; the I/O thread
pops chains; a device may complete chains from other threads of its own (the
block device's workers) — the used ring is guarded by the queue's lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from pyvirt.devices.guestlog import guest_faults
from pyvirt.memory import GuestMemory
from pyvirt.virtio.queue import Chain, QueueBroken, SplitQueue

__all__ = ["Completions", "QueueWorker", "Transport", "VirtioDevice", "copy_from_chain",
           "copy_to_chain", "next_chain", "serve_queue"]

log = logging.getLogger(__name__)


class Transport(Protocol):
    memory: GuestMemory

    def complete(self, queue: SplitQueue, done: Sequence[tuple[int, int]]) -> None:
        """Return chains (head, bytes written) and interrupt the driver if due."""
        ...

    def needs_reset(self, reason: str) -> None: ...

    def note_dma_write(self, gpa: int, size: int) -> None: ...

    def config_changed(self) -> None: ...


class VirtioDevice:
    """Base class of device types; see the module docstring."""

    device_id = 0
    name = "virtio"
    pci_class = 0x00FF00
    #: feature bits of the device type (the transport adds VERSION_1 & co)
    features = 0

    def __init__(self, queue_sizes: Sequence[int]) -> None:
        self.queue_sizes = list(queue_sizes)
        self.transport: Transport | None = None
        self.driver_features = 0

    def config_space(self) -> bytes:
        """The device-specific configuration layout, as the driver reads it."""
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write to the config space (most fields are read-only)."""

    def activate(self, transport: Transport, queues: Sequence[SplitQueue],
                 driver_features: int) -> None:
        """DRIVER_OK: the queues are set up. Runs on a vCPU thread; do not block."""
        self.transport = transport
        self.driver_features = driver_features

    def process(self, queue: SplitQueue) -> None:
        """The driver notified ``queue`` (I/O thread). Raise ``QueueBroken`` if it broke it."""

    def extra_fds(self) -> list[tuple[int, Callable[[], None]]]:
        """More fds for the I/O thread to wait on (e.g. console input) with handlers."""
        return []

    def quiesce(self) -> None:
        """Before a reset: finish or drop requests in flight (I/O thread stopped)."""

    def reset(self) -> None:
        self.transport = None
        self.driver_features = 0

    def close(self) -> None:
        """The VM is going away."""


def copy_to_chain(mem: GuestMemory, chain: Chain, data: bytes | bytearray | memoryview,
                  start: int = 0) -> int:
    """Copy ``data`` into the chain's writable buffers from byte ``start``; returns bytes copied."""
    view = memoryview(data)
    done = 0
    skip = start
    for addr, length in chain.writable:
        if skip >= length:
            skip -= length
            continue
        n = min(length - skip, len(view) - done)
        if n <= 0:
            break
        mem.view(addr + skip, n)[:] = view[done:done + n]
        done += n
        skip = 0
    return done


def copy_from_chain(mem: GuestMemory, chain: Chain, limit: int | None = None) -> bytes:
    out = bytearray()
    for addr, length in chain.readable:
        if limit is not None:
            length = min(length, limit - len(out))
            if length <= 0:
                break
        out += mem.view(addr, length)
    return bytes(out)


class Completions:
    """Chains served from one queue, returned to the driver in batches of at most
    a ring's worth: a driver that keeps re-posting buffers while the device
    works must not grow a batch without end."""

    def __init__(self, transport: Transport, q: SplitQueue) -> None:
        self.transport, self.q = transport, q
        self._done: list[tuple[int, int]] = []

    def add(self, head: int, written: int) -> None:
        self._done.append((head, written))
        if len(self._done) >= self.q.size:
            self.flush()

    def flush(self) -> None:
        if self._done:
            self.transport.complete(self.q, self._done)
            self._done = []


def next_chain(q: SplitQueue, name: str, out: Completions) -> Chain | None:
    """The next good chain of ``q``, or None once the ring is empty with
    notifications re-armed. Chains the queue rejected are completed with 0
    bytes (and reported within the device's warning budget)."""
    while True:
        chain = q.pop()
        if chain is None:
            if q.enable_notifications():
                continue  # more arrived while notifications were off
            return None
        if chain.error is None:
            return chain
        guest_faults.warning(log, name, "%s: bad descriptor chain: %s", name, chain.error)
        out.add(chain.head, 0)


def serve_queue(transport: Transport, q: SplitQueue, name: str,
                handle: Callable[[Chain], int]) -> None:
    """Serve every available chain of ``q`` with ``handle`` (returns the bytes it
    wrote); chains the queue rejected complete with 0."""
    out = Completions(transport, q)
    while (chain := next_chain(q, name, out)) is not None:
        out.add(chain.head, handle(chain))
    out.flush()


class QueueWorker:
    """The I/O thread of one device: waits on its queues' eventfds and runs
    ``device.process``. A broken queue puts the device in NEEDS_RESET."""

    def __init__(self, name: str, device: VirtioDevice, queues: Sequence[SplitQueue],
                 fds: Sequence[int], on_broken: Callable[[str], None]) -> None:
        self.device = device
        self.queues = list(queues)
        self.fds = list(fds)
        self.on_broken = on_broken
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._broken = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        os.eventfd_write(self._stop_fd, 1)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        os.close(self._stop_fd)

    def _run(self) -> None:
        ep = select.epoll()
        handlers: dict[int, Callable[[], None]] = {}
        try:
            ep.register(self._stop_fd, select.EPOLLIN)
            for q, fd in zip(self.queues, self.fds, strict=True):
                ep.register(fd, select.EPOLLIN)
                handlers[fd] = self._queue_handler(q, fd)
            for fd, fn in self.device.extra_fds():
                ep.register(fd, select.EPOLLIN)
                handlers[fd] = fn
            # a notification may have come before the thread existed
            for q in self.queues:
                self._process(q)
            while True:
                for fd, _ in ep.poll():
                    if fd == self._stop_fd:
                        return
                    self.call(handlers[fd])
        except Exception as exc:  # a VMM bug: break this device, keep the VM
            log.exception("%s: I/O thread failed", self.device.name)
            self.on_broken(f"internal error: {exc}")
        finally:
            ep.close()

    def _queue_handler(self, q: SplitQueue, fd: int) -> Callable[[], None]:
        def handle() -> None:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(fd)
            self._process(q)
        return handle

    def _process(self, q: SplitQueue) -> None:
        if q.ready:
            self.call(lambda: self.device.process(q))

    def call(self, handler: Callable[[], None]) -> None:
        """Run one handler (queue work or an extra fd's, e.g. console input filling the
        receive queue): a ring the driver broke puts the device in NEEDS_RESET."""
        if self._broken:
            return
        try:
            handler()
        except QueueBroken as exc:
            self._broken = True
            self.on_broken(str(exc))
