"""The anti-spoofing rules of a tap, rendered from a NIC's filter (pure), and the scripts that load them."""

from __future__ import annotations

import pytest

from qmpnet.adapters.hostnet import antispoof
from qmpnet.core.nic_filter import NicFilter

MAC = "52:54:00:12:34:56"


def rules(**fields: object) -> list[str]:
    return antispoof.render_rules(MAC, NicFilter.model_validate(fields))


def test_the_default_filter_checks_the_mac_and_drops_dhcp_server_replies() -> None:
    assert rules() == [
        f"ether saddr != {MAC} drop",
        f"ether type arp arp saddr ether != {MAC} drop",
        "ip protocol udp udp sport 67 drop",
        "ip6 nexthdr udp udp sport 547 drop",
    ]


def test_a_dhcp_server_and_no_mac_check_leave_no_rules() -> None:
    assert rules(mac=False, dhcp_server=True) == []


def test_an_ipv4_list_limits_arp_and_ip_sources_but_lets_dhcp_discovery_through() -> None:
    got = rules(mac=False, dhcp_server=True, ipv4=["192.0.2.11", "192.0.2.10", "192.0.2.10"])
    assert got == [
        "ether type { 8021q, 8021ad } drop",  # a VLAN tag would carry any address past the ip/arp matches
        "ether type arp arp saddr ip != { 0.0.0.0, 192.0.2.10, 192.0.2.11 } drop",
        "ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept",
        "ip saddr != { 192.0.2.10, 192.0.2.11 } drop",
    ]


def test_an_empty_ipv4_list_allows_only_what_getting_an_address_needs() -> None:
    got = rules(mac=False, dhcp_server=True, ipv4=[])
    assert got[1:] == [
        "ether type arp arp saddr ip != 0.0.0.0 drop",
        "ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept",
        "ether type ip drop",
    ]


def test_an_ipv6_list_keeps_link_local_and_duplicate_address_detection() -> None:
    got = rules(mac=False, dhcp_server=True, ipv6=["2001:db8::10"])
    assert got == [
        "ether type { 8021q, 8021ad } drop",
        "ip6 saddr :: icmpv6 type { nd-neighbor-solicit, mld-listener-report, mld2-listener-report } accept",
        "ip6 saddr != { fe80::/10, 2001:db8::10 } drop",
    ]


def test_the_dhcp_server_drop_comes_before_the_address_accepts() -> None:
    got = rules(ipv4=["192.0.2.10"])
    assert got.index("ip protocol udp udp sport 67 drop") < got.index(
        "ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept"
    )


@pytest.mark.parametrize(
    ("tap", "chain"),
    [("vnet3", "tap_vnet3"), ("qmp.t0", "tap_qmp.t0"), ("a-b_c", "tap_a_2db_5fc")],
)
def test_chain_names_are_unambiguous_plain_nft_names(tap: str, chain: str) -> None:
    assert antispoof.chain_name(tap) == chain


def test_a_replacement_flushes_and_refills_the_chain_in_one_script() -> None:
    script = antispoof.replace_script("vnet3", MAC, NicFilter())
    lines = script.splitlines()
    prefix = "bridge qmpnet_antispoof"
    assert lines.index(f"flush chain {prefix} tap_vnet3") < lines.index(
        f"add rule {prefix} tap_vnet3 ether saddr != {MAC} drop"
    )
    assert f"flush chain {prefix} prerouting" in lines  # the one dispatch rule is never duplicated
    assert lines.count(f"add rule {prefix} prerouting iifname vmap @taps") == 1
    assert lines[-1] == f'add element {prefix} taps {{ "vnet3" : jump tap_vnet3 }}'


def test_a_removal_deletes_the_element_then_the_chain_and_works_when_there_was_none() -> None:
    lines = antispoof.remove_script("vnet3").splitlines()
    prefix = "bridge qmpnet_antispoof"
    assert lines[-3:] == [
        f'add element {prefix} taps {{ "vnet3" : jump tap_vnet3 }}',
        f'delete element {prefix} taps {{ "vnet3" }}',
        f"delete chain {prefix} tap_vnet3",
    ]
    assert not any(line.startswith(f"add rule {prefix} tap_vnet3") for line in lines)
