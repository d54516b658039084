"""The client side of the MQTT API: send a request, await its answer (MQTT 5 Response Topic + Correlation Data).

One broker connection serves any number of concurrent requests to any number of controllers. Answers come back on
``<root>/<c>/client/<client-id>/response`` (inside each controller's own topic tree, so a broker ACL that lets a
controller write only under ``<root>/<c>/`` still lets it answer) and are matched to their request by a random
Correlation Data. The retained ``<root>/+/status`` topics are watched too, so a request to a controller known to
be offline fails at once instead of waiting for the timeout. ``aiomqtt`` errors become qmpnet errors here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from typing import TYPE_CHECKING, Any, Self

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from qmpnet.bus.mqtt import make_client, publish_nowait
from qmpnet.errors import GuestUnavailable, InvalidRequest, OutcomeUnknown
from qmpnet.wire.topics import Topics, is_bus_name

if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import TracebackType

    from qmpnet.settings import MqttSettings

__all__ = ["Requester"]

log = logging.getLogger(__name__)


class Requester:
    """Request/response over MQTT 5 for orchestrators and the CLI. Use as an async context manager.

    Args:
        settings: Broker URL, credentials, TLS and topic root.
        client_id: This client's id (MQTT client id and response topic level); random when absent.
    """

    def __init__(self, settings: MqttSettings, *, client_id: str | None = None) -> None:
        self.settings = settings
        self.client_id = client_id or f"qmpnet-client-{uuid.uuid4().hex[:12]}"
        if not is_bus_name(self.client_id):
            raise InvalidRequest(f"client_id: {self.client_id!r} is not [A-Za-z0-9_.-]{{1,64}}", field="client_id")
        self._client = make_client(settings, identifier=self.client_id, protocol="5")
        self._pending: dict[bytes, asyncio.Future[dict[str, Any]]] = {}
        self._controllers: dict[str, str] = {}
        self._reader: asyncio.Task[None] | None = None
        self._lost: str | None = None

    async def __aenter__(self) -> Self:
        """Connect and subscribe.

        Raises:
            GuestUnavailable: The broker cannot be reached or refused us.
        """
        root = self.settings.topic_root
        try:
            await self._client.__aenter__()
        except aiomqtt.MqttError as err:
            raise GuestUnavailable(f"cannot connect to the broker at {self.settings.broker}: {err}") from err
        try:
            await self._client.subscribe(f"{root}/+/client/{self.client_id}/response", qos=1)
            await self._client.subscribe(f"{root}/+/status", qos=1)
        except aiomqtt.MqttError as err:
            await self._close()
            raise GuestUnavailable(f"cannot subscribe at the broker {self.settings.broker}: {err}") from err
        self._reader = asyncio.create_task(self._read(), name="qmpnet.client.reader")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        with contextlib.suppress(aiomqtt.MqttError):
            await self._client.__aexit__(None, None, None)

    async def request(
        self, controller: str, guest: str | None, op: str, payload: Mapping[str, Any], *, timeout: float
    ) -> dict[str, Any]:
        """Send ``payload`` as request ``op`` to ``guest`` (``None``: the controller) and return the decoded answer.

        Waits at most ``timeout`` seconds for the answer.

        Raises:
            InvalidRequest: ``controller`` or ``guest`` is not a valid name.
            GuestUnavailable: The controller is known to be offline, or the broker connection is lost.
            OutcomeUnknown: No answer within ``timeout``: the request may or may not have been carried out.
        """
        for field, name in (("controller", controller), ("guest", guest)):
            if name is not None and not is_bus_name(name):
                raise InvalidRequest(f"{field}: {name!r} is not [A-Za-z0-9_.-]{{1,64}}", field=field)
        if self._lost is not None:
            raise GuestUnavailable(self._lost)
        if self._controllers.get(controller) == "offline":
            raise GuestUnavailable(f"controller {controller} is offline")
        topics = Topics(self.settings.topic_root, controller)
        correlation = uuid.uuid4().bytes
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[correlation] = answer
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.ResponseTopic = topics.client_response(self.client_id)
        properties.CorrelationData = correlation
        try:
            if not publish_nowait(
                self._client, topics.request(guest, op), json.dumps(payload).encode(), properties=properties
            ):
                raise GuestUnavailable(f"cannot publish to the broker {self.settings.broker}: not connected")
            async with asyncio.timeout(timeout):
                return await answer
        except TimeoutError:
            raise OutcomeUnknown(
                f"no answer from controller {controller} within {timeout:g} s; it may or may not have acted"
            ) from None
        except aiomqtt.MqttError as err:
            raise GuestUnavailable(f"lost the broker {self.settings.broker}: {err}") from err
        finally:
            self._pending.pop(correlation, None)

    async def _read(self) -> None:
        try:
            async for message in self._client.messages:
                self._dispatch(message)
        except aiomqtt.MqttError as err:
            self._lost = f"lost the broker {self.settings.broker}: {err}"
            for answer in self._pending.values():
                if not answer.done():
                    answer.set_exception(GuestUnavailable(self._lost))

    def _dispatch(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = message.payload if isinstance(message.payload, bytes) else b""
        if topic.endswith("/status") and topic.count("/") == self.settings.topic_root.count("/") + 2:
            controller = topic.split("/")[-2]
            with contextlib.suppress(ValueError, AttributeError):
                self._controllers[controller] = json.loads(payload)["state"] if payload else "offline"
            return
        correlation = getattr(message.properties, "CorrelationData", None) if message.properties else None
        answer = self._pending.get(correlation) if isinstance(correlation, bytes) else None
        if answer is None or answer.done():
            return
        try:
            decoded = json.loads(payload)
        except ValueError as err:
            answer.set_exception(OutcomeUnknown(f"the controller answered with something that is not JSON: {err}"))
            return
        if isinstance(decoded, dict):
            answer.set_result(decoded)
