"""A controller's surroundings in memory: fake QMP connections per guest, a recording state sink, fast settings.

Shared by the controller's tests (tests/unit/serve/test_controller.py) and the bus's (tests/unit/adapters/mqtt/
test_bus.py), which run a real :class:`~qmpnet.serve.controller.Controller` on them (no broker, no QEMU).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from fakemonitor import RecordingMonitor

from qmpnet.errors import GuestUnavailable
from qmpnet.settings import ControllerSettings, MqttSettings, QmpSettings, Settings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from qmpnet.api.wire.envelopes import ControllerOnline, EventMessage, GuestStatus, NicList
    from qmpnet.serve.controller import Controller

__all__ = ["FakeConnection", "Fleet", "Sink", "running", "settings"]


class FakeConnection(RecordingMonitor):
    """A recording monitor with what the controller needs of a connection."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = asyncio.Event()
        self.greeting_version: str | None = "7.2.22"

    async def machine(self) -> tuple[str, str]:
        return "pc-i440fx-7.2", "pc"

    async def close(self) -> None:
        self.closed.set()


class Sink:
    """Records what the controller publishes."""

    def __init__(self) -> None:
        self.controller: list[ControllerOnline] = []
        self.status: list[tuple[str, GuestStatus]] = []
        self.nics: list[tuple[str, NicList]] = []
        self.events: list[tuple[str, str, EventMessage]] = []
        self.gone: list[str] = []
        self.changed = asyncio.Event()

    def controller_status(self, status: ControllerOnline) -> None:
        self.controller.append(status)
        self.changed.set()

    def guest_status(self, guest: str, status: GuestStatus) -> None:
        self.status.append((guest, status))
        self.changed.set()

    def guest_nics(self, guest: str, nics: NicList) -> None:
        self.nics.append((guest, nics))
        self.changed.set()

    def guest_gone(self, guest: str) -> None:
        self.gone.append(guest)
        self.changed.set()

    def event(self, guest: str, name: str, event: EventMessage) -> None:
        self.events.append((guest, name, event))
        self.changed.set()

    def states(self, guest: str) -> list[str]:
        return [status.state for name, status in self.status if name == guest]

    def event_names(self, guest: str) -> list[str]:
        return [name for g, name, _ in self.events if g == guest]

    async def until(self, check: Callable[[], bool], timeout: float = 2.0) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                self.changed.clear()
                await self.changed.wait()


class Fleet:
    """Fake connections per guest; ``refuse`` makes the next connects fail."""

    def __init__(self) -> None:
        self.connections: dict[str, list[FakeConnection]] = {}
        self.refuse: set[str] = set()
        self.attempts: dict[str, int] = {}
        self.gate: asyncio.Event | None = None  # when set, connects wait for it

    async def connect(self, name: str, address: str) -> FakeConnection:
        self.attempts[name] = self.attempts.get(name, 0) + 1
        if self.gate is not None:
            await self.gate.wait()
        if name in self.refuse:
            raise GuestUnavailable(f"cannot connect to QMP monitor {address}: refused")
        connection = FakeConnection()
        self.connections.setdefault(name, []).append(connection)
        return connection

    def current(self, name: str) -> FakeConnection:
        return self.connections[name][-1]


def settings(guests: dict[str, str] | None = None, **fleet: Any) -> Settings:
    return Settings(
        qmp=QmpSettings(connect_timeout=1, command_timeout=1, unplug_timeout=0.05),
        mqtt=MqttSettings(controller_id="t1", dedup_window=60),
        controller=ControllerSettings(
            guests={"vm1": "/x/vm1.qmp"} if guests is None else guests, backoff_min=0.01, backoff_max=0.05, **fleet
        ),
    )


@contextlib.asynccontextmanager
async def running(controller: Controller) -> AsyncIterator[Controller]:
    task = asyncio.create_task(controller.run())
    try:
        yield controller
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

