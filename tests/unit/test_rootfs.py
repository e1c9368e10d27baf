"""The rootfs builder's pure parts, its input checks, and the block benchmark's parser."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bench.blk_bench import BEGIN, END, JOBS, fio_command, parse_fio

from pyvirt.errors import UserInputError
from pyvirt.guest import GuestBuildError
from pyvirt.guest import rootfs as r
from tests.conftest import run_pyvirt

INDEXTARGETS = """\
https://packages.cloud.google.com/apt cloud-sdk-bookworm
http://mirror.example/debian-security bookworm-security Debian-Security
http://mirror.example/debian/ bookworm Debian
http://deb.debian.org/debian bookworm Debian
"""


def test_mirror_is_apts_bookworm_archive() -> None:
    assert r._pick_mirror(INDEXTARGETS) == "http://mirror.example/debian"
    assert r._pick_mirror("http://x/ubuntu jammy Ubuntu\n") is None
    assert r._pick_mirror("") is None
    assert r.debian_mirror().startswith(("http://", "https://"))


def test_debootstrap_error_line() -> None:
    log = "I: Retrieving InRelease\nW: Failure trying to run: chroot ...\nE: Couldn't download\n"
    assert r._debootstrap_error(log) == "E: Couldn't download"
    assert r._debootstrap_error("I: a\nW: Failure trying to run: x\n") == (
        "W: Failure trying to run: x"
    )
    assert r._debootstrap_error("") == "(no message)"


def test_installed_packages(tmp_path: Path) -> None:
    status = tmp_path / "var/lib/dpkg/status"
    status.parent.mkdir(parents=True)
    status.write_text(
        "Package: fio\nStatus: install ok installed\nVersion: 3.33-3\nDescription: x\n"
        " long: text\n\n"
        "Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n\n"
        "Package: bash\nStatus: install ok installed\nVersion: 5.2.15-2+b7\n"
    )
    assert r._installed_packages(tmp_path) == {"bash": "5.2.15-2+b7", "fio": "3.33-3"}
    with pytest.raises(GuestBuildError, match="no dpkg status"):
        r._installed_packages(tmp_path / "nope")


def test_sizes() -> None:
    mib = r.MIB
    assert r._round_up(1, 64 * mib) == 64 * mib
    assert r._round_up(64 * mib, 64 * mib) == 64 * mib
    # blocks or inodes, whichever needs more
    assert r._min_image_size(200 * mib, 6000) >= 200 * mib
    assert r._min_image_size(mib, 100_000) >= 100_000 * 16384
    with pytest.raises(UserInputError, match="too small"):
        r.check_size(100 * mib)
    r.check_size(None)
    r.check_size(1 << 30)


def test_tree_usage_counts_hard_links_once(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 10000)
    (tmp_path / "b").hardlink_to(tmp_path / "a")
    (tmp_path / "d").mkdir()
    used, inodes = r._tree_usage(tmp_path)
    assert inodes == 3  # a (= b), d, and the root
    assert 10000 <= used < 10000 + 3 * 65536


def test_no_mounts_under_a_plain_dir(tmp_path: Path) -> None:
    assert r._mounts_under(tmp_path) == []
    (tmp_path / "w" / "x").mkdir(parents=True)
    r._remove_workdir(tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_needs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYVIRT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(r.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(r, "_which", lambda tool: f"/usr/sbin/{tool}")
    with pytest.raises(GuestBuildError, match="needs root"):
        r.build_rootfs(log=lambda _m: None)
    assert not r.rootfs_is_built()


def test_cli_bad_sizes() -> None:
    res = run_pyvirt("guest", "build", "--size", "1G")
    assert res.returncode == 2 and b"--rootfs" in res.stderr
    res = run_pyvirt("guest", "build", "--rootfs", "--size", "12Q")
    assert res.returncode == 2 and b"not a size" in res.stderr
    res = run_pyvirt("guest", "build", "--rootfs", "--size", "100M")
    err = res.stderr.decode()
    assert res.returncode == 2, err
    assert [ln for ln in err.splitlines() if ln.strip()] == [
        "pyvirt: error: --size 100M is too small: the image needs at least 256M"
    ]


def test_module_main_bad_size() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "pyvirt.guest.rootfs", "--size", "nope"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip() == "error: --size 'nope': not a size " \
        "(use a number with an optional K, M, G or T suffix)"


def _fio_job(name: str, bw_kib: float, iops: float) -> dict[str, object]:
    side = {"bw": bw_kib, "iops": iops}
    idle = {"bw": 0, "iops": 0.0}
    rw = ("write", "read") if "write" in name else ("read", "write")
    return {"jobname": name, "error": 0, rw[0]: side, rw[1]: idle}


def test_parse_fio_from_console() -> None:
    report = {"jobs": [_fio_job("seqread", 2048 * 1024, 2048),
                       _fio_job("seqwrite", 1024 * 1024, 1024),
                       _fio_job("randread", 40000, 10000),
                       _fio_job("randwrite", 20000, 5000)]}  # fmt: skip
    body = json.dumps(report, indent=2).replace("\n", "\r\n").encode()
    console = (b"# echo FIO-BEGIN-$((6*7))\r\nFIO-RC=0\r\n" + BEGIN + b"\r\n" + body
               + b"\r\n" + END + b"\r\n# ")  # fmt: skip
    assert parse_fio(console) == {
        "seqread": 2048.0, "seqwrite": 1024.0, "randread": 10.0, "randwrite": 5.0,
    }  # fmt: skip
    report["jobs"][0]["error"] = 5  # type: ignore[index]
    bad = BEGIN + b"\n" + json.dumps(report).encode() + b"\n" + END
    with pytest.raises(RuntimeError, match="seqread failed"):
        parse_fio(bad)
    with pytest.raises(RuntimeError, match="no fio report"):
        parse_fio(b"kernel panic")


def test_fio_command() -> None:
    cmd = fio_command()
    assert cmd.endswith("\n") and cmd.count("\n") == 1
    for opt in ("--direct=1", "--ioengine=libaio", "--iodepth=32", "--filename=/dev/vdb",
                "--output-format=json"):
        assert opt in cmd
    for name, rw, bs, _title, _unit in JOBS:
        assert f"--name={name} --stonewall --rw={rw} --bs={bs}" in cmd
    # the markers only appear once the guest's shell computes them
    assert BEGIN.decode() not in cmd and END.decode() not in cmd
