"""A guest that repeats a mistake forever must not fill the host's log.

Found by the guest-side stress test (tests/integration/test_guest_stress.py):
garbage rings made the VMM write a WARNING line per bad chain and per broken
queue, ~7 KiB/s on stderr for as long as the guest liked. Now each device has
a budget of warnings, then its guest errors go to debug level.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from pyvirt.devices.guestlog import GuestFaultLog
from pyvirt.virtio.rng import RngDevice
from tests.virtio_driver import VirtioPciDriver, wait_for

ROUNDS = 60


@pytest.fixture
def drv() -> Iterator[VirtioPciDriver]:
    d = VirtioPciDriver(RngDevice())
    yield d
    d.close()


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name.startswith("pyvirt") and r.levelno >= logging.WARNING]


def test_budget_per_device(caplog: pytest.LogCaptureFixture) -> None:
    faults = GuestFaultLog(limit=3)
    log = logging.getLogger("pyvirt.test")
    with caplog.at_level(logging.DEBUG, logger="pyvirt"):
        for i in range(50):
            faults.warning(log, "dev-a", "dev-a: bad thing %d", i)
        faults.warning(log, "dev-b", "dev-b: bad thing")
    warned = [r.getMessage() for r in _warnings(caplog)]
    assert warned[:3] == ["dev-a: bad thing 0", "dev-a: bad thing 1", "dev-a: bad thing 2"]
    assert "further guest errors are logged at debug level" in warned[3]
    assert warned[4:] == ["dev-b: bad thing"]  # another device has its own budget
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 50 - 4
    faults.forget("dev-a")  # a new device of that name
    caplog.clear()
    faults.warning(log, "dev-a", "dev-a: again")
    assert [r.getMessage() for r in _warnings(caplog)] == ["dev-a: again"]


def test_bad_chains_repeated_warn_a_bounded_number_of_times(
        drv: VirtioPciDriver, caplog: pytest.LogCaptureFixture) -> None:
    (q,) = drv.init(queue_sizes=[8])
    with caplog.at_level(logging.DEBUG, logger="pyvirt"):
        for _ in range(ROUNDS):
            q.submit([], [16])  # a good one, so we know the bad one before it is done
            q.add([], [(1 << 40, 16)])  # a buffer outside guest RAM
            q.kick()
            q.wait_used()
    assert len(_warnings(caplog)) <= 11, [r.getMessage() for r in _warnings(caplog)]


def test_broken_rings_repeated_warn_a_bounded_number_of_times(
        drv: VirtioPciDriver, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="pyvirt"):
        for _ in range(ROUNDS):
            (q,) = drv.init(queue_sizes=[8])
            q.set_avail_idx(9)  # 9 entries in an 8-entry ring: NEEDS_RESET
            q.kick()
            wait_for(lambda: drv.needs_reset, what="NEEDS_RESET")
            drv.reset()
    assert len(_warnings(caplog)) <= 11, [r.getMessage() for r in _warnings(caplog)]


def test_distinct_bad_disk_requests_warn_a_bounded_number_of_times(
        tmp_path: object, caplog: pytest.LogCaptureFixture) -> None:
    """virtio-blk's request errors name the guest's sector and length, so every
    one is distinct: they share the device's budget too (the stress test saw
    100 lines of them per disk)."""
    import struct
    from pathlib import Path

    from pyvirt.disk import open_disk
    from pyvirt.virtio.blk import BlockDevice

    path = Path(str(tmp_path)) / "d.img"
    path.write_bytes(bytes(64 * 512))
    image = open_disk(path, readonly=False, direct=False)
    d = VirtioPciDriver(BlockDevice(image, workers=2, name="virtio-blk-budget"))
    try:
        (q,) = d.init()
        with caplog.at_level(logging.DEBUG, logger="pyvirt"):
            for k in range(ROUNDS):  # reads far beyond the capacity, each at another sector
                hdr = d.put(struct.pack("<IIQ", 0, 0, 1000 + k))
                q.add([(hdr, 16)], [(d.alloc(512), 512), (d.put(b"\xff"), 1)])
                q.kick()
                q.wait_used()
        assert len(_warnings(caplog)) <= 11, [r.getMessage() for r in _warnings(caplog)]
    finally:
        d.close()
        image.close()
