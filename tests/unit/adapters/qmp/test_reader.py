"""Reading a guest through the real adapter: the NIC list, rx-filters, models, and q35 placement."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from captures import VERSIONS, Capture
from fakeqmp import Command, FakeQmp

import qmpnet
from qmpnet.core.model import PciAddress
from qmpnet.errors import NoFreeSlot

if TYPE_CHECKING:
    from pathlib import Path

    from qmpnet.settings import Settings


async def test_list_nics(fake: FakeQmp, fast: Settings) -> None:
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        nics = {nic.id: nic for nic in await guest.list_nics()}
    assert set(nics) == {"e1", "v1", "rtl8139.0"}
    assert (nics["e1"].model, nics["e1"].netdev, nics["e1"].mac) == ("e1000", "n1", "52:54:00:00:00:e1")
    assert nics["v1"].backend is not None
    assert nics["v1"].backend.type == "hubport"
    # Only virtio reports an rx-filter, and it is asked for by name (a bare query-rx-filter costs ~24 KB a NIC).
    assert [c for c in fake.commands() if c.name == "query-rx-filter"] == [Command("query-rx-filter", {"name": "v1"})]
    assert nics["v1"].rx_filter is not None
    assert nics["v1"].rx_filter.main_mac == "52:54:00:00:00:01"
    assert nics["e1"].rx_filter is None


async def test_rx_filter_unsupported_is_none(fake: FakeQmp, fast: Settings) -> None:
    fake.fail("query-rx-filter", "net client(v1) doesn't support rx-filter querying")
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        nics = {nic.id: nic for nic in await guest.list_nics()}
    assert nics["v1"].rx_filter is None


async def test_rx_filter_other_error_is_raised(fake: FakeQmp, fast: Settings) -> None:
    fake.fail("query-rx-filter", "Invalid net client name: v1")
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        with pytest.raises(qmpnet.QmpCommandError, match="Invalid net client"):
            await guest.list_nics()


async def test_models(fake: FakeQmp, fast: Settings) -> None:
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        models = await guest.models()
    assert sorted(m.name for m in models if m.hotplug) == ["e1000", "e1000e", "rtl8139", "virtio-net-pci"]
    assert Command("human-monitor-command", {"command-line": "device_add help"}) in fake.commands()


@pytest.mark.parametrize("version", VERSIONS)
async def test_q35_guest_places_by_model(sockdir: Path, fast: Settings, version: str) -> None:
    async with (
        FakeQmp(sockdir / "q35.qmp", capture=Capture.load(version, "q35")) as fake,
        qmpnet.connect(str(fake.path), settings=fast) as guest,
    ):
        virtio = await guest.add_nic({"id": "x1"})
        rtl = await guest.add_nic({"id": "x2", "model": "rtl8139"})
        with pytest.raises(NoFreeSlot, match="pcie-root-port"):
            await guest.add_nic({"id": "x3", "model": "e1000e"})  # rp1 and rp2 hold NICs, rp3 the bridge
    places = [(c.arguments["bus"], c.arguments["addr"]) for c in fake.changes() if c.name == "device_add"]
    assert places == [("rp2", "00.0"), ("pcibr1", "01.0")]
    assert virtio.pci == PciAddress(bus="rp2", slot=0, function=0)
    assert rtl.pci == PciAddress(bus="pcibr1", slot=1, function=0)
    assert fake.change_names() == ["netdev_add", "device_add", "netdev_add", "device_add"]


async def test_guest_without_a_pci_root_bus_is_unsupported(sockdir: Path, fast: Settings) -> None:
    # A machine with no i440FX or q35 host bridge (microvm): /machine has no PCI host bridge child.
    capture = Capture.load("7.2", "pc")
    capture.set_answer("qom-get", {"path": "/machine", "property": "type"}, "microvm-machine")
    machine = capture.answer("qom-list", {"path": "/machine"})
    assert isinstance(machine, list)
    capture.set_answer("qom-list", {"path": "/machine"}, [p for p in machine if "pcihost" not in p["type"]])
    async with (
        FakeQmp(sockdir / "nopci.qmp", capture=capture) as fake,
        qmpnet.connect(str(fake.path), settings=fast) as guest,
    ):
        with pytest.raises(qmpnet.Unsupported):
            await guest.add_nic({})
    assert fake.change_names() == []
