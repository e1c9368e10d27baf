"""pyvirt.guest: the default guest, a Debian kernel plus an initramfs we write ourselves.

This module stays light (no subprocess, no gzip imports): the build API lives in
:mod:`pyvirt.guest.build` and is re-exported here lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pyvirt.errors import PyvirtError

if TYPE_CHECKING:
    from pyvirt.guest.build import (
        GuestImage,
        build_default_guest,
        cache_dir,
        default_guest,
        guest_is_built,
    )

__all__ = [
    "READY_LINE",
    "GuestBuildError",
    "GuestImage",
    "build_default_guest",
    "cache_dir",
    "default_guest",
    "guest_is_built",
]

#: printed alone on a line by the guest once its shell holds the console (input is kept)
READY_LINE = "PYVIRT-READY"


class GuestBuildError(PyvirtError):
    """The default guest cannot be built (apt, dpkg, modules, the cache dir)."""


_LAZY = {"GuestImage", "build_default_guest", "cache_dir", "default_guest", "guest_is_built"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from pyvirt.guest import build

        return getattr(build, name)
    raise AttributeError(f"module 'pyvirt.guest' has no attribute {name!r}")
