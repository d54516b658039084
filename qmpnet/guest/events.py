"""A guest's events to its subscribers: one list of callbacks, called in the lane's task, failures logged.

The lane's units emit through this one object, so what a subscriber sees (NIC added, removed, link changed, a
removal pending, an unplug rejected) does not depend on which unit did the work; a subscriber that raises is
logged and never breaks the lane.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qmpnet.core.model import GuestEvent, GuestEventName, Nic

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["GuestEvents"]

log = logging.getLogger(__name__)


@dataclass
class GuestEvents:
    """The subscribers of one guest's events.

    Attributes:
        name: The guest's name, put in every event.
    """

    name: str
    _subscribers: list[Callable[[GuestEvent], None]] = field(default_factory=list, init=False)

    def subscribe(self, callback: Callable[[GuestEvent], None]) -> None:
        """Call ``callback`` with every event from now on."""
        self._subscribers.append(callback)

    def emit(
        self, name: GuestEventName, *, nic: Nic | None = None, nic_id: str | None = None, message: str | None = None
    ) -> bool:
        """Tell every subscriber; one that raises is logged and the others are still told.

        Returns:
            Whether anyone was told (there are subscribers): an event told once for good is spent only then.
        """
        if not self._subscribers:
            return False
        event = GuestEvent(
            name=name, ts=time.time(), guest=self.name, nic=nic, id=nic.id if nic else nic_id, message=message
        )
        for callback in self._subscribers:
            try:
                callback(event)
            except Exception:
                log.exception("guest %s: event subscriber failed on %s", self.name, name)
        return True
