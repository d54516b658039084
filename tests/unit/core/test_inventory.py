"""The inventory a guest lane keeps between observations: built from the captured guest, updated by its steps."""

from __future__ import annotations

from fakemonitor import pc_observation

from qmpnet.core.hotadd_plan import plan_add
from qmpnet.core.inventory import Inventory, backend_of, nics_from
from qmpnet.core.model import ObservedBackend, PciAddress, parse_nic_spec
from qmpnet.core.placement import PciBus, PciTopology, Placement, place
from qmpnet.core.ports import NetClient, Observation, PciDevice


def inventory() -> Inventory:
    return Inventory.from_observation(pc_observation(), links={}, pending=set())


def test_from_observation_lists_the_captured_nics() -> None:
    inv = inventory()
    assert set(inv.nics) == {"e1", "v1", "rtl8139.0"}
    e1 = inv.nics["e1"]
    assert (e1.model, e1.mac, e1.netdev, e1.link, e1.state) == ("e1000", "52:54:00:00:00:e1", "n1", "up", "active")
    assert e1.pci == PciAddress(bus="pci.0", slot=3, function=0)
    assert e1.backend == ObservedBackend(type="user", options={"net": "10.0.2.0", "restrict": "off"})
    # The -net nic has no id: it is named after its net client, and its backend is the hub port.
    rtl = inv.nics["rtl8139.0"]
    assert rtl.netdev == "hub0port0"
    assert rtl.backend is not None
    assert rtl.backend.type == "hubport"
    assert inv.device_ids == {"e1", "v1"}
    assert {"n1", "hp1", "hp2", "hub0port0", "hub0port1"} <= inv.netdev_ids
    assert "e1" not in inv.netdev_ids


def test_from_observation_applies_links_and_pending() -> None:
    inv = Inventory.from_observation(pc_observation(), links={"e1": "down"}, pending={"v1"})
    assert inv.nics["e1"].link == "down"
    assert inv.nics["v1"].state == "removal_pending"
    assert inv.nics["rtl8139.0"].state == "active"


def test_view_carries_ids_macs_and_topology() -> None:
    view = inventory().view()
    assert "52:54:00:00:00:e1" in view.macs
    assert "e1" in view.device_ids
    assert view.topology.root.name == "pci.0"


def test_added_occupies_the_slot_so_the_next_placement_skips_it() -> None:
    inv = inventory()
    spec = parse_nic_spec({"id": "nic1", "mac": "52:54:00:aa:00:01", "link": "down"})
    first = plan_add(spec, inv.view())
    assert first.placement == Placement("pci.0", 4, 0)  # 0-3 and 6 are taken in the captured guest
    nic = inv.added(first, spec)
    assert nic.id == "nic1"
    assert nic.link == "down"
    assert nic.state == "active"
    assert nic.pci == PciAddress(bus="pci.0", slot=4, function=0)
    assert inv.nics["nic1"] == nic
    assert "nic1" in inv.device_ids
    assert "nic1.net" in inv.netdev_ids
    assert inv.topology.root.used[(4, 0)] == "nic1"
    second = plan_add(parse_nic_spec({"id": "nic2"}), inv.view())
    assert second.placement == Placement("pci.0", 5, 0)
    assert "52:54:00:aa:00:01" in inv.view().macs


def test_removed_frees_the_slot_so_the_next_placement_reuses_it() -> None:
    inv = inventory()
    spec = parse_nic_spec({"id": "nic1"})
    inv.added(plan_add(spec, inv.view()), spec)
    inv.removed("nic1")
    assert "nic1" not in inv.nics
    assert "nic1" not in inv.device_ids
    assert "nic1.net" not in inv.netdev_ids
    assert (4, 0) not in inv.topology.root.used
    assert place("e1000", inv.topology) == Placement("pci.0", 4, 0)
    # The id and netdev id are free again too.
    assert plan_add(parse_nic_spec({"id": "nic1"}), inv.view()).nic_id == "nic1"


def test_removed_cold_plugged_nic_frees_its_slot() -> None:
    inv = inventory()
    inv.removed("e1")
    assert (3, 0) not in inv.topology.root.used
    assert "n1" not in inv.netdev_ids
    assert place("virtio-net-pci", inv.topology) == Placement("pci.0", 3, 0)


def test_removed_unknown_nic_changes_nothing() -> None:
    inv = inventory()
    before = (dict(inv.nics), set(inv.device_ids), set(inv.netdev_ids), inv.topology)
    inv.removed("nope")
    assert (dict(inv.nics), set(inv.device_ids), set(inv.netdev_ids), inv.topology) == before


def test_update_changes_one_nic() -> None:
    inv = inventory()
    nic = inv.update("e1", link="down", state="removal_pending")
    assert (nic.link, nic.state) == ("down", "removal_pending")
    assert inv.nics["e1"] is nic


def test_backend_of_describes_the_spec_as_strings() -> None:
    spec = parse_nic_spec({"backend": {"type": "user", "hostfwd": ["tcp::1-:2", "udp::3-:4"], "restrict": True}})
    assert backend_of(spec) == ObservedBackend(
        type="user", options={"hostfwd": "tcp::1-:2;udp::3-:4", "restrict": "True"}
    )
    stream = parse_nic_spec({"backend": {"type": "stream", "addr": {"type": "inet", "host": "h", "port": 5}}})
    assert backend_of(stream).options == {"addr": "host=h,port=5"}


def test_nics_are_the_devices_read_as_nics_each_once() -> None:
    # A root port above a NIC carries nothing of it; an anonymous NIC with the MAC and model of a NIC that has an
    # id is not named after that one; two anonymous NICs QEMU cannot tell apart are named by their PCI place.
    nic = ObservedBackend(type="nic", options={"model": "e1000", "macaddr": "52:54:00:00:00:01"})
    other = ObservedBackend(type="nic", options={"model": "e1000", "macaddr": "52:54:00:00:00:02"})
    obs = Observation(
        "pc-q35-7.2",
        PciTopology("q35", (PciBus("pcie.0", "root", hotplug=False), PciBus("rp1", "root_port", hotplug=True))),
        (
            PciDevice("rp1", "pcie-root-port", "pcie.0", 1, 0),
            PciDevice("a", "e1000", "rp1", 0, 0, "52:54:00:00:00:01", "n1"),
            PciDevice(None, "e1000", "pcie.0", 5, 0, "52:54:00:00:00:01", "n2"),
            PciDevice(None, "e1000", "pcie.0", 6, 0, "52:54:00:00:00:02", None),
            PciDevice(None, "e1000", "pcie.0", 7, 0, "52:54:00:00:00:02", None),
        ),
        frozenset({"rp1", "a"}),
        {
            "a": NetClient("a", nic, "n1"),
            "e1000.0": NetClient("e1000.0", nic, "n2"),
            "e1000.1": NetClient("e1000.1", other),
            "e1000.2": NetClient("e1000.2", other),
        },
    )
    assert list(nics_from(obs, {}, set())) == ["a", "e1000.0", "pcie.0:06.0", "pcie.0:07.0"]
