"""The KVM backend end to end, with the small test guest (tests/guests).

On this project's machines /dev/kvm is PVM, where a stock Linux kernel cannot
boot in useful time; these guests prove the KVM path: long-mode entry through
our loader, the interrupt-driven UART through the in-kernel IOAPIC, LAPIC
timer interrupts, the RTC, ACPI power-off, i8042 and 0xCF9 resets, INIT/SIPI
start-up of a second vCPU, and a triple fault.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import pyvirt_cmd, read_until, run_pyvirt

pytestmark = pytest.mark.kvm


def boot(guest: Path, test: str, *extra: str, input: bytes | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return run_pyvirt("run", "--accel", "kvm", "--kernel", str(guest), "--memory", "128M",
                      "--cmdline", f"test={test}", *extra, input=input, timeout=timeout)


def test_boot_and_poweroff(test_guest: Path) -> None:
    r = boot(test_guest, "boot")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"!"


def test_interrupt_driven_uart(test_guest: Path) -> None:
    r = boot(test_guest, "hello", input=b"hello pyvirt\nq")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "Hello from the pyvirt test guest (interrupt-driven UART)" in out
    assert "HELLO PYVIRT" in out  # echoed by the guest's RX interrupt handler
    assert out.rstrip().endswith("bye")


def test_lapic_timer_interrupts(test_guest: Path) -> None:
    r = boot(test_guest, "timer")
    assert r.returncode == 0, r.stderr
    assert b"timer: 10 ticks" in r.stdout


def test_rtc_reads_host_time(test_guest: Path) -> None:
    r = boot(test_guest, "rtc")
    assert r.returncode == 0, r.stderr
    m = re.search(rb"RTC (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", r.stdout)
    assert m, r.stdout
    guest = dt.datetime.strptime(m.group(1).decode(), "%Y-%m-%d %H:%M:%S").replace(
        tzinfo=dt.UTC)
    assert abs((dt.datetime.now(dt.UTC) - guest).total_seconds()) < 60


@pytest.mark.parametrize("test", ["reset", "reset-cf9"])
def test_reset_exits_with_on_reboot_exit(test_guest: Path, test: str) -> None:
    r = boot(test_guest, test, "--on-reboot", "exit")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(b"boot") == 1


def test_reset_restarts_by_default(test_guest: Path) -> None:
    p = subprocess.Popen(pyvirt_cmd("run", "--accel", "kvm", "--kernel", str(test_guest),
                                    "--memory", "64M", "--cmdline", "test=reset"),
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    seen = read_until(p.stdout.fileno(), b"boot\r\nboot\r\nboot")
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert seen.count(b"boot") >= 3, (seen, err)
    assert p.returncode == 0, err
    assert b"terminating on SIGTERM" in err


def test_triple_fault_reports_registers(test_guest: Path) -> None:
    r = boot(test_guest, "triple")
    assert r.returncode == 1
    err = r.stderr.decode()
    assert "triple fault" in err and "RIP=" in err and "CR3=0000000000009000" in err
    assert "Traceback" not in err


def test_second_vcpu_starts_through_init_sipi(test_guest: Path) -> None:
    r = boot(test_guest, "smp", "--cpus", "2", timeout=180)
    assert r.returncode == 0, r.stderr
    assert b"AP 1 up, APIC ID 1" in r.stdout
    assert b"cpus=2" in r.stdout


def test_sigterm_stops_a_halted_guest(test_guest: Path) -> None:
    p = subprocess.Popen(pyvirt_cmd("run", "--accel", "kvm", "--kernel", str(test_guest),
                                    "--memory", "64M", "--cmdline", "test=halt"),
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    assert b"halting" in read_until(p.stdout.fileno(), b"halting")
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0 and b"terminating on SIGINT" in err


def test_console_to_file(test_guest: Path, tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    r = boot(test_guest, "rtc", "--console", f"file:{log}")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"" and log.read_bytes().startswith(b"RTC ")


def test_verbose_names_the_accelerator(test_guest: Path) -> None:
    r = boot(test_guest, "boot", "--verbose")
    assert r.returncode == 0
    assert b"accelerator: kvm" in r.stderr


def test_terminal_raw_mode_and_ctrl_a_x(test_guest: Path) -> None:
    """On a terminal: raw mode while running, Ctrl-A x quits, the tty is restored."""
    import pty
    import termios

    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    p = subprocess.Popen(pyvirt_cmd("run", "--accel", "kvm", "--kernel", str(test_guest),
                                    "--memory", "64M", "--cmdline", "test=hello"),
                         stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    try:
        seen = read_until(master, b"interrupt-driven UART")
        assert b"interrupt-driven UART" in seen
        raw = termios.tcgetattr(slave)
        assert not raw[3] & termios.ICANON and not raw[3] & termios.ECHO  # raw mode
        os.write(master, b"ab")  # typed keys reach the guest, which echoes them upper-cased
        assert b"AB" in read_until(master, b"AB")
        os.write(master, b"\x01x")
        assert p.wait(timeout=30) == 0
        assert termios.tcgetattr(slave) == before  # the terminal is given back as it was
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
        os.close(slave)
