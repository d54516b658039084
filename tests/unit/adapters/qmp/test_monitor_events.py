"""Events through the real adapter: memory stays flat under a flood, and foreign unplugs invalidate the view."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fakeqmp import Event, FakeQmp
from waiting import eventually

import qmpnet
from qmpnet.adapters.qmp import QmpMonitor

if TYPE_CHECKING:
    from qmpnet.core.ports import QmpEvent
    from qmpnet.settings import Settings

FLOOD = 10_000


async def test_event_flood_leaves_no_queue_and_no_history(fake: FakeQmp, fast: Settings) -> None:
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        monitor = guest._monitor
        assert isinstance(monitor, QmpMonitor)
        seen: list[int] = [0]

        def count(event: QmpEvent) -> None:
            seen[0] += 1

        monitor.on_event(count)
        events = [
            Event("NIC_RX_FILTER_CHANGED", {"name": "v1", "path": f"/machine/peripheral/v1/{n}"}) for n in range(FLOOD)
        ]
        await fake.emit_many(events)
        await eventually(lambda: seen[0] == FLOOD, timeout=15)

        client = monitor._client
        assert client.events.empty()
        assert client.events.history == ()
        assert all(listener.history == () for listener in client._listeners)
        # Besides the default listener only the one that forgets deleted devices, which never queues.
        assert client._listeners[0] is client.events
        assert [type(listener).__name__ for listener in client._listeners[1:]] == ["_Deletions"]
        assert all(listener.empty() for listener in client._listeners)
        # The guest still answers.
        assert {nic.id for nic in await guest.list_nics()} == {"e1", "v1", "rtl8139.0"}
        assert client.events.empty()


async def test_unplug_the_guest_did_not_cause_makes_it_read_again(fake: FakeQmp, fast: Settings) -> None:
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        monitor = guest._monitor
        assert isinstance(monitor, QmpMonitor)
        seen: list[str] = []
        monitor.on_event(lambda event: seen.append(event.name))  # runs after the guest's own handler

        await guest.add_nic({"id": "x1"})
        reads = fake.reads()
        await guest.add_nic({"id": "x2"})  # from the kept inventory: no new read
        assert fake.reads() == reads

        # Someone else (another tool, a guest-initiated eject) unplugs e1.
        await fake.emit_many(list(fake.unplug_events("e1")))
        await eventually(lambda: seen == ["DEVICE_DELETED"])
        # The lane settles it in a background task that may not have had its first turn yet: wait for its read.
        await eventually(lambda: fake.reads() == reads + 1)
        await guest.add_nic({"id": "x3"})
        assert fake.reads() == reads + 1  # one read for the unplug, and x3 planned on it
        nic_ids = {nic.id for nic in await guest.list_nics()}
        assert "e1" not in nic_ids
