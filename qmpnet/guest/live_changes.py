"""Recording live changes of a NIC: its link (``set_link``) and ``nic/update`` (move, VLANs, shaping, link).

Running an update is :mod:`.update`; this unit wraps both kinds of live change in the lane's record keeping: the
operation (and, for a link, the intent) is written before QEMU or the host is touched, the outcome after, and what
changed is merged into the NIC's record (the bridge or network it is on now, VLANs, shaping, link intent) and, for
a NIC in the desired set, into that set, so a restart and the reconcile loop see the NIC as it is now. A link
change that QEMU refuses puts the intent back; one with an unknown outcome keeps it, and recovery re-applies it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Literal

from qmpnet.core.desired_diff import with_added, with_link
from qmpnet.core.hotadd_plan import QmpCall
from qmpnet.core.records import OperationRecord
from qmpnet.errors import OutcomeUnknown, QmpnetError
from qmpnet.guest.hotadd_steps import Attachment
from qmpnet.guest.journal import finished, new_operation
from qmpnet.guest.nic_table import asked_backend, execute
from qmpnet.guest.unplugs import foreign_record

if TYPE_CHECKING:
    from qmpnet.core.inventory import Inventory
    from qmpnet.core.model import Nic, NicUpdate
    from qmpnet.core.records import GuestRecord, NicRecord
    from qmpnet.guest.parts import LaneParts
    from qmpnet.guest.update import KnownNic, UpdateResult

__all__ = ["LiveChanges"]

LinkState = Literal["up", "down"]


class LiveChanges:
    """The live changes of one guest's NICs (see the module docstring)."""

    def __init__(self, parts: LaneParts) -> None:
        self._parts = parts

    def link_of(self, nic_id: str) -> LinkState:
        """NIC ``nic_id``'s link as recorded (``up`` unless recorded ``down``)."""
        return "down" if self._parts.nics.links().get(nic_id) == "down" else "up"

    async def relink(self, inventory: Inventory, nic_id: str, link: LinkState, operation: str) -> Nic:
        """Set NIC ``nic_id``'s link, recording the intent first.

        Raises:
            QmpCommandError: QEMU refused (the intent is put back).
            OutcomeUnknown, GuestUnavailable: No answer (the intent stays: recovery re-applies it).
        """
        before = self.link_of(nic_id)
        journal = self._parts.journal
        started = OperationRecord(id=operation, op="nic/link", nic=nic_id, started=time.time())
        journal.save(_linked(journal.record.with_operation(started), nic_id, link))
        try:
            call = QmpCall("set_link", {"name": nic_id, "up": link == "up"})
            await execute(self._parts.monitor, self._parts.nics, call)
        except OutcomeUnknown:
            raise  # the intent stays recorded: recovery re-applies it
        except QmpnetError as err:
            journal.save(_linked(journal.record.with_operation(finished(started, error=err)), nic_id, before))
            raise
        nic = self._parts.nics.described(inventory.update(nic_id, link=link))
        journal.save_later(journal.record.with_operation(finished(started, data=nic.model_dump(mode="json"))))
        return nic

    async def update(self, inventory: Inventory, nic: Nic, update: NicUpdate, operation: str | None) -> Nic:
        """Change ``nic`` live as ``update`` says (:func:`~qmpnet.guest.update.run_update`) and record it.

        Raises:
            NotFound, Unsupported, Conflict: The host cannot do it (nothing was changed).
            QmpCommandError: QEMU refused a step (what was done is undone).
            OutcomeUnknown, GuestUnavailable: A step got no answer.
        """
        from qmpnet.guest.update import run_update  # noqa: PLC0415 - a hot-add or a new process does not load it

        journal = self._parts.journal
        record = journal.nic(nic.id)
        known = _known(nic, record, f"{journal.key}/{nic.id}")
        started = OperationRecord(id=operation or new_operation(), op="nic/update", nic=nic.id, started=time.time())
        journal.save(journal.record.with_operation(started))
        try:
            result = await run_update(self._parts.monitor, self._parts.host, known, update, self._parts.settings.update)
        except OutcomeUnknown:
            self._parts.nics.invalidate()
            raise
        except QmpnetError as err:
            self._parts.nics.invalidate()
            journal.save(journal.record.with_operation(finished(started, error=err)))
            raise
        changed = _merged(journal.record, nic, update, result, started.id)
        done = inventory.update(nic.id, link=result.nic.link, backend=result.nic.backend)
        warned = {"warnings": list(result.warnings)}
        journal.save(changed.with_operation(finished(started, data=done.model_copy(update=warned).model_dump(
            mode="json"))))
        return self._parts.nics.described(done).model_copy(update=warned)


def _linked(record: GuestRecord, nic_id: str, link: LinkState) -> GuestRecord:
    """``record`` with NIC ``nic_id``'s link intent, in the NIC's record and in the desired set."""
    linked = record.with_link(nic_id, link)
    return linked.model_copy(update={"desired": with_link(linked.desired, nic_id, link)})


def _merged(record: GuestRecord, nic: Nic, update: NicUpdate, result: UpdateResult, operation: str) -> GuestRecord:
    """``record`` with what a live update of ``nic`` changed: link, where it is, VLANs, shaping, the desired set."""
    changed = record.with_link(nic.id, result.nic.link)
    kept = changed.nics.get(nic.id) or foreign_record(nic).model_copy(update={"netdev": None})
    hold, spec = kept.host, kept.spec
    if result.attachment is not None:
        moved = result.attachment
        where = {"tap": moved.tap or hold.tap, "bridge": moved.bridge, "network": moved.network}
        hold = hold.model_copy(update=where)
    if spec is not None:
        changes: dict[str, object] = {"backend": update.backend} if update.backend is not None else {}
        changes |= {name: getattr(update, name) for name in ("vlan", "shape") if name in update.model_fields_set}
        if update.mtu is not None or update.backend is not None:  # a move alone takes the new bridge's MTU
            changes["mtu"] = update.mtu
        changes |= {"filter": update.filter} if update.changes_filter else {}
        spec = spec.model_copy(update=changes)
    changed = changed.with_nic(kept.model_copy(update={
        "host": hold, "spec": spec, "operation": operation, "link": result.nic.link,
        "view": result.backend or kept.view,
        "vlan": update.vlan if "vlan" in update.model_fields_set else kept.vlan,
        "shape": update.shape if "shape" in update.model_fields_set else kept.shape,
    }))
    if spec is not None and changed.desired is not None and any(s.id == nic.id for s in changed.desired.nics):
        changed = changed.model_copy(update={"desired": with_added(changed.desired, spec)})
    return changed


def _known(nic: Nic, record: NicRecord | None, owner: str) -> KnownNic:
    """What the update runner needs to know of ``nic``: the backend as asked for and the host side, when recorded."""
    from qmpnet.guest.update import KnownNic  # noqa: PLC0415 - as in LiveChanges.update

    if record is None or record.spec is None:
        return KnownNic(nic, owner=owner)
    hold = record.host
    attachment = Attachment(tap=hold.tap, bridge=hold.bridge, network=hold.network, vfio_host=hold.vfio_host,
                            vfio_driver=hold.vfio_driver)
    return KnownNic(nic, asked_backend(record.spec, record), attachment, hold.owner or owner, record.spec.filter)
