"""The controller's broker connection: requests in, answers, retained state and events out (over ``aiomqtt``).

Design decisions:

- **A reconnect loop around short-lived clients.** Each broker session is a fresh ``aiomqtt.Client`` (clean start,
  subscriptions made anew); when the session breaks the loop waits with capped exponential backoff and starts
  another. Retained state is kept here, topic by topic, and re-published whole at every session start, so a
  restarted broker (or one that lost its retained store) is brought up to date. The will is ``offline``.
- **Requests outlive sessions.** Each request runs in its own task (named for its guest) that belongs to the bus,
  not to the session: a hot-add under way when the broker goes away finishes, and its answer goes out on the next
  session if there is one. Tasks are created in arrival order and reach the guest's lane without suspending, so
  per-guest order is the order the broker delivered the requests in.
- **Refuse before executing.** Retained requests (seen through MQTT 5's *retain as published*), oversized payloads
  and non-objects are answered ``invalid_request`` here; everything else is the controller's job.
- **Publishing never blocks the caller.** State, events and answers are queued on the MQTT connection
  (:func:`publish_nowait`); the MQTT library keeps each in flight until the broker acknowledges it.
- **The answer first, then the state.** Retained state and events are built, serialised and queued just after
  the current step of the event loop (in call order, one callback for all of them), so a request's answer, sent
  in the same step as the change it caused, goes out before the ``nics`` state and the event it produced: the
  requester's latency does not include them.
- **``aiomqtt`` stays in here.** Its errors are logged and turned into reconnects; none escapes ``run``. Nagle is
  off on the socket (TCP_NODELAY): with delayed ACKs a request/response round trip otherwise costs ~88 ms.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
from typing import TYPE_CHECKING, Any, Final, Protocol

import aiomqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from qmpnet.backoff import backoff
from qmpnet.errors import InvalidRequest
from qmpnet.settings import parse_broker_url
from qmpnet.wire.envelopes import ControllerOffline, error_response, to_wire, transaction_of
from qmpnet.wire.topics import RequestTopic, Topics

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from pydantic import BaseModel

    from qmpnet.settings import MqttSettings
    from qmpnet.wire.envelopes import ControllerOnline, EventMessage, GuestStatus, NicList, Response

__all__ = ["MqttBus", "RequestHandler", "make_client", "publish_nowait"]

log = logging.getLogger(__name__)

NODELAY: Final = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
MQTT_ERR_SUCCESS: Final = MQTTErrorCode.MQTT_ERR_SUCCESS
_OFFLINE: Final = to_wire(ControllerOffline(state="offline"))
_SHUTDOWN_PUBLISH_TIMEOUT: Final = 2.0


class RequestHandler(Protocol):
    """What answers requests (the controller)."""

    async def handle(self, guest: str | None, op: str, payload: Mapping[str, Any]) -> Response:
        """Answer a request; ``guest`` is ``None`` for controller-level ops. Raises only ``CancelledError``."""
        ...

    def set_desired(self, guest: str, document: Mapping[str, Any] | InvalidRequest | None) -> None:
        """Take ``guest``'s desired NIC set (``None``: cleared; an error: a payload that could not be read)."""
        ...


def make_client(
    settings: MqttSettings, *, identifier: str, will: aiomqtt.Will | None = None, protocol: str | None = None
) -> aiomqtt.Client:
    """An ``aiomqtt.Client`` for ``settings`` (broker URL, credentials, TLS), with TCP_NODELAY on its socket."""
    url = parse_broker_url(settings.broker)
    tls_context = None
    if url.tls:
        tls_context = ssl.create_default_context(cafile=settings.ca_file)
        if settings.cert_file is not None:
            tls_context.load_cert_chain(settings.cert_file, settings.key_file)
    password = settings.password.get_secret_value() if settings.password is not None else url.password
    v5 = (protocol or settings.protocol) == "5"
    return aiomqtt.Client(
        url.host,
        url.port,
        username=settings.username or url.username,
        password=password,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        clean_session=None if v5 else True,
        will=will,
        keepalive=settings.keepalive,
        timeout=settings.connect_timeout,
        tls_context=tls_context,
        socket_options=(NODELAY,),
        logger=logging.getLogger("qmpnet.bus.paho"),
    )


class MqttBus:
    """The controller's side of the MQTT API; also the controller's :class:`~qmpnet.controller.StateSink`.

    Args:
        settings: Broker, controller id, topic root and limits.
    """

    def __init__(self, settings: MqttSettings) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_root, settings.controller_id)
        self.connected = asyncio.Event()
        self._v5 = settings.protocol == "5"
        self._client: aiomqtt.Client | None = None
        self._retained: dict[str, bytes] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._handler: RequestHandler | None = None
        self._session_started = False
        self._deferred: list[tuple[Callable[..., None], tuple[object, ...]]] = []

    # ------------------------------------------------------------------------------------------ the session loop

    async def run(self, handler: RequestHandler) -> None:
        """Serve requests with ``handler`` until cancelled, reconnecting to the broker whenever needed.

        On cancellation publishes ``offline`` (retained) and disconnects cleanly, so the will is not sent.
        """
        self._handler = handler
        failures = 0
        try:
            while True:
                self._session_started = False
                try:
                    await self._session()
                except aiomqtt.MqttError as err:
                    failures = 0 if self._session_started else failures + 1
                    delay = backoff(self.settings.reconnect_min, self.settings.reconnect_max, failures)
                    log.warning("broker %s: %s; reconnecting in %.1f s", self.settings.broker, err, delay)
                    await asyncio.sleep(delay)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _session(self) -> None:
        will = aiomqtt.Will(self.topics.status, _OFFLINE, qos=1, retain=True)
        client = make_client(self.settings, identifier=f"qmpnet-{self.settings.controller_id}", will=will)
        async with client:
            self._session_started = True
            try:
                await self._subscribe(client)
                self._client = client
                log.info("broker %s: connected as %s", self.settings.broker, self.settings.controller_id)
                for topic, payload in list(self._retained.items()):
                    self._send(topic, payload, retain=True)
                self.connected.set()
                async for message in client.messages:
                    self._receive(message)
            except asyncio.CancelledError:
                await self._say_offline(client)
                raise
            finally:
                self._client = None
                self.connected.clear()

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        # MQTT 5's "retain as published" shows whether a request was retained; 3.1.1 only shows it for old ones.
        options = SubscribeOptions(qos=1, retainAsPublished=True) if self._v5 else None
        for topic_filter in self.topics.request_filters:
            if options is not None:
                await client.subscribe(topic_filter, options=options)
            else:
                await client.subscribe(topic_filter, qos=1)
        await client.subscribe(self.topics.desired_filter, qos=1)

    async def _say_offline(self, client: aiomqtt.Client) -> None:
        self._flush()  # what the controller published before shutting down goes out before "offline"
        self._retained[self.topics.status] = _OFFLINE
        try:
            await client.publish(self.topics.status, _OFFLINE, qos=1, retain=True, timeout=_SHUTDOWN_PUBLISH_TIMEOUT)
        except aiomqtt.MqttError as err:
            log.warning("broker %s: could not publish offline: %s", self.settings.broker, err)

    # ---------------------------------------------------------------------------------------------- requests

    def _receive(self, message: aiomqtt.Message) -> None:
        desired_for = self.topics.parse_desired(message.topic.value)
        if desired_for is not None:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            self._desired(desired_for, payload)
            return
        request = self.topics.parse_request(message.topic.value)
        if request is None or (message.retain and not message.payload):
            return  # not ours, or the deletion of a retained message
        response_topic = correlation = None
        if message.properties is not None:
            response_topic = getattr(message.properties, "ResponseTopic", None)
            correlation = getattr(message.properties, "CorrelationData", None)
        task = asyncio.create_task(
            self._answer(request, message.payload, message.retain, response_topic, correlation),
            name=f"qmpnet[guest={request.guest or '-'}].request",
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(
        self,
        request: RequestTopic,
        payload: bytes,
        retained: bool,
        response_topic: str | None,
        correlation: bytes | None,
    ) -> None:
        answer_to = self.topics.response(request.guest, request.op)
        refusal: InvalidRequest | None = None
        data: object = None
        if response_topic is not None and self.topics.may_answer_on(response_topic):
            answer_to = response_topic
        elif response_topic is not None:
            refusal = InvalidRequest(
                f"response_topic: {response_topic!r} is not a topic this controller answers on", field="response_topic"
            )
        if refusal is None:
            refusal, data = self._check(payload, retained=retained)
        if refusal is not None or not isinstance(data, dict) or self._handler is None:
            response: Response = error_response(transaction_of(data), refusal or InvalidRequest("not an object"))
        else:
            response = await self._handler.handle(request.guest, request.op, data)
        properties = None
        if correlation is not None and self._v5:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.CorrelationData = correlation
        self._send(answer_to, to_wire(response), retain=False, properties=properties)

    def _desired(self, guest: str, payload: bytes) -> None:
        """A desired document: retained by design, so taken whether retained or not; empty clears it."""
        if self._handler is None:
            return
        if not payload:
            self._handler.set_desired(guest, None)
            return
        refusal, data = self._check(payload, retained=False)
        if refusal is None and isinstance(data, dict):
            self._handler.set_desired(guest, data)
        else:
            self._handler.set_desired(guest, refusal or InvalidRequest("the desired document must be a JSON object"))

    def _check(self, payload: bytes, *, retained: bool) -> tuple[InvalidRequest | None, object]:
        """Refuse what must never reach the controller; otherwise the decoded payload."""
        if len(payload) > self.settings.max_payload:
            return InvalidRequest(
                f"the payload is {len(payload)} bytes; the limit is {self.settings.max_payload}"
            ), None
        try:
            data = json.loads(payload, parse_constant=_no_constant)
        except ValueError as err:
            return InvalidRequest(f"the payload is not JSON: {err}"), None
        if retained:
            return InvalidRequest("a retained request is never executed: publish requests with retain off"), data
        if not isinstance(data, dict):
            return InvalidRequest(f"the payload must be a JSON object, not {type(data).__name__}"), None
        return None, data

    # ------------------------------------------------------------------------------ retained state and events

    def controller_status(self, status: ControllerOnline) -> None:
        """Publish the controller's availability (retained)."""
        self._defer(self._keep, self.topics.status, status)

    def guest_status(self, guest: str, status: GuestStatus) -> None:
        """Publish a guest's connection state (retained)."""
        self._defer(self._keep, self.topics.guest_status(guest), status)

    def guest_nics(self, guest: str, nics: NicList) -> None:
        """Publish a guest's NIC list (retained)."""
        self._defer(self._keep, self.topics.guest_nics(guest), nics)

    def guest_gone(self, guest: str) -> None:
        """Delete a guest's retained topics."""
        self._defer(self._forget, guest)

    def event(self, guest: str, name: str, event: EventMessage) -> None:
        """Publish an event (not retained; dropped while the broker is away)."""
        self._defer(self._emit, self.topics.event(guest, name), event)

    def _defer(self, publish: Callable[..., None], *args: object) -> None:
        """Run ``publish(*args)`` after the current step of the event loop (at once if no loop runs)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            publish(*args)
            return
        if not self._deferred:
            loop.call_soon(self._flush)
        self._deferred.append((publish, args))

    def _flush(self) -> None:
        deferred, self._deferred = self._deferred, []
        for publish, args in deferred:
            try:
                publish(*args)
            except Exception:
                log.exception("publishing state or an event failed")

    def _forget(self, guest: str) -> None:
        for topic in (self.topics.guest_status(guest), self.topics.guest_nics(guest)):
            self._retained.pop(topic, None)
            self._send(topic, b"", retain=True)

    def _emit(self, topic: str, event: EventMessage) -> None:
        self._send(topic, to_wire(event), retain=False)

    def _keep(self, topic: str, message: BaseModel) -> None:
        payload = to_wire(message)
        self._retained[topic] = payload
        self._send(topic, payload, retain=True)

    def _send(self, topic: str, payload: bytes, *, retain: bool, properties: Properties | None = None) -> None:
        client = self._client
        if client is None:
            log.debug("broker away: not publishing %s now", topic)
        elif not publish_nowait(client, topic, payload, retain=retain, properties=properties):
            log.debug("publish to %s refused by the MQTT library", topic)


def publish_nowait(
    client: aiomqtt.Client, topic: str, payload: bytes, *, retain: bool = False, properties: Properties | None = None
) -> bool:
    """Queue a QoS 1 message on ``client`` in call order, without waiting for the broker's PUBACK.

    ``aiomqtt.Client.publish`` waits for the PUBACK with a task, an event and a timer per message; at three
    messages per hot-add that is a good part of the controller's CPU, and nobody needs the wait: paho keeps the
    message in flight until acknowledged and resends it if the session resumes. So the message is handed to the
    paho client underneath (the event loop does the writing, as for every aiomqtt call). Returns whether it was
    queued.
    """
    info = client._client.publish(topic, payload, qos=1, retain=retain, properties=properties)  # noqa: SLF001
    return info.rc == MQTT_ERR_SUCCESS


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")
