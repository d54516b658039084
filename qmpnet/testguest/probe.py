"""An MQTT probe for tests: publishes requests and records everything it receives, in order, in MQTT 5 or 3.1.1.

:func:`wait_online` waits for a ``qmpnet serve`` (:class:`~qmpnet.testguest.services.Serve`) to publish its
retained ``online`` status and its guests' ``connected`` status; :func:`retained` reads a retained message, with a
positive signal for "there is none".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

import aiomqtt
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .services import NODELAY

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable, Mapping, Sequence
    from types import TracebackType

    from .services import Serve

__all__ = [
    "Msg",
    "Probe",
    "answer_topic",
    "retained",
    "topic_matches",
    "transaction_in",
    "wait_online",
    "wait_retained",
]


@dataclass
class Msg:
    """A received MQTT message."""

    topic: str
    payload: bytes
    retain: bool
    correlation: bytes | None = None
    response_topic: str | None = None
    at: float = field(default_factory=time.monotonic)

    @property
    def json(self) -> Any:  # noqa: ANN401 - any JSON value
        """The payload as JSON."""
        return json.loads(self.payload)

    def matches(self, topic_filter: str) -> bool:
        """Whether the message's topic matches ``topic_filter`` (``aiomqtt.Topic.matches``)."""
        return topic_matches(topic_filter, self.topic)


def answer_topic(request_topic: str) -> str:
    """Where a controller answers a request that has no MQTT 5 Response Topic (``request`` -> ``response``)."""
    head, sep, tail = request_topic.rpartition("/request/")
    if not sep:
        raise ValueError(f"{request_topic} is not a request topic")
    return f"{head}/response/{tail}"


class Probe:
    """An MQTT client for tests: publishes requests and records everything it receives, in order.

    Args:
        url: ``mqtt://host:port`` or ``mqtts://host:port``.
        protocol: 5 or 3 (3.1.1).
        username, password: Credentials.
        tls_context: For ``mqtts``.
        identifier: The client id (random when absent).
        session: Seconds the broker keeps this probe's session (subscriptions, queued messages) while it is
            disconnected; 0 (default) for a clean session. 3.1.1 has no expiry: any value > 0 keeps it for good.
    """

    def __init__(  # noqa: PLR0913 - one keyword per connection option
        self,
        url: str,
        *,
        protocol: int = 5,
        username: str | None = None,
        password: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        identifier: str | None = None,
        session: int = 0,
    ) -> None:
        host, port = url.split("://", 1)[1].rsplit(":", 1)
        self.v5 = protocol == 5
        self.identifier = identifier or f"probe-{uuid.uuid4().hex[:8]}"
        connect = None
        if self.v5 and session:
            connect = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            connect.SessionExpiryInterval = session
        self._client = aiomqtt.Client(
            host,
            int(port),
            identifier=self.identifier,
            protocol=aiomqtt.ProtocolVersion.V5 if self.v5 else aiomqtt.ProtocolVersion.V311,
            username=username,
            password=password,
            tls_context=tls_context,
            socket_options=(NODELAY,),
            clean_session=None if self.v5 else not session,
            clean_start=not session if self.v5 else MQTT_CLEAN_START_FIRST_ONLY,
            properties=connect,
        )
        self.messages: list[Msg] = []
        self._subscribed: set[str] = set()
        self._arrived = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        await self._client.__aenter__()
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._reader
        with contextlib.suppress(aiomqtt.MqttError):
            await self._client.__aexit__(exc_type, exc, tb)

    async def _read(self) -> None:
        async for message in self._client.messages:
            props = message.properties
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
            self.messages.append(
                Msg(
                    message.topic.value,
                    payload,
                    message.retain,
                    getattr(props, "CorrelationData", None) if props is not None else None,
                    getattr(props, "ResponseTopic", None) if props is not None else None,
                )
            )
            self._arrived.set()

    async def subscribe(self, *filters: str) -> None:
        """Subscribe to ``filters`` at QoS 1 (one SUBSCRIBE each, in order)."""
        for topic_filter in filters:
            await self._client.subscribe(topic_filter, qos=1)
            self._subscribed.add(topic_filter)

    async def publish(  # noqa: PLR0913 - the message, then keyword-only MQTT options
        self,
        topic: str,
        payload: Mapping[str, Any] | bytes | str,
        *,
        retain: bool = False,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        timeout: float | None = None,
    ) -> None:
        """Publish at QoS 1 (waits for the PUBACK, at most ``timeout``); a mapping is sent as JSON."""
        body = json.dumps(payload).encode() if not isinstance(payload, (bytes, str)) else payload
        properties = None
        if response_topic is not None or correlation is not None:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if response_topic is not None:
                properties.ResponseTopic = response_topic
            if correlation is not None:
                properties.CorrelationData = correlation
        await self._client.publish(topic, body, qos=1, retain=retain, properties=properties, timeout=timeout)

    def mark(self) -> int:
        """The index of the next message to arrive (pass as ``since`` to :meth:`wait`)."""
        return len(self.messages)

    def received(self, topic_filter: str, since: int = 0) -> list[Msg]:
        """Messages on topics matching ``topic_filter`` (``+``/``#`` wildcards) from index ``since``."""
        return [m for m in self.messages[since:] if m.matches(topic_filter)]

    async def wait(
        self,
        topic_filter: str,
        where: Callable[[Msg], bool] | None = None,
        *,
        since: int = 0,
        timeout: float = 5.0,
        count: int = 1,
    ) -> list[Msg]:
        """Wait until ``count`` messages matching ``topic_filter`` (and ``where``) arrived from index ``since``."""
        async with asyncio.timeout(timeout):
            while True:
                found = [m for m in self.received(topic_filter, since) if where is None or where(m)]
                if len(found) >= count:
                    return found
                self._arrived.clear()
                await self._arrived.wait()

    async def one(
        self, topic_filter: str, where: Callable[[Msg], bool] | None = None, *, since: int = 0, timeout: float = 5.0
    ) -> Msg:
        """The first message matching, waiting for it."""
        return (await self.wait(topic_filter, where, since=since, timeout=timeout))[0]

    async def ensure(self, *filters: str) -> None:
        """Subscribe to those of ``filters`` not subscribed yet."""
        await self.subscribe(*(f for f in filters if f not in self._subscribed))

    async def call(
        self,
        topic: str,
        payload: Mapping[str, Any] | bytes | str,
        *,
        timeout: float = 10.0,
        response_topic: str | None = None,
    ) -> dict[str, Any]:
        """Send one request and return the decoded answer, in either MQTT version.

        MQTT 5: with a Response Topic (default ``probe/<id>/response``) and a Correlation Data, matched on it.
        MQTT 3.1.1: the answer comes on the request topic with ``request`` -> ``response``, matched by the
        ``transaction`` (one is added to a mapping without one; a raw payload's own, or none).
        """
        if self.v5:
            answer_to = response_topic or self.response_topic
            await self.ensure(answer_to)
            correlation = uuid.uuid4().bytes
            since = self.mark()
            await self.publish(topic, payload, response_topic=answer_to, correlation=correlation)
            msg = await self.one(answer_to, lambda m: m.correlation == correlation, since=since, timeout=timeout)
        else:
            answer_to = answer_topic(topic)
            await self.ensure(answer_to)
            transaction: str | None = None
            if not isinstance(payload, (bytes, str)):
                transaction = str(payload.get("transaction") or uuid.uuid4().hex)
                payload = {**payload, "transaction": transaction}
            else:
                transaction = _transaction_of_raw(payload)
            since = self.mark()
            await self.publish(topic, payload)
            msg = await self.one(
                answer_to, lambda m: transaction_in(m) == transaction, since=since, timeout=timeout
            )
        answer: dict[str, Any] = msg.json
        return answer

    @property
    def response_topic(self) -> str:
        """The default Response Topic of :meth:`call` (MQTT 5)."""
        return f"probe/{self.identifier}/response"


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic-filter matching (``+`` one level, ``#`` the rest), by ``aiomqtt.Topic.matches``."""
    return aiomqtt.Topic(topic).matches(topic_filter)


def _transaction_of_raw(payload: bytes | str) -> str | None:
    try:
        decoded = json.loads(payload)
    except ValueError:
        return None
    value = decoded.get("transaction") if isinstance(decoded, dict) else None
    return value if isinstance(value, str) else None


def transaction_in(message: Msg) -> str | None:
    """The ``transaction`` of an answer (``None`` when it has none or is not JSON)."""
    try:
        value = message.json.get("transaction")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


async def retained(url: str, topic: str, *, marker: str, **probe_args: Any) -> Any:  # noqa: ANN401 - JSON, Probe's keywords
    """The JSON retained on ``topic``, or ``None`` if there is none.

    ``marker`` is a topic known to hold a retained message (a controller's status): it is subscribed after
    ``topic``, and the broker sends ``topic``'s retained message before ``marker``'s, so once the marker's has
    arrived, the absence of one on ``topic`` is certain. Exact topics only: RabbitMQ gives wildcard subscribers
    no retained messages.
    """
    async with Probe(url, **probe_args) as probe:
        await probe.subscribe(topic, marker)
        await probe.one(marker, lambda m: m.retain)
        found = [m for m in probe.received(topic) if m.retain and m.payload]
        return found[0].json if found else None


async def wait_retained(
    url: str, topic: str, where: Callable[[Any], bool], *, timeout: float = 10.0, **probe_args: Any  # noqa: ANN401
) -> Any:  # noqa: ANN401 - any JSON value
    """Wait until ``topic`` holds (or is updated to) a JSON payload for which ``where`` is true."""
    async with Probe(url, **probe_args) as probe:
        await probe.subscribe(topic)
        msg = await probe.one(topic, lambda m: bool(m.payload) and where(m.json), timeout=timeout)
        return msg.json


async def wait_online(
    serve: Serve, url: str, *, guests_connected: Sequence[str] = (), timeout: float = 15.0, **probe_args: Any  # noqa: ANN401
) -> None:
    """Wait for the controller's retained ``online`` status and for ``guests_connected`` to be connected."""
    base = serve.base
    try:
        await wait_retained(url, f"{base}/status", lambda s: s["state"] == "online", timeout=timeout, **probe_args)
        for guest in guests_connected:
            await wait_retained(
                url,
                f"{base}/guest/{guest}/status",
                lambda s: s["state"] == "connected",
                timeout=timeout,
                **probe_args,
            )
    except TimeoutError as err:
        raise RuntimeError(f"controller not ready\n{serve.describe()}") from err
