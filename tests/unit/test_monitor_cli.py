"""The virsh verbs over the clone and disk/NIC routes (`pyvirt clone`,
`attach-disk`, `detach-disk`, `blockresize`, `attach-interface`,
`detach-interface`) against a real daemon (no VM is started)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirt.client import Client
from tests.daemon_support import daemon_env, remove_root, short_root, spawn_daemon, stop_daemon


@pytest.fixture(scope="module")
def daemon() -> Iterator[tuple[str, Client]]:
    root = short_root("pvc")
    proc = spawn_daemon(root, extra=["--no-networks"])
    uri = f"unix://{root / 'run' / 'pyvirtd.sock'}"
    c = Client(uri)
    try:
        yield uri, c
    finally:
        c.close()
        stop_daemon(proc)
        remove_root(root)


def pv(uri: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyvirt", "-c", uri, *args],
                          capture_output=True, text=True, env=daemon_env(), timeout=60)


def test_disk_and_nic_verbs(daemon: tuple[str, Client], tmp_path: Path) -> None:
    uri, c = daemon
    c.define({"name": "v1", "kernel": str(tmp_path / "k"), "memory": "64M",
              "nics": [{"kind": "user"}, {"kind": "user", "mac": "52:54:00:00:00:09"}]})
    r = pv(uri, "attach-disk", "v1", "--size", "8M")
    assert r.returncode == 0, r.stderr
    assert "Disk vda (default/v1-disk0.qcow2) attached to 'v1'" in r.stdout
    r = pv(uri, "blockresize", "v1", "vda", "16M")
    assert r.returncode == 0 and "resized" in r.stdout, r.stderr
    assert c.vol_info("default", "v1-disk0.qcow2")["capacity"] == 16 << 20
    r = pv(uri, "blockresize", "v1", "vda", "1M")
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "shrink" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = pv(uri, "blockresize", "v1", "sda", "1M")
    assert r.returncode == 1 and "not a disk target" in r.stderr
    r = pv(uri, "attach-disk", "v1")
    assert r.returncode == 2 and "VOLUME or --size" in r.stderr
    r = pv(uri, "detach-interface", "v1", "user")
    assert r.returncode == 1 and "say which with --mac" in r.stderr
    r = pv(uri, "detach-interface", "v1", "user", "--mac", "52:54:00:00:00:09")
    assert r.returncode == 0, r.stderr
    assert len(c.iface_list("v1")) == 1
    r = pv(uri, "attach-interface", "v1", "network", "default")
    assert r.returncode == 1 and "networks are not available" in r.stderr
    r = pv(uri, "clone", "v1", "v2")
    assert r.returncode == 0, r.stderr
    assert "Domain 'v2' cloned from 'v1'" in r.stdout
    assert c.domain("v2")["definition"]["disks"] == [{"volume": "default/v2-0.qcow2"}]
    r = pv(uri, "detach-disk", "v1", "vda", "--remove-storage")
    assert r.returncode == 0, r.stderr
    assert "v1-disk0.qcow2" not in {v["name"] for v in c.vol_list("default")}
    r = pv(uri, "clone", "v1", "v2")
    assert r.returncode == 1 and "already exists" in r.stderr
