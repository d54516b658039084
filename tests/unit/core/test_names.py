"""Tables for the name rules: QEMU ids, MAC addresses, PCI addresses."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmpnet.core.names import (
    QEMU_ID_MAX,
    check_qemu_id,
    format_pci_addr,
    generate_mac,
    normalize_mac,
    parse_pci_addr,
)


@pytest.mark.parametrize("value", ["a", "Z", "nic0", "vm1.net", "rp-1", "a_b", "x" * QEMU_ID_MAX, "e1000e"])
def test_qemu_id_accepted(value: str) -> None:
    assert check_qemu_id(value) == value


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("", "empty"),
        ("0nic", "letter"),
        ("_nic", "letter"),
        ("-nic", "letter"),
        ("nic 0", "letter"),
        ("nic/0", "letter"),
        ("nic,0", "letter"),
        ("nïc", "letter"),
        ("x" * (QEMU_ID_MAX + 1), "at most"),
    ],
)
def test_qemu_id_refused(value: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        check_qemu_id(value)


@pytest.mark.parametrize(
    ("value", "normal"),
    [
        ("52:54:00:12:34:56", "52:54:00:12:34:56"),
        ("52:54:00:AB:cd:EF", "52:54:00:ab:cd:ef"),
        ("02:00:00:00:00:00", "02:00:00:00:00:00"),
        ("00:00:00:00:00:01", "00:00:00:00:00:01"),
        ("FE:FF:FF:FF:FF:FF", "fe:ff:ff:ff:ff:ff"),
    ],
)
def test_mac_normalized(value: str, normal: str) -> None:
    assert normalize_mac(value) == normal


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("52:54:00:12:34", "six"),
        ("52:54:00:12:34:56:78", "six"),
        ("52-54-00-12-34-56", "six"),
        ("525400123456", "six"),
        ("52:54:00:12:34:5g", "six"),
        ("52:54:0:12:34:56", "six"),
        (" 52:54:00:12:34:56", "six"),
        ("", "six"),
        ("01:00:5e:00:00:01", "unicast"),
        ("ff:ff:ff:ff:ff:ff", "unicast"),
        ("33:33:00:00:00:01", "unicast"),
        ("00:00:00:00:00:00", "zero"),
    ],
)
def test_mac_refused(value: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        normalize_mac(value)


def test_generate_mac_is_qemu_unicast_and_valid() -> None:
    for _ in range(200):
        mac = generate_mac(())
        assert re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", mac)
        assert normalize_mac(mac) == mac
        assert mac != "52:54:00:00:00:00"


def test_generate_mac_avoids_taken() -> None:
    taken: set[str] = set()
    for _ in range(2000):
        mac = generate_mac(taken)
        assert mac not in taken
        taken.add(mac)
    assert len(taken) == 2000


def test_generate_mac_redraws_taken_and_all_zero_tails(monkeypatch: pytest.MonkeyPatch) -> None:
    draws = iter([b"\x12\x34\x56", b"\x00\x00\x00", b"\xab\xcd\xef"])
    monkeypatch.setattr("qmpnet.core.names.secrets.token_bytes", lambda _n: next(draws))
    assert generate_mac({"52:54:00:12:34:56"}) == "52:54:00:ab:cd:ef"


class _EveryMac:
    def __contains__(self, item: object) -> bool:
        return True


def test_generate_mac_gives_up_when_everything_is_taken() -> None:
    with pytest.raises(ValueError, match="no free MAC"):
        generate_mac(_EveryMac())  # type: ignore[arg-type]  # a Collection in spirit: contains everything


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("5", (5, 0)),
        ("05", (5, 0)),
        ("05.0", (5, 0)),
        ("0x5", (5, 0)),
        ("0x1f.7", (31, 7)),
        ("1f", (31, 0)),
        ("a.3", (10, 3)),
        ("0", (0, 0)),
        ("1F.2", (31, 2)),
    ],
)
def test_pci_addr_parsed(value: str, parsed: tuple[int, int]) -> None:
    assert parse_pci_addr(value) == parsed


@pytest.mark.parametrize("value", ["", "20", "0x20", "ff", "5.8", "5.", ".1", "05:0", "g", "100", "-1", "5.0.0"])
def test_pci_addr_refused(value: str) -> None:
    with pytest.raises(ValueError, match="slot"):
        parse_pci_addr(value)


@pytest.mark.parametrize(
    ("slot", "function", "text"), [(5, 0, "05.0"), (0, 0, "00.0"), (31, 7, "1f.7"), (10, 1, "0a.1")]
)
def test_pci_addr_formatted(slot: int, function: int, text: str) -> None:
    assert format_pci_addr(slot, function) == text


@given(st.integers(0, 31), st.integers(0, 7))
def test_pci_addr_round_trip(slot: int, function: int) -> None:
    assert parse_pci_addr(format_pci_addr(slot, function)) == (slot, function)
