"""The networking part of the configuration: NICs, port forwards, vsock, the VM's
name and the MACs derived from it; the CLI's --net/--vsock parsers and the errors
(field paths below the CLI, flags in the CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyvirt.vmm.config import (
    ConfigError,
    NicSpec,
    PortForward,
    VmConfig,
    VsockSpec,
    check_host,
    parse_net,
    parse_vsock,
)
from tests.conftest import run_pyvirt


def _cfg(**kw: object) -> VmConfig:
    return VmConfig(kernel=Path("/k"), **kw)  # type: ignore[arg-type]


def test_parse_net_forms() -> None:
    assert parse_net("none") is None
    user = parse_net("user,hostfwd=tcp::8080-:80,hostfwd=udp:127.0.0.1:5353-:53")
    assert user is not None and user.kind == "user" and user.tap is None
    assert user.hostfwd == (PortForward("tcp", 8080, 80), PortForward("udp", 5353, 53,
                                                                      "127.0.0.1"))
    assert parse_net("user,hostfwd=::2222-:22").hostfwd == (PortForward("tcp", 2222, 22),)  # type: ignore[union-attr]
    tap = parse_net("tap=tap0,mac=52:54:00:AA:bb:01,bridge=br0")
    assert tap == NicSpec("tap", mac="52:54:00:aa:bb:01", tap="tap0", bridge="br0")


@pytest.mark.parametrize(("spec", "words"), [
    ("wifi", "expected user"),
    ("user,bridge=br0", "unknown option 'bridge'"),
    ("tap=tap0,hostfwd=tcp::1-:2", "unknown option 'hostfwd'"),
    ("user,mac=01:00:00:00:00:01", "multicast"),
    ("user,mac=00:00:00:00:00:00", "not a usable address"),
    ("user,mac=zz", "not a MAC address"),
    ("user,hostfwd=tcp::80-10.0.2.15:80", "guest address cannot be chosen"),
    ("user,hostfwd=tcp::0-:80", "port number"),
    ("user,hostfwd=tcp::99999-:80", "port number"),
    ("user,hostfwd=sctp::1-:2", "expected [tcp|udp]"),
    ("user,hostfwd=tcp:not-an-ip:1-:2", "not an IP address"),
    ("user,hostfwd=tcp::8080-:80,hostfwd=tcp::8080-:81", "forwarded twice"),
    ("user,mac=52:54:00:00:00:01,mac=52:54:00:00:00:02", "mac given twice"),
    ("tap=this-name-is-too-long", "not an interface name"),
    ("tap=a/b", "not an interface name"),
    ("tap=", "not an interface name"),
    ("user,x", "not key=value"),
])
def test_parse_net_refuses(spec: str, words: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_net(spec)
    assert str(exc.value).startswith(f"--net {spec}"), str(exc.value)
    assert words in str(exc.value)


def test_parse_vsock() -> None:
    assert parse_vsock("cid=3,path=/run/v.sock") == VsockSpec(3, Path("/run/v.sock"))
    for spec, words in (("cid=2,path=/x", "reserved"), ("cid=x,path=/x", "not a number"),
                        ("path=/x", "required"), ("cid=3,path=/x,port=1", "unknown option"),
                        (f"cid=3,path=/{'a' * 100}", "longer than")):
        with pytest.raises(ConfigError, match=words) as exc:
            parse_vsock(spec)
        assert str(exc.value).startswith(f"--vsock {spec}")


def test_macs_derive_from_the_name_and_are_stable() -> None:
    nics = (NicSpec("user"), NicSpec("tap", tap="t0"), NicSpec("user", mac="52:54:00:00:00:09"))
    a, b = _cfg(name="web-1", nics=nics), _cfg(name="web-1", nics=nics)
    macs = [n.mac for n in a.nics]
    assert macs == [n.mac for n in b.nics]
    assert len(set(macs)) == 3 and macs[2] == "52:54:00:00:00:09"
    assert all(m is not None and m.startswith("52:54:00:") for m in macs)
    assert [n.mac for n in _cfg(name="web-2", nics=nics).nics][:2] != macs[:2]
    # anonymous: random but filled in, so the document records what the guest saw
    anon = _cfg(nics=(NicSpec("user"),))
    mac = anon.nics[0].mac
    assert mac is not None and int(mac[:2], 16) & 1 == 0
    assert VmConfig.from_dict(anon.to_dict()).nics[0].mac == mac


def test_nic_and_vsock_values_refused_with_field_paths() -> None:
    with pytest.raises(ConfigError) as exc:
        _cfg(nics=(NicSpec("tap", tap="t0"), NicSpec("tap", tap="t0")))
    assert exc.value.field == "nics[1].tap"
    with pytest.raises(ConfigError) as exc:
        _cfg(nics=(NicSpec("user", mac="52:54:00:00:00:01"),
                   NicSpec("user", mac="52:54:00:00:00:01")))
    assert exc.value.field == "nics[1].mac"
    with pytest.raises(ConfigError, match="at most 8 NICs"):
        _cfg(nics=tuple(NicSpec("user") for _ in range(9)))
    with pytest.raises(ConfigError) as exc:
        _cfg(name="bad name")
    assert exc.value.field == "name"
    with pytest.raises(ConfigError) as exc:
        NicSpec("tap")
    assert exc.value.field == "tap"
    with pytest.raises(ConfigError) as exc:
        NicSpec("user", tap="t0")
    assert exc.value.field == "tap"


def test_document_round_trip_and_errors() -> None:
    cfg = _cfg(name="n1", nics=(NicSpec("user", hostfwd=(PortForward("tcp", 2222, 22),)),
                                NicSpec("tap", tap="tap9", bridge="br0")),
               vsock=VsockSpec(7, Path("/tmp/v.sock")))
    doc = json.loads(cfg.to_json())
    assert VmConfig.from_dict(doc) == cfg
    assert doc["nics"][0]["hostfwd"] == [{"proto": "tcp", "host_port": 2222, "guest_port": 22,
                                          "host_addr": ""}]
    for patch, field in (
            ({"nics": [{"kind": "user", "hostfwd": [{"proto": "tcp", "host_port": 1,
                                                     "guest_port": "22"}]}]},
             "nics[0].hostfwd[0].guest_port"),
            ({"nics": [{"kind": "user", "hostfwd": [{"proto": "tcp", "host_port": 1}]}]},
             "nics[0].hostfwd[0].guest_port"),
            ({"nics": [{"kind": "tap"}]}, "nics[0].tap"),
            ({"nics": [{"kind": "user", "vlan": 1}]}, "nics[0].vlan"),
            ({"nics": [{}]}, "nics[0].kind"),
            ({"nics": {}}, "nics"),
            ({"vsock": {"cid": 3}}, "vsock.path"),
            ({"vsock": {"cid": True, "path": "/x"}}, "vsock.cid"),
            ({"name": 5}, "name")):
        with pytest.raises(ConfigError) as exc:
            VmConfig.from_dict({"kernel": "/k", **patch})
        assert exc.value.field == field, (patch, str(exc.value))


def test_check_host_vsock_path(tmp_path: Path) -> None:
    kernel = tmp_path / "k"
    kernel.write_bytes(b"x")
    (tmp_path / "file").write_text("")
    for path, words in ((tmp_path / "nodir" / "v.sock", "does not exist"),
                        (tmp_path / "file", "not a socket")):
        with pytest.raises(ConfigError, match=words) as exc:
            check_host(VmConfig(kernel=kernel, vsock=VsockSpec(3, path)))
        assert exc.value.field == "vsock.path"
    check_host(VmConfig(kernel=kernel, vsock=VsockSpec(3, tmp_path / "v.sock")))


def test_cli_default_nic_none_and_errors(tmp_path: Path) -> None:
    kernel = tmp_path / "k"
    kernel.write_bytes(b"x")
    out = run_pyvirt("run", "--kernel", str(kernel), "--print-config")
    assert out.returncode == 0, out.stderr
    nics = json.loads(out.stdout)["nics"]
    assert [n["kind"] for n in nics] == ["user"]
    out = run_pyvirt("run", "--kernel", str(kernel), "--net", "none", "--print-config")
    assert json.loads(out.stdout)["nics"] == []
    out = run_pyvirt("run", "--kernel", str(kernel), "--name", "db", "--net", "user",
                     "--net", "tap=tp1", "--vsock", "cid=5,path=/tmp/x.sock",
                     "--print-config")
    doc = json.loads(out.stdout)
    assert doc["name"] == "db" and [n["kind"] for n in doc["nics"]] == ["user", "tap"]
    assert doc["vsock"] == {"cid": 5, "path": "/tmp/x.sock"}
    for args, words in ((("--net", "none", "--net", "user"), "--net none: cannot be given"),
                        (("--net", "tap=tp1", "--net", "tap=tp1"), "--net tap=tp1: TAP tp1 is "
                         "already nics[0]"),
                        (("--name", "a b"), "--name a b: must be"),
                        (("--vsock", "cid=1,path=/x"), "--vsock cid=1,path=/x: cid must be")):
        out = run_pyvirt("run", "--kernel", str(kernel), *args, "--print-config")
        err = out.stderr.decode()
        assert out.returncode == 2 and words in err, err
        assert "Traceback" not in err and err.count("\n") == 1, err
