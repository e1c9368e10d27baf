"""Building and parsing the few frames the network tests need (Ethernet, ARP,
IPv4, UDP, TCP, DHCP), with real checksums."""

from __future__ import annotations

import socket
import struct

__all__ = ["arp_request", "csum", "dhcp_discover", "eth", "ipv4", "parse_dhcp", "tcp", "udp"]

BROADCAST = b"\xff" * 6


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def eth(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def ipv4(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0x4000, 64, proto, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    return hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:] + payload


def _pseudo(src: str, dst: str, proto: int, length: int) -> bytes:
    return socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, proto, length)


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """An IPv4 packet carrying a UDP datagram."""
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    c = csum(_pseudo(src, dst, 17, len(seg)) + seg) or 0xFFFF
    return ipv4(src, dst, 17, seg[:6] + struct.pack("!H", c) + seg[8:])


def tcp(src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: int,
        payload: bytes = b"", options: bytes = b"", window: int = 65535) -> bytes:
    """An IPv4 packet carrying a TCP segment (flags: 0x02 SYN, 0x10 ACK, 0x12 SYN-ACK)."""
    off = (20 + len(options)) // 4
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, off << 4, flags, window, 0, 0)
    seg += options + payload
    c = csum(_pseudo(src, dst, 6, len(seg)) + seg)
    return ipv4(src, dst, 6, seg[:16] + struct.pack("!H", c) + seg[18:])


def arp_request(src_mac: bytes, src_ip: str, target_ip: str) -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, src_mac, socket.inet_aton(src_ip),
                       bytes(6), socket.inet_aton(target_ip))
    return eth(BROADCAST, src_mac, 0x0806, body)


def dhcp_discover(mac: bytes, xid: int = 0x12345678) -> bytes:
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000, bytes(4),
                        bytes(4), bytes(4), bytes(4), mac.ljust(16, b"\0"), b"", b"")
    options = (b"\x63\x82\x53\x63"  # magic cookie
               + b"\x35\x01\x01"  # DHCPDISCOVER
               + b"\x37\x03\x01\x03\x06"  # ask: subnet mask, router, DNS
               + b"\xff")
    return eth(BROADCAST, mac, 0x0800, udp("0.0.0.0", "255.255.255.255", 68, 67,
                                           bootp + options))


def parse_dhcp(frame: bytes) -> tuple[int, str, dict[int, bytes]] | None:
    """(message type, yiaddr, options) of a DHCP reply frame, None if it is not one."""
    if frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return None
    ihl = (frame[14] & 0x0F) * 4
    udp_at = 14 + ihl
    if struct.unpack("!H", frame[udp_at:udp_at + 2])[0] != 67:
        return None
    bootp = frame[udp_at + 8:]
    yiaddr = socket.inet_ntoa(bootp[16:20])
    opts: dict[int, bytes] = {}
    i = 240
    while i < len(bootp) and bootp[i] != 0xFF:
        if bootp[i] == 0:
            i += 1
            continue
        code, n = bootp[i], bootp[i + 1]
        opts[code] = bootp[i + 2:i + 2 + n]
        i += 2 + n
    return opts.get(53, b"\0")[0], yiaddr, opts
