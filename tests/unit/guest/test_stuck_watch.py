"""Stuck unplugs through the real QMP adapter against the fake monitor (whose guest never acks an unplug).

``pending_since`` comes from the record and survives a new process; ``unplug_stuck`` is told once per removal,
to the subscribers there are, and recorded; neither a repeated removal nor a new process sends ``device_del``
again for an unplug QEMU accepted.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import pytest

import qmpnet
from qmpnet.adapters.store import StateDir
from qmpnet.core.records import GuestRecord, NicRecord
from qmpnet.settings import UnplugSettings

if TYPE_CHECKING:
    from fakeqmp import FakeQmp

    from qmpnet.core.model import GuestEvent
    from qmpnet.guest.guest import Guest
    from qmpnet.settings import Settings


class Told:
    """The events a guest told, and a wait for the next ``unplug_stuck`` of a NIC."""

    def __init__(self, guest: Guest) -> None:
        self.events: list[GuestEvent] = []
        self._arrived = asyncio.Event()
        guest.subscribe(self._on)

    def _on(self, event: GuestEvent) -> None:
        self.events.append(event)
        self._arrived.set()

    def stuck(self) -> list[str | None]:
        return [e.id for e in self.events if e.name == "unplug_stuck"]

    async def stuck_of(self, nic_id: str, timeout: float = 5.0) -> GuestEvent:
        async with asyncio.timeout(timeout):
            while nic_id not in self.stuck():
                self._arrived.clear()
                await self._arrived.wait()
        return next(e for e in self.events if e.name == "unplug_stuck" and e.id == nic_id)


def quick(settings: Settings, after: float = 0.2) -> Settings:
    return settings.model_copy(update={"unplug": UnplugSettings(stuck_after=after)})


async def test_a_pending_removal_carries_pending_since_across_processes(fake: FakeQmp, fast: Settings) -> None:
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        told = Told(guest)
        before = time.time()
        assert (await guest.remove_nic("e1", timeout=0)).state == "removal_pending"
        since = guest.record.nics["e1"].pending_since
        assert since is not None
        assert before <= since <= time.time()
        listed = {n.id: n for n in await guest.list_nics()}
        assert (listed["e1"].state, listed["e1"].pending_since) == ("removal_pending", since)
        assert listed["v1"].pending_since is None
        assert {n.id: n.pending_since for n in guest.nics}["e1"] == since
        (pending,) = [e for e in told.events if e.name == "nic_removal_pending"]
        assert pending.nic is not None
        assert pending.nic.pending_since == since
    # A new process (a restarted controller, the next CLI call) reads it from the record and asks QEMU nothing.
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        assert {n.id: n.pending_since for n in await guest.list_nics()}["e1"] == since
        assert await guest.remove_nic("e1", timeout=0.05) == qmpnet.RemoveResult(id="e1", state="removal_pending")
    assert fake.change_names() == ["device_del"]


async def test_a_stuck_unplug_is_told_once_with_advice_and_not_again_by_a_new_process(
    fake: FakeQmp, fast: Settings
) -> None:
    settings = quick(fast)
    async with qmpnet.connect(str(fake.path), settings=settings) as guest:
        told = Told(guest)
        await guest.remove_nic("e1", timeout=0)
        event = await told.stuck_of("e1")
        record = guest.record.nics["e1"]
        assert event.nic is not None
        assert (event.nic.state, event.nic.pending_since) == ("removal_pending", record.pending_since)
        assert event.message is not None
        assert event.message.startswith("NIC e1: ")
        assert "system_reset" in event.message
        assert record.stuck_reported is not None
        # Repeating the removal sends nothing and tells nothing new.
        assert (await guest.remove_nic("e1", timeout=0.05)).state == "removal_pending"
        # Another stuck unplug, told after it: e1 was not told again meanwhile.
        await guest.remove_nic("v1", timeout=0)
        await told.stuck_of("v1")
        assert told.stuck() == ["e1", "v1"]
    async with qmpnet.connect(str(fake.path), settings=settings) as guest:
        told = Told(guest)
        # A removal that gets stuck after the reconnect is told; the two told before are not told again.
        await fake.handlers["netdev_add"]({"id": "x1.net", "type": "user"})
        added = await guest.add_nic({"id": "x1", "model": "e1000"})
        await guest.remove_nic(added.id, timeout=0)
        await told.stuck_of("x1")
        assert told.stuck() == ["x1"]
    assert fake.change_names() == ["device_del", "device_del", "netdev_add", "device_add", "device_del"]


async def test_a_stuck_unplug_waits_for_someone_to_tell(fake: FakeQmp, fast: Settings) -> None:
    # Left by a process long gone: pending for an hour, never told (the CLI that asked had no subscriber).
    store = await StateDir(fast.state_dir).open_guest(str(fake.path), str(fake.path), wait=1)
    try:
        nic = NicRecord(id="e1", spec=None, netdev="n1", state="removal_pending", link="up",
                        pending_since=time.time() - 3600)  # fmt: skip
        store.save(GuestRecord(address=str(fake.path), name=str(fake.path), instance="fake-instance-1",
                               boot=store.record.boot).with_nic(nic))  # fmt: skip
    finally:
        store.close()
    async with qmpnet.connect(str(fake.path), settings=quick(fast)) as guest:
        await guest.list_nics()  # the watch has looked meanwhile: with nobody to tell, nothing is spent
        assert guest.record.nics["e1"].stuck_reported is None
        told = Told(guest)
        event = await told.stuck_of("e1")
        assert event.message is not None
        assert "for 3600 s" in event.message
        assert guest.record.nics["e1"].stuck_reported is not None
    assert fake.change_names() == []  # QEMU accepted that unplug: recovery did not ask again


async def test_a_hot_add_whose_rollback_unplug_is_not_acked_is_pending_since_then(
    fake: FakeQmp, fast: Settings
) -> None:
    fake.fail("set_link", "boom")  # device_del is answered, and the guest never acks it
    settings = quick(fast).model_copy(update={"qmp": fast.qmp.model_copy(update={"rollback_unplug_timeout": 0.1})})
    async with qmpnet.connect(str(fake.path), settings=settings) as guest:
        told = Told(guest)
        with pytest.raises(qmpnet.QmpCommandError):
            await guest.add_nic({"id": "x1", "link": "down"})
        record = guest.record.nics["x1"]
        assert record.state == "removal_pending"
        assert record.pending_since is not None
        await told.stuck_of("x1")
    async with qmpnet.connect(str(fake.path), settings=settings):
        pass  # a new process: the rollback's unplug is in progress in QEMU, so it is not asked again
    assert fake.change_names() == ["netdev_add", "device_add", "set_link", "device_del"]
