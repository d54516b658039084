"""The shared vocabulary: what a caller asks for (``NicSpec``) and what a guest has (``Nic``).

These pydantic models are the edge of qmpnet: the Python API, the CLI and the MQTT API all accept and return
exactly these shapes (docs/mqtt-api.md is generated from them), so validation happens once, here, and every
error names the JSON path of the field. The models are frozen and forbid unknown fields: a misspelt option is an
error, never silently ignored.

Inside qmpnet the core works on these validated objects and on a few plain dataclasses (``PciTopology``); raw QMP
dictionaries never get past the QMP adapter.
"""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from qmpnet.errors import InvalidRequest
from qmpnet.ifnames import check_ifname
from qmpnet.names import check_qemu_id, normalize_mac, parse_pci_addr

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "SUPPORTED_MODELS",
    "Backend",
    "BridgeBackend",
    "DgramBackend",
    "GuestEvent",
    "GuestEventName",
    "GuestView",
    "HubportBackend",
    "InetAddress",
    "LinkState",
    "ModelInfo",
    "NatBackend",
    "Nic",
    "NicModel",
    "NicSpec",
    "NicState",
    "ObservedBackend",
    "PciAddress",
    "RemoveResult",
    "RxFilter",
    "SocketAddress",
    "StreamBackend",
    "TapBackend",
    "UnixAddress",
    "UserBackend",
    "VfioBackend",
    "parse_nic_spec",
]

NicModel = Literal["virtio-net-pci", "e1000", "e1000e", "rtl8139"]
SUPPORTED_MODELS: tuple[NicModel, ...] = ("virtio-net-pci", "e1000", "e1000e", "rtl8139")
_MODEL_ALIASES = {"virtio": "virtio-net-pci"}
NicState = Literal["adding", "active", "removal_pending"]
LinkState = Literal["up", "down"]

QemuId = Annotated[str, AfterValidator(check_qemu_id)]
Mac = Annotated[str, AfterValidator(normalize_mac)]

_PCI_HOST = re.compile(r"(?:([0-9a-f]{4}):)?([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])")
_HOSTFWD = re.compile(r"(?:tcp|udp)?:(?:[0-9.]*):[0-9]{1,5}-(?:[0-9.]*):[0-9]{1,5}")
_HOSTNAME = re.compile(r"^[A-Za-z0-9.:-]{1,253}$")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_hostfwd(rule: str) -> str:
    if not _HOSTFWD.fullmatch(rule):
        raise ValueError(f"{rule!r} is not of the form [tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport")
    for port in re.findall(r":([0-9]+)(?:-|$)", rule):
        if not 0 < int(port) < 65536:
            raise ValueError(f"{rule!r}: port {port} is not in 1-65535")
    for addr in re.findall(r"([0-9.]+):[0-9]", rule):
        ipaddress.IPv4Address(addr)
    return rule


def _check_net(value: str) -> str:
    ipaddress.IPv4Network(value, strict=False)
    return value


def _check_socket_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError("must be an absolute path")
    if "\x00" in value or "/../" in f"{value}/" or len(value.encode()) > 107:
        raise ValueError("must not contain '..' or NUL and must fit in 107 bytes")
    return value


class UserBackend(_Frozen):
    """QEMU's user-mode network (slirp): outbound NAT, DHCP, and host port forwards."""

    type: Literal["user"] = "user"
    net: Annotated[str, AfterValidator(_check_net)] | None = Field(
        default=None, description="Guest network, e.g. 10.0.2.0/24 (QEMU's default)."
    )
    host: ipaddress.IPv4Address | None = Field(default=None, description="Host (gateway) address seen by the guest.")
    dhcpstart: ipaddress.IPv4Address | None = Field(default=None, description="First address DHCP hands out.")
    dns: ipaddress.IPv4Address | None = Field(default=None, description="DNS server address seen by the guest.")
    hostfwd: list[Annotated[str, AfterValidator(_check_hostfwd)]] = Field(
        default_factory=list, description="Port forwards, e.g. tcp:127.0.0.1:2222-:22."
    )
    restrict: bool = Field(default=False, description="Isolate the guest from the host and the outside.")
    guestfwd: list[str] = Field(
        default_factory=list, description="Guest forwards; 'cmd:' forwards run a host command (policy)."
    )
    smb: str | None = Field(default=None, description="Export a host directory over SMB (runs smbd; policy).")


class HubportBackend(_Frozen):
    """A port on one of QEMU's hubs: the old ``-net nic,vlan=n``; all NICs on a hub see each other's frames."""

    type: Literal["hubport"] = "hubport"
    hub: int = Field(ge=0, le=0xFFFF, description="Hub number (the old vlan=n).")


class UnixAddress(_Frozen):
    """A unix socket path."""

    type: Literal["unix"] = "unix"
    path: Annotated[str, AfterValidator(_check_socket_path)]


class InetAddress(_Frozen):
    """A host and port."""

    type: Literal["inet"] = "inet"
    host: Annotated[str, Field(pattern=_HOSTNAME.pattern)]
    port: int = Field(ge=1, le=65535)


SocketAddress = Annotated[UnixAddress | InetAddress, Field(discriminator="type")]


class StreamBackend(_Frozen):
    """A guest-to-guest link over a stream socket: one side listens (``server``), the other connects."""

    type: Literal["stream"] = "stream"
    server: bool = False
    addr: SocketAddress


class DgramBackend(_Frozen):
    """A guest-to-guest link over datagrams (UDP or unix datagram sockets)."""

    type: Literal["dgram"] = "dgram"
    local: SocketAddress | None = None
    remote: SocketAddress | None = None

    @model_validator(mode="after")
    def _one_side_given(self) -> DgramBackend:
        if self.local is None and self.remote is None:
            raise ValueError("give local, remote or both")
        return self


def _ifname(field: str) -> AfterValidator:
    def check(value: str) -> str:
        try:
            return check_ifname(value, field=field)
        except InvalidRequest as err:
            raise ValueError(err.message.removeprefix(f"{field}: ")) from err

    return AfterValidator(check)


def _pci_host(value: str) -> str:
    match = _PCI_HOST.fullmatch(value.lower())
    if not match:
        raise ValueError("must be a PCI address such as 0000:03:00.0 (domain optional)")
    domain, bus, slot, function = match.groups()
    if int(slot, 16) > 0x1F:
        raise ValueError("slot must be at most 1f")
    return f"{domain or '0000'}:{bus}:{slot}.{function}"


class BridgeBackend(_Frozen):
    """Bridge mode: a tap ``vnetN`` made by qmpnet, enslaved to a host bridge, handed to QEMU as an open fd."""

    type: Literal["bridge"] = "bridge"
    bridge: Annotated[str, _ifname("nic.backend.bridge")] = Field(description="The host bridge, e.g. br0.")
    helper: bool = Field(
        default=False,
        description="Let QEMU's setuid bridge helper make the tap (for TCP QMP, where fds cannot be passed; policy).",
    )


class NatBackend(_Frozen):
    """NAT mode: a tap on a NAT network qmpnet manages (bridge, masquerade, DHCP), like libvirt's default."""

    type: Literal["nat"] = "nat"
    network: Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")] = "default"


class TapBackend(_Frozen):
    """An existing tap device, opened by name (never with a script)."""

    type: Literal["tap"] = "tap"
    ifname: Annotated[str, _ifname("nic.backend.ifname")]


class VfioBackend(_Frozen):
    """Direct assignment: a host PCI network function handed to the guest with vfio-pci."""

    type: Literal["vfio"] = "vfio"
    host: Annotated[str, AfterValidator(_pci_host)] = Field(description="Host PCI address, e.g. 0000:03:00.0.")
    rebind: bool = Field(default=False, description="Bind the device to vfio-pci first; restore after removal.")


Backend = Annotated[
    UserBackend | HubportBackend | StreamBackend | DgramBackend | BridgeBackend | NatBackend | TapBackend | VfioBackend,
    Field(discriminator="type"),
]
_UNION_FIELDS = frozenset({"backend", "addr", "local", "remote"})
_UNION_TAGS = frozenset({"user", "hubport", "stream", "dgram", "bridge", "nat", "tap", "vfio", "unix", "inet"})
#: Backends whose netdev is a tap and so can have several queues.
TAP_BASED = frozenset({"bridge", "nat", "tap"})


def _model_alias(value: object) -> object:
    return _MODEL_ALIASES.get(value, value) if isinstance(value, str) else value


class NicSpec(_Frozen):
    """What a caller asks for when hot-adding a NIC. Every field but ``model`` has a sensible default."""

    model: Annotated[NicModel, BeforeValidator(_model_alias)] = "virtio-net-pci"
    id: QemuId | None = Field(default=None, description="Device id; generated when absent.")
    mac: Mac | None = Field(default=None, description="MAC address; a free 52:54:00:xx:xx:xx when absent.")
    addr: str | None = Field(default=None, description="PCI 'slot[.function]' (hex, as QEMU reads it).")
    bus: QemuId | None = Field(default=None, description="PCI bus id: pci.0, a pcie-root-port or a bridge.")
    vectors: int | None = Field(default=None, ge=0, le=2048, description="MSI-X vectors (virtio only).")
    queues: int | None = Field(default=None, ge=1, le=256, description="Queue pairs (virtio, tap backends).")
    link: LinkState = "up"
    backend: Backend = Field(default_factory=UserBackend)

    @field_validator("addr")
    @classmethod
    def _check_addr(cls, value: str | None) -> str | None:
        if value is not None:
            parse_pci_addr(value)
        return value

    @model_validator(mode="after")
    def _check_model_options(self) -> NicSpec:
        if self.backend.type == "vfio":
            return self._check_vfio()
        if self.model != "virtio-net-pci":
            for name in ("vectors", "queues"):
                if getattr(self, name) is not None:
                    raise InvalidRequest(f"nic.{name}: only virtio-net-pci supports it", field=f"nic.{name}")
        if (self.queues or 1) > 1 and self.backend.type not in TAP_BASED:
            raise InvalidRequest(
                f"nic.queues: queues > 1 needs a tap-based backend (bridge, nat, tap), not {self.backend.type}",
                field="nic.queues",
            )
        return self

    def _check_vfio(self) -> NicSpec:
        # The assigned function is the NIC: QEMU emulates nothing, so there is no model, MAC, queue or link to set.
        for name in ("model", "mac", "vectors", "queues", "link"):
            if name in self.model_fields_set:
                raise InvalidRequest(
                    f"nic.{name}: a vfio NIC is the host device itself; {name} cannot be set", field=f"nic.{name}"
                )
        return self

    @property
    def driver(self) -> str:
        """The QEMU device driver: the model, or ``vfio-pci`` for direct assignment."""
        return "vfio-pci" if self.backend.type == "vfio" else self.model

    @property
    def pci_addr(self) -> tuple[int, int] | None:
        """The requested ``(slot, function)``, if any."""
        return parse_pci_addr(self.addr) if self.addr is not None else None


def parse_nic_spec(data: Mapping[str, Any] | NicSpec, *, prefix: str = "nic") -> NicSpec:
    """Validate ``data`` into a :class:`NicSpec`.

    Raises:
        InvalidRequest: A field is invalid; ``field`` holds its JSON path (``nic.backend.hostfwd.0``) and the
            message says why.
    """
    if isinstance(data, NicSpec):
        return data
    try:
        return NicSpec.model_validate(data)
    except InvalidRequest:
        raise
    except ValidationError as err:
        raise invalid_request_from(err, prefix) from err


def invalid_request_from(err: ValidationError, prefix: str) -> InvalidRequest:
    """Turn pydantic's first error into an :class:`InvalidRequest` naming the field."""
    first = err.errors(include_url=False)[0]
    parts: list[str] = [prefix] if prefix else []
    previous: object = None
    for part in first["loc"]:
        # A discriminated union puts the tag right after the union's field; it is noise for a caller.
        if not (previous in _UNION_FIELDS and part in _UNION_TAGS):
            parts.append(str(part))
        previous = part
    path = ".".join(parts)
    message = first["msg"].removeprefix("Value error, ")
    return InvalidRequest(f"{path}: {message}", field=path)


class PciAddress(_Frozen):
    """Where a device sits: the bus id (``pci.0``, ``pcie.0`` or a bridge/root-port id), slot and function."""

    bus: str
    slot: int
    function: int


class ObservedBackend(_Frozen):
    """A backend as QEMU describes it (HMP ``info network``): its type and its option string."""

    type: str
    options: dict[str, str] = Field(default_factory=dict)


class RxFilter(_Frozen):
    """The receive filter state a virtio-net guest driver programmed (``query-rx-filter``)."""

    promiscuous: bool
    multicast: str
    unicast: str
    main_mac: str
    multicast_table: list[str]
    unicast_table: list[str]


class GuestView(_Frozen):
    """A NIC as the guest OS sees it, read through its guest agent (qemu-guest-agent)."""

    ifname: str = Field(description="The guest's interface name, e.g. ens4 or enp1s0 (udev's predictable names).")
    mac: Mac = Field(description="The interface's MAC address, as the guest reports it.")
    carrier: bool | None = Field(
        default=None, description="/sys/class/net/<if>/carrier; null when unreadable (the interface is down)."
    )
    operstate: str | None = Field(
        default=None, description="/sys/class/net/<if>/operstate (up, down, lowerlayerdown, ...); null if unreadable."
    )
    addresses: list[str] = Field(
        default_factory=list, description="The interface's addresses with prefix length, e.g. 10.0.2.15/24."
    )

    def has_address(self) -> bool:
        """Whether the interface has an address other than a link-local one (fe80::/10, 169.254.0.0/16)."""
        for entry in self.addresses:
            address = ipaddress.ip_interface(entry).ip
            if not (address.is_link_local or address.is_loopback):
                return True
        return False


class Nic(_Frozen):
    """A NIC as it is in the guest now."""

    id: str
    model: str
    mac: str | None
    netdev: str | None
    backend: ObservedBackend | None
    pci: PciAddress | None
    link: LinkState
    state: NicState
    rx_filter: RxFilter | None = None
    managed: bool = Field(
        default=False, description="qmpnet created this NIC (so `apply --prune` may remove it); false for others."
    )
    guest: GuestView | None = Field(
        default=None, description="The guest's own view of this NIC (from its guest agent); null when none answers."
    )


class RemoveResult(_Frozen):
    """The outcome of a removal: ``removed``, or ``removal_pending`` while the guest has not acked."""

    id: str
    state: Literal["removed", "removal_pending"]


class ModelInfo(_Frozen):
    """A NIC model this QEMU offers (the old ``-net nic,model=?``)."""

    name: str
    bus: Literal["pci", "pcie", "other"]
    speed: str | None
    description: str
    hotplug: bool = Field(description="qmpnet can hot-add this model.")


GuestEventName = Literal[
    "nic_added",
    "nic_removed",
    "nic_removal_pending",
    "unplug_rejected",
    "link_changed",
    "rx_filter_changed",
    "guest_connected",
    "guest_disconnected",
    "reconciled",
    "drift",
]


class GuestEvent(_Frozen):
    """Something that happened to a guest's network (published as ``.../event/<name>`` over MQTT)."""

    name: GuestEventName
    ts: float
    guest: str
    id: str | None = None
    nic: Nic | None = None

