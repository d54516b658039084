"""Bad input to the guest API is refused before anything reaches QEMU (a recording fake Monitor proves it)."""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING, Any

import hypothesis
import pytest
from fakemonitor import RecordingMonitor
from hypothesis import given
from hypothesis import strategies as st
from waiting import eventually

from qmpnet.adapters.store.files import MemoryGuestStore
from qmpnet.core.model import RemoveResult
from qmpnet.core.placement import PciBus, PciTopology
from qmpnet.core.policy import Policy
from qmpnet.errors import Busy, Conflict, Forbidden, InvalidRequest, NoFreeSlot, NotFound, QmpnetError, Timeout
from qmpnet.guest.guest import Guest
from qmpnet.settings import LaneSettings, Settings

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from qmpnet.core.ports import Monitor

BAD_SPECS: list[dict[str, Any]] = [
    {"model": "pcnet"},
    {"id": "0bad"},
    {"mac": "01:00:00:00:00:01"},
    {"addr": "0x20"},
    {"bus": "has space"},
    {"vectors": -1},
    {"queues": 2},
    {"link": "sideways"},
    {"backend": {"type": "tap"}},
    {"backend": {"type": "user", "hostfwd": ["tcp::0-:22"]}},
    {"backend": {"type": "user", "net": "10.0.2.0/40"}},
    {"backend": {"type": "stream", "addr": {"type": "unix", "path": "relative.sock"}}},
    {"script": "/etc/qemu-ifup"},
]
BAD_IDS = ["", "0nic", "nic 0", "nic,id=x", "-x", "x" * 65, "n\u00efc"]


def test_recording_monitor_is_a_monitor() -> None:
    monitor: Monitor = RecordingMonitor()  # mypy checks the protocol here
    assert monitor is not None


async def run(
    call: Callable[[Guest], Awaitable[object]], settings: Settings | None = None
) -> tuple[QmpnetError, RecordingMonitor]:
    """Run ``call`` on a guest over a recording monitor, expecting a qmpnet error; return it and the monitor."""
    monitor = RecordingMonitor()
    async with asyncio.timeout(5), Guest(monitor, name="vm", settings=settings) as guest:  # fail, never hang
        monitor.forget()  # what entering sent (recovery) is not what is checked here
        with pytest.raises(QmpnetError) as info:
            await call(guest)
    return info.value, monitor


@pytest.mark.parametrize("spec", BAD_SPECS)
async def test_bad_spec_sends_nothing(spec: dict[str, Any]) -> None:
    err, monitor = await run(lambda g: g.add_nic(spec))
    assert isinstance(err, InvalidRequest)
    assert err.field is not None
    assert monitor.executed == []
    assert monitor.observed == 0


@pytest.mark.parametrize(
    "backend",
    [
        {"type": "user", "smb": "/srv"},
        {"type": "user", "guestfwd": ["tcp:10.0.2.100:1-cmd:/bin/sh"]},
        {"type": "stream", "addr": {"type": "unix", "path": "/etc/evil.sock"}},
    ],
)
async def test_forbidden_spec_sends_nothing(backend: dict[str, Any]) -> None:
    settings = Settings(policy=Policy(allowed_socket_dirs=["/run/qmpnet"]))
    err, monitor = await run(lambda g: g.add_nic({"backend": backend}), settings)
    assert isinstance(err, Forbidden)
    assert monitor.executed == []
    assert monitor.observed == 0


@pytest.mark.parametrize("nic_id", BAD_IDS)
async def test_remove_bad_id_sends_nothing(nic_id: str) -> None:
    err, monitor = await run(lambda g: g.remove_nic(nic_id))
    assert isinstance(err, InvalidRequest)
    assert err.field == "id"
    assert (monitor.executed, monitor.observed) == ([], 0)


@pytest.mark.parametrize("timeout", [-1.0, -0.001])
async def test_remove_negative_timeout_sends_nothing(timeout: float) -> None:
    err, monitor = await run(lambda g: g.remove_nic("e1", timeout=timeout))
    assert isinstance(err, InvalidRequest)
    assert err.field == "timeout"
    assert (monitor.executed, monitor.observed) == ([], 0)


@pytest.mark.parametrize("timeout", [math.nan, math.inf])
async def test_remove_timeout_must_be_finite(timeout: float) -> None:
    err, monitor = await run(lambda g: g.remove_nic("e1", timeout=timeout))
    assert isinstance(err, InvalidRequest)
    assert err.field == "timeout"
    assert (monitor.executed, monitor.observed) == ([], 0)


@pytest.mark.parametrize("nic_id", BAD_IDS)
async def test_set_link_bad_id_sends_nothing(nic_id: str) -> None:
    err, monitor = await run(lambda g: g.set_link(nic_id, up=False))
    assert isinstance(err, InvalidRequest)
    assert err.field == "id"
    assert (monitor.executed, monitor.observed) == ([], 0)


@hypothesis.settings(max_examples=25)  # a fresh event loop per example
@given(st.text().filter(lambda s: not (s[:1].isascii() and s[:1].isalpha())))
def test_any_id_not_starting_with_a_letter_sends_nothing(nic_id: str) -> None:
    async def both() -> RecordingMonitor:
        monitor = RecordingMonitor()
        async with Guest(monitor, name="vm") as guest:
            monitor.forget()  # what entering sent (recovery) is not what is checked here
            for call in (guest.remove_nic(nic_id), guest.set_link(nic_id, up=True)):
                with pytest.raises(InvalidRequest):
                    await call
        return monitor

    assert asyncio.run(both()).executed == []


# --------------------------------------------------------------- valid input the guest refuses: reads only


async def test_unknown_nic_is_not_found_from_the_entry_read_only() -> None:
    for call in (lambda g: g.remove_nic("nope"), lambda g: g.set_link("nope", up=False)):
        err, monitor = await run(call)
        assert isinstance(err, NotFound)
        assert err.field == "id"
        assert monitor.observed == 0  # the read made on entry (recovery) is what the call looked at
        assert monitor.executed == []


async def test_conflicting_id_and_mac_send_nothing() -> None:
    for spec, field in (({"id": "e1"}, "nic.id"), ({"id": "v1"}, "nic.id"), ({"mac": "52:54:00:00:00:E1"}, "nic.mac")):
        err, monitor = await run(lambda g, s=spec: g.add_nic(s))  # type: ignore[misc]
        assert isinstance(err, Conflict)
        assert err.field == field
        assert monitor.observed == 0  # planned against the read made on entry
        assert monitor.executed == []


async def test_no_free_slot_sends_nothing() -> None:
    monitor = RecordingMonitor()
    full = {(slot, 0): f"d{slot}" for slot in range(32)}
    topology = PciTopology("pc", (PciBus("pci.0", "root", hotplug=True, used=full),))
    monitor.observation = type(monitor.observation)(
        monitor.observation.machine, topology, (), frozenset(), monitor.observation.netclients
    )
    async with Guest(monitor, name="vm") as guest:
        monitor.forget()  # what entering sent (recovery) is not what is checked here
        with pytest.raises(NoFreeSlot):
            await guest.add_nic({})
    assert monitor.executed == []


async def test_full_lane_is_busy_at_once_and_sends_nothing() -> None:
    monitor = RecordingMonitor()
    gate = monitor.gates["netdev_add"] = asyncio.Event()
    settings = Settings(lane=LaneSettings(max_waiting=1))
    async with Guest(monitor, name="vm", settings=settings) as guest:
        monitor.forget()  # what entering sent (recovery) is not what is checked here
        first = asyncio.create_task(guest.add_nic({"id": "a"}))
        await eventually(lambda: monitor.commands == ["netdev_add"])  # the first call holds the lane in there
        second = asyncio.create_task(guest.add_nic({"id": "b"}))
        await eventually(lambda: guest._lane.waiting == 1)  # the second waits for the lane
        with pytest.raises(Busy):
            await guest.add_nic({"id": "c"})
        assert monitor.commands == ["netdev_add"]
        gate.set()
        await asyncio.gather(first, second)
    assert [args.get("id") for name, args in monitor.executed if name == "device_add"] == ["a", "b"]


async def test_cancelled_wait_for_a_pending_removal_keeps_the_lane_serial() -> None:
    # Regression: the wait used to give the lane up and take it back in `finally`; cancelled while taking it
    # back, the caller released the lane that another call held.
    monitor = RecordingMonitor()
    gate = monitor.gates["set_link"] = asyncio.Event()
    async with Guest(monitor, name="vm") as guest:
        monitor.forget()  # what entering sent (recovery) is not what is checked here
        assert (await guest.remove_nic("e1", timeout=0)).state == "removal_pending"
        waiting = asyncio.create_task(guest.remove_nic("e1", timeout=0.05))
        holder = asyncio.create_task(guest.set_link("v1", up=False))  # takes the lane, stuck in set_link
        try:
            await eventually(lambda: monitor.commands[-1:] == ["set_link"])
            # Let the wait run out; an implementation that queues for the lane again shows up as a lane waiter.
            await eventually(lambda: waiting.done() or guest._lane.waiting > 0)
            waiting.cancel()
            outcome = await asyncio.gather(waiting, return_exceptions=True)
            assert outcome[0] == RemoveResult(id="e1", state="removal_pending") or isinstance(
                outcome[0], asyncio.CancelledError
            )
            assert guest._lane.locked()  # still held by set_link: nobody else may enter
        finally:
            gate.set()
            result = await asyncio.gather(holder, return_exceptions=True)
        assert not isinstance(result[0], BaseException)


async def test_late_unplug_ack_while_the_lane_is_full_still_completes() -> None:
    # Regression: the late completion went through the bounded lane, got Busy, and left the netdev behind.
    monitor = RecordingMonitor()
    gate = monitor.gates["set_link"] = asyncio.Event()
    async with Guest(monitor, name="vm", settings=Settings(lane=LaneSettings(max_waiting=1))) as guest:
        monitor.forget()  # what entering sent (recovery) is not what is checked here
        assert (await guest.remove_nic("e1", timeout=0)).state == "removal_pending"
        holder = asyncio.create_task(guest.set_link("v1", up=False))
        await eventually(lambda: monitor.commands[-1:] == ["set_link"])
        waiter = asyncio.create_task(guest.list_nics())
        await eventually(lambda: guest._lane.waiting == 1)  # the lane is now full
        monitor.emit("DEVICE_DELETED", {"device": "e1", "path": "/machine/peripheral/e1"})
        gate.set()
        await asyncio.gather(holder, waiter)
        await eventually(lambda: ("netdev_del", {"id": "n1"}) in monitor.executed, timeout=0.5)
        assert not guest._nics.pending("e1")


async def test_a_late_ack_settled_by_the_event_is_remembered_so_the_next_del_is_told_removed() -> None:
    # Regression (CI): a process that opened the guest while the device was still there finished the removal from
    # the late DEVICE_DELETED, not from a full recovery, and forgot it: the user's next `nic del` got no_such_nic.
    store = MemoryGuestStore(key="vm")
    async with Guest(RecordingMonitor(), name="vm", store=store) as guest:
        assert (await guest.remove_nic("e1", timeout=0)).state == "removal_pending"  # its asker ends here
    monitor = RecordingMonitor()
    async with Guest(monitor, name="vm", store=store) as guest:  # opened while the device is still there
        monitor.emit("DEVICE_DELETED", {"device": "e1", "path": "/machine/peripheral/e1"})
        await eventually(lambda: ("netdev_del", {"id": "n1"}) in monitor.executed, timeout=0.5)
        await guest._late.settled()
        assert "e1" in guest._journal.record.gone
        assert await guest.remove_nic("e1") == RemoveResult(id="e1", state="removed")
        assert "e1" not in guest._journal.record.gone  # told once


async def test_a_request_that_waits_too_long_for_the_lane_is_a_timeout_and_sends_nothing() -> None:
    monitor = RecordingMonitor()
    gate = monitor.gates["set_link"] = asyncio.Event()
    async with Guest(monitor, name="vm", settings=Settings(lane=LaneSettings(max_wait=0.2))) as guest:
        monitor.forget()
        holder = asyncio.create_task(guest.set_link("v1", up=False))
        await eventually(lambda: monitor.commands == ["set_link"])
        with pytest.raises(Timeout) as caught:
            await guest.set_link("e1", up=False)  # waits behind the held lane, then gives up
        assert caught.value.code == "timeout"
        gate.set()
        await holder
    assert monitor.commands == ["set_link"]  # the one that timed out never reached QEMU
