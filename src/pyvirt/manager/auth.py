"""Who is asking, and what they may see and do (STUB: helper A fills this in).

The interface others use (keep these names and signatures):
- ``Principal``: the caller of one request.
- ``principal_of(request)``: the request's principal (the Unix socket and the
  bearer token are the administrator).
- ``visible_names(manager, principal)``: the domain names the principal may see,
  or None for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ADMIN", "Principal", "principal_of", "visible_names"]


@dataclass(frozen=True)
class Principal:
    name: str
    role: str  # "admin" | "user" | "viewer"
    via: str  # "unix" | "token" | "session"

    @property
    def admin(self) -> bool:
        return self.role == "admin"


ADMIN = Principal("root", "admin", "unix")


def principal_of(request: Any) -> Principal:
    p = getattr(getattr(request, "state", None), "principal", None)
    return p if isinstance(p, Principal) else ADMIN


def visible_names(manager: Any, principal: Principal) -> set[str] | None:
    return None if principal.admin else set()
