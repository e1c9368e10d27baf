"""pyvirt.cli: the ``pyvirt`` command. ``main`` answers ``pyvirt list`` without
loading click (``quick``); everything else is ``cli/main.py``'s click group."""

from __future__ import annotations

import sys


def main() -> None:
    from pyvirt.cli.quick import quick

    status = quick(sys.argv[1:])
    if status is not None:
        sys.exit(status)
    from pyvirt.cli.main import main as click_main

    click_main()
