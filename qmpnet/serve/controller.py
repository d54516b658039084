"""The controller: a fleet of guests, each kept connected, each serving requests in its own serial lane.

Design decisions:

- **One supervisor task per guest** (``qmpnet[guest=vm1].supervisor``) owns the guest's QMP connection: it
  connects, builds a :class:`~qmpnet.guest.guest.Guest` on the monitor, publishes ``connected``, waits for the monitor
  to close, publishes ``disconnected`` and reconnects with capped exponential backoff and jitter. A QEMU restarted
  on the same socket path is simply the next successful attempt. All guests connect concurrently.
- **Requests never wait for a connection.** A request for a guest that is not connected is answered
  ``guest_unavailable`` at once; one for a connected guest goes straight into the guest's lane, with no ``await``
  before the lane is entered, so requests for one guest run in arrival order and different guests in parallel.
  The one exception is a guest's first connection attempt: requests the broker kept for the controller while it
  was down arrive right at start-up, and they wait (in arrival order, at most ``qmp.connect_timeout``) until
  that attempt has ended rather than all being refused.
- **De-duplication by transaction, per guest.** MQTT QoS 1 is at-least-once: a repeated ``transaction`` within
  the window is answered with the first answer (awaited if still running), never applied twice.
- **State is derived from events, not re-read.** The retained NIC list is kept from the lane's events
  (``nic_added``, ``link_changed``, ...) plus the full read at connect and on ``nic/list``, so publishing state
  costs no QMP round trip.
- **Ports, not libraries.** The controller sees a :class:`StateSink` (the MQTT bus) and a :data:`Connector`
  (the QMP adapter); tests pass in-memory fakes. It never imports ``aiomqtt`` or ``qemu.qmp``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from qmpnet.adapters.store import MemoryGuestStore, canonical_address
from qmpnet.api.wire.envelopes import (
    API_VERSION,
    OPS,
    ControllerOnline,
    DesiredError,
    DesiredStatus,
    ErrorResponse,
    EventMessage,
    GuestInfo,
    GuestList,
    GuestState,
    GuestStatus,
    ModelList,
    NicAddRequest,
    NicCaptureRequest,
    NicDelRequest,
    NicLinkRequest,
    NicList,
    NicListRequest,
    NicUpdateRequest,
    OkResponse,
    Response,
    error_response,
    ok_response,
    parse_request,
    transaction_of,
)
from qmpnet.api.wire.topics import is_bus_name
from qmpnet.core.backoff import backoff
from qmpnet.core.desired_diff import parse_desired
from qmpnet.core.names import BUS_NAME_RULE
from qmpnet.core.ports import Connection
from qmpnet.core.records import GuestRecord
from qmpnet.errors import Busy, GuestUnavailable, InvalidRequest, NotFound, OutcomeUnknown, QmpnetError
from qmpnet.guest.guest import Guest
from qmpnet.guest.lane import LaneBudget
from qmpnet.serve.reconcile_loop import Reconciler

if TYPE_CHECKING:
    from collections.abc import Mapping

    from pydantic import BaseModel

    from qmpnet.core.model import GuestEvent, Nic
    from qmpnet.core.ports import GuestStore, HostNetwork, QmpEvent
    from qmpnet.settings import Settings

__all__ = ["Connector", "Controller", "Observer", "StateSink", "StoreOpener"]

log = logging.getLogger(__name__)


#: ``await connector(name, address)`` opens the QMP monitor at ``address``, or raises ``GuestUnavailable``.
Connector: TypeAlias = Callable[[str, str], Awaitable[Connection]]
#: ``await open_store(name, address)`` locks and loads the guest's record, or raises ``Busy``/``InvalidRequest``.
StoreOpener: TypeAlias = Callable[[str, str], Awaitable["GuestStore"]]


async def _memory_store(name: str, address: str) -> GuestStore:
    return MemoryGuestStore(GuestRecord(address=address, name=name), key=name)


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


class _NoObserver:
    def request_done(self, op: str, outcome: str, seconds: float) -> None:
        pass

    def guests_changed(self, states: Mapping[str, int]) -> None:
        pass


class _Dedup:
    """First answers by transaction id, kept ``window`` seconds after their request arrived."""

    def __init__(self, window: float) -> None:
        self._window = window
        self._answers: OrderedDict[str, tuple[float, asyncio.Future[Response]]] = OrderedDict()

    def get(self, transaction: str) -> asyncio.Future[Response] | None:
        now = time.monotonic()
        while self._answers:
            arrived, answer = next(iter(self._answers.values()))
            if now - arrived <= self._window or not answer.done():
                break
            self._answers.popitem(last=False)
        entry = self._answers.get(transaction)
        if entry is None or entry[1].cancelled():  # the first request was cancelled (shutdown): nothing to repeat
            return None
        return entry[1]

    def remember(self, transaction: str) -> asyncio.Future[Response]:
        answer: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._answers[transaction] = (time.monotonic(), answer)
        return answer


class _Turn:
    """One of the controller's turns for reading a guest (``controller.first_reads``), given back once.

    Given back when the read ends or after ``hold`` seconds, whichever comes first, so that a QEMU that hangs
    does not keep the rest of the fleet waiting.
    """

    def __init__(self, turns: asyncio.Semaphore, hold: float) -> None:
        self._turns = turns
        self._timer = asyncio.get_running_loop().call_later(hold, self.release)
        self._held = True

    @classmethod
    async def take(cls, turns: asyncio.Semaphore, hold: float) -> _Turn:
        await turns.acquire()
        return cls(turns, hold)

    def release(self) -> None:
        if self._held:
            self._held = False
            self._timer.cancel()
            self._turns.release()


class _Member:
    """One guest of the fleet: its address, connection state, lane (a ``Guest`` while connected) and NICs."""

    def __init__(self, controller: Controller, name: str, address: str, *, discovered: bool) -> None:
        self.controller = controller
        self.name = name
        self.address = address
        self.discovered = discovered
        self.state: GuestState = "connecting"
        self.since = time.time()
        self.qemu: str | None = None
        self.machine: str | None = None
        self.guest: Guest | None = None
        self.problem = "not connected yet"
        self.nics: dict[str, Nic] = {}
        self.dedup = _Dedup(controller.settings.mqtt.dedup_window)
        self.store: GuestStore | None = None
        self.agent = controller.settings.controller.agents.get(name) or _agent_beside(address)
        self.reconciler: Reconciler | None = None
        self.early_desired: tuple[Mapping[str, Any] | InvalidRequest | None] | None = None
        self.desired_status: DesiredStatus | None = None
        self.task: asyncio.Task[None] | None = None
        self.settled = asyncio.Event()  # the first connection attempt has ended, one way or the other

    @property
    def log_extra(self) -> dict[str, str]:
        return {"guest": self.name}

    def status(self) -> GuestStatus:
        return GuestStatus(
            state=self.state, qemu=self.qemu, machine=self.machine, since=self.since, desired=self.desired_status
        )

    def info(self) -> GuestInfo:
        return GuestInfo(name=self.name, **self.status().model_dump())

    async def supervise(self) -> None:
        """Keep the guest connected until cancelled."""
        self.controller.publish_guest(self)
        failures = 0  # attempts since the guest was last connected
        try:
            while True:
                try:
                    if self.store is None:
                        self.store = await self.controller.open_store(self.name, self.address)
                        if self.early_desired is not None:
                            self.set_desired(self.early_desired[0])
                            self.early_desired = None
                    connection = await self.controller.connector(self.name, self.address)
                except (GuestUnavailable, Busy, InvalidRequest) as err:
                    if failures == 0:
                        log.info("guest %s: cannot connect: %s", self.name, err, extra=self.log_extra)
                    self.problem = err.message
                    self.set_state("disconnected")
                else:
                    try:
                        await self._serve(connection, self.store)
                    except Exception:
                        log.exception("guest %s: connection failed", self.name, extra=self.log_extra)
                    finally:
                        self.guest = None
                        await connection.close()
                    if self.state == "connected":
                        failures = 0
                        self.problem = "QEMU closed the QMP connection"
                        self.set_state("disconnected")
                        self.controller.emit(self, "guest_disconnected")
                await asyncio.sleep(self.controller.backoff(failures))
                failures += 1
        finally:
            if self.store is not None:
                self.store.close()
                self.store = None

    async def _serve(self, connection: Connection, store: GuestStore) -> None:
        controller = self.controller
        guest = Guest(connection, name=self.name, settings=controller.settings, host=controller.host, store=store,
                      qga=self.agent, lanes=controller.lanes)
        guest.subscribe(self._on_event)
        connection.on_event(self._on_qmp_event)
        # The first read of a guest (recovery, the NIC list) takes one of a few turns: a fleet that connects at once
        # is read a few guests at a time, not thousands, so the replies in flight (and the memory they leave
        # behind) stay few. A read that takes longer than qmp.connect_timeout gives its turn back and goes on.
        turn = await _Turn.take(controller.first_reads, controller.settings.qmp.connect_timeout)
        try:
            # Entering the guest recovers it from its record, inside its lane, before any request is served.
            async with guest:
                self.machine = (await connection.machine())[0]
                self.qemu = connection.greeting_version
                nics = await guest.list_nics()
                turn.release()
                self.set_nics(nics)
                self.guest = guest
                self.set_state("connected")
                log.info("guest %s: connected (QEMU %s, %s)", self.name, self.qemu, self.machine,
                         extra=self.log_extra)
                self.controller.emit(self, "guest_connected")
                self.reconciler = Reconciler(
                    self.name, guest, desired=lambda: store.record.desired, settings=controller.settings.reconcile,
                    publish=self._desired_changed, event=self._reconcile_event,
                )
                reconciling = asyncio.create_task(self.reconciler.run(), name=f"qmpnet[guest={self.name}].reconcile")
                self.reconciler.poke()  # a QEMU restarted on the same socket gets its desired NICs back
                try:
                    await self._watch(connection, guest)
                finally:
                    self.reconciler = None
                    reconciling.cancel()
                    await asyncio.gather(reconciling, return_exceptions=True)
                log.info("guest %s: disconnected", self.name, extra=self.log_extra)
        except QmpnetError as err:
            log.info("guest %s: lost while reading it: %s", self.name, err, extra=self.log_extra)
        finally:
            turn.release()

    async def _watch(self, connection: Connection, guest: Guest) -> None:
        """Until the connection closes, re-read the guest every ``reconcile.resync_interval`` seconds."""
        interval = self.controller.settings.reconcile.resync_interval
        while not connection.closed.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await connection.closed.wait()
            if connection.closed.is_set():
                return
            try:
                self.resynced(await guest.resync())
            except (Busy, OutcomeUnknown) as err:
                log.info("guest %s: resync skipped: %s", self.name, err, extra=self.log_extra)
            if self.reconciler is not None:
                self.reconciler.poke()

    def resynced(self, nics: list[Nic]) -> None:
        """Publish what a re-read found changed behind the lane's back (another QMP client), with events."""
        now = {nic.id: nic for nic in nics}
        added = [nic for nic_id, nic in now.items() if nic_id not in self.nics]
        removed = [nic_id for nic_id in self.nics if nic_id not in now]
        if not added and not removed:
            return
        self.nics = {nic.id: nic.model_copy(update={"rx_filter": None}) for nic in nics}
        self.controller.sink.guest_nics(self.name, NicList(nics=list(self.nics.values())))
        for nic in added:
            message = EventMessage(ts=time.time(), guest=self.name, id=nic.id, nic=nic)
            self.controller.sink.event(self.name, "nic_added", message)
        for nic_id in removed:
            message = EventMessage(ts=time.time(), guest=self.name, id=nic_id)
            self.controller.sink.event(self.name, "nic_removed", message)

    def set_state(self, state: GuestState) -> None:
        if state != self.state:
            self.controller.counted(self.state, state)
            self.state = state
            self.since = time.time()
            self.controller.publish_guest(self)
        if state != "connecting":
            self.settled.set()

    def set_desired(self, payload: Mapping[str, Any] | InvalidRequest | None) -> None:
        """Take a desired document (``None``: clear the set; an error: unreadable), store it and converge to it."""
        if self.store is None:
            self.early_desired = (payload,)  # taken once the store is open
            return
        record = self.store.record
        if payload is None:
            self.store.save(record.model_copy(update={"desired": None}))
            self._desired_changed(None)
            return
        try:
            if isinstance(payload, InvalidRequest):
                raise payload
            desired = parse_desired(payload, source="mqtt")
        except InvalidRequest as err:
            log.warning("guest %s: desired document refused: %s", self.name, err, extra=self.log_extra)
            generation = record.desired.generation if record.desired is not None else 0
            refused = DesiredError(id=None, code=err.code, message=err.message, field=err.field)
            self._desired_changed(DesiredStatus(generation=generation, converged=False, errors=[refused]))
            return
        current = record.desired
        if current is not None and current.source == "mqtt" and desired.generation < current.generation:
            log.info("guest %s: desired generation %d is older than %d: ignored", self.name, desired.generation,
                     current.generation, extra=self.log_extra)
            return
        news = current is None or current.generation != desired.generation or current.source != "mqtt"
        if news:
            self.store.save(record.model_copy(update={"desired": desired}))
        if self.reconciler is not None:
            self.reconciler.poke(explicit=news)

    def _desired_changed(self, status: DesiredStatus | None) -> None:
        if status != self.desired_status:
            self.desired_status = status
            self.controller.publish_guest(self)

    def _reconcile_event(self, name: str, message: EventMessage) -> None:
        self.controller.sink.event(self.name, name, message)

    def set_nics(self, nics: list[Nic]) -> None:
        self.nics = {nic.id: nic for nic in nics}
        self.controller.sink.guest_nics(self.name, NicList(nics=nics))

    def _on_event(self, event: GuestEvent) -> None:
        if event.nic is not None:
            self.nics[event.nic.id] = event.nic.model_copy(update={"rx_filter": None})
        elif event.name == "nic_removed" and event.id is not None:
            self.nics.pop(event.id, None)
        elif event.name == "nic_removal_pending" and event.id in self.nics:
            self.nics[event.id] = self.nics[event.id].model_copy(update={"state": "removal_pending"})
        if event.name in ("nic_added", "nic_removed", "nic_removal_pending", "link_changed", "nic_updated"):
            self.controller.sink.guest_nics(self.name, NicList(nics=list(self.nics.values())))
        message = EventMessage(ts=event.ts, guest=self.name, id=event.id, nic=event.nic)
        self.controller.sink.event(self.name, event.name, message)
        if event.name == "nic_removed" and self.reconciler is not None:
            self.reconciler.poke()  # a desired NIC may have vanished behind qmpnet's back

    def _on_qmp_event(self, event: QmpEvent) -> None:
        if event.name == "NIC_RX_FILTER_CHANGED":
            nic_id = event.data.get("name")
            message = EventMessage(ts=event.timestamp, guest=self.name, id=nic_id if isinstance(nic_id, str) else None)
            self.controller.sink.event(self.name, "rx_filter_changed", message)

    async def handle(self, op: str, payload: Mapping[str, Any]) -> Response:
        """Answer one request for this guest (de-duplicated by transaction)."""
        if not self.settled.is_set():  # see "Requests never wait for a connection" above
            with contextlib.suppress(TimeoutError):  # before the record is read: it needs the guest connected
                async with asyncio.timeout(self.controller.settings.qmp.connect_timeout):
                    await self.settled.wait()
        transaction = transaction_of(payload)
        if transaction is None:
            return await self._answer(op, payload, transaction)
        first = self.dedup.get(transaction)
        if first is not None:
            log.info(
                "guest %s: transaction %s repeated: first answer again",
                self.name,
                transaction,
                extra={"guest": self.name, "transaction": transaction},
            )
            return await asyncio.shield(first)
        recorded = self._recorded(transaction)
        if recorded is not None:
            log.info("guest %s: transaction %s was run before: its recorded outcome again", self.name, transaction,
                     extra={"guest": self.name, "transaction": transaction})
            return recorded
        answer = self.dedup.remember(transaction)
        try:
            response = await self._answer(op, payload, transaction)
        except BaseException:
            answer.cancel()
            raise
        answer.set_result(response)
        return response

    def _recorded(self, transaction: str) -> Response | None:
        """The answer to a transaction the guest's record says was run (by this process or one before it)."""
        guest = self.guest
        operation = guest.operation(transaction) if guest is not None else None
        if operation is None:
            return None
        if operation.outcome is None:
            return error_response(transaction, OutcomeUnknown(
                f"transaction {transaction} was interrupted (qmpnet stopped while it ran); the guest was recovered "
                "since: list the NICs to see its state"
            ))
        if operation.outcome.get("status") == "ok":
            return OkResponse[Any](transaction=transaction, status="ok", data=operation.outcome.get("data"))
        return ErrorResponse.model_validate({"transaction": transaction, **operation.outcome})

    async def _answer(self, op: str, payload: Mapping[str, Any], transaction: str | None) -> Response:
        try:
            request = parse_request(op, "guest", payload)
            guest = self.guest
            if guest is None:
                raise GuestUnavailable(f"guest {self.name} is {self.state}: {self.problem}")
            data = await self._run(guest, request, transaction)
        except QmpnetError as err:
            return error_response(transaction, err)
        return ok_response(transaction, data)

    async def _run(  # noqa: PLR0911 - one return per op
        self, guest: Guest, request: BaseModel, transaction: str | None
    ) -> BaseModel:
        match request:
            case NicAddRequest(nic=spec, verify=verify):
                return await guest.add_nic(spec, operation=transaction, verify=verify)
            case NicDelRequest(id=nic_id, timeout=timeout, verify=verify):
                return await guest.remove_nic(nic_id, timeout=timeout, operation=transaction, verify=verify)
            case NicLinkRequest(id=nic_id, up=up, verify=verify):
                return await guest.set_link(nic_id, up=up, operation=transaction, verify=verify)
            case NicUpdateRequest(update=update):
                return await guest.update_nic(update, operation=transaction)
            case NicCaptureRequest(id=nic_id, action=action, file=file):
                return await guest.capture(nic_id, action, file)
            case NicListRequest():
                nics = await guest.list_nics()
                self.set_nics(nics)
                return NicList(nics=nics)
            case _:
                return ModelList(models=await guest.models())


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
        self.connector = connector
        self.version = version
        self.observer: Observer = observer or _NoObserver()
        self.host = host
        self.open_store: StoreOpener = open_store or _memory_store
        self._members: dict[str, _Member] = {}
        self.first_reads = asyncio.Semaphore(settings.controller.first_reads)
        self.lanes = LaneBudget()  # the lanes of this controller's guests at work (where their writes happen)
        self._states: dict[str, int] = dict.fromkeys(("connecting", "connected", "disconnected"), 0)
        self._early_desired: dict[str, Mapping[str, Any] | InvalidRequest | None] = {}
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
        guests = [member.guest for member in self._members.values() if member.guest is not None]
        idle = await asyncio.gather(*(guest.idle(grace) for guest in guests))
        if not all(idle):
            log.warning("stopping with operations still in flight after %g s: recovery will settle them", grace)

    def serves(self, address: str) -> str | None:
        """The name of the guest whose QMP socket is ``address``, if this controller serves it."""
        wanted = canonical_address(address)
        return next((m.name for m in self._members.values() if canonical_address(m.address) == wanted), None)

    def set_desired(self, guest: str, payload: Mapping[str, Any] | InvalidRequest | None) -> None:
        """A desired document for ``guest`` arrived (``None``: it was cleared; an error: it could not be read)."""
        member = self._members.get(guest)
        if member is None:
            self._early_desired[guest] = payload  # a guest not discovered yet: taken when it is
            return
        member.set_desired(payload)

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
            infos = [member.info() for _, member in sorted(self._members.items())]
            return ok_response(transaction, GuestList(guests=infos))
        member = self._members.get(guest)
        if member is None:
            return error_response(transaction, NotFound(f"guest: no guest {guest!r} on this controller", field="guest"))
        return await member.handle(op, payload)

    # ------------------------------------------------------------------------------------------ fleet plumbing

    def backoff(self, failures: int) -> float:
        """Seconds to wait after ``failures`` failed attempts: capped exponential, with jitter in [50 %, 100 %]."""
        fleet = self.settings.controller
        return backoff(fleet.backoff_min, fleet.backoff_max, failures)

    def emit(self, member: _Member, name: str) -> None:
        """Publish a guest-level event (``guest_connected``, ``guest_disconnected``)."""
        self.sink.event(member.name, name, EventMessage(ts=time.time(), guest=member.name))

    def publish_guest(self, member: _Member) -> None:
        """Publish ``member``'s connection state and update the guests-by-state metric."""
        self.sink.guest_status(member.name, member.status())
        self.observer.guests_changed(dict(self._states))

    def counted(self, old: GuestState | None, new: GuestState | None) -> None:
        """Keep the guests-by-state counts (kept, not recounted: a fleet of 5,000 changes state 10,000 times)."""
        if old is not None:
            self._states[old] -= 1
        if new is not None:
            self._states[new] += 1

    def _publish_controller(self) -> None:
        self.sink.controller_status(
            ControllerOnline(state="online", version=self.version, api=API_VERSION, guests=sorted(self._members))
        )

    def _add(self, name: str, address: str, *, discovered: bool) -> None:
        if self._tasks is None:
            raise RuntimeError("the controller is not running")
        member = _Member(self, name, address, discovered=discovered)
        self.counted(None, member.state)
        if name in self._early_desired:
            member.set_desired(self._early_desired.pop(name))
        self._members[name] = member
        member.task = self._tasks.create_task(member.supervise(), name=f"qmpnet[guest={name}].supervisor")

    async def _remove(self, name: str) -> None:
        member = self._members.pop(name)
        self.counted(member.state, None)
        if member.task is not None:
            member.task.cancel()
            await asyncio.gather(member.task, return_exceptions=True)
        self.sink.guest_gone(name)
        log.info("guest %s: socket gone, no longer served", name, extra={"guest": name})

    async def _discover(self, directory: Path) -> None:
        """Poll ``directory`` for ``*.qmp`` sockets: new ones become guests, vanished ones are dropped."""
        unfit: set[str] = set()
        seen: tuple[float, float] | None = None  # (the directory's mtime, when the scan that saw it started)
        while True:
            stamp, started = await asyncio.to_thread(_mtime, directory), time.time()
            if stamp is not None and seen is not None and stamp == seen[0] and seen[1] - stamp > _MTIME_SLACK:
                # Unchanged since a scan that began well after its last change: nothing came or went (a fleet of
                # thousands is not re-listed every second).
                await asyncio.sleep(self.settings.controller.discovery_interval)
                continue
            seen = (stamp, started) if stamp is not None else None
            found, skipped = await asyncio.to_thread(_scan, directory)
            for path in skipped - unfit:
                log.warning("ignoring %s: its name is not a valid guest name (%s)", path, BUS_NAME_RULE)
            unfit = skipped
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
            await asyncio.sleep(self.settings.controller.discovery_interval)


#: Seconds a directory's mtime must lie before a scan for that scan to be trusted to have seen every change
#: (file timestamps are coarse: a socket made just after the listing can carry the same mtime).
_MTIME_SLACK = 1.0


def _mtime(directory: Path) -> float | None:
    try:
        return directory.stat().st_mtime
    except OSError:
        return None


def _agent_beside(address: str) -> str | None:
    """``NAME.qga`` beside a guest's ``NAME.qmp`` socket, if it is a socket: the guest agent's, by convention."""
    if not address.endswith(".qmp"):
        return None
    candidate = Path(address).with_suffix(".qga")
    return str(candidate) if candidate.is_socket() else None


def _scan(directory: Path) -> tuple[dict[str, str], set[str]]:
    """The ``*.qmp`` sockets in ``directory`` by stem, and the paths skipped because their names cannot be topics."""
    found: dict[str, str] = {}
    skipped: set[str] = set()
    try:
        paths = sorted(directory.glob("*.qmp"))
    except OSError as err:
        log.warning("cannot read the guest directory %s: %s", directory, err)
        return found, skipped
    for path in paths:
        if not path.is_socket():
            continue
        if is_bus_name(path.stem):
            found[path.stem] = str(path)
        else:
            skipped.add(str(path))
    return found, skipped
