"""The VM configuration as a JSON document: field paths in every error, unknown
keys and wrong types refused at any depth, round-trips, and nothing but
``ConfigError`` whatever the document holds."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirt.vmm.config import ConfigError, ConsoleSpec, DiskSpec, VmConfig


def doc(**fields: Any) -> dict[str, Any]:
    return {"kernel": "/boot/vmlinuz", **fields}


def error(obj: object) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        VmConfig.from_dict(obj)
    err = ei.value
    # the message starts with the field path, and names no flag
    assert err.field is None or str(err).startswith(f"{err.field}: "), err
    assert "--" not in str(err), err
    return err


@pytest.mark.parametrize("obj,field,detail", [
    (doc(frobnicate=1), "frobnicate", "unknown field"),
    (doc(console={"kind": "file", "path": "/x", "mode": 1}), "console.mode", "unknown field"),
    (doc(disks=[{"path": "/a"}, {"path": "/b", "ro": True}]), "disks[1].ro", "unknown field"),
    ({}, "kernel", "required"),
    (doc(kernel=""), "kernel", "the path is empty"),
    (doc(kernel=7), "kernel", "expected a path (a string), not an integer"),
    (doc(cpus="1"), "cpus", "expected an integer, not a string"),
    (doc(cpus=True), "cpus", "expected an integer, not a boolean"),
    (doc(cpus=1.0), "cpus", "expected an integer, not a number"),
    (doc(cpus=0), "cpus", "need at least one vCPU"),
    (doc(rng=1), "rng", "expected true or false, not an integer"),
    (doc(verbose="yes"), "verbose", "expected true or false, not a string"),
    (doc(memory=8 << 20), "memory", "too small (at least 16M)"),
    (doc(memory="8M"), "memory", "too small (at least 16M)"),
    (doc(memory="lots"), "memory", "not a size"),
    (doc(memory=True), "memory", "expected bytes (an integer) or a size string, not a boolean"),
    (doc(accel="fast"), "accel", "expected auto, kvm or emu (not 'fast')"),
    (doc(on_reboot=None), "on_reboot", "expected a string, not null"),
    (doc(sandbox="maybe"), "sandbox", "expected auto, on or off"),
    (doc(console={"kind": "tty"}), "console.kind", "expected stdio, virtio, none, file or socket"),
    (doc(console={}), "console.kind", "required"),
    (doc(console={"kind": "file"}), "console.path", "a file console needs a path"),
    (doc(console={"kind": "none", "path": "/x"}), "console.path", "only a file or socket console"),
    (doc(console="stdio"), "console", "expected an object, not a string"),
    (doc(disks={"path": "/a"}), "disks", "expected an array, not an object"),
    (doc(disks=[{"path": "/a"}] * 25), "disks", "at most 24 disks"),
    (doc(disks=["/a"]), "disks[0]", "expected an object, not a string"),
    (doc(disks=[{"path": "/a"}, {}]), "disks[1].path", "required"),
    (doc(disks=[{"path": "/a"}, {"path": "/b\0"}]), "disks[1].path", "NUL byte"),
    (doc(disks=[{"path": "/a", "serial": "has space"}]), "disks[0].serial", "1-20 printable"),
    (doc(disks=[{"path": "/a", "serial": 5}]), "disks[0].serial", "expected a string"),
    (doc(disks=[{"path": "/a", "cache": "unsafe"}]), "disks[0].cache",
     "expected none or writeback"),
    (doc(disks=[{"path": "/a", "readonly": "on"}]), "disks[0].readonly", "expected true or false"),
    ([], None, "expected an object, not an array"),
    ({1: 2}, "1", "unknown field"),
])
def test_errors_name_the_field(obj: object, field: str | None, detail: str) -> None:
    err = error(obj)
    assert err.field == field, err
    assert detail in err.detail, err


def test_json_text_errors() -> None:
    for text, needle in [("{", "not JSON: Expecting property name enclosed in double quotes "
                               "(line 1, column 2)"),
                         (b"\xff\xfe\xff", "not JSON"),
                         ("[" * 100_000, "not JSON"),
                         ("1" * 5000, "not JSON"),
                         (" " * (2 << 20), "larger than 1 MiB")]:
        with pytest.raises(ConfigError, match=r"^not JSON|^the document") as ei:
            VmConfig.from_json(text)
        assert needle in str(ei.value)
        assert ei.value.field is None
    with pytest.raises(ConfigError, match=r"^cpus: given twice$"):
        VmConfig.from_json('{"kernel": "/k", "cpus": 1, "cpus": 2}')


def test_defaults_and_sizes() -> None:
    cfg = VmConfig.from_dict({"kernel": "/k", "memory": "1G", "console": None, "initrd": None})
    assert cfg == VmConfig(kernel=Path("/k"), memory=1 << 30)
    assert VmConfig.from_dict(doc(memory="2048")).memory == 2 << 30  # MiB, as --memory
    assert VmConfig.from_dict(doc(memory=64 << 20)).memory == 64 << 20


def test_document_shape() -> None:
    """The keys are the field names; memory is bytes; paths are strings."""
    cfg = VmConfig(kernel=Path("/k"), initrd=Path("/i"), memory=64 << 20,
                   console=ConsoleSpec("file", Path("/log")),
                   disks=(DiskSpec(Path("/a"), readonly=True, serial="s1", cache="none",
                                   discard=True),))
    d = cfg.to_dict()
    assert list(d) == ["kernel", "initrd", "cmdline", "cpus", "memory", "accel", "console",
                       "on_reboot", "verbose", "disks", "rng", "sandbox", "name", "nics", "vsock"]
    assert d["memory"] == 64 << 20 and d["console"] == {"kind": "file", "path": "/log"}
    assert d["disks"] == [{"path": "/a", "readonly": True, "serial": "s1", "cache": "none",
                           "discard": True, "format": None}]
    assert VmConfig.from_json(cfg.to_json()) == cfg
    assert VmConfig.from_dict(json.loads(json.dumps(d))) == cfg


# ---- property tests

_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                min_size=1, max_size=30)
_paths = _text.map(Path).filter(lambda p: str(p) not in (".", ""))
_disks = st.builds(DiskSpec, path=_paths, readonly=st.booleans(),
                   serial=st.none() | st.from_regex(r"\A[\x21-\x7e]{1,20}\Z"),
                   cache=st.sampled_from(["none", "writeback"]), discard=st.booleans())
_consoles = st.sampled_from(["stdio", "virtio", "none"]).map(ConsoleSpec) | _paths.map(
    lambda p: ConsoleSpec("file", p))
_configs = st.builds(
    VmConfig, kernel=_paths, initrd=st.none() | _paths, cmdline=st.text(max_size=40),
    cpus=st.integers(1, 255), memory=st.integers(8, 1 << 22).map(lambda n: n * (2 << 20)),
    accel=st.sampled_from(["auto", "kvm", "emu"]), console=_consoles,
    on_reboot=st.sampled_from(["restart", "exit"]), verbose=st.booleans(),
    disks=st.lists(_disks, max_size=4).map(tuple), rng=st.booleans(),
    sandbox=st.sampled_from(["auto", "on", "off"]))


@settings(max_examples=300, deadline=None)
@given(_configs)
def test_round_trip(cfg: VmConfig) -> None:
    assert VmConfig.from_dict(cfg.to_dict()) == cfg
    assert VmConfig.from_json(cfg.to_json()) == cfg
    assert VmConfig.from_json(cfg.to_json(indent=None)).to_dict() == cfg.to_dict()


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=4),
    max_leaves=20)
_field_names = st.sampled_from(["kernel", "initrd", "cmdline", "cpus", "memory", "accel",
                                "console", "on_reboot", "verbose", "disks", "rng", "sandbox",
                                "kind", "path", "readonly", "serial", "cache", "discard"])
# documents near the valid ones: right keys, arbitrary values at any depth
_near = st.recursive(
    _json, lambda inner: st.dictionaries(_field_names, inner, max_size=6)
    | st.lists(st.dictionaries(_field_names, inner, max_size=5), max_size=3), max_leaves=25)


@settings(max_examples=500, deadline=None)
@given(st.one_of(_json, _near, _near.map(lambda v: {"kernel": "/k", "disks": v}),
                 st.dictionaries(_field_names, _near, max_size=8)))
def test_any_document_is_a_config_or_a_config_error(obj: object) -> None:
    try:
        cfg = VmConfig.from_dict(obj)
    except ConfigError as exc:
        assert exc.field is None or str(exc).startswith(f"{exc.field}: ")
        return
    assert VmConfig.from_dict(cfg.to_dict()) == cfg


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200) | st.binary(max_size=200)
       | _near.map(lambda v: json.dumps(v, allow_nan=True)))
def test_any_text_is_a_config_or_a_config_error(text: str | bytes) -> None:
    with contextlib.suppress(ConfigError):
        VmConfig.from_json(text)


def test_import_stays_lean() -> None:
    """The boot path imports the config module: it must not pull in the
    document's machinery (json, msgspec) before a document is read."""
    code = ("import sys, pyvirt.vmm.config as c; "
            "print(' '.join(m for m in ('json', 'msgspec', 'pydantic') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == ""
