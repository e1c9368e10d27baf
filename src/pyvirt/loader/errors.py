"""The loader's error type."""

from __future__ import annotations

from pathlib import Path

from pyvirt.errors import UserInputError

__all__ = ["LoaderError"]


class LoaderError(UserInputError):
    """A kernel, initrd or command line that cannot be used; names the file and the problem."""

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(f"{path}: {message}" if path is not None else message)
        self.path = path
