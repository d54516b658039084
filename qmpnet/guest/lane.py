"""The lane: one guest's calls, one at a time, in arrival order, with a bound on how many wait and for how long.

Every call on a guest runs in its lane, an ``asyncio.Lock`` taken in arrival order, so the QMP steps of two calls
on one guest never interleave, while different guests (different lanes) run in parallel. Admission is bounded: at
most ``lane.max_waiting`` calls may wait, each at most ``lane.max_wait`` seconds; past either limit a call gets
``busy`` or ``timeout`` and nothing was sent. Internal work (recovery, settling a late unplug) is not bounded: it
must always get its turn.
"""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING

from qmpnet.errors import Busy, Timeout

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from qmpnet.settings import LaneSettings

__all__ = ["Lane"]


class Lane:
    """One guest's lane (see the module docstring).

    Args:
        name: The guest's name, for the errors.
        settings: The admission limits.
        let_go: Called each time a call gives the lane back (the journal's write-behind).
    """

    def __init__(
        self, name: str, settings: LaneSettings, *, let_go: Callable[[], None] = lambda: None
    ) -> None:
        self._name = name
        self._settings = settings
        self._let_go = let_go
        self._lock = asyncio.Lock()
        self._waiting = 0
        self._passing = 0  # calls of passed() waiting for the lock: with _waiting, every waiter the lock can have
        unbounded, bounded = (functools.partial(self._acquire, bounded=flag) for flag in (False, True))
        self._turns = (_Turn(unbounded, self._give_back), _Turn(bounded, self._give_back))

    @property
    def waiting(self) -> int:
        """Calls admitted and waiting for their turn."""
        return self._waiting

    def locked(self) -> bool:
        """Whether a call holds the lane."""
        return self._lock.locked()

    def turn(self, *, bounded: bool = True) -> _Turn:
        """Hold the lane for the body of the ``async with``.

        Waits for earlier calls to give the lane back.

        Raises:
            Busy: ``bounded`` and ``lane.max_waiting`` calls are already waiting.
            Timeout: ``bounded`` and the lane was not free within ``lane.max_wait`` seconds.
        """
        return self._turns[bounded]

    def _give_back(self) -> None:
        self._lock.release()
        self._let_go()  # e.g. the journal's write-behind: the outcome follows the answer

    async def _acquire(self, *, bounded: bool) -> None:
        limits = self._settings
        if bounded and self._waiting >= limits.max_waiting:
            raise Busy(f"guest {self._name}: {self._waiting} requests are already waiting")
        self._waiting += 1
        try:
            if not bounded or (self._waiting == 1 and not self._passing and not self._lock.locked()):
                # Unbounded, or free with nobody waiting: an asyncio.Lock is then taken without suspending, so the
                # max_wait timer (armed and cancelled for nothing) is left out.
                await self._lock.acquire()
                return
            try:
                async with asyncio.timeout(limits.max_wait):
                    await self._lock.acquire()
            except TimeoutError as err:
                raise Timeout(
                    f"guest {self._name}: waited {limits.max_wait:g} s for earlier requests; nothing was sent"
                ) from err
        finally:
            self._waiting -= 1

    async def passed(self) -> None:
        """Wait until every call that holds or waits for the lane now has had its turn (it is not counted)."""
        self._passing += 1
        try:
            await self._lock.acquire()
        finally:
            self._passing -= 1
        self._lock.release()


class _Turn:
    """What :meth:`Lane.turn` gives: the lane taken on entry, given back on exit, however the body ends.

    A class rather than an ``asynccontextmanager``: every call enters one, and a generator-based context costs a
    generator and its frames per entry. It holds no state of a call, so each lane keeps one per kind and hands it
    out to every call (several may wait in ``__aenter__`` at once).
    """

    __slots__ = ("_give_back", "_take")

    def __init__(self, take: Callable[[], Awaitable[None]], give_back: Callable[[], None]) -> None:
        self._take = take
        self._give_back = give_back

    def __aenter__(self) -> Awaitable[None]:
        return self._take()  # the lane's own coroutine, awaited by the ``async with``: no frame of this one

    async def __aexit__(self, *exc: object) -> None:
        self._give_back()
