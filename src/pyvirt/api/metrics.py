"""Prometheus text exposition format 0.0.4: rendering ``MetricFamily`` lists
(``GET /metrics``) and parsing the text back (the client, the tests).

The format (https://prometheus.io/docs/instrumenting/exposition_formats/)::

    # HELP name text with \\\\ and \\n escaped
    # TYPE name counter|gauge
    name{label="value with \\\\, \\" and \\n escaped",...} 12
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyvirt.vmm.control import MetricFamily

__all__ = ["CONTENT_TYPE", "MetricsFormatError", "Samples", "parse", "render"]

#: the Content-Type Prometheus expects for this format
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: sample name -> [(labels, value)], in the order they appear
Samples = dict[str, list[tuple[dict[str, str], float]]]

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_TYPES = frozenset({"counter", "gauge"})


class MetricsFormatError(ValueError):
    """A metric family that cannot be written (or text that cannot be read) in
    the exposition format: a bad name, type, label or value."""


def render(families: Iterable[MetricFamily]) -> str:
    """The exposition text for ``families``; ``MetricsFormatError`` names the
    first family that breaks the format (a programming error in its source)."""
    out: list[str] = []
    seen: set[str] = set()
    for fam in families:
        name = fam.name
        if not isinstance(name, str) or not _NAME.match(name):
            raise MetricsFormatError(f"metric name {name!r} is not valid")
        if name in seen:
            raise MetricsFormatError(f"metric {name}: appears twice")
        seen.add(name)
        if fam.type not in _TYPES:
            raise MetricsFormatError(f"metric {name}: type {fam.type!r} is not counter or gauge")
        if fam.help:
            out.append(f"# HELP {name} {_escape_help(fam.help)}")
        out.append(f"# TYPE {name} {fam.type}")
        label_sets: set[frozenset[tuple[str, str]]] = set()
        for labels, value in fam.samples:
            key = frozenset(labels.items())
            if key in label_sets:
                raise MetricsFormatError(f"metric {name}: two samples with labels {labels}")
            label_sets.add(key)
            out.append(f"{name}{_render_labels(name, labels)} {_render_value(name, value)}")
    return "\n".join(out) + "\n" if out else ""


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _render_labels(name: str, labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    parts = []
    for key, val in labels.items():
        if not isinstance(key, str) or not _LABEL.match(key) or key.startswith("__"):
            raise MetricsFormatError(f"metric {name}: label name {key!r} is not valid")
        if not isinstance(val, str):
            raise MetricsFormatError(f"metric {name}: label {key} is not a string")
        parts.append(f'{key}="{_escape_label(val)}"')
    return "{" + ",".join(parts) + "}"


def _render_value(name: str, value: float) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MetricsFormatError(f"metric {name}: value {value!r} is not a number")
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    # integral floats (uptime in whole seconds, byte counts) read better without ".0"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


# ---- parsing

_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?[ \t]+(\S+)(?:[ \t]+-?\d+)?\Z")
_PAIR = re.compile(r'[ \t]*([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"((?:[^"\\\n]|\\.)*)"[ \t]*(,|\Z)')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def parse(text: str) -> Samples:
    """Samples from exposition text (comments skipped); ``MetricsFormatError``
    names the first line that is not in the format."""
    samples: Samples = {}
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            raise MetricsFormatError(f"line {lineno}: not a sample: {line[:80]!r}")
        name, label_text, value_text = m.groups()
        labels = _parse_labels(lineno, label_text or "")
        samples.setdefault(name, []).append((labels, _parse_value(lineno, value_text)))
    return samples


def _parse_labels(lineno: int, text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        m = _PAIR.match(text, pos)
        if m is None:
            raise MetricsFormatError(f"line {lineno}: bad labels: {text[:80]!r}")
        key, raw, _ = m.groups()
        if key in labels:
            raise MetricsFormatError(f"line {lineno}: label {key} twice")
        labels[key] = re.sub(r"\\.", lambda e: _UNESCAPE.get(e.group(0), e.group(0)), raw)
        pos = m.end()
    return labels


def _parse_value(lineno: int, text: str) -> float:
    special = {"NaN": math.nan, "+Inf": math.inf, "-Inf": -math.inf, "Inf": math.inf}
    if text in special:
        return special[text]
    try:
        return float(text)
    except ValueError:
        raise MetricsFormatError(f"line {lineno}: bad value {text!r}") from None
