"""Where pyvirt keeps files. Import-light: used on the VMM's start-up path."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """``$PYVIRT_CACHE_DIR``, else ``$XDG_CACHE_HOME/pyvirt``, else ``~/.cache/pyvirt``."""
    explicit = os.environ.get("PYVIRT_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "pyvirt"
    return Path.home() / ".cache" / "pyvirt"
