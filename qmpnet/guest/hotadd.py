"""Carrying out a hot-add: record first, then host and QMP steps with their undo, re-planning once if QEMU refuses.

The plan is pure (:mod:`qmpnet.core.hotadd_plan`) and running its steps is :mod:`.hotadd_steps`; this unit is what
lies between: the operation and the NIC's ``adding`` record go into one write before the first QMP command, the
host resources are recorded as soon as they exist, and the outcome is written once known. On a QEMU error the undo
stack runs, so the guest is exactly as before. If QEMU refused the plan itself (an id or a PCI slot another client
took meanwhile), the lane reads the guest again and plans once more before answering. On an *unknown* outcome
(timeout, lost connection) it does not guess: the record stays ``adding`` with the host resources it holds, the
caller gets ``outcome_unknown``, and the next read of the guest settles it.
"""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING

from qmpnet.core.desired_diff import with_added
from qmpnet.core.hotadd_plan import AddPlan, needs_tap_fds, plan_add
from qmpnet.core.model import NicSpec, PasstBackend, PciAddress, TapBackend
from qmpnet.core.model_base import replaced, trusted
from qmpnet.core.names import format_pci_addr
from qmpnet.core.records import HostHold, NicRecord, OperationRecord
from qmpnet.errors import OutcomeUnknown, QmpCommandError, QmpnetError, Unsupported
from qmpnet.guest.hotadd_steps import Attachment, HostLink, host_link, prepare_host, run_steps
from qmpnet.guest.journal import finished
from qmpnet.guest.undo import UndoStack

if TYPE_CHECKING:
    from qmpnet.core.inventory import Inventory
    from qmpnet.core.model import Nic
    from qmpnet.guest.parts import LaneParts
    from qmpnet.guest.recoverer import Recoverer
    from qmpnet.guest.unplugs import Unplugs

__all__ = ["HotAdd"]

log = logging.getLogger(__name__)
#: QEMU's words when a plan was refused because another client took an id or a PCI place meanwhile.
_REFUSED = re.compile(r"Duplicate (?:device )?ID|already exists|not available for|no slot/function available")


class HotAdd:
    """The hot-adds of one guest (see the module docstring)."""

    def __init__(self, parts: LaneParts, *, reader: Recoverer, unplugs: Unplugs) -> None:
        self._parts = parts
        self._reader = reader
        self._unplugs = unplugs

    async def add(self, spec: NicSpec, operation: str) -> Nic:
        """Add the NIC ``spec`` describes, recorded as ``operation``; atomic (see the module docstring).

        Raises:
            Conflict, NoFreeSlot, InvalidRequest, Unsupported: Planning or the host refused (nothing was sent).
            QmpCommandError: QEMU refused a step (the earlier steps were undone).
            OutcomeUnknown, GuestUnavailable: A step got no answer, or the guest cannot be reached.
        """
        # The operation is recorded together with the NIC's `adding` record, in one write before the first QMP
        # command (_run); what fails before that (reading, planning) records the operation with its error.
        started = trusted(OperationRecord, {"id": operation, "op": "nic/add", "nic": spec.id, "started": time.time()})
        try:
            inventory = await self._reader.fresh()
            plan, record = await self._run(spec, inventory, started)
        except QmpCommandError as err:
            if not _REFUSED.search(err.message):
                self._parts.journal.finish(operation, error=err, started=started)
                raise
            log.info("guest %s: QEMU refused the plan (%s): reading the guest and planning again",
                     self._parts.name, err)
            try:
                inventory = await self._reader.fresh()
                plan, record = await self._run(spec, inventory, started)
            except QmpnetError as again:
                self._parts.journal.finish(operation, error=again, started=started)
                raise
        except OutcomeUnknown:
            raise
        except QmpnetError as err:
            self._parts.journal.finish(operation, error=err, started=started)
            raise
        return await self._added(spec, inventory, plan, record, operation)

    async def _added(
        self, spec: NicSpec, inventory: Inventory, plan: AddPlan, record: NicRecord, operation: str
    ) -> Nic:
        """Record the NIC active, in the desired set, and the operation's outcome, in one write."""
        journal = self._parts.journal
        done = journal.record.with_nic(record)
        nic = self._parts.nics.described(inventory.added(plan, spec))
        if plan.warnings:
            nic = replaced(nic, {"warnings": list(plan.warnings)})
        assert record.spec is not None  # noqa: S101 - a NIC qmpnet adds always has its planned spec
        desired = with_added(done.desired, record.spec)
        journal.save_later(replaced(done, {"desired": desired}).with_operation(
            finished(journal.record.operations[operation], data=nic.model_dump(mode="json"))
        ))
        return nic

    async def _run(self, spec: NicSpec, inventory: Inventory, started: OperationRecord) -> tuple[AddPlan, NicRecord]:
        vhost = self._parts.host is not None and needs_tap_fds(spec) and self._parts.host.vhost()
        passt_dir: str | None = None  # only a passt backend's plan needs its directory (a hash of the guest's key)
        if isinstance(spec.backend, PasstBackend):
            passt_dir = str(self._parts.settings.hostnet.passt_guest_dir(self._parts.journal.key))
        link = await host_link(self._parts.host, spec)
        plan = plan_add(spec, inventory.view(), vhost=vhost, passt_dir=passt_dir, mtu=link.mtu)
        record = _adding(spec, plan, started.id, f"{self._parts.journal.key}/{plan.nic_id}", vhost=vhost)
        recorded = self._parts.journal.operation(started.id) or started  # the first plan's, if planned again
        self._parts.journal.save(self._parts.journal.record.with_operation(recorded).with_nic(record))
        undo = UndoStack()
        try:
            record = await self._run_steps(spec, plan, record, undo, link)
        except OutcomeUnknown as err:
            self._parts.nics.invalidate()
            err.add_note("qmpnet did not roll back: QEMU may have applied the step; the next read of the guest "
                         "settles it (list the NICs to see)")
            raise
        except QmpnetError as err:
            self._parts.nics.invalidate()
            await self._roll_back(record, undo, err)
            raise
        return plan, replaced(record, {"state": "active"})

    async def _run_steps(
        self, spec: NicSpec, plan: AddPlan, record: NicRecord, undo: UndoStack, link: HostLink
    ) -> NicRecord:
        """Prepare the host (recording what it holds), run the QMP steps, tune the tap; returns the record."""
        owner = f"{self._parts.journal.key}/{plan.nic_id}"

        def held(attachment: Attachment) -> NicRecord:
            return replaced(record, {"host": replaced(record.host, {
                "tap": attachment.tap, "bridge": attachment.bridge, "network": attachment.network,
                "vfio_host": attachment.vfio_host, "vfio_driver": attachment.vfio_driver,
            })})  # fmt: skip

        taken: list[Attachment] = []  # what taking() wrote already

        def taking(attachment: Attachment) -> None:  # a PCI function's driver, before its rebind
            taken.append(attachment)
            self._parts.journal.save(self._parts.journal.record.with_nic(held(attachment)))

        # What the host side holds is written before the first QMP command; a PCI function's original driver even
        # before its rebind, so that a process killed right after the rebind leaves a record that gives it back.
        attachment = await prepare_host(self._parts.host, self._parts.monitor, spec, plan, owner, undo, link,
                                        taking=taking)  # fmt: skip
        if attachment.tap is not None or attachment.vfio_host is not None:
            record = held(attachment)
            if taken != [attachment]:  # not written by taking() as it is
                self._parts.journal.save(self._parts.journal.record.with_nic(record))
        if attachment.passt is not None:  # its socket is recorded already: a recovery finds it without the pid too
            passt = {"passt_pid": attachment.passt.pid, "passt_started": attachment.passt.started}
            record = replaced(record, {"host": replaced(record.host, passt)})
            self._parts.journal.save(self._parts.journal.record.with_nic(record))
        await self._filter_tap(record.spec or spec, attachment, undo)  # the planned spec: it has the MAC
        unplug_timeout = self._parts.settings.qmp.rollback_unplug_timeout
        await run_steps(self._parts.monitor, plan.steps, undo, unplug_timeout=unplug_timeout)
        await self._tune_tap(spec, attachment, undo)
        return record

    async def _roll_back(self, record: NicRecord, undo: UndoStack, cause: QmpnetError) -> None:
        if await undo.unwind(cause):
            self._unplugs.drop(record.id)
        else:
            # The NIC is still plugged: finish its removal (netdev, host side) when the guest lets go. QEMU
            # accepted the rollback's device_del (unwinding stops only on a missing ack), so it is not asked again.
            pending = replaced(record, {"state": "removal_pending", "pending_since": time.time()})
            self._parts.journal.save(self._parts.journal.record.with_nic(pending))
            self._parts.nics.waiter(record.id)
            self._unplugs.stuck.poke()

    async def _filter_tap(self, spec: NicSpec, attachment: Attachment, undo: UndoStack) -> None:
        """Load the spec's anti-spoofing rules for the NIC's tap, pushing their removal.

        Before ``device_add``: the guest's first frame already meets them (they are keyed by the tap's name).
        """
        if spec.filter is None:
            return
        if self._parts.host is None or attachment.tap is None or spec.mac is None:
            raise Unsupported("nic.filter: no host tap qmpnet made is known for this NIC", field="nic.filter")
        undo.push("filter", await self._parts.host.set_filter(attachment.tap, spec.mac, spec.filter))

    async def _tune_tap(self, spec: NicSpec, attachment: Attachment, undo: UndoStack) -> None:
        """Apply the spec's VLANs and shaping to the NIC's host tap, pushing their undo (an add is atomic)."""
        if spec.vlan is None and spec.shape is None:
            return
        tap = attachment.tap or (spec.backend.ifname if isinstance(spec.backend, TapBackend) else None)
        if self._parts.host is None or tap is None:
            raise Unsupported("nic.shape: no host tap is known for this NIC", field="nic.shape")
        host = self._parts.host
        if spec.vlan is not None:
            undo.push("vlan", await host.set_vlan(tap, spec.vlan))
        if spec.shape is not None:
            undo.push("shape", await host.set_shape(tap, spec.shape))


def _adding(spec: NicSpec, plan: AddPlan, operation: str, owner: str, *, vhost: bool) -> NicRecord:
    """The NIC's record before its first QMP command: ``adding``, with what planning chose (and vhost-net's use)."""
    taps = needs_tap_fds(spec)
    placement = plan.placement
    return trusted(NicRecord, {
        "id": plan.nic_id,
        "spec": _planned_spec(spec, plan),
        "netdev": plan.netdev_id,
        "state": "adding",
        "link": spec.link,
        "host": trusted(HostHold, {"owner": owner if taps or plan.passt_socket else None,
                                   "passt_socket": plan.passt_socket, "vhost": vhost and taps}),
        "pci": trusted(PciAddress, {"bus": placement.bus, "slot": placement.slot, "function": placement.function}),
        "operation": operation,
    })


def _planned_spec(spec: NicSpec, plan: AddPlan) -> NicSpec:
    """``spec`` with what planning chose filled in, so the NIC can be added back exactly the same."""
    chosen: dict[str, object] = {
        "id": plan.nic_id,
        "bus": plan.placement.bus,
        "addr": format_pci_addr(plan.placement.slot, plan.placement.function),
    }
    if plan.mac is not None:
        chosen["mac"] = plan.mac
    return replaced(spec, chosen)
