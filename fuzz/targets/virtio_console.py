"""virtio-console (``ConsoleDevice``): the transmit queue's output path and the receive
queue fed with fuzzer-chosen input, behind the real virtio-pci transport.

Documented outcomes: output bounded by 1 MiB per chain, input buffered up to
``INPUT_LIMIT`` and copied into posted receive buffers, bad chains completed
with 0, ``QueueBroken`` → NEEDS_RESET."""

from __future__ import annotations

from fuzz.common import Provider, VirtioHarness, check
from pyvirt.virtio.console import INPUT_LIMIT, ConsoleDevice

_out = [0]


def _write(data: bytes) -> None:
    check(len(data) <= 1 << 20, f"{len(data)} bytes of output from one chain")
    _out[0] += len(data)


_console = ConsoleDevice(_write)
_harness = VirtioHarness(_console)


def one_input(data: bytes) -> None:
    fdp = Provider(data)
    typed = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 256))

    _harness.run(fdp, lambda: _console.enqueue_input(typed))
    check(len(_console._input) <= INPUT_LIMIT, "console input buffer over its limit")
    _console._input.clear()
