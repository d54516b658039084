"""One guest: its serial lane, its NICs' lifecycles, their records, and the execution of plans with rollback.

Every public call runs in the guest's *lane*: an ``asyncio.Lock`` taken in arrival order, so the QMP steps of two
calls on one guest never interleave, while different guests (different ``Guest`` objects) run in parallel. A
bounded number of calls may wait for the lane, each for a bounded time; past either limit a call gets ``busy``.

**What is remembered, and where.** QEMU is the truth for what exists; the guest's record in the state store
(:mod:`qmpnet.records`, behind the :class:`~qmpnet.ports.GuestStore` port) holds what QEMU cannot tell. Every
change is written there *before* its first QMP command (a NIC ``adding``, a NIC ``removal_pending``, a link
intent, the operation's id) and again with its outcome. So a process killed between any two commands leaves a
record that the next one resolves (:mod:`qmpnet.recovery`): on entering the context (before any call is served),
whenever the lane re-reads the guest (after a refused or unanswered command, a device unplugged behind its back,
``list_nics``), and on :meth:`Guest.resync`. The per-NIC state is the record; the only other per-NIC data in
memory are the waiters of pending removals.

A NIC moves through ``adding -> active -> removal_pending -> removed``. Removal is QEMU's two-phase unplug:
``device_del`` only *asks* the guest OS; the ``DEVICE_DELETED`` event (matched on ``data.device``: virtio sends
a first one for its backend without it) is the answer, and only then is the netdev deleted (QEMU would delete a
netdev still attached to a NIC). If the guest does not answer within the timeout the call returns
``removal_pending``; the event pump finishes the removal whenever the answer comes, and if it comes while no
qmpnet listens, recovery finishes it.

A hot-add runs the plan's steps in order; on a QEMU error it runs the undo of the steps already done in reverse,
so the guest is exactly as before. If QEMU refused the plan itself (an id or a PCI slot another client took
meanwhile), the lane re-reads the guest and plans once more before answering. On an *unknown* outcome (timeout,
lost connection) it does not guess: the record stays ``adding`` with the host resources it holds, the caller
gets ``outcome_unknown``, and the next read of the guest settles it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar

from qmpnet.capture import check_capture, run_capture
from qmpnet.errors import (
    AgentUnavailable,
    Busy,
    InvalidRequest,
    NotFound,
    NotVerified,
    OutcomeUnknown,
    QmpCommandError,
    QmpnetError,
    RemovalPending,
    Timeout,
    Unsupported,
)
from qmpnet.inventory import Inventory, backend_of
from qmpnet.model import (
    CaptureResult,
    GuestEvent,
    GuestEventName,
    ModelInfo,
    Nic,
    NicSpec,
    NicUpdate,
    ObservedBackend,
    PciAddress,
    RemoveResult,
    TapBackend,
    Verify,
    parse_nic_spec,
    parse_nic_update,
)
from qmpnet.names import check_qemu_id, format_pci_addr
from qmpnet.plan import AddPlan, QmpCall, needs_tap_fds, plan_add
from qmpnet.policy import check_spec, check_update
from qmpnet.qga import GuestAgent, find_agent_socket, guest_views, wait_for
from qmpnet.reconcile import with_added, with_link, without
from qmpnet.records import GuestRecord, HostHold, NicRecord, OperationRecord
from qmpnet.recovery import RecoveryStep, plan_recovery
from qmpnet.settings import Settings
from qmpnet.steps import Attachment, UndoStack, prepare_host, run_steps
from qmpnet.store import MemoryGuestStore
from qmpnet.update import KnownNic, run_update

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
    from os import PathLike

    from qmpnet.model import GuestView
    from qmpnet.ports import GuestStore, HostNetwork, Monitor, Observation, QmpEvent
    from qmpnet.qga import Want

__all__ = ["INSTANCE_OBJECT", "Guest"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")
#: Options `info network` shows that mean nothing outside QEMU (its own fd numbers for a passed tap).
_QEMU_INTERNAL_OPTIONS = frozenset({"fd", "fds"})
#: The QOM object qmpnet adds to each QEMU it meets, holding a random id of that QEMU process.
INSTANCE_OBJECT = "qmpnet-instance"
#: How many lanes (of all the guests of this process) are held right now: see Guest._save_async.
_lanes_held = [0]
#: QEMU's words when a plan was refused because another client took an id or a PCI place meanwhile.
_REFUSED = re.compile(r"Duplicate (?:device )?ID|already exists|not available for|no slot/function available")


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
        self._qga: Path | None = Path(qga) if qga is not None else None  # found on entry when not given
        self._monitor = monitor
        self._host = host
        self._store: GuestStore = store or MemoryGuestStore(GuestRecord(address=name, name=name), key=name)
        self._settings = settings or Settings()
        self._lane = asyncio.Lock()
        self._waiting = 0
        self._inventory: Inventory | None = None
        self._seen_nics: set[str] = set()  # the NIC ids of the last read: tells a NIC's DEVICE_DELETED from others
        self._instance: str | None = None
        self._unplugging: set[str] = set()  # device_del sent by this lane and awaited right now
        self._waiters: dict[str, asyncio.Event] = {}  # pending removals: set when the removal is finished
        self._subscribers: list[Callable[[GuestEvent], None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._state: Literal["new", "open", "closed"] = "new"
        monitor.on_event(self._on_event)

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
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Let background work (late unplugs being finished) end within ``lane.stop_grace``, then cancel it."""
        self._state = "closed"
        pending = set(self._background)
        if pending:
            _, late = await asyncio.wait(pending, timeout=self._settings.lane.stop_grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    # ----------------------------------------------------------------------------------------------- public API

    @property
    def record(self) -> GuestRecord:
        """What the state store holds for this guest."""
        return self._store.record

    def subscribe(self, callback: Callable[[GuestEvent], None]) -> None:
        """Call ``callback`` with every :class:`GuestEvent` (NIC added, removed, link changed, ...)."""
        self._subscribers.append(callback)

    def operation(self, operation_id: str) -> OperationRecord | None:
        """The recorded operation ``operation_id`` (a transaction), if this guest has run it."""
        return self._store.record.operations.get(operation_id)

    async def recover(self) -> list[Nic]:
        """Read the guest afresh and converge it with its record: the *full* recovery (see :mod:`qmpnet.recovery`).

        Recognises a restarted QEMU (a new instance), finishes or undoes what a killed process began, re-applies
        link intent, asks pending unplugs again and deletes taps of vanished NICs. Returns the NICs.

        Raises:
            GuestUnavailable, OutcomeUnknown, QmpCommandError: Reading or repairing the guest failed.
        """
        async with self._lane_turn(bounded=False):
            inventory = await self._refresh(full=True)
            if self._qga is None:
                self._qga = await self._find_agent()
            return list(inventory.nics.values())

    async def _find_agent(self) -> Path | None:
        try:
            return await find_agent_socket(self._monitor)
        except QmpCommandError as err:
            log.debug("guest %s: no guest agent socket found (%s)", self.name, err)
            return None

    async def resync(self) -> list[Nic]:
        """Read the guest afresh and settle records against it (what the periodic resync calls); returns the NICs.

        Raises:
            GuestUnavailable, OutcomeUnknown, QmpCommandError, Busy: As for :meth:`list_nics`.
        """
        async with self._lane_turn():
            inventory = await self._refresh(full=False)
            return [self._described(nic) for nic in inventory.nics.values()]

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
        operation = operation or _new_operation()
        async with self._lane_turn():
            agent = await self._agent() if verify else None
            try:
                # Once started, a hot-add runs to its end (or its rollback) even if the caller goes away.
                nic = await _shielded(self._add(nic_spec, operation))
                if agent is not None:
                    nic = await _shielded(self._verify_added(agent, nic, verify, operation))
            finally:
                if agent is not None:
                    await agent.close()
        log.info("guest %s: added NIC %s (%s, %s) at %s", self.name, nic.id, nic.model, nic.mac, nic.pci)
        self._emit("nic_added", nic=nic)
        return nic

    async def remove_nic(
        self, nic_id: str, timeout: float | None = None, *, operation: str | None = None, verify: Verify = False
    ) -> RemoveResult:
        """Hot-remove NIC ``nic_id``: ``device_del``, wait for the guest's ack, then ``netdev_del``.

        Waits at most ``timeout`` seconds (default: the ``qmp.unplug_timeout`` setting) for ``DEVICE_DELETED``.
        A NIC qmpnet created whose device is already gone (its backend left behind) is cleaned up and ``removed``.

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
        if self._pending(nic_id) and not verify:
            # Waiting for the guest's ack needs no QMP command, so it happens outside the lane.
            return await self._wait_pending(nic_id, wait)
        async with self._lane_turn():
            if verify:
                agent = await self._agent()
                mac = self._inventory.nics[nic_id].mac if self._inventory and nic_id in self._inventory.nics else None
                try:
                    result = await self._remove_in_lane(nic_id, wait, operation)
                    if result.state == "removed" and mac is not None:
                        await self._verified(wait_for(agent, mac, "absent"), "verify")
                finally:
                    await agent.close()
                return result
            return await self._remove_in_lane(nic_id, wait, operation)

    async def _remove_in_lane(self, nic_id: str, wait: float, operation: str | None) -> RemoveResult:
        if self._pending(nic_id):
            return RemoveResult(id=nic_id, state="removal_pending")
        inventory = await self._fresh_inventory()
        nic = inventory.nics.get(nic_id)
        if nic is None:
            if nic_id in self._store.record.gone:
                # Its device went while no qmpnet listened, and recovery cleaned up what it left behind.
                gone = {k: v for k, v in self._store.record.gone.items() if k != nic_id}
                self._save(self._store.record.model_copy(update={"gone": gone}))
                return RemoveResult(id=nic_id, state="removed")
            raise NotFound(f"id: no NIC {nic_id!r} in guest {self.name}", field="id")
        # Once device_del is sent the outcome must be recorded (pending or removed), caller or not.
        return await _shielded(self._unplug(nic, wait, operation or _new_operation()))

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
        link: Literal["up", "down"] = "up" if up else "down"
        async with self._lane_turn():
            inventory = await self._fresh_inventory()
            if nic_id not in inventory.nics:
                raise NotFound(f"id: no NIC {nic_id!r} in guest {self.name}", field="id")
            if self._pending(nic_id):
                raise RemovalPending(f"id: NIC {nic_id!r} is being removed; its link cannot change", field="id")
            agent = await self._agent() if verify else None
            try:
                before: Literal["up", "down"] = "down" if self._links().get(nic_id) == "down" else "up"
                nic = await _shielded(self._relink(inventory, nic_id, link, operation or _new_operation()))
                if agent is not None and nic.mac is not None:
                    want: Want = "carrier_up" if up else "carrier_down"
                    try:
                        view = await self._verified(wait_for(agent, nic.mac, want), "verify")
                    except NotVerified:
                        await _shielded(self._relink(inventory, nic_id, before, _new_operation()))
                        raise
                    nic = nic.model_copy(update={"guest": view})
            finally:
                if agent is not None:
                    await agent.close()
        self._emit("link_changed", nic=nic)
        return nic

    async def update_nic(self, update: NicUpdate | Mapping[str, Any], *, operation: str | None = None) -> Nic:
        """Change a NIC live without unplugging it: move it, set its VLANs, shape it, set its link (qmpnet.update).

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
        async with self._lane_turn():
            inventory = await self._fresh_inventory()
            nic = inventory.nics.get(nic_update.id)
            if nic is None:
                raise NotFound(f"update.id: no NIC {nic_update.id!r} in guest {self.name}", field="update.id")
            if self._pending(nic.id):
                raise RemovalPending(f"update.id: NIC {nic.id!r} is being removed", field="update.id")
            nic = await _shielded(self._update(inventory, self._described(nic), nic_update, operation))
        self._emit("nic_updated", nic=nic)
        return nic

    async def _update(self, inventory: Inventory, nic: Nic, update: NicUpdate, operation: str | None) -> Nic:
        record = self._store.record.nics.get(nic.id)
        known = _known(nic, record, f"{self._store.key}/{nic.id}")
        started = OperationRecord(id=operation or _new_operation(), op="nic/update", nic=nic.id, started=time.time())
        self._save(self._store.record.with_operation(started))
        try:
            result = await run_update(self._monitor, self._host, known, update, self._settings.update)
        except OutcomeUnknown:
            self._inventory = None
            raise
        except QmpnetError as err:
            self._inventory = None
            self._save(self._store.record.with_operation(_finished(started, error=err)))
            raise
        changed = self._store.record.with_link(nic.id, result.nic.link)
        kept = changed.nics.get(nic.id) or _foreign_record(nic).model_copy(update={"netdev": None})
        hold, spec = kept.host, kept.spec
        if result.attachment is not None:
            moved = result.attachment
            where = {"tap": moved.tap or hold.tap, "bridge": moved.bridge, "network": moved.network}
            hold = hold.model_copy(update=where)
        if spec is not None:
            changes: dict[str, object] = {"backend": update.backend} if update.backend is not None else {}
            changes |= {name: getattr(update, name) for name in ("vlan", "shape") if name in update.model_fields_set}
            spec = spec.model_copy(update=changes)
        changed = changed.with_nic(kept.model_copy(update={
            "host": hold, "spec": spec, "operation": started.id, "link": result.nic.link,
            "view": result.backend or kept.view,
            "vlan": update.vlan if "vlan" in update.model_fields_set else kept.vlan,
            "shape": update.shape if "shape" in update.model_fields_set else kept.shape,
        }))
        if spec is not None and changed.desired is not None and any(s.id == nic.id for s in changed.desired.nics):
            changed = changed.model_copy(update={"desired": with_added(changed.desired, spec)})
        done = inventory.update(nic.id, link=result.nic.link, backend=result.nic.backend)
        self._save(changed.with_operation(_finished(started, data=done.model_dump(mode="json"))))
        return self._described(done)

    async def capture(self, nic_id: str, action: Literal["start", "stop"], file: str | None = None) -> CaptureResult:
        """Start or stop capturing NIC ``nic_id``'s traffic into the pcap ``file`` (QEMU filter-dump; qmpnet.capture).

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
        async with self._lane_turn():
            inventory = await self._fresh_inventory()
            return await run_capture(self._monitor, inventory.nics, nic_id, action, checked)

    async def list_nics(self) -> list[Nic]:
        """Read the guest afresh and list its NICs, cold-plugged ones included, with virtio rx-filters.

        Raises:
            OutcomeUnknown, GuestUnavailable, Busy: As for :meth:`add_nic`.
        """
        async with self._lane_turn():
            inventory = await self._refresh(full=False)
            views = await guest_views(self._qga, self._settings.qga)
            nics = []
            for nic in inventory.nics.values():
                described = self._described(nic)
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
        async with self._lane_turn():
            return await self._monitor.models()

    async def idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the lane and the late unplugs being finished to be idle.

        Returns whether they became idle (a clean stop lets operations in flight end this way).
        """
        try:
            async with asyncio.timeout(timeout):
                while self._background or self._lane.locked() or self._waiting:
                    if self._background:
                        await asyncio.wait(set(self._background))
                        continue
                    async with self._lane:
                        pass
        except TimeoutError:
            return False
        return True

    # ---------------------------------------------------------------------------------------- the guest's view

    async def _agent(self) -> GuestAgent:
        """The guest agent, for a verified change (held for that change only: it serves one client at a time).

        Raises:
            InvalidRequest: No agent socket is known or none answers there (nothing has been changed yet).
        """
        if self._qga is None:
            raise InvalidRequest(
                f"verify: no guest agent is known for guest {self.name}: give its socket (--qga, qga=) or start "
                "QEMU with a virtserialport named org.qemu.guest_agent.0 on a unix socket QEMU listens on",
                field="verify",
            )
        try:
            return await GuestAgent.open(self._qga, self._settings.qga)
        except AgentUnavailable as err:
            raise InvalidRequest(f"verify: {err.message}", field="verify") from err

    async def _verified(self, wait: Awaitable[GuestView | None], field: str) -> GuestView | None:
        """``await wait``, naming ``field`` on the ``not_verified`` error."""
        try:
            return await wait
        except NotVerified as err:
            raise NotVerified(err.message, field=field) from err

    async def _verify_added(self, agent: GuestAgent, nic: Nic, verify: Verify, operation: str) -> Nic:
        """Wait until the guest shows the new NIC; if it does not, remove the NIC again and raise."""
        if nic.mac is None:
            return nic
        want: Want = "address" if verify == "address" else "present"
        try:
            view = await self._verified(wait_for(agent, nic.mac, want), "verify")
        except NotVerified as err:
            log.info("guest %s: NIC %s not verified (%s): removing it again", self.name, nic.id, err)
            result = await self._unplug(nic, self._settings.qmp.rollback_unplug_timeout, _new_operation())
            if result.state == "removal_pending":
                err.add_note(f"the NIC is being removed again; the guest has not acked yet ({nic.id})")
            self._finish_operation(operation, error=err)
            raise
        done = nic.model_copy(update={"guest": view})
        current = self._store.record.operations.get(operation)
        if current is not None:
            self._save(self._store.record.with_operation(_finished(current, data=done.model_dump(mode="json"))))
        return done

    # ------------------------------------------------------------------------------------------------ the lane

    @asynccontextmanager
    async def _lane_turn(self, *, bounded: bool = True) -> AsyncIterator[None]:
        lane = self._settings.lane
        if bounded and self._waiting >= lane.max_waiting:
            raise Busy(f"guest {self.name}: {self._waiting} requests are already waiting")
        self._waiting += 1
        try:
            if bounded:
                try:
                    async with asyncio.timeout(lane.max_wait):
                        await self._lane.acquire()
                except TimeoutError as err:
                    raise Timeout(
                        f"guest {self.name}: waited {lane.max_wait:g} s for earlier requests; nothing was sent"
                    ) from err
            else:
                await self._lane.acquire()
        finally:
            self._waiting -= 1
        _lanes_held[0] += 1
        try:
            yield
        finally:
            _lanes_held[0] -= 1
            self._lane.release()

    async def _fresh_inventory(self) -> Inventory:
        if self._inventory is None:
            return await self._refresh(full=False)
        return self._inventory

    async def _execute(self, call: QmpCall) -> object:
        try:
            return await self._monitor.execute(call.command, call.arguments)
        except QmpnetError:
            self._inventory = None
            raise

    def _save(self, record: GuestRecord) -> None:
        keep = self._settings.mqtt.dedup_window
        self._store.save(record.pruned(time.time(), keep))

    async def _save_async(self, record: GuestRecord) -> None:
        """As :meth:`_save`, the disk work off the event loop while other lanes are at work (a hot path's writes).

        With this lane the only one at work in the process, the loop has nobody else to serve while the disk
        flushes, and writing here saves the hop to a worker thread and back.
        """
        keep = self._settings.mqtt.dedup_window
        if _lanes_held[0] <= 1:
            self._store.save(record.pruned(time.time(), keep))
        else:
            await self._store.save_async(record.pruned(time.time(), keep))

    def _pending(self, nic_id: str) -> bool:
        nic = self._store.record.nics.get(nic_id)
        return nic is not None and nic.state == "removal_pending"

    # --------------------------------------------------------------------------------------- reading, recovery

    async def _refresh(self, *, full: bool, gone: frozenset[str] = frozenset()) -> Inventory:
        """Observe the guest, settle the records against it, and rebuild the inventory.

        ``gone`` names devices whose ``DEVICE_DELETED`` just came: absent whatever the observation still shows.
        """
        self._inventory = None
        observation = await self._monitor.observe()
        if full:
            self._instance = await self._identify()
        record = self._store.record
        devices = observation.device_ids - gone
        steps = plan_recovery(record, instance=self._instance, devices=devices, full=full)
        if full and self._instance is not None and record.instance != self._instance:
            if record.instance is not None:
                log.info("guest %s: QEMU was restarted (a new instance): its NICs went with the old one", self.name)
            self._save(record.model_copy(update={"instance": self._instance, "links": {}}))
        elif any(nic_id not in devices for nic_id in record.links):
            self._save(record.model_copy(update={"links": {k: v for k, v in record.links.items() if k in devices}}))
        deleted: set[str] = set()
        for step in steps:
            if await self._recover_one(step, observation, full=full):
                deleted.add(step.nic.netdev or "")
        if full:
            await self._apply_foreign_links(devices)
            await self._sweep_taps()
        inventory = Inventory.from_observation(observation, self._links(), self._pending_ids())
        for device in gone:
            inventory.removed(device)
        inventory.netdev_ids.difference_update(deleted)
        self._inventory = inventory
        self._seen_nics = set(inventory.nics)
        return inventory

    async def _apply_foreign_links(self, devices: frozenset[str]) -> None:
        for nic_id, link in self._store.record.links.items():
            if nic_id in devices:
                try:
                    await self._monitor.execute("set_link", {"name": nic_id, "up": link == "up"})
                except QmpCommandError as err:
                    log.warning("guest %s: re-applying the link of %s failed: %s", self.name, nic_id, err)

    async def _identify(self) -> str | None:
        """The id of the QEMU process behind the monitor, kept in a QOM object qmpnet adds on first contact."""
        path = f"/objects/{INSTANCE_OBJECT}"
        try:
            return str(await self._monitor.execute("qom-get", {"path": path, "property": "identity"}))
        except QmpCommandError:
            pass
        new = uuid.uuid4().hex
        try:
            await self._monitor.execute(
                "object-add", {"qom-type": "authz-simple", "id": INSTANCE_OBJECT, "identity": new}
            )
        except QmpCommandError as err:
            log.warning("guest %s: cannot mark the QEMU instance (%s): restarts are told by devices only", self.name,
                        err)
            return None
        return new

    async def _recover_one(self, step: RecoveryStep, observation: Observation, *, full: bool) -> bool:
        """Carry out one recovery step; returns whether it deleted the NIC's netdev.

        A removal finished by a *full* recovery is remembered as gone: the process that asked for it has gone
        too, and a later ``nic del`` of the NIC answers ``removed``.
        """
        nic = step.nic
        log.info("guest %s: recovery: %s NIC %s (recorded %s)", self.name, step.action, nic.id, nic.state)
        try:
            match step.action:
                case "forget":
                    await self._release_host(nic)
                    self._drop(nic.id)
                case "activate":
                    device = observation.device(nic.id)
                    pci = nic.pci
                    if device is not None:
                        pci = pci or _pci_of(device.bus, device.slot, device.function)
                    self._save(self._store.record.with_nic(nic.model_copy(update={"state": "active", "pci": pci})))
                    await self._apply_link(nic)
                case "relink":
                    await self._apply_link(nic)
                case "unplug":
                    await self._ask_unplug(nic.id)
                    self._waiters.setdefault(nic.id, asyncio.Event())
                case "undo_add" | "vanished" | "finish":
                    await self._clean_up(nic, by_recovery=full and step.action != "undo_add")
                    if step.action != "undo_add":
                        self._emit("nic_removed", nic_id=nic.id)
                    return nic.netdev is not None
        except QmpCommandError as err:
            log.warning("guest %s: recovery of NIC %s (%s) failed: %s", self.name, nic.id, step.action, err)
        return False

    async def _apply_link(self, nic: NicRecord) -> None:
        if nic.spec is not None and nic.spec.backend.type == "vfio":
            return  # an assigned function has no net client in QEMU, so no link to set (the guest's driver owns it)
        await self._monitor.execute("set_link", {"name": nic.id, "up": nic.link == "up"})

    async def _ask_unplug(self, nic_id: str) -> None:
        try:
            await self._monitor.execute("device_del", {"id": nic_id})
        except QmpCommandError as err:
            if "in the process of unplug" not in err.message:
                raise

    async def _sweep_taps(self) -> None:
        if self._host is None:
            return
        keep = {nic.host.owner for nic in self._store.record.nics.values() if nic.host.owner is not None}
        try:
            await self._host.sweep_orphans(f"{self._store.key}/", keep)
        except QmpnetError as err:
            log.warning("guest %s: sweeping stale taps failed: %s", self.name, err)

    def _links(self) -> dict[str, str]:
        record = self._store.record
        return {**record.links, **{nic_id: nic.link for nic_id, nic in record.nics.items()}}

    def _pending_ids(self) -> set[str]:
        return {nic_id for nic_id, nic in self._store.record.nics.items() if nic.state == "removal_pending"}

    def _described(self, nic: Nic) -> Nic:
        """QEMU's view of ``nic`` completed with what was asked for (hostfwd, the bridge and tap behind an fd)."""
        record = self._store.record.nics.get(nic.id)
        if record is None:
            return nic
        if record.view is not None:
            return nic.model_copy(update={"backend": record.view, "managed": record.spec is not None})
        if record.spec is None:
            return nic
        asked = _asked_backend(record.spec, record)
        seen = nic.backend.options if nic.backend is not None else {}
        seen = {k: v for k, v in seen.items() if k not in _QEMU_INTERNAL_OPTIONS}
        backend = ObservedBackend(type=asked.type, options={**seen, **asked.options})
        return nic.model_copy(update={"backend": backend, "managed": True})

    # ------------------------------------------------------------------------------------------------- hot-add

    async def _add(self, spec: NicSpec, operation: str) -> Nic:
        # The operation is recorded together with the NIC's `adding` record, in one write before the first QMP
        # command (_run_add); what fails before that (reading, planning) records the operation with its error.
        started = OperationRecord(id=operation, op="nic/add", nic=spec.id, started=time.time())
        try:
            inventory = await self._fresh_inventory()
            plan, record = await self._run_add(spec, inventory, started)
        except QmpCommandError as err:
            if not _REFUSED.search(err.message):
                self._finish_operation(operation, error=err, started=started)
                raise
            log.info("guest %s: QEMU refused the plan (%s): reading the guest and planning again", self.name, err)
            try:
                inventory = await self._fresh_inventory()
                plan, record = await self._run_add(spec, inventory, started)
            except QmpnetError as again:
                self._finish_operation(operation, error=again, started=started)
                raise
        except OutcomeUnknown:
            raise
        except QmpnetError as err:
            self._finish_operation(operation, error=err, started=started)
            raise
        done = self._store.record.with_nic(record)
        nic = self._described(inventory.added(plan, spec))
        assert record.spec is not None  # noqa: S101 - a NIC qmpnet adds always has its planned spec
        desired = with_added(done.desired, record.spec)
        await self._save_async(done.model_copy(update={"desired": desired}).with_operation(
            _finished(self._store.record.operations[operation], data=nic.model_dump(mode="json"))
        ))
        return nic

    async def _run_add(
        self, spec: NicSpec, inventory: Inventory, started: OperationRecord
    ) -> tuple[AddPlan, NicRecord]:
        vhost = self._host is not None and needs_tap_fds(spec) and self._host.vhost()
        plan = plan_add(spec, inventory.view(), vhost=vhost)
        owner = f"{self._store.key}/{plan.nic_id}"
        record = NicRecord(
            id=plan.nic_id,
            spec=_planned_spec(spec, plan),
            netdev=plan.netdev_id,
            state="adding",
            link=spec.link,
            host=HostHold(owner=owner if needs_tap_fds(spec) else None),
            pci=_pci_of(plan.placement.bus, plan.placement.slot, plan.placement.function),
            operation=started.id,
        )
        recorded = self._store.record.operations.get(started.id) or started  # the first plan's, if planned again
        await self._save_async(self._store.record.with_operation(recorded).with_nic(record))
        undo = UndoStack()
        try:
            attachment = await prepare_host(self._host, self._monitor, spec, plan, owner, undo)
            if attachment.tap is not None or attachment.vfio_host is not None:
                hold = record.host.model_copy(update={
                    "tap": attachment.tap, "bridge": attachment.bridge, "network": attachment.network,
                    "vfio_host": attachment.vfio_host, "vfio_driver": attachment.vfio_driver,
                })
                record = record.model_copy(update={"host": hold})
                self._save(self._store.record.with_nic(record))
            await run_steps(self._monitor, plan.steps, undo, unplug_timeout=self._settings.qmp.rollback_unplug_timeout)
            await self._tune_tap(spec, attachment, undo)
        except OutcomeUnknown as err:
            self._inventory = None
            err.add_note("qmpnet did not roll back: QEMU may have applied the step; the next read of the guest "
                         "settles it (list the NICs to see)")
            raise
        except QmpnetError as err:
            self._inventory = None
            if await undo.unwind(err):
                self._drop(record.id)
            else:
                # The NIC is still plugged: finish its removal (netdev, host side) when the guest lets go.
                self._save(self._store.record.with_nic(record.model_copy(update={"state": "removal_pending"})))
                self._waiters.setdefault(record.id, asyncio.Event())
            raise
        return plan, record.model_copy(update={"state": "active"})

    async def _tune_tap(self, spec: NicSpec, attachment: Attachment, undo: UndoStack) -> None:
        """Apply the spec's VLANs and shaping to the NIC's host tap, pushing their undo (an add is atomic)."""
        if spec.vlan is None and spec.shape is None:
            return
        tap = attachment.tap or (spec.backend.ifname if isinstance(spec.backend, TapBackend) else None)
        if self._host is None or tap is None:
            raise Unsupported("nic.shape: no host tap is known for this NIC", field="nic.shape")
        host = self._host
        if spec.vlan is not None:
            undo.push("vlan", await host.set_vlan(tap, spec.vlan))
        if spec.shape is not None:
            undo.push("shape", await host.set_shape(tap, spec.shape))

    def _finish_operation(
        self, operation: str, *, error: QmpnetError, started: OperationRecord | None = None
    ) -> None:
        current = self._store.record.operations.get(operation) or started
        if current is not None:
            self._save(self._store.record.with_operation(_finished(current, error=error)))

    # ----------------------------------------------------------------------------------------------- link

    async def _relink(self, inventory: Inventory, nic_id: str, link: Literal["up", "down"], operation: str) -> Nic:
        before: Literal["up", "down"] = "down" if self._links().get(nic_id) == "down" else "up"
        started = OperationRecord(id=operation, op="nic/link", nic=nic_id, started=time.time())
        intent = self._store.record.with_operation(started).with_link(nic_id, link)
        self._save(intent.model_copy(update={"desired": with_link(intent.desired, nic_id, link)}))
        try:
            await self._execute(QmpCall("set_link", {"name": nic_id, "up": link == "up"}))
        except OutcomeUnknown:
            raise  # the intent stays recorded: recovery re-applies it
        except QmpnetError as err:
            undone = self._store.record.with_operation(_finished(started, error=err)).with_link(nic_id, before)
            self._save(undone.model_copy(update={"desired": with_link(undone.desired, nic_id, before)}))
            raise
        nic = self._described(inventory.update(nic_id, link=link))
        self._save(self._store.record.with_operation(_finished(started, data=nic.model_dump(mode="json"))))
        return nic

    # ------------------------------------------------------------------------------------------------- removal

    async def _unplug(self, nic: Nic, wait: float, operation: str) -> RemoveResult:
        record = self._store.record.nics.get(nic.id) or _foreign_record(nic)
        desired = self._store.record.desired
        started = OperationRecord(id=operation, op="nic/del", nic=nic.id, started=time.time())
        asked = self._store.record.with_operation(started).with_nic(
            record.model_copy(update={"state": "removal_pending", "operation": operation})
        )
        self._save(asked.model_copy(update={"desired": without(desired, nic.id)}))
        self._waiters.setdefault(nic.id, asyncio.Event())
        events = {"DEVICE_DELETED", "DEVICE_UNPLUG_GUEST_ERROR"}
        self._unplugging.add(nic.id)
        try:
            async with self._monitor.listen(events, lambda e: e.device == nic.id) as stream:
                try:
                    await self._execute(QmpCall("device_del", {"id": nic.id}))
                except QmpCommandError as err:
                    if "in the process of unplug" not in err.message:
                        refused = self._store.record.with_nic(record).with_operation(_finished(started, error=err))
                        self._save(refused.model_copy(update={"desired": desired}))
                        self._wake(nic.id)
                        raise
                # On OutcomeUnknown the record stays removal_pending: recovery finishes it once the device is gone.
                event = await _next_within(stream.get, stream.get_nowait, wait)
        finally:
            self._unplugging.discard(nic.id)
        if self._inventory is not None:
            self._inventory.update(nic.id, state="removal_pending")
        if event is None:
            log.info("guest %s: NIC %s removal pending (no ack within %g s)", self.name, nic.id, wait)
            self._save(self._store.record.with_operation(_finished(started, data={"id": nic.id,
                                                                                    "state": "removal_pending"})))
            self._emit("nic_removal_pending", nic_id=nic.id)
            return RemoveResult(id=nic.id, state="removal_pending")
        if event.name == "DEVICE_UNPLUG_GUEST_ERROR":
            error = QmpCommandError(
                f"device_del: the guest refused to unplug {nic.id}",
                qmp_class="DEVICE_UNPLUG_GUEST_ERROR",
                command="device_del",
            )
            rejected = self._store.record.with_nic(record).with_operation(_finished(started, error=error))
            self._save(rejected.model_copy(update={"desired": desired}))
            self._wake(nic.id)
            self._emit("unplug_rejected", nic_id=nic.id)
            raise error
        await self._clean_up(self._store.record.nics[nic.id])
        self._save(self._store.record.with_operation(_finished(started, data={"id": nic.id, "state": "removed"})))
        self._emit("nic_removed", nic_id=nic.id)
        return RemoveResult(id=nic.id, state="removed")

    async def _clean_up(self, nic: NicRecord, *, by_recovery: bool = False) -> None:
        """The NIC's device is gone: delete its netdev, release the host side, drop the record, wake waiters."""
        if nic.netdev is not None:
            try:
                await self._execute(QmpCall("netdev_del", {"id": nic.netdev}))
            except QmpCommandError as err:
                if err.qmp_class != "DeviceNotFound":
                    log.warning("guest %s: netdev_del %s after unplug of %s: %s", self.name, nic.netdev, nic.id, err)
        await self._release_host(nic)
        if self._inventory is not None:
            self._inventory.removed(nic.id)
        self._drop(nic.id, by_recovery=by_recovery)
        log.info("guest %s: removed NIC %s", self.name, nic.id)

    def _drop(self, nic_id: str, *, by_recovery: bool = False) -> None:
        if nic_id in self._store.record.nics:
            self._save(self._store.record.without_nic(nic_id, gone_at=time.time() if by_recovery else None))
        self._wake(nic_id)

    def _wake(self, nic_id: str) -> None:
        waiter = self._waiters.pop(nic_id, None)
        if waiter is not None:
            waiter.set()

    async def _release_host(self, nic: NicRecord) -> None:
        hold = nic.host
        if self._host is None or hold.empty:
            return
        try:
            if hold.tap is not None:
                await self._host.delete_tap(hold.tap)
            if hold.vfio_host is not None and hold.vfio_driver is not None:
                await self._host.restore_vfio(hold.vfio_host, hold.vfio_driver)
        except QmpnetError as err:
            log.warning("guest %s: releasing the host side of %s: %s", self.name, nic.id, err)

    async def _wait_pending(self, nic_id: str, wait: float) -> RemoveResult:
        waiter = self._waiters.setdefault(nic_id, asyncio.Event())
        with suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await waiter.wait()
        state: Literal["removed", "removal_pending"] = "removal_pending" if self._pending(nic_id) else "removed"
        return RemoveResult(id=nic_id, state=state)

    def _on_event(self, event: QmpEvent) -> None:
        if event.name != "DEVICE_DELETED" or event.device is None or event.device in self._unplugging:
            return
        if self._state != "open":
            return
        # A late ack of ours, or a device someone else unplugged: settle it in the lane, in the background.
        was_nic = event.device in self._seen_nics
        task = asyncio.get_running_loop().create_task(
            self._settle(event.device, was_nic=was_nic), name=f"qmpnet[guest={self.name}].settle-{event.device}"
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _settle(self, device: str, *, was_nic: bool) -> None:
        recorded = device in self._store.record.nics
        try:
            # Internal work is not subject to the lane's limits: a late ack must always be completed.
            async with self._lane_turn(bounded=False):
                await self._refresh(full=False, gone=frozenset({device}))
        except QmpnetError as err:
            log.warning("guest %s: could not settle the unplug of %s: %s (recovery will)", self.name, device, err)
            return
        except Exception:
            # A bug must not go unseen in a background task; the record still says what to finish.
            log.exception("guest %s: settling the unplug of %s failed", self.name, device)
            return
        if was_nic and not recorded:
            self._emit("nic_removed", nic_id=device)  # a NIC qmpnet did not create, unplugged by another client

    def _emit(self, name: GuestEventName, *, nic: Nic | None = None, nic_id: str | None = None) -> None:
        if not self._subscribers:
            return
        event = GuestEvent(name=name, ts=time.time(), guest=self.name, nic=nic, id=nic.id if nic else nic_id)
        for callback in self._subscribers:
            try:
                callback(event)
            except Exception:
                log.exception("guest %s: event subscriber failed on %s", self.name, name)


def _new_operation() -> str:
    return f"op-{uuid.uuid4().hex}"


def _finished(operation: OperationRecord, *, data: object = None, error: QmpnetError | None = None) -> OperationRecord:
    if error is not None:
        body: dict[str, object] = {"code": error.code, "message": error.message}
        if error.field is not None:
            body["field"] = error.field
        if isinstance(error, QmpCommandError) and error.qmp_class:
            body["qmp_class"] = error.qmp_class
        outcome: dict[str, object] = {"status": "error", "error": body}
    else:
        outcome = {"status": "ok", "data": data}
    return operation.model_copy(update={"finished": time.time(), "outcome": outcome})


def _pci_of(bus: str, slot: int, function: int) -> PciAddress:
    return PciAddress(bus=bus, slot=slot, function=function)


def _planned_spec(spec: NicSpec, plan: AddPlan) -> NicSpec:
    """``spec`` with what planning chose filled in, so the NIC can be added back exactly the same."""
    chosen: dict[str, object] = {
        "id": plan.nic_id,
        "bus": plan.placement.bus,
        "addr": format_pci_addr(plan.placement.slot, plan.placement.function),
    }
    if plan.mac is not None:
        chosen["mac"] = plan.mac
    return spec.model_copy(update=chosen)


def _foreign_record(nic: Nic) -> NicRecord:
    """A record for removing a NIC qmpnet did not create: only its netdev is to be cleaned up after the unplug."""
    return NicRecord(id=nic.id, spec=None, netdev=nic.netdev, state="active", link=nic.link, pci=nic.pci)


def _asked_backend(spec: NicSpec, record: NicRecord) -> ObservedBackend:
    asked = backend_of(spec)
    hold = record.host
    if hold.tap is None:
        return asked
    options = {"bridge": hold.bridge or "", "tap": hold.tap}
    if hold.network is not None:
        return ObservedBackend(type="nat", options={"network": hold.network, **options})
    return ObservedBackend(type="bridge", options={**asked.options, **options})


def _known(nic: Nic, record: NicRecord | None, owner: str) -> KnownNic:
    """What the update runner needs to know of ``nic``: the backend as asked for and the host side, when recorded."""
    if record is None or record.spec is None:
        return KnownNic(nic, owner=owner)
    hold = record.host
    attachment = Attachment(tap=hold.tap, bridge=hold.bridge, network=hold.network, vfio_host=hold.vfio_host,
                            vfio_driver=hold.vfio_driver)
    return KnownNic(nic, _asked_backend(record.spec, record), attachment, hold.owner or owner)


def _check_id(nic_id: str) -> None:
    try:
        check_qemu_id(nic_id)
    except ValueError as err:
        raise InvalidRequest(f"id: {err}", field="id") from err


async def _next_within(
    get: Callable[[], Awaitable[QmpEvent]], get_nowait: Callable[[], QmpEvent | None], wait: float
) -> QmpEvent | None:
    """The next event within ``wait`` seconds, or ``None``; one queued at the deadline still counts."""
    try:
        async with asyncio.timeout(wait):
            return await get()
    except TimeoutError:
        return get_nowait()


async def _shielded(work: Awaitable[_T]) -> _T:
    """Run ``work`` to its end even if the caller is cancelled meanwhile (a change must not stop half-way)."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise
