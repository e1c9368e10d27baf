"""virtio-blk request parsing and execution (``BlockDevice.process``) behind the real
virtio-pci transport, over a 64 KiB temporary image: fuzzer-chosen features, queue
set-up, rings, headers, data and discard/write-zeroes segments, on a writable disk
with discard and on a read-only one.

Documented outcomes: a status byte (OK/IOERR/UNSUPP) per request, a bad chain
completed with length 0, ``QueueBroken`` → NEEDS_RESET. An exception inside the
device (even one its worker catches and logs) is a finding; so is writing to
the read-only image or beyond the image size."""

from __future__ import annotations

import atexit
import os
import tempfile
from pathlib import Path

from fuzz.common import Provider, VirtioHarness, check
from pyvirt.disk import open_disk
from pyvirt.virtio.blk import BlockDevice

IMAGE_SIZE = 64 << 10
_dir = tempfile.TemporaryDirectory(prefix="pyvirt-fuzz-blk-")
atexit.register(_dir.cleanup)
_images: list[tuple[Path, VirtioHarness, bool]] = []
for _ro in (False, True):
    _path = Path(_dir.name) / f"disk-{'ro' if _ro else 'rw'}.img"
    _path.write_bytes(bytes(IMAGE_SIZE))
    _img = open_disk(_path, readonly=_ro, direct=False, format="raw")
    _images.append((_path, VirtioHarness(BlockDevice(_img, serial="fuzz", discard=not _ro,
                                                     workers=2)), _ro))
_ro_stat = os.stat(_images[1][0])


def one_input(data: bytes) -> None:
    fdp = Provider(data)
    path, harness, readonly = _images[fdp.ConsumeIntInRange(0, 1)]
    harness.run(fdp)
    st = os.stat(path)
    check(st.st_size == IMAGE_SIZE, f"image size changed to {st.st_size}")
    if readonly:
        check(st.st_mtime_ns == _ro_stat.st_mtime_ns, "the read-only image was written")
