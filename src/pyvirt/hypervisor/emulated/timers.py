"""One host thread that runs callbacks at deadlines (the emulated chips' clock).

The LAPIC timers and the PIT ask for a callback at an absolute deadline on a
monotonic nanosecond clock. One thread keeps a heap of deadlines and sleeps on
a condition variable until the earliest one (no polling). Cancelling marks the
entry dead (O(1)); dead entries are dropped when they reach the top of the heap
or when they outnumber the live ones.

Callbacks run on the timer thread with no lock of this service held, so they
may schedule or cancel. ``cancel`` cannot stop a callback that has already
been taken off the heap: owners must tolerate a late call (the chips compare
the handle with their current one under their own lock).

For tests: pass a fake ``clock`` and ``start=False``, then call ``run_due()``
after advancing the clock; nothing runs behind the test's back.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

__all__ = ["ManualClock", "TimerHandle", "TimerService"]

log = logging.getLogger(__name__)

Clock = Callable[[], int]


class TimerHandle:
    """One scheduled callback. Compare by identity; only the service touches its fields."""

    __slots__ = ("callback", "cancelled", "deadline_ns", "seq")

    def __init__(self, deadline_ns: int, seq: int, callback: Callable[[], None]) -> None:
        self.deadline_ns = deadline_ns
        self.seq = seq
        self.callback = callback
        self.cancelled = False

    def __lt__(self, other: TimerHandle) -> bool:
        # heap order: deadline, then scheduling order so equal deadlines run FIFO
        return (self.deadline_ns, self.seq) < (other.deadline_ns, other.seq)


class ManualClock:
    """A monotonic nanosecond clock that moves only when told (tests)."""

    def __init__(self, start_ns: int = 0) -> None:
        self.now_ns = start_ns

    def __call__(self) -> int:
        return self.now_ns

    def advance(self, delta_ns: int) -> None:
        if delta_ns < 0:
            raise ValueError("a monotonic clock cannot go back")
        self.now_ns += delta_ns


class TimerService:
    def __init__(self, clock: Clock = time.monotonic_ns, *, start: bool = True,
                 name: str = "pyvirt-timers") -> None:
        self.clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[TimerHandle] = []
        self._dead = 0  # cancelled entries still in the heap
        self._seq = itertools.count()
        self._closed = False
        self._thread: threading.Thread | None = None
        # started by the first schedule(), i.e. once the guest runs: after the
        # VMM's sandbox, whose Landlock and capability parts reach only threads
        # started after it
        self._start = start
        self._name = name

    def now_ns(self) -> int:
        return self.clock()

    def schedule(self, deadline_ns: int, callback: Callable[[], None]) -> TimerHandle:
        """Run ``callback`` on the timer thread once ``clock() >= deadline_ns``."""
        with self._cond:
            if self._closed:
                raise RuntimeError("timer service is closed")
            handle = TimerHandle(deadline_ns, next(self._seq), callback)
            heapq.heappush(self._heap, handle)
            if self._start and self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            # wake the thread only when its sleep target moved earlier
            if self._heap[0] is handle:
                self._cond.notify()
            return handle

    def cancel(self, handle: TimerHandle | None) -> None:
        """Drop ``handle`` if it has not started running; ``None`` and repeats are fine."""
        if handle is None:
            return
        with self._cond:
            if handle.cancelled:
                return
            handle.cancelled = True
            handle.callback = _noop  # release what the closure holds
            self._dead += 1
            if self._dead > 64 and self._dead * 2 > len(self._heap):
                self._heap = [h for h in self._heap if not h.cancelled]
                heapq.heapify(self._heap)
                self._dead = 0

    def pending(self) -> int:
        """Live (not cancelled, not yet run) callbacks; for tests and diagnostics."""
        with self._cond:
            return len(self._heap) - self._dead

    def next_deadline(self) -> int | None:
        with self._cond:
            self._drop_dead_top()
            return self._heap[0].deadline_ns if self._heap else None

    def run_due(self) -> int:
        """Run every callback that is due now on the calling thread; return how many ran.

        Meant for ``start=False`` services with a fake clock. Callbacks scheduled
        by a callback for a deadline already past run in the same call.
        """
        ran = 0
        while True:
            handle = self._pop_due()
            if handle is None:
                return ran
            self._run(handle)
            ran += 1

    def close(self) -> None:
        """Stop the thread and forget every pending callback. Idempotent."""
        with self._cond:
            self._closed = True
            for h in self._heap:
                h.cancelled = True
            self._heap.clear()
            self._dead = 0
            self._cond.notify()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join()

    # -- internals ---------------------------------------------------------

    def _drop_dead_top(self) -> None:
        while self._heap and self._heap[0].cancelled:
            heapq.heappop(self._heap)
            self._dead -= 1

    def _pop_due(self) -> TimerHandle | None:
        with self._cond:
            self._drop_dead_top()
            if self._heap and self._heap[0].deadline_ns <= self.clock():
                handle = heapq.heappop(self._heap)
                handle.cancelled = True  # a later cancel() is a no-op
                return handle
            return None

    @staticmethod
    def _run(handle: TimerHandle) -> None:
        try:
            handle.callback()
        except Exception:  # one bad device must not stop every timer
            log.exception("timer callback %r failed", handle.callback)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    self._drop_dead_top()
                    if not self._heap:
                        self._cond.wait()
                        continue
                    delay = self._heap[0].deadline_ns - self.clock()
                    if delay <= 0:
                        handle = heapq.heappop(self._heap)
                        handle.cancelled = True
                        break
                    # capped: Condition.wait rejects timeouts above TIMEOUT_MAX
                    self._cond.wait(min(delay / 1e9, 3600.0))
            self._run(handle)


def _noop() -> None:
    pass
