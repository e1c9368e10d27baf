"""``VmClient``: the typed Python client of one VM's control API.

    with VmClient("/run/vm1.sock") as vm:
        vm.pause()
        vm.snapshot("/var/lib/vm1/snap")
        print(vm.info()["state"], vm.metrics().get("pyvirt_uptime_seconds"))

An answer 4xx/5xx raises ``ApiError(status, fault_message)``; no VMM on the
socket (no file, refused, timed out) raises ``ApiConnectionError``. httpx is
imported at the first request, not with this module.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, cast

from pyvirt.errors import PyvirtError

if TYPE_CHECKING:
    import httpx

__all__ = ["ApiConnectionError", "ApiError", "Metrics", "SnapshotResult", "VmClient",
           "VmInfo", "unix_transport"]


class ApiError(PyvirtError):
    """The VMM refused or failed a request: ``status`` (4xx: the request or
    the VM's state was wrong, exit status 2; 5xx: the VMM failed, 1)."""

    def __init__(self, status: int, fault_message: str) -> None:
        super().__init__(fault_message)
        self.status = status
        self.fault_message = fault_message
        self.exit_status = 2 if 400 <= status < 500 else 1


class ApiConnectionError(PyvirtError):
    """No answer from a VMM on the socket (exit status 1)."""


class VmInfo(TypedDict):
    state: str
    uptime_s: float
    backend: str
    pyvirt_version: str
    config: dict[str, Any]
    boot_count: int


class SnapshotResult(TypedDict):
    path: str
    memory_bytes_written: int
    seconds: float


@dataclass(frozen=True)
class Metrics:
    """``GET /metrics``: the text as served, and its samples parsed."""

    text: str
    samples: dict[str, list[tuple[dict[str, str], float]]]

    def get(self, name: str, **labels: str) -> float | None:
        """The value of the sample ``name`` whose labels include ``labels``
        (the first such), or None."""
        for have, value in self.samples.get(name, ()):
            if all(have.get(k) == v for k, v in labels.items()):
                return value
        return None


class VmClient:
    """A connection to the API socket of one VM (keep-alive; close it, or use
    it as a context manager). ``timeout`` bounds each request in seconds;
    snapshots get ``snapshot_timeout`` (they write the guest's memory)."""

    def __init__(self, socket_path: str | os.PathLike[str], *, timeout: float = 30.0,
                 snapshot_timeout: float = 600.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout
        self.snapshot_timeout = snapshot_timeout
        self._http: httpx.Client | None = None

    def __enter__(self) -> VmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    # ---- the API

    def info(self) -> VmInfo:
        """State, configuration, uptime, backend, version, boot count."""
        return cast(VmInfo, self._json(self.request("GET", "/vm"), "GET /vm"))

    def version(self) -> dict[str, str]:
        return cast(dict[str, str], self._json(self.request("GET", "/version"), "GET /version"))

    def pause(self) -> None:
        self.request("PUT", "/vm/pause")

    def resume(self) -> None:
        self.request("PUT", "/vm/resume")

    def power_button(self) -> None:
        self.request("PUT", "/vm/power-button")

    def reset(self) -> None:
        self.request("PUT", "/vm/reset")

    def ctrl_alt_del(self) -> None:
        self.request("PUT", "/vm/ctrl-alt-del")

    def stop(self) -> None:
        """Force-stop: the VM stops at once."""
        self.request("PUT", "/vm/stop")

    def set_nic_link(self, nic: int, up: bool) -> None:
        """NIC ``nic``'s link up or down (down: the cable pulled)."""
        self.request("PUT", "/vm/nic-link", json_body={"nic": nic, "up": up})

    def disk_overlay(self, disk: int, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Put a new qcow2 overlay at ``path`` on disk ``disk`` of the paused VM
        (made absolute here); returns ``{"disk", "path", "backing"}``."""
        body = {"disk": disk, "path": os.path.abspath(os.fspath(path))}
        resp = self.request("PUT", "/vm/disk-overlay", json_body=body)
        return cast(dict[str, Any], self._json(resp, "PUT /vm/disk-overlay"))

    def snapshot(self, path: str | os.PathLike[str]) -> SnapshotResult:
        """Snapshot the paused VM into the new directory ``path`` (made
        absolute here: the VMM's working directory is not the caller's)."""
        body = {"path": os.path.abspath(os.fspath(path))}
        resp = self.request("PUT", "/vm/snapshot", json_body=body, timeout=self.snapshot_timeout)
        return cast(SnapshotResult, self._json(resp, "PUT /vm/snapshot"))

    def metrics(self) -> Metrics:
        from pyvirt.api.metrics import MetricsFormatError, parse

        text = self.request("GET", "/metrics").text
        try:
            return Metrics(text, parse(text))
        except MetricsFormatError as exc:
            raise ApiError(502, f"GET /metrics: the VMM's answer is not in the "
                                f"Prometheus format: {exc}") from exc

    def openapi(self) -> dict[str, Any]:
        return cast(dict[str, Any],
                    self._json(self.request("GET", "/openapi.json"), "GET /openapi.json"))

    # ---- the transport

    def request(self, method: str, path: str, *, json_body: object = None,
                timeout: float | None = None) -> httpx.Response:
        """One request; a 4xx/5xx answer raises ``ApiError``."""
        import httpx

        client = self._client()
        limit = timeout if timeout is not None else self.timeout
        deadline = time.monotonic() + limit
        for attempt in itertools.count():
            try:
                resp = client.request(method, path, json=json_body, timeout=limit)
                break
            except httpx.TimeoutException as exc:
                raise ApiConnectionError(f"{self.socket_path}: no answer from the VMM "
                                         f"({method} {path} timed out)") from exc
            except httpx.ConnectError as exc:
                # EAGAIN: the VMM's listen backlog is full (a burst of clients). Nothing
                # was sent, so even a PUT is safe to try again, for a while.
                if _errno(exc) != errno.EAGAIN or time.monotonic() > deadline:
                    raise ApiConnectionError(self._why_unreachable(exc)) from exc
                time.sleep(min(0.01 * 2 ** attempt, 0.2))
            except httpx.TransportError as exc:
                raise ApiConnectionError(self._why_unreachable(exc)) from exc
        if resp.status_code >= 400:
            raise ApiError(resp.status_code, _fault_message(resp))
        return resp

    def _client(self) -> httpx.Client:
        if self._http is None:
            import httpx

            self._http = httpx.Client(transport=unix_transport(self.socket_path),
                                      base_url="http://localhost", timeout=self.timeout,
                                      trust_env=False)  # no proxies for a Unix socket
        return self._http

    def _why_unreachable(self, exc: Exception) -> str:
        where = f"cannot connect to {self.socket_path}"
        try:
            st = os.stat(self.socket_path)
        except FileNotFoundError:
            return f"{where}: no such file"
        except OSError as stat_err:
            return f"{where}: {stat_err.strerror}"
        if not stat.S_ISSOCK(st.st_mode):
            return f"{where}: not a socket"
        code = _errno(exc)
        if code == errno.ECONNREFUSED:
            return f"{where}: connection refused (is the VM still running?)"
        if code is not None:
            return f"{where}: {os.strerror(code).lower()}"
        return f"{where}: {exc}"

    @staticmethod
    def _json(resp: httpx.Response, what: str) -> Any:
        try:
            return resp.json()
        except ValueError as exc:
            raise ApiError(502, f"{what}: the VMM's answer is not JSON") from exc


def unix_transport(path: str | os.PathLike[str]) -> httpx.HTTPTransport:
    """httpx's transport to a Unix socket. Plain HTTP only: ``verify=False``
    spares loading the CA store (~0.1 s per client) for TLS never used."""
    import httpx

    return httpx.HTTPTransport(uds=os.fspath(path), retries=0, verify=False)


def _errno(exc: BaseException) -> int | None:
    """The errno of the OSError under an httpx error, if there is one."""
    cause: BaseException | None = exc
    for _ in range(10):
        if cause is None or isinstance(cause, OSError):
            break
        cause = cause.__cause__ or cause.__context__
    return cause.errno if isinstance(cause, OSError) else None


def _fault_message(resp: httpx.Response) -> str:
    try:
        msg = json.loads(resp.content)["fault_message"]
        if isinstance(msg, str) and msg:
            return msg
    except (ValueError, KeyError, TypeError):
        pass
    return f"HTTP {resp.status_code} {resp.reason_phrase}".strip()
