"""pyvirtd reached from elsewhere: a real daemon (``pyvirt daemon``) in a network
namespace of its own, with a real sshd beside it; the client in a second
namespace joined to the first by a veth pair (nothing in the host's namespace).

- ``ssh://root@ADDR:PORT/ROOT/run/pyvirtd.sock?keyfile=K&no_verify=1``: list,
  define, start a VM (the default guest on the software CPU), its console through
  the tunnel shows the ready line, destroy; a key sshd refuses is ssh's own line;
- TCP + TLS + bearer token: the right token works, a wrong or missing one is 401;
- the Unix socket is 0660 to its group: a user outside the group is refused, a
  member gets answers;
- a second daemon on the same state is refused; SIGTERM stops the daemon cleanly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvirt.client import Client, ClientError, ConnectionFailed
from pyvirt.guest import READY_LINE, build_default_guest, guest_is_built
from tests import netns
from tests.daemon_support import remove_root, short_root, wait_for

pytest.importorskip("unicorn")
from pyvirt.hypervisor.emulated import engine

pytestmark = [
    pytest.mark.guest,
    pytest.mark.slow,
    pytest.mark.skipif(not engine.available(), reason="unicorn lacks pyvirt's patches"),
    pytest.mark.skipif(netns.available() is not None, reason=str(netns.available())),
    pytest.mark.skipif(not os.path.exists("/usr/sbin/sshd"), reason="openssh-server missing"),
]

SERVER, CLIENT = "10.77.41.1", "10.77.41.2"
SSH_PORT, TLS_PORT = 2222, 8443
GID = 54321  # the socket's group: a number no user here has (setpriv grants it)
TOKEN = "pv-test-token-0123456789abcdef"
BOOT = 240.0


@dataclass
class Remote:
    root: Path
    keys: Path
    srv: netns.NetNs
    cli: netns.NetNs
    daemon: subprocess.Popen[bytes]
    log: Path

    @property
    def socket(self) -> Path:
        return self.root / "run" / "pyvirtd.sock"

    def ssh_uri(self, key: str = "client_key") -> str:
        return (f"ssh://root@{SERVER}:{SSH_PORT}{self.socket}"
                f"?keyfile={self.keys / key}&no_verify=1")

    def daemon_log(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def _kill_netns_processes(ns: netns.NetNs) -> None:
    """Whatever still runs in the namespace (a VMM, ssh): it must not outlive the test."""
    out = subprocess.run(["ip", "netns", "pids", ns.name], capture_output=True, text=True)
    for pid in out.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


@pytest.fixture(scope="module")
def remote() -> Iterator[Remote]:
    if not guest_is_built():
        build_default_guest(log=lambda msg: print(msg, flush=True))
    root = short_root("pvr")
    os.chmod(root, 0o711)  # others may traverse to the 0660 socket (the group test)
    keys = root / "keys"
    keys.mkdir(mode=0o700)
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "host_key"))
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "client_key"))
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "other_key"))
    shutil.copy(keys / "client_key.pub", keys / "authorized_keys")
    (keys / "sshd_config").write_text(
        f"Port {SSH_PORT}\nListenAddress {SERVER}\nHostKey {keys / 'host_key'}\n"
        f"AuthorizedKeysFile {keys / 'authorized_keys'}\nPidFile none\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "AllowStreamLocalForwarding yes\nAllowTcpForwarding yes\n")
    _run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=pyvirtd-test", "-addext",
         f"subjectAltName=IP:{SERVER}", "-keyout", str(keys / "tls.key"),
         "-out", str(keys / "tls.crt"))
    (keys / "token").write_text(TOKEN + "\n")
    os.chmod(keys / "token", 0o600)
    # sshd's privilege separation directory (what openssh-server's tmpfiles makes)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)

    with netns.NetNs() as srv, netns.NetNs() as cli:
        srv.run(f"ip link add pvs type veth peer name pvc netns {cli.name}")
        srv.run(f"ip addr add {SERVER}/24 dev pvs")
        srv.run("ip link set pvs up")
        cli.run(f"ip addr add {CLIENT}/24 dev pvc")
        cli.run("ip link set pvc up")
        sshd_log = open(root / "sshd.log", "wb")  # noqa: SIM115
        srv.popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(keys / "sshd_config")],
                  stdin=subprocess.DEVNULL, stdout=sshd_log, stderr=sshd_log)
        log = root / "daemon.log"
        with open(log, "wb") as f:
            daemon = srv.popen([sys.executable, "-m", "pyvirt", "daemon", "--root", str(root),
                                "--no-networks", "--group", str(GID),
                                "--listen", f"{SERVER}:{TLS_PORT}",
                                "--tls-cert", str(keys / "tls.crt"),
                                "--tls-key", str(keys / "tls.key"),
                                "--token-file", str(keys / "token")],
                               stdin=subprocess.DEVNULL, stdout=f, stderr=f)
        r = Remote(root, keys, srv, cli, daemon, log)
        try:
            wait_for(lambda: r.socket.exists() or daemon.poll() is not None, 60,
                     "the daemon's socket")
            assert daemon.poll() is None, r.daemon_log()
            wait_for(lambda: srv.run(f"ss -ltn sport = :{SSH_PORT}").stdout.count("LISTEN"),
                     30, "sshd")
            yield r
        finally:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    daemon.wait(30)
            _kill_netns_processes(srv)
            _kill_netns_processes(cli)
            sshd_log.close()
            remove_root(root)


def test_ssh_lifecycle_and_console(remote: Remote) -> None:
    with remote.cli.entered():  # ssh runs in the client's namespace
        c = Client(remote.ssh_uri(), timeout=60)
        c.version()  # the tunnel is up
    try:
        v = c.version()
        assert v["api_version"] == 1 and v["uri"] == f"unix://{remote.socket}"
        assert c.list_domains() == []
        d = c.define({"name": "far1", "accel": "emu", "memory": "256M", "sandbox": "off"})
        assert (d["state"], d["reason"]) == ("shut off", "unknown")
        assert [x["name"] for x in c.list_domains()] == ["far1"]
        d = c.start("far1")
        assert (d["state"], d["reason"]) == ("running", "booted"), remote.daemon_log()
        assert c.domain("far1")["state"] == "running"
        ws = c.console("far1")
        try:
            seen = b""
            deadline = time.monotonic() + BOOT
            while READY_LINE.encode() not in seen:
                assert time.monotonic() < deadline, seen[-2000:]
                with contextlib.suppress(TimeoutError):
                    chunk = ws.recv(5)
                    seen += chunk if isinstance(chunk, bytes) else chunk.encode()
        finally:
            ws.close()
        with pytest.raises(ClientError) as exc:
            c.start("far1")
        assert (exc.value.status, exc.value.code) == (409, "operation-invalid")
        assert str(exc.value) == "domain is already running"
        c.destroy("far1")
        d = c.domain("far1")
        assert (d["state"], d["reason"]) == ("shut off", "destroyed")
        events = [e["event"] for e in c.event_log(kind="domain", obj="far1")]
        assert events[:3] == ["defined", "started", "stopped"]
        c.undefine("far1")
        assert c.list_domains() == []
    finally:
        tunnel = c._tunnel
        c.close()
    assert tunnel is None or not os.path.exists(tunnel.dir)


def test_ssh_failures_are_ssh_s_own_words(remote: Remote) -> None:
    with remote.cli.entered(), pytest.raises(ConnectionFailed) as exc:
        Client(remote.ssh_uri("other_key"), timeout=30).list_domains()
    assert str(exc.value) == (f"cannot connect to the daemon at {remote.ssh_uri('other_key')}: "
                              f"root@{SERVER}: Permission denied (publickey).")
    # logged in, but no daemon at that remote path: the forward's failure
    uri = remote.ssh_uri().replace("pyvirtd.sock", "nothing.sock")
    with remote.cli.entered(), pytest.raises(ConnectionFailed) as exc:
        Client(uri, timeout=30).list_domains()
    assert str(exc.value) == (f"cannot connect to the daemon at {uri}: ssh cannot open the "
                              f"remote socket {remote.root}/run/nothing.sock (is pyvirtd "
                              "running there, and may this user use it?)")


def test_tls_and_token(remote: Remote, monkeypatch: pytest.MonkeyPatch) -> None:
    base = f"https://{SERVER}:{TLS_PORT}?ca={remote.keys / 'tls.crt'}"
    monkeypatch.delenv("PYVIRT_TOKEN", raising=False)
    with remote.cli.entered():
        with Client(f"{base}&token_file={remote.keys / 'token'}") as c:
            assert c.list_domains() == []
            assert c.version()["api_version"] == 1
        for token in (None, "wrong-token-0123456789abcdef"):
            if token is not None:
                monkeypatch.setenv("PYVIRT_TOKEN", token)
            with Client(base) as c, pytest.raises(ClientError) as exc:
                c.list_domains()
            assert (exc.value.status, exc.value.code) == (401, "unauthorized")
            assert exc.value.exit_status == 2
        monkeypatch.setenv("PYVIRT_TOKEN", TOKEN)
        with Client(base) as c:
            assert c.pool_list()[0]["name"] == "default"


PROBE = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("refused", e.strerror)
    raise SystemExit(0)
s.sendall(b"GET /v1/version HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
print(s.recv(200).split(b"\\r\\n")[0].decode())
"""


def test_socket_is_for_its_group_only(remote: Remote) -> None:
    st = os.stat(remote.socket)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == GID
    base = ["setpriv", "--reuid", "65534", "--regid", "65534"]
    probe = ["/usr/bin/python3", "-c", PROBE, str(remote.socket)]
    out = subprocess.run([*base, "--clear-groups", *probe], capture_output=True, text=True,
                         check=True, timeout=30)
    assert out.stdout.strip() == "refused Permission denied"
    out = subprocess.run([*base, "--groups", str(GID), *probe], capture_output=True, text=True,
                         check=True, timeout=30)
    assert out.stdout.strip() == "HTTP/1.1 200 OK"


def test_second_daemon_is_refused_and_sigterm_stops_cleanly(remote: Remote) -> None:
    out = subprocess.run([sys.executable, "-m", "pyvirt", "daemon", "--root", str(remote.root),
                          "--no-networks"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip() == (f"pyvirt: error: another pyvirtd (pid {remote.daemon.pid}) is "
                                  f"running on these paths (it holds {remote.root}/run/"
                                  "pyvirtd.pid)")
    remote.daemon.send_signal(signal.SIGTERM)
    assert remote.daemon.wait(30) == 0, remote.daemon_log()
    assert not remote.socket.exists() and not (remote.root / "run" / "pyvirtd.pid").exists()
    assert "Traceback" not in remote.daemon_log()
