"""Port sinks: ports Linux touches that need no device behind them.

A ``PortSink`` reads as a fixed byte (0xff by default: what a floating ISA bus
returns, and what makes Linux's probes conclude "nothing here", e.g. the 8250
IER test on absent COM ports or the parallel-port control read-back) and
drops writes. It has no state, hence no lock: port 0x80 (POST code / I/O
delay) is written constantly by ``outb_p`` and must cost next to nothing.

``legacy_ignore_ranges()`` lists the ranges a VMM maps to sinks so that these
probes neither reach the unclaimed-access path nor flood its diagnostics. It
leaves out everything handled elsewhere: under KVM the in-kernel irqchip/PIT
own the PICs (0x20/0x21, 0xA0/0xA1), the PIT (0x40-0x43), the speaker port
(0x61) and ELCR (0x4D0/0x4D1) (the software CPU backend maps its own); the
i8042 (0x60-0x64), the RTC (0x70/0x71), COM1 (0x3F8), ACPI PM and 0xCF9 are
real devices here; 0xCF8-0xCFF is PCI configuration space.
"""

from __future__ import annotations

__all__ = ["PortSink", "legacy_ignore_ranges"]


class PortSink:
    """Reads return ``value`` in every byte; writes are ignored."""

    __slots__ = ("_fill",)

    def __init__(self, value: int = 0xFF) -> None:
        if not 0 <= value <= 0xFF:
            raise ValueError("sink value must be a byte")
        # Pre-built fills indexed by access width, so a read allocates nothing.
        self._fill = tuple(bytes((value,)) * n for n in range(9))

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = self._fill[len(data)]

    def write(self, offset: int, data: memoryview) -> None:
        pass


def legacy_ignore_ranges() -> list[tuple[int, int, str]]:
    """(base, length, name) port ranges to map to a ``PortSink``; sorted, disjoint."""
    return [
        (0x0000, 0x20, "dma1"),  # 8237 DMA controller 1 (channels 0-3)
        (0x0022, 0x02, "imcr"),  # IMCR select/data (MP spec §3.6.2.1), Cyrix config
        (0x0080, 0x01, "post"),  # POST code / outb_p I/O delay
        (0x0081, 0x1F, "dma-page"),  # DMA page registers (0x81-0x8F) and 0x90-0x9F
        (0x00C0, 0x20, "dma2"),  # 8237 DMA controller 2 (channels 4-7)
        (0x00ED, 0x01, "io-delay"),  # alternative I/O delay port (io_delay=0xed)
        (0x00F0, 0x10, "fpu"),  # legacy x87 error/busy ports
        (0x0170, 0x08, "ide2"),  # legacy IDE secondary channel
        (0x01F0, 0x08, "ide1"),  # legacy IDE primary channel
        (0x0201, 0x01, "gameport"),
        (0x0278, 0x03, "lpt2"),  # also the ISA PnP address port (0x279)
        (0x02E8, 0x08, "com4"),
        (0x02F8, 0x08, "com2"),
        (0x0376, 0x01, "ide2-ctl"),
        (0x0378, 0x03, "lpt1"),
        (0x03B0, 0x0C, "mda"),  # monochrome adapter / VGA mono CRTC
        (0x03BC, 0x03, "lpt3"),
        (0x03C0, 0x20, "vga"),
        (0x03E8, 0x08, "com3"),
        (0x03F0, 0x08, "fdc"),  # floppy controller; 0x3F6 is IDE1 control
        (0x0A79, 0x01, "isapnp-data"),
    ]
