"""The CMOS real-time clock and NVRAM (Motorola MC146818 compatible).

Map at port 0x70 with length 2: offset 0 is the index register (bit 7 is the
NMI mask on PCs; ignored), offset 1 reads/writes the selected CMOS byte.

The time registers are not stored: they are computed on every read from
``clock() + offset`` (UTC), in the format Register B asks for (DM bit 2:
binary or BCD; bit 1: 24 or 12 hour). The guest sets the clock the way the
MC146818 datasheet prescribes (and Linux's ``mc146818_set_time`` does): set
Register B's SET bit, which freezes the registers, write them, clear SET; the
written time then becomes a new ``offset`` from the host clock. A time
register written without SET adjusts the offset at once.

Register A reads UIP as 0 (an update is never observed in progress) and keeps
the divider/rate bits the guest writes. Register C is cleared by reading (and
that drops the IRQ line); Register D reads VRT (battery good).

Interrupts (only with ``irq``): update-ended (UF/UIE) and alarm (AF/AIE, with
the datasheet's "don't care" alarm bytes 0xC0-0xFF) are raised once per
second of guest time by a daemon ``threading.Timer`` that runs only while
UIE or AIE is set (this is what ``hwclock`` waits on through /dev/rtc).
Periodic interrupts (PIE/PF) are not generated. Without ``irq`` no timer runs
and UF/AF are never set.

Threading: a ``threading.Lock`` guards index, RAM and the timer handle; the
IRQ level is set under it; no other callbacks.

Saved state (``RtcState``): the index register, the 128 CMOS bytes (Register
B/C hold the interrupt enables and flags; the time registers matter only while
SET freezes them) and the guest's offset from host wall time. Restoring keeps
the offset, not the time: the guest's clock reads the host's *current* time
plus the offset, so a VM restored later has moved on with the wall clock, and
the update/alarm timer is armed again for the next second boundary (no burst
of interrupts for the seconds the VM was saved).
"""

from __future__ import annotations

import calendar
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from pyvirt.devices.bus import put_byte
from pyvirt.devices.irq import IrqLine
from pyvirt.devices.statecheck import check_bits, check_bytes, check_float, check_int
from pyvirt.state import check_version

__all__ = ["CmosRtc", "RtcState"]

# Register indices (MC146818 datasheet, address map)
_SECONDS = 0x00
_MINUTES = 0x02
_HOURS = 0x04
_DAY_OF_WEEK = 0x06
_DAY_OF_MONTH = 0x07
_MONTH = 0x08
_YEAR = 0x09
_REG_A = 0x0A
_REG_B = 0x0B
_REG_C = 0x0C
_REG_D = 0x0D
_CENTURY = 0x32  # the PC/AT convention; ACPI FADT CENTURY points here
_TIME_REGS = frozenset(
    (_SECONDS, _MINUTES, _HOURS, _DAY_OF_WEEK, _DAY_OF_MONTH, _MONTH, _YEAR, _CENTURY))

_A_UIP = 0x80
_B_SET = 0x80
_B_AIE = 0x20
_B_UIE = 0x10
_C_IRQF = 0x80
_C_AF = 0x20
_C_UF = 0x10
_ALARM_OF = ((0x01, _SECONDS), (0x03, _MINUTES), (0x05, _HOURS))
_ALARM_DONT_CARE = 0xC0  # alarm bytes 0xC0-0xFF match any value
_B_DM_BINARY = 0x04
_B_24H = 0x02
_D_VRT = 0x80
_HOUR_PM = 0x80  # 12-hour mode: bit 7 of the hours byte

_CMOS_SIZE = 128
_C_FLAGS = 0xF0  # IRQF, PF, AF, UF: the bits Register C can hold
# The clock reads through time.gmtime and writes years 1-9999 (_apply_image).
_GUEST_TIME_MIN = float(calendar.timegm((1, 1, 1, 0, 0, 0, 0, 0, 0)))
_GUEST_TIME_MAX = float(calendar.timegm((9999, 12, 31, 23, 59, 59, 0, 0, 0)))


@dataclass(frozen=True)
class RtcState:
    version: int
    index: int
    cmos: bytes  # 128 bytes; time registers as latched while Register B's SET is 1
    offset_s: float  # guest wall time minus host wall time


def _to_bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


def _from_bcd(v: int) -> int:
    hi, lo = v >> 4, v & 0x0F
    if hi > 9 or lo > 9:
        raise ValueError(f"bad BCD byte {v:#x}")
    return hi * 10 + lo


class CmosRtc:
    """MC146818-style RTC with 128 bytes of CMOS RAM. Map at 0x70, length 2."""

    STATE_VERSION: ClassVar[int] = 1
    state_type: ClassVar[type] = RtcState

    def __init__(self, clock: Callable[[], float] = time.time,
                 irq: IrqLine | None = None) -> None:
        self._clock = clock
        self._irq = irq
        self._timer: threading.Timer | None = None
        self._timer_gen = 0  # which timer is current: a cancelled one that fires anyway is stale
        self._irq_level = False
        self._interrupts = 0  # IRQ8 assertions, for metrics(); never reset
        self._closed = False
        self._lock = threading.Lock()
        self._index = 0
        self._ram = bytearray(_CMOS_SIZE)
        self._ram[_REG_A] = 0x26  # 32.768 kHz time base, 1.024 kHz periodic rate
        self._ram[_REG_B] = _B_24H  # 24-hour, BCD
        self._ram[_REG_D] = _D_VRT
        self._offset = 0.0  # guest time minus host time, seconds

    # -- host side ---------------------------------------------------------

    def set_cmos(self, index: int, value: int) -> None:
        """Preset a NVRAM byte (e.g. memory size fields) before the guest runs."""
        if index in _TIME_REGS or index in (_REG_A, _REG_B, _REG_C, _REG_D):
            raise ValueError(f"CMOS index {index:#x} is a clock register")
        with self._lock:
            self._ram[index] = value & 0xFF

    def guest_time(self) -> float:
        """The guest's idea of now, seconds since the epoch (UTC)."""
        with self._lock:
            return self._clock() + self._offset

    def update_cycle(self) -> None:
        """End of an update cycle (once per second): set UF/AF and raise IRQF if enabled.

        Called by the internal timer; public so tests and a VMM-owned tick can drive it.
        """
        with self._lock:
            self._update_cycle()

    def metrics(self) -> dict[str, int]:
        return {"interrupts": self._interrupts}

    # -- saved state (the VM is paused) ------------------------------------

    def save_state(self) -> RtcState:
        with self._lock:
            return RtcState(version=self.STATE_VERSION, index=self._index,
                            cmos=bytes(self._ram), offset_s=self._offset)

    def restore_state(self, state: RtcState) -> None:
        part = "rtc"
        check_version(part, state.version, self.STATE_VERSION)
        index = check_int(part, "index", state.index, 0, _CMOS_SIZE - 1)
        cmos = check_bytes(part, "cmos", state.cmos, length=_CMOS_SIZE)
        check_bits(part, "cmos[0xa]", cmos[_REG_A], 0xFF & ~_A_UIP)
        check_bits(part, "cmos[0xc]", cmos[_REG_C], _C_FLAGS)
        now = self._clock()
        offset = check_float(part, "offset_s", state.offset_s,
                             _GUEST_TIME_MIN - now, _GUEST_TIME_MAX - now)
        with self._lock:
            self._cancel_timer()
            self._index = index
            self._ram[:] = cmos
            self._offset = offset
            level = bool(cmos[_REG_C] & _C_IRQF)
            if self._irq is not None:
                # driven whatever the cached level: the line may be new or left high
                self._irq_level = level
                self._irq.set_level(level)
            self._schedule()

    def close(self) -> None:
        """Stop the interrupt timer, if running."""
        with self._lock:
            self._closed = True
            self._cancel_timer()

    # -- bus interface -----------------------------------------------------

    def read(self, offset: int, data: memoryview) -> None:
        with self._lock:
            # The index register is write-only; reading it floats (0xff).
            value = self._read_selected() if offset == 1 else 0xFF
        put_byte(data, value)

    def write(self, offset: int, data: memoryview) -> None:
        value = data[0]
        with self._lock:
            if offset == 0:
                self._index = value & 0x7F  # bit 7 gates NMI on PCs: not modelled
            elif offset == 1:
                self._write_selected(value)

    # -- internals (lock held) ---------------------------------------------

    def _frozen(self) -> bool:
        return bool(self._ram[_REG_B] & _B_SET)

    def _read_selected(self) -> int:
        idx = self._index
        if idx in _TIME_REGS and not self._frozen():
            return self._time_image()[idx]
        if idx == _REG_A:
            return self._ram[_REG_A] & ~_A_UIP & 0xFF
        if idx == _REG_C:
            value = self._ram[_REG_C]
            self._ram[_REG_C] = 0  # all flags clear on read (datasheet, Register C)
            self._set_irq(False)
            return value
        if idx == _REG_D:
            return _D_VRT
        return self._ram[idx]

    def _write_selected(self, value: int) -> None:
        idx = self._index
        if idx in _TIME_REGS:
            if self._frozen():
                self._ram[idx] = value  # takes effect when SET is cleared
            else:
                image = self._time_image()
                image[idx] = value
                self._apply_image(image)
        elif idx == _REG_A:
            self._ram[_REG_A] = value & ~_A_UIP & 0xFF  # UIP is read-only
        elif idx == _REG_B:
            old = self._ram[_REG_B]
            if value & _B_SET:
                value &= ~_B_UIE  # setting SET clears UIE (datasheet, Register B)
                if not old & _B_SET:
                    # Freeze: latch the current time into the registers (in the old
                    # format: the guest changes DM/24h before or together with SET).
                    image = self._time_image()
                    for r in _TIME_REGS:
                        self._ram[r] = image[r]
            self._ram[_REG_B] = value
            if old & _B_SET and not value & _B_SET:
                self._apply_image(self._ram)
            self._schedule()
        elif idx in (_REG_C, _REG_D):
            pass  # read-only
        else:
            self._ram[idx] = value

    def _schedule(self) -> None:
        """Keep a timer armed for the next second boundary while UIE or AIE is set."""
        if self._irq is None or self._timer is not None or self._closed:
            return
        if not self._ram[_REG_B] & (_B_UIE | _B_AIE):
            return
        now = self._clock() + self._offset
        self._timer_gen += 1
        timer = threading.Timer(1.0 - (now % 1.0), self._on_timer, args=(self._timer_gen,))
        timer.daemon = True
        self._timer = timer
        timer.start()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_gen += 1  # a callback already past cancel() finds itself stale

    def _on_timer(self, gen: int) -> None:
        with self._lock:
            if gen != self._timer_gen:
                return  # cancelled (close, restore) after it started to fire
            self._timer = None
            self._update_cycle()
            self._schedule()

    def _update_cycle(self) -> None:
        b = self._ram[_REG_B]
        if b & _B_SET:
            return  # updates are inhibited while SET is 1
        flags = _C_UF
        image = self._time_image()
        if all(self._ram[a] >= _ALARM_DONT_CARE or self._ram[a] == image[t]
               for a, t in _ALARM_OF):
            flags |= _C_AF
        c = self._ram[_REG_C] | flags
        if c & b & (_B_UIE | _B_AIE):  # UF/AF share bit positions with UIE/AIE
            c |= _C_IRQF
        self._ram[_REG_C] = c
        if c & _C_IRQF:
            self._set_irq(True)

    def _set_irq(self, level: bool) -> None:
        if self._irq is not None and level != self._irq_level:
            self._irq_level = level
            self._interrupts += level
            self._irq.set_level(level)

    def _enc(self, v: int) -> int:
        return v if self._ram[_REG_B] & _B_DM_BINARY else _to_bcd(v)

    def _dec(self, v: int) -> int:
        return v if self._ram[_REG_B] & _B_DM_BINARY else _from_bcd(v)

    def _time_image(self) -> bytearray:
        """A 0x33-byte scratch image with the time registers for guest-now filled in."""
        t = time.gmtime(int(self._clock() + self._offset))
        image = bytearray(_CENTURY + 1)
        hour = t.tm_hour
        if self._ram[_REG_B] & _B_24H:
            hour_byte = self._enc(hour)
        else:
            h12 = hour % 12 or 12
            hour_byte = self._enc(h12) | (_HOUR_PM if hour >= 12 else 0)
        image[_SECONDS] = self._enc(t.tm_sec)
        image[_MINUTES] = self._enc(t.tm_min)
        image[_HOURS] = hour_byte
        image[_DAY_OF_WEEK] = self._enc((t.tm_wday + 1) % 7 + 1)  # 1 = Sunday
        image[_DAY_OF_MONTH] = self._enc(t.tm_mday)
        image[_MONTH] = self._enc(t.tm_mon)
        image[_YEAR] = self._enc(t.tm_year % 100)
        image[_CENTURY] = self._enc(t.tm_year // 100)
        return image

    def _apply_image(self, image: bytearray) -> None:
        """Make the time in ``image`` the guest's now; invalid times are ignored."""
        try:
            sec = self._dec(image[_SECONDS])
            minute = self._dec(image[_MINUTES])
            hour_byte = image[_HOURS]
            if self._ram[_REG_B] & _B_24H:
                hour = self._dec(hour_byte)
            else:
                hour = self._dec(hour_byte & ~_HOUR_PM) % 12
                if hour_byte & _HOUR_PM:
                    hour += 12
            mday = self._dec(image[_DAY_OF_MONTH])
            month = self._dec(image[_MONTH])
            year = self._dec(image[_CENTURY]) * 100 + self._dec(image[_YEAR])
        except ValueError:
            return
        # binary mode lets the century byte reach 255; timegm() takes years 1-9999 only
        if not (sec < 60 and minute < 60 and hour < 24 and 1 <= month <= 12
                and 1 <= year <= 9999):
            return
        if not 1 <= mday <= calendar.monthrange(year, month)[1]:
            return
        when = calendar.timegm((year, month, mday, hour, minute, sec, 0, 0, 0))
        self._offset = when - self._clock()
