"""An in-memory :class:`qmpnet.core.ports.Monitor` that records every call, for tests of the guest lane without QMP.

The guest sees the captured QEMU 7.2 ``pc`` guest as the QMP adapter reads it (``captures.py``); every ``execute``
answers ``{}`` unless :attr:`RecordingMonitor.errors` holds an error for that command, after waiting for the
command's event in :attr:`RecordingMonitor.gates` if it has one. Events can be injected with
:meth:`RecordingMonitor.emit`, and reach both the ``on_event`` handlers and the open ``listen`` streams.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from captures import Capture, observe

from qmpnet.core.ports import Observation, QmpEvent

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence

    from qmpnet.core.model import ModelInfo, RxFilter
    from qmpnet.core.ports import EventStream
    from qmpnet.errors import QmpnetError

__all__ = ["RecordingMonitor", "pc_observation"]


def pc_observation() -> Observation:
    """The captured ``pc`` guest as the QMP adapter would observe it."""
    return observe(Capture.load("7.2", "pc"))


class _Stream:
    def __init__(self, names: Collection[str], where: Callable[[QmpEvent], bool] | None) -> None:
        self.names = set(names)
        self.where = where
        self.queue: asyncio.Queue[QmpEvent] = asyncio.Queue()

    def offer(self, event: QmpEvent) -> None:
        if event.name in self.names and (self.where is None or self.where(event)):
            self.queue.put_nowait(event)

    async def get(self) -> QmpEvent:
        return await self.queue.get()

    def get_nowait(self) -> QmpEvent | None:
        return None if self.queue.empty() else self.queue.get_nowait()


class RecordingMonitor:
    """A fake monitor that records what the guest asks of it."""

    def __init__(self, observation: Observation | None = None) -> None:
        self.observation = observation or pc_observation()
        self.executed: list[tuple[str, dict[str, object]]] = []
        self.observed = 0
        self.errors: dict[str, QmpnetError] = {}
        self.gates: dict[str, asyncio.Event] = {}
        self._handlers: list[Callable[[QmpEvent], None]] = []
        self._streams: list[_Stream] = []

    def forget(self) -> None:
        """Forget what was asked so far (the recovery a ``Guest`` runs on entry), to check what comes next."""
        self.executed.clear()
        self.observed = 0

    @property
    def commands(self) -> list[str]:
        """The names of the executed commands, in order."""
        return [name for name, _ in self.executed]

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> object:
        self.executed.append((command, dict(arguments or {})))
        if command in self.gates:
            await self.gates[command].wait()
        if command in self.errors:
            raise self.errors[command]
        return {}

    @asynccontextmanager
    async def listen(
        self, names: Collection[str], where: Callable[[QmpEvent], bool] | None = None
    ) -> AsyncIterator[EventStream]:
        stream = _Stream(names, where)
        self._streams.append(stream)
        try:
            yield stream
        finally:
            self._streams.remove(stream)

    def on_event(self, handler: Callable[[QmpEvent], None]) -> None:
        self._handlers.append(handler)

    def emit(self, name: str, data: Mapping[str, object]) -> None:
        """Deliver an event to the open streams and the handlers."""
        event = QmpEvent(name, dict(data), 0.0)
        for stream in self._streams:
            stream.offer(event)
        for handler in self._handlers:
            handler(event)

    async def observe(self) -> Observation:
        self.observed += 1
        return self.observation

    async def models(self) -> list[ModelInfo]:
        return []

    async def rx_filter(self, name: str) -> RxFilter | None:
        return None

    async def pass_fds(self, fds: Sequence[tuple[str, int]]) -> None:
        for name, _fd in fds:
            await self.execute("getfd", {"fdname": name})
