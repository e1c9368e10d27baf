"""The daemon's errors: each carries the HTTP status and a stable code the API
answers with, and a one-line message in libvirt's words ("domain is not
running"). Messages name objects and fields, never command-line flags."""

from __future__ import annotations

from typing import Any, ClassVar

from pyvirt.errors import PyvirtError, UserInputError

__all__ = ["AlreadyExists", "InvalidArgument", "ManagerError", "NotFound", "OperationFailed",
           "OperationInvalid", "OperationTimeout", "from_dict"]


class ManagerError(PyvirtError):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal-error"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "field": self.field}


class NotFound(ManagerError):
    status = 404
    code = "not-found"
    exit_status = 2


class InvalidArgument(ManagerError, UserInputError):
    """A value the caller gave cannot be used; the message starts with ``field``."""

    status = 400
    code = "invalid-argument"

    def __init__(self, detail: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {detail}" if field else detail, field)
        self.detail = detail


class OperationInvalid(ManagerError):
    """Not possible in the object's current state; nothing changed."""

    status = 409
    code = "operation-invalid"
    exit_status = 2


class AlreadyExists(ManagerError):
    status = 409
    code = "already-exists"
    exit_status = 2


class OperationTimeout(ManagerError):
    status = 504
    code = "timeout"


class OperationFailed(ManagerError):
    status = 500
    code = "operation-failed"


_BY_CODE: dict[str, type[ManagerError]] = {
    c.code: c for c in (ManagerError, NotFound, InvalidArgument, OperationInvalid,
                        AlreadyExists, OperationTimeout, OperationFailed)}


def from_dict(doc: dict[str, Any]) -> ManagerError:
    """The error an API answer's ``{"code", "message", "field"}`` describes."""
    cls = _BY_CODE.get(str(doc.get("code")), ManagerError)
    msg = str(doc.get("message") or "unknown error")
    field = doc.get("field") if isinstance(doc.get("field"), str) else None
    if cls is InvalidArgument:
        err = InvalidArgument(msg)
        err.field = field
        return err
    return cls(msg, field)
