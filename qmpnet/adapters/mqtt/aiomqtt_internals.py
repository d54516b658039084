"""Everything of qmpnet that relies on ``aiomqtt`` beyond its documented API, in one room (pinned in pyproject.toml).

qmpnet uses no private *name* of ``aiomqtt`` or ``paho``; it relies on one undocumented *behaviour* of
``aiomqtt.Client``, kept here:

* **Messages in wire order, before the next packet.** ``aiomqtt`` fills its message queue (the ``queue_type``
  argument, public) from paho's ``on_message`` callback by calling the queue's ``put_nowait``, synchronously, while
  paho parses the socket's bytes: a message is handed over before the SUBACK that follows it on the wire completes
  its ``subscribe``. The public API (``async for message in client.messages``) hands messages over a task switch
  later, after that ``subscribe`` may already have returned. The requester needs the order: the broker sends a
  controller's retained status before it acknowledges the next SUBSCRIBE, so once that subscription returns the
  status has been read, and a controller known to be offline is refused before anything is published.
  :func:`dispatching_queue` makes a queue whose ``put_nowait`` dispatches at once.

tests/unit/adapters/mqtt/test_aiomqtt_internals.py is the contract: it fails, naming what changed, when a new version
of ``aiomqtt`` no longer fills the queue this way; and it checks that no other module of the MQTT adapter uses a
private name of ``aiomqtt`` or ``paho``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import aiomqtt

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["dispatching_queue"]


def dispatching_queue(dispatch: Callable[[aiomqtt.Message], None]) -> type[asyncio.Queue[aiomqtt.Message]]:
    """A message queue for ``aiomqtt.Client(queue_type=...)`` that hands each message to ``dispatch`` at once.

    The MQTT library fills its queue from the callback that parses the socket's bytes, in wire order, before it
    completes the SUBACK that follows; dispatching right there keeps that order for us.
    """

    class Dispatching(asyncio.Queue[aiomqtt.Message]):
        def put_nowait(self, item: aiomqtt.Message) -> None:
            dispatch(item)

    return Dispatching
