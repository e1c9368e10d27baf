"""ACPI fixed-hardware PM registers (ACPI 6.x §4.8) and the 0xCF9 reset port.

``AcpiPm`` is mapped at ACPI_PM_BASE with length ACPI_PM_LEN and holds:

    +0  PM1a_STS  16-bit, write 1 to clear   (ACPI 6.x §4.8.3.1.1)
    +2  PM1a_EN   16-bit                     (§4.8.3.1.2)
    +4  PM1a_CNT  16-bit                     (§4.8.3.2.1)
    +8  PM_TMR    32-bit, read-only          (§4.8.3.3)

Other bytes read 0 and ignore writes. Any width at any offset is accepted:
each byte is handled as a byte of the 16/32-bit register it falls in.

SCI is level-triggered, active high: asserted while any enabled status bit is
set (§4.8.3.1). The PM timer counts at ACPI_PM_TMR_HZ from ``clock_ns``;
TMR_STS (set when timer bit 31 toggles, §4.8.3.3) is evaluated lazily, when
PM1a_STS is read or written, so TMR_EN does not by itself raise an SCI on time.

Writing PM1a_CNT with SLP_EN records WAK_STS and calls ``on_sleep(SLP_TYP)``
after the lock is released; the VMM powers off for ACPI_S5_SLP_TYP. For other
sleep types the VMM may do nothing: WAK_STS is already set, so a guest polling
for wake after S1 (as ACPICA does) sees an immediate wake instead of hanging.

There is no GPE block (the FADT declares none), so PM1 is the whole event model.

Threading: each device has a ``threading.Lock``; the SCI level is set under it,
callbacks run after it is released.

Saved state (``AcpiPmState``, ``ResetControlState``): PM1 status, enable and
control, and the PM timer's value. The timer continues from the saved value
on restore (its base is moved on the host's monotonic clock), so the guest
sees it neither jump by the time the VM spent saved nor run backwards; the
SCI level follows from status and enable and is driven again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from pyvirt.arch.x86_64.layout import ACPI_PM_TMR_HZ
from pyvirt.devices.bus import put_byte
from pyvirt.devices.irq import IrqLine
from pyvirt.devices.statecheck import check_bits, check_int
from pyvirt.state import StateError, check_version

__all__ = ["AcpiPm", "AcpiPmState", "ResetControl", "ResetControlState"]

# PM1 status / enable bits (ACPI 6.x Table 4.13 / 4.14)
TMR_STS = 1 << 0
GBL_STS = 1 << 5
PWRBTN_STS = 1 << 8
SLPBTN_STS = 1 << 9
RTC_STS = 1 << 10
WAK_STS = 1 << 15
_EVENTS = TMR_STS | GBL_STS | PWRBTN_STS | SLPBTN_STS | RTC_STS  # bits with an _EN twin

# PM1 control bits (ACPI 6.x Table 4.16)
SCI_EN = 1 << 0
_SLP_TYP_SHIFT = 10
_SLP_TYP_MASK = 0x7 << _SLP_TYP_SHIFT
SLP_EN = 1 << 13
_GBL_RLS = 1 << 2  # write-only: would signal firmware; there is none
_CNT_WRITE_ONLY = SLP_EN | _GBL_RLS

_STS_OFF = 0
_EN_OFF = 2
_CNT_OFF = 4
_TMR_OFF = 8
_STS_BITS = _EVENTS | WAK_STS  # the status bits anything here sets


@dataclass(frozen=True)
class AcpiPmState:
    version: int
    pm1_sts: int
    pm1_en: int
    pm1_cnt: int
    pm_tmr: int  # the 32-bit PM timer value when saved
    tmr_msb_seen: int  # timer bit 31 at the last TMR_STS evaluation


@dataclass(frozen=True)
class ResetControlState:
    version: int
    value: int


class AcpiPm:
    """PM1a event/control blocks and the PM timer. Map at ACPI_PM_BASE, ACPI_PM_LEN."""

    STATE_VERSION: ClassVar[int] = 1
    state_type: ClassVar[type] = AcpiPmState

    def __init__(self, sci: IrqLine, on_sleep: Callable[[int], None],
                 clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self._sci = sci
        self._on_sleep = on_sleep
        self._clock_ns = clock_ns
        self._lock = threading.Lock()
        self._t0 = clock_ns()
        self._sts = 0
        self._en = 0
        self._cnt = SCI_EN  # ACPI mode is always on: no SMI_CMD handover (§4.8.3.2.1)
        self._sci_level = False
        self._tmr_msb_seen = 0  # timer bit 31 at the last TMR_STS evaluation
        self._sci_count = 0  # SCI assertions, for metrics(); never reset

    # -- host side ---------------------------------------------------------

    def press_power_button(self) -> None:
        """The power button fixed event (§4.8.2.2.1.1): the guest decides what to do.

        PWRBTN_STS is set; the SCI rises only while the OS has PWRBTN_EN set
        (Linux's ACPI core sets it once a handler, the ``button`` driver, is
        installed for the fixed event).
        """
        with self._lock:
            self._sts |= PWRBTN_STS
            self._update_sci()

    def metrics(self) -> dict[str, int]:
        return {"sci": self._sci_count}

    # -- saved state (the VM is paused) ------------------------------------

    def save_state(self) -> AcpiPmState:
        with self._lock:
            return AcpiPmState(version=self.STATE_VERSION, pm1_sts=self._sts, pm1_en=self._en,
                               pm1_cnt=self._cnt, pm_tmr=self._timer(),
                               tmr_msb_seen=self._tmr_msb_seen)

    def restore_state(self, state: AcpiPmState) -> None:
        part = "acpi_pm"
        check_version(part, state.version, self.STATE_VERSION)
        sts = check_bits(part, "pm1_sts", state.pm1_sts, _STS_BITS)
        en = check_int(part, "pm1_en", state.pm1_en, 0, 0xFFFF)
        cnt = check_int(part, "pm1_cnt", state.pm1_cnt, 0, 0xFFFF)
        if not cnt & SCI_EN or cnt & SLP_EN:
            raise StateError(f"{part}: saved state field pm1_cnt = {cnt:#x} has SCI_EN "
                             "clear or SLP_EN set")
        tmr = check_int(part, "pm_tmr", state.pm_tmr, 0, 0xFFFF_FFFF)
        msb = check_int(part, "tmr_msb_seen", state.tmr_msb_seen, 0, 1)
        with self._lock:
            self._sts, self._en, self._cnt, self._tmr_msb_seen = sts, en, cnt, msb
            # The smallest base from which _timer() reads ``tmr`` now: the timer
            # continues from where it stood, counting on the host's monotonic clock.
            ns_for_tmr = -(-tmr * 1_000_000_000 // ACPI_PM_TMR_HZ)  # rounded up
            self._t0 = self._clock_ns() - ns_for_tmr
            level = bool(sts & en & _EVENTS)
            self._sci_level = level
            self._sci.set_level(level)  # whatever the line held before

    # -- bus interface -----------------------------------------------------

    def read(self, offset: int, data: memoryview) -> None:
        with self._lock:
            tmr = 0
            if offset + len(data) > _TMR_OFF or offset < _EN_OFF:
                tmr = self._timer()
                self._poll_timer_overflow(tmr)
                self._update_sci()
            for i in range(len(data)):
                data[i] = self._read_byte(offset + i, tmr)

    def write(self, offset: int, data: memoryview) -> None:
        sleep_type = -1
        with self._lock:
            for i in range(len(data)):
                self._write_byte(offset + i, data[i])
            if self._cnt & SLP_EN:
                self._cnt &= ~SLP_EN  # write-only bit: reads as 0
                sleep_type = (self._cnt & _SLP_TYP_MASK) >> _SLP_TYP_SHIFT
                self._sts |= WAK_STS
            if offset < _EN_OFF:
                self._poll_timer_overflow(self._timer())
            self._update_sci()
        if sleep_type >= 0:
            self._on_sleep(sleep_type)

    # -- internals (lock held) ---------------------------------------------

    def _timer(self) -> int:
        ticks = (self._clock_ns() - self._t0) * ACPI_PM_TMR_HZ // 1_000_000_000
        return ticks & 0xFFFF_FFFF

    def _poll_timer_overflow(self, tmr: int) -> None:
        msb = tmr >> 31
        if msb != self._tmr_msb_seen:
            self._tmr_msb_seen = msb
            self._sts |= TMR_STS

    def _read_byte(self, off: int, tmr: int) -> int:
        if off < _EN_OFF:
            reg = self._sts
        elif off < _CNT_OFF:
            reg = self._en
        elif off < _CNT_OFF + 2:
            reg = (self._cnt & ~_CNT_WRITE_ONLY) | SCI_EN
        elif _TMR_OFF <= off < _TMR_OFF + 4:
            return (tmr >> (8 * (off - _TMR_OFF))) & 0xFF
        else:
            return 0
        return (reg >> (8 * (off & 1))) & 0xFF

    def _write_byte(self, off: int, value: int) -> None:
        shift = 8 * (off & 1)
        if off < _EN_OFF:
            self._sts &= ~(value << shift)  # write 1 to clear
        elif off < _CNT_OFF:
            self._en = (self._en & ~(0xFF << shift)) | (value << shift)
        elif off < _CNT_OFF + 2:
            self._cnt = (self._cnt & ~(0xFF << shift)) | (value << shift) | SCI_EN
        # PM_TMR is read-only; other bytes are reserved.

    def _update_sci(self) -> None:
        level = bool(self._sts & self._en & _EVENTS)
        if level != self._sci_level:
            self._sci_level = level
            self._sci_count += level
            self._sci.set_level(level)


class ResetControl:
    """The PCH reset control register at 0xCF9 (length 1)."""

    _RST_CPU = 0x04  # writing 1 starts the reset; SYS_RST (0x02) picks hard vs soft
    _MASK = 0x0E  # SYS_RST, RST_CPU, FULL_RST

    STATE_VERSION: ClassVar[int] = 1
    state_type: ClassVar[type] = ResetControlState

    def __init__(self, reset: Callable[[], None]) -> None:
        self._reset = reset
        self._lock = threading.Lock()
        self._value = 0

    def save_state(self) -> ResetControlState:
        with self._lock:
            return ResetControlState(version=self.STATE_VERSION, value=self._value)

    def restore_state(self, state: ResetControlState) -> None:
        check_version("reset_control", state.version, self.STATE_VERSION)
        value = check_bits("reset_control", "value", state.value, self._MASK)
        with self._lock:
            self._value = value

    def read(self, offset: int, data: memoryview) -> None:
        with self._lock:
            value = self._value
        put_byte(data, value)

    def write(self, offset: int, data: memoryview) -> None:
        value = data[0]
        with self._lock:
            self._value = value & self._MASK
        if value & self._RST_CPU:
            self._reset()
