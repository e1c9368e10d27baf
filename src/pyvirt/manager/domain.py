"""Domain definitions: the document a user defines a VM with, checked, and
resolved into the ``VmConfig`` a VMM runs.

A definition is ``VmConfig``'s document (same keys, meanings and defaults)
plus ``name`` (required), ``uuid``, ``description`` and ``autostart``, except:

- ``kernel`` absent: the default guest (kernel and initrd), found at start;
- ``console`` is refused: the daemon owns the console (a socket);
- a disk may be ``{"volume": "POOL/VOL", ...}``: path and format from the pool;
- a NIC may be ``{"network": "NAME", "mac": ...}``: a TAP on that network's
  bridge, made by the daemon at start.

Values are checked by building the ``VmConfig`` the definition would resolve
to (placeholders stand in for volumes and networks), so errors name fields
exactly as ``VmConfig`` does (``disks[1].serial: ...``). Pure: no file, pool or
network is looked at here (``resolve`` takes lookups from the Manager).
"""

from __future__ import annotations

import re
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyvirt.manager.errors import InvalidArgument, ManagerError
from pyvirt.vmm.config import ConfigError, VmConfig

__all__ = ["Definition", "DiskDef", "NicDef", "disk_target", "load_definition_text",
           "parse_definition", "resolve"]

_META_KEYS = ("name", "uuid", "description", "autostart")
#: the VmConfig keys a definition may hold (console: the daemon's; verbose: off)
_CONFIG_KEYS = ("kernel", "initrd", "cmdline", "cpus", "memory", "accel", "on_reboot",
                "rng", "sandbox", "vsock", "disks", "nics")
_VOLUME_DISK_KEYS = ("volume", "readonly", "serial", "cache", "discard")
_NETWORK_NIC_KEYS = ("network", "mac")
_VOLUME_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]{0,127})/([A-Za-z0-9][A-Za-z0-9._-]{0,127})$")
_NETWORK_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MAX_DESCRIPTION = 4096
#: placeholders for the value check: never opened (parse is pure)
_PLACEHOLDER_KERNEL = "/nonexistent/default-guest/vmlinuz"


@dataclass(frozen=True)
class DiskDef:
    """One disk: ``volume`` "POOL/VOL", or None with ``spec["path"]``; ``spec``
    holds the other VmConfig disk keys as given."""

    volume: str | None
    spec: dict[str, Any]

    def to_doc(self) -> dict[str, Any]:
        return ({"volume": self.volume, **self.spec} if self.volume is not None
                else dict(self.spec))


@dataclass(frozen=True)
class NicDef:
    """One NIC: ``network`` NAME (``spec`` then holds at most ``mac``), or None with
    VmConfig's NIC document in ``spec``."""

    network: str | None
    spec: dict[str, Any]

    def to_doc(self) -> dict[str, Any]:
        return ({"network": self.network, **self.spec} if self.network is not None
                else dict(self.spec))


@dataclass(frozen=True)
class Definition:
    name: str
    uuid: str
    description: str = ""
    autostart: bool = False
    #: the VmConfig keys other than disks and nics, as given (memory in bytes)
    config: dict[str, Any] = field(default_factory=dict)
    disks: tuple[DiskDef, ...] = ()
    nics: tuple[NicDef, ...] = ()
    #: the values checked: the config this resolves to with placeholders
    checked: VmConfig | None = field(default=None, compare=False, repr=False)

    @property
    def memory(self) -> int:
        return self.checked.memory if self.checked is not None else int(self.config["memory"])

    @property
    def cpus(self) -> int:
        return self.checked.cpus if self.checked is not None else int(self.config.get("cpus", 1))

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "uuid": self.uuid,
                               "description": self.description, "autostart": self.autostart}
        doc.update(self.config)
        doc["disks"] = [d.to_doc() for d in self.disks]
        doc["nics"] = [n.to_doc() for n in self.nics]
        return doc

    def nic_macs(self) -> list[str]:
        """The MAC of each NIC (derived from the name where not given, as VmConfig does)."""
        assert self.checked is not None
        return [str(n.mac) for n in self.checked.nics]


def disk_target(index: int) -> str:
    """The guest's name of disk ``index``: vda, vdb, ..., vdz, vdaa."""
    letters = ""
    n = index
    while True:
        letters = chr(ord("a") + n % 26) + letters
        n = n // 26 - 1
        if n < 0:
            return "vd" + letters


def _invalid(exc: ConfigError) -> InvalidArgument:
    return InvalidArgument(exc.detail, exc.field)


def load_definition_text(text: str | bytes, *, what: str = "definition") -> object:
    """A JSON (or YAML) document decoded; InvalidArgument when it is neither."""
    from pyvirt.vmm.config import MAX_DOCUMENT

    if len(text) > MAX_DOCUMENT:
        raise InvalidArgument(f"{what}: larger than {MAX_DOCUMENT >> 20} MiB")
    import json

    try:
        return json.loads(text)
    except ValueError as json_exc:
        try:
            import yaml  # type: ignore[import-untyped, unused-ignore]
        except ImportError:
            raise InvalidArgument(f"{what}: not JSON ({json_exc})") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InvalidArgument(f"{what}: neither JSON nor YAML "
                                  f"({str(exc).splitlines()[0]})") from None


def parse_definition(doc: object) -> Definition:
    """The definition ``doc`` (a decoded JSON/YAML document), every value checked."""
    if not isinstance(doc, dict):
        raise InvalidArgument("a definition is an object (a mapping of fields)")
    for key in doc:
        if not isinstance(key, str) or key not in (*_META_KEYS, *_CONFIG_KEYS):
            if key == "console":
                raise InvalidArgument("not accepted: the daemon owns the console (serial "
                                      "ttyS0 on a socket; use the console verb)", "console")
            if key == "verbose":
                raise InvalidArgument("not accepted by the daemon", "verbose")
            raise InvalidArgument("unknown field", str(key)[:64])
    name = doc.get("name")
    if name is None:
        raise InvalidArgument("required", "name")
    if not isinstance(name, str):
        raise InvalidArgument("expected a string", "name")
    uid = doc.get("uuid")
    if uid is None:
        uid = str(uuidlib.uuid4())
    elif not isinstance(uid, str):
        raise InvalidArgument("expected a string", "uuid")
    else:
        try:
            uid = str(uuidlib.UUID(uid))
        except ValueError:
            raise InvalidArgument(f"{uid[:60]!r} is not a UUID", "uuid") from None
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise InvalidArgument("expected a string", "description")
    if len(description) > _MAX_DESCRIPTION or "\0" in description:
        raise InvalidArgument(f"at most {_MAX_DESCRIPTION} characters, no NUL", "description")
    autostart = doc.get("autostart", False)
    if type(autostart) is not bool:
        raise InvalidArgument("expected true or false", "autostart")
    config = {k: doc[k] for k in _CONFIG_KEYS if k in doc and k not in ("disks", "nics")}
    disks = _disk_defs(doc.get("disks"))
    nics = _nic_defs(doc.get("nics"))
    probe = dict(config)
    probe.setdefault("kernel", _PLACEHOLDER_KERNEL)
    probe["name"] = name
    probe["console"] = {"kind": "none"}
    probe["disks"] = [d.spec if d.volume is None else
                      {"path": f"/nonexistent/volume/{d.volume}", **d.spec} for d in disks]
    probe["nics"] = [n.spec if n.network is None else {"kind": "user", **n.spec} for n in nics]
    try:
        checked = VmConfig.from_dict(probe)
    except ConfigError as exc:
        raise _invalid(exc) from None
    config["memory"] = checked.memory  # a size string stored as bytes
    return Definition(name=name, uuid=uid, description=description, autostart=autostart,
                      config=config, disks=disks, nics=nics, checked=checked)


def _array(value: object, where: str) -> list[object]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidArgument("expected an array", where)
    return value


def _disk_defs(value: object) -> tuple[DiskDef, ...]:
    out = []
    items = _array(value, "disks")
    if len(items) > 24:
        raise InvalidArgument(f"at most 24 disks ({len(items)} given)", "disks")
    for i, item in enumerate(items):
        where = f"disks[{i}]"
        if not isinstance(item, dict):
            raise InvalidArgument("expected an object", where)
        if "volume" not in item:
            out.append(DiskDef(None, dict(item)))
            continue
        for key in item:
            if key not in _VOLUME_DISK_KEYS:
                why = ("a volume's path and format come from its pool"
                       if key in ("path", "format") else "unknown field")
                raise InvalidArgument(why, f"{where}.{str(key)[:64]}")
        vol = item["volume"]
        if not isinstance(vol, str) or not _VOLUME_RE.fullmatch(vol):
            shown = repr(vol[:60]) if isinstance(vol, str) else "this"
            raise InvalidArgument(f"{shown} is not POOL/VOLUME (letters, digits, '.', '_', '-')",
                                  f"{where}.volume")
        out.append(DiskDef(vol, {k: v for k, v in item.items() if k != "volume"}))
    return tuple(out)


def _nic_defs(value: object) -> tuple[NicDef, ...]:
    out = []
    items = _array(value, "nics")
    if len(items) > 8:
        raise InvalidArgument(f"at most 8 NICs ({len(items)} given)", "nics")
    for i, item in enumerate(items):
        where = f"nics[{i}]"
        if not isinstance(item, dict):
            raise InvalidArgument("expected an object", where)
        if "network" not in item:
            out.append(NicDef(None, dict(item)))
            continue
        for key in item:
            if key not in _NETWORK_NIC_KEYS:
                raise InvalidArgument("unknown field (a network NIC has network and mac)",
                                      f"{where}.{str(key)[:64]}")
        net = item["network"]
        if not isinstance(net, str) or not _NETWORK_RE.fullmatch(net):
            raise InvalidArgument("not a network name", f"{where}.network")
        out.append(NicDef(net, {k: v for k, v in item.items() if k != "network"}))
    return tuple(out)


#: (pool, volume) -> (path, format); raises ManagerError (NotFound) when there is none
VolumeLookup = Callable[[str, str], tuple[Path, str]]


def resolve(defn: Definition, *, console: Path | None,
            volume: VolumeLookup | None = None,
            default_guest: Callable[[], tuple[Path, Path]] | None = None,
            taps: dict[int, str] | None = None,
            disk_paths: dict[int, tuple[Path, str]] | None = None) -> VmConfig:
    """The VmConfig ``defn`` runs with: volumes through ``volume``, the default
    guest when no kernel is given, network NICs as the TAPs in ``taps`` (index ->
    interface name; a placeholder user NIC where absent, for a check only), the
    console on the socket ``console`` (None: no console, for a check).
    ``disk_paths`` replaces disks' images (a revert's new overlays)."""
    doc: dict[str, Any] = dict(defn.config)
    doc["name"] = defn.name
    if "kernel" not in doc or doc["kernel"] is None:
        if default_guest is None:
            doc["kernel"] = _PLACEHOLDER_KERNEL
        else:
            kernel, initrd = default_guest()
            doc["kernel"] = str(kernel)
            if doc.get("initrd") is None:
                doc["initrd"] = str(initrd)
    doc["console"] = ({"kind": "none"} if console is None
                      else {"kind": "socket", "path": str(console)})
    disks = []
    for i, d in enumerate(defn.disks):
        spec = dict(d.spec)
        if d.volume is not None:
            pool, _, vol = d.volume.partition("/")
            if volume is None:
                spec["path"] = f"/nonexistent/volume/{d.volume}"
            else:
                try:
                    path, fmt = volume(pool, vol)
                except ManagerError as exc:
                    raise InvalidArgument(exc.message, f"disks[{i}].volume") from None
                spec["path"], spec["format"] = str(path), fmt
        if disk_paths and i in disk_paths:
            spec["path"], spec["format"] = str(disk_paths[i][0]), disk_paths[i][1]
        disks.append(spec)
    doc["disks"] = disks
    macs = defn.nic_macs() if defn.checked is not None else [None] * len(defn.nics)
    nics = []
    for i, n in enumerate(defn.nics):
        if n.network is None:
            nics.append(dict(n.spec))
        elif taps is not None and i in taps:
            nics.append({"kind": "tap", "tap": taps[i], "mac": macs[i]})
        else:
            nics.append({"kind": "user", "mac": macs[i]})
    doc["nics"] = nics
    try:
        return VmConfig.from_dict(doc)
    except ConfigError as exc:
        raise _invalid(exc) from None
