"""Reading a guest exactly, from answers captured on QEMU 7.2 and 10.0 (see capture_outputs.py for the guests).

Each captured guest is read through the real reader (:class:`qmpnet.adapters.qmp.reader.GuestReader`) answering from the
capture, and the test states the exact NIC set, buses and free places from the QEMU command line. Then what the
reader must refuse (answers of unknown shape), what it must survive (a guest changing while it is read), what it
keeps between reads, and the strict ``info network`` and ``device_add help`` parsers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from captures import SETUPS, VERSIONS, Capture, observe, without_net_clients

from qmpnet.adapters.qmp.parse import machine_kind, parse_device_help, parse_network
from qmpnet.adapters.qmp.reader import GuestReader
from qmpnet.core.inventory import nics_from
from qmpnet.core.model import ObservedBackend, PciAddress
from qmpnet.core.placement import Placement, place
from qmpnet.core.ports import NetClient, Observation, PciDevice
from qmpnet.errors import QmpCommandError, UnexpectedReply, Unsupported

if TYPE_CHECKING:
    from collections.abc import Mapping

    from qmpnet.core.model import Nic

USER_10_0_2 = ObservedBackend(type="user", options={"net": "10.0.2.0", "restrict": "off"})
PC_BUILTINS = {(0, 0): "Host bridge", (1, 0): "ISA bridge", (1, 1): "IDE controller", (1, 3): "Bridge"}
Q35_BUILTINS = {(0, 0): "Host bridge", (31, 0): "ISA bridge", (31, 2): "SATA controller", (31, 3): "SMBus"}
V1 = "/machine/peripheral/v1"
ROOT_PORTS_AND_BRIDGES = ("pcie-root-port", "pcie-pci-bridge", "pci-bridge")

versions = pytest.mark.parametrize("version", VERSIONS)


def nics(obs: Observation) -> dict[str, Nic]:
    return nics_from(obs, {}, set())


def places(obs: Observation) -> dict[str, PciAddress | None]:
    return {nic_id: nic.pci for nic_id, nic in nics(obs).items()}


def at(bus: str, slot: int, function: int = 0) -> PciAddress:
    return PciAddress(bus=bus, slot=slot, function=function)


def assert_no_phantoms(obs: Observation) -> None:
    """Bridges and root ports are never NICs, and carry nothing of what sits behind them."""
    for dev in obs.devices:
        if dev.driver in ROOT_PORTS_AND_BRIDGES:
            assert not dev.is_nic, dev
            assert (dev.mac, dev.netdev, dev.host) == (None, None, None), dev
    listed = nics(obs)
    assert all(nic.model not in ROOT_PORTS_AND_BRIDGES for nic in listed.values())
    assert len({nic.mac for nic in listed.values()}) == len(listed)  # no NIC listed twice under another name


@pytest.mark.parametrize(
    ("qom_type", "expected"),
    [
        ("pc-i440fx-7.2-machine", ("pc-i440fx-7.2", "pc")),
        ("pc-q35-10.0-machine", ("pc-q35-10.0", "q35")),
        ("pc-q35-2.12-machine", ("pc-q35-2.12", "q35")),
    ],
)
def test_machine_kind(qom_type: str, expected: tuple[str, str]) -> None:
    assert machine_kind(qom_type) == expected


# ------------------------------------------------------------------------------------------- captured guests


@pytest.mark.parametrize("setup", SETUPS)
@versions
def test_every_capture_reads_without_phantoms(version: str, setup: str) -> None:
    capture = Capture.load(version, setup)
    assert capture.qemu.startswith(version)
    obs = observe(capture)
    assert_no_phantoms(obs)
    assert obs.topology.root.name == ("pcie.0" if "q35" in setup else "pci.0")


@versions
def test_pc(version: str) -> None:
    obs = observe(Capture.load(version, "pc"))
    legacy = next(d.path for d in obs.devices if d.driver == "rtl8139")
    assert legacy is not None
    assert legacy.startswith("/machine/unattached/device[")
    assert obs.topology.machine == "pc"
    assert [(b.name, b.kind, b.hotplug) for b in obs.topology.buses] == [("pci.0", "root", True)]
    assert obs.topology.root.used == {**PC_BUILTINS, (2, 0): "rtl8139", (3, 0): "e1", (6, 0): "v1"}
    assert obs.device_ids == frozenset({"e1", "v1"})
    assert {d.id or d.driver: d for d in obs.devices if d.is_nic} == {
        "e1": PciDevice("e1", "e1000", "pci.0", 3, 0, "52:54:00:00:00:e1", "n1", path="/machine/peripheral/e1"),
        "v1": PciDevice("v1", "virtio-net-pci", "pci.0", 6, 0, "52:54:00:00:00:01", "hp1", path=V1),
        # -net nic: a device of the machine's own (/machine/unattached), on the hub port QEMU made for it
        "rtl8139": PciDevice(None, "rtl8139", "pci.0", 2, 0, "52:54:00:00:01:39", "hub0port0", path=legacy),
    }
    # The built-in functions are listed with QEMU's class description: query-pci's answer for them.
    assert {(d.slot, d.function): d.driver for d in obs.devices if d.path is None} == PC_BUILTINS
    listed = nics(obs)
    assert places(obs) == {"e1": at("pci.0", 3), "v1": at("pci.0", 6), "rtl8139.0": at("pci.0", 2)}
    assert listed["rtl8139.0"].backend == ObservedBackend(type="hubport", options={"hub": "0"})
    assert listed["e1"].backend == USER_10_0_2
    assert place("virtio-net-pci", obs.topology) == Placement("pci.0", 4, 0)


@versions
def test_pc_every_model(version: str) -> None:
    obs = observe(Capture.load(version, "pc-models"))
    listed = nics(obs)
    assert {nic_id: nic.model for nic_id, nic in listed.items()} == {
        "ee2": "e1000e",
        "rtl8139.0": "rtl8139",  # anonymous: named after its net client
        "v4": "virtio-net-pci",
        "e5": "e1000",
    }
    assert places(obs) == {"ee2": at("pci.0", 4), "rtl8139.0": at("pci.0", 7), "v4": at("pci.0", 8),
                           "e5": at("pci.0", 9)}  # fmt: skip
    assert listed["v4"].netdev is None  # a NIC with no backend is still a NIC (it has a MAC)
    assert listed["v4"].mac == "52:54:00:00:04:01"
    anonymous = next(d for d in obs.devices if d.driver == "rtl8139")
    assert (anonymous.id, anonymous.path) == (None, "/machine/peripheral-anon/device[0]")
    # A USB controller is a PCI device but no NIC; usb-net is a NIC but not on PCI: an id, nothing to place.
    xhci = next(d for d in obs.devices if d.id == "xhci")
    assert (xhci.driver, xhci.is_nic, obs.topology.root.used[(10, 0)]) == ("qemu-xhci", False, "xhci")
    assert "u6" in obs.device_ids
    assert "u6" not in {d.id for d in obs.devices}


@versions
def test_pc_with_pci_bridges(version: str) -> None:
    obs = observe(Capture.load(version, "pc-bridges"))
    assert [(b.name, b.kind, b.hotplug) for b in obs.topology.buses] == [
        ("pci.0", "root", True),
        ("br1", "pci_bridge", True),
        ("br2", "pci_bridge", True),
    ]
    buses = {b.name: b for b in obs.topology.buses}
    assert buses["pci.0"].used == {**PC_BUILTINS, (3, 0): "br1", (4, 0): "br2"}
    assert buses["br1"].used == {(1, 0): "eb1", (2, 0): "vb2"}
    assert buses["br2"].used == {}
    # Behind a bridge, with the bridge's bus and the NIC's own slot; the bridges themselves are not NICs.
    assert places(obs) == {"eb1": at("br1", 1), "vb2": at("br1", 2)}
    assert nics(obs)["eb1"].backend == USER_10_0_2
    assert place("rtl8139", obs.topology, bus="br2") == Placement("br2", 1, 0)
    assert place("e1000", obs.topology, bus="br1") == Placement("br1", 3, 0)
    assert place("e1000", obs.topology) == Placement("pci.0", 2, 0)


@versions
def test_pc_multifunction_slot(version: str) -> None:
    obs = observe(Capture.load(version, "pc-multifunction"))
    assert places(obs) == {
        "mf0": at("pci.0", 5, 0),
        "mf1": at("pci.0", 5, 1),
        "mf2": at("pci.0", 5, 2),
        "e1000e.0": at("pci.0", 5, 3),  # anonymous
    }
    assert {nic_id: nic.model for nic_id, nic in nics(obs).items()} == {
        "mf0": "e1000", "mf1": "rtl8139", "mf2": "virtio-net-pci", "e1000e.0": "e1000e",
    }  # fmt: skip
    assert {place: holder for place, holder in obs.topology.root.used.items() if place[0] == 5} == {
        (5, 0): "mf0", (5, 1): "mf1", (5, 2): "mf2", (5, 3): "e1000e",
    }  # fmt: skip
    # Slot 5 is taken as a whole: the next NIC goes to the first free slot.
    assert place("virtio-net-pci", obs.topology) == Placement("pci.0", 2, 0)


@versions
def test_q35_with_root_ports(version: str) -> None:
    obs = observe(Capture.load(version, "q35"))
    assert obs.topology.machine == "q35"
    buses = {b.name: b for b in obs.topology.buses}
    assert [b.name for b in obs.topology.buses] == ["pcie.0", "pcibr1", "rp1", "rp2", "rp3"]
    assert (buses["pcie.0"].kind, buses["pcie.0"].hotplug) == ("root", False)
    assert buses["pcie.0"].used == {**Q35_BUILTINS, (1, 0): "rp1", (2, 0): "rp2", (3, 0): "rp3"}
    for name in ("rp1", "rp2", "rp3"):
        assert (buses[name].kind, buses[name].hotplug) == ("root_port", True)
    assert buses["rp1"].used == {(0, 0): "v1"}
    assert buses["rp2"].used == {}
    assert buses["rp3"].used == {(0, 0): "pcibr1"}
    assert (buses["pcibr1"].kind, buses["pcibr1"].hotplug, buses["pcibr1"].used) == ("pci_bridge", True, {})
    assert obs.device_ids == frozenset({"rp1", "rp2", "rp3", "pcibr1", "v1"})
    assert places(obs) == {"v1": at("rp1", 0)}
    by_id = {d.id: d for d in obs.devices if d.id}
    assert by_id["pcibr1"] == PciDevice("pcibr1", "pcie-pci-bridge", "rp3", 0, 0, path="/machine/peripheral/pcibr1")
    assert place("virtio-net-pci", obs.topology) == Placement("rp2", 0, 0)
    assert place("e1000e", obs.topology) == Placement("rp2", 0, 0)
    assert place("rtl8139", obs.topology) == Placement("pcibr1", 1, 0)
    assert place("e1000", obs.topology, bus="rp2") == Placement("rp2", 0, 0)


@versions
def test_q35_nics_behind_a_pcie_pci_bridge_and_in_root_ports(version: str) -> None:
    # The guest of the phantom-NIC report: root ports and a pcie-pci-bridge above an e1000e, e1000 and rtl8139.
    obs = observe(Capture.load(version, "q35-bridge"))
    assert places(obs) == {
        "e2": at("rp1", 0),
        "e3": at("pcibr0", 1),
        "r4": at("pcibr0", 2),
        "rtl8139.1": at("pcibr0", 3),  # anonymous, behind the bridge
        "e6": at("pcie.0", 5),
        "v7": at("pcie.1", 0),  # in the second anonymous root port, whose bus QEMU named pcie.1
    }
    listed = nics(obs)
    assert {nic_id: (nic.mac, nic.netdev) for nic_id, nic in listed.items()} == {
        "e2": ("52:54:00:00:02:ee", "n2"),
        "e3": ("52:54:00:00:03:e1", "n3"),
        "r4": ("52:54:00:00:04:39", "n4"),
        "rtl8139.1": ("52:54:00:00:05:39", "n5"),
        "e6": ("52:54:00:00:06:ee", "n6"),
        "v7": ("52:54:00:00:07:01", "n7"),
    }
    for bridge in ("rp1", "rp2", "rp_br", "pcibr0"):
        assert bridge not in listed
    buses = [(b.name, b.kind, b.hotplug, dict(b.used)) for b in obs.topology.buses]
    assert buses[1:] == [
        ("pcibr0", "pci_bridge", True, {(1, 0): "e3", (2, 0): "r4", (3, 0): "rtl8139"}),
        # The first anonymous root port's bus is called pcie.0, like the root bus: it cannot be named in
        # device_add (QEMU would find the root bus), so it is listed and never planned on.
        ("pcie.0", "root_port", False, {}),
        ("pcie.1", "root_port", True, {(0, 0): "v7"}),
        ("rp1", "root_port", True, {(0, 0): "e2"}),
        ("rp2", "root_port", True, {}),
        ("rp_br", "root_port", True, {(0, 0): "pcibr0"}),
    ]
    root = obs.topology.root
    assert (root.name, root.kind, root.hotplug) == ("pcie.0", "root", False)
    assert root.used == {
        **Q35_BUILTINS, (5, 0): "e6", (8, 0): "rp1", (9, 0): "rp2", (10, 0): "rp_br",
        (11, 0): "pcie-root-port", (12, 0): "pcie-root-port",
    }  # fmt: skip
    assert place("virtio-net-pci", obs.topology) == Placement("rp2", 0, 0)
    assert place("rtl8139", obs.topology) == Placement("pcibr0", 4, 0)


@versions
def test_a_vfio_function_is_a_nic(version: str) -> None:
    # No host device to assign here: the capture of pc-models plus the answers QEMU gives for a vfio-pci device.
    capture = Capture.load(version, "pc-models")
    capture.add_device({"driver": "vfio-pci", "id": "hostnic", "host": "0000:03:00.0", "bus": "pci.0", "addr": "0b.0"})
    assert capture.answer("device-list-properties", {"typename": "vfio-pci"})  # captured, not made up
    obs = observe(capture)
    vfio = nics(obs)["hostnic"]
    assert (vfio.model, vfio.mac, vfio.netdev, vfio.pci) == ("vfio-pci", None, None, at("pci.0", 11))
    assert vfio.backend == ObservedBackend(type="vfio", options={"host": "0000:03:00.0"})


def test_a_machine_without_a_pci_host_bridge_is_unsupported() -> None:
    capture = Capture.load("7.2", "pc")
    machine = capture.answer("qom-list", {"path": "/machine"})
    assert isinstance(machine, list)
    capture.set_answer("qom-list", {"path": "/machine"}, [p for p in machine if "pcihost" not in p["type"]])
    with pytest.raises(Unsupported, match="no PCI root bus"):
        observe(capture)


# --------------------------------------------------------------------------- answers of unknown shape: errors


def changed(capture: Capture, command: str, arguments: Mapping[str, object] | None, value: object) -> Capture:
    capture = capture.copy()
    capture.set_answer(command, arguments, value)
    return capture


@pytest.mark.parametrize(
    ("command", "arguments", "value", "match"),
    [
        ("qom-list", {"path": "/machine/peripheral"}, {"name": "e1"}, "qom-list: the answer: Input should be"),
        ("qom-list", {"path": "/machine/peripheral"}, [{"name": "e1"}], r"qom-list: 0\.type: Field required"),
        ("query-pci", None, [{"bus": 0, "devices": [{"slot": 3}]}], r"query-pci: 0\.devices\.0\.bus: Field required"),
        ("query-pci", None, [{"bus": 1, "devices": []}], "query-pci: no PCI bus number 0"),
        ("qom-get", {"path": "/machine/peripheral/eb1", "property": "addr"}, "03.0", "qom-get addr: expected a PCI"),
        ("qom-get", {"path": "/machine/peripheral/eb1", "property": "addr"}, 256, "qom-get addr: expected a PCI devfn"),
        ("qom-get", {"path": "/machine/peripheral/eb1", "property": "mac"}, "52:54:00:00:00", "expected a MAC address"),
        ("qom-get", {"path": "/machine/peripheral/eb1", "property": "netdev"}, None, "qom-get netdev: expected a str"),
        ("qom-get", {"path": "/machine/peripheral/eb1", "property": "parent_bus"}, "br1", "expected an absolute QOM"),
        ("qom-list", {"path": "/machine/peripheral/br1"}, [], r"bridge /machine/peripheral/br1 has PCI buses \[\]"),
        ("device-list-properties", {"typename": "e1000"}, [{"name": 1, "type": "str"}], "device-list-properties"),
        ("human-monitor-command", {"command-line": "info network"}, "eb1 is a NIC\r\n", "not a net client line"),
        ("qom-list-types", {"implements": "pci-device", "abstract": True}, [{"parent": "x"}], "qom-list-types"),
    ],
)
def test_an_answer_of_unknown_shape_is_an_error(
    command: str, arguments: Mapping[str, object] | None, value: object, match: str
) -> None:
    capture = changed(Capture.load("7.2", "pc-bridges"), command, arguments, value)
    with pytest.raises(UnexpectedReply, match=match) as info:
        observe(capture)
    assert (info.value.code, info.value.qmp_class) == ("qmp_error", "UnexpectedReply")
    assert isinstance(info.value, QmpCommandError)


def test_two_devices_in_one_place_is_an_error() -> None:
    capture = changed(Capture.load("7.2", "pc-bridges"), "qom-get",
                      {"path": "/machine/peripheral/vb2", "property": "addr"}, 1 << 3)  # fmt: skip
    with pytest.raises(UnexpectedReply, match="both at"):
        observe(capture)


def test_a_query_error_is_passed_on() -> None:
    capture = Capture.load("7.2", "pc")
    del capture.answers[next(k for k, e in capture.answers.items() if e["execute"] == "query-pci")]
    with pytest.raises(QmpCommandError, match="no answer to query-pci"):
        observe(capture)


# ----------------------------------------------------------------------------- a guest that changes meanwhile


class Flaky:
    """A capture that shows the guest changing under the first ``times`` reads (``change`` says how)."""

    def __init__(self, capture: Capture, change: str, times: int) -> None:
        self.capture, self.change, self.times = capture, change, times
        self.reads = 0

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> object:
        answer = await self.capture.execute(command, arguments)
        if command == "query-pci":
            self.reads += 1
            if self.reads <= self.times and self.change == "added on the root bus":
                assert isinstance(answer, list)
                answer[0]["devices"].append({**answer[0]["devices"][-1], "slot": 20, "qdev_id": "late"})
        if self.change == "removed" and self.reads <= self.times and arguments == {
            "path": "/machine/peripheral/eb1", "property": "addr"
        }:  # fmt: skip
            raise QmpCommandError("qom-get: Device '/machine/peripheral/eb1' not found", qmp_class="DeviceNotFound",
                                  command="qom-get")  # fmt: skip
        return answer


@pytest.mark.parametrize("change", ["added on the root bus", "removed"])
def test_a_guest_that_changes_during_a_read_is_read_again(change: str) -> None:
    flaky = Flaky(Capture.load("7.2", "pc-bridges"), change, times=2)
    obs = observe(flaky.capture, GuestReader(flaky.execute, attempts=3))
    assert flaky.reads == 3
    assert set(nics(obs)) == {"eb1", "vb2"}


@pytest.mark.parametrize("change", ["added on the root bus", "removed"])
def test_a_guest_that_keeps_changing_is_an_error_after_the_attempts(change: str) -> None:
    flaky = Flaky(Capture.load("7.2", "pc-bridges"), change, times=99)
    with pytest.raises(UnexpectedReply, match="changed while it was read, 2 times in a row") as info:
        observe(flaky.capture, GuestReader(flaky.execute, attempts=2))
    assert ("late" if change.startswith("added") else "eb1") in info.value.message
    assert flaky.reads == 2


# --------------------------------------------------------------------------------------- what is kept, when


class Counting:
    def __init__(self, capture: Capture) -> None:
        self.capture = capture
        self.sent: list[tuple[str, object]] = []

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> object:
        self.sent.append((command, (arguments or {}).get("path")))
        return await self.capture.execute(command, arguments)


@versions
def test_a_second_read_asks_only_what_can_change(version: str) -> None:
    counting = Counting(Capture.load(version, "q35-bridge"))
    reader = GuestReader(counting.execute, attempts=3)
    first = observe(counting.capture, reader)
    cold = len(counting.sent)
    counting.sent.clear()
    again = observe(counting.capture, reader)
    assert again == first
    assert sorted(command for command, _ in counting.sent) == [
        "human-monitor-command", "qom-list", "qom-list", "query-pci",
    ]  # fmt: skip
    assert cold > 20  # the first read asked for every device's properties and every type's


def test_a_deleted_device_is_read_afresh_when_a_new_one_takes_its_id() -> None:
    counting = Counting(Capture.load("7.2", "pc-bridges"))
    reader = GuestReader(counting.execute, attempts=3)
    observe(counting.capture, reader)
    # eb1 is unplugged (DEVICE_DELETED) and another device takes its id, on the other bridge.
    counting.capture.forget_device("eb1")
    reader.forget("/machine/peripheral/eb1")
    counting.capture.add_device({"driver": "rtl8139", "id": "eb1", "netdev": "n1", "bus": "br2", "addr": "07.0",
                                 "mac": "52:54:00:00:0b:07"})  # fmt: skip
    counting.sent.clear()
    obs = observe(counting.capture, reader)
    assert places(obs)["eb1"] == at("br2", 7)
    assert nics(obs)["eb1"].model == "rtl8139"
    assert {path for command, path in counting.sent if command == "qom-get"} == {"/machine/peripheral/eb1"}


def test_a_device_whose_type_changed_under_its_id_is_read_afresh() -> None:
    # Without the event (say it raced the listing), a different type under the same path is still a new device.
    capture = Capture.load("7.2", "pc-bridges")
    reader = GuestReader(capture.execute, attempts=3)
    observe(capture, reader)
    capture.forget_device("vb2")
    capture.add_device({"driver": "e1000", "id": "vb2", "netdev": "n2", "bus": "br2", "addr": "03.0"})
    obs = observe(capture, reader)
    assert (nics(obs)["vb2"].model, places(obs)["vb2"]) == ("e1000", at("br2", 3))


def test_the_fake_keeps_its_capture_consistent() -> None:
    # What the fake QMP server does for device_add, netdev_add and an unplug, read back through the reader.
    capture = Capture.load("7.2", "q35")
    capture.add_netdev("x1.net", "user")
    capture.add_device({"driver": "e1000e", "id": "x1", "netdev": "x1.net", "bus": "rp2", "addr": "00.0",
                        "mac": "52:54:00:00:aa:01"})  # fmt: skip
    capture.add_netdev("x2.net", "user")
    capture.add_device({"driver": "rtl8139", "id": "x2", "netdev": "x2.net", "bus": "pcibr1", "addr": "01.0"})
    obs = observe(capture)
    assert places(obs) == {"v1": at("rp1", 0), "x1": at("rp2", 0), "x2": at("pcibr1", 1)}
    assert nics(obs)["x1"].backend == USER_10_0_2
    capture.forget_device("x1")
    capture.delete_netdev("x1.net")
    obs = observe(capture)
    assert set(nics(obs)) == {"v1", "x2"}
    assert "x1.net" not in obs.netclients


# ---------------------------------------------------------------------------------------------- info network


@versions
def test_pc_network(version: str) -> None:
    clients = parse_network(Capture.load(version, "pc").hmp("info network"))
    hub0 = ObservedBackend(type="hubport", options={"hub": "0"})
    hub1 = ObservedBackend(type="hubport", options={"hub": "1"})
    user = next(name for name in clients if name.startswith("#net"))  # -net user: a name QEMU makes up
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
        "hub0port1": NetClient("hub0port1", hub0, user),
        user: NetClient(user, USER_10_0_2, "hub0port1"),
        "v1": NetClient(
            "v1",
            ObservedBackend(type="nic", options={"model": "virtio-net-pci", "macaddr": "52:54:00:00:00:01"}),
            "hp1",
        ),
        "hp1": NetClient("hp1", hub1, "v1"),
        "hp2": NetClient("hp2", hub1, None),  # a hub port with nothing on it
    }


@versions
def test_a_nic_without_a_backend_and_a_non_pci_nic(version: str) -> None:
    clients = parse_network(Capture.load(version, "pc-models").hmp("info network"))
    assert clients["v4"].peer is None
    assert clients["u6"].backend.options == {"model": "usb-net", "macaddr": "52:54:00:00:06:06"}


def test_empty_network() -> None:
    assert parse_network("") == {}


def test_network_after_a_nic_was_unplugged() -> None:
    clients = parse_network(without_net_clients(Capture.load("7.2", "pc").hmp("info network"), "e1"))
    assert "e1" not in clients
    assert clients["n1"].peer is None  # the backend of an unplugged NIC lives on until netdev_del
    assert {"v1", "hp1", "hp2", "rtl8139.0"} <= set(clients)


# Lines as QEMU 7.2 and 10.0 print them (seen with -netdev stream/dgram/socket, a 2-queue tap and a filter).
OTHER_BACKENDS = (
    "s1: index=0,type=stream,unix:/tmp/s1.sock\r\n"  # 7.2
    "s2: index=0,type=stream,error: Failed to connect to '/tmp/x.sock': No such file or directory\r\n"  # 10.0
    "s3: index=0,type=stream,\r\n"
    "d1: index=0,type=dgram,udp=127.0.0.1:45678/127.0.0.1:45679\r\n"
    "d3: index=0,type=dgram,mcast=224.0.0.1:45690\r\n"
    "so1: index=0,type=socket,\r\n"
    "vt: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56\r\n"
    " \\ t1: index=0,type=tap,ifname=qexptap7,script=no,downscript=no\r\n"
    "vt: index=1,type=nic,\r\n"
    " \\ t1: index=1,type=tap,ifname=qexptap7,script=no,downscript=no\r\n"
    "eu: index=0,type=nic,model=e1000,macaddr=52:54:00:12:34:57\r\n"
    " \\ u1: index=0,type=user,net=10.0.2.0,restrict=off\r\n"
    "filters:\r\n"
    "  - f1: type=filter-buffer,interval=1000,position=tail,status=on,insert=behind,netdev=u1,queue=all\r\n"
    "t9: index=0,type=tap,fd=27\r\n"
)


def test_other_backends_queues_and_filters() -> None:
    clients = parse_network(OTHER_BACKENDS)
    assert clients["s1"].backend == ObservedBackend(type="stream", options={"info": "unix:/tmp/s1.sock"})
    assert clients["s2"].backend.options["info"].startswith("error: Failed to connect")  # free text, kept whole
    assert clients["s3"].backend == ObservedBackend(type="stream", options={})
    assert clients["d1"].backend == ObservedBackend(type="dgram", options={"udp": "127.0.0.1:45678/127.0.0.1:45679"})
    assert clients["d3"].backend.options == {"mcast": "224.0.0.1:45690"}
    # The second queue repeats the NIC and its tap: folded into queue 0.
    assert clients["vt"] == NetClient(
        "vt", ObservedBackend(type="nic", options={"model": "virtio-net-pci", "macaddr": "52:54:00:12:34:56"}), "t1"
    )
    assert clients["t1"].backend.options == {"ifname": "qexptap7", "script": "no", "downscript": "no"}
    assert clients["u1"] == NetClient("u1", USER_10_0_2, "eu")
    assert clients["t9"].backend.options == {"fd": "27"}
    assert set(clients) == {"s1", "s2", "s3", "d1", "d3", "so1", "vt", "t1", "eu", "u1", "t9"}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("e1: index=0,type=nic,model=e1000\r\n", "a NIC without model=...,macaddr="),
        ("e1: index=1,type=nic,model=e1000,macaddr=52:54:00:00:00:01\r\n", "a NIC queue line with options"),
        ("t1: index=1,type=tap,fd=3\r\n", "queue 1 of a net client whose queue 0 was not listed"),
        ("n1: index=0,type=user,net=10.0.2.0,restrict\r\n", "'restrict' is not key=value"),
        ("n1: type=user,net=10.0.2.0\r\n", "not a net client line"),
        (" \\ n1: index=0,type=user,net=10.0.2.0,restrict=off\r\n", "a line of unknown shape"),
        ("hub 0\r\n  hub0port0\r\n", "a line of unknown shape"),
        ("Net clients:\r\n", "not a net client line"),
    ],
)
def test_network_lines_of_unknown_shape_are_errors(text: str, match: str) -> None:
    with pytest.raises(UnexpectedReply, match=match):
        parse_network(text)


# ------------------------------------------------------------------------------------------- device_add help


@versions
def test_device_help_models(version: str) -> None:
    models = {m.name: m for m in parse_device_help(Capture.load(version, "pc").hmp("device_add help"))}
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
    assert len(models) == 27  # 7.2 has pvrdma, 10.0 has igb instead


def test_device_help_line_of_unknown_shape_is_an_error() -> None:
    with pytest.raises(UnexpectedReply, match="device_add help"):
        parse_device_help('Network devices:\r\nname "e1000", bus PCI\r\nsomething else\r\n')
