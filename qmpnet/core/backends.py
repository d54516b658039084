"""The backends a NIC can be given (``NicSpec.backend``).

user, hubport, stream, dgram, bridge, nat, tap, macvtap, vfio and passt.
"""

# Without `from __future__ import annotations`: pydantic would compile each field's annotation from its string,
# ~70 k instructions a field in every new process (docs/performance.md).

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from qmpnet.core.ifnames import check_ifname
from qmpnet.core.model_base import Frozen, empty_list
from qmpnet.errors import InvalidRequest

_PCI_HOST = re.compile(r"(?:([0-9a-f]{4}):)?([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])")
_HOSTFWD = re.compile(r"(?:tcp|udp)?:(?:[0-9.]*):[0-9]{1,5}-(?:[0-9.]*):[0-9]{1,5}")
_HOSTNAME = re.compile(r"^[A-Za-z0-9.:-]{1,253}$")
_PASST_PORT = re.compile(r"(tcp|udp):([0-9]{1,5}):([0-9]{1,5})")


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


class UserBackend(Frozen):
    """QEMU's user-mode network (slirp): outbound NAT, DHCP, and host port forwards."""

    type: Literal["user"] = "user"
    net: Annotated[str, AfterValidator(_check_net)] | None = Field(
        default=None, description="Guest network, e.g. 10.0.2.0/24 (QEMU's default)."
    )
    host: ipaddress.IPv4Address | None = Field(default=None, description="Host (gateway) address seen by the guest.")
    dhcpstart: ipaddress.IPv4Address | None = Field(default=None, description="First address DHCP hands out.")
    dns: ipaddress.IPv4Address | None = Field(default=None, description="DNS server address seen by the guest.")
    hostfwd: list[Annotated[str, AfterValidator(_check_hostfwd)]] = Field(
        default_factory=empty_list, description="Port forwards, e.g. tcp:127.0.0.1:2222-:22."
    )
    restrict: bool = Field(default=False, description="Isolate the guest from the host and the outside.")
    guestfwd: list[str] = Field(
        default_factory=empty_list, description="Guest forwards; 'cmd:' forwards run a host command (policy)."
    )
    smb: str | None = Field(default=None, description="Export a host directory over SMB (runs smbd; policy).")


class HubportBackend(Frozen):
    """A port on one of QEMU's hubs: the old ``-net nic,vlan=n``; all NICs on a hub see each other's frames."""

    type: Literal["hubport"] = "hubport"
    hub: int = Field(ge=0, le=0xFFFF, description="Hub number (the old vlan=n).")


class UnixAddress(Frozen):
    """A unix socket path."""

    type: Literal["unix"] = "unix"
    path: Annotated[str, AfterValidator(_check_socket_path)]


class InetAddress(Frozen):
    """A host and port."""

    type: Literal["inet"] = "inet"
    host: Annotated[str, Field(pattern=_HOSTNAME.pattern)]
    port: int = Field(ge=1, le=65535)


SocketAddress = Annotated[UnixAddress | InetAddress, Field(discriminator="type")]


class StreamBackend(Frozen):
    """A guest-to-guest link over a stream socket: one side listens (``server``), the other connects."""

    type: Literal["stream"] = "stream"
    server: bool = False
    addr: SocketAddress


class DgramBackend(Frozen):
    """A guest-to-guest link over datagrams (UDP or unix datagram sockets)."""

    type: Literal["dgram"] = "dgram"
    local: SocketAddress | None = None
    remote: SocketAddress | None = None

    @model_validator(mode="after")
    def _one_side_given(self) -> "DgramBackend":
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


class BridgeBackend(Frozen):
    """Bridge mode: a tap ``vnetN`` made by qmpnet, enslaved to a host bridge, handed to QEMU as an open fd."""

    type: Literal["bridge"] = "bridge"
    bridge: Annotated[str, _ifname("nic.backend.bridge")] = Field(description="The host bridge, e.g. br0.")
    helper: bool = Field(
        default=False,
        description="Let QEMU's setuid bridge helper make the tap (for TCP QMP, where fds cannot be passed; policy).",
    )


class NatBackend(Frozen):
    """NAT mode: a tap on a NAT network qmpnet manages (bridge, masquerade, DHCP), like libvirt's default."""

    type: Literal["nat"] = "nat"
    network: Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")] = "default"


class TapBackend(Frozen):
    """An existing tap device, opened by name (never with a script)."""

    type: Literal["tap"] = "tap"
    ifname: Annotated[str, _ifname("nic.backend.ifname")]


class MacvtapBackend(Frozen):
    """A macvtap on a host link, made by qmpnet: the guest sits on the link's network without a bridge.

    libvirt's ``type='direct'``. In ``bridge`` mode guests on the same link reach each other, but never the host
    through the link itself (a macvtap talks to the other side of its parent).
    """

    type: Literal["macvtap"] = "macvtap"
    link: Annotated[str, _ifname("nic.backend.link")] = Field(description="The host link (parent), e.g. eth0.")
    mode: Literal["bridge", "vepa", "private", "passthru"] = Field(
        default="bridge", description="macvtap mode: bridge (guests on the link see each other), vepa, private, "
        "passthru (the guest owns the link)."
    )


class VfioBackend(Frozen):
    """Direct assignment: a host PCI network function handed to the guest with vfio-pci."""

    type: Literal["vfio"] = "vfio"
    host: Annotated[str, AfterValidator(_pci_host)] = Field(description="Host PCI address, e.g. 0000:03:00.0.")
    rebind: bool = Field(default=False, description="Bind the device to vfio-pci first; restore after removal.")


def _check_passt_port(rule: str) -> str:
    match = _PASST_PORT.fullmatch(rule)
    if match is None:
        raise ValueError(f"{rule!r} is not of the form tcp|udp:HOSTPORT:GUESTPORT (e.g. tcp:2222:22)")
    for side, port in (("host", match[2]), ("guest", match[3])):
        if not 0 < int(port) < 65536:
            raise ValueError(f"{rule!r}: {side} port {port} is not in 1-65535")
    return rule


def _distinct_host_ports(rules: list[str]) -> list[str]:
    seen: dict[tuple[str, int], int] = {}
    for index, rule in enumerate(rules):
        proto, host, _ = rule.split(":")
        first = seen.setdefault((proto, int(host)), index)
        if first != index:
            raise ValueError(f"ports {first} and {index} both forward {proto} host port {int(host)}")
    return rules


class PasstBackend(Frozen):
    """passt, the user-mode backend of libvirt and KubeVirt: no NAT, IPv6, port forwards.

    qmpnet starts one passt per NIC (unprivileged, ``hostnet.passt_runas``) on a unix socket of the NIC's and
    connects QEMU to it with a ``stream`` netdev; passt ends when the NIC is removed. The guest gets the host's
    address and routes by DHCP (and DHCPv6/NDP), and reaches the host itself through its gateway address.
    """

    type: Literal["passt"] = "passt"
    ports: Annotated[
        list[Annotated[str, AfterValidator(_check_passt_port)]], AfterValidator(_distinct_host_ports)
    ] = Field(
        default_factory=empty_list, description="Host ports forwarded to the guest: 'tcp|udp:HOSTPORT:GUESTPORT'."
    )
    ipv6: bool = Field(default=True, description="Serve IPv6 too (false: IPv4 only).")

    def forwards(self) -> list[tuple[str, int, int]]:
        """The port forwards as ``(proto, host port, guest port)``."""
        return [(proto, int(host), int(guest)) for proto, host, guest in (rule.split(":") for rule in self.ports)]


Backend = Annotated[
    UserBackend
    | HubportBackend
    | StreamBackend
    | DgramBackend
    | BridgeBackend
    | NatBackend
    | TapBackend
    | MacvtapBackend
    | VfioBackend
    | PasstBackend,
    Field(discriminator="type"),
]
#: Backends whose netdev is a tap and so can have several queues.
TAP_BASED = frozenset({"bridge", "nat", "tap", "macvtap"})
