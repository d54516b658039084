"""Tables for planning a hot-add: argument shapes, steps and their undo, ids, conflicts."""

from __future__ import annotations

from typing import Any

import pytest

from qmpnet.core.hotadd_plan import AddPlan, PlanContext, QmpCall, Step, netdev_arguments, plan_add
from qmpnet.core.model import parse_nic_spec
from qmpnet.core.names import normalize_mac
from qmpnet.core.placement import PciBus, PciTopology, Placement
from qmpnet.errors import Conflict, NoFreeSlot

BUILTIN = {(0, 0): "i440FX", (1, 0): "PIIX3", (1, 1): "piix3-ide", (1, 3): "PIIX4_PM"}
MAC = "52:54:00:12:34:56"


def guest(
    *,
    device_ids: tuple[str, ...] = (),
    netdev_ids: tuple[str, ...] = (),
    macs: tuple[str, ...] = (),
    used: dict[tuple[int, int], str] | None = None,
) -> PlanContext:
    topology = PciTopology("pc", (PciBus("pci.0", "root", hotplug=True, used={**BUILTIN, **(used or {})}),))
    return PlanContext(frozenset(device_ids), frozenset(netdev_ids), frozenset(macs), topology)


def plan(spec: dict[str, Any], view: PlanContext | None = None) -> AddPlan:
    return plan_add(parse_nic_spec({"mac": MAC, **spec}), view or guest())


def netdev_args(backend: dict[str, Any]) -> dict[str, object]:
    return netdev_arguments("n.net", parse_nic_spec({"backend": backend}))


# --------------------------------------------------------------------------------------- netdev arguments


@pytest.mark.parametrize(
    ("backend", "expected"),
    [
        ({"type": "user"}, {"id": "n.net", "type": "user"}),
        (
            {"type": "user", "hostfwd": ["tcp:127.0.0.1:2222-:22", "udp::5353-10.0.2.15:53"]},
            {
                "id": "n.net",
                "type": "user",
                "hostfwd": [{"str": "tcp:127.0.0.1:2222-:22"}, {"str": "udp::5353-10.0.2.15:53"}],
            },
        ),
        (
            {
                "type": "user",
                "net": "10.1.0.0/24",
                "host": "10.1.0.2",
                "dhcpstart": "10.1.0.50",
                "dns": "10.1.0.3",
                "restrict": True,
            },
            {
                "id": "n.net",
                "type": "user",
                "net": "10.1.0.0/24",
                "host": "10.1.0.2",
                "dhcpstart": "10.1.0.50",
                "dns": "10.1.0.3",
                "restrict": True,
            },
        ),
        (
            {"type": "user", "guestfwd": ["tcp:10.0.2.100:80-tcp:127.0.0.1:8080"], "smb": "/srv/share"},
            {
                "id": "n.net",
                "type": "user",
                "guestfwd": [{"str": "tcp:10.0.2.100:80-tcp:127.0.0.1:8080"}],
                "smb": "/srv/share",
            },
        ),
        ({"type": "hubport", "hub": 3}, {"id": "n.net", "type": "hubport", "hubid": 3}),
        (
            {"type": "stream", "server": True, "addr": {"type": "unix", "path": "/run/qmpnet/l1.sock"}},
            {
                "id": "n.net",
                "type": "stream",
                "server": True,
                "addr": {"type": "unix", "path": "/run/qmpnet/l1.sock"},
            },
        ),
        (
            {"type": "stream", "addr": {"type": "inet", "host": "127.0.0.1", "port": 5555}},
            {
                "id": "n.net",
                "type": "stream",
                "server": False,
                "addr": {"type": "inet", "host": "127.0.0.1", "port": "5555"},
            },
        ),
        (
            {
                "type": "dgram",
                "local": {"type": "inet", "host": "127.0.0.1", "port": 7001},
                "remote": {"type": "inet", "host": "127.0.0.1", "port": 7002},
            },
            {
                "id": "n.net",
                "type": "dgram",
                "local": {"type": "inet", "host": "127.0.0.1", "port": "7001"},
                "remote": {"type": "inet", "host": "127.0.0.1", "port": "7002"},
            },
        ),
        (
            {"type": "dgram", "remote": {"type": "unix", "path": "/run/qmpnet/peer.sock"}},
            {"id": "n.net", "type": "dgram", "remote": {"type": "unix", "path": "/run/qmpnet/peer.sock"}},
        ),
    ],
    ids=[
        "user",
        "user-hostfwd",
        "user-net",
        "user-guestfwd-smb",
        "hubport",
        "stream-unix",
        "stream-inet",
        "dgram-inet",
        "dgram-unix-remote",
    ],
)
def test_netdev_arguments(backend: dict[str, Any], expected: dict[str, object]) -> None:
    assert netdev_args(backend) == expected


def test_inet_port_is_a_string_because_qemu_wants_one() -> None:
    args = netdev_args({"type": "stream", "addr": {"type": "inet", "host": "h", "port": 1}})
    assert args["addr"] == {"type": "inet", "host": "h", "port": "1"}


# ------------------------------------------------------------------------------------------- steps and undo


def test_plan_steps_and_undo() -> None:
    result = plan({"id": "nic1", "backend": {"type": "user"}})
    assert result.nic_id == "nic1"
    assert result.netdev_id == "nic1.net"
    assert result.mac == MAC
    assert result.placement == Placement("pci.0", 2, 0)
    assert result.steps == (
        Step(
            QmpCall("netdev_add", {"id": "nic1.net", "type": "user"}),
            undo=QmpCall("netdev_del", {"id": "nic1.net"}),
        ),
        Step(
            QmpCall(
                "device_add",
                {
                    "driver": "virtio-net-pci",
                    "id": "nic1",
                    "netdev": "nic1.net",
                    "mac": MAC,
                    "bus": "pci.0",
                    "addr": "02.0",
                },
            ),
            undo=QmpCall("device_del", {"id": "nic1"}),
            undo_waits_for="nic1",
        ),
    )


def test_device_arguments_with_explicit_bus_addr_and_model() -> None:
    result = plan({"id": "r1", "model": "rtl8139", "addr": "5"})
    device = result.steps[1].call
    assert device.command == "device_add"
    assert device.arguments == {
        "driver": "rtl8139",
        "id": "r1",
        "netdev": "r1.net",
        "mac": MAC,
        "bus": "pci.0",
        "addr": "05.0",
    }


def test_device_arguments_with_vectors() -> None:
    args = plan({"id": "v", "vectors": 6, "queues": 1}).steps[1].call.arguments
    assert args["vectors"] == 6
    assert "mq" not in args


def test_model_alias_virtio() -> None:
    assert plan({"model": "virtio"}).steps[1].call.arguments["driver"] == "virtio-net-pci"


def test_link_down_adds_set_link_step_without_undo() -> None:
    steps = plan({"id": "nic1", "link": "down"}).steps
    assert [s.call.command for s in steps] == ["netdev_add", "device_add", "set_link"]
    assert steps[2] == Step(QmpCall("set_link", {"name": "nic1", "up": False}))


def test_link_up_has_no_set_link_step() -> None:
    assert [s.call.command for s in plan({"link": "up"}).steps] == ["netdev_add", "device_add"]


# ------------------------------------------------------------------------------------------------------ ids


@pytest.mark.parametrize(
    ("model", "taken_devices", "taken_netdevs", "expected"),
    [
        ("virtio-net-pci", (), (), "virtio0"),
        ("virtio-net-pci", ("virtio0", "virtio1"), (), "virtio2"),
        ("virtio-net-pci", ("virtio0",), ("virtio1.net",), "virtio2"),
        ("virtio-net-pci", ("virtio1",), (), "virtio0"),
        ("virtio-net-pci", (), ("virtio0", "virtio1.net.net", "virtio2.net"), "virtio1"),  # a netdev named as a NIC
        ("rtl8139", ("rtl0",), (), "rtl1"),
        ("e1000", (), (), "e1000-0"),
        ("e1000e", ("e1000e-0",), (), "e1000e-1"),
    ],
)
def test_generated_id_avoids_taken_ids(
    model: str, taken_devices: tuple[str, ...], taken_netdevs: tuple[str, ...], expected: str
) -> None:
    result = plan({"model": model}, guest(device_ids=taken_devices, netdev_ids=taken_netdevs))
    assert result.nic_id == expected
    assert result.netdev_id == f"{expected}.net"


def test_generated_mac_avoids_taken_macs_and_is_valid() -> None:
    taken = tuple(f"52:54:00:00:00:{n:02x}" for n in range(1, 200))
    for _ in range(50):
        result = plan_add(parse_nic_spec({}), guest(macs=taken))
        assert result.mac is not None
        assert result.mac not in taken
        assert normalize_mac(result.mac) == result.mac


# ------------------------------------------------------------------------------------------------ conflicts


def test_conflict_on_device_id() -> None:
    with pytest.raises(Conflict) as info:
        plan({"id": "e1"}, guest(device_ids=("e1",)))
    assert info.value.field == "nic.id"
    assert info.value.code == "conflict"


def test_conflict_on_netdev_id() -> None:
    with pytest.raises(Conflict, match=r"nic1\.net") as info:
        plan({"id": "nic1"}, guest(netdev_ids=("nic1.net",)))
    assert info.value.field == "nic.id"


def test_conflict_on_mac_whatever_its_case() -> None:
    with pytest.raises(Conflict) as info:
        plan_add(parse_nic_spec({"mac": "52:54:00:AB:CD:EF"}), guest(macs=("52:54:00:ab:cd:ef",)))
    assert info.value.field == "nic.mac"


def test_placement_errors_propagate() -> None:
    full = {(slot, 0): f"d{slot}" for slot in range(2, 32)}
    with pytest.raises(NoFreeSlot):
        plan({}, guest(used=full))
