"""The HMP parsers against outputs captured from QEMU 7.2 (see capture_outputs.py for the command lines)."""

from __future__ import annotations

import pytest
from fakeqmp import captured, without_device, without_net_clients

from qmpnet.model import ObservedBackend
from qmpnet.placement import PciBus, Placement, place
from qmpnet.ports import NetClient, PciDevice
from qmpnet.qmp.parse import machine_kind, parse_device_help, parse_network, parse_qtree

PC_USED = {
    (0, 0): "i440FX",
    (1, 0): "PIIX3",
    (1, 1): "piix3-ide",
    (1, 3): "PIIX4_PM",
    (2, 0): "rtl8139",
    (3, 0): "e1",
    (6, 0): "v1",
}
USER_10_0_2 = ObservedBackend(type="user", options={"net": "10.0.2.0", "restrict": "off"})


@pytest.mark.parametrize(
    ("qom_type", "expected"),
    [
        ("pc-i440fx-7.2-machine", ("pc-i440fx-7.2", "pc")),
        ("pc-q35-7.2-machine", ("pc-q35-7.2", "q35")),
        ("pc-q35-2.12-machine", ("pc-q35-2.12", "q35")),
    ],
)
def test_machine_kind(qom_type: str, expected: tuple[str, str]) -> None:
    assert machine_kind(qom_type) == expected


# ---------------------------------------------------------------------------------------------- info qtree


def test_pc_qtree_topology() -> None:
    tree = parse_qtree(captured("pc-qtree"), "pc")
    assert tree.topology.machine == "pc"
    assert tree.topology.buses == (PciBus("pci.0", "root", hotplug=True, used=PC_USED),)


def test_pc_qtree_devices() -> None:
    tree = parse_qtree(captured("pc-qtree"), "pc")
    nics = {d.id or d.driver: d for d in tree.devices if d.mac is not None}
    assert nics == {
        "e1": PciDevice("e1", "e1000", "pci.0", 3, 0, "52:54:00:00:00:e1", "n1"),
        # virtio-net-pci keeps mac and netdev on its virtio-net-device child
        "v1": PciDevice("v1", "virtio-net-pci", "pci.0", 6, 0, "52:54:00:00:00:01", "hp1"),
        # -net nic: no id, its netdev is the hub port QEMU made for it
        "rtl8139": PciDevice(None, "rtl8139", "pci.0", 2, 0, "52:54:00:00:01:39", "hub0port0"),
    }
    assert len(tree.devices) == len(PC_USED)  # only PCI devices; the ISA and i2c ones are not listed
    assert {d.driver for d in tree.devices if d.mac is None} == {"i440FX", "PIIX3", "piix3-ide", "PIIX4_PM"}
    assert tree.device_ids == frozenset({"e1", "v1"})


def test_q35_qtree_topology() -> None:
    tree = parse_qtree(captured("q35-qtree"), "q35")
    assert tree.topology.machine == "q35"
    buses = {b.name: b for b in tree.topology.buses}
    assert tree.topology.root.name == "pcie.0"
    assert tree.topology.buses[0].name == "pcie.0"
    assert set(buses) == {"pcie.0", "rp1", "rp2", "rp3", "pcibr1"}
    assert (buses["pcie.0"].kind, buses["pcie.0"].hotplug) == ("root", False)
    assert buses["pcie.0"].used == {
        (0, 0): "mch",
        (1, 0): "rp1",
        (2, 0): "rp2",
        (3, 0): "rp3",
        (31, 0): "ICH9-LPC",
        (31, 2): "ich9-ahci",
        (31, 3): "ICH9-SMB",
    }
    for name in ("rp1", "rp2", "rp3"):
        assert (buses[name].kind, buses[name].hotplug) == ("root_port", True)
    assert buses["rp1"].used == {(0, 0): "v1"}
    assert buses["rp2"].used == {}
    assert buses["rp3"].used == {(0, 0): "pcibr1"}
    assert (buses["pcibr1"].kind, buses["pcibr1"].hotplug, buses["pcibr1"].used) == ("pci_bridge", True, {})


def test_q35_qtree_devices() -> None:
    tree = parse_qtree(captured("q35-qtree"), "q35")
    assert tree.device_ids == frozenset({"rp1", "rp2", "rp3", "pcibr1", "v1"})
    by_id = {d.id: d for d in tree.devices if d.id}
    assert by_id["v1"] == PciDevice("v1", "virtio-net-pci", "rp1", 0, 0, "52:54:00:00:00:01", "n1")
    assert by_id["pcibr1"] == PciDevice("pcibr1", "pcie-pci-bridge", "rp3", 0, 0)
    assert by_id["rp2"] == PciDevice("rp2", "pcie-root-port", "pcie.0", 2, 0)


def test_q35_placement_on_the_captured_guest() -> None:
    topology = parse_qtree(captured("q35-qtree"), "q35").topology
    assert place("virtio-net-pci", topology) == Placement("rp2", 0, 0)
    assert place("e1000e", topology) == Placement("rp2", 0, 0)
    assert place("rtl8139", topology) == Placement("pcibr1", 1, 0)
    assert place("e1000", topology, bus="rp2") == Placement("rp2", 0, 0)


def test_pc_with_bridges() -> None:
    topology = parse_qtree(captured("pc-bridges-qtree"), "pc").topology
    assert [(b.name, b.kind, b.hotplug) for b in topology.buses] == [
        ("pci.0", "root", True),
        ("br1", "pci_bridge", True),
        ("br2", "pci_bridge", True),
    ]
    assert topology.root.used[(2, 0)] == "br1"
    assert place("rtl8139", topology, bus="br2") == Placement("br2", 1, 0)


def test_qtree_without_a_device() -> None:
    # The fake monitor's unplug helper must leave a tree the parser reads as "that device is gone".
    tree = parse_qtree(without_device(captured("pc-qtree"), "v1"), "pc")
    assert "v1" not in tree.device_ids
    assert (6, 0) not in tree.topology.root.used
    assert {d.netdev for d in tree.devices if d.netdev} == {"n1", "hub0port0"}


# -------------------------------------------------------------------------------------------- info network


def test_pc_network() -> None:
    clients = parse_network(captured("pc-network"))
    hub0 = ObservedBackend(type="hubport", options={"hub": "0"})
    hub1 = ObservedBackend(type="hubport", options={"hub": "1"})
    assert clients == {
        "e1": NetClient(
            "e1", ObservedBackend(type="nic", options={"model": "e1000", "macaddr": "52:54:00:00:00:e1"}), "n1"
        ),
        "n1": NetClient("n1", USER_10_0_2, "e1"),
        "rtl8139.0": NetClient(
            "rtl8139.0",
            ObservedBackend(type="nic", options={"model": "rtl8139", "macaddr": "52:54:00:00:01:39"}),
            "hub0port0",
        ),
        "hub0port0": NetClient("hub0port0", hub0, "rtl8139.0"),
        "hub0port1": NetClient("hub0port1", hub0, "#net185"),
        "#net185": NetClient("#net185", USER_10_0_2, "hub0port1"),
        "v1": NetClient(
            "v1",
            ObservedBackend(type="nic", options={"model": "virtio-net-pci", "macaddr": "52:54:00:00:00:01"}),
            "hp1",
        ),
        "hp1": NetClient("hp1", hub1, "v1"),
        "hp2": NetClient("hp2", hub1, None),  # a hub port with nothing on it
    }


def test_q35_network() -> None:
    clients = parse_network(captured("q35-network"))
    assert set(clients) == {"v1", "n1"}
    assert clients["v1"].peer == "n1"
    assert clients["v1"].backend.type == "nic"
    assert clients["n1"] == NetClient("n1", USER_10_0_2, "v1")


def test_empty_network() -> None:
    assert parse_network(captured("pc-bridges-network")) == {}


def test_network_after_a_nic_was_unplugged() -> None:
    clients = parse_network(without_net_clients(captured("pc-network"), "e1"))
    assert "e1" not in clients
    assert clients["n1"].peer is None  # the backend of an unplugged NIC lives on until netdev_del
    assert {"v1", "hp1", "hp2", "rtl8139.0"} <= set(clients)


# ---------------------------------------------------------------------------------------- device_add help


def test_device_help_models() -> None:
    models = {m.name: m for m in parse_device_help(captured("pc-device-add-help"))}
    supported = {n: (m.bus, m.speed) for n, m in models.items() if m.hotplug}
    assert supported == {
        "virtio-net-pci": ("pcie", "10G"),
        "e1000": ("pci", "1G"),
        "e1000e": ("pcie", "1G"),
        "rtl8139": ("pci", "100M"),
    }
    assert models["e1000"].description == "Intel Gigabit Ethernet"
    assert models["e1000e"].description == "Intel 82574L GbE Controller"
    assert models["rtl8139"].description == "rtl8139"  # no desc in QEMU's list: the name stands in
    # Other PCI NICs are listed, not hot-plugged by qmpnet, and have no nominal speed.
    assert (models["vmxnet3"].hotplug, models["vmxnet3"].speed) == (False, None)
    assert models["pcnet"].bus == "pci"
    # Only PCI network devices: not ISA/USB/virtio-bus ones, nothing from the other sections.
    for name in ("ne2k_isa", "usb-net", "virtio-net-device", "virtio-gpu-pci", "pci-serial", "i6300esb"):
        assert name not in models
    assert len(models) == 27
