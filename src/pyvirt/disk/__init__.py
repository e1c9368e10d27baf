"""Disk images: one backend interface (``DiskBackend``), one factory (``open_disk``).

    backend.py   the protocol, ImageFile, Extent, errors (DiskError, CorruptImage)
    lock.py      opening and locking image files (OFD locks)
    raw.py       raw files and block devices
    qcow2.py     qcow2 (with backing chains); imported only when a qcow2 image is opened
    open.py      open_disk / probe_format

Errors: ``DiskError`` (a ``UserInputError``: an image that cannot be used, one
line naming the config field) at open; ``CorruptImage`` (an ``OSError``,
EIO) for damage found while serving a request.

Import-light: on the VMM's start-up path.
"""

from pyvirt.disk.backend import CorruptImage, DiskBackend, DiskError, Extent
from pyvirt.disk.open import open_disk, probe_format

__all__ = ["CorruptImage", "DiskBackend", "DiskError", "Extent", "open_disk", "probe_format"]
