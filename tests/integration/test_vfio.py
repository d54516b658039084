"""Direct assignment (VFIO) end to end: qmpnet's host checks on a fake sysfs tree, then a real QEMU.

There is no IOMMU on CI machines, so no PCI function can really be handed to a guest. What can be exercised for
real is everything around it: qmpnet reads the sysfs tree named by ``settings.hostnet.sysfs_root`` (a fake one
built here under ``tmp_path``, laid out like the kernel's), decides, and then sends ``device_add vfio-pci
host=...`` to a real QEMU (``-S``, no guest OS). The address used does not exist on the real host, so QEMU answers
with a clean error, and qmpnet must leave QEMU and the (fake) host exactly as before.

Binding to ``vfio-pci`` (``rebind: true``) needs the kernel's reaction to sysfs writes. A plain file tree cannot
give it: the write lands and nothing binds, which qmpnet must treat as a failed bind and undo. To follow the
successful path too, :class:`FakeKernel` stands in for the kernel behind the writes, swapped in for the sysfs
root qmpnet was configured with (the lane, ``HostNet`` and the VFIO functions are the real ones).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import needs
import pytest
import pytest_asyncio
from aux_qmp import aux_args, aux_monitor
from fakesysfs import FakeKernel, FakeTree

import qmpnet
from qmpnet.adapters.hostnet import HostnetSettings
from qmpnet.adapters.hostnet import vfio as vfio_module
from qmpnet.errors import Forbidden, InvalidRequest, NotFound, QmpCommandError, Unsupported
from qmpnet.settings import Settings
from qmpnet.testguest import TestMachine

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

pytestmark = [
    pytest.mark.integration,
    pytest.mark.asyncio(loop_scope="module"),
    needs.tool("qemu-system-x86_64", "qemu-system-x86"),
]

#: A PCI address that exists in the fake tree and not on the real host, so QEMU itself cannot open it.
NIC = "0000:42:00.0"
SIBLING = "0000:42:00.1"
ETHERNET, STORAGE, PCI_BRIDGE = 0x020000, 0x010802, 0x060400


@pytest.fixture
def tree(tmp_path: Path) -> FakeTree:
    tree = FakeTree(tmp_path / "sys")
    tree.add_driver("vfio-pci")
    return tree


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vm(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TestMachine]:
    """QEMU paused (``-S``) without a guest: device_add and its errors need no OS."""
    workdir = tmp_path_factory.mktemp("vfio-e2e")
    extra = aux_args(workdir)
    async with TestMachine(None, name="vfio-e2e", boot=False, workdir=workdir, extra_args=extra) as machine:
        yield machine


async def qemu_state(vm: TestMachine) -> tuple[object, object, str]:
    """What must not change: the PCI devices, the peripherals and the net clients, read over the aux monitor."""
    async with aux_monitor(vm.workdir) as aux:
        pci = await aux.execute("query-pci")
        peripherals = await aux.execute("qom-list", {"path": "/machine/peripheral"})
        network = await aux.execute("human-monitor-command", {"command-line": "info network"})
    return pci, peripherals, str(network)


def settings_for(tree: FakeTree, policy: qmpnet.Policy | None = None) -> Settings:
    return Settings(hostnet=HostnetSettings(sysfs_root=tree.root), policy=policy or qmpnet.Policy())


@pytest.fixture
def kernel(tree: FakeTree, monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
    """Let the fake kernel answer the VFIO functions' sysfs writes wherever qmpnet's host side uses the fake tree.

    The host side imports them from their module when a vfio NIC needs them, so they are replaced there.
    """
    fake = FakeKernel(tree)
    for name in ("check_vfio", "bind_vfio", "restore_driver"):
        real = cast("Callable[..., Any]", getattr(vfio_module, name))

        def with_kernel(*args: Any, sysfs: Path, _real: Callable[..., Any] = real, **kwargs: Any) -> Any:
            assert sysfs == tree.root, "qmpnet did not use the configured sysfs_root"
            return _real(*args, sysfs=fake, **kwargs)

        monkeypatch.setattr(vfio_module, name, with_kernel)
    return fake


# ------------------------------------------------------------------------------------------- QEMU answers


async def test_ready_function_passes_the_checks_and_qemus_error_leaves_nothing(vm: TestMachine, tree: FakeTree) -> None:
    tree.add_device(NIC, ETHERNET, "vfio-pci", "12")
    tree.add_device("0000:40:1c.0", PCI_BRIDGE, "pcieport", "12")  # a bridge in the group is harmless
    before = await qemu_state(vm)
    async with qmpnet.connect(str(vm.qmp_path), name=vm.name, settings=settings_for(tree)) as guest:
        nics_before = await guest.list_nics()
        with pytest.raises(QmpCommandError) as caught:
            await guest.add_nic({"id": "hostnic0", "backend": {"type": "vfio", "host": "42:00.0"}})
        assert await guest.list_nics() == nics_before
    err = caught.value
    assert (err.code, err.command, err.qmp_class) == ("qmp_error", "device_add", "GenericError")
    assert NIC in err.message
    print(f"\nQEMU answers device_add vfio-pci host={NIC}: {err.message}")  # noqa: T201 - for the record
    assert await qemu_state(vm) == before
    assert (tree.driver(NIC), tree.override(NIC)) == ("vfio-pci", "(null)")


@pytest.mark.parametrize(
    ("setup", "error", "says"),
    [
        (lambda t: t.add_device(NIC, STORAGE, "vfio-pci", "12"), InvalidRequest, "0x010802"),
        (lambda t: t.add_device(NIC, ETHERNET, "vfio-pci", None), Unsupported, "no IOMMU group"),
        (lambda t: (t.add_device(NIC, ETHERNET, "vfio-pci", "12"), t.add_device(SIBLING, ETHERNET, "igb", "12")),
         Unsupported, f"{SIBLING}, bound to host driver igb"),
        (lambda t: t.add_device(NIC, ETHERNET, "e1000e", "12"), InvalidRequest, "rebind: true"),
        (lambda t: t.add_device(SIBLING, ETHERNET, "vfio-pci", "12"), NotFound, NIC),
    ],
    ids=["wrong-class", "no-iommu-group", "member-bound-elsewhere", "on-a-host-driver", "missing"],
)
async def test_refused_by_the_host_checks_nothing_reaches_qemu(
    vm: TestMachine, tree: FakeTree, setup: Callable[[FakeTree], object], error: type[Exception], says: str
) -> None:
    setup(tree)
    before = await qemu_state(vm)
    async with qmpnet.connect(str(vm.qmp_path), name=vm.name, settings=settings_for(tree)) as guest:
        with pytest.raises(error) as caught:
            await guest.add_nic({"backend": {"type": "vfio", "host": NIC}})
    assert isinstance(caught.value, qmpnet.QmpnetError)
    assert caught.value.field == "nic.backend.host"
    assert says in caught.value.message
    assert await qemu_state(vm) == before


async def test_a_host_the_policy_does_not_list_is_forbidden(vm: TestMachine, tree: FakeTree) -> None:
    tree.add_device(NIC, ETHERNET, "vfio-pci", "12")
    before = await qemu_state(vm)
    settings = settings_for(tree, qmpnet.Policy(allowed_vfio_hosts=["0000:43:00.0"]))
    async with qmpnet.connect(str(vm.qmp_path), name=vm.name, settings=settings) as guest:
        with pytest.raises(Forbidden) as caught:
            await guest.add_nic({"backend": {"type": "vfio", "host": NIC}})
    assert caught.value.field == "nic.backend.host"
    assert await qemu_state(vm) == before


# ------------------------------------------------------------------------------------------- rebind


async def test_rebind_that_the_kernel_does_not_carry_out_gives_the_device_back(vm: TestMachine, tree: FakeTree) -> None:
    """Plain files: the writes land but nothing binds, so qmpnet must see a failed bind and restore e1000e."""
    tree.add_device(NIC, ETHERNET, "e1000e", "12")
    before = await qemu_state(vm)
    async with qmpnet.connect(str(vm.qmp_path), name=vm.name, settings=settings_for(tree)) as guest:
        with pytest.raises(Unsupported) as caught:
            await guest.add_nic({"backend": {"type": "vfio", "host": NIC, "rebind": True}})
    assert "did not bind to vfio-pci" in caught.value.message
    assert tree.driver(NIC) == "e1000e"
    assert tree.override(NIC) in {"", "(null)"}  # cleared (a real kernel shows "(null)")
    assert await qemu_state(vm) == before


async def test_rebind_then_qemu_error_restores_the_original_driver(
    vm: TestMachine, tree: FakeTree, kernel: FakeKernel
) -> None:
    tree.add_device(NIC, ETHERNET, "e1000e", "12")
    before = await qemu_state(vm)
    async with qmpnet.connect(str(vm.qmp_path), name=vm.name, settings=settings_for(tree)) as guest:
        with pytest.raises(QmpCommandError) as caught:
            await guest.add_nic({"backend": {"type": "vfio", "host": NIC, "rebind": True}})
    assert caught.value.command == "device_add"
    # Bound to vfio-pci before device_add (QEMU got that far), then given back when device_add failed.
    assert kernel.writes == [
        (f"bus/pci/devices/{NIC}/driver_override", "vfio-pci"),
        ("bus/pci/drivers/e1000e/unbind", NIC),
        ("bus/pci/drivers_probe", NIC),
        (f"bus/pci/devices/{NIC}/driver_override", "\n"),
        ("bus/pci/drivers/vfio-pci/unbind", NIC),
        ("bus/pci/drivers_probe", NIC),
    ]
    assert (tree.driver(NIC), tree.override(NIC)) == ("e1000e", "(null)")
    assert await qemu_state(vm) == before


async def test_rebind_of_an_unbound_function_is_undone_too(vm: TestMachine, tree: FakeTree, kernel: FakeKernel) -> None:
    tree.add_device(NIC, ETHERNET, None, "12")
    async with qmpnet.connect(str(vm.qmp_path), name=vm.name, settings=settings_for(tree)) as guest:
        with pytest.raises(QmpCommandError):
            await guest.add_nic({"backend": {"type": "vfio", "host": NIC, "rebind": True}})
    assert ("bus/pci/drivers_probe", NIC) in kernel.writes  # it was bound to vfio-pci first
    assert (tree.driver(NIC), tree.override(NIC)) == (None, "(null)")
