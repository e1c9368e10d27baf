"""virtio-console driven as Linux's virtio_console driver drives it (``tests.virtio_driver``):
the MULTIPORT control handshake, and input held until the driver opens port 0."""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Iterator

import pytest

from pyvirt.virtio.console import F_MULTIPORT, ConsoleDevice
from tests.virtio_driver import DriverQueue, VirtioPciDriver

QUIET = 0.05  # how long to watch for a delivery that must not come
BAD_ID = 0xFFFF_FFFF  # VIRTIO_CONSOLE_BAD_ID: DEVICE_READY names no port
DEVICE_READY, DEVICE_ADD, PORT_READY, CONSOLE_PORT, PORT_OPEN = 0, 1, 3, 4, 6
TYPED = b"uname -a; poweroff\n"


def ctrl(port: int, event: int, value: int) -> bytes:
    return struct.pack("<IHH", port, event, value)


class Driver:
    """The four queues of a one-port MULTIPORT console, with receive buffers posted."""

    def __init__(self, drv: VirtioPciDriver, features: int | None = None) -> None:
        self.drv = drv
        self.rx, self.tx, self.crx, self.ctx = drv.init(features)
        self.rx_bufs = self.post(self.rx, 4, 4096)  # as add_port()'s fill_queue()
        self.ctrl_bufs = self.post(self.crx, 8, 4096)

    def post(self, q: DriverQueue, count: int, size: int) -> dict[int, int]:
        bufs = {}
        for _ in range(count):
            addr = self.drv.alloc(size)
            bufs[q.add([], [(addr, size)])] = addr
        q.kick()
        return bufs

    def send(self, msg: bytes) -> None:
        self.ctx.submit([msg])

    def replies(self) -> list[tuple[int, int, int]]:
        """Control messages the device has completed so far (no waiting)."""
        n = self.crx.pending_used()
        out = []
        for head, length in self.crx.wait_used(n) if n else []:
            assert length == 8
            out.append(struct.unpack("<IHH", self.drv.mem.read(self.ctrl_bufs[head], 8)))
        return out

    def input_held(self) -> bool:
        time.sleep(QUIET)
        return self.rx.pending_used() == 0

    def received(self) -> bytes:
        got = b""
        while len(got) < len(TYPED):
            ((head, n),) = self.rx.wait_used(1)
            got += self.drv.mem.read(self.rx_bufs[head], n)
        return got

    def open_port(self) -> None:
        """Linux: probe's DEVICE_READY, add_port()'s PORT_READY, init_port_console()'s
        PORT_OPEN, each answered before its message completes."""
        self.send(ctrl(BAD_ID, DEVICE_READY, 1))
        assert self.replies() == [(0, DEVICE_ADD, 1)]
        self.send(ctrl(0, PORT_READY, 1))
        assert self.replies() == [(0, CONSOLE_PORT, 1), (0, PORT_OPEN, 1)]
        self.send(ctrl(0, PORT_OPEN, 1))


@pytest.fixture
def drv() -> Iterator[VirtioPciDriver]:
    d = VirtioPciDriver(ConsoleDevice(lambda data: None))
    yield d
    d.close()


def test_offers_multiport_with_one_port(drv: VirtioPciDriver) -> None:
    assert drv.device_features() >> F_MULTIPORT & 1
    assert drv.common_read("num_queues") == 4
    assert drv.config_read(4, 4) == 1  # max_nr_ports


def test_early_input_waits_for_the_driver_to_open_the_port(drv: VirtioPciDriver) -> None:
    """Input typed before boot is not sent into the buffers Linux posts before the port
    exists (its in_intr() would flush them), only after the driver's PORT_OPEN."""
    assert drv.device.enqueue_input(TYPED) == len(TYPED)  # type: ignore[attr-defined]
    d = Driver(drv)
    assert d.input_held()
    d.send(ctrl(BAD_ID, DEVICE_READY, 1))
    # Answered before DEVICE_READY completed: Linux reads replies right after its
    # busy-wait for the completion.
    assert d.replies() == [(0, DEVICE_ADD, 1)]
    assert d.input_held()
    d.send(ctrl(0, PORT_READY, 1))
    assert d.replies() == [(0, CONSOLE_PORT, 1), (0, PORT_OPEN, 1)]
    assert d.input_held()  # the port is listed, but its hvc is not up yet
    d.send(ctrl(0, PORT_OPEN, 1))
    assert d.received() == TYPED


def test_input_after_the_port_is_open_goes_straight_out(drv: VirtioPciDriver) -> None:
    d = Driver(drv)
    d.open_port()
    assert drv.device.enqueue_input(TYPED) == len(TYPED)  # type: ignore[attr-defined]
    assert d.received() == TYPED


def test_reset_holds_input_again_until_the_next_open(drv: VirtioPciDriver) -> None:
    d = Driver(drv)
    d.open_port()
    drv.reset()
    assert drv.device.enqueue_input(TYPED) == len(TYPED)  # type: ignore[attr-defined]
    d = Driver(drv)
    assert d.input_held()
    d.open_port()
    assert d.received() == TYPED


def test_without_multiport_input_goes_to_posted_buffers(drv: VirtioPciDriver) -> None:
    """A driver that does not negotiate MULTIPORT has no way to say it is ready."""
    drv.device.enqueue_input(TYPED)  # type: ignore[attr-defined]
    rx, _tx = drv.init(drv.device_features() & ~(1 << F_MULTIPORT), queue_sizes=[None, None])
    addr = drv.alloc(4096)
    head = rx.add([], [(addr, 4096)])
    rx.kick()
    assert rx.wait_used(1) == [(head, len(TYPED))]
    assert drv.mem.read(addr, len(TYPED)) == TYPED


def test_hostile_control_messages_are_ignored(drv: VirtioPciDriver) -> None:
    drv.device.enqueue_input(TYPED)  # type: ignore[attr-defined]
    d = Driver(drv)
    d.ctx.submit([b"\x06\x00"])  # short
    d.send(ctrl(7, PORT_OPEN, 1))  # a port that does not exist
    d.send(ctrl(0, 0xBEEF, 1))  # an unknown event
    d.send(ctrl(0, PORT_READY, 0))  # the driver failed to add the port: no reply
    assert d.replies() == []
    assert d.input_held()
    assert not drv.needs_reset
    d.open_port()
    assert d.received() == TYPED


def test_replies_without_control_buffers_are_bounded(
        drv: VirtioPciDriver, caplog: pytest.LogCaptureFixture) -> None:
    """A driver that sends control messages but posts no receive buffers for the replies
    does not make the device queue replies without end."""
    _rx, _tx, crx, ctx = drv.init()
    with caplog.at_level(logging.WARNING, logger="pyvirt"):
        for _ in range(40):
            ctx.submit([ctrl(BAD_ID, DEVICE_READY, 1)])
    assert [r.getMessage() for r in caplog.records] == [
        "virtio-console: driver posts no control buffers; control events dropped"]
    delivered = 0
    for _ in range(2):  # the 32-entry ring twice over: only the 32 kept replies come
        for _ in range(crx.size):
            crx.add([], [(drv.alloc(8), 8)])
        crx.kick()
        time.sleep(QUIET)
        n = crx.pending_used()
        crx.wait_used(n)
        delivered += n
    assert delivered == 32


def test_bad_receive_buffers_warn_a_bounded_number_of_times(
        drv: VirtioPciDriver, caplog: pytest.LogCaptureFixture) -> None:
    """Receive chains the queue rejects (here: a buffer outside guest RAM) are
    returned empty, within the device's warning budget, and input still
    reaches the next good buffer."""
    d = Driver(drv)
    d.open_port()
    rx = d.rx
    if rx.pending_used():
        rx.wait_used(rx.pending_used())
    with caplog.at_level(logging.DEBUG, logger="pyvirt"):
        for _ in range(40):
            rx.add([], [(1 << 40, 64)])  # outside RAM
            rx.kick()
            drv.device.enqueue_input(b"x")  # type: ignore[attr-defined]
            rx.wait_used(1)
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) <= 11, [r.getMessage() for r in warned]
