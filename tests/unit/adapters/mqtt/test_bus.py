"""A real request's order on the bus: its answer, then the state, then the events it caused.

The bus answers requests through a real :class:`~qmpnet.serve.controller.Controller` whose guest runs on a recording
monitor (no broker, no QEMU), and is that controller's state sink; what would go to the broker is read from the
bus's outbox, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import TYPE_CHECKING

from fakefleet import Fleet, running, settings

from qmpnet.adapters.mqtt.bus import IncomingRequest, MqttBus
from qmpnet.api.wire.envelopes import EventMessage, NicList
from qmpnet.serve.controller import Controller

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

BASE = "qmpnet/t1/guest/vm1"


async def published(bus: MqttBus, topic: str, text: str, timeout: float = 2.0, *, flush: bool = False) -> None:
    """Take what the bus sends until a message on ``topic`` containing ``text`` (the guest connected, ...).

    ``flush``: the retained state held back for its interval goes out at once.
    """
    async with asyncio.timeout(timeout):
        while True:
            if flush:
                bus.outbox.flush_state()
            seq, item = await bus.outbox.next()
            bus.outbox.acknowledged(seq)
            if item.topic == topic and text in item.payload().decode():
                return


async def taken(bus: MqttBus) -> list[tuple[str, bytes]]:
    """Everything the bus would send now, in order."""
    out: list[tuple[str, bytes]] = []
    while True:
        try:
            async with asyncio.timeout(0):  # only what is queued already
                seq, item = await bus.outbox.next()
        except TimeoutError:
            return out
        out.append((item.topic, item.payload()))
        bus.outbox.acknowledged(seq)


def request(op: str, body: dict[str, object]) -> IncomingRequest:
    return IncomingRequest(f"{BASE}/request/{op}", json.dumps(body).encode())


@contextlib.asynccontextmanager
async def serving(fleet: Fleet, state_interval: float = 0) -> AsyncIterator[MqttBus]:
    """A controller serving guest vm1 through a bus; by default every change of retained state is sent at once."""
    bus = MqttBus(settings().mqtt.model_copy(update={"state_interval": state_interval}))
    bus.outbox.session_started()
    async with running(Controller(settings(), bus, fleet.connect, version="0")) as controller:
        bus.handler = controller
        await published(bus, f"{BASE}/status", '"connected"', flush=True)
        yield bus


async def test_nic_add_answers_before_its_state_and_event(fleet: Fleet) -> None:
    async with serving(fleet) as bus:
        await taken(bus)
        await bus.answer(request("nic/add", {"transaction": "a", "nic": {"id": "n1"}}))
        sent = await taken(bus)
        assert [topic for topic, _ in sent] == [
            f"{BASE}/response/nic/add",
            f"{BASE}/status",  # the guest's capacity: one place fewer
            f"{BASE}/nics",
            f"{BASE}/event/nic_added",
        ]
        assert json.loads(sent[0][1])["transaction"] == "a"
        assert json.loads(sent[1][1])["capacity"] is not None
        assert "n1" in sent[2][1].decode()


async def test_nic_del_answering_removal_pending_answers_before_its_state_and_event(fleet: Fleet) -> None:
    async with serving(fleet) as bus:
        await bus.answer(request("nic/add", {"nic": {"id": "n2"}}))
        await taken(bus)
        await bus.answer(request("nic/del", {"transaction": "d", "id": "n2", "timeout": 0}))
        sent = await taken(bus)
        assert [topic for topic, _ in sent] == [
            f"{BASE}/response/nic/del",
            f"{BASE}/nics",
            f"{BASE}/event/nic_removal_pending",
        ]
        assert json.loads(sent[0][1])["data"] == {"id": "n2", "state": "removal_pending"}
        assert '"removal_pending"' in sent[1][1].decode()


async def test_state_from_outside_a_request_goes_out_at_once(fleet: Fleet) -> None:
    async with serving(fleet) as bus:
        await bus.answer(request("nic/add", {"nic": {"id": "n3"}}))
        await bus.answer(request("nic/del", {"id": "n3", "timeout": 0}))
        await taken(bus)
        fleet.current("vm1").emit("DEVICE_DELETED", {"device": "n3", "path": "/machine/peripheral/n3"})
        await published(bus, f"{BASE}/event/nic_removed", '"n3"')


async def test_a_burst_of_changes_publishes_the_latest_state_once(fleet: Fleet) -> None:
    async with serving(fleet, state_interval=3600) as bus:  # the connect's state was just sent: the rest waits
        before = _free(bus.outbox.retained(f"{BASE}/status"))
        for n in (1, 2, 3):
            await bus.answer(request("nic/add", {"nic": {"id": f"n{n}"}}))
        held = await taken(bus)
        assert [topic for topic, _ in held] == [
            topic for n in (1, 2, 3) for topic in (f"{BASE}/response/nic/add", f"{BASE}/event/nic_added")
        ]  # answers and events are never held back
        bus.outbox.flush_state()
        sent = await taken(bus)
    assert [topic for topic, _ in sent] == [f"{BASE}/status", f"{BASE}/nics"]
    nics = json.loads(sent[1][1])["nics"]
    assert [nic["id"] for nic in nics][-3:] == ["n1", "n2", "n3"]  # the latest list, once
    assert _free(sent[0][1]) == before - 3  # the capacity after the last add


def _free(status: bytes | None) -> int:
    """The places for a virtio NIC a guest's retained status counts."""
    assert status is not None
    models = json.loads(status)["capacity"]["models"]
    return next(int(model["free"]) for model in models if model["model"] == "virtio-net-pci")


async def test_state_held_back_goes_out_when_its_interval_ends(fleet: Fleet) -> None:
    async with serving(fleet, state_interval=0.05) as bus:
        await taken(bus)
        await bus.answer(request("nic/add", {"nic": {"id": "n1"}}))
        await bus.answer(request("nic/add", {"nic": {"id": "n2"}}))
        await published(bus, f"{BASE}/nics", '"n2"')  # without a flush, within the deadline


async def test_a_deletion_is_never_held_back_and_drops_the_state_due() -> None:
    bus = MqttBus(settings().mqtt.model_copy(update={"state_interval": 3600}))
    bus.outbox.session_started()
    bus.guest_nics("vm1", NicList(nics=[]))
    bus.guest_nics("vm1", NicList(nics=[]))  # within the interval: held back
    assert [topic for topic, _ in await taken(bus)] == [f"{BASE}/nics"]
    bus.guest_gone("vm1")  # deletes both retained topics at once
    sent = await taken(bus)
    assert sent == [(f"{BASE}/status", b""), (f"{BASE}/nics", b"")]
    bus.outbox.flush_state()
    assert await taken(bus) == []  # the held-back list is not sent after its deletion
    await asyncio.wait_for(bus.outbox.settled(), 1)


class _AiomqttOnly:
    """A client with ``aiomqtt.Client.publish`` only (no paho client where the Publisher looks): the bus's fallback."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, int, bool]] = []

    async def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool, properties: object,
                      timeout: float) -> None:  # fmt: skip
        await asyncio.sleep(0)  # the broker's PUBACK comes later
        self.sent.append((topic, payload, qos, retain))


async def test_without_the_publisher_the_bus_publishes_through_aiomqtt_in_order() -> None:
    bus = MqttBus(settings().mqtt)
    bus.outbox.session_started()
    client = _AiomqttOnly()
    sender = asyncio.create_task(bus._send(client))  # type: ignore[arg-type]
    try:
        bus.guest_nics("vm1", NicList(nics=[]))
        bus.event("vm1", "nic_added", EventMessage(ts=1.0, guest="vm1", id="n1"))
        await asyncio.wait_for(bus.outbox.settled(), 2)  # both acknowledged
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
    assert [(topic, qos, retain) for topic, _, qos, retain in client.sent] == [
        (f"{BASE}/nics", 1, True),
        (f"{BASE}/event/nic_added", 1, False),
    ]
