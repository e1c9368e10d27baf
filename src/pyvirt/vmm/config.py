"""The VM configuration: one document, what the command line, a config file and the API
hand the builder.

Configuration is data: a frozen ``VmConfig`` tree (``ConsoleSpec``, ``DiskSpec``)
that is also a JSON document (``to_dict``/``to_json``, ``from_dict``/``from_json``;
the keys are the field names). Checking it happens in two steps:

- constructing a ``VmConfig`` checks the values alone (ranges, choices, counts,
  serial format, NUL bytes in paths): pure, the same on any host;
- ``check_host(config)`` checks it against this host (the files exist and can
  be opened as needed, the memory fits in RAM, no disk image is given twice,
  the console file can be created); ``run_vm`` calls it first.

Every problem raises ``ConfigError`` whose ``field`` is the path of the field
(``disks[1].path``, ``console.kind``) and whose message starts with it. Nothing
here names a command-line flag: the CLI translates field paths back to the flags
the user typed (``parse_size``, ``parse_console`` and ``parse_disk`` are the CLI's
parsers and name flags). Import-light: on the VMM's start-up path (no msgspec,
no json until a document is read or written).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

from pyvirt.errors import UserInputError
from pyvirt.hostfile import FileIdentity, describe_mode, handed, identity, is_handed

__all__ = [
    "Accel",
    "ConfigError",
    "ConsoleSpec",
    "DiskSpec",
    "NicSpec",
    "OnReboot",
    "PortForward",
    "SandboxSetting",
    "VmConfig",
    "VsockSpec",
    "check_host",
    "host_memory_bytes",
    "parse_console",
    "parse_disk",
    "parse_net",
    "parse_size",
    "parse_vsock",
]

T = TypeVar("T")
Accel = Literal["auto", "kvm", "emu"]
OnReboot = Literal["restart", "exit"]
#: pyvirt.sandbox: "auto" applies what the host supports, "on" all of it or fails
SandboxSetting = Literal["auto", "on", "off"]
ConsoleKind = Literal["stdio", "virtio", "none", "file", "socket"]
CacheMode = Literal["none", "writeback"]
DiskFormat = Literal["raw", "qcow2"]

MIN_MEMORY = 16 << 20  # below this Linux cannot even unpack an initramfs
MAX_CPUS_HARD = 255  # xAPIC IDs / our MADT; KVM may allow fewer
MAX_DISKS = 24
MAX_NICS = 8
#: port forwards of one user-mode NIC (passt takes one option per forward)
MAX_FORWARDS = 64
NetKind = Literal["tap", "user"]
ForwardProto = Literal["tcp", "udp"]
#: sun_path holds 108 bytes with its NUL; guest-initiated vsock connections go to
#: PATH_PORT, up to 11 more bytes
MAX_VSOCK_PATH = 107 - len("_4294967295")
#: a Unix socket's sun_path: 108 bytes with its NUL
MAX_SOCKET_PATH = 107
#: a configuration document is a few hundred bytes; this bounds what a file or an
#: API body can make us parse
MAX_DOCUMENT = 1 << 20


class ConfigError(UserInputError):
    """A configuration value the user gave cannot be used.

    ``field`` is the path of the offending field (``disks[1].path``), or None
    where the problem is not one field's (a document that is not JSON); the
    message then starts with it: ``disks[1].path: /x.img: no such file``.
    ``detail`` is the message without the path.
    """

    def __init__(self, detail: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {detail}" if field else detail)
        self.field = field
        self.detail = detail

    def within(self, prefix: str) -> ConfigError:
        """The same error one level down: ``serial`` within ``disks[1]``."""
        if not self.field:
            return ConfigError(self.detail, prefix)
        sep = "" if self.field.startswith("[") else "."
        return ConfigError(self.detail, f"{prefix}{sep}{self.field}")


def _enum_error(name: str, value: object, choices: tuple[str, ...]) -> ConfigError:
    words = ", ".join(choices[:-1]) + f" or {choices[-1]}"
    shown = f" (not {value!r})" if isinstance(value, str) and len(value) <= 40 else ""
    return ConfigError(f"expected {words}{shown}", name)


def _no_nul(path: Path | str, name: str) -> None:
    """No file name holds a NUL byte; os.stat would raise ValueError on one
    (argv cannot carry it, but a JSON config or the API can)."""
    if "\0" in str(path):
        raise ConfigError("the path contains a NUL byte", name)


# ---- the configuration tree: values only (see check_host for the host)


@dataclass(frozen=True)
class ConsoleSpec:
    """Where the guest's console goes: the terminal, nowhere, a file, or a Unix
    socket (``socket``: one client at a time, see ``pyvirt.vmm.console``); ``virtio``
    is the terminal through virtio-console (hvc0) instead of the serial port."""

    kind: ConsoleKind
    path: Path | None = None

    def __post_init__(self) -> None:
        if self.kind not in get_args(ConsoleKind):
            raise _enum_error("kind", self.kind, ("stdio", "virtio", "none", "file", "socket"))
        if self.kind in ("file", "socket"):
            if self.path is None:
                raise ConfigError(f"a {self.kind} console needs a path", "path")
            _no_nul(self.path, "path")
            if self.kind == "socket" and len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
                raise ConfigError(f"{self.path}: a Unix socket path holds at most "
                                  f"{MAX_SOCKET_PATH} bytes", "path")
        elif self.path is not None:
            raise ConfigError(f"only a file or socket console has a path (kind is {self.kind})",
                              "path")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": None if self.path is None else str(self.path)}


_SERIAL_OK = re.compile(r"^[\x21-\x7e]{1,20}$")


@dataclass(frozen=True)
class DiskSpec:
    """One disk: an image file (or block device) given to the guest as virtio-blk.

    ``format`` None: probed, but a writable image that looks like qcow2 is
    refused at open (see ``pyvirt.disk.open``)."""

    path: Path
    readonly: bool = False
    serial: str | None = None
    cache: CacheMode = "writeback"
    discard: bool = False
    format: DiskFormat | None = None

    def __post_init__(self) -> None:
        _no_nul(self.path, "path")
        if self.format is not None and self.format not in get_args(DiskFormat):
            raise _enum_error("format", self.format, ("raw", "qcow2"))
        if self.serial is not None and not _SERIAL_OK.match(self.serial):
            raise ConfigError("must be 1-20 printable ASCII characters, no spaces", "serial")
        if self.cache not in get_args(CacheMode):
            raise _enum_error("cache", self.cache, ("none", "writeback"))

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "readonly": self.readonly, "serial": self.serial,
                "cache": self.cache, "discard": self.discard, "format": self.format}


_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: a Linux interface name: at most 15 bytes, no '/', no blanks, not "." or ".."
_IFNAME_OK = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$")
_MAC_OK = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def _check_mac(mac: str, name: str) -> str:
    if not _MAC_OK.match(mac):
        raise ConfigError(f"{mac!r} is not a MAC address (six hex bytes: 52:54:00:12:34:56)",
                          name)
    first = int(mac[:2], 16)
    if first & 1:
        raise ConfigError(f"{mac} is a multicast address (the first byte must be even)", name)
    if mac.replace(":", "").strip("0") == "":
        raise ConfigError("00:00:00:00:00:00 is not a usable address", name)
    return mac.lower()


@dataclass(frozen=True)
class PortForward:
    """A host port that reaches a guest port through user-mode networking
    (QEMU's ``hostfwd``): ``host_addr`` "" listens on every host address."""

    proto: ForwardProto
    host_port: int
    guest_port: int
    host_addr: str = ""

    def __post_init__(self) -> None:
        if self.proto not in get_args(ForwardProto):
            raise _enum_error("proto", self.proto, ("tcp", "udp"))
        for key in ("host_port", "guest_port"):
            if not 1 <= getattr(self, key) <= 65535:
                raise ConfigError("must be a port number, 1-65535", key)
        if self.host_addr:
            import ipaddress

            try:
                ipaddress.ip_address(self.host_addr)
            except ValueError:
                raise ConfigError(f"{self.host_addr[:60]!r} is not an IP address",
                                  "host_addr") from None

    def to_dict(self) -> dict[str, Any]:
        return {"proto": self.proto, "host_port": self.host_port,
                "guest_port": self.guest_port, "host_addr": self.host_addr}


@dataclass(frozen=True)
class NicSpec:
    """One virtio-net NIC: user-mode networking (passt, no privileges) or a TAP
    (``tap`` names it: an existing one is used, else one is created; ``bridge``
    puts it on that bridge). ``mac`` None is filled by ``VmConfig``: derived from
    the VM's name and the NIC's index when the VM has a name, else random."""

    kind: NetKind
    mac: str | None = None
    tap: str | None = None
    bridge: str | None = None
    hostfwd: tuple[PortForward, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in get_args(NetKind):
            raise _enum_error("kind", self.kind, ("tap", "user"))
        if self.mac is not None:
            object.__setattr__(self, "mac", _check_mac(self.mac, "mac"))
        if self.kind == "tap":
            if self.tap is None:
                raise ConfigError("a TAP NIC needs the interface's name", "tap")
            if self.hostfwd:
                raise ConfigError("port forwards are for user-mode NICs only (this one is a "
                                  "TAP)", "hostfwd")
        else:
            for key in ("tap", "bridge"):
                if getattr(self, key) is not None:
                    raise ConfigError("only a TAP NIC has one (kind is user)", key)
        for key in ("tap", "bridge"):
            value = getattr(self, key)
            if value is not None and (not _IFNAME_OK.match(value) or value in (".", "..")):
                raise ConfigError(f"{value[:40]!r} is not an interface name (1-15 letters, "
                                  "digits, '_', '.', '-')", key)
        if len(self.hostfwd) > MAX_FORWARDS:
            raise ConfigError(f"at most {MAX_FORWARDS} port forwards", "hostfwd")
        seen: dict[tuple[str, str, int], int] = {}
        for i, fwd in enumerate(self.hostfwd):
            port = (fwd.proto, fwd.host_addr, fwd.host_port)
            if port in seen:
                raise ConfigError(f"host port {fwd.proto}/{fwd.host_port} is forwarded twice "
                                  f"(also hostfwd[{seen[port]}])", f"hostfwd[{i}]")
            seen[port] = i

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "mac": self.mac, "tap": self.tap, "bridge": self.bridge,
                "hostfwd": [f.to_dict() for f in self.hostfwd]}


@dataclass(frozen=True)
class VsockSpec:
    """virtio-vsock with Firecracker's host side: the guest is ``cid``; host programs
    connect to the Unix socket ``path`` (``CONNECT PORT\n``), and the guest's
    connections to host port P reach the Unix socket ``PATH_P``."""

    cid: int
    path: Path

    def __post_init__(self) -> None:
        # 0, 1 and 2 are the hypervisor, local and host; 2^32-1 is "any"
        if not 3 <= self.cid <= 0xFFFF_FFFE:
            raise ConfigError("must be 3 to 4294967294 (0-2 are reserved, 2 is the host)",
                              "cid")
        _no_nul(self.path, "path")
        if len(os.fsencode(self.path)) > MAX_VSOCK_PATH:
            raise ConfigError(f"longer than {MAX_VSOCK_PATH} bytes (a Unix socket path, with "
                              "_PORT appended for the guest's connections)", "path")

    def to_dict(self) -> dict[str, Any]:
        return {"cid": self.cid, "path": str(self.path)}


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
    #: the VM's identity (stable MAC addresses derive from it); None: anonymous
    name: str | None = None
    nics: tuple[NicSpec, ...] = ()
    vsock: VsockSpec | None = None

    def __post_init__(self) -> None:
        """The values alone (no file is looked at: see ``check_host``)."""
        if self.name is not None and not _NAME_OK.match(self.name):
            raise ConfigError("must be 1-64 letters, digits, '.', '_' or '-', starting with a "
                              "letter or digit", "name")
        if len(self.nics) > MAX_NICS:
            raise ConfigError(f"at most {MAX_NICS} NICs ({len(self.nics)} given)", "nics")
        taps: dict[str, int] = {}
        for i, nic in enumerate(self.nics):
            if nic.tap is not None:
                if nic.tap in taps:
                    raise ConfigError(f"TAP {nic.tap} is already nics[{taps[nic.tap]}]",
                                      f"nics[{i}].tap")
                taps[nic.tap] = i
        if any(nic.mac is None for nic in self.nics):
            object.__setattr__(self, "nics", self._with_macs())
        macs: dict[str | None, int] = {}
        for i, nic in enumerate(self.nics):
            if nic.mac in macs:
                raise ConfigError(f"{nic.mac} is already the address of nics[{macs[nic.mac]}]",
                                  f"nics[{i}].mac")
            macs[nic.mac] = i
        _no_nul(self.kernel, "kernel")
        if self.initrd is not None:
            _no_nul(self.initrd, "initrd")
        if self.cpus < 1:
            raise ConfigError("need at least one vCPU", "cpus")
        if self.cpus > MAX_CPUS_HARD:
            raise ConfigError(f"at most {MAX_CPUS_HARD} vCPUs are supported", "cpus")
        if self.memory < MIN_MEMORY:
            raise ConfigError(f"too small (at least {MIN_MEMORY >> 20}M)", "memory")
        if self.memory % (2 << 20):
            raise ConfigError("must be a multiple of 2 MiB", "memory")
        if self.accel not in get_args(Accel):
            raise _enum_error("accel", self.accel, ("auto", "kvm", "emu"))
        if len(self.disks) > MAX_DISKS:
            raise ConfigError(f"at most {MAX_DISKS} disks ({len(self.disks)} given)", "disks")
        if self.on_reboot not in get_args(OnReboot):
            raise _enum_error("on_reboot", self.on_reboot, ("restart", "exit"))
        if self.sandbox not in get_args(SandboxSetting):
            raise _enum_error("sandbox", self.sandbox, ("auto", "on", "off"))

    def _with_macs(self) -> tuple[NicSpec, ...]:
        """The NICs with every missing MAC filled: derived from the name (stable), or
        random for an anonymous VM (then recorded in the document: to_dict)."""
        import dataclasses

        from pyvirt.net.mac import derive_mac, format_mac, random_mac

        out = []
        for i, nic in enumerate(self.nics):
            if nic.mac is None:
                raw = derive_mac(self.name, i) if self.name is not None else random_mac()
                nic = dataclasses.replace(nic, mac=format_mac(raw))
            out.append(nic)
        return tuple(out)

    # -- as a document

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (plain dicts, lists, str, int, bool, None); memory in bytes."""
        return {
            "kernel": str(self.kernel),
            "initrd": None if self.initrd is None else str(self.initrd),
            "cmdline": self.cmdline,
            "cpus": self.cpus,
            "memory": self.memory,
            "accel": self.accel,
            "console": self.console.to_dict(),
            "on_reboot": self.on_reboot,
            "verbose": self.verbose,
            "disks": [d.to_dict() for d in self.disks],
            "rng": self.rng,
            "sandbox": self.sandbox,
            "name": self.name,
            "nics": [n.to_dict() for n in self.nics],
            "vsock": None if self.vsock is None else self.vsock.to_dict(),
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        import json

        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, obj: object) -> VmConfig:
        """Build from a decoded JSON document: unknown keys and wrong types are
        refused at any depth (no "1" for an int, no 1 for a bool), missing keys
        take their defaults (only ``kernel`` is required). ``memory`` is bytes,
        or a size string as on the command line ("512M", "2G"; a bare number
        is MiB). Paths are used as given (a relative one is relative to the
        current directory)."""
        doc = _obj(obj, None, _VM_KEYS)
        return cls(
            kernel=_path(doc, "kernel", required=True),  # type: ignore[arg-type]
            initrd=_path(doc, "initrd"),
            cmdline=_get(doc, "cmdline", str, ""),
            cpus=_get(doc, "cpus", int, 1),
            memory=_memory(doc),
            accel=_get(doc, "accel", str, "auto"),  # type: ignore[arg-type]
            console=_console(doc.get("console")),
            on_reboot=_get(doc, "on_reboot", str, "restart"),  # type: ignore[arg-type]
            verbose=_get(doc, "verbose", bool, False),
            disks=_disks(doc.get("disks")),
            rng=_get(doc, "rng", bool, True),
            sandbox=_get(doc, "sandbox", str, "auto"),  # type: ignore[arg-type]
            name=None if doc.get("name") is None else _get(doc, "name", str, None),
            nics=_nics(doc.get("nics")),
            vsock=_vsock(doc.get("vsock")),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> VmConfig:
        """``from_dict`` of a JSON text; a syntax error, a duplicated key or a
        document over 1 MiB is a ``ConfigError`` too."""
        import json

        if len(text) > MAX_DOCUMENT:
            raise ConfigError(f"the document is larger than {MAX_DOCUMENT >> 20} MiB")
        try:
            obj = json.loads(text, object_pairs_hook=_no_duplicates)
        except _DuplicateKey as exc:
            raise ConfigError("given twice", exc.key) from None
        except RecursionError:
            raise ConfigError("not JSON: nested too deeply") from None
        except UnicodeDecodeError:
            raise ConfigError("not JSON: not UTF-8 text") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"not JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
                              ) from None
        except ValueError as exc:  # e.g. an integer of more than 4300 digits
            raise ConfigError(f"not JSON: {exc}") from None
        return cls.from_dict(obj)


# ---- the document walker: strict types, unknown keys refused, paths in every error

_VM_KEYS = ("kernel", "initrd", "cmdline", "cpus", "memory", "accel", "console", "on_reboot",
            "verbose", "disks", "rng", "sandbox", "name", "nics", "vsock")
_NIC_KEYS = ("kind", "mac", "tap", "bridge", "hostfwd")
_FORWARD_KEYS = ("proto", "host_port", "guest_port", "host_addr")
_VSOCK_KEYS = ("cid", "path")
_CONSOLE_KEYS = ("kind", "path")
_DISK_KEYS = ("path", "readonly", "serial", "cache", "discard", "format")
_JSON_TYPE = {bool: "true or false", int: "an integer", str: "a string"}


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(_key_name(k))  # an inner key: its path is not known here
        out[k] = v
    return out


def _key_name(key: object) -> str:
    return key if isinstance(key, str) and key.isidentifier() else repr(key)


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _obj(value: object, where: str | None, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"expected an object, not {_json_kind(value)}", where)
    for k in value:
        if k not in keys:
            name = _key_name(k)
            raise ConfigError("unknown field", f"{where}.{name}" if where else name)
    return value


def _get(doc: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    if key not in doc:
        return default
    value = doc[key]
    # bool is an int in Python, not in JSON: checked exactly
    if type(value) is not kind:
        raise ConfigError(f"expected {_JSON_TYPE[kind]}, not {_json_kind(value)}", key)
    return value


def _path(doc: dict[str, Any], key: str, *, required: bool = False) -> Path | None:
    if key not in doc or (doc[key] is None and not required):
        if required:
            raise ConfigError("required", key)
        return None
    value = doc[key]
    if not isinstance(value, str):
        raise ConfigError(f"expected a path (a string), not {_json_kind(value)}", key)
    if not value:
        raise ConfigError("the path is empty", key)
    return Path(value)


def _memory(doc: dict[str, Any]) -> int:
    value = doc.get("memory", 512 << 20)
    if isinstance(value, str):
        size = _parse_size(value)
        if size is None:
            raise ConfigError("not a size (bytes as an integer, or a string such as "
                              "\"512M\" or \"2G\")", "memory")
        return size
    if type(value) is not int:
        raise ConfigError(f"expected bytes (an integer) or a size string, not "
                          f"{_json_kind(value)}", "memory")
    return value


def _console(value: object) -> ConsoleSpec:
    if value is None:
        return ConsoleSpec("stdio")
    doc = _obj(value, "console", _CONSOLE_KEYS)
    try:
        kind = _get(doc, "kind", str, None)
        if kind is None:
            raise ConfigError("required", "kind")
        return ConsoleSpec(kind, _path(doc, "path"))
    except ConfigError as exc:
        raise exc.within("console") from None


def _array(value: object, where: str, limit: int, noun: str,
           build: Callable[[dict[str, Any]], T], keys: tuple[str, ...]) -> tuple[T, ...]:
    """A JSON array of at most ``limit`` objects with ``keys``, each made by ``build``;
    errors name ``where[i].field``."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"expected an array, not {_json_kind(value)}", where)
    if len(value) > limit:
        raise ConfigError(f"at most {limit} {noun} ({len(value)} given)", where)
    out = []
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        doc = _obj(item, at, keys)
        try:
            out.append(build(doc))
        except ConfigError as exc:
            raise exc.within(at) from None
    return tuple(out)


def _disk(doc: dict[str, Any]) -> DiskSpec:
    serial = None if doc.get("serial") is None else _get(doc, "serial", str, None)
    return DiskSpec(path=_path(doc, "path", required=True),  # type: ignore[arg-type]
                    readonly=_get(doc, "readonly", bool, False),
                    serial=serial,
                    cache=_get(doc, "cache", str, "writeback"),
                    discard=_get(doc, "discard", bool, False),
                    format=None if doc.get("format") is None  # type: ignore[arg-type]
                    else _get(doc, "format", str, None))


def _disks(value: object) -> tuple[DiskSpec, ...]:
    return _array(value, "disks", MAX_DISKS, "disks", _disk, _DISK_KEYS)


def _opt_str(doc: dict[str, Any], key: str) -> str | None:
    return None if doc.get(key) is None else _get(doc, key, str, None)  # type: ignore[no-any-return]


def _nic(doc: dict[str, Any]) -> NicSpec:
    kind = _get(doc, "kind", str, None)
    if kind is None:
        raise ConfigError("required", "kind")
    return NicSpec(kind=kind, mac=_opt_str(doc, "mac"), tap=_opt_str(doc, "tap"),
                   bridge=_opt_str(doc, "bridge"), hostfwd=_forwards(doc.get("hostfwd")))


def _nics(value: object) -> tuple[NicSpec, ...]:
    return _array(value, "nics", MAX_NICS, "NICs", _nic, _NIC_KEYS)


def _forward(doc: dict[str, Any]) -> PortForward:
    for key in ("proto", "host_port", "guest_port"):
        if key not in doc:
            raise ConfigError("required", key)
    return PortForward(proto=_get(doc, "proto", str, "tcp"),
                       host_port=_get(doc, "host_port", int, 0),
                       guest_port=_get(doc, "guest_port", int, 0),
                       host_addr=_get(doc, "host_addr", str, ""))


def _forwards(value: object) -> tuple[PortForward, ...]:
    return _array(value, "hostfwd", MAX_FORWARDS, "port forwards", _forward, _FORWARD_KEYS)


def _vsock(value: object) -> VsockSpec | None:
    if value is None:
        return None
    doc = _obj(value, "vsock", _VSOCK_KEYS)
    try:
        cid = _get(doc, "cid", int, None)
        if cid is None:
            raise ConfigError("required", "cid")
        path = _path(doc, "path", required=True)
        assert path is not None
        return VsockSpec(cid, path)
    except ConfigError as exc:
        raise exc.within("vsock") from None


# ---- the host: files, RAM


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


def check_host(config: VmConfig) -> None:
    """What ``config`` asks of this host, checked without opening, creating or
    writing anything: the kernel and initrd are readable regular files, the
    memory fits in the host's RAM, the console file can be created, each disk is
    a regular file or block device openable as asked and none is given twice
    (by identity: a hard link or a second device node is the same disk). The
    files are checked again when opened (``VmResources``): this is where the
    user hears about them first, in one place."""
    _check_boot_file(config.kernel, "kernel")
    if config.initrd is not None:
        _check_boot_file(config.initrd, "initrd")
    host = host_memory_bytes()
    if config.memory > host:
        raise ConfigError(f"{_human(config.memory)} is more than the host's "
                          f"{_human(host)} of RAM", "memory")
    if config.console.kind == "file" and config.console.path is not None:
        _check_console_file(config.console.path, "console.path")
    if config.console.kind == "socket" and config.console.path is not None:
        _check_socket_path(config.console.path, "console.path")
    seen: dict[FileIdentity, int] = {}
    for i, d in enumerate(config.disks):
        where = f"disks[{i}].path"
        h = handed.get(os.path.abspath(d.path)) if handed else None
        try:  # a handed file: its fd (the path may not be ours to open, or even gone)
            st = os.stat(d.path) if h is None else os.fstat(h.fd)
        except OSError as exc:
            raise ConfigError(f"{d.path}: {_why(exc)}", where) from None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):  # a FIFO would block open()
            raise ConfigError(f"{d.path} is {describe_mode(st.st_mode)}, "
                              "not a regular file or block device", where)
        if h is None and not os.access(d.path, os.R_OK if d.readonly else os.R_OK | os.W_OK):
            raise ConfigError(f"{d.path}: permission denied"
                              + ("" if d.readonly else " (read-only access needs readonly)"),
                              where)
        ident = identity(st)
        if ident in seen:
            raise ConfigError(f"{d.path}: the same image as disks[{seen[ident]}].path", where)
        seen[ident] = i
    for i, nic in enumerate(config.nics):
        if nic.kind == "user":
            import shutil

            if shutil.which("passt") is None:
                raise ConfigError("user-mode networking needs passt, which is not installed "
                                  "(Debian package passt)", f"nics[{i}]")
    if config.vsock is not None:
        _check_socket_path(config.vsock.path, "vsock.path")


def _check_socket_path(path: Path, name: str) -> None:
    """A Unix socket can be created at ``path`` (an old socket file there is replaced
    when nobody listens on it: ``bind_listener``)."""
    parent = path.parent
    if not parent.is_dir():
        raise ConfigError(f"{path}: directory {parent} does not exist", name)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{path}: cannot create a socket in {parent}: permission denied",
                          name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"{path}: {_why(exc)}", name) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} is {describe_mode(st.st_mode)}, not a socket (refusing to "
                          "replace it)", name)


def _why(exc: OSError) -> str:
    return "no such file" if exc.errno == errno.ENOENT else exc.strerror or str(exc)


def _check_boot_file(path: Path, name: str) -> None:
    if handed and is_handed(path):
        return  # checked as its handed fd when opened (the path may not be ours to open)
    try:
        kind = os.stat(path).st_mode
    except OSError as exc:
        raise ConfigError(f"{path}: {_why(exc)}", name) from None
    if not stat.S_ISREG(kind):
        raise ConfigError(f"{path} is {describe_mode(kind)}, not a regular file", name)
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{path}: permission denied", name)


def _check_console_file(path: Path, name: str) -> None:
    """What can be told without creating or truncating anything (that waits until
    everything else is checked: see ``Console.open``)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        parent = path.parent
        if not parent.is_dir():
            raise ConfigError(f"{path}: directory {parent} does not exist", name) from None
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"{path}: cannot create a file in {parent}: permission denied",
                              name) from None
        return
    except OSError as exc:
        raise ConfigError(f"{path}: {_why(exc)}", name) from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path} is {describe_mode(st.st_mode)}, not a regular file", name)
    if not os.access(path, os.W_OK):
        raise ConfigError(f"{path}: permission denied", name)


def _human(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n / (1 << 30):.1f}G"


# ---- the CLI's parsers: they name the flags (they are the command line's)

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def _parse_size(text: str) -> int | None:
    m = _SIZE_RE.match(text)
    if not m or len(m.group(1)) > 30:  # 10^30 bytes is far beyond any RAM; bounds int()
        return None
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def parse_size(text: str, *, what: str = "--memory") -> int:
    """Parse '512M', '2G', '1GiB', '2048' (MiB, as QEMU's -m) into bytes."""
    n = _parse_size(text)
    if n is None:
        raise ConfigError(
            f"{what} {text!r}: not a size (use a number with an optional K, M, G or T suffix)")
    return n


def parse_console(text: str) -> ConsoleSpec:
    """``--console stdio|virtio|none|file:PATH|socket:PATH`` (the file or socket
    directory is looked at by ``check_host``)."""
    if text in ("stdio", "none", "virtio"):
        return ConsoleSpec(text)  # type: ignore[arg-type]
    for kind in ("file", "socket"):
        if text.startswith(f"{kind}:") and len(text) > len(kind) + 1:
            try:
                return ConsoleSpec(kind, Path(text[len(kind) + 1:]))  # type: ignore[arg-type]
            except ConfigError as exc:
                raise ConfigError(f"--console {text}: {exc.detail}") from None
    raise ConfigError(f"--console {text!r}: expected stdio, virtio, none, file:PATH or "
                      "socket:PATH")


def _onoff(key: str, value: str, spec: str) -> bool:
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise ConfigError(f"--disk {spec}: {key}={value!r} must be on or off")


def parse_disk(spec: str) -> DiskSpec:
    """``path=FILE[,format=raw|qcow2][,readonly=on][,serial=ID][,cache=none|writeback]
    [,discard=on]`` (a bare ``FILE`` also works). The file is looked at by ``check_host``."""
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
    unknown = set(opts) - set(_DISK_KEYS)
    if unknown:
        raise ConfigError(f"--disk {spec}: unknown option {sorted(unknown)[0]!r} "
                          "(expected path, format, readonly, serial, cache, discard)")
    if not opts.get("path"):
        raise ConfigError(f"--disk {spec}: path=FILE is required")
    cache = opts.get("cache", "writeback")
    if cache not in get_args(CacheMode):
        raise ConfigError(f"--disk {spec}: cache={cache!r} must be none or writeback")
    fmt = opts.get("format")
    if fmt is not None and fmt not in get_args(DiskFormat):
        raise ConfigError(f"--disk {spec}: format={fmt!r} must be raw or qcow2")
    try:
        return DiskSpec(Path(opts["path"]), _onoff("readonly", opts.get("readonly", "off"), spec),
                        opts.get("serial"), cache,  # type: ignore[arg-type]
                        _onoff("discard", opts.get("discard", "off"), spec),
                        fmt)  # type: ignore[arg-type]
    except ConfigError as exc:  # DiskSpec names its field: here the option is the key
        raise ConfigError(f"--disk {spec}: {exc.detail}" if exc.field == "path" else
                          f"--disk {spec}: {exc.field} {exc.detail}") from None


def _options(flag: str, spec: str, *, text: str | None = None,
             repeatable: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """``a=1,b=2`` (``text``, by default the whole ``spec``) as pairs; a key given
    twice is refused unless ``repeatable``. Errors quote the whole ``spec``."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for part in (spec if text is None else text).split(","):
        key, eq, value = part.partition("=")
        if not eq:
            raise ConfigError(f"{flag} {spec}: {part!r} is not key=value")
        if key in seen and key not in repeatable:
            raise ConfigError(f"{flag} {spec}: {key} given twice")
        seen.add(key)
        out.append((key, value))
    return out


_HOSTFWD_RE = re.compile(r"^(tcp|udp)?:([^:]*):(\d{1,5})-([^:]*):(\d{1,5})$")


def parse_hostfwd(text: str, spec: str) -> PortForward:
    """QEMU's ``[tcp|udp]:[HOSTADDR]:HOSTPORT-:GUESTPORT`` (the guest address is the
    guest's own: left empty)."""
    m = _HOSTFWD_RE.match(text)
    if not m:
        raise ConfigError(f"--net {spec}: hostfwd={text!r}: expected "
                          "[tcp|udp]:[HOSTADDR]:HOSTPORT-:GUESTPORT")
    proto, host_addr, host_port, guest_addr, guest_port = m.groups()
    if guest_addr:
        raise ConfigError(f"--net {spec}: hostfwd={text}: the guest address cannot be chosen "
                          "(leave it empty: tcp::8080-:80)")
    try:
        return PortForward(proto or "tcp", int(host_port), int(guest_port),  # type: ignore[arg-type]
                           host_addr)
    except ConfigError as exc:
        raise ConfigError(f"--net {spec}: hostfwd={text}: {exc.detail}") from None


def parse_net(spec: str) -> NicSpec | None:
    """``--net user[,mac=MAC][,hostfwd=...]...``, ``--net tap=NAME[,mac=MAC][,bridge=BR]``
    or ``--net none`` (None)."""
    if spec == "none":
        return None
    head, _, rest = spec.partition(",")
    opts = _options("--net", spec, text=rest, repeatable=("hostfwd",)) if rest else []
    if head == "user":
        allowed: tuple[str, ...] = ("mac", "hostfwd")
        kind, tap = "user", None
    elif head.startswith("tap="):
        allowed = ("mac", "bridge")
        kind, tap = "tap", head[4:]
    else:
        raise ConfigError(f"--net {spec}: expected user[,...], tap=NAME[,...] or none")
    for key, _ in opts:
        if key not in allowed:
            raise ConfigError(f"--net {spec}: unknown option {key!r} for a {kind} NIC "
                              f"(expected {' or '.join(allowed)})")
    values = dict(opts)
    forwards = tuple(parse_hostfwd(v, spec) for k, v in opts if k == "hostfwd")
    try:
        return NicSpec(kind, mac=values.get("mac"), tap=tap,  # type: ignore[arg-type]
                       bridge=values.get("bridge"), hostfwd=forwards)
    except ConfigError as exc:
        raise ConfigError(f"--net {spec}: {exc.field or kind} {exc.detail}"
                          if exc.field not in (None, "tap") else
                          f"--net {spec}: {exc.detail}") from None


def parse_vsock(spec: str) -> VsockSpec:
    """``--vsock cid=N,path=PATH``."""
    opts = dict(_options("--vsock", spec))
    unknown = set(opts) - {"cid", "path"}
    if unknown:
        raise ConfigError(f"--vsock {spec}: unknown option {sorted(unknown)[0]!r} "
                          "(expected cid and path)")
    if "cid" not in opts or not opts.get("path"):
        raise ConfigError(f"--vsock {spec}: cid=N and path=PATH are required")
    if not opts["cid"].isdigit() or len(opts["cid"]) > 10:
        raise ConfigError(f"--vsock {spec}: cid={opts['cid']!r} is not a number")
    try:
        return VsockSpec(int(opts["cid"]), Path(opts["path"]))
    except ConfigError as exc:
        raise ConfigError(f"--vsock {spec}: {exc.field} {exc.detail}") from None
