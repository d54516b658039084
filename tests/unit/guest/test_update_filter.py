"""``nic/update`` with ``filter`` (anti-spoofing): which NICs may have one, the call made, and its undo."""

from __future__ import annotations

from typing import Any

import pytest
from fakehost import FakePort, PortsHost
from fakemonitor import RecordingMonitor

from qmpnet.core.model import Nic, ObservedBackend, PciAddress, parse_nic_update
from qmpnet.core.nic_filter import NicFilter
from qmpnet.errors import QmpCommandError, Unsupported
from qmpnet.guest.hotadd_steps import Attachment
from qmpnet.guest.update import KnownNic, run_update
from qmpnet.settings import UpdateSettings

NO_FLAP = UpdateSettings(link_flap=0)
MAC = "52:54:00:00:00:01"
OLD = NicFilter.model_validate({"ipv4": ["192.0.2.10"]})


def nic(backend: str, options: dict[str, str]) -> Nic:
    return Nic(id="lan0", model="virtio-net-pci", mac=MAC, netdev="lan0.net",
               backend=ObservedBackend(type=backend, options=options),
               pci=PciAddress(bus="pci.0", slot=4, function=0), link="up", state="active")


def known(kind: str = "bridge", nic_filter: NicFilter | None = OLD) -> KnownNic:
    options = {"bridge": "br-a", "tap": "vnet0"} if kind == "bridge" else {"network": "lab", "tap": "vnet0"}
    return KnownNic(nic("tap", {"fd": "23"}), ObservedBackend(type=kind, options=options),
                    Attachment(tap="vnet0", bridge="br-a"), "vm1/lan0", nic_filter)


def update(**fields: Any) -> Any:
    return parse_nic_update({"id": "lan0", **fields})


@pytest.mark.parametrize("kind", ["bridge", "nat"])
async def test_a_filter_replaces_the_taps_rules_in_one_call(kind: str) -> None:
    monitor, host = RecordingMonitor(), PortsHost(taps={"vnet0": FakePort("br-a", filter=OLD)})
    await run_update(monitor, host, known(kind), update(filter={"ipv4": ["192.0.2.99"], "dhcp_server": True}),
                     NO_FLAP)
    wanted = NicFilter.model_validate({"ipv4": ["192.0.2.99"], "dhcp_server": True})
    assert [c for c in host.calls if c[0] == "set_filter"] == [("set_filter", "vnet0", MAC, wanted)]
    assert host.taps["vnet0"].filter == wanted
    assert monitor.executed == []  # the guest sees nothing: no flap, no announce


async def test_null_removes_the_filter() -> None:
    host = PortsHost(taps={"vnet0": FakePort("br-a", filter=OLD)})
    await run_update(RecordingMonitor(), host, known(), update(filter=None), NO_FLAP)
    assert host.taps["vnet0"].filter is None


async def test_a_failure_after_the_filter_puts_the_old_rules_back() -> None:
    monitor, host = RecordingMonitor(), PortsHost(taps={"vnet0": FakePort("br-a", filter=OLD)})
    monitor.errors["set_link"] = QmpCommandError("set_link: boom", qmp_class="GenericError", command="set_link")
    with pytest.raises(QmpCommandError):
        await run_update(monitor, host, known(), update(filter={"mac": True}, link="down"), NO_FLAP)
    assert ("undo set_filter", "vnet0", OLD) in host.calls
    assert host.taps["vnet0"].filter == OLD


@pytest.mark.parametrize(
    "target",
    [
        KnownNic(nic("tap", {"ifname": "tap7"}), ObservedBackend(type="tap", options={"ifname": "tap7"}),
                 Attachment(), "vm1/lan0"),
        KnownNic(nic("user", {"net": "10.0.2.0/24"}), ObservedBackend(type="user", options={}), None, "vm1/lan0"),
    ],
    ids=["operators-tap", "user"],
)
async def test_backends_without_a_bridge_port_of_qmpnets_are_refused_before_anything(target: KnownNic) -> None:
    host = PortsHost(taps={"tap7": FakePort("br-a")})
    with pytest.raises(Unsupported) as caught:
        await run_update(RecordingMonitor(), host, target, update(filter={}), NO_FLAP)
    assert caught.value.field == "update.filter"
    assert host.calls == []
