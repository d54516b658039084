"""The reconcile loop: one connected guest kept converged to its desired NIC set, for as long as it is connected.

A pass reads the guest, plans against the stored desired set (:mod:`qmpnet.core.desired_diff`) and carries the plan
out through the guest's ordinary operations (:func:`~qmpnet.guest.apply_desired.apply_desired`). Passes run one
at a time, when asked (:meth:`Reconciler.poke`): on connect (a QEMU restarted on the same socket gets its desired
NICs back, with the same ids, MACs and PCI addresses), when a new desired document arrives, when a NIC vanishes
behind qmpnet's back, and after every periodic resync. Every pass publishes the guest's ``desired`` status.

A pass the operator did not ask for (every one but a new document's) that finds work to do first reports
``drift``; with ``reconcile.repair`` off it stops there. A pass that changed something reports ``reconciled``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from qmpnet.api.wire.envelopes import DesiredStatus, EventMessage
from qmpnet.errors import QmpnetError
from qmpnet.guest.apply_desired import apply_desired

if TYPE_CHECKING:
    from collections.abc import Callable

    from qmpnet.core.ports import GuestOps
    from qmpnet.core.records import DesiredSet
    from qmpnet.guest.apply_desired import ApplyReport
    from qmpnet.settings import ReconcileSettings

__all__ = ["Reconciler", "desired_status"]

log = logging.getLogger(__name__)


def desired_status(desired: DesiredSet, report: ApplyReport) -> DesiredStatus:
    """The ``desired`` part of a guest's status after ``report``."""
    failed = {error.id for error in report.errors}
    pending = [c.id for c in report.plan if c.action != "keep" and (report.dry_run or c.id in report.pending)]
    pending += [c.id for c in report.plan if c.id in failed and c.id not in pending]
    return DesiredStatus(
        generation=desired.generation, converged=not pending and not report.errors, pending=pending,
        errors=list(report.errors),
    )


class Reconciler:
    """Converges one guest (see the module docstring).

    Args:
        name: The guest's name, for logs and events.
        guest: The guest's operations.
        desired: Reads the guest's stored desired set (``None``: it has none).
        settings: ``reconcile.repair``.
        publish: Called with the new ``desired`` status after every pass.
        event: Called with ``reconciled`` and ``drift`` events.
    """

    def __init__(  # noqa: PLR0913 - the collaborators of one guest's loop, keyword-only
        self,
        name: str,
        guest: GuestOps,
        *,
        desired: Callable[[], DesiredSet | None],
        settings: ReconcileSettings,
        publish: Callable[[DesiredStatus | None], None],
        event: Callable[[str, EventMessage], None],
    ) -> None:
        self.name = name
        self._guest = guest
        self._desired = desired
        self._settings = settings
        self._publish = publish
        self._event = event
        self._wanted = asyncio.Event()
        self._explicit = False
        self.passes = 0

    def poke(self, *, explicit: bool = False) -> None:
        """Ask for a pass; ``explicit``: the operator asked (a new desired document), so repair regardless."""
        self._explicit = self._explicit or explicit
        self._wanted.set()

    async def run(self) -> None:
        """Run passes when poked, until cancelled."""
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            explicit, self._explicit = self._explicit, False
            try:
                await self.run_pass(explicit=explicit)
            except QmpnetError as err:
                log.info("guest %s: reconcile pass failed: %s", self.name, err, extra={"guest": self.name})

    async def run_pass(self, *, explicit: bool) -> DesiredStatus | None:
        """One pass: plan, report drift, repair (if allowed), publish the status.

        Raises:
            GuestUnavailable, Busy, OutcomeUnknown: Reading the guest failed; nothing was changed.
        """
        desired = self._desired()
        self.passes += 1
        if desired is None:
            self._publish(None)
            return None
        plan = await apply_desired(self._guest, desired, dry_run=True)
        work = [change for change in plan.plan if change.action != "keep"]
        if not work:
            status = desired_status(desired, plan)
            self._publish(status)
            return status
        if not explicit:
            changes = [change.model_dump(mode="json", exclude_none=True) for change in work]
            self._event("drift", EventMessage(ts=time.time(), guest=self.name, generation=desired.generation,
                                              changes=changes))
            if not self._settings.repair:
                status = desired_status(desired, plan)
                self._publish(status)
                return status
        report = await apply_desired(self._guest, desired)
        status = desired_status(desired, report)
        changes = [c.model_dump(mode="json", exclude_none=True) for c in report.plan if c.action != "keep"]
        log.info("guest %s: reconciled to generation %d: %s", self.name, desired.generation,
                 ", ".join(f"{c['action']} {c['id']}" for c in changes), extra={"guest": self.name})
        self._event("reconciled", EventMessage(ts=time.time(), guest=self.name, generation=desired.generation,
                                               changes=changes))
        self._publish(status)
        return status
