"""The API's paths: decode the request (strictly), call ``VmControl``, encode
the answer. Pure functions of (method, path, body): no sockets here.

Errors map to statuses as the OpenAPI document says: ``ActionRefused`` 409,
``UserInputError`` 400, another ``PyvirtError`` 500 with its message (it says
what failed in words a user understands), anything else 500 with a generic
message (logged with its traceback).
"""

from __future__ import annotations

import enum
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePath
from typing import TYPE_CHECKING, TypeVar

import msgspec

from pyvirt import __version__
from pyvirt.api import metrics as _metrics
from pyvirt.api import openapi
from pyvirt.errors import PyvirtError, UserInputError
from pyvirt.vmm.control import ActionRefused

if TYPE_CHECKING:
    from pyvirt.vmm.control import VmControl

__all__ = ["ROUTES", "Reply", "handle", "one_line"]

log = logging.getLogger("pyvirt.api.server")

_JSON = "application/json"
_PATH_MAX = 4096

T = TypeVar("T")


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes = b""
    content_type: str = _JSON
    headers: tuple[tuple[str, str], ...] = ()


class _Fault(Exception):
    def __init__(self, status: int, message: str,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


class NoArguments(msgspec.Struct, forbid_unknown_fields=True):
    pass


class SnapshotRequest(msgspec.Struct, forbid_unknown_fields=True):
    path: str


class NicLinkRequest(msgspec.Struct, forbid_unknown_fields=True):
    nic: int
    up: bool


class DiskOverlayRequest(msgspec.Struct, forbid_unknown_fields=True):
    disk: int
    path: str


Handler = Callable[["VmControl", str, bytes], Reply]


def _json_reply(obj: object, status: int = 200) -> Reply:
    try:
        return Reply(status, msgspec.json.encode(obj, enc_hook=_enc_hook))
    except UnicodeEncodeError:
        # a host path that is not UTF-8 (surrogate escapes): JSON's \u escapes carry it
        return Reply(status, json.dumps(obj, default=_json_default).encode())


def _json_default(obj: object) -> object:
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


def _enc_hook(obj: object) -> object:
    if isinstance(obj, PurePath):
        return str(obj)
    raise NotImplementedError(f"cannot encode {type(obj).__name__} as JSON")


def _decode(what: str, body: bytes, typ: type[T], *, required: bool) -> T | None:
    if not body:
        if required:
            raise _Fault(400, f"{what} needs a JSON body")
        return None
    try:
        return msgspec.json.decode(body, type=typ)
    except msgspec.ValidationError as exc:
        raise _Fault(400, f"{what}: {_plain(str(exc))}") from None
    except msgspec.DecodeError as exc:
        raise _Fault(400, f"{what}: the body is not valid JSON ({exc})") from None


def _plain(msg: str) -> str:
    """msgspec's wording, in ours: "Object contains unknown field `x`" -> "unknown
    field `x`"; "Expected `str`, got `int` - at `$.path`" -> "path: expected ..."."""
    if msg.startswith("Object contains unknown field"):
        return "unknown field" + msg[len("Object contains unknown field"):]
    if msg.startswith("Object missing required field"):
        return "missing field" + msg[len("Object missing required field"):]
    head, sep, where = msg.partition(" - at `$")
    if sep:
        field = where.rstrip("`").lstrip(".")
        return f"{field or 'body'}: {head[0].lower()}{head[1:]}"
    return msg[0].lower() + msg[1:] if msg else msg


# ---- the operations

def _get_vm(control: VmControl, what: str, body: bytes) -> Reply:
    return _json_reply(control.info())


def _action(name: str) -> Handler:
    def run(control: VmControl, what: str, body: bytes) -> Reply:
        _decode(what, body, NoArguments, required=False)
        getattr(control, name)()
        return Reply(204)
    run.__name__ = f"_action_{name}"
    return run


def _snapshot(control: VmControl, what: str, body: bytes) -> Reply:
    req = _decode(what, body, SnapshotRequest, required=True)
    assert req is not None
    return _json_reply(control.snapshot(_new_path(req.path, "a directory")))


def _new_path(path: str, kind: str) -> str:
    """``path`` checked as the absolute name of ``kind`` (a file, a directory) to create."""
    if "\0" in path:
        raise _Fault(400, "path: contains a NUL character")
    if len(path.encode("utf-8", "surrogatepass")) > _PATH_MAX:
        raise _Fault(400, f"path: longer than {_PATH_MAX} bytes")
    if not os.path.isabs(path) or path == "/":
        raise _Fault(400, f"path: must be an absolute path of {kind} to create, not {path!r}")
    return path


def _disk_overlay(control: VmControl, what: str, body: bytes) -> Reply:
    req = _decode(what, body, DiskOverlayRequest, required=True)
    assert req is not None
    if not 0 <= req.disk < 256:
        raise _Fault(400, f"disk: {req.disk} is not a disk index")
    return _json_reply(control.disk_overlay(req.disk, _new_path(req.path, "a file")))


def _nic_link(control: VmControl, what: str, body: bytes) -> Reply:
    req = _decode(what, body, NicLinkRequest, required=True)
    assert req is not None
    if not 0 <= req.nic < 256:
        raise _Fault(400, f"nic: {req.nic} is not a NIC index")
    control.set_nic_link(req.nic, req.up)
    return Reply(204)


def _get_metrics(control: VmControl, what: str, body: bytes) -> Reply:
    text = _metrics.render(control.metrics())
    # a label may hold a host path that is not UTF-8: escape rather than fail
    return Reply(200, text.encode("utf-8", "backslashreplace"), _metrics.CONTENT_TYPE)


def _get_version(control: VmControl, what: str, body: bytes) -> Reply:
    return _json_reply({"pyvirt_version": __version__, "api_version": openapi.API_VERSION})


def _get_openapi(control: VmControl, what: str, body: bytes) -> Reply:
    return Reply(200, openapi.document_json())


#: path -> method -> handler; tests check it against the OpenAPI document
ROUTES: dict[str, dict[str, Handler]] = {
    "/vm": {"GET": _get_vm},
    "/vm/pause": {"PUT": _action("pause")},
    "/vm/resume": {"PUT": _action("resume")},
    "/vm/power-button": {"PUT": _action("power_button")},
    "/vm/reset": {"PUT": _action("reset")},
    "/vm/ctrl-alt-del": {"PUT": _action("ctrl_alt_del")},
    "/vm/stop": {"PUT": _action("force_stop")},
    "/vm/snapshot": {"PUT": _snapshot},
    "/vm/nic-link": {"PUT": _nic_link},
    "/vm/disk-overlay": {"PUT": _disk_overlay},
    "/metrics": {"GET": _get_metrics},
    "/version": {"GET": _get_version},
    "/openapi.json": {"GET": _get_openapi},
}


def handle(control: VmControl, method: str, target: str, content_type: str | None,
           body: bytes) -> Reply:
    """The answer to one complete request."""
    path = target.split("?", 1)[0]
    what = f"{method} {path}"
    try:
        return _route(control, method, path, content_type, body)
    except _Fault as exc:
        return fault(exc.status, str(exc), exc.headers)
    except ActionRefused as exc:
        return fault(409, str(exc))
    except UserInputError as exc:
        return fault(400, str(exc))
    except PyvirtError as exc:
        log.warning("api: %s failed: %s", one_line(what), exc)
        return fault(500, str(exc))
    except Exception:
        log.exception("api: %s failed", one_line(what))
        return fault(500, f"{what}: internal error in the VMM (see its log)")


def _route(control: VmControl, method: str, path: str, content_type: str | None,
           body: bytes) -> Reply:
    methods = ROUTES.get(path)
    if methods is None:
        raise _Fault(404, f"no such path: {path[:200]}")
    handler = methods.get(method)
    if handler is None:
        allow = ", ".join(sorted(methods))
        raise _Fault(405, f"{method[:20]} is not allowed on {path} (only {allow})",
                     (("allow", allow),))
    what = f"{method} {path}"
    if body:
        if method == "GET":
            raise _Fault(400, f"{what} takes no request body")
        media = (content_type or "").split(";", 1)[0].strip().lower()
        if media != _JSON:
            got = f"not {content_type[:100]}" if content_type else "Content-Type is missing"
            raise _Fault(415, f"{what}: the body must be application/json ({got})")
    return handler(control, what, body)


def fault(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return Reply(status, json.dumps({"fault_message": one_line(message)}).encode(),
                 _JSON, headers)


def one_line(text: str, limit: int = 500) -> str:
    """``text`` on one line of printable characters, at most ``limit`` long: a
    fault message may quote what the client sent."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return text or "error"
