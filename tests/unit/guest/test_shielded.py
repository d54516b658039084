"""A change runs to its end whatever happens to its caller: ``_shielded`` behaves as ``asyncio.shield`` did.

Each case runs against the shield-based version the lane used before (``_by_shield``) and the lane's own, and
both must end the same way: what the caller gets, and what became of the work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from qmpnet.guest.guest import _shielded

Shield = Callable[[Awaitable[str]], Awaitable[str]]


async def _by_shield(work: Awaitable[str]) -> str:
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


WAYS = [pytest.param(_by_shield, id="asyncio.shield"), pytest.param(_shielded, id="_shielded")]


class _Work:
    """A change that goes on until released, then answers or fails; notes whether it ran to its end."""

    def __init__(self, error: Exception | None = None) -> None:
        self.release = asyncio.Event()
        self.error = error
        self.ended = False

    async def __call__(self) -> str:
        await self.release.wait()
        self.ended = True
        if self.error is not None:
            raise self.error
        return "done"


async def _turns(n: int = 10) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


@pytest.mark.parametrize("shield", WAYS)
async def test_the_answer_and_the_error_reach_the_caller(shield: Shield) -> None:
    work = _Work()
    work.release.set()
    assert await shield(work()) == "done"
    failing = _Work(ValueError("refused"))
    failing.release.set()
    with pytest.raises(ValueError, match="refused"):
        await shield(failing())


@pytest.mark.parametrize("shield", WAYS)
async def test_a_cancelled_caller_waits_for_the_work_then_is_cancelled(shield: Shield) -> None:
    work = _Work()
    caller = asyncio.ensure_future(shield(work()))
    await _turns()
    caller.cancel()
    await _turns()
    assert not caller.done()  # the work goes on, and the caller with it
    work.release.set()
    await _turns()
    assert work.ended
    assert caller.cancelled()


@pytest.mark.parametrize("shield", WAYS)
async def test_a_cancelled_caller_gets_the_works_error(shield: Shield) -> None:
    work = _Work(ValueError("refused"))
    caller = asyncio.ensure_future(shield(work()))
    await _turns()
    caller.cancel()
    await _turns()
    work.release.set()
    await _turns()
    assert isinstance(caller.exception(), ValueError)


@pytest.mark.parametrize("shield", WAYS)
async def test_a_second_cancellation_of_the_caller_stops_the_work(shield: Shield) -> None:
    work = _Work()
    caller = asyncio.ensure_future(shield(work()))
    await _turns()
    caller.cancel()
    await _turns()
    caller.cancel()  # it waits for the work itself now: the work is cancelled with it
    await _turns()
    assert caller.cancelled()
    assert not work.ended


@pytest.mark.parametrize("shield", WAYS)
async def test_work_cancelled_from_elsewhere_cancels_the_caller(shield: Shield) -> None:
    started = asyncio.Event()

    async def work() -> str:
        started.set()
        await asyncio.Event().wait()
        return "never"

    caller = asyncio.ensure_future(shield(work()))
    await started.wait()
    others = [task for task in asyncio.all_tasks() if task is not caller and task is not asyncio.current_task()]
    assert len(others) == 1
    others[0].cancel()  # e.g. every task cancelled as the loop closes
    await _turns()
    assert caller.cancelled()
