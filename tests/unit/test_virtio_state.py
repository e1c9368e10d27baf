"""virtio devices on the shared event loop: pausing their I/O, saving and restoring
their state (transport, queues, device type), and their metrics.

Everything runs through ``tests.virtio_driver`` over real guest memory. A restore
goes into a FRESH transport over a copy of guest RAM (what a restore in a new
process builds), and the driver then carries on with its own view of the rings:
its next request must complete and the ring indices must continue."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvirt.disk import open_disk
from pyvirt.disk.raw import RawDisk
from pyvirt.state import StateError, decode, encode
from pyvirt.virtio import STATUS_DRIVER_OK
from pyvirt.virtio.blk import S_OK, T_IN, T_OUT, BlockDevice, BlockState
from pyvirt.virtio.console import ConsoleDevice, ConsoleState
from pyvirt.virtio.pci import VirtioPciDevice, VirtioPciState
from pyvirt.virtio.rng import RngDevice
from tests.unit.test_virtio_console import TYPED, Driver
from tests.virtio_driver import VirtioPciDriver, wait_for

SECTORS = 256
QUIET = 0.2  # how long to watch for something that must not happen


def header(rtype: int, sector: int) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


def _round_trip(pdev: VirtioPciDevice) -> bytes:
    """save -> encode: the bytes a snapshot holds."""
    data = encode(pdev.save_state())
    assert decode(data, VirtioPciState, part="test") == pdev.save_state()
    return data


class Disk:
    def __init__(self, tmp_path: Path) -> None:
        self.data = bytearray(random.Random(7).randbytes(SECTORS * 512))
        self.path = tmp_path / "disk.img"
        self.path.write_bytes(self.data)
        self.image = open_disk(self.path, readonly=False, direct=False)
        assert isinstance(self.image, RawDisk)
        self.drv = VirtioPciDriver(BlockDevice(self.image, name="virtio-blk-vda", workers=4))
        (self.q,) = self.drv.init(msix=True)
        self.others: list[VirtioPciDriver] = []

    @property
    def blk(self) -> BlockDevice:
        assert isinstance(self.drv.device, BlockDevice)
        return self.drv.device

    def add(self, rtype: int, sector: int, payload: bytes = b"", in_len: int = 0,
            ) -> tuple[int, int, int]:
        """Queue a request without kicking; returns (head, status address, data address)."""
        drv = self.drv
        st_addr = drv.put(b"\xff")
        if rtype == T_OUT:
            data = drv.put(payload)
            head = self.q.add([(drv.put(header(rtype, sector)), 16), (data, len(payload))],
                              [(st_addr, 1)])
        else:
            data = drv.alloc(in_len)
            head = self.q.add([(drv.put(header(rtype, sector)), 16)],
                              [(data, in_len), (st_addr, 1)])
        return head, st_addr, data

    def read(self, sector: int, count: int = 1) -> bytes:
        head, st_addr, data = self.add(T_IN, sector, in_len=512 * count)
        self.q.kick()
        ((used, n),) = self.q.wait_used(1)
        assert used == head and n == 512 * count + 1
        assert self.drv.mem.read_u8(st_addr) == S_OK
        return self.drv.mem.read(data, 512 * count)

    def write(self, sector: int, payload: bytes) -> None:
        head, st_addr, _ = self.add(T_OUT, sector, payload)
        self.q.kick()
        ((used, n),) = self.q.wait_used(1)
        assert used == head and n == 1
        assert self.drv.mem.read_u8(st_addr) == S_OK
        self.data[sector * 512:sector * 512 + len(payload)] = payload

    def restore_copy(self, state: bytes) -> VirtioPciDriver:
        """A fresh transport and device over the same (still locked) image."""
        new = self.drv.restore_copy(BlockDevice(self.image, name="virtio-blk-vda", workers=4),
                                    state)
        self.others.append(self.drv)
        self.drv = new
        return new

    def close(self) -> None:
        for d in [self.drv, *self.others]:
            d.close()
        self.image.close()


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    d = Disk(tmp_path)
    yield d
    d.close()


def _slow_requests(blk: BlockDevice) -> threading.Event:
    """Requests wait for the returned gate before they touch the image."""
    gate = threading.Event()
    real = blk._execute

    def slow(req: object) -> tuple[int, int]:
        gate.wait(10)
        return real(req)  # type: ignore[arg-type]

    blk._execute = slow  # type: ignore[method-assign]
    return gate


def _registrations(drv: VirtioPciDriver) -> list[str]:
    return [n for n in drv.loop.registrations() if n.startswith(f"{drv.pdev.name}-")]


# ---- the shared event loop ---------------------------------------------------------------


def test_queues_are_on_the_loop_from_driver_ok_to_reset(tmp_path: Path) -> None:
    out: list[bytes] = []
    with VirtioPciDriver(ConsoleDevice(out.append)) as drv:
        assert _registrations(drv) == []
        Driver(drv)
        assert _registrations(drv) == [f"virtio-console-{x}"
                                       for x in ("extra", "q0", "q1", "q2", "q3")]
        drv.reset()
        assert _registrations(drv) == []


def test_a_failing_handler_breaks_its_device_not_the_loop(disk: Disk) -> None:
    """A bug in device code on the loop thread: that device needs a reset, the loop and
    everything else on it go on, and a driver reset brings the device back."""
    with VirtioPciDriver(RngDevice()) as other:
        # the other device registers on the disk's loop, as every device of a VM does
        other.pdev.loop = disk.drv.loop
        (rq,) = other.init()
        real = disk.blk.process

        def buggy(q: object) -> None:
            raise RuntimeError("bug")

        disk.blk.process = buggy  # type: ignore[method-assign,assignment]
        disk.add(T_IN, 0, in_len=512)
        disk.q.kick()
        wait_for(lambda: disk.drv.needs_reset, what="NEEDS_RESET")
        assert rq.submit([], [16])[0] == 16  # the loop still runs the other device
        ran = threading.Event()
        disk.drv.loop.call_soon(ran.set)
        assert ran.wait(2)
        disk.blk.process = real  # type: ignore[method-assign]
        disk.drv.reset()
        (disk.q,) = disk.drv.init(msix=True)
        assert disk.read(3) == disk.data[3 * 512:4 * 512]
        other.reset()


def test_a_full_ring_does_not_block_the_loop(disk: Disk) -> None:
    """With a ring's worth of requests in flight the device stops taking chains; the
    loop thread it shares with every other device must not wait for room."""
    drv, q, blk = disk.drv, disk.q, disk.blk
    gate = _slow_requests(blk)
    st_addr, buf = drv.put(b"\xff"), drv.alloc(512)
    head = q.add([(drv.put(header(T_IN, 1)), 16)], [(buf, 512), (st_addr, 1)], publish=False)
    try:
        for _ in range(q.size):
            q.publish(head)
        q.kick()
        wait_for(lambda: blk._in_flight >= q.size, 5, "a ring's worth in flight")
        q.publish(head)  # one more: no room for it
        q.kick()
        time.sleep(0.05)
        ran = threading.Event()
        drv.loop.call_soon(ran.set)
        assert ran.wait(0.5), "the event loop is blocked"
    finally:
        gate.set()
    wait_for(lambda: q.pending_used() == q.size + 1, 10, "every request completed")


def test_only_cached_reads_run_on_the_loop(disk: Disk) -> None:
    """A lone small read is served on the loop thread only from the page cache
    (RWF_NOWAIT); one that needs the disk goes to a worker, and the loop, shared by
    every device, stays free while it waits."""
    drv, q, blk = disk.drv, disk.q, disk.blk
    assert disk.read(9) == disk.data[9 * 512:10 * 512]  # now in the page cache
    gate = _slow_requests(blk)  # the workers' path waits for the gate
    try:
        assert disk.read(9) == disk.data[9 * 512:10 * 512]  # inline: no worker needed
        os.fsync(disk.image.fd)
        os.posix_fadvise(disk.image.fd, 0, 0, os.POSIX_FADV_DONTNEED)  # off the cache
        head = disk.add(T_IN, 9, in_len=512)[0]
        q.kick()
        wait_for(lambda: blk._in_flight == 1, what="the read in flight")
        ran = threading.Event()
        drv.loop.call_soon(ran.set)
        assert ran.wait(0.5), "the event loop waits for the disk"
        assert q.pending_used() == 0
    finally:
        gate.set()
    assert q.wait_used(1)[0][0] == head


# ---- pause_io / resume_io ----------------------------------------------------------------


def test_pause_io_drains_and_then_touches_nothing(disk: Disk) -> None:
    """pause_io waits for the requests in flight; after it returns the device completes
    nothing, writes no guest memory and sends no interrupt, whatever the driver posts and
    kicks; resume_io serves what was kicked meanwhile."""
    drv, q, blk = disk.drv, disk.q, disk.blk
    gate = _slow_requests(blk)
    for k in range(8):
        disk.add(T_IN, k, in_len=512)
    q.kick()
    wait_for(lambda: blk._in_flight == 8, 5, "8 requests in flight")
    paused = threading.Event()
    t = threading.Thread(target=lambda: (drv.pdev.pause_io(), paused.set()))
    t.start()
    assert not paused.wait(QUIET), "pause_io returned with requests in flight"
    gate.set()
    assert paused.wait(5)
    t.join()
    assert q.pending_used() == 8  # drained: every one of them completed before
    q.wait_used(8)
    msi = drv.vm.msi_count(q.vector)
    heads = [disk.add(T_IN, 20 + k, in_len=512)[0] for k in range(4)]
    ram = drv.mem.read(0, drv.mem.size)
    q.kick()
    q.kick()
    time.sleep(QUIET)
    assert q.pending_used() == 0
    assert drv.vm.msi_count(q.vector) == msi
    assert drv.mem.read(0, drv.mem.size) == ram, "guest memory written while paused"
    assert _registrations(drv) == []
    drv.pdev.resume_io()
    assert sorted(h for h, _ in q.wait_used(4)) == sorted(heads)
    assert drv.vm.msi_count(q.vector) > msi
    assert disk.read(5) == disk.data[5 * 512:6 * 512]


def test_pause_io_of_a_console_holds_input(tmp_path: Path) -> None:
    with VirtioPciDriver(ConsoleDevice(lambda data: None)) as drv:
        d = Driver(drv)
        d.open_port()
        drv.pdev.pause_io()
        assert drv.device.enqueue_input(TYPED) == len(TYPED)  # type: ignore[attr-defined]
        assert d.input_held()
        time.sleep(QUIET)
        assert d.rx.pending_used() == 0
        drv.pdev.resume_io()
        assert d.received() == TYPED


# ---- save -> encode -> decode -> restore into a fresh transport ----------------------------


def test_blk_restored_into_a_fresh_transport_continues(disk: Disk) -> None:
    for k in range(40):  # past a few ring wraps of used_event, MSI-X on
        disk.write(k % 16, random.Random(k).randbytes(512))
    assert disk.read(2) == disk.data[2 * 512:3 * 512]
    old = disk.drv
    old.pdev.pause_io()
    state = _round_trip(old.pdev)
    rec = decode(state, VirtioPciState, part="test")
    assert rec.queues[0].last_avail == rec.queues[0].used_idx == 41
    assert decode(rec.device, BlockState, part="test").disk_size == SECTORS * 512
    old_msi = old.vm.msi_count(disk.q.vector)
    assert old_msi == 41
    new = disk.restore_copy(state)
    assert new.pdev.status == old.pdev.status
    assert new.pdev.save_state() == old.pdev.save_state()
    assert new.msix_enabled
    msi = new.vm.msi_count(disk.q.vector)
    # the driver goes on: indices continue from 41, the data is there, MSI-X interrupts
    assert disk.read(2) == disk.data[2 * 512:3 * 512]
    assert disk.q.used_idx() == 42
    assert new.vm.msi_count(disk.q.vector) == msi + 1
    disk.write(100, b"\x5a" * 512)
    assert disk.path.read_bytes() == bytes(disk.data)
    assert old.vm.msi_count(disk.q.vector) == old_msi  # the old transport stayed quiet


def test_restore_with_ioeventfds_registers_them_again(tmp_path: Path) -> None:
    with VirtioPciDriver(RngDevice(), ioeventfd=True) as drv:
        (q,) = drv.init()
        assert q.submit([], [32])[0] == 32
        assert len(drv.vm.ioeventfds) == 1
        drv.pdev.pause_io()
        with drv.restore_copy(RngDevice(), _round_trip(drv.pdev)) as new:
            assert list(new.vm.ioeventfds) == list(drv.vm.ioeventfds)
            assert new.vm.ioeventfds[q.notify_addr] == new.pdev.notify_fds[0]
            assert q.submit([], [32])[0] == 32  # the kick goes through the ioeventfd
            assert q.used_idx() == 2
            assert new.pdev.metrics()["bytes"] == 32


def test_restore_while_paused_starts_at_resume(disk: Disk) -> None:
    """The lead's order: pause_io, restore_state, resume_io. Nothing runs in between."""
    disk.write(1, b"\x11" * 512)
    disk.drv.pdev.pause_io()
    state = decode(_round_trip(disk.drv.pdev), VirtioPciState, part="test")
    disk.drv.pdev.restore_state(state)  # into itself, still paused
    head = disk.add(T_IN, 1, in_len=512)[0]
    disk.q.kick()
    time.sleep(QUIET)
    assert disk.q.pending_used() == 0 and _registrations(disk.drv) == []
    disk.drv.pdev.resume_io()
    assert disk.q.wait_used(1)[0][0] == head
    assert disk.read(1) == b"\x11" * 512


def test_restoring_the_initial_state_stops_a_used_device(disk: Disk, tmp_path: Path) -> None:
    """A guest reboot resets the machine in place by restoring the state captured right
    after it was built: the device must stop (queues off the loop, rings forgotten, MSI-X
    off, INTx low) and a new driver must be able to start it from scratch."""
    drv = disk.drv
    # the record of the same device as built (from a twin: this one has run already)
    twin = VirtioPciDriver(BlockDevice(disk.image, name="virtio-blk-vda"))
    initial_blk = decode(_round_trip(twin.pdev), VirtioPciState, part="t")
    twin.close()
    disk.write(3, b"\x33" * 512)
    assert drv.pdev.status & STATUS_DRIVER_OK and _registrations(drv)
    for paused in (True, False):  # the lead pauses first; a running device stops too
        if paused:
            drv.pdev.pause_io()
        drv.pdev.restore_state(initial_blk)
        if paused:
            drv.pdev.resume_io()
        assert drv.pdev.status == 0 and _registrations(drv) == []
        assert not any(q.ready for q in drv.pdev.queues)
        assert not drv.msix_enabled and not drv.pdev.msix.enabled
        assert drv.intx.level is False
        used = disk.q.used_idx()
        disk.add(T_IN, 3, in_len=512)
        disk.q.kick()
        time.sleep(QUIET)
        assert disk.q.used_idx() == used  # the old rings are not the device's any more
        (disk.q,) = drv.init(msix=True)  # the next boot's driver
        assert disk.read(3) == b"\x33" * 512


def test_rng_restored_continues(tmp_path: Path) -> None:
    with VirtioPciDriver(RngDevice()) as drv:
        (q,) = drv.init(msix=True)
        for _ in range(5):
            assert q.submit([], [64])[0] == 64
        drv.pdev.pause_io()
        with drv.restore_copy(RngDevice(), _round_trip(drv.pdev)) as new:
            assert q.submit([], [64], indirect=True)[0] == 64
            assert q.used_idx() == 6
            assert new.vm.msi_count(q.vector) == 1


def test_console_restored_mid_session(tmp_path: Path) -> None:
    """The MULTIPORT handshake's outcome (port open) and input typed while the VM was
    paused survive; the new transport sends that input without a new handshake."""
    out: list[bytes] = []
    with VirtioPciDriver(ConsoleDevice(out.append)) as drv:
        d = Driver(drv)
        d.open_port()
        d.tx.submit([b"before"])
        drv.pdev.pause_io()
        assert drv.device.enqueue_input(TYPED) == len(TYPED)  # type: ignore[attr-defined]
        state = _round_trip(drv.pdev)
        dev_state = decode(decode(state, VirtioPciState, part="t").device, ConsoleState,
                           part="t")
        assert dev_state.port_open and dev_state.pending_input == TYPED
        out2: list[bytes] = []
        with drv.restore_copy(ConsoleDevice(out2.append), state) as new:
            d.drv = new
            assert d.received() == TYPED
            d.tx.submit([b"after"])
            assert out2 == [b"after"] and out == [b"before"]
            assert new.pdev.metrics()["rx_bytes"] == len(TYPED)


def test_console_pending_control_replies_are_kept(tmp_path: Path) -> None:
    """Replies waiting for control buffers (the driver has posted none yet) are state."""
    with VirtioPciDriver(ConsoleDevice(lambda data: None)) as drv:
        _, _, crx, ctx = drv.init()
        ctx.submit([struct.pack("<IHH", 0xFFFF_FFFF, 0, 1)])  # DEVICE_READY, no buffers
        drv.pdev.pause_io()
        with drv.restore_copy(ConsoleDevice(lambda data: None), _round_trip(drv.pdev)) as new:
            assert new.pdev.save_state().device == drv.pdev.save_state().device
            buf = new.alloc(64)
            crx.add([], [(buf, 64)])
            crx.kick()
            ((_, n),) = crx.wait_used(1)
            assert n == 8 and struct.unpack("<IHH", new.mem.read(buf, 8)) == (0, 1, 1)


# ---- bad records ---------------------------------------------------------------------------


def _bad(drv: VirtioPciDriver, state: VirtioPciState, match: str) -> None:
    with pytest.raises(StateError, match=match):
        drv.pdev.restore_state(state)


def test_bad_records_are_refused_and_change_nothing(disk: Disk) -> None:
    drv = disk.drv
    disk.write(0, b"\x01" * 512)
    drv.pdev.pause_io()
    good = decode(_round_trip(drv.pdev), VirtioPciState, part="t")
    q0 = good.queues[0]
    r = dataclasses.replace
    _bad(drv, r(good, version=99), "version 99")
    _bad(drv, r(good, status=0x1FF), "status")
    _bad(drv, r(good, status=STATUS_DRIVER_OK), "DRIVER_OK without")
    _bad(drv, r(good, driver_features=1 << 63), "driver_features")
    _bad(drv, r(good, config_msix=500), "config_msix")
    _bad(drv, r(good, isr=9), "isr")
    _bad(drv, r(good, queues=good.queues * 2), "2 queues")
    _bad(drv, r(good, queues=(r(q0, size=100),)), r"queues\[0\].size")
    _bad(drv, r(good, queues=(r(q0, size=1024),)), r"queues\[0\].size")
    _bad(drv, r(good, queues=(r(q0, last_avail=1 << 16),)), r"queues\[0\].last_avail")
    _bad(drv, r(good, queues=(r(q0, msix_vector=77),)), r"queues\[0\].msix_vector")
    _bad(drv, r(good, queues=(r(q0, desc_addr=1 << 40),)), "not in guest RAM")
    _bad(drv, r(good, queues=(r(q0, used_addr=q0.used_addr + 1),)), "aligned")
    _bad(drv, r(good, device=b"\x93garbage"), "unreadable")
    _bad(drv, r(good, device=encode(BlockState(1, SECTORS * 512 + 512, 1))),
         "virtio-blk-vda: size changed")
    _bad(drv, r(good, device=encode(BlockState(1, SECTORS * 512, 7))), "writeback")
    other_vendor = b"\x00\x10" + good.pci.config[2:]
    _bad(drv, r(good, pci=r(good.pci, config=other_vendor)), r"virtio-blk-vda: .*config\[0x0\]")
    _bad(drv, r(good, msix=r(good.msix, num_vectors=9)), "virtio-blk-vda: .*num_vectors")
    with pytest.raises(StateError, match="unreadable"):
        decode(encode(good)[:-3], VirtioPciState, part="virtio-blk-vda")
    # nothing changed: the device goes on where it was
    assert drv.pdev.save_state() == good
    drv.pdev.resume_io()
    assert disk.read(0) == b"\x01" * 512


_INTS = st.one_of(st.integers(-2, 70_000), st.integers(-(1 << 70), 1 << 70),
                 st.sampled_from([0, 1, 0xFFFF, 1 << 16, 1 << 32, (1 << 64) - 1, 1 << 64]))


@pytest.fixture(scope="module")
def rng_saved() -> Iterator[tuple[VirtioPciDriver, VirtioPciState]]:
    """An rng device that served a request, and its record."""
    with VirtioPciDriver(RngDevice()) as drv:
        (q,) = drv.init(msix=True)
        q.submit([], [16])
        drv.pdev.pause_io()
        state = decode(_round_trip(drv.pdev), VirtioPciState, part="t")
        drv.pdev.resume_io()
        yield drv, state


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_field_of_a_record_is_checked(
        rng_saved: tuple[VirtioPciDriver, VirtioPciState], data: st.DataObject) -> None:
    """Whatever value a hostile state file puts in an integer field of the transport's
    or a queue's record: the restore either takes it or raises StateError, and the
    device can then be reset and used by a driver."""
    drv, good = rng_saved
    ints = [f.name for f in dataclasses.fields(VirtioPciState)
            if f.type == "int" and f.name != "version"]
    qints = [f.name for f in dataclasses.fields(good.queues[0])
             if f.type == "int" and f.name != "version"]
    state = good
    for _ in range(data.draw(st.integers(1, 3))):
        if data.draw(st.booleans()):
            state = dataclasses.replace(state, **{data.draw(st.sampled_from(ints)):
                                                  data.draw(_INTS)})
        else:
            q = dataclasses.replace(state.queues[0], **{data.draw(st.sampled_from(qints)):
                                                        data.draw(_INTS)})
            state = dataclasses.replace(state, queues=(q,))
    drv.pdev.pause_io()
    with contextlib.suppress(StateError):
        drv.pdev.restore_state(state)
    drv.pdev.resume_io()
    (q,) = drv.init(msix=True)
    assert q.submit([], [16])[0] == 16


def test_disk_that_changed_size_is_refused(disk: Disk) -> None:
    disk.drv.pdev.pause_io()
    state = _round_trip(disk.drv.pdev)
    image = disk.image
    image.size -= 512  # as if the file had been truncated between snapshot and restore
    try:
        with pytest.raises(StateError, match=r"virtio-blk-vda: size changed: .*disk.img has "
                                             rf"{SECTORS * 512 - 512} bytes, the saved state "
                                             rf"{SECTORS * 512}"):
            disk.restore_copy(state)
    finally:
        image.size += 512


def test_console_bad_records(tmp_path: Path) -> None:
    with VirtioPciDriver(ConsoleDevice(lambda data: None)) as drv:
        Driver(drv)
        drv.pdev.pause_io()
        good = decode(_round_trip(drv.pdev), VirtioPciState, part="t")
        dev = decode(good.device, ConsoleState, part="t")
        r = dataclasses.replace
        for bad, match in ((r(dev, replies=(b"12345678",) * 33), "replies"),
                           (r(dev, replies=(b"123",)), r"replies\[0\]"),
                           (r(dev, pending_input=bytes(70_000)), "pending_input")):
            _bad(drv, r(good, device=encode(bad)), match)


def test_save_refuses_requests_still_in_flight(disk: Disk) -> None:
    """pause_io drains; if the host stalls past its wait, the state is not saved."""
    gate = _slow_requests(disk.blk)
    try:
        disk.add(T_OUT, 0, b"\x07" * 512)  # a write: always on a worker
        disk.q.kick()
        wait_for(lambda: disk.blk._in_flight == 1, what="a request in flight")
        with pytest.raises(StateError, match="1 requests still in flight"):
            disk.drv.pdev.save_state()
    finally:
        gate.set()


# ---- metrics ---------------------------------------------------------------------------------


def test_metrics(disk: Disk) -> None:
    m0 = disk.drv.pdev.metrics()
    assert set(m0) >= {"notifications", "interrupts", "requests", "errors", "bytes_read",
                       "bytes_written"}
    disk.write(4, b"\x44" * 1024)
    disk.read(4, 2)
    bad = disk.drv.put(header(T_IN, 0))  # no status byte: fails
    disk.q.add([(bad, 16)])
    disk.q.kick()
    disk.q.wait_used(1)
    m = disk.drv.pdev.metrics()
    assert m["requests"] - m0["requests"] == 3
    assert m["notifications"] - m0["notifications"] == 3
    assert m["interrupts"] - m0["interrupts"] == disk.drv.vm.msi_count(disk.q.vector) - 0
    assert m["bytes_written"] - m0["bytes_written"] == 1024
    assert m["bytes_read"] - m0["bytes_read"] == 1024
    assert m["errors"] - m0["errors"] == 1
    assert all(isinstance(v, int) for v in m.values())


def test_rng_and_console_metrics(tmp_path: Path) -> None:
    with VirtioPciDriver(RngDevice()) as drv:
        (q,) = drv.init()
        q.submit([], [100])
        q.submit([], [28])
        m = drv.pdev.metrics()
        assert m["bytes"] == 128 and m["requests"] == 2 and m["notifications"] == 2
        assert m["interrupts"] == 2 and m["errors"] == 0
    with VirtioPciDriver(ConsoleDevice(lambda data: None)) as drv:
        d = Driver(drv)
        d.open_port()
        d.tx.submit([b"hello"])
        drv.device.enqueue_input(TYPED)  # type: ignore[attr-defined]
        d.received()
        m = drv.pdev.metrics()
        assert m["tx_bytes"] == 5 and m["rx_bytes"] == len(TYPED)

