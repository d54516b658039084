"""The controller with in-memory ports: a recording state sink and fake QMP connections (no broker, no QEMU)."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, Any

from fakefleet import Fleet, Sink, running, settings
from waiting import eventually

from qmpnet.adapters.store import MemoryGuestStore
from qmpnet.core.records import GuestRecord
from qmpnet.serve.controller import Controller
from qmpnet.serve.metrics import Metrics
from qmpnet.settings import (
    ControllerSettings,
    LaneSettings,
    MqttSettings,
    ReconcileSettings,
    Settings,
    UnplugSettings,
)

if TYPE_CHECKING:
    from pathlib import Path

    import pytest

    from qmpnet.api.wire.envelopes import Response


def ok(response: Response) -> Any:
    assert response.status == "ok", response
    return response.data


def error_code(response: Response) -> str:
    assert response.status == "error", response
    return response.error.code



async def connected(sink: Sink, guest: str = "vm1") -> None:
    await sink.until(lambda: "connected" in sink.states(guest))


async def test_a_connected_guest_serves_requests_and_publishes_state(sink: Sink, fleet: Fleet) -> None:
    async with running(Controller(settings(), sink, fleet.connect, version="9.9")) as controller:
        await connected(sink)
        assert sink.controller[-1].guests == ["vm1"]
        assert sink.controller[-1].version == "9.9"
        assert sink.states("vm1") == ["connecting", "connected"]
        assert sink.event_names("vm1") == ["guest_connected"]
        nic = ok(await controller.handle("vm1", "nic/add", {"transaction": "a", "nic": {"id": "n1"}}))
        assert nic.id == "n1"
        assert [n.id for n in sink.nics[-1][1].nics if n.id == "n1"] == ["n1"]
        assert sink.event_names("vm1")[-1] == "nic_added"
        nic = ok(await controller.handle("vm1", "nic/link", {"id": "n1", "up": False}))
        assert nic.link == "down"
        assert next(n for n in sink.nics[-1][1].nics if n.id == "n1").link == "down"
        guests = ok(await controller.handle(None, "guests", {})).guests
        assert [(g.name, g.state, g.qemu, g.machine) for g in guests] == [
            ("vm1", "connected", "7.2.22", "pc-i440fx-7.2")
        ]


async def test_a_duplicate_transaction_gets_the_first_answer_and_is_applied_once(
    sink: Sink, fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="qmpnet.serve")
    async with running(Controller(settings(), sink, fleet.connect, version="0")) as controller:
        await connected(sink)
        monitor = fleet.current("vm1")
        monitor.gates["device_add"] = asyncio.Event()
        request = {"transaction": "t-1", "nic": {"model": "e1000"}}
        first = asyncio.create_task(controller.handle("vm1", "nic/add", request))
        await eventually(lambda: "device_add" in monitor.commands)  # the first is inside QEMU's device_add
        second = asyncio.create_task(controller.handle("vm1", "nic/add", {**request, "nic": {"model": "rtl8139"}}))
        await eventually(lambda: "repeated" in caplog.text)  # the second found the first's transaction
        monitor.gates["device_add"].set()
        answers = await asyncio.gather(first, second)
        third = await controller.handle("vm1", "nic/add", request)
        assert answers[0] == answers[1] == third
        assert monitor.commands.count("device_add") == 1
        assert ok(third).model == "e1000"
        other = await controller.handle("vm1", "nic/add", {"transaction": "t-2", "nic": {}})
        assert ok(other).id != ok(third).id
        assert monitor.commands.count("device_add") == 2


async def test_the_dedup_window_ends(sink: Sink, fleet: Fleet) -> None:
    # The guest's record keeps the operation for lane.operation_window (a repeat is answered from it): end both.
    windows = {"mqtt": MqttSettings(controller_id="t1", dedup_window=0), "lane": LaneSettings(operation_window=0)}
    fast = settings().model_copy(update=windows)
    async with running(Controller(fast, sink, fleet.connect, version="0")) as controller:
        await connected(sink)
        request = {"transaction": "again", "nic": {}}
        ok(await controller.handle("vm1", "nic/add", request))
        ok(await controller.handle("vm1", "nic/add", request))
        assert fleet.current("vm1").commands.count("device_add") == 2


async def test_unknown_guest_unknown_op_and_bad_fields(sink: Sink, fleet: Fleet) -> None:
    async with running(Controller(settings(), sink, fleet.connect, version="0")) as controller:
        await connected(sink)
        missing = await controller.handle("nosuch", "nic/list", {"transaction": "x"})
        assert error_code(missing) == "not_found"
        assert missing.transaction == "x"
        unknown = await controller.handle("vm1", "nic/explode", {})
        assert error_code(unknown) == "invalid_request"
        assert unknown.status == "error"
        assert unknown.error.field == "op"
        assert error_code(await controller.handle(None, "nic/add", {})) == "invalid_request"
        bad = await controller.handle("vm1", "nic/add", {"transaction": "b", "nic": {"vectors": -1}})
        assert bad.status == "error"
        assert (bad.error.code, bad.error.field, bad.transaction) == ("invalid_request", "nic.vectors", "b")
        assert "device_add" not in fleet.current("vm1").commands


async def test_a_guest_that_cannot_be_reached_fails_fast_and_is_retried(sink: Sink, fleet: Fleet) -> None:
    fleet.refuse.add("vm1")
    async with running(Controller(settings(), sink, fleet.connect, version="0")) as controller:
        await sink.until(lambda: "disconnected" in sink.states("vm1"))
        answer = await controller.handle("vm1", "nic/list", {"transaction": "down"})
        assert error_code(answer) == "guest_unavailable"
        assert answer.status == "error"
        assert "refused" in answer.error.message
        await eventually(lambda: fleet.attempts["vm1"] >= 3)  # retried with backoff
        fleet.refuse.clear()
        await connected(sink)
        ok(await controller.handle("vm1", "nic/list", {}))


async def test_requests_during_the_first_connection_attempt_wait_for_it_in_order(sink: Sink, fleet: Fleet) -> None:
    fleet.gate = asyncio.Event()  # the first attempt hangs: requests kept by the broker arrive meanwhile
    async with running(Controller(settings(), sink, fleet.connect, version="0")) as controller:
        await eventually(lambda: fleet.attempts.get("vm1") == 1)
        waiting = [
            asyncio.create_task(controller.handle("vm1", "nic/add", {"transaction": f"q{n}", "nic": {"id": f"q{n}"}}))
            for n in range(3)
        ]
        fleet.gate.set()
        answers = await asyncio.gather(*waiting)
        assert [ok(a).id for a in answers] == ["q0", "q1", "q2"]
        assert fleet.current("vm1").commands.count("device_add") == 3


async def test_a_closed_connection_is_reported_and_reconnected(sink: Sink, fleet: Fleet) -> None:
    async with running(Controller(settings(), sink, fleet.connect, version="0")) as controller:
        await connected(sink)
        fleet.current("vm1").closed.set()
        await sink.until(lambda: sink.states("vm1")[-1:] == ["disconnected"])
        assert "guest_disconnected" in sink.event_names("vm1")
        await sink.until(lambda: sink.states("vm1")[-1:] == ["connected"])
        assert sink.event_names("vm1") == ["guest_connected", "guest_disconnected", "guest_connected"]
        assert len(fleet.connections["vm1"]) == 2
        ok(await controller.handle("vm1", "nic/list", {}))


async def test_a_late_unplug_ack_publishes_nic_removed(sink: Sink, fleet: Fleet) -> None:
    async with running(Controller(settings(), sink, fleet.connect, version="0")) as controller:
        await connected(sink)
        ok(await controller.handle("vm1", "nic/add", {"nic": {"id": "late"}}))
        pending = ok(await controller.handle("vm1", "nic/del", {"id": "late", "timeout": 0}))
        assert pending.state == "removal_pending"
        assert next(n for n in sink.nics[-1][1].nics if n.id == "late").state == "removal_pending"
        fleet.current("vm1").emit("DEVICE_DELETED", {"device": "late", "path": "/machine/peripheral/late"})
        await sink.until(lambda: "nic_removed" in sink.event_names("vm1"))
        assert "late" not in {n.id for n in sink.nics[-1][1].nics}


async def test_the_status_carries_the_capacity_as_nics_come_and_go(sink: Sink, fleet: Fleet) -> None:
    def free(guest: str = "vm1") -> int | None:
        capacity = [status for name, status in sink.status if name == guest][-1].capacity
        return None if capacity is None else capacity.models[0].free

    async with running(Controller(settings(), sink, fleet.connect, version="0")) as controller:
        await connected(sink)
        start = free()
        assert start is not None  # published with "connected"
        published = len(sink.status)
        assert ok(await controller.handle("vm1", "slots", {})).models[0].free == start
        assert len(sink.status) == published  # unchanged: not published again
        ok(await controller.handle("vm1", "nic/add", {"nic": {"id": "c1"}}))
        assert free() == start - 1  # published within the request (the bus sends it after the answer)
        pending = ok(await controller.handle("vm1", "nic/del", {"id": "c1", "timeout": 0}))
        assert pending.state == "removal_pending"
        assert free() == start - 1  # a pending unplug keeps its place
        # The ack is taken in by a re-read of the guest (the recording monitor answers the captured guest, without
        # c1): the event comes while the lane re-reads, so the capacity is read once the lane is free.
        fleet.current("vm1").emit("DEVICE_DELETED", {"device": "c1", "path": "/machine/peripheral/c1"})
        await sink.until(lambda: free() == start)
        fleet.current("vm1").closed.set()
        await sink.until(lambda: sink.states("vm1")[-1:] == ["disconnected"])
        assert free() is None  # unknown while disconnected


async def test_a_link_changed_behind_the_lanes_back_is_published_by_the_resync(sink: Sink, fleet: Fleet) -> None:
    store = MemoryGuestStore(GuestRecord(address="/x/vm1.qmp", name="vm1"), key="vm1")

    async def open_store(name: str, address: str) -> MemoryGuestStore:
        return store

    fast = settings().model_copy(update={"reconcile": ReconcileSettings(resync_interval=0.01)})
    async with running(Controller(fast, sink, fleet.connect, version="0", open_store=open_store)):
        await connected(sink)
        cold = next(n for n in sink.nics[-1][1].nics if n.id == "e1")  # in the captured guest, not added by qmpnet
        assert cold.link == "up"
        # Its link intent changes in the record without an event from the lane (as another writer's would).
        store.save(store.record.model_copy(update={"links": {cold.id: "down"}}))
        await sink.until(lambda: "link_changed" in sink.event_names("vm1"))
        assert next(n for n in sink.nics[-1][1].nics if n.id == cold.id).link == "down"
        (event,) = [e for g, name, e in sink.events if name == "link_changed"]
        assert (event.id, event.nic.link if event.nic else None) == (cold.id, "down")
        published, reads = len(sink.nics), fleet.current("vm1").observed
        await eventually(lambda: fleet.current("vm1").observed >= reads + 2)  # two more resyncs: nothing new to tell
        assert sink.event_names("vm1").count("link_changed") == 1
        assert len(sink.nics) == published


async def test_rx_filter_changes_become_events(sink: Sink, fleet: Fleet) -> None:
    async with running(Controller(settings(), sink, fleet.connect, version="0")):
        await connected(sink)
        fleet.current("vm1").emit("NIC_RX_FILTER_CHANGED", {"name": "net0", "path": "/x"})
        (event,) = [e for g, name, e in sink.events if name == "rx_filter_changed"]
        assert (event.guest, event.id) == ("vm1", "net0")


async def test_a_bug_is_answered_internal(sink: Sink, fleet: Fleet) -> None:
    async with running(Controller(settings(), sink, fleet.connect, version="0")) as controller:
        await connected(sink)

        fleet.current("vm1").errors["netdev_add"] = RuntimeError("boom")  # type: ignore[assignment]
        answer = await controller.handle("vm1", "nic/add", {"transaction": "bug", "nic": {}})
        assert error_code(answer) == "internal"
        assert answer.transaction == "bug"


def test_backoff_is_capped_exponential_with_jitter(sink: Sink, fleet: Fleet) -> None:
    fleet_settings = ControllerSettings(backoff_min=0.1, backoff_max=2.0)
    controller = Controller(Settings(controller=fleet_settings), sink, fleet.connect, version="0")
    for failures, ceiling in [(0, 0.1), (1, 0.2), (3, 0.8), (5, 2.0), (60, 2.0)]:
        delays = [controller.backoff(failures) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1


async def test_metrics_count_requests_and_guest_states(sink: Sink, fleet: Fleet) -> None:
    metrics = Metrics()
    async with running(Controller(settings(), sink, fleet.connect, version="0", observer=metrics)) as controller:
        await connected(sink)
        ok(await controller.handle("vm1", "nic/list", {}))
        await controller.handle("vm1", "nic/bogus", {})
        value = metrics.registry.get_sample_value
        assert value("qmpnet_requests_total", {"op": "nic/list", "status": "ok"}) == 1
        assert value("qmpnet_requests_total", {"op": "unknown", "status": "invalid_request"}) == 1
        assert value("qmpnet_request_seconds_count", {"op": "nic/list"}) == 1
        assert value("qmpnet_guests", {"state": "connected"}) == 1
        assert value("qmpnet_guests", {"state": "disconnected"}) == 0


def _socket_file(path: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    return server


async def test_guest_directory_discovery(sink: Sink, fleet: Fleet, sockdir: Path) -> None:
    fast = settings(guests={}, guest_dir=sockdir, discovery_interval=0.01)
    first = _socket_file(sockdir / "alpha.qmp")
    (sockdir / "plain.qmp").write_text("not a socket")
    bad = _socket_file(sockdir / "bad name!.qmp")
    metrics = Metrics()
    guests = metrics.registry.get_sample_value
    try:
        async with running(Controller(fast, sink, fleet.connect, version="0", observer=metrics)) as controller:
            await connected(sink, "alpha")
            assert sink.controller[-1].guests == ["alpha"]
            second = _socket_file(sockdir / "beta.qmp")
            await sink.until(lambda: sink.controller[-1].guests == ["alpha", "beta"])
            await connected(sink, "beta")
            assert guests("qmpnet_guests", {"state": "connected"}) == 2
            first.close()
            (sockdir / "alpha.qmp").unlink()
            await sink.until(lambda: sink.controller[-1].guests == ["beta"])
            assert sink.gone == ["alpha"]
            assert guests("qmpnet_guests", {"state": "connected"}) == 1  # the metric follows the removal at once
            assert error_code(await controller.handle("alpha", "nic/list", {})) == "not_found"
            second.close()
    finally:
        first.close()
        bad.close()


async def test_a_stuck_unplug_is_published_once_and_pending_since_survives_a_reconnect(
    sink: Sink, fleet: Fleet
) -> None:
    store = MemoryGuestStore(GuestRecord(address="/x/vm1.qmp", name="vm1"), key="vm1")

    async def open_store(name: str, address: str) -> MemoryGuestStore:
        return store

    quick = settings().model_copy(update={"unplug": UnplugSettings(stuck_after=0.05)})

    def stuck() -> list[str | None]:
        return [event.id for _, name, event in sink.events if name == "unplug_stuck"]

    def published(nic_id: str) -> float | None:
        return next(n for n in sink.nics[-1][1].nics if n.id == nic_id).pending_since

    async with running(Controller(quick, sink, fleet.connect, version="0", open_store=open_store)) as controller:
        await connected(sink)
        # e1 is a NIC of the captured guest, which the fake connection keeps showing: its unplug stays pending.
        assert ok(await controller.handle("vm1", "nic/del", {"id": "e1", "timeout": 0})).state == "removal_pending"
        since = store.record.nics["e1"].pending_since
        assert since is not None
        assert published("e1") == since
        await sink.until(lambda: stuck() == ["e1"])
        (message,) = [event for _, name, event in sink.events if name == "unplug_stuck"]
        assert message.nic is not None
        assert message.nic.pending_since == since
        assert message.message is not None
        assert "system_reset" in message.message
        # A repeated nic/del answers the same and sends QEMU nothing.
        assert ok(await controller.handle("vm1", "nic/del", {"id": "e1", "timeout": 0})).state == "removal_pending"
        assert fleet.current("vm1").commands.count("device_del") == 1
        fleet.current("vm1").closed.set()
        await sink.until(lambda: sink.states("vm1")[-2:] == ["disconnected", "connected"])
        # The new connection: the list has the same pending_since, nothing was asked again, nothing told again
        # (v1's unplug, stuck after the reconnect, is told alone).
        assert published("e1") == since
        assert ok(await controller.handle("vm1", "nic/del", {"id": "v1", "timeout": 0})).state == "removal_pending"
        await sink.until(lambda: stuck() == ["e1", "v1"])
        assert fleet.current("vm1").commands.count("device_del") == 1  # v1's only
