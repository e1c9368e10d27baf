"""pyvirt.loader.Cmdline: the kernel command line builder."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvirt.loader import Cmdline, LoaderError


def kernel_next_args(line: str) -> list[tuple[str, str | None]]:
    """A model of the kernel's parse_args()/next_arg() (kernel/params.c), for checking.

    Returns (param, value) pairs as the kernel would hand them to handlers.
    """
    out: list[tuple[str, str | None]] = []
    s = line.lstrip(" ")
    while s:
        quoted = in_quote = s[0] == '"'
        if quoted:
            s = s[1:]
        i, equals = 0, 0
        while i < len(s):
            if s[i] == " " and not in_quote:
                break
            if equals == 0 and s[i] == "=":
                equals = i
            if s[i] == '"':
                in_quote = not in_quote
            i += 1
        arg = list(s[:i])
        # the kernel NUL-terminates in place; model that with a cut position
        cut = len(arg)
        val_start: int | None = None
        if equals:
            val_start = equals + 1
            if val_start < len(arg) and arg[val_start] == '"':
                val_start += 1
                if arg[i - 1] == '"':
                    cut = i - 1
        if quoted and i > 0 and arg[i - 1] == '"':
            cut = min(cut, i - 1)
        text = "".join(arg)
        if equals:
            assert val_start is not None
            out.append((text[:equals], text[val_start:max(cut, val_start)]))
        else:
            out.append((text[:cut], None))
        s = s[i:].lstrip(" ")
    return out


def test_basic() -> None:
    c = Cmdline("console=ttyS0 quiet")
    c.append("panic=-1").set("init", "/sbin/init")
    assert str(c) == "console=ttyS0 quiet panic=-1 init=/sbin/init"
    assert c.to_bytes(2047) == b"console=ttyS0 quiet panic=-1 init=/sbin/init\0"
    assert len(c) == len(str(c))
    assert c.params == ("console=ttyS0", "quiet", "panic=-1", "init=/sbin/init")


def test_extra_spaces_collapse() -> None:
    assert str(Cmdline("  a   b=1  ")) == "a b=1"


def test_set_replaces_and_quotes() -> None:
    c = Cmdline("console=ttyS0 root=/dev/vda console=tty0")
    c.set("console", "hvc0")
    assert str(c) == "console=hvc0 root=/dev/vda"
    c.set("init", "/bin/sh -c 'echo hi'")
    assert str(c).endswith(" init=\"/bin/sh -c 'echo hi'\"")
    assert ("init", "/bin/sh -c 'echo hi'") in kernel_next_args(str(c))
    c.set("ro")
    assert str(c).endswith(" ro")
    c.set("empty", "")
    assert ("empty", "") in kernel_next_args(str(c))


def test_set_goes_before_init_args() -> None:
    c = Cmdline("quiet -- single x=1")
    c.set("x", "2")
    assert str(c) == "quiet x=2 -- single x=1"


def test_set_accepts_prequoted_value() -> None:
    assert str(Cmdline().set("k", '"a b"')) == 'k="a b"'


def test_quoted_param_kept() -> None:
    c = Cmdline('"dyndbg=file foo.c +p" x="1 2"')
    assert c.params == ('"dyndbg=file foo.c +p"', 'x="1 2"')
    assert kernel_next_args(str(c)) == [("dyndbg", "file foo.c +p"), ("x", "1 2")]


@pytest.mark.parametrize(("text", "msg"), [
    ("a\0b", "NUL byte"),
    ("a\nb", "line break"),
    ("a\rb", "line break"),
    ("a\tb", "control character"),
    ("a\x1bb", "control character"),
    ("a\x7f", "control character"),
    ("root=/dev/\u00e0", "non-ASCII"),
    ('x="a b', "unbalanced double quote"),
    ('"', "unbalanced double quote"),
    ("=value", "empty parameter name"),
    ('"=value"', "empty parameter name"),
    ('""', "empty parameter"),
])
def test_append_rejects(text: str, msg: str) -> None:
    with pytest.raises(LoaderError, match=msg) as ei:
        Cmdline().append(text)
    assert str(ei.value).startswith("kernel command line: ")
    assert ei.value.exit_status == 2


@pytest.mark.parametrize(("key", "value", "msg"), [
    ("", "x", "empty parameter name"),
    ("a b", "x", "contains ' '"),
    ("a=b", "x", "contains '='"),
    ('a"', "x", "contains '\"'"),
    ("--", None, "separator"),
    ("k", 'a"b', "double quote"),
    ("k", '"a"b"', "double quote"),
    ("k", "a\nb", "line break"),
])
def test_set_rejects(key: str, value: str | None, msg: str) -> None:
    with pytest.raises(LoaderError, match=msg):
        Cmdline().set(key, value)


def test_length_limit() -> None:
    c = Cmdline("x=" + "a" * 98)  # 100 characters
    assert len(c.to_bytes(100)) == 101  # boot.rst: cmdline_size excludes the NUL
    with pytest.raises(LoaderError, match="100 bytes long; the kernel accepts at most 99"):
        c.to_bytes(99)


def test_empty_line() -> None:
    assert Cmdline().to_bytes(10) == b"\0"
    assert str(Cmdline("")) == ""


# ---------------------------------------------------------------- properties

_printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
_key = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E,
                             blacklist_characters='="'), min_size=1, max_size=12).filter(
    lambda k: k != "--")
_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E,
                               blacklist_characters='"'), max_size=20)


@given(st.lists(st.tuples(_key, st.one_of(st.none(), _value)), max_size=8))
def test_set_roundtrips_through_kernel_parser(pairs: list[tuple[str, str | None]]) -> None:
    c = Cmdline()
    expected: dict[str, str | None] = {}
    for k, v in pairs:
        c.set(k, v)
        expected[k] = v
    parsed = kernel_next_args(str(c))
    # every key once, in first-set order, with the last value, as the kernel sees it
    assert parsed == list(expected.items())
    assert c.to_bytes(10_000)[-1:] == b"\0"


@given(st.text(max_size=60))
def test_append_accepts_only_what_the_kernel_reads_back(text: str) -> None:
    try:
        c = Cmdline(text)
    except LoaderError:
        bad_char = any(not (0x20 <= ord(ch) <= 0x7E) for ch in text)
        bad_quote = text.count('"') % 2 == 1
        params = text.split()
        empty_key = any(p.lstrip('"').startswith("=") or p == '""' for p in params)
        assert bad_char or bad_quote or empty_key or '"' in text
        return
    assert all(0x20 <= ord(ch) <= 0x7E for ch in str(c))
    assert str(c).count('"') % 2 == 0
    # the kernel splits the line into exactly the parameters we hold
    assert len(kernel_next_args(str(c))) == len(c.params)
    assert Cmdline(str(c)).params == c.params


@given(st.text(_printable, max_size=40), st.integers(min_value=0, max_value=50))
def test_to_bytes_limit(text: str, limit: int) -> None:
    try:
        c = Cmdline(text)
    except LoaderError:
        return
    if len(str(c)) <= limit:
        out = c.to_bytes(limit)
        assert out == str(c).encode() + b"\0"
        assert b"\0" not in out[:-1]
    else:
        with pytest.raises(LoaderError):
            c.to_bytes(limit)
