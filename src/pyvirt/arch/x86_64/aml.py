"""A small typed encoder for ACPI Machine Language (AML).

Just enough of ACPI 6.3 section 20 ("ACPI Machine Language Specification") to
describe a virtual platform: name strings, integer/string/buffer/package data
objects, ``Name``, ``Scope``, ``Device``, ``Method`` + ``Return``, EISA IDs,
and resource templates (section 6.4 "Resource Data Types for ACPI").

Every node is an immutable object with ``encode() -> bytes``; a definition
block is just a list of nodes, so a caller can append (say) a PCI host bridge
with a ``_PRT`` without touching the encoder.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeAlias

__all__ = [
    "AmlNode",
    "AmlValue",
    "Buffer",
    "DWordMemory",
    "Device",
    "EisaId",
    "Integer",
    "IoPort",
    "IrqNoFlags",
    "Memory32Fixed",
    "Method",
    "Name",
    "NameString",
    "Package",
    "QWordMemory",
    "ResourceDescriptor",
    "ResourceTemplate",
    "Return",
    "Scope",
    "String",
    "WordBusNumber",
    "WordIo",
    "eisa_id",
    "encode_integer",
    "encode_name_string",
    "encode_pkg_length",
]

# Opcodes, ACPI 6.3 section 20.2 (AML Grammar Definition).
_ZERO_OP = 0x00
_ONE_OP = 0x01
_NAME_OP = 0x08
_BYTE_PREFIX = 0x0A
_WORD_PREFIX = 0x0B
_DWORD_PREFIX = 0x0C
_STRING_PREFIX = 0x0D
_QWORD_PREFIX = 0x0E
_SCOPE_OP = 0x10
_BUFFER_OP = 0x11
_PACKAGE_OP = 0x12
_VAR_PACKAGE_OP = 0x13
_METHOD_OP = 0x14
_DUAL_NAME_PREFIX = 0x2E
_MULTI_NAME_PREFIX = 0x2F
_EXT_OP_PREFIX = 0x5B
_DEVICE_OP = 0x82  # after ExtOpPrefix
_ROOT_CHAR = 0x5C  # '\'
_PARENT_PREFIX = 0x5E  # '^'
_RETURN_OP = 0xA4
_ONES_OP = 0xFF

_U64_MAX = (1 << 64) - 1
_NAME_SEG_RE = re.compile(r"^[A-Z_][A-Z0-9_]{0,3}$")


class AmlNode(Protocol):
    """Anything that encodes to AML bytes (a TermObj or DataRefObject)."""

    def encode(self) -> bytes: ...


#: Python values accepted where AML expects a data object.
AmlValue: TypeAlias = "AmlNode | int | str | bytes"


def encode_pkg_length(content_len: int) -> bytes:
    """PkgLength for ``content_len`` bytes following it (section 20.2.4).

    The encoded length counts the PkgLength bytes themselves. One byte holds
    up to 63 (bits 5:0); otherwise bits 7:6 of the lead byte give the number
    of following bytes (1-3), bits 3:0 the low nibble, and each following
    byte the next 8 bits.
    """
    if content_len < 0:
        raise ValueError("negative package length")
    if content_len + 1 <= 0x3F:
        return bytes([content_len + 1])
    for extra in (1, 2, 3):
        total = content_len + 1 + extra
        if total < 1 << (4 + 8 * extra):
            lead = (extra << 6) | (total & 0x0F)
            rest = (total >> 4).to_bytes(extra, "little")
            return bytes([lead]) + rest
    raise ValueError(f"AML package too large: {content_len} bytes")


def _name_seg(seg: str) -> bytes:
    """One 4-character NameSeg, padded with '_' (section 20.2.2)."""
    if not _NAME_SEG_RE.match(seg):
        raise ValueError(f"invalid AML name segment {seg!r}")
    return seg.ljust(4, "_").encode("ascii")


def encode_name_string(name: str) -> bytes:
    r"""NameString: optional '\' or '^'s, then a NamePath (section 20.2.2).

    ``"\\_SB.COM1"`` -> RootChar DualNamePrefix '_SB_' 'COM1'.
    """
    prefix = b""
    rest = name
    if rest.startswith("\\"):
        prefix = bytes([_ROOT_CHAR])
        rest = rest[1:]
    else:
        while rest.startswith("^"):
            prefix += bytes([_PARENT_PREFIX])
            rest = rest[1:]
    if not rest:
        return prefix + b"\x00"  # NullName
    segs = [_name_seg(s) for s in rest.split(".")]
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([_DUAL_NAME_PREFIX]) + segs[0] + segs[1]
    if len(segs) > 255:
        raise ValueError(f"AML name path too long: {name!r}")
    return prefix + bytes([_MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


def encode_integer(value: int) -> bytes:
    """The shortest ComputationalData encoding of ``value`` (section 20.2.3).

    Zero/One/Ones are single opcodes; OnesOp means all ones in a revision 2+
    definition block (64-bit integers), which is what we build.
    """
    if not 0 <= value <= _U64_MAX:
        raise ValueError(f"AML integer out of range: {value}")
    if value == 0:
        return bytes([_ZERO_OP])
    if value == 1:
        return bytes([_ONE_OP])
    if value == _U64_MAX:
        return bytes([_ONES_OP])
    if value <= 0xFF:
        return bytes([_BYTE_PREFIX, value])
    if value <= 0xFFFF:
        return bytes([_WORD_PREFIX]) + value.to_bytes(2, "little")
    if value <= 0xFFFF_FFFF:
        return bytes([_DWORD_PREFIX]) + value.to_bytes(4, "little")
    return bytes([_QWORD_PREFIX]) + value.to_bytes(8, "little")


def eisa_id(text: str) -> int:
    """Compress a 7-character EISA/PNP ID like "PNP0501" (section 6.1.5, _HID).

    Three uppercase letters are packed 5 bits each (letter - 0x40) into a
    16-bit manufacturer code, followed by a 16-bit product number from four
    hex digits; the 32-bit result is stored big-endian, so as a little-endian
    AML DWord its bytes are swapped.
    """
    if len(text) != 7 or not text[:3].isalpha() or not text[:3].isupper():
        raise ValueError(f"invalid EISA id {text!r}")
    try:
        product = int(text[3:], 16)
    except ValueError:
        raise ValueError(f"invalid EISA id {text!r}") from None
    vendor = 0
    for ch in text[:3]:
        vendor = (vendor << 5) | (ord(ch) - 0x40)
    big_endian = (vendor << 16) | product
    return int.from_bytes(big_endian.to_bytes(4, "big"), "little")


def _encode_value(value: AmlValue) -> bytes:
    if isinstance(value, bool):
        raise TypeError("use an int, not a bool, for AML integers")
    if isinstance(value, int):
        return encode_integer(value)
    if isinstance(value, str):
        return String(value).encode()
    if isinstance(value, bytes):
        return Buffer(value).encode()
    return value.encode()


def _encode_all(nodes: Iterable[AmlNode]) -> bytes:
    return b"".join(n.encode() for n in nodes)


@dataclass(frozen=True)
class Integer:
    value: int

    def encode(self) -> bytes:
        return encode_integer(self.value)


@dataclass(frozen=True)
class EisaId:
    """``EISAID("PNP0501")``: always a DWord, as iasl emits it for _HID/_CID."""

    text: str

    def encode(self) -> bytes:
        return bytes([_DWORD_PREFIX]) + eisa_id(self.text).to_bytes(4, "little")


@dataclass(frozen=True)
class String:
    value: str

    def encode(self) -> bytes:
        raw = self.value.encode("ascii")
        # AsciiCharList excludes NUL: it terminates the string (section 20.2.3).
        if b"\x00" in raw:
            raise ValueError("AML strings cannot contain NUL")
        return bytes([_STRING_PREFIX]) + raw + b"\x00"


@dataclass(frozen=True)
class NameString:
    """A reference to a named object, used as a package element or return value."""

    name: str

    def encode(self) -> bytes:
        return encode_name_string(self.name)


@dataclass(frozen=True)
class Buffer:
    """DefBuffer := BufferOp PkgLength BufferSize ByteList (section 20.2.5.4)."""

    data: bytes

    def encode(self) -> bytes:
        body = encode_integer(len(self.data)) + self.data
        return bytes([_BUFFER_OP]) + encode_pkg_length(len(body)) + body


@dataclass(frozen=True)
class Package:
    """DefPackage (<= 255 elements) or DefVarPackage (section 20.2.5.4)."""

    elements: Sequence[AmlValue]

    def encode(self) -> bytes:
        items = b"".join(_encode_value(e) for e in self.elements)
        n = len(self.elements)
        if n <= 0xFF:
            body = bytes([n]) + items
            return bytes([_PACKAGE_OP]) + encode_pkg_length(len(body)) + body
        body = encode_integer(n) + items
        return bytes([_VAR_PACKAGE_OP]) + encode_pkg_length(len(body)) + body


@dataclass(frozen=True)
class Name:
    """DefName := NameOp NameString DataRefObject (section 20.2.5.1)."""

    name: str
    value: AmlValue

    def encode(self) -> bytes:
        return bytes([_NAME_OP]) + encode_name_string(self.name) + _encode_value(self.value)


@dataclass(frozen=True)
class Scope:
    """DefScope := ScopeOp PkgLength NameString TermList (section 20.2.5.1)."""

    name: str
    body: Sequence[AmlNode] = ()

    def encode(self) -> bytes:
        inner = encode_name_string(self.name) + _encode_all(self.body)
        return bytes([_SCOPE_OP]) + encode_pkg_length(len(inner)) + inner


@dataclass(frozen=True)
class Device:
    """DefDevice := DeviceOp PkgLength NameString TermList (section 20.2.5.2)."""

    name: str
    body: Sequence[AmlNode] = ()

    def encode(self) -> bytes:
        inner = encode_name_string(self.name) + _encode_all(self.body)
        return bytes([_EXT_OP_PREFIX, _DEVICE_OP]) + encode_pkg_length(len(inner)) + inner


@dataclass(frozen=True)
class Return:
    """DefReturn := ReturnOp ArgObject (section 20.2.5.3)."""

    value: AmlValue

    def encode(self) -> bytes:
        return bytes([_RETURN_OP]) + _encode_value(self.value)


@dataclass(frozen=True)
class Method:
    """DefMethod := MethodOp PkgLength NameString MethodFlags TermList (20.2.5.2).

    MethodFlags: bits 2:0 ArgCount, bit 3 SerializeFlag, bits 7:4 SyncLevel.
    """

    name: str
    body: Sequence[AmlNode] = ()
    arg_count: int = 0
    serialized: bool = False

    def encode(self) -> bytes:
        if not 0 <= self.arg_count <= 7:
            raise ValueError("AML methods take 0-7 arguments")
        flags = self.arg_count | (0x08 if self.serialized else 0)
        inner = encode_name_string(self.name) + bytes([flags]) + _encode_all(self.body)
        return bytes([_METHOD_OP]) + encode_pkg_length(len(inner)) + inner


# --- resource descriptors (ACPI 6.3 section 6.4) --------------------------------


class ResourceDescriptor(Protocol):
    def descriptor(self) -> bytes: ...


@dataclass(frozen=True)
class IoPort:
    """I/O Port Descriptor, small item name 0x08, length 7 (section 6.4.2.5).

    ``IO (Decode16, minimum, maximum, alignment, length)``.
    """

    minimum: int
    maximum: int | None = None  # defaults to minimum: a fixed location
    alignment: int = 1
    length: int = 1
    decode16: bool = True

    def descriptor(self) -> bytes:
        maximum = self.minimum if self.maximum is None else self.maximum
        for v in (self.minimum, maximum):
            if not 0 <= v <= 0xFFFF:
                raise ValueError(f"I/O port {v:#x} out of range")
        if not (0 <= self.alignment <= 0xFF and 0 <= self.length <= 0xFF):
            raise ValueError("I/O descriptor alignment/length must fit a byte")
        return (bytes([0x47, 1 if self.decode16 else 0])
                + self.minimum.to_bytes(2, "little") + maximum.to_bytes(2, "little")
                + bytes([self.alignment, self.length]))


@dataclass(frozen=True)
class IrqNoFlags:
    """IRQ Descriptor without the information byte: small item 0x04, length 2
    (section 6.4.2.1). Means edge-triggered, active-high, exclusive (ISA)."""

    irqs: Sequence[int]

    def descriptor(self) -> bytes:
        mask = 0
        for irq in self.irqs:
            if not 0 <= irq <= 15:
                raise ValueError(f"ISA IRQ {irq} out of range")
            mask |= 1 << irq
        return bytes([0x22]) + mask.to_bytes(2, "little")


@dataclass(frozen=True)
class Memory32Fixed:
    """32-bit Fixed Memory Range Descriptor: large item 0x86, length 9 (6.4.3.4)."""

    base: int
    length: int
    writable: bool = True

    def descriptor(self) -> bytes:
        if not (0 <= self.base <= 0xFFFF_FFFF and 0 <= self.length <= 0xFFFF_FFFF):
            raise ValueError("Memory32Fixed base/length must fit 32 bits")
        return (bytes([0x86, 9, 0, 1 if self.writable else 0])
                + struct.pack("<II", self.base, self.length))


# Address space descriptors (section 6.4.3.5): resource types and their flags.
_RT_MEMORY = 0
_RT_IO = 1
_RT_BUS = 2
# general flags: bit 3 MaxAddressFixed, bit 2 MinAddressFixed, bit 1 Decode (0 = positive)
_GF_FIXED = 0x0C
_GF_PRODUCER = 0x00  # bit 0 clear: this device produces (bridges) the range


def _address_space(item: int, width: int, rtype: int, type_flags: int,
                   minimum: int, length: int) -> bytes:
    maximum = minimum + length - 1
    limit = (1 << (8 * width)) - 1
    if length <= 0 or minimum < 0 or maximum > limit:
        raise ValueError(f"address range {minimum:#x}+{length:#x} does not fit {width} bytes")
    fmt = {2: "<HHHHH", 4: "<IIIII", 8: "<QQQQQ"}[width]
    # granularity, minimum, maximum, translation offset, length
    body = bytes([rtype, _GF_FIXED | _GF_PRODUCER, type_flags]) + struct.pack(
        fmt, 0, minimum, maximum, 0, length)
    return bytes([item]) + len(body).to_bytes(2, "little") + body


@dataclass(frozen=True)
class WordBusNumber:
    """WordBusNumber (section 6.4.3.5.3): the bus numbers a host bridge decodes."""

    minimum: int
    length: int

    def descriptor(self) -> bytes:
        return _address_space(0x88, 2, _RT_BUS, 0, self.minimum, self.length)


@dataclass(frozen=True)
class WordIo:
    """WordIO (section 6.4.3.5.3): an I/O port window (ISA and non-ISA ranges)."""

    minimum: int
    length: int

    def descriptor(self) -> bytes:
        return _address_space(0x88, 2, _RT_IO, 0x03, self.minimum, self.length)


def _mem_type_flags(cacheable: bool, prefetchable: bool) -> int:
    # bit 0 read-write; bits 2:1 memory attributes: 0 non-cacheable, 1 cacheable,
    # 3 prefetchable
    attrs = 3 if prefetchable else (1 if cacheable else 0)
    return 0x01 | (attrs << 1)


@dataclass(frozen=True)
class DWordMemory:
    """DWordMemory (section 6.4.3.5.2): a 32-bit memory window."""

    minimum: int
    length: int
    cacheable: bool = False
    prefetchable: bool = False

    def descriptor(self) -> bytes:
        return _address_space(0x87, 4, _RT_MEMORY,
                              _mem_type_flags(self.cacheable, self.prefetchable),
                              self.minimum, self.length)


@dataclass(frozen=True)
class QWordMemory:
    """QWordMemory (section 6.4.3.5.1): a 64-bit memory window."""

    minimum: int
    length: int
    cacheable: bool = False
    prefetchable: bool = False

    def descriptor(self) -> bytes:
        return _address_space(0x8A, 8, _RT_MEMORY,
                              _mem_type_flags(self.cacheable, self.prefetchable),
                              self.minimum, self.length)


@dataclass(frozen=True)
class ResourceTemplate:
    """A Buffer of resource descriptors closed by an End Tag (section 6.4.2.9).

    The End Tag checksum byte is 0, which the spec defines as "treat the
    checksum as valid".
    """

    items: Sequence[ResourceDescriptor]

    def encode(self) -> bytes:
        data = b"".join(i.descriptor() for i in self.items) + bytes([0x79, 0x00])
        return Buffer(data).encode()
