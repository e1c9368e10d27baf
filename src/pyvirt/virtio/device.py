"""What a virtio device type implements, and how its queue work runs.

A device type (``blk``, ``rng``, ``console``) subclasses ``VirtioDevice``:
its feature bits, its config space, and ``process(queue)``, called on the
VMM's event loop thread (``QueueWorker`` registers the queues' eventfds
there) when the driver notifies a queue. It talks back through the
``Transport`` it is given at activation: ``complete`` returns a chain to the
used ring and interrupts the driver when the ring's suppression rules allow;
``needs_reset`` breaks the device when the driver broke a queue; ``requeue``
runs a queue's work again later (a device that stopped taking chains for
lack of room).

Threads: vCPU threads only touch the transport's registers; the loop thread
pops chains; a device may complete chains from other threads of its own (the
block device's workers) — the used ring is guarded by the queue's lock. Queue
work must not block the loop: it is shared by every device and the console.

Saved state: each device type has a record (``STATE_VERSION``,
``state_type``, ``save_state``/``restore_state``, see ``pyvirt.state``),
saved by the transport with I/O paused; the base class has none to keep.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pyvirt.devices.guestlog import guest_faults
from pyvirt.memory import GuestMemory
from pyvirt.state import check_version
from pyvirt.virtio.queue import Chain, QueueBroken, SplitQueue

if TYPE_CHECKING:
    from pyvirt.eventloop import EventLoop, Token

__all__ = ["Completions", "FdWatch", "NoDeviceState", "QueueWorker", "Transport", "VirtioDevice",
           "copy_from_chain", "copy_to_chain", "next_chain", "serve_queue"]

log = logging.getLogger(__name__)


class Transport(Protocol):
    memory: GuestMemory

    def complete(self, queue: SplitQueue, done: Sequence[tuple[int, int]]) -> None:
        """Return chains (head, bytes written) and interrupt the driver if due."""
        ...

    def needs_reset(self, reason: str) -> None: ...

    def note_dma_write(self, gpa: int, size: int) -> None: ...

    def config_changed(self) -> None: ...

    def requeue(self, queue: SplitQueue) -> None:
        """Run the device's ``process(queue)`` again on the loop (any thread)."""
        ...

    def note_error(self) -> None:
        """Count a request the device failed (metrics)."""
        ...

    def watch(self, fd: int, handler: Callable[[int], None], *, events: int = select.EPOLLIN,
              name: str) -> FdWatch:
        """Watch a host fd of the device's own (a TAP, a host socket) on the device's
        loop from now until the driver resets the device (see ``FdWatch``). Call
        from ``activate`` on, never before."""
        ...


@dataclass(frozen=True)
class NoDeviceState:
    """The state of a device type that keeps none of its own (virtio-rng)."""

    version: int


class VirtioDevice:
    """Base class of device types; see the module docstring."""

    device_id = 0
    name = "virtio"
    pci_class = 0x00FF00
    #: feature bits of the device type (the transport adds VERSION_1 & co)
    features = 0
    STATE_VERSION: ClassVar[int] = 1
    state_type: ClassVar[type[Any]] = NoDeviceState

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
        """The driver notified ``queue`` (event loop thread; must not block). Raise
        ``QueueBroken`` if the driver broke it."""

    def extra_fds(self) -> list[tuple[int, Callable[[], None]]]:
        """More eventfds for the loop to wait on (e.g. console input) with handlers."""
        return []

    def quiesce(self, timeout: float = 30.0) -> bool:
        """Wait up to ``timeout`` s for requests in flight on the device's own threads
        (queue work already stopped); False if some are still running."""
        return True

    def save_state(self) -> Any:
        """The device type's state (I/O paused: nothing in flight)."""
        return NoDeviceState(self.STATE_VERSION)

    def check_state(self, state: Any) -> None:
        """``StateError`` unless ``state`` fits this device (changes nothing)."""
        check_version(self.name, state.version, self.STATE_VERSION)

    def restore_state(self, state: Any) -> None:
        """Called after ``reset`` (and ``activate`` when the record is DRIVER_OK)."""
        self.check_state(state)

    def metrics(self) -> dict[str, int]:
        """The device type's own counters (bytes moved ...), see ``VirtioPciDevice.metrics``."""
        return {}

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
        out.transport.note_error()
        out.add(chain.head, 0)


def serve_queue(transport: Transport, q: SplitQueue, name: str,
                handle: Callable[[Chain], int]) -> None:
    """Serve every available chain of ``q`` with ``handle`` (returns the bytes it
    wrote); chains the queue rejected complete with 0."""
    out = Completions(transport, q)
    while (chain := next_chain(q, name, out)) is not None:
        out.add(chain.head, handle(chain))
    out.flush()


class FdWatch:
    """A host fd of a device's own (a TAP, a backend socket, a vsock peer) watched
    on the device's event loop while its queue work runs.

    Created by ``Transport.watch`` (from ``activate`` on). Its handler runs on the
    loop thread like the queue work, never concurrently with it, with the epoll
    events; an exception breaks the device as queue work does. ``events`` 0 means
    not watched: the fd leaves epoll (a level-triggered fd with nothing to do,
    such as a TAP while the guest posts no receive buffers, must not be polled).
    While the device is paused or broken nothing is registered; ``start`` puts
    back every watch with its current events. ``close`` ends the watch (the fd
    stays the device's to close); a device reset closes every watch.

    ``set_events``/``close`` may be called from any thread: on the loop thread
    (the usual case, from a handler) or while the work is stopped they act at
    once; from another thread while it runs they are handed to the loop
    (``call_soon``).
    """

    def __init__(self, worker: QueueWorker, fd: int, handler: Callable[[int], None],
                 events: int, name: str) -> None:
        self.worker, self.fd, self.handler, self.name = worker, fd, handler, name
        self.events = events
        self.closed = False
        self._token: Token | None = None

    def set_events(self, events: int) -> None:
        self.worker._watch_op(self, events, close=False)

    def close(self) -> None:
        self.worker._watch_op(self, 0, close=True)

    def _dispatch(self, events: int) -> None:
        w = self.worker
        if w.broken or self.closed:
            w._unregister(self)  # a level-triggered fd would come back at once
            return
        w.call(lambda: self.handler(events))


class QueueWorker:
    """The queue work of one device, run on the VMM's shared event loop.

    ``start`` registers the queues' notify eventfds (and the device's extra
    fds) on the loop and kicks every queue once, through its own eventfd, so
    the first pass runs on the loop thread like every other (a notification
    may have come before the registration). ``stop`` removes them: when it
    returns no handler of this device runs, and none will (``EventLoop.remove``).
    Both may be called repeatedly (pause and resume). Handlers of one device
    never run concurrently: the loop has one thread.

    A broken queue (``QueueBroken``) or a bug in device code (any other
    exception) puts the device in NEEDS_RESET; the loop never sees the
    exception, and the device's handlers only drain their eventfds from then
    on (all fds registered here are eventfds) until the driver resets it.
    With ``loop=None`` nothing is registered: the caller drives ``call`` and
    ``_process`` itself (the fuzz harness).
    """

    def __init__(self, name: str, device: VirtioDevice, queues: Sequence[SplitQueue],
                 fds: Sequence[int], on_broken: Callable[[str], None],
                 loop: EventLoop | None = None,
                 on_notify: Callable[[int], None] | None = None) -> None:
        self.name = name
        self.device = device
        self.queues = list(queues)
        self.fds = list(fds)
        self.on_broken = on_broken
        self.loop = loop
        self.on_notify = on_notify
        self.broken = False
        self._lock = threading.Lock()  # guards _tokens (start/stop from any thread)
        self._tokens: list[Token] = []
        #: queues kicked by us (start, requeue), not by the driver: not counted
        self._self_kicks = [False] * len(self.queues)
        self._watches: list[FdWatch] = []  # guarded by _lock
        #: held while a handler runs (``call``): ``stop`` waits on it, because a watch
        #: handler that took its own fd out of epoll (``set_events(0)``) goes on running
        #: as a registration ``EventLoop.remove`` no longer knows about
        self._calling = threading.RLock()

    @property
    def running(self) -> bool:
        return bool(self._tokens)

    def start(self) -> None:
        loop = self.loop
        if loop is None:
            raise RuntimeError(f"{self.name}: no event loop to run on")
        with self._lock:
            if self._tokens:
                return
            try:
                for q, fd in zip(self.queues, self.fds, strict=True):
                    self._tokens.append(loop.add(fd, self._queue_handler(q, fd),
                                                 name=f"{self.name}-q{q.index}"))
                for fd, fn in self.device.extra_fds():
                    self._tokens.append(loop.add(fd, self._extra_handler(fd, fn),
                                                 name=f"{self.name}-extra"))
                for w in self._watches:
                    self._register(w)
            except BaseException:
                tokens, self._tokens = self._tokens, []
                for w in self._watches:
                    if w._token is not None:
                        tokens.append(w._token)
                        w._token = None
                for tok in tokens:
                    loop.remove(tok)
                raise
        for q in self.queues:
            self.kick(q)

    def stop(self) -> None:
        with self._lock:
            tokens, self._tokens = self._tokens, []
            for w in self._watches:
                if w._token is not None:
                    tokens.append(w._token)
                    w._token = None
        if self.loop is not None:
            for tok in tokens:
                self.loop.remove(tok)
            if not self.loop.in_loop_thread():
                with self._calling:  # see _calling
                    pass

    # ---- the device's own fds (FdWatch)

    def watch(self, fd: int, handler: Callable[[int], None], *, events: int = select.EPOLLIN,
              name: str) -> FdWatch:
        w = FdWatch(self, fd, handler, events, f"{self.name}-{name}")
        with self._lock:
            self._watches.append(w)
            running = bool(self._tokens)
        if running:
            self._watch_op(w, events, close=False)
        return w

    def close_watches(self) -> None:
        """The device was reset: every watch ends (call with the work stopped)."""
        with self._lock:
            watches, self._watches = self._watches, []
        for w in watches:
            w.closed = True
            self._unregister(w)

    def _register(self, w: FdWatch) -> None:
        """(with ``_lock``, loop set) Put ``w`` on the loop if it wants events."""
        assert self.loop is not None
        if w.events and not w.closed and not self.broken and w._token is None:
            w._token = self.loop.add(w.fd, w._dispatch, name=w.name, events=w.events)

    def _unregister(self, w: FdWatch) -> None:
        with self._lock:
            tok, w._token = w._token, None
        if tok is not None and self.loop is not None:
            self.loop.remove(tok)

    def _watch_op(self, w: FdWatch, events: int, *, close: bool) -> None:
        loop = self.loop
        if loop is not None and self.running and not loop.in_loop_thread():
            loop.call_soon(lambda: self._watch_op_now(w, events, close),
                           name=f"{w.name}-events")
            return
        self._watch_op_now(w, events, close)

    def _watch_op_now(self, w: FdWatch, events: int, close: bool) -> None:
        with self._lock:
            if w.closed:
                return
            if close:
                w.closed = True
                if w in self._watches:
                    self._watches.remove(w)
            w.events = 0 if close else events
            tok = w._token
            if tok is not None and w.events:
                if tok.events != w.events and self.loop is not None:
                    self.loop.modify(tok, w.events)
                return
            if tok is None and w.events and self._tokens and self.loop is not None:
                self._register(w)
                return
            w._token = None
        if tok is not None and self.loop is not None:
            self.loop.remove(tok)

    def kick(self, q: SplitQueue) -> None:
        """Run ``q``'s work again on the loop (any thread). Nothing runs while stopped:
        the eventfd keeps the kick for the next ``start``, which kicks every queue."""
        self._self_kicks[q.index] = True
        with contextlib.suppress(OSError):  # closed: the device is going away
            os.eventfd_write(self.fds[q.index], 1)

    def _queue_handler(self, q: SplitQueue, fd: int) -> Callable[[int], None]:
        def handle(events: int) -> None:
            try:
                n = os.eventfd_read(fd)
            except BlockingIOError:
                n = 0
            if self._self_kicks[q.index]:
                self._self_kicks[q.index] = False
                n -= 1
            if n > 0 and self.on_notify is not None:
                self.on_notify(n)
            self._process(q)
        return handle

    def _extra_handler(self, fd: int, fn: Callable[[], None]) -> Callable[[int], None]:
        def handle(events: int) -> None:
            if self.broken:  # the device's handler would drain it; it no longer runs
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(fd)
                return
            self.call(fn)
        return handle

    def _process(self, q: SplitQueue) -> None:
        if q.ready:
            self.call(lambda: self.device.process(q))

    def call(self, handler: Callable[[], None]) -> None:
        """Run one handler (queue work or an extra fd's, e.g. console input filling the
        receive queue): a ring the driver broke, or a bug, puts the device in NEEDS_RESET."""
        if self.broken:
            return
        try:
            with self._calling:
                handler()
        except QueueBroken as exc:
            self.broken = True
            self.on_broken(str(exc))
        except Exception as exc:  # a VMM bug: break this device, keep the loop and the VM
            log.exception("%s: queue work failed", self.name)
            self.broken = True
            self.on_broken(f"internal error: {exc}")
