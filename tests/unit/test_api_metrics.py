"""The Prometheus text format: rendering MetricFamily lists and reading them back."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirt.api.metrics import MetricsFormatError, parse, render
from pyvirt.vmm.control import MetricFamily

# An independent reading of the format (exposition_formats.md, text format 0.0.4):
# each line is a HELP, a TYPE, or a sample whose label values use only \\, \" and \n.
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_HELP = re.compile(rf"# HELP ({_NAME}) ((?:[^\\\n]|\\[\\n])*)\Z")
_TYPE = re.compile(rf"# TYPE ({_NAME}) (counter|gauge)\Z")
_VALUE = r'"((?:[^"\\\n]|\\[\\"n])*)"'
_SAMPLE = re.compile(
    rf'({_NAME})(?:\{{((?:[a-zA-Z_][a-zA-Z0-9_]*={_VALUE},?)*)\}})? '
    r"(NaN|[+-]Inf|-?[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)\Z")


def _tiny_parse(text: str) -> list[tuple[str, dict[str, str], str]]:
    """This test's own parser: every line must match one of the three shapes."""
    assert text.endswith("\n")
    out = []
    for line in text[:-1].split("\n"):
        if _HELP.match(line) or _TYPE.match(line):
            continue
        m = _SAMPLE.match(line)
        assert m is not None, f"not a valid exposition line: {line!r}"
        labels = {}
        for key, raw in re.findall(rf"([a-zA-Z_][a-zA-Z0-9_]*)={_VALUE}", m.group(2) or ""):
            labels[key] = re.sub(r"\\(.)", lambda e: {"n": "\n"}.get(e.group(1), e.group(1)),
                                 raw)
        out.append((m.group(1), labels, m.group(3)))
    return out


def test_render_known_families() -> None:
    fams = [
        MetricFamily("pyvirt_vcpu_exits_total", "counter", "vCPU exits by kind",
                     [({"vcpu": "0", "kind": "io"}, 12), ({"vcpu": "0", "kind": "hlt"}, 3)]),
        MetricFamily("pyvirt_rss_bytes", "gauge", 'RSS \\ of "the" VMM\nin bytes',
                     [({}, 123456789.0)]),
        MetricFamily("pyvirt_uptime_seconds", "gauge", "", [({}, 1.25)]),
        MetricFamily("pyvirt_device_label", "gauge", "x",
                     [({"device": 'a\\b"c\nd'}, math.nan), ({"device": "e"}, math.inf),
                      ({"device": "f"}, -math.inf)]),
    ]
    assert render(fams) == (
        "# HELP pyvirt_vcpu_exits_total vCPU exits by kind\n"
        "# TYPE pyvirt_vcpu_exits_total counter\n"
        'pyvirt_vcpu_exits_total{vcpu="0",kind="io"} 12\n'
        'pyvirt_vcpu_exits_total{vcpu="0",kind="hlt"} 3\n'
        '# HELP pyvirt_rss_bytes RSS \\\\ of "the" VMM\\nin bytes\n'
        "# TYPE pyvirt_rss_bytes gauge\n"
        "pyvirt_rss_bytes 123456789\n"
        "# TYPE pyvirt_uptime_seconds gauge\n"
        "pyvirt_uptime_seconds 1.25\n"
        "# HELP pyvirt_device_label x\n"
        "# TYPE pyvirt_device_label gauge\n"
        'pyvirt_device_label{device="a\\\\b\\"c\\nd"} NaN\n'
        'pyvirt_device_label{device="e"} +Inf\n'
        'pyvirt_device_label{device="f"} -Inf\n'
    )
    back = parse(render(fams))
    assert back["pyvirt_device_label"][0][0] == {"device": 'a\\b"c\nd'}
    assert math.isnan(back["pyvirt_device_label"][0][1])
    assert back["pyvirt_vcpu_exits_total"] == [({"vcpu": "0", "kind": "io"}, 12.0),
                                               ({"vcpu": "0", "kind": "hlt"}, 3.0)]
    assert render([]) == ""


@pytest.mark.parametrize(("fam", "why"), [
    (MetricFamily("1bad", "gauge", "", [({}, 1)]), "name '1bad'"),
    (MetricFamily("bad-name", "gauge", "", [({}, 1)]), "name 'bad-name'"),
    (MetricFamily("", "gauge", "", [({}, 1)]), "name ''"),
    (MetricFamily("ok", "histogram", "", [({}, 1)]), "type 'histogram'"),
    (MetricFamily("ok", "gauge", "", [({"bad-label": "x"}, 1)]), "label name 'bad-label'"),
    (MetricFamily("ok", "gauge", "", [({"__reserved": "x"}, 1)]), "label name '__reserved'"),
    (MetricFamily("ok", "gauge", "", [({"a": 1}, 1)]), "label a is not a string"),  # type: ignore[dict-item]
    (MetricFamily("ok", "gauge", "", [({}, "1")]), "value '1'"),  # type: ignore[list-item]
    (MetricFamily("ok", "gauge", "", [({}, True)]), "value True"),
    (MetricFamily("ok", "gauge", "", [({"a": "x"}, 1), ({"a": "x"}, 2)]), "two samples"),
])
def test_render_refuses_what_the_format_cannot_hold(fam: MetricFamily, why: str) -> None:
    with pytest.raises(MetricsFormatError, match=re.escape(why)):
        render([fam])


def test_render_refuses_a_family_twice() -> None:
    f = MetricFamily("x", "gauge", "", [({}, 1)])
    with pytest.raises(MetricsFormatError, match="appears twice"):
        render([f, f])


@pytest.mark.parametrize("text", [
    "x{a=\"b\" 1\n", "x{a=b} 1\n", "x 1 2 3\n", "x{a=\"1\",a=\"2\"} 1\n", "x one\n", "-x 1\n",
])
def test_parse_refuses_broken_lines(text: str) -> None:
    with pytest.raises(MetricsFormatError, match="line 1"):
        parse(text)


_names = st.from_regex(r"[a-zA-Z_:][a-zA-Z0-9_:]{0,20}", fullmatch=True)
_label_names = st.from_regex(r"[a-zA-Z][a-zA-Z0-9_]{0,10}", fullmatch=True)
_values = st.one_of(st.integers(-(2**63), 2**64),
                    st.floats(allow_nan=True, allow_infinity=True))


@settings(max_examples=300, deadline=None)
@given(name=_names, help_text=st.text(max_size=40), kind=st.sampled_from(["counter", "gauge"]),
       samples=st.lists(st.dictionaries(_label_names, st.text(max_size=30), max_size=4),
                        max_size=5, unique_by=lambda d: frozenset(d.items())),
       values=st.lists(_values, min_size=5, max_size=5))
def test_any_label_value_renders_to_valid_lines_and_reads_back(
        name: str, help_text: str, kind: str, samples: list[dict[str, str]],
        values: list[float]) -> None:
    fam = MetricFamily(name, kind, help_text, list(zip(samples, values, strict=False)))
    text = render([fam])
    lines = _tiny_parse(text)
    assert len(lines) == len(samples)
    back = parse(text)
    got = back.get(name, [])
    assert len(got) == len(samples)
    for (labels, value), (mine_name, mine_labels, _), (want_labels, want) in zip(
            got, lines, fam.samples, strict=True):
        assert labels == want_labels == mine_labels
        assert mine_name == name
        if isinstance(want, float) and math.isnan(want):
            assert math.isnan(value)
        else:
            assert value == float(want)
    if help_text:
        assert text.splitlines()[0].startswith(f"# HELP {name} ")
