"""A target that must fail: proves the runner reports findings (used by the CI smoke).

``PYVIRT_FUZZ_SELFTEST`` picks the failure: ``crash`` (an undocumented exception on
the seed input), ``logged`` (an error logged by pyvirt code, as a device thread
that caught a bug does), ``rss`` (memory over the bound: set PYVIRT_FUZZ_RSS_MB)."""

from __future__ import annotations

import logging
import os

MODE = os.environ.get("PYVIRT_FUZZ_SELFTEST", "crash")
RSS_EVERY = 1
_log = logging.getLogger("pyvirt.fuzz_selftest")
_hold: list[bytes] = []


def seeds() -> list[bytes]:
    return [b"FUZZ-SELFTEST"]


def one_input(data: bytes) -> None:
    if data != b"FUZZ-SELFTEST":
        return
    if MODE == "crash":
        raise ValueError("selftest: an undocumented exception")
    if MODE == "logged":
        try:
            raise KeyError("selftest")
        except KeyError:
            _log.exception("selftest: a device caught a bug")
    if MODE == "rss":
        _hold.append(b"x" * (128 << 20))
