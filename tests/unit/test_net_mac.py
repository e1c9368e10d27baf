"""NIC MAC addresses: derived (stable), random, parsed, formatted."""

from __future__ import annotations

import pytest

from pyvirt.errors import UserInputError
from pyvirt.net.mac import derive_mac, format_mac, parse_mac, random_mac


def test_derived_is_stable_distinct_and_under_qemu_oui() -> None:
    a0 = derive_mac("vm-a", 0)
    assert a0 == derive_mac("vm-a", 0)  # the same VM and index: the same address
    assert a0[:3] == b"\x52\x54\x00" and len(a0) == 6
    others = {derive_mac("vm-a", 1), derive_mac("vm-b", 0), derive_mac("vm-a0", 0)}
    assert a0 not in others and len(others) == 3
    # pinned: a change of the derivation would change every VM's address
    assert format_mac(derive_mac("test", 0)) == "52:54:00:84:fc:2e"
    with pytest.raises(ValueError):
        derive_mac("vm-a", -1)


def test_random_is_local_unicast_nonzero() -> None:
    seen = set()
    for _ in range(200):
        m = random_mac()
        assert len(m) == 6 and m[0] & 0x01 == 0 and m[0] & 0x02 and m != bytes(6)
        assert parse_mac(format_mac(m)) == m
        seen.add(m)
    assert len(seen) == 200


def test_parse_and_format_round_trip() -> None:
    assert parse_mac("52:54:00:AB:cd:0f") == bytes.fromhex("525400abcd0f")
    assert format_mac(bytes.fromhex("525400abcd0f")) == "52:54:00:ab:cd:0f"
    with pytest.raises(ValueError):
        format_mac(b"\x00" * 5)


@pytest.mark.parametrize(("text", "says"), [
    ("52:54:00:12:34", "is not a MAC address"),
    ("52:54:00:12:34:56:78", "is not a MAC address"),
    ("52-54-00-12-34-56", "is not a MAC address"),
    ("5:54:00:12:34:567", "is not a MAC address"),
    ("52:54:00:12:34:zz", "is not a MAC address"),
    ("52:54:00:12:34:+1", "is not a MAC address"),
    ("", "is not a MAC address"),
    ("01:00:5e:00:00:01", "is a multicast MAC address"),
    ("ff:ff:ff:ff:ff:ff", "is a multicast MAC address"),
    ("00:00:00:00:00:00", "the all-zero MAC address"),
])
def test_bad_addresses_are_one_clear_line(text: str, says: str) -> None:
    with pytest.raises(UserInputError, match=says) as info:
        parse_mac(text)
    assert "\n" not in str(info.value) and repr(text[:40]) in str(info.value)
