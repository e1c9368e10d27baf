"""``pyvirt img`` against qemu-img (QEMU 7.2), verb by verb, on the same images.

qemu-img is the referee: images we create must pass ``qemu-img check`` and
show the same ``qemu-img info``; qemu-img's images must read the same through
our info/map/check; converted, committed and rebased images must compare
equal (``qemu-img compare``) to the content they should hold.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_pyvirt

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")


def qemu_img(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def qemu_io(path: Path, *cmds: str, fmt: str = "qcow2") -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run([*argv, str(path)], check=True, capture_output=True, timeout=60)


def img(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        out = run_pyvirt("img", *map(str, args), timeout=300)
    finally:
        os.chdir(old)
    return subprocess.CompletedProcess(out.args, out.returncode, out.stdout.decode(),
                                       out.stderr.decode())


def ok(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def clean(path: Path) -> None:
    out = qemu_img("check", path)
    assert out.returncode == 0, out.stdout + out.stderr


def identical(a: Path, b: Path) -> None:
    out = qemu_img("compare", a, b)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    """sub/top.qcow2 over sub/base.qcow2 (a relative backing name), both made by
    qemu-img, with data, zero clusters and a compressed cluster."""
    sub = tmp_path / "sub"
    sub.mkdir()
    assert qemu_img("create", "-q", "-f", "qcow2", sub / "base.qcow2", "8M").returncode == 0
    qemu_io(sub / "base.qcow2", "write -P 1 0 256k", "write -P 2 1M 64k", "write -z 2M 64k",
            "write -c -P 4 3M 64k", "write -P 6 8128k 64k")
    assert qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                    sub / "top.qcow2").returncode == 0
    qemu_io(sub / "top.qcow2", "write -P 3 64k 64k", "write -z 1M 64k", "write -P 5 5M 4k")
    return sub / "top.qcow2"


@pytest.mark.parametrize("opts", [
    [], ["-o", "compat=0.10"], ["-o", "cluster_size=4k,refcount_bits=8"],
    ["-o", "lazy_refcounts=on,extended_l2=on,compression_type=zstd"],
    ["-o", "preallocation=metadata"],
])
def test_create_qcow2_passes_qemu(tmp_path: Path, opts: list[str]) -> None:
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    ok(img("create", "-f", "qcow2", *opts, ours, "100M"))
    assert qemu_img("create", "-q", "-f", "qcow2", *opts, theirs, "100M").returncode == 0
    clean(ours)
    a = json.loads(qemu_img("info", "--output", "json", ours).stdout)
    b = json.loads(qemu_img("info", "--output", "json", theirs).stdout)
    for doc in (a, b):
        doc.pop("filename"), doc.pop("actual-size")
    assert a == b


def test_create_raw_and_backing(tmp_path: Path, chain: Path) -> None:
    raw = tmp_path / "r.img"
    ok(img("create", raw, "1G"))
    assert raw.stat().st_size == 1 << 30 and raw.stat().st_blocks == 0
    # size from the backing file; relative name as given, resolved next to the image
    ok(img("create", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2", chain.parent / "o.qcow2"))
    info = json.loads(qemu_img("info", "--output", "json", chain.parent / "o.qcow2").stdout)
    assert info["virtual-size"] == 8 << 20 and info["backing-filename"] == "top.qcow2"
    identical(chain.parent / "o.qcow2", chain)


def test_info_matches_qemu(chain: Path) -> None:
    for args in (["--output", "json"], ["--output", "json", "--backing-chain"], [],
                 ["--backing-chain"]):
        ours = ok(img("info", *args, "sub/top.qcow2", cwd=chain.parent.parent))
        theirs = subprocess.run(["qemu-img", "info", *args, "sub/top.qcow2"],
                                capture_output=True, text=True, cwd=chain.parent.parent)
        if "json" in args:
            assert json.loads(ours) == json.loads(theirs.stdout)
        else:
            assert ours == theirs.stdout


@pytest.mark.parametrize("opts", ["compat=0.10", "refcount_bits=1",
                                  "lazy_refcounts=on,extended_l2=on,compression_type=zstd"])
def test_info_options_and_dirty_match_qemu(tmp_path: Path, opts: str) -> None:
    path, raw = tmp_path / "x.qcow2", tmp_path / "r.img"
    assert qemu_img("create", "-q", "-f", "qcow2", "-o", opts, path, "1M").returncode == 0
    assert qemu_img("create", "-q", "-f", "raw", raw, "1M").returncode == 0
    if "lazy" in opts:  # left dirty: QEMU exits without closing the image
        subprocess.run(["qemu-io", "-c", "write 0 64k", "-c", "abort", str(path)],
                       capture_output=True, timeout=60)
    for p in (path, raw):
        for args in ([], ["--output", "json"]):
            assert ok(img("info", *args, p)) == qemu_img("info", *args, p).stdout


def test_map_and_check_match_qemu(chain: Path) -> None:
    for args in (["--output", "json"],):
        ours = ok(img("map", *args, chain))
        assert ours == qemu_img("map", *args, chain).stdout
    # human map: compressed clusters have no offset -> an error, as qemu-img
    out = img("map", chain)
    assert out.returncode == 1 and "compressed" in out.stderr
    qemu_io(chain, "write -P 7 3M 64k")  # cover the compressed cluster
    assert ok(img("map", chain)) == qemu_img("map", chain).stdout
    raw = chain.parent / "r.img"
    assert qemu_img("create", "-q", "-f", "raw", raw, "4M").returncode == 0
    qemu_io(raw, "write -P 1 64k 128k", "write -P 2 3M 4k", fmt="raw")
    for args in ([], ["--output", "json"]):
        assert ok(img("map", "-f", "raw", *args, raw)) == qemu_img("map", "-f", "raw", *args,
                                                                   raw).stdout
    for path in (chain, chain.parent / "base.qcow2"):
        ours = json.loads(ok(img("check", "--output", "json", path)))
        assert ours == json.loads(qemu_img("check", "--output", "json", path).stdout)
        assert ok(img("check", path)) == qemu_img("check", path).stdout


def test_check_exit_codes(tmp_path: Path, chain: Path) -> None:
    raw = tmp_path / "r.img"
    ok(img("create", raw, "1M"))
    out = img("check", raw)
    assert out.returncode == 63 and "does not support checks" in out.stderr
    leaky = chain.parent / "leaky.qcow2"
    shutil.copyfile(chain, leaky)
    size = leaky.stat().st_size
    with open(leaky, "r+b") as f:  # grow by a cluster and count it: a leak
        f.truncate(-(-size // 65536) * 65536 + 65536)
    qemu_rt = int.from_bytes(leaky.read_bytes()[48:56], "big")
    data = leaky.read_bytes()
    block = int.from_bytes(data[qemu_rt:qemu_rt + 8], "big")
    cluster = -(-size // 65536)
    with open(leaky, "r+b") as f:
        f.seek(block + 2 * cluster)
        f.write((1).to_bytes(2, "big"))
    assert qemu_img("check", leaky).returncode == 3
    assert img("check", leaky).returncode == 3
    out = img("check", "-r", "leaks", leaky)
    assert out.returncode == 0 and "1 leaked clusters" in out.stdout
    clean(leaky)


def test_convert_both_ways(tmp_path: Path, chain: Path) -> None:
    raw, back = tmp_path / "flat.raw", tmp_path / "back.qcow2"
    ok(img("convert", "-O", "raw", chain, raw))
    identical(chain, raw)
    assert raw.stat().st_blocks * 512 < 2 << 20  # sparse: zeros not written
    ok(img("convert", "-p", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4k", raw, back))
    clean(back)
    identical(back, chain)
    theirs = tmp_path / "theirs.raw"
    assert qemu_img("convert", "-O", "raw", back, theirs).returncode == 0
    identical(theirs, raw)
    # -B: only what differs from the new backing file is written
    ok(img("convert", "-O", "qcow2", "-B", "sub/base.qcow2", "-F", "qcow2", chain,
           tmp_path / "delta.qcow2"))
    clean(tmp_path / "delta.qcow2")
    identical(tmp_path / "delta.qcow2", chain)
    assert len([e for e in json.loads(qemu_img("map", "--output", "json",
                                               tmp_path / "delta.qcow2").stdout)
                if e["depth"] == 0 and e["present"]]) <= 3
    # nothing half-written: a failing convert leaves no destination and no temp file
    before = sorted(os.listdir(tmp_path))
    out = img("convert", "-O", "qcow2", "-o", "cluster_size=3k", chain, tmp_path / "bad.qcow2")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert sorted(os.listdir(tmp_path)) == before


def test_resize(tmp_path: Path, chain: Path) -> None:
    q = tmp_path / "q.qcow2"
    shutil.copyfile(chain.parent / "base.qcow2", q)
    ok(img("resize", q, "+8M"))
    clean(q)
    assert json.loads(qemu_img("info", "--output", "json", q).stdout)["virtual-size"] == 16 << 20
    raw = tmp_path / "r.img"
    ok(img("create", raw, "4M"))
    out = img("resize", raw, "1M")
    assert out.returncode == 2 and "--shrink" in out.stderr
    ok(img("resize", "--shrink", raw, "-1M"))
    assert raw.stat().st_size == 3 << 20
    out = img("resize", raw, "-8M")
    assert out.returncode == 2 and "positive" in out.stderr


def test_commit(tmp_path: Path, chain: Path) -> None:
    expect = tmp_path / "expect.raw"
    assert qemu_img("convert", "-O", "raw", chain, expect).returncode == 0
    ok(img("commit", "-d", chain))
    identical(chain.parent / "base.qcow2", expect)
    identical(chain, expect)
    clean(chain.parent / "base.qcow2")
    ok(img("commit", chain))  # again, emptying the top this time
    identical(chain, expect)
    clean(chain)
    top_map = json.loads(qemu_img("map", "--output", "json", chain).stdout)
    assert not [e for e in top_map if e["depth"] == 0 and e["present"]], top_map


def test_rebase(tmp_path: Path, chain: Path) -> None:
    sub = chain.parent
    expect = tmp_path / "expect.raw"
    assert qemu_img("convert", "-O", "raw", chain, expect).returncode == 0
    assert qemu_img("create", "-q", "-f", "qcow2", sub / "other.qcow2", "8M").returncode == 0
    qemu_io(sub / "other.qcow2", "write -P 9 0 2M")
    ok(img("rebase", "-b", "other.qcow2", "-F", "qcow2", chain))
    clean(chain)
    identical(chain, expect)
    info = json.loads(qemu_img("info", "--output", "json", chain).stdout)
    assert info["backing-filename"] == "other.qcow2"
    ok(img("rebase", "-b", "", chain))  # no backing file: everything copied in
    clean(chain)
    identical(chain, expect)
    assert "backing-filename" not in json.loads(qemu_img("info", "--output", "json",
                                                         chain).stdout)
    # -u only rewrites the header
    ok(img("rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", chain))
    info = json.loads(qemu_img("info", "--output", "json", chain).stdout)
    assert info["backing-filename"] == "base.qcow2"
    identical(chain, expect)


def test_image_in_use_is_not_replaced(tmp_path: Path, chain: Path) -> None:
    """create/convert onto an image another process holds open (locked) is refused."""
    held = subprocess.Popen(["qemu-io", "-f", "qcow2", str(chain)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        import time

        deadline = time.monotonic() + 30
        while qemu_img("check", "-U", chain).returncode != 0 or not _locked(chain):
            assert time.monotonic() < deadline, "qemu-io did not take its lock"
            time.sleep(0.1)
        before = chain.read_bytes()
        out = img("create", "-f", "qcow2", chain, "1M")
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        out = img("convert", "-O", "qcow2", chain.parent / "base.qcow2", chain)
        assert out.returncode == 2, out.stderr
        assert chain.read_bytes() == before
    finally:
        held.communicate(b"quit\n", timeout=30)


def _locked(path: Path) -> bool:
    return qemu_img("info", path).returncode != 0


def test_compare(tmp_path: Path, chain: Path) -> None:
    raw = tmp_path / "flat.raw"
    assert qemu_img("convert", "-O", "raw", chain, raw).returncode == 0
    out = img("compare", chain, raw)
    assert out.returncode == 0 and "identical" in out.stdout
    out = img("compare", chain, chain.parent / "base.qcow2")
    assert out.returncode == 1
    assert out.stdout == qemu_img("compare", chain, chain.parent / "base.qcow2").stdout


@pytest.mark.parametrize(("args", "words"), [
    (["create", "-f", "qcow2", "{d}/x.qcow2"], "size"),
    (["create", "-f", "qcow2", "{d}/x.qcow2", "12Q"], "invalid size"),
    (["create", "-f", "qcow2", "-o", "bogus=1", "{d}/x.qcow2", "1M"], "bogus"),
    (["create", "-f", "qcow2", "-o", "refcount_bits=3", "{d}/x.qcow2", "1M"], "refcount_bits"),
    (["create", "-f", "qcow2", "-b", "{d}/nothere", "-F", "raw", "{d}/x.qcow2"], "nothere"),
    (["create", "-f", "raw", "-b", "{d}/nothere", "-F", "raw", "{d}/x.qcow2"], "raw"),
    (["info", "{d}/missing"], "missing"),
    (["info", "-f", "qcow2", "{d}/plain.raw"], "not a qcow2"),
    (["map", "{d}/missing"], "missing"),
    (["convert", "-O", "raw", "{d}/missing", "{d}/out"], "missing"),
    (["rebase", "-b", "x", "{d}/plain.raw"], "backing file"),
    (["commit", "{d}/plain.raw"], "no backing file"),
])
def test_bad_input_one_line_exit_2(tmp_path: Path, args: list[str], words: str) -> None:
    (tmp_path / "plain.raw").write_bytes(bytes(1 << 20))
    before = sorted(os.listdir(tmp_path))
    out = img(*[a.format(d=tmp_path) for a in args])
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.startswith("pyvirt: error: ") and out.stderr.count("\n") == 1, out.stderr
    assert words in out.stderr
    assert "Traceback" not in out.stderr
    assert sorted(os.listdir(tmp_path)) == before  # nothing half-written


def test_convert_interrupted_leaves_nothing(tmp_path: Path) -> None:
    """Ctrl-C in the middle of a convert: no destination, no temporary file."""
    import signal
    import time

    from tests.conftest import pyvirt_cmd

    src = tmp_path / "big.raw"
    with open(src, "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(768):
            f.write(block)
    proc = subprocess.Popen(pyvirt_cmd("img", "convert", "-f", "raw", "-O", "qcow2",
                                       str(src), str(tmp_path / "out.qcow2")),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not any(n.startswith("out.qcow2.tmp-") for n in os.listdir(tmp_path)):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["big.raw"]
