"""Removing a NIC: QEMU's two-phase unplug, the pending removals it leaves, and the cleanup once the guest lets go.

``device_del`` only *asks* the guest OS; the ``DEVICE_DELETED`` event (matched on ``data.device``: virtio sends a
first one for its backend without it) is the answer, and only then is the netdev deleted (QEMU would delete a
netdev still attached to a NIC) and the host side released. The listener is registered before ``device_del``, so
an answer cannot slip past. If the guest does not answer within the timeout the removal is *pending*: the record
says so, callers may wait for it (:meth:`Unplugs.wait_pending`), and whoever sees the device gone later finishes it
with :meth:`Unplugs.clean_up`: a late event (:mod:`.late_events`) or recovery (:mod:`.recoverer`).

``device_del`` is sent once per removal. Once QEMU has accepted it, the record notes since when
(``pending_since``); a repeated removal of a pending NIC only waits for the answer (:meth:`Unplugs.wait_pending`)
and a restart does not ask again (:mod:`qmpnet.core.recovery_plan`), since QEMU refuses a second request while
the first is in progress. One that stays unanswered is reported once as stuck (:mod:`.stuck_watch`).

The removal is its own unit because three callers finish it (the call itself, a late event, recovery) and a
verified hot-add undoes itself with it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import suppress
from typing import TYPE_CHECKING, Literal

from qmpnet.core.desired_diff import without
from qmpnet.core.hotadd_plan import QmpCall
from qmpnet.core.model import RemoveResult
from qmpnet.core.records import NicRecord, OperationRecord
from qmpnet.errors import QmpCommandError, QmpnetError
from qmpnet.guest.host_release import release_host_side
from qmpnet.guest.journal import finished
from qmpnet.guest.nic_table import execute
from qmpnet.guest.stuck_watch import StuckWatch

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from qmpnet.core.model import Nic
    from qmpnet.core.ports import QmpEvent
    from qmpnet.core.records import DesiredSet
    from qmpnet.guest.parts import LaneParts

__all__ = ["Unplugs", "foreign_record"]

log = logging.getLogger(__name__)

_ANSWERS = frozenset({"DEVICE_DELETED", "DEVICE_UNPLUG_GUEST_ERROR"})


class Unplugs:
    """The removals of one guest's NICs (see the module docstring)."""

    def __init__(self, parts: LaneParts) -> None:
        self._parts = parts
        #: The watch for pending removals that stay unanswered (started and stopped by the guest's context).
        self.stuck = StuckWatch(parts)

    async def unplug(self, nic: Nic, wait: float, operation: str) -> RemoveResult:
        """Ask the guest to let NIC ``nic`` go and wait up to ``wait`` seconds for its answer; record the outcome.

        Returns:
            ``removed`` (cleaned up), or ``removal_pending`` (the guest has not answered yet).

        Raises:
            QmpCommandError: QEMU refused ``device_del``, or the guest refused the unplug (the NIC stays).
            OutcomeUnknown, GuestUnavailable: No answer to ``device_del`` (the record stays pending).
        """
        journal = self._parts.journal
        record = journal.nic(nic.id) or foreign_record(nic)
        desired = journal.record.desired
        started = OperationRecord(id=operation, op="nic/del", nic=nic.id, started=time.time())
        asked = journal.record.with_operation(started).with_nic(
            record.model_copy(update={"state": "removal_pending", "operation": operation})
        )
        journal.save(asked.model_copy(update={"desired": without(desired, nic.id)}))
        self._parts.nics.waiter(nic.id)
        with self._parts.nics.unplugging(nic.id):
            async with self._parts.monitor.listen(_ANSWERS, lambda e: e.device == nic.id) as stream:
                try:
                    await execute(self._parts.monitor, self._parts.nics, QmpCall("device_del", {"id": nic.id}))
                except QmpCommandError as err:
                    if "in the process of unplug" not in err.message:
                        self._refused(record, started, desired, err)
                        raise
                # On OutcomeUnknown the record stays removal_pending: recovery finishes it once the device is gone.
                self._accepted(nic.id)
                event = await _next_within(stream.get, stream.get_nowait, wait)
        self._parts.nics.removal_pending(nic.id)
        return await self._answered(nic.id, event, record, started, desired, wait)

    async def _answered(  # noqa: PLR0913, PLR0917 - the unplug's state, passed on from unplug()
        self,
        nic_id: str,
        event: QmpEvent | None,
        record: NicRecord,
        started: OperationRecord,
        desired: DesiredSet | None,
        wait: float,
    ) -> RemoveResult:
        if event is None:
            log.info("guest %s: NIC %s removal pending (no ack within %g s)", self._parts.name, nic_id, wait)
            self._parts.journal.save(self._parts.journal.record.with_operation(
                finished(started, data={"id": nic_id, "state": "removal_pending"})
            ))
            self._parts.events.emit("nic_removal_pending", nic=self._parts.nics.current(nic_id), nic_id=nic_id)
            return RemoveResult(id=nic_id, state="removal_pending")
        if event.name == "DEVICE_UNPLUG_GUEST_ERROR":
            error = QmpCommandError(
                f"device_del: the guest refused to unplug {nic_id}",
                qmp_class="DEVICE_UNPLUG_GUEST_ERROR",
                command="device_del",
            )
            self._refused(record, started, desired, error)
            self._parts.events.emit("unplug_rejected", nic_id=nic_id)
            raise error
        await self.clean_up(self._parts.journal.record.nics[nic_id])
        self._parts.journal.save_later(self._parts.journal.record.with_operation(
            finished(started, data={"id": nic_id, "state": "removed"})
        ))
        self._parts.events.emit("nic_removed", nic_id=nic_id)
        return RemoveResult(id=nic_id, state="removed")

    def _accepted(self, nic_id: str) -> None:
        """QEMU has NIC ``nic_id``'s unplug request in progress: record since when (written behind the call).

        A process killed before the write leaves ``pending_since`` unset, and the next one asks again (refused by
        QEMU as already in progress, which is read as pending).
        """
        journal = self._parts.journal
        record = journal.nic(nic_id)
        if record is None or record.pending_since is not None:
            return
        journal.save_later(journal.record.with_nic(record.model_copy(update={"pending_since": time.time()})))
        journal.flush_soon()
        self.stuck.poke()

    def _refused(
        self, record: NicRecord, started: OperationRecord, desired: DesiredSet | None, error: QmpnetError
    ) -> None:
        """The NIC stays: its record and the desired set as before the unplug, the operation with its error."""
        refused = self._parts.journal.record.with_nic(record).with_operation(finished(started, error=error))
        self._parts.journal.save(refused.model_copy(update={"desired": desired}))
        self._parts.nics.wake(record.id)

    async def clean_up(self, nic: NicRecord, *, by_recovery: bool = False) -> None:
        """The NIC's device is gone: delete its netdev, release the host side, drop the record, wake waiters."""
        if nic.netdev is not None:
            try:
                await execute(self._parts.monitor, self._parts.nics, QmpCall("netdev_del", {"id": nic.netdev}))
            except QmpCommandError as err:
                if err.qmp_class != "DeviceNotFound":
                    log.warning("guest %s: netdev_del %s after unplug of %s: %s",
                                self._parts.name, nic.netdev, nic.id, err)
        await self.release_host(nic)
        self._parts.nics.removed(nic.id)
        self.drop(nic.id, by_recovery=by_recovery)
        log.info("guest %s: removed NIC %s", self._parts.name, nic.id)

    def drop(self, nic_id: str, *, by_recovery: bool = False) -> None:
        """Forget NIC ``nic_id``'s record (remembered as gone when recovery finished it) and wake its waiters."""
        record = self._parts.journal.record
        if nic_id in record.nics:
            self._parts.journal.save(record.without_nic(nic_id, gone_at=time.time() if by_recovery else None))
        self._parts.nics.wake(nic_id)

    async def release_host(self, nic: NicRecord) -> None:
        """Delete the NIC's tap and its filter, end its passt, give its PCI function back; failures are logged."""
        if self._parts.host is not None:
            await release_host_side(self._parts.host, nic, self._parts.name)

    async def ask_again(self, nic_id: str) -> None:
        """Send ``device_del`` for a pending removal QEMU is not known to have accepted (after a reconnect).

        Raises:
            QmpCommandError, OutcomeUnknown, GuestUnavailable: QEMU refused or did not answer.
        """
        try:
            await self._parts.monitor.execute("device_del", {"id": nic_id})
        except QmpCommandError as err:
            if "in the process of unplug" not in err.message:
                raise
        self._accepted(nic_id)
        self._parts.nics.waiter(nic_id)

    async def wait_pending(self, nic_id: str, wait: float) -> RemoveResult:
        """Wait up to ``wait`` seconds for NIC ``nic_id``'s pending removal to finish (no lane needed)."""
        waiter = self._parts.nics.waiter(nic_id)
        with suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await waiter.wait()
        pending = self._parts.nics.pending(nic_id)
        state: Literal["removed", "removal_pending"] = "removal_pending" if pending else "removed"
        return RemoveResult(id=nic_id, state=state)


def foreign_record(nic: Nic) -> NicRecord:
    """A record for removing a NIC qmpnet did not create: only its netdev is to be cleaned up after the unplug."""
    return NicRecord(id=nic.id, spec=None, netdev=nic.netdev, state="active", link=nic.link, pci=nic.pci)


async def _next_within(
    get: Callable[[], Awaitable[QmpEvent]], get_nowait: Callable[[], QmpEvent | None], wait: float
) -> QmpEvent | None:
    """The next event within ``wait`` seconds, or ``None``; one queued at the deadline still counts."""
    try:
        async with asyncio.timeout(wait):
            return await get()
    except TimeoutError:
        return get_nowait()
