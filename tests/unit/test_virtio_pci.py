"""The virtio-over-PCI transport, driven as a guest driver would (``tests.virtio_driver``),
with virtio-rng as the device: capabilities, feature negotiation, queue set-up,
MSI-X and INTx, notification suppression, NEEDS_RESET and hostile rings."""

from __future__ import annotations

import itertools
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pyvirt.virtio import (
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_VERSION_1,
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
)
from pyvirt.virtio.rng import MAX_REQUEST, RngDevice
from tests.virtio_driver import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    MSI_ADDR,
    NO_VECTOR,
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    VIRTIO_PCI_CAP_PCI_CFG,
    VirtioPciDriver,
    reference_chain,
    wait_for,
)

BAR_SIZE = 0x8000
QUIET = 0.05  # how long to watch for an interrupt that must not come


@pytest.fixture
def drv() -> Iterator[VirtioPciDriver]:
    d = VirtioPciDriver(RngDevice())
    yield d
    d.close()


def _no_more_msi(d: VirtioPciDriver, vector: int, count: int) -> bool:
    time.sleep(QUIET)
    return d.vm.msi_count(vector) == count


# ---- PCI identity and capabilities -------------------------------------------------


def test_pci_identity(drv: VirtioPciDriver) -> None:
    assert drv.cfg_read(0x00, 2) == 0x1AF4
    assert drv.cfg_read(0x02, 2) == 0x1040 + 4  # modern virtio-rng
    assert drv.cfg_read(0x08, 1) >= 1  # revision: modern-only devices have 1+
    assert drv.cfg_read(0x08, 4) >> 8 == 0x00FF00
    assert drv.cfg_read(0x0E, 1) == 0  # type 0 header, single function
    assert drv.cfg_read(0x2C, 2) == 0x1AF4
    assert drv.cfg_read(0x2E, 2) >= 0x40  # 4.1.2.1: a modern subsystem device id
    assert drv.cfg_read(0x3D, 1) == 1  # INTA#


def test_capabilities(drv: VirtioPciDriver) -> None:
    caps = drv.caps
    assert set(caps) == {VIRTIO_PCI_CAP_COMMON_CFG, VIRTIO_PCI_CAP_NOTIFY_CFG,
                         VIRTIO_PCI_CAP_ISR_CFG, VIRTIO_PCI_CAP_DEVICE_CFG,
                         VIRTIO_PCI_CAP_PCI_CFG}
    for t in (VIRTIO_PCI_CAP_COMMON_CFG, VIRTIO_PCI_CAP_NOTIFY_CFG, VIRTIO_PCI_CAP_ISR_CFG,
              VIRTIO_PCI_CAP_DEVICE_CFG):
        c = caps[t]
        assert c.bar == 0 and c.offset % 4 == 0 and c.length > 0
        assert c.offset + c.length <= BAR_SIZE
        assert 0x40 <= c.cap_offset < 0x100 and c.cap_offset % 4 == 0
    assert caps[VIRTIO_PCI_CAP_COMMON_CFG].length >= 0x3C  # up to queue_reset
    notify = caps[VIRTIO_PCI_CAP_NOTIFY_CFG]
    assert notify.notify_multiplier % 2 == 0
    assert notify.length >= 2  # one queue, notify_off 0
    assert drv.cfg_read(caps[VIRTIO_PCI_CAP_NOTIFY_CFG].cap_offset + 2, 1) == 20  # cap_len
    # the regions do not overlap
    spans = sorted((c.offset, c.offset + c.length) for t, c in caps.items()
                   if t != VIRTIO_PCI_CAP_PCI_CFG)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    msix = drv.msix
    assert msix is not None
    assert msix.table_size == 2  # one queue + config
    assert msix.table_bar == msix.pba_bar == 0
    assert msix.table_offset % 8 == 0 and msix.pba_offset % 8 == 0
    assert msix.table_offset + 16 * msix.table_size <= BAR_SIZE
    for start, end in ((msix.table_offset, msix.table_offset + 16 * msix.table_size),
                       (msix.pba_offset, msix.pba_offset + 8)):
        assert all(end <= s or start >= e for s, e in spans)


def test_bar0_is_64bit_prefetchable_32k(drv: VirtioPciDriver) -> None:
    lo = drv.cfg_read(0x10, 4)
    assert lo & 0xF == 0xC  # memory, 64-bit, prefetchable
    drv.cfg_write(0x04, 2, 0)  # as Linux sizes BARs: decode off
    drv.cfg_write(0x10, 4, 0xFFFF_FFFF)
    drv.cfg_write(0x14, 4, 0xFFFF_FFFF)
    size_lo, size_hi = drv.cfg_read(0x10, 4), drv.cfg_read(0x14, 4)
    assert (size_lo & ~0xF) == 0xFFFF_8000 and size_hi == 0xFFFF_FFFF


# ---- feature negotiation -------------------------------------------------------------


def test_features_offered(drv: VirtioPciDriver) -> None:
    feats = drv.device_features()
    for bit in (F_VERSION_1, F_INDIRECT_DESC, F_EVENT_IDX):
        assert feats >> bit & 1
    assert feats >> 64 == 0
    drv.common_write("device_feature_select", 2)
    assert drv.common_read("device_feature") == 0


def test_features_ok_refused_for_unknown_bits(drv: VirtioPciDriver) -> None:
    offered = drv.device_features()
    unknown = next(b for b in range(64) if not offered >> b & 1)
    assert not drv.negotiate(offered | 1 << unknown)
    assert drv.status == STATUS_ACKNOWLEDGE | STATUS_DRIVER
    drv.set_status(drv.status | STATUS_FEATURES_OK | STATUS_DRIVER_OK)
    assert not drv.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK)


def test_features_ok_refused_without_version_1(drv: VirtioPciDriver) -> None:
    assert not drv.negotiate(drv.device_features() & ~(1 << F_VERSION_1))
    assert drv.negotiate(1 << F_VERSION_1)  # the same device takes a legal subset


def test_driver_features_frozen_after_features_ok(drv: VirtioPciDriver) -> None:
    assert drv.negotiate(1 << F_VERSION_1)
    drv.common_write("driver_feature_select", 0)
    drv.common_write("driver_feature", 1 << F_INDIRECT_DESC)
    assert drv.common_read("driver_feature") == 0
    drv.common_write("driver_feature_select", 1)
    assert drv.common_read("driver_feature") == 1


def test_driver_ok_needs_features_ok(drv: VirtioPciDriver) -> None:
    drv.reset()
    drv.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK)
    assert drv.status == STATUS_ACKNOWLEDGE | STATUS_DRIVER


def test_minimal_features_work(drv: VirtioPciDriver) -> None:
    (q,) = drv.init(1 << F_VERSION_1)
    n, (buf,) = q.submit([], [32])
    assert n == 32 and buf != b"\xa5" * 32
    # without VIRTIO_F_INDIRECT_DESC an indirect chain fails
    n, (buf,) = q.submit([], [32], indirect=True)
    assert n == 0 and buf == b"\xa5" * 32


# ---- queue configuration ---------------------------------------------------------------


def test_queue_registers(drv: VirtioPciDriver) -> None:
    assert drv.negotiate()
    assert drv.common_read("num_queues") == 1
    drv.common_write("queue_select", 0)
    assert drv.common_read("queue_size") == 64
    drv.common_write("queue_size", 48)  # not a power of two: ignored
    assert drv.common_read("queue_size") == 64
    drv.common_write("queue_size", 16)
    assert drv.common_read("queue_size") == 16
    drv.common_write("queue_size", 128)  # more than the maximum: ignored
    assert drv.common_read("queue_size") == 16
    drv.common_write("queue_desc", 0x1234_5000)
    assert drv.common_read("queue_desc") == 0x1234_5000
    assert drv.common_read("queue_enable") == 0
    drv.common_write("queue_select", 1)  # no such queue
    assert drv.common_read("queue_size") == 0
    assert drv.common_read("queue_msix_vector") == NO_VECTOR
    drv.common_write("queue_size", 8)
    drv.common_write("queue_enable", 1)
    assert drv.common_read("queue_enable") == 0
    assert not drv.needs_reset


def test_live_queue_configuration_is_frozen(drv: VirtioPciDriver) -> None:
    (q,) = drv.init(queue_sizes=[16])
    drv.common_write("queue_select", 0)
    assert drv.common_read("queue_enable") == 1
    drv.common_write("queue_desc", 0x20_0000)
    drv.common_write("queue_size", 8)
    drv.common_write("queue_msix_vector", 0)
    assert drv.common_read("queue_desc") == q.desc
    assert drv.common_read("queue_size") == 16
    assert drv.common_read("queue_msix_vector") == NO_VECTOR
    assert q.submit([], [8])[0] == 8


def test_reset_clears_the_device(drv: VirtioPciDriver) -> None:
    drv.init(msix=True)
    drv.reset()
    assert drv.status == 0
    assert drv.common_read("config_msix_vector") == NO_VECTOR
    drv.common_write("queue_select", 0)
    assert drv.common_read("queue_enable") == 0
    assert drv.common_read("queue_desc") == 0
    assert drv.common_read("queue_size") == 64
    drv.common_write("driver_feature_select", 1)
    assert drv.common_read("driver_feature") == 0


def test_queue_rings_outside_ram_need_reset(drv: VirtioPciDriver) -> None:
    assert drv.negotiate()
    drv.common_write("queue_select", 0)
    drv.common_write("queue_desc", drv.mem.end - 16)  # the table runs off RAM
    drv.common_write("queue_driver", 0x10_0000)
    drv.common_write("queue_device", 0x11_0000)
    gen = drv.common_read("config_generation")
    drv.common_write("queue_enable", 1)
    assert drv.needs_reset
    assert drv.common_read("queue_enable") == 0
    assert drv.common_read("config_generation") != gen
    assert drv.read_isr() == 2  # INTx: a configuration change


# ---- requests and interrupts ---------------------------------------------------------


def test_rng_request_with_msix(drv: VirtioPciDriver) -> None:
    (q,) = drv.init(msix=True)
    n, (a, b) = q.submit([], [100, 28])
    assert n == 128
    assert a != b"\xa5" * 100 and b != b"\xa5" * 28
    wait_for(lambda: drv.vm.msi_count(1) == 1, what="the queue's MSI")
    assert drv.vm.msi_count(0) == 0
    assert all(addr == MSI_ADDR for addr, _ in drv.vm.msi)
    assert not drv.intx.level and drv.intx.raised == 0


def test_rng_notes_dma_writes(drv: VirtioPciDriver) -> None:
    (q,) = drv.init()
    head_buf = drv.alloc(64)
    q.add([], [(head_buf, 64)])
    q.kick()
    q.wait_used()
    assert drv.vm.dma_covers(head_buf, 64)


def test_rng_indirect_and_limits(drv: VirtioPciDriver) -> None:
    (q,) = drv.init()
    n, bufs = q.submit([], [16, 16, 16], indirect=True)
    assert n == 48 and all(b != b"\xa5" * 16 for b in bufs)
    n, _ = q.submit([b"readable only"])
    assert n == 0
    n, (big,) = q.submit([], [MAX_REQUEST + 4096])
    assert n == MAX_REQUEST
    assert big[MAX_REQUEST:] == b"\xa5" * 4096
    n, (after,) = q.submit([b"hdr"], [8])  # readable, then writable: fine for rng
    assert n == 8 and after != b"\xa5" * 8


def test_many_requests_in_one_kick(drv: VirtioPciDriver) -> None:
    (q,) = drv.init(msix=True, queue_sizes=[16])
    for round_ in range(5):  # 80 requests: the ring wraps several times
        heads = [q.add([], [(drv.alloc(8), 8)]) for _ in range(16)]
        q.kick()
        used = q.wait_used(16)
        assert sorted(h for h, _ in used) == sorted(heads), round_
        assert all(n == 8 for _, n in used)
    assert q.used_idx() == 80


def test_msix_masked_vector_pends_until_unmasked(drv: VirtioPciDriver) -> None:
    (q,) = drv.init(msix=True)
    drv.mask_vector(1, True)
    assert q.submit([], [8])[0] == 8
    wait_for(lambda: drv.pba_pending(1), what="the pending bit")
    assert drv.vm.msi_count(1) == 0
    assert not drv.pba_pending(0)
    drv.mask_vector(1, False)
    wait_for(lambda: drv.vm.msi_count(1) == 1, what="the pending MSI")
    assert not drv.pba_pending(1)
    assert _no_more_msi(drv, 1, 1)


def test_msix_function_mask(drv: VirtioPciDriver) -> None:
    (q,) = drv.init(msix=True)
    assert drv.msix is not None
    ctrl_off = drv.msix.cap_offset + 2
    drv.cfg_write(ctrl_off, 2, drv.cfg_read(ctrl_off, 2) | 0x4000)
    assert q.submit([], [8])[0] == 8
    wait_for(lambda: drv.pba_pending(1), what="the pending bit")
    assert drv.vm.msi_count(1) == 0
    drv.cfg_write(ctrl_off, 2, drv.cfg_read(ctrl_off, 2) & ~0x4000)
    wait_for(lambda: drv.vm.msi_count(1) == 1, what="the pending MSI")


def test_msix_table_entries(drv: VirtioPciDriver) -> None:
    assert drv.msix_entry(0)[3] & 1  # entries start masked
    assert drv.msix_entry(1)[3] & 1
    drv.enable_msix()
    assert drv.msix_entry(1) == (MSI_ADDR, 0, 0x41, 0)
    assert drv.msix_enabled
    # only vectors that exist can be assigned
    assert drv.set_config_vector(2) == NO_VECTOR
    assert drv.set_config_vector(1) == 1
    assert drv.set_config_vector(NO_VECTOR) == NO_VECTOR


def test_msix_vector_retargeted(drv: VirtioPciDriver) -> None:
    (q,) = drv.init(msix=True)
    assert q.submit([], [8])[0] == 8
    wait_for(lambda: drv.vm.msi_count(1) == 1)
    entry = drv._msix_entry(1)
    drv.mask_vector(1, True)
    drv.mmio_write(entry + 8, 4, 0x99)  # new data, as irqbalance would
    drv.mask_vector(1, False)
    assert q.submit([], [8])[0] == 8
    wait_for(lambda: (MSI_ADDR, 0x99) in drv.vm.msi, what="the new message")


def test_intx_when_msix_is_off(drv: VirtioPciDriver) -> None:
    (q,) = drv.init()
    assert q.submit([], [8])[0] == 8
    wait_for(lambda: drv.intx.level, what="INTx")
    assert drv.cfg_read(0x06, 2) & 0x8  # PCI status: interrupt pending
    assert drv.read_isr() == 1
    assert not drv.intx.level
    assert not drv.cfg_read(0x06, 2) & 0x8
    assert drv.read_isr() == 0
    assert drv.vm.msi == []


def test_intx_disable_bit(drv: VirtioPciDriver) -> None:
    (q,) = drv.init()
    drv.cfg_write(0x04, 2, drv.cfg_read(0x04, 2) | 0x400)
    assert q.submit([], [8])[0] == 8
    time.sleep(QUIET)
    assert drv.intx.raised == 0
    assert drv.read_isr() == 1  # the device still reports it


def test_msix_off_again_falls_back_to_intx(drv: VirtioPciDriver) -> None:
    (q,) = drv.init(msix=True)
    drv.disable_msix()
    assert q.submit([], [8])[0] == 8
    wait_for(lambda: drv.intx.level, what="INTx")
    assert drv.vm.msi == []


def test_no_interrupt_flag(drv: VirtioPciDriver) -> None:
    (q,) = drv.init(1 << F_VERSION_1, msix=True)
    q.set_avail_flags(1)
    assert q.submit([], [8])[0] == 8
    assert _no_more_msi(drv, 1, 0)
    q.set_avail_flags(0)
    assert q.submit([], [8])[0] == 8
    wait_for(lambda: drv.vm.msi_count(1) == 1)


def test_event_idx(drv: VirtioPciDriver) -> None:
    (q,) = drv.init(msix=True)
    assert drv.has_feature(F_EVENT_IDX)
    q.auto_used_event = False
    q.set_used_event(0)
    assert q.submit([], [8])[0] == 8  # used idx 0 -> 1: entry 0 was used
    wait_for(lambda: drv.vm.msi_count(1) == 1)
    # the device asks to be kicked for entry 1
    wait_for(lambda: q.avail_event() == 1, what="avail_event")
    q.set_used_event(5)  # no interrupt until entry 5 is used
    for _ in range(4):
        assert q.submit([], [8])[0] == 8  # 1 -> 5
    assert _no_more_msi(drv, 1, 1)
    assert q.submit([], [8])[0] == 8  # 5 -> 6
    wait_for(lambda: drv.vm.msi_count(1) == 2)
    wait_for(lambda: q.avail_event() == 6, what="avail_event")


def test_notification_before_driver_ok_is_not_lost(drv: VirtioPciDriver) -> None:
    assert drv.negotiate()
    q = drv.setup_queue(0)
    q.add([], [(drv.alloc(8), 8)])
    q.kick()  # the driver kicks before DRIVER_OK (4.1.5.1 allows it)
    drv.driver_ok()
    assert q.wait_used()[0][1] == 8


# ---- broken queues: NEEDS_RESET --------------------------------------------------------


def test_broken_avail_index_needs_reset_with_msix(drv: VirtioPciDriver) -> None:
    (q,) = drv.init(msix=True, queue_sizes=[8])
    gen = drv.common_read("config_generation")
    q.set_avail_idx(9)  # 9 entries in an 8-entry ring
    q.kick()
    wait_for(lambda: drv.needs_reset, what="NEEDS_RESET")
    wait_for(lambda: drv.vm.msi_count(0) == 1, what="the configuration MSI")
    assert drv.common_read("config_generation") != gen
    assert drv.status & STATUS_DRIVER_OK
    # the device does no more work until it is reset
    q.set_avail_idx(0)
    q.avail_idx = 0
    q.add([], [(drv.alloc(8), 8)])
    q.kick()
    time.sleep(QUIET)
    assert q.used_idx() == 0
    drv.set_status(drv.status & ~STATUS_DEVICE_NEEDS_RESET)  # only a reset clears it
    assert drv.needs_reset
    # a reset repairs it
    (q,) = drv.init(msix=True)
    assert not drv.status & STATUS_DEVICE_NEEDS_RESET
    assert q.submit([], [16])[0] == 16


def test_head_out_of_range_needs_reset_with_intx(drv: VirtioPciDriver) -> None:
    (q,) = drv.init(queue_sizes=[8])
    q.publish(8)
    q.kick()
    wait_for(lambda: drv.needs_reset, what="NEEDS_RESET")
    wait_for(lambda: drv.intx.level, what="INTx")
    assert drv.read_isr() & 2
    (q,) = drv.init()
    assert q.submit([], [16])[0] == 16


def test_break_then_reset_at_once_never_hangs(drv: VirtioPciDriver) -> None:
    """A queue broken just before a reset: the reset waits for the I/O thread while
    that thread reports the broken queue (this deadlocked once)."""
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            for i in range(300):
                (q,) = drv.init(msix=bool(i & 1), queue_sizes=[8])
                q.set_avail_idx(100)
                q.kick()
                drv.set_status(0)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=churn, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "the device deadlocked in reset"
    assert errors == []


def _registrations(d: VirtioPciDriver) -> list[str]:
    """The device's registrations on the event loop (its queues and extra fds)."""
    return [n for n in d.loop.registrations() if n.startswith(f"{d.pdev.name}-")]


def test_driver_ok_toggling_registers_once(drv: VirtioPciDriver) -> None:
    """A driver that clears DRIVER_OK and sets it again (2.1.1 forbids it) must not get
    its queues registered twice on the event loop, nor leave them there after a reset."""
    (q,) = drv.init()
    for _ in range(10):
        st = drv.status
        drv.set_status(st & ~STATUS_DRIVER_OK)
        drv.set_status(st)
    assert _registrations(drv) == [f"{drv.pdev.name}-q0"]
    assert q.submit([], [8])[0] == 8
    drv.reset()
    assert _registrations(drv) == []


def test_kick_of_a_queue_that_does_not_exist(drv: VirtioPciDriver) -> None:
    (q,) = drv.init()
    notify = drv.caps[VIRTIO_PCI_CAP_NOTIFY_CFG]
    drv.mmio_write(drv.bar_address(0) + notify.offset + 4 * 7, 2, 7)  # past the queues
    drv.mmio_write(drv.bar_address(0) + BAR_SIZE - 2, 2, 0)
    assert not drv.needs_reset
    assert q.submit([], [8])[0] == 8


# ---- other ways in ----------------------------------------------------------------------


def test_pci_cfg_window(drv: VirtioPciDriver) -> None:
    cap = drv.caps[VIRTIO_PCI_CAP_PCI_CFG].cap_offset

    def window(offset: int, length: int) -> None:
        drv.cfg_write(cap + 4, 1, 0)  # BAR 0
        drv.cfg_write(cap + 8, 4, offset)
        drv.cfg_write(cap + 12, 4, length)

    window(18, 2)  # num_queues
    assert drv.cfg_read(cap + 16, 2) == 1
    window(20, 1)  # device_status
    drv.cfg_write(cap + 16, 1, STATUS_ACKNOWLEDGE)
    assert drv.status == STATUS_ACKNOWLEDGE
    window(0, 4)
    drv.cfg_write(cap + 16, 4, 1)  # device_feature_select = 1
    window(4, 4)
    assert drv.cfg_read(cap + 16, 4) == drv.device_features() >> 32
    window(18, 3)  # not 1, 2 or 4 bytes: nothing happens
    drv.cfg_write(cap + 16, 4, 0xFFFF_FFFF)
    assert drv.status == STATUS_ACKNOWLEDGE


def test_ioeventfd_follows_the_bar() -> None:
    with VirtioPciDriver(RngDevice(), ioeventfd=True) as d:
        bar = d.bar_address(0)
        notify = bar + d.caps[VIRTIO_PCI_CAP_NOTIFY_CFG].offset
        assert set(d.vm.ioeventfds) == {notify}
        (q,) = d.init()
        assert q.submit([], [8])[0] == 8  # the kick went through the eventfd
        d.cfg_write(0x04, 2, d.cfg_read(0x04, 2) & ~0x2)  # memory decode off
        assert d.vm.ioeventfds == {}
        new = bar + 0x10_0000
        d.cfg_write(0x10, 4, (new & 0xFFFF_FFFF) | 0xC)
        d.cfg_write(0x14, 4, new >> 32)
        d.cfg_write(0x04, 2, d.cfg_read(0x04, 2) | 0x2)
        assert d.bar_address(0) == new
        assert set(d.vm.ioeventfds) == {new + d.caps[VIRTIO_PCI_CAP_NOTIFY_CFG].offset}
        q.notify_addr = new + d.caps[VIRTIO_PCI_CAP_NOTIFY_CFG].offset
        assert q.submit([], [8])[0] == 8


def test_close_closes_routes(drv: VirtioPciDriver) -> None:
    (q,) = drv.init(msix=True)
    assert q.submit([], [8])[0] == 8
    wait_for(lambda: drv.vm.msi_count(1) == 1)
    drv.pdev.close()
    assert drv.vm.routes and all(r.closed for r in drv.vm.routes)


# ---- hostile rings through the whole device (property test) --------------------------

SCRATCH_TABLES = 0x40_0000  # indirect tables written by the test
SCRATCH_DATA = 0x80_0000  # buffers the device may fill
MEM_END = 16 << 20
_OUTSIDE = [MEM_END - 8, MEM_END, 1 << 32, (1 << 64) - 8]  # for 16+ bytes
_EDGES = [MEM_END - 16, MEM_END - 1, *_OUTSIDE]


@st.composite
def _hostile_desc(draw: st.DrawFn, n_tables: int) -> tuple[int, int, int, int]:
    flags = draw(st.one_of(st.sampled_from([0, DESC_F_NEXT, DESC_F_WRITE,
                                            DESC_F_WRITE | DESC_F_NEXT, DESC_F_INDIRECT]),
                           st.integers(0, 0xFFFF)))
    if flags & DESC_F_INDIRECT:
        addr = draw(st.one_of(
            st.sampled_from([SCRATCH_TABLES + 0x1000 * k for k in range(n_tables)]),
            st.sampled_from(_OUTSIDE)))
        length = draw(st.one_of(st.sampled_from([16, 32, 48, 64, 0, 24]),
                                st.integers(0, (1 << 32) - 1)))
    else:
        addr = draw(st.one_of(st.integers(SCRATCH_DATA, SCRATCH_DATA + 0x10000),
                              st.sampled_from(_EDGES)))
        length = draw(st.one_of(st.integers(0, 0x400), st.sampled_from([MAX_REQUEST + 1]),
                                st.integers(0, (1 << 32) - 1)))
    nxt = draw(st.one_of(st.integers(0, 8), st.integers(0, 0xFFFF)))
    return addr, length, flags, nxt


@st.composite
def _hostile_rings(draw: st.DrawFn) -> dict[str, object]:
    size = 8
    n = draw(st.integers(1, size))
    heads = draw(st.lists(st.integers(0, size - 1), min_size=n, max_size=n))
    broken = draw(st.integers(0, 4))
    if broken == 1:
        heads[-1] = draw(st.integers(size, 0xFFFF))
    return {
        "table": draw(st.lists(_hostile_desc(3), min_size=size, max_size=size)),
        "indirect_tables": [draw(st.lists(_hostile_desc(3), min_size=1, max_size=4))
                            for _ in range(3)],
        "heads": heads,
        "avail_idx": n if broken != 2 else draw(st.integers(size + 1, 0xFFFF)),
        "indirect": draw(st.booleans()),
    }


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rings=_hostile_rings())
def test_hostile_rings_through_the_device(rings: dict[str, object]) -> None:
    """Whatever the rings say, each request completes as the model predicts (its
    bytes or 0) or the device enters NEEDS_RESET with a configuration interrupt; the
    VMM keeps running and a reset makes the device work again."""
    indirect = bool(rings["indirect"])
    with VirtioPciDriver(RngDevice()) as d:
        feats = 1 << F_VERSION_1 | (1 << F_INDIRECT_DESC if indirect else 0)
        (q,) = d.init(feats, msix=True, queue_sizes=[8])
        ids = q.take(8)
        for i, desc in enumerate(rings["table"]):  # type: ignore[arg-type]
            q.write_desc(i, *desc)
        for k, entries in enumerate(rings["indirect_tables"]):  # type: ignore[arg-type]
            for i, desc in enumerate(entries):
                q.write_desc(i, *desc, table=SCRATCH_TABLES + 0x1000 * k)
        heads = rings["heads"]
        assert isinstance(heads, list)
        for slot, h in enumerate(heads):
            q.set_avail_slot(slot, h)
        avail_idx = rings["avail_idx"]
        assert isinstance(avail_idx, int)
        q.set_avail_idx(avail_idx)
        q.avail_idx = avail_idx
        broken = avail_idx > 8 or any(h >= 8 for h in heads)
        expected = []
        for h in heads:
            if h >= 8:
                break
            want = reference_chain(d.mem, q.desc, 8, h, indirect=indirect)
            expected.append((h, 0 if want is None else min(sum(n for _, n in want[1]),
                                                           MAX_REQUEST)))
        q.kick()
        if broken:
            event("queue broken")
            wait_for(lambda: d.needs_reset, what="NEEDS_RESET")
            wait_for(lambda: d.vm.msi_count(0) >= 1, what="the configuration interrupt")
            (q,) = d.init(msix=True)
        else:
            event("some served" if any(n for _, n in expected) else "none served")
            assert q.wait_used(len(expected)) == expected
            assert not d.needs_reset
            q.free = ids
        n, (buf,) = q.submit([], [64])
        assert n == 64 and buf != b"\xa5" * 64


def test_hostile_descriptor_contents_do_not_leak_outside_ram(drv: VirtioPciDriver) -> None:
    """A chain whose later buffer lies outside RAM writes nothing, not even the
    buffers that were in RAM."""
    (q,) = drv.init(queue_sizes=[8])
    good = drv.put(b"\xa5" * 16)
    (a, b) = q.take(2)
    q.write_desc(a, good, 16, DESC_F_WRITE | DESC_F_NEXT, b)
    q.write_desc(b, drv.mem.end - 8, 16, DESC_F_WRITE, 0)
    q.publish(a, owned=[a, b])
    q.kick()
    assert q.wait_used() == [(a, 0)]
    assert drv.mem.read(good, 16) == b"\xa5" * 16
    assert struct.unpack("<H", drv.mem.read(q.used + 2, 2)) == (1,)
