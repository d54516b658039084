"""Reading a guest's PCI devices, buses and net clients from QMP queries, exactly.

What is read, and why (``docs/qemu-notes.md`` has the QEMU side):

* **Devices** come from QOM: ``qom-list /machine/peripheral`` (devices with an id) and
  ``/machine/peripheral-anon`` (``-device`` without one) list each as ``child<TYPE>``. For every device whose type
  is a PCI device, ``qom-get`` reads ``parent_bus`` (a QOM path whose last component is the bus name ``device_add``
  takes) and ``addr`` (the devfn); for a NIC type ``mac`` and ``netdev``; for vfio-pci ``host``; and a bridge or
  root port is ``qom-list``-ed for the PCI bus it provides. These reads do not depend on each other and are sent
  at once (qemu.qmp matches answers by id), so a read costs a few round trips, not one per property.
* **What a type is** comes from QEMU: ``qom-list-types implements=pci-device`` (with parents, so a bridge is a
  ``base-pci-bridge``, a root port a ``pcie-slot``) and ``device-list-properties`` of each PCI type met. A device is
  a NIC only when its type has NIC properties (``netdev``/``mac``) or it is a vfio-pci function; a bridge or root
  port never is, whatever sits behind it. Types belong to the QEMU *binary*: read once per connection, or once per
  binary when the monitor can tell which binary it talks to (:meth:`GuestReader.share_types`; a unix socket's
  peer is a process whose executable can be identified), so a controller with a thousand guests of one QEMU
  keeps one copy and asks each new connection only for its devices.
* **The root bus** is ``query-pci``'s bus 0, which also shows the machine's built-in functions (host bridge, LPC,
  IDE...). It cannot show what sits behind bridges while the firmware has not numbered their buses (``-S``), which
  is why everything else comes from QOM. Each root function must match what QOM says is there; a built-in network
  controller (``-net nic``, a default NIC) is looked up in ``/machine/unattached`` from then on.
* **Net clients** come from HMP ``info network`` (QEMU has no ``query-netdev``), parsed strictly.

**Cost.** QEMU runs one QMP command per turn of its main loop (about 0.2 ms), pipelined or not, so a read costs
what its number of commands costs. What a device's ``qom-get`` s answer cannot change while the device exists (QEMU
refuses to set a static property of a realized device, and devices never move), so they are kept per connection,
by QOM path and type, and a path is forgotten on the ``DEVICE_DELETED`` event QEMU sends to every monitor when a
device goes away (:meth:`GuestReader.forget`, called as the event arrives, before any later answer). A read of an
unchanged guest is then four commands: the two listings, ``query-pci`` and ``info network``; a new device costs
its own ``qom-get`` s once.

An answer of unknown shape raises :class:`UnexpectedReply`. A guest that changes while it is read (another QMP
client adds or removes a device between two queries) is read again, up to ``attempts`` times.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal

from qmpnet.adapters.qmp.parse import (
    PciFunction,
    TypeTree,
    child_buses,
    devfn,
    mac_address,
    parse_network,
    parse_properties,
    parse_qom_children,
    parse_root_functions,
    pci_host,
    qom_path,
    text_value,
)
from qmpnet.core.placement import BusKind, PciBus, PciTopology
from qmpnet.core.ports import Observation, PciDevice
from qmpnet.errors import QmpCommandError, UnexpectedReply, Unsupported

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping

__all__ = ["ANONYMOUS", "PERIPHERAL", "UNATTACHED", "GuestReader"]

PERIPHERAL: Final = "/machine/peripheral"
ANONYMOUS: Final = "/machine/peripheral-anon"
UNATTACHED: Final = "/machine/unattached"
#: The host bridges of the machines qmpnet hot-plugs into, children of ``/machine``.
HOST_BRIDGES: Final = frozenset({"i440FX-pcihost", "q35-pcihost"})
NIC_PROPERTIES: Final = frozenset({"mac", "netdev"})

_Call = tuple[str, dict[str, object] | None]
#: QEMU binaries whose type facts are kept (a host upgrading QEMU meets a few; the oldest are forgotten).
_BUILDS_KEPT: Final = 16


@dataclass
class _TypeFacts:
    """What one QEMU binary says of its PCI types: the type tree, and the properties of each type met so far."""

    tree: TypeTree | None = None
    properties: dict[str, frozenset[str]] = field(default_factory=dict)
    #: Set while one connection reads types for all (a thousand guests connecting at once ask once, not each).
    reading: asyncio.Future[None] | None = None

    async def turn(self) -> asyncio.Future[None]:
        """Wait while another connection of this event loop reads types; returns the future to finish when done."""
        loop = asyncio.get_running_loop()
        while (busy := self.reading) is not None and not busy.done() and busy.get_loop() is loop:
            await asyncio.wait({busy})
        self.reading = loop.create_future()
        return self.reading


#: Type facts by QEMU binary, shared by every connection to a QEMU of that binary (GuestReader.share_types).
_BUILDS: dict[Hashable, _TypeFacts] = {}


@dataclass(frozen=True)
class _Machine:
    """What does not change while a connection lasts."""

    kind: Literal["pc", "q35"]
    root_path: str
    root_name: str
    types: TypeTree


@dataclass
class _Device:
    """A device read from QOM."""

    path: str
    id: str | None
    type: str
    bus_path: str = ""
    slot: int = -1
    function: int = -1
    mac: str | None = None
    netdev: str | None = None
    host: str | None = None
    child_bus: str | None = None

    @property
    def holder(self) -> str:
        return self.id or self.type


class _ChangedError(Exception):
    """The guest changed between two queries of one read."""

    def __init__(self, reason: str, command: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.command = command


class _NeedUnattachedError(Exception):
    """The root bus has a built-in network controller: read ``/machine/unattached`` as well."""


class GuestReader:
    """Reads one guest through ``execute`` (a connected monitor's); keeps per-connection facts between reads.

    Args:
        execute: Runs one QMP command and returns its ``return`` value, raising the qmpnet error tree.
        attempts: Reads to try when the guest changes while it is read, before giving up.
    """

    def __init__(
        self, execute: Callable[[str, Mapping[str, object] | None], Awaitable[object]], *, attempts: int
    ) -> None:
        self._execute = execute
        self._attempts = max(1, attempts)
        self._machine: _Machine | None = None
        self._types = _TypeFacts()
        self._known: dict[str, _Device] = {}
        self._deleted: list[str] | None = None  # while new devices are read: the paths deleted meanwhile
        self._unattached = False

    def share_types(self, build: Hashable) -> None:
        """Take the type facts of QEMU binary ``build`` from (and give them to) every reader of that binary.

        Call before the first read. ``build`` must identify the executable exactly (``QmpMonitor`` uses the device,
        inode, size and modification time of the peer's ``/proc/PID/exe``, and the greeting's version).
        """
        facts = _BUILDS.pop(build, None) or self._types
        _BUILDS[build] = facts  # most recently used last
        while len(_BUILDS) > _BUILDS_KEPT:
            del _BUILDS[next(iter(_BUILDS))]
        self._types = facts

    def forget(self, path: str) -> None:
        """Drop what is kept of the device at QOM ``path`` and below (call it on ``DEVICE_DELETED``)."""
        for known in [p for p in self._known if _under(p, path)]:
            del self._known[known]
        if self._deleted is not None:
            self._deleted.append(path)

    async def read(self, machine: str, kind: str) -> Observation:
        """Read the guest's PCI devices, buses and net clients.

        Args:
            machine: The machine type name (``pc-q35-7.2``).
            kind: ``pc`` or ``q35``.

        Raises:
            Unsupported: The machine has no i440FX or q35 PCI root bus.
            UnexpectedReply: An answer had a shape qmpnet does not know, or the guest changed during every attempt.
            QmpCommandError, OutcomeUnknown, GuestUnavailable: As the monitor's ``execute``.
        """
        last = _ChangedError("not read", "qom-list")
        for _ in range(self._attempts):
            try:
                facts = await self._facts(machine, kind)
                try:
                    return await self._read_once(facts, machine)
                except _NeedUnattachedError:
                    self._unattached = True  # not a change of the guest: the same read, with /machine/unattached
                    return await self._read_once(facts, machine)
            except _ChangedError as err:
                last = err
        raise UnexpectedReply(
            f"{last.command}: the guest changed while it was read, {self._attempts} times in a row "
            f"(last: {last.reason})",
            command=last.command,
        )

    # ------------------------------------------------------------------------------------- per-connection facts

    async def _facts(self, machine: str, kind: str) -> _Machine:
        if self._machine is not None:
            return self._machine
        (listing,) = await self._all([("qom-list", {"path": "/machine"})])
        hosts = [name for name, t in parse_qom_children(listing, "qom-list").items() if t in HOST_BRIDGES]
        if len(hosts) != 1:
            raise Unsupported(
                f"the guest has no PCI root bus (pci.0 or pcie.0): machine {machine} has no i440FX or q35 host "
                "bridge, so qmpnet cannot hot-plug NICs into it"
            )
        host = f"/machine/{hosts[0]}"
        (host_listing,) = await self._all([("qom-list", {"path": host})])
        buses = child_buses(host_listing, "qom-list")
        if len(buses) != 1:
            raise UnexpectedReply(f"qom-list: host bridge {host} has PCI buses {buses}, not one", command="qom-list")
        self._machine = _Machine("q35" if kind == "q35" else "pc", f"{host}/{buses[0]}", buses[0], await self._tree())
        return self._machine

    async def _tree(self) -> TypeTree:
        """The PCI type tree of this QEMU (read by the first connection to its binary)."""
        shared = self._types
        if shared.tree is None:
            done = await shared.turn()
            try:
                if shared.tree is None:
                    (types,) = await self._all([("qom-list-types", {"implements": "pci-device", "abstract": True})])
                    shared.tree = TypeTree.parse(types, "qom-list-types")
            finally:
                done.set_result(None)
        return shared.tree

    async def _learn(self, facts: _Machine, types: Iterable[str]) -> None:
        """Read the properties of each PCI type not met yet (bridges and root ports are never NICs: not asked)."""
        shared = self._types
        properties = shared.properties
        wanted = set(types)
        if wanted <= properties.keys():
            return
        done = await shared.turn()
        try:
            new = sorted(wanted - properties.keys())
            for qom_type in [t for t in new if facts.types.is_a(t, "base-pci-bridge")]:
                properties[qom_type] = frozenset()
                new.remove(qom_type)
            answers = await self._all([("device-list-properties", {"typename": t}) for t in new])
            for qom_type, answer in zip(new, answers, strict=True):
                properties[qom_type] = parse_properties(answer, "device-list-properties")
        finally:
            done.set_result(None)

    # ----------------------------------------------------------------------------------------------- one read

    async def _read_once(self, facts: _Machine, machine: str) -> Observation:
        calls: list[_Call] = [
            ("qom-list", {"path": PERIPHERAL}),
            ("qom-list", {"path": ANONYMOUS}),
            ("query-pci", None),
            ("human-monitor-command", {"command-line": "info network"}),
        ]
        if self._unattached:
            calls.append(("qom-list", {"path": UNATTACHED}))
        answers = await self._all(calls)
        peripheral = parse_qom_children(answers[0], "qom-list")
        devices = [_Device(f"{PERIPHERAL}/{name}", name, t) for name, t in peripheral.items() if t in facts.types]
        devices += [
            _Device(f"{ANONYMOUS}/{name}", None, t)
            for name, t in parse_qom_children(answers[1], "qom-list").items()
            if t in facts.types
        ]
        builtins = []
        if self._unattached:
            builtins = [
                _Device(f"{UNATTACHED}/{name}", None, t)
                for name, t in parse_qom_children(answers[4], "qom-list").items()
                if t in facts.types
            ]
        functions = parse_root_functions(answers[2], "query-pci")
        network = answers[3]
        if not isinstance(network, str):
            raise UnexpectedReply(f"info network: expected text, got {type(network).__name__}", command="info network")
        await self._learn(facts, (d.type for d in devices + builtins))
        # Of the machine's own devices only the NICs are read from QOM; query-pci describes the others.
        devices += [d for d in builtins if self._is_nic_type(facts, d.type)]
        devices = await self._read_devices(facts, devices, {fn.qdev_id: fn for fn in functions if fn.qdev_id})
        topology, pci = _assemble(facts, devices, functions, unattached=self._unattached)
        return Observation(machine, topology, pci, frozenset(peripheral), parse_network(network))

    def _is_nic_type(self, facts: _Machine, qom_type: str) -> bool:
        return bool(self._types.properties[qom_type] & NIC_PROPERTIES) or facts.types.is_a(qom_type, "vfio-pci")

    async def _read_devices(
        self, facts: _Machine, listed: list[_Device], on_root: Mapping[str, PciFunction]
    ) -> list[_Device]:
        """The listed devices with their facts: kept ones as they are, new ones read (all at once).

        A device ``query-pci`` shows by id on the root bus needs no ``parent_bus`` and ``addr``: that answer says both.
        """
        known = self._known
        kept = {d.path: known[d.path] for d in listed if d.path in known and known[d.path].type == d.type}
        self._known = kept  # what is no longer listed is gone
        new = [d for d in listed if d.path not in kept]
        calls: list[_Call] = []
        stores: list[tuple[_Device, Callable[[_Device, object], None]]] = []
        for dev in new:
            props = self._types.properties[dev.type]
            wanted: list[tuple[str, Callable[[_Device, object], None]]] = []
            if (fn := on_root.get(dev.id or "")) is not None:
                dev.bus_path, dev.slot, dev.function = facts.root_path, fn.slot, fn.function
            else:
                wanted += [("parent_bus", _set_bus), ("addr", _set_addr)]
            wanted += [(prop, store) for prop, store in (("mac", _set_mac), ("netdev", _set_netdev)) if prop in props]
            if facts.types.is_a(dev.type, "vfio-pci") and "host" in props:
                wanted.append(("host", _set_host))
            for prop, store in wanted:
                calls.append(("qom-get", {"path": dev.path, "property": prop}))
                stores.append((dev, store))
            if facts.types.is_a(dev.type, "base-pci-bridge"):
                calls.append(("qom-list", {"path": dev.path}))
                stores.append((dev, _set_child_bus))
        deleted: list[str] = []
        self._deleted = deleted
        try:
            answers = await self._all(calls)
        finally:
            self._deleted = None
        if gone := next((d.path for d in new for path in deleted if _under(d.path, path)), None):
            raise _ChangedError(f"{gone} was deleted while it was read", "qom-get")
        for (dev, store), answer in zip(stores, answers, strict=True):
            store(dev, answer)
        self._known.update((dev.path, dev) for dev in new)
        return [kept.get(d.path, d) for d in listed]

    async def _all(self, calls: list[_Call]) -> list[object]:
        """Run ``calls`` at once; the answers in order. A device that vanished meanwhile is a change of the guest."""
        results = await asyncio.gather(*(self._execute(c, a) for c, a in calls), return_exceptions=True)
        vanished: _ChangedError | None = None
        for (command, arguments), result in zip(calls, results, strict=True):
            if not isinstance(result, BaseException):
                continue
            if not isinstance(result, Exception):
                raise result
            if isinstance(result, QmpCommandError) and result.qmp_class == "DeviceNotFound" and arguments:
                vanished = vanished or _ChangedError(f"{arguments.get('path')} went away", command)
                continue
            raise result
        if vanished is not None:
            raise vanished
        return list(results)


def _set_bus(dev: _Device, answer: object) -> None:
    dev.bus_path = qom_path(answer, "qom-get parent_bus")


def _set_addr(dev: _Device, answer: object) -> None:
    dev.slot, dev.function = devfn(answer, "qom-get addr")


def _set_mac(dev: _Device, answer: object) -> None:
    dev.mac = mac_address(answer, "qom-get mac")


def _set_netdev(dev: _Device, answer: object) -> None:
    dev.netdev = text_value(answer, "qom-get netdev")


def _set_host(dev: _Device, answer: object) -> None:
    dev.host = pci_host(answer, "qom-get host")


def _set_child_bus(dev: _Device, answer: object) -> None:
    buses = child_buses(answer, "qom-list")
    if len(buses) != 1:
        raise UnexpectedReply(f"qom-list: bridge {dev.path} has PCI buses {buses}, not one", command="qom-list")
    dev.child_bus = f"{dev.path}/{buses[0]}"


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(f"{top}/")


def _bus_name(path: str) -> str:
    return path.rpartition("/")[2]


def _natural(name: str) -> tuple[object, ...]:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def _bridge_kind(types: TypeTree, qom_type: str) -> BusKind:
    if types.is_a(qom_type, "pcie-slot"):
        return "root_port"
    if types.is_a(qom_type, "pci-bridge") or types.is_a(qom_type, "pcie-pci-bridge"):
        return "pci_bridge"
    return "other"


def _assemble(
    facts: _Machine, devices: list[_Device], functions: list[PciFunction], *, unattached: bool
) -> tuple[PciTopology, tuple[PciDevice, ...]]:
    """Join the QOM devices and the root bus functions into the topology and the device list."""
    kinds: dict[str, tuple[str, BusKind]] = {facts.root_path: (facts.root_name, "root")}
    for dev in devices:
        if dev.child_bus is not None:
            kinds[dev.child_bus] = (_bus_name(dev.child_bus), _bridge_kind(facts.types, dev.type))
    for dev in devices:
        # A PCI device on a bus no bridge we know provides (a pxb's, say): listed where QEMU says, never planned on.
        kinds.setdefault(dev.bus_path, (_bus_name(dev.bus_path), "other"))
    used: dict[str, dict[tuple[int, int], str]] = {path: {} for path in kinds}
    listed: list[tuple[str, PciDevice]] = []
    for dev in devices:
        place = (dev.slot, dev.function)
        if place in used[dev.bus_path]:
            raise UnexpectedReply(
                f"qom-get addr: {dev.path} and {used[dev.bus_path][place]} are both at {place} on "
                f"{kinds[dev.bus_path][0]}",
                command="qom-get",
            )
        used[dev.bus_path][place] = dev.holder
        name = kinds[dev.bus_path][0]
        item = PciDevice(dev.id, dev.type, name, dev.slot, dev.function, dev.mac, dev.netdev, dev.host, dev.path)
        listed.append((dev.bus_path, item))
    for builtin in _root_functions(facts, devices, functions, unattached=unattached):
        used[facts.root_path][(builtin.slot, builtin.function)] = builtin.driver
        listed.append((facts.root_path, builtin))
    names = Counter(name for name, _ in kinds.values())
    buses = {
        # A bus whose name another bus also has (QEMU names an anonymous root port's bus "pcie.0", like the root
        # bus) cannot be named in device_add: it is listed, never planned on.
        path: PciBus(name, kind, _hotplug(kind, facts.kind) and (kind == "root" or names[name] == 1), used[path])
        for path, (name, kind) in kinds.items()
    }
    paths = sorted(buses, key=lambda path: (buses[path].kind != "root", _natural(buses[path].name), path))
    order = {path: n for n, path in enumerate(paths)}
    listed.sort(key=lambda item: (order[item[0]], item[1].slot, item[1].function))
    return PciTopology(facts.kind, tuple(buses[path] for path in paths)), tuple(d for _, d in listed)


def _hotplug(kind: BusKind, machine: str) -> bool:
    return kind in ("root_port", "pci_bridge") or (kind == "root" and machine == "pc")


def _root_functions(
    facts: _Machine, devices: list[_Device], functions: list[PciFunction], *, unattached: bool
) -> list[PciDevice]:
    """Check ``query-pci``'s root bus against QOM; return the built-in functions only ``query-pci`` shows.

    Raises:
        _ChangedError: The two disagree (a device came or went between the queries).
        _NeedUnattachedError: A built-in network controller needs ``/machine/unattached`` to be read.
    """
    on_root = {(d.slot, d.function): d for d in devices if d.bus_path == facts.root_path}
    builtins: list[PciDevice] = []
    for fn in functions:
        place = (fn.slot, fn.function)
        where = f"{facts.root_name} slot {fn.slot:#04x} function {fn.function}"
        dev = on_root.pop(place, None)
        if dev is not None:
            if fn.qdev_id != (dev.id or ""):
                raise _ChangedError(f"query-pci shows {fn.qdev_id or 'an anonymous device'} at {where}, QOM shows "
                                    f"{dev.path}", "query-pci")  # fmt: skip
            continue
        if fn.qdev_id:
            raise _ChangedError(f"query-pci shows {fn.qdev_id!r} at {where}, not listed in {PERIPHERAL}", "query-pci")
        if fn.is_network:
            if not unattached:
                raise _NeedUnattachedError
            raise _ChangedError(f"the network controller at {where} is in no QOM container", "query-pci")
        builtins.append(PciDevice(None, fn.description, facts.root_name, fn.slot, fn.function))
    if on_root:
        dev = next(iter(on_root.values()))
        raise _ChangedError(f"{dev.path} is on {facts.root_name} in QOM but not in query-pci", "query-pci")
    return builtins
