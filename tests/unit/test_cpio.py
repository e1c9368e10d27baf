"""The newc cpio writer, checked by parsing its output and against GNU cpio."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvirt.guest.cpio import TRAILER, CpioError, CpioWriter

CPIO = shutil.which("cpio")
needs_cpio = pytest.mark.skipif(CPIO is None, reason="GNU cpio is not installed (apt-get cpio)")


def _archive(build: Callable[[CpioWriter], object]) -> bytes:
    out = io.BytesIO()
    with CpioWriter(out) as w:
        build(w)
    return out.getvalue()


def _parse(data: bytes) -> list[tuple[str, int, int, bytes, tuple[int, int], int]]:
    """Our own strict newc reader: (name, mode, ino, data, rdev, mtime) per member."""
    members: list[tuple[str, int, int, bytes, tuple[int, int], int]] = []
    pos = 0
    while True:
        assert pos % 4 == 0, "every header starts on a 4-byte boundary"
        header = data[pos : pos + 110]
        assert header[:6] == b"070701"
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        ino, mode, _uid, _gid, _nlink, mtime, size = fields[:7]
        rdev = (fields[9], fields[10])
        namesize = fields[11]
        name_end = pos + 110 + namesize
        assert data[name_end - 1] == 0, "name is NUL-terminated"
        name = data[pos + 110 : name_end - 1].decode()
        data_start = name_end + (-name_end % 4)
        assert data[name_end:data_start] == b"\0" * (data_start - name_end)
        body = data[data_start : data_start + size]
        pos = data_start + size + (-(data_start + size) % 4)
        if name == TRAILER:
            assert pos == len(data), "nothing after the trailer"
            return members
        members.append((name, mode, ino, body, rdev, mtime))


def _sample(w: CpioWriter) -> None:
    w.add_dir("etc")
    w.add_file("etc/hostname", b"pyvirt\n")
    w.add_file("/bin/tool", b"\x7fELF" + bytes(range(256)) * 3, 0o755)
    w.add_symlink("bin/sh", "/bin/tool")
    w.add_device("dev/console", "c", 5, 1)
    w.add_device("dev/null", "c", 1, 3, 0o666)
    w.add_device("dev/vda", "b", 254, 0)
    w.add_file("empty", b"")


def test_layout_parents_and_determinism() -> None:
    data = _archive(_sample)
    assert data == _archive(_sample), "same input, same bytes"
    members = _parse(data)
    names = [m[0] for m in members]
    assert names == [
        "etc",
        "etc/hostname",
        "bin",  # added on the fly before its first child
        "bin/tool",
        "bin/sh",
        "dev",
        "dev/console",
        "dev/null",
        "dev/vda",
        "empty",
    ]
    assert [m[2] for m in members] == list(range(1, len(members) + 1))
    assert {m[5] for m in members} == {0}
    by_name = {m[0]: m for m in members}
    assert stat.S_ISDIR(by_name["bin"][1])
    assert stat.S_ISLNK(by_name["bin/sh"][1]) and by_name["bin/sh"][3] == b"/bin/tool"
    assert stat.S_ISCHR(by_name["dev/console"][1]) and by_name["dev/console"][4] == (5, 1)
    assert stat.S_ISBLK(by_name["dev/vda"][1]) and by_name["dev/vda"][4] == (254, 0)
    assert stat.S_IMODE(by_name["dev/null"][1]) == 0o666
    assert stat.S_IMODE(by_name["bin/tool"][1]) == 0o755


def test_errors() -> None:
    w = CpioWriter(io.BytesIO())
    w.add_file("a", b"x")
    with pytest.raises(CpioError, match="twice"):
        w.add_file("/a", b"y")
    with pytest.raises(CpioError, match=r"\.\."):
        w.add_file("b/../c", b"")
    with pytest.raises(CpioError, match="empty"):
        w.add_dir("/")
    with pytest.raises(CpioError, match="kind"):
        w.add_device("dev/x", "p", 1, 1)
    w.add_dir("d")
    w.add_dir("d/")  # adding an existing directory again is fine
    w.close()
    w.close()
    with pytest.raises(CpioError, match="closed"):
        w.add_file("late", b"")


def _cpio_list(archive: Path, verbose: bool = False) -> list[str]:
    assert CPIO is not None
    flags = "-itv" if verbose else "-it"
    proc = subprocess.run(
        [CPIO, flags, "-H", "newc", "--quiet", "-F", str(archive)],
        capture_output=True,
        check=True,
        env={**os.environ, "LC_ALL": "C.UTF-8", "TZ": "UTC"},
    )
    return proc.stdout.decode().splitlines()


@needs_cpio
def test_gnu_cpio_lists_types_and_devices(tmp_path: Path) -> None:
    archive = tmp_path / "a.cpio"
    archive.write_bytes(_archive(_sample))
    lines = {
        line.split()[-1] if "->" not in line else line.split()[-3]: line
        for line in _cpio_list(archive, verbose=True)
    }
    assert lines["dev/console"].startswith("crw-------")
    assert "5,   1" in lines["dev/console"] or "5, 1" in lines["dev/console"]
    assert lines["dev/null"].startswith("crw-rw-rw-")
    assert lines["dev/vda"].startswith("brw-------")
    assert lines["bin"].startswith("drwxr-xr-x")
    assert lines["bin/sh"].startswith("lrwxrwxrwx") and lines["bin/sh"].endswith("-> /bin/tool")
    assert lines["bin/tool"].startswith("-rwxr-xr-x")
    assert " 1970 " in lines["etc/hostname"]


@needs_cpio
def test_gnu_cpio_round_trip(tmp_path: Path) -> None:
    def build(w: CpioWriter) -> None:
        w.add_file("a/b/c.txt", b"hello\n")
        w.add_file("a/odd size", b"123")
        w.add_symlink("a/link", "b/c.txt")
        w.add_dir("a/empty-dir", 0o700)
        w.add_file("top", os.urandom(10_001), 0o600)

    data = _archive(build)
    archive = tmp_path / "a.cpio"
    archive.write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    assert CPIO is not None
    subprocess.run(
        [CPIO, "-idm", "-H", "newc", "--quiet", "--no-absolute-filenames", "-F", str(archive)],
        cwd=out,
        check=True,
    )
    assert (out / "a/b/c.txt").read_bytes() == b"hello\n"
    assert (out / "a/odd size").read_bytes() == b"123"
    assert os.readlink(out / "a/link") == "b/c.txt"
    assert (out / "a/link").read_bytes() == b"hello\n"
    assert (out / "a/empty-dir").is_dir()
    assert stat.S_IMODE((out / "a/empty-dir").stat().st_mode) == 0o700
    assert stat.S_IMODE((out / "top").stat().st_mode) == 0o600
    assert (out / "top").stat().st_size == 10_001
    assert (out / "a/b/c.txt").stat().st_mtime == 0


_segment = st.text(
    alphabet=st.characters(
        whitelist_categories=("Lu", "Ll", "Nd"), whitelist_characters="._-+ é", max_codepoint=0x17F
    ),
    min_size=1,
    max_size=12,
).filter(lambda s: s not in (".", ".."))
_path = st.lists(_segment, min_size=1, max_size=4).map("/".join)


@needs_cpio
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(files=st.dictionaries(_path, st.binary(max_size=700), min_size=1, max_size=8))
def test_property_gnu_cpio_agrees(tmp_path: Path, files: dict[str, bytes]) -> None:
    # A path can't be both a file and a directory (a/b and a/b/c): keep the first.
    kept: dict[str, bytes] = {}
    for name, body in files.items():
        clash = any(name.startswith(other + "/") or other.startswith(name + "/") for other in kept)
        if not clash:
            kept[name] = body

    def build(w: CpioWriter) -> None:
        for name, body in kept.items():
            w.add_file(name, body)

    data = _archive(build)
    members = {m[0]: m[3] for m in _parse(data)}
    for name, body in kept.items():
        assert members[name] == body
    archive = tmp_path / "prop.cpio"
    archive.write_bytes(data)
    listed = _cpio_list(archive)
    assert listed == list(members)
    out = tmp_path / "prop-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    assert CPIO is not None
    subprocess.run([CPIO, "-id", "-H", "newc", "--quiet", "-F", str(archive)], cwd=out, check=True)
    for name, body in kept.items():
        assert (out / name).read_bytes() == body
