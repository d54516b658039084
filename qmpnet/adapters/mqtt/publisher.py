"""The controller's way of publishing: each message handed to paho itself, each PUBACK heard from paho's callback.

Split from ``aiomqtt_internals`` (which keeps every use of the libraries' private names): this module uses paho's
public ``publish`` and ``on_publish`` only.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import aiomqtt

from qmpnet.adapters.mqtt.aiomqtt_internals import DirectPublish, paho_of

if TYPE_CHECKING:
    from collections.abc import Callable

    from paho.mqtt.properties import Properties

__all__ = ["Publisher"]

_log = logging.getLogger(__name__)


class Publisher:
    """Publishes through ``client``'s paho client itself; paho's ``on_publish`` callback reports each acknowledgement.

    ``aiomqtt.Client.publish`` makes, per message, a coroutine to await, an :class:`asyncio.Event`, a pending-call
    entry (and counts all of them), and a timeout scope; a sender keeping several messages in flight needs a task
    per message on top. Here a message is one call of paho's ``publish``, and its PUBACK (for QoS 0: its write) one
    call of ``acknowledged(seq)`` from paho's callback, on the event loop's thread, with no task woken. What paho's
    callback reports for a message not published here (``aiomqtt``'s own publishes) goes on to ``aiomqtt``'s.

    paho's ``publish`` and ``on_publish`` are its public API; the paho client inside an ``aiomqtt.Client`` and the
    direct path of a QoS 1 message (:class:`~.aiomqtt_internals.DirectPublish`) come from ``aiomqtt_internals``,
    the one room for the libraries' private names.

    Args:
        paho: The paho client of a connected ``aiomqtt.Client`` (:meth:`of` finds it).
        acknowledged: Called with a message's ``seq`` once the broker has it.
        limit: At most this many messages await their acknowledgement (:meth:`room` waits).
    """

    __slots__ = ("_acknowledged", "_direct", "_limit", "_mids", "_paho", "_room")

    def __init__(self, paho: Any, acknowledged: Callable[[int], None], limit: int) -> None:  # noqa: ANN401 - paho's
        self._paho = paho
        self._acknowledged = acknowledged
        self._limit = max(limit, 1)
        self._mids: dict[int, int] = {}  # paho's message id -> the caller's seq, while the broker has not acked
        self._room = asyncio.Event()
        self._room.set()
        theirs = paho.on_publish  # aiomqtt's: completes its own publish calls

        def on_publish(paho_client: Any, userdata: object, mid: int, *rest: Any) -> None:  # noqa: ANN401 - paho's
            seq = self._mids.pop(mid, None)
            if seq is None:
                theirs(paho_client, userdata, mid, *rest)
                return
            self._room.set()
            self._acknowledged(seq)

        paho.on_publish = on_publish
        self._direct = DirectPublish.of(paho)

    @classmethod
    def of(cls, client: aiomqtt.Client, acknowledged: Callable[[int], None], limit: int) -> Publisher | None:
        """A publisher for ``client``; ``None`` (use ``client.publish``) when its paho client is not where expected."""
        paho = paho_of(client)
        if not (hasattr(paho, "publish") and hasattr(paho, "on_publish")):
            _log.info("aiomqtt %s: no paho client at _client; publishing through aiomqtt.Client.publish",
                      getattr(aiomqtt, "__version__", "?"))  # fmt: skip
            return None
        return cls(paho, acknowledged, limit)

    @property
    def inflight(self) -> int:
        """Messages published here whose acknowledgement has not come yet."""
        return len(self._mids)

    async def room(self) -> None:
        """Wait until fewer than ``limit`` messages await their acknowledgement."""
        while len(self._mids) >= self._limit:
            self._room.clear()
            await self._room.wait()

    def publish(  # noqa: PLR0913 - an MQTT publish's parts, keyword-only but the message's own
        self, seq: int, topic: str, payload: bytes, *, qos: int, retain: bool, properties: Properties | None
    ) -> bool:
        """Hand message ``seq`` to paho; ``False`` if paho refused it (no connection): it was not sent."""
        info = None
        if qos == 1 and self._direct is not None:
            info = self._direct(topic, payload, retain=retain, properties=properties)
        if info is None:
            info = self._paho.publish(topic, payload, qos, retain, properties)
        if info.rc != 0:  # MQTT_ERR_SUCCESS
            return False
        if info.is_published():  # QoS 0, written at once (paho's own write path): the callback came already
            self._acknowledged(seq)
        else:
            self._mids[info.mid] = seq
        return True
