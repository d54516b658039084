"""One guest's supervisor: its connection state, the reconnects with backoff, and its lane while connected.

The supervisor task (``qmpnet[guest=vm1].supervisor``) owns the guest's QMP connection: it opens the guest's record,
connects, builds a :class:`~qmpnet.guest.guest.Guest` on the monitor (which recovers the guest from its record
before serving anything), publishes ``connected``, runs the reconcile loop and the periodic resync, waits for the
monitor to close, publishes ``disconnected`` and reconnects with capped exponential backoff and jitter. A QEMU
restarted on the same socket path is simply the next successful attempt.

The status carries the guest's ``capacity`` (room for hot-plugged NICs): read at connect, and read again from the
lane's inventory (no QMP round trip) after each NIC added or removed and each periodic resync; the status is
published again only when it changed. After a NIC added or removed it is published at once, inside the request's
turn (so the bus sends it after the answer, before the NIC list and the event); when the lane's inventory is being
re-read at that moment, it is read once the lane is free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from qmpnet.api.wire.envelopes import EventMessage, GuestInfo, GuestState, GuestStatus
from qmpnet.core.model import GuestEvent
from qmpnet.errors import Busy, GuestUnavailable, InvalidRequest, OutcomeUnknown, QmpnetError, StoreUnavailable
from qmpnet.guest.dead_qemu import release_if_gone
from qmpnet.guest.guest import Guest
from qmpnet.serve.published_nics import PublishedNics
from qmpnet.serve.reconcile_loop import Reconciler

if TYPE_CHECKING:
    from qmpnet.core.model import Capacity
    from qmpnet.core.ports import Connection, GuestStore, QmpEvent
    from qmpnet.serve.desired_intake import DesiredIntake
    from qmpnet.serve.fleet_context import FleetContext

__all__ = ["Supervisor"]

log = logging.getLogger(__name__)

#: The lane's events after which the guest's capacity may have changed.
_CAPACITY_EVENTS = frozenset({"nic_added", "nic_removed"})


class _Turn:
    """One of the controller's turns for reading a guest (``controller.first_reads``), given back once.

    Given back when the read ends or after ``hold`` seconds, whichever comes first, so that a QEMU that hangs
    does not keep the rest of the fleet waiting.
    """

    def __init__(self, turns: asyncio.Semaphore, hold: float) -> None:
        self._turns = turns
        self._timer = asyncio.get_running_loop().call_later(hold, self.release)
        self._held = True

    @classmethod
    async def take(cls, turns: asyncio.Semaphore, hold: float) -> _Turn:
        await turns.acquire()
        return cls(turns, hold)

    def release(self) -> None:
        if self._held:
            self._held = False
            self._timer.cancel()
            self._turns.release()


class Supervisor:
    """Keeps guest ``name`` at ``address`` connected; while connected, :attr:`guest` is its lane.

    Args:
        fleet: What the guests share: the ports, the settings, the counts.
        name: The guest's name.
        address: Its QMP socket (or ``host:port``).
        intake: Its desired documents (attached to its record once the record is open).
    """

    def __init__(self, fleet: FleetContext, name: str, address: str, intake: DesiredIntake) -> None:
        self.fleet = fleet
        self.name = name
        self.address = address
        self.intake = intake
        self.nics = PublishedNics(name, fleet.sink)
        self.state: GuestState = "connecting"
        self.since = time.time()
        self.qemu: str | None = None
        self.machine: str | None = None
        #: Room for hot-plugged NICs, as last read (``None`` until the first read).
        self.capacity: Capacity | None = None
        #: The guest's lane while connected, else ``None``.
        self.guest: Guest | None = None
        #: Why the guest is not connected (for ``guest_unavailable`` answers).
        self.problem = "not connected yet"
        #: Set once the first connection attempt has ended, one way or the other.
        self.settled = asyncio.Event()
        self.agent = fleet.settings.controller.agents.get(name) or _agent_beside(address)
        self._store: GuestStore | None = None
        self._reconciler: Reconciler | None = None
        self._recounting: asyncio.Task[None] | None = None
        self._recount_again = False
        self._releasing = asyncio.Lock()  # a failed attempt and a vanished socket may both find the QEMU gone
        self._log = {"guest": name}

    def status(self) -> GuestStatus:
        """The guest's status as published."""
        return GuestStatus(
            state=self.state, qemu=self.qemu, machine=self.machine, since=self.since, desired=self.intake.status,
            capacity=self.capacity,
        )

    def info(self) -> GuestInfo:
        """The guest's entry in the controller's guest list."""
        return GuestInfo(name=self.name, **self.status().model_dump())

    def publish(self) -> None:
        """Publish the guest's status (and the guests-by-state metric)."""
        self.fleet.publish_status(self.name, self.status())

    def capacity_read(self, capacity: Capacity) -> None:
        """A fresh capacity (read at connect, after a change, or by a ``slots`` request): publish it if it changed."""
        if capacity is not self.capacity and capacity != self.capacity:  # an unchanged count is the same object
            self.capacity = capacity
            if self.state == "connected":
                self.publish()

    def converge(self, explicit: bool) -> None:
        """Ask for a reconcile pass, if the guest is connected (``explicit``: the desired set is new)."""
        if self._reconciler is not None:
            self._reconciler.poke(explicit=explicit)

    async def run(self) -> None:
        """Keep the guest connected until cancelled."""
        self.publish()
        failures = 0  # attempts since the guest was last connected
        try:
            while True:
                try:
                    if self._store is None:
                        self._store = await self.fleet.open_store(self.name, self.address)
                        self._report_discarded(self._store)
                        self.intake.attach(self._store, publish=self.publish, converge=self.converge)
                    connection = await self.fleet.connector(self.name, self.address)
                except (GuestUnavailable, Busy, InvalidRequest, StoreUnavailable) as err:
                    if failures == 0:
                        log.info("guest %s: cannot connect: %s", self.name, err, extra=self._log)
                    self.problem = err.message
                    self.set_state("disconnected")
                    if isinstance(err, GuestUnavailable) and self._store is not None:
                        await self._release_if_gone(self._store)
                else:
                    try:
                        await self._serve(connection, self._store)
                    except Exception:
                        log.exception("guest %s: connection failed", self.name, extra=self._log)
                    finally:
                        self.guest = None
                        self.capacity = None  # unknown until connected again
                        await connection.close()
                    if self.state == "connected":
                        failures = 0
                        self.problem = "QEMU closed the QMP connection"
                        self.set_state("disconnected")
                        self.fleet.emit(self.name, "guest_disconnected")
                await asyncio.sleep(self.fleet.backoff(failures))
                failures += 1
        finally:
            if self._store is not None:
                self.intake.detach()
                self._store.close()
                self._store = None

    async def socket_gone(self) -> None:
        """The guest's socket vanished (a QEMU that exits cleanly removes it): give back what a gone QEMU held.

        Called before the guest stops being served; while connected (the socket was removed by someone else and
        QEMU still answers) nothing is released.
        """
        if self._store is not None and self.guest is None:
            await self._release_if_gone(self._store)

    async def _release_if_gone(self, store: GuestStore) -> None:
        """Give back the host side of the NICs of a QEMU that has gone for good; each is told as ``nic_removed``."""
        try:
            async with self._releasing:
                released = await release_if_gone(store, self.fleet.host, self.name)
        except StoreUnavailable as err:
            log.warning("guest %s: %s", self.name, err, extra=self._log)
            return
        message = "its QEMU is gone: qmpnet gave back the NIC's host side (tap, filter, passt, PCI function)"
        for nic_id in released:
            self.nics.apply(GuestEvent(name="nic_removed", ts=time.time(), guest=self.name, id=nic_id, message=message))

    def _report_discarded(self, store: GuestStore) -> None:
        """Publish ``record_discarded`` for each unreadable record the store moved aside (and logged)."""
        for discarded in store.discarded:
            message = EventMessage(ts=time.time(), guest=self.name, record=discarded)
            self.fleet.sink.event(self.name, "record_discarded", message)

    def set_state(self, state: GuestState) -> None:
        """Move to ``state``, counting and publishing it if it changed."""
        if state != self.state:
            self.fleet.counted(self.state, state)
            self.state = state
            self.since = time.time()
            self.publish()
        if state != "connecting":
            self.settled.set()

    async def _serve(self, connection: Connection, store: GuestStore) -> None:
        fleet = self.fleet
        guest = Guest(connection, name=self.name, settings=fleet.settings, host=fleet.host, store=store,
                      qga=self.agent)
        guest.subscribe(self._on_event)
        connection.on_event(self._on_qmp_event)
        # The first read of a guest (recovery, the NIC list) takes one of a few turns: a fleet that connects at once
        # is read a few guests at a time, not thousands, so the replies in flight (and the memory they leave
        # behind) stay few. A read that takes longer than qmp.connect_timeout gives its turn back and goes on.
        turn = await _Turn.take(fleet.first_reads, fleet.settings.qmp.connect_timeout)
        try:
            # Entering the guest recovers it from its record, inside its lane, before any request is served.
            async with guest:
                self.machine = (await connection.machine())[0]
                self.qemu = connection.greeting_version
                nics = await guest.list_nics()
                self.capacity = await guest.slots(reread=False)  # published with the "connected" state below
                turn.release()
                self.nics.replace(nics)
                self.guest = guest
                self.set_state("connected")
                log.info("guest %s: connected (QEMU %s, %s)", self.name, self.qemu, self.machine, extra=self._log)
                fleet.emit(self.name, "guest_connected")
                self._reconciler = Reconciler(
                    self.name, guest, desired=lambda: store.record.desired, settings=fleet.settings.reconcile,
                    publish=self.intake.status_changed, event=self._reconcile_event,
                )
                reconciling = asyncio.create_task(self._reconciler.run(), name=f"qmpnet[guest={self.name}].reconcile")
                self._reconciler.poke()  # a QEMU restarted on the same socket gets its desired NICs back
                try:
                    await self._watch(connection, guest)
                finally:
                    self._reconciler = None
                    if self._recounting is not None:
                        self._recounting.cancel()
                        await asyncio.gather(self._recounting, return_exceptions=True)
                        self._recounting = None
                    reconciling.cancel()
                    await asyncio.gather(reconciling, return_exceptions=True)
                log.info("guest %s: disconnected", self.name, extra=self._log)
        except QmpnetError as err:
            log.info("guest %s: lost while reading it: %s", self.name, err, extra=self._log)
        finally:
            turn.release()

    async def _watch(self, connection: Connection, guest: Guest) -> None:
        """Until the connection closes, re-read the guest every ``reconcile.resync_interval`` seconds."""
        interval = self.fleet.settings.reconcile.resync_interval
        while not connection.closed.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await connection.closed.wait()
            if connection.closed.is_set():
                return
            try:
                self.nics.resynced(await guest.resync())
            except (Busy, OutcomeUnknown) as err:
                log.info("guest %s: resync skipped: %s", self.name, err, extra=self._log)
            else:
                self._recount(guest)  # another QMP client may have taken or freed a place
            if self._reconciler is not None:
                self._reconciler.poke()

    def _recount(self, guest: Guest) -> None:
        """Read the capacity from the lane's inventory now, or once the lane is free if it is being re-read."""
        room = guest.known_capacity()
        if room is None:
            self._recount_soon()
        else:
            self.capacity_read(room)

    def _recount_soon(self) -> None:
        """Read the capacity again once the lane is free (events arrive inside the lane's turn), one read at a time."""
        if self._recounting is not None and not self._recounting.done():
            self._recount_again = True  # the read under way may have missed this change: one more after it
            return
        self._recounting = asyncio.create_task(self._recount_now(), name=f"qmpnet[guest={self.name}].capacity")

    async def _recount_now(self) -> None:
        again = True
        while again:
            self._recount_again = False
            guest = self.guest
            if guest is None:
                return
            try:
                self.capacity_read(await guest.slots(reread=False))
            except QmpnetError as err:
                log.info("guest %s: capacity not read: %s", self.name, err, extra=self._log)
                return
            except Exception:
                # A bug must not go unseen in a background task; the next change or resync reads it again.
                log.exception("guest %s: reading the capacity failed", self.name, extra=self._log)
                return
            again = self._recount_again

    def _reconcile_event(self, name: str, message: EventMessage) -> None:
        self.fleet.sink.event(self.name, name, message)

    def _on_event(self, event: GuestEvent) -> None:
        if event.name in _CAPACITY_EVENTS and self.guest is not None:
            self._recount(self.guest)
        self.nics.apply(event)
        if event.name == "nic_removed" and self._reconciler is not None:
            self._reconciler.poke()  # a desired NIC may have vanished behind qmpnet's back

    def _on_qmp_event(self, event: QmpEvent) -> None:
        if event.name == "NIC_RX_FILTER_CHANGED":
            nic_id = event.data.get("name")
            message = EventMessage(ts=event.timestamp, guest=self.name, id=nic_id if isinstance(nic_id, str) else None)
            self.fleet.sink.event(self.name, "rx_filter_changed", message)


def _agent_beside(address: str) -> str | None:
    """``NAME.qga`` beside a guest's ``NAME.qmp`` socket, if it is a socket: the guest agent's, by convention."""
    if not address.endswith(".qmp"):
        return None
    candidate = Path(address).with_suffix(".qga")
    return str(candidate) if candidate.is_socket() else None
