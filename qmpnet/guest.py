"""One guest: its serial lane, its NICs' lifecycles, and the execution of plans with rollback.

Every public call runs in the guest's *lane*: an ``asyncio.Lock`` taken in arrival order, so the QMP steps of two
calls on one guest never interleave, while different guests (different ``Guest`` objects) run in parallel. A
bounded number of calls may wait for the lane; more get ``busy`` at once rather than queueing without limit.

A NIC moves through ``adding -> active -> removal_pending -> removed``. Removal is QEMU's two-phase unplug:
``device_del`` only *asks* the guest OS; the ``DEVICE_DELETED`` event (matched on ``data.device``: virtio sends
a first one for its backend without it) is the answer, and only then is the netdev deleted (QEMU would delete a
netdev still attached to a NIC). If the guest does not answer within the timeout the call returns
``removal_pending`` rather than failing; the event pump finishes the removal whenever the answer comes.

A hot-add runs the plan's steps in order; on a QEMU error it runs the undo of the steps already done in reverse,
so the guest is exactly as before. On an *unknown* outcome (timeout, lost connection) it does not guess: undoing
``netdev_add`` while a ``device_add`` may have succeeded would leave a NIC without a backend, so the caller gets
``outcome_unknown`` and the lane re-reads the guest before its next change.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar

from qmpnet.capture import check_capture, run_capture
from qmpnet.errors import (
    Busy,
    GuestUnavailable,
    InvalidRequest,
    NotFound,
    OutcomeUnknown,
    QmpCommandError,
    QmpnetError,
)
from qmpnet.inventory import Inventory
from qmpnet.model import (
    CaptureResult,
    GuestEvent,
    GuestEventName,
    ModelInfo,
    Nic,
    NicSpec,
    NicUpdate,
    ObservedBackend,
    RemoveResult,
    parse_nic_spec,
    parse_nic_update,
)
from qmpnet.names import check_qemu_id
from qmpnet.plan import QmpCall, needs_tap_fds, plan_add
from qmpnet.policy import check_spec, check_update
from qmpnet.settings import Settings
from qmpnet.steps import Attachment, UndoStack, prepare_host, run_steps
from qmpnet.update import KnownNic, run_update

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

    from qmpnet.ports import HostNetwork, Monitor, QmpEvent

__all__ = ["Guest"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")
#: Options `info network` shows that mean nothing outside QEMU (its own fd numbers for a passed tap).
_QEMU_INTERNAL_OPTIONS = frozenset({"fd", "fds"})


class Guest:
    """The network of one running QEMU guest, changed through its QMP monitor.

    Use as an async context manager (``qmpnet.connect`` does this for you): the context owns the background task
    that finishes late unplugs.

    Args:
        monitor: The guest's connected monitor.
        name: The guest's name, for logs and events.
        settings: Timeouts, lane limits and the caller policy.
        host: The host side for bridge, NAT, tap and VFIO backends (``None``: those backends are unsupported).
    """

    def __init__(
        self,
        monitor: Monitor,
        *,
        name: str = "guest",
        settings: Settings | None = None,
        host: HostNetwork | None = None,
    ) -> None:
        self.name = name
        self._monitor = monitor
        self._host = host
        self._attachments: dict[str, Attachment] = {}
        self._backends: dict[str, ObservedBackend] = {}  # as asked for, for NICs added on this connection
        self._settings = settings or Settings()
        self._lane = asyncio.Lock()
        self._waiting = 0
        self._inventory: Inventory | None = None
        self._links: dict[str, str] = {}
        self._pending: dict[str, str | None] = {}  # NIC id -> netdev id, while removal is pending
        self._removing: set[str] = set()
        self._removed: dict[str, asyncio.Event] = {}
        self._subscribers: list[Callable[[GuestEvent], None]] = []
        self._tasks: asyncio.TaskGroup | None = None
        monitor.on_event(self._on_event)

    async def __aenter__(self) -> Self:
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        tasks, self._tasks = self._tasks, None
        if tasks is not None:
            for task in list(tasks._tasks):  # noqa: SLF001 - TaskGroup has no public way to cancel its children
                task.cancel()
            await tasks.__aexit__(None, None, None)

    # ----------------------------------------------------------------------------------------------- public API

    def subscribe(self, callback: Callable[[GuestEvent], None]) -> None:
        """Call ``callback`` with every :class:`GuestEvent` (NIC added, removed, link changed, ...)."""
        self._subscribers.append(callback)

    async def add_nic(self, spec: NicSpec | Mapping[str, Any]) -> Nic:
        """Hot-add a NIC described by ``spec``; atomic: on failure the guest is left as before.

        Waits for the guest's lane, then runs ``netdev_add``, ``device_add`` and (for ``link: down``) ``set_link``.

        Raises:
            InvalidRequest: A field of ``spec`` is invalid (nothing was sent).
            Forbidden: The policy refuses an option (nothing was sent).
            Conflict: The id or MAC is already in the guest.
            NoFreeSlot: No PCI place is free.
            QmpCommandError: QEMU refused a step (the earlier steps were undone).
            OutcomeUnknown: A step got no answer; the guest may hold part of the NIC.
            GuestUnavailable, Busy: The guest cannot be reached or has too many waiting requests.
        """
        nic_spec = parse_nic_spec(spec)
        check_spec(nic_spec, self._settings.policy)
        async with self._lane_turn():
            # Once started, a hot-add runs to its end (or its rollback) even if the caller goes away.
            nic = await _shielded(self._add(nic_spec))
        log.info("guest %s: added NIC %s (%s, %s) at %s", self.name, nic.id, nic.model, nic.mac, nic.pci)
        self._emit("nic_added", nic=nic)
        return nic

    async def _add(self, spec: NicSpec) -> Nic:
        inventory = await self._fresh_inventory()
        vhost = self._host is not None and needs_tap_fds(spec) and self._host.vhost()
        plan = plan_add(spec, inventory.view(), vhost=vhost)
        undo = UndoStack()
        attachment = Attachment()
        try:
            attachment = await prepare_host(self._host, self._monitor, spec, plan, f"{self.name}/{plan.nic_id}", undo)
            await run_steps(self._monitor, plan.steps, undo, unplug_timeout=self._settings.qmp.rollback_unplug_timeout)
        except OutcomeUnknown as err:
            self._inventory = None
            err.add_note("qmpnet did not roll back: QEMU may have applied the step; list the NICs to see")
            raise
        except QmpnetError as err:
            self._inventory = None
            if not await undo.unwind(err):
                # The NIC is still plugged: finish its removal (netdev, host side) when the guest lets go.
                self._attachments[plan.nic_id] = attachment
                self._mark_pending(plan.nic_id, plan.netdev_id)
            raise
        self._attachments[plan.nic_id] = attachment
        nic = inventory.added(plan, spec)
        if attachment.bridge is not None:
            nic = inventory.update(nic.id, backend=_bridge_backend(attachment))
        if nic.backend is not None:
            self._backends[nic.id] = nic.backend
        self._links[nic.id] = nic.link
        return nic

    async def remove_nic(self, nic_id: str, timeout: float | None = None) -> RemoveResult:
        """Hot-remove NIC ``nic_id``: ``device_del``, wait for the guest's ack, then ``netdev_del``.

        Waits at most ``timeout`` seconds (default: the ``qmp.unplug_timeout`` setting) for ``DEVICE_DELETED``.

        Returns:
            ``removed``, or ``removal_pending`` if the guest has not acked in time; the removal then completes in
            the background when it does.

        Raises:
            InvalidRequest: ``nic_id`` or ``timeout`` is malformed.
            NotFound: No NIC with that id.
            QmpCommandError: QEMU refused ``device_del``, or the guest refused the unplug.
            OutcomeUnknown, GuestUnavailable, Busy: As for :meth:`add_nic`.
        """
        _check_id(nic_id)
        wait = self._settings.qmp.unplug_timeout if timeout is None else timeout
        if not (math.isfinite(wait) and wait >= 0):
            raise InvalidRequest("timeout: must be a finite number of seconds, zero or more", field="timeout")
        if nic_id in self._pending:
            # Waiting for the guest's ack needs no QMP command, so it happens outside the lane.
            return await self._wait_pending(nic_id, wait)
        async with self._lane_turn():
            if nic_id in self._pending:
                return RemoveResult(id=nic_id, state="removal_pending")
            inventory = await self._fresh_inventory()
            nic = inventory.nics.get(nic_id)
            if nic is None:
                raise NotFound(f"id: no NIC {nic_id!r} in guest {self.name}", field="id")
            # Once device_del is sent the outcome must be recorded (pending or removed), caller or not.
            return await _shielded(self._unplug(inventory, nic, wait))

    async def set_link(self, nic_id: str, up: bool) -> Nic:
        """Set the link of NIC ``nic_id`` up or down (the guest sees carrier change).

        Raises:
            InvalidRequest: ``nic_id`` is malformed.
            NotFound: No NIC with that id.
            QmpCommandError, OutcomeUnknown, GuestUnavailable, Busy: As for :meth:`add_nic`.
        """
        _check_id(nic_id)
        async with self._lane_turn():
            inventory = await self._fresh_inventory()
            if nic_id not in inventory.nics:
                raise NotFound(f"id: no NIC {nic_id!r} in guest {self.name}", field="id")
            await self._execute(QmpCall("set_link", {"name": nic_id, "up": up}))
            link: Literal["up", "down"] = "up" if up else "down"
            self._links[nic_id] = link
            nic = inventory.update(nic_id, link=link)
        self._emit("link_changed", nic=nic)
        return nic

    async def update_nic(self, update: NicUpdate | Mapping[str, Any]) -> Nic:
        """Change a NIC live without unplugging it: move it, set its VLANs, shape it, set its link (qmpnet.update).

        Atomic: on failure what was done is undone. Waits for the lane, the host work and, for a move, the link flap.

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
            known = KnownNic(nic, self._backends.get(nic.id), self._attachments.get(nic.id), f"{self.name}/{nic.id}")
            try:
                result = await _shielded(
                    run_update(self._monitor, self._host, known, nic_update, self._settings.update)
                )
            except QmpnetError:
                self._inventory = None
                raise
            if result.attachment is not None:
                self._attachments[nic.id] = result.attachment
            if result.backend is not None:
                self._backends[nic.id] = result.backend
            self._links[nic.id] = result.nic.link
            nic = inventory.update(nic.id, link=result.nic.link, backend=result.nic.backend)
        self._emit("nic_updated", nic=nic)
        return nic

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
            self._inventory = None
            inventory = await self._fresh_inventory()
            nics = []
            for nic in inventory.nics.values():
                update: dict[str, object] = {}
                asked = self._backends.get(nic.id)
                if asked is not None:
                    # QEMU's view (defaults such as net=10.0.2.0) completed with what was asked for (hostfwd,
                    # the bridge and tap behind an fd, which `info network` cannot show).
                    seen = nic.backend.options if nic.backend is not None else {}
                    seen = {k: v for k, v in seen.items() if k not in _QEMU_INTERNAL_OPTIONS}
                    update["backend"] = ObservedBackend(type=asked.type, options={**seen, **asked.options})
                if nic.model.startswith("virtio-net") and nic.state == "active":
                    update["rx_filter"] = await self._monitor.rx_filter(nic.id)
                nics.append(nic.model_copy(update=update))
            return nics

    async def models(self) -> list[ModelInfo]:
        """The NIC models this QEMU offers, with bus kind, nominal speed and whether qmpnet hot-plugs them.

        Raises:
            OutcomeUnknown, GuestUnavailable, Busy: As for :meth:`add_nic`.
        """
        async with self._lane_turn():
            return await self._monitor.models()

    # ------------------------------------------------------------------------------------------------ the lane

    @asynccontextmanager
    async def _lane_turn(self, *, bounded: bool = True) -> AsyncIterator[None]:
        if bounded and self._waiting >= self._settings.lane.max_waiting:
            raise Busy(f"guest {self.name}: {self._waiting} requests are already waiting")
        self._waiting += 1
        try:
            await self._lane.acquire()
        finally:
            self._waiting -= 1
        try:
            yield
        finally:
            self._lane.release()

    async def _fresh_inventory(self) -> Inventory:
        if self._inventory is None:
            observation = await self._monitor.observe()
            self._inventory = Inventory.from_observation(observation, self._links, set(self._pending))
        return self._inventory

    async def _execute(self, call: QmpCall) -> object:
        try:
            return await self._monitor.execute(call.command, call.arguments)
        except QmpnetError:
            self._inventory = None
            raise

    # ------------------------------------------------------------------------------------------------- removal

    async def _unplug(self, inventory: Inventory, nic: Nic, wait: float) -> RemoveResult:
        events = {"DEVICE_DELETED", "DEVICE_UNPLUG_GUEST_ERROR"}
        self._removing.add(nic.id)
        try:
            async with self._monitor.listen(events, lambda e: e.device == nic.id) as stream:
                try:
                    await self._execute(QmpCall("device_del", {"id": nic.id}))
                except QmpCommandError as err:
                    if "in the process of unplug" not in err.message:
                        raise
                event = await _next_within(stream.get, stream.get_nowait, wait)
        finally:
            self._removing.discard(nic.id)
        if event is None:
            self._mark_pending(nic.id, nic.netdev)
            inventory.update(nic.id, state="removal_pending")
            log.info("guest %s: NIC %s removal pending (no ack within %g s)", self.name, nic.id, wait)
            self._emit("nic_removal_pending", nic_id=nic.id)
            return RemoveResult(id=nic.id, state="removal_pending")
        if event.name == "DEVICE_UNPLUG_GUEST_ERROR":
            self._emit("unplug_rejected", nic_id=nic.id)
            raise QmpCommandError(
                f"device_del: the guest refused to unplug {nic.id}",
                qmp_class="DEVICE_UNPLUG_GUEST_ERROR",
                command="device_del",
            )
        await self._delete_backend(nic.id, nic.netdev)
        return RemoveResult(id=nic.id, state="removed")

    def _mark_pending(self, nic_id: str, netdev: str | None) -> None:
        self._pending[nic_id] = netdev
        self._removed[nic_id] = asyncio.Event()

    async def _delete_backend(self, nic_id: str, netdev: str | None) -> None:
        if netdev is not None:
            try:
                await self._execute(QmpCall("netdev_del", {"id": netdev}))
            except QmpCommandError as err:
                log.warning("guest %s: netdev_del %s after unplug of %s: %s", self.name, netdev, nic_id, err)
        await self._release_host(nic_id)
        if self._inventory is not None:
            self._inventory.removed(nic_id)
        self._links.pop(nic_id, None)
        log.info("guest %s: removed NIC %s", self.name, nic_id)
        self._emit("nic_removed", nic_id=nic_id)

    async def _release_host(self, nic_id: str) -> None:
        self._backends.pop(nic_id, None)
        attachment = self._attachments.pop(nic_id, None)
        if attachment is None or self._host is None:
            return
        try:
            if attachment.tap is not None:
                await self._host.delete_tap(attachment.tap)
            if attachment.vfio_host is not None and attachment.vfio_driver is not None:
                await self._host.restore_vfio(attachment.vfio_host, attachment.vfio_driver)
        except QmpnetError as err:
            log.warning("guest %s: releasing the host side of %s: %s", self.name, nic_id, err)

    async def _wait_pending(self, nic_id: str, wait: float) -> RemoveResult:
        with suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._removed[nic_id].wait()
        state: Literal["removed", "removal_pending"] = "removal_pending" if nic_id in self._pending else "removed"
        return RemoveResult(id=nic_id, state=state)

    def _on_event(self, event: QmpEvent) -> None:
        if event.name != "DEVICE_DELETED" or event.device is None:
            return
        if event.device in self._pending and self._tasks is not None:
            self._tasks.create_task(
                self._finish_removal(event.device), name=f"qmpnet[guest={self.name}].finish-removal"
            )
        elif event.device not in self._removing:
            self._inventory = None  # somebody else unplugged a device: re-read before the next change

    async def _finish_removal(self, nic_id: str) -> None:
        try:
            # Internal work is not subject to the lane's limit: a late ack must always be completed.
            async with self._lane_turn(bounded=False):
                await self._delete_backend(nic_id, self._pending[nic_id])
                del self._pending[nic_id]
        except (GuestUnavailable, OutcomeUnknown) as err:
            log.warning("guest %s: could not finish the removal of %s: %s", self.name, nic_id, err)
        finally:
            done = self._removed.pop(nic_id, None) if nic_id not in self._pending else self._removed.get(nic_id)
            if done is not None:
                done.set()
            if nic_id in self._pending:
                self._removed[nic_id] = asyncio.Event()

    def _emit(self, name: GuestEventName, *, nic: Nic | None = None, nic_id: str | None = None) -> None:
        if not self._subscribers:
            return
        event = GuestEvent(name=name, ts=time.time(), guest=self.name, nic=nic, id=nic.id if nic else nic_id)
        for callback in self._subscribers:
            try:
                callback(event)
            except Exception:
                log.exception("guest %s: event subscriber failed on %s", self.name, name)


def _bridge_backend(attachment: Attachment) -> ObservedBackend:
    options = {"bridge": attachment.bridge or "", "tap": attachment.tap or ""}
    if attachment.network is not None:
        return ObservedBackend(type="nat", options={"network": attachment.network, **options})
    return ObservedBackend(type="bridge", options=options)


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
