"""The virsh-style verbs (pyvirt.cli.virsh) against a fake Client: every verb,
virsh's table layouts, --json, and errors as ``error: MESSAGE`` with exit 1."""

from __future__ import annotations

import json
import os
import stat
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pyvirt.cli import virsh
from pyvirt.cli.main import cli
from pyvirt.manager.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    OperationInvalid,
)


class FakeClient:
    """The Client's verbs over dictionaries; records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.uri: str | None = None
        self.doms: dict[str, dict[str, Any]] = {}
        self.snaps: dict[str, list[dict[str, Any]]] = {}
        self.pools = {"default": {"name": "default", "uuid": "p-uuid", "state": "active",
                                  "autostart": True, "path": "/var/lib/pyvirt/images",
                                  "capacity": 100 << 30, "allocation": 3 << 30,
                                  "available": 97 << 30},
                      "spare": {"name": "spare", "uuid": "s-uuid", "state": "inactive",
                                "autostart": False, "path": "/srv/spare", "capacity": None,
                                "allocation": None, "available": None}}
        self.vols: dict[tuple[str, str], dict[str, Any]] = {}
        self.nets = {"default": {"name": "default", "uuid": "n-uuid", "mode": "nat",
                                 "bridge": "pyvirt0", "ipv4": "192.168.124.1/24",
                                 "autostart": True, "active": True},
                     "iso": {"name": "iso", "uuid": "i-uuid", "mode": "isolated",
                             "bridge": "pyvirt1", "ipv4": "10.9.0.1/24", "autostart": False,
                             "active": False}}
        self.tasks: dict[int, dict[str, Any]] = {}
        self.events_out: list[dict[str, Any]] = []
        self.fail_define: str | None = None
        self.fail_task: str | None = None
        self.add("web1", state="running", id_=3)
        self.add("db1", state="shut off")
        self.add("app", state="paused", id_=1)

    def add(self, name: str, *, state: str, id_: int | None = None) -> None:
        n = len(self.doms)
        self.doms[name] = {
            "id": id_, "name": name, "uuid": f"00000000-0000-4000-8000-00000000000{n}",
            "state": state, "reason": "booted" if state == "running" else "unknown",
            "autostart": False, "description": "", "memory": 512 << 20, "cpus": 1,
            "managed_save": None, "detail": "",
            "definition": {"name": name, "memory": "512M", "cpus": 1}}

    def _rec(self, name: str, *args: Any, **kw: Any) -> None:
        self.calls.append((name, args, kw))

    def _dom(self, name: str) -> dict[str, Any]:
        if name not in self.doms:
            raise NotFound(f"domain '{name}' not found")
        return self.doms[name]

    def _task(self, result: dict[str, Any] | None = None) -> int:
        tid = len(self.tasks) + 1
        failed = self.fail_task is not None
        self.tasks[tid] = {"id": tid, "state": "failed" if failed else "done", "progress": 1.0,
                           "message": "", "error": self.fail_task, "result": result}
        return tid

    def close(self) -> None:
        self._rec("close")

    # domains
    def list_domains(self, all: bool = True) -> list[dict[str, Any]]:
        keys = ("id", "name", "uuid", "state", "reason", "autostart", "description")
        return [{k: d[k] for k in keys} for d in self.doms.values()
                if all or d["state"] not in ("shut off", "crashed")]

    def domain(self, name: str) -> dict[str, Any]:
        return dict(self._dom(name))

    def define(self, doc: dict[str, Any]) -> dict[str, Any]:
        self._rec("define", doc)
        if self.fail_define:
            raise InvalidArgument(self.fail_define, "memory")
        name = doc["name"]
        if name not in self.doms:
            self.add(name, state="shut off")
        self.doms[name]["definition"] = doc
        return self.domain(name)

    def undefine(self, name: str, *, remove_storage: bool = False,
                 keep_snapshots: bool = False) -> None:
        self._rec("undefine", name, remove_storage=remove_storage)
        if self._dom(name)["state"] != "shut off":
            raise OperationInvalid("cannot undefine a running domain")
        del self.doms[name]

    def start(self, name: str, paused: bool = False) -> dict[str, Any]:
        self._rec("start", name, paused=paused)
        d = self._dom(name)
        if d["state"] != "shut off":
            raise OperationInvalid("domain is already running")
        d.update(state="paused" if paused else "running", id=7)
        return dict(d)

    def shutdown(self, name: str, timeout: float = 60) -> None:
        self._rec("shutdown", name, timeout=timeout)
        self._dom(name)["state"] = "shut off"

    def _act(self, verb: str, name: str) -> None:
        self._rec(verb, name)
        if self._dom(name)["state"] == "shut off":
            raise OperationInvalid("domain is not running")

    def destroy(self, name: str) -> None:
        self._act("destroy", name)

    def reboot(self, name: str) -> None:
        self._act("reboot", name)

    def reset(self, name: str) -> None:
        self._act("reset", name)

    def suspend(self, name: str) -> None:
        self._act("suspend", name)

    def resume(self, name: str) -> None:
        self._act("resume", name)

    def save(self, name: str, path: str | None = None) -> int:
        self._rec("save", name, path)
        self._dom(name)
        return self._task()

    def restore(self, path: str) -> dict[str, Any]:
        self._rec("restore", path)
        return self.domain("web1")

    def managedsave_remove(self, name: str) -> None:
        self._rec("managedsave_remove", name)
        self._dom(name)["managed_save"] = None

    def set_autostart(self, name: str, on: bool) -> None:
        self._rec("set_autostart", name, on)
        self._dom(name)["autostart"] = on

    def stats(self, name: str) -> dict[str, Any]:
        self._dom(name)
        return {"state": "running", "cpu_time_s": 2.5, "uptime_s": 10.0,
                "memory": 512 << 20, "boot_count": 1, "vcpus": 1,
                "disks": [{"name": "vda", "rd_reqs": 10, "wr_bytes": 4096}],
                "nics": [{"name": "eth0", "rx_bytes": 100}]}

    def block_list(self, name: str) -> list[dict[str, Any]]:
        self._dom(name)
        return [{"target": "vda", "source": "/var/lib/pyvirt/images/web1.qcow2",
                 "format": "qcow2", "readonly": False}]

    def iface_list(self, name: str) -> list[dict[str, Any]]:
        self._dom(name)
        return [{"interface": "pvt1a2b3c4d", "type": "network", "source": "default",
                 "model": "virtio", "mac": "52:54:00:12:34:56"}]

    def console(self, name: str) -> Any:
        raise AssertionError("no console in unit tests")

    # snapshots
    def snapshot_create(self, name: str, snap: str | None = None,
                        description: str = "") -> int:
        self._rec("snapshot_create", name, snap, description=description)
        self._dom(name)
        snap = snap or "1700000000"
        return self._task({"name": snap})

    def snapshot_list(self, name: str) -> list[dict[str, Any]]:
        self._dom(name)
        return self.snaps.get(name, [])

    def snapshot_revert(self, name: str, snap: str) -> None:
        self._rec("snapshot_revert", name, snap)

    def snapshot_delete(self, name: str, snap: str) -> None:
        self._rec("snapshot_delete", name, snap)

    # pools, volumes
    def _pool(self, name: str) -> dict[str, Any]:
        if name not in self.pools:
            raise NotFound(f"storage pool '{name}' not found")
        return self.pools[name]

    def pool_list(self) -> list[dict[str, Any]]:
        return list(self.pools.values())

    def pool_info(self, name: str) -> dict[str, Any]:
        return dict(self._pool(name))

    def pool_define(self, doc: dict[str, Any]) -> dict[str, Any]:
        self._rec("pool_define", doc)
        self.pools[doc["name"]] = {**doc, "state": "inactive", "autostart": True}
        return doc

    def pool_start(self, name: str) -> None:
        self._rec("pool_start", name)
        self._pool(name)["state"] = "active"

    def pool_stop(self, name: str) -> None:
        self._rec("pool_stop", name)
        self._pool(name)["state"] = "inactive"

    def pool_undefine(self, name: str) -> None:
        self._rec("pool_undefine", name)
        del self.pools[name]

    def pool_refresh(self, name: str) -> None:
        self._rec("pool_refresh", name)
        self._pool(name)

    def pool_set_autostart(self, name: str, on: bool) -> None:
        self._rec("pool_set_autostart", name, on)
        self._pool(name)["autostart"] = on

    def _vol(self, pool: str, name: str) -> dict[str, Any]:
        self._pool(pool)
        if (pool, name) not in self.vols:
            raise NotFound(f"storage volume '{name}' not found in pool '{pool}'")
        return self.vols[(pool, name)]

    def vol_list(self, pool: str) -> list[dict[str, Any]]:
        self._pool(pool)
        return [v for (p, _), v in self.vols.items() if p == pool]

    def vol_info(self, pool: str, name: str) -> dict[str, Any]:
        return dict(self._vol(pool, name))

    def vol_create(self, pool: str, name: str, capacity: int, format: str = "qcow2", *,
                   backing: str | None = None, prealloc: bool = False) -> int:
        self._rec("vol_create", pool, name, capacity, format=format, backing=backing,
                  prealloc=prealloc)
        root = self._pool(pool)["path"]
        if (pool, name) in self.vols:
            raise AlreadyExists(f"storage volume '{name}' already exists")
        self.vols[(pool, name)] = {"name": name, "pool": pool, "path": f"{root}/{name}",
                                   "format": format, "capacity": capacity,
                                   "allocation": 196 << 10, "backing": backing}
        return self._task()

    def vol_clone(self, pool: str, src: str, new: str, *, mode: str = "copy") -> int:
        self._rec("vol_clone", pool, src, new, mode=mode)
        v = self._vol(pool, src)
        self.vols[(pool, new)] = {**v, "name": new}
        return self._task()

    def vol_import(self, pool: str, name: str, source: str, *, format: str | None = None,
                   mode: str = "copy") -> int:
        self._rec("vol_import", pool, name, source, format=format, mode=mode)
        self.vols[(pool, name)] = {"name": name, "pool": pool, "path": f"/x/{name}",
                                   "format": format or "raw", "capacity": 1 << 20,
                                   "allocation": 1 << 20, "backing": None}
        return self._task()

    def vol_upload(self, pool: str, name: str, stream: Any, length: int | None) -> dict[str, Any]:
        self._vol(pool, name)
        data = stream.read()
        self._rec("vol_upload", pool, name, data, length)
        return {}

    def vol_resize(self, pool: str, name: str, capacity: int) -> None:
        self._rec("vol_resize", pool, name, capacity)
        self._vol(pool, name)["capacity"] = capacity

    def vol_delete(self, pool: str, name: str) -> None:
        self._rec("vol_delete", pool, name)
        self._vol(pool, name)
        del self.vols[(pool, name)]

    # networks
    def _net(self, name: str) -> dict[str, Any]:
        if name not in self.nets:
            raise NotFound(f"network '{name}' not found")
        return self.nets[name]

    def net_list(self) -> list[dict[str, Any]]:
        return list(self.nets.values())

    def net_info(self, name: str) -> dict[str, Any]:
        return dict(self._net(name))

    def net_define(self, doc: dict[str, Any]) -> dict[str, Any]:
        self._rec("net_define", doc)
        self.nets[doc["name"]] = {**doc, "active": False, "autostart": True}
        return doc

    def net_start(self, name: str) -> None:
        self._rec("net_start", name)
        self._net(name)["active"] = True

    def net_stop(self, name: str) -> None:
        self._rec("net_stop", name)
        self._net(name)["active"] = False

    def net_undefine(self, name: str) -> None:
        self._rec("net_undefine", name)
        del self.nets[name]

    def net_set_autostart(self, name: str, on: bool) -> None:
        self._rec("net_set_autostart", name, on)
        self._net(name)["autostart"] = on

    def net_leases(self, name: str) -> list[dict[str, Any]]:
        self._net(name)
        return [{"mac": "52:54:00:aa:bb:cc", "ip": "192.168.124.10", "hostname": "web1",
                 "expires": 1700000000}]

    # tasks, events
    def wait_task(self, tid: int, on_progress: Any = None) -> dict[str, Any]:
        return self.tasks[tid]

    def events(self, since: int | None = None) -> Iterator[dict[str, Any]]:
        yield from self.events_out


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    client = FakeClient()

    def connect(uri: str | None) -> FakeClient:
        client.uri = uri
        return client

    monkeypatch.setattr(virsh, "connect", connect)
    monkeypatch.delenv("PYVIRT_URI", raising=False)
    return client


def run(*args: str, input: str | None = None) -> Any:
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def calls(fake: FakeClient, name: str) -> list[tuple[Any, ...]]:
    return [(*a, *sorted(kw.items())) for n, a, kw in fake.calls if n == name]


# ------------------------------------------------------------- layout, list

def test_table_is_laid_out_as_virsh_does() -> None:
    # virsh list --all with a running and a shut-off domain (vsh-table.c)
    assert virsh.table(("Id", "Name", "State"), [("1", "web1", "running"),
                                                 ("-", "db1", "shut off")]) == (
        " Id   Name   State\n"
        "-----------------------\n"
        " 1    web1   running\n"
        " -    db1    shut off")


def test_list_running_by_default_and_all(fake: FakeClient) -> None:
    r = run("list")
    assert r.exit_code == 0
    assert r.output == (" Id   Name   State\n"
                        "----------------------\n"
                        " 1    app    paused\n"
                        " 3    web1   running\n\n")
    r = run("list", "--all")
    assert r.output.splitlines()[2:] == [" 1    app    paused", " 3    web1   running",
                                         " -    db1    shut off", ""]
    assert run("list", "--inactive").output.splitlines()[2] == " -    db1    shut off"


def test_list_name_uuid_json(fake: FakeClient) -> None:
    assert run("list", "--all", "--name").output == "app\nweb1\ndb1\n\n"
    assert run("list", "--uuid").output.splitlines()[0] == "00000000-0000-4000-8000-000000000002"
    doc = json.loads(run("list", "--all", "--json").output)
    assert [d["name"] for d in doc] == ["app", "web1", "db1"]
    assert doc[2]["id"] is None


def test_connect_uri_from_flag_and_environment(fake: FakeClient,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    run("-c", "unix:///tmp/x.sock", "list")
    assert fake.uri == "unix:///tmp/x.sock"
    monkeypatch.setenv("PYVIRT_URI", "ssh://root@h1")
    run("list")
    assert fake.uri == "ssh://root@h1"


def test_verbs_are_listed_in_help() -> None:
    out = run("--help").output
    for verb in ("list", "dominfo", "snapshot-create-as", "vol-create-as", "net-dhcp-leases",
                 "create", "run", "img"):
        assert verb in out


def test_every_verb_in_verbs_resolves() -> None:
    for verb, attr in virsh.VERBS.items():
        cmd = getattr(virsh, attr)
        assert cmd.name == verb


# ------------------------------------------------------------------ errors

def test_error_is_one_line_on_stderr_exit_1(fake: FakeClient) -> None:
    r = CliRunner().invoke(cli, ["dominfo", "nope"])
    assert r.exit_code == 1
    assert r.stdout == ""
    assert r.stderr == "error: domain 'nope' not found\n"
    r = CliRunner().invoke(cli, ["destroy", "db1"])
    assert (r.exit_code, r.stderr) == (1, "error: domain is not running\n")
    r = CliRunner().invoke(cli, ["start", "web1"])
    assert (r.exit_code, r.stderr) == (1, "error: domain is already running\n")


def test_connection_failure_is_an_error_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from pyvirt.errors import PyvirtError

    def connect(uri: str | None) -> Any:
        raise PyvirtError("cannot connect to the daemon at unix:///nowhere.sock: no such file "
                          "(is pyvirtd running?)")

    monkeypatch.setattr(virsh, "connect", connect)
    r = CliRunner().invoke(cli, ["list"])
    assert r.exit_code == 1
    assert r.stderr.startswith("error: cannot connect to the daemon at unix:///nowhere.sock")
    assert "Traceback" not in r.output


# ----------------------------------------------------------------- domains

def test_define_json_and_yaml(fake: FakeClient, tmp_path: Path) -> None:
    j = tmp_path / "a.json"
    j.write_text(json.dumps({"name": "new1", "memory": "256M"}))
    r = run("define", str(j))
    assert r.output == f"Domain 'new1' defined from {j}\n\n"
    y = tmp_path / "b.yaml"
    y.write_text("name: new2\nmemory: 1G\ndisks:\n  - volume: default/new2.qcow2\n")
    assert run("define", str(y)).exit_code == 0
    assert calls(fake, "define")[-1] == ({"name": "new2", "memory": "1G",
                                          "disks": [{"volume": "default/new2.qcow2"}]},)


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "not valid JSON"),
    ("name: [unclosed", "not valid YAML"),
    ("- a\n- b\n", "the document must be a mapping"),
])
def test_define_bad_file(fake: FakeClient, tmp_path: Path, content: str, message: str) -> None:
    f = tmp_path / "bad.def"
    f.write_text(content)
    r = CliRunner().invoke(cli, ["define", str(f)])
    assert r.exit_code == 1
    assert r.stderr.startswith(f"error: {f}: {message}")
    assert len(r.stderr.splitlines()) == 1
    assert calls(fake, "define") == []


def test_define_missing_file_and_server_error(fake: FakeClient, tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["define", str(tmp_path / "none.json")])
    assert (r.exit_code, r.stderr) == (1, f"error: {tmp_path / 'none.json'}: "
                                          "No such file or directory\n")
    f = tmp_path / "x.json"
    f.write_text('{"name": "x", "memory": "lots"}')
    fake.fail_define = "invalid size 'lots'"
    r = CliRunner().invoke(cli, ["define", str(f)])
    assert (r.exit_code, r.stderr) == (1, "error: memory: invalid size 'lots'\n")


@pytest.mark.parametrize(("argv", "out", "call"), [
    (["undefine", "db1", "--remove-all-storage"], "Domain 'db1' has been undefined",
     ("undefine", ("db1", ("remove_storage", True)))),
    (["start", "db1", "--paused"], "Domain 'db1' started",
     ("start", ("db1", ("paused", True)))),
    (["shutdown", "web1", "--timeout", "5"], "Domain 'web1' is being shutdown",
     ("shutdown", ("web1", ("timeout", 5.0)))),
    (["destroy", "web1"], "Domain 'web1' destroyed", ("destroy", ("web1",))),
    (["reboot", "web1"], "Domain 'web1' is being rebooted", ("reboot", ("web1",))),
    (["reset", "web1"], "Domain 'web1' was reset", ("reset", ("web1",))),
    (["suspend", "web1"], "Domain 'web1' suspended", ("suspend", ("web1",))),
    (["resume", "app"], "Domain 'app' resumed", ("resume", ("app",))),
    (["autostart", "web1"], "Domain 'web1' marked as autostarted",
     ("set_autostart", ("web1", True))),
    (["autostart", "web1", "--disable"], "Domain 'web1' unmarked as autostarted",
     ("set_autostart", ("web1", False))),
])
def test_lifecycle_verbs(fake: FakeClient, argv: list[str], out: str,
                         call: tuple[str, tuple[Any, ...]]) -> None:
    r = run(*argv)
    assert r.exit_code == 0, r.output
    assert r.output == out + "\n\n"
    assert calls(fake, call[0]) == [call[1]]


def test_dominfo(fake: FakeClient) -> None:
    fake.doms["web1"]["autostart"] = True
    r = run("dominfo", "web1")
    assert r.output == textwrap.dedent("""\
        Id:             3
        Name:           web1
        UUID:           00000000-0000-4000-8000-000000000000
        OS Type:        hvm
        State:          running
        CPU(s):         1
        CPU time:       2.5s
        Max memory:     524288 KiB
        Used memory:    524288 KiB
        Persistent:     yes
        Autostart:      enable
        Managed save:   no
        Security model: none
        Security DOI:   0

        """)
    off = run("dominfo", "db1").output
    assert "Id:             -\n" in off and "CPU time" not in off
    # a VMM as the daemon's VM user: virsh's DAC lines
    fake.doms["web1"]["security_label"] = "+995:+994"
    assert run("dominfo", "web1").output.endswith(
        "Security model: dac\nSecurity DOI:   0\nSecurity label: +995:+994 (enforcing)\n\n")
    assert json.loads(run("dominfo", "db1", "--json").output)["name"] == "db1"


def test_domstate(fake: FakeClient) -> None:
    assert run("domstate", "web1").output == "running\n\n"
    assert run("domstate", "web1", "--reason").output == "running (booted)\n\n"
    assert json.loads(run("domstate", "db1", "--json").output) == {
        "state": "shut off", "reason": "unknown", "detail": ""}


def test_domstats(fake: FakeClient) -> None:
    out = run("domstats", "web1").output
    assert out.startswith("Domain: 'web1'\n  state.state=1\n  cpu.time=2500000000\n")
    for line in ("  block.count=1", "  block.0.name=vda", "  block.0.rd.reqs=10",
                 "  net.0.rx.bytes=100", "  vcpu.current=1", "  balloon.maximum=524288"):
        assert line + "\n" in out
    every = json.loads(run("domstats", "--json").output)
    assert sorted(every) == ["app", "web1"]  # running domains only


def test_domblklist_domiflist(fake: FakeClient) -> None:
    assert run("domblklist", "web1").output == (
        " Target   Source\n"
        + "-" * 45 + "\n"
        " vda      /var/lib/pyvirt/images/web1.qcow2\n\n")
    assert run("domblklist", "web1", "--details").output.splitlines()[0] == (
        " Type   Device   Target   Source")
    assert run("domiflist", "web1").output == (
        " Interface     Type      Source    Model    MAC\n"
        + "-" * 63 + "\n"
        " pvt1a2b3c4d   network   default   virtio   52:54:00:12:34:56\n\n")
    assert json.loads(run("domiflist", "web1", "--json").output)[0]["source"] == "default"


def test_dumpdef_round_trips(fake: FakeClient, tmp_path: Path) -> None:
    y = run("dumpdef", "web1").output
    assert y == "name: web1\nmemory: 512M\ncpus: 1\n"
    assert json.loads(run("dumpdef", "web1", "--json").output) == {
        "name": "web1", "memory": "512M", "cpus": 1}
    f = tmp_path / "web1.yaml"
    f.write_text(y)
    assert run("define", str(f)).exit_code == 0
    assert calls(fake, "define")[-1] == ({"name": "web1", "memory": "512M", "cpus": 1},)


def _editor(tmp_path: Path, script: str) -> str:
    e = tmp_path / "editor.sh"
    e.write_text("#!/bin/sh\n" + script)
    e.chmod(e.stat().st_mode | stat.S_IEXEC)
    return str(e)


def test_edit_validates_and_asks_again(fake: FakeClient, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VISUAL", raising=False)
    monkeypatch.setenv("EDITOR", _editor(tmp_path, "sed -i 's/512M/1G/' \"$1\"\n"))
    r = run("edit", "web1")
    assert r.output == "Domain 'web1' definition edited.\n\n"
    assert calls(fake, "define")[-1][0]["memory"] == "1G"
    # unchanged file: nothing sent
    monkeypatch.setenv("EDITOR", "true")
    assert run("edit", "web1").output == "Domain 'web1' definition not changed.\n\n"
    assert len(calls(fake, "define")) == 1
    # the daemon refuses it: virsh's question; n gives up with exit 1
    fake.fail_define = "invalid size"
    monkeypatch.setenv("EDITOR", _editor(tmp_path, "sed -i 's/cpus: 1/cpus: 2/' \"$1\"\n"))
    r = CliRunner().invoke(cli, ["edit", "web1"], input="n\n")
    assert r.exit_code == 1
    assert "Failed. Try again? [y,n,i,f,?]:" in r.stdout
    assert r.stderr.splitlines() == ["error: memory: invalid size",
                                     "error: the definition was not changed"]
    # y runs the editor again on the same file
    counter = tmp_path / "n"
    monkeypatch.setenv("EDITOR", _editor(tmp_path, f"echo x >> {counter}\n"
                                         "sed -i 's/cpus: 1/cpus: 2/' \"$1\"\n"))
    r = CliRunner().invoke(cli, ["edit", "web1"], input="y\nn\n")
    assert r.exit_code == 1
    assert counter.read_text() == "x\nx\n"
    assert r.stdout.count("Try again?") == 2


# --------------------------------------------------------------- snapshots

def test_snapshot_create_as(fake: FakeClient) -> None:
    r = run("snapshot-create-as", "web1", "s1", "before upgrade")
    assert r.output == "Domain snapshot s1 created\n\n"
    assert calls(fake, "snapshot_create") == [("web1", "s1", ("description", "before upgrade"))]
    assert run("snapshot-create-as", "web1").output == "Domain snapshot 1700000000 created\n\n"
    r = CliRunner().invoke(cli, ["snapshot-create-as", "web1", "s2", "--disk-only"])
    assert r.exit_code == 1 and "disk-only" in r.stderr
    assert run("snapshot-create-as", "db1", "--name", "d1", "--disk-only").exit_code == 0


def test_failed_task_is_an_error(fake: FakeClient) -> None:
    fake.fail_task = "snapshot of 'web1' failed: disk full"
    r = CliRunner().invoke(cli, ["snapshot-create-as", "web1", "s1"])
    assert (r.exit_code, r.stderr) == (1, "error: snapshot of 'web1' failed: disk full\n")


def _snaps(fake: FakeClient) -> None:
    fake.snaps["web1"] = [
        {"name": "s1", "parent": None, "created": 1700000000, "state": "running",
         "description": "", "current": False, "memory": True},
        {"name": "s2", "parent": "s1", "created": 1700000100, "state": "shut off",
         "description": "", "current": False, "memory": False},
        {"name": "s3", "parent": "s2", "created": 1700000200, "state": "running",
         "description": "d", "current": True, "memory": True},
        {"name": "s4", "parent": "s1", "created": 1700000300, "state": "running",
         "description": "", "current": False, "memory": True},
    ]


def test_snapshot_list_table_and_tree(fake: FakeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    import time

    time.tzset()
    _snaps(fake)
    assert run("snapshot-list", "web1").output == (
        " Name   Creation Time               State\n"
        + "-" * 46 + "\n"
        " s1     2023-11-14 22:13:20 +0000   running\n"
        " s2     2023-11-14 22:15:00 +0000   shut off\n"
        " s3     2023-11-14 22:16:40 +0000   running\n"
        " s4     2023-11-14 22:18:20 +0000   running\n\n")
    assert run("snapshot-list", "web1", "--parent").output.splitlines()[3].endswith("   s1")
    assert run("snapshot-list", "web1", "--tree").output == (
        "s1\n"
        "  |\n"
        "  +- s2\n"
        "  |   |\n"
        "  |   +- s3\n"
        "  |\n"
        "  +- s4\n"
        "\n\n")
    assert len(json.loads(run("snapshot-list", "web1", "--json").output)) == 4


def test_snapshot_current_revert_delete(fake: FakeClient) -> None:
    _snaps(fake)
    assert run("snapshot-current", "web1", "--name").output == "s3\n\n"
    out = run("snapshot-current", "web1").output
    assert "Name:           s3\n" in out and "Parent:         s2\n" in out
    assert run("snapshot-revert", "web1", "s1").output == "\n"
    assert run("snapshot-revert", "web1", "--current").exit_code == 0
    assert calls(fake, "snapshot_revert") == [("web1", "s1"), ("web1", "s3")]
    assert run("snapshot-delete", "web1", "s2").output == "Domain snapshot s2 deleted\n\n"
    r = CliRunner().invoke(cli, ["snapshot-revert", "db1", "--current"])
    assert (r.exit_code, r.stderr) == (1, "error: domain 'db1' has no current snapshot\n")
    r = CliRunner().invoke(cli, ["snapshot-delete", "web1"])
    assert r.exit_code == 1 and "--current" in r.stderr


# ------------------------------------------------------ save, managed save

def test_save_restore_managedsave(fake: FakeClient, tmp_path: Path) -> None:
    target = tmp_path / "web1.save"
    r = run("save", "web1", str(target))
    assert r.output == f"\nDomain 'web1' saved to {target}\n\n"
    assert calls(fake, "save") == [("web1", str(target))]
    assert run("restore", str(target)).output == f"Domain restored from {target}\n\n"
    assert calls(fake, "restore") == [(str(target),)]
    assert run("managedsave", "web1").output == "\nDomain 'web1' state saved by pyvirt\n\n"
    assert calls(fake, "save")[-1] == ("web1", None)
    assert run("managedsave-remove", "db1").output == (
        "Domain 'db1' has no manage save image; removal skipped\n\n")
    fake.doms["db1"]["managed_save"] = "/var/lib/pyvirt/vms/x/save"
    assert run("managedsave-remove", "db1").output == (
        "Removed managedsave image for domain 'db1'\n\n")


def test_console_needs_a_terminal(fake: FakeClient) -> None:
    r = CliRunner().invoke(cli, ["console", "web1"])
    assert (r.exit_code, r.stderr) == (
        1, "error: Cannot run interactive console without a controlling TTY\n")
    r = CliRunner().invoke(cli, ["start", "db1", "--console"])
    assert r.exit_code == 1
    assert calls(fake, "start") == []  # checked before anything changes


# ------------------------------------------------------------------- pools

def test_pool_verbs(fake: FakeClient, tmp_path: Path) -> None:
    assert run("pool-list").output == (
        " Name      State    Autostart\n"
        "-------------------------------\n"
        " default   active   yes\n\n")
    assert len(run("pool-list", "--all").output.splitlines()) == 5
    assert run("pool-list", "--all", "--details").output.splitlines()[2] == (
        " default   running    yes         yes          100.00 GiB   3.00 GiB     97.00 GiB")
    assert run("pool-info", "default").output == textwrap.dedent("""\
        Name:           default
        UUID:           p-uuid
        State:          running
        Persistent:     yes
        Autostart:      yes
        Capacity:       100.00 GiB
        Allocation:     3.00 GiB
        Available:      97.00 GiB

        """)
    r = run("pool-define-as", "p2", "dir", "--target", str(tmp_path))
    assert r.output == "Pool p2 defined\n\n"
    assert calls(fake, "pool_define") == [({"name": "p2", "type": "dir",
                                            "path": str(tmp_path)},)]
    for verb, method, out in (("pool-start", "pool_start", "Pool p2 started"),
                              ("pool-refresh", "pool_refresh", "Pool p2 refreshed"),
                              ("pool-destroy", "pool_stop", "Pool p2 destroyed"),
                              ("pool-undefine", "pool_undefine", "Pool p2 has been undefined")):
        assert run(verb, "p2").output == out + "\n\n"
        assert calls(fake, method) == [("p2",)]
    assert run("pool-autostart", "spare").output == "Pool spare marked as autostarted\n\n"
    assert run("pool-autostart", "spare", "--disable").exit_code == 0
    assert calls(fake, "pool_set_autostart") == [("spare", True), ("spare", False)]
    r = CliRunner().invoke(cli, ["pool-info", "zz"])
    assert (r.exit_code, r.stderr) == (1, "error: storage pool 'zz' not found\n")


# ----------------------------------------------------------------- volumes

def test_vol_verbs(fake: FakeClient, tmp_path: Path) -> None:
    r = run("vol-create-as", "default", "v1.qcow2", "10G", "--prealloc-metadata")
    assert r.output == "Vol v1.qcow2 created\n\n"
    assert calls(fake, "vol_create") == [("default", "v1.qcow2", 10 << 30, ("backing", None),
                                          ("format", "qcow2"), ("prealloc", True))]
    run("vol-create-as", "default", "v2.img", "1GB", "--format", "raw", "--backing-vol", "v1")
    assert calls(fake, "vol_create")[-1][2:4] == (10**9, ("backing", "v1"))
    assert run("vol-list", "default").output == (
        " Name       Path\n"
        + "-" * 45 + "\n"
        " v1.qcow2   /var/lib/pyvirt/images/v1.qcow2\n"
        " v2.img     /var/lib/pyvirt/images/v2.img\n\n")
    assert run("vol-list", "default", "--details").output.splitlines()[2] == (
        " v1.qcow2   /var/lib/pyvirt/images/v1.qcow2   file   10.00 GiB    196.00 KiB")
    assert run("vol-info", "v1.qcow2").output == textwrap.dedent("""\
        Name:           v1.qcow2
        Type:           file
        Format:         qcow2
        Capacity:       10.00 GiB
        Allocation:     196.00 KiB

        """)
    assert run("vol-path", "v1.qcow2", "--pool", "default").output == (
        "/var/lib/pyvirt/images/v1.qcow2\n\n")
    assert run("vol-clone", "v1.qcow2", "v3.qcow2", "--mode", "overlay").output == (
        "Vol v3.qcow2 cloned from v1.qcow2\n\n")
    assert calls(fake, "vol_clone") == [("default", "v1.qcow2", "v3.qcow2", ("mode", "overlay"))]
    assert run("vol-resize", "v1.qcow2", "20G").output == (
        "Size of volume 'v1.qcow2' successfully changed to 20G\n\n")
    assert calls(fake, "vol_resize") == [("default", "v1.qcow2", 20 << 30)]
    data = tmp_path / "data.bin"
    data.write_bytes(b"hello")
    assert run("vol-upload", "v1.qcow2", str(data)).exit_code == 0
    assert calls(fake, "vol_upload") == [("default", "v1.qcow2", b"hello", 5)]
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * 512)
    assert run("vol-import", "default", "imp.img", str(img), "--move").output == (
        f"Vol imp.img imported from {img}\n\n")
    assert calls(fake, "vol_import") == [("default", "imp.img", str(img), ("format", None),
                                          ("mode", "move"))]
    assert run("vol-delete", "v3.qcow2").output == "Vol v3.qcow2 deleted\n\n"
    r = CliRunner().invoke(cli, ["vol-create-as", "default", "v9", "ten"])
    assert r.exit_code == 1
    assert r.stderr.startswith("error: capacity: invalid size 'ten'")
    assert len(calls(fake, "vol_create")) == 2


# ---------------------------------------------------------------- networks

def test_net_verbs(fake: FakeClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run("net-list").output == (
        " Name      State    Autostart   Persistent\n"
        "--------------------------------------------\n"
        " default   active   yes         yes\n\n")
    assert run("net-list", "--all").output.splitlines()[3] == (
        " iso       inactive   no          yes")
    f = tmp_path / "n.yaml"
    f.write_text("name: lab\nmode: isolated\nipv4: 10.5.0.1/24\n")
    assert run("net-define", str(f)).output == f"Network lab defined from {f}\n\n"
    for verb, method, out in (("net-start", "net_start", "Network lab started"),
                              ("net-destroy", "net_stop", "Network lab destroyed"),
                              ("net-undefine", "net_undefine", "Network lab has been undefined")):
        assert run(verb, "lab").output == out + "\n\n"
        assert calls(fake, method) == [("lab",)]
    assert run("net-autostart", "iso").output == "Network iso marked as autostarted\n\n"
    out = run("net-info", "default").output
    assert "Bridge:         pyvirt0\n" in out and "Active:         yes\n" in out
    monkeypatch.setenv("TZ", "UTC")
    import time

    time.tzset()
    assert run("net-dhcp-leases", "default").output == (
        " Expiry Time           MAC address         Protocol   IP address          Hostname"
        "   Client ID or DUID\n"
        + "-" * 104 + "\n"
        " 2023-11-14 22:13:20   52:54:00:aa:bb:cc   ipv4       192.168.124.10/24   web1"
        "       -\n\n")
    assert run("net-dhcp-leases", "default", "--mac", "52:54:00:00:00:01",
               "--json").output == "[]\n"


# ------------------------------------------------------------------ events

def test_event_lines(fake: FakeClient) -> None:
    fake.events_out = [
        {"id": 1, "time": 0, "kind": "task", "object": "4", "event": "progress", "detail": ""},
        {"id": 2, "time": 0, "kind": "domain", "object": "db1", "event": "started",
         "detail": "booted"},
        {"id": 3, "time": 0, "kind": "domain", "object": "web1", "event": "stopped",
         "detail": "destroyed"},
        {"id": 4, "time": 0, "kind": "domain", "object": "web1", "event": "rebooted",
         "detail": ""},
        {"id": 5, "time": 0, "kind": "domain", "object": "web1", "event": "suspended",
         "detail": "user"},
    ]
    assert run("event").output == (
        "event 'lifecycle' for domain 'db1': Started Booted\nevents received: 1\n")
    assert run("event", "--loop", "--domain", "web1").output == (
        "event 'lifecycle' for domain 'web1': Stopped Destroyed\n"
        "event 'lifecycle' for domain 'web1': Suspended Paused\n"
        "events received: 2\n")
    out = run("event", "--loop", "--all").output.splitlines()
    assert out[0] == "event 'progress' for task '4'"
    assert "event 'reboot' for domain 'web1'" in out
    assert out[-1] == "events received: 5"
    lines = run("event", "--loop", "--json").output.splitlines()
    assert [json.loads(x)["id"] for x in lines] == [2, 3, 5]


def test_event_overflow_is_an_error(fake: FakeClient) -> None:
    fake.events_out = [{"event": "overflow"}]
    r = CliRunner().invoke(cli, ["event", "--loop"])
    assert r.exit_code == 1 and r.stderr.startswith("error: the event stream fell behind")


# ------------------------------------------------------------ pyvirt create

def test_create_print_definition_makes_nothing(fake: FakeClient, tmp_path: Path) -> None:
    r = run("create", "--name", "vm9", "--memory", "1024", "--vcpus", "2",
            "--disk", "size=10", "--disk", "vol=default/data.qcow2,readonly=on",
            "--disk", f"path={tmp_path}/x.img,format=raw", "--network", "user",
            "--cmdline", "quiet", "--print-definition")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == {
        "name": "vm9", "memory": 1 << 30, "cpus": 2, "cmdline": "quiet",
        "disks": [{"volume": "default/vm9.qcow2"},
                  {"volume": "default/data.qcow2", "readonly": True},
                  {"path": f"{tmp_path}/x.img", "format": "raw"}],
        "nics": [{"kind": "user"}]}
    assert fake.calls == [("close", (), {})]


def test_create_makes_volumes_defines_and_starts(fake: FakeClient) -> None:
    r = run("create", "--name", "vm9", "--memory", "2G", "--disk", "size=1G,pool=default",
            "--disk", "size=512M,format=raw", "--autostart")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[:2] == ["Domain 'vm9' defined", "Domain 'vm9' started"]
    assert [c[:3] for c in calls(fake, "vol_create")] == [
        ("default", "vm9.qcow2", 1 << 30), ("default", "vm9.img", 512 << 20)]
    doc = calls(fake, "define")[0][0]
    assert doc["memory"] == 2 << 30 and doc["autostart"] is True
    assert doc["disks"] == [{"volume": "default/vm9.qcow2"}, {"volume": "default/vm9.img"}]
    assert doc["nics"] == [{"network": "default"}]  # the default network is active
    assert calls(fake, "start") == [("vm9", ("paused", False))]


def test_create_import_and_default_user_nic(fake: FakeClient, tmp_path: Path) -> None:
    fake.nets["default"]["active"] = False
    img = tmp_path / "base.qcow2"
    img.write_bytes(b"QFI\xfb" + b"\0" * 508)
    r = run("create", "--name", "vm9", "--import", str(img), "--noautoconsole")
    assert r.exit_code == 0, r.output
    assert calls(fake, "vol_import") == [("default", "vm9.qcow2", str(img), ("format", None),
                                          ("mode", "copy"))]
    doc = calls(fake, "define")[0][0]
    assert doc["disks"] == [{"volume": "default/vm9.qcow2"}]
    assert doc["nics"] == [{"kind": "user"}]


def test_create_refused_definition_removes_its_volumes(fake: FakeClient) -> None:
    fake.fail_define = "invalid size"
    r = CliRunner().invoke(cli, ["create", "--name", "vm9", "--disk", "size=1G",
                                 "--disk", "size=2G"])
    assert (r.exit_code, r.stderr) == (1, "error: memory: invalid size\n")
    assert calls(fake, "vol_delete") == [("default", "vm9-1.qcow2"), ("default", "vm9.qcow2")]
    assert fake.vols == {}
    assert calls(fake, "start") == []


@pytest.mark.parametrize(("argv", "message"), [
    (["--disk", "size=1G,bogus=1"], "unknown key 'bogus'"),
    (["--disk", "size=1G,vol=a/b"], "exactly one of size=, vol=, path="),
    (["--disk", "vol=novolume"], "vol= takes POOL/VOLUME"),
    (["--disk", "size=huge"], "invalid size 'huge'"),
    (["--network", "bridge=br0"], "use network=NAME, user or none"),
    (["--network", "none", "--network", "user"], "cannot be given with other"),
    (["--initrd", "/x"], "--initrd: only with --kernel"),
    (["--import", "/nonexistent.img"], "no such file"),
])
def test_create_bad_options(fake: FakeClient, argv: list[str], message: str) -> None:
    r = CliRunner().invoke(cli, ["create", "--name", "vm9", *argv])
    assert r.exit_code == 1
    assert message in r.stderr and len(r.stderr.splitlines()) == 1
    assert not [c for c in fake.calls if c[0] != "close"]


def test_scaled_sizes() -> None:
    assert virsh.parse_scaled("10G", "x") == 10 << 30
    assert virsh.parse_scaled("512", "x") == 512
    assert virsh.parse_scaled("512", "x", "mib") == 512 << 20
    assert virsh.parse_scaled("1GB", "x") == 10**9
    assert virsh.pretty_capacity(0) == "0.00 B"
    assert virsh.pretty_capacity(1536) == "1.50 KiB"


def test_module_imports_nothing_heavy() -> None:
    # `pyvirt list` must start fast: loading the verbs pulls in no client, yaml, rich
    import subprocess
    import sys

    code = ("import sys, pyvirt.cli.main, pyvirt.cli.virsh; "
            "print(sorted(m for m in ('yaml', 'rich', 'httpx', 'pyvirt.vmm.config', "
            "'pyvirt.manager', 'ssl') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": "src"})
    assert out.stdout.strip() == "[]"


def test_shell_completion_of_domain_names(fake: FakeClient) -> None:
    env = {"_PYVIRT_COMPLETE": "bash_complete",
           "COMP_WORDS": "pyvirt -c unix:///x.sock dominfo w", "COMP_CWORD": "4"}
    r = CliRunner().invoke(cli, [], env=env, prog_name="pyvirt")
    assert r.output.splitlines() == ["plain,web1"]
    assert fake.uri == "unix:///x.sock"
    env["COMP_WORDS"] = "pyvirt vol-list "
    env["COMP_CWORD"] = "2"
    r = CliRunner().invoke(cli, [], env=env, prog_name="pyvirt")
    assert r.output.splitlines() == ["plain,default", "plain,spare"]


def test_shell_completion_without_a_daemon_offers_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from pyvirt.errors import PyvirtError

    def connect(uri: str | None) -> Any:
        raise PyvirtError("cannot connect")

    monkeypatch.setattr(virsh, "connect", connect)
    env = {"_PYVIRT_COMPLETE": "bash_complete", "COMP_WORDS": "pyvirt start ", "COMP_CWORD": "2"}
    r = CliRunner().invoke(cli, [], env=env, prog_name="pyvirt")
    assert (r.exit_code, r.output.strip()) == (0, "")


def test_progress_bar_on_a_terminal_goes_to_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    err, out = Tty(), io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    monkeypatch.setattr("sys.stdout", out)
    seen: list[float] = []

    class Tasks:
        def wait_task(self, tid: int, on_progress: Any = None) -> dict[str, Any]:
            assert on_progress is not None  # a bar follows the task on a terminal
            for p in (0.0, 0.5, 1.0):
                on_progress({"state": "running", "progress": p, "message": "copying"})
                seen.append(p)
            return {"state": "done", "progress": 1.0}

    assert virsh._wait(Tasks(), 1, "importing")["state"] == "done"
    assert seen == [0.0, 0.5, 1.0]
    assert out.getvalue() == ""
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal: no bar

    class Plain:
        def wait_task(self, tid: int, on_progress: Any = None) -> dict[str, Any]:
            assert on_progress is None
            return {"state": "failed", "error": "disk full"}

    with pytest.raises(virsh.CliError, match=r"^disk full$"):
        virsh._wait(Plain(), 1, "importing")


def test_verb_the_client_lacks_is_one_error_line(fake: FakeClient,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(FakeClient, "pool_set_autostart")
    r = CliRunner().invoke(cli, ["pool-autostart", "default"])
    assert (r.exit_code, r.stderr) == (
        1, "error: pool autostart is not supported by this version of pyvirt's client\n")


# ------------------------------------------------------------- the quick path

@pytest.mark.parametrize("flags", [[], ["--all"], ["--inactive"], ["--all", "--name"],
                                   ["--uuid"], ["--all", "--json"], ["--name", "--uuid"]])
def test_quick_list_prints_what_click_prints(fake: FakeClient, flags: list[str],
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import pyvirt.client
    from pyvirt.cli.quick import quick

    class Quick:
        def __init__(self, uri: str | None = None) -> None:
            fake.uri = uri

        def __enter__(self) -> FakeClient:
            return fake

        def __exit__(self, *exc: object) -> None:
            pass

    monkeypatch.setattr(pyvirt.client, "Client", Quick)
    assert quick(["-c", "unix:///x.sock", "list", *flags]) == 0
    assert fake.uri == "unix:///x.sock"
    assert capsys.readouterr().out == run("list", *flags).output


@pytest.mark.parametrize("argv", [["list", "--help"], ["--debug", "list"], ["list", "-a"],
                                  ["dominfo", "x"], [], ["-c"], ["list", "extra"]])
def test_quick_path_leaves_the_rest_to_click(argv: list[str]) -> None:
    from pyvirt.cli.quick import quick

    assert quick(argv) is None


def test_quick_list_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from pyvirt.cli.quick import quick

    assert quick(["-c", "unix:///nonexistent/pyvirtd.sock", "list"]) == 1
    err = capsys.readouterr().err
    assert err == ("error: cannot connect to the daemon at unix:///nonexistent/pyvirtd.sock: "
                   "no such file (is pyvirtd running?)\n")


def test_bad_yaml_is_one_short_line(fake: FakeClient, tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("name: [oops")
    r = CliRunner().invoke(cli, ["define", str(f)])
    assert r.exit_code == 1
    assert r.output.strip() == (f"error: {f}: not valid YAML: line 1, column 12: expected ',' "
                                "or ']', but got '<stream end>'")
