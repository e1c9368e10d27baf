"""The split virtqueue walk (``SplitQueue``: activate, pop, push, suppression) over real
guest RAM whose rings, descriptor tables and indirect tables the fuzzer writes.

Documented outcomes: ``QueueBroken`` (the driver broke the queue), or a chain with
``error`` set (a bad request). Invariants: every buffer of a good chain lies in one
RAM region; readable buffers come first; a chain has at most as many buffers as
its table; the used index moves by one per push."""

from __future__ import annotations

from fuzz.common import (
    DATA,
    LOW,
    Provider,
    check,
    clear,
    guest_memory,
    ring_addresses,
    write_rings,
)
from pyvirt.virtio.queue import MAX_INDIRECT, QueueBroken, SplitQueue

_mem = guest_memory()


def one_input(data: bytes) -> None:
    fdp = Provider(data)
    mem = _mem
    clear(mem)
    q = SplitQueue(0, 256)
    q.size = 1 << fdp.ConsumeIntInRange(0, 8) if fdp.ConsumeIntInRange(0, 15) else (
        fdp.ConsumeUInt(2))
    q.desc_addr, q.avail_addr, q.used_addr = ring_addresses(0)
    if fdp.ConsumeIntInRange(0, 15) == 0:
        q.desc_addr, q.avail_addr, q.used_addr = (fdp.ConsumeUInt(8) for _ in range(3))
    indirect, event_idx = fdp.ConsumeBool(), fdp.ConsumeBool()
    try:
        q.activate(mem, indirect=indirect, event_idx=event_idx)
    except QueueBroken:
        return
    write_rings(fdp, mem, q, [])
    mem.write(DATA, fdp.ConsumeBytes(LOW[1] - DATA))
    popped = 0
    try:
        q.needs_interrupt()
        while (chain := q.pop()) is not None:
            popped += 1
            check(popped <= q.size, "more chains popped than the avail index allows")
            bufs = chain.readable + chain.writable
            check(len(bufs) <= q.size + MAX_INDIRECT, f"chain of {len(bufs)} buffers")
            if chain.error is not None:
                check(not bufs, "a failed chain kept its buffers")
            for addr, length in bufs:
                check(length > 0 and mem.check_range(addr, length),
                      f"buffer {addr:#x}+{length:#x} outside one RAM region")
            before = q.used_idx
            with q.lock:
                q.push(chain.head, chain.writable_len)
                q.needs_interrupt()
            check(q.used_idx == (before + 1) & 0xFFFF, "used index did not advance by one")
            q.enable_notifications()
    except QueueBroken:
        pass
