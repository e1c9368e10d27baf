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

from pyvirt.devices.irq import IrqLine
from pyvirt.hypervisor.emulated.timers import TimerHandle, TimerService

__all__ = ["PIT_HZ", "Pit8254", "SpeakerPort"]

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

