"""Reading the guest and carrying out recovery: the records converge with what QEMU shows on every read.

What to do is decided purely (:mod:`qmpnet.core.recovery_plan`: the record against the devices QEMU shows); this
unit reads the guest, carries the steps out and builds the lane's fresh view (:class:`~qmpnet.core.inventory.
Inventory`). It is the only way the lane reads the guest, so no read can skip recovery: a process killed between
two QMP commands leaves a record that the next read settles, whichever call makes it.

A *full* read (entering the context, :meth:`qmpnet.Guest.recover`) also recognises a restarted QEMU (by a random id
kept in a QOM object qmpnet adds, :data:`INSTANCE_OBJECT`, which dies with the QEMU process), re-applies link
intent, asks again the pending unplugs whose ``device_del`` was never answered (never one QEMU accepted) and
deletes taps of vanished NICs; a *light* one (every other read) never re-sends commands that only matter after a
reconnect.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING

from qmpnet.core.inventory import Inventory
from qmpnet.core.model import PciAddress
from qmpnet.core.recovery_plan import RecoveryStep, answered_by_recovery, plan_recovery
from qmpnet.errors import QmpCommandError, QmpnetError
from qmpnet.guest.journal import finished

if TYPE_CHECKING:
    from qmpnet.core.ports import HostProcess, Observation
    from qmpnet.core.records import NicRecord
    from qmpnet.guest.parts import LaneParts
    from qmpnet.guest.unplugs import Unplugs

__all__ = ["INSTANCE_OBJECT", "Recoverer"]

log = logging.getLogger(__name__)
#: The QOM object qmpnet adds to each QEMU it meets, holding a random id of that QEMU process.
INSTANCE_OBJECT = "qmpnet-instance"


class Recoverer:
    """Reads one guest and settles its record against it (see the module docstring)."""

    def __init__(self, parts: LaneParts, *, unplugs: Unplugs) -> None:
        self._parts = parts
        self._unplugs = unplugs
        self._instance: str | None = None
        # Removals an earlier process asked for and left pending: whoever finishes them here tells nobody.
        self._inherited: set[str] = set()

    async def fresh(self) -> Inventory:
        """The lane's view of the guest, read again if it may be stale.

        Raises:
            OutcomeUnknown, GuestUnavailable, QmpCommandError: Reading the guest failed.
        """
        inventory = self._parts.nics.inventory
        return inventory if inventory is not None else await self.refresh(full=False)

    async def refresh(self, *, full: bool, gone: frozenset[str] = frozenset()) -> Inventory:
        """Observe the guest, settle the records against it, and rebuild the lane's view.

        ``gone`` names devices whose ``DEVICE_DELETED`` just came: absent whatever the observation still shows.

        Raises:
            OutcomeUnknown, GuestUnavailable, QmpCommandError: Reading the guest failed.
        """
        self._parts.nics.invalidate()
        observation = await self._parts.monitor.observe()
        if full:
            self._instance = await self._identify()
            self._inherited = {n.id for n in self._parts.journal.record.nics.values() if n.state == "removal_pending"}
        devices = observation.device_ids - gone
        steps = plan_recovery(self._parts.journal.record, instance=self._instance, devices=devices, full=full)
        self._note_instance(devices, full=full)
        deleted: set[str] = set()
        for step in steps:
            if step.action != "relink" and await self._recover_one(step, observation, full=full):
                deleted.add(step.nic.netdev or "")
        await self._relink([step for step in steps if step.action == "relink"], observation)
        if full:
            await self._apply_foreign_links(devices)
            await self._sweep_taps()
            await self._sweep_passts()
            await self._sync_filters()
        inventory = Inventory.from_observation(observation, self._parts.nics.links(), self._parts.nics.pending_ids())
        for device in gone:
            inventory.removed(device)
        inventory.netdev_ids.difference_update(deleted)
        self._parts.nics.observed(inventory)
        if full:
            self._answer_interrupted(inventory)
        return inventory

    def _answer_interrupted(self, inventory: Inventory) -> None:
        """Record the outcome of operations a killed process left without one, where recovery tells it."""
        record = self._parts.journal.record
        for operation in record.operations.values():
            nic_id = None if operation.outcome is not None else answered_by_recovery(operation, record, inventory.nics)
            if nic_id is None:
                continue
            if operation.op == "nic/del":
                data: object = {"id": nic_id, "state": "removed"}
            else:
                data = self._parts.nics.described(inventory.nics[nic_id]).model_dump(mode="json")
            record = record.with_operation(finished(operation, data=data))
        if record is not self._parts.journal.record:
            self._parts.journal.save(record)

    def _note_instance(self, devices: frozenset[str], *, full: bool) -> None:
        """Record the QEMU instance (a new one keeps no link intent) and process; drop gone devices' link intent."""
        record = self._parts.journal.record
        update: dict[str, object] = {}
        if full and self._instance is not None and record.instance != self._instance:
            if record.instance is not None:
                log.info("guest %s: QEMU was restarted (a new instance): its NICs went with the old one",
                         self._parts.name)
            update = {"instance": self._instance, "links": {}}
        elif any(nic_id not in devices for nic_id in record.links):
            update = {"links": {k: v for k, v in record.links.items() if k in devices}}
        if full:
            process = self._qemu_process()
            named = (process.pid, process.started) if process is not None else (None, None)
            if (record.qemu_pid, record.qemu_started) != named:
                update |= {"qemu_pid": named[0], "qemu_started": named[1]}
        if update:
            self._parts.journal.save(record.model_copy(update=update))

    def _qemu_process(self) -> HostProcess | None:
        """The QEMU process behind the monitor, named for good (:mod:`.dead_qemu` checks it once unreachable).

        ``None`` over TCP, without host networking (nothing on the host to give back then), or for a test's fake.
        """
        pid = getattr(self._parts.monitor, "peer_pid", None)  # the QMP adapter knows it on a unix socket
        host = self._parts.host
        return host.process(pid) if host is not None and isinstance(pid, int) else None

    async def _apply_foreign_links(self, devices: frozenset[str]) -> None:
        for nic_id, link in self._parts.journal.record.links.items():
            if nic_id in devices:
                try:
                    await self._parts.monitor.execute("set_link", {"name": nic_id, "up": link == "up"})
                except QmpCommandError as err:
                    log.warning("guest %s: re-applying the link of %s failed: %s", self._parts.name, nic_id, err)

    async def _identify(self) -> str | None:
        """The id of the QEMU process behind the monitor, kept in a QOM object qmpnet adds on first contact."""
        path = f"/objects/{INSTANCE_OBJECT}"
        try:
            return str(await self._parts.monitor.execute("qom-get", {"path": path, "property": "identity"}))
        except QmpCommandError:
            pass
        new = uuid.uuid4().hex
        try:
            await self._parts.monitor.execute(
                "object-add", {"qom-type": "authz-simple", "id": INSTANCE_OBJECT, "identity": new}
            )
        except QmpCommandError as err:
            log.warning("guest %s: cannot mark the QEMU instance (%s): restarts are told by devices only",
                        self._parts.name, err)
            return None
        return new

    async def _recover_one(self, step: RecoveryStep, observation: Observation, *, full: bool) -> bool:
        """Carry out one recovery step; returns whether it deleted the NIC's netdev.

        A removal that an earlier process asked for is remembered as gone when it is finished here, by the full
        recovery or, if the device was still there then, by its late ``DEVICE_DELETED``: the process that asked has
        gone, and a later ``nic del`` of the NIC answers ``removed``.
        """
        nic = step.nic
        log.info("guest %s: recovery: %s NIC %s (recorded %s)", self._parts.name, step.action, nic.id, nic.state)
        try:
            match step.action:
                case "forget":
                    await self._unplugs.release_host(nic)
                    self._unplugs.drop(nic.id)
                case "activate":
                    self._activate(nic, observation)
                    await self._apply_link(nic)
                case "relink":
                    await self._apply_link(nic)
                case "unplug":
                    await self._unplugs.ask_again(nic.id)
                case "undo_add" | "vanished" | "finish":
                    inherited = nic.id in self._inherited
                    self._inherited.discard(nic.id)
                    remember = step.action != "undo_add" and (full or inherited)
                    await self._unplugs.clean_up(nic, by_recovery=remember)
                    if step.action != "undo_add":
                        self._parts.events.emit("nic_removed", nic_id=nic.id)
                    return nic.netdev is not None
        except QmpCommandError as err:
            log.warning("guest %s: recovery of NIC %s (%s) failed: %s", self._parts.name, nic.id, step.action, err)
        return False

    async def _relink(self, steps: list[RecoveryStep], observation: Observation) -> None:
        """The ``relink`` steps, their ``set_link`` commands sent at once: one round trip for all, not one per NIC.

        QEMU cannot say a link's state, so a full read re-applies every NIC's. Each step runs to its end; a failure of
        the monitor itself is raised once all have ended.
        """
        results = await asyncio.gather(
            *(self._recover_one(step, observation, full=True) for step in steps), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def _activate(self, nic: NicRecord, observation: Observation) -> None:
        """The NIC's hot-add got through before the process that began it went: it is active, at its PCI place."""
        device = observation.device(nic.id)
        pci = nic.pci
        if device is not None:
            pci = pci or PciAddress(bus=device.bus, slot=device.slot, function=device.function)
        active = nic.model_copy(update={"state": "active", "pci": pci})
        self._parts.journal.save(self._parts.journal.record.with_nic(active))

    async def _apply_link(self, nic: NicRecord) -> None:
        if nic.spec is not None and nic.spec.backend.type == "vfio":
            return  # an assigned function has no net client in QEMU, so no link to set (the guest's driver owns it)
        await self._parts.monitor.execute("set_link", {"name": nic.id, "up": nic.link == "up"})

    async def _sweep_taps(self) -> None:
        if self._parts.host is None:
            return
        keep = {nic.host.owner for nic in self._parts.journal.record.nics.values() if nic.host.owner is not None}
        try:
            await self._parts.host.sweep_orphans(f"{self._parts.journal.key}/", keep)
        except QmpnetError as err:
            log.warning("guest %s: sweeping stale taps failed: %s", self._parts.name, err)

    async def _sweep_passts(self) -> None:
        """End the passts of this guest's NICs that no longer exist (a controller killed before recording one)."""
        if self._parts.host is None:
            return
        directory = self._parts.settings.hostnet.passt_guest_dir(self._parts.journal.key)
        keep = {nic.host.passt_socket for nic in self._parts.journal.record.nics.values() if nic.host.passt_socket}
        try:
            await self._parts.host.sweep_passt(str(directory), keep)
        except QmpnetError as err:
            log.warning("guest %s: sweeping stale passts failed: %s", self._parts.name, err)
    async def _sync_filters(self) -> None:
        """Re-apply the anti-spoofing rules the records ask for, and remove the rules of taps that are gone.

        The rules live in the kernel and outlive this process, but a host whose ruleset was flushed, or a process
        killed halfway through a change, leaves them unlike the record: the record is the intent.
        """
        host = self._parts.host
        if host is None:
            return
        wanted = [(nic.host.tap, nic.spec.mac, nic.spec.filter) for nic in self._parts.journal.record.nics.values()
                  if nic.state == "active" and nic.spec is not None and nic.host.tap is not None
                  and nic.spec.mac is not None and nic.spec.filter is not None]
        try:
            for tap, mac, rules in wanted:
                await host.set_filter(tap, mac, rules)
            await host.sweep_filters()
        except QmpnetError as err:
            log.warning("guest %s: re-applying anti-spoofing rules failed: %s", self._parts.name, err)
