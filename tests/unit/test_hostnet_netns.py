"""run_in_netns: blocking work in a fresh thread, errors passed through, cancellation never swallowed."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from qmpnet.errors import InvalidRequest, NotFound, QmpnetError
from qmpnet.hostnet.netns import netns_path, run_in_netns
from qmpnet.hostnet.taps import vhost_usable


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


async def test_cancellation_propagates_and_the_late_result_is_discarded() -> None:
    release = threading.Event()
    discarded: list[str] = []
    task = asyncio.create_task(run_in_netns(None, lambda: release.wait(5) and "tap-fds", discard=discarded.append))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert discarded == []
    release.set()
    for _ in range(100):
        if discarded:
            break
        await asyncio.sleep(0.01)
    assert discarded == ["tap-fds"]


async def test_cancelled_call_that_fails_later_is_not_reported_as_unretrieved() -> None:
    release = threading.Event()

    def fail_later() -> None:
        release.wait(5)
        raise NotFound("gone")

    task = asyncio.create_task(run_in_netns(None, fail_later, discard=lambda _: None))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    await asyncio.sleep(0.1)


def test_vhost_usable_is_false_for_a_missing_device(tmp_path: Path) -> None:
    assert vhost_usable(tmp_path / "vhost-net") is False
