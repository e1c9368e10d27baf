"""Bounded warnings about what a guest did wrong.

A guest's mistakes (a broken ring, a bad descriptor chain) are worth a warning
on the host: they explain why its device stopped. But the guest is hostile and
can repeat a mistake millions of times, and every line lands in the host's log
(a terminal, a journal, a file). So each device gets a small budget of
warnings; after that its guest errors go to debug level, with one line saying
so. Budgets are kept per device name, and names come from the VMM, never the
guest, so the bookkeeping itself is bounded; a new device of the same name (the
next boot) starts afresh (``forget``).
"""

from __future__ import annotations

import logging
import threading

__all__ = ["GuestFaultLog", "guest_faults"]


class GuestFaultLog:
    """``warning(logger, name, fmt, *args)``: WARNING for the first ``limit``
    faults of device ``name``, DEBUG afterwards."""

    def __init__(self, limit: int = 10) -> None:
        self.limit = limit
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()  # device I/O threads and vCPU threads both report

    def warning(self, logger: logging.Logger, name: str, fmt: str, *args: object) -> None:
        with self._lock:
            n = self._counts.get(name, 0)
            if n <= self.limit:
                self._counts[name] = n + 1
        if n < self.limit:
            logger.warning(fmt, *args)
        elif n == self.limit:
            logger.warning(fmt + " (%s: further guest errors are logged at debug level)",
                           *args, name)
        else:
            logger.debug(fmt, *args)

    def forget(self, name: str) -> None:
        with self._lock:
            self._counts.pop(name, None)


#: the budgets of the virtio devices (transport and queue work share one per device)
guest_faults = GuestFaultLog()
