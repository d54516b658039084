"""Settings of the host-side networking: NAT network definitions, the tap pattern, paths and time limits.

These are frozen pydantic models meant to be nested into :class:`qmpnet.settings.Settings` (as ``hostnet``), so
they come from the same TOML file and ``QMPNET_HOSTNET__...`` environment variables as everything else. A NAT
network needs only a name; the rest defaults to a libvirt-like ``192.168.123.0/24`` on bridge ``qmpnat0``,
gateway ``.1``, DHCP ``.100``-``.200``. The defaults that depend on the subnet are filled in before validation,
so a dumped network always shows the addresses actually used.
"""

# Without `from __future__ import annotations`: pydantic would compile each field's annotation from its string,
# ~70 k instructions a field in every new process (docs/performance.md).

import hashlib
import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field, model_validator

from qmpnet.core.ifnames import TAP_PATTERN_DEFAULT, check_ifname, check_tap_pattern
from qmpnet.core.model import validate_as
from qmpnet.core.model_base import Frozen
from qmpnet.errors import InvalidRequest, NotFound

__all__ = ["HostnetSettings", "NatNetwork", "parse_nat_network"]

#: The nftables table is ``qmpnet_<name>``; nft identifiers allow letters, digits, ``_`` and ``-`` after a letter.
_NETWORK_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")
_DHCP_LOW, _DHCP_HIGH = 100, 200
#: ``--runas`` of passt: a user, optionally ``:group``, by name or number.
_RUNAS = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(?::[A-Za-z0-9_][A-Za-z0-9_.-]*)?")


def _check_runas(value: str) -> str:
    if not _RUNAS.fullmatch(value):
        raise ValueError("must be USER or USER:GROUP (names or numbers)")
    if value.split(":", maxsplit=1)[0] in {"root", "0"}:
        raise ValueError("passt runs unprivileged: give a user other than root (e.g. nobody)")
    return value


def _check_network_name(value: str) -> str:
    if not _NETWORK_NAME.fullmatch(value):
        raise ValueError("must be a letter then up to 31 letters, digits, '_' or '-'")
    return value


def _check_bridge(value: str) -> str:
    try:
        return check_ifname(value, field="bridge")
    except InvalidRequest as err:
        raise ValueError(str(err).removeprefix("bridge: ")) from err


def _check_pattern(value: str) -> str:
    try:
        return check_tap_pattern(value, field="tap_pattern")
    except InvalidRequest as err:
        raise ValueError(str(err).removeprefix("tap_pattern: ")) from err


def _check_lease(value: int) -> int:
    if value < 120:
        raise ValueError("must be at least 120 seconds (dnsmasq's minimum)")
    return value


class NatNetwork(Frozen):
    """A NAT network: a bridge with the gateway address, masquerade out of the host, DHCP and DNS from dnsmasq.

    Guests on it reach out through the host (their source address becomes the host's); nothing outside can
    open a connection in.
    """

    name: Annotated[str, AfterValidator(_check_network_name)] = Field(description="Network name (e.g. default).")
    bridge: Annotated[str, AfterValidator(_check_bridge)] = Field(
        default="qmpnat0", description="Bridge qmpnet creates and owns for this network."
    )
    subnet: ipaddress.IPv4Network = Field(
        default=ipaddress.IPv4Network("192.168.123.0/24"), description="The guests' IPv4 subnet."
    )
    # The defaults shown are those of the default subnet; _subnet_defaults derives them from any other subnet.
    gateway: ipaddress.IPv4Address = Field(
        default=ipaddress.IPv4Address("192.168.123.1"), description="The bridge's address (default: the first host)."
    )
    dhcp_range: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address] = Field(
        default=(ipaddress.IPv4Address("192.168.123.100"), ipaddress.IPv4Address("192.168.123.200")),
        description="First and last address DHCP hands out, also as 'first-last' (default .100-.200 of the subnet, "
        "or the hosts after the gateway in a small subnet).",
    )
    dns: bool = Field(default=True, description="Serve DNS on the gateway address (dnsmasq forwards upstream).")
    lease_seconds: Annotated[int, AfterValidator(_check_lease)] = Field(default=3600, description="DHCP lease time.")

    @model_validator(mode="before")
    @classmethod
    def _subnet_defaults(cls, data: Any) -> Any:  # noqa: ANN401 - pydantic's raw input
        if not isinstance(data, dict):
            return data
        if isinstance(data.get("dhcp_range"), str) and "-" in data["dhcp_range"]:
            data = {**data, "dhcp_range": tuple(data["dhcp_range"].split("-", 1))}
        if "gateway" in data and "dhcp_range" in data:
            return data
        try:
            subnet = ipaddress.IPv4Network(data.get("subnet", "192.168.123.0/24"))
        except (ValueError, TypeError):
            return data  # the field validator reports it
        hosts = list(subnet.hosts()) if subnet.num_addresses <= 1 << 16 else []
        if len(hosts) < 2:
            return data
        filled = dict(data)
        filled.setdefault("gateway", hosts[0])
        if subnet.num_addresses > _DHCP_HIGH + 1:
            filled.setdefault("dhcp_range", (subnet[_DHCP_LOW], subnet[_DHCP_HIGH]))
        else:
            filled.setdefault("dhcp_range", (hosts[1], hosts[-1]))
        return filled

    @model_validator(mode="after")
    def _addresses_fit(self) -> "NatNetwork":
        subnet = self.subnet
        if subnet.prefixlen > 30:
            raise ValueError("subnet must be /30 or larger")
        if self.gateway not in subnet or self.gateway in (subnet.network_address, subnet.broadcast_address):
            raise ValueError(f"gateway {self.gateway} must be a host address in {subnet}")
        first, last = self.dhcp_range
        for end in (first, last):
            if end not in subnet or end in (subnet.network_address, subnet.broadcast_address):
                raise ValueError(f"dhcp_range: {end} must be a host address in {subnet}")
        if first > last:
            raise ValueError("dhcp_range: the first address must not be after the last")
        if first <= self.gateway <= last:
            raise ValueError(f"dhcp_range must not contain the gateway {self.gateway}")
        return self

    @property
    def table(self) -> str:
        """The name of this network's nftables table (family ``inet``)."""
        return f"qmpnet_{self.name}"


def parse_nat_network(data: dict[str, Any] | NatNetwork, *, prefix: str = "network") -> NatNetwork:
    """Validate ``data`` into a :class:`NatNetwork`.

    Raises:
        InvalidRequest: A field is invalid; ``field`` is its path under ``prefix``.
    """
    return validate_as(NatNetwork, data, prefix)


class HostnetSettings(Frozen):
    """Host-side networking: taps, NAT networks, VFIO, and the tools and time limits they use."""

    netns: str | None = Field(
        default=None,
        description="Network namespace (name under /run/netns or a path) holding the bridges, taps and NAT "
        "networks; null means the controller's own.",
    )
    tap_pattern: Annotated[str, AfterValidator(_check_pattern)] = Field(
        default=TAP_PATTERN_DEFAULT, description="Name pattern of the taps qmpnet creates; {n} is the number."
    )
    networks: tuple[NatNetwork, ...] = Field(
        default=(NatNetwork(name="default"),), description="The NAT networks qmpnet may bring up."
    )
    state_dir: Path = Field(
        default=Path("/run/qmpnet"), description="Where dnsmasq's pid and lease files live (per namespace)."
    )
    sysfs_root: Path = Field(default=Path("/sys"), description="The sysfs tree VFIO checks read (tests: a fake).")
    nft: str = Field(default="nft", description="The nft program.")
    dnsmasq: str = Field(default="dnsmasq", description="The dnsmasq program.")
    passt: str = Field(default="passt", description="The passt program (passt backend).")
    passt_runas: Annotated[str, AfterValidator(_check_runas)] = Field(
        default="nobody", description="The unprivileged user (or user:group) passt runs as."
    )
    passt_dir: Path = Field(
        default=Path("/run/qmpnet/passt"),
        description="Where the passt sockets live, one directory per guest owned by passt_runas (which must be able "
        "to reach it).",
    )
    tool_timeout: float = Field(default=10.0, gt=0, description="Seconds nft or dnsmasq may take to start.")
    stop_timeout: float = Field(default=5.0, gt=0, description="Seconds dnsmasq may take to stop before SIGKILL.")
    shape_latency: float = Field(
        default=0.05, gt=0, le=10, description="Longest wait of a frame in a shaped NIC's rate limit (tbf latency)."
    )

    @model_validator(mode="after")
    def _networks_distinct(self) -> "HostnetSettings":
        for index, net in enumerate(self.networks):
            for other in self.networks[:index]:
                if net.name == other.name:
                    raise ValueError(f"networks: two networks are called {net.name!r}")
                if net.bridge == other.bridge:
                    raise ValueError(f"networks: {other.name} and {net.name} both use bridge {net.bridge}")
                if net.subnet.overlaps(other.subnet):
                    raise ValueError(f"networks: the subnets of {other.name} and {net.name} overlap")
        return self

    def passt_guest_dir(self, guest_key: str) -> Path:
        """The directory of the passt sockets of the guest with store key ``guest_key``, named by a short hash of it.

        Short, because a unix socket's path must fit in 107 bytes.
        """
        return self.passt_dir / hashlib.sha256(guest_key.encode()).hexdigest()[:12]

    def network(self, name: str, *, field: str = "nic.backend.network") -> NatNetwork:
        """The NAT network called ``name``.

        Raises:
            NotFound: No network of that name is defined (``field`` names the input).
        """
        for net in self.networks:
            if net.name == name:
                return net
        known = ", ".join(net.name for net in self.networks) or "none"
        raise NotFound(f"{field}: no NAT network {name!r} (defined: {known})", field=field)
