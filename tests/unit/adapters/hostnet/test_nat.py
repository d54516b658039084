"""NAT network settings, and the nftables script and dnsmasq command line rendered from them (all pure)."""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

import pytest
from pydantic import ValidationError

from qmpnet.adapters.hostnet import dnsmasq, nftables
from qmpnet.adapters.hostnet.nat import _leases
from qmpnet.core.hostconfig import HostnetSettings, NatNetwork, parse_nat_network
from qmpnet.errors import InvalidRequest, NotFound

if TYPE_CHECKING:
    from pathlib import Path

IP = ipaddress.IPv4Address


def test_defaults_are_libvirt_like() -> None:
    net = NatNetwork(name="default")
    assert net.bridge == "qmpnat0"
    assert net.subnet == ipaddress.IPv4Network("192.168.123.0/24")
    assert net.gateway == IP("192.168.123.1")
    assert net.dhcp_range == (IP("192.168.123.100"), IP("192.168.123.200"))
    assert net.table == "qmpnet_default"


def test_gateway_and_range_follow_the_subnet() -> None:
    net = parse_nat_network({"name": "lab", "subnet": "10.20.0.0/16"})
    assert net.gateway == IP("10.20.0.1")
    assert net.dhcp_range == (IP("10.20.0.100"), IP("10.20.0.200"))
    small = parse_nat_network({"name": "tiny", "subnet": "10.30.0.0/28"})
    assert small.gateway == IP("10.30.0.1")
    assert small.dhcp_range == (IP("10.30.0.2"), IP("10.30.0.14"))


def test_dhcp_range_as_a_string() -> None:
    net = parse_nat_network({"name": "lab", "dhcp_range": "192.168.123.10-192.168.123.20"})
    assert net.dhcp_range == (IP("192.168.123.10"), IP("192.168.123.20"))


@pytest.mark.parametrize(
    ("data", "path", "words"),
    [
        ({"name": "1st"}, "network.name", "letter"),
        ({"name": "a b"}, "network.name", "letter"),
        ({"name": "x" * 33}, "network.name", "letter"),
        ({"name": "n", "bridge": "br/0"}, "network.bridge", "'/'"),
        ({"name": "n", "bridge": "b" * 16}, "network.bridge", "15 bytes"),
        ({"name": "n", "subnet": "192.168.123.1/24"}, "network.subnet", ""),
        ({"name": "n", "subnet": "10.0.0.0/31"}, "network", "/30"),
        ({"name": "n", "gateway": "10.0.0.1"}, "network", "gateway"),
        ({"name": "n", "gateway": "192.168.123.255"}, "network", "gateway"),
        ({"name": "n", "dhcp_range": ["192.168.123.200", "192.168.123.100"]}, "network", "first address"),
        ({"name": "n", "dhcp_range": ["192.168.123.100", "192.168.124.1"]}, "network", "dhcp_range"),
        ({"name": "n", "gateway": "192.168.123.150"}, "network", "gateway"),
        ({"name": "n", "lease_seconds": 60}, "network.lease_seconds", "120"),
        ({"name": "n", "colour": "blue"}, "network.colour", "Extra"),
    ],
)
def test_bad_networks_are_invalid_requests_naming_the_field(data: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_nat_network(data)
    assert caught.value.field == path
    assert words in str(caught.value)


def test_settings_refuse_clashing_networks() -> None:
    with pytest.raises(ValidationError, match="both use bridge"):
        HostnetSettings(networks=(NatNetwork(name="a"), NatNetwork(name="b", subnet="10.1.0.0/24")))
    with pytest.raises(ValidationError, match="overlap"):
        HostnetSettings(networks=(NatNetwork(name="a"), NatNetwork(name="b", bridge="qmpnat1")))
    with pytest.raises(ValidationError, match="two networks"):
        HostnetSettings(networks=(NatNetwork(name="a"), NatNetwork(name="a", bridge="x", subnet="10.1.0.0/24")))
    with pytest.raises(ValidationError, match="tap_pattern"):
        HostnetSettings(tap_pattern="vnet")


def test_settings_look_up_networks_by_name() -> None:
    settings = HostnetSettings()
    assert settings.network("default").bridge == "qmpnat0"
    with pytest.raises(NotFound) as caught:
        settings.network("lab")
    assert caught.value.field == "nic.backend.network"
    assert "default" in str(caught.value)


def test_nft_script_replaces_only_its_own_table() -> None:
    script = nftables.render_table(NatNetwork(name="lab", bridge="natbr", subnet="10.5.0.0/24"))
    lines = [line.strip() for line in script.splitlines()]
    assert lines[:3] == ["table inet qmpnet_lab", "delete table inet qmpnet_lab", "table inet qmpnet_lab {"]
    assert sum(line.startswith("table ") for line in lines) == 2  # no other table is named
    assert "flush ruleset" not in script
    masquerade = next(line for line in lines if line.endswith("masquerade"))
    assert 'ip saddr 10.5.0.0/24 ip daddr != 10.5.0.0/24 oifname != "natbr"' in masquerade
    forward = lines[lines.index("chain forward {") + 2:][:4]
    assert forward == [
        'oifname "natbr" ip daddr 10.5.0.0/24 ct state established,related accept',
        'oifname "natbr" drop',
        'iifname "natbr" ip saddr 10.5.0.0/24 accept',
        'iifname "natbr" drop',
    ]


def test_nft_remove_script_is_idempotent_form() -> None:
    assert nftables.remove_script("qmpnet_lab") == "table inet qmpnet_lab\ndelete table inet qmpnet_lab\n"


def test_dnsmasq_is_confined_to_the_bridge(tmp_path: Path) -> None:
    net = NatNetwork(name="lab", bridge="natbr", subnet="10.5.0.0/24")
    argv = dnsmasq.argv(net, tmp_path, dnsmasq="/usr/sbin/dnsmasq")
    assert argv[0] == "/usr/sbin/dnsmasq"
    for option in (
        "--conf-file=/dev/null",
        "--interface=natbr",
        "--bind-interfaces",
        "--except-interface=lo",
        "--listen-address=10.5.0.1",
        "--dhcp-range=10.5.0.100,10.5.0.200,255.255.255.0,3600",
        f"--pid-file={tmp_path}/nat-lab.pid",
        f"--dhcp-leasefile={tmp_path}/nat-lab.leases",
        "--port=53",
    ):
        assert option in argv
    no_dns = dnsmasq.argv(net.model_copy(update={"dns": False}), tmp_path, dnsmasq="dnsmasq")
    assert "--port=0" in no_dns


def test_lease_file_parsing(tmp_path: Path) -> None:
    path = tmp_path / "leases"
    assert _leases(path) == ()
    path.write_text(
        "1700000000 52:54:00:12:34:56 192.168.123.117 guest1 01:52:54:00:12:34:56\n"
        "1700000100 52:54:00:ab:cd:ef 192.168.123.118 * *\n"
        "duid 00:01:00:01\n"
    )
    leases = _leases(path)
    assert [(lease.mac, str(lease.ip), lease.hostname) for lease in leases] == [
        ("52:54:00:12:34:56", "192.168.123.117", "guest1"),
        ("52:54:00:ab:cd:ef", "192.168.123.118", None),
    ]
    assert leases[0].expires == 1700000000
