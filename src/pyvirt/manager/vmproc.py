"""One VMM process as the daemon sees it: spawned in its own session, found
again after a daemon restart by (pid, start time), and its end read from the
exit file it leaves.

A pid alone is not an identity (pids are reused): the start time in clock
ticks since boot (``/proc/PID/stat`` field 22) is recorded with it, and a
process is "ours" only when both match. Signals go through a pidfd, which
names the process itself, never a later one with the same pid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ExitRecord", "VmmProcess", "classify_exit", "last_log_line", "process_alive",
           "read_exit_file", "start_ticks"]

#: an exit file is one small JSON object; more than this is not one of ours
MAX_EXIT_FILE = 64 << 10


def start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks), None if no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read(4096)
    except OSError:
        return None
    # comm (field 2) may hold spaces and ')': the fields after it follow the last ')'
    rest = data[data.rfind(b")") + 2:].split()
    try:
        if rest[0] == b"Z":  # a zombie has ended: only its record is left
            return None
        return int(rest[19])
    except (IndexError, ValueError):
        return None


def process_alive(pid: int | None, ticks: int | None) -> bool:
    return pid is not None and ticks is not None and pid > 0 and start_ticks(pid) == ticks


@dataclass(frozen=True)
class ExitRecord:
    """What the VMM wrote when it ended (``--exit-file``)."""

    outcome: str  # poweroff | reboot | stopped | crash | error
    detail: str
    exit_status: int | None
    boot_count: int | None


def read_exit_file(path: Path) -> ExitRecord | None:
    """The record, or None when the file is missing, empty (a VMM killed by SIGKILL)
    or not a record."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_EXIT_FILE + 1)
    except OSError:
        return None
    if not raw.strip() or len(raw) > MAX_EXIT_FILE:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("outcome"), str):
        return None
    status = doc.get("exit_status")
    boots = doc.get("boot_count")
    return ExitRecord(outcome=doc["outcome"][:32], detail=_one_line(str(doc.get("detail", ""))),
                      exit_status=status if type(status) is int else None,
                      boot_count=boots if type(boots) is int else None)


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line[:500]


def last_log_line(path: Path) -> str:
    """The last non-empty line of the VMM's log (where its one-line error is)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 8192))
            tail = f.read()
    except OSError:
        return ""
    for line in reversed(tail.decode("utf-8", "replace").splitlines()):
        if line.strip():
            return _one_line(line.removeprefix("pyvirt: error: ").removeprefix("pyvirt: "))
    return ""


def classify_exit(record: ExitRecord | None, *, asked: str | None,
                  exit_code: int | None) -> tuple[str, str, str]:
    """(state, reason, detail) for a VMM that ended.

    ``asked``: what the daemon asked for ("destroy", "save", "shutdown", None);
    ``exit_code``: when the VMM was our child, its exit status (-N: killed by
    signal N, as ``Popen.returncode``)."""
    if record is None:
        if asked in ("destroy", "save"):
            return "shut off", "destroyed" if asked == "destroy" else "saved", ""
        if exit_code is not None and exit_code < 0:
            try:
                sig = signal.Signals(-exit_code).name
            except ValueError:
                sig = f"signal {-exit_code}"
            return "crashed", "vmm-died", f"the VMM process was killed by {sig}"
        if exit_code is not None:
            return ("crashed", "vmm-died", "the VMM process ended without an exit record "
                    f"(exit status {exit_code})")
        return "crashed", "vmm-died", "the VMM process ended without an exit record"
    match record.outcome:
        case "poweroff" | "reboot":
            return "shut off", "shutdown", record.detail
        case "stopped":
            if asked == "destroy":
                return "shut off", "destroyed", record.detail
            if asked == "save":
                return "shut off", "saved", record.detail
            return "shut off", "shutdown", record.detail
        case "crash":
            return "crashed", "panicked", record.detail
        case _:
            return "shut off", "failed", record.detail


class VmmProcess:
    """A running VMM: our child (``popen``) or one found again after a restart.

    ``pidfd`` stays open while we watch it: readable once the process ended."""

    def __init__(self, pid: int, ticks: int | None, popen: subprocess.Popen[bytes] | None,
                 pidfd: int | None) -> None:
        self.pid = pid
        self.ticks = ticks
        self.popen = popen
        self.pidfd = pidfd

    @classmethod
    def spawn(cls, argv: Sequence[str], *, log_path: Path, cwd: Path,
              env: Mapping[str, str] | None = None, pass_fds: Sequence[int] = (),
              extra: Mapping[str, Any] | None = None) -> VmmProcess:
        """Start ``argv`` in a session of its own (a terminal's signals or the
        daemon's end never reach it), stdin /dev/null, output appended to ``log_path``."""
        kwargs: dict[str, Any] = {"start_new_session": True, "close_fds": True, "cwd": cwd}
        if env is not None:
            kwargs["env"] = dict(env)
        kwargs.update(extra or {})  # the privilege's user, groups, preexec, env...
        kwargs["pass_fds"] = tuple(sorted({*pass_fds, *kwargs.get("pass_fds", ())}))
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            popen = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=fd,
                                     stderr=subprocess.STDOUT, **kwargs)
        finally:
            os.close(fd)
        ticks = start_ticks(popen.pid)
        try:
            pidfd: int | None = os.pidfd_open(popen.pid)
        except OSError:
            pidfd = None
        return cls(popen.pid, ticks, popen, pidfd)

    @classmethod
    def adopt(cls, pid: int, ticks: int) -> VmmProcess | None:
        """The process ``pid`` if it still is the one that started at ``ticks``."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return None
        # checked after the pidfd is held: the pidfd then names this very process
        if start_ticks(pid) != ticks:
            os.close(pidfd)
            return None
        return cls(pid, ticks, None, pidfd)

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return process_alive(self.pid, self.ticks)

    def reap(self) -> int | None:
        """Collect the exit status when it is our child (no zombie left): the
        exit code (-N: killed by signal N), None if not ours or still running."""
        if self.popen is None:
            return None
        return self.popen.poll()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, sig)
            elif self.alive():
                os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
