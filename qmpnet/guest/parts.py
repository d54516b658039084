"""The collaborators every unit of a guest's lane shares, built once by :class:`~qmpnet.guest.guest.Guest`.

Each unit (hot-add, recoverer, unplugs, live changes, verifier, late events) takes this one small context instead
of a back-reference to the guest or its own copy of the same parameter list; what only one unit needs stays its
own argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qmpnet.core.ports import HostNetwork, Monitor
    from qmpnet.guest.events import GuestEvents
    from qmpnet.guest.journal import Journal
    from qmpnet.guest.nic_table import NicTable
    from qmpnet.settings import Settings

__all__ = ["LaneParts"]


@dataclass(frozen=True, slots=True, kw_only=True)
class LaneParts:
    """What one guest's lane units share.

    Attributes:
        name: The guest's name (log lines, events, errors).
        monitor: Its QMP connection.
        host: The host network (taps, bridges), or None when the guest has only user-mode backends.
        journal: Its record and operations.
        nics: The NICs as the lane last saw them.
        events: Where its events go to subscribers.
        settings: The controller's settings.
    """

    name: str
    monitor: Monitor
    host: HostNetwork | None
    journal: Journal
    nics: NicTable
    events: GuestEvents
    settings: Settings
