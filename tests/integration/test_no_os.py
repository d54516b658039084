"""Edge cases on real QEMU with no guest OS (``-S``): placement limits and unplugs nobody acknowledges.

A guest that runs no OS cannot answer an ACPI or PCIe unplug request, which is exactly the "stuck guest" case;
and PCI slot bookkeeping needs no guest at all. Each test starts its own QEMU (~0.2 s).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import pytest
from aux_qmp import aux_args, hmp

import qmpnet
from qmpnet.settings import QmpSettings
from qmpnet.testguest import TestMachine

if TYPE_CHECKING:
    from pathlib import Path

    from qmpnet.testguest import GuestImage

pytestmark = [pytest.mark.integration]


async def test_pc_slot_exhaustion_is_a_clear_error_and_leaves_nothing(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    extra = aux_args(tmp_path)
    async with (
        TestMachine(guest_image, machine="pc", boot=False, extra_args=extra) as vm,
        qmpnet.connect(str(vm.qmp_path)) as guest,
    ):
        added = 0
        caught: qmpnet.NoFreeSlot | None = None
        for n in range(40):
            try:
                await guest.add_nic({"model": "virtio", "id": f"n{n}"})
            except qmpnet.NoFreeSlot as err:
                caught = err
                break
            added += 1
        assert caught is not None
        assert caught.code == "no_free_slot"
        assert "pci.0" in caught.message
        assert 25 <= added <= 31
        network = await hmp(tmp_path, "info network")
        assert f"n{added}.net" not in network
        assert f"n{added - 1}.net" in network


async def test_pc_explicit_slot_in_use_is_a_conflict(guest_image: GuestImage) -> None:
    async with TestMachine(guest_image, machine="pc", boot=False) as vm, qmpnet.connect(str(vm.qmp_path)) as guest:
        first = await guest.add_nic({"model": "e1000", "addr": "5"})
        assert first.pci is not None
        assert (first.pci.bus, first.pci.slot) == ("pci.0", 5)
        with pytest.raises(qmpnet.Conflict, match="in use by"):
            await guest.add_nic({"model": "e1000", "addr": "0x5"})


async def test_q35_legacy_model_without_bridge_says_what_to_add(guest_image: GuestImage, tmp_path: Path) -> None:
    extra = aux_args(tmp_path)
    async with (
        TestMachine(guest_image, machine="q35", root_ports=2, boot=False, extra_args=extra) as vm,
        qmpnet.connect(str(vm.qmp_path)) as guest,
    ):
        with pytest.raises(qmpnet.NoFreeSlot) as caught:
            await guest.add_nic({"model": "rtl8139", "id": "legacy"})
        assert "pcie-pci-bridge" in caught.value.message
        assert "legacy.net" not in await hmp(tmp_path, "info network")
        # virtio goes into a root port; the caller may also force rtl8139 into one.
        nic = await guest.add_nic({"model": "virtio"})
        assert nic.pci is not None
        assert nic.pci.bus.startswith("rp")
        other_port = next(port for port in vm.root_port_ids if port != nic.pci.bus)
        forced = await guest.add_nic({"model": "rtl8139", "bus": other_port})
        assert forced.pci is not None
        assert forced.pci.slot == 0
        # Both root ports are now taken.
        with pytest.raises(qmpnet.NoFreeSlot, match="pcie-root-port"):
            await guest.add_nic({"model": "e1000e"})


async def test_unacknowledged_unplug_is_pending_within_the_timeout(guest_image: GuestImage) -> None:
    # The settings' default wait is an hour: an answer within the deadline below proves the call's own 1 s applied.
    settings = qmpnet.Settings(qmp=QmpSettings(unplug_timeout=3600))
    async with (
        TestMachine(guest_image, machine="pc", boot=False) as vm,
        qmpnet.connect(str(vm.qmp_path), settings=settings) as guest,
    ):
        nic = await guest.add_nic({"model": "virtio", "id": "stuck"})
        start = time.monotonic()
        async with asyncio.timeout(60):
            result = await guest.remove_nic(nic.id, timeout=1.0)
        print(f"removal_pending after {time.monotonic() - start:.2f} s")  # noqa: T201 - the figure, not a bound
        assert result.state == "removal_pending"
        listed = {n.id: n for n in await guest.list_nics()}
        assert listed["stuck"].state == "removal_pending"
        # Asking again answers pending again (QEMU says the unplug is already in progress).
        assert (await guest.remove_nic(nic.id, timeout=0.2)).state == "removal_pending"
        # Other work on the guest is not blocked by the pending unplug.
        other = await asyncio.wait_for(guest.add_nic({"model": "e1000"}), timeout=5)
        assert other.state == "active"
