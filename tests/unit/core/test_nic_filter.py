"""NicSpec.filter and NicUpdate.filter: where a filter is allowed, and bad values refused naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from qmpnet.api.wire.envelopes import NicAddRequest, NicUpdateRequest, parse_request
from qmpnet.core.model import parse_nic_spec, parse_nic_update
from qmpnet.core.nic_filter import FILTERABLE, MAX_ADDRESSES
from qmpnet.errors import InvalidRequest, Unsupported

BACKENDS: dict[str, dict[str, Any]] = {
    "user": {"type": "user"},
    "hubport": {"type": "hubport", "hub": 0},
    "stream": {"type": "stream", "addr": {"type": "unix", "path": "/tmp/s"}},  # noqa: S108 - never opened
    "dgram": {"type": "dgram", "local": {"type": "unix", "path": "/tmp/d"}},  # noqa: S108 - never opened
    "tap": {"type": "tap", "ifname": "mytap"},
    "vfio": {"type": "vfio", "host": "0000:03:00.0"},
}


def test_bridge_and_nat_nics_take_a_filter_with_defaults() -> None:
    for backend in ({"type": "bridge", "bridge": "br0"}, {"type": "nat", "network": "default"}):
        spec = parse_nic_spec({"backend": backend, "filter": {"ipv4": ["192.0.2.10"]}})
        assert spec.filter is not None
        assert spec.filter.mac is True
        assert spec.filter.dhcp_server is False
        assert [str(a) for a in spec.filter.ipv4 or []] == ["192.0.2.10"]
        assert spec.filter.ipv6 is None  # absent: IPv6 not checked
    assert {"bridge", "nat"} <= FILTERABLE


@pytest.mark.parametrize("kind", sorted(BACKENDS))
def test_other_backends_are_refused_naming_the_field(kind: str) -> None:
    data: dict[str, Any] = {"backend": BACKENDS[kind], "filter": {}}
    if kind == "vfio":
        data["model"] = "virtio-net-pci"
    with pytest.raises(Unsupported) as caught:
        parse_nic_spec(data)
    assert caught.value.field == "nic.filter"
    assert kind in caught.value.message


def test_a_bridge_through_qemus_helper_is_refused() -> None:
    with pytest.raises(Unsupported, match="helper") as caught:
        parse_nic_spec({"backend": {"type": "bridge", "bridge": "br0", "helper": True}, "filter": {}})
    assert caught.value.field == "nic.filter"


@pytest.mark.parametrize(
    ("filter_", "field"),
    [
        ({"ipv4": ["192.0.2.300"]}, "nic.filter.ipv4.0"),
        ({"ipv4": ["2001:db8::1"]}, "nic.filter.ipv4.0"),
        ({"ipv6": ["192.0.2.1"]}, "nic.filter.ipv6.0"),
        ({"mac": "sometimes"}, "nic.filter.mac"),
        ({"ipv4": [f"10.0.0.{i}" for i in range(MAX_ADDRESSES + 1)]}, "nic.filter.ipv4"),
        ({"ip": ["192.0.2.1"]}, "nic.filter.ip"),
    ],
)
def test_bad_values_are_refused_naming_the_field(filter_: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_nic_spec({"backend": {"type": "bridge", "bridge": "br0"}, "filter": filter_})
    assert caught.value.field == field


def test_an_update_sets_or_removes_the_filter() -> None:
    update = parse_nic_update({"id": "lan0", "filter": {"mac": False, "ipv6": []}})
    assert update.changes_filter
    assert update.filter is not None
    assert update.filter.ipv6 == []
    removal = parse_nic_update({"id": "lan0", "filter": None})
    assert removal.changes_filter
    assert removal.filter is None
    assert not parse_nic_update({"id": "lan0", "link": "up"}).changes_filter


def test_the_mqtt_requests_carry_the_filter_and_refuse_it_naming_the_field() -> None:
    add = parse_request("nic/add", "guest", {"nic": {"backend": {"type": "nat"}, "filter": {"ipv6": ["2001:db8::1"]}}})
    assert isinstance(add, NicAddRequest)
    assert add.nic.filter is not None
    assert [str(a) for a in add.nic.filter.ipv6 or []] == ["2001:db8::1"]
    update = parse_request("nic/update", "guest", {"update": {"id": "lan0", "filter": None}})
    assert isinstance(update, NicUpdateRequest)
    assert update.update.changes_filter
    with pytest.raises(InvalidRequest) as caught:
        parse_request("nic/update", "guest", {"update": {"id": "lan0", "filter": {"dhcp_server": "maybe"}}})
    assert caught.value.field == "update.filter.dhcp_server"
    with pytest.raises(Unsupported) as refused:
        parse_request("nic/add", "guest", {"nic": {"backend": {"type": "user"}, "filter": {}}})
    assert refused.value.field == "nic.filter"
