"""The split virtqueue (``SplitQueue``) over guest RAM: chains, suppression, wraparound,
and hostile descriptor tables (property tests against an independent model)."""

from __future__ import annotations

import contextlib
import signal
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pyvirt.memory import GuestMemory, GuestRegion
from pyvirt.virtio.queue import MAX_INDIRECT, Chain, QueueBroken, SplitQueue
from tests.virtio_driver import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, reference_chain

R, W, N, IND = 0, DESC_F_WRITE, DESC_F_NEXT, DESC_F_INDIRECT

# Two RAM regions with a hole between them: [0, 64K) and [128K, 256K).
LOW_END = 0x10000
HIGH_START, HIGH_END = 0x20000, 0x40000
DESC, AVAIL, USED = 0x1000, 0x3000, 0x5000
TABLES = (0x8000, 0x9000, 0xA000)  # where indirect tables go
DATA = 0xC000


@pytest.fixture(scope="module")
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory([GuestRegion.anonymous(0, LOW_END),
                     GuestRegion.anonymous(HIGH_START, HIGH_END - HIGH_START)])
    yield m
    m.close()


def _clear(mem: GuestMemory) -> None:
    mem.write(0, bytes(LOW_END))
    mem.write(HIGH_START, bytes(HIGH_END - HIGH_START))


def make_queue(mem: GuestMemory, size: int = 8, *, indirect: bool = True,
               event_idx: bool = False) -> SplitQueue:
    _clear(mem)
    q = SplitQueue(0, 256)
    q.size = size
    q.desc_addr, q.avail_addr, q.used_addr = DESC, AVAIL, USED
    q.activate(mem, indirect=indirect, event_idx=event_idx)
    return q


def desc(mem: GuestMemory, i: int, addr: int, length: int, flags: int, nxt: int = 0,
         table: int = DESC) -> None:
    mem.write(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))


class Avail:
    """The driver's available ring."""

    def __init__(self, mem: GuestMemory, q: SplitQueue, start: int = 0) -> None:
        self.mem, self.q, self.idx = mem, q, start
        mem.write_u16(AVAIL + 2, start)

    def publish(self, *heads: int) -> None:
        for h in heads:
            self.mem.write_u16(AVAIL + 4 + 2 * (self.idx % self.q.size), h)
            self.idx = (self.idx + 1) & 0xFFFF
        self.mem.write_u16(AVAIL + 2, self.idx)


def used_ring(mem: GuestMemory, q: SplitQueue) -> tuple[int, list[tuple[int, int]]]:
    idx = mem.read_u16(USED + 2)
    return idx, [struct.unpack("<II", mem.read(USED + 4 + 8 * s, 8)) for s in range(q.size)]


# ---- well-formed chains ------------------------------------------------------------


def test_direct_chain_readable_then_writable(mem: GuestMemory) -> None:
    q = make_queue(mem)
    desc(mem, 3, DATA, 16, R | N, 5)
    desc(mem, 5, DATA + 0x100, 100, R | N, 0)
    desc(mem, 0, DATA + 0x200, 1, W)
    av = Avail(mem, q)
    assert q.pop() is None and not q.has_available()
    av.publish(3)
    assert q.has_available()
    chain = q.pop()
    assert chain == Chain(3, [(DATA, 16), (DATA + 0x100, 100)], [(DATA + 0x200, 1)])
    assert chain.readable_len == 116 and chain.writable_len == 1
    assert q.pop() is None


def test_indirect_chain(mem: GuestMemory) -> None:
    q = make_queue(mem)
    t = TABLES[0]
    desc(mem, 0, DATA, 16, R | N, 1, table=t)
    desc(mem, 1, HIGH_START, 4096, W | N, 2, table=t)
    desc(mem, 2, DATA + 16, 1, W, table=t)
    desc(mem, 7, t, 48, IND | W)  # the WRITE flag of an indirect descriptor is ignored
    Avail(mem, q).publish(7)
    assert q.pop() == Chain(7, [(DATA, 16)], [(HIGH_START, 4096), (DATA + 16, 1)])


def test_direct_descriptors_then_an_indirect_table(mem: GuestMemory) -> None:
    q = make_queue(mem)
    t = TABLES[1]
    desc(mem, 2, DATA, 16, R | N, 4)
    desc(mem, 4, t, 32, IND)
    desc(mem, 0, DATA + 16, 8, R | N, 1, table=t)
    desc(mem, 1, DATA + 32, 8, W, table=t)
    Avail(mem, q).publish(2)
    assert q.pop() == Chain(2, [(DATA, 16), (DATA + 16, 8)], [(DATA + 32, 8)])


def test_zero_length_buffers_are_dropped(mem: GuestMemory) -> None:
    q = make_queue(mem)
    desc(mem, 0, 0xFFFF_FFFF_0000, 0, R | N, 1)  # no bytes: the address does not matter
    desc(mem, 1, DATA, 4, R | N, 2)
    desc(mem, 2, DATA + 8, 0, W | N, 3)
    desc(mem, 3, DATA + 16, 4, W)
    Avail(mem, q).publish(0)
    assert q.pop() == Chain(0, [(DATA, 4)], [(DATA + 16, 4)])


def test_longest_legal_chain(mem: GuestMemory) -> None:
    q = make_queue(mem, size=16)
    for i in range(16):
        desc(mem, i, DATA + 16 * i, 16, W | (N if i < 15 else 0), i + 1)
    Avail(mem, q).publish(0)
    chain = q.pop()
    assert chain is not None and chain.error is None and len(chain.writable) == 16


def test_biggest_indirect_table(mem: GuestMemory) -> None:
    q = make_queue(mem)
    t = HIGH_START
    mem.write(t, b"".join(struct.pack("<QIHH", DATA, 1, N, i + 1) for i in range(MAX_INDIRECT)))
    desc(mem, MAX_INDIRECT - 1, DATA, 1, 0, table=t)  # the last one ends the chain
    desc(mem, 0, t, 16 * MAX_INDIRECT, IND)
    Avail(mem, q).publish(0)
    chain = q.pop()
    assert chain is not None and chain.error is None and len(chain.readable) == MAX_INDIRECT


# ---- chains that fail only their request --------------------------------------------


def _loop(mem: GuestMemory) -> None:
    desc(mem, 0, DATA, 4, R | N, 1)
    desc(mem, 1, DATA, 4, R | N, 0)


def _self_loop(mem: GuestMemory) -> None:
    desc(mem, 0, DATA, 4, W | N, 0)


def _next_out_of_range(mem: GuestMemory) -> None:
    desc(mem, 0, DATA, 4, R | N, 8)


def _outside_ram(mem: GuestMemory) -> None:
    desc(mem, 0, HIGH_END - 8, 16, R)


def _across_the_hole(mem: GuestMemory) -> None:
    desc(mem, 0, LOW_END - 8, 16, W)


def _huge_length(mem: GuestMemory) -> None:
    desc(mem, 0, DATA, 0xFFFF_FFFF, W)


def _address_wraps(mem: GuestMemory) -> None:
    desc(mem, 0, (1 << 64) - 8, 16, R)


def _readable_after_writable(mem: GuestMemory) -> None:
    desc(mem, 0, DATA, 16, W | N, 1)
    desc(mem, 1, DATA + 16, 16, R)


def _readable_after_writable_across_indirect(mem: GuestMemory) -> None:
    desc(mem, 0, DATA, 16, W | N, 1)
    desc(mem, 1, TABLES[0], 16, IND)
    desc(mem, 0, DATA + 16, 16, R, table=TABLES[0])


def _nested_indirect(mem: GuestMemory) -> None:
    desc(mem, 0, TABLES[0], 16, IND)
    desc(mem, 0, TABLES[1], 16, IND, table=TABLES[0])
    desc(mem, 0, DATA, 16, R, table=TABLES[1])


def _indirect_with_next(mem: GuestMemory) -> None:
    desc(mem, 0, TABLES[0], 16, IND | N, 1)
    desc(mem, 0, DATA, 16, R, table=TABLES[0])
    desc(mem, 1, DATA, 16, R)


def _indirect_empty(mem: GuestMemory) -> None:
    desc(mem, 0, TABLES[0], 0, IND)


def _indirect_misaligned_length(mem: GuestMemory) -> None:
    desc(mem, 0, TABLES[0], 17, IND)
    desc(mem, 0, DATA, 16, R, table=TABLES[0])


def _indirect_too_big(mem: GuestMemory) -> None:
    desc(mem, 0, HIGH_START, 16 * (MAX_INDIRECT + 1), IND)  # in RAM, but too many entries


def _indirect_outside_ram(mem: GuestMemory) -> None:
    desc(mem, 0, HIGH_END - 16, 32, IND)


def _indirect_loop(mem: GuestMemory) -> None:
    desc(mem, 0, TABLES[0], 32, IND)
    desc(mem, 0, DATA, 16, R | N, 1, table=TABLES[0])
    desc(mem, 1, DATA, 16, R | N, 0, table=TABLES[0])


def _indirect_next_out_of_range(mem: GuestMemory) -> None:
    desc(mem, 0, TABLES[0], 32, IND)
    desc(mem, 0, DATA, 16, R | N, 2, table=TABLES[0])  # only 2 entries in the table


BAD_CHAINS = [_loop, _self_loop, _next_out_of_range, _outside_ram, _across_the_hole,
              _huge_length, _address_wraps, _readable_after_writable,
              _readable_after_writable_across_indirect, _nested_indirect,
              _indirect_with_next, _indirect_empty, _indirect_misaligned_length,
              _indirect_too_big, _indirect_outside_ram, _indirect_loop,
              _indirect_next_out_of_range]


@pytest.mark.parametrize("build", BAD_CHAINS, ids=lambda f: f.__name__.strip("_"))
def test_bad_chain_fails_only_its_request(mem: GuestMemory, build: object) -> None:
    q = make_queue(mem)
    assert callable(build)
    build(mem)
    desc(mem, 6, DATA + 0x800, 4, R | N, 7)
    desc(mem, 7, DATA + 0x900, 4, W)
    Avail(mem, q).publish(0, 6)
    bad = q.pop()
    assert bad is not None and bad.head == 0 and bad.error
    assert bad.readable == [] and bad.writable == []
    assert reference_chain(mem, DESC, 8, 0, indirect=True) is None  # the model agrees
    good = q.pop()
    assert good == Chain(6, [(DATA + 0x800, 4)], [(DATA + 0x900, 4)])
    assert q.pop() is None


def test_indirect_without_the_feature(mem: GuestMemory) -> None:
    q = make_queue(mem, indirect=False)
    desc(mem, 0, TABLES[0], 16, IND)
    desc(mem, 0, DATA, 16, R, table=TABLES[0])
    Avail(mem, q).publish(0)
    chain = q.pop()
    assert chain is not None and chain.error and "INDIRECT" in chain.error


def test_indirect_length_checked_before_use(mem: GuestMemory) -> None:
    q = make_queue(mem)
    _indirect_too_big(mem)
    Avail(mem, q).publish(0)
    chain = q.pop()
    assert chain is not None and chain.error is not None and "length" in chain.error


# ---- a broken queue ------------------------------------------------------------------


def test_avail_index_too_far_ahead(mem: GuestMemory) -> None:
    q = make_queue(mem, size=8)
    desc(mem, 0, DATA, 4, R)
    mem.write_u16(AVAIL + 2, 9)
    with pytest.raises(QueueBroken, match="available index"):
        q.pop()
    assert q.last_avail == 0
    mem.write_u16(AVAIL + 2, 8)  # exactly a full ring is fine
    chain = q.pop()
    assert chain is not None and chain.head == 0 and q.last_avail == 1


def test_head_out_of_range(mem: GuestMemory) -> None:
    q = make_queue(mem, size=8)
    Avail(mem, q).publish(8)
    with pytest.raises(QueueBroken, match="head index"):
        q.pop()
    assert q.last_avail == 0


def test_pop_before_enable(mem: GuestMemory) -> None:
    q = SplitQueue(0, 8)
    with pytest.raises(QueueBroken):
        q.pop()
    assert not q.has_available()


@pytest.mark.parametrize(("size", "desc_addr", "avail_addr", "used_addr"), [
    (6, DESC, AVAIL, USED),  # not a power of two
    (16, DESC, AVAIL, USED),  # larger than the maximum
    (0, DESC, AVAIL, USED),
    (8, DESC + 8, AVAIL, USED),  # descriptor table not 16-byte aligned
    (8, DESC, AVAIL + 1, USED),  # available ring not 2-byte aligned
    (8, DESC, AVAIL, USED + 2),  # used ring not 4-byte aligned
    (8, LOW_END - 64, AVAIL, USED),  # descriptor table runs into the hole
    (8, DESC, HIGH_END - 16, USED),  # available ring runs off the end of RAM
    (8, DESC, AVAIL, 1 << 40),  # used ring nowhere near RAM
])
def test_activate_checks_the_rings(mem: GuestMemory, size: int, desc_addr: int,
                                   avail_addr: int, used_addr: int) -> None:
    q = SplitQueue(0, 8)
    q.size, q.desc_addr, q.avail_addr, q.used_addr = size, desc_addr, avail_addr, used_addr
    with pytest.raises(QueueBroken):
        q.activate(mem, indirect=True, event_idx=False)
    assert not q.ready


@pytest.mark.parametrize("max_size", [0, 3, 65536, 1 << 16 | 1])
def test_queue_size_limits(max_size: int) -> None:
    with pytest.raises(ValueError):
        SplitQueue(0, max_size)


def test_reset_forgets_everything(mem: GuestMemory) -> None:
    q = make_queue(mem)
    q.msix_vector = 3
    q.reset()
    assert not q.ready and q.mem is None and q.size == q.max_size == 256
    assert (q.desc_addr, q.avail_addr, q.used_addr, q.msix_vector) == (0, 0, 0, 0xFFFF)


# ---- the used side, wraparound -------------------------------------------------------


def test_push_writes_element_then_index(mem: GuestMemory) -> None:
    q = make_queue(mem, size=4)
    for i, (head, n) in enumerate([(2, 10), (0, 0), (3, 0xFFFF_FFFF), (1, 7), (2, 1)]):
        q.push(head, n)
        idx, ring = used_ring(mem, q)
        assert idx == i + 1
        assert ring[i % 4] == (head, n)


def test_indices_wrap_at_16_bits(mem: GuestMemory) -> None:
    q = make_queue(mem, size=4)
    start = 0xFFFD
    # the state after 65533 requests: both sides just below the wrap
    q.last_avail = q.used_idx = start
    mem.write_u16(USED + 2, start)
    for i in range(4):
        desc(mem, i, DATA + 16 * i, 16, W)
    av = Avail(mem, q, start)
    av.publish(0, 1, 2, 3)
    assert mem.read_u16(AVAIL + 2) == 1
    heads = []
    while (chain := q.pop()) is not None:
        heads.append(chain.head)
        q.push(chain.head, 16)
    assert heads == [0, 1, 2, 3]
    assert q.last_avail == 1 and q.used_idx == 1
    idx, ring = used_ring(mem, q)
    assert idx == 1
    # slot = index % 4: 0xFFFD -> 1, 0xFFFE -> 2, 0xFFFF -> 3, 0x0000 -> 0
    assert [ring[s][0] for s in (1, 2, 3, 0)] == [0, 1, 2, 3]
    # and "too far ahead" is measured modulo 2^16 as well
    mem.write_u16(AVAIL + 2, (1 + 5) & 0xFFFF)
    with pytest.raises(QueueBroken):
        q.pop()


def test_full_ring_across_the_wrap(mem: GuestMemory) -> None:
    q = make_queue(mem, size=2)
    q.last_avail = q.used_idx = 0xFFFF
    desc(mem, 0, DATA, 1, W)
    desc(mem, 1, DATA, 1, W)
    av = Avail(mem, q, 0xFFFF)
    av.publish(1, 0)
    assert mem.read_u16(AVAIL + 2) == 1
    first, second = q.pop(), q.pop()
    assert (first and first.head, second and second.head) == (1, 0)
    assert q.pop() is None


# ---- interrupt suppression -----------------------------------------------------------


def test_no_interrupt_flag_without_event_idx(mem: GuestMemory) -> None:
    q = make_queue(mem, event_idx=False)
    q.push(0, 0)
    assert q.needs_interrupt()
    mem.write_u16(AVAIL, 1)  # VIRTQ_AVAIL_F_NO_INTERRUPT
    q.push(0, 0)
    assert not q.needs_interrupt()
    mem.write_u16(AVAIL, 0)
    q.push(0, 0)
    assert q.needs_interrupt()


def test_used_event(mem: GuestMemory) -> None:
    q = make_queue(mem, size=8, event_idx=True)
    mem.write_u16(AVAIL, 1)  # NO_INTERRUPT means nothing under EVENT_IDX
    used_event = AVAIL + 4 + 2 * 8
    mem.write_u16(used_event, 100)
    q.push(0, 0)
    assert q.needs_interrupt()  # the first time there is nothing to compare with
    mem.write_u16(used_event, 2)  # "interrupt me when entry 2 is used" (used idx > 2)
    q.push(0, 0)  # used idx 1 -> 2
    assert not q.needs_interrupt()
    q.push(0, 0)  # 2 -> 3: entry 2 was used
    assert q.needs_interrupt()
    mem.write_u16(used_event, 4)
    for _ in range(3):
        q.push(0, 0)  # 3 -> 6 in one batch: crosses 4
    assert q.needs_interrupt()
    mem.write_u16(used_event, 10)
    for _ in range(3):
        q.push(0, 0)  # 6 -> 9: not yet
    assert not q.needs_interrupt()
    mem.write_u16(used_event, 8)  # entry 8 was used in the last batch: nothing new
    q.push(0, 0)  # 9 -> 10
    assert not q.needs_interrupt()
    mem.write_u16(used_event, 10)  # exactly the entry used next
    q.push(0, 0)  # 10 -> 11
    assert q.needs_interrupt()


def test_used_event_across_the_wrap(mem: GuestMemory) -> None:
    q = make_queue(mem, size=8, event_idx=True)
    used_event = AVAIL + 4 + 2 * 8
    q.used_idx = 0xFFFE
    q.push(0, 0)  # 0xFFFF
    assert q.needs_interrupt()
    mem.write_u16(used_event, 0xFFFF)
    q.push(0, 0)  # 0x0000
    q.push(0, 0)  # 0x0001
    assert q.needs_interrupt()
    mem.write_u16(used_event, 0x0005)
    q.push(0, 0)
    assert not q.needs_interrupt()


def test_enable_notifications_with_event_idx(mem: GuestMemory) -> None:
    q = make_queue(mem, size=8, event_idx=True)
    avail_event = USED + 4 + 8 * 8
    desc(mem, 0, DATA, 4, R)
    av = Avail(mem, q)
    av.publish(0, 0)
    assert q.pop() is not None
    assert q.enable_notifications()  # one more is already there
    assert mem.read_u16(avail_event) == 1
    assert q.pop() is not None
    assert not q.enable_notifications()
    assert mem.read_u16(avail_event) == 2


def test_enable_notifications_without_event_idx(mem: GuestMemory) -> None:
    q = make_queue(mem, size=8, event_idx=False)
    mem.write_u16(USED, 1)  # VIRTQ_USED_F_NO_NOTIFY
    assert not q.enable_notifications()
    assert mem.read_u16(USED) == 0
    desc(mem, 0, DATA, 4, R)
    Avail(mem, q).publish(0)
    assert q.enable_notifications()


# ---- property tests: any descriptor table ---------------------------------------------

_EDGE_ENDS = (LOW_END, HIGH_END, HIGH_START)  # where RAM stops (or, for HIGH_START, starts)


def _weighted(draw: st.DrawFn, *choices: tuple[int, st.SearchStrategy[object]]) -> object:
    """Draw from one of ``choices`` picked with the given integer weights."""
    pick = draw(st.integers(0, sum(w for w, _ in choices) - 1))
    for w, strategy in choices:
        if pick < w:
            return draw(strategy)
        pick -= w
    raise AssertionError


@st.composite
def _desc(draw: st.DrawFn) -> tuple[int, int, int, int]:
    """One descriptor: mostly plausible, sometimes an indirect one (possibly nested),
    sometimes right at the edge of RAM, sometimes anything at all."""
    nxt = _weighted(draw, (5, st.integers(0, 16)), (1, st.integers(0, 0xFFFF)))
    assert isinstance(nxt, int)
    kind = draw(st.integers(0, 9))
    if kind < 4:  # an ordinary buffer
        return (DATA + 0x100 * draw(st.integers(0, 15)), draw(st.integers(0, 0x100)),
                draw(st.sampled_from([R, N, W, W | N, N, W | N])), nxt)
    if kind < 7:  # an indirect table (a few bad lengths and flags too)
        return (draw(st.sampled_from(TABLES)),
                draw(st.sampled_from([16, 32, 48, 64, 128, 0, 8, 24, 40])),
                draw(st.sampled_from([IND, IND, IND, IND | W, IND | N])), nxt)
    if kind < 9:  # a buffer that ends just before, at, or just past the end of RAM
        edge, k = draw(st.sampled_from(_EDGE_ENDS)), draw(st.integers(1, 64))
        return (edge - k, k + draw(st.sampled_from([-1, 0, 1])),
                draw(st.sampled_from([R, W, N, W | N])), nxt)
    return (draw(st.one_of(st.integers(0, HIGH_END + 16), st.integers(0, (1 << 64) - 1))),
            draw(st.one_of(st.integers(0, 0x200), st.integers(0, (1 << 32) - 1))),
            draw(st.integers(0, 0xFFFF)), nxt)


def _table(draw: st.DrawFn, n: int) -> list[tuple[int, int, int, int]]:
    """``n`` descriptors: a well-formed run of chains i -> i+1 (readable, then writable,
    now and then in the wrong order) with a few replaced, or all drawn at random."""
    if draw(st.booleans()):
        return draw(st.lists(_desc(), min_size=n, max_size=n))
    out = []
    writable = False
    for i in range(n):
        last = i == n - 1 or draw(st.integers(0, 3)) == 0
        # readable ones, then writable ones; now and then a readable one after a writable one
        flip = draw(st.integers(0, 7)) == 0
        writable = not writable if flip else writable or draw(st.booleans())
        out.append((DATA + 0x100 * (i % 16), draw(st.integers(1, 0x100)),
                    (W if writable else R) | (0 if last else N), i + 1))
        if last:
            writable = False
    for _ in range(draw(st.integers(0, 2))):
        out[draw(st.integers(0, n - 1))] = draw(_desc())
    if draw(st.integers(0, 5)) == 0:  # a back edge: a loop if the chain gets there
        j = draw(st.integers(0, n - 1))
        a, length, flags, _ = out[j]
        out[j] = (a, length, (flags | N) & ~IND, draw(st.integers(0, j)))
    return out


@st.composite
def _queue_images(draw: st.DrawFn) -> dict[str, object]:
    size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    heads = draw(st.lists(st.integers(0, size - 1), min_size=size, max_size=size))
    if draw(st.integers(0, 7)) == 0:
        heads[draw(st.integers(0, size - 1))] = draw(st.integers(size, 0xFFFF))
    return {
        "size": size,
        "table": _table(draw, size),
        "indirect_tables": [_table(draw, draw(st.integers(1, 8))) for _ in TABLES],
        "heads": heads,
        "start": draw(st.one_of(st.just(0), st.integers(0xFFF0, 0xFFFF), st.integers(0, 0xFFFF))),
        "ahead": _weighted(draw, (6, st.integers(1, size)), (1, st.integers(0, size + 1)),
                           (1, st.integers(0, 0xFFFF))),
        "indirect": draw(st.integers(0, 4)) > 0,
    }


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Fail (instead of hanging) when the block runs longer than ``seconds``."""
    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds}s: a loop?")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(image=_queue_images())
def test_any_descriptor_table(mem: GuestMemory, image: dict[str, object]) -> None:
    """``pop`` on arbitrary rings agrees with the model: a chain with its buffers (all in
    RAM, readable before writable, bounded in number), a failed chain, None, or
    QueueBroken — and nothing else, and it always returns."""
    size = image["size"]
    assert isinstance(size, int)
    q = make_queue(mem, size, indirect=bool(image["indirect"]))
    for i, d in enumerate(image["table"]):  # type: ignore[arg-type]
        desc(mem, i, *d)
    for t, entries in zip(TABLES, image["indirect_tables"], strict=True):  # type: ignore[call-overload]
        for i, d in enumerate(entries):
            desc(mem, i, *d, table=t)
    start = image["start"]
    assert isinstance(start, int)
    q.last_avail = start
    for k, h in enumerate(image["heads"]):  # type: ignore[arg-type]
        mem.write_u16(AVAIL + 4 + 2 * ((start + k) % size), h)
    avail_idx = (start + image["ahead"]) & 0xFFFF  # type: ignore[operator]
    mem.write_u16(AVAIL + 2, avail_idx)

    last = start
    for _ in range(size + 2):
        pending = (avail_idx - last) & 0xFFFF
        if pending == 0:
            assert q.pop() is None
            break
        head = mem.read_u16(AVAIL + 4 + 2 * (last % size))
        if pending > size or head >= size:
            event("queue broken")
            with pytest.raises(QueueBroken), _deadline(2):
                q.pop()
            assert q.last_avail == last
            break
        want = reference_chain(mem, DESC, size, head, indirect=bool(image["indirect"]),
                               max_indirect=MAX_INDIRECT)
        with _deadline(2):
            chain = q.pop()
        last = (last + 1) & 0xFFFF
        assert chain is not None and chain.head == head and q.last_avail == last
        event("failed chain" if want is None else
              f"chain of {min(len(want[0] + want[1]), 3)}+ buffers")
        if want is None:
            assert chain.error is not None
            assert chain.readable == chain.writable == []
        else:
            assert chain.error is None, chain.error
            assert (chain.readable, chain.writable) == want
            bufs = chain.readable + chain.writable
            assert all(n > 0 and mem.check_range(a, n) for a, n in bufs)
            assert len(bufs) <= size + MAX_INDIRECT
    else:
        pytest.fail("pop returned chains past the available index")


# ---- a driver that never stops posting -------------------------------------------


class _RecordingTransport:
    def __init__(self, mem: GuestMemory, q: SplitQueue) -> None:
        self.memory, self.q = mem, q
        self.batches: list[int] = []

    def complete(self, queue: SplitQueue, done: list[tuple[int, int]]) -> None:
        self.batches.append(len(done))
        for head, n in done:
            queue.push(head, n)

    def needs_reset(self, reason: str) -> None:
        raise AssertionError(reason)

    def note_dma_write(self, gpa: int, size: int) -> None:
        pass

    def config_changed(self) -> None:
        pass


def test_serve_queue_holds_back_at_most_a_ring(mem: GuestMemory) -> None:
    """A driver that re-posts a head every time the device takes one keeps the
    ring non-empty forever; the device must complete in batches of at most the
    queue size instead of collecting completions without bound."""
    from pyvirt.virtio.device import serve_queue

    q = make_queue(mem, size=8)
    desc(mem, 0, DATA, 16, W)
    avail = Avail(mem, q)
    avail.publish(0)
    transport = _RecordingTransport(mem, q)
    served = 0

    def handle(chain: Chain) -> int:
        nonlocal served
        served += 1
        if served < 200:
            avail.publish(0)  # hostile: the same head again, before it was returned
        return 0

    serve_queue(transport, q, "test", handle)  # type: ignore[arg-type]
    assert served == 200
    assert sum(transport.batches) == 200
    assert max(transport.batches) <= q.size


# ---- the batched fast paths against the one-at-a-time ones ----------------------------


def _outcome(q: SplitQueue, take: object) -> list[object]:
    """What popping yields until the ring is empty or broken: chains as tuples, then
    "broken" (and where last_avail stood)."""
    got: list[object] = []
    for _ in range(1100):  # more calls than any ring needs
        try:
            batch = take()  # type: ignore[operator]
        except QueueBroken:
            got.append(("broken", q.last_avail))
            return got
        if not batch:
            got.append(("empty", q.last_avail))
            return got
        got += [(c.head, c.readable, c.writable, c.error is None) for c in batch]
    raise AssertionError("popping never ended")


def _walked_pop(q: SplitQueue) -> Chain | None:
    """The slow path: ``pop`` as it was before the batch, every chain walked."""
    mem = q.mem
    assert mem is not None
    idx = mem.read_u16(AVAIL + 2)
    pending = (idx - q.last_avail) & 0xFFFF
    if pending == 0:
        return None
    head = mem.read_u16(AVAIL + 4 + 2 * (q.last_avail % q.size))
    if pending > q.size or head >= q.size:
        raise QueueBroken("broken")
    q.last_avail = (q.last_avail + 1) & 0xFFFF
    chain = Chain(head)
    chain.error = q._walk(mem, chain)
    if chain.error is not None:
        chain.readable.clear()
        chain.writable.clear()
    return chain


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(image=_queue_images(), sizes=st.lists(st.integers(1, 80), min_size=1, max_size=8),
       single=st.booleans(), edges=st.lists(st.tuples(
           st.sampled_from(_EDGE_ENDS), st.integers(1, 64), st.sampled_from([-1, 0, 1]),
           st.sampled_from([R, W])), min_size=16, max_size=16))
def test_pop_many_agrees_with_pop(mem: GuestMemory, image: dict[str, object],
                                  sizes: list[int], single: bool,
                                  edges: list[tuple[int, int, int, int]]) -> None:
    """``pop_many`` (a batch per read of the ring, a walk-free path for one-descriptor
    chains) gives the same chains, errors and QueueBroken point as walking each chain,
    whatever the batch sizes; ``single`` makes most chains one direct descriptor."""
    size = image["size"]
    assert isinstance(size, int)
    indirect = bool(image["indirect"])
    q = make_queue(mem, size, indirect=indirect)
    table = image["table"]
    assert isinstance(table, list)
    for i, d in enumerate(table):
        if single and i % 4 == 1:  # one buffer at (or past) the end of RAM
            edge, k, delta, flags = edges[i]
            d = (edge - k, k + delta, flags, 0)
        elif single and i % 4:  # a mergeable receive buffer (or a bad/empty one)
            d = (d[0], d[1], d[2] & DESC_F_WRITE)
        desc(mem, i, *d)
    for t, entries in zip(TABLES, image["indirect_tables"], strict=True):  # type: ignore[call-overload]
        for i, d in enumerate(entries):
            desc(mem, i, *d, table=t)
    start = image["start"]
    assert isinstance(start, int)
    for k, h in enumerate(image["heads"]):  # type: ignore[arg-type]
        mem.write_u16(AVAIL + 4 + 2 * ((start + k) % size), h)
    mem.write_u16(AVAIL + 2, (start + image["ahead"]) & 0xFFFF)  # type: ignore[operator]

    q.last_avail = start
    with _deadline(5):
        want = _outcome(q, lambda: [c] if (c := _walked_pop(q)) is not None else [])
    q.last_avail = start
    turns = iter(sizes * 200)
    with _deadline(5):
        got = _outcome(q, lambda: q.pop_many(next(turns)))
    assert got == want


def test_pop_many_returns_the_chains_before_a_bad_head(mem: GuestMemory) -> None:
    q = make_queue(mem, size=8)
    desc(mem, 0, DATA, 16, W)
    desc(mem, 1, DATA + 16, 16, R)
    Avail(mem, q).publish(0, 1, 9, 0)
    chains = q.pop_many(8)
    assert [(c.head, c.readable, c.writable) for c in chains] == [
        (0, [], [(DATA, 16)]), (1, [(DATA + 16, 16)], [])]
    assert q.last_avail == 2
    with pytest.raises(QueueBroken):
        q.pop_many(8)
    assert q.last_avail == 2


@given(start=st.integers(0, 0xFFFF), done=st.lists(
    st.tuples(st.integers(0, 7), st.integers(0, 0xFFFF_FFFF)), max_size=8))
@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_push_many_agrees_with_push(mem: GuestMemory, start: int,
                                    done: list[tuple[int, int]]) -> None:
    q = make_queue(mem, size=8)
    q.used_idx = start
    for head, n in done:
        q.push(head, n)
    want = (mem.read(USED, 4 + 8 * 8), q.used_idx)
    q = make_queue(mem, size=8)
    q.used_idx = start
    q.push_many(done)
    assert (mem.read(USED, 4 + 8 * 8), q.used_idx) == want
