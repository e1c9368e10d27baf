"""The shared event loop: registration at run time, removal guarantees, failing handlers."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from pyvirt.eventloop import EventLoop


@pytest.fixture
def loop():
    lp = EventLoop("test")
    yield lp
    lp.close()


def _efd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def test_add_and_remove_while_running(loop: EventLoop) -> None:
    fd = _efd()
    seen: list[int] = []

    def handler(events: int) -> None:
        seen.append(os.eventfd_read(fd))

    stop = threading.Event()
    t = threading.Thread(target=lambda: loop.run_until(stop.is_set, tick=0.05))
    t.start()
    try:
        tok = loop.add(fd, handler, name="dev")  # from another thread, while it runs
        os.eventfd_write(fd, 3)
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen == [3]
        loop.remove(tok)
        os.eventfd_write(fd, 1)
        time.sleep(0.2)
        assert seen == [3]  # removed: never runs again
        assert loop.registrations() == []
    finally:
        stop.set()
        loop.wake()
        t.join()
        os.close(fd)


def test_remove_waits_for_running_handler(loop: EventLoop) -> None:
    fd = _efd()
    entered, release = threading.Event(), threading.Event()
    finished: list[bool] = []

    def handler(events: int) -> None:
        os.eventfd_read(fd)
        entered.set()
        release.wait(5)
        finished.append(True)

    tok = loop.add(fd, handler, name="slow")
    os.eventfd_write(fd, 1)
    t = threading.Thread(target=loop.run_once, args=(5,))
    t.start()
    assert entered.wait(5)
    threading.Timer(0.2, release.set).start()
    loop.remove(tok)  # must not return while the handler runs
    assert finished == [True]
    t.join()
    os.close(fd)


def test_failing_handler_is_logged_and_removed(loop: EventLoop,
                                               caplog: pytest.LogCaptureFixture) -> None:
    bad, good = _efd(), _efd()
    got: list[int] = []

    def boom(events: int) -> None:
        raise RuntimeError("device bug")

    loop.add(bad, boom, name="virtio-broken")
    loop.add(good, lambda ev: got.append(os.eventfd_read(good)), name="virtio-ok")
    os.eventfd_write(bad, 1)
    os.eventfd_write(good, 1)
    with caplog.at_level(logging.ERROR):
        loop.run_once(1)
    assert "virtio-broken: handler failed" in caplog.text
    assert loop.registrations() == ["virtio-ok"]
    os.eventfd_write(good, 1)
    loop.run_once(1)
    assert got == [1, 1]
    os.close(bad)
    os.close(good)


def test_remove_from_inside_handler(loop: EventLoop) -> None:
    fd = _efd()
    calls: list[int] = []
    tok = None

    def handler(events: int) -> None:
        calls.append(1)
        assert tok is not None
        loop.remove(tok)  # must not deadlock

    tok = loop.add(fd, handler, name="once")
    os.eventfd_write(fd, 1)
    loop.run_once(1)
    loop.run_once(0.05)
    assert calls == [1]
    os.close(fd)


def test_timers_and_call_soon(loop: EventLoop) -> None:
    order: list[str] = []
    loop.call_later(0.05, lambda: order.append("late"))
    cancelled = loop.call_later(0.01, lambda: order.append("cancelled"))
    cancelled.cancel()
    threading.Thread(target=lambda: loop.call_soon(lambda: order.append("soon"))).start()
    deadline = time.monotonic() + 5
    while len(order) < 2 and time.monotonic() < deadline:
        loop.run_once(1)
    assert order == ["soon", "late"]


def test_duplicate_fd_refused(loop: EventLoop) -> None:
    fd = _efd()
    loop.add(fd, lambda ev: None, name="a")
    with pytest.raises(ValueError, match="already registered"):
        loop.add(fd, lambda ev: None, name="b")
    os.close(fd)
