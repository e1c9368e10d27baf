"""The KVM vCPU loop's port I/O path, driven without /dev/kvm: ``KVM_RUN`` is
replaced by a fake that writes port exits into an ordinary kvm_run buffer."""

from __future__ import annotations

import ctypes
import errno
import struct
import tracemalloc
from typing import Any

import pytest

from pyvirt.devices.bus import Bus
from pyvirt.hypervisor import kvm
from pyvirt.hypervisor.base import ExitKind
from pyvirt.kvm import _abi as abi

DATA_OFF = 4096  # where KVM puts port data (KVM_PIO_PAGE_OFFSET pages in)


class FakeVcpuFd:
    def __init__(self) -> None:
        self.run_view = memoryview(bytearray(2 * 4096))

    def fileno(self) -> int:
        return -1


class Port:
    def __init__(self) -> None:
        self.log: list[tuple[str, int, bytes]] = []

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes([0x40 + offset]) * len(data)
        self.log.append(("r", offset, bytes(data)))

    def write(self, offset: int, data: memoryview) -> None:
        self.log.append(("w", offset, bytes(data)))


def run_exits(monkeypatch: pytest.MonkeyPatch, pio: Bus,
              exits: list[tuple[int, int, int]]) -> tuple[kvm.KvmVcpu, list[bytes]]:
    """Run a vCPU through (port, is_out, value) byte exits, then a kick; returns
    the vCPU and what each IN left in the data byte."""
    fd = FakeVcpuFd()
    vcpu: Any = object.__new__(kvm.KvmVcpu)
    vcpu.vm = type("FakeVm", (), {"pio": pio, "mmio": Bus("mmio")})()
    vcpu.index, vcpu.fd, vcpu._tid = 0, fd, None
    vcpu._pio_handlers, vcpu._pio_views = {}, {}
    it = iter(exits)
    seen: list[bytes] = []
    last_in = [False]

    def fake_ioctl(_fd: int, _req: int, _arg: object) -> int:
        buf = fd.run_view
        if last_in[0]:
            seen.append(bytes(buf[DATA_OFF:DATA_OFF + 1]))
        nxt = next(it, None)
        if nxt is None:
            ctypes.set_errno(errno.EINTR)
            return -1
        port, is_out, value = nxt
        last_in[0] = not is_out
        struct.pack_into("<I", buf, 8, abi.KVM_EXIT_IO)
        struct.pack_into("<BBHIQ", buf, 32, int(is_out), 1, port, 1, DATA_OFF)
        buf[DATA_OFF] = value
        return 0

    monkeypatch.setattr(kvm, "libc_ioctl", fake_ioctl)
    assert vcpu.run().kind is ExitKind.KICKED
    return vcpu, seen


def test_claimed_ports_dispatch_and_are_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    pio = Bus("pio")
    dev = Port()
    pio.insert(dev, 0x3F8, 8, "com1")
    vcpu, seen = run_exits(monkeypatch, pio, [(0x3FD, 0, 0), (0x3F8, 1, 0x41), (0x3FD, 0, 0),
                                              (0x80, 0, 0), (0x80, 1, 7)])
    assert dev.log == [("r", 5, b"\x45"), ("w", 0, b"A"), ("r", 5, b"\x45")]
    assert seen == [b"\x45", b"\x45", b"\xff"]  # port 0x80 is nobody's: all-ones
    assert set(vcpu._pio_handlers) == {0x3FD, 0x3F8}
    assert pio.unclaimed[("read", 0x80)] == 1 and pio.unclaimed[("write", 0x80)] == 1


def test_port_sweep_does_not_grow_the_exit_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue #17: every port the guest touched got a cached handler (two
    closures), 65536 ports' worth for a sweep; only claimed ports are cached now."""
    pio = Bus("pio")
    pio.insert(Port(), 0x3F8, 8, "com1")
    exits = [(p, p & 1, 0) for p in range(0x400, 0x10000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        vcpu, seen = run_exits(monkeypatch, pio, exits)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(vcpu._pio_handlers) == 0
    assert seen == [b"\xff"] * (len(exits) // 2)
    assert pio.unclaimed.totals == {"read": len(exits) // 2, "write": len(exits) // 2}
    # ``seen`` (31k one-byte bytes objects) is most of what is left
    assert grown < 3 << 20, f"a port sweep grew the VMM by {grown} bytes"


def test_exits_are_counted_by_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue #9: ``metrics()`` counts every port exit (claimed or not) and the kick."""
    pio = Bus("pio")
    pio.insert(Port(), 0x3F8, 8, "com1")
    vcpu, _ = run_exits(monkeypatch, pio, [(0x3FD, 0, 0), (0x3F8, 1, 0x41), (0x80, 1, 7)])
    assert vcpu.metrics() == {"exits_io": 3, "exits_mmio": 0, "exits_hlt": 0, "exits_intr": 1,
                              "exits_system_event": 0, "exits_other": 0}
