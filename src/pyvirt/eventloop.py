"""One epoll event loop with registration at run time.

The VMM's main thread runs one ``EventLoop``: the wake-up eventfd, the console
input, the control socket and its connections, and every virtio device's queue
notifications and extra fds are registrations on it, added and removed while
the VM runs (a device registers its queues at DRIVER_OK on a vCPU thread and
removes them at reset). Handlers run on the loop thread.

Guarantees:
- ``add``/``modify``/``remove``/``call_soon`` are thread-safe.
- When ``remove(token)`` returns, that handler is not running and never runs
  again (from another thread it waits for a running call to finish; from
  inside the handler itself it returns at once).
- A handler that raises is logged with its registration's name and removed;
  the loop goes on.
- Timers (``call_later``) and ``call_soon`` callbacks run on the loop thread.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["EventLoop", "Timer", "Token"]

log = logging.getLogger(__name__)

Handler = Callable[[int], None]


@dataclass(eq=False)
class Token:
    """One registration: a file descriptor, its handler and the name logs use."""

    fd: int
    handler: Handler
    name: str
    events: int
    removed: bool = False


@dataclass(order=True)
class Timer:
    when: float
    seq: int
    fn: Callable[[], None] = field(compare=False)
    name: str = field(compare=False, default="timer")
    cancelled: bool = field(compare=False, default=False)

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    def __init__(self, name: str = "main") -> None:
        self.name = name
        self._ep = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._ep.register(self._wake_fd, select.EPOLLIN)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._by_fd: dict[int, Token] = {}
        self._running: Token | None = None  # the registration whose handler runs now
        self._soon: list[tuple[Callable[[], None], str]] = []
        self._timers: list[Timer] = []
        self._seq = itertools.count()
        self._thread: int | None = None  # ident of the thread running the loop
        self._closed = False

    # ---- registration (any thread)

    def add(self, fd: int, handler: Handler, *, name: str,
            events: int = select.EPOLLIN) -> Token:
        tok = Token(fd, handler, name, events)
        with self._lock:
            if fd in self._by_fd:
                raise ValueError(f"{name}: fd {fd} is already registered "
                                 f"(by {self._by_fd[fd].name})")
            self._by_fd[fd] = tok
            try:
                self._ep.register(fd, events)
            except BaseException:
                del self._by_fd[fd]
                raise
        return tok

    def modify(self, tok: Token, events: int) -> None:
        with self._lock:
            if tok.removed:
                return
            tok.events = events
            self._ep.modify(tok.fd, events)

    def remove(self, tok: Token) -> None:
        with self._lock:
            if not tok.removed:
                tok.removed = True
                if self._by_fd.get(tok.fd) is tok:
                    del self._by_fd[tok.fd]
                    with contextlib.suppress(OSError, ValueError):
                        self._ep.unregister(tok.fd)
            if self.in_loop_thread():
                return
            while self._running is tok:
                self._idle.wait()

    def call_soon(self, fn: Callable[[], None], *, name: str = "call_soon") -> None:
        with self._lock:
            self._soon.append((fn, name))
        self.wake()

    def call_later(self, delay: float, fn: Callable[[], None], *,
                   name: str = "timer") -> Timer:
        t = Timer(time.monotonic() + max(0.0, delay), next(self._seq), fn, name)
        with self._lock:
            heapq.heappush(self._timers, t)
        if not self.in_loop_thread():
            self.wake()
        return t

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake_fd, 1)

    def in_loop_thread(self) -> bool:
        return self._thread == threading.get_ident()

    def registrations(self) -> list[str]:
        with self._lock:
            return sorted(t.name for t in self._by_fd.values())

    # ---- running (one thread)

    def run_once(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` seconds (None: until something happens), then run
        the ready handlers, due timers and ``call_soon`` callbacks."""
        self._thread = threading.get_ident()
        with self._lock:
            if self._soon:
                timeout = 0.0
            elif self._timers:
                due = max(0.0, self._timers[0].when - time.monotonic())
                timeout = due if timeout is None else min(timeout, due)
        try:
            ready = self._ep.poll(-1 if timeout is None else timeout)
        except InterruptedError:  # a signal: its handler already ran
            ready = []
        for fd, events in ready:
            if fd == self._wake_fd:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wake_fd)
                continue
            with self._lock:
                tok = self._by_fd.get(fd)
                if tok is None or tok.removed:
                    continue
                self._running = tok
            try:
                tok.handler(events)
            except Exception:
                log.exception("%s: handler failed; removed from the event loop", tok.name)
                self._running = None
                self.remove(tok)
            finally:
                with self._lock:
                    self._running = None
                    self._idle.notify_all()
        self._run_timers()
        self._run_soon()

    def _run_timers(self) -> None:
        now = time.monotonic()
        while True:
            with self._lock:
                if not self._timers or self._timers[0].when > now:
                    return
                t = heapq.heappop(self._timers)
            if t.cancelled:
                continue
            try:
                t.fn()
            except Exception:
                log.exception("%s: timer failed", t.name)

    def _run_soon(self) -> None:
        with self._lock:
            soon, self._soon = self._soon, []
        for fn, name in soon:
            try:
                fn()
            except Exception:
                log.exception("%s: callback failed", name)

    def run_until(self, done: Callable[[], bool], *, tick: float | None = None) -> None:
        while not done():
            self.run_once(tick)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._by_fd.clear()
        self._ep.close()
        os.close(self._wake_fd)
