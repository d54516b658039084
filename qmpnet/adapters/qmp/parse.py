"""Strict parsers of the QEMU answers qmpnet reads a guest from.

QMP ``qom-list``, ``qom-list-types``, ``device-list-properties``, ``qom-get`` values and ``query-pci``, and the two
HMP texts that have no QMP equivalent in QEMU 7.2-10.0, ``info network`` and ``device_add help``.

Every function here either returns exactly what the answer says or raises :class:`UnexpectedReply` naming the
command and quoting what did not fit; none of them guesses. QMP answers are checked against the fields qmpnet uses
(with pydantic, strict: no coercion); fields QEMU adds later are ignored, a missing or mistyped one is an error.
HMP text is matched line by line against the formats QEMU prints (``net/net.c``, ``net/hub.c``); a line of any
other shape is an error. The functions are pure and tested against captured answers of QEMU 7.2 and 10.0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from qmpnet.core.model import ModelInfo, ObservedBackend
from qmpnet.core.ports import NetClient
from qmpnet.errors import UnexpectedReply

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "PciFunction",
    "TypeTree",
    "child_buses",
    "devfn",
    "mac_address",
    "machine_kind",
    "parse_device_help",
    "parse_network",
    "parse_properties",
    "parse_qom_children",
    "parse_root_functions",
    "qom_path",
    "text_value",
]

NOMINAL_SPEED = {"rtl8139": "100M", "e1000": "1G", "e1000e": "1G", "virtio-net-pci": "10G"}
PCIE_MODELS = frozenset({"e1000e", "virtio-net-pci"})
HOTPLUG_MODELS = frozenset(NOMINAL_SPEED)
#: QOM types of the buses PCI bridges and host bridges own (``TYPE_PCI_BUS``, ``TYPE_PCIE_BUS``).
PCI_BUS_TYPES: Final = frozenset({"PCI", "PCIE"})
#: Network controllers: PCI base class 0x02 (``class_info.class`` is base class << 8 | subclass).
NETWORK_CLASS: Final = 0x02

_CHILD = re.compile(r"child<(?P<type>[^<>]+)>")
_MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")
_PCI_HOST = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")
_HELP = re.compile(r'name "(?P<name>[^"]+)"(?:, bus (?P<bus>[\w-]+))?(?:, alias "[^"]*")?(?:, desc "(?P<desc>[^"]*)")?')
_HELP_SECTION = re.compile(r"[A-Z][\w /]* devices:")
# print_net_client(): "%s: index=%d,type=%s,%s" (name, queue index, NetClientDriver, info_str).
_CLIENT = re.compile(r"(?P<name>[^\s:\\][^\s:]*): index=(?P<index>\d+),type=(?P<type>[a-z][\w-]*),(?P<info>.*)")
_HUB = re.compile(r"hub (?P<id>\d+)")
_HUB_PORT = re.compile(r" \\ (?P<port>[^\s:]+)(?:: (?P<peer>.*))?")
_PEER = re.compile(r" \\ (?P<client>.*)")
_FILTER = re.compile(r"  - [^\s:]+: type=\S+")
_NIC_INFO = re.compile(r"model=(?P<model>[^,=]+),macaddr=(?P<mac>[0-9a-f:]{17})")
#: Backends whose ``info_str`` is a ``key=value,...`` list in every QEMU qmpnet supports; the others (stream,
#: socket, vhost-user, ...) print free text that changes between versions, kept verbatim as option ``info``.
_KEY_VALUE_INFO: Final = frozenset({"user", "tap", "dgram"})
_SNIPPET = 160
_T = TypeVar("_T")


def _fail(command: str, what: str, answer: object) -> UnexpectedReply:
    shown = repr(answer)
    if len(shown) > _SNIPPET:
        shown = shown[:_SNIPPET] + "..."
    return UnexpectedReply(f"{command}: {what}: {shown}", command=command)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")


class _QomProperty(_Strict):
    name: str
    type: str


class _TypeInfo(_Strict):
    name: str
    parent: str | None = None


class _ClassInfo(_Strict):
    cls: int = Field(alias="class")
    desc: str | None = None


class _PciDeviceInfo(_Strict):
    bus: int
    slot: int = Field(ge=0, le=31)
    function: int = Field(ge=0, le=7)
    qdev_id: str
    class_info: _ClassInfo


class _PciInfo(_Strict):
    bus: int
    devices: list[_PciDeviceInfo]


_QOM_LIST = TypeAdapter(list[_QomProperty])
_TYPE_LIST = TypeAdapter(list[_TypeInfo])
_PCI_LIST = TypeAdapter(list[_PciInfo])


def _validate(adapter: TypeAdapter[_T], answer: object, command: str) -> _T:
    try:
        return adapter.validate_python(answer)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the answer"
        raise _fail(command, f"{where}: {first['msg']}", answer) from err


# ------------------------------------------------------------------------------------------------- QMP answers


def machine_kind(qom_type: str) -> tuple[str, str]:
    """Map the QOM type of ``/machine`` (``pc-q35-7.2-machine``) to ``(machine name, "pc" | "q35")``."""
    name = qom_type.removesuffix("-machine")
    return name, ("q35" if "q35" in name else "pc")


def parse_qom_children(answer: object, command: str) -> dict[str, str]:
    """The ``child<TYPE>`` entries of a ``qom-list`` answer, as ``{name: TYPE}``.

    Raises:
        UnexpectedReply: The answer is not a list of ``{"name", "type"}`` objects.
    """
    children: dict[str, str] = {}
    for prop in _validate(_QOM_LIST, answer, command):
        if match := _CHILD.fullmatch(prop.type):
            children[prop.name] = match["type"]
    return children


def child_buses(answer: object, command: str) -> list[str]:
    """The names of the PCI buses among the children of a ``qom-list`` answer (a bridge's or host bridge's).

    Raises:
        UnexpectedReply: The answer is not a ``qom-list`` answer.
    """
    return [name for name, qom_type in parse_qom_children(answer, command).items() if qom_type in PCI_BUS_TYPES]


@dataclass(frozen=True)
class TypeTree:
    """QOM types and their parents, from ``qom-list-types`` (abstract types included)."""

    parents: dict[str, str | None]

    @classmethod
    def parse(cls, answer: object, command: str) -> TypeTree:
        """Read a ``qom-list-types`` answer.

        Raises:
            UnexpectedReply: The answer is not a list of ``{"name", "parent"?}`` objects.
        """
        return cls({info.name: info.parent for info in _validate(_TYPE_LIST, answer, command)})

    def __contains__(self, qom_type: object) -> bool:
        return qom_type in self.parents

    def lineage(self, qom_type: str) -> Iterator[str]:
        """``qom_type`` and its ancestors, nearest first, as far as the tree knows them."""
        seen: set[str] = set()
        current: str | None = qom_type
        while current is not None and current not in seen:
            seen.add(current)
            yield current
            current = self.parents.get(current)

    def is_a(self, qom_type: str, ancestor: str) -> bool:
        """Whether ``qom_type`` is ``ancestor`` or derives from it."""
        return ancestor in self.lineage(qom_type)


def parse_properties(answer: object, command: str) -> frozenset[str]:
    """The property names of a ``device-list-properties`` answer.

    Raises:
        UnexpectedReply: The answer is not a list of ``{"name", "type"}`` objects.
    """
    return frozenset(prop.name for prop in _validate(_QOM_LIST, answer, command))


@dataclass(frozen=True)
class PciFunction:
    """One function on a root bus as ``query-pci`` shows it."""

    slot: int
    function: int
    qdev_id: str
    pci_class: int
    description: str

    @property
    def devfn(self) -> int:
        """``slot << 3 | function``, the form of the ``addr`` property."""
        return self.slot << 3 | self.function

    @property
    def is_network(self) -> bool:
        """Whether the function is a network controller (PCI base class 0x02)."""
        return self.pci_class >> 8 == NETWORK_CLASS


def parse_root_functions(answer: object, command: str, *, bus_number: int = 0) -> list[PciFunction]:
    """The functions on root bus ``bus_number`` of a ``query-pci`` answer (what sits behind bridges is not used).

    Raises:
        UnexpectedReply: The answer does not have ``query-pci``'s shape, or has no bus ``bus_number``.
    """
    buses = _validate(_PCI_LIST, answer, command)
    root = next((bus for bus in buses if bus.bus == bus_number), None)
    if root is None:
        raise _fail(command, f"no PCI bus number {bus_number}", [bus.bus for bus in buses])
    functions: list[PciFunction] = []
    for dev in root.devices:
        if dev.bus != bus_number:
            raise _fail(command, f"a device of bus {dev.bus} listed on bus {bus_number}", dev.model_dump())
        desc = dev.class_info.desc or f"PCI class {dev.class_info.cls:#06x}"
        functions.append(PciFunction(dev.slot, dev.function, dev.qdev_id, dev.class_info.cls, desc))
    return functions


def qom_path(answer: object, command: str) -> str:
    """A QOM path value (``parent_bus``), e.g. ``/machine/peripheral/rp1/rp1``.

    Raises:
        UnexpectedReply: It is not an absolute path with a parent and a last component.
    """
    if not isinstance(answer, str) or not re.fullmatch(r"(/[^/]+)+", answer) or answer.count("/") < 2:
        raise _fail(command, "expected an absolute QOM path", answer)
    return answer


def devfn(answer: object, command: str) -> tuple[int, int]:
    """A PCI ``addr`` property value (``slot << 3 | function``) as ``(slot, function)``.

    Raises:
        UnexpectedReply: It is not an integer in 0-255.
    """
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer <= 0xFF:
        raise _fail(command, "expected a PCI devfn (an integer in 0-255)", answer)
    return answer >> 3, answer & 7


def mac_address(answer: object, command: str) -> str:
    """A NIC's ``mac`` property value.

    Raises:
        UnexpectedReply: It is not a lower-case ``xx:xx:xx:xx:xx:xx``.
    """
    if not isinstance(answer, str) or not _MAC.fullmatch(answer):
        raise _fail(command, "expected a MAC address", answer)
    return answer


def text_value(answer: object, command: str) -> str | None:
    """A string property value (``netdev``); ``None`` for the empty string QEMU returns when it is unset.

    Raises:
        UnexpectedReply: It is not a string.
    """
    if not isinstance(answer, str):
        raise _fail(command, "expected a string", answer)
    return answer or None


def pci_host(answer: object, command: str) -> str | None:
    """A vfio-pci ``host`` value (``0000:01:00.0``); ``None`` when unset (a ``sysfsdev`` assignment).

    Raises:
        UnexpectedReply: It is neither empty nor a PCI address.
    """
    value = text_value(answer, command)
    if value is not None and not _PCI_HOST.fullmatch(value):
        raise _fail(command, "expected a PCI address domain:bus:slot.function", answer)
    return value


# ---------------------------------------------------------------------------------------------- info network


def parse_network(text: str) -> dict[str, NetClient]:
    """Parse ``info network`` into net clients by name, with each client's peer.

    NICs appear as ``type=nic`` clients whose peer is their backend; NICs on a hub have a ``hubport`` backend.
    Queues after the first (``index=1``...) repeat a client and are folded into it.

    Raises:
        UnexpectedReply: A line has none of the shapes QEMU prints.
    """
    command = "human-monitor-command info network"
    clients: dict[str, NetClient] = {}
    hub: str | None = None  # inside a "hub N" block
    last: str | None = None  # the top-level client a " \ peer" line belongs to
    for line in text.splitlines():
        if not line.strip() or line == "filters:" or _FILTER.match(line):
            continue
        if match := _HUB.fullmatch(line):
            hub, last = match["id"], None
        elif hub is not None and (port := _HUB_PORT.fullmatch(line)):
            _hub_member(clients, port["port"], port["peer"], hub)
        elif last is not None and (peer := _PEER.fullmatch(line)):
            name, index, backend = _client(peer["client"])
            if index == 0:
                clients[name] = NetClient(name, backend, peer=last)
                clients[last] = NetClient(last, clients[last].backend, peer=name)
        elif not line.startswith(" "):
            hub = None
            last, index, backend = _client(line)
            if index == 0:
                clients[last] = NetClient(last, backend)
            elif last not in clients:
                raise _fail(command, f"queue {index} of a net client whose queue 0 was not listed", line)
        else:
            raise _fail(command, "a line of unknown shape", line)
    return clients


def _hub_member(clients: dict[str, NetClient], port: str, peer_line: str | None, hub: str) -> None:
    port_backend = ObservedBackend(type="hubport", options={"hub": hub})
    if peer_line is None:
        clients[port] = NetClient(port, port_backend)
        return
    peer, index, backend = _client(peer_line)
    if index == 0:
        clients[peer] = NetClient(peer, backend, peer=port)
        clients[port] = NetClient(port, port_backend, peer=peer)


def _client(line: str) -> tuple[str, int, ObservedBackend]:
    command = "human-monitor-command info network"
    match = _CLIENT.fullmatch(line.strip())
    if match is None:
        raise _fail(command, "not a net client line (name: index=N,type=T,...)", line)
    kind, info, index = match["type"], match["info"], int(match["index"])
    if kind == "nic":
        nic = _NIC_INFO.fullmatch(info)
        if index == 0 and nic is None:
            raise _fail(command, "a NIC without model=...,macaddr=...", line)
        options = {"model": nic["model"], "macaddr": nic["mac"]} if nic else {}
        if index > 0 and info:
            raise _fail(command, "a NIC queue line with options", line)
    elif kind in _KEY_VALUE_INFO:
        options = _key_values(info, line)
    else:
        options = {"info": info} if info else {}
    return match["name"], index, ObservedBackend(type=kind, options=options)


def _key_values(info: str, line: str) -> dict[str, str]:
    options: dict[str, str] = {}
    if not info:
        return options
    for item in info.split(","):
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[a-z][\w-]*", key):
            raise _fail("human-monitor-command info network", f"{item!r} is not key=value", line)
        options[key] = value
    return options


# ------------------------------------------------------------------------------------------- device_add help


def parse_device_help(text: str) -> list[ModelInfo]:
    """Parse HMP ``device_add help`` into the NIC models of its ``Network devices:`` section.

    Raises:
        UnexpectedReply: A line of the network section is not a ``name "..."`` entry.
    """
    models: list[ModelInfo] = []
    in_section = False
    for line in text.splitlines():
        if _HELP_SECTION.fullmatch(line):
            in_section = line.startswith("Network devices")
            continue
        if not in_section or not line.strip():
            continue
        match = _HELP.match(line)
        if match is None:
            raise _fail("human-monitor-command device_add help", "a line of unknown shape", line)
        if match["bus"] != "PCI":
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
