"""The controller: a fleet of guests, each kept connected, each serving requests in its own serial lane.

Each guest is a member of three parts that share a :class:`~qmpnet.serve.fleet_context.FleetContext` (the ports,
the settings, the guests-by-state counts), never the controller itself:

- its :class:`~qmpnet.serve.supervisor.Supervisor` (one task per guest, ``qmpnet[guest=vm1].supervisor``): the
  connection state, reconnects with capped backoff and jitter, the lane while connected, the reconcile loop and
  the periodic resync. All guests connect concurrently;
- its :class:`~qmpnet.serve.request_router.RequestRouter`: requests into the lane without waiting for a
  connection, de-duplicated and replayed by transaction;
- its :class:`~qmpnet.serve.desired_intake.DesiredIntake`: the one place a desired document waits (also for a guest
  not discovered yet), is checked, stored and converged to.

**State is derived from events, not re-read.** The retained NIC list
(:class:`~qmpnet.serve.published_nics.PublishedNics`) is kept from the lane's events (``nic_added``,
``link_changed``, ...) plus the full read at connect and on ``nic/list``, so publishing state costs no QMP round
trip. **Ports, not libraries.** The controller sees a :class:`StateSink` (the MQTT bus) and a :data:`Connector` (the
QMP adapter); tests pass in-memory fakes. It never imports ``aiomqtt`` or ``qemu.qmp``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qmpnet.adapters.store import MemoryGuestStore, canonical_address
from qmpnet.api.wire.envelopes import (
    API_VERSION,
    OPS,
    ControllerOnline,
    GuestList,
    Response,
    error_response,
    ok_response,
    parse_request,
    transaction_of,
)
from qmpnet.core.records import GuestRecord
from qmpnet.errors import GuestUnavailable, InvalidRequest, NotFound, QmpnetError
from qmpnet.serve.desired_intake import DesiredIntake
from qmpnet.serve.discovery import scans
from qmpnet.serve.fleet_context import Connector, FleetContext, NoObserver, Observer, StateSink, StoreOpener
from qmpnet.serve.request_router import RequestRouter
from qmpnet.serve.supervisor import Supervisor

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    from qmpnet.core.ports import GuestStore, HostNetwork
    from qmpnet.settings import Settings

__all__ = ["Connector", "Controller", "Observer", "StateSink", "StoreOpener"]

log = logging.getLogger(__name__)


async def _memory_store(name: str, address: str) -> GuestStore:
    return MemoryGuestStore(GuestRecord(address=address, name=name), key=name)


@dataclass
class _Member:
    """One guest of the fleet: how it was found, and its parts."""

    discovered: bool
    supervisor: Supervisor
    router: RequestRouter
    task: asyncio.Task[None]


class Controller:
    """The guests one host serves, and the answers to their requests.

    Args:
        settings: All settings (``controller`` for the fleet, ``mqtt.dedup_window``, and what the lanes need).
        sink: Where retained state and events go.
        connector: Opens a guest's QMP monitor: ``await connector(name, address)``.
        version: qmpnet's version, for the controller's status.
        observer: Metrics hooks.
        host: The host side (taps, NAT networks, VFIO) shared by every guest's lane; without it only backends
            that need nothing on the host (user, hubport, stream, dgram) can be added.
        open_store: Locks and loads a guest's record in the state store (default: records kept in memory, for
            tests).
    """

    def __init__(  # noqa: PLR0913 - three ports and the settings, then keyword-only extras
        self,
        settings: Settings,
        sink: StateSink,
        connector: Connector,
        *,
        version: str,
        observer: Observer | None = None,
        host: HostNetwork | None = None,
        open_store: StoreOpener | None = None,
    ) -> None:
        self.settings = settings
        self.sink = sink
        self.version = version
        self.observer: Observer = observer or NoObserver()
        self.fleet = FleetContext(settings=settings, sink=sink, connector=connector,
                                  open_store=open_store or _memory_store, observer=self.observer, host=host)
        self._members: dict[str, _Member] = {}
        self._intakes: dict[str, DesiredIntake] = {}  # by guest name, also for guests not discovered yet
        self._stopping = False
        self._tasks: asyncio.TaskGroup | None = None

    async def run(self) -> None:
        """Connect every configured guest, watch the guest directory, and serve until cancelled."""
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            for name, address in self.settings.controller.guests.items():
                self._add(name, address, discovered=False)
            self._publish_controller()
            guest_dir = self.settings.controller.guest_dir
            if guest_dir is not None:
                tasks.create_task(self._discover(guest_dir), name="qmpnet.discovery")
            await asyncio.get_running_loop().create_future()  # until cancelled

    async def drain(self, grace: float) -> None:
        """Stop taking requests (new ones: ``guest_unavailable``); let those in flight finish within ``grace`` s."""
        self._stopping = True
        guests = [m.supervisor.guest for m in self._members.values() if m.supervisor.guest is not None]
        idle = await asyncio.gather(*(guest.idle(grace) for guest in guests))
        if not all(idle):
            log.warning("stopping with operations still in flight after %g s: recovery will settle them", grace)

    def serves(self, address: str) -> str | None:
        """The name of the guest whose QMP socket is ``address``, if this controller serves it."""
        wanted = canonical_address(address)
        supervisors = (m.supervisor for m in self._members.values())
        return next((s.name for s in supervisors if canonical_address(s.address) == wanted), None)

    def set_desired(self, guest: str, payload: Mapping[str, Any] | InvalidRequest | None) -> None:
        """A desired document for ``guest`` arrived (``None``: it was cleared; an error: it could not be read)."""
        self._intake(guest).take(payload)  # a guest not discovered yet: its intake keeps it until it is

    async def handle(self, guest: str | None, op: str, payload: Mapping[str, Any]) -> Response:
        """Answer one request: ``guest`` is ``None`` for controller-level ops. Never raises but ``CancelledError``."""
        started = time.perf_counter()
        try:
            response = await self._dispatch(guest, op, payload)
        except Exception as err:  # a bug: answer 'internal' rather than leave the caller hanging
            log.exception("request %s for guest %s failed", op, guest, extra={"guest": guest})
            response = error_response(transaction_of(payload), QmpnetError(f"internal error: {type(err).__name__}"))
        outcome = "ok" if response.status == "ok" else response.error.code
        self.observer.request_done(op if op in OPS else "unknown", outcome, time.perf_counter() - started)
        log.debug(
            "guest %s: %s transaction=%s -> %s",
            guest,
            op,
            response.transaction,
            outcome,
            extra={"guest": guest, "transaction": response.transaction},
        )
        return response

    async def _dispatch(self, guest: str | None, op: str, payload: Mapping[str, Any]) -> Response:
        transaction = transaction_of(payload)
        if self._stopping and guest is not None:
            return error_response(transaction, GuestUnavailable(f"guest {guest}: the controller is stopping"))
        if guest is None:
            try:
                parse_request(op, "controller", payload)
            except QmpnetError as err:
                return error_response(transaction, err)
            infos = [member.supervisor.info() for _, member in sorted(self._members.items())]
            return ok_response(transaction, GuestList(guests=infos))
        member = self._members.get(guest)
        if member is None:
            return error_response(transaction, NotFound(f"guest: no guest {guest!r} on this controller", field="guest"))
        return await member.router.handle(op, payload)

    # ------------------------------------------------------------------------------------------ fleet plumbing

    def backoff(self, failures: int) -> float:
        """Seconds to wait after ``failures`` failed attempts: capped exponential, with jitter in [50 %, 100 %]."""
        return self.fleet.backoff(failures)

    def _publish_controller(self) -> None:
        self.sink.controller_status(
            ControllerOnline(state="online", version=self.version, api=API_VERSION, guests=sorted(self._members))
        )

    def _intake(self, name: str) -> DesiredIntake:
        intake = self._intakes.get(name)
        if intake is None:
            intake = self._intakes[name] = DesiredIntake(name)
        return intake

    def _add(self, name: str, address: str, *, discovered: bool) -> None:
        if self._tasks is None:
            raise RuntimeError("the controller is not running")
        supervisor = Supervisor(self.fleet, name, address, self._intake(name))
        self.fleet.counted(None, supervisor.state)
        task = self._tasks.create_task(supervisor.run(), name=f"qmpnet[guest={name}].supervisor")
        self._members[name] = _Member(discovered, supervisor, RequestRouter(supervisor), task)

    async def _remove(self, name: str) -> None:
        member = self._members.pop(name)
        await member.supervisor.socket_gone()
        self._intakes.pop(name, None)
        self.fleet.counted(member.supervisor.state, None)
        member.task.cancel()
        await asyncio.gather(member.task, return_exceptions=True)
        self.sink.guest_gone(name)
        log.info("guest %s: socket gone, no longer served", name, extra={"guest": name})

    async def _discover(self, directory: Path) -> None:
        """Poll ``directory`` for ``*.qmp`` sockets: new ones become guests, vanished ones are dropped."""
        async for found in scans(directory, self.settings.controller.discovery_interval):
            changed = False
            for name, address in found.items():
                if name not in self._members:
                    log.info("guest %s: discovered at %s", name, address, extra={"guest": name})
                    self._add(name, address, discovered=True)
                    changed = True
            for name in [n for n, m in self._members.items() if m.discovered and n not in found]:
                await self._remove(name)
                changed = True
            if changed:
                self._publish_controller()
