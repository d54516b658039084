"""What the controller has to tell the broker and has not yet had acknowledged: answers, retained state, events.

Design decisions:

- **Nothing is dropped because the broker is away.** An answer or an event produced without a broker session waits
  here and goes out when the next session starts; a message sent but not acknowledged (PUBACK) when a session
  breaks is sent again in the next one (QoS 1 is at-least-once anyway, and every consumer copes with a repeat).
- **Retained state is kept per topic, not per change.** Only the latest payload of each retained topic matters, so
  while the broker is away a change replaces the previous one, and every session starts by publishing all of them
  (a restarted broker that lost its retained store is brought up to date). A deletion (empty payload) stays until
  the broker has acknowledged it.
- **A burst of changes can be published once** (``state_interval``, ``mqtt.state_interval``; 0, the default, sends
  every change). With it, a topic's change goes out at once if the topic was last queued at least ``state_interval``
  ago; otherwise when that interval ends, as the latest state then (a model is serialised only when sent, so the
  skipped ones cost nothing to encode). Answers and events are never held back, so a held-back state comes after
  the events of its changes; a deletion is not held back either (it also drops a publish that was due).
- **Order.** Within a session messages go out in the order they were put here, which the bus arranges so that a
  request's answer comes before the state and events it caused. At a session start the backlog keeps that rule:
  answers first, then every retained topic, then the events, each group in its original order.
- **Bounded.** At most ``limit`` answers and events wait; when full the oldest event goes first (then the oldest
  answer), and the loss is logged once per outage.

Bookkeeping plus two :class:`asyncio.Event` s (work to send; all acknowledged). The connection is the bus's job.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from qmpnet.api.wire.envelopes import to_wire

if TYPE_CHECKING:
    from paho.mqtt.properties import Properties
    from pydantic import BaseModel

__all__ = ["Kind", "Outbox", "Outgoing"]

log = logging.getLogger(__name__)

#: ``answer``: a response; ``state``: a retained topic; ``event``: an event; ``clear``: a best-effort QoS 0
#: deletion of a retained request (never kept across sessions).
Kind = Literal["answer", "state", "event", "clear"]


@dataclass
class Outgoing:
    """One message for the broker. ``message`` is serialised only when it is sent (see :meth:`payload`)."""

    topic: str
    message: BaseModel | bytes
    kind: Kind
    properties: Properties | None = None
    _payload: bytes | None = field(default=None, repr=False)

    @property
    def retain(self) -> bool:
        """Whether the broker keeps it (retained state and deletions of retained messages)."""
        return self.kind in ("state", "clear")

    @property
    def qos(self) -> int:
        """QoS 1, except for the best-effort clearing of a retained request."""
        return 0 if self.kind == "clear" else 1

    def payload(self) -> bytes:
        """The bytes on the wire (JSON of the message), computed once."""
        if self._payload is None:
            self._payload = self.message if isinstance(self.message, bytes) else to_wire(self.message)
        return self._payload


class Outbox:
    """The controller's outgoing messages, in order, kept until the broker acknowledges them.

    Args:
        limit: How many answers and events may wait (retained topics are not counted: one each).
        state_interval: Least seconds between two publishes of one retained topic (0: every change at once).
    """

    def __init__(self, limit: int, state_interval: float = 0.0) -> None:
        self._limit = limit
        self._interval = state_interval
        self._state_queued: dict[str, float] = {}  # retained topic -> when (loop time) it was last queued
        self._state_due: dict[str, asyncio.TimerHandle] = {}  # retained topic -> its publish at the interval's end
        self._todo: deque[Outgoing] = deque()
        self._inflight: dict[int, Outgoing] = {}  # sent, awaiting the PUBACK, by sequence number
        self._retained: dict[str, Outgoing] = {}  # the latest of each retained topic
        self._seq = itertools.count()
        self._online = False
        self._ready = asyncio.Event()
        self._settled = asyncio.Event()
        self._settled.set()
        self._dropped = 0

    # -------------------------------------------------------------------------------------------- producers

    def put(self, item: Outgoing) -> None:
        """Queue ``item``; a retained one also becomes its topic's latest state."""
        if item.kind == "state":
            self._retained[item.topic] = item
            if not self._online:
                return  # sent with every other retained topic when the next session starts
            if self._interval and self._held_back(item):
                return
        elif item.kind == "clear" and not self._online:
            return
        self._todo.append(item)
        self._trim()
        self._ready.set()
        self._settled.clear()

    def _held_back(self, item: Outgoing) -> bool:
        """Whether retained ``item`` waits for the end of its topic's interval (and is sent as the latest then)."""
        topic = item.topic
        due = self._state_due.get(topic)
        if isinstance(item.message, bytes) and not item.message:  # a deletion: never held back, nor what was due
            if due is not None:
                due.cancel()
                del self._state_due[topic]
            return False
        if due is not None:
            return True  # the publish due takes the latest state, this one
        loop = asyncio.get_running_loop()
        now, last = loop.time(), self._state_queued.get(topic)
        if last is None or now - last >= self._interval:
            self._state_queued[topic] = now
            return False
        self._state_due[topic] = loop.call_at(last + self._interval, self._publish_due, topic)
        self._settled.clear()
        return True

    def _publish_due(self, topic: str) -> None:
        """The end of ``topic``'s interval: queue its latest state."""
        del self._state_due[topic]
        item = self._retained.get(topic)
        if item is not None and self._online:  # else acknowledged as deleted, or the next session sends it
            self._state_queued[topic] = asyncio.get_running_loop().time()
            self._todo.append(item)
        self._wake()

    def flush_state(self, *, hold_no_more: bool = False) -> None:
        """Queue every retained topic held back now; ``hold_no_more``: and no later change (a stopping controller)."""
        if hold_no_more:
            self._interval = 0.0
        for topic, due in list(self._state_due.items()):
            due.cancel()
            self._publish_due(topic)

    def _forget_intervals(self) -> None:
        """A session starts or ends: every retained topic is sent with the next session's start anyway."""
        for due in self._state_due.values():
            due.cancel()
        self._state_due.clear()
        self._state_queued.clear()

    def retained(self, topic: str) -> bytes | None:
        """The latest payload kept for retained ``topic`` (``b""``: a deletion not yet acknowledged)."""
        item = self._retained.get(topic)
        return None if item is None else item.payload()

    def _trim(self) -> None:
        if len(self._todo) <= self._limit:
            return
        while sum(m.kind != "state" for m in self._todo) > self._limit:
            victim = next((m for m in self._todo if m.kind in ("event", "clear")), None)
            if victim is None:
                victim = next(m for m in self._todo if m.kind == "answer")
            self._todo.remove(victim)
            if self._dropped == 0:
                log.warning("outbox full (%d messages while the broker is away): dropping the oldest", self._limit)
            self._dropped += 1

    # --------------------------------------------------------------------------------------------- sender

    def session_started(self) -> None:
        """A broker session began: everything not acknowledged is sent again, answers first, then state, then events."""
        backlog = [*self._inflight.values(), *self._todo]
        self._inflight.clear()
        self._forget_intervals()
        answers = [m for m in backlog if m.kind == "answer"]
        events = [m for m in backlog if m.kind == "event"]
        self._todo = deque([*answers, *self._retained.values(), *events])
        self._online = True
        if self._dropped:
            log.warning("%d answers or events were dropped while the broker was away (outbox full)", self._dropped)
            self._dropped = 0
        self._wake()

    def session_ended(self) -> None:
        """The broker session ended: hold everything until the next one."""
        self._online = False
        self._forget_intervals()

    async def next(self) -> tuple[int, Outgoing]:
        """The next message to send and its sequence number for :meth:`acknowledged`; waits while there is none."""
        while not self._todo:
            self._ready.clear()
            await self._ready.wait()
        item = self._todo.popleft()
        seq = next(self._seq)
        self._inflight[seq] = item
        return seq, item

    def acknowledged(self, seq: int) -> None:
        """The broker acknowledged message ``seq``; a deletion of a retained topic is then forgotten."""
        item = self._inflight.pop(seq, None)
        if item is not None and item.kind == "state" and not item.payload() and self._retained.get(item.topic) is item:
            del self._retained[item.topic]
        self._wake()

    def _wake(self) -> None:
        if self._todo:
            self._ready.set()
        if not self._todo and not self._inflight and not self._state_due:
            self._settled.set()
        else:
            self._settled.clear()

    async def settled(self) -> None:
        """Wait until everything queued has been acknowledged."""
        await self._settled.wait()
