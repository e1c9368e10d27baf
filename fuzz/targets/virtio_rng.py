"""virtio-rng (``RngDevice.process``) behind the real virtio-pci transport: fuzzer-chosen
features, queue set-up and rings. Documented outcomes: chains filled with at most
64 KiB each, bad chains completed with 0, ``QueueBroken`` → NEEDS_RESET."""

from __future__ import annotations

from fuzz.common import Provider, VirtioHarness, check
from pyvirt.virtio.rng import MAX_REQUEST, RngDevice

_rng = RngDevice()
_harness = VirtioHarness(_rng)


def one_input(data: bytes) -> None:
    before = _rng.bytes_served
    _harness.run(Provider(data))
    check(_rng.bytes_served - before <= 256 * MAX_REQUEST, "more entropy than requests allow")
