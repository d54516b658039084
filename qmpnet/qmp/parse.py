"""Parsers for the QEMU answers that have no QMP structure: HMP ``info qtree``, ``info network``, ``device_add help``.

QEMU 7.2 has no ``query-netdev`` and no QMP view of the device tree with bus names; ``query-pci`` even hides
devices behind bridges until the guest firmware has numbered the buses (as with ``-S``). ``info qtree`` shows
every bus by the name ``device_add`` takes, every device's ``addr``, ``mac`` and ``netdev`` in one round trip,
whatever the guest has done, so placement and the NIC list are built from it. ``info network`` is the only place
a backend's type and options can be read. These functions are pure and tested against captured output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from qmpnet.errors import Unsupported
from qmpnet.model import ModelInfo, ObservedBackend
from qmpnet.placement import BusKind, PciBus, PciTopology
from qmpnet.ports import NetClient, PciDevice

__all__ = ["DeviceTree", "machine_kind", "parse_device_help", "parse_network", "parse_qtree"]

ROOT_PORT_DRIVERS = frozenset({"pcie-root-port", "ioh3420", "xio3130-downstream"})
BRIDGE_DRIVERS = frozenset({"pcie-pci-bridge", "pci-bridge", "pci-bridge-seat"})
HOST_BRIDGE_DRIVERS = frozenset({"i440FX-pcihost", "q35-pcihost"})
NOMINAL_SPEED = {"rtl8139": "100M", "e1000": "1G", "e1000e": "1G", "virtio-net-pci": "10G"}
PCIE_MODELS = frozenset({"e1000e", "virtio-net-pci"})
HOTPLUG_MODELS = frozenset(NOMINAL_SPEED)

_DEV = re.compile(r'dev: (?P<driver>[^,]+), id "(?P<id>[^"]*)"')
_PROP = re.compile(r"(?P<name>[\w.-]+) = (?P<value>.*)")
_HELP = re.compile(r'name "(?P<name>[^"]+)"(?:, bus (?P<bus>[\w-]+))?(?:, alias "[^"]*")?(?:, desc "(?P<desc>[^"]*)")?')


@dataclass
class _Dev:
    driver: str
    id: str
    props: dict[str, str] = field(default_factory=dict)
    buses: list[_Bus] = field(default_factory=list)


@dataclass
class _Bus:
    name: str
    parent: _Dev | None
    type: str = ""
    devs: list[_Dev] = field(default_factory=list)


@dataclass(frozen=True)
class DeviceTree:
    """What ``info qtree`` tells about PCI."""

    topology: PciTopology
    devices: tuple[PciDevice, ...]
    device_ids: frozenset[str]


def machine_kind(qom_type: str) -> tuple[str, str]:
    """Map the QOM type of ``/machine`` (``pc-q35-7.2-machine``) to ``(machine name, "pc" | "q35")``."""
    name = qom_type.removesuffix("-machine")
    return name, ("q35" if "q35" in name else "pc")


def parse_qtree(text: str, kind: str) -> DeviceTree:
    """Parse ``info qtree`` into the PCI topology, the PCI devices and every device id in the guest."""
    buses = _tree(text)
    pci_buses = [b for b in buses if b.type in ("PCI", "PCIE")]
    devices: list[PciDevice] = []
    topo: list[PciBus] = []
    for bus in pci_buses:
        used: dict[tuple[int, int], str] = {}
        for dev in bus.devs:
            slot, function = _devfn(dev.props.get("addr", ""))
            if slot < 0:
                continue
            used[(slot, function)] = dev.id or dev.driver
            mac, netdev = _nic_props(dev)
            host = _unquote(dev.props.get("host")) if dev.driver == "vfio-pci" else None
            devices.append(PciDevice(dev.id or None, dev.driver, bus.name, slot, function, mac, netdev, host))
        bus_kind = _bus_kind(bus)
        hotplug = bus_kind in ("root_port", "pci_bridge") or (bus_kind == "root" and kind == "pc")
        topo.append(PciBus(bus.name, bus_kind, hotplug, used))
    topo.sort(key=lambda b: (b.kind != "root", _natural(b.name)))
    if not topo or topo[0].kind != "root":
        raise Unsupported(f"the guest has no PCI root bus (pci.0 or pcie.0): machine kind {kind} cannot hot-plug NICs")
    ids = frozenset(dev.id for bus in buses for dev in bus.devs if dev.id)
    machine: Literal["pc", "q35"] = "q35" if kind == "q35" else "pc"
    return DeviceTree(PciTopology(machine, tuple(topo)), tuple(devices), ids)


def _tree(text: str) -> list[_Bus]:
    buses: list[_Bus] = []
    stack: list[tuple[int, _Dev | _Bus]] = []
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped:
            continue
        indent = len(raw) - len(raw.lstrip(" "))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1] if stack else None
        if stripped.startswith("bus: "):
            bus = _Bus(stripped[5:], parent if isinstance(parent, _Dev) else None)
            if isinstance(parent, _Dev):
                parent.buses.append(bus)
            buses.append(bus)
            stack.append((indent, bus))
        elif (match := _DEV.fullmatch(stripped)) and isinstance(parent, _Bus):
            dev = _Dev(match["driver"], match["id"])
            parent.devs.append(dev)
            stack.append((indent, dev))
        elif stripped.startswith("type ") and isinstance(parent, _Bus):
            parent.type = stripped[5:]
        elif (prop := _PROP.fullmatch(stripped)) and isinstance(parent, _Dev):
            parent.props[prop["name"]] = prop["value"]
    return buses


def _devfn(addr: str) -> tuple[int, int]:
    match = re.fullmatch(r"([0-9a-fA-F]{2})\.([0-7])", addr)
    return (int(match[1], 16), int(match[2])) if match else (-1, -1)


def _unquote(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip('"')
    return value or None


def _nic_props(dev: _Dev) -> tuple[str | None, str | None]:
    # virtio-net-pci keeps mac/netdev on its virtio-net-device child on the virtio bus.
    for candidate in (dev, *(child for bus in dev.buses for child in bus.devs)):
        if "mac" in candidate.props:
            return _unquote(candidate.props["mac"]), _unquote(candidate.props.get("netdev"))
    return None, None


def _bus_kind(bus: _Bus) -> BusKind:
    if bus.parent is None:
        return "other"
    if bus.parent.driver in ROOT_PORT_DRIVERS:
        return "root_port"
    if bus.parent.driver in BRIDGE_DRIVERS:
        return "pci_bridge"
    if bus.parent.driver in HOST_BRIDGE_DRIVERS:
        return "root"
    return "other"


def _natural(name: str) -> tuple[object, ...]:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def parse_network(text: str) -> dict[str, NetClient]:
    """Parse ``info network`` into net clients by name, with each client's peer.

    NICs appear as ``type=nic`` clients whose peer is their backend; NICs on a hub have a ``hubport`` backend.
    """
    clients: dict[str, NetClient] = {}
    hub: str | None = None
    last: str | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("hub "):
            hub, last = line[4:].strip(), None
            continue
        if line.startswith(" \\ "):
            body = line[3:]
            if hub is not None:
                _hub_member(clients, body, hub)
            elif last is not None:
                name, backend = _client(body)
                clients[name] = NetClient(name, backend, peer=last)
                clients[last] = NetClient(last, clients[last].backend, peer=name)
            continue
        hub = None
        last, backend = _client(line)
        clients[last] = NetClient(last, backend)
    return clients


def _hub_member(clients: dict[str, NetClient], body: str, hub: str) -> None:
    port, _, rest = body.partition(": ")
    port_backend = ObservedBackend(type="hubport", options={"hub": hub})
    if re.match(r"[^:,=\s]+: index=", rest):
        peer, backend = _client(rest)
        clients[peer] = NetClient(peer, backend, peer=port)
        clients[port] = NetClient(port, port_backend, peer=peer)
    else:
        clients[port] = NetClient(port, port_backend)


def _client(line: str) -> tuple[str, ObservedBackend]:
    name, _, info = line.strip().partition(": ")
    options: dict[str, str] = {}
    for item in info.split(","):
        key, sep, value = item.partition("=")
        if sep and key:
            options[key] = value
    kind = options.pop("type", "unknown")
    options.pop("index", None)
    return name, ObservedBackend(type=kind, options=options)


def parse_device_help(text: str) -> list[ModelInfo]:
    """Parse HMP ``device_add help`` into the NIC models of its ``Network devices:`` section."""
    models: list[ModelInfo] = []
    in_section = False
    for line in text.splitlines():
        if line.endswith("devices:"):
            in_section = line.startswith("Network devices")
            continue
        match = _HELP.match(line) if in_section else None
        if not match or match["bus"] != "PCI":
            continue
        name = match["name"]
        models.append(
            ModelInfo(
                name=name,
                bus="pcie" if name in PCIE_MODELS else "pci",
                speed=NOMINAL_SPEED.get(name),
                description=match["desc"] or name,
                hotplug=name in HOTPLUG_MODELS,
            )
        )
    return models
