"""The flags of ``nic add`` and ``nic set`` turned into the MQTT API's objects (a backend, an update).

A missing or conflicting flag is an ``invalid_request`` naming the flag, before anything is connected to.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from qmpnet.cli.exits import fail
from qmpnet.errors import InvalidRequest

if TYPE_CHECKING:
    from qmpnet.cli.options import LinkArg


class BackendType(StrEnum):
    """Backends the CLI can build from flags."""

    user = "user"
    hubport = "hubport"
    stream = "stream"
    dgram = "dgram"
    bridge = "bridge"
    nat = "nat"
    tap = "tap"
    macvtap = "macvtap"
    vfio = "vfio"
    passt = "passt"


@dataclass(frozen=True)
class HostFlags:
    """The flags of the host-side backends (bridge, nat, tap, macvtap, vfio)."""

    bridge: str | None = None
    helper: bool = False
    network: str | None = None
    ifname: str | None = None
    pci_host: str | None = None
    rebind: bool = False
    parent: str | None = None
    mode: str | None = None

    def backend_options(self, backend: BackendType) -> dict[str, object]:
        """The backend object's options; a missing required flag is an ``invalid_request``."""
        if backend is BackendType.nat:
            return {"network": self.network or "default"}
        required = {BackendType.bridge: ("--bridge", self.bridge), BackendType.tap: ("--ifname", self.ifname),
                    BackendType.vfio: ("--host", self.pci_host),
                    BackendType.macvtap: ("--parent", self.parent)}[backend]
        flag, value = required
        if value is None:
            raise fail(InvalidRequest(f"{flag}: --backend {backend.value} needs {flag}", field=flag))
        if backend is BackendType.bridge:
            return {"bridge": value, "helper": self.helper}
        if backend is BackendType.tap:
            return {"ifname": value}
        if backend is BackendType.macvtap:
            options: dict[str, object] = {"link": value}
            return options | ({"mode": self.mode} if self.mode is not None else {})
        return {"host": value, "rebind": self.rebind}


HOST_BACKENDS = frozenset(
    {BackendType.bridge, BackendType.nat, BackendType.tap, BackendType.macvtap, BackendType.vfio}
)


def socket_address(value: str, flag: str) -> dict[str, object]:
    """``/path`` → unix address, ``host:port`` → inet address (for stream/dgram flags)."""
    if value.startswith("/"):
        return {"type": "unix", "path": value}
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise fail(InvalidRequest(f"{flag}: {value!r} is neither /unix/path nor host:port", field=flag))
    return {"type": "inet", "host": host, "port": int(port)}


def build_backend(
    backend: BackendType,
    *,
    hub: int | None,
    hostfwd: list[str],
    net: str | None,
    restrict: bool,
    connect_to: str | None,
    listen: str | None,
    local: str | None,
    remote: str | None,
    host: HostFlags,
    ports: list[str] | None = None,
    ipv4_only: bool = False,
) -> dict[str, object]:
    """Turn the backend flags into the MQTT API's backend object."""
    spec: dict[str, object] = {"type": backend.value}
    if backend in HOST_BACKENDS:
        return spec | host.backend_options(backend)
    if backend is BackendType.passt:
        return spec | {"ports": ports or [], "ipv6": not ipv4_only}
    if backend is BackendType.user:
        spec |= {"hostfwd": hostfwd, "restrict": restrict} | ({"net": net} if net else {})
    elif backend is BackendType.hubport:
        spec["hub"] = 0 if hub is None else hub
    elif backend is BackendType.stream:
        if (listen is None) == (connect_to is None):
            raise fail(InvalidRequest("--listen or --connect: give exactly one for a stream backend", field="--listen"))
        spec |= {"server": listen is not None}
        spec["addr"] = socket_address(listen or connect_to or "", "--listen" if listen else "--connect")
    else:
        if local is None and remote is None:
            raise fail(InvalidRequest("--local/--remote: a dgram backend needs at least one", field="--local"))
        if local is not None:
            spec["local"] = socket_address(local, "--local")
        if remote is not None:
            spec["remote"] = socket_address(remote, "--remote")
    return spec


def build_update(
    nic_id: str,
    *,
    bridge: str | None,
    network: str | None,
    vlan: int | None,
    trunks: str | None,
    no_vlan: bool,
    shape: dict[str, str],
    no_shape: bool,
    link: LinkArg | None,
    nic_filter: FilterFlags | None = None,
) -> dict[str, object]:
    """Turn the flags of ``nic set`` into the MQTT API's update object; conflicting flags are ``invalid_request``."""
    exclusive = (("--bridge", bridge, "--network", network), ("--vlan", vlan, "--trunks", trunks),
                 ("--vlan", vlan, "--no-vlan", no_vlan or None), ("--trunks", trunks, "--no-vlan", no_vlan or None),
                 ("--no-shape", no_shape or None, f"--{next(iter(shape), '')}", shape or None))  # fmt: skip
    for one, first, other, second in exclusive:
        if first is not None and second is not None:
            raise fail(InvalidRequest(f"{one}/{other}: give one of them", field=one))
    update: dict[str, object] = {"id": nic_id}
    if bridge is not None or network is not None:
        update["backend"] = {"type": "bridge", "bridge": bridge} if bridge else {"type": "nat", "network": network}
    if vlan is not None or trunks is not None or no_vlan:
        update["vlan"] = _vlan_flags(vlan, trunks)
    if shape or no_shape:
        update["shape"] = shape or None
    if link is not None:
        update["link"] = link.value
    if nic_filter is not None and (nic_filter.given or nic_filter.off):
        update["filter"] = nic_filter.build()
    return update


def _vlan_flags(vlan: int | None, trunks: str | None) -> dict[str, object] | None:
    if vlan is not None:
        return {"access": vlan}
    if trunks is not None:
        return {"trunks": [part.strip() for part in trunks.split(",")]}
    return None


@dataclass(frozen=True)
class FilterFlags:
    """The anti-spoofing flags of ``nic add`` and ``nic set`` (``--filter``, ``--filter-ipv4`` ...)."""

    on: bool = False
    ipv4: tuple[str, ...] = ()
    ipv6: tuple[str, ...] = ()
    no_mac: bool = False
    dhcp_server: bool = False
    off: bool = False

    @property
    def given(self) -> bool:
        """Whether any flag asks for a filter."""
        return self.on or bool(self.ipv4 or self.ipv6) or self.no_mac or self.dhcp_server

    def build(self) -> dict[str, object] | None:
        """The ``filter`` object (``None``: ``--no-filter``); ``none`` as an address gives an empty list."""
        if self.off:
            if self.given:
                raise fail(InvalidRequest("--no-filter: give it alone, without --filter flags", field="--no-filter"))
            return None
        spec: dict[str, object] = {"mac": not self.no_mac, "dhcp_server": self.dhcp_server}
        for family, values in (("ipv4", self.ipv4), ("ipv6", self.ipv6)):
            if values:
                spec[family] = [] if values == ("none",) else list(values)
        return spec
