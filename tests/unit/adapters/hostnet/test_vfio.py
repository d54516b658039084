"""VFIO checks, binding and restoring, against fake sysfs trees with a fake kernel behind the writes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from fakesysfs import FakeKernel, FakeTree

from qmpnet.adapters.hostnet.vfio import Sysfs, bind_vfio, check_vfio, parse_pci_host, restore_driver
from qmpnet.errors import InvalidRequest, NotFound, QmpnetError, Unsupported

if TYPE_CHECKING:
    from pathlib import Path

NIC = "0000:03:00.0"
SIBLING = "0000:03:00.1"
BRIDGE = "0000:00:1c.0"
ETHERNET = 0x020000
STORAGE = 0x010802
PCI_BRIDGE = 0x060400


@pytest.fixture
def tree(tmp_path: Path) -> FakeTree:
    tree = FakeTree(tmp_path / "sys")
    tree.add_driver("vfio-pci")
    return tree


# ------------------------------------------------------------------------------------------------ addresses


@pytest.mark.parametrize(
    ("value", "normal"),
    [("0000:03:00.0", NIC), ("03:00.0", NIC), ("0000:AF:1F.7", "0000:af:1f.7"), ("abcd:00:00.1", "abcd:00:00.1")],
)
def test_pci_addresses_are_normalized(value: str, normal: str) -> None:
    assert parse_pci_host(value) == normal


@pytest.mark.parametrize(
    "value", ["", "03:00", "0000:03:00.8", "0000:03:20.0", "00000:03:00.0", "0000:3:00.0", "../03:00.0", "03:00.0 "]
)
def test_bad_pci_addresses_are_invalid_requests(value: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_pci_host(value)
    assert caught.value.field == "nic.backend.host"


# ------------------------------------------------------------------------------------------------ checks


def test_a_nic_on_vfio_pci_alone_in_its_group_passes(tree: FakeTree) -> None:
    tree.add_device(NIC, ETHERNET, "vfio-pci", "12")
    device = check_vfio(NIC, sysfs=tree.root)
    assert device.address == NIC
    assert device.iommu_group == "12"
    assert device.driver == "vfio-pci"
    assert not device.needs_rebind
    assert [m.address for m in device.members] == [NIC]


def test_unknown_device_is_not_found(tree: FakeTree) -> None:
    with pytest.raises(NotFound) as caught:
        check_vfio("0000:99:00.0", sysfs=tree.root)
    assert caught.value.field == "nic.backend.host"
    assert "0000:99:00.0" in str(caught.value)


def test_wrong_class_is_an_invalid_request(tree: FakeTree) -> None:
    tree.add_device(NIC, STORAGE, "vfio-pci", "12")
    with pytest.raises(InvalidRequest) as caught:
        check_vfio(NIC, sysfs=tree.root)
    assert caught.value.field == "nic.backend.host"
    assert "not a network controller" in str(caught.value)
    assert "0x010802" in str(caught.value)


def test_missing_iommu_group_is_unsupported(tree: FakeTree) -> None:
    tree.add_device(NIC, ETHERNET, "vfio-pci", None)
    with pytest.raises(Unsupported) as caught:
        check_vfio(NIC, sysfs=tree.root)
    assert caught.value.field == "nic.backend.host"
    assert "no IOMMU group" in str(caught.value)
    assert "intel_iommu=on" in str(caught.value)


def test_group_member_bound_elsewhere_is_named_with_its_driver(tree: FakeTree) -> None:
    tree.add_device(NIC, ETHERNET, "vfio-pci", "12")
    tree.add_device(SIBLING, ETHERNET, "igb", "12")
    for rebind in (False, True):
        with pytest.raises(Unsupported) as caught:
            check_vfio(NIC, rebind=rebind, sysfs=tree.root)
        assert caught.value.field == "nic.backend.host"
        assert SIBLING in str(caught.value)
        assert "igb" in str(caught.value)


def test_unbound_stub_and_bridge_members_are_viable(tree: FakeTree) -> None:
    tree.add_device(NIC, ETHERNET, "vfio-pci", "12")
    tree.add_device(SIBLING, ETHERNET, None, "12")
    tree.add_device("0000:03:00.2", ETHERNET, "pci-stub", "12")
    tree.add_device(BRIDGE, PCI_BRIDGE, "pcieport", "12")
    device = check_vfio(NIC, sysfs=tree.root)
    assert {m.address: m.driver for m in device.members} == {
        BRIDGE: "pcieport", NIC: "vfio-pci", SIBLING: None, "0000:03:00.2": "pci-stub"
    }


def test_device_on_a_host_driver_needs_rebind(tree: FakeTree) -> None:
    tree.add_device(NIC, ETHERNET, "e1000e", "12")
    with pytest.raises(InvalidRequest) as caught:
        check_vfio(NIC, sysfs=tree.root)
    assert "e1000e" in str(caught.value)
    assert "rebind" in str(caught.value)
    device = check_vfio(NIC, rebind=True, sysfs=tree.root)
    assert device.needs_rebind
    assert device.driver == "e1000e"


def test_rebind_without_vfio_pci_loaded_is_unsupported(tmp_path: Path) -> None:
    tree = FakeTree(tmp_path / "sys")
    tree.add_device(NIC, ETHERNET, "e1000e", "12")
    with pytest.raises(Unsupported) as caught:
        check_vfio(NIC, rebind=True, sysfs=tree.root)
    assert "modprobe vfio-pci" in str(caught.value)
    with pytest.raises(Unsupported):
        bind_vfio(NIC, sysfs=tree.root)


def test_accepts_a_sysfs_object_and_short_addresses(tree: FakeTree) -> None:
    tree.add_device(NIC, ETHERNET, "vfio-pci", "3")
    assert check_vfio("03:00.0", sysfs=Sysfs(tree.root)).address == NIC


# ------------------------------------------------------------------------------------------------ rebinding


def test_bind_and_restore_round_trip(tree: FakeTree) -> None:
    tree.add_device(NIC, ETHERNET, "e1000e", "12")
    kernel = FakeKernel(tree)
    original = bind_vfio(NIC, sysfs=kernel)
    assert original == "e1000e"
    assert tree.driver(NIC) == "vfio-pci"
    assert kernel.writes == [
        (f"bus/pci/devices/{NIC}/driver_override", "vfio-pci"),
        ("bus/pci/drivers/e1000e/unbind", NIC),
        ("bus/pci/drivers_probe", NIC),
    ]
    assert not check_vfio(NIC, sysfs=kernel).needs_rebind

    kernel.writes.clear()
    restore_driver(NIC, original, sysfs=kernel)
    assert tree.driver(NIC) == "e1000e"
    assert tree.device(NIC).joinpath("driver_override").read_text() == "(null)"
    assert kernel.writes == [
        (f"bus/pci/devices/{NIC}/driver_override", "\n"),
        ("bus/pci/drivers/vfio-pci/unbind", NIC),
        ("bus/pci/drivers_probe", NIC),
    ]


def test_bind_of_an_unbound_device_and_restore_to_unbound(tree: FakeTree) -> None:
    tree.add_device(NIC, ETHERNET, None, "12")
    kernel = FakeKernel(tree)
    assert bind_vfio(NIC, sysfs=kernel) is None
    assert tree.driver(NIC) == "vfio-pci"
    restore_driver(NIC, None, sysfs=kernel)
    assert tree.driver(NIC) is None


def test_bind_is_a_no_op_on_vfio_pci(tree: FakeTree) -> None:
    tree.add_device(NIC, ETHERNET, "vfio-pci", "12")
    kernel = FakeKernel(tree)
    assert bind_vfio(NIC, sysfs=kernel) == "vfio-pci"
    restore_driver(NIC, "vfio-pci", sysfs=kernel)
    assert kernel.writes == []
    assert tree.driver(NIC) == "vfio-pci"


def test_failed_bind_gives_the_device_back(tree: FakeTree) -> None:
    tree.add_device(NIC, ETHERNET, "e1000e", "12")
    kernel = FakeKernel(tree, vfio_refuses=True)
    with pytest.raises(Unsupported) as caught:
        bind_vfio(NIC, sysfs=kernel)
    assert "did not bind to vfio-pci" in str(caught.value)
    assert tree.driver(NIC) == "e1000e"
    assert tree.device(NIC).joinpath("driver_override").read_text() == "(null)"


def test_restore_falls_back_to_the_drivers_bind_file(tree: FakeTree) -> None:
    tree.add_device(NIC, ETHERNET, "e1000e", "12")
    kernel = FakeKernel(tree)
    bind_vfio(NIC, sysfs=kernel)
    tree.default_driver[NIC] = None  # probing no longer finds e1000e (e.g. a new_id driver)
    restore_driver(NIC, "e1000e", sysfs=kernel)
    assert tree.driver(NIC) == "e1000e"
    assert kernel.writes[-1] == ("bus/pci/drivers/e1000e/bind", NIC)


def test_sysfs_write_errors_are_qmpnet_errors(tree: FakeTree) -> None:
    tree.add_device(NIC, ETHERNET, "e1000e", "12")

    class Refusing(Sysfs):
        def write(self, path: Path, text: str) -> None:
            raise PermissionError(13, "Permission denied")

    with pytest.raises(QmpnetError) as caught:
        bind_vfio(NIC, sysfs=Refusing(tree.root))
    assert "Permission denied" in str(caught.value)
    assert tree.driver(NIC) == "e1000e"
