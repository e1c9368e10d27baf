"""MAC addresses of the VM's NICs.

A NIC without a configured MAC gets one derived from the VM's identity and
the NIC's index (stable across runs, so the guest's DHCP lease and interface
names stay put), under QEMU's/KVM's OUI 52:54:00; ``random_mac`` is for VMs
without an identity (locally administered, unicast: IEEE 802 bits of the
first octet).
"""

from __future__ import annotations

import hashlib
import os

from pyvirt.errors import UserInputError

__all__ = ["derive_mac", "format_mac", "parse_mac", "random_mac"]

_OUI = b"\x52\x54\x00"
_MULTICAST = 0x01  # I/G bit of the first octet
_LOCAL = 0x02  # U/L bit


def derive_mac(identity: str, index: int) -> bytes:
    """52:54:00 + 3 bytes of sha256(identity, index): the same VM and NIC index
    always get the same address."""
    if index < 0:
        raise ValueError(f"NIC index {index} is negative")
    digest = hashlib.sha256(f"pyvirt-nic\0{identity}\0{index}".encode()).digest()
    return _OUI + digest[:3]


def random_mac() -> bytes:
    """A random locally administered unicast address (never all-zero)."""
    rest = os.urandom(5)
    first = (os.urandom(1)[0] | _LOCAL) & ~_MULTICAST & 0xFF
    return bytes([first]) + rest


def parse_mac(text: str) -> bytes:
    """``aa:bb:cc:dd:ee:ff`` (hex, either case) -> 6 bytes. A NIC's own address
    must be unicast and not all-zero: anything else is one clear
    ``UserInputError`` line."""
    shown = text[:40]
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 and _is_hex(p) for p in parts):
        raise UserInputError(f"{shown!r} is not a MAC address (six hex pairs like "
                             "52:54:00:12:34:56)")
    mac = bytes(int(p, 16) for p in parts)
    if mac[0] & _MULTICAST:
        raise UserInputError(f"{shown!r} is a multicast MAC address; a NIC needs a unicast one "
                             "(an even first octet)")
    if mac == bytes(6):
        raise UserInputError(f"{shown!r}: the all-zero MAC address cannot be a NIC's address")
    return mac


def format_mac(mac: bytes) -> str:
    """6 bytes -> ``52:54:00:12:34:56``."""
    if len(mac) != 6:
        raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
    return ":".join(f"{b:02x}" for b in mac)


def _is_hex(s: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in s)
