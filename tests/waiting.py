"""The one poll with a deadline of the test suites (unit and integration): :func:`eventually`.

A test waits on an event when there is one (an ``asyncio.Event``, a future, a message). Some changes have nothing to
wait on: a tap the kernel unregisters, a file another process writes, a listener a guest starts in the background,
a counter another task bumps. For those, :func:`eventually` asks again and again until the answer is there or the
deadline passes; never a sleep of a guessed length. Importable from both trees because pytest puts ``tests/`` on
the path (``pythonpath`` in pyproject.toml).
"""

from __future__ import annotations

import asyncio
import inspect
from typing import TYPE_CHECKING, Any, TypeVar, overload

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["eventually"]

T = TypeVar("T")


@overload
async def eventually(
    attempt: Callable[[], Awaitable[T | None]], *, timeout: float = ..., interval: float = ...,
    retry: tuple[type[Exception], ...] = ..., what: str = ...,
) -> T: ...


@overload
async def eventually(
    attempt: Callable[[], T | None], *, timeout: float = ..., interval: float = ...,
    retry: tuple[type[Exception], ...] = ..., what: str = ...,
) -> T: ...


async def eventually(
    attempt: Callable[[], Any],
    *,
    timeout: float = 5.0,
    interval: float = 0.001,
    retry: tuple[type[Exception], ...] = (),
    what: str = "the condition",
) -> Any:
    """Call ``attempt`` (a function or a coroutine function) until it answers; return the answer.

    ``None`` and ``False`` mean "not yet"; anything else (``True``, a value, even ``{}`` or ``0``) is the answer.
    An exception of a type in ``retry`` also means "not yet" (a connection refused before a listener is up).
    The deadline is checked between attempts: an attempt that is under way is never cut short, so one that takes
    long (a transfer) is not mistaken for one that fails.

    Args:
        attempt: What to ask; it must not block the event loop.
        timeout: Seconds from the first attempt to the last one started.
        interval: Seconds between attempts (``0.001`` is a turn of the event loop or so, for in-process changes).
        retry: Exceptions that mean "not yet" rather than a failure.
        what: What is waited for, for the error message.

    Raises:
        TimeoutError: No answer within ``timeout`` seconds (chained to the last retried exception, if any).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        last: Exception | None = None
        try:
            answer = attempt()
            if inspect.isawaitable(answer):
                answer = await answer
        except retry as err:
            last, answer = err, None
        if answer is not None and answer is not False:
            return answer
        if loop.time() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout} s") from last
        await asyncio.sleep(interval)
