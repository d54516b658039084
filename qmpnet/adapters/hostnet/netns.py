"""Running blocking host work inside a network namespace, off the event loop.

Everything host-side is blocking (netlink through pyroute2's sync API, ioctls on ``/dev/net/tun``, ``nft`` and
``dnsmasq`` runs), and much of it must happen *inside* a namespace: a tap is created in the namespace of the
thread that opens ``/dev/net/tun``, a netlink socket talks to the namespace it was made in, ``/proc/sys/net``
shows the namespace of the thread that opens it, and a child process starts in the namespace of the thread that
forks it. So each call gets a **fresh thread** that ``setns()``-es into the namespace and then does the work:
the namespace belongs to that thread alone and dies with it, and no pooled thread is ever left in the wrong
namespace. (Python 3.11 has no ``os.setns``; pyroute2's :func:`pyroute2.netns.setns` makes the call.)

Cancellation is never swallowed: the awaiting task gets its ``CancelledError`` at once, and because the
thread cannot be interrupted, the caller may pass ``discard`` to undo the thread's result when it arrives
(close the fds it opened, ...).
"""

from __future__ import annotations

import asyncio
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from qmpnet.core.ifnames import check_netns
from qmpnet.errors import NotFound, QmpnetError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["NETNS_RUN_DIR", "netns_path", "run_in_netns"]

T = TypeVar("T")

#: Where ``ip netns add NAME`` (and pyroute2) keep named namespaces.
NETNS_RUN_DIR = Path("/run/netns")


def netns_path(netns: str) -> Path:
    """The file of namespace ``netns``: ``/run/netns/<name>``, or ``netns`` itself if it is a path.

    Raises:
        InvalidRequest: ``netns`` is malformed.
    """
    check_netns(netns)
    return Path(netns) if netns.startswith("/") else NETNS_RUN_DIR / netns


def enter_netns(netns: str) -> None:
    """Move the *calling thread* into namespace ``netns`` (only ever call this from a throw-away thread).

    Raises:
        NotFound: No such namespace.
        QmpnetError: The file is not a network namespace or entering it was refused.
    """
    from pyroute2.netns import setns  # noqa: PLC0415 - pyroute2 loads in ~70 ms: only a namespace's work needs it

    path = netns_path(netns)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as err:
        raise NotFound(f"netns: no network namespace {netns!r} ({path})", field="netns") from err
    try:
        setns(fd, flags=0)  # an open fd: pyroute2 neither creates a namespace nor closes the fd
    except OSError as err:
        raise QmpnetError(f"netns: cannot enter {netns!r}: {os.strerror(err.errno or 0)}", field="netns") from err
    finally:
        os.close(fd)


def _call_in(netns: str | None, fn: Callable[[], T]) -> T:
    if netns is not None:
        enter_netns(netns)
    return fn()


def _discard_late(discard: Callable[[T], None], future: asyncio.Future[T]) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    discard(future.result())


async def run_in_netns(netns: str | None, fn: Callable[[], T], *, discard: Callable[[T], None] | None = None) -> T:
    """Run the blocking ``fn`` in a new thread inside namespace ``netns`` (``None``: this process's namespace).

    Waits for ``fn`` to return.

    Args:
        netns: A name under ``/run/netns``, an absolute path to a namespace file, or ``None``.
        fn: The blocking work. Its exceptions reach the caller unchanged.
        discard: Called with ``fn``'s result if the caller was cancelled before ``fn`` finished, to undo it.

    Raises:
        NotFound: No such namespace.
        InvalidRequest: ``netns`` is malformed.
    """
    if netns is not None:
        check_netns(netns)
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"qmpnet-hostnet[{netns or 'host'}]")
    try:
        future = loop.run_in_executor(executor, _call_in, netns, fn)
    finally:
        executor.shutdown(wait=False)  # the submitted call still runs; the thread exits after it
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        if discard is not None:
            future.add_done_callback(functools.partial(_discard_late, discard))
        else:
            future.add_done_callback(lambda done: done.cancelled() or done.exception())
        raise
