"""run_in_netns: blocking work in a fresh thread, errors passed through, cancellation never swallowed."""

from __future__ import annotations

import asyncio
import gc
import threading
from pathlib import Path
from typing import Any

import pytest

from qmpnet.adapters.hostnet.netns import netns_path, run_in_netns
from qmpnet.adapters.hostnet.taps import vhost_usable
from qmpnet.errors import InvalidRequest, NotFound, QmpnetError

THREAD_WAIT = 5.0  # seconds a namespace thread may take to start or finish in these tests


async def test_runs_in_another_thread_and_returns() -> None:
    result = await run_in_netns(None, threading.get_ident)
    assert result != threading.get_ident()


async def test_each_call_gets_a_fresh_thread() -> None:
    names = {await run_in_netns(None, lambda: threading.current_thread().name) for _ in range(3)}
    assert all(name.startswith("qmpnet-hostnet[host]") for name in names)


async def test_errors_pass_through_unchanged() -> None:
    def fail() -> None:
        raise NotFound("nic.backend.bridge: no bridge", field="nic.backend.bridge")

    with pytest.raises(NotFound) as caught:
        await run_in_netns(None, fail)
    assert caught.value.field == "nic.backend.bridge"


async def test_missing_namespace_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound) as caught:
        await run_in_netns(str(tmp_path / "nope"), lambda: None)
    assert caught.value.field == "netns"


async def test_a_file_that_is_no_namespace_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("")
    with pytest.raises(QmpnetError, match="cannot enter"):
        await run_in_netns(str(plain), lambda: None)


async def test_malformed_namespace_is_an_invalid_request() -> None:
    with pytest.raises(InvalidRequest):
        await run_in_netns("../x", lambda: None)


def test_namespace_names_live_under_run_netns() -> None:
    assert netns_path("hv") == Path("/run/netns/hv")
    assert netns_path("/proc/1/ns/net") == Path("/proc/1/ns/net")


async def _started(started: threading.Event) -> None:
    """Wait (off the loop, bounded) until the namespace thread is running the work."""
    assert await asyncio.to_thread(started.wait, THREAD_WAIT), "the namespace thread did not start"


async def test_cancellation_propagates_and_the_late_result_is_discarded() -> None:
    started, release = threading.Event(), threading.Event()
    discarded: asyncio.Queue[str] = asyncio.Queue()

    def work() -> str:
        started.set()
        release.wait(THREAD_WAIT)
        return "tap-fds"

    task = asyncio.create_task(run_in_netns(None, work, discard=discarded.put_nowait))
    await _started(started)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert discarded.empty()  # the work has not finished: nothing to discard yet
    release.set()
    assert await asyncio.wait_for(discarded.get(), THREAD_WAIT) == "tap-fds"


@pytest.mark.parametrize("with_discard", [True, False], ids=["with-discard", "without-discard"])
async def test_cancelled_call_that_fails_later_is_not_reported_as_unretrieved(
    monkeypatch: pytest.MonkeyPatch, with_discard: bool
) -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    futures: list[asyncio.Future[object]] = []
    run_in_executor = loop.run_in_executor

    def spy(executor: Any, *args: Any) -> asyncio.Future[object]:
        future = run_in_executor(executor, *args)
        if executor is not None:  # run_in_netns's own thread (asyncio.to_thread uses the default executor)
            futures.append(future)
        return future

    monkeypatch.setattr(loop, "run_in_executor", spy)
    started, release, raising = threading.Event(), threading.Event(), threading.Event()

    def fail_later() -> None:
        started.set()
        release.wait(THREAD_WAIT)
        raising.set()
        raise NotFound("gone")

    task = asyncio.create_task(run_in_netns(None, fail_later, discard=(lambda _: None) if with_discard else None))
    await _started(started)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    (future,) = futures
    # asyncio.wait, unlike awaiting the future, does not retrieve its exception. Its wake-up is a done callback
    # added after run_in_netns's, so that one has run when this returns.
    done, _ = await asyncio.wait({future}, timeout=THREAD_WAIT)
    assert done, "the namespace thread did not finish"
    assert raising.is_set()
    assert not future.cancelled()  # it failed after the caller left (asking for its exception would retrieve it)
    # An unretrieved exception is reported when its future is collected; make that happen now (the cancelled
    # task's traceback holds run_in_netns's frame, and with it the future).
    del future, task, done
    futures.clear()
    gc.collect()
    assert [c for c in reported if "never retrieved" in str(c.get("message"))] == []
    loop.set_exception_handler(None)


def test_vhost_usable_is_false_for_a_missing_device(tmp_path: Path) -> None:
    assert vhost_usable(tmp_path / "vhost-net") is False
