"""The emulated 8254 PIT and port 0x61, against a fake clock."""

from __future__ import annotations

from pyvirt.devices.irq import NullIrq
from pyvirt.hypervisor.emulated.pit import PIT_HZ, Pit8254
from pyvirt.hypervisor.emulated.timers import ManualClock, TimerService

NS = 1_000_000_000


class EdgeCounter:
    def __init__(self) -> None:
        self.level = False
        self.edges: list[int] = []
        self.clock: ManualClock | None = None

    def set_level(self, level: bool) -> None:
        if level and not self.level and self.clock is not None:
            self.edges.append(self.clock.now_ns)
        self.level = level


class Rig:
    def __init__(self) -> None:
        self.clock = ManualClock(5 * NS)
        self.timers = TimerService(self.clock, start=False)
        self.irq = EdgeCounter()
        self.irq.clock = self.clock
        self.pit = Pit8254(self.timers, irq0=self.irq)

    def outb(self, port: int, value: int) -> None:
        if port == 0x61:
            self.pit.port61.write(0, memoryview(bytearray([value])))
        else:
            self.pit.write(port - 0x40, memoryview(bytearray([value])))

    def inb(self, port: int) -> int:
        buf = bytearray(1)
        if port == 0x61:
            self.pit.port61.read(0, memoryview(buf))
        else:
            self.pit.read(port - 0x40, memoryview(buf))
        return buf[0]

    def advance(self, ns: int, step: int | None = None) -> None:
        """Advance in steps so the timer callbacks see intermediate times."""
        step = step or ns
        done = 0
        while done < ns:
            d = min(step, ns - done)
            self.clock.advance(d)
            self.timers.run_due()
            done += d


def ticks_ns(ticks: int) -> int:
    return -(-ticks * NS // PIT_HZ)


def test_mode2_periodic_irq0_rate() -> None:
    r = Rig()
    latch = (PIT_HZ + 500) // 1000  # Linux's LATCH for HZ=1000
    r.outb(0x43, 0x34)  # channel 0, LSB then MSB, mode 2
    r.outb(0x40, latch & 0xFF)
    r.outb(0x40, latch >> 8)
    r.advance(NS, step=50_000)
    assert 999 <= len(r.irq.edges) <= 1001
    assert not r.irq.level  # pulses leave the line low
    # on a 1 us grid every gap is one period (999.85 us), to the microsecond
    r.irq.edges.clear()
    r.advance(20_000_000, step=1000)
    gaps = [b - a for a, b in zip(r.irq.edges, r.irq.edges[1:], strict=False)]
    assert len(gaps) >= 18
    assert all(abs(g - latch * NS / PIT_HZ) <= 1000 for g in gaps)


def test_mode3_square_wave_irq0_rate_and_lost_ticks_coalesced() -> None:
    r = Rig()
    r.outb(0x43, 0x36)  # mode 3
    r.outb(0x40, 0x00)
    r.outb(0x40, 0x00)  # 65536: 18.2 Hz
    r.advance(NS, step=1_000_000)
    assert len(r.irq.edges) == 18
    # the host thread was late by 10 periods: one interrupt, then back on the grid
    n = len(r.irq.edges)
    r.advance(ticks_ns(65536) * 10)
    assert len(r.irq.edges) == n + 1


def test_mode0_one_shot_irq0() -> None:
    r = Rig()
    r.outb(0x43, 0x30)  # mode 0
    r.outb(0x40, 0xE8)
    r.outb(0x40, 0x03)  # 1000 ticks
    r.advance(ticks_ns(1000) - 1000)
    assert not r.irq.level
    r.advance(1000)
    assert r.irq.level  # OUT high at terminal count and stays
    r.advance(NS)
    assert len(r.irq.edges) == 1
    # Linux's pit_next_event writes just a new count: OUT low, then high again
    r.outb(0x40, 0x64)
    r.outb(0x40, 0x00)
    assert not r.irq.level
    r.advance(ticks_ns(100))
    assert r.irq.level and len(r.irq.edges) == 2


def test_shutdown_stops_periodic() -> None:
    r = Rig()
    r.outb(0x43, 0x34)
    r.outb(0x40, 0xA9)
    r.outb(0x40, 0x04)
    r.advance(10_000_000, step=100_000)
    n = len(r.irq.edges)
    assert n >= 9
    r.outb(0x43, 0x30)  # Linux pit_shutdown
    r.advance(10_000_000, step=100_000)
    assert len(r.irq.edges) == n


def test_quick_pit_calibrate_channel2() -> None:
    r = Rig()
    # outb((inb(0x61) & ~0x02) | 0x01, 0x61): gate 2 high, speaker off
    r.outb(0x61, (r.inb(0x61) & ~0x02) | 0x01)
    r.outb(0x43, 0xB0)  # channel 2, LSB/MSB, mode 0, binary
    r.outb(0x42, 0xFF)
    r.outb(0x42, 0xFF)
    lsb, msb = r.inb(0x42), r.inb(0x42)
    assert msb == 0xFF and lsb == 0xFF
    # pit_expect_msb: the MSB counts down once every 256 ticks
    for i in range(1, 50):
        r.clock.advance(ticks_ns(256))
        r.inb(0x42)
        assert r.inb(0x42) == 0xFF - i
    assert not r.inb(0x61) & 0x20  # OUT2 still low


def test_pit_calibrate_tsc_polls_out2() -> None:
    r = Rig()
    r.outb(0x61, (r.inb(0x61) & ~0x02) | 0x01)
    latch = PIT_HZ // (1000 // 50)  # 50 ms
    r.outb(0x43, 0xB0)
    r.outb(0x42, latch & 0xFF)
    r.outb(0x42, latch >> 8)
    r.clock.advance(ticks_ns(latch) - 2000)
    assert not r.inb(0x61) & 0x20
    r.clock.advance(2000)
    assert r.inb(0x61) & 0x20


def test_gate_low_holds_mode0_count() -> None:
    r = Rig()
    r.outb(0x61, 0x00)
    r.outb(0x43, 0xB0)
    r.outb(0x42, 0x00)
    r.outb(0x42, 0x10)  # 0x1000
    r.clock.advance(NS // 100)
    assert (r.inb(0x42), r.inb(0x42)) == (0x00, 0x10)  # gate low: not counting
    r.outb(0x61, 0x01)
    r.clock.advance(ticks_ns(0x100))
    r.outb(0x61, 0x00)
    r.clock.advance(NS // 100)
    assert (r.inb(0x42), r.inb(0x42)) == (0x00, 0x0F)


def test_latch_command() -> None:
    r = Rig()
    r.outb(0x43, 0x34)
    r.outb(0x40, 0x00)
    r.outb(0x40, 0x10)  # 4096
    r.clock.advance(ticks_ns(0x10))
    r.outb(0x43, 0x00)  # latch channel 0
    r.clock.advance(ticks_ns(0x100))  # the latch holds while the counter moves on
    assert r.inb(0x40) == 0xF0
    assert r.inb(0x40) == 0x0F
    # afterwards live reads resume
    assert (r.inb(0x40) | r.inb(0x40) << 8) == 0x1000 - 0x110


def test_read_back_status_and_count() -> None:
    r = Rig()
    r.outb(0x43, 0xB0)  # channel 2 mode 0: OUT low after the control word
    r.outb(0x43, 0xE8)  # read-back status only, channel 2
    assert r.inb(0x42) == 0x70  # OUT 0, null count 1, LSB/MSB, mode 0, binary
    r.outb(0x61, 0x01)
    r.outb(0x42, 0x10)
    r.outb(0x42, 0x00)
    r.clock.advance(ticks_ns(0x20))
    r.outb(0x43, 0xC8)  # read-back count and status, channel 2
    assert r.inb(0x42) == 0xB0  # OUT high (terminal count passed), count loaded
    assert r.inb(0x42) == 0xF0  # count wrapped: 0x10 - 0x20 = 0xFFF0
    assert r.inb(0x42) == 0xFF


def test_lsb_only_and_msb_only_access() -> None:
    r = Rig()
    r.outb(0x61, 0x01)
    r.outb(0x43, 0x94)  # channel 2, LSB only, mode 2
    r.outb(0x42, 0x80)
    r.clock.advance(ticks_ns(0x10))
    assert r.inb(0x42) == 0x70
    r.outb(0x43, 0xA4)  # MSB only
    r.outb(0x42, 0x02)
    r.clock.advance(ticks_ns(0x100))
    assert r.inb(0x42) == 0x01


def test_mode3_output_and_count() -> None:
    r = Rig()
    r.outb(0x61, 0x01)
    r.outb(0x43, 0xB6)  # channel 2, mode 3
    r.outb(0x42, 100)
    r.outb(0x42, 0)
    r.clock.advance(ticks_ns(10))
    assert r.inb(0x61) & 0x20
    assert r.inb(0x42) == 80  # counts down by two
    r.inb(0x42)
    r.clock.advance(ticks_ns(50))
    assert not r.inb(0x61) & 0x20


def test_refresh_toggle_flips_on_reads() -> None:
    r = Rig()
    a, b = r.inb(0x61) & 0x10, r.inb(0x61) & 0x10
    assert a != b


def test_bcd_mode() -> None:
    r = Rig()
    r.outb(0x61, 0x01)
    r.outb(0x43, 0xB1)  # channel 2, mode 0, BCD
    r.outb(0x42, 0x00)
    r.outb(0x42, 0x10)  # 1000 decimal
    r.clock.advance(ticks_ns(1))
    assert (r.inb(0x42), r.inb(0x42)) == (0x99, 0x09)  # 999


def test_no_irq_line() -> None:
    clock = ManualClock()
    pit = Pit8254(TimerService(clock, start=False), irq0=NullIrq())
    pit.write_port(3, 0x34)
    pit.write_port(0, 0xA9)
    pit.write_port(0, 0x04)
    pit.close()


# -- saved state -------------------------------------------------------------------


def _roundtrip(p: Pit8254) -> object:
    from pyvirt.hypervisor.emulated.pit import PitState
    from pyvirt.state import decode, encode

    return decode(encode(p.save_state()), PitState, part="pit")


def test_state_periodic_channel0_keeps_phase_without_catch_up() -> None:
    r = Rig()
    r.outb(0x43, 0x34)  # mode 2, 1000 ticks
    r.outb(0x40, 1000 & 0xFF)
    r.outb(0x40, 1000 >> 8)
    period = 1000 * NS / PIT_HZ
    r.advance(int(period * 2.5), step=10_000)
    assert len(r.irq.edges) == 2
    st = _roundtrip(r.pit)
    r2 = Rig()
    r2.pit.restore_state(st, elapsed_ns=int(period * 10.25))  # type: ignore[arg-type]
    r2.advance(int(period * 0.25) - 10_000)
    assert r2.irq.edges == []  # the missed periods are not caught up
    r2.advance(20_000)
    assert len(r2.irq.edges) == 1  # the old phase: 13 periods after the old start
    r2.advance(int(period * 3), step=10_000)
    assert len(r2.irq.edges) == 4
    assert r2.timers.pending() == 1


def test_state_mode0_terminal_count_in_the_gap_fires_once() -> None:
    r = Rig()
    r.outb(0x43, 0x30)  # mode 0
    r.outb(0x40, 0x00)
    r.outb(0x40, 0x10)  # 4096 ticks, ~3.4 ms
    r.advance(1_000_000)
    st = _roundtrip(r.pit)
    r2 = Rig()
    r2.pit.restore_state(st, elapsed_ns=10_000_000)  # type: ignore[arg-type]
    r2.timers.run_due()
    assert len(r2.irq.edges) == 1 and r2.irq.level
    r2.advance(50_000_000)
    assert len(r2.irq.edges) == 1


def test_state_latch_and_readback_survive() -> None:
    r = Rig()
    r.outb(0x43, 0xB4)  # channel 2, word, mode 2
    r.outb(0x42, 0x34)
    r.outb(0x42, 0x12)
    r.outb(0x61, 0x01)  # gate on
    r.outb(0x43, 0x80)  # latch channel 2
    lsb = r.inb(0x42)
    st = _roundtrip(r.pit)
    r2 = Rig()
    r2.pit.restore_state(st, elapsed_ns=5_000_000)  # type: ignore[arg-type]
    msb = r2.inb(0x42)
    assert msb == r.inb(0x42)  # the latched MSB, not a live count
    assert 0 < (msb << 8 | lsb) <= 0x1234
    assert r2.inb(0x61) & 1 == 1  # channel 2's gate


def test_state_restore_into_used_pit_cancels_timers() -> None:
    r = Rig()
    st = r.pit.save_state()
    r.outb(0x43, 0x34)
    r.outb(0x40, 0x10)
    r.outb(0x40, 0x00)
    assert r.timers.pending() == 1
    r.pit.restore_state(st)
    assert r.timers.pending() == 0


def test_state_bad_records_are_refused() -> None:
    import dataclasses

    import pytest

    from pyvirt.state import StateError

    r = Rig()
    st = r.pit.save_state()
    bad_ch = dataclasses.replace(st.channels[0], reload=0)
    for bad in (dataclasses.replace(st, version=2),
                dataclasses.replace(st, channels=st.channels[:2]),
                dataclasses.replace(st, channels=(bad_ch, *st.channels[1:])),
                dataclasses.replace(st, channels=(dataclasses.replace(st.channels[0],
                                                                      latch=(1, 2, 3)),
                                                  *st.channels[1:])),
                dataclasses.replace(st, channels=(dataclasses.replace(st.channels[0],
                                                                      mode=7),
                                                  *st.channels[1:]))):
        with pytest.raises(StateError, match="pit"):
            r.pit.restore_state(bad)
