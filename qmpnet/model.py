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
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from qmpnet.errors import InvalidRequest
from qmpnet.ifnames import check_ifname
from qmpnet.names import check_qemu_id, normalize_mac, parse_pci_addr
from qmpnet.tcunits import (
    format_percent,
    format_rate,
    format_size,
    format_time,
    parse_percent,
    parse_rate,
    parse_size,
    parse_time,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = [
    "SUPPORTED_MODELS",
    "Backend",
    "BridgeBackend",
    "CaptureResult",
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
    "NicUpdate",
    "ObservedBackend",
    "PciAddress",
    "RemoveResult",
    "RxFilter",
    "Shape",
    "SocketAddress",
    "StreamBackend",
    "TapBackend",
    "UnixAddress",
    "UserBackend",
    "Verify",
    "VfioBackend",
    "Vlan",
    "check_file_path",
    "parse_nic_spec",
    "parse_nic_update",
]

NicModel = Literal["virtio-net-pci", "e1000", "e1000e", "rtl8139"]
SUPPORTED_MODELS: tuple[NicModel, ...] = ("virtio-net-pci", "e1000", "e1000e", "rtl8139")
_MODEL_ALIASES = {"virtio": "virtio-net-pci"}
NicState = Literal["adding", "active", "removal_pending"]
#: Whether a change waits until the guest itself shows it (through its agent): ``True`` the interface (or, for a
#: link change, the carrier; for a removal, its absence), ``"address"`` also an address; ``False`` does not wait.
Verify = bool | Literal["address"]
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
    vlan: Vlan | None = Field(
        default=None, description="VLANs of the NIC's tap port on a VLAN-filtering bridge (tap-based backends)."
    )
    shape: Shape | None = Field(
        default=None, description="Bandwidth and impairment on the NIC's host tap (tap-based backends)."
    )

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
        for name in ("vlan", "shape"):
            if getattr(self, name) is None:
                continue
            if self.backend.type not in TAP_BASED or getattr(self.backend, "helper", False):
                raise InvalidRequest(
                    f"nic.{name}: needs a host tap qmpnet knows (bridge, nat or tap backend, not "
                    f"{'a bridge helper' if self.backend.type == 'bridge' else self.backend.type})",
                    field=f"nic.{name}",
                )
        return self

    def _check_vfio(self) -> NicSpec:
        # The assigned function is the NIC: QEMU emulates nothing, so there is no model, MAC, queue or link to set.
        # A default value is no request: a spec read back from the state store has every field, defaults included.
        for name in ("model", "mac", "vectors", "queues", "link"):
            if name in self.model_fields_set and getattr(self, name) != type(self).model_fields[name].default:
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
    "nic_updated",
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


# ----------------------------------------------------------------------------------- live changes and capture


def _tc_value(parse: Callable[[object], int], what: str, low: int, high: int, show: Callable[[int], str]) -> object:
    def check(value: object) -> int:
        parsed = parse(value)
        if not low <= parsed <= high:
            raise ValueError(f"{what} must be {show(low)} to {show(high)}, not {show(parsed)}")
        return parsed

    return BeforeValidator(check)


def _tc_schema(example: str, bare: str) -> WithJsonSchema:
    return WithJsonSchema({"anyOf": [{"type": "string", "examples": [example]}, {"type": "number", "minimum": 0,
                                                                                  "description": bare}]})


#: A rate in bits per second, in tc notation on the wire (``10mbit``); tbf keeps it in 32 bits of bytes/s (34gbit).
TcRate = Annotated[
    int,
    _tc_value(parse_rate, "a rate", 8, 34 * 1000**3, format_rate),
    PlainSerializer(format_rate, return_type=str, when_used="json"),
    _tc_schema("10mbit", "bits per second"),
]
#: A size in bytes, in tc notation on the wire (``32kb``); at least one full-size Ethernet frame.
TcSize = Annotated[
    int,
    _tc_value(parse_size, "a size", 1600, 2**32 - 1, format_size),
    PlainSerializer(format_size, return_type=str, when_used="json"),
    _tc_schema("32kb", "bytes"),
]
#: A time in microseconds, in tc notation on the wire (``100ms``); netem keeps it in 32 bits of 64 ns ticks.
TcTime = Annotated[
    int,
    _tc_value(parse_time, "a time", 0, 240_000_000, format_time),
    PlainSerializer(format_time, return_type=str, when_used="json"),
    _tc_schema("100ms", "microseconds"),
]


def _check_percent(value: object) -> float:
    percent = parse_percent(value)
    if percent > 100:
        raise ValueError(f"a loss must be 0% to 100%, not {format_percent(percent)}")
    return percent


TcPercent = Annotated[
    float,
    BeforeValidator(_check_percent),
    PlainSerializer(format_percent, return_type=str, when_used="json"),
    _tc_schema("1%", "percent"),
]


class Shape(_Frozen):
    """Bandwidth and impairment of a tap-based NIC, applied on its host tap with tc.

    ``rate`` (and its ``burst``) limits both directions: the tap's egress (towards the guest) and the guest's
    transmit direction (the tap's ingress, redirected through an IFB device). ``delay``, ``jitter`` and ``loss``
    (netem) apply to frames towards the guest, so a ping's round trip grows by ``delay`` once. A shape replaces
    the whole previous one: what it leaves out is off.
    """

    rate: TcRate | None = Field(default=None, description="Rate limit in both directions, e.g. 10mbit.")
    burst: TcSize | None = Field(
        default=None, description="Bucket of the rate limit, e.g. 32kb (default: 10 ms at the rate, at least 16kb)."
    )
    delay: TcTime | None = Field(default=None, description="Added delay towards the guest, e.g. 100ms.")
    jitter: TcTime | None = Field(default=None, description="Random variation of the delay, e.g. 10ms.")
    loss: TcPercent | None = Field(default=None, description="Share of frames towards the guest dropped, e.g. 1%.")

    @model_validator(mode="after")
    def _consistent(self) -> Shape:
        # ValueError, not InvalidRequest: the edge names the field by where the shape sits (update.shape, nic.shape).
        if all(getattr(self, name) is None for name in type(self).model_fields):
            raise ValueError("give at least one of rate, burst, delay, jitter, loss (or null to remove the shaping)")
        return self

    @field_validator("burst")
    @classmethod
    def _burst_needs_rate(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("rate") is None:
            raise ValueError("a burst needs a rate")
        return value

    @field_validator("jitter")
    @classmethod
    def _jitter_needs_delay(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("delay"):
            raise ValueError("a jitter needs a delay")
        return value

    @property
    def impaired(self) -> bool:
        """Whether netem is needed (a delay or a loss)."""
        return bool(self.delay or self.loss)

    def options(self) -> dict[str, str]:
        """The set values in tc notation, as a NIC's backend options show them."""
        dumped = self.model_dump(mode="json", exclude_none=True)
        return {key: str(value) for key, value in dumped.items()}


_VLAN_RANGE = re.compile(r"([0-9]{1,4})(?:-([0-9]{1,4}))?")


def _trunk_text(value: object) -> object:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _check_trunk(value: str) -> str:
    match = _VLAN_RANGE.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"{value!r} is not a VLAN id (1-4094) or a range such as 100-199")
    low, high = int(match[1]), int(match[2] or match[1])
    if not 1 <= low <= high <= 4094:
        raise ValueError(f"{value!r}: VLAN ids are 1 to 4094, a range low-high with low <= high")
    return f"{low}-{high}" if high != low else str(low)


VlanTrunk = Annotated[
    str,
    BeforeValidator(_trunk_text),
    AfterValidator(_check_trunk),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 1, "maximum": 4094},
                              {"type": "string", "examples": ["100-199"]}]}),
]


class Vlan(_Frozen):
    """VLAN membership of a NIC's port on a VLAN-filtering bridge: an access port, or a trunk.

    ``access``: frames from the guest are untagged and join VLAN N (its PVID); frames of VLAN N reach the guest
    untagged. ``trunks``: the guest sends and receives frames tagged with the listed VLANs; untagged frames are
    dropped.
    """

    access: int | None = Field(default=None, ge=1, le=4094, description="Access VLAN id (PVID, untagged).")
    trunks: list[VlanTrunk] | None = Field(
        default=None, min_length=1, description="Tagged VLANs: ids and ranges, e.g. [10, '100-199']."
    )

    @model_validator(mode="after")
    def _one_kind(self) -> Vlan:
        if (self.access is None) == (self.trunks is None):
            raise ValueError("give either access or trunks")
        return self

    def ranges(self) -> tuple[tuple[int, int], ...]:
        """The VLAN ids as sorted, merged ``(low, high)`` ranges."""
        if self.access is not None:
            return ((self.access, self.access),)
        spans = sorted(tuple(int(p) for p in (t.split("-") * 2)[:2]) for t in self.trunks or [])
        merged: list[tuple[int, int]] = []
        for low, high in spans:
            if merged and low <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(high, merged[-1][1]))
            else:
                merged.append((low, high))
        return tuple(merged)

    def options(self) -> dict[str, str]:
        """The VLAN as a NIC's backend options show it (``vlan``, or ``trunks`` as ``10,100-199``)."""
        if self.access is not None:
            return {"vlan": str(self.access)}
        return {"trunks": ",".join(f"{lo}-{hi}" if hi != lo else str(lo) for lo, hi in self.ranges())}


class NicUpdate(_Frozen):
    """A live change of a NIC: move it, tag it, shape it, set its link; the guest keeps its interface.

    Fields left out are kept as they are. ``vlan: null`` puts the port back to the bridge's default (untagged, in
    its default VLAN); ``shape: null`` removes all shaping. ``backend``, ``vlan`` and ``shape`` need a NIC whose
    backend is a host tap (bridge, nat or tap); every NIC accepts ``link``. A move re-enslaves the tap, flaps the
    link so that the guest renews DHCP, and announces the guest (``announce-self``); the port starts in the new
    bridge's default VLAN unless ``vlan`` is given too.
    """

    id: QemuId = Field(description="The NIC's id.")
    backend: Annotated[BridgeBackend | NatBackend, Field(discriminator="type")] | None = Field(
        default=None, description="Move the NIC: the bridge or NAT network to join."
    )
    vlan: Vlan | None = Field(default=None, description="VLAN membership; null: the bridge's default.")
    shape: Shape | None = Field(default=None, description="Rate, burst, delay, jitter, loss; null: none.")
    link: LinkState | None = Field(default=None, description="Set the link up or down.")

    @model_validator(mode="after")
    def _something_to_change(self) -> NicUpdate:
        if not self.model_fields_set - {"id"}:
            raise InvalidRequest("update: nothing to change; give backend, vlan, shape or link", field="update")
        if "backend" in self.model_fields_set and self.backend is None:
            raise InvalidRequest("update.backend: give the bridge or NAT network to move to", field="update.backend")
        if isinstance(self.backend, BridgeBackend) and self.backend.helper:
            raise InvalidRequest(
                "update.backend.helper: a move re-enslaves the NIC's tap; QEMU's bridge helper cannot be used",
                field="update.backend.helper",
            )
        return self

    @property
    def changes_vlan(self) -> bool:
        """Whether the update sets the VLAN (to a value or, with ``vlan: null``, back to the default)."""
        return "vlan" in self.model_fields_set

    @property
    def changes_shape(self) -> bool:
        """Whether the update sets the shaping (to a value or, with ``shape: null``, to none)."""
        return "shape" in self.model_fields_set


def parse_nic_update(data: Mapping[str, Any] | NicUpdate, *, prefix: str = "update") -> NicUpdate:
    """Validate ``data`` into a :class:`NicUpdate`.

    Raises:
        InvalidRequest: A field is invalid; ``field`` holds its JSON path (``update.shape.rate``) and the message
            says why.
    """
    if isinstance(data, NicUpdate):
        return data
    try:
        return NicUpdate.model_validate(data)
    except InvalidRequest:
        raise
    except ValidationError as err:
        raise invalid_request_from(err, prefix) from err


def check_file_path(value: str) -> str:
    """An absolute path without ``..`` or NUL (a capture file QEMU will create)."""
    if not value.startswith("/"):
        raise ValueError("must be an absolute path")
    if "\x00" in value or "/../" in f"{value}/" or value.endswith("/"):
        raise ValueError("must name a file, without '..' or NUL")
    return value


class CaptureResult(_Frozen):
    """A NIC's live capture (QEMU ``filter-dump`` into a pcap file) after ``start`` or ``stop``."""

    id: str = Field(description="The NIC's id.")
    state: Literal["capturing", "stopped"] = Field(description="Whether QEMU is writing the file now.")
    file: str | None = Field(default=None, description="The pcap file.")


NicSpec.model_rebuild()  # its vlan and shape fields name models defined above only after it
