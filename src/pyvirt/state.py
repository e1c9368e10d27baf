"""Saved state: the one shape every device, vCPU and VM-level part uses.

Every part of a machine that holds state a guest can observe (a device's
registers, a vCPU's registers, an interrupt controller, a virtqueue's
indices) saves it as a *state record*: a frozen dataclass holding only plain
values (``int``, ``bool``, ``str``, ``bytes``, ``float``, ``None``, tuples or
lists of those, nested state records), with ``version: int`` as its first
field. The part implements::

    STATE_VERSION: ClassVar[int]          # bump when the record's meaning changes
    state_type: ClassVar[type]            # the record class, for decoding
    def save_state(self) -> Record        # no side effects; the VM is paused
    def restore_state(self, state: Record) -> None
                                          # may be called on a part that ran before
                                          # (a reset in place restores the state
                                          # captured when the machine was built):
                                          # leave it exactly as the record says

Records are encoded with msgpack (``encode``/``decode``, msgspec; imported
here only when a snapshot is written or read, never on the boot path).
``check_version`` refuses a record written by another layout with a
``StateError`` that names the part.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, TypeVar

from pyvirt.errors import UserInputError

__all__ = ["StateError", "Stateful", "check_version", "decode", "encode"]

T = TypeVar("T")


class StateError(UserInputError):
    """Saved state that cannot be used here (another version, corrupt, or a
    part that does not match the machine being restored)."""


class Stateful(Protocol):
    STATE_VERSION: ClassVar[int]
    state_type: ClassVar[type[Any]]

    def save_state(self) -> Any: ...

    def restore_state(self, state: Any) -> None: ...


def check_version(part: str, got: int, want: int) -> None:
    if got != want:
        raise StateError(f"{part}: saved state has version {got}; this pyvirt reads "
                         f"version {want}")


def encode(record: object) -> bytes:
    """One record (or a dict/list of them) as msgpack bytes."""
    import msgspec

    return msgspec.msgpack.encode(record)


def decode(data: bytes, type_: type[T], *, part: str) -> T:
    """Bytes from ``encode`` back into ``type_``; anything malformed is a
    ``StateError`` naming ``part``."""
    import msgspec

    try:
        return msgspec.msgpack.decode(data, type=type_, strict=True)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise StateError(f"{part}: saved state is unreadable: {exc}") from None
