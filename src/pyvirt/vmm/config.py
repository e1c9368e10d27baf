"""Validated VM configuration: what ``pyvirt run`` (and later the API) hands the builder.

Configuration is data: a frozen ``VmConfig`` checked once at the edge. Every
problem raises ``ConfigError`` whose message names the offending option, so
the CLI can print one line and exit 2.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pyvirt.errors import UserInputError
from pyvirt.hostfile import FileIdentity, describe_mode, identity

__all__ = [
    "Accel",
    "ConfigError",
    "ConsoleSpec",
    "DiskSpec",
    "OnReboot",
    "SandboxSetting",
    "VmConfig",
    "host_memory_bytes",
    "parse_console",
    "parse_disk",
    "parse_size",
]

Accel = Literal["auto", "kvm", "emu"]
OnReboot = Literal["restart", "exit"]
#: pyvirt.sandbox: "auto" applies what the host supports, "on" all of it or fails
SandboxSetting = Literal["auto", "on", "off"]

MIN_MEMORY = 16 << 20  # below this Linux cannot even unpack an initramfs
MAX_CPUS_HARD = 255  # xAPIC IDs / our MADT; KVM may allow fewer


class ConfigError(UserInputError):
    """A configuration value the user gave cannot be used."""


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str, *, what: str = "--memory") -> int:
    """Parse '512M', '2G', '1GiB', '2048' (MiB, as QEMU's -m) into bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(
            f"{what} {text!r}: not a size (use a number with an optional K, M, G or T suffix)")
    n = int(m.group(1))
    return n * _UNITS[m.group(2).upper()]


def host_memory_bytes() -> int:
    """Physical RAM of the host (MemTotal)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class ConsoleSpec:
    """Where the guest's console goes: the terminal, nowhere, or a file; ``virtio``
    is the terminal through virtio-console (hvc0) instead of the serial port."""

    kind: Literal["stdio", "none", "file", "virtio"]
    path: Path | None = None


def parse_console(text: str) -> ConsoleSpec:
    if text == "stdio":
        return ConsoleSpec("stdio")
    if text == "none":
        return ConsoleSpec("none")
    if text == "virtio":
        return ConsoleSpec("virtio")
    if text.startswith("file:") and len(text) > 5:
        path = Path(text[5:])
        _check_console_file(path, f"--console {text}")
        return ConsoleSpec("file", path)
    raise ConfigError(f"--console {text!r}: expected stdio, virtio, none or file:PATH")


def _no_nul(path: Path, option: str) -> None:
    """No file name holds a NUL byte; os.stat would raise ValueError on one
    (argv cannot carry it, but a JSON config or the API can)."""
    if "\0" in str(path):
        raise ConfigError(f"{option}: the path contains a NUL byte")


def _check_console_file(path: Path, option: str) -> None:
    """What can be told without creating or truncating anything (that waits until
    everything else is checked: see ``Console.open``)."""
    _no_nul(path, option)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        parent = path.parent
        if not parent.is_dir():
            raise ConfigError(f"{option}: directory {parent} does not exist") from None
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"{option}: cannot create a file in {parent}: "
                              "permission denied") from None
        return
    except OSError as exc:
        raise ConfigError(f"{option}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{option}: {path} is {describe_mode(st.st_mode)}, "
                          "not a regular file")
    if not os.access(path, os.W_OK):
        raise ConfigError(f"{option}: {path}: permission denied")


CacheMode = Literal["none", "writeback"]
_SERIAL_OK = re.compile(r"^[\x21-\x7e]{1,20}$")


@dataclass(frozen=True)
class DiskSpec:
    """One ``--disk``: a raw image file (or block device) given to the guest as virtio-blk."""

    path: Path
    readonly: bool = False
    serial: str | None = None
    cache: CacheMode = "writeback"
    discard: bool = False


def _onoff(key: str, value: str, spec: str) -> bool:
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise ConfigError(f"--disk {spec}: {key}={value!r} must be on or off")


def parse_disk(spec: str) -> DiskSpec:
    """``path=FILE[,readonly=on][,serial=ID][,cache=none|writeback][,discard=on]``
    (a bare ``FILE`` also works)."""
    opts: dict[str, str] = {}
    for i, part in enumerate(spec.split(",")):
        if "=" not in part:
            if i == 0 and part:
                opts["path"] = part
                continue
            raise ConfigError(f"--disk {spec}: {part!r} is not key=value")
        key, _, value = part.partition("=")
        if key in opts:
            raise ConfigError(f"--disk {spec}: {key} given twice")
        opts[key] = value
    unknown = set(opts) - {"path", "readonly", "serial", "cache", "discard"}
    if unknown:
        raise ConfigError(f"--disk {spec}: unknown option {sorted(unknown)[0]!r} "
                          "(expected path, readonly, serial, cache, discard)")
    if not opts.get("path"):
        raise ConfigError(f"--disk {spec}: path=FILE is required")
    path = Path(opts["path"])
    _no_nul(path, f"--disk {spec}")
    try:
        kind = os.stat(path).st_mode
    except OSError as exc:
        what = "no such file" if exc.errno == errno.ENOENT else exc.strerror
        raise ConfigError(f"--disk {spec}: {path}: {what}") from None
    if not (stat.S_ISREG(kind) or stat.S_ISBLK(kind)):  # a FIFO would block open()
        raise ConfigError(f"--disk {spec}: {path} is {describe_mode(kind)}, "
                          "not a regular file or block device")
    readonly = _onoff("readonly", opts.get("readonly", "off"), spec)
    if not os.access(path, os.R_OK if readonly else os.R_OK | os.W_OK):
        raise ConfigError(f"--disk {spec}: {path}: permission denied"
                          + ("" if readonly else " (readonly=on?)"))
    serial = opts.get("serial")
    if serial is not None and not _SERIAL_OK.match(serial):
        raise ConfigError(f"--disk {spec}: serial must be 1-20 printable ASCII characters")
    cache = opts.get("cache", "writeback")
    if cache not in ("none", "writeback"):
        raise ConfigError(f"--disk {spec}: cache={cache!r} must be none or writeback")
    discard = _onoff("discard", opts.get("discard", "off"), spec)
    return DiskSpec(path, readonly, serial, "none" if cache == "none" else "writeback",
                    discard)


def _check_file(path: Path, option: str) -> None:
    _no_nul(path, option)
    try:
        kind = os.stat(path).st_mode
    except OSError as exc:
        what = "no such file" if exc.errno == errno.ENOENT else exc.strerror
        raise ConfigError(f"{option} {path}: {what}") from None
    if not stat.S_ISREG(kind):
        raise ConfigError(f"{option} {path}: not a regular file ({describe_mode(kind)})")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{option} {path}: permission denied")


@dataclass(frozen=True)
class VmConfig:
    kernel: Path
    initrd: Path | None = None
    cmdline: str = ""
    cpus: int = 1
    memory: int = 512 << 20
    accel: Accel = "auto"
    console: ConsoleSpec = field(default_factory=lambda: ConsoleSpec("stdio"))
    on_reboot: OnReboot = "restart"
    verbose: bool = False
    disks: tuple[DiskSpec, ...] = ()
    rng: bool = True
    sandbox: SandboxSetting = "auto"

    def __post_init__(self) -> None:
        _check_file(self.kernel, "--kernel")
        if self.initrd is not None:
            _check_file(self.initrd, "--initrd")
        if self.cpus < 1:
            raise ConfigError(f"--cpus {self.cpus}: need at least one vCPU")
        if self.cpus > MAX_CPUS_HARD:
            raise ConfigError(f"--cpus {self.cpus}: at most {MAX_CPUS_HARD} vCPUs are supported")
        if self.memory < MIN_MEMORY:
            raise ConfigError(
                f"--memory {self.memory >> 20}M: too small (at least {MIN_MEMORY >> 20}M)")
        if self.memory % (2 << 20):
            raise ConfigError("--memory: must be a multiple of 2 MiB")
        host = host_memory_bytes()
        if self.memory > host:
            raise ConfigError(
                f"--memory {_human(self.memory)}: more than the host's {_human(host)} of RAM")
        if self.accel not in ("auto", "kvm", "emu"):
            raise ConfigError(f"--accel {self.accel!r}: expected auto, kvm or emu")
        if len(self.disks) > 24:
            raise ConfigError(f"--disk: at most 24 disks ({len(self.disks)} given)")
        # by identity, not by name: a hard link or a second device node is the same disk
        # (checked again on the opened fds by VmResources)
        seen: dict[FileIdentity, Path] = {}
        for d in self.disks:
            try:
                ident = identity(os.stat(d.path))
            except OSError:
                continue  # gone: opening it says so
            if ident in seen:
                raise ConfigError(f"--disk {d.path}: the same image as --disk {seen[ident]}")
            seen[ident] = d.path
        if self.on_reboot not in ("restart", "exit"):
            raise ConfigError(f"--on-reboot {self.on_reboot!r}: expected restart or exit")
        if self.sandbox not in ("auto", "on", "off"):
            raise ConfigError(f"sandbox {self.sandbox!r}: expected auto, on or off")


def _human(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n / (1 << 30):.1f}G"
