"""virtio-blk over a temporary image file, driven through the PCI transport as a guest
driver would: data round trips, GET_ID/FLUSH/discard/write-zeroes, read-only disks,
hostile requests (each fails alone), and a property test against a model."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pyvirt.disk import DiskError, open_disk
from pyvirt.disk.raw import RawDisk
from pyvirt.virtio import F_VERSION_1
from pyvirt.virtio.blk import (
    F_BLK_SIZE,
    F_CONFIG_WCE,
    F_DISCARD,
    F_FLUSH,
    F_RO,
    F_SEG_MAX,
    F_WRITE_ZEROES,
    ID_BYTES,
    MAX_DISCARD_SEG,
    S_IOERR,
    S_OK,
    S_UNSUPP,
    SEG_MAX,
    T_DISCARD,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    T_WRITE_ZEROES,
    BlockDevice,
)
from tests.virtio_driver import DriverQueue, VirtioPciDriver, wait_for

SECTORS = 512
IMAGE_SIZE = SECTORS * 512
SERIAL = "pyvirt-test-0123456789"  # longer than 20 bytes: truncated
T_SECURE_ERASE = 14


class Disk:
    def __init__(self, path: Path, drv: VirtioPciDriver, q: DriverQueue, shadow: bytearray,
                 readonly: bool, discard: bool) -> None:
        assert isinstance(drv.device, BlockDevice)
        self.path, self.drv, self.q, self.readonly, self.discard = path, drv, q, readonly, discard
        self.shadow = shadow  # what the image must contain
        self.blk = drv.device

    def __repr__(self) -> str:
        return f"Disk({self.path.name}, readonly={self.readonly}, discard={self.discard})"

    def file_bytes(self) -> bytes:
        return self.path.read_bytes()


def _image(tmp_path: Path, seed: int = 1) -> tuple[Path, bytearray]:
    data = bytearray(random.Random(seed).randbytes(IMAGE_SIZE))
    path = tmp_path / "disk.img"
    path.write_bytes(data)
    return path, data


def _open(tmp_path: Path, *, readonly: bool = False, discard: bool = True,
          direct: bool = False, msix: bool = True) -> Disk:
    path, data = _image(tmp_path)
    image = open_disk(path, readonly=readonly, direct=direct)
    drv = VirtioPciDriver(BlockDevice(image, serial=SERIAL, discard=discard, workers=4))
    (q,) = drv.init(msix=msix)
    return Disk(path, drv, q, data, readonly, discard)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    d = _open(tmp_path)
    yield d
    d.drv.close()
    d.blk.disk.close()  # the device never closes its image: the VM's resources do


@pytest.fixture
def ro_disk(tmp_path: Path) -> Iterator[Disk]:
    d = _open(tmp_path, readonly=True)
    yield d
    d.drv.close()
    d.blk.disk.close()


def header(rtype: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector & 0xFFFF_FFFF_FFFF_FFFF)


def segments(*segs: tuple[int, int, int]) -> bytes:
    return b"".join(struct.pack("<QII", s, n, f) for s, n, f in segs)


def request(d: Disk, rtype: int, sector: int = 0, out: bytes = b"", in_len: int = 0, *,
            indirect: bool = False, pieces: int = 1) -> tuple[int, int, bytes]:
    """A well-formed request: header, ``out`` (split in ``pieces``) or ``in_len`` bytes
    to fill, and a status byte. Returns (status, used len, data read)."""
    outs = [header(rtype, sector)]
    if out:
        step = -(-len(out) // pieces)
        outs += [out[i:i + step] for i in range(0, len(out), step)]
    ins = [in_len] if in_len else []
    used, bufs = d.q.submit(outs, [*ins, 1], indirect=indirect)
    return bufs[-1][0], used, b"".join(bufs[:-1])


def read(d: Disk, sector: int, count: int) -> bytes:
    status, used, data = request(d, T_IN, sector, in_len=512 * count)
    assert (status, used) == (S_OK, 512 * count + 1)
    return data


def assert_usable(d: Disk) -> None:
    """A plain read still works and the image is what it should be."""
    assert read(d, 3, 2) == bytes(d.shadow[3 * 512:5 * 512])
    assert hashlib.sha256(d.file_bytes()).digest() == hashlib.sha256(d.shadow).digest()


# ---- configuration -------------------------------------------------------------------


def test_features_and_config_space(disk: Disk) -> None:
    drv = disk.drv
    feats = drv.features
    for bit in (F_SEG_MAX, F_BLK_SIZE, F_FLUSH, F_CONFIG_WCE, F_DISCARD, F_WRITE_ZEROES):
        assert feats >> bit & 1, bit
    assert not feats >> F_RO & 1
    assert drv.config_read(0, 4) | drv.config_read(4, 4) << 32 == SECTORS  # capacity
    assert drv.config_read(12, 4) == SEG_MAX
    assert drv.config_read(20, 4) == 512  # blk_size
    assert drv.config_read(32, 1) == 1  # writeback
    assert drv.config_read(34, 2) == 1  # num_queues
    assert drv.config_read(40, 4) == MAX_DISCARD_SEG
    assert drv.config_read(44, 4) == 1  # discard_sector_alignment: a raw disk's 512 bytes
    assert drv.config_read(48, 4) > 0 and drv.config_read(52, 4) > 0  # write zeroes
    assert drv.cfg_read(0x02, 2) == 0x1042
    assert drv.cfg_read(0x08, 4) >> 8 == 0x010000


def test_writeback_toggle(disk: Disk) -> None:
    disk.drv.config_write(32, 1, 0)
    assert disk.drv.config_read(32, 1) == 0
    status, used, _ = request(disk, T_OUT, 1, b"\x11" * 512)
    assert (status, used) == (S_OK, 1)
    disk.shadow[512:1024] = b"\x11" * 512
    disk.drv.config_write(32, 1, 1)
    assert disk.drv.config_read(32, 1) == 1
    assert_usable(disk)


def test_readonly_disk(ro_disk: Disk) -> None:
    d = ro_disk
    assert d.drv.features >> F_RO & 1
    assert not d.drv.features >> F_WRITE_ZEROES & 1 and not d.drv.features >> F_DISCARD & 1
    assert d.drv.config_read(48, 4) == 0
    assert read(d, 0, 4) == bytes(d.shadow[:2048])
    status, used, _ = request(d, T_OUT, 0, b"\0" * 512)
    assert (status, used) == (S_IOERR, 1)
    status, _, _ = request(d, T_WRITE_ZEROES, out=segments((0, 8, 0)))
    assert status == S_UNSUPP
    status, _, _ = request(d, T_DISCARD, out=segments((0, 8, 0)))
    assert status == S_UNSUPP
    assert request(d, T_FLUSH)[:2] == (S_OK, 1)
    assert_usable(d)


def _try_lock_in_child(path: Path, readonly: bool = True) -> subprocess.CompletedProcess[str]:
    """Open ``path`` as a disk in another process (a second VM): exit 3 and the
    message when refused, 0 when it got the image. In a child with a time limit
    also so that an open() that blocks fails the test instead of hanging it."""
    code = ("import sys; from pathlib import Path; from pyvirt.disk import "
            "open_disk, DiskError\ntry:\n open_disk(Path(sys.argv[1]), "
            "readonly=sys.argv[2] == 'ro', direct=False)\nexcept DiskError as e:\n print(e); "
            "sys.exit(3)\n")
    return subprocess.run([sys.executable, "-c", code, str(path), "ro" if readonly else "rw"],
                          capture_output=True, text=True, timeout=60, check=False)


def test_image_locking(tmp_path: Path) -> None:
    path, _ = _image(tmp_path)
    with closing(open_disk(path, readonly=False, direct=False)):
        proc = _try_lock_in_child(path)
        assert proc.returncode == 3, proc.stdout + proc.stderr
        # the holder is found although an OFD lock does not say its pid
        assert f"in use by process {os.getpid()}" in proc.stdout
    assert _try_lock_in_child(path, readonly=False).returncode == 0  # closed: free again


def test_lock_survives_another_close_of_the_file_in_the_process(tmp_path: Path) -> None:
    """The loader reading the same file as an initrd (open, read, close) must not
    drop the disk's lock, as it would a POSIX record lock."""
    path, _ = _image(tmp_path)
    image = open_disk(path, readonly=False, direct=False)
    try:
        path.read_bytes()  # another open file description of it, closed again
        proc = _try_lock_in_child(path)
        assert proc.returncode == 3, proc.stdout + proc.stderr
        assert "in use by process" in proc.stdout
    finally:
        image.close()


def test_same_file_under_two_names_is_refused(tmp_path: Path) -> None:
    path, _ = _image(tmp_path)
    link = tmp_path / "link.img"
    os.link(path, link)
    with closing(open_disk(path, readonly=True, direct=False)) as first, pytest.raises(
            DiskError, match=r"disks\[1\]\.path: .*link\.img is the same file as disks\[0\]"):
        open_disk(link, readonly=True, direct=False, what="disks[1].path",
                  others={first.identity: f"disks[0].path ({path})"})


@pytest.mark.parametrize("kind", ["fifo", "socket", "directory", "chardev"])
def test_not_a_file_is_refused_without_blocking(tmp_path: Path, kind: str) -> None:
    """A FIFO would block open() for ever."""
    import socket

    p = tmp_path / "thing"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(p))
    elif kind == "directory":
        p.mkdir()
    else:
        p = Path("/dev/null")
    proc = _try_lock_in_child(p)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"disk: {p} is a") and "not a regular file" in proc.stdout


def test_image_too_small(tmp_path: Path) -> None:
    """A raw image presents whole sectors only (the VM refuses one of none:
    test_vm_resources); a missing file is a one-line error."""
    p = tmp_path / "tiny.img"
    p.write_bytes(b"\0" * 700)
    with closing(open_disk(p, readonly=True, direct=False)) as d:
        assert d.size == 512
    with pytest.raises(DiskError, match="no such file"):
        open_disk(tmp_path / "missing.img", readonly=True, direct=False)


# ---- data ------------------------------------------------------------------------------


def test_read_whole_disk_matches_image(disk: Disk) -> None:
    sha = hashlib.sha256()
    for sector in range(0, SECTORS, 64):
        sha.update(read(disk, sector, 64))
    assert sha.digest() == hashlib.sha256(disk.file_bytes()).digest()


def test_write_read_round_trip(disk: Disk) -> None:
    payload = random.Random(7).randbytes(5 * 512)
    status, used, _ = request(disk, T_OUT, 7, payload, pieces=3)  # header + 3 data buffers
    assert (status, used) == (S_OK, 1)
    disk.shadow[7 * 512:12 * 512] = payload
    assert hashlib.sha256(disk.file_bytes()).digest() == hashlib.sha256(disk.shadow).digest()
    assert read(disk, 7, 5) == payload
    status, used, data = request(disk, T_IN, 6, in_len=7 * 512, indirect=True)
    assert (status, used) == (S_OK, 7 * 512 + 1)
    assert data == bytes(disk.shadow[6 * 512:13 * 512])
    assert disk.blk.stats["write"] == 1 and disk.blk.stats["read"] >= 2


def test_read_notes_dma(disk: Disk) -> None:
    buf = disk.drv.alloc(1024)
    hdr = disk.drv.put(header(T_IN, 0))
    st_addr = disk.drv.put(b"\xff")
    disk.q.add([(hdr, 16)], [(buf, 1024), (st_addr, 1)])
    disk.q.kick()
    assert disk.q.wait_used()[0][1] == 1025
    assert disk.drv.vm.dma_covers(buf, 1024) and disk.drv.vm.dma_covers(st_addr, 1)


def test_last_sector(disk: Disk) -> None:
    assert read(disk, SECTORS - 1, 1) == bytes(disk.shadow[-512:])
    status, _, _ = request(disk, T_OUT, SECTORS - 1, b"\x42" * 512)
    assert status == S_OK
    disk.shadow[-512:] = b"\x42" * 512
    assert_usable(disk)


def test_status_byte_in_the_data_buffer(disk: Disk) -> None:
    hdr = disk.drv.put(header(T_IN, 2))
    buf = disk.drv.put(b"\xa5" * 513)
    disk.q.add([(hdr, 16)], [(buf, 513)])
    disk.q.kick()
    assert disk.q.wait_used()[0][1] == 513
    assert disk.drv.mem.read(buf, 512) == bytes(disk.shadow[1024:1536])
    assert disk.drv.mem.read_u8(buf + 512) == S_OK


def test_header_split_across_descriptors(disk: Disk) -> None:
    hdr = header(T_IN, 4)
    used, (data, status) = disk.q.submit([hdr[:5], hdr[5:12], hdr[12:]], [512, 1])
    assert (status, used) == (bytes([S_OK]), 513)
    assert data == bytes(disk.shadow[2048:2560])


def test_get_id(disk: Disk) -> None:
    status, used, data = request(disk, T_GET_ID, in_len=ID_BYTES)
    assert (status, used) == (S_OK, ID_BYTES + 1)
    assert data == SERIAL.encode()[:ID_BYTES]
    status, used, data = request(disk, T_GET_ID, in_len=8)  # a short buffer
    assert (status, used, data) == (S_OK, 9, SERIAL.encode()[:8])
    status, used, data = request(disk, T_GET_ID, in_len=32)
    assert (status, used) == (S_OK, ID_BYTES + 1)
    assert data == SERIAL.encode()[:ID_BYTES] + b"\xa5" * 12


def test_get_id_short_serial(tmp_path: Path) -> None:
    path, _ = _image(tmp_path)
    with closing(open_disk(path, readonly=True, direct=False)) as image, \
            VirtioPciDriver(BlockDevice(image, serial="abc", workers=1)) as drv:
        (q,) = drv.init()
        used, (data, status) = q.submit([header(T_GET_ID)], [ID_BYTES, 1])
        assert (used, status) == (ID_BYTES + 1, bytes([S_OK]))
        assert data == b"abc" + bytes(ID_BYTES - 3)


def test_flush(disk: Disk) -> None:
    assert request(disk, T_FLUSH)[:2] == (S_OK, 1)
    assert disk.blk.stats["flush"] == 1


def test_write_zeroes(disk: Disk) -> None:
    status, used, _ = request(disk, T_WRITE_ZEROES, out=segments((10, 3, 0), (100, 1, 1)))
    assert (status, used) == (S_OK, 1)
    disk.shadow[10 * 512:13 * 512] = bytes(3 * 512)
    disk.shadow[100 * 512:101 * 512] = bytes(512)
    assert_usable(disk)
    assert read(disk, 10, 3) == bytes(3 * 512)


def test_discard(disk: Disk) -> None:
    before = bytes(disk.shadow)
    status, used, _ = request(disk, T_DISCARD, out=segments((16, 8, 0), (64, 16, 0)))
    assert (status, used) == (S_OK, 1)
    after = disk.file_bytes()
    for start, count in ((16, 8), (64, 16)):
        region = after[start * 512:(start + count) * 512]
        # discarded sectors read as zeros or keep their data (a hint), nothing else
        assert region in (bytes(count * 512), before[start * 512:(start + count) * 512])
        disk.shadow[start * 512:(start + count) * 512] = region
    assert after[:16 * 512] == before[:16 * 512]
    assert after[24 * 512:64 * 512] == before[24 * 512:64 * 512]
    assert after[80 * 512:] == before[80 * 512:]
    assert_usable(disk)


def test_discard_not_offered(tmp_path: Path) -> None:
    d = _open(tmp_path, discard=False)
    try:
        assert not d.drv.features >> F_DISCARD & 1
        assert request(d, T_DISCARD, out=segments((0, 1, 0)))[0] == S_UNSUPP
        assert request(d, T_WRITE_ZEROES, out=segments((0, 1, 0)))[0] == S_OK
        d.shadow[:512] = bytes(512)
        assert_usable(d)
    finally:
        d.drv.close()


def test_many_requests_in_flight(disk: Disk) -> None:
    """Writes to distinct sectors and reads of others, all in one kick."""
    rng = random.Random(3)
    drv, q = disk.drv, disk.q
    expect: dict[int, tuple[int, bytes, int]] = {}
    for k in range(48):
        sector = 2 * k
        st_addr = drv.put(b"\xff")
        if k % 2:
            data = rng.randbytes(512)
            head = q.add([(drv.put(header(T_OUT, sector)), 16), (drv.put(data), 512)],
                         [(st_addr, 1)])
            disk.shadow[sector * 512:(sector + 1) * 512] = data
            expect[head] = (st_addr, b"", 1)
        else:
            buf = drv.alloc(1024)
            head = q.add([(drv.put(header(T_IN, sector + 200)), 16)],
                         [(buf, 1024), (st_addr, 1)])
            expect[head] = (st_addr, bytes(disk.shadow[(sector + 200) * 512:
                                                       (sector + 202) * 512]), buf)
    q.kick()
    used = q.wait_used(48, timeout=10)
    assert sorted(h for h, _ in used) == sorted(expect)
    for head, n in used:
        st_addr, data, buf = expect[head]
        assert drv.mem.read_u8(st_addr) == S_OK
        assert n == len(data) + 1
        if data:
            assert drv.mem.read(buf, 1024) == data
    assert_usable(disk)


def test_direct_io_with_unaligned_buffers(tmp_path: Path) -> None:
    try:
        d = _open(tmp_path, direct=True)
    except DiskError as exc:
        pytest.skip(f"no O_DIRECT here: {exc}")
    try:
        payload = random.Random(5).randbytes(1024)
        hdr = d.drv.put(header(T_OUT, 9))
        buf = d.drv.alloc(1024 + 8, 4096) + 8  # misaligned for O_DIRECT: bounced
        d.drv.mem.write(buf, payload)
        st_addr = d.drv.put(b"\xff")
        d.q.add([(hdr, 16), (buf, 1024)], [(st_addr, 1)])
        d.q.kick()
        assert d.q.wait_used()[0][1] == 1
        assert d.drv.mem.read_u8(st_addr) == S_OK
        d.shadow[9 * 512:11 * 512] = payload
        assert read(d, 9, 2) == payload  # read into 16-byte aligned buffers: bounced too
        aligned = d.drv.alloc(4096, 4096)
        hdr = d.drv.put(header(T_IN, 8))
        d.q.add([(hdr, 16)], [(aligned, 4096), (st_addr, 1)])
        d.q.kick()
        assert d.q.wait_used()[0][1] == 4097
        assert d.drv.mem.read(aligned, 4096) == bytes(d.shadow[4096:8192])
        assert_usable(d)
    finally:
        d.drv.close()


# ---- hostile requests ------------------------------------------------------------------

# (name, readable buffers, writable buffer lengths (the status byte is the last byte),
#  expected status or None for "no status byte", expected used length)
HOSTILE = [
    ("short header", [header(T_IN)[:8]], [512, 1], S_IOERR, 1),
    ("no header at all", [], [16, 1], S_IOERR, 1),
    ("read with readable data", [header(T_IN), b"\0" * 512], [512, 1], S_IOERR, 1),
    ("write with writable data", [header(T_OUT), b"\0" * 512], [512, 1], S_IOERR, 1),
    ("flush with writable data", [header(T_FLUSH)], [8, 1], S_IOERR, 1),
    ("read of an odd length", [header(T_IN)], [100, 1], S_IOERR, 1),
    ("write of an odd length", [header(T_OUT), b"\0" * 513], [1], S_IOERR, 1),
    ("read past the end", [header(T_IN, SECTORS - 1)], [1024, 1], S_IOERR, 1),
    ("read at the capacity", [header(T_IN, SECTORS)], [512, 1], S_IOERR, 1),
    ("write past the end", [header(T_OUT, SECTORS), b"\0" * 512], [1], S_IOERR, 1),
    ("sector overflowing the offset", [header(T_IN, 1 << 63)], [512, 1], S_IOERR, 1),
    ("sector 2^64-1", [header(T_OUT, (1 << 64) - 1), b"\0" * 512], [1], S_IOERR, 1),
    ("sector wrapping to 0", [header(T_IN, 1 << 55)], [512, 1], S_IOERR, 1),
    ("unknown type", [header(99)], [1], S_UNSUPP, 1),
    ("secure erase (not offered)", [header(T_SECURE_ERASE), segments((0, 1, 0))], [1],
     S_UNSUPP, 1),
    ("get id with readable data", [header(T_GET_ID), b"x"], [20, 1], S_IOERR, 1),
    ("discard of 15 bytes", [header(T_DISCARD), b"\0" * 15], [1], S_IOERR, 1),
    ("discard of nothing", [header(T_DISCARD)], [1], S_IOERR, 1),
    ("discard of too many segments",
     [header(T_DISCARD), segments(*[(k, 1, 0) for k in range(MAX_DISCARD_SEG + 1)])], [1],
     S_IOERR, 1),
    ("discard past the end", [header(T_DISCARD), segments((SECTORS - 1, 2, 0))], [1],
     S_IOERR, 1),
    ("discard overflowing", [header(T_DISCARD), segments(((1 << 64) - 1, 1, 0))], [1],
     S_IOERR, 1),
    ("discard with the unmap flag", [header(T_DISCARD), segments((0, 1, 1))], [1],
     S_UNSUPP, 1),
    ("write zeroes with unknown flags", [header(T_WRITE_ZEROES), segments((0, 1, 2))], [1],
     S_UNSUPP, 1),
    ("write zeroes past the end", [header(T_WRITE_ZEROES), segments((0, 1, 0),
                                                                     (SECTORS, 1, 0))],
     [1], S_IOERR, 1),
    ("no status byte (read)", [header(T_IN)], [], None, 0),
    ("no status byte (write)", [header(T_OUT), b"\0" * 512], [], None, 0),
]


@pytest.mark.parametrize(("readable", "writable", "status", "used_len"),
                         [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_request_fails_alone(disk: Disk, readable: list[bytes], writable: list[int],
                                     status: int | None, used_len: int) -> None:
    used, bufs = disk.q.submit(readable, writable)
    assert used == used_len
    if status is None:
        assert all(b == b"\xa5" * len(b) for b in bufs)
    else:
        assert bufs[-1][-1] == status
        data = b"".join(bufs)[:-1]
        assert data == b"\xa5" * len(data)  # a failed request writes no data
    assert not disk.drv.needs_reset
    assert_usable(disk)


def test_chain_errors_complete_with_nothing(disk: Disk) -> None:
    drv, q = disk.drv, disk.q
    hdr = drv.put(header(T_IN, 0))
    data = drv.put(b"\xa5" * 512)
    status = drv.put(b"\xa5")
    # a device-readable header after a device-writable buffer
    a, b, c = q.take(3)
    q.write_desc(a, data, 512, 2 | 1, b)
    q.write_desc(b, hdr, 16, 1, c)
    q.write_desc(c, status, 1, 2, 0)
    q.publish(a, owned=[a, b, c])
    # a buffer beyond RAM
    e, f = q.take(2)
    q.write_desc(e, hdr, 16, 1, f)
    q.write_desc(f, drv.mem.end - 256, 512, 2, 0)
    q.publish(e, owned=[e, f])
    q.kick()
    assert sorted(q.wait_used(2)) == sorted([(a, 0), (e, 0)])
    assert drv.mem.read(data, 512) == b"\xa5" * 512
    assert drv.mem.read_u8(status) == 0xA5
    assert disk.blk.stats["failed"] == 2
    assert_usable(disk)


def test_write_to_readonly_disk_changes_nothing(ro_disk: Disk) -> None:
    status, used, _ = request(ro_disk, T_OUT, 0, b"\x99" * 4096)
    assert (status, used) == (S_IOERR, 1)
    assert_usable(ro_disk)


# ---- NEEDS_RESET -----------------------------------------------------------------------


def test_broken_avail_index_then_reset(disk: Disk) -> None:
    drv, q = disk.drv, disk.q
    configs = drv.vm.msi_count(0)
    q.set_avail_idx(q.avail_idx + q.size + 1)
    q.kick()
    wait_for(lambda: drv.needs_reset, what="NEEDS_RESET")
    wait_for(lambda: drv.vm.msi_count(0) == configs + 1, what="the configuration MSI")
    (disk.q,) = drv.init(msix=True)
    assert not drv.needs_reset
    assert_usable(disk)


def test_reset_with_requests_in_flight(disk: Disk) -> None:
    drv = disk.drv
    for _ in range(20):
        q = disk.q
        for k in range(16):
            q.add([(drv.put(header(T_IN, 8 * k)), 16)], [(drv.alloc(4096), 4096),
                                                        (drv.put(b"\xff"), 1)])
        q.kick()
        drv.reset()  # while the workers read
        (disk.q,) = drv.init(msix=True)
    assert_usable(disk)


def test_reset_under_concurrent_kicks(disk: Disk) -> None:
    """A second vCPU keeps kicking while the first resets: no hang, no crash."""
    stop = threading.Event()
    drv = disk.drv
    notify = disk.q.notify_addr

    def kicker() -> None:
        while not stop.is_set():
            drv.mmio_write(notify, 2, 0)

    t = threading.Thread(target=kicker, daemon=True)
    t.start()
    try:
        for _ in range(20):
            (disk.q,) = drv.init(msix=True)
            for _ in range(4):
                disk.q.add([(drv.put(header(T_IN, 0)), 16)], [(drv.alloc(512), 512),
                                                              (drv.put(b"\xff"), 1)])
            disk.q.kick()
    finally:
        stop.set()
        t.join(5)
    (disk.q,) = drv.init(msix=True)
    assert_usable(disk)


# ---- property test: any request, against a model -------------------------------------


def model(rtype: int, sector: int, readable: bytes, writable_total: int, *, readonly: bool,
          discard: bool) -> tuple[int | None, int]:
    """The status and used length virtio-blk must give (5.2.6)."""
    if writable_total == 0:
        return None, 0  # no status byte: nothing can be reported
    data_in = writable_total - 1
    if len(readable) < 16:
        return S_IOERR, 1
    payload = readable[16:]
    if rtype in (T_IN, T_GET_ID):
        if payload:
            return S_IOERR, 1
    elif data_in:
        return S_IOERR, 1
    if rtype in (T_IN, T_OUT):
        length = data_in if rtype == T_IN else len(payload)
        if length % 512 or sector >= 1 << 55 or sector * 512 + length > IMAGE_SIZE:
            return S_IOERR, 1
        if rtype == T_OUT and readonly:
            return S_IOERR, 1
        return S_OK, (length if rtype == T_IN else 0) + 1
    if rtype == T_FLUSH:
        return S_OK, 1
    if rtype == T_GET_ID:
        return S_OK, min(ID_BYTES, data_in) + 1
    if rtype in (T_DISCARD, T_WRITE_ZEROES):
        if not (discard if rtype == T_DISCARD else not readonly):
            return S_UNSUPP, 1
        if not payload or len(payload) % 16 or len(payload) // 16 > MAX_DISCARD_SEG:
            return S_IOERR, 1
        for s, n, f in struct.iter_unpack("<QII", payload):
            if f & ~1 or (rtype == T_DISCARD and f):
                return S_UNSUPP, 1
            if s >= 1 << 55 or (s + n) * 512 > IMAGE_SIZE:
                return S_IOERR, 1
        return S_OK, 1
    return S_UNSUPP, 1


def _split(draw: st.DrawFn, data: bytes, max_pieces: int = 3) -> list[bytes]:
    if not data:
        return []
    cuts = sorted(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=max_pieces - 1,
                                unique=True)))
    cuts = [c for c in cuts if 0 < c < len(data)]
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


_SECTORS = st.one_of(st.integers(0, SECTORS + 2), st.integers(SECTORS - 4, SECTORS + 1),
                     st.sampled_from([1 << 55, (1 << 55) - 1, 1 << 63, (1 << 64) - 1]))
_SEGMENT = st.tuples(_SECTORS, st.one_of(st.integers(0, 8), st.integers(0, (1 << 32) - 1)),
                     st.one_of(st.just(0), st.integers(0, 3), st.integers(0, (1 << 32) - 1)))


@st.composite
def _requests(draw: st.DrawFn) -> dict[str, object]:
    rtype = draw(st.sampled_from([T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES,
                                  T_IN, T_OUT, 2, 7, T_SECURE_ERASE, 99, 0xFFFF_FFFF]))
    sector = draw(_SECTORS)
    hdr = header(rtype, sector)
    if draw(st.integers(0, 5)) == 0:
        hdr = hdr[:draw(st.integers(0, 15))]
    if rtype == T_OUT or draw(st.integers(0, 7)) == 0:
        n = draw(st.one_of(st.sampled_from([512, 1024, 2048]), st.integers(0, 2100)))
        payload = draw(st.binary(min_size=n, max_size=n)) if n < 64 else bytes(
            [draw(st.integers(0, 255))]) * n
    elif rtype in (T_DISCARD, T_WRITE_ZEROES):
        payload = segments(*draw(st.lists(_SEGMENT, min_size=0, max_size=MAX_DISCARD_SEG + 1)))
        if draw(st.integers(0, 7)) == 0:
            payload += b"\0" * draw(st.integers(1, 15))
    else:
        payload = b""
    if rtype in (T_IN, T_GET_ID) or draw(st.integers(0, 7)) == 0:
        in_len = draw(st.one_of(st.sampled_from([512, 1024, 4096, 20]), st.integers(0, 4200)))
    else:
        in_len = 0
    status = draw(st.sampled_from(["separate", "separate", "merged", "none"]))
    writable = _split(draw, bytes(in_len))
    wlens = [len(w) for w in writable]
    if status == "separate" or (status == "merged" and not wlens):
        wlens.append(1)
    elif status == "merged":
        wlens[-1] += 1
    return {"type": rtype, "sector": sector,
            "readable": _split(draw, hdr + payload, 4), "writable": wlens,
            "indirect": draw(st.booleans())}


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(req=_requests())
def test_any_request(disk: Disk, req: dict[str, object]) -> None:
    """Any request completes with the status and length the model predicts, moves the
    right data (or none), and leaves the device usable."""
    rtype, sector = req["type"], req["sector"]
    readable, wlens = req["readable"], req["writable"]
    assert isinstance(rtype, int) and isinstance(sector, int)
    assert isinstance(readable, list) and isinstance(wlens, list)
    if not readable and not wlens:
        return
    flat = b"".join(readable)
    if len(flat) >= 16:  # what the device reads, whatever the strategy meant
        rtype, _, sector = struct.unpack_from("<IIQ", flat)
    want_status, want_used = model(rtype, sector, flat, sum(wlens), readonly=False,
                                   discard=True)
    event(f"status {want_status}")
    before = bytes(disk.shadow)
    used, bufs = disk.q.submit(readable, wlens, indirect=bool(req["indirect"]))
    got = b"".join(bufs)
    assert used == want_used
    if want_status is None:
        assert got == b"\xa5" * len(got)
        assert disk.file_bytes() == before
        return
    assert got[-1] == want_status
    data = got[:-1]
    payload = flat[16:]
    if want_status != S_OK:
        assert data == b"\xa5" * len(data)
        assert disk.file_bytes() == before
    elif rtype == T_IN:
        assert data == before[sector * 512:sector * 512 + len(data)]
    elif rtype == T_GET_ID:
        ident = SERIAL.encode()[:ID_BYTES]
        assert data[:ID_BYTES] == ident[:len(data)]
        assert data[ID_BYTES:] == b"\xa5" * len(data[ID_BYTES:])
    elif rtype == T_OUT:
        disk.shadow[sector * 512:sector * 512 + len(payload)] = payload
    elif rtype in (T_WRITE_ZEROES, T_DISCARD):
        after = disk.file_bytes()
        for s, n, _ in struct.iter_unpack("<QII", payload):
            lo, hi = s * 512, (s + n) * 512
            if rtype == T_WRITE_ZEROES:
                disk.shadow[lo:hi] = bytes(hi - lo)
            else:  # discard: zeros or the old data
                assert after[lo:hi] in (bytes(hi - lo), before[lo:hi])
                disk.shadow[lo:hi] = after[lo:hi]
    assert_usable(disk)


def test_model_agrees_with_known_cases() -> None:
    """The model itself is checked against the hand-written table."""
    for _name, readable, writable, status, used in HOSTILE:
        flat = b"".join(readable)
        rtype, _, sector = struct.unpack("<IIQ", flat[:16]) if len(flat) >= 16 else (0, 0, 0)
        assert model(rtype, sector, flat, sum(writable), readonly=False,
                     discard=True) == (status, used), _name
    assert model(T_IN, 0, header(T_IN), 513, readonly=False, discard=True) == (S_OK, 513)
    assert model(T_OUT, 0, header(T_OUT) + bytes(512), 1, readonly=True,
                 discard=False) == (S_IOERR, 1)


def test_version_1_only_driver(tmp_path: Path) -> None:
    """A driver that takes no optional feature still reads and writes."""
    path, data = _image(tmp_path)
    with closing(open_disk(path, readonly=False, direct=False)) as image, \
            VirtioPciDriver(BlockDevice(image, workers=2)) as drv:
        (q,) = drv.init(1 << F_VERSION_1)
        used, (got, status) = q.submit([header(T_IN, 1)], [512, 1])
        assert (used, status, got) == (513, bytes([S_OK]), bytes(data[512:1024]))


def test_write_zeroes_with_unmap_where_holes_are_unsupported(
        disk: Disk, monkeypatch: pytest.MonkeyPatch) -> None:
    """Write-zeroes must zero even when the unmap hint cannot punch a hole; discard may
    then do nothing (it is a hint)."""
    import errno

    import pyvirt.disk.raw as raw_mod

    assert isinstance(disk.blk.disk, RawDisk)

    def no_fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(raw_mod, "_fallocate", no_fallocate)
    status, used, _ = request(disk, T_WRITE_ZEROES, out=segments((20, 2, 1), (30, 1, 0)))
    assert (status, used) == (S_OK, 1)
    disk.shadow[20 * 512:22 * 512] = bytes(1024)
    disk.shadow[30 * 512:31 * 512] = bytes(512)
    assert request(disk, T_DISCARD, out=segments((40, 4, 0)))[:2] == (S_OK, 1)
    assert_usable(disk)


def test_worker_pool_grows_on_demand_and_stops(tmp_path: Path) -> None:
    """No worker before there is work; requests that wait for a free worker
    start more, up to the limit; close() ends them all."""
    import threading
    import time

    import pyvirt.virtio.blk as blk

    image = open_disk(_image(tmp_path)[0], readonly=False, direct=False)
    dev = BlockDevice(image, workers=3)
    assert dev._threads == []
    gate = threading.Event()
    started = threading.Semaphore(0)

    def slow(req: object) -> None:
        started.release()
        gate.wait(10)
        with dev._idle:
            dev._in_flight -= 1
            dev._idle.notify_all()

    dev._run_one = slow  # type: ignore[method-assign]
    with dev._idle:
        dev._in_flight += 5
    for _ in range(5):
        dev._jobs.put(object())  # type: ignore[arg-type]
        dev._grow_pool()
    for _ in range(3):
        assert started.acquire(timeout=5)
    time.sleep(0.1)
    assert len(dev._threads) == 3  # the limit, though 2 requests still wait
    assert not started.acquire(timeout=0.1)
    gate.set()
    for _ in range(2):
        assert started.acquire(timeout=5)
    dev.close()
    image.close()
    assert all(not t.is_alive() for t in dev._threads)
    assert blk.WORKERS >= 32


def test_in_flight_requests_bounded_by_the_ring(disk: Disk) -> None:
    """A driver that re-posts heads the device still holds (legal for no driver)
    must not grow the requests in flight past the ring size: the device stops
    taking chains until there is room instead of queueing work without bound."""
    drv, q, blk = disk.drv, disk.q, disk.blk
    gate = threading.Event()
    real_execute = blk._execute

    def slow(req: object) -> tuple[int, int]:
        gate.wait(10)
        return real_execute(req)  # type: ignore[arg-type]

    blk._execute = slow  # type: ignore[method-assign]
    st_addr, buf = drv.put(b"\xff"), drv.alloc(512)
    head = q.add([(drv.put(header(T_IN, 1)), 16)], [(buf, 512), (st_addr, 1)], publish=False)
    try:
        for _ in range(q.size):
            q.publish(head)
        q.kick()
        wait_for(lambda: blk._in_flight >= q.size, 5, "a ring's worth in flight")
        for _ in range(q.size):  # the device took them all, so the ring has room again
            q.publish(head)
        q.kick()
        threading.Event().wait(0.5)
        assert blk._in_flight <= q.size
    finally:
        gate.set()
    wait_for(lambda: blk._in_flight == 0 and q.pending_used() == 2 * q.size, 10,
             "every request completed")


# ---- over other backends -----------------------------------------------------------------


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img (the referee) missing")
def test_qcow2_disk_through_the_device(tmp_path: Path) -> None:
    """The device over a qcow2 overlay on a raw base: reads through the chain,
    writes, write-zeroes, discard, flush, the discard granularity in the config
    space; qemu-img then finds the image clean and holding what the guest wrote."""
    qemu_img = shutil.which("qemu-img")
    assert qemu_img is not None
    base = tmp_path / "base.raw"
    shadow = bytearray(random.Random(7).randbytes(IMAGE_SIZE))
    base.write_bytes(shadow)
    top = tmp_path / "top.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b",
                    "base.raw", "-F", "raw", str(top)], check=True)
    backend = open_disk(top, format="qcow2")
    assert backend.format == "qcow2"
    drv = VirtioPciDriver(BlockDevice(backend, serial=SERIAL, discard=True, workers=4))
    try:
        (q,) = drv.init()
        d = Disk(top, drv, q, shadow, False, True)
        assert drv.config_read(0, 4) | drv.config_read(4, 4) << 32 == SECTORS
        assert drv.config_read(44, 4) == 4096 // 512  # discard_sector_alignment: a cluster
        assert read(d, 0, 16) == bytes(shadow[:16 * 512])  # from the base
        data = random.Random(8).randbytes(20 * 512)
        assert request(d, T_OUT, 3, out=data, pieces=3)[:2] == (S_OK, 1)  # partial clusters: COW
        shadow[3 * 512:23 * 512] = data
        assert request(d, T_WRITE_ZEROES, out=segments((40, 9, 0), (64, 8, 1)))[:2] == (S_OK, 1)
        shadow[40 * 512:49 * 512] = bytes(9 * 512)
        shadow[64 * 512:72 * 512] = bytes(8 * 512)
        assert request(d, T_FLUSH)[:2] == (S_OK, 1)
        assert read(d, 0, SECTORS) == bytes(shadow)
        flushed = []
        real_flush = backend.flush
        backend.flush = lambda: (flushed.append(1), real_flush())[1]  # type: ignore[method-assign]
        d.blk.save_state()
        assert flushed  # a saved state promises the guest its completed writes
    finally:
        drv.close()
        backend.close()
    check = subprocess.run([qemu_img, "check", "-f", "qcow2", str(top)], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    out = tmp_path / "out.raw"
    subprocess.run([qemu_img, "convert", "-f", "qcow2", "-O", "raw", str(top), str(out)],
                   check=True)
    assert out.read_bytes() == bytes(shadow)
    assert base.read_bytes() != bytes(shadow)  # the base never written


def test_corrupt_image_fails_the_request_and_is_logged_once(
        disk: Disk, caplog: pytest.LogCaptureFixture) -> None:
    """Damage a backend finds while serving a request: that request fails with
    IOERR, others go on, the VMM says it once."""
    from pyvirt.disk import CorruptImage

    backend = disk.blk.disk
    real = backend.readv

    def readv(views: list[memoryview], offset: int) -> None:
        if offset in (7 * 512, 9 * 512, 11 * 512):
            raise CorruptImage(f"{backend.path}: L2 table entry points outside the image")
        real(views, offset)

    backend.readv = readv  # type: ignore[method-assign]
    disk.blk.inline_max = 0  # every read through a worker
    for sector in (7, 9, 11, 7):
        assert request(disk, T_IN, sector, in_len=512)[:2] == (S_IOERR, 1)
    assert read(disk, 8, 1) == bytes(disk.shadow[8 * 512:9 * 512])
    assert caplog.text.count("L2 table entry points outside") == 1
    assert disk.blk.errors == 4
