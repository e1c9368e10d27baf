"""Output shapes shared by the virsh verbs (``cli/virsh.py``) and the quick path
(``cli/quick.py``): click-free, so ``pyvirt list`` can print without loading click."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["INACTIVE", "format_list", "one_line", "table"]

#: the states `list` counts as inactive (virsh: not running)
INACTIVE = ("shut off", "crashed")


def one_line(text: str) -> str:
    """``text`` with anything unprintable escaped (a name from the daemon never
    moves the cursor or clears the user's terminal)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Rows laid out as virsh's ``vshTablePrint``: each cell after one space,
    columns padded to their widest cell plus two, and a rule of dashes as wide
    as every column plus three."""
    cells = [[str(h) for h in header]] + [["" if c is None else one_line(str(c)) for c in r]
                                          for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = []
    for n, row in enumerate(cells):
        parts = []
        for i, cell in enumerate(row):
            pad = widths[i] - len(cell) + 2 if i < len(row) - 1 else 0
            parts.append(" " + cell + " " * pad)
        out.append("".join(parts))
        if n == 0:
            out.append("-" * sum(w + 3 for w in widths))
    return "\n".join(out)


def format_list(doms: list[dict[str, Any]], *, all_: bool, inactive: bool, names: bool,
                uuids: bool, as_json: bool) -> str:
    """What ``pyvirt list`` prints for the daemon's domain summaries (without the
    blank line virsh ends a table with)."""
    if inactive and not all_:
        doms = [d for d in doms if d.get("state") in INACTIVE]
    elif not all_:
        doms = [d for d in doms if d.get("state") not in INACTIVE]
    # virsh: active domains by id, then inactive ones by name
    doms = sorted(doms, key=lambda d: (d.get("id") is None, d.get("id") or 0,
                                      d.get("name", "")))
    if as_json:
        import json

        return json.dumps(doms, indent=2, sort_keys=False, default=str)
    if names or uuids:
        return "\n".join(" ".join(x for x in (d.get("uuid") if uuids else None,
                                              d.get("name") if names else None) if x)
                         for d in doms)
    return table(("Id", "Name", "State"),
                 [("-" if d.get("id") is None else d["id"], d.get("name"), d.get("state"))
                  for d in doms])
