"""The bus sends a request's answer before the state and event the request caused (no broker: a recording client)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, cast

from qmpnet.bus.mqtt import MqttBus
from qmpnet.settings import MqttSettings
from qmpnet.wire.envelopes import ControllerOnline, EventMessage, NicList, to_wire

if TYPE_CHECKING:
    import aiomqtt


class _Info:
    rc = 0


class _Paho:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bool]] = []

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool, properties: Any) -> _Info:
        assert qos == 1
        self.sent.append((topic, payload, retain))
        return _Info()


class _Client:
    def __init__(self) -> None:
        self._client = _Paho()


def _bus() -> tuple[MqttBus, _Paho]:
    bus = MqttBus(MqttSettings(controller_id="h1"))
    client = _Client()
    bus._client = cast("aiomqtt.Client", client)
    return bus, client._client


async def test_the_answer_goes_out_before_the_state_and_event_it_caused() -> None:
    bus, paho = _bus()
    nics = NicList(nics=[])
    event = EventMessage(ts=1.0, guest="vm1")
    bus.guest_nics("vm1", nics)  # what a hot-add does in the lane, in the same step as its answer
    bus.event("vm1", "nic_added", event)
    bus._send("qmpnet/h1/client/c1/response", b'{"status":"ok"}', retain=False)
    await asyncio.sleep(0)
    assert paho.sent == [
        ("qmpnet/h1/client/c1/response", b'{"status":"ok"}', False),
        ("qmpnet/h1/guest/vm1/nics", to_wire(nics), True),
        ("qmpnet/h1/guest/vm1/event/nic_added", to_wire(event), False),
    ]
    assert bus._retained["qmpnet/h1/guest/vm1/nics"] == to_wire(nics)


async def test_state_keeps_its_order_and_offline_comes_last() -> None:
    bus, paho = _bus()
    bus.controller_status(ControllerOnline(state="online", version="1", api=1, guests=["vm1"]))
    bus.guest_nics("vm1", NicList(nics=[]))
    bus.guest_gone("vm1")
    bus._flush()  # what shutting down does before publishing "offline"
    assert [(topic, retain) for topic, _, retain in paho.sent] == [
        ("qmpnet/h1/status", True),
        ("qmpnet/h1/guest/vm1/nics", True),
        ("qmpnet/h1/guest/vm1/status", True),
        ("qmpnet/h1/guest/vm1/nics", True),
    ]
    assert "qmpnet/h1/guest/vm1/nics" not in bus._retained
    await asyncio.sleep(0)  # the scheduled flush finds nothing left
    assert len(paho.sent) == 4


def test_without_a_running_loop_state_is_published_at_once() -> None:
    bus, paho = _bus()
    bus.guest_nics("vm1", NicList(nics=[]))
    assert [topic for topic, _, _ in paho.sent] == ["qmpnet/h1/guest/vm1/nics"]
