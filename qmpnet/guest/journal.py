"""The journal: the one place where the lane reads and writes the guest's record (the ``GuestStore`` port).

QEMU is the truth for what exists; the record (:mod:`qmpnet.core.records`) holds what QEMU cannot tell: the NICs
qmpnet created and their lifecycle state, link intent, the host resources each NIC holds, the desired set, the
operations by id with their outcome, the QEMU instance. Every change is written here *before* its first QMP
command and again with its outcome, so a process killed between two commands leaves a record the next one
resolves (:mod:`qmpnet.core.recovery_plan`). Keeping every read and write of the record behind this one class
means that how a record is written (pruned, stamped, where the disk work happens) is decided once.

Finished operations stay in the record for ``lane.operation_window`` seconds (a repeated transaction is answered
from them, also after a restart) and are pruned on the next write after that. A write is synchronous, on the event
loop: a record is written to the page cache without fsync (:mod:`qmpnet.adapters.store.slots`), which takes less CPU
than handing it to a worker thread and back (at 20 guests hot-plugging at once, ~10% of the controller's CPU per
hot-add; docs/performance.md); only the desired set's fsync'd copy is written in a thread of its own, behind the
answer.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from qmpnet.core.model_base import replaced
from qmpnet.errors import QmpCommandError, QmpnetError

if TYPE_CHECKING:
    from qmpnet.core.ports import GuestStore
    from qmpnet.core.records import GuestRecord, NicRecord, OperationRecord

__all__ = ["Journal", "finished", "new_operation"]


class Journal:
    """One guest's record, read and written by its lane.

    Args:
        store: The record in the state store.
        keep: Seconds a finished operation is kept (``lane.operation_window``).
    """

    def __init__(self, store: GuestStore, *, keep: float) -> None:
        self._store = store
        self._keep = keep

    @property
    def key(self) -> str:
        """The guest's stable name in the store (the owner mark of its taps starts with it)."""
        return self._store.key

    @property
    def record(self) -> GuestRecord:
        """The record as last saved."""
        return self._store.record

    def nic(self, nic_id: str) -> NicRecord | None:
        """The record of NIC ``nic_id``, if qmpnet holds one."""
        return self._store.record.nics.get(nic_id)

    def operation(self, operation_id: str) -> OperationRecord | None:
        """The recorded operation ``operation_id``, if any."""
        return self._store.record.operations.get(operation_id)

    def pending(self, nic_id: str) -> bool:
        """Whether NIC ``nic_id``'s removal is pending (asked, not acked yet)."""
        nic = self.nic(nic_id)
        return nic is not None and nic.state == "removal_pending"

    def save(self, record: GuestRecord) -> None:
        """Write ``record`` (pruned of old finished operations) durably before returning.

        Raises:
            StoreUnavailable: The state directory cannot be written (nothing was changed).
        """
        self._store.save(record.pruned(time.time(), self._keep))

    def save_later(self, record: GuestRecord) -> None:
        """Make ``record`` (pruned) the current one; it is written behind the answer (:meth:`flush_soon`).

        For an operation's outcome: a process killed before the write leaves the record of the step before, and
        recovery answers the operation from what QEMU shows (:func:`~qmpnet.core.recovery_plan.answered_by_recovery`).
        """
        self._store.save_later(record.pruned(time.time(), self._keep))

    def flush_soon(self) -> None:
        """Write what is pending soon, unless the next write carries it first (the lane calls it as it lets go)."""
        self._store.flush_soon()

    def finish(
        self,
        operation: str,
        *,
        data: object = None,
        error: QmpnetError | None = None,
        started: OperationRecord | None = None,
    ) -> None:
        """Record the outcome of ``operation`` (as recorded, else ``started``; neither: nothing to record)."""
        current = self.operation(operation) or started
        if current is not None:
            self.save(self._store.record.with_operation(finished(current, data=data, error=error)))

    def forget_gone(self, nic_id: str) -> bool:
        """Whether recovery finished removing NIC ``nic_id`` while nobody asked; the note is dropped once told."""
        record = self._store.record
        if nic_id not in record.gone:
            return False
        self.save(replaced(record, {"gone": {k: v for k, v in record.gone.items() if k != nic_id}}))
        return True


def new_operation() -> str:
    """A fresh operation id, for a call that was not given one: ``op-`` and a random UUID (version 4) in hex.

    The UUID's bytes are made here as ``uuid.uuid4`` makes them (16 random bytes, the version and variant bits
    set), without its ``UUID`` object and the checks of its constructor (~1.5 us of a call's ~2).
    """
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # the variant of RFC 4122
    return f"op-{raw.hex()}"


def finished(operation: OperationRecord, *, data: object = None, error: QmpnetError | None = None) -> OperationRecord:
    """``operation`` with its outcome: ``error`` (its code, message, field, QMP class), else ok with ``data``."""
    if error is not None:
        body: dict[str, object] = {"code": error.code, "message": error.message}
        if error.field is not None:
            body["field"] = error.field
        if isinstance(error, QmpCommandError) and error.qmp_class:
            body["qmp_class"] = error.qmp_class
        outcome: dict[str, object] = {"status": "error", "error": body}
    else:
        outcome = {"status": "ok", "data": data}
    return replaced(operation, {"finished": time.time(), "outcome": outcome})
