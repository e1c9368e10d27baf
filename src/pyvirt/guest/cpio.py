"""A writer for the "newc" cpio format (the one the Linux kernel unpacks as initramfs).

Each member is a 110-byte ASCII header (magic ``070701`` and 13 eight-digit hex
fields), the NUL-terminated name, padding to a multiple of 4, the data, and
padding to a multiple of 4 again. The archive ends with a member named
``TRAILER!!!``.

Output is deterministic: inode numbers count up from 1 in the order members are
added, and every mtime is the same fixed value (0 unless told otherwise), so the
same inputs always give the same bytes.

Names are stored without a leading ``/`` (as ``find . | cpio -o`` would, minus
the ``./``). Parent directories that were not added explicitly are added on the
fly, because the kernel's unpacker does not create them.
"""

from __future__ import annotations

import stat
from typing import BinaryIO

__all__ = ["TRAILER", "CpioError", "CpioWriter"]

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
_HEADER_LEN = 110


class CpioError(ValueError):
    """A member cannot be written (bad name, duplicate, archive already closed)."""


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _normalize(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts:
        raise CpioError(f"cpio member name {name!r} is empty")
    if ".." in parts:
        raise CpioError(f"cpio member name {name!r} contains '..'")
    if "\0" in name:
        raise CpioError(f"cpio member name {name!r} contains a NUL byte")
    return "/".join(parts)


class CpioWriter:
    """Writes a newc archive to a binary stream; call :meth:`close` to add the trailer.

    Usable as a context manager (the trailer is written on a clean exit). The
    stream itself is not closed.
    """

    def __init__(self, out: BinaryIO, *, mtime: int = 0, uid: int = 0, gid: int = 0) -> None:
        self._out = out
        self._mtime = mtime
        self._uid = uid
        self._gid = gid
        self._next_ino = 1
        self._names: set[str] = set()
        self._dirs: set[str] = set()
        self._closed = False
        self.bytes_written = 0

    def __enter__(self) -> CpioWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()

    # -- members ---------------------------------------------------------------------------

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        """Add a directory (its parents too, if missing); adding an existing one is a no-op."""
        path = _normalize(name)
        if path in self._dirs:
            return
        self._ensure_parents(path)
        self._member(path, stat.S_IFDIR | (mode & 0o7777), b"", nlink=2)
        self._dirs.add(path)

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file with the given contents."""
        path = _normalize(name)
        self._ensure_parents(path)
        self._member(path, stat.S_IFREG | (mode & 0o7777), data)

    def add_symlink(self, name: str, target: str) -> None:
        """Add a symlink ``name -> target`` (the target is stored verbatim)."""
        if not target or "\0" in target:
            raise CpioError(f"bad symlink target {target!r} for {name!r}")
        path = _normalize(name)
        self._ensure_parents(path)
        self._member(path, stat.S_IFLNK | 0o777, target.encode())

    def add_device(self, name: str, kind: str, major: int, minor: int, mode: int = 0o600) -> None:
        """Add a device node; ``kind`` is ``"c"`` (character) or ``"b"`` (block)."""
        if kind not in ("c", "b"):
            raise CpioError(f"device kind must be 'c' or 'b', not {kind!r}")
        path = _normalize(name)
        self._ensure_parents(path)
        fmt = stat.S_IFCHR if kind == "c" else stat.S_IFBLK
        self._member(path, fmt | (mode & 0o7777), b"", rdev=(major, minor))

    def close(self) -> None:
        """Write the trailer; the archive is complete afterwards. Idempotent."""
        if self._closed:
            return
        self._write_header(TRAILER, mode=0, ino=0, nlink=1, size=0, rdev=(0, 0))
        self._closed = True

    # -- internals -------------------------------------------------------------------------

    def _ensure_parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            if parent not in self._dirs:
                self.add_dir(parent)

    def _member(
        self, path: str, mode: int, data: bytes, *, nlink: int = 1, rdev: tuple[int, int] = (0, 0)
    ) -> None:
        if self._closed:
            raise CpioError("cpio archive is already closed")
        if path in self._names:
            raise CpioError(f"cpio member {path!r} added twice")
        self._names.add(path)
        ino = self._next_ino
        self._next_ino += 1
        self._write_header(path, mode=mode, ino=ino, nlink=nlink, size=len(data), rdev=rdev)
        self._write(data)
        self._write(_pad4(len(data)))

    def _write_header(
        self, name: str, *, mode: int, ino: int, nlink: int, size: int, rdev: tuple[int, int]
    ) -> None:
        encoded = name.encode() + b"\0"
        if size > 0xFFFFFFFF:
            raise CpioError(f"cpio member {name!r} is too large for newc ({size} bytes)")
        fields = (
            ino,
            mode,
            self._uid,
            self._gid,
            nlink,
            self._mtime,
            size,
            0,  # dev major: the filesystem the file came from, meaningless here
            0,  # dev minor
            rdev[0],
            rdev[1],
            len(encoded),
            0,  # checksum: only used by the "070702" crc format
        )
        header = MAGIC + b"".join(b"%08X" % f for f in fields)
        self._write(header)
        self._write(encoded)
        # The name is padded so that header + name ends on a 4-byte boundary.
        self._write(_pad4(_HEADER_LEN + len(encoded)))

    def _write(self, data: bytes) -> None:
        if data:
            self._out.write(data)
            self.bytes_written += len(data)
