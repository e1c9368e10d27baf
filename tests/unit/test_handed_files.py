"""Handed files (``pyvirt run --fd PATH=N[,N2]``, ``--fd tap:IFNAME=N``): the
registry ``pyvirt.hostfile.handed`` and everything that opens through it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirt import hostfile
from pyvirt.disk.backend import DiskError
from pyvirt.disk.open import open_disk
from pyvirt.hostfile import hand, handed_second, open_host_file
from pyvirt.vmm.config import ConfigError


@pytest.fixture(autouse=True)
def clean_registry() -> Iterator[None]:
    hostfile.handed.clear()
    hostfile.handed_taps.clear()
    yield
    for h in hostfile.handed.values():
        for fd in (h.fd, h.fd2):
            if fd is not None:
                os.close(fd)
    hostfile.handed.clear()
    hostfile.handed_taps.clear()


def test_a_handed_path_is_used_even_when_gone(tmp_path: Path) -> None:
    f = tmp_path / "img"
    f.write_bytes(b"hello" * 100)
    fd = os.open(f, os.O_RDWR)
    gone = tmp_path / "img.moved"
    f.rename(gone)  # the name no longer leads there: only the fd does
    hand(f, fd)
    got, st = open_host_file(f, os.O_RDONLY, what="kernel")
    try:
        assert got != fd and os.pread(got, 5, 0) == b"hello"
        assert (st.st_ino, st.st_dev) == (gone.stat().st_ino, gone.stat().st_dev)
    finally:
        os.close(got)
    # relative and dotted spellings of the same path find it too
    odd = Path(str(tmp_path) + "/./x/../img")
    got, _ = open_host_file(odd, os.O_RDWR, what="disks[0].path")
    os.close(got)


def test_access_mode_is_checked(tmp_path: Path) -> None:
    f = tmp_path / "ro"
    f.write_bytes(b"x")
    hand(f, os.open(f, os.O_RDONLY))
    with pytest.raises(DiskError) as err:
        open_host_file(f, os.O_RDWR, what="disks[0].path", error=DiskError)
    assert str(err.value) == (f"disks[0].path: {f}: the fd handed for it "
                              f"({hostfile.handed[str(f)].fd}) is open read-only, but it is "
                              "used read-write (hand an fd opened O_RDWR)")
    g = tmp_path / "wo"
    hand(g, os.open(g, os.O_WRONLY | os.O_CREAT))
    with pytest.raises(DiskError, match="open write-only, but it is used read-only"):
        open_host_file(g, os.O_RDONLY, what="kernel", error=DiskError)


def test_bad_hands_are_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
    try:
        with pytest.raises(ConfigError, match=r"fds .* are not the same file"):
            hand(a, fa, fb, error=ConfigError)
        with pytest.raises(ConfigError, match=r"fd 987 .* is not open"):
            hand(a, 987, error=ConfigError)
        with pytest.raises(ConfigError, match="is a directory"):
            dfd = os.open(tmp_path, os.O_RDONLY)
            try:
                hand(a, dfd, error=ConfigError)
            finally:
                os.close(dfd)
        hand(a, fa)
        with pytest.raises(Exception, match="handed twice"):
            hand(a, fa)
    finally:
        hostfile.handed.clear()
        os.close(fa)
        os.close(fb)


def test_a_disk_and_its_backing_chain_through_handed_fds(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 4096", str(base)],
                   check=True, capture_output=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(top)], check=True)
    hand(top, os.open(top, os.O_RDWR))
    hand(base, os.open(base, os.O_RDONLY))
    for p in (top, base):
        p.rename(p.with_suffix(".gone"))
    disk = open_disk(top, format="qcow2", what="disks[0].path")
    try:
        buf = bytearray(4096)
        disk.readv([memoryview(buf)], 0)
        assert buf == b"\x5a" * 4096
        disk.writev([memoryview(b"\x11" * 512)], 0)
        disk.flush()
    finally:
        disk.close()


def test_the_second_fd_serves_qcow2_metadata_under_cache_none(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
    try:
        probe = os.open(img, os.O_RDONLY | os.O_DIRECT)
        os.close(probe)
    except OSError:
        pytest.skip("this file system has no O_DIRECT")  # tmpfs: nothing to prove here
    fd, fd2 = os.open(img, os.O_RDWR), os.open(img, os.O_RDWR)
    hand(img, fd, fd2)
    n = handed_second(img, readonly=False)
    assert n is not None
    os.close(n)
    real_open = os.open

    def no_reopen(path: object, *args: object, **kw: object) -> int:
        # what a VMM that may not open the file meets: the second fd must serve
        if str(path).startswith("/proc/self/fd/"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", no_reopen)
    disk = open_disk(img, format="qcow2", direct=True, what="disks[0].path")
    try:
        disk.writev([memoryview(bytearray(b"\x22" * 4096))], 0)
        disk.flush()
    finally:
        disk.close()
    monkeypatch.undo()
    for h in hostfile.handed.values():  # the lock lives with the handed descriptor
        os.close(h.fd)
        if h.fd2 is not None:
            os.close(h.fd2)
    hostfile.handed.clear()
    out = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_cli_fd_specs_are_checked(tmp_path: Path) -> None:
    f = tmp_path / "k"
    f.write_bytes(b"k")
    for spec, message in [
        ("nonsense", "expected PATH=N[,N2] or tap:IFNAME=N"),
        (f"{f}=x", "expected PATH=N"),
        (f"{f}=1", "fd 1 is stdin, stdout or stderr"),
        (f"{f}=999", "fd 999 (for"),
        ("tap:pvt0=3,4", "a TAP takes one fd"),
    ]:
        r = subprocess.run([sys.executable, "-m", "pyvirt", "run", "--fd", spec,
                            "--kernel", str(f)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (spec, r.stderr)
        assert r.stderr.count("\n") == 1 and message in r.stderr, (spec, r.stderr)
        assert "Traceback" not in r.stderr


def _tun_fd(name: str, flags: int) -> int:
    import fcntl
    import struct

    from pyvirt.net.tap import TUNSETIFF

    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    return fd


def test_a_handed_tap_is_checked_and_used() -> None:
    from tests.netns import NetNs, available

    if available() is not None:
        pytest.skip(str(available()))
    from pyvirt.net.errors import NetConfigError
    from pyvirt.net.tap import IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, open_tap

    with NetNs() as ns:
        good = ns.call(_tun_fd, "pvt0", IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        plain = ns.call(_tun_fd, "pvt1", IFF_TAP | IFF_NO_PI)
        try:
            hostfile.hand_tap("pvt0", good)
            hostfile.hand_tap("pvt1", plain)
            hostfile.hand_tap("pvt2", good)  # the fd of another interface
            # used as is: no /dev/net/tun open, no netlink (outside the namespace too)
            tap = open_tap("pvt0", create=False, what="nics[0]")
            assert tap.ifname == "pvt0" and not tap.created and tap.fileno() != good
            tap.close()
            with pytest.raises(NetConfigError, match=r"nics\[0\]: .*IFF_VNET_HDR"):
                open_tap("pvt1", create=False, what="nics[0]")
            with pytest.raises(NetConfigError, match=r"handed for TAP pvt2 is TAP 'pvt0'"):
                open_tap("pvt2", create=False, what="nics[1]")
            r, w = os.pipe()
            with pytest.raises(ConfigError, match="not a TAP"):
                hostfile.hand_tap("pvt3", r, error=ConfigError)
            os.close(r)
            os.close(w)
        finally:
            os.close(good)
            os.close(plain)
