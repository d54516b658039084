"""The inventory: what a guest lane believes the guest's NICs and PCI places are, between observations.

Observing a guest costs several round trips and a parse; a hot-add is two QMP commands. Re-reading the guest
before every change would double the cost of the operation users care about, so the lane observes, keeps this
inventory, and updates it from the outcome of its own steps. It is a cache, not the truth: another QMP client (on
another monitor of the same QEMU) may add or remove devices at any moment. The lane therefore throws it away and
re-reads whenever it may be stale: after any failed or unknown-outcome step, when QEMU refuses a plan (an id or a
slot another client took; the lane then plans once more), on a ``DEVICE_DELETED`` it did not cause, on every
``list_nics`` and periodic resync, and on reconnect.

Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qmpnet.core.hotadd_plan import AddPlan, PlanContext
from qmpnet.core.model import Backend, Nic, NicSpec, NicState, ObservedBackend, PciAddress
from qmpnet.core.model_base import replaced, trusted
from qmpnet.core.placement import PciBus, PciTopology

if TYPE_CHECKING:
    from qmpnet.core.ports import Observation

__all__ = ["Inventory", "nics_from"]


def nics_from(obs: Observation, links: dict[str, str], pending: set[str]) -> dict[str, Nic]:
    """Build the NIC list from an observation, our record of link states and the ids pending removal.

    Only the devices the adapter read as NICs are listed (:attr:`PciDevice.is_nic`: their type has NIC properties,
    or they are vfio-pci functions), each once. A NIC without an id is named after its net client (``e1000.0``),
    found by MAC and model, unless that name is taken (by a device id or another NIC); then by its PCI place.
    """
    clients: dict[tuple[str | None, str | None], list[str]] = {}
    for client in obs.netclients.values():
        if client.backend.type == "nic":
            key = (client.backend.options.get("macaddr"), client.backend.options.get("model"))
            clients.setdefault(key, []).append(client.name)
    taken = {dev.id for dev in obs.devices if dev.id} | set(obs.device_ids)
    nics: dict[str, Nic] = {}
    for dev in obs.devices:
        if not dev.is_nic:
            continue
        nic_id = dev.id
        if nic_id is None:
            names = [n for n in clients.get((dev.mac, dev.driver), []) if n not in taken]
            nic_id = names[0] if len(names) == 1 else f"{dev.bus}:{dev.slot:02x}.{dev.function}"
            taken.add(nic_id)
        backend_client = obs.netclients.get(dev.netdev) if dev.netdev else None
        backend = backend_client.backend if backend_client else None
        if dev.host is not None:
            backend = ObservedBackend(type="vfio", options={"host": dev.host})
        state: NicState = "removal_pending" if nic_id in pending else "active"
        nics[nic_id] = Nic(
            id=nic_id,
            model=dev.driver,
            mac=dev.mac,
            netdev=dev.netdev,
            backend=backend,
            pci=PciAddress(bus=dev.bus, slot=dev.slot, function=dev.function),
            link="down" if links.get(nic_id) == "down" else "up",
            state=state,
        )
    return nics


@dataclass
class Inventory:
    """Mutable view of the guest kept by its lane (see the module docstring)."""

    machine: str
    topology: PciTopology
    device_ids: set[str]
    netdev_ids: set[str]
    nics: dict[str, Nic] = field(default_factory=dict)
    #: The MACs and assigned host functions of ``nics`` (made by the first ``view``, kept by ``added``).
    _in_use: tuple[set[str], set[str]] | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_observation(cls, obs: Observation, links: dict[str, str], pending: set[str]) -> Inventory:
        """Build from a fresh observation."""
        nics = nics_from(obs, links, pending)
        netdevs = {name for name, c in obs.netclients.items() if c.backend.type != "nic"}
        return cls(obs.machine, obs.topology, set(obs.device_ids), netdevs, nics)

    def view(self) -> PlanContext:
        """What planning needs (live views of the inventory's sets: plan before the next change)."""
        in_use = self._in_use
        if in_use is None:
            macs = {nic.mac for nic in self.nics.values() if nic.mac}
            hosts = {host for host in map(_vfio_host, self.nics.values()) if host is not None}
            in_use = self._in_use = (macs, hosts)
        return PlanContext(self.device_ids, self.netdev_ids, in_use[0], self.topology, in_use[1])

    def added(self, plan: AddPlan, spec: NicSpec) -> Nic:
        """Record a successful hot-add and return the new NIC."""
        placement = plan.placement
        nic = trusted(Nic, {
            "id": plan.nic_id,
            "model": spec.driver,
            "mac": plan.mac,
            "netdev": plan.netdev_id,
            "backend": backend_of(spec),
            "pci": trusted(PciAddress, {"bus": placement.bus, "slot": placement.slot, "function": placement.function}),
            "link": spec.link,
            "state": "active",
        })
        self.device_ids.add(plan.nic_id)
        if plan.netdev_id is not None:
            self.netdev_ids.add(plan.netdev_id)
        if plan.nic_id in self.nics:
            self._in_use = None  # it replaces a NIC: made again from all at the next view
        elif self._in_use is not None:
            macs, hosts = self._in_use
            if nic.mac:
                macs.add(nic.mac)
            host = _vfio_host(nic)
            if host is not None:
                hosts.add(host)
        self.nics[plan.nic_id] = nic
        self._occupy(plan.placement.bus, (plan.placement.slot, plan.placement.function), plan.nic_id)
        return nic

    def removed(self, nic_id: str) -> None:
        """Record that NIC ``nic_id`` and its netdev are gone."""
        nic = self.nics.pop(nic_id, None)
        self.device_ids.discard(nic_id)
        self._in_use = None
        if nic is None:
            return
        if nic.netdev:
            self.netdev_ids.discard(nic.netdev)
        if nic.pci:
            self._occupy(nic.pci.bus, (nic.pci.slot, nic.pci.function), None)

    def update(self, nic_id: str, **changes: object) -> Nic:
        """Change fields of a known NIC (``link``, ``state``) and return it."""
        nic = replaced(self.nics[nic_id], changes)
        self.nics[nic_id] = nic
        self._in_use = None
        return nic

    def _occupy(self, bus_name: str, place: tuple[int, int], holder: str | None) -> None:
        buses: list[PciBus] = []
        for bus in self.topology.buses:
            if bus.name != bus_name:
                buses.append(bus)
                continue
            used = dict(bus.used)
            if holder is None:
                used.pop(place, None)
            else:
                used[place] = holder
            buses.append(PciBus(bus.name, bus.kind, bus.hotplug, used))
        self.topology = PciTopology(self.topology.machine, tuple(buses))


def _vfio_host(nic: Nic) -> str | None:
    """The host PCI function assigned as ``nic``, if it is one (what planning checks a vfio NIC against)."""
    backend = nic.backend
    return str(backend.options.get("host")) if backend is not None and backend.type == "vfio" else None


def backend_of(spec: NicSpec) -> ObservedBackend:
    """Describe ``spec``'s backend the way :class:`ObservedBackend` does (strings, options that were set)."""
    backend = spec.backend
    last = _last_backend[0]
    if last is not None and last[0] is backend:
        return last[1]
    fields = backend.model_dump(mode="json", exclude_defaults=True, exclude={"type"})
    observed = trusted(ObservedBackend, {"type": backend.type, "options": {k: _text(v) for k, v in fields.items()}})
    _last_backend[0] = (backend, observed)
    return observed


#: The backend last described, and its description: a hot-add describes its backend twice (the inventory's NIC,
#: then the NIC it answers), the planned spec's being the asked one's. Held, so its id is not reused meanwhile.
_last_backend: list[tuple[Backend, ObservedBackend] | None] = [None]


def _text(value: object) -> str:
    if isinstance(value, list):
        return ";".join(_text(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={_text(v)}" for k, v in value.items())
    return str(value)

