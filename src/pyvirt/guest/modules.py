"""Kernel modules for the initramfs: which files, in which order, decompressed.

We read the files ``depmod`` writes (``modules.dep``, ``modules.softdep``,
``modules.alias``) plus ``modules.builtin`` from the kernel package, and compute
a load order in which every module comes after everything it needs. Soft
dependencies ("pre:") are followed too: ext4 needs a crc32c implementation at
mount time, and the kernel only asks for it by alias (``crypto-crc32c``).
"""

from __future__ import annotations

import fnmatch
import gzip
import lzma
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from pyvirt.guest import GuestBuildError

__all__ = [
    "COMPRESSED_SUFFIXES",
    "ModuleIndex",
    "load_order",
    "module_name",
    "read_module",
    "uncompressed_path",
]

#: suffixes of compressed modules; busybox insmod only loads plain ``.ko`` files
COMPRESSED_SUFFIXES = (".xz", ".zst", ".gz")


def module_name(relpath: str) -> str:
    """``kernel/drivers/char/hw_random/virtio-rng.ko.xz`` -> ``virtio_rng``."""
    base = relpath.rsplit("/", 1)[-1]
    for suffix in COMPRESSED_SUFFIXES:
        base = base.removesuffix(suffix)
    return base.removesuffix(".ko").replace("-", "_")


def uncompressed_path(relpath: str) -> str:
    """The module's path once decompressed (``foo.ko.zst`` -> ``foo.ko``)."""
    for suffix in COMPRESSED_SUFFIXES:
        if relpath.endswith(".ko" + suffix):
            return relpath.removesuffix(suffix)
    return relpath


@dataclass
class ModuleIndex:
    """The parts of depmod's output we need, for one kernel version."""

    #: module path (relative to lib/modules/<version>) -> paths of everything it needs
    deps: dict[str, list[str]] = field(default_factory=dict)
    #: module name -> module path
    by_name: dict[str, str] = field(default_factory=dict)
    #: names of modules compiled into the kernel
    builtin: set[str] = field(default_factory=set)
    #: module name -> names/aliases to load before it
    softdeps: dict[str, list[str]] = field(default_factory=dict)
    #: (alias pattern, module name), in file order
    aliases: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def load(cls, moddir: Path) -> ModuleIndex:
        index = cls()
        dep_file = moddir / "modules.dep"
        try:
            dep_text = dep_file.read_text()
        except OSError as err:
            raise GuestBuildError(f"cannot read {dep_file}: {err.strerror}") from err
        for line in dep_text.splitlines():
            if ":" not in line:
                continue
            path, _, rest = line.partition(":")
            index.deps[path] = rest.split()
            index.by_name[module_name(path)] = path
        for line in _read_optional(moddir / "modules.builtin").splitlines():
            if line.strip():
                index.builtin.add(module_name(line.strip()))
        for line in _read_optional(moddir / "modules.softdep").splitlines():
            words = line.split()
            if len(words) < 3 or words[0] != "softdep":
                continue
            pre: list[str] = []
            section = ""
            for word in words[2:]:
                if word.endswith(":"):
                    section = word
                elif section == "pre:":
                    pre.append(word)
            if pre:
                index.softdeps.setdefault(words[1].replace("-", "_"), []).extend(pre)
        for line in _read_optional(moddir / "modules.alias").splitlines():
            words = line.split()
            if len(words) == 3 and words[0] == "alias":
                index.aliases.append((words[1], words[2].replace("-", "_")))
        return index

    def resolve(self, name: str) -> list[str]:
        """Module names a name or alias stands for ([] when unknown or built in)."""
        norm = name.replace("-", "_")
        if norm in self.by_name:
            return [norm]
        if norm in self.builtin:
            return []
        found: list[str] = []
        for pattern, target in self.aliases:
            if (
                fnmatch.fnmatchcase(name, pattern)
                and target in self.by_name
                and target not in found
            ):
                found.append(target)
        return found


def load_order(index: ModuleIndex, wanted: list[str]) -> tuple[list[str], list[str]]:
    """Paths of ``wanted`` and all they need, dependencies first; and the built-in names.

    Raises GuestBuildError for a wanted module that is neither a module nor built in.
    """
    order: list[str] = []
    seen: set[str] = set()
    builtin: list[str] = []

    def visit(path: str, stack: tuple[str, ...]) -> None:
        if path in seen:
            return
        if path in stack:
            # modules.dep cannot contain cycles (the kernel refuses them); guard anyway
            raise GuestBuildError(f"module dependency cycle: {' -> '.join((*stack, path))}")
        name = module_name(path)
        for soft in index.softdeps.get(name, []):
            for target in index.resolve(soft):
                visit(index.by_name[target], (*stack, path))
        for dep in index.deps.get(path, []):
            visit(dep, (*stack, path))
        seen.add(path)
        order.append(path)

    for name in wanted:
        norm = name.replace("-", "_")
        if norm in index.by_name:
            visit(index.by_name[norm], ())
        elif norm in index.builtin:
            builtin.append(norm)
        else:
            raise GuestBuildError(
                f"kernel module {name!r} is neither a module nor built into this kernel"
            )
    return order, builtin


def read_module(path: Path) -> bytes:
    """The module's ELF bytes, decompressed on the host (busybox insmod cannot)."""
    try:
        if path.name.endswith(".ko.xz"):
            return lzma.decompress(path.read_bytes())
        if path.name.endswith(".ko.gz"):
            return gzip.decompress(path.read_bytes())
        if path.name.endswith(".ko.zst"):
            return _zstd_decompress(path)
        return path.read_bytes()
    except (OSError, lzma.LZMAError, gzip.BadGzipFile) as err:
        raise GuestBuildError(f"cannot read kernel module {path}: {err}") from err


def _zstd_decompress(path: Path) -> bytes:
    # Python 3.11 has no zstd in its standard library: use the zstd command.
    zstd = shutil.which("zstd")
    if zstd is None:
        raise GuestBuildError(
            f"{path.name} is zstd-compressed and 'zstd' is not installed (apt-get install zstd)"
        )
    proc = subprocess.run([zstd, "-dc", str(path)], capture_output=True, check=False)
    if proc.returncode != 0:
        msg = proc.stderr.decode(errors="replace").strip().splitlines()
        raise GuestBuildError(f"zstd cannot decompress {path}: {msg[-1] if msg else '?'}")
    return proc.stdout


def _read_optional(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""
    except OSError as err:
        raise GuestBuildError(f"cannot read {path}: {err.strerror}") from err
