"""Interrupt lines as devices see them.

A device holds an ``IrqLine`` and never knows what is behind it: under KVM it
is ``KVM_IRQ_LINE`` into the in-kernel PIC/IOAPIC (or an irqfd); under the
software CPU it is our Python IOAPIC/PIC. Devices report their *level*: the
line implementation turns level changes into edges for edge-triggered pins.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["IrqLine", "MsiRoute", "NullIrq", "NullMsiRoute"]


class IrqLine(Protocol):
    def set_level(self, level: bool) -> None:
        """Drive the line high (True) or low (False). Cheap when unchanged."""
        ...


class NullIrq:
    """A line connected to nothing (tests, devices that poll)."""

    def __init__(self) -> None:
        self.level = False
        self.raised = 0  # number of low→high transitions, for tests

    def set_level(self, level: bool) -> None:
        if level and not self.level:
            self.raised += 1
        self.level = level


class MsiRoute(Protocol):
    """One message-signalled interrupt source (an MSI-X vector).

    Under KVM it is a GSI routed to an MSI message with an irqfd behind it, so
    ``trigger`` is one eventfd write from any thread; under the software CPU the
    message goes straight to our LAPICs.
    """

    def update(self, address: int, data: int) -> None:
        """Program the message (the MSI-X table entry's address and data)."""
        ...

    def trigger(self) -> None:
        """Send the message. Thread-safe; callers handle masking."""
        ...

    def close(self) -> None: ...


class NullMsiRoute:
    """Records messages instead of sending them (tests)."""

    def __init__(self) -> None:
        self.address = 0
        self.data = 0
        self.sent: list[tuple[int, int]] = []
        self.closed = False

    def update(self, address: int, data: int) -> None:
        self.address, self.data = address, data

    def trigger(self) -> None:
        self.sent.append((self.address, self.data))

    def close(self) -> None:
        self.closed = True
