"""PCI placement: where a hot-added NIC goes, decided before anything is sent to QEMU.

QEMU would pick a slot itself on ``pc``, but deciding here lets qmpnet refuse cleanly (``no_free_slot`` with the
command-line fix) instead of adding a netdev, failing ``device_add`` and rolling back, and lets the same rules
cover q35, where QEMU cannot choose at all: ``pcie.0`` does not hot-plug, so a NIC needs a free
``pcie-root-port`` (one device each, at slot 0). Conventional PCI models (rtl8139, e1000) follow QEMU's PCI
Express guidelines and libvirt: on q35 they go behind a ``pcie-pci-bridge`` (or ``pci-bridge``), never straight
into a root port, unless the caller names the bus.

Input is a :class:`PciTopology` the QMP adapter builds from ``query-pci`` and ``qom-list``; output a
:class:`Placement`. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from qmpnet.errors import Conflict, InvalidRequest, NoFreeSlot, NotFound, Unsupported

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["LEGACY_PCI_MODELS", "BusKind", "PciBus", "PciTopology", "Placement", "place"]

BusKind = Literal["root", "root_port", "pci_bridge", "other"]

#: Models that are conventional PCI devices (no PCI Express capability).
LEGACY_PCI_MODELS = frozenset({"rtl8139", "e1000"})

# Bridge slot 0 is reserved for the SHPC controller; libvirt leaves it alone too.
_BRIDGE_SLOTS = range(1, 32)
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
        object.__setattr__(self, "_used_slots", frozenset(slot for slot, _ in self.used))

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
    if topology.machine == "pc":
        return _first_free(model, [topology.root], _pc_hint(model))
    if model in LEGACY_PCI_MODELS:
        bridges = [b for b in topology.buses if b.kind == "pci_bridge" and b.hotplug]
        return _first_free(model, bridges, _legacy_q35_hint(model, topology))
    ports = [b for b in topology.buses if b.kind == "root_port" and b.hotplug]
    return _first_free(model, ports, _root_port_hint(model, topology))


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
        return _first_free("device", [bus], f"no free slot on bus {bus.name!r}")
    slot, function = addr
    if slot not in bus.candidate_slots():
        raise InvalidRequest(f"nic.addr: slot {slot:#x} cannot be used on bus {bus.name!r}", field="nic.addr")
    holder = bus.used.get((slot, function))
    if holder is not None:
        raise Conflict(
            f"nic.addr: PCI slot {slot:#x} function {function} on {bus.name} is in use by {holder}", field="nic.addr"
        )
    return Placement(bus.name, slot, function)


def _first_free(model: str, buses: list[PciBus], hint: str) -> Placement:
    for bus in buses:
        for slot in bus.candidate_slots():
            if bus.slot_free(slot):
                return Placement(bus.name, slot, 0)
    raise NoFreeSlot(f"no free PCI place for {model}: {hint}")


def _pc_hint(model: str) -> str:
    return (
        f"every slot of pci.0 is in use; remove a device first, or give the guest a pci-bridge "
        f"(-device pci-bridge,id=br1,chassis_nr=1) and pass bus=br1 for the {model}"
    )


def _root_port_hint(model: str, topology: PciTopology) -> str:
    n = sum(1 for b in topology.buses if b.kind == "root_port") + 1
    return (
        f"q35 hot-plugs only into free pcie-root-ports and none is free; start QEMU with more, "
        f"e.g. -device pcie-root-port,id=rp{n},chassis={n},bus=pcie.0 (one per {model} to hot-plug)"
    )


def _legacy_q35_hint(model: str, topology: PciTopology) -> str:
    n = sum(1 for b in topology.buses if b.kind == "root_port") + 1
    return (
        f"{model} is a conventional PCI device and goes behind a pcie-pci-bridge on q35, and no bridge slot is "
        f"free; start QEMU with -device pcie-root-port,id=rp{n},chassis={n},bus=pcie.0 "
        f"-device pcie-pci-bridge,id=pcibr{n},bus=rp{n} (or pass bus=<root port> to place it there anyway)"
    )
