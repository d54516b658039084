"""The NIC table: everything the lane knows about each NIC of its guest, held in one object.

A NIC's state has three sources, and this table is the one place that joins them:

* **the record** (through the :class:`~qmpnet.guest.journal.Journal`): lifecycle state, link intent, the spec as
  asked and the host resources; durable, because a restart must know it;
* **the last read of QEMU** (an :class:`~qmpnet.core.inventory.Inventory`, updated by the lane's own steps): what
  exists, with its PCI place, MAC and backend. It is a cache: :meth:`NicTable.invalidate` marks it stale after any
  failed step, and the next call reads the guest again (:class:`~qmpnet.guest.recoverer.Recoverer`);
* **what is in flight in this process**: the unplugs the lane is waiting for right now (their ``DEVICE_DELETED`` is
  not a late one) and the waiters of pending removals (callers waiting for the guest's ack). Only these live in
  memory alone; a restart loses nothing by it, because the record says which removals are pending.

:meth:`NicTable.snapshot` gives the NICs as the lane last saw them, completed with the record, without reading the
guest: what a controller publishes as a guest's state reads it here instead of keeping a copy.
"""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from typing import TYPE_CHECKING

from qmpnet.core.inventory import backend_of
from qmpnet.core.model import Nic, NicSpec, ObservedBackend
from qmpnet.core.model_base import replaced, trusted
from qmpnet.errors import QmpnetError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from qmpnet.core.hotadd_plan import QmpCall
    from qmpnet.core.inventory import Inventory
    from qmpnet.core.ports import Monitor
    from qmpnet.core.records import NicRecord
    from qmpnet.guest.journal import Journal

__all__ = ["NicTable", "asked_backend", "execute"]

#: Options `info network` shows that mean nothing outside QEMU (its own fd numbers for a passed tap).
_QEMU_INTERNAL_OPTIONS = frozenset({"fd", "fds"})


class NicTable:
    """The per-NIC state of one guest (see the module docstring)."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self._inventory: Inventory | None = None
        self._fresh = False
        self._seen: frozenset[str] = frozenset()  # the NIC ids of the last read: tells a NIC's DEVICE_DELETED
        self._unplugging: set[str] = set()  # device_del sent by this lane and awaited right now
        self._waiters: dict[str, asyncio.Event] = {}  # pending removals: set when the removal is finished

    # ------------------------------------------------------------------------------------------ the last read

    @property
    def inventory(self) -> Inventory | None:
        """The lane's view of the guest, or ``None`` when it may be stale (read the guest again)."""
        return self._inventory if self._fresh else None

    def observed(self, inventory: Inventory) -> None:
        """Take a fresh read of the guest."""
        self._inventory, self._fresh = inventory, True
        self._seen = frozenset(inventory.nics)

    def invalidate(self) -> None:
        """The view may be stale (a step failed or its outcome is unknown): the next call reads the guest."""
        self._fresh = False

    def was_seen(self, nic_id: str) -> bool:
        """Whether the last read of the guest showed NIC ``nic_id``."""
        return nic_id in self._seen

    def removed(self, nic_id: str) -> None:
        """NIC ``nic_id`` and its netdev are gone."""
        if self._inventory is not None:
            self._inventory.removed(nic_id)

    def removal_pending(self, nic_id: str) -> None:
        """The guest was asked to unplug NIC ``nic_id``."""
        if self._inventory is not None and nic_id in self._inventory.nics:
            self._inventory.update(nic_id, state="removal_pending")

    def current(self, nic_id: str) -> Nic | None:
        """NIC ``nic_id`` as the lane last saw it, completed with the record (``None``: not in that view)."""
        nic = self._inventory.nics.get(nic_id) if self._inventory is not None else None
        return self.described(nic) if nic is not None else None

    def snapshot(self) -> tuple[Nic, ...]:
        """The NICs as the lane last saw them, completed with the record (no read of the guest)."""
        if self._inventory is None:
            return ()
        return tuple(self.described(nic) for nic in self._inventory.nics.values())

    # ------------------------------------------------------------------------------------------- the record

    def pending(self, nic_id: str) -> bool:
        """Whether NIC ``nic_id``'s removal is pending."""
        return self._journal.pending(nic_id)

    def pending_ids(self) -> set[str]:
        """The NICs whose removal is pending."""
        return {nic_id for nic_id, nic in self._journal.record.nics.items() if nic.state == "removal_pending"}

    def links(self) -> dict[str, str]:
        """Link intent by NIC: of the NICs qmpnet created and of others whose link it set."""
        record = self._journal.record
        return {**record.links, **{nic_id: nic.link for nic_id, nic in record.nics.items()}}

    def described(self, nic: Nic) -> Nic:
        """QEMU's view of ``nic`` completed with what was asked for (hostfwd, the bridge and tap behind an fd)."""
        record = self._journal.nic(nic.id)
        if record is None:
            return nic
        if record.state == "removal_pending" and record.pending_since is not None:
            nic = replaced(nic, {"pending_since": record.pending_since})
        if record.view is not None:
            return replaced(nic, {"backend": record.view, "managed": record.spec is not None})
        if record.spec is None:
            return nic
        asked = asked_backend(record.spec, record)
        seen = nic.backend.options if nic.backend is not None else {}
        seen = {k: v for k, v in seen.items() if k not in _QEMU_INTERNAL_OPTIONS}
        backend = trusted(ObservedBackend, {"type": asked.type, "options": {**seen, **asked.options}})
        return replaced(nic, {"backend": backend, "managed": True})

    # ------------------------------------------------------------------------------------------- in flight

    @contextmanager
    def unplugging(self, nic_id: str) -> Iterator[None]:
        """The lane waits for NIC ``nic_id``'s ``DEVICE_DELETED`` itself for the body of the ``with``."""
        self._unplugging.add(nic_id)
        try:
            yield
        finally:
            self._unplugging.discard(nic_id)

    def is_unplugging(self, nic_id: str) -> bool:
        """Whether the lane itself waits for NIC ``nic_id``'s ``DEVICE_DELETED`` right now."""
        return nic_id in self._unplugging

    def waiter(self, nic_id: str) -> asyncio.Event:
        """The event set when NIC ``nic_id``'s pending removal is finished (made on first use)."""
        return self._waiters.setdefault(nic_id, asyncio.Event())

    def wake(self, nic_id: str) -> None:
        """NIC ``nic_id``'s removal is finished (or refused): wake whoever waits for it."""
        waiter = self._waiters.pop(nic_id, None)
        if waiter is not None:
            waiter.set()


def asked_backend(spec: NicSpec, record: NicRecord) -> ObservedBackend:
    """The backend as asked for, with the host side the record holds (a bridge or NAT network's tap, a macvtap).

    ``vhost: on`` says the tap netdev was added with vhost-net: QEMU 7.2 shows no vhost in ``info network``, so the
    record, written from the ``netdev_add`` qmpnet sent, is what tells.
    """
    asked = backend_of(spec)
    hold = record.host
    if hold.passt_socket is not None:
        passt = {"socket": hold.passt_socket} | ({"pid": str(hold.passt_pid)} if hold.passt_pid is not None else {})
        return ObservedBackend(type=asked.type, options={**asked.options, **passt})
    if hold.tap is None:
        return asked
    vhost = {"vhost": "on"} if hold.vhost else {}
    if spec.backend.type == "macvtap":
        return ObservedBackend(type="macvtap", options={**asked.options, "tap": hold.tap, **vhost})
    options = {"bridge": hold.bridge or "", "tap": hold.tap, **vhost}
    if hold.network is not None:
        return ObservedBackend(type="nat", options={"network": hold.network, **options})
    return ObservedBackend(type="bridge", options={**asked.options, **options})


async def execute(monitor: Monitor, nics: NicTable, call: QmpCall) -> object:
    """Run ``call``; on any error the lane's view of the guest is stale.

    Raises:
        QmpCommandError, OutcomeUnknown, GuestUnavailable: From the monitor.
    """
    try:
        return await monitor.execute(call.command, call.arguments)
    except QmpnetError:
        nics.invalidate()
        raise
