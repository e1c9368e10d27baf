"""The 8254 programmable interval timer (Intel 8254 datasheet, 231164) and port 0x61.

Ports 0x40-0x42 are the counters, 0x43 the control word. Counters run at
1.193182 MHz derived from the host monotonic clock: a count is "the reload
value minus the ticks elapsed since it was loaded", never a counter of guest
exits, so a guest polling channel 2 (Linux quick_pit_calibrate) measures real
time.

Channel 0 drives IRQ0: in modes 2 and 3 a pulse (high then low: an edge for
the PIC and the IOAPIC) at the end of every period through the timer
service, in mode 0 OUT goes high at terminal count and stays high until a new
count or control word, as the datasheet draws it. Channel 2's gate is bit 0
of port 0x61 and its OUT reads back in bit 5.

Threading: one lock; IRQ0 is driven with it held (lock order PIT -> PIC /
IOAPIC -> LAPIC). Timer callbacks carry a generation number so a callback
picked up before a reprogramming does nothing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import ClassVar

from pyvirt.devices.irq import IrqLine
from pyvirt.hypervisor.emulated._staterec import MAX_REL_NS, check_bool, check_int, check_len
from pyvirt.hypervisor.emulated.timers import TimerHandle, TimerService
from pyvirt.state import check_version

__all__ = ["PIT_HZ", "Pit8254", "PitChannelState", "PitState", "SpeakerPort"]

PIT_HZ = 1_193_182
_NS = 1_000_000_000

#: IRQ0 pulses never come closer than this, whatever the guest programs
MIN_IRQ_PERIOD_NS = 100_000

RW_LATCH, RW_LSB, RW_MSB, RW_WORD = range(4)


def _to_bcd(v: int) -> int:
    v %= 10000
    return int(str(v), 16)


def _from_bcd(v: int) -> int:
    digits = f"{v:x}"
    return int(digits) if digits.isdigit() else v  # a non-BCD digit: take it as binary


@dataclass(frozen=True)
class PitChannelState:
    mode: int
    rw: int
    bcd: bool
    reload: int
    gate: bool
    loaded: bool
    start_ns: int | None  # relative to the save
    frozen_ticks: int
    null_count: bool
    latch: tuple[int, ...]
    status: int | None
    read_msb: bool
    write_msb: bool
    write_lsb: int


@dataclass(frozen=True)
class PitState:
    version: int
    channels: tuple[PitChannelState, ...]
    speaker_data: bool
    refresh: bool
    irq_level: bool


_CH_FLAGS = ("bcd", "gate", "loaded", "null_count", "read_msb", "write_msb")


class _Channel:
    def __init__(self, index: int) -> None:
        self.index = index
        self.mode = 0
        self.rw = RW_WORD
        self.bcd = False
        self.reload = 0x10000  # 0 written means the maximum count
        self.gate = index != 2  # channels 0 and 1 have their gate tied high on the PC
        self.loaded = False  # a count has been written since the control word
        self.start_ns: int | None = None  # when counting started from ``reload``
        self.frozen_ticks = 0  # modes 0/4: ticks counted before the gate went low
        self.out_initial = False
        self.null_count = True
        self.latch: list[int] = []  # latched count bytes still to read
        self.status: int | None = None
        self.read_msb = False  # RW_WORD live reads: next byte is the MSB
        self.write_msb = False  # RW_WORD writes: next byte is the MSB
        self.write_lsb = 0
        self.gen = 0
        self.handle: TimerHandle | None = None

    # -- the counting element -------------------------------------------------

    def ticks(self, now: int) -> int | None:
        """Clock pulses counted since the count was loaded (or triggered); None: not counting."""
        if not self.loaded:
            return None
        if self.start_ns is None:
            return self.frozen_ticks if self.mode in (0, 4) else None
        return self.frozen_ticks + (now - self.start_ns) * PIT_HZ // _NS

    def state(self, now: int) -> tuple[int, bool]:
        """(count as read, OUT level), per the mode descriptions of the datasheet."""
        n = self.reload
        t = self.ticks(now)
        mode = self.mode
        if t is None:
            # not loaded, or modes 1/5 waiting for a trigger, or 2/3 with gate low
            return n & 0xFFFF, mode != 0
        if mode in (0, 1):
            return (n - t) & 0xFFFF, t >= n  # OUT low while counting, high at terminal count
        if mode in (4, 5):
            return (n - t) & 0xFFFF, t != n  # a one-clock low strobe at terminal count
        if mode == 2:
            if n < 2:
                return n & 0xFFFF, True
            count = n - t % n
            return count & 0xFFFF, count != 1  # low during the last count of each period
        # mode 3: high for ceil(n/2) counts, low for floor(n/2), counting down by two
        p = t % n
        high = (n + 1) // 2
        if p < high:
            return (n - 2 * p) & 0xFFFF, True
        return (n - 2 * (p - high)) & 0xFFFF, False

    def ns_at_tick(self, tick: int) -> int:
        """Host time at which ``tick`` ticks will have been counted (rounded up)."""
        assert self.start_ns is not None
        return self.start_ns + -(-(tick - self.frozen_ticks) * _NS // PIT_HZ)


class Pit8254:
    STATE_VERSION: ClassVar[int] = 1
    state_type: ClassVar[type] = PitState

    def __init__(self, timers: TimerService, irq0: IrqLine | None = None) -> None:
        self._timers = timers
        self.irq0 = irq0
        self._lock = threading.Lock()
        self.channels = [_Channel(i) for i in range(3)]
        self.speaker_data = False
        self._refresh = False
        self._irq_level = False
        self.port61 = SpeakerPort(self)
        #: IRQ0 pulses raised, for tests
        self.irq0_pulses = 0

    def now_ns(self) -> int:
        return self._timers.now_ns()

    # -- BusDevice for ports 0x40..0x43 ------------------------------------------

    def read(self, offset: int, data: memoryview) -> None:
        for i in range(len(data)):
            data[i] = self.read_port(offset + i)

    def write(self, offset: int, data: memoryview) -> None:
        for i in range(len(data)):
            self.write_port(offset + i, data[i])

    def read_port(self, offset: int) -> int:
        if offset >= 3:
            return 0xFF  # the control word register cannot be read
        with self._lock:
            ch = self.channels[offset]
            if ch.status is not None:
                value, ch.status = ch.status, None
                return value
            if ch.latch:
                return ch.latch.pop(0)
            count = self._count_locked(ch)
            if ch.rw == RW_LSB:
                return count & 0xFF
            if ch.rw == RW_MSB:
                return count >> 8
            msb = ch.read_msb  # LSB-then-MSB: reads alternate, starting with the LSB
            ch.read_msb = not msb
            return count >> 8 if msb else count & 0xFF

    def write_port(self, offset: int, value: int) -> None:
        with self._lock:
            if offset >= 3:
                self._control_locked(value)
            else:
                self._write_count_locked(self.channels[offset], value)

    # -- port 0x61 ------------------------------------------------------------------

    def read_61(self) -> int:
        with self._lock:
            # bit 4 is the DRAM refresh toggle; BIOS-style delay loops wait for it to flip
            self._refresh = not self._refresh
            ch2 = self.channels[2]
            out2 = ch2.state(self.now_ns())[1]
            return (int(ch2.gate) | int(self.speaker_data) << 1 | int(self._refresh) << 4
                    | int(out2) << 5)

    def write_61(self, value: int) -> None:
        with self._lock:
            self.speaker_data = bool(value & 2)
            self._set_gate_locked(self.channels[2], bool(value & 1))

    def set_gate(self, channel: int, level: bool) -> None:
        with self._lock:
            self._set_gate_locked(self.channels[channel], level)

    # -- internals ------------------------------------------------------------------

    def _count_locked(self, ch: _Channel) -> int:
        count = ch.state(self.now_ns())[0]
        return _to_bcd(count) if ch.bcd else count

    def _latch_count_locked(self, ch: _Channel) -> None:
        if ch.latch:
            return  # a second latch before the first is read is ignored (datasheet)
        count = self._count_locked(ch)
        if ch.rw == RW_LSB:
            ch.latch = [count & 0xFF]
        elif ch.rw == RW_MSB:
            ch.latch = [count >> 8]
        else:
            ch.latch = [count & 0xFF, count >> 8]

    def _control_locked(self, value: int) -> None:
        sc = value >> 6
        if sc == 3:
            # read-back: bit 5 low latches counts, bit 4 low latches status, bits 3:1 select
            for i in range(3):
                if value & (2 << i):
                    ch = self.channels[i]
                    if not value & 0x20:
                        self._latch_count_locked(ch)
                    if not value & 0x10 and ch.status is None:
                        out = ch.state(self.now_ns())[1]
                        ch.status = (int(out) << 7 | int(ch.null_count) << 6 | ch.rw << 4
                                     | ch.mode << 1 | int(ch.bcd))
            return
        ch = self.channels[sc]
        rw = (value >> 4) & 3
        if rw == RW_LATCH:
            self._latch_count_locked(ch)
            return
        mode = (value >> 1) & 7
        if mode >= 6:
            mode -= 4  # 110 and 111 are aliases of modes 2 and 3
        # a control word resets the counter's logic; OUT goes low in mode 0, high otherwise
        ch.mode, ch.rw, ch.bcd = mode, rw, bool(value & 1)
        ch.loaded = False
        ch.start_ns = None
        ch.frozen_ticks = 0
        ch.null_count = True
        ch.latch = []
        ch.status = None
        ch.read_msb = ch.write_msb = False
        self._disarm_locked(ch)
        if ch.index == 0:
            # IRQ0 idles low: modes 2/3 pulse it, mode 0 raises it at terminal count
            self._set_irq_locked(False)

    def _write_count_locked(self, ch: _Channel, value: int) -> None:
        if ch.rw == RW_LSB:
            raw = value
        elif ch.rw == RW_MSB:
            raw = value << 8
        elif not ch.write_msb:
            ch.write_lsb = value
            ch.write_msb = True
            if ch.mode == 0:
                # mode 0: the first byte of a two-byte count stops the count (datasheet)
                self._disarm_locked(ch)
                ch.loaded = False
            return
        else:
            ch.write_msb = False
            raw = ch.write_lsb | value << 8
        n = _from_bcd(raw) if ch.bcd else raw
        ch.reload = n or (10000 if ch.bcd else 0x10000)
        ch.null_count = False
        ch.loaded = True
        ch.frozen_ticks = 0
        if ch.mode in (1, 5):
            ch.start_ns = None  # wait for a gate trigger
        elif ch.gate:
            ch.start_ns = self.now_ns()
        else:
            ch.start_ns = None  # 0/4 paused, 2/3 held until the gate rises
        if ch.index == 0 and ch.mode == 0:
            self._set_irq_locked(False)  # a new count brings OUT low in mode 0
        self._arm_locked(ch)

    def _set_gate_locked(self, ch: _Channel, level: bool) -> None:
        if level == ch.gate:
            return
        ch.gate = level
        now = self.now_ns()
        if not ch.loaded:
            return
        if ch.mode in (0, 4):
            if level:  # resume counting (gate high enables counting)
                ch.start_ns = now
            else:  # suspend: remember the ticks so far
                ch.frozen_ticks = ch.ticks(now) or 0
                ch.start_ns = None
        elif level:
            # modes 1, 2, 3, 5: a rising gate (re)starts from the reload value
            ch.frozen_ticks = 0
            ch.start_ns = now
        elif ch.mode in (2, 3):
            ch.start_ns = None  # gate low stops the count and forces OUT high
        self._arm_locked(ch)

    def _disarm_locked(self, ch: _Channel) -> None:
        ch.gen += 1
        self._timers.cancel(ch.handle)
        ch.handle = None

    def _arm_locked(self, ch: _Channel) -> None:
        """Schedule the next IRQ0 event of channel 0."""
        self._disarm_locked(ch)
        if ch.index != 0 or ch.start_ns is None or self.irq0 is None:
            return
        now = self.now_ns()
        if ch.mode in (0, 1, 4, 5):
            if (ch.ticks(now) or 0) >= ch.reload:
                return  # terminal count already passed: OUT already went high
            self._schedule_locked(ch, ch.ns_at_tick(ch.reload))
        else:
            self._schedule_locked(ch, self._next_boundary_locked(ch, now))

    @staticmethod
    def _next_boundary_locked(ch: _Channel, after_ns: int) -> int:
        """The end of the first period ending after ``after_ns`` (modes 2 and 3)."""
        t = ch.ticks(after_ns) or 0
        return ch.ns_at_tick((t // ch.reload + 1) * ch.reload)

    def _schedule_locked(self, ch: _Channel, deadline: int) -> None:
        gen = ch.gen
        ch.handle = self._timers.schedule(deadline, lambda: self._expired(gen))

    def _expired(self, gen: int) -> None:
        with self._lock:
            ch = self.channels[0]
            if gen != ch.gen:
                return  # reprogrammed after the timer thread picked this up
            ch.handle = None
            if ch.mode == 0:
                self._set_irq_locked(True)  # OUT high at terminal count until reprogrammed
                return
            if ch.mode in (2, 3, 4):
                # one pulse: a rising edge for the edge-triggered PIC input and IOAPIC pin
                self._set_irq_locked(True)
                self._set_irq_locked(False)
            if ch.mode in (2, 3) and ch.start_ns is not None:
                # Missed periods (a late host thread) are coalesced into this one pulse;
                # tiny periods are stretched to MIN_IRQ_PERIOD_NS.
                now = self.now_ns()
                period = ch.reload * _NS // PIT_HZ
                earliest = now + MIN_IRQ_PERIOD_NS if period < MIN_IRQ_PERIOD_NS else now
                self._schedule_locked(ch, self._next_boundary_locked(ch, earliest))

    def _set_irq_locked(self, level: bool) -> None:
        if level and not self._irq_level:
            self.irq0_pulses += 1
        self._irq_level = level
        if self.irq0 is not None:
            self.irq0.set_level(level)

    def close(self) -> None:
        with self._lock:
            for ch in self.channels:
                self._disarm_locked(ch)

    # -- saved state ------------------------------------------------------------

    def save_state(self) -> PitState:
        with self._lock:
            now = self.now_ns()
            chans = tuple(PitChannelState(
                mode=ch.mode, rw=ch.rw, bcd=ch.bcd, reload=ch.reload, gate=ch.gate,
                loaded=ch.loaded, start_ns=None if ch.start_ns is None else ch.start_ns - now,
                frozen_ticks=ch.frozen_ticks, null_count=ch.null_count, latch=tuple(ch.latch),
                status=ch.status, read_msb=ch.read_msb, write_msb=ch.write_msb,
                write_lsb=ch.write_lsb) for ch in self.channels)
            return PitState(version=self.STATE_VERSION, channels=chans,
                            speaker_data=self.speaker_data, refresh=self._refresh,
                            irq_level=self._irq_level)

    def restore_state(self, st: PitState, elapsed_ns: int = 0) -> None:
        """Counters as saved, moved on by ``elapsed_ns`` of wall time: channel 0
        in a periodic mode keeps its phase and pulses from the next period on
        (missed periods are not caught up); a one-shot count that ended in the
        gap fires once, now. IRQ0's level is the saved one (the PIC and IOAPIC
        restore theirs)."""
        part = "pit"
        check_version(part, st.version, self.STATE_VERSION)
        check_len(part, "channels", st.channels, 3)
        for name in ("speaker_data", "refresh", "irq_level"):
            check_bool(part, name, getattr(st, name))
        check_int(part, "elapsed_ns", elapsed_ns, 0, MAX_REL_NS)
        for i, c in enumerate(st.channels):
            p = f"pit.channels[{i}]"
            check_int(p, "mode", c.mode, 0, 5)
            check_int(p, "rw", c.rw, RW_LSB, RW_WORD)
            check_int(p, "reload", c.reload, 1, 0x10000)
            if c.start_ns is not None:
                check_int(p, "start_ns", c.start_ns, -MAX_REL_NS, MAX_REL_NS)
            check_int(p, "frozen_ticks", c.frozen_ticks, 0, 0x10000)
            if len(c.latch) > 2:
                check_len(p, "latch", c.latch, 2)
            for j, b in enumerate(c.latch):
                check_int(p, f"latch[{j}]", b, 0, 0xFF)
            if c.status is not None:
                check_int(p, "status", c.status, 0, 0xFF)
            check_int(p, "write_lsb", c.write_lsb, 0, 0xFF)
            for name in _CH_FLAGS:
                check_bool(p, name, getattr(c, name))
        with self._lock:
            now = self.now_ns()
            base = now - elapsed_ns  # the moment of saving, on our clock
            for ch, c in zip(self.channels, st.channels, strict=True):
                self._disarm_locked(ch)
                ch.mode, ch.rw, ch.bcd, ch.reload = c.mode, c.rw, c.bcd, c.reload
                ch.gate, ch.loaded, ch.null_count = c.gate, c.loaded, c.null_count
                ch.start_ns = None if c.start_ns is None else base + c.start_ns
                ch.frozen_ticks = c.frozen_ticks
                ch.latch, ch.status = list(c.latch), c.status
                ch.read_msb, ch.write_msb, ch.write_lsb = c.read_msb, c.write_msb, c.write_lsb
            self.speaker_data, self._refresh = st.speaker_data, st.refresh
            self._irq_level = st.irq_level
            ch = self.channels[0]
            self._arm_locked(ch)
            if (ch.handle is None and ch.start_ns is not None and self.irq0 is not None
                    and ch.mode in (0, 4) and ch.loaded
                    and (ch.ticks(base) or 0) < ch.reload <= (ch.ticks(now) or 0)):
                # the terminal count came during the gap: its IRQ0 event, once, now
                self._schedule_locked(ch, now)


class SpeakerPort:
    """Port 0x61 (NMI status and control / speaker) as a BusDevice of length 1."""

    def __init__(self, pit: Pit8254) -> None:
        self.pit = pit

    def read(self, offset: int, data: memoryview) -> None:
        value = self.pit.read_61()
        data[0] = value
        for i in range(1, len(data)):
            data[i] = 0

    def write(self, offset: int, data: memoryview) -> None:
        self.pit.write_61(data[0])

