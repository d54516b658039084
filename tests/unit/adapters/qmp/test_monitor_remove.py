"""Hot-remove through the real QMP adapter: DEVICE_DELETED matching, removal_pending, late completion."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest
from fakeqmp import Answer, Command, Event, FakeQmp, QmpError

import qmpnet
from qmpnet.adapters.qmp import QmpMonitor
from qmpnet.core.model import GuestEvent, RemoveResult
from qmpnet.errors import QmpCommandError

if TYPE_CHECKING:
    from qmpnet.guest.guest import Guest
    from qmpnet.settings import Settings


def listeners_left(guest: Guest) -> int:
    """The registered listeners, not counting the adapter's DEVICE_DELETED one (it never queues)."""
    monitor = guest._monitor
    assert isinstance(monitor, QmpMonitor)
    return len(monitor._client._listeners) - 1


async def test_virtio_waits_for_the_event_naming_the_device(fake: FakeQmp, fast: Settings) -> None:
    fake.ack_unplugs(virtio=True)
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        events: list[GuestEvent] = []
        guest.subscribe(events.append)
        assert await guest.remove_nic("v1") == RemoveResult(id="v1", state="removed")
        assert fake.story() == ["device_del", "!DEVICE_DELETED", "!DEVICE_DELETED", "netdev_del"]
        assert fake.changes() == [Command("device_del", {"id": "v1"}), Command("netdev_del", {"id": "hp1"})]
        assert [(e.name, e.id) for e in events] == [("nic_removed", "v1")]
        assert "v1" not in {nic.id for nic in await guest.list_nics()}
        assert listeners_left(guest) == 1  # only the always-on one


async def test_backend_event_alone_does_not_complete_the_removal(fake: FakeQmp, fast: Settings) -> None:
    # Only virtio's first DEVICE_DELETED (for .../virtio-backend, no "device") arrives.
    async def backend_only(arguments: dict[str, Any]) -> object:
        return Answer({}, (Event("DEVICE_DELETED", {"path": "/machine/peripheral/v1/virtio-backend"}),))

    fake.on("device_del", backend_only)
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        assert await guest.remove_nic("v1") == RemoveResult(id="v1", state="removal_pending")
        assert fake.story() == ["device_del", "!DEVICE_DELETED"]
        # The event naming the device completes it, in the background.
        await fake.emit_many(list(fake.unplug_events("v1")))
        await fake.wait_for_command("netdev_del")
        assert fake.changes()[-1] == Command("netdev_del", {"id": "hp1"})


async def test_no_event_is_removal_pending_then_completes_when_it_comes(fake: FakeQmp, fast: Settings) -> None:
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        events: list[GuestEvent] = []
        guest.subscribe(events.append)
        # fast.qmp.unplug_timeout is 0.3 s: pending well before the 10 s default would end (a deadline, not a figure).
        async with asyncio.timeout(5):
            result = await guest.remove_nic("e1")
        assert result == RemoveResult(id="e1", state="removal_pending")
        assert fake.change_names() == ["device_del"]
        listed = {nic.id: nic for nic in await guest.list_nics()}
        assert listed["e1"].state == "removal_pending"
        assert listed["v1"].state == "active"
        assert listeners_left(guest) == 1

        # The guest OS acks late: the event pump deletes the backend and the NIC is gone.
        await fake.emit_many(list(fake.unplug_events("e1")))
        await fake.wait_for_command("netdev_del")
        assert fake.changes() == [Command("device_del", {"id": "e1"}), Command("netdev_del", {"id": "n1"})]
        assert "e1" not in {nic.id for nic in await guest.list_nics()}
        assert [(e.name, e.id) for e in events] == [("nic_removal_pending", "e1"), ("nic_removed", "e1")]
        # A third removal of the same NIC: it no longer exists.
        with pytest.raises(qmpnet.NotFound):
            await guest.remove_nic("e1")


async def test_explicit_timeout_zero_returns_pending_at_once(fake: FakeQmp, fast: Settings) -> None:
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        assert (await guest.remove_nic("e1", timeout=0)).state == "removal_pending"


async def test_event_already_queued_at_timeout_zero_counts(fake: FakeQmp, fast: Settings) -> None:
    # A synchronous unplug: QEMU sends DEVICE_DELETED before the answer to device_del.
    async def synchronous(arguments: dict[str, Any]) -> object:
        await fake.emit_many(list(fake.unplug_events(str(arguments["id"]))))
        return {}

    fake.on("device_del", synchronous)
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        assert await guest.remove_nic("e1", timeout=0) == RemoveResult(id="e1", state="removed")
        assert fake.change_names() == ["device_del", "netdev_del"]


async def test_second_remove_while_pending_sends_no_second_device_del(fake: FakeQmp, fast: Settings) -> None:
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        assert (await guest.remove_nic("e1")).state == "removal_pending"
        assert (await guest.remove_nic("e1", timeout=0.1)).state == "removal_pending"
        waiting = asyncio.create_task(guest.remove_nic("e1", timeout=5))
        # The waiting call gives up the lane: other calls on the guest still run meanwhile.
        await asyncio.wait_for(guest.set_link("v1", up=False), 2)
        assert not waiting.done()
        await fake.emit_many(list(fake.unplug_events("e1")))
        assert await asyncio.wait_for(waiting, 2) == RemoveResult(id="e1", state="removed")
        assert fake.change_names() == ["device_del", "set_link", "netdev_del"]


async def test_already_in_the_process_of_unplug_is_pending(fake: FakeQmp, fast: Settings) -> None:
    # A previous connection asked already (e.g. before a controller restart): QEMU refuses a second device_del.
    fake.fail("device_del", "Device e1 is already in the process of unplug")
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        assert await guest.remove_nic("e1") == RemoveResult(id="e1", state="removal_pending")
        assert fake.change_names() == ["device_del"]
        await fake.emit_many(list(fake.unplug_events("e1")))
        await fake.wait_for_command("netdev_del")


async def test_event_during_device_del_for_a_repeated_request_completes(fake: FakeQmp, fast: Settings) -> None:
    # The ack arrives right behind QEMU's "already in the process of unplug" answer.
    async def refuse_then_ack(arguments: dict[str, Any]) -> object:
        await fake.emit_many(list(fake.unplug_events("e1")))
        raise QmpError("Device e1 is already in the process of unplug")

    fake.on("device_del", refuse_then_ack)
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        assert await guest.remove_nic("e1") == RemoveResult(id="e1", state="removed")
        assert fake.change_names() == ["device_del", "netdev_del"]


async def test_guest_refusing_the_unplug(fake: FakeQmp, fast: Settings) -> None:
    async def refuse(arguments: dict[str, Any]) -> object:
        path = f"/machine/peripheral/{arguments['id']}"
        return Answer({}, (Event("DEVICE_UNPLUG_GUEST_ERROR", {"device": arguments["id"], "path": path}),))

    fake.on("device_del", refuse)
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        events: list[GuestEvent] = []
        guest.subscribe(events.append)
        with pytest.raises(QmpCommandError) as info:
            await guest.remove_nic("e1")
        assert info.value.code == "qmp_error"
        assert info.value.qmp_class == "DEVICE_UNPLUG_GUEST_ERROR"
        assert fake.change_names() == ["device_del"]  # the backend stays
        assert {nic.id: nic.state for nic in await guest.list_nics()}["e1"] == "active"
        assert [(e.name, e.id) for e in events] == [("unplug_rejected", "e1")]


async def test_refusal_of_another_device_is_ignored(fake: FakeQmp, fast: Settings) -> None:
    async def other(arguments: dict[str, Any]) -> object:
        return Answer({}, (Event("DEVICE_UNPLUG_GUEST_ERROR", {"device": "v1", "path": "/machine/peripheral/v1"}),))

    fake.on("device_del", other)
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        assert (await guest.remove_nic("e1")).state == "removal_pending"


async def test_device_del_error_is_a_qmp_error(fake: FakeQmp, fast: Settings) -> None:
    fake.fail("device_del", "Device 'e1' not found", "DeviceNotFound")
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        with pytest.raises(QmpCommandError) as info:
            await guest.remove_nic("e1")
        assert info.value.qmp_class == "DeviceNotFound"
        assert fake.change_names() == ["device_del"]
        assert listeners_left(guest) == 1


async def test_remove_after_add_uses_the_added_nic(fake: FakeQmp, fast: Settings) -> None:
    fake.ack_unplugs(forget=False)
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        nic = await guest.add_nic({"id": "x1", "model": "e1000e", "backend": {"type": "hubport", "hub": 1}})
        assert (await guest.remove_nic(nic.id)).state == "removed"
        assert fake.changes()[-2:] == [Command("device_del", {"id": "x1"}), Command("netdev_del", {"id": "x1.net"})]
        # The slot it used is free again: the next NIC goes there.
        again = await guest.add_nic({"id": "x2"})
        assert again.pci == nic.pci
