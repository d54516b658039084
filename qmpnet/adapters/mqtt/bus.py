"""The controller's broker connection: requests in; answers, retained state and events out (over ``aiomqtt``).

Design decisions:

- **A persistent session, reconnected for ever.** The controller connects with a stable client id
  (``qmpnet-<controller id>``), clean start off and, with MQTT 5, a session expiry (``mqtt.session_expiry``): QoS 1
  requests published while it is down or reconnecting are queued by the broker and delivered when it is back.
  Each connection is a fresh ``aiomqtt.Client``; when it breaks the loop waits with capped exponential backoff and
  connects again. Bad credentials, or an MQTT version the broker does not speak, are fatal after
  ``mqtt.max_refusals`` attempts in a row (``run`` raises); anything else is retried. Failures are logged once per
  change of reason (per broker), at INFO.
- **Several brokers, tried in order.** With ``mqtt.brokers`` (the nodes of one cluster) every failed or lost
  connection moves on to the next broker of the list, round and round, after the same backoff (short after a
  connection that was up). The new session starts like any other: the exact subscriptions are made again and every
  retained topic is republished, which matters because a RabbitMQ node keeps retained messages for itself only;
  the persistent session (a quorum queue on RabbitMQ) and the requests queued in it survive the lost node.
- **Nothing produced while the broker is away is lost.** Answers, events and retained state go through an
  :class:`~.outbox.Outbox` and leave it only when the broker acknowledges them (PUBACK); what a broken
  session did not get acknowledged is sent again by the next, and every session starts by republishing all
  retained topics. A bounded number of QoS 1 messages is in flight at a time (``mqtt.max_inflight``).
- **Requests outlive sessions.** Each request runs in its own task (named for its guest) that belongs to the bus,
  not to the session: a hot-add under way when the broker goes away finishes, and its answer goes out when the
  broker is back. Tasks are created in arrival order and reach the guest's lane without suspending, so per-guest
  order is the order the broker delivered the requests in. A message is handed over as the MQTT library parses it
  (``dispatching_queue``), not through a queue and a task per message; what arrives before the session serves
  (a persistent session's queued requests) waits in order until it does.
- **The answer first, then the state, then the events.** A request's task opens a *hold* (a context variable);
  whatever state or event is published from that task's context while the request runs (the lane calls the
  controller's listeners synchronously, in the request's own task or in tasks it starts) is kept back and queued
  right after the answer. State and events from elsewhere (a late unplug acknowledgement, a guest reconnecting) go
  out at once.
- **Retained requests are never executed, in both versions** (docs/mqtt-api.md, "Retained requests"). MQTT 5:
  subscriptions use *retain as published* and *no local*; a request with the retain flag is answered
  ``invalid_request`` and its retained copy deleted. MQTT 3.1.1 shows the flag only on copies delivered because of a
  (re)subscription, not on live publishes: such a stored copy is never executed and never answered (it may be a
  request already executed live, so an answer could contradict the first one); the controller deletes it, and
  after every live request deletes whatever the broker retained on that topic (QoS 0, best effort). An empty
  payload is never a request: it is how retained messages are deleted (our own deletions come back to us in 3.1.1).
- **Refuse before executing.** Oversized payloads and non-objects are answered ``invalid_request`` here; everything
  else is the controller's job. Desired documents (``.../guest/<g>/desired``, retained by design) go to the
  controller's ``set_desired``; they are subscribed by wildcard and, for every guest the controller serves, by
  exact topic, because some brokers give wildcard subscribers no retained messages.
- **``aiomqtt`` stays in here.** Its errors are logged and turned into reconnects; only a fatal
  :class:`~qmpnet.errors.BrokerUnavailable` leaves ``run``. Nagle is off on the socket (TCP_NODELAY): with
  delayed ACKs a request/response round trip otherwise costs ~88 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.subscribeoptions import SubscribeOptions

from qmpnet.adapters.mqtt.aiomqtt_internals import (
    FastProperties,
    dispatching_queue,
    install_fast_message_info,
    install_fast_properties,
    install_fast_reason_codes,
    quieter_logging,
)
from qmpnet.adapters.mqtt.broker import diagnose_timeout, explain, make_client, resolve_protocol
from qmpnet.adapters.mqtt.outbox import Outbox, Outgoing
from qmpnet.adapters.mqtt.publisher import Publisher
from qmpnet.api.wire.envelopes import ControllerOffline, error_response, to_wire, transaction_of
from qmpnet.api.wire.topics import RequestTopic, Topics
from qmpnet.core.backoff import backoff
from qmpnet.errors import BrokerUnavailable, InvalidRequest
from qmpnet.settings import redact_url

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from qmpnet.adapters.mqtt.broker import Version
    from qmpnet.api.wire.envelopes import ControllerOnline, EventMessage, GuestStatus, NicList, Response
    from qmpnet.settings import MqttSettings

__all__ = ["IncomingRequest", "MqttBus", "RequestHandler", "check_payload"]

log = logging.getLogger(__name__)

_OFFLINE: Final = to_wire(ControllerOffline(state="offline"))


class RequestHandler(Protocol):
    """What answers requests (the controller)."""

    async def handle(self, guest: str | None, op: str, payload: Mapping[str, Any]) -> Response:
        """Answer a request; ``guest`` is ``None`` for controller-level ops. Raises only ``CancelledError``."""
        ...

    def set_desired(self, guest: str, document: Mapping[str, Any] | InvalidRequest | None) -> None:
        """Take ``guest``'s desired NIC set (``None``: cleared; an error: a payload that could not be read)."""
        ...


@dataclass(frozen=True)
class IncomingRequest:
    """A request as the broker delivered it."""

    topic: str
    payload: bytes
    retained: bool = False
    response_topic: str | None = None
    correlation: bytes | None = None


class _Inbox:
    """One session's incoming messages, handed to ``receive`` as the MQTT library parses them (no task per message).

    Until :meth:`open` (the session's outbox is online) they are kept, in order: a persistent session's queued
    requests arrive right after the connect, before the session serves.
    """

    def __init__(self, receive: Callable[[aiomqtt.Message], None]) -> None:
        self._receive = receive
        self._early: list[aiomqtt.Message] | None = []

    def put(self, message: aiomqtt.Message) -> None:
        if self._early is None:
            self._receive(message)
        else:
            self._early.append(message)

    def open(self) -> None:
        """Hand over what arrived so far, then every message as it arrives."""
        early, self._early = self._early or [], None
        for message in early:
            self._receive(message)


@dataclass
class _Hold:
    """State and events published while one request runs, released after its answer."""

    items: list[Outgoing] = field(default_factory=list)
    open: bool = True


_HOLD: ContextVar[_Hold | None] = ContextVar("qmpnet_bus_hold", default=None)


class _Link:
    """The broker link: which broker to try, and its health for backoff, the refusal limit and logging."""

    def __init__(self, settings: MqttSettings) -> None:
        self.settings = settings
        self.urls = settings.urls
        self.index = 0
        self.failures = 0
        self.refusals = 0
        self.last: dict[str, str] = {}  # broker URL -> the last failure logged for it
        self.was_up = False

    @property
    def current(self) -> MqttSettings:
        """The settings of the broker to try now."""
        return self.settings.at(self.urls[self.index])

    @property
    def where(self) -> str:
        """The broker to try now, for logs (no password)."""
        return redact_url(self.urls[self.index])

    def up(self, protocol: Version) -> None:
        log.info("broker %s: connected as %s (MQTT %s)", self.where, self.settings.controller_id, protocol)
        self.failures = self.refusals = 0
        self.last.clear()
        self.was_up = True

    def down(self, err: BrokerUnavailable) -> float:
        """Count a failure and move on to the next broker; the delay before trying it.

        Raises:
            BrokerUnavailable: ``err``, past the refusal limit.
        """
        if self.was_up:
            self.failures = 0
            self.was_up = False
        self.refusals = self.refusals + 1 if err.fatal else 0
        if self.refusals >= self.settings.max_refusals:
            raise err
        delay = backoff(self.settings.reconnect_min, self.settings.reconnect_max, self.failures)
        self.failures += 1
        failed = self.urls[self.index]
        self.index = (self.index + 1) % len(self.urls)
        then = f"trying {self.where} next" if len(self.urls) > 1 else "retrying"
        if err.message != self.last.get(failed):
            log.info("%s; %s (backoff up to %g s)", err.message, then, self.settings.reconnect_max)
            self.last[failed] = err.message
        else:
            log.debug("%s; %s in %.1f s", err.message, then, delay)
        return delay


class MqttBus:
    """The controller's side of the MQTT API; also the controller's :class:`~qmpnet.serve.controller.StateSink`.

    Args:
        settings: Broker, controller id, topic root, session and limits.
    """

    def __init__(self, settings: MqttSettings) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_root, settings.controller_id)
        self.connected = asyncio.Event()
        self.outbox = Outbox(settings.outbox_limit, settings.state_interval)
        #: The MQTT version spoken, once known (``mqtt.protocol``, or what ``auto`` found).
        self.protocol: Version | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: What answers requests; set by :meth:`run`.
        self.handler: RequestHandler | None = None
        self._guests: set[str] = set()  # the guests the controller serves (from their status)
        self._desired_subscribed: set[str] = set()  # those whose exact desired topic this session subscribed
        self._new_guest = asyncio.Event()
        self._where = redact_url(settings.urls[0])  # the broker of the current (or last) session, for logs

    @property
    def client_id(self) -> str:
        """The stable MQTT client id, so the broker resumes the session: ``qmpnet-<controller id>``."""
        return f"qmpnet-{self.settings.controller_id}"

    # ------------------------------------------------------------------------------------------ the session loop

    async def run(self, handler: RequestHandler) -> None:
        """Serve requests with ``handler`` until cancelled, reconnecting to the broker whenever needed.

        On cancellation sends what is waiting, publishes ``offline`` (retained) and disconnects cleanly, so the
        will is not sent.

        Raises:
            BrokerUnavailable: The broker refused our credentials, or the MQTT version, ``mqtt.max_refusals``
                times in a row.
        """
        self.handler = handler
        install_fast_properties()  # the controller's process: paho decodes each PUBACK's properties into them
        install_fast_reason_codes()  # and builds each PUBACK's reason code without copying its table
        install_fast_message_info()  # and each message's info without a condition of its own
        link = _Link(self.settings)
        try:
            while True:
                try:
                    await self._session(link)
                except BrokerUnavailable as err:
                    await asyncio.sleep(link.down(err))
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _session(self, link: _Link) -> None:
        settings = link.current
        self._where = link.where
        if self.protocol is None:
            self.protocol = await resolve_protocol(settings)
        protocol = self.protocol
        will = aiomqtt.Will(self.topics.status, _OFFLINE, qos=1, retain=True)
        inbox = _Inbox(self._receive)
        client = make_client(
            settings,
            identifier=self.client_id,
            protocol=protocol,
            will=will,
            session_expiry=self.settings.session_expiry,
            max_inflight=self.settings.max_inflight,
            queue_type=dispatching_queue(inbox.put),
        )
        quieter_logging(client)  # paho's DEBUG lines skipped at once while nobody takes them
        try:
            await client.__aenter__()
        except aiomqtt.MqttError as err:
            problem = explain(err, settings, protocol=protocol)
            problem = await diagnose_timeout(problem, settings, protocol=protocol)
            if problem.problem == "protocol" and self.settings.protocol == "auto":
                self.protocol = None  # the broker changed: ask it again next time
            raise problem from err
        try:
            await self._subscribe(client)
            link.up(protocol)
            await self._serve(client, inbox)
        except aiomqtt.MqttError as err:
            raise BrokerUnavailable(f"lost the broker at {self._where}: {err}", problem="lost") from err
        finally:
            self.outbox.session_ended()
            self.connected.clear()
            with contextlib.suppress(aiomqtt.MqttError):
                await client.__aexit__(None, None, None)

    async def _serve(self, client: aiomqtt.Client, inbox: _Inbox) -> None:
        self.outbox.session_started()
        sender = asyncio.create_task(self._send(client), name="qmpnet.adapters.mqtt.sender")
        follower = asyncio.create_task(self._follow_guests(client), name="qmpnet.adapters.mqtt.desired")
        self.connected.set()
        try:
            inbox.open()
            async for _ in client.messages:  # the inbox dispatches every message; this only waits for the end
                pass
        except asyncio.CancelledError:
            await self._say_offline(client)
            raise
        finally:
            for task in (sender, follower):
                task.cancel()
            await asyncio.gather(sender, follower, return_exceptions=True)

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        if self.protocol == "5":
            options = SubscribeOptions(qos=1, noLocal=True, retainAsPublished=True)
            filters: list[tuple[str, Any]] = [(topic_filter, options) for topic_filter in self.topics.request_filters]
        else:
            filters = [(topic_filter, 1) for topic_filter in self.topics.request_filters]
        # Desired sets are retained: the wildcard brings new guests' ones, and the exact topic of every known guest
        # brings them from brokers that give wildcard subscribers no retained messages (RabbitMQ).
        filters.append((self.topics.desired_filter, 1))
        self._desired_subscribed = set(self._guests)
        filters += [(self.topics.desired(guest), 1) for guest in sorted(self._desired_subscribed)]
        await self._subscribe_all(client, filters)

    async def _subscribe_all(self, client: aiomqtt.Client, filters: list[tuple[str, Any]]) -> None:
        codes = await client.subscribe(filters)
        for (topic_filter, _), code in zip(filters, codes, strict=False):
            if getattr(code, "is_failure", False):
                raise BrokerUnavailable(
                    f"the broker at {self._where} refused our subscription to {topic_filter}: {code} (check its ACL)",
                    problem="credentials",
                )

    async def _follow_guests(self, client: aiomqtt.Client) -> None:
        """Subscribe the exact desired topic of every guest that appears during the session."""
        while True:
            new = sorted(self._guests - self._desired_subscribed)
            if not new:
                self._new_guest.clear()
                await self._new_guest.wait()
                continue
            self._desired_subscribed.update(new)
            await self._subscribe_all(client, [(self.topics.desired(guest), 1) for guest in new])

    async def _send(self, client: aiomqtt.Client) -> None:
        """Hand the outbox's messages to the client in order, at most ``max_inflight`` awaiting their PUBACK."""
        publisher = Publisher.of(client, self.outbox.acknowledged, self.settings.max_inflight)
        if publisher is None:
            await self._send_through_aiomqtt(client)
            return
        while True:
            seq, item = await self.outbox.next()
            await publisher.room()
            if not publisher.publish(
                seq, item.topic, item.payload(), qos=item.qos, retain=item.retain, properties=item.properties
            ):
                log.debug("publish to %s refused (no connection): sent again in the next session", item.topic)

    async def _send_through_aiomqtt(self, client: aiomqtt.Client) -> None:
        """:meth:`_send` through ``aiomqtt.Client.publish``: a task per message in flight."""
        window = asyncio.Semaphore(self.settings.max_inflight)
        deliveries: set[asyncio.Task[None]] = set()
        try:
            while True:
                seq, item = await self.outbox.next()
                await window.acquire()
                # Tasks run their first step (the publish itself) in creation order: the wire order is ours.
                task = asyncio.create_task(self._deliver(client, seq, item, window))
                deliveries.add(task)
                task.add_done_callback(deliveries.discard)
        finally:
            for task in deliveries:
                task.cancel()
            await asyncio.gather(*deliveries, return_exceptions=True)

    async def _deliver(self, client: aiomqtt.Client, seq: int, item: Outgoing, window: asyncio.Semaphore) -> None:
        try:
            await client.publish(
                item.topic, item.payload(), qos=item.qos, retain=item.retain, properties=item.properties,
                timeout=math.inf,
            )  # fmt: skip
        except aiomqtt.MqttError as err:
            log.debug("publish to %s failed (%s): sent again in the next session", item.topic, err)
            return
        finally:
            window.release()
        self.outbox.acknowledged(seq)

    async def _say_offline(self, client: aiomqtt.Client) -> None:
        """Send what is waiting, then ``offline``; within ``shutdown_timeout`` each."""
        self.outbox.flush_state(hold_no_more=True)  # what was held back for its interval goes before offline
        self.outbox.put(Outgoing(self.topics.status, _OFFLINE, "state"))
        try:
            async with asyncio.timeout(self.settings.shutdown_timeout):
                await self.outbox.settled()
        except TimeoutError:
            log.warning("broker %s: shutting down with messages not acknowledged", self._where)
        else:
            return
        try:
            await client.publish(
                self.topics.status, _OFFLINE, qos=1, retain=True, timeout=self.settings.shutdown_timeout
            )
        except aiomqtt.MqttError as err:
            log.warning("broker %s: could not publish offline: %s", self._where, err)

    # ---------------------------------------------------------------------------------------------- requests

    def _receive(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = bytes(message.payload) if isinstance(message.payload, bytes | bytearray) else b""
        desired_for = self.topics.parse_desired(topic)
        if desired_for is not None:
            self._desired(desired_for, payload)
            return
        parsed = self.topics.parse_request(topic)
        if parsed is None or not payload:
            return  # not ours, or the deletion of a retained message (our own ones too, in 3.1.1)
        if message.retain and self.protocol == "3.1.1":
            # A stored copy, delivered because we (re)subscribed: 3.1.1 cannot tell whether it was executed live.
            log.warning("ignoring a retained request on %s (never executed, never answered); deleting it", topic)
            self.outbox.put(Outgoing(topic, b"", "clear"))
            return
        props = message.properties
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        request = IncomingRequest(topic, payload, message.retain, response_topic, correlation)
        task = asyncio.create_task(self.answer(request, parsed), name=f"qmpnet[guest={parsed.guest or '-'}].request")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def answer(self, request: IncomingRequest, parsed: RequestTopic | None = None) -> None:
        """Answer ``request`` and queue the answer, then the state and events it caused, in that order.

        ``parsed`` is its topic parsed, if it was already. Waits for the handler (the controller) to answer; never
        raises but ``CancelledError``.
        """
        if parsed is None:
            parsed = self.topics.parse_request(request.topic)
        if parsed is None:
            return
        hold = _Hold()
        token = _HOLD.set(hold)
        try:
            answer_to, response = await self._respond(parsed, request)
            properties = None
            if request.correlation is not None and self.protocol != "3.1.1":
                properties = FastProperties(PacketTypes.PUBLISH)
                properties.CorrelationData = request.correlation
            self.outbox.put(Outgoing(answer_to, response, "answer", properties))
        finally:
            hold.open = False
            _HOLD.reset(token)
            for item in hold.items:
                self.outbox.put(item)
        if request.retained or self.protocol == "3.1.1":
            self.outbox.put(Outgoing(request.topic, b"", "clear"))

    def _desired(self, guest: str, payload: bytes) -> None:
        """A desired document: retained by design, so taken whether retained or not; empty clears it."""
        if self.handler is None:
            return
        if not payload:
            self.handler.set_desired(guest, None)
            return
        refusal, data = check_payload(payload, retained=False, limit=self.settings.max_payload)
        if refusal is None and isinstance(data, dict):
            self.handler.set_desired(guest, data)
        else:
            self.handler.set_desired(guest, refusal or InvalidRequest("the desired document must be a JSON object"))

    async def _respond(self, parsed: RequestTopic, request: IncomingRequest) -> tuple[str, Response]:
        answer_to = self.topics.response(parsed.guest, parsed.op)
        refusal: InvalidRequest | None = None
        data: object = None
        if request.response_topic is not None and self.topics.may_answer_on(request.response_topic):
            answer_to = request.response_topic
        elif request.response_topic is not None:
            refusal = InvalidRequest(
                f"response_topic: {request.response_topic!r} is not a topic this controller answers on",
                field="response_topic",
            )
        if refusal is None:
            refusal, data = check_payload(request.payload, retained=request.retained, limit=self.settings.max_payload)
        if refusal is not None or not isinstance(data, dict) or self.handler is None:
            return answer_to, error_response(transaction_of(data), refusal or InvalidRequest("not an object"))
        return answer_to, await self.handler.handle(parsed.guest, parsed.op, data)

    # ------------------------------------------------------------------------------ retained state and events

    def controller_status(self, status: ControllerOnline) -> None:
        """Publish the controller's availability (retained)."""
        self._put(Outgoing(self.topics.status, status, "state"))

    def guest_status(self, guest: str, status: GuestStatus) -> None:
        """Publish a guest's connection state (retained)."""
        if guest not in self._guests:
            self._guests.add(guest)
            self._new_guest.set()
        self._put(Outgoing(self.topics.guest_status(guest), status, "state"))

    def guest_nics(self, guest: str, nics: NicList) -> None:
        """Publish a guest's NIC list (retained)."""
        self._put(Outgoing(self.topics.guest_nics(guest), nics, "state"))

    def guest_gone(self, guest: str) -> None:
        """Delete a guest's retained topics."""
        self._guests.discard(guest)
        for topic in (self.topics.guest_status(guest), self.topics.guest_nics(guest)):
            self._put(Outgoing(topic, b"", "state"))

    def event(self, guest: str, name: str, event: EventMessage) -> None:
        """Publish an event (not retained; kept while the broker is away, up to ``outbox_limit``)."""
        self._put(Outgoing(self.topics.event(guest, name), event, "event"))

    def _put(self, item: Outgoing) -> None:
        hold = _HOLD.get()
        if hold is not None and hold.open:
            hold.items.append(item)
        else:
            self.outbox.put(item)


def check_payload(payload: bytes, *, retained: bool, limit: int) -> tuple[InvalidRequest | None, object]:
    """Refuse what must never reach the controller; otherwise ``(None, the decoded payload)``."""
    if len(payload) > limit:
        return InvalidRequest(f"the payload is {len(payload)} bytes; the limit is {limit}"), None
    try:
        # json.loads(payload, parse_constant=_no_constant) without a decoder made per call
        data = _DECODER.decode(payload.decode(json.detect_encoding(payload), "surrogatepass"))
    except ValueError as err:
        return InvalidRequest(f"the payload is not JSON: {err}"), None
    if retained:
        return InvalidRequest("a retained request is never executed: publish requests with retain off"), data
    if not isinstance(data, dict):
        return InvalidRequest(f"the payload must be a JSON object, not {type(data).__name__}"), None
    return None, data


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


_DECODER: Final = json.JSONDecoder(parse_constant=_no_constant)
