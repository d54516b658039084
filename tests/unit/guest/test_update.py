"""The live-change runner (qmpnet.guest.update) with a fake monitor and a stateful fake host: plans, order, undo paths.

Every failure test checks the same thing from both sides: the QMP commands sent (and their undo), and the fake
host's taps, which must end exactly as they started.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from fakehost import FakePort, PortsHost
from fakemonitor import RecordingMonitor

from qmpnet.core.model import Nic, ObservedBackend, PciAddress, Shape, Vlan, parse_nic_update
from qmpnet.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    OutcomeUnknown,
    QmpCommandError,
    QmpnetError,
    Unsupported,
)
from qmpnet.guest.hotadd_steps import Attachment
from qmpnet.guest.update import KnownNic, plan_update, run_update
from qmpnet.settings import UpdateSettings

if TYPE_CHECKING:
    from collections.abc import Mapping

NO_FLAP = UpdateSettings(link_flap=0)
ANNOUNCE = {"initial": 50, "max": 550, "rounds": 5, "step": 100, "interfaces": ["lan0"]}


def nic(backend: str = "tap", options: dict[str, str] | None = None, link: str = "up", netdev: str = "lan0.net") -> Nic:
    return Nic(id="lan0", model="virtio-net-pci", mac="52:54:00:00:00:01", netdev=netdev,
               backend=ObservedBackend(type=backend, options=options or {"fd": "23"}),
               pci=PciAddress(bus="pci.0", slot=4, function=0), link=link, state="active")


def bridge_nic(link: str = "up") -> KnownNic:
    """A NIC this lane added on br-a: it knows the tap and what was asked for."""
    return KnownNic(nic(link=link), ObservedBackend(type="bridge", options={"bridge": "br-a", "tap": "vnet0"}),
                    Attachment(tap="vnet0", bridge="br-a"), "vm1/lan0")


def host_with_tap(**port: Any) -> PortsHost:
    return PortsHost(taps={"vnet0": FakePort(**({"bridge": "br-a"} | port))})


def update(**fields: Any) -> Any:
    return parse_nic_update({"id": "lan0", **fields})


class PeerMonitor(RecordingMonitor):
    """A monitor that knows QEMU's pid, as the QMP adapter learns it from SO_PEERCRED on a unix socket."""

    peer_pid = 4242


def failing(command: str) -> QmpCommandError:
    return QmpCommandError(f"{command}: boom", qmp_class="GenericError", command=command)


# ------------------------------------------------------------------------------------------------- planning


@pytest.mark.parametrize(
    ("kind", "fields", "field"),
    [
        ("user", {"shape": {"rate": "1mbit"}}, "update.shape"),
        ("hubport", {"backend": {"type": "bridge", "bridge": "br-b"}}, "update.backend"),
        ("stream", {"vlan": {"access": 3}, "link": "down"}, "update.vlan"),
        ("dgram", {"shape": None}, "update.shape"),
        ("vfio", {"link": "down"}, "update.link"),
        ("vfio", {"shape": {"rate": "1mbit"}}, "update.shape"),
    ],
)
def test_what_a_backend_cannot_change_is_unsupported_naming_the_field(
    kind: str, fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(Unsupported) as caught:
        plan_update(update(**fields), KnownNic(nic(kind, {})))
    assert caught.value.field == field
    assert kind in caught.value.message


@pytest.mark.parametrize("kind", ["user", "hubport", "stream", "dgram", "tap", "bridge", "nat"])
def test_every_emulated_backend_accepts_a_link_change(kind: str) -> None:
    plan = plan_update(update(link="down"), KnownNic(nic(kind, {})))
    assert (plan.needs_host, plan.moves, plan.vlan, plan.shape, plan.link) == (False, False, False, False, "down")


def test_a_full_plan_says_what_changes() -> None:
    plan = plan_update(update(backend={"type": "nat", "network": "lab"}, shape=None), bridge_nic())
    assert (plan.needs_host, plan.moves, plan.vlan, plan.shape, plan.link) == (True, True, False, True, None)


# ------------------------------------------------------------------------------------------------- link only


async def test_link_only_needs_no_host_and_sends_one_set_link() -> None:
    monitor = RecordingMonitor()
    known = KnownNic(nic("user", {"net": "10.0.2.0/24"}), ObservedBackend(type="user", options={}), None, "vm1/lan0")
    result = await run_update(monitor, None, known, update(link="down"), NO_FLAP)
    assert monitor.executed == [("set_link", {"name": "lan0", "up": False})]
    assert result.nic.link == "down"
    assert result.backend == known.asked


# ------------------------------------------------------------------------------------------------- moving


async def test_a_move_flaps_the_link_re_enslaves_and_announces() -> None:
    monitor, host = RecordingMonitor(), host_with_tap()
    result = await run_update(monitor, host, bridge_nic(), update(backend={"type": "bridge", "bridge": "br-b"}),
                              NO_FLAP)
    assert monitor.executed == [
        ("set_link", {"name": "lan0", "up": False}),
        ("set_link", {"name": "lan0", "up": True}),
        ("announce-self", ANNOUNCE),
    ]
    assert host.actions == ["tap_port", "move_tap"]
    assert host.state() == {"vnet0": ("br-b", None, None)}
    assert result.nic.link == "up"
    assert result.backend == ObservedBackend(type="bridge", options={"bridge": "br-b", "tap": "vnet0"})
    assert result.attachment == Attachment(tap="vnet0", bridge="br-b")
    assert result.nic.backend == result.backend


async def test_a_move_of_a_nic_whose_link_is_down_does_not_bring_it_up_or_announce() -> None:
    monitor, host = RecordingMonitor(), host_with_tap()
    result = await run_update(monitor, host, bridge_nic(link="down"),
                              update(backend={"type": "bridge", "bridge": "br-b"}), NO_FLAP)
    assert monitor.executed == []
    assert host.state()["vnet0"][0] == "br-b"
    assert result.nic.link == "down"


async def test_a_move_to_the_bridge_it_is_on_changes_nothing() -> None:
    monitor, host = RecordingMonitor(), host_with_tap()
    await run_update(monitor, host, bridge_nic(), update(backend={"type": "bridge", "bridge": "br-a"}), NO_FLAP)
    assert monitor.executed == []
    assert host.actions == ["tap_port"]


async def test_a_move_to_a_nat_network_brings_it_up_and_the_nic_becomes_nat() -> None:
    monitor, host = RecordingMonitor(), host_with_tap()
    result = await run_update(monitor, host, bridge_nic(), update(backend={"type": "nat", "network": "lab"}), NO_FLAP)
    assert host.actions == ["tap_port", "nat_bridge", "move_tap"]
    assert result.backend == ObservedBackend(
        type="nat", options={"bridge": "qmpnat-lab", "network": "lab", "tap": "vnet0"}
    )
    assert result.attachment == Attachment(tap="vnet0", bridge="qmpnat-lab", network="lab")


async def test_an_unknown_nat_network_is_not_found_naming_the_update_field() -> None:
    monitor, host = RecordingMonitor(), host_with_tap()
    with pytest.raises(NotFound) as caught:
        await run_update(monitor, host, bridge_nic(), update(backend={"type": "nat", "network": "nope"}), NO_FLAP)
    assert caught.value.field == "update.backend.network"
    assert caught.value.message.startswith("update.backend.network: ")
    assert monitor.executed == []


async def test_a_move_to_a_missing_bridge_restores_the_link_and_leaves_the_tap() -> None:
    monitor, host = RecordingMonitor(), host_with_tap(shape=Shape(rate=1_000_000))
    before = host.state()
    with pytest.raises(NotFound) as caught:
        await run_update(monitor, host, bridge_nic(),
                         update(backend={"type": "bridge", "bridge": "br-x"}, shape={"rate": "2mbit"}), NO_FLAP)
    assert caught.value.field == "update.backend.bridge"
    assert host.state() == before
    assert monitor.executed == [("set_link", {"name": "lan0", "up": False}), ("set_link", {"name": "lan0", "up": True})]
    assert "set_shape" not in host.actions


async def test_a_failing_shape_undoes_the_vlan_the_move_and_the_link_flap() -> None:
    monitor, host = RecordingMonitor(), host_with_tap(vlan=Vlan(access=5))
    host.errors["set_shape"] = Unsupported("update.shape: this kernel has no netem", field="update.shape")
    before = host.state()
    with pytest.raises(Unsupported):
        await run_update(monitor, host, bridge_nic(), update(backend={"type": "bridge", "bridge": "br-b"},
                         vlan={"access": 7}, shape={"delay": "100ms"}), NO_FLAP)  # fmt: skip
    assert host.state() == before
    assert [a for a in host.actions if a.startswith("undo")] == ["undo set_vlan", "undo move_tap"]
    assert monitor.commands == ["set_link", "set_link"]
    assert monitor.executed[-1] == ("set_link", {"name": "lan0", "up": True})


async def test_qemu_refusing_announce_self_undoes_everything() -> None:
    monitor, host = RecordingMonitor(), host_with_tap()
    monitor.errors["announce-self"] = failing("announce-self")
    before = host.state()
    with pytest.raises(QmpCommandError) as caught:
        await run_update(monitor, host, bridge_nic(), update(backend={"type": "bridge", "bridge": "br-b"},
                         shape={"rate": "5mbit"}), NO_FLAP)  # fmt: skip
    assert caught.value.command == "announce-self"
    assert host.state() == before
    # link down, up, announce (refused); undo: down again (the last set_link), then up (the flap)
    assert [args["up"] for name, args in monitor.executed if name == "set_link"] == [False, True, False, True]


async def test_an_unknown_outcome_is_not_rolled_back() -> None:
    monitor, host = RecordingMonitor(), host_with_tap()
    lost = OutcomeUnknown("set_link: no answer within 10 s")
    monitor.errors["set_link"] = lost
    with pytest.raises(OutcomeUnknown) as caught:
        await run_update(monitor, host, bridge_nic(), update(shape={"rate": "5mbit"}, link="down"), NO_FLAP)
    assert caught.value is lost
    assert any("did not roll back" in note for note in caught.value.__notes__)
    assert host.state()["vnet0"][2] == Shape(rate=5_000_000)  # kept: what QEMU did is unknown


async def test_a_move_that_brings_the_link_up_puts_it_down_again_on_failure() -> None:
    monitor, host = RecordingMonitor(), host_with_tap()
    monitor.errors["announce-self"] = failing("announce-self")
    with pytest.raises(QmpCommandError):
        await run_update(monitor, host, bridge_nic(link="down"),
                         update(backend={"type": "bridge", "bridge": "br-b"}, link="up"), NO_FLAP)
    assert host.state()["vnet0"][0] == "br-a"
    assert [args["up"] for name, args in monitor.executed if name == "set_link"] == [True, False]


async def test_an_undo_that_fails_is_noted_and_the_rest_still_unwinds() -> None:
    monitor, host = RecordingMonitor(), host_with_tap()
    monitor.errors["announce-self"] = failing("announce-self")
    host.failing_undos.add("move_tap")
    with pytest.raises(QmpCommandError) as caught:
        await run_update(monitor, host, bridge_nic(), update(backend={"type": "bridge", "bridge": "br-b"}), NO_FLAP)
    assert any(note.startswith("rollback of move to br-b failed") for note in caught.value.__notes__)
    assert monitor.executed[-1] == ("set_link", {"name": "lan0", "up": True})  # the flap's undo still ran


# ------------------------------------------------------------------------------------------------- vlan, shape


async def test_vlan_and_shape_without_a_move_neither_flap_nor_announce_for_a_shape() -> None:
    monitor, host = RecordingMonitor(), host_with_tap()
    result = await run_update(monitor, host, bridge_nic(), update(shape={"rate": "5mbit", "delay": "10ms"}), NO_FLAP)
    assert monitor.executed == []
    assert result.backend is not None
    assert result.backend.options == {"bridge": "br-a", "tap": "vnet0", "rate": "5mbit", "delay": "10ms"}
    result = await run_update(monitor, host, bridge_nic(), update(vlan={"trunks": [10, "20-22"]}), NO_FLAP)
    assert monitor.executed == [("announce-self", ANNOUNCE)]
    assert result.backend is not None
    assert result.backend.options["trunks"] == "10,20-22"
    assert "rate" in result.backend.options  # the shape read back from the host is still shown


async def test_null_vlan_and_shape_go_back_to_the_defaults() -> None:
    monitor, host = RecordingMonitor(), host_with_tap(vlan=Vlan(access=5), shape=Shape(loss=1.0))
    result = await run_update(monitor, host, bridge_nic(), update(vlan=None, shape=None), NO_FLAP)
    assert host.state() == {"vnet0": ("br-a", None, None)}
    assert host.calls[1:] == [("set_vlan", "vnet0", None), ("set_shape", "vnet0", None)]
    assert result.backend is not None
    assert result.backend.options == {"bridge": "br-a", "tap": "vnet0"}


async def test_a_bridge_that_does_not_filter_vlans_is_unsupported_and_nothing_changes() -> None:
    monitor, host = RecordingMonitor(), host_with_tap()
    host.filtering = False
    with pytest.raises(Unsupported):
        await run_update(monitor, host, bridge_nic(), update(backend={"type": "bridge", "bridge": "br-b"},
                         vlan={"access": 3}), NO_FLAP)  # fmt: skip
    assert host.state() == {"vnet0": ("br-a", None, None)}


# ------------------------------------------------------------------------------------------------- finding the tap


async def test_a_nic_this_lane_did_not_add_is_found_by_the_owner_mark() -> None:
    monitor = RecordingMonitor()
    host = PortsHost(taps={"vnet7": FakePort("br-a", owner="vm1/lan0"), "vnet8": FakePort("br-a", owner="vm1/x")})
    known = KnownNic(nic("tap", {"fd": "23"}), None, None, "vm1/lan0")
    result = await run_update(monitor, host, known, update(shape={"rate": "1mbit"}), NO_FLAP)
    assert host.calls[0] == ("find_tap", "vm1/lan0", None, 23)
    assert host.state()["vnet7"][2] == Shape(rate=1_000_000)
    assert result.backend == ObservedBackend(type="bridge", options={"bridge": "br-a", "tap": "vnet7", "rate": "1mbit"})
    assert result.attachment == Attachment(tap="vnet7", bridge="br-a")


async def test_a_nic_added_under_another_guest_name_is_found_by_the_fd_qemu_holds() -> None:
    monitor = PeerMonitor()
    host = PortsHost(taps={"vnet3": FakePort("br-a", owner="pid 4242 fd 23")})
    known = KnownNic(nic("tap", {"fd": "23"}), None, None, "/run/vm1.qmp/lan0")
    await run_update(monitor, host, known, update(shape={"rate": "1mbit"}), NO_FLAP)
    assert host.calls[0] == ("find_tap", "/run/vm1.qmp/lan0", 4242, 23)
    assert host.state()["vnet3"][2] == Shape(rate=1_000_000)


async def test_an_operators_tap_stays_a_tap_backend_and_is_not_attached() -> None:
    monitor, host = RecordingMonitor(), PortsHost(taps={"tap7": FakePort(None)})
    known = KnownNic(nic("tap", {"ifname": "tap7", "script": "no", "downscript": "no"}),
                     ObservedBackend(type="tap", options={"ifname": "tap7"}), Attachment(), "vm1/lan0")
    result = await run_update(monitor, host, known, update(backend={"type": "bridge", "bridge": "br-b"}), NO_FLAP)
    assert result.backend == ObservedBackend(type="tap", options={"ifname": "tap7", "bridge": "br-b"})
    assert result.attachment == Attachment()


@pytest.mark.parametrize(
    ("known", "fragment"),
    [
        (KnownNic(nic("tap", {"helper": "/usr/lib/qemu/qemu-bridge-helper", "br": "br0"}), None, None, "vm1/lan0"),
         "bridge helper"),
        (KnownNic(nic("tap", {"fd": "23"}), None, None, "vm1/lan0"), "cannot be found"),
    ],
)
async def test_taps_qmpnet_cannot_change_are_unsupported(known: KnownNic, fragment: str) -> None:
    with pytest.raises(Unsupported, match=fragment):
        await run_update(RecordingMonitor(), PortsHost(), known, update(shape={"rate": "1mbit"}), NO_FLAP)


async def test_without_host_networking_a_host_change_is_unsupported() -> None:
    with pytest.raises(Unsupported, match="host networking"):
        await run_update(RecordingMonitor(), None, bridge_nic(), update(shape=None), NO_FLAP)


async def test_a_vanished_tap_is_not_found() -> None:
    with pytest.raises(NotFound) as caught:
        await run_update(RecordingMonitor(), PortsHost(), bridge_nic(), update(shape=None), NO_FLAP)
    assert caught.value.field == "id"


@pytest.mark.parametrize("error", [Conflict("update.shape: foreign qdisc", field="update.shape"),
                                   InvalidRequest("update.backend.bridge: not a bridge")])
async def test_host_errors_reach_the_caller_unchanged(error: QmpnetError) -> None:
    monitor, host = RecordingMonitor(), host_with_tap()
    host.errors["set_shape"] = error
    with pytest.raises(type(error)) as caught:
        await run_update(monitor, host, bridge_nic(), update(shape={"rate": "1mbit"}), NO_FLAP)
    assert caught.value is error


# ----------------------------------------------------------------------------------------- MTU


class HostMtuMonitor(RecordingMonitor):
    """A monitor whose NIC devices were added with ``host_mtu``."""

    def __init__(self, device_mtu: int) -> None:
        super().__init__()
        self.device_mtu = device_mtu

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> object:
        answer = await super().execute(command, arguments)
        return self.device_mtu if command == "qom-get" else answer


def mtu_nic(model: str = "virtio-net-pci") -> KnownNic:
    nic = Nic(id="lan0", model=model, mac="52:54:00:00:00:01", netdev="lan0.net",
              backend=ObservedBackend(type="tap", options={"fd": "23"}),
              pci=PciAddress(bus="pci.0", slot=4, function=0), link="up", state="active")
    return KnownNic(nic, ObservedBackend(type="bridge", options={"bridge": "br-a", "tap": "vnet0"}),
                    Attachment(tap="vnet0", bridge="br-a"), "vm1/lan0")


def mtu_host(bridge_mtu: int = 9000) -> PortsHost:
    return PortsHost(taps={"vnet0": FakePort(bridge="br-a")}, bridge_mtus={"br-a": bridge_mtu})


async def test_a_live_mtu_sets_the_tap_and_warns_that_the_guest_must_apply_it() -> None:
    host, monitor = mtu_host(), HostMtuMonitor(0)
    result = await run_update(monitor, host, mtu_nic(), parse_nic_update({"id": "lan0", "mtu": 4000}), NO_FLAP)
    assert host.taps["vnet0"].mtu == 4000
    [warning] = result.warnings
    assert "host_mtu is fixed when the device is added" in warning
    assert ("qom-get", {"path": "/machine/peripheral/lan0", "property": "host_mtu"}) in monitor.executed
    assert "set_link" not in monitor.commands


async def test_a_live_mtu_above_the_devices_host_mtu_is_refused_before_anything_changes() -> None:
    host, monitor = mtu_host(), HostMtuMonitor(1400)
    with pytest.raises(InvalidRequest) as caught:
        await run_update(monitor, host, mtu_nic(), parse_nic_update({"id": "lan0", "mtu": 1500}), NO_FLAP)
    assert caught.value.field == "update.mtu"
    assert host.taps["vnet0"].mtu == 1500
    assert "set_mtu" not in host.actions


async def test_a_live_mtu_above_the_bridges_is_refused_and_the_rest_undone() -> None:
    host, monitor = mtu_host(bridge_mtu=1400), HostMtuMonitor(0)
    before = host.state()
    change = parse_nic_update({"id": "lan0", "mtu": 1401, "vlan": {"access": 10}})
    with pytest.raises(InvalidRequest) as caught:
        await run_update(monitor, host, mtu_nic("e1000"), change, NO_FLAP)
    assert caught.value.field == "update.mtu"
    assert host.state() == before
    assert host.taps["vnet0"].mtu == 1500


async def test_a_live_mtu_needs_a_host_tap() -> None:
    user = KnownNic(mtu_nic().nic.model_copy(update={"backend": ObservedBackend(type="user")}))
    with pytest.raises(Unsupported) as caught:
        await run_update(RecordingMonitor(), mtu_host(), user, parse_nic_update({"id": "lan0", "mtu": 1400}), NO_FLAP)
    assert caught.value.field == "update.mtu"
