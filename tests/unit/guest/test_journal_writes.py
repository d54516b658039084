"""When and where the store's record writes happen (docs/architecture.md, "The state store").

The rule: a hot-add writes its record once before its answer (the intent, before its first QMP command), in the
event loop, whether or not other lanes are at work: a page-cache write costs less than a hop to a worker thread and
back (docs/performance.md, session 10). The outcome follows the answer: the next call's intent write carries it, or,
if no call comes first, the write-behind ``WRITE_BEHIND_DELAY`` after the lane let go (``GuestStore.flush_soon``; a
page-cache write without fsync). The real file store is used, and each write notes the thread it ran on.
"""

from __future__ import annotations

import asyncio
import json
import threading
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

import pytest
from fakemonitor import RecordingMonitor
from waiting import eventually

from qmpnet.adapters.store import FileGuestStore, StateDir
from qmpnet.adapters.store.reading import newest_json
from qmpnet.guest.guest import Guest
from qmpnet.settings import QmpSettings, Settings

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from qmpnet.core.records import GuestRecord

SETTINGS = Settings(qmp=QmpSettings(command_timeout=5, unplug_timeout=0.05))


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every durable write of a file store, as (the store's key, the thread that wrote it)."""
    noted: list[tuple[str, int]] = []
    write: Callable[[FileGuestStore, bytes, int, GuestRecord], None] = FileGuestStore._write

    def noting(store: FileGuestStore, data: bytes, number: int, record: GuestRecord) -> None:
        noted.append((store.key, threading.get_ident()))
        write(store, data, number, record)

    monkeypatch.setattr(FileGuestStore, "_write", noting)
    return noted


def _written(writes: list[tuple[str, int]], key: str, count: int) -> list[int] | None:
    """The threads of ``key``'s writes once there are ``count`` of them, else None."""
    threads = [thread for store, thread in writes if store == key]
    return threads if len(threads) >= count else None


async def _open(stack: AsyncExitStack, state: StateDir, name: str) -> tuple[Guest, RecordingMonitor, str]:
    store = await state.open_guest(f"/run/{name}.qmp", name, wait=1)
    stack.callback(store.close)
    monitor = RecordingMonitor()
    guest = await stack.enter_async_context(Guest(monitor, name=name, settings=SETTINGS, store=store))
    return guest, monitor, store.key


async def test_alone_a_hot_add_writes_in_the_event_loop(tmp_path: Path, writes: list[tuple[str, int]]) -> None:
    loop_thread = threading.get_ident()
    async with AsyncExitStack() as stack:
        guest, _, key = await _open(stack, StateDir(tmp_path), "vm1")
        writes.clear()
        await guest.add_nic({"id": "n1"})
        first = [thread for store, thread in writes if store == key]
        await guest.add_nic({"id": "n2"})  # its intent carries n1's outcome
        second = [thread for store, thread in writes if store == key]
        threads = await eventually(lambda: _written(writes, key, 3), what="the write-behind of n2's outcome")
        recorded = json.loads(newest_json(tmp_path / "guests", key) or b"null")
    assert len(first) == 1, "a hot-add writes its record once before its answer"
    assert len(second) == 2, "a hot-add that follows another writes once, its intent carrying the outcome before"
    assert len(threads) == 3, "the last outcome was not written behind the answer, or written twice"
    assert set(threads) == {loop_thread}, "alone, the hot-add's writes left the event loop"
    outcomes = [(op.get("outcome") or {}).get("status") for op in recorded["operations"].values()]
    assert outcomes == ["ok", "ok"], f"the outcomes on disk: {outcomes}"


async def test_while_another_lane_is_at_work_a_hot_add_still_writes_once_in_the_event_loop(
    tmp_path: Path, writes: list[tuple[str, int]]
) -> None:
    loop_thread = threading.get_ident()
    async with AsyncExitStack() as stack:
        state = StateDir(tmp_path)
        busy, busy_monitor, busy_key = await _open(stack, state, "busy")
        guest, _, key = await _open(stack, state, "vm1")
        gate = busy_monitor.gates["device_add"] = asyncio.Event()
        working = asyncio.create_task(busy.add_nic({"id": "b1"}))
        async with asyncio.timeout(5):
            while "device_add" not in busy_monitor.commands:  # noqa: ASYNC110 - the fake has no hook for this
                await asyncio.sleep(0.001)
        writes.clear()  # the busy guest now holds its lane, inside QEMU's device_add
        await guest.add_nic({"id": "n1"})
        threads = [thread for store, thread in writes if store == key]
        gate.set()
        await working
    assert len(threads) == 1, "a hot-add writes its record once before its answer"
    assert threads == [loop_thread], "with another lane at work, a hot-add's write left the event loop"
    busy_threads = [thread for store, thread in writes if store == busy_key]
    assert busy_threads, "the busy guest's outcome was not written"
