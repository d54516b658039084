"""How the requester hands a request to the MQTT client (its answers and reconnects: test_mqtt_client.py)."""

from __future__ import annotations

import asyncio

from fakefleet import settings

from qmpnet.adapters.mqtt.requester import Requester, _Pending


class _AiomqttOnly:
    """A client with ``aiomqtt.Client.publish`` only: no paho client where ``publish_at_once`` looks."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, int]] = []

    async def publish(self, topic: str, payload: bytes, *, qos: int, properties: object, timeout: float) -> None:
        self.sent.append((topic, payload, qos))


async def test_without_a_paho_client_a_request_is_published_through_aiomqtt() -> None:
    requester = Requester(settings().mqtt, client_id="c1")
    requester.protocol = "3.1.1"
    loop = asyncio.get_running_loop()
    pending = _Pending("t1", "qmpnet/t1/guest/vm1/request/nic/list", b'{"transaction": "x"}', "x", loop.time() + 5,
                       loop.create_future())  # fmt: skip
    client = _AiomqttOnly()
    requester._publish(client, pending)  # type: ignore[arg-type]
    assert pending.sent
    await asyncio.gather(*requester._publishes)
    assert client.sent == [("qmpnet/t1/guest/vm1/request/nic/list", b'{"transaction": "x"}', 1)]
