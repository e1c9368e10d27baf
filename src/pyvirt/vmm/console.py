"""The serial console on the user's side: terminal, pipe, file or nothing.

Output: the guest's UART calls ``write`` from a vCPU thread with the bytes it
transmitted; they go straight to the output fd (no buffering, so a crash loses
nothing). Input: the VMM's event loop watches ``input_fd`` and calls
``read_input`` when it is readable; on a terminal we switch it to raw mode
(restored on exit, even on a crash) and interpret the escape ``Ctrl-A x``
(quit) and ``Ctrl-A Ctrl-A`` (send a literal Ctrl-A), as QEMU does. When stdin
is not a terminal the bytes pass through untouched, so commands can be piped
into the guest's shell.
"""

from __future__ import annotations

import contextlib
import os
import sys
import termios
import tty
from typing import Any

from pyvirt.hostfile import open_host_file
from pyvirt.vmm.config import ConfigError, ConsoleSpec

__all__ = ["Console"]

ESCAPE = 0x01  # Ctrl-A
HELP = (
    b"\r\nC-a x    exit pyvirt\r\nC-a C-a  send C-a to the guest\r\nC-a h    this help\r\n"
)


class Console:
    def __init__(self, spec: ConsoleSpec, *, stdin_fd: int = 0, stdout_fd: int = 1) -> None:
        self.spec = spec
        self._saved_tty: list[Any] | None = None
        self._escape_pending = False
        self.quit_requested = False
        self.input_fd: int | None = None
        self._out_fd: int | None = None
        self._owns_out = False
        if spec.kind in ("stdio", "virtio"):
            self.input_fd = stdin_fd
            self._out_fd = stdout_fd
        self.is_tty = self.input_fd is not None and os.isatty(self.input_fd)

    def open(self) -> None:
        """Create (or truncate) the output file; enter raw mode when the input is a
        terminal. Called once everything else is checked, just before the guest
        first runs: a run that fails before leaves the file as it was."""
        if self.spec.kind == "file" and self._out_fd is None:
            self._out_fd = _open_output_file(self.spec)
            self._owns_out = True
        if self.is_tty and self.input_fd is not None and self._saved_tty is None:
            self._saved_tty = termios.tcgetattr(self.input_fd)
            tty.setraw(self.input_fd)

    def close(self) -> None:
        if self._saved_tty is not None and self.input_fd is not None:
            saved, self._saved_tty = self._saved_tty, None
            # TCSANOW: a hung-up or stopped reader must not keep us waiting for output to drain
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(self.input_fd, termios.TCSANOW, saved)
        if self._owns_out and self._out_fd is not None:
            fd, self._out_fd = self._out_fd, None
            os.close(fd)

    def write(self, data: bytes) -> None:
        """Guest output. Called from vCPU threads; os.write of a few bytes is atomic."""
        fd = self._out_fd
        if fd is None:
            return
        try:
            while data:
                n = os.write(fd, data)
                data = data[n:]
        except BlockingIOError:
            pass  # a non-blocking terminal that is full: drop rather than stall the vCPU
        except OSError:
            self._out_fd = None  # the reader went away (EPIPE): keep the guest running

    def message(self, text: str) -> None:
        """A line from pyvirt itself (not the guest), on stderr."""
        end = "\r\n" if self._saved_tty is not None else "\n"
        with contextlib.suppress(OSError):  # a hung-up terminal (SIGHUP) must not stop the exit
            sys.stderr.write(f"pyvirt: {text}{end}")
            sys.stderr.flush()

    def read_input(self) -> bytes | None:
        """Read what the user typed; None at end of input. Handles the escape on terminals."""
        assert self.input_fd is not None
        try:
            data = os.read(self.input_fd, 4096)
        except BlockingIOError:
            return b""
        except OSError:
            return None  # EIO: the terminal hung up (SIGHUP follows); no more input
        if not data:
            return None
        if not self.is_tty:
            return data
        return self._filter_escapes(data)

    def _filter_escapes(self, data: bytes) -> bytes:
        out = bytearray()
        for b in data:
            if self._escape_pending:
                self._escape_pending = False
                if b in (ord("x"), ord("X")):
                    self.quit_requested = True
                    break
                if b == ESCAPE:
                    out.append(ESCAPE)
                elif b in (ord("h"), ord("?")):
                    self.write(HELP)
                # any other key after C-a is swallowed, as in QEMU
            elif b == ESCAPE:
                self._escape_pending = True
            else:
                out.append(b)
        return bytes(out)


def _open_output_file(spec: ConsoleSpec) -> int:
    """Open ``console.path`` for writing without blocking (a FIFO is refused, not
    waited on) and truncate it only once it is known to be a regular file."""
    assert spec.path is not None
    fd, _ = open_host_file(spec.path, os.O_WRONLY | os.O_CREAT, what="console.path",
                           error=ConfigError)
    try:
        os.ftruncate(fd, 0)
    except OSError as exc:
        os.close(fd)
        raise ConfigError(f"console.path: {spec.path}: {exc.strerror}") from None
    return fd
