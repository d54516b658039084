"""A guest's retained NIC list: what subscribers were last told, kept from the lane's events and re-reads.

Publishing state costs no QMP round trip: the list is updated from the lane's events (``nic_added``,
``link_changed``, ...), replaced by the full reads (at connect, on ``nic/list``), and compared with the periodic
re-read, which publishes what changed behind the lane's back (another QMP client added or removed a NIC, or a link
changed in the guest's record without an event) together with its events.

This is the last copy of per-NIC state outside the guest's lane: the lane offers no accessor for its current NICs
without a QMP read yet. When it does, :meth:`PublishedNics.current` becomes a read of that accessor.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from qmpnet.api.wire.envelopes import EventMessage, NicList

if TYPE_CHECKING:
    from qmpnet.core.model import GuestEvent, Nic
    from qmpnet.serve.fleet_context import StateSink

__all__ = ["PublishedNics"]

#: The lane's events that change the NIC list.
_LIST_EVENTS = frozenset({"nic_added", "nic_removed", "nic_removal_pending", "link_changed", "nic_updated"})


class PublishedNics:
    """The retained NIC list of guest ``name``, published to ``sink`` whenever it changes.

    Args:
        name: The guest's name.
        sink: Where the list and the events go.
    """

    def __init__(self, name: str, sink: StateSink) -> None:
        self.name = name
        self._sink = sink
        self._nics: dict[str, Nic] = {}

    def current(self) -> list[Nic]:
        """The NICs as last published."""
        return list(self._nics.values())

    def replace(self, nics: list[Nic]) -> None:
        """A full read of the guest: publish it as it is."""
        self._nics = {nic.id: nic for nic in nics}
        self._sink.guest_nics(self.name, NicList(nics=nics))

    def apply(self, event: GuestEvent) -> None:
        """Take one of the lane's events into the list (publishing it if it changed); then publish the event."""
        nic = event.nic
        if nic is not None:
            self._nics[nic.id] = nic if nic.rx_filter is None else nic.model_copy(update={"rx_filter": None})
        elif event.name == "nic_removed" and event.id is not None:
            self._nics.pop(event.id, None)
        elif event.name == "nic_removal_pending" and event.id in self._nics:
            self._nics[event.id] = self._nics[event.id].model_copy(update={"state": "removal_pending"})
        if event.name in _LIST_EVENTS:
            self._sink.guest_nics(self.name, NicList(nics=self.current()))
        message = EventMessage(ts=event.ts, guest=self.name, id=event.id, nic=event.nic, message=event.message)
        self._sink.event(self.name, event.name, message)

    def resynced(self, nics: list[Nic]) -> None:
        """Publish what a re-read found changed behind the lane's back, with events.

        A NIC added or removed by another QMP client gives ``nic_added``/``nic_removed``; a NIC whose link differs
        from the one published gives ``link_changed``. Nothing is published when nothing changed.
        """
        now = {nic.id: nic.model_copy(update={"rx_filter": None}) for nic in nics}
        added = [nic for nic_id, nic in now.items() if nic_id not in self._nics]
        removed = [nic_id for nic_id in self._nics if nic_id not in now]
        relinked = [nic for nic_id, nic in now.items() if nic_id in self._nics and self._nics[nic_id].link != nic.link]
        if not added and not removed and not relinked:
            return
        self._nics = now
        self._sink.guest_nics(self.name, NicList(nics=self.current()))
        for nic in added:
            self._sink.event(self.name, "nic_added", EventMessage(ts=time.time(), guest=self.name, id=nic.id, nic=nic))
        for nic_id in removed:
            self._sink.event(self.name, "nic_removed", EventMessage(ts=time.time(), guest=self.name, id=nic_id))
        for nic in relinked:
            message = EventMessage(ts=time.time(), guest=self.name, id=nic.id, nic=nic)
            self._sink.event(self.name, "link_changed", message)
