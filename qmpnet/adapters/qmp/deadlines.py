"""The per-command timeout of one monitor, kept by one timer for all its commands in flight.

``async with asyncio.timeout(t)`` around each command arms a timer for it (a handle holding a copy of the context,
pushed on the loop's heap) and cancels it when the answer comes: ~4 us a command, and a hot-add is two. Every
command of a monitor has the same timeout, so their deadlines come in the order they were sent, and one timer, armed
for the oldest command in flight, serves them all: when it fires it cancels the commands whose deadline it was armed
for or earlier, and is armed again for the oldest one left. A command that is answered leaves it armed, so while
commands keep coming it fires (for nothing) at most once per timeout, and a command costs no timer of its own.

A command cancelled this way ends exactly as under ``asyncio.timeout``: its task is cancelled at its deadline, and
the ``CancelledError`` is the deadline's (:meth:`Deadlines.expired`) unless the task was also cancelled otherwise.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from asyncio import Task

__all__ = ["Deadlines", "Watch"]


class Watch:
    """One command in flight: when its time is up, its task, and whether its deadline passed."""

    __slots__ = ("cancelling", "deadline", "expired", "task")

    def __init__(self, deadline: float, task: Task[object]) -> None:
        self.deadline = deadline
        self.task = task
        self.cancelling = task.cancelling()  # the cancellations already asked for: not the deadline's
        self.expired = False


class Deadlines:
    """The commands in flight on one monitor and the one timer that ends those that outlive ``timeout`` seconds."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._watched: dict[Watch, None] = {}  # in the order sent, which is the order of their deadlines
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the timer's
        self._armed_for = 0.0  # the loop time the timer fires at

    def watch(self) -> Watch:
        """Start the clock of a command the current task is about to await; :meth:`forget` it once it ends.

        Raises:
            RuntimeError: Not called from a task (as ``asyncio.timeout``).
        """
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Timeout should be used inside a task")
        loop = task.get_loop()
        watch = Watch(loop.time() + self._timeout, task)
        self._watched[watch] = None
        if self._timer is None or self._loop is not loop:
            self._arm(loop, watch.deadline)
        return watch

    def forget(self, watch: Watch) -> None:
        """The command ended (answered, failed, cancelled): its deadline no longer counts."""
        self._watched.pop(watch, None)

    @staticmethod
    def expired(watch: Watch) -> bool:
        """Whether the ``CancelledError`` the command's task got is its deadline's (``asyncio.timeout``'s rule).

        Call it once, on that ``CancelledError``: it takes back the deadline's cancellation of the task.
        """
        return watch.expired and watch.task.uncancel() <= watch.cancelling

    def stop(self) -> None:
        """Disarm the timer and forget the commands in flight (the monitor is closed: they end without answer)."""
        self._watched.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        self._loop, self._armed_for = loop, when
        self._timer = loop.call_at(when, self._fire, loop)

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        due = self._armed_for  # the loop fired the timer for this time: every deadline up to it is up
        for watch in list(self._watched):
            if watch.deadline > due:
                self._arm(loop, watch.deadline)
                return
            del self._watched[watch]
            watch.expired = True
            watch.task.cancel()
