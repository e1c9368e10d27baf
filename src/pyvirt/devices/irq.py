"""Interrupt lines as devices see them.

A device holds an ``IrqLine`` and never knows what is behind it: under KVM it
is ``KVM_IRQ_LINE`` into the in-kernel PIC/IOAPIC (or an irqfd); under the
software CPU it is our Python IOAPIC/PIC. Devices report their *level*: the
line implementation turns level changes into edges for edge-triggered pins.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["IrqLine", "NullIrq"]


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
