"""MSI-X (``MsixTable``): fuzzer-chosen table and PBA reads/writes of any width and
offset, Message Control writes (enable, function mask), resets and device-side
notifications of any vector, in any order.

Documented outcomes: only aligned dword/qword accesses inside the table or PBA
have an effect; masked vectors set their pending bit; an unmask sends what is
pending. Invariants: a message goes out only while MSI-X is enabled and its
vector unmasked, with the address/data its table entry holds at that moment;
PBA reads show exactly the pending vectors."""

from __future__ import annotations

import struct

from fuzz.common import Provider, check
from pyvirt.pci.msix import CTRL_ENABLE, CTRL_FUNCTION_MASK, MsixTable

MAX_LEN = 1024


class _Route:
    def __init__(self, owner: list[MsixTable]) -> None:
        self.owner = owner
        self.address = self.data = 0

    def update(self, address: int, data: int) -> None:
        self.address, self.data = address, data

    def trigger(self) -> None:
        t = self.owner[0]
        v = t._routes.index(self)
        lo, hi, data, _ = struct.unpack_from("<IIII", t.table, 16 * v)
        check(t.enabled, "MSI-X message sent while MSI-X is disabled")
        check(not t.masked(v), f"MSI-X message sent on masked vector {v}")
        check((self.address, self.data) == (lo | hi << 32, data),
              "MSI-X message does not match its table entry")

    def close(self) -> None:
        pass


def one_input(data: bytes) -> None:
    fdp = Provider(data)
    owner: list[MsixTable] = []
    n = fdp.ConsumeIntInRange(1, 70)
    t = MsixTable(n, lambda: _Route(owner))
    owner.append(t)
    buf = bytearray(8)
    while fdp.remaining_bytes():
        op = fdp.ConsumeIntInRange(0, 5)
        width = (4, 8, 1, 2, 4, 8)[fdp.ConsumeIntInRange(0, 5)]
        view = memoryview(buf)[:width]
        if op == 0:
            off = fdp.ConsumeIntInRange(0, t.table_size + 16)
            view[:] = fdp.ConsumeBytes(width).ljust(width, b"\0")
            t.table_write(off, view)
        elif op == 1:
            t.table_read(fdp.ConsumeIntInRange(0, t.table_size + 16), view)
        elif op == 2:
            off = fdp.ConsumeIntInRange(0, t.pba_size + 8)
            t.pba_read(off, view)
            if width in (4, 8) and off % width == 0 and off + width <= t.pba_size:
                want = sum(1 << i for i, p in enumerate(t.pending) if p) >> (8 * off)
                check(int.from_bytes(view, "little") == want & ((1 << (8 * width)) - 1),
                      "PBA does not show the pending bits")
        elif op == 3:
            ctl = fdp.ConsumeUInt(2) if fdp.ConsumeIntInRange(0, 3) == 0 else (
                (CTRL_ENABLE if fdp.ConsumeBool() else 0)
                | (CTRL_FUNCTION_MASK if fdp.ConsumeBool() else 0))
            t.control_written(ctl)
        elif op == 4:
            v = fdp.ConsumeIntInRange(-1, n + 1) if fdp.ConsumeIntInRange(0, 7) else (
                fdp.ConsumeUInt(2))
            sent = t.sent
            valid = 0 <= v < n
            masked = valid and t.masked(v)
            ok = t.notify(v)
            check(ok == (t.enabled and valid), "notify result disagrees with the state")
            if ok:
                check(t.sent == sent + (0 if masked else 1), "masked vector sent or unmasked lost")
                check(t.pending[v] or not masked, "masked vector not left pending")
        else:
            t.reset()
    t.close()
