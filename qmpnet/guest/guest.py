"""One guest: the facade that validates a call, takes the guest's lane, hands the work to one unit, and tells.

``Guest`` is what ``qmpnet.connect`` yields and what ``qmpnet serve`` holds per guest. Each public call checks its
input and the policy first (nothing is sent for a bad call), then runs in the guest's lane (:mod:`.lane`: serial per
guest, parallel across guests, bounded waiting), delegates to the unit whose one job it is, and emits the event.
A change, once started, runs to its end (or its rollback) even if the caller goes away.

The units, each in its own module:

* :mod:`.journal`: the guest's record in the state store, the one place it is read and written;
* :mod:`.nic_table`: the per-NIC state, in one object: the record's part, the last read of QEMU, the unplugs and
  waiters in flight (and :attr:`Guest.nics`, a snapshot of it);
* :mod:`.recoverer`: reading the guest and carrying out recovery on every read;
* :mod:`.hotadd`, :mod:`.unplugs`, :mod:`.live_changes`: adding, removing, and changing NICs live (link, update);
* :mod:`.verification`: asking the guest agent whether a change arrived, and undoing it if not;
* :mod:`.late_events`: settling ``DEVICE_DELETED`` events no call waits for;
* :mod:`.stuck_watch`: telling, once, of an unplug the guest leaves unanswered for ``unplug.stuck_after``;
* :mod:`.capture`, :mod:`.events`: live capture; the subscribers.

**What is remembered, and where.** QEMU is the truth for what exists; the guest's record (:mod:`.journal`) holds
what QEMU cannot tell: every change is written there *before* its first QMP command, and its outcome follows the
answer (written behind it as the lane lets go), so a process killed between any two commands leaves a record the
next one resolves (an operation left without outcome is answered from what recovery finds): on entering the
context (before any call is served), whenever the lane re-reads the guest, and on :meth:`Guest.resync`. In memory
alone is only what a restart does not need: the lane's cached read of QEMU (re-read whenever it may be stale), the
unplugs the lane waits for right now and the waiters of pending removals (:mod:`.nic_table`), the QEMU instance's
id and the agent's socket (found again on entry), the lane's admission counts, the settling tasks and the
subscribers.

A NIC moves through ``adding -> active -> removal_pending -> removed``; removal is QEMU's two-phase unplug
(:mod:`.unplugs`), and a hot-add is atomic, re-planned once if QEMU refuses the plan (:mod:`.hotadd`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar

from qmpnet.adapters.store import MemoryGuestStore
from qmpnet.core.model import RemoveResult, parse_nic_spec, parse_nic_update
from qmpnet.core.names import check_qemu_id
from qmpnet.core.placement import capacity
from qmpnet.core.policy import check_spec, check_update
from qmpnet.core.records import GuestRecord
from qmpnet.errors import InvalidRequest, NotFound, RemovalPending, Unsupported
from qmpnet.guest.capture import check_capture, run_capture
from qmpnet.guest.events import GuestEvents
from qmpnet.guest.hotadd import HotAdd
from qmpnet.guest.journal import Journal, new_operation
from qmpnet.guest.lane import Lane
from qmpnet.guest.late_events import LateEvents
from qmpnet.guest.live_changes import LiveChanges
from qmpnet.guest.nic_table import NicTable
from qmpnet.guest.parts import LaneParts
from qmpnet.guest.recoverer import INSTANCE_OBJECT, Recoverer
from qmpnet.guest.unplugs import Unplugs
from qmpnet.guest.verification import Verifier
from qmpnet.settings import Settings

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping
    from os import PathLike

    from qmpnet.core.inventory import Inventory
    from qmpnet.core.model import Capacity, CaptureResult, GuestEvent, ModelInfo, Nic, NicSpec, NicUpdate, Verify
    from qmpnet.core.ports import GuestStore, HostNetwork, Monitor
    from qmpnet.core.records import OperationRecord

__all__ = ["INSTANCE_OBJECT", "Guest"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class Guest:
    """The network of one running QEMU guest, changed through its QMP monitor.

    Use as an async context manager (``qmpnet.connect`` does this for you). Entering it recovers the guest from
    its record (see the module docstring) before any call is served; the context owns the background tasks that
    finish late unplugs. A ``Guest`` is not re-entrant and cannot be entered twice.

    Args:
        monitor: The guest's connected monitor.
        name: The guest's name, for logs and events.
        settings: Timeouts, lane limits and the caller policy.
        host: The host side for bridge, NAT, tap and VFIO backends (``None``: those backends are unsupported).
        store: The guest's record in the state store (default: kept in memory only, for tests and tools).
        qga: The guest agent's socket; when absent it is looked for on entry (``query-chardev`` and the
            virtserialport named ``org.qemu.guest_agent.0``). It gives ``list_nics`` the guest's own view and
            makes ``verify`` possible.
    """

    def __init__(  # noqa: PLR0913 - the lane's collaborators, keyword-only
        self,
        monitor: Monitor,
        *,
        name: str = "guest",
        settings: Settings | None = None,
        host: HostNetwork | None = None,
        store: GuestStore | None = None,
        qga: str | PathLike[str] | None = None,
    ) -> None:
        self.name = name
        self._monitor = monitor
        self._settings = settings = settings or Settings()
        store = store or MemoryGuestStore(GuestRecord(address=name, name=name), key=name)
        self._journal = journal = Journal(store, keep=settings.lane.operation_window)
        self._lane = Lane(name, settings.lane, let_go=journal.flush_soon)
        self._nics = nics = NicTable(journal)
        self._events = events = GuestEvents(name)
        parts = LaneParts(name=name, monitor=monitor, host=host, journal=journal, nics=nics, events=events,
                          settings=settings)
        self._unplugs = unplugs = Unplugs(parts)
        self._reader = reader = Recoverer(parts, unplugs=unplugs)
        self._hotadd = HotAdd(parts, reader=reader, unplugs=unplugs)
        self._live = LiveChanges(parts)
        self._verifier = Verifier(parts, socket=Path(qga) if qga is not None else None, unplugs=unplugs)
        self._late = LateEvents(parts, lane=self._lane, reader=reader, serving=lambda: self._state == "open")
        self._state: Literal["new", "open", "closed"] = "new"
        monitor.on_event(self._late.on_event)

    async def __aenter__(self) -> Self:
        """Recover the guest from its record (see :meth:`recover`).

        Raises:
            RuntimeError: The guest was entered before.
            GuestUnavailable, OutcomeUnknown, QmpCommandError: Reading or repairing the guest failed.
        """
        if self._state != "new":
            raise RuntimeError(f"guest {self.name}: a Guest can be entered only once")
        self._state = "open"
        try:
            await self.recover()
        except Unsupported as err:
            # A guest qmpnet cannot hot-plug into (no PCI root bus) is still served: each call says why.
            log.warning("guest %s: %s", self.name, err)
        except BaseException:
            self._state = "closed"
            raise
        self._unplugs.stuck.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Let background work (late unplugs being finished) end within ``lane.stop_grace``, then cancel it."""
        self._state = "closed"
        await self._unplugs.stuck.stop()
        await self._late.stop(self._settings.lane.stop_grace)

    # ----------------------------------------------------------------------------------------------- public API

    @property
    def record(self) -> GuestRecord:
        """What the state store holds for this guest."""
        return self._journal.record

    @property
    def nics(self) -> tuple[Nic, ...]:
        """The NICs as the lane last saw them, completed with the record; reads nothing (empty before entry).

        Every call and event of this lane keeps it current (a hot-add, a removal, a link change, a read of the
        guest); :meth:`subscribe` tells when it changed. It has no rx-filter and no guest view: :meth:`list_nics`
        reads those afresh.
        """
        return self._nics.snapshot()

    def subscribe(self, callback: Callable[[GuestEvent], None]) -> None:
        """Call ``callback`` with every :class:`GuestEvent` (NIC added, removed, link changed, ...).

        ``unplug_stuck`` is told once per pending removal, to the subscribers there are when it is due; one due
        while nobody subscribed (stuck before this process began, say) is told to the first subscriber.
        """
        self._events.subscribe(callback)
        self._unplugs.stuck.poke()

    def operation(self, operation_id: str) -> OperationRecord | None:
        """The recorded operation ``operation_id`` (a transaction), if this guest has run it."""
        return self._journal.operation(operation_id)

    async def recover(self) -> list[Nic]:
        """Read the guest afresh and converge it with its record: the *full* recovery (see recovery_plan).

        Recognises a restarted QEMU (a new instance), finishes or undoes what a killed process began, re-applies
        link intent, asks again pending unplugs whose ``device_del`` was never answered (never one QEMU accepted)
        and deletes taps of vanished NICs. Returns the NICs.

        Raises:
            GuestUnavailable, OutcomeUnknown, QmpCommandError: Reading or repairing the guest failed.
        """
        async with self._lane.turn(bounded=False):
            inventory = await self._reader.refresh(full=True)
            self._verifier.look_again()  # an agent port may have come: looked for when a call needs it
            return list(inventory.nics.values())

    async def resync(self) -> list[Nic]:
        """Read the guest afresh and settle records against it (what the periodic resync calls); returns the NICs.

        Raises:
            GuestUnavailable, OutcomeUnknown, QmpCommandError, Busy: As for :meth:`list_nics`.
        """
        async with self._lane.turn():
            inventory = await self._reader.refresh(full=False)
            return [self._nics.described(nic) for nic in inventory.nics.values()]

    async def add_nic(
        self, spec: NicSpec | Mapping[str, Any], *, operation: str | None = None, verify: Verify = False
    ) -> Nic:
        """Hot-add a NIC described by ``spec``; atomic: on failure the guest is left as before.

        Waits for the guest's lane, then runs ``netdev_add``, ``device_add`` and (for ``link: down``) ``set_link``.
        ``operation`` (an MQTT transaction) names the change in the record. With ``verify`` the call also waits
        (``qga.verify_timeout``) until the guest's agent shows an interface with the NIC's MAC (``"address"``: with
        an address) and returns the guest's view; if it does not, the NIC is removed again.

        Raises:
            NotVerified: The guest did not show the interface in time (the NIC was removed again).
            InvalidRequest: A field of ``spec`` is invalid, or ``verify`` without a guest agent (nothing was sent).
            Forbidden: The policy refuses an option (nothing was sent).
            Conflict: The id or MAC is already in the guest.
            NoFreeSlot: No PCI place is free.
            QmpCommandError: QEMU refused a step (the earlier steps were undone).
            OutcomeUnknown: A step got no answer; the guest may hold part of the NIC.
            GuestUnavailable, Busy: The guest cannot be reached or has too many waiting requests.
        """
        nic_spec = parse_nic_spec(spec)
        check_spec(nic_spec, self._settings.policy)
        if verify and nic_spec.backend.type == "vfio":
            raise InvalidRequest("verify: a vfio NIC has no MAC qmpnet knows, so the guest cannot be asked",
                                 field="verify")
        operation = operation or new_operation()
        async with self._lane.turn(), self._verifier.session(verify) as agent:
            # Once started, a hot-add runs to its end (or its rollback) even if the caller goes away.
            nic = await _shielded(self._hotadd.add(nic_spec, operation))
            if agent is not None:
                nic = await _shielded(self._verifier.added(agent, nic, verify, operation))
        log.info("guest %s: added NIC %s (%s, %s) at %s", self.name, nic.id, nic.model, nic.mac, nic.pci)
        self._events.emit("nic_added", nic=nic)
        return nic

    async def remove_nic(
        self, nic_id: str, timeout: float | None = None, *, operation: str | None = None, verify: Verify = False
    ) -> RemoveResult:
        """Hot-remove NIC ``nic_id``: ``device_del``, wait for the guest's ack, then ``netdev_del``.

        Waits at most ``timeout`` seconds (default: the ``qmp.unplug_timeout`` setting) for ``DEVICE_DELETED``.
        A NIC qmpnet created whose device is already gone (its backend left behind) is cleaned up and ``removed``.
        A NIC whose removal is pending already is not asked again (QEMU refuses a second ``device_del`` while one
        is in progress): the call only waits for the guest's ack, and answers as the first did.

        With ``verify``, a ``removed`` answer also waits until the guest's agent no longer shows the interface.

        Returns:
            ``removed``, or ``removal_pending`` if the guest has not acked in time; the removal then completes in
            the background when it does.

        Raises:
            NotVerified: The device is gone but the guest still shows the interface after ``qga.verify_timeout``.
            InvalidRequest: ``nic_id`` or ``timeout`` is malformed, or ``verify`` without a guest agent.
            NotFound: No NIC with that id.
            QmpCommandError: QEMU refused ``device_del``, or the guest refused the unplug.
            OutcomeUnknown, GuestUnavailable, Busy: As for :meth:`add_nic`.
        """
        _check_id(nic_id)
        wait = self._settings.qmp.unplug_timeout if timeout is None else timeout
        if not (math.isfinite(wait) and wait >= 0):
            raise InvalidRequest("timeout: must be a finite number of seconds, zero or more", field="timeout")
        if self._nics.pending(nic_id) and not verify:
            # Waiting for the guest's ack needs no QMP command, so it happens outside the lane.
            return await self._unplugs.wait_pending(nic_id, wait)
        async with self._lane.turn(), self._verifier.session(verify) as agent:
            inventory = self._nics.inventory
            known = inventory.nics.get(nic_id) if inventory is not None else None
            result = await self._remove_in_lane(nic_id, wait, operation)
            if agent is not None and result.state == "removed" and known is not None and known.mac is not None:
                await self._verifier.wait(agent, known.mac, "absent")
            return result

    async def _remove_in_lane(self, nic_id: str, wait: float, operation: str | None) -> RemoveResult:
        if self._nics.pending(nic_id):
            return RemoveResult(id=nic_id, state="removal_pending")
        inventory = await self._reader.fresh()
        nic = inventory.nics.get(nic_id)
        if nic is None:
            if self._journal.forget_gone(nic_id):
                # Its device went while no qmpnet listened, and recovery cleaned up what it left behind.
                return RemoveResult(id=nic_id, state="removed")
            raise NotFound(f"id: no NIC {nic_id!r} in guest {self.name}", field="id")
        # Once device_del is sent the outcome must be recorded (pending or removed), caller or not.
        return await _shielded(self._unplugs.unplug(nic, wait, operation or new_operation()))

    async def set_link(
        self, nic_id: str, up: bool, *, operation: str | None = None, verify: Verify = False
    ) -> Nic:
        """Set the link of NIC ``nic_id`` up or down (the guest sees carrier change); the intent is recorded.

        With ``verify`` the call waits until the guest's carrier follows; if it does not within
        ``qga.verify_timeout``, the link is set back as it was.

        Raises:
            NotVerified: The guest's carrier did not follow in time (the link was set back).
            InvalidRequest: ``nic_id`` is malformed.
            NotFound: No NIC with that id.
            RemovalPending: The NIC is being removed.
            QmpCommandError, OutcomeUnknown, GuestUnavailable, Busy: As for :meth:`add_nic`.
        """
        _check_id(nic_id)
        async with self._lane.turn():
            inventory = await self._reader.fresh()
            if nic_id not in inventory.nics:
                raise NotFound(f"id: no NIC {nic_id!r} in guest {self.name}", field="id")
            if self._nics.pending(nic_id):
                raise RemovalPending(f"id: NIC {nic_id!r} is being removed; its link cannot change", field="id")
            async with self._verifier.session(verify) as agent:
                before = self._live.link_of(nic_id)
                link: Literal["up", "down"] = "up" if up else "down"
                nic = await _shielded(self._live.relink(inventory, nic_id, link, operation or new_operation()))
                if agent is not None:
                    nic = await self._verifier.linked(agent, nic, up=up, undo=lambda: _shielded(
                        self._live.relink(inventory, nic_id, before, new_operation())
                    ))
        self._events.emit("link_changed", nic=nic)
        return nic

    async def update_nic(self, update: NicUpdate | Mapping[str, Any], *, operation: str | None = None) -> Nic:
        """Change a NIC live without unplugging it: move it, set its VLANs, shape it, set its link (:mod:`.update`).

        Atomic: on failure what was done is undone. Waits for the lane, the host work and, for a move, the link flap.
        The change is recorded (link intent, the bridge or network it is on now, VLANs and shaping) and, for a move,
        the stored desired set follows it.

        Raises:
            InvalidRequest: A field of ``update`` is invalid (nothing was changed).
            Forbidden: The policy refuses the bridge (nothing was changed).
            NotFound: No such NIC, bridge or NAT network.
            Unsupported: The NIC's backend or the host cannot do it (user mode: the link only).
            Conflict: The tap carries qdiscs qmpnet did not make.
            QmpCommandError, OutcomeUnknown, GuestUnavailable, Busy: As for :meth:`add_nic`.
        """
        nic_update = parse_nic_update(update)
        check_update(nic_update, self._settings.policy)
        async with self._lane.turn():
            inventory = await self._reader.fresh()
            nic = inventory.nics.get(nic_update.id)
            if nic is None:
                raise NotFound(f"update.id: no NIC {nic_update.id!r} in guest {self.name}", field="update.id")
            if self._nics.pending(nic.id):
                raise RemovalPending(f"update.id: NIC {nic.id!r} is being removed", field="update.id")
            described = self._nics.described(nic)
            nic = await _shielded(self._live.update(inventory, described, nic_update, operation))
        self._events.emit("nic_updated", nic=nic)
        return nic

    async def capture(self, nic_id: str, action: Literal["start", "stop"], file: str | None = None) -> CaptureResult:
        """Start or stop capturing NIC ``nic_id``'s traffic into the pcap ``file`` (filter-dump; :mod:`.capture`).

        Raises:
            InvalidRequest: A malformed id, action or file.
            Forbidden: The file is outside ``policy.allowed_capture_dirs``.
            NotFound: No such NIC (start), or no capture running (stop).
            Conflict: The NIC is already being captured.
            Unsupported: The NIC has no netdev (vfio).
            QmpCommandError, OutcomeUnknown, GuestUnavailable, Busy: As for :meth:`add_nic`.
        """
        _check_id(nic_id)
        checked = check_capture(action, file, self._settings.policy)
        async with self._lane.turn():
            inventory = await self._reader.fresh()
            return await run_capture(self._monitor, inventory.nics, nic_id, action, checked)

    async def list_nics(self) -> list[Nic]:
        """Read the guest afresh and list its NICs, cold-plugged ones included, with virtio rx-filters.

        Raises:
            OutcomeUnknown, GuestUnavailable, Busy: As for :meth:`add_nic`.
        """
        async with self._lane.turn():
            inventory = await self._reader.refresh(full=False)
            return await self._listed(inventory)

    async def _listed(self, inventory: Inventory) -> list[Nic]:
        """The NICs described, with their rx-filters (virtio) and the guest's own view (with an agent)."""
        from qmpnet.adapters.qga.client import guest_views  # noqa: PLC0415 - loaded by the first list (verification.py)

        await self._verifier.discover()
        views = await guest_views(self._verifier.socket, self._settings.qga)
        nics = []
        for nic in inventory.nics.values():
            described = self._nics.described(nic)
            if nic.model.startswith("virtio-net") and nic.state == "active":
                described = described.model_copy(update={"rx_filter": await self._monitor.rx_filter(nic.id)})
            if views is not None and nic.mac is not None:
                described = described.model_copy(update={"guest": views.get(nic.mac)})
            nics.append(described)
        return nics

    async def models(self) -> list[ModelInfo]:
        """The NIC models this QEMU offers, with bus kind, nominal speed and whether qmpnet hot-plugs them.

        Raises:
            OutcomeUnknown, GuestUnavailable, Busy: As for :meth:`add_nic`.
        """
        async with self._lane.turn():
            return await self._monitor.models()

    async def slots(self, *, reread: bool = True) -> Capacity:
        """How many more NICs of each model can be hot-plugged now, and where (:func:`~qmpnet.core.placement.capacity`).

        Args:
            reread: Read the guest afresh (as :meth:`list_nics` does); ``False``: the lane's inventory, if current.

        Raises:
            OutcomeUnknown, GuestUnavailable, Busy: As for :meth:`add_nic`.
        """
        async with self._lane.turn():
            inventory = await (self._reader.refresh(full=False) if reread else self._reader.fresh())
            return capacity(inventory.topology)

    def known_capacity(self) -> Capacity | None:
        """:meth:`slots` from the lane's inventory, with no QMP read: ``None`` while the inventory is not current."""
        inventory = self._nics.inventory
        return capacity(inventory.topology) if inventory is not None else None

    async def idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the lane and the late unplugs being finished to be idle.

        Returns whether they became idle (a clean stop lets operations in flight end this way).
        """
        try:
            async with asyncio.timeout(timeout):
                while self._late.busy or self._lane.locked() or self._lane.waiting:
                    if self._late.busy:
                        await self._late.settled()
                        continue
                    await self._lane.passed()
        except TimeoutError:
            return False
        return True


def _check_id(nic_id: str) -> None:
    try:
        check_qemu_id(nic_id)
    except ValueError as err:
        raise InvalidRequest(f"id: {err}", field="id") from err


async def _shielded(work: Awaitable[_T]) -> _T:
    """Run ``work`` to its end even if the caller is cancelled meanwhile (a change must not stop half-way).

    What ``await asyncio.shield(task)`` does, with the answer handed over by the task itself as ``work`` ends:
    shield's callbacks took two more turns of the loop to wake the caller. The caller, cancelled, waits for the
    work to end and then gets its ``CancelledError`` (or the work's error, as with shield); the work, cancelled
    from elsewhere, cancels the caller's wait.
    """
    answer: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(_answering(work, answer))
    try:
        return await answer
    except asyncio.CancelledError:
        await task
        raise


async def _answering(work: Awaitable[_T], answer: asyncio.Future[_T]) -> None:
    """Await ``work`` and hand its outcome to ``answer``; once nobody waits for it there, raise any error here."""
    try:
        result = await work
    except (Exception, asyncio.CancelledError) as err:  # KeyboardInterrupt and SystemExit stop the loop, as before
        if answer.done():  # the caller was cancelled and awaits this task: the error is its to see
            raise
        if isinstance(err, asyncio.CancelledError):
            answer.cancel()
        else:
            answer.set_exception(err)
        return
    if not answer.done():
        answer.set_result(result)
