"""How the requester hands a request to the MQTT client (its answers and reconnects: test_mqtt_client.py)."""

from __future__ import annotations

import asyncio
import json
import random
import re
from typing import TYPE_CHECKING, Any

import pytest
from fakefleet import settings
from pydantic import ValidationError

from qmpnet.adapters.mqtt.requester import _ANSWER, Requester, _loads, _Pending
from qmpnet.errors import InvalidRequest, OutcomeUnknown

if TYPE_CHECKING:
    from collections.abc import Callable


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


class _Subscribing:
    """A connected client with ``subscribe`` and ``aiomqtt.Client.publish`` only; what it is asked is recorded."""

    def __init__(self) -> None:
        self.subscribed: list[list[str]] = []
        self.sent: list[tuple[str, bytes, str]] = []
        self.published = asyncio.Event()

    async def subscribe(self, filters: list[tuple[str, int]]) -> list[int]:
        self.subscribed.append([topic_filter for topic_filter, _ in filters])
        return [1] * len(filters)

    async def publish(self, topic: str, payload: bytes, *, qos: int, properties: Any, timeout: float) -> None:
        self.sent.append((topic, payload, properties.ResponseTopic))
        self.published.set()


async def test_each_request_to_a_guest_goes_to_its_topics_which_are_subscribed_once() -> None:
    requester = Requester(settings().mqtt, client_id="c1")
    requester.protocol = "5"
    client = _Subscribing()
    requester._client = client  # type: ignore[assignment]
    router = asyncio.create_task(requester._keep_routing(client))  # type: ignore[arg-type]
    try:
        for round_ in range(3):
            for name in ("bad name", "vm/1"):  # refused each time, before anything is sent
                with pytest.raises(InvalidRequest, match="guest: "):
                    await requester.request("t1", name, "nic/list", {}, timeout=5)
            with pytest.raises(InvalidRequest, match="controller: "):
                await requester.request("t 1", "vm1", "nic/list", {}, timeout=5)
            payload = {"transaction": f"x{round_}"}
            asked = asyncio.create_task(requester.request("t1", "vm1", "nic/list", payload, timeout=5))
            await client.published.wait()
            client.published.clear()
            answer = {"transaction": f"x{round_}", "status": "ok", "data": {}}
            requester._read_answer("t1", "qmpnet/t1/client/c1/response", json.dumps(answer).encode())
            assert (await asked)["transaction"] == f"x{round_}"
        response = "qmpnet/t1/client/c1/response"
        assert client.subscribed == [["qmpnet/t1/status"], ["qmpnet/t1/guest/vm1/response/#", response]]
        request = "qmpnet/t1/guest/vm1/request/nic/list"
        assert client.sent == [(request, json.dumps({"transaction": f"x{n}"}).encode(), response) for n in range(3)]
    finally:
        router.cancel()
        await asyncio.gather(router, *requester._publishes, return_exceptions=True)


_ANSWERS = [
    {"transaction": "x", "status": "ok", "data": {"id": "net0"}},
    {"transaction": "x", "status": "ok", "data": None},
    {"transaction": "x", "status": "ok", "data": [1, "two", {"three": 3.0}]},
    {"transaction": "x", "status": "ok", "data": {}, "extra": 1},
    {"transaction": "x", "status": "ok"},
    {"transaction": "x", "status": "OK", "data": {}},
    {"transaction": "x", "status": ["ok"], "data": {}},
    {"transaction": "x", "data": {}, "status": "ok"},
    {"transaction": "x", "status": "error", "data": {}},
    {"transaction": "x", "status": "error", "error": {"code": "invalid_request", "message": "no"}},
    {"transaction": "x", "status": "error", "error": {"code": "no_such_code", "message": "no"}},
]


@pytest.mark.parametrize("answer", _ANSWERS)
async def test_an_answer_taken_as_it_is_is_one_the_models_accept_and_others_fail_as_they_did(
    answer: dict[str, Any],
) -> None:
    try:
        _ANSWER.validate_python(answer)
        problem = None
    except ValidationError as err:
        problem = err.errors(include_url=False)[0]["msg"]
    requester = Requester(settings().mqtt, client_id="c1")
    loop = asyncio.get_running_loop()
    pending = _Pending("t1", "qmpnet/t1/request/guests", b"{}", "x", loop.time() + 5, loop.create_future())
    requester._unanswered[("t1", "x")] = pending
    requester._read_answer("t1", "qmpnet/t1/response/guests", json.dumps(answer).encode())
    if problem is None:
        assert pending.future.result() == answer
    else:
        with pytest.raises(OutcomeUnknown, match=re.escape(f"a malformed message ({problem})")):
            pending.future.result()


_PAYLOADS = [
    b'{"transaction": "x", "status": "ok", "data": {"id": "net0", "pci": {"slot": 3}, "warnings": []}}',
    b'{"a":"\\ud83d\\ude00 caf\xc3\xa9 \\u00e9"}', b'{"a":"\\ud800"}', b'"\xed\xa0\x80"', b'\xef\xbb\xbf{"a":1}',
    '{"a": 1}'.encode("utf-16"), b"[" * 300 + b"]" * 300, b'{"a":1,"a":2,"b":3}', b' {"a":1}\n',
    b'{"a":1e400,"b":-1e400,"c":NaN,"d":Infinity,"e":-Infinity,"f":-0,"g":-0.0,"h":5e-324}',
    b'{"a":123456789012345678901234567890,"b":9007199254740993,"c":0.30000000000000004,"d":1.7976931348623157e308}',
    b'{"a":"x\x01y"}', b'{"a":01}', b'{"a":1.}', b'{"a":.5}', b"[1,]", b'{"a":"\\x"}', b'{"a":"\xff"}',
    b'{"a":1}{"b":2}', b"", b"null", b"nul",
]


@pytest.mark.parametrize("payload", _PAYLOADS)
def test_an_answer_is_decoded_as_json_loads_decodes_it(payload: bytes) -> None:
    def outcome(loads: Callable[[bytes], Any]) -> tuple[str, str]:
        try:
            return "ok", repr(loads(payload))
        except ValueError as err:
            return "error", str(err)

    assert outcome(_loads) == outcome(json.loads)


def test_numbers_are_decoded_as_json_loads_decodes_them() -> None:
    numbers = random.Random(17)  # noqa: S311 - numbers to parse, not secrets
    for _ in range(5000):
        value = numbers.choice([numbers.random() * 10 ** numbers.randint(-300, 300), numbers.uniform(-1e6, 1e6)])
        for text in (json.dumps(value), f"{value:.17g}", f"{value:.6e}", str(numbers.randint(-(2**70), 2**70))):
            payload = f'{{"n": {text}}}'.encode()
            assert repr(_loads(payload)) == repr(json.loads(payload)), payload
