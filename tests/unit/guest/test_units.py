"""What the guest lane's units add to the facade: the NIC snapshot, the record's window."""

from __future__ import annotations

import asyncio

from fakemonitor import RecordingMonitor
from fakeqmp import eventually

from qmpnet.guest.guest import Guest
from qmpnet.settings import LaneSettings, Settings


def _states(guest: Guest) -> dict[str, tuple[str, str]]:
    return {nic.id: (nic.state, nic.link) for nic in guest.nics}


async def test_the_nic_snapshot_follows_the_lane_without_reading_the_guest() -> None:
    monitor = RecordingMonitor()
    guest = Guest(monitor, name="vm")
    assert _states(guest) == {}  # nothing was read yet
    async with asyncio.timeout(5), guest:
        assert _states(guest)["e1"] == ("active", "up")
        reads = monitor.observed
        added = await guest.add_nic({"id": "a"})
        assert _states(guest)["a"] == ("active", "up")
        assert [nic for nic in guest.nics if nic.id == "a"] == [added]
        await guest.set_link("a", up=False)
        assert _states(guest)["a"] == ("active", "down")
        assert monitor.observed == reads  # the snapshot is kept by the lane's own steps
        assert (await guest.remove_nic("e1", timeout=0)).state == "removal_pending"
        assert _states(guest)["e1"] == ("removal_pending", "up")
        monitor.emit("DEVICE_DELETED", {"device": "e1", "path": "/machine/peripheral/e1"})
        await eventually(lambda: "e1" not in _states(guest))


async def test_the_record_keeps_finished_operations_for_the_operation_window() -> None:
    for window, kept in ((60.0, True), (0.0, False)):
        settings = Settings(lane=LaneSettings(operation_window=window))
        async with asyncio.timeout(5), Guest(RecordingMonitor(), name="vm", settings=settings) as guest:
            await guest.add_nic({"id": "a"}, operation="t-1")
            await guest.set_link("a", up=False)  # a later write prunes what is older than the window
            assert (guest.operation("t-1") is not None) == kept
