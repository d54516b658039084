"""Watching a guest's pending unplugs for those that stay stuck: ``unplug_stuck``, told once.

One task per guest (``qmpnet[guest=vm1].stuck-unplugs``), started once the guest is recovered and cancelled on
exit, sleeps until the next pending removal has been pending ``unplug.stuck_after`` seconds (counted from its
recorded ``pending_since``, so a restart does not reset the clock) or until it is poked (QEMU accepted an unplug,
a subscriber came). What is stuck and what to tell is :mod:`qmpnet.core.stuck_unplugs`.

A stuck unplug is told to the guest's subscribers (``qmpnet serve`` publishes it) and the telling is recorded
(``stuck_reported``), so that no later process tells it again. A process with no subscriber (a CLI call) tells
nobody and records nothing: the controller that serves the guest later still tells it. The watch sends no QMP
command and takes no lane; its one write is a single field of the NIC's record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from qmpnet.core.stuck_unplugs import check_stuck, stuck_advice
from qmpnet.errors import QmpnetError

if TYPE_CHECKING:
    from qmpnet.core.records import NicRecord
    from qmpnet.guest.parts import LaneParts

__all__ = ["StuckWatch"]

log = logging.getLogger(__name__)


class StuckWatch:
    """Tells each of one guest's stuck unplugs once (see the module docstring)."""

    def __init__(self, parts: LaneParts) -> None:
        self._parts = parts
        self._poked = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._told: set[str] = set()  # told by this process, in case recording it failed

    def start(self) -> None:
        """Start watching (in the guest's context)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"qmpnet[guest={self._parts.name}].stuck-unplugs"
            )

    async def stop(self) -> None:
        """Stop watching; waits for the task to end."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def poke(self) -> None:
        """Look again now: an unplug became pending, or someone came to be told."""
        self._poked.set()

    async def _run(self) -> None:
        after = self._parts.settings.unplug.stuck_after
        while True:
            self._poked.clear()
            try:
                check = check_stuck(self._parts.journal.record, now=time.time(), after=after)
                for nic in check.due:
                    self._tell(nic)
            except Exception:
                # A bug must not go unseen in a background task; the record still says what is pending.
                log.exception("guest %s: watching for stuck unplugs failed", self._parts.name)
                return
            delay = None if check.next_at is None else max(0.0, check.next_at - time.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._poked.wait()

    def _tell(self, nic: NicRecord) -> None:
        if nic.id in self._told or nic.pending_since is None:
            return
        message = stuck_advice(nic.id, time.time() - nic.pending_since)
        if not self._parts.events.emit("unplug_stuck", nic=self._parts.nics.current(nic.id), nic_id=nic.id,
                                       message=message):
            return
        self._told.add(nic.id)
        log.warning("guest %s: %s", self._parts.name, message)
        journal = self._parts.journal
        current = journal.nic(nic.id)
        if current is None:
            return
        try:
            journal.save(journal.record.with_nic(current.model_copy(update={"stuck_reported": time.time()})))
        except QmpnetError as err:
            log.warning("guest %s: recording that the unplug of %s was reported stuck failed: %s (a restart may "
                        "report it again)", self._parts.name, nic.id, err)
