"""The kernel command line builder.

The kernel splits its command line in ``next_arg()`` (kernel/params.c): a
parameter ends at the first whitespace outside double quotes, ``key=value``
splits at the first ``=``, and one pair of quotes around the value (or the
whole parameter) is removed. There is no escape character. This builder
rejects input the kernel would silently read differently from what the user
meant, so the error shows up here, on the host, with the offending text.
"""

from __future__ import annotations

from pyvirt.loader.errors import LoaderError

__all__ = ["Cmdline"]

_WS = " "


def _fail(msg: str) -> LoaderError:
    return LoaderError(f"kernel command line: {msg}")


def _check_chars(text: str) -> None:
    for i, ch in enumerate(text):
        if ch == "\0":
            raise _fail(f"NUL byte at position {i} in {text!r} (it would end the line)")
        if ch == "\n" or ch == "\r":
            raise _fail(f"line break at position {i} in {text!r}")
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise _fail(f"control character {ch!r} at position {i} in {text!r}")
        if ord(ch) > 0x7E:
            # The kernel's ctype table is Latin-1: byte 0xa0 (inside many UTF-8
            # sequences) counts as whitespace and would split the parameter.
            raise _fail(f"non-ASCII character {ch!r} at position {i} in {text!r}")


def split_params(text: str) -> list[str]:
    """Split like the kernel: on whitespace outside double quotes."""
    params: list[str] = []
    cur: list[str] = []
    in_quote = False
    for ch in text:
        if ch == _WS and not in_quote:
            if cur:
                params.append("".join(cur))
                cur = []
            continue
        if ch == '"':
            in_quote = not in_quote
        cur.append(ch)
    if cur:
        params.append("".join(cur))
    return params


def _key_of(param: str) -> str:
    body = param[1:] if param.startswith('"') else param
    return body.split("=", 1)[0]


def _check_param(param: str) -> None:
    if param.count('"') % 2:
        raise _fail(f"unbalanced double quote in {param!r}")
    body = param[1:] if param.startswith('"') else param
    if body.startswith("="):
        # next_arg() only sees '=' at index > 0, so "=v" would become a key "=v".
        raise _fail(f"empty parameter name in {param!r}")
    if body in ('"', ""):
        raise _fail(f"empty parameter {param!r}")


class Cmdline:
    """An ordered list of kernel parameters, validated as they are added."""

    def __init__(self, initial: str = "") -> None:
        self._params: list[str] = []
        if initial:
            self.append(initial)

    def append(self, param: str) -> Cmdline:
        """Add one or more whitespace-separated parameters (``"console=ttyS0 quiet"``)."""
        _check_chars(param)
        if param.count('"') % 2:
            raise _fail(f"unbalanced double quote in {param!r}")
        new = split_params(param)
        for p in new:
            _check_param(p)
        self._params.extend(new)
        return self

    def set(self, key: str, value: str | None = None) -> Cmdline:
        """Set ``key=value`` (or the bare flag ``key``), replacing earlier ``key`` settings.

        A value with spaces is quoted (``key="a b"``); the kernel strips the
        quotes. A value cannot contain a double quote: the kernel has no escape.
        """
        _check_chars(key)
        if not key:
            raise _fail("empty parameter name")
        for bad in (" ", "=", '"'):
            if bad in key:
                raise _fail(f"parameter name {key!r} contains {bad!r}")
        if key == "--":
            raise _fail("'--' is a separator, not a parameter name")
        if value is None:
            param = key
        else:
            _check_chars(value)
            inner = value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value
            if '"' in inner:
                raise _fail(f"value {value!r} of {key!r} contains a double quote "
                            "(the kernel has no way to escape it)")
            param = f'{key}="{inner}"' if _WS in inner else f"{key}={inner}"
        # Replace in place; parameters after "--" belong to init, not the kernel.
        sep = self._params.index("--") if "--" in self._params else len(self._params)
        kept: list[str] = []
        placed = False
        for i, p in enumerate(self._params):
            if i < sep and _key_of(p) == key:
                if not placed:
                    kept.append(param)
                    placed = True
                continue
            kept.append(p)
        if not placed:
            kept.insert(sep, param)
        self._params = kept
        return self

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(self._params)

    def __str__(self) -> str:
        return _WS.join(self._params)

    def __repr__(self) -> str:
        return f"Cmdline({str(self)!r})"

    def __len__(self) -> int:
        """Length of the line in bytes, without the terminating NUL."""
        return len(str(self))

    def to_bytes(self, max_len: int) -> bytes:
        """The NUL-terminated line; ``max_len`` is the kernel's ``cmdline_size``.

        boot.rst: cmdline_size is "the maximum size of the command line
        without the terminating zero"; a longer line would be cut silently.
        """
        line = str(self).encode("ascii")
        if len(line) > max_len:
            raise _fail(f"{len(line)} bytes long; the kernel accepts at most {max_len}")
        return line + b"\0"
