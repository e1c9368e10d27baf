"""``open_disk``: format probing (a writable image is never taken as qcow2 on its
first bytes alone), format mismatches, files that are no images, locks
between two opens, backing chains (loops, depth, relative and absolute names,
one read-only base under two overlays) and the VM's disks across chains.

qcow2 images come from qemu-img, the referee."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest

from pyvirt.disk import DiskError, open_disk, probe_format
from pyvirt.disk.backend import ChainLimits
from pyvirt.disk.lock import open_image_file
from pyvirt.disk.open import QCOW2_MAGIC
from pyvirt.vmm.config import VmConfig, parse_console, parse_disk
from pyvirt.vmm.resources import VmResources

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
needs_qemu_img = pytest.mark.skipif(QEMU_IMG is None or QEMU_IO is None,
                                    reason="qemu-img/qemu-io (the referee) missing")
MiB = 1 << 20


def qemu_img(*args: str | Path) -> None:
    assert QEMU_IMG is not None
    subprocess.run([QEMU_IMG, *map(str, args)], check=True, capture_output=True)


def qcow2(path: Path, size: int = MiB, backing: str | None = None,
          backing_fmt: str = "qcow2") -> Path:
    args: list[str | Path] = ["create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-u", "-b", backing, "-F", backing_fmt]
    qemu_img(*args, path, str(size))
    return path


def raw(path: Path, data: bytes = bytes(MiB)) -> Path:
    path.write_bytes(data)
    return path


def read(disk: object, offset: int, n: int) -> bytes:
    buf = bytearray(n)
    disk.readv([memoryview(buf)], offset)  # type: ignore[attr-defined]
    return bytes(buf)


# ---- probing ----------------------------------------------------------------------------


def test_probe_format(tmp_path: Path) -> None:
    for data, fmt in ((QCOW2_MAGIC + bytes(600), "qcow2"), (b"QFI", "raw"), (b"", "raw"),
                      (b"QFI\xfa" + bytes(600), "raw")):
        p = raw(tmp_path / "x", data)
        fd = os.open(p, os.O_RDONLY)
        try:
            assert probe_format(fd) == fmt, data[:4]
        finally:
            os.close(fd)


def test_writable_image_with_a_qcow2_header_needs_a_format(tmp_path: Path) -> None:
    """The attack: the guest wrote a qcow2 header (backing file /etc/shadow) into
    its raw disk; the next start must not open that as qcow2."""
    p = raw(tmp_path / "guest.img", QCOW2_MAGIC + bytes(MiB - 4))
    with pytest.raises(DiskError) as ei:
        open_disk(p, what="disks[1].path")
    msg = str(ei.value)
    assert msg.startswith(f"disks[1].format: {p} starts with a qcow2 header but no format "
                          "was given; say format=qcow2")
    assert "\n" not in msg
    # said explicitly: raw, the guest's bytes as they are
    with closing(open_disk(p, format="raw", what="disks[1].path")) as d:
        assert d.format == "raw" and read(d, 0, 4) == QCOW2_MAGIC
    # nothing left open or locked by the refusal: a writer gets it at once
    with closing(open_disk(p, format="raw")):
        pass


@needs_qemu_img
def test_read_only_qcow2_is_probed(tmp_path: Path) -> None:
    p = qcow2(tmp_path / "a.qcow2")
    with closing(open_disk(p, readonly=True)) as d:
        assert d.format == "qcow2" and d.size == MiB and d.readonly
    with closing(open_disk(p, format="qcow2")) as d:
        assert d.format == "qcow2" and not d.readonly


def test_format_mismatch_and_unknown_format(tmp_path: Path) -> None:
    p = raw(tmp_path / "plain.img")
    with pytest.raises(DiskError, match=r"^disks\[0\]\.format: .*plain\.img is not a qcow2 "
                                        r"image \(no qcow2 header\)$"):
        open_disk(p, format="qcow2", what="disks[0].path")
    with pytest.raises(DiskError, match=r"^disks\[0\]\.format: unknown format 'vmdk'"):
        open_disk(p, format="vmdk", what="disks[0].path")


def test_missing_file_and_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(DiskError, match=r"^disks\[0\]\.path: .*nope\.img: no such file$"):
        open_disk(tmp_path / "nope.img", what="disks[0].path")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    try:
        for p, kind in ((fifo, "a named pipe"), (sock_path, "a socket"), (tmp_path, "a directory")):
            # a FIFO would block open() for ever: refused before it is opened
            with pytest.raises(DiskError, match=f"is {kind}.*, not a regular file or block dev"):
                open_disk(p, readonly=True)
    finally:
        sock.close()


# ---- locks -----------------------------------------------------------------------------


def _open_in_child(path: Path, readonly: bool) -> subprocess.CompletedProcess[str]:
    """Another process (a second VM) opens ``path``: exit 3 and the message when refused."""
    code = ("import sys; from pathlib import Path; from pyvirt.disk import open_disk, DiskError\n"
            "try:\n open_disk(Path(sys.argv[1]), readonly=sys.argv[2] == 'ro', format='raw')\n"
            "except DiskError as e:\n print(e); sys.exit(3)\n")
    return subprocess.run([sys.executable, "-c", code, str(path), "ro" if readonly else "rw"],
                          capture_output=True, text=True, timeout=60, check=False)


def test_locks_between_two_opens(tmp_path: Path) -> None:
    p = raw(tmp_path / "disk.img")
    with closing(open_disk(p, readonly=True)):
        assert _open_in_child(p, readonly=True).returncode == 0  # readers share
        proc = _open_in_child(p, readonly=False)
        assert proc.returncode == 3 and "cannot open read-write: the image is in use by " \
            f"process {os.getpid()}" in proc.stdout
        # in this process too: a second open description conflicts like another VM
        with pytest.raises(DiskError, match="in use by"):
            open_disk(p, readonly=False)
        with closing(open_disk(p, readonly=True)):
            pass
    with closing(open_disk(p)):
        proc = _open_in_child(p, readonly=True)
        assert proc.returncode == 3 and "cannot open read-only" in proc.stdout
    assert _open_in_child(p, readonly=False).returncode == 0  # closed: free again


def test_open_image_file_same_identity(tmp_path: Path) -> None:
    p = raw(tmp_path / "disk.img")
    link = tmp_path / "link.img"
    os.link(p, link)
    f = open_image_file(p, readonly=True, direct=False, what="disks[0].path")
    try:
        others = {f.identity: "disks[0].path"}
        with pytest.raises(DiskError, match=r"^x: .*link\.img is the same file as disks\[0\]"):
            open_image_file(link, readonly=True, direct=False, what="x", others=others)
        # allowed when every use is read-only ...
        g = open_image_file(link, readonly=True, direct=False, what="x", others=others,
                            allow_self_shared={f.identity})
        g.close()
        # ... never for a writer
        with pytest.raises(DiskError, match="the same file as"):
            open_image_file(link, readonly=False, direct=False, what="x", others=others,
                            allow_self_shared={f.identity})
        assert f.host_size == MiB and not f.block_device
    finally:
        f.close()


# ---- chains ----------------------------------------------------------------------------


@needs_qemu_img
def test_chain_relative_and_absolute_backing_names(tmp_path: Path) -> None:
    """Relative names resolve against the directory of the image naming them,
    not the working directory; raw at the bottom."""
    (tmp_path / "sub").mkdir()
    base = raw(tmp_path / "sub" / "base.raw", b"\x11" * MiB)
    mid = qcow2(tmp_path / "sub" / "mid.qcow2", backing="base.raw", backing_fmt="raw")
    top = qcow2(tmp_path / "top.qcow2", backing=str(mid))  # absolute
    assert QEMU_IO is not None
    subprocess.run([QEMU_IO, "-f", "qcow2", "-c", "write -P 0x22 65536 65536", str(mid)],
                   check=True, capture_output=True)
    cwd = os.getcwd()
    os.chdir("/")
    try:
        with closing(open_disk(top, format="qcow2", what="disks[0].path")) as d:
            chain = d.chain()
            assert [c.path for c in chain][1:] == [mid, tmp_path / "sub" / "base.raw"]
            assert [c.format for c in chain] == ["qcow2", "qcow2", "raw"]
            assert [c.readonly for c in chain] == [False, True, True]
            assert read(d, 0, 4) == b"\x11" * 4 and read(d, 65536, 4) == b"\x22" * 4
    finally:
        os.chdir(cwd)
    assert base.exists()


@needs_qemu_img
def test_backing_loop_is_refused(tmp_path: Path) -> None:
    a = qcow2(tmp_path / "a.qcow2")
    qcow2(tmp_path / "b.qcow2", backing="a.qcow2")
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", a)  # a -> b -> a
    with pytest.raises(DiskError) as ei:
        open_disk(a, readonly=True, what="disks[0].path")
    msg = str(ei.value)
    assert msg.startswith("disks[0].path: ") and "loop" in msg and "\n" not in msg
    assert "b.qcow2" in msg  # the chain that leads there is named
    # nothing left open: a writer gets both files
    with closing(open_disk(a, format="qcow2", backing=False)), \
            closing(open_disk(tmp_path / "b.qcow2", format="qcow2", backing=False)):
        pass


@needs_qemu_img
def test_self_backing_is_a_loop(tmp_path: Path) -> None:
    a = qcow2(tmp_path / "a.qcow2")
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", a)
    with pytest.raises(DiskError, match="loop"):
        open_disk(a, readonly=True)


@needs_qemu_img
def test_chain_depth_is_bounded(tmp_path: Path) -> None:
    qcow2(tmp_path / "l0.qcow2")
    for i in range(1, 6):
        qcow2(tmp_path / f"l{i}.qcow2", backing=f"l{i - 1}.qcow2")
    top = tmp_path / "l5.qcow2"
    with closing(open_disk(top, readonly=True, limits=ChainLimits(max_depth=5))) as d:
        assert len(d.chain()) == 6
    with pytest.raises(DiskError, match=r"deeper than 4"):
        open_disk(top, readonly=True, limits=ChainLimits(max_depth=4))
    with closing(open_disk(top, format="qcow2")):  # nothing left locked
        pass


@needs_qemu_img
def test_backing_false_opens_the_top_alone(tmp_path: Path) -> None:
    raw(tmp_path / "base.raw", b"\x33" * MiB)
    top = qcow2(tmp_path / "top.qcow2", backing="base.raw", backing_fmt="raw")
    with closing(open_disk(top, readonly=True, backing=False)) as d:
        assert d.chain() == [d] and read(d, 0, 4) == bytes(4)
        assert not d.block_status(0, MiB).present
    os.unlink(tmp_path / "base.raw")
    with pytest.raises(DiskError, match=r"backing file.*base\.raw.*no such file"):
        open_disk(top, readonly=True, what="disks[0].path")


@needs_qemu_img
def test_recorded_backing_format_is_obeyed(tmp_path: Path) -> None:
    """A backing file recorded as raw is raw even if it starts with the qcow2 magic;
    one recorded as qcow2 that is not is an error."""
    inner = qcow2(tmp_path / "inner.qcow2")
    top = qcow2(tmp_path / "top.qcow2", backing="inner.qcow2", backing_fmt="raw")
    with closing(open_disk(top, readonly=True)) as d:
        assert [c.format for c in d.chain()] == ["qcow2", "raw"]
        assert read(d, 0, 4) == QCOW2_MAGIC  # the backing file's bytes, as raw
    raw(inner)
    top2 = qcow2(tmp_path / "top2.qcow2", backing="inner.qcow2", backing_fmt="qcow2")
    with pytest.raises(DiskError, match="no qcow2 header"):
        open_disk(top2, readonly=True)


# ---- the VM's disks across chains ----------------------------------------------------------


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "kernel"
    k.write_bytes(b"k" * 4096)
    return k


def _vm(kernel: Path, *disks: str) -> VmConfig:
    return VmConfig(kernel=kernel, disks=tuple(parse_disk(d) for d in disks),
                    console=parse_console("none"))


@needs_qemu_img
def test_two_overlays_share_one_read_only_base(tmp_path: Path, kernel: Path) -> None:
    raw(tmp_path / "base.raw", b"\x44" * MiB)
    a = qcow2(tmp_path / "a.qcow2", backing="base.raw", backing_fmt="raw")
    b = qcow2(tmp_path / "b.qcow2", backing="base.raw", backing_fmt="raw")
    cfg = _vm(kernel, f"path={a},format=qcow2", f"path={b},format=qcow2",
              f"path={tmp_path / 'base.raw'},readonly=on")
    with VmResources.open(cfg) as res:
        assert [len(d.chain()) for d in res.disks] == [2, 2, 1]
        assert all(read(d, 0, 2) == b"\x44\x44" for d in res.disks)


@needs_qemu_img
def test_base_that_is_also_a_writable_disk_is_refused(tmp_path: Path, kernel: Path) -> None:
    base = raw(tmp_path / "base.raw")
    top = qcow2(tmp_path / "top.qcow2", backing="base.raw", backing_fmt="raw")
    for order in ((f"path={top},format=qcow2", f"path={base}"),
                  (f"path={base}", f"path={top},format=qcow2")):
        with pytest.raises(DiskError) as ei:
            VmResources.open(_vm(kernel, *order))
        msg = str(ei.value)
        assert msg.startswith("disks[1].path: ") and "the same file as" in msg, msg
        assert "\n" not in msg and "in use by" not in msg
    # nothing left open by the failures
    with closing(open_disk(base, format="raw")), \
            closing(open_disk(top, format="qcow2", backing=False)):
        pass


def test_vm_refuses_a_disk_smaller_than_a_sector(tmp_path: Path, kernel: Path) -> None:
    tiny = raw(tmp_path / "tiny.img", bytes(100))
    with pytest.raises(DiskError, match=r"^disks\[0\]\.path: .*smaller than one 512-byte sector"):
        VmResources.open(_vm(kernel, str(tiny)))
    with closing(open_disk(tiny)):  # closed again
        pass


def test_cli_says_which_disk_needs_a_format(tmp_path: Path, kernel: Path) -> None:
    """End to end: one line naming the --disk flag, exit 2, no traceback."""
    from tests.conftest import run_pyvirt

    img = raw(tmp_path / "g.img", QCOW2_MAGIC + bytes(MiB - 4))
    r = run_pyvirt("run", "--kernel", str(kernel), "--console", "none", "--disk", f"path={img}")
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert err == (f"pyvirt: error: --disk path={img}: {img} starts with a qcow2 header but no "
                   "format was given; say format=qcow2 (or format=raw to give the guest these "
                   "bytes as they are)\n")


def test_locks_are_qemus_lock_bytes(tmp_path: Path) -> None:
    """pyvirt and QEMU see each other's locks: qemu-img may read an image a VM
    only reads (an overlay's base), not one a VM writes; a VM may not write an
    image QEMU has open for writing."""
    p = raw(tmp_path / "disk.img")
    # convert (not info or compare, which share write) asks that nobody writes
    info = ["qemu-img", "convert", "-f", "raw", "-O", "raw", str(p), str(tmp_path / "copy")]
    with closing(open_disk(p, readonly=True)):
        r = subprocess.run(info, capture_output=True, text=True, check=False)
        assert r.returncode == 0, r.stderr
        w = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 512", str(p)],
                           capture_output=True, text=True, check=False)
        assert w.returncode != 0 and "lock" in w.stderr + w.stdout
    with closing(open_disk(p)):
        r = subprocess.run(info, capture_output=True, text=True, check=False)
        assert r.returncode != 0 and 'Failed to get shared "write" lock' in r.stderr
    # QEMU writing: qemu-io waits on stdin while it holds the image open read-write
    q = subprocess.Popen(["qemu-io", "-f", "raw", str(p)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # its locks are taken once the file is open
            if any(os.path.realpath(f"/proc/{q.pid}/fd/{fd}") == str(p.resolve())
                   for fd in os.listdir(f"/proc/{q.pid}/fd")):
                break
            time.sleep(0.05)
        time.sleep(0.2)
        with pytest.raises(DiskError, match="in use by process"):
            open_disk(p, readonly=False)
        with pytest.raises(DiskError, match="in use by process"):
            open_disk(p, readonly=True)  # QEMU shares no write permission... but holds it
    finally:
        q.communicate(b"quit\n", timeout=10)
