"""Reading a real QEMU exactly: ``list_nics`` is the set of NIC devices QEMU itself shows, on pc and on q35.

qmpnet hot-adds NICs of every model, a second QMP monitor (another client) adds some of its own and removes one
of each, and after every step ``list_nics()`` must equal the NIC devices that ``qom-list /machine/peripheral``
shows over that second monitor, placed where QEMU says they are, with no root port or bridge among them (the
phantom NICs of issue 7). Each machine runs twice: paused (``-S``: the firmware has not numbered the buses, so
``query-pci`` hides what sits behind bridges) and booted (the guest acknowledges the unplugs).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, cast

import pytest
from aux_qmp import aux_args, aux_monitor

import qmpnet
from qmpnet.testguest import TestMachine

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from qemu.qmp import QMPClient

    from qmpnet.testguest import GuestImage

pytestmark = [pytest.mark.integration]

MODELS = ("virtio-net-pci", "e1000e", "e1000", "rtl8139")
BRIDGES = {"pcie-root-port", "pcie-pci-bridge", "pci-bridge"}
UNPLUG_TIMEOUT = 30.0
#: pc: a pci-bridge besides the root bus. q35: free root ports and the pcie-pci-bridge (pcibr0 in rp_br).
MACHINES: dict[str, dict[str, Any]] = {
    "pc": {"machine": "pc", "extra_args": ["-device", "pci-bridge,id=br1,chassis_nr=1,addr=0x1e"]},
    "q35": {"machine": "q35", "root_ports": 6, "pcie_pci_bridge": True},
}
#: Where the second monitor puts its NICs: (driver, bus, addr).
AUX_NICS: dict[str, list[tuple[str, str, str]]] = {
    "pc": [("e1000", "br1", "0x3"), ("virtio-net-pci", "pci.0", "0x1c")],
    "q35": [("rtl8139", "pcibr0", "0x10"), ("e1000e", "rp6", "0x0")],
}


async def peripheral_nics(aux: QMPClient) -> dict[str, tuple[str, str, int, int]]:
    """The NIC devices ``/machine/peripheral`` lists: id -> (type, bus, slot, function), read from QOM alone.

    A device is a NIC when its QOM properties include ``netdev`` (what every NIC model has), nothing else.
    """
    children = cast("list[dict[str, str]]", await aux.execute("qom-list", {"path": "/machine/peripheral"}))
    nics: dict[str, tuple[str, str, int, int]] = {}
    for child in children:
        if not child["type"].startswith("child<"):
            continue
        path = f"/machine/peripheral/{child['name']}"
        props = cast("list[dict[str, str]]", await aux.execute("qom-list", {"path": path}))
        if not any(p["name"] == "netdev" for p in props):
            continue
        bus = str(await aux.execute("qom-get", {"path": path, "property": "parent_bus"})).rpartition("/")[2]
        devfn = cast("int", await aux.execute("qom-get", {"path": path, "property": "addr"}))
        nics[child["name"]] = (child["type"][6:-1], bus, devfn >> 3, devfn & 7)
    return nics


async def listed(guest: qmpnet.Guest) -> dict[str, tuple[str, str, int, int]]:
    nics = {}
    for nic in await guest.list_nics():
        assert nic.pci is not None
        nics[nic.id] = (nic.model, nic.pci.bus, nic.pci.slot, nic.pci.function)
    return nics


async def aux_add(aux: QMPClient, nic_id: str, driver: str, bus: str, addr: str) -> None:
    await aux.execute("netdev_add", {"type": "user", "id": f"{nic_id}.net"})
    await aux.execute("device_add", {"driver": driver, "id": nic_id, "netdev": f"{nic_id}.net", "bus": bus,
                                     "addr": addr})  # fmt: skip


async def aux_remove(aux: QMPClient, nic_id: str) -> None:
    """``device_del`` over the second monitor, then wait for QEMU's ``DEVICE_DELETED`` of it."""
    with aux.listener("DEVICE_DELETED") as listener:
        await aux.execute("device_del", {"id": nic_id})
        async with asyncio.timeout(UNPLUG_TIMEOUT):
            async for event in listener:
                if cast("dict[str, object]", event["data"]).get("device") == nic_id:
                    break


@contextlib.asynccontextmanager
async def machine(name: str, *, boot: bool, image: GuestImage, tmp_path: Path) -> AsyncIterator[TestMachine]:
    workdir = tmp_path / name
    workdir.mkdir()
    config = MACHINES[name]
    extra = [*config.get("extra_args", []), *aux_args(workdir)]
    knobs = {k: v for k, v in config.items() if k != "extra_args"}
    async with TestMachine(image if boot else None, boot=boot, workdir=workdir, name=f"read-{name}",
                           extra_args=extra, **knobs) as vm:  # fmt: skip
        yield vm


@pytest.mark.parametrize("boot", [False, True], ids=["paused", "booted"])
@pytest.mark.parametrize("name", sorted(MACHINES))
async def test_list_nics_is_what_qom_shows(guest_image: GuestImage, tmp_path: Path, name: str, boot: bool) -> None:
    async with (
        machine(name, boot=boot, image=guest_image, tmp_path=tmp_path) as vm,
        qmpnet.connect(str(vm.qmp_path), name=vm.name) as guest,
        aux_monitor(vm.workdir) as aux,
    ):
        # Every model through qmpnet (on q35 the conventional ones go behind the pcie-pci-bridge).
        ours = [await guest.add_nic({"id": f"q{n}", "model": model}) for n, model in enumerate(MODELS)]
        if boot:
            for nic in ours:
                assert nic.mac is not None
                await vm.wait_nic(nic.mac)
        # And some through another client, behind a bridge and in a root port (q35) or on pci.0 (pc).
        theirs = [f"a{n}" for n in range(len(AUX_NICS[name]))]
        for nic_id, (driver, bus, addr) in zip(theirs, AUX_NICS[name], strict=True):
            await aux_add(aux, nic_id, driver, bus, addr)

        qemu = await peripheral_nics(aux)
        assert await listed(guest) == qemu
        assert set(qemu) == {nic.id for nic in ours} | set(theirs)
        assert not {model for model, *_ in qemu.values()} & BRIDGES
        if name == "q35":
            assert {bus for nic_id, (_, bus, _, _) in qemu.items() if nic_id in theirs} == {"pcibr0", "rp6"}
        else:
            assert qemu["a0"][1:] == ("br1", 3, 0)

        # The other client removes one of its NICs and one of qmpnet's; a guest with no OS cannot ack that.
        if boot:
            await aux_remove(aux, theirs[0])
            await aux_remove(aux, ours[0].id)
            qemu = await peripheral_nics(aux)
            assert theirs[0] not in qemu
            assert ours[0].id not in qemu
            assert await listed(guest) == qemu

        # qmpnet plans around what the other client took, and the listing still matches.
        extra = await guest.add_nic({"id": "late", "model": "virtio-net-pci"})
        assert extra.pci is not None
        qemu = await peripheral_nics(aux)
        assert qemu["late"][1:] == (extra.pci.bus, extra.pci.slot, extra.pci.function)
        assert await listed(guest) == qemu
