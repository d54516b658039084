"""Late ``DEVICE_DELETED`` events: the guest's answer to an unplug nobody waits for any more, or to another client's.

An unplug whose caller stopped waiting left a pending removal; another QMP client may unplug a device behind
qmpnet's back. Either way the event arrives on the monitor's event pump, outside any call. It is settled in the
background, in the lane (unbounded: a late answer must always be completed, even when the lane is full), by a read
of the guest that treats the device as gone: recovery then finishes the removal (netdev, host side, record,
waiters). A NIC qmpnet did not create that disappears this way is announced as removed. The tasks belong to the
guest's context: on exit they get ``lane.stop_grace`` to finish, then are cancelled (the record still says what
to finish, so the next process does).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from qmpnet.errors import QmpnetError

if TYPE_CHECKING:
    from collections.abc import Callable

    from qmpnet.core.ports import QmpEvent
    from qmpnet.guest.lane import Lane
    from qmpnet.guest.parts import LaneParts
    from qmpnet.guest.recoverer import Recoverer

__all__ = ["LateEvents"]

log = logging.getLogger(__name__)


class LateEvents:
    """Settles the ``DEVICE_DELETED`` events of one guest that no call waits for (see the module docstring)."""

    def __init__(self, parts: LaneParts, *, lane: Lane, reader: Recoverer, serving: Callable[[], bool]) -> None:
        self._parts = parts
        self._lane = lane
        self._reader = reader
        self._serving = serving
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def busy(self) -> bool:
        """Whether a late event is being settled."""
        return bool(self._tasks)

    def on_event(self, event: QmpEvent) -> None:
        """The monitor's event callback: start settling a ``DEVICE_DELETED`` the lane does not wait for itself."""
        if event.name != "DEVICE_DELETED" or event.device is None or self._parts.nics.is_unplugging(event.device):
            return
        if not self._serving():
            return
        # A late ack of ours, or a device someone else unplugged: settle it in the lane, in the background.
        was_nic = self._parts.nics.was_seen(event.device)
        task = asyncio.get_running_loop().create_task(
            self._settle(event.device, was_nic=was_nic), name=f"qmpnet[guest={self._parts.name}].settle-{event.device}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settled(self) -> None:
        """Wait until the events being settled now are settled."""
        if self._tasks:
            await asyncio.wait(set(self._tasks))

    async def stop(self, grace: float) -> None:
        """Let the settling end within ``grace`` seconds, then cancel what is left."""
        pending = set(self._tasks)
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _settle(self, device: str, *, was_nic: bool) -> None:
        recorded = device in self._parts.journal.record.nics
        try:
            # Internal work is not subject to the lane's limits: a late ack must always be completed.
            async with self._lane.turn(bounded=False):
                await self._reader.refresh(full=False, gone=frozenset({device}))
        except QmpnetError as err:
            log.warning("guest %s: could not settle the unplug of %s: %s (recovery will)",
                        self._parts.name, device, err)
            return
        except Exception:
            # A bug must not go unseen in a background task; the record still says what to finish.
            log.exception("guest %s: settling the unplug of %s failed", self._parts.name, device)
            return
        if was_nic and not recorded:
            # A NIC qmpnet did not create, unplugged by another client.
            self._parts.events.emit("nic_removed", nic_id=device)
