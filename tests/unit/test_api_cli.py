"""``pyvirt ctl SOCKET ...`` against a served fake VM: output, one-line errors,
exit statuses (2: a refused or bad request, 1: no VMM or it failed)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from pyvirt.api.client import VmClient, unix_transport
from pyvirt.api.server import ApiServer
from pyvirt.cli.ctl import ctl, summary
from pyvirt.vmm.control import VmState
from tests.api_support import CHECKER, FakeControl, serving, short_tmpdir

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every answer the CLI's client receives is checked against the document."""
    def client(self: VmClient) -> httpx.Client:
        if self._http is None:
            self._http = httpx.Client(
                transport=unix_transport(self.socket_path), trust_env=False,
                base_url="http://localhost", timeout=self.timeout,
                event_hooks={"response": [CHECKER.hook]})
        return self._http
    monkeypatch.setattr(VmClient, "_client", client)


@pytest.fixture
def vm() -> Iterator[tuple[ApiServer, FakeControl]]:
    ctl_ = FakeControl()
    with serving(ctl_) as srv:
        yield srv, ctl_


def run(*args: object) -> tuple[int, str, str]:
    r = CliRunner().invoke(ctl, [str(a) for a in args], prog_name="pyvirt ctl")
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    return r.exit_code, r.stdout, r.stderr


def test_actions_and_their_output(vm: tuple[ApiServer, FakeControl]) -> None:
    srv, fake = vm
    assert run(srv.path, "pause") == (0, "paused\n", "")
    assert run(srv.path, "resume") == (0, "resumed\n", "")
    assert run(srv.path, "power-button") == (0, "power button pressed\n", "")
    assert run(srv.path, "ctrl-alt-del") == (0, "ctrl-alt-del sent\n", "")
    assert run(srv.path, "reset") == (0, "reset\n", "")
    assert run(srv.path, "pause")[0] == 0
    d = short_tmpdir()
    code, out, _ = run(srv.path, "snapshot", d / "snap")
    assert code == 0
    assert out == f"snapshot written to {d / 'snap'} (64.0 MiB of memory in 0.25 s)\n"
    code, out, _ = run(srv.path, "metrics")
    assert code == 0 and 'pyvirt_vcpu_exits_total{vcpu="0",kind="io"} 1234\n' in out
    assert run(srv.path, "stop") == (0, "stopped\n", "")
    assert fake.calls == ["pause", "resume", "power_button", "ctrl_alt_del", "reset", "pause",
                          "snapshot", "metrics", "force_stop"]
    d.rmdir()


def test_snapshot_directory_is_sent_absolute(vm: tuple[ApiServer, FakeControl],
                                             tmp_cwd: Path) -> None:
    srv, fake = vm
    fake.state = VmState.PAUSED
    (tmp_cwd / "rel").mkdir()
    code, out, _ = run(srv.path, "snapshot", "rel/snap")
    assert code == 0 and f"{tmp_cwd}/rel/snap" in out


def test_overlay(vm: tuple[ApiServer, FakeControl], tmp_cwd: Path) -> None:
    srv, fake = vm
    code, _, err = run(srv.path, "overlay", "0", "ov.qcow2")
    assert (code, err) == (2, "pyvirt: error: disk-overlay: the VM is running; pause it first\n")
    fake.state = VmState.PAUSED
    code, out, _ = run(srv.path, "overlay", "0", "ov.qcow2")  # sent absolute
    assert (code, out) == (0, f"disk 0: now on {tmp_cwd}/ov.qcow2 (backing file /tmp/d.img)\n")
    code, _, err = run(srv.path, "overlay", "1", "/x.qcow2")
    assert (code, err) == (2, "pyvirt: error: disk: the VM has no disk 1 (0 to 0)\n")


def test_info(vm: tuple[ApiServer, FakeControl]) -> None:
    srv, _ = vm
    code, out, _ = run(srv.path, "info")
    assert code == 0
    assert out == ("state:   running\nbackend: emu\nuptime:  12.5 s\nboots:   1\ncpus:    1\n"
                   "memory:  512 MiB\nkernel:  /boot/vmlinuz\ndisk 0:  /tmp/d.img\n"
                   "pyvirt:  0.1.0\n")
    code, out, _ = run(srv.path, "info", "--json")
    assert code == 0 and json.loads(out)["config"]["cpus"] == 1


def test_summary_of_odd_answers() -> None:
    # whatever the VMM puts in config, the summary prints one line per row
    out = summary({"state": "paused", "uptime_s": 3725, "config": {
        "disks": [{"path": "/a\nb", "readonly": True}, "x"], "memory": "lots"}})
    assert out.splitlines() == ["state:   paused", "backend: ?", "uptime:  1:02:05",
                                "boots:   ?", "memory:  lots", "disk 0:  /a\\nb (read-only)",
                                "disk 1:  x", "pyvirt:  ?"]
    assert "uptime:  ?" in summary({"config": None})


def test_refused_action_is_one_line_exit_2(vm: tuple[ApiServer, FakeControl]) -> None:
    srv, _ = vm
    assert run(srv.path, "resume") == (2, "", "pyvirt: error: resume: the VM is not paused\n")
    code, out, err = run(srv.path, "snapshot", "/tmp/pv-x")
    assert (code, out) == (2, "")
    assert err == "pyvirt: error: snapshot: the VM is running; pause it first\n"


def test_vmm_failure_is_exit_1(vm: tuple[ApiServer, FakeControl]) -> None:
    srv, fake = vm
    fake.fail_with = RuntimeError("boom")
    assert run(srv.path, "pause") == (
        1, "", "pyvirt: error: PUT /vm/pause: internal error in the VMM (see its log)\n")


def test_no_vmm_is_exit_1() -> None:
    d = short_tmpdir()
    code, out, err = run(d / "api.sock", "info")
    assert (code, out) == (1, "")
    assert err == f"pyvirt: error: cannot connect to {d / 'api.sock'}: no such file\n"
    d.rmdir()


def test_usage_errors_are_exit_2() -> None:
    code, _, err = run("/tmp/x.sock", "snapshot")
    assert code == 2 and "Missing argument 'DIRECTORY'" in err
    code, _, err = run("/tmp/x.sock", "explode")
    assert code == 2 and "No such command 'explode'" in err


def test_as_a_command_no_traceback() -> None:
    """The real process: what a user sees, with no traceback."""
    d = short_tmpdir()
    r = subprocess.run([sys.executable, "-c", "from pyvirt.cli.ctl import ctl; "
                        "ctl(prog_name='pyvirt ctl')", str(d / "gone.sock"), "pause"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 1
    assert r.stderr == f"pyvirt: error: cannot connect to {d / 'gone.sock'}: no such file\n"
    d.rmdir()
