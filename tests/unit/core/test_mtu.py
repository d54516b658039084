"""A NIC's MTU (qmpnet.core.mtu): which values and backends are taken, host_mtu, and the warnings (tables)."""

from __future__ import annotations

from typing import Any

import pytest

from qmpnet.core.hotadd_plan import PlanContext, plan_add
from qmpnet.core.model import parse_nic_spec, parse_nic_update
from qmpnet.core.mtu import add_warnings, check_within, host_mtu, update_warnings
from qmpnet.core.placement import PciBus, PciTopology
from qmpnet.errors import InvalidRequest

BRIDGE = {"type": "bridge", "bridge": "br0"}


def _view() -> PlanContext:
    bus = PciBus("pci.0", "root", hotplug=True, used={(0, 0): "host bridge"})
    return PlanContext((), (), (), PciTopology("pc", (bus,)))


@pytest.mark.parametrize("mtu", [68, 1400, 1500, 9000, 65535])
def test_an_mtu_in_range_is_taken_by_tap_based_backends(mtu: int) -> None:
    for backend in (BRIDGE, {"type": "nat"}, {"type": "tap", "ifname": "tap0"}):
        assert parse_nic_spec({"mtu": mtu, "backend": backend}).mtu == mtu


@pytest.mark.parametrize("mtu", [0, 67, 65536, -1, "big", 1400.5, None])
def test_an_mtu_out_of_range_is_refused_naming_the_field(mtu: object) -> None:
    if mtu is None:
        assert parse_nic_spec({"mtu": None, "backend": BRIDGE}).mtu is None
        with pytest.raises(InvalidRequest) as caught:
            parse_nic_update({"id": "n", "mtu": None})  # an update's null would change nothing: say so
        assert caught.value.field == "update.mtu"
        return
    with pytest.raises(InvalidRequest) as caught:
        parse_nic_spec({"mtu": mtu, "backend": BRIDGE})
    assert caught.value.field == "nic.mtu"
    with pytest.raises(InvalidRequest) as caught:
        parse_nic_update({"id": "n", "mtu": mtu})
    assert caught.value.field == "update.mtu"


@pytest.mark.parametrize(
    ("backend", "why"),
    [
        ({"type": "user"}, "a user backend has no host tap"),
        ({"type": "hubport", "hub": 0}, "a hubport backend has no host tap"),
        ({"type": "stream", "addr": {"type": "unix", "path": "/run/s"}}, "a stream backend"),
        ({"type": "dgram", "remote": {"type": "inet", "host": "h", "port": 1}}, "a dgram backend"),
        ({"type": "vfio", "host": "03:00.0"}, "a vfio backend has no host tap"),
        ({**BRIDGE, "helper": True}, "QEMU's bridge helper makes the tap"),
    ],
    ids=["user", "hubport", "stream", "dgram", "vfio", "helper"],
)
def test_backends_without_a_tap_qmpnet_manages_refuse_an_mtu(backend: dict[str, Any], why: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_nic_spec({"mtu": 1400, "backend": backend})
    assert caught.value.field == "nic.mtu"
    assert why in caught.value.message
    assert parse_nic_spec({"backend": backend}).mtu is None  # without mtu they are fine


def test_an_update_may_set_only_the_mtu() -> None:
    update = parse_nic_update({"id": "n", "mtu": 1400})
    assert update.mtu == 1400
    assert update.model_fields_set == {"id", "mtu"}


def test_an_mtu_above_the_bridges_is_refused_naming_the_field() -> None:
    check_within(1400, "br0", 1400, field="nic.mtu")
    with pytest.raises(InvalidRequest) as caught:
        check_within(1401, "br0", 1400, field="update.mtu")
    assert caught.value.field == "update.mtu"
    assert "larger than the MTU of bridge br0 (1400)" in caught.value.message


@pytest.mark.parametrize(
    ("model", "mtu", "expected"),
    [
        ("virtio-net-pci", 1400, 1400),
        ("virtio-net-pci", 9000, 9000),
        ("virtio-net-pci", 1500, None),  # Ethernet's: the device QEMU makes by default (migration-compatible)
        ("virtio-net-pci", None, None),
        ("e1000", 1400, None),
        ("e1000e", 1400, None),
        ("rtl8139", 9000, None),
    ],
)
def test_host_mtu_only_for_virtio_and_only_when_not_ethernets(model: str, mtu: int | None, expected: int) -> None:
    assert host_mtu(model, mtu) == expected


@pytest.mark.parametrize("model", ["e1000", "e1000e", "rtl8139"])
def test_models_that_ignore_host_mtu_warn_that_the_guest_must_set_it(model: str) -> None:
    [warning] = add_warnings(model, 1400)
    assert warning.startswith(f"mtu: {model} ignores host_mtu")
    assert "mtu 1400" in warning
    assert add_warnings(model, 1500) == ()
    assert add_warnings(model, None) == ()
    assert add_warnings("virtio-net-pci", 1400) == ()


@pytest.mark.parametrize(
    ("model", "mtu", "expected_mtu", "expected_device", "warned"),
    [
        ("virtio-net-pci", 1400, 1400, {"host_mtu": 1400}, False),
        ("virtio-net-pci", None, None, {}, False),
        ("virtio-net-pci", 1500, 1500, {}, False),
        ("e1000", 1400, 1400, {}, True),
        ("rtl8139", None, 9000, {}, True),  # the bridge's MTU, when mtu is not given
    ],
)
def test_the_plan_gives_host_mtu_and_warnings(
    model: str, mtu: int | None, expected_mtu: int | None, expected_device: dict[str, int], warned: bool
) -> None:
    spec = parse_nic_spec({"id": "n", "model": model, "backend": BRIDGE} | ({"mtu": mtu} if mtu else {}))
    plan = plan_add(spec, _view(), mtu=expected_mtu)
    device = plan.steps[1].call.arguments
    assert {k: v for k, v in device.items() if k == "host_mtu"} == expected_device
    assert bool(plan.warnings) is warned


def test_a_live_change_warns_that_the_guest_must_apply_it() -> None:
    [warning] = update_warnings("virtio-net-pci", 1300, 1400)
    assert "host_mtu is fixed when the device is added" in warning
    [warning] = update_warnings("e1000", 9000, None)
    assert "e1000 ignores host_mtu" in warning
    assert update_warnings("virtio-net-pci", 9000, 0)  # added without host_mtu: no ceiling


def test_a_live_change_above_a_virtio_devices_host_mtu_is_refused() -> None:
    with pytest.raises(InvalidRequest) as caught:
        update_warnings("virtio-net-pci", 1500, 1400)
    assert caught.value.field == "update.mtu"
    assert "remove the NIC and add it again" in caught.value.message
