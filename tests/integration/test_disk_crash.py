"""kill -9 in the middle of heavy writes to a qcow2 disk, 20 times: never corrupt.

The default guest (busybox, no root disk) runs on the software CPU with one
qcow2 disk over a raw base file of random data (so that partial-cluster writes
copy from the backing file). Two writers run in the guest at once:

* region A: 48 KiB chunks (straddling 64 KiB clusters), each O_DIRECT and
  fsync'd; after each, the guest prints ``FL <slot> <sha256>``;
* region B: random 16-128 KiB O_DIRECT writes and 128 KiB discards, never
  flushed (allocation and freeing of clusters all the time).

The VMM is killed with SIGKILL at a random moment. Then ``qemu-img check``
must find no corruption (leaked clusters are allowed: that is what a crash may
leave), every chunk the guest reported flushed in any round must be in the
image (read back by ``qemu-img convert``), region A past what was ever written
must still read as the backing file, and the backing file is unchanged.

Twenty boots would cost minutes, so the guest is booted once, snapshotted at its
shell, and each round restores that snapshot (``pyvirt run --restore``) onto
the image as the previous kill left it: pyvirt's qcow2 code opens the crashed
image writable every round.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirt.guest import READY_LINE, GuestImage, build_default_guest, guest_is_built
from tests.integration.test_lifecycle_emu import Vmm

pytest.importorskip("unicorn")
from pyvirt.hypervisor.emulated import engine

pytestmark = [
    pytest.mark.guest,
    pytest.mark.slow,
    pytest.mark.skipif(not engine.available(), reason="unicorn lacks pyvirt's patches"),
]

MiB = 1 << 20
DISK = 160 * MiB
CHUNK = 48 << 10  # not a divisor of the 64 KiB cluster: chunks straddle clusters
REGION_A = 96 * MiB  # [0, REGION_A): the flushed chunks
SLOTS = REGION_A // CHUNK
ROUNDS = 20
FLUSHED = re.compile(rb"FL (\d+) ([0-9a-f]{64})\r?\n")

# Region B's writer: random offsets in [96 MiB, 156 MiB + 128 KiB), never flushed.
HEAVY = ("h() { while :; do "
         "dd if=/tmp/rnd of=/dev/vda bs=16384 count=$((1 + RANDOM % 8)) "
         f"seek=$(({REGION_A} + (RANDOM % 3840) * 16384)) oflag=seek_bytes,direct "
         "2>/dev/null; "
         "[ $((RANDOM % 4)) = 0 ] && "
         f"blkdiscard -o $(({REGION_A} + (RANDOM % 960) * 65536)) -l 131072 /dev/vda; "
         "done; }")
# Region A's writer: slot $1 on; round $2 goes into each chunk's first 16 bytes, so
# that no two rounds write the same bytes (the restored guest's RNG repeats itself).
FLUSHER = ("w() { i=$1; while :; do "
           f"{{ printf '%-15s\\n' \"R$2S$i\"; head -c {CHUNK - 16} /dev/urandom; }} >/tmp/c; "
           f"dd if=/tmp/c of=/dev/vda bs={CHUNK} seek=$i oflag=direct conv=fsync,notrunc "
           "2>/dev/null || break; "
           "s=$(sha256sum /tmp/c); echo \"FL $i ${s%% *}\"; i=$((i + 1)); done; }")


@pytest.fixture(scope="module")
def image() -> GuestImage:
    if not guest_is_built():
        return build_default_guest(log=lambda msg: print(msg, flush=True))
    return build_default_guest(log=lambda _msg: None)


@pytest.fixture
def vmms() -> Iterator[list[Vmm]]:
    made: list[Vmm] = []
    yield made
    for v in made:
        v.kill()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(MiB):
            h.update(block)
    return h.hexdigest()


def _header(rnd: int, slot: int) -> bytes:
    """The first 16 bytes of a chunk: the FLUSHER's ``printf '%-15s\\n' R$2S$i``."""
    return f"R{rnd}S{slot}".ljust(15).encode() + b"\n"


def _check(img: Path) -> dict[str, int]:
    """``qemu-img check``: leaks are fine after a crash, nothing else is."""
    r = subprocess.run(["qemu-img", "check", "--output", "json", str(img)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode in (0, 3), f"qemu-img check exit {r.returncode}: {r.stdout}{r.stderr}"
    report = json.loads(r.stdout)
    assert report.get("corruptions", 0) == 0 and report.get("check-errors", 0) == 0, report
    return report


def test_kill_9_during_heavy_writes_never_corrupts(image: GuestImage, tmp_path: Path,
                                                   vmms: list[Vmm]) -> None:
    started = time.monotonic()
    rng = random.Random()
    print(f"seed {(seed := rng.randrange(1 << 32))}")
    rng.seed(seed)
    base = tmp_path / "base.raw"
    base.write_bytes(os.urandom(DISK))
    base_sha = _sha256(base)
    img = tmp_path / "disk.qcow2"
    # relative backing name, resolved against the image's directory (not the VMM's cwd)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
                    str(img)], check=True, cwd=tmp_path)

    v = Vmm(tmp_path / "boot.sock", "--accel", "emu", "--memory", "256M", "--net", "none",
            "--cmdline", "pyvirt.noecho", "--disk", f"path={img},format=qcow2,discard=on")
    vmms.append(v)
    v.wait_for(READY_LINE.encode())
    v.send(f"dd if=/dev/urandom of=/tmp/rnd bs=16384 count=8 2>/dev/null; {HEAVY}; {FLUSHER}; "
           "echo \"DEF\"\"INED\"")
    v.wait_for(b"DEFINED", timeout=60)
    v.drain(0.2)
    v.api.pause()
    snap = tmp_path / "snap"
    v.api.snapshot(snap)
    v.kill()

    flushed: dict[int, str] = {}  # slot -> sha256 of what the guest last flushed there
    touched = 0  # slots [0, touched) may have been written
    leaky_rounds = 0
    for rnd in range(ROUNDS):
        first = max(flushed, default=-1) + 1
        assert first + 200 < SLOTS, "region A is full: make it larger"
        r = Vmm(tmp_path / f"r{rnd}.sock", "--restore", str(snap), "--resume")
        vmms.append(r)
        r.send(f"h & w {first} {rnd}")
        # at a random moment after 1 to 8 chunks reported flushed
        want = rng.randint(1, 8)
        deadline = time.monotonic() + 60
        while len(FLUSHED.findall(r.out)) < want and time.monotonic() < deadline:
            r.drain(0.02)
        time.sleep(rng.uniform(0, 0.5))
        r.kill()  # SIGKILL, then everything it had written to stdout is read
        assert r.proc.returncode == -9, r.text[-2000:]
        got = [(int(slot), sha.decode()) for slot, sha in FLUSHED.findall(r.out)]
        assert got, r.text[-2000:]
        assert [s for s, _ in got] == list(range(first, first + len(got))), got
        flushed.update(got)

        report = _check(img)
        leaky_rounds += report.get("leaks", 0) > 0
        raw = tmp_path / "seen.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(raw)], check=True,
                       timeout=120)
        with raw.open("rb") as seen, base.open("rb") as orig:
            for slot, sha in sorted(flushed.items()):
                seen.seek(slot * CHUNK)
                assert hashlib.sha256(seen.read(CHUNK)).hexdigest() == sha, (
                    f"round {rnd}: slot {slot}, reported flushed, is not in the image")
            # Chunks written after the last marker that got out (the kill can beat the
            # console) carry this round's header; one more may be half written.
            last = first + len(got) - 1
            while last + 1 < SLOTS:
                seen.seek((last + 1) * CHUNK)
                if seen.read(16) != _header(rnd, last + 1):
                    break
                last += 1
            touched = max(touched, last + 2)
            seen.seek(touched * CHUNK)
            orig.seek(touched * CHUNK)
            assert seen.read(REGION_A - touched * CHUNK) == orig.read(REGION_A - touched * CHUNK), (
                f"round {rnd}: region A past slot {touched} no longer reads as the backing file")
        raw.unlink()
        print(f"round {rnd}: slots {first}..{last} written, {len(got)} reported flushed, "
              f"leaks {report.get('leaks', 0)}")

    assert _sha256(base) == base_sha, "the backing file was written to"
    print(f"{ROUNDS} kills, {len(flushed)} chunks verified, {leaky_rounds} rounds left leaks, "
          f"{time.monotonic() - started:.0f}s")
