"""Recovery: what qmpnet's records say it began, against what QEMU shows now -> what to finish or undo (pure).

Any qmpnet process may be killed between two QMP commands, QEMU may restart on the same socket, and another QMP
client may unplug a NIC behind qmpnet's back. Whoever next takes the guest reads QEMU (the truth for what
exists), compares it with the records (:mod:`qmpnet.core.records`: what only qmpnet knows) and converges:

======================  =====================  ==========================================================
record state            device in QEMU         action
======================  =====================  ==========================================================
any (another instance)  (not ours)             ``forget``: release host resources; QEMU took the rest
``adding``              present                ``activate``: the add got through; re-apply link intent
``adding``              absent                 ``undo_add``: delete our netdev (if still there), release host
``active``              present                ``relink``: re-apply link intent (full recovery only)
``active``              absent                 ``vanished``: unplugged behind our back; clean up as above
``removal_pending``     present                ``unplug``: ask again if QEMU's acceptance is not recorded
                                               (``pending_since``; full recovery only); keep pending
``removal_pending``     absent                 ``finish``: the ack came while nobody listened; clean up
======================  =====================  ==========================================================

A recorded netdev is always deleted when its NIC is gone: ``info network`` is HMP text, and deleting one that is
already gone costs one ``DeviceNotFound`` answer, while keeping one would keep its hostfwd ports or its tap.
Devices and netdevs without a record are not qmpnet's: they are listed, never touched. *Full* recovery runs
when a connection starts, before any request is served; a *light* one whenever the lane re-reads the guest (after
a refused or unanswered command, on ``list_nics``, and on every periodic resync), so it never re-sends commands
that only matter after a reconnect (link intent, a pending unplug's ``device_del``) nor sweeps taps.

A pending unplug whose record holds ``pending_since`` was accepted by this QEMU instance, which still has it in
progress: asking again is refused ("already in the process of unplug"), or, on a PCIe port after QEMU's own
5-second window, presses the attention button again, which a Linux guest still in its 5-second wait takes as a
cancel (Nova's detach loop did both). So only an unplug whose ``device_del`` answer was lost (the process died
waiting for it) is asked again; one that stays stuck is reported (:mod:`qmpnet.core.stuck_unplugs`).

An operation's outcome may be written after its answer (:mod:`qmpnet.adapters.store`: one write before the answer, the
intent). An operation a killed process left without outcome is answered from what recovery found
(:func:`answered_by_recovery`): an add whose NIC is active, a link change whose NIC is there (recovery re-applied
the intent), a removal whose NIC is gone. Anything else stays *interrupted* (``outcome_unknown`` to a repeat).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Collection

    from qmpnet.core.records import GuestRecord, NicRecord, OperationRecord

__all__ = ["Action", "RecoveryStep", "answered_by_recovery", "plan_recovery"]

Action = Literal["forget", "activate", "undo_add", "relink", "vanished", "unplug", "finish"]


# A NamedTuple, not a frozen dataclass: a value every process that connects defines, and a NamedTuple is
# defined in a fifth of the instructions (docs/performance.md).
class RecoveryStep(NamedTuple):
    """What to do about one recorded NIC.

    Attributes:
        action: See the module docstring's table.
        nic: The record.
    """

    action: Action
    nic: NicRecord


def plan_recovery(
    record: GuestRecord,
    *,
    instance: str | None,
    devices: Collection[str],
    full: bool,
) -> list[RecoveryStep]:
    """The steps that bring ``record`` and the guest back in line (empty when they agree).

    Args:
        record: The guest's record.
        instance: The QEMU instance now answering (``None``: unknown, treated as the recorded one).
        devices: Every device id QEMU shows.
        full: Also re-apply link intent and re-ask pending unplugs QEMU is not known to have accepted (after a
            reconnect).
    """
    if record.instance is not None and instance is not None and record.instance != instance:
        return [RecoveryStep("forget", nic) for nic in record.nics.values()]
    steps: list[RecoveryStep] = []
    for nic in record.nics.values():
        present = nic.id in devices
        if nic.state == "adding":
            steps.append(RecoveryStep("activate" if present else "undo_add", nic))
        elif nic.state == "active":
            if not present:
                steps.append(RecoveryStep("vanished", nic))
            elif full:
                steps.append(RecoveryStep("relink", nic))
        elif not present:
            steps.append(RecoveryStep("finish", nic))
        elif full and nic.pending_since is None:
            steps.append(RecoveryStep("unplug", nic))
    return steps


def answered_by_recovery(operation: OperationRecord, record: GuestRecord, devices: Collection[str]) -> str | None:
    """The NIC that now answers ``operation``, left without outcome by a killed process (``None``: interrupted).

    Called after a full recovery has settled ``record`` against QEMU (``devices``): a ``nic/add`` is answered by
    the active NIC it created, a ``nic/link`` by its NIC if present, a ``nic/del`` by its NIC's absence.
    """
    match operation.op:
        case "nic/add":
            made = [nic.id for nic in record.nics.values() if nic.operation == operation.id and nic.state == "active"]
            return made[0] if made and made[0] in devices else None
        case "nic/link":
            nic = record.nics.get(operation.nic or "")
            pending = nic is not None and nic.state != "active"
            return operation.nic if operation.nic in devices and not pending else None
        case "nic/del":
            gone = operation.nic is not None and operation.nic not in devices and operation.nic not in record.nics
            return operation.nic if gone else None
        case _:
            return None
