"""Regression tests for what the fuzzers (fuzz/, docs/security.md) found: each input
here is the minimal form of one finding and failed before its fix."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pyvirt.virtio.console import F_MULTIPORT, ConsoleDevice
from tests.virtio_driver import VirtioPciDriver, wait_for


def test_console_input_on_a_broken_receive_ring_needs_reset(
        caplog: pytest.LogCaptureFixture) -> None:
    """fuzz/targets/virtio_console: console input arriving while the driver's receive
    ring has an available index far ahead is the driver breaking the queue
    (NEEDS_RESET, the I/O thread goes on), not a VMM bug that kills the I/O thread."""
    out: list[bytes] = []
    with VirtioPciDriver(ConsoleDevice(out.append)) as drv:
        # without MULTIPORT, input goes out as soon as receive buffers are posted
        rx, tx = drv.init(drv.device_features() & ~(1 << F_MULTIPORT), queue_sizes=[None, None])
        worker = drv.pdev._worker
        assert worker is not None
        tx.submit([b"hello"])  # a round trip: the I/O thread is past its start-up pass
        assert out == [b"hello"]
        rx.set_avail_idx(1000)  # 1000 ahead of 0 on a 64-entry ring
        with caplog.at_level(logging.WARNING, logger="pyvirt"):
            assert drv.device.enqueue_input(b"x")  # type: ignore[attr-defined]
            wait_for(lambda: drv.needs_reset, what="NEEDS_RESET")
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("available index 1000" in r.getMessage() for r in caplog.records)
        assert worker.running  # still on the event loop (draining its eventfds)
        drv.reset()
        assert not drv.needs_reset


def test_i8042_answers_nobody_reads_stay_bounded() -> None:
    """fuzz/targets/i8042: every keyboard command queues an answer; a guest that keeps
    writing without reading port 0x60 grew the output queue without bound."""
    from pyvirt.devices.legacy.i8042 import _OUTPUT_QUEUE_MAX, I8042

    dev = I8042(lambda: None)
    for _ in range(10_000):
        dev.write(0, memoryview(bytearray([0xFF])))  # keyboard reset: ACK + BAT
    assert len(dev._out) <= _OUTPUT_QUEUE_MAX
    buf = bytearray(1)
    dev.read(0, memoryview(buf))
    assert buf[0] == 0xFA  # the oldest answers are still there, in order


def test_initrd_larger_than_ram_is_refused_before_reading(tmp_path: Path) -> None:
    """fuzz/targets/loader_initrd: an initrd far larger than guest RAM (a disk image given
    by mistake) was read whole into host memory before "does not fit"."""
    import resource

    from pyvirt.loader import KernelImage, LoaderError, load_initrd
    from pyvirt.memory import GuestMemory

    big = tmp_path / "huge.img"
    with open(big, "wb") as f:
        f.truncate(1 << 30)  # sparse: no disk used
    kernel = KernelImage(kind="elf", entry=0x100_0000, load_addr=0x100_0000, end=0x120_0000,
                         setup_header=None, protocol_version=0x20F,
                         initrd_addr_max=0x7FFF_FFFF, cmdline_size=2047, pvh_entry=None,
                         source=Path("vmlinux"))
    mem = GuestMemory.create(64 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        with pytest.raises(LoaderError, match="does not fit"):
            load_initrd(mem, big, kernel)
    finally:
        mem.close()
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 256, f"peak RSS grew by {grown_mib:.0f} MiB"
