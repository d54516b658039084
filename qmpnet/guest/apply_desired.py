"""Converging a guest to a desired NIC set, through the operations any ``GuestOps`` has.

The plan is pure (:mod:`qmpnet.core.desired_diff`); running it is a sequence of the ordinary operations (``add_nic``,
``set_link``, ``remove_nic``), each atomic on its own, each recorded in the guest's store like any other call, so
it works the same on a guest qmpnet holds directly, through the local controller, or (for the controller's own
reconcile loop) inside the controller. A change that fails (policy, a full bus, a conflict) is reported with its
code, and the others still go ahead: the report says whether the guest converged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from qmpnet.api.wire.envelopes import DesiredError
from qmpnet.core.desired_diff import plan_changes
from qmpnet.core.model_base import Frozen
from qmpnet.errors import QmpnetError

if TYPE_CHECKING:
    from qmpnet.core.ports import GuestOps
    from qmpnet.core.records import DesiredSet

__all__ = ["ApplyReport", "PlannedChange", "apply_desired"]


class PlannedChange(Frozen):
    """One line of the plan."""

    action: Literal["add", "link", "remove", "keep", "conflict"]
    id: str
    link: Literal["up", "down"] | None = None
    reason: str | None = None


class ApplyReport(Frozen):
    """What applying a desired set did (or, with ``dry_run``, would do)."""

    generation: int
    dry_run: bool
    plan: list[PlannedChange]
    errors: list[DesiredError] = Field(default_factory=list)
    pending: list[str] = Field(default_factory=list, description="NICs still being removed (the guest has not acked).")

    @property
    def converged(self) -> bool:
        """Whether the guest now matches the set (nothing failed, nothing left to do)."""
        if self.dry_run:
            return all(change.action == "keep" for change in self.plan)
        return not self.errors and not self.pending


async def apply_desired(guest: GuestOps, desired: DesiredSet, *, dry_run: bool = False) -> ApplyReport:
    """Plan ``desired`` against ``guest`` and, unless ``dry_run``, carry the plan out.

    Raises:
        GuestUnavailable, Busy, OutcomeUnknown: Reading the guest failed (nothing was changed).
    """
    nics = {nic.id: nic for nic in await guest.list_nics()}
    changes = plan_changes(desired, nics, {nic_id for nic_id, nic in nics.items() if nic.managed})
    plan = [PlannedChange.model_validate(change.describe()) for change in changes]
    report = ApplyReport(generation=desired.generation, dry_run=dry_run, plan=plan)
    if dry_run:
        return report
    errors: list[DesiredError] = []
    pending: list[str] = []
    for change in changes:
        try:
            if change.kind == "add" and change.spec is not None:
                await guest.add_nic(change.spec)
            elif change.kind == "link" and change.spec is not None:
                await guest.set_link(change.id, change.spec.link == "up")
            elif change.kind == "remove" and (await guest.remove_nic(change.id)).state == "removal_pending":
                pending.append(change.id)
            elif change.kind == "conflict":
                errors.append(DesiredError(id=change.id, code="conflict", message=change.reason))
        except QmpnetError as err:
            errors.append(DesiredError(id=change.id, code=err.code, message=err.message))
    return report.model_copy(update={"errors": errors, "pending": pending})
