"""What each guest's supervisor, request router and desired intake share of the fleet: the ports and the counts.

The controller builds one :class:`FleetContext` and hands it to every guest's parts, instead of each part
reaching back into the controller. The ports are protocols: the MQTT bus is a :class:`StateSink`, the QMP adapter a
:data:`Connector`, the state store a :data:`StoreOpener`; tests pass in-memory fakes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeAlias

from qmpnet.api.wire.envelopes import EventMessage
from qmpnet.core.backoff import backoff
from qmpnet.core.ports import Connection

if TYPE_CHECKING:
    from collections.abc import Mapping

    from qmpnet.api.wire.envelopes import ControllerOnline, GuestState, GuestStatus, NicList
    from qmpnet.core.ports import GuestStore, HostNetwork
    from qmpnet.settings import Settings

__all__ = ["Connector", "FleetContext", "NoObserver", "Observer", "StateSink", "StoreOpener"]

#: ``await connector(name, address)`` opens the QMP monitor at ``address``, or raises ``GuestUnavailable``.
Connector: TypeAlias = Callable[[str, str], Awaitable[Connection]]
#: ``await open_store(name, address)`` locks and loads the guest's record, or raises ``Busy``/``StoreUnavailable``.
StoreOpener: TypeAlias = Callable[[str, str], Awaitable["GuestStore"]]
#: The connection states the guests-by-state metric counts.
_STATES = ("connecting", "connected", "disconnected")


class StateSink(Protocol):
    """Where retained state and events go (the MQTT bus). Calls return at once; delivery is the sink's job."""

    def controller_status(self, status: ControllerOnline) -> None:
        """The controller's availability and guest names changed."""

    def guest_status(self, guest: str, status: GuestStatus) -> None:
        """A guest's connection state changed."""

    def guest_nics(self, guest: str, nics: NicList) -> None:
        """A guest's NIC list changed."""

    def guest_gone(self, guest: str) -> None:
        """A guest is no longer served: forget its retained state."""

    def event(self, guest: str, name: str, event: EventMessage) -> None:
        """Something happened to a guest."""


class Observer(Protocol):
    """Metrics hooks."""

    def request_done(self, op: str, outcome: str, seconds: float) -> None:
        """A request finished: ``outcome`` is ``ok`` or the error code."""

    def guests_changed(self, states: Mapping[str, int]) -> None:
        """The number of guests in each state."""


class NoObserver:
    """Metrics hooks that record nothing."""

    def request_done(self, op: str, outcome: str, seconds: float) -> None:
        """Nothing to record."""

    def guests_changed(self, states: Mapping[str, int]) -> None:
        """Nothing to record."""


@dataclass(kw_only=True, eq=False)
class FleetContext:
    """The ports, the settings and the guests-by-state counts, shared by every guest's parts.

    Attributes:
        settings: All settings.
        sink: Where retained state and events go.
        connector: Opens a guest's QMP monitor.
        open_store: Locks and loads a guest's record.
        observer: Metrics hooks.
        host: The host side shared by every guest's lane (``None``: backends that need nothing on the host).
        first_reads: Turns for reading a guest the first time (``controller.first_reads``), see the supervisor.
    """

    settings: Settings
    sink: StateSink
    connector: Connector
    open_store: StoreOpener
    observer: Observer
    host: HostNetwork | None
    first_reads: asyncio.Semaphore = field(init=False)
    _states: dict[str, int] = field(init=False, default_factory=lambda: dict.fromkeys(_STATES, 0))

    def __post_init__(self) -> None:
        self.first_reads = asyncio.Semaphore(self.settings.controller.first_reads)

    def backoff(self, failures: int) -> float:
        """Seconds to wait after ``failures`` failed attempts: capped exponential, with jitter in [50 %, 100 %]."""
        fleet = self.settings.controller
        return backoff(fleet.backoff_min, fleet.backoff_max, failures)

    def emit(self, guest: str, name: str) -> None:
        """Publish a guest-level event (``guest_connected``, ``guest_disconnected``)."""
        self.sink.event(guest, name, EventMessage(ts=time.time(), guest=guest))

    def publish_status(self, guest: str, status: GuestStatus) -> None:
        """Publish a guest's status (the guests-by-state metric follows each state change: :meth:`counted`)."""
        self.sink.guest_status(guest, status)

    def counted(self, old: GuestState | None, new: GuestState | None) -> None:
        """Keep the guests-by-state counts, and their metric at once.

        Kept, not recounted: a fleet of 5,000 changes state 10,000 times. A status published for its capacity alone
        (each hot-add) changes no count, so the metric is not set again then.
        """
        if old is not None:
            self._states[old] -= 1
        if new is not None:
            self._states[new] += 1
        self.observer.guests_changed(dict(self._states))
