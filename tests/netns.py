"""Throw-away network namespaces for tests (never touching the host's interfaces).

    with NetNs() as ns:                      # `ip netns add pvt-<random>`, deleted on exit
        ns.run("ip link add br0 type bridge")   # a command inside it (str: split on spaces)
        p = ns.popen(["iperf3", "-s"])          # a long-running one (killed on exit if alive)
        tap = ns.call(open_tap, "tap0", what="nics[0]")  # a Python call on a thread inside it
        with ns.entered():                      # this thread inside it for a while
            s = socket.socket(...)

Sockets and TAPs belong to the namespace of the thread that creates them, so
``call``/``entered`` are enough to run pyvirt's own code there; ``popen`` and
``run`` use ``ip netns exec`` (which also mounts a /sys of the namespace).
Needs root (CAP_SYS_ADMIN); ``available()`` says whether namespaces can be
made here.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import secrets
import shlex
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

__all__ = ["NetNs", "available"]

T = TypeVar("T")

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    # os.setns is Python >= 3.12
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@functools.cache
def available() -> str | None:
    """None when this process can create network namespaces, else why not (checked
    once per process)."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    try:
        with NetNs():
            pass
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"cannot create a network namespace: {exc}"
    return None


Cmd = str | Sequence[str]


class NetNs:
    """One named network namespace, created on ``__enter__`` (with ``lo`` up),
    deleted with everything in it on ``__exit__``."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"pvt-{secrets.token_hex(4)}"
        self.path = f"/run/netns/{self.name}"
        self._procs: list[subprocess.Popen[Any]] = []

    def __enter__(self) -> NetNs:
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        try:
            self.run("ip link set lo up")
        except BaseException:
            self._delete()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        self._delete()

    def _delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    def _argv(self, cmd: Cmd) -> list[str]:
        argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, cmd: Cmd, *, check: bool = True, timeout: float = 30,
            input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside, wait for it; output captured as text. ``check``:
        a non-zero exit raises ``CalledProcessError`` with its stderr."""
        r = subprocess.run(self._argv(cmd), capture_output=True, timeout=timeout,
                           input=input)
        out = subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(errors="replace"),
                                          r.stderr.decode(errors="replace"))
        if check and r.returncode != 0:
            raise subprocess.CalledProcessError(r.returncode, r.args, out.stdout, out.stderr)
        return out

    def popen(self, cmd: Cmd, **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a command inside (``subprocess.Popen`` keywords); killed on exit if
        still running."""
        p = subprocess.Popen(self._argv(cmd), **kwargs)
        self._procs.append(p)
        return p

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """The calling thread is inside the namespace for the ``with`` body. Only the
        thread moves (the process's other threads stay where they are)."""
        back = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            target = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield
            finally:
                _setns(back)
        finally:
            os.close(back)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on a fresh thread inside the namespace; its
        result, or its exception raised here."""
        result: list[T] = []
        error: list[BaseException] = []

        def body() -> None:
            try:
                with self.entered():
                    result.append(fn(*args, **kwargs))
            except BaseException as exc:
                error.append(exc)

        t = threading.Thread(target=body, name=f"netns-{self.name}")
        t.start()
        t.join()
        if error:
            raise error[0]
        return result[0]
