"""The quick path of ``pyvirt list``: scripts and prompts run it in loops, and
loading click alone costs ~40 ms of its 100 ms budget (docs/benchmarks.md). A
command line that is exactly ``[-c URI] list [--all] [--inactive] [--name]
[--uuid] [--json]`` is answered here with the stdlib client; anything else
(``--help``, ``--debug``, another verb, an unknown option) goes to click, which
prints the same output (``cli/virsh.py`` formats with the same
``cli/tables.py``) and every error message.
"""

from __future__ import annotations

import os
import sys

__all__ = ["quick"]

_FLAGS = {"--all": "all_", "--inactive": "inactive", "--name": "names", "--uuid": "uuids",
          "--json": "as_json"}


def quick(argv: list[str]) -> int | None:
    """The exit status when ``argv`` was answered here, else None (use click)."""
    uri = os.environ.get("PYVIRT_URI") or None
    args = list(argv)
    if args[:1] in (["-c"], ["--connect"]) and len(args) >= 2:
        uri, args = args[1], args[2:]
    elif args and args[0].startswith("--connect="):
        uri, args = args[0].split("=", 1)[1], args[1:]
    if not args or args[0] != "list":
        return None
    opts = dict.fromkeys(_FLAGS.values(), False)
    for a in args[1:]:
        if a not in _FLAGS:
            return None
        opts[_FLAGS[a]] = True
    from pyvirt.cli.tables import format_list, one_line
    from pyvirt.client import Client
    from pyvirt.errors import PyvirtError

    try:
        with Client(uri or None) as c:
            doms = c.list_domains(all=opts["all_"] or opts["inactive"])
    except PyvirtError as exc:
        msg = getattr(exc, "message", None) or str(exc)
        sys.stderr.write(f"error: {one_line(str(msg))}\n")
        return 1
    out = format_list(doms, **opts)
    sys.stdout.write(out + "\n" if out else "")
    if not opts["as_json"]:
        sys.stdout.write("\n")  # virsh ends a table with a blank line
    sys.stdout.flush()
    return 0
