"""The flags of ``nic add`` and ``nic set``, as data, and what they are turned into: the MQTT API's objects.

:data:`ADD_FLAGS` and :data:`SET_FLAGS` declare the commands' options in the order ``--help`` lists them (the
anti-spoofing ones, :data:`FILTER_FLAGS`, are the same on both); the commands receive their values as one
:class:`~qmpnet.cli.flags.Given`, from which :func:`build_spec` and :func:`build_update` make a NIC spec or an
update. A missing or conflicting flag raises ``invalid_request`` naming the flag, before anything is connected to.
Neither typer nor pydantic is imported here: the quick path (:mod:`.quick`) builds its spec with these too.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, NamedTuple

from qmpnet.cli.flags import LinkArg, flag_table
from qmpnet.errors import InvalidRequest

if TYPE_CHECKING:
    from qmpnet.cli.flags import Given


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


HOST_BACKENDS = frozenset(
    {BackendType.bridge, BackendType.nat, BackendType.tap, BackendType.macvtap, BackendType.vfio}
)
#: The flag a host-side backend cannot do without.
_REQUIRED = {BackendType.bridge: ("--bridge", "bridge"), BackendType.tap: ("--ifname", "ifname"),
             BackendType.vfio: ("--host", "pci_host"), BackendType.macvtap: ("--parent", "parent")}  # fmt: skip


def host_options(flags: Given, backend: BackendType) -> dict[str, object]:
    """A host-side backend's options (bridge, nat, tap, macvtap, vfio); a missing required flag is an error."""
    if backend is BackendType.nat:
        return {"network": flags.text("network") or "default"}
    flag, param = _REQUIRED[backend]
    value = flags.text(param)
    if value is None:
        raise InvalidRequest(f"{flag}: --backend {backend.value} needs {flag}", field=flag)
    if backend is BackendType.bridge:
        return {"bridge": value, "helper": flags.switch("helper")}
    if backend is BackendType.tap:
        return {"ifname": value}
    if backend is BackendType.macvtap:
        options: dict[str, object] = {"link": value}
        mode = flags.text("mode")
        return options | ({"mode": mode} if mode is not None else {})
    return {"host": value, "rebind": flags.switch("rebind")}


def socket_address(value: str, flag: str) -> dict[str, object]:
    """``/path`` → unix address, ``host:port`` → inet address (for stream/dgram flags)."""
    if value.startswith("/"):
        return {"type": "unix", "path": value}
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise InvalidRequest(f"{flag}: {value!r} is neither /unix/path nor host:port", field=flag)
    return {"type": "inet", "host": host, "port": int(port)}


def build_backend(flags: Given) -> dict[str, object]:
    """Turn the backend flags of ``nic add`` into the MQTT API's backend object."""
    backend = flags.choice("backend", BackendType) or BackendType.user
    spec: dict[str, object] = {"type": backend.value}
    if backend in HOST_BACKENDS:
        return spec | host_options(flags, backend)
    if backend is BackendType.passt:
        return spec | {"ports": flags.texts("port"), "ipv6": not flags.switch("ipv4_only")}
    if backend is BackendType.user:
        net = flags.text("net")
        return spec | {"hostfwd": flags.texts("hostfwd"), "restrict": flags.switch("restrict")} | (
            {"net": net} if net else {})  # fmt: skip
    if backend is BackendType.hubport:
        return spec | {"hub": flags.number("hub") or 0}
    if backend is BackendType.stream:
        listen, connect_to = flags.text("listen"), flags.text("connect_to")
        if (listen is None) == (connect_to is None):
            raise InvalidRequest("--listen or --connect: give exactly one for a stream backend", field="--listen")
        spec["server"] = listen is not None
        return spec | {"addr": socket_address(listen or connect_to or "", "--listen" if listen else "--connect")}
    local, remote = flags.text("local"), flags.text("remote")
    if local is None and remote is None:
        raise InvalidRequest("--local/--remote: a dgram backend needs at least one", field="--local")
    if local is not None:
        spec["local"] = socket_address(local, "--local")
    if remote is not None:
        spec["remote"] = socket_address(remote, "--remote")
    return spec


#: The flags of ``nic add`` that are the spec's own fields, by the spec's field names.
_SPEC_FIELDS = {"id": "nic_id", "mac": "mac", "addr": "addr", "bus": "bus", "vectors": "vectors", "queues": "queues",
                "mtu": "mtu"}  # fmt: skip


def build_spec(flags: Given) -> dict[str, object]:
    """Turn the flags of ``nic add`` into the MQTT API's NIC spec (not validated yet)."""
    model, link = flags.text("model"), flags.choice("link", LinkArg)
    # A vfio NIC is the host's function itself: it has no model and no link, and the spec's checks refuse either.
    if flags.choice("backend", BackendType) is not BackendType.vfio:
        model = model or "virtio-net-pci"
        link = link or LinkArg.up
    spec: dict[str, object] = {
        **({"model": model} if model is not None else {}),
        **({"link": link.value} if link is not None else {}),
        "backend": build_backend(flags),
    }
    spec |= {field: flags.values[param] for field, param in _SPEC_FIELDS.items() if flags.values[param] is not None}
    nic_filter = FilterFlags.of(flags)
    return spec | ({"filter": nic_filter.build()} if nic_filter.given else {})


def build_update(nic_id: str, flags: Given) -> dict[str, object]:
    """Turn the flags of ``nic set`` into the MQTT API's update object; conflicting flags are ``invalid_request``."""
    bridge, network = flags.text("bridge"), flags.text("network")
    vlan, trunks = flags.number("vlan"), flags.text("trunks")
    no_vlan, no_shape = flags.switch("no_vlan"), flags.switch("no_shape")
    given = {name: flags.text(name) for name in ("rate", "burst", "delay", "jitter", "loss")}
    shape = {name: value for name, value in given.items() if value is not None}
    exclusive = (("--bridge", bridge, "--network", network), ("--vlan", vlan, "--trunks", trunks),
                 ("--vlan", vlan, "--no-vlan", no_vlan or None), ("--trunks", trunks, "--no-vlan", no_vlan or None),
                 ("--no-shape", no_shape or None, f"--{next(iter(shape), '')}", shape or None))  # fmt: skip
    for one, first, other, second in exclusive:
        if first is not None and second is not None:
            raise InvalidRequest(f"{one}/{other}: give one of them", field=one)
    update: dict[str, object] = {"id": nic_id}
    if bridge is not None or network is not None:
        update["backend"] = {"type": "bridge", "bridge": bridge} if bridge else {"type": "nat", "network": network}
    if vlan is not None or trunks is not None or no_vlan:
        update["vlan"] = _vlan_flags(vlan, trunks)
    if shape or no_shape:
        update["shape"] = shape or None
    link, nic_filter, mtu = flags.choice("link", LinkArg), FilterFlags.of(flags), flags.number("mtu")
    if link is not None:
        update["link"] = link.value
    if nic_filter.given or nic_filter.off:
        update["filter"] = nic_filter.build()
    return update | ({"mtu": mtu} if mtu is not None else {})


def _vlan_flags(vlan: int | None, trunks: str | None) -> dict[str, object] | None:
    if vlan is not None:
        return {"access": vlan}
    if trunks is not None:
        return {"trunks": [part.strip() for part in trunks.split(",")]}
    return None


# A NamedTuple, not a frozen dataclass, as the CLI's other value types (cli/connect.py).
class FilterFlags(NamedTuple):
    """The anti-spoofing flags of ``nic add`` and ``nic set`` (``--filter``, ``--filter-ipv4`` ...)."""

    on: bool = False
    ipv4: tuple[str, ...] = ()
    ipv6: tuple[str, ...] = ()
    no_mac: bool = False
    dhcp_server: bool = False
    off: bool = False

    @classmethod
    def of(cls, flags: Given) -> FilterFlags:
        """The anti-spoofing flags among a command's (``--no-filter`` only where the command has it)."""
        off = "no_filter" in flags.values and flags.switch("no_filter")
        return cls(flags.switch("filter_on"), tuple(flags.texts("filter_ipv4")), tuple(flags.texts("filter_ipv6")),
                   flags.switch("no_filter_mac"), flags.switch("filter_dhcp_server"), off)  # fmt: skip

    @property
    def given(self) -> bool:
        """Whether any flag asks for a filter."""
        return self.on or bool(self.ipv4 or self.ipv6) or self.no_mac or self.dhcp_server

    def build(self) -> dict[str, object] | None:
        """The ``filter`` object (``None``: ``--no-filter``); ``none`` as an address gives an empty list."""
        if self.off:
            if self.given:
                raise InvalidRequest("--no-filter: give it alone, without --filter flags", field="--no-filter")
            return None
        spec: dict[str, object] = {"mac": not self.no_mac, "dhcp_server": self.dhcp_server}
        for family, values in (("ipv4", self.ipv4), ("ipv6", self.ipv6)):
            if values:
                spec[family] = [] if values == ("none",) else list(values)
        return spec


#: The anti-spoofing flags, the same on ``nic add`` and ``nic set`` (docs/host-networking.md, "Anti-spoofing").
FILTER_FLAGS = flag_table("""
    filter_on           switch  --filter              -     Anti-spoofing: drop frames from another MAC (bridge, nat).
    filter_ipv4         texts   --filter-ipv4         ADDR  Anti-spoofing: an allowed IPv4 source (repeat; 'none': no IPv4).
    filter_ipv6         texts   --filter-ipv6         ADDR  Anti-spoofing: an allowed IPv6 source besides link-local (repeat).
    no_filter_mac       switch  --no-filter-mac       -     Anti-spoofing: do not check the source MAC.
    filter_dhcp_server  switch  --filter-dhcp-server  -     Anti-spoofing: let the guest serve DHCP.
""")  # noqa: E501 - a table: one flag a line

#: The options of ``nic add``, before the guest's.
ADD_FLAGS = flag_table("""
    model       text     --model      MODEL             rtl8139, e1000, e1000e, virtio-net-pci (or virtio); default virtio-net-pci, none for vfio.
    nic_id      text     --id         ID                Device id (generated when absent).
    mac         text     --mac        MAC               MAC address (a free 52:54:00:xx:xx:xx when absent).
    backend     backend  --backend    -                 Backend type.
    hub         int      --hub        N                 Hub number for --backend hubport (the old vlan=n).
    hostfwd     texts    --hostfwd    RULE              user: port forward, e.g. tcp:127.0.0.1:2222-:22.
    net         text     --net        CIDR              user: guest network, e.g. 10.0.3.0/24.
    restrict    switch   --restrict   -                 user: isolate the guest from the host.
    listen      text     --listen     ADDR              stream: listen on /path or host:port.
    connect_to  text     --connect    ADDR              stream: connect to /path or host:port.
    local       text     --local      ADDR              dgram: local /path or host:port.
    remote      text     --remote     ADDR              dgram: remote /path or host:port.
    bridge      text     --bridge     BRIDGE            bridge: the host bridge (e.g. br0).
    helper      switch   --helper     -                 bridge: let QEMU's bridge helper make the tap (policy).
    network     text     --network    NAME              nat: the NAT network (default: default).
    ifname      text     --ifname     TAP               tap: an existing tap device.
    parent      text     --parent     LINK              macvtap: the host link it sits on (e.g. eth0).
    mode        text     --mode       MODE              macvtap: bridge (default), vepa, private or passthru.
    pci_host    text     --host       PCI               vfio: host PCI address, e.g. 0000:03:00.0.
    rebind      switch   --rebind     -                 vfio: bind the device to vfio-pci first, restore after.
    port        texts    --port       PROTO:HOST:GUEST  passt: port forward, e.g. tcp:2222:22.
    ipv4_only   switch   --ipv4-only  -                 passt: serve IPv4 only.
    addr        text     --addr       SLOT[.FN]         PCI slot[.function], hex as QEMU reads it.
    bus         text     --bus        BUS               PCI bus id (pci.0, a pcie-root-port, a bridge).
    vectors     int      --vectors    N                 MSI-X vectors (virtio).
    queues      int      --queues     N                 Queue pairs (virtio, tap backends).
    mtu         int      --mtu        N                 MTU 68-65535 (bridge, nat, tap; default: the bridge's).
    link        link     --link       -                 Initial link state (default up; a vfio NIC has none).
""", {"backend": (BackendType, BackendType.user)}) + FILTER_FLAGS  # noqa: E501 - as above

#: The options of ``nic set``, after its ID and before the guest's.
SET_FLAGS = flag_table("""
    bridge    text    --bridge    BRIDGE   Move the NIC to this host bridge.
    network   text    --network   NAME     Move the NIC to this NAT network.
    vlan      int     --vlan      VID      Access VLAN (untagged, PVID) on a VLAN-filtering bridge.
    trunks    text    --trunks    VIDS     Tagged VLANs, e.g. 10,20,100-199.
    no_vlan   switch  --no-vlan   -        Back to the bridge's default VLAN.
    rate      text    --rate      RATE     Rate limit both ways, tc notation (10mbit).
    burst     text    --burst     SIZE     Bucket of the rate limit (32kb).
    delay     text    --delay     TIME     Delay towards the guest (100ms).
    jitter    text    --jitter    TIME     Jitter of the delay (10ms).
    loss      text    --loss      PERCENT  Loss towards the guest (1%).
    no_shape  switch  --no-shape  -        Remove all shaping.
    link      link    --link      -        Set the link up or down.
    mtu       int     --mtu       N        MTU of the NIC's host tap; the guest must apply it itself.
""") + FILTER_FLAGS + flag_table("""
    no_filter  switch  --no-filter  -  Remove the anti-spoofing filter.
""")
