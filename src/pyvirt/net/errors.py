"""Errors of the NICs' host sides.

    PyvirtError
    └── UserInputError
        └── NetConfigError   a NIC cannot be set up as configured (no permission,
                             no such bridge, passt missing, host port in use ...)

``NetBackendError`` (``pyvirt.net.backend``) is the other kind: a backend that
worked and then failed for good while the VM runs (the NIC's link goes down).
"""

from __future__ import annotations

from pyvirt.errors import UserInputError

__all__ = ["NetConfigError"]


class NetConfigError(UserInputError):
    """A NIC's host side cannot be set up. The message is one line that starts
    with ``what``, the configuration field (``nics[0]``)."""

    def __init__(self, what: str, problem: str) -> None:
        super().__init__(f"{what}: {problem}")
        self.what = what
        self.problem = problem
