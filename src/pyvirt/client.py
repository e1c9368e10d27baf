"""``pyvirt.Client``: the management API of a pyvirtd, local or remote.

    with Client() as c:                         # $PYVIRT_URI, else the local daemon's socket
        for d in c.list_domains():
            print(d["name"], d["state"])
        c.start("web1")
        c.wait_task(c.save("web1"), on_progress=print)

URIs:
  ``unix:///path/to/pyvirtd.sock``
  ``ssh://[user@]host[:port][/remote/pyvirtd.sock][?keyfile=K&known_hosts=F&no_verify=1]``:
     the system's OpenSSH forwards a private local socket to the remote one
     (``ssh -N -L LOCAL:REMOTE``), as libvirt's ``qemu+ssh://`` does;
  ``https://host:port[?ca=FILE&token_file=F]``: TCP + TLS with a bearer token
     (``$PYVIRT_TOKEN`` or the file's first line).

Only the standard library is imported, and not even ``http.client`` for a local
or ssh daemon (``pyvirt._httpclient``; https loads it): ``pyvirt list`` starts fast.
Errors: ``ClientError`` (the daemon refused: its status, code, message and
field) and ``ConnectionFailed`` (no daemon reached), both one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from pyvirt._httpclient import BadAnswer, RemoteDisconnected, UnixConnection
from pyvirt.errors import PyvirtError

if TYPE_CHECKING:
    import ssl
    import subprocess

    from websockets.sync.client import ClientConnection

__all__ = ["Client", "ClientError", "ConnectionFailed", "TaskFailed", "default_uri"]

#: the remote socket an ssh:// URI without a path reaches (a root daemon's)
REMOTE_SOCKET = "/run/pyvirt/pyvirtd.sock"
_RETRYABLE = (RemoteDisconnected, ConnectionResetError, BrokenPipeError)
#: bytes per write of a streamed upload (http.client's default is 8 KiB)
_BLOCK = 1 << 20


class ClientError(PyvirtError):
    """The daemon answered with an error. ``exit_status`` 2 for a request it
    refused (4xx), 1 for an operation that failed (5xx)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.exit_status = 2 if 400 <= status < 500 else 1


class TaskFailed(ClientError):
    """A task the client waited for ended "failed"; ``task`` is its record."""

    def __init__(self, task: dict[str, Any]) -> None:
        super().__init__(500, "task-failed", str(task.get("error") or "the task failed"))
        self.task = task


class ConnectionFailed(PyvirtError):
    """No daemon could be reached at the URI."""

    exit_status = 1


def default_uri() -> str:
    """``$PYVIRT_URI``, else the local daemon's socket (the same place as
    ``DaemonPaths.default().socket``, computed here to keep imports small)."""
    env = os.environ.get("PYVIRT_URI")
    if env:
        return env
    if os.geteuid() == 0:
        return "unix:///run/pyvirt/pyvirtd.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    run = os.path.join(runtime, "pyvirt") if runtime else f"/tmp/pyvirt-{os.geteuid()}"
    return f"unix://{run}/pyvirtd.sock"


_Conn = Any  # UnixConnection, or http.client.HTTPSConnection for https
_Resp = Any


def _bad_answers() -> tuple[type[Exception], ...]:
    """What a connection raises for an answer that is not HTTP (http.client's
    only when https loaded it)."""
    import sys

    hc = sys.modules.get("http.client")
    return (BadAnswer,) if hc is None else (BadAnswer, hc.HTTPException)


def _why(exc: OSError) -> str:
    import errno

    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    hints = {errno.ENOENT: "no such file (is pyvirtd running?)",
             errno.ECONNREFUSED: "connection refused (is pyvirtd running?)",
             errno.EACCES: "permission denied (is this user in the pyvirt group?)",
             errno.EPERM: "permission denied (is this user in the pyvirt group?)"}
    if exc.__class__.__name__ == "SSLCertVerificationError":  # its errno is 1 (EPERM)
        return f"TLS certificate not trusted: {getattr(exc, 'verify_message', exc)}"
    if exc.errno in hints:
        return hints[exc.errno]
    return (exc.strerror or str(exc) or exc.__class__.__name__).lower().rstrip(".")


class _SshTunnel:
    """``ssh -N -L LOCAL:REMOTE``: a local Unix socket, in a private directory,
    forwarded by the system's OpenSSH to the daemon's socket on the remote host."""

    def __init__(self, uri: str, *, user: str | None, host: str, port: int | None,
                 remote: str, keyfile: str | None, known_hosts: str | None,
                 no_verify: bool, timeout: float) -> None:
        import tempfile

        self.uri = uri
        self.remote = remote
        self.dir = tempfile.mkdtemp(prefix="pyvirt-ssh-")  # 0700: only this user
        self.local = os.path.join(self.dir, "s")
        self.argv = ["ssh", "-N", "-o", "ExitOnForwardFailure=yes", "-o", "BatchMode=yes",
                     "-o", f"ConnectTimeout={max(1, int(timeout))}",
                     "-o", "StreamLocalBindUnlink=yes"]
        if port is not None:
            self.argv += ["-p", str(port)]
        if keyfile:
            self.argv += ["-i", keyfile, "-o", "IdentitiesOnly=yes"]
        if no_verify:
            self.argv += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
        elif known_hosts:
            self.argv += ["-o", f"UserKnownHostsFile={known_hosts}",
                          "-o", "StrictHostKeyChecking=yes"]
        self.argv += ["-L", f"{self.local}:{remote}",
                      "--", f"{user}@{host}" if user else host]
        self.proc: subprocess.Popen[bytes] | None = None
        self.timeout = timeout

    def last_error(self) -> str | None:
        """ssh's last line on stderr (why it failed, or why a forward failed)."""
        try:
            with open(os.path.join(self.dir, "ssh.err"), "rb") as f:
                lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
        except OSError:
            return None
        return next((ln for ln in reversed(lines) if ln), None)

    def why_closed(self) -> str:
        """Why a connection through the tunnel was closed at once."""
        if self.proc is not None and self.proc.poll() is not None:
            return self.last_error() or f"ssh exited with status {self.proc.returncode}"
        # sshd says only "open failed", whatever the reason
        return (f"ssh cannot open the remote socket {self.remote} (is pyvirtd running "
                "there, and may this user use it?)")

    def start(self) -> str:
        """Start ssh and wait until the local socket accepts; the socket's path."""
        import subprocess

        err_path = os.path.join(self.dir, "ssh.err")
        try:
            with open(err_path, "wb") as err:
                self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL, stderr=err)
        except OSError as exc:
            self.close()
            raise ConnectionFailed(f"cannot connect to the daemon at {self.uri}: "
                                   f"cannot run ssh: {_why(exc)}") from None
        deadline = time.monotonic() + self.timeout
        delay = 0.01
        while True:
            if self.proc.poll() is not None:
                last = self.last_error()
                self.close()
                last = last or f"ssh exited with status {self.proc.returncode}"
                raise ConnectionFailed(f"cannot connect to the daemon at {self.uri}: {last}")
            if os.path.exists(self.local):
                with socket.socket(socket.AF_UNIX) as s:
                    try:
                        s.connect(self.local)
                        return self.local
                    except OSError:
                        pass
            if time.monotonic() > deadline:
                self.close()
                raise ConnectionFailed(f"cannot connect to the daemon at {self.uri}: "
                                       "ssh did not open the tunnel in time")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def close(self) -> None:
        import shutil
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class Client:
    """One connection to a pyvirtd (kept alive between requests). Thread-safety:
    one ``Client`` per thread. Methods mirror the daemon's Manager and return
    its JSON documents; long operations return a task id (``wait_task``)."""

    def __init__(self, uri: str | None = None, *, timeout: float = 30.0) -> None:
        self.uri = uri or default_uri()
        self.timeout = timeout
        self._tunnel: _SshTunnel | None = None
        self._conn: _Conn | None = None
        self._token: str | None = None
        self._ssl: ssl.SSLContext | None = None
        self._host = "localhost"
        self._port = 0
        self._path = ""
        self._parse()

    # -- transport
    def _parse(self) -> None:
        u = urlsplit(self.uri)
        q = {k: v[-1] for k, v in parse_qs(u.query).items()}
        bad = f"invalid daemon URI {self.uri!r}"
        if u.scheme == "unix":
            if u.netloc or not u.path:
                raise ConnectionFailed(f"{bad}: expected unix:///path/to/pyvirtd.sock")
            self._path = unquote(u.path)
        elif u.scheme == "ssh":
            if not u.hostname:
                raise ConnectionFailed(f"{bad}: no host")
            unknown = set(q) - {"keyfile", "known_hosts", "no_verify"}
            if unknown:
                raise ConnectionFailed(f"{bad}: unknown parameter {sorted(unknown)[0]!r}")
            try:
                port = u.port
            except ValueError:
                raise ConnectionFailed(f"{bad}: bad port") from None
            self._tunnel = _SshTunnel(
                self.uri, user=unquote(u.username) if u.username else None, host=u.hostname,
                port=port, remote=unquote(u.path) or REMOTE_SOCKET,
                keyfile=q.get("keyfile"), known_hosts=q.get("known_hosts"),
                no_verify=q.get("no_verify", "0") not in ("", "0", "no", "false"),
                timeout=self.timeout)
        elif u.scheme == "https":
            if not u.hostname:
                raise ConnectionFailed(f"{bad}: no host")
            unknown = set(q) - {"ca", "token_file"}
            if unknown:
                raise ConnectionFailed(f"{bad}: unknown parameter {sorted(unknown)[0]!r}")
            import ssl

            try:
                self._port = u.port or 443
                self._ssl = ssl.create_default_context(cafile=q.get("ca"))
            except ValueError:
                raise ConnectionFailed(f"{bad}: bad port") from None
            except OSError as exc:
                raise ConnectionFailed(f"{bad}: CA file {q['ca']}: {_why(exc)}") from None
            self._host = u.hostname
            self._token = os.environ.get("PYVIRT_TOKEN")
            if "token_file" in q:
                try:
                    with open(q["token_file"]) as f:
                        self._token = f.readline().strip()
                except OSError as exc:
                    raise ConnectionFailed(
                        f"token file {q['token_file']}: {_why(exc)}") from None
        else:
            raise ConnectionFailed(f"{bad}: the scheme must be unix, ssh or https")

    def _new_connection(self, timeout: float | None) -> _Conn:
        if self._tunnel is not None and not self._path:
            self._path = self._tunnel.start()
        if self._ssl is not None:
            import http.client

            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout,
                                               context=self._ssl, blocksize=_BLOCK)
        return UnixConnection(self._path, timeout)

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        h = {"Accept": "application/json"}
        if self._token:
            h["Authorization"] = f"Bearer {self._token}"
        if extra:
            h.update(extra)
        return h

    def _send(self, conn: _Conn, method: str, url: str, body: Any,
              headers: dict[str, str]) -> _Resp:
        try:
            conn.request(method, url, body=body, headers=headers)
            return conn.getresponse()
        except OSError as exc:
            conn.close()
            if isinstance(exc, _RETRYABLE):
                raise
            if isinstance(exc, ConnectionRefusedError | FileNotFoundError | PermissionError) \
                    or conn.sock is None:
                raise ConnectionFailed(f"cannot connect to the daemon at {self.uri}: "
                                       f"{_why(exc)}") from None
            raise ConnectionFailed(f"connection to the daemon at {self.uri} failed: "
                                   f"{_why(exc)}") from None
        except _bad_answers() as exc:
            conn.close()
            raise ConnectionFailed(f"connection to the daemon at {self.uri} failed: "
                                   f"bad answer ({exc.__class__.__name__})") from None

    def request(self, method: str, path: str, body: Any = None, *,
                query: dict[str, Any] | None = None, timeout: float | None = None,
                raw: IO[bytes] | bytes | None = None, length: int | None = None) -> Any:
        """One API call: the answer's JSON (None for 204). ``body`` is sent as JSON,
        ``raw`` as application/octet-stream (a file is streamed)."""
        if query:
            pairs = {k: (str(v).lower() if isinstance(v, bool) else v)
                     for k, v in query.items() if v is not None}
            if pairs:
                path += "?" + urlencode(pairs)
        headers = self._headers()
        payload: Any = None
        if raw is not None:
            payload = raw
            headers["Content-Type"] = "application/octet-stream"
            if length is not None:
                headers["Content-Length"] = str(length)
            elif isinstance(raw, bytes):
                headers["Content-Length"] = str(len(raw))
        elif body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        t = self.timeout if timeout is None else timeout
        reused = self._conn is not None
        if self._conn is None:
            self._conn = self._new_connection(t)
        conn = self._conn
        conn.timeout = t
        if conn.sock is not None:
            conn.sock.settimeout(t)
        try:
            resp = self._send(conn, method, path, payload, headers)
        except _RETRYABLE:
            # the daemon closed an idle keep-alive connection: it never saw this request
            self._conn = None
            if not reused and self._tunnel is not None:
                raise ConnectionFailed(f"cannot connect to the daemon at {self.uri}: "
                                       f"{self._tunnel.why_closed()}") from None
            if not reused or (raw is not None and not isinstance(raw, bytes)):
                raise ConnectionFailed(f"connection to the daemon at {self.uri} "
                                       "was closed") from None
            self._conn = conn = self._new_connection(t)
            try:
                resp = self._send(conn, method, path, payload, headers)
            except _RETRYABLE:
                self._conn = None
                raise ConnectionFailed(f"connection to the daemon at {self.uri} "
                                       "was closed") from None
        except ConnectionFailed:
            self._conn = None
            raise
        data = resp.read()
        if resp.will_close:
            conn.close()
            self._conn = None
        return self._decode(resp.status, resp.reason, resp.getheader("content-type", ""), data)

    @staticmethod
    def _decode(status: int, reason: str, ctype: str, data: bytes) -> Any:
        doc: Any = None
        if data and ctype.startswith("application/json"):
            try:
                doc = json.loads(data)
            except ValueError:
                doc = None
        if status >= 400:
            err = doc.get("error") if isinstance(doc, dict) else None
            if isinstance(err, dict) and isinstance(err.get("message"), str):
                field = err.get("field")
                raise ClientError(status, str(err.get("code") or "error"), err["message"],
                                  field if isinstance(field, str) else None)
            raise ClientError(status, "http-error", f"the daemon answered HTTP {status} {reason}")
        if status == 204 or not data:
            return None
        if doc is None:
            raise ClientError(status, "bad-answer", "the daemon's answer is not JSON")
        return doc

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._tunnel is not None:
            self._tunnel.close()
            self._tunnel = None
            self._path = ""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # -- host
    def version(self) -> dict[str, Any]:
        return self._get("/v1/version")  # type: ignore[no-any-return]

    def _get(self, path: str, **query: Any) -> Any:
        return self.request("GET", path, query=query)

    def _post(self, path: str, body: Any = None, **kw: Any) -> Any:
        return self.request("POST", path, body, **kw)

    # -- domains
    def list_domains(self, all: bool = True) -> list[dict[str, Any]]:
        return self._get("/v1/domains", all=all)  # type: ignore[no-any-return]

    def define(self, doc: dict[str, Any]) -> dict[str, Any]:
        return self._post("/v1/domains", doc)  # type: ignore[no-any-return]

    def undefine(self, name: str, *, remove_storage: bool = False,
                 keep_snapshots: bool = False) -> None:
        self.request("DELETE", _d(name), query={"remove_storage": remove_storage,
                                                "keep_snapshots": keep_snapshots})

    def domain(self, name: str) -> dict[str, Any]:
        return self._get(_d(name))  # type: ignore[no-any-return]

    def start(self, name: str, paused: bool = False) -> dict[str, Any]:
        return self._post(_d(name, "start"), {"paused": paused},  # type: ignore[no-any-return]
                          timeout=max(self.timeout, 120.0))

    def shutdown(self, name: str, timeout: float = 60.0) -> None:
        self._post(_d(name, "shutdown"), {"timeout": timeout},
                   timeout=max(self.timeout, timeout + 15.0))

    def destroy(self, name: str) -> None:
        self._post(_d(name, "destroy"))

    def reboot(self, name: str) -> None:
        self._post(_d(name, "reboot"))

    def reset(self, name: str) -> None:
        self._post(_d(name, "reset"))

    def suspend(self, name: str) -> None:
        self._post(_d(name, "suspend"))

    def resume(self, name: str) -> None:
        self._post(_d(name, "resume"))

    def save(self, name: str, path: str | None = None) -> int:
        return int(self._post(_d(name, "save"), {"path": path} if path else None)["task"])

    def managed_save_remove(self, name: str) -> None:
        """Throw the managed save away: the next start boots afresh."""
        self.request("DELETE", _d(name, "managed-save"))

    managedsave_remove = managed_save_remove  # virsh's name

    def restore(self, path: str) -> dict[str, Any]:
        return self._post("/v1/restore", {"path": path},  # type: ignore[no-any-return]
                          timeout=max(self.timeout, 120.0))

    def set_autostart(self, name: str, on: bool) -> None:
        self.request("PUT", _d(name, "autostart"), {"enabled": on})

    def stats(self, name: str) -> dict[str, Any]:
        return self._get(_d(name, "stats"))  # type: ignore[no-any-return]

    def block_list(self, name: str) -> list[dict[str, Any]]:
        return self._get(_d(name, "disks"))  # type: ignore[no-any-return]

    def iface_list(self, name: str) -> list[dict[str, Any]]:
        return self._get(_d(name, "interfaces"))  # type: ignore[no-any-return]

    # -- monitoring, clone, disks and NICs
    def host(self) -> dict[str, Any]:
        return self._get("/v1/host")  # type: ignore[no-any-return]

    def metrics_history(self, domain: str | None = None) -> dict[str, Any]:
        if domain is None:
            return self._get("/v1/metrics/history")  # type: ignore[no-any-return]
        return self._get("/v1/metrics/history", domain=domain)  # type: ignore[no-any-return]

    def clone(self, name: str, new: str, description: str | None = None) -> int:
        body: dict[str, Any] = {"name": new}
        if description is not None:
            body["description"] = description
        return int(self._post(_d(name, "clone"), body)["task"])

    def disk_add(self, name: str, pool: str, *, volume: str | None = None,
                 size_bytes: int | None = None, format: str = "qcow2") -> dict[str, Any]:
        body: dict[str, Any] = {"pool": pool}
        if volume is not None:
            body["volume"] = volume
        else:
            body.update(size_bytes=size_bytes, format=format)
        return self._post(_d(name, "disks"), body)  # type: ignore[no-any-return]

    def disk_remove(self, name: str, index: int, *, remove_storage: bool = False) -> None:
        self.request("DELETE", _d(name, "disks", str(int(index))),
                     query={"remove_storage": remove_storage})

    def disk_resize(self, name: str, index: int, size_bytes: int) -> None:
        self._post(_d(name, "disks", str(int(index)), "resize"), {"size_bytes": size_bytes})

    def iface_add(self, name: str, network: str, *, mac: str | None = None,
                  model: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"network": network}
        if mac is not None:
            body["mac"] = mac
        if model is not None:
            body["model"] = model
        return self._post(_d(name, "interfaces"), body)  # type: ignore[no-any-return]

    def iface_remove(self, name: str, index: int) -> None:
        self.request("DELETE", _d(name, "interfaces", str(int(index))))

    # -- snapshots
    def snapshot_create(self, name: str, snap: str | None = None, description: str = "") -> int:
        body: dict[str, Any] = {"description": description}
        if snap is not None:
            body["name"] = snap
        return int(self._post(_d(name, "snapshots"), body)["task"])

    def snapshot_list(self, name: str) -> list[dict[str, Any]]:
        return self._get(_d(name, "snapshots"))  # type: ignore[no-any-return]

    def snapshot_revert(self, name: str, snap: str) -> None:
        self._post(_d(name, "snapshots", snap, "revert"), timeout=max(self.timeout, 120.0))

    def snapshot_delete(self, name: str, snap: str) -> None:
        self.request("DELETE", _d(name, "snapshots", snap))

    # -- storage
    def pool_list(self) -> list[dict[str, Any]]:
        return self._get("/v1/pools")  # type: ignore[no-any-return]

    def pool_define(self, doc: dict[str, Any]) -> dict[str, Any]:
        return self._post("/v1/pools", doc)  # type: ignore[no-any-return]

    def pool_info(self, pool: str) -> dict[str, Any]:
        return self._get(_p(pool))  # type: ignore[no-any-return]

    def pool_undefine(self, pool: str) -> None:
        self.request("DELETE", _p(pool))

    def pool_set_autostart(self, pool: str, on: bool) -> None:
        """Start the pool with the daemon or not (the pool redefined with its path)."""
        info = self.pool_info(pool)
        self.pool_define({"name": info["name"], "type": info.get("type", "dir"),
                          "path": info["path"], "autostart": on})

    def pool_start(self, pool: str) -> None:
        self._post(_p(pool, "start"))

    def pool_stop(self, pool: str) -> None:
        self._post(_p(pool, "stop"))

    def pool_refresh(self, pool: str) -> None:
        self._post(_p(pool, "refresh"))

    def vol_list(self, pool: str) -> list[dict[str, Any]]:
        return self._get(_p(pool, "volumes"))  # type: ignore[no-any-return]

    def vol_info(self, pool: str, vol: str) -> dict[str, Any]:
        return self._get(_p(pool, "volumes", vol))  # type: ignore[no-any-return]

    def vol_create(self, pool: str, name: str, capacity: int, format: str = "qcow2", *,
                   backing: str | None = None, prealloc: bool = False) -> int:
        return int(self._post(_p(pool, "volumes"), {
            "name": name, "capacity": capacity, "format": format, "backing": backing,
            "prealloc": prealloc})["task"])

    def vol_clone(self, pool: str, src: str, new: str, *, mode: str = "overlay") -> int:
        return int(self._post(_p(pool, "volumes", src, "clone"),
                              {"name": new, "mode": mode})["task"])

    def vol_import(self, pool: str, name: str, source: str, *, format: str | None = None,
                   mode: str = "copy") -> int:
        return int(self._post(_p(pool, "import"), {"name": name, "source": source,
                                                   "format": format, "mode": mode})["task"])

    def vol_upload(self, pool: str, vol: str, data: IO[bytes] | bytes,
                   length: int | None = None) -> dict[str, Any]:
        """Write ``data`` (bytes, or a binary file streamed in blocks) into an
        existing volume."""
        if length is None and not isinstance(data, bytes):
            with contextlib.suppress(OSError, AttributeError, ValueError):
                length = os.fstat(data.fileno()).st_size - data.tell()
        return self.request("PUT", _p(pool, "volumes", vol, "data"),  # type: ignore[no-any-return]
                            raw=data, length=length, timeout=max(self.timeout, 3600.0))

    def vol_resize(self, pool: str, vol: str, capacity: int) -> None:
        self._post(_p(pool, "volumes", vol, "resize"), {"capacity": capacity})

    def vol_delete(self, pool: str, vol: str) -> None:
        self.request("DELETE", _p(pool, "volumes", vol))

    # -- networks
    def net_list(self) -> list[dict[str, Any]]:
        return self._get("/v1/networks")  # type: ignore[no-any-return]

    def net_define(self, doc: dict[str, Any]) -> dict[str, Any]:
        return self._post("/v1/networks", doc)  # type: ignore[no-any-return]

    def net_info(self, net: str) -> dict[str, Any]:
        return self._get(_n(net))  # type: ignore[no-any-return]

    def net_undefine(self, net: str) -> None:
        self.request("DELETE", _n(net))

    def net_start(self, net: str) -> None:
        self._post(_n(net, "start"))

    def net_stop(self, net: str) -> None:
        self._post(_n(net, "stop"))

    def net_set_autostart(self, net: str, on: bool) -> None:
        self.request("PUT", _n(net, "autostart"), {"enabled": on})

    def net_leases(self, net: str) -> list[dict[str, Any]]:
        return self._get(_n(net, "leases"))  # type: ignore[no-any-return]

    # -- web GUI accounts (admin)
    def user_list(self) -> list[dict[str, Any]]:
        return self._get("/v1/users")  # type: ignore[no-any-return]

    def user_add(self, name: str, password: str, role: str = "user") -> dict[str, Any]:
        return self._post("/v1/users", {"name": name, "role": role,  # type: ignore[no-any-return]
                                        "password": password})

    def user_set(self, name: str, *, role: str | None = None,
                 password: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if role is not None:
            body["role"] = role
        if password is not None:
            body["password"] = password
        return self.request("PUT", _u(name), body)  # type: ignore[no-any-return]

    def user_delete(self, name: str) -> None:
        self.request("DELETE", _u(name))

    def user_grant(self, name: str, domain: str) -> None:
        self.request("PUT", _u(name, "grants", domain))

    def user_revoke(self, name: str, domain: str) -> None:
        self.request("DELETE", _u(name, "grants", domain))

    # -- tasks and events
    def tasks(self, active: bool = False) -> list[dict[str, Any]]:
        return self._get("/v1/tasks", active=active)  # type: ignore[no-any-return]

    def task(self, tid: int) -> dict[str, Any]:
        return self._get(f"/v1/tasks/{int(tid)}")  # type: ignore[no-any-return]

    def wait_task(self, tid: int, on_progress: Callable[[dict[str, Any]], None] | None = None,
                  *, timeout: float | None = None, check: bool = True) -> dict[str, Any]:
        """Poll the task until it ends; ``on_progress(task)`` on each change. A
        failed task raises ``TaskFailed`` (``check=False``: returned)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen: tuple[Any, ...] | None = None
        delay = 0.05
        while True:
            t = self.task(tid)
            key = (t.get("state"), t.get("progress"), t.get("message"))
            if on_progress is not None and key != seen:
                on_progress(t)
            seen = key
            if t.get("state") != "running":
                if check and t.get("state") == "failed":
                    raise TaskFailed(t)
                return t
            if deadline is not None and time.monotonic() > deadline:
                raise ClientError(504, "timeout", f"task {tid} is still running after "
                                                  f"{timeout} s")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def events(self, since: int | None = None) -> Iterator[dict[str, Any]]:
        """Events as they happen (with ``since``: the stored ones after that id
        first), on a connection of their own. Ends when the daemon ends the stream."""
        conn = self._new_connection(max(self.timeout, 60.0))  # keep-alives every 15 s
        try:
            path = "/v1/events" + (f"?since={int(since)}" if since is not None else "")
            headers = self._headers({"Accept": "text/event-stream"})
            try:
                resp = self._send(conn, "GET", path, None, headers)
            except _RETRYABLE as exc:
                raise ConnectionFailed(f"connection to the daemon at {self.uri} failed: "
                                       f"{_why(exc)}") from None
            if resp.status != 200:
                self._decode(resp.status, resp.reason, resp.getheader("content-type", ""),
                             resp.read())
            data: list[str] = []
            while True:
                try:
                    raw = resp.readline()
                except OSError as exc:
                    raise ConnectionFailed(f"event stream from {self.uri} failed: "
                                           f"{_why(exc)}") from None
                if not raw:
                    return
                line = raw.decode(errors="replace").rstrip("\r\n")
                if not line:
                    if data:
                        yield json.loads("\n".join(data))
                        data = []
                elif line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
                # id:, event: and comments (keep-alives) need nothing: each data has its id
        finally:
            conn.close()

    def event_log(self, limit: int = 100, kind: str | None = None,
                  obj: str | None = None) -> list[dict[str, Any]]:
        return self._get("/v1/events/log", limit=limit, kind=kind,  # type: ignore[no-any-return]
                         object=obj)

    def console(self, name: str) -> ClientConnection:
        """The domain's serial console as a WebSocket (``websockets.sync``): binary
        messages both ways (``send(bytes)``, ``recv()``)."""
        from websockets.exceptions import InvalidStatus, WebSocketException
        from websockets.sync.client import connect, unix_connect

        path = _d(name, "console")
        headers = self._headers()
        headers.pop("Accept")
        try:
            if self._ssl is not None:
                ws = connect(f"wss://{self._host}:{self._port}{path}", ssl=self._ssl,
                             additional_headers=headers, open_timeout=self.timeout,
                             max_size=None, compression=None)
            else:
                if self._tunnel is not None and not self._path:
                    self._path = self._tunnel.start()
                ws = unix_connect(self._path, f"ws://localhost{path}",
                                  additional_headers=headers, open_timeout=self.timeout,
                                  max_size=None, compression=None)
            # entered here (websockets >= 17.1 wants that): the caller may use it
            # directly (close()) or in a with statement
            return ws.__enter__()
        except InvalidStatus as exc:
            r = exc.response
            self._decode(r.status_code, r.reason_phrase, r.headers.get("content-type", ""),
                         bytes(r.body or b""))
            raise ClientError(r.status_code, "http-error", f"console refused: {r.status_code}")\
                from None
        except (OSError, WebSocketException) as exc:
            why = _why(exc) if isinstance(exc, OSError) else str(exc)
            raise ConnectionFailed(f"cannot connect to the daemon at {self.uri}: {why}") from None


def _d(name: str, *rest: str) -> str:
    return "/v1/domains/" + "/".join(quote(p, safe="") for p in (name, *rest))


def _p(pool: str, *rest: str) -> str:
    return "/v1/pools/" + "/".join(quote(p, safe="") for p in (pool, *rest))


def _n(net: str, *rest: str) -> str:
    return "/v1/networks/" + "/".join(quote(p, safe="") for p in (net, *rest))


def _u(user: str, *rest: str) -> str:
    return "/v1/users/" + "/".join(quote(p, safe="") for p in (user, *rest))
