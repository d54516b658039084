"""The guest lane through the real adapter: serial per guest, parallel across guests."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest
from captures import Capture
from fakeqmp import Command, FakeQmp

import qmpnet
from qmpnet.errors import Timeout
from qmpnet.guest.lane import Lane
from qmpnet.settings import LaneSettings, QmpSettings, Settings

if TYPE_CHECKING:
    from pathlib import Path

    from qmpnet.core.model import Nic


async def test_concurrent_adds_on_one_guest_never_interleave(sockdir: Path, fast: Settings) -> None:
    # A pc guest with two pci-bridges: room for 50 NICs (31 slots each, two taken on br1).
    capture = Capture.load("7.2", "pc-bridges")
    async with (
        FakeQmp(sockdir / "lane.qmp", capture=capture) as fake,
        qmpnet.connect(str(fake.path), settings=fast) as guest,
    ):
        specs = [{"id": f"n{i}", "bus": "br1" if i < 25 else "br2"} for i in range(50)]
        tasks = [asyncio.create_task(guest.add_nic(spec)) for spec in specs]
        nics: list[Nic] = await asyncio.gather(*tasks)
    changes = fake.changes()
    assert len(changes) == 100
    for i in range(50):
        netdev, device = changes[2 * i], changes[2 * i + 1]
        assert netdev == Command("netdev_add", {"id": f"n{i}.net", "type": "user"})
        assert device.name == "device_add"
        assert (device.arguments["id"], device.arguments["netdev"]) == (f"n{i}", f"n{i}.net")
    assert [nic.id for nic in nics] == [f"n{i}" for i in range(50)]
    places = {(nic.pci.bus, nic.pci.slot) for nic in nics if nic.pci}
    assert len(places) == 50
    assert len({nic.mac for nic in nics}) == 50


async def test_a_stuck_guest_does_not_delay_another(sockdir: Path, fast: Settings) -> None:
    slow = Settings(qmp=QmpSettings(command_timeout=30))
    async with (
        FakeQmp(sockdir / "a.qmp") as fake_a,
        FakeQmp(sockdir / "b.qmp") as fake_b,
        qmpnet.connect(str(fake_a.path), settings=slow) as guest_a,
        qmpnet.connect(str(fake_b.path), settings=fast) as guest_b,
    ):
        release = fake_a.hold("netdev_add")
        stuck = asyncio.create_task(guest_a.add_nic({"id": "a1"}))
        queued = asyncio.create_task(guest_a.set_link("e1", up=False))
        await fake_a.wait_for_command("netdev_add")

        async with asyncio.timeout(2):
            nic = await guest_b.add_nic({"id": "b1", "link": "down"})
            await guest_b.set_link("b1", up=True)
            listed = await guest_b.list_nics()
        assert nic.id == "b1"
        assert {n.id for n in listed} == {"e1", "v1", "rtl8139.0", "b1"}
        assert fake_b.change_names() == ["netdev_add", "device_add", "set_link", "set_link"]

        # Guest A is still stuck in its first step, and its second call waits behind it.
        assert not stuck.done()
        assert not queued.done()
        assert fake_a.change_names() == ["netdev_add"]
        release.set()
        await asyncio.wait_for(asyncio.gather(stuck, queued), 5)
        assert fake_a.change_names() == ["netdev_add", "device_add", "set_link"]



async def test_a_lane_taken_at_once_or_waited_for_keeps_its_order_and_bound() -> None:
    lane = Lane("vm1", LaneSettings(max_wait=0.05))
    async with lane.turn():  # free: taken at once
        with pytest.raises(Timeout):  # held: another call waits at most max_wait
            async with lane.turn():
                pass
        passing = asyncio.create_task(lane.passed())
        await asyncio.sleep(0)  # passed() now waits for the lane
    async with lane.turn():  # free, but passed() is queued for it: this call goes after it
        assert passing.done()
    assert lane.waiting == 0
    assert not lane.locked()
