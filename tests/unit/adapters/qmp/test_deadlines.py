"""One timer for a monitor's commands ends each at its own deadline, as ``asyncio.timeout`` around each would.

The loop's clock is the test's (``loop.time`` replaced): time passes when the test says, and the loop fires what is
due when it next turns (``asyncio.sleep(0)``), so no test waits on the wall clock.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

from qmpnet.adapters.qmp.deadlines import Deadlines

if TYPE_CHECKING:
    from collections.abc import Callable


async def _command(deadlines: Deadlines, answer: asyncio.Future[str]) -> str:
    """What QmpMonitor.execute does around a command."""
    watch = deadlines.watch()
    try:
        return await answer
    except asyncio.CancelledError as err:
        if Deadlines.expired(watch):
            raise TimeoutError from err
        raise
    finally:
        deadlines.forget(watch)


@pytest.fixture
async def clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    """Set the running loop's time (seconds from now)."""
    loop = asyncio.get_running_loop()
    start, now = loop.time(), [0.0]
    monkeypatch.setattr(loop, "time", lambda: start + now[0])

    def set_time(seconds: float) -> None:
        now[0] = seconds

    return set_time


async def _turns(n: int = 10) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_each_command_ends_at_its_own_deadline_on_one_timer(clock: Callable[[float], None]) -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(10)
    answered = loop.create_future()
    answered.set_result("ok")
    assert await _command(deadlines, answered) == "ok"  # t=0: the timer is armed for t=10, and stays
    clock(5)
    late = asyncio.ensure_future(_command(deadlines, loop.create_future()))  # due at t=15
    await _turns()
    clock(12)
    later = asyncio.ensure_future(_command(deadlines, loop.create_future()))  # due at t=22
    await _turns()
    assert not late.done()  # the timer fired for t=10: nothing was due; it is armed for t=15 now
    clock(15)
    await _turns()
    with pytest.raises(TimeoutError):
        late.result()
    assert not later.done()
    clock(22)
    await _turns()
    with pytest.raises(TimeoutError):
        later.result()


async def test_a_command_answered_in_time_is_not_cancelled(clock: Callable[[float], None]) -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(10)
    answer: asyncio.Future[str] = loop.create_future()
    command = asyncio.ensure_future(_command(deadlines, answer))
    await _turns()
    answer.set_result("ok")
    await _turns()
    clock(30)  # the timer fires for a command that ended
    await _turns()
    assert command.result() == "ok"


async def test_a_cancellation_from_elsewhere_is_not_taken_for_the_deadline(clock: Callable[[float], None]) -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(10)
    before = asyncio.ensure_future(_command(deadlines, loop.create_future()))
    await _turns()
    before.cancel()  # the caller went away before the deadline
    await _turns()
    assert before.cancelled()
    both = asyncio.ensure_future(_command(deadlines, loop.create_future()))
    await _turns()
    clock(10)
    both.cancel()  # and at the deadline too: the caller's cancellation wins, as with asyncio.timeout
    await _turns()
    assert both.cancelled()


async def test_a_stopped_timer_fires_no_more() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(0)
    deadlines.watch()  # this task's, never forgotten: the monitor was closed meanwhile
    deadlines.stop()
    await _turns()  # nothing is cancelled: this task goes on
    command = asyncio.ensure_future(_command(deadlines, loop.create_future()))  # a new command arms it again
    await _turns()
    with pytest.raises(TimeoutError):
        command.result()
