"""The client side of the MQTT API: send a request, await its answer, over MQTT 5 or 3.1.1, across reconnects.

Design decisions:

- **One connection, kept up.** One broker connection serves any number of concurrent requests to any number of
  controllers. When it breaks it is re-established with capped exponential backoff and every subscription is made
  again; bad credentials or an MQTT version the broker refuses end it after ``mqtt.max_refusals`` attempts, and
  from then on every request fails with that reason.
- **Answers are matched by transaction,** which every request carries (random unless the caller gives one), so
  the client understands a controller that speaks either version: an MQTT 5 controller answers on our Response
  Topic ``<root>/<c>/client/<client-id>/response`` (inside the controller's own tree, so an ACL confining a
  controller to ``<root>/<c>/#`` still lets it answer), a 3.1.1 controller on ``.../response/<op>``. Both are
  subscribed, per controller and per guest, the first time we ask them anything.
- **Exact topics for retained state.** A controller's retained ``<root>/<c>/status`` is subscribed by its exact
  name (some brokers, RabbitMQ among them, give wildcard subscribers no retained messages), and before the first
  request to a controller the client waits for a second subscription's acknowledgement: the broker sends the
  retained status before it, so a controller known to be offline is refused at once, *before* anything is
  published (so the request cannot be carried out later from the broker's queue). Messages are read in the MQTT
  library's callback, in wire order (a queue that dispatches as it is filled), which is what makes that ordering
  visible here.
- **Several brokers, tried in order.** With ``mqtt.brokers`` the first connection goes to the first broker that
  can be reached (``__aenter__`` fails only when none can, naming each one's problem, or at a refusal), and every
  lost or failed connection afterwards moves on to the next broker of the list, round and round. The MQTT client
  id is ``<client_id>-<n>`` on the broker at place ``n`` > 0 of the list (the first keeps ``client_id``): a
  RabbitMQ cluster keeps the queue of a client whose node died, and that queue blocks (SUBACK never comes) the
  subscriptions of the same client id on the surviving nodes.
- **Nothing is given up because the connection broke.** A request not yet answered is published again after a
  reconnect with the same transaction: the controller's de-duplication answers it with its first answer and does
  not apply it twice. MQTT 5 requests carry a Message Expiry equal to what is left of the caller's timeout, so a
  broker drops a request nobody waits for any more.
- **Every payload is validated.** A malformed status or answer is logged and ignored (an answer that matches a
  waiting request but is malformed fails that request with ``outcome_unknown``); nothing a broker delivers stops
  the reader. ``aiomqtt`` errors become qmpnet errors here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Self

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from pydantic import TypeAdapter, ValidationError
from pydantic_core import from_json

from qmpnet.adapters.mqtt.aiomqtt_internals import FastProperties, dispatching_queue, publish_at_once
from qmpnet.adapters.mqtt.broker import diagnose_timeout, explain, make_client, resolve_protocol
from qmpnet.api.wire.envelopes import ControllerOffline, ControllerOnline, ErrorResponse, OkResponse, transaction_of
from qmpnet.api.wire.topics import Topics, is_bus_name
from qmpnet.core.backoff import backoff
from qmpnet.core.names import BUS_NAME_RULE
from qmpnet.errors import BrokerUnavailable, GuestUnavailable, InvalidRequest, OutcomeUnknown
from qmpnet.settings import redact_url

if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import TracebackType

    from qmpnet.adapters.mqtt.broker import Version
    from qmpnet.settings import MqttSettings

__all__ = ["Requester"]

log = logging.getLogger(__name__)

_STATUS: TypeAdapter[ControllerOnline | ControllerOffline] = TypeAdapter(ControllerOnline | ControllerOffline)
_ANSWER: TypeAdapter[OkResponse[Any] | ErrorResponse] = TypeAdapter(OkResponse[Any] | ErrorResponse)
#: The fields of a successful answer. An object with these and no others, whose ``status`` is ``"ok"`` and whose
#: transaction is a string, is one that ``_ANSWER`` accepts (``data`` may be anything): not validated again (~19 k
#: instructions an answer, whose model is thrown away).
_OK_FIELDS: Final = frozenset({"transaction", "status", "data"})


@dataclass
class _Pending:
    """A request waiting for its answer."""

    controller: str
    topic: str
    body: bytes
    transaction: str
    deadline: float
    future: asyncio.Future[dict[str, Any]]
    sent: bool = False
    waiters: int = 1


class _Signal:
    """Wakes every waiter at each :meth:`notify` (a condition without a lock)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class Requester:
    """Request/response over MQTT for orchestrators and the CLI. Use as an async context manager.

    Args:
        settings: Broker URL, credentials, TLS, MQTT version, topic root, reconnect and refusal limits.
        client_id: This client's id (MQTT client id and response topic level); random when absent. With several
            brokers, the MQTT client id on the broker at place ``n`` > 0 of the list is ``<client_id>-<n>``.
    """

    def __init__(self, settings: MqttSettings, *, client_id: str | None = None) -> None:
        self.settings = settings
        self.client_id = client_id or f"qmpnet-client-{uuid.uuid4().hex[:12]}"
        if not is_bus_name(self.client_id):
            raise InvalidRequest(f"client_id: {self.client_id!r} is not {BUS_NAME_RULE}", field="client_id")
        #: The MQTT version spoken, once connected.
        self.protocol: Version | None = None
        self._root = settings.topic_root
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._wanted: dict[str, bool] = {}  # topic filter -> whether it is a retained status (subscribed first)
        # What a request works out from its controller and guest, once for each (the names are valid then):
        self._routes: dict[tuple[str, str | None], dict[str, bool]] = {}  # the filters its answers need
        self._requests: dict[tuple[str, str | None, str], str] = {}  # (controller, guest, op) -> request topic
        self._responses: dict[str, str] = {}  # controller -> our MQTT 5 Response Topic in its tree
        self._active: set[str] = set()  # filters subscribed in the current session
        self._route_wanted = asyncio.Event()
        self._routed = _Signal()
        self._lost = _Signal()  # notified when a connection ends
        self._status: dict[str, str] = {}  # controller -> "online" | "offline", from its retained status
        self._unanswered: dict[tuple[str, str], _Pending] = {}
        self._publishes: set[asyncio.Task[None]] = set()
        self._fatal: BrokerUnavailable | None = None
        self._runner: asyncio.Task[None] | None = None
        self._where = redact_url(settings.urls[0])  # the broker of the current (or last) session, for messages

    # ------------------------------------------------------------------------------------------ connection

    async def __aenter__(self) -> Self:
        """Connect to the first of ``settings.urls`` that can be reached, trying them in order.

        The first broker reached is asked which MQTT version it speaks if ``protocol`` is ``auto``.

        Raises:
            BrokerUnavailable: No broker can be reached, or one refused us; the message says why (for each).
        """
        first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._runner = asyncio.create_task(self._run(first), name="qmpnet.client.connection")
        try:
            await first
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        self._fail_all(GuestUnavailable("the MQTT client was closed"))

    async def _run(self, first: asyncio.Future[None]) -> None:
        urls = self.settings.urls
        index = 0
        failures = 0
        refusals = 0
        last: str | None = None
        unreached: list[BrokerUnavailable] = []  # before the first connection: one error per broker tried
        while True:
            try:
                await self._session(self.settings.at(urls[index]), first, index)
            except BrokerUnavailable as err:
                index = (index + 1) % len(urls)  # lost or not reached: the next broker (the same if it is alone)
                if not first.done():
                    unreached.append(err)
                    if err.fatal or len(unreached) == len(urls):
                        first.set_exception(_none_reached(unreached))
                        return
                    continue
                refusals = refusals + 1 if err.fatal else 0
                if refusals >= self.settings.max_refusals:
                    log.warning("%s; giving up", err.message)
                    self._fatal = err
                    self._fail_all(err)
                    return
                if err.message != last:
                    log.info("%s; reconnecting", err.message)
                    last = err.message
                if err.problem == "lost":
                    failures = 0
                await asyncio.sleep(backoff(self.settings.reconnect_min, self.settings.reconnect_max, failures))
                failures += 1

    async def _session(self, settings: MqttSettings, first: asyncio.Future[None], place: int) -> None:
        """One connection to the broker of ``settings`` (place ``place`` in the list), until it breaks.

        The MQTT client id differs per broker: a RabbitMQ cluster keeps the session of a client whose node died,
        and it blocks the same id's subscriptions on the other nodes.
        """
        self._where = redact_url(settings.urls[0])
        if self.protocol is None:
            self.protocol = await resolve_protocol(settings)
        protocol = self.protocol
        inbox = dispatching_queue(self._on_message)
        identifier = f"{self.client_id}-{place}" if place else self.client_id
        client = make_client(settings, identifier=identifier, protocol=protocol, queue_type=inbox)
        try:
            await client.__aenter__()
        except aiomqtt.MqttError as err:
            problem = explain(err, settings, protocol=protocol)
            raise await diagnose_timeout(problem, settings, protocol=protocol) from err
        router: asyncio.Task[None] | None = None
        try:
            await self._subscribe_missing(client)  # answers to what is sent again below must reach us
            self._client = client
            self._connected.set()
            for pending in self._unanswered.values():
                self._publish(client, pending)  # again: the controller answers a repeat with its first answer
            if not first.done():
                first.set_result(None)
            router = asyncio.create_task(self._keep_routing(client), name="qmpnet.client.router")
            async for _ in client.messages:  # the inbox dispatches every message; this only waits for the end
                pass
        except aiomqtt.MqttError as err:
            raise BrokerUnavailable(f"lost the broker at {self._where}: {err}", problem="lost") from err
        finally:
            self._client = None
            self._connected.clear()
            self._lost.notify()
            self._active.clear()
            tasks = [*self._publishes, *([router] if router is not None else [])]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(aiomqtt.MqttError):
                await client.__aexit__(None, None, None)

    # --------------------------------------------------------------------------------------------- routing

    async def _keep_routing(self, client: aiomqtt.Client) -> None:
        """Subscribe the filters wanted from now on, as requests to new controllers and guests ask for them."""
        while True:
            await self._subscribe_missing(client)
            if all(topic_filter in self._active for topic_filter in self._wanted):  # no await since: none missed
                self._route_wanted.clear()
                await self._route_wanted.wait()

    async def _subscribe_missing(self, client: aiomqtt.Client) -> None:
        """Subscribe every wanted filter not subscribed in this session: statuses first, then the rest.

        The broker sends a status's retained message before it acknowledges the next SUBSCRIBE, and the inbox reads
        messages in wire order, so once this returns every known status has been read.
        """
        missing = [topic_filter for topic_filter in self._wanted if topic_filter not in self._active]
        if not missing:
            return
        statuses = [f for f in missing if self._wanted[f]]
        others = [f for f in missing if not self._wanted[f]] or statuses[:1]
        for group in (statuses, others):
            if group:
                codes = await client.subscribe([(topic_filter, 1) for topic_filter in group])
                self._check_subscribed(group, codes)
        self._active.update(missing)
        self._routed.notify()

    def _check_subscribed(self, filters: list[str], codes: object) -> None:
        for topic_filter, code in zip(filters, codes if isinstance(codes, list | tuple) else [], strict=False):
            if getattr(code, "is_failure", False):
                log.warning("the broker refused our subscription to %s: %s (check its ACL)", topic_filter, code)

    def _needed(self, controller: str, guest: str | None) -> dict[str, bool]:
        """The filters through which the answers of ``controller`` (about ``guest``) and its status reach us.

        Raises:
            InvalidRequest: ``controller`` or ``guest`` is not a valid name.
        """
        needed = self._routes.get((controller, guest))
        if needed is not None:
            return needed
        for field, name in (("controller", controller), ("guest", guest)):
            if name is not None and not is_bus_name(name):
                raise InvalidRequest(f"{field}: {name!r} is not {BUS_NAME_RULE}", field=field)
        topics = Topics(self._root, controller)
        needed = {topics.status: True, topics.response_filter(guest): False}
        if self.protocol == "5":
            needed[topics.client_response(self.client_id)] = False
        if self.protocol is not None:  # the MQTT version is known once and for all
            self._routes[(controller, guest)] = needed
        return needed

    async def _route(self, needed: dict[str, bool]) -> None:
        """Make sure the filters ``needed`` are subscribed; waits for the SUBACKs."""
        for topic_filter, is_status in needed.items():
            self._wanted.setdefault(topic_filter, is_status)
        while not needed.keys() <= self._active:
            if self._fatal is not None:
                raise self._fatal
            self._route_wanted.set()
            await self._routed.wait()

    # --------------------------------------------------------------------------------------------- requests

    async def request(
        self, controller: str, guest: str | None, op: str, payload: Mapping[str, Any], *, timeout: float
    ) -> dict[str, Any]:
        """Send ``payload`` as request ``op`` to ``guest`` (``None``: the controller) and return the decoded answer.

        Waits at most ``timeout`` seconds in all: for the broker connection, the subscriptions and the answer.

        Raises:
            InvalidRequest: ``controller`` or ``guest`` is not a valid name.
            GuestUnavailable: The controller is known to be offline, or the broker could not be reached in time
                (:class:`~qmpnet.errors.BrokerUnavailable` when it refused us); nothing was sent.
            OutcomeUnknown: The request was sent and no answer came within ``timeout``: it may or may not have been
                carried out (repeating it with the same transaction is safe).
        """
        needed = self._needed(controller, guest)
        transaction = transaction_of(payload) or uuid.uuid4().hex
        key = (controller, transaction)
        pending: _Pending | None = None
        try:
            async with asyncio.timeout(timeout):
                if self._fatal is not None:
                    raise self._fatal
                if not needed.keys() <= self._active:  # subscribed once in each session
                    await self._route(needed)
                pending = self._unanswered.get(key)
                if pending is not None:
                    pending.waiters += 1
                else:
                    if self._status.get(controller) == "offline":
                        raise GuestUnavailable(f"controller {controller} is offline (its retained status says so)")
                    topic = self._requests.get((controller, guest, op)) or self._request_topic(controller, guest, op)
                    pending = self._enqueue(controller, topic, {**payload, "transaction": transaction}, timeout)
                return await asyncio.shield(pending.future)
        except TimeoutError:
            if pending is not None and pending.sent:
                raise OutcomeUnknown(
                    f"no answer from controller {controller} within {timeout:g} s; it may or may not have acted"
                ) from None
            where = " or ".join(redact_url(url) for url in self.settings.urls)
            raise GuestUnavailable(f"could not reach the broker at {where} within {timeout:g} s") from None
        finally:
            if pending is not None:
                pending.waiters -= 1
                if pending.waiters == 0:
                    self._unanswered.pop(key, None)

    def _request_topic(self, controller: str, guest: str | None, op: str) -> str:
        topic = self._requests[(controller, guest, op)] = Topics(self._root, controller).request(guest, op)
        return topic

    async def publish_retained(self, topic: str, body: bytes, *, timeout: float) -> None:
        """Publish ``body`` retained at QoS 1 on ``topic`` and wait for the broker's acknowledgement.

        Waits for a connection first; a publish that a broken connection took along is made again on the next one
        (a retained message is idempotent). At most ``timeout`` seconds in all.

        Raises:
            GuestUnavailable: No broker acknowledged it in time (:class:`~qmpnet.errors.BrokerUnavailable` when
                one refused us).
        """
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if self._fatal is not None:
                        raise self._fatal
                    await self._connected.wait()
                    client = self._client
                    if client is None:
                        continue
                    # A task of the session, so that the session's end cancels it (aiomqtt would wait for ever).
                    task = asyncio.create_task(client.publish(topic, body, qos=1, retain=True, timeout=math.inf))
                    self._publishes.add(task)
                    task.add_done_callback(self._published)
                    try:
                        await asyncio.wait({task})
                    finally:
                        task.cancel()  # a no-op once done; else the caller gave up
                    if not task.cancelled() and task.exception() is None:
                        return
                    await self._until_disconnected(client)
        except TimeoutError:
            where = " or ".join(redact_url(url) for url in self.settings.urls)
            raise GuestUnavailable(f"the broker at {where} did not take {topic} within {timeout:g} s") from None

    async def _until_disconnected(self, client: aiomqtt.Client) -> None:
        """Wait until ``client`` is not the current connection any more (a failed publish: it is breaking)."""
        if self._client is client:
            await self._lost.wait()

    def _enqueue(self, controller: str, topic: str, payload: dict[str, Any], timeout: float) -> _Pending:
        loop = asyncio.get_running_loop()
        pending = _Pending(
            controller=controller,
            topic=topic,
            body=json.dumps(payload).encode(),
            transaction=payload["transaction"],
            deadline=loop.time() + timeout,
            future=loop.create_future(),
        )
        self._unanswered[(controller, pending.transaction)] = pending
        if self._client is not None:
            self._publish(self._client, pending)
        return pending

    def _publish(self, client: aiomqtt.Client, pending: _Pending) -> None:
        if pending.future.done():
            return
        properties = None
        if self.protocol == "5":
            properties = FastProperties(PacketTypes.PUBLISH)
            response = self._responses.get(pending.controller)
            if response is None:
                topics = Topics(self._root, pending.controller)
                response = self._responses[pending.controller] = topics.client_response(self.client_id)
            properties.ResponseTopic = response
            properties.CorrelationData = pending.transaction.encode()
            left = pending.deadline - asyncio.get_running_loop().time()
            properties.MessageExpiryInterval = max(1, math.ceil(left))
        pending.sent = True
        handed = publish_at_once(client, pending.topic, pending.body, qos=1, properties=properties)
        if handed is None:  # aiomqtt's own way: a task per request until the broker has it
            task = asyncio.create_task(
                client.publish(pending.topic, pending.body, qos=1, properties=properties, timeout=math.inf)
            )
            self._publishes.add(task)
            task.add_done_callback(self._published)
        elif not handed:
            log.debug("publishing a request failed: no connection (sent again after the reconnect)")

    def _published(self, task: asyncio.Task[None]) -> None:
        self._publishes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("publishing a request failed: %s (sent again after the reconnect)", task.exception())

    def _fail_all(self, err: Exception) -> None:
        for pending in self._unanswered.values():
            if not pending.future.done():
                pending.future.set_exception(err)
                pending.future.exception()  # retrieved here too: a caller may already have given up

    # ---------------------------------------------------------------------------------------------- reading

    def _on_message(self, message: aiomqtt.Message) -> None:
        try:
            self._read(message)
        except Exception:
            log.exception("ignoring a message on %s that could not be read", message.topic.value)

    def _read(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = bytes(message.payload) if isinstance(message.payload, bytes | bytearray) else b""
        prefix = f"{self._root}/"
        if not topic.startswith(prefix):
            return
        controller, _, rest = topic[len(prefix) :].partition("/")
        if rest == "status":
            self._read_status(controller, payload)
        else:
            self._read_answer(controller, topic, payload)

    def _read_status(self, controller: str, payload: bytes) -> None:
        if not payload:
            self._status.pop(controller, None)
            return
        try:
            self._status[controller] = _STATUS.validate_json(payload).state
        except ValidationError:
            log.warning("ignoring a malformed status of controller %s: %.100r", controller, payload)

    def _read_answer(self, controller: str, topic: str, payload: bytes) -> None:
        try:
            decoded = _loads(payload)
        except ValueError:
            log.warning("ignoring a message on %s that is not JSON: %.100r", topic, payload)
            return
        transaction = transaction_of(decoded)
        pending = self._unanswered.get((controller, transaction)) if transaction is not None else None
        if pending is None or pending.future.done():
            return  # someone else's answer, or a repeat of one we have
        try:
            if not (decoded.keys() == _OK_FIELDS and decoded["status"] == "ok"):  # the transaction is a string
                _ANSWER.validate_python(decoded)
        except ValidationError as err:
            problem = err.errors(include_url=False)[0]
            pending.future.set_exception(
                OutcomeUnknown(f"controller {controller} answered with a malformed message ({problem['msg']})")
            )
            return
        pending.future.set_result(decoded)


def _loads(payload: bytes) -> Any:  # noqa: ANN401 - any JSON value
    """``json.loads(payload)``, by pydantic's parser where it can: ~21 k instructions for an answer, not ~50 k.

    What pydantic's parser refuses (besides malformed JSON: lone surrogates, a byte order mark, UTF-16, nesting
    deeper than 200) goes to ``json.loads``, so what is accepted and what is made of it are ``json.loads``'s
    (tests/unit/adapters/mqtt/test_requester.py compares the two).

    Raises:
        ValueError: ``payload`` is not JSON (``json.loads``'s error).
    """
    try:
        return from_json(payload)
    except ValueError:
        return json.loads(payload)


def _none_reached(errors: list[BrokerUnavailable]) -> BrokerUnavailable:
    """Why the first connection failed: the one broker's error, or every broker's in one message."""
    if len(errors) == 1:
        return errors[0]
    return BrokerUnavailable(
        f"no broker could be reached: {'; '.join(err.message for err in errors)}", problem=errors[-1].problem
    )
