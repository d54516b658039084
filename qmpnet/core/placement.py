"""PCI placement: where a hot-added NIC goes, decided before anything is sent to QEMU.

QEMU would pick a slot itself on ``pc``, but deciding here lets qmpnet refuse cleanly (``no_free_slot`` with the
command-line fix) instead of adding a netdev, failing ``device_add`` and rolling back, and lets the same rules
cover q35, where QEMU cannot choose at all: ``pcie.0`` does not hot-plug, so a NIC needs a free
``pcie-root-port`` (one device each, at slot 0). Conventional PCI models (rtl8139, e1000) follow QEMU's PCI
Express guidelines and libvirt: on q35 they go behind a ``pcie-pci-bridge`` (or ``pci-bridge``), never straight
into a root port, unless the caller names the bus.

Input is a :class:`PciTopology` the QMP adapter builds from ``query-pci`` and ``qom-list``; output a
:class:`Placement`, or (:func:`capacity`) how many more NICs of each model fit and where. Both come from the same
rules (:func:`_automatic_buses`), so a count never disagrees with what a hot-add would do; and both give the same
command-line advice when nothing is free (:func:`advice`). No I/O.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from qmpnet.core.observed import BusCapacity, Capacity, ModelCapacity
from qmpnet.errors import Conflict, InvalidRequest, NoFreeSlot, NotFound, Unsupported

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = [
    "CAPACITY_MODELS",
    "LEGACY_PCI_MODELS",
    "BusKind",
    "PciBus",
    "PciTopology",
    "Placement",
    "advice",
    "capacity",
    "place",
]

BusKind = Literal["root", "root_port", "pci_bridge", "other"]

#: Models that are conventional PCI devices (no PCI Express capability).
LEGACY_PCI_MODELS = frozenset({"rtl8139", "e1000"})
#: The NIC models :func:`capacity` counts for: PCI Express ones first, then conventional PCI ones.
CAPACITY_MODELS = ("virtio-net-pci", "e1000e", "e1000", "rtl8139")

# Bridge slot 0 is reserved for the SHPC controller; libvirt leaves it alone too.
_BRIDGE_SLOTS = range(1, 32)
_SLOT = operator.itemgetter(0)  # of a (slot, function) key
_ROOT_SLOTS = range(1, 32)


@dataclass(frozen=True)
class PciBus:
    """One PCI bus that a device can be placed on.

    Attributes:
        name: The id QEMU accepts as ``bus=``: ``pci.0``/``pcie.0`` or the id of the bridge or root port.
        kind: What provides the bus.
        hotplug: Whether devices can be hot-plugged onto it.
        used: Occupied ``slot -> {functions}`` with the id (or description) of the device there.
    """

    name: str
    kind: BusKind
    hotplug: bool
    used: Mapping[tuple[int, int], str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Placement asks "is slot N free?" up to 32 times per bus; answer from a set, not a scan of ``used``.
        object.__setattr__(self, "_used_slots", frozenset(map(_SLOT, self.used)))

    def slot_free(self, slot: int) -> bool:
        """Whether no function of ``slot`` is in use."""
        return slot not in self._used_slots  # type: ignore[attr-defined]

    def candidate_slots(self) -> range:
        """The slots a device may be placed in on this bus."""
        if self.kind == "root_port":
            return range(1)
        if self.kind == "pci_bridge":
            return _BRIDGE_SLOTS
        return _ROOT_SLOTS

    def free_slots(self) -> list[int]:
        """The candidate slots no function of which is in use, lowest first."""
        used = self._used_slots  # type: ignore[attr-defined]
        return [slot for slot in self.candidate_slots() if slot not in used]

    def first_free(self) -> int | None:
        """The lowest candidate slot no function of which is in use (``free_slots()[0]``, without the list)."""
        used = self._used_slots  # type: ignore[attr-defined]
        for slot in self.candidate_slots():
            if slot not in used:
                return slot
        return None

    def free_count(self) -> int:
        """How many candidate slots are free (``len(free_slots())``, without the list)."""
        candidates = self.candidate_slots()
        return len(candidates) - len(self._used_slots.intersection(candidates))  # type: ignore[attr-defined]


@dataclass(frozen=True)
class PciTopology:
    """The guest's PCI buses, root bus first."""

    machine: Literal["pc", "q35"]
    buses: tuple[PciBus, ...]

    @property
    def root(self) -> PciBus:
        """The root bus (``pci.0`` or ``pcie.0``)."""
        return self.buses[0]

    def bus(self, name: str) -> PciBus | None:
        """The bus called ``name``, if any."""
        return next((bus for bus in self.buses if bus.name == name), None)


@dataclass(frozen=True)
class Placement:
    """Where to put the device: the ``bus`` and ``addr`` arguments of ``device_add``."""

    bus: str
    slot: int
    function: int


def place(
    model: str, topology: PciTopology, *, bus: str | None = None, addr: tuple[int, int] | None = None
) -> Placement:
    """Choose the bus and slot for a new device of ``model``.

    Args:
        model: The device model (``virtio-net-pci``, ``e1000``, ...).
        topology: The guest's buses as they are now.
        bus: A bus the caller asked for (overrides the automatic choice).
        addr: A ``(slot, function)`` the caller asked for.

    Raises:
        NotFound: The requested bus does not exist.
        Unsupported: The requested bus cannot hot-plug.
        Conflict: The requested address is in use.
        InvalidRequest: The requested address cannot exist on that bus.
        NoFreeSlot: No place is free; the message says what to add to the QEMU command line.
    """
    if bus is not None or addr is not None:
        return _place_explicit(topology, bus, addr)
    return _first_free(model, _automatic_buses(model, topology), lambda: advice(model, topology))


#: Capacities counted before, by all they depend on (:func:`_capacity_key`); at most :data:`_COUNTED_LIMIT`.
_COUNTED: dict[tuple[object, ...], Capacity] = {}
_COUNTED_LIMIT = 1024


def capacity(topology: PciTopology, models: tuple[str, ...] = CAPACITY_MODELS) -> Capacity:
    """How many more NICs of each model automatic placement (:func:`place` without ``bus``) would find room for.

    Each count is of one model alone: the places of the root ports and bridges are shared, so two models' counts
    do not add up (one virtio NIC in a root port takes it from e1000e too).

    A count made before is given again (the same frozen object): the controller counts after every NIC added or
    removed and every resync, a guest's free places go back and forth, and a fleet's guests are alike. Building
    the answer's models cost ~20 µs, ten times finding it.

    Args:
        topology: The guest's buses as they are now.
        models: The device models to count for.
    """
    key = _capacity_key(topology, models)
    counted = _COUNTED.get(key)
    if counted is None:
        if len(_COUNTED) >= _COUNTED_LIMIT:
            _COUNTED.clear()
        counted = _COUNTED[key] = _count(topology, models)
    return counted


def _capacity_key(topology: PciTopology, models: tuple[str, ...]) -> tuple[object, ...]:
    """What :func:`capacity` depends on: the machine, the models, and each bus's name, kind, hot-plug and free slots."""
    buses = tuple((bus.name, bus.kind, bus.hotplug, bus.free_count()) for bus in topology.buses)
    return topology.machine, models, buses


def _count(topology: PciTopology, models: tuple[str, ...]) -> Capacity:
    counted = []
    counts: dict[int, BusCapacity] = {}  # by bus (its id()): a bus several models may use is counted once
    for model in models:
        buses = []
        for bus in _automatic_buses(model, topology):
            count = counts.get(id(bus))
            if count is None:
                count = counts[id(bus)] = BusCapacity(bus=bus.name, kind=_kind(bus), free=len(bus.free_slots()))
            buses.append(count)
        by_kind = {kind: sum(b.free for b in buses if b.kind == kind) for kind in ("root", "root_port", "pci_bridge")}
        free = sum(by_kind.values())
        counted.append(
            ModelCapacity(
                model=model,
                free=free,
                root_ports=by_kind["root_port"],
                bridge_slots=by_kind["pci_bridge"],
                root_slots=by_kind["root"],
                buses=buses,
                advice=None if free else advice(model, topology),
            )
        )
    return Capacity(machine=topology.machine, models=counted)


def advice(model: str, topology: PciTopology) -> str:
    """What to do when no place is free for ``model``: what to add to the QEMU command line (or remove).

    The one source of this advice: the ``no_free_slot`` error and :func:`capacity` both use it.
    """
    n = sum(1 for b in topology.buses if b.kind == "root_port") + 1
    if topology.machine == "pc":
        return (
            f"every slot of pci.0 is in use; remove a device first, or give the guest a pci-bridge "
            f"(-device pci-bridge,id=br1,chassis_nr=1) and pass bus=br1 for the {model}"
        )
    if model in LEGACY_PCI_MODELS:
        return (
            f"{model} is a conventional PCI device and goes behind a pcie-pci-bridge on q35, and no bridge slot is "
            f"free; start QEMU with -device pcie-root-port,id=rp{n},chassis={n},bus=pcie.0 "
            f"-device pcie-pci-bridge,id=pcibr{n},bus=rp{n} (or pass bus=<root port> to place it there anyway)"
        )
    return (
        f"q35 hot-plugs only into free pcie-root-ports and none is free; start QEMU with more, "
        f"e.g. -device pcie-root-port,id=rp{n},chassis={n},bus=pcie.0 (one per {model} to hot-plug)"
    )


def _automatic_buses(model: str, topology: PciTopology) -> list[PciBus]:
    """The buses automatic placement tries for ``model``, in order (the rules of the module docstring)."""
    if topology.machine == "pc":
        return [topology.root]
    kind: BusKind = "pci_bridge" if model in LEGACY_PCI_MODELS else "root_port"
    return [b for b in topology.buses if b.kind == kind and b.hotplug]


def _kind(bus: PciBus) -> Literal["root", "root_port", "pci_bridge"]:
    # Automatic placement never picks a bus of kind "other"; the root bus counts as "root".
    if bus.kind == "root_port":
        return "root_port"
    if bus.kind == "pci_bridge":
        return "pci_bridge"
    return "root"


def _place_explicit(topology: PciTopology, bus_name: str | None, addr: tuple[int, int] | None) -> Placement:
    bus = topology.root if bus_name is None else topology.bus(bus_name)
    field = "nic.bus" if bus_name is not None else "nic.addr"
    if bus is None:
        known = ", ".join(b.name for b in topology.buses if b.hotplug) or "none"
        raise NotFound(f"nic.bus: no PCI bus {bus_name!r} in the guest (hot-pluggable buses: {known})", field=field)
    if not bus.hotplug:
        raise Unsupported(
            f"{field}: bus {bus.name!r} does not support hot-plugging; name a pcie-root-port or a bridge",
            field=field,
        )
    if addr is None:
        return _first_free("device", [bus], lambda: f"no free slot on bus {bus.name!r}")
    slot, function = addr
    if slot not in bus.candidate_slots():
        raise InvalidRequest(f"nic.addr: slot {slot:#x} cannot be used on bus {bus.name!r}", field="nic.addr")
    holder = bus.used.get((slot, function))
    if holder is not None:
        raise Conflict(
            f"nic.addr: PCI slot {slot:#x} function {function} on {bus.name} is in use by {holder}", field="nic.addr"
        )
    return Placement(bus.name, slot, function)


def _first_free(model: str, buses: list[PciBus], hint: Callable[[], str]) -> Placement:
    """The first free slot of ``buses``; ``hint`` (worded only when none is) says what to do otherwise."""
    for bus in buses:
        slot = bus.first_free()
        if slot is not None:
            return Placement(bus.name, slot, 0)
    raise NoFreeSlot(f"no free PCI place for {model}: {hint()}")
