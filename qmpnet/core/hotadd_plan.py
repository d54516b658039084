"""Planning: a validated :class:`NicSpec` and the guest as observed -> the ordered QMP steps and their undo.

Hot-adding a NIC is three QMP commands (``netdev_add``, ``device_add``, ``set_link`` when it starts down), and the
guest must end up exactly as before if any of them fails. The plan is therefore a list of :class:`Step`, each
with the call that undoes it; the guest lane runs the steps in order and, on a failure, the undo calls of the
steps already done in reverse. Keeping this pure means every decision (names, MAC, placement, argument shapes)
is tested with tables, and the executor stays a short loop.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qmpnet.core import backends
from qmpnet.core.mtu import add_warnings, host_mtu
from qmpnet.core.names import format_pci_addr, generate_mac
from qmpnet.core.placement import PciTopology, Placement, place
from qmpnet.errors import Conflict, Unsupported

if TYPE_CHECKING:
    from collections.abc import Collection, Mapping

    from qmpnet.core.model import NicSpec

__all__ = [
    "AddPlan",
    "PlanContext",
    "QmpCall",
    "Step",
    "fd_names",
    "needs_tap_fds",
    "netdev_arguments",
    "netdev_id_for",
    "passt_socket",
    "plan_add",
]

#: The longest path a unix socket address holds (``sun_path`` less its NUL).
_SOCKET_PATH_MAX = 107


@dataclass(frozen=True)
class QmpCall:
    """One QMP command with its arguments."""

    command: str
    arguments: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    """One step of a plan.

    Attributes:
        call: What to run.
        undo: What reverts it, if anything.
        undo_waits_for: When the undo is a ``device_del``, the device id whose ``DEVICE_DELETED`` ends it.
    """

    call: QmpCall
    undo: QmpCall | None = None
    undo_waits_for: str | None = None


@dataclass(frozen=True)
class PlanContext:
    """What planning needs to know about the guest: ids and MACs in use, and its PCI buses."""

    device_ids: Collection[str]
    netdev_ids: Collection[str]
    macs: Collection[str]
    topology: PciTopology
    vfio_hosts: Collection[str] = ()


@dataclass(frozen=True)
class AddPlan:
    """The outcome of planning a hot-add."""

    nic_id: str
    netdev_id: str | None
    mac: str | None
    placement: Placement
    steps: tuple[Step, ...]
    passt_socket: str | None = None
    warnings: tuple[str, ...] = ()


def plan_add(
    spec: NicSpec, guest: PlanContext, *, vhost: bool = False, passt_dir: str | None = None, mtu: int | None = None
) -> AddPlan:
    """Plan the hot-add of ``spec`` into ``guest``.

    For bridge, NAT and macvtap backends the plan expects the tap's fds to have been passed to QEMU already under the
    names :func:`fd_names` gives (the host side is the lane's job); ``vhost`` says whether to ask for vhost-net.
    For a passt backend it expects passt to listen on :attr:`AddPlan.passt_socket`, in the guest's ``passt_dir``.
    ``mtu`` is the MTU of the NIC's host tap (``spec.mtu``, else its bridge's; see :mod:`qmpnet.core.mtu`).

    Raises:
        Conflict: The id, its netdev id, the MAC or the assigned host function is already in the guest.
        NoFreeSlot, NotFound, Unsupported, InvalidRequest: From PCI placement (see :func:`placement.place`).
    """
    nic_id = spec.id or _free_id(spec.model, guest)
    if nic_id in guest.device_ids:
        raise Conflict(f"nic.id: a device with id {nic_id!r} is already in the guest", field="nic.id")
    netdev_id = netdev_id_for(nic_id)
    if netdev_id in guest.netdev_ids:
        raise Conflict(f"nic.id: netdev {netdev_id!r} (for NIC {nic_id!r}) already exists", field="nic.id")
    if spec.mac is not None and spec.mac in guest.macs:
        raise Conflict(f"nic.mac: MAC {spec.mac} is already used by a NIC in the guest", field="nic.mac")
    if isinstance(spec.backend, backends.VfioBackend) and spec.backend.host in guest.vfio_hosts:
        raise Conflict(f"nic.backend.host: {spec.backend.host} is already assigned to this guest",
                       field="nic.backend.host")
    placement = place(spec.driver, guest.topology, bus=spec.bus, addr=spec.pci_addr)
    if isinstance(spec.backend, backends.VfioBackend):
        device = {"driver": "vfio-pci", "id": nic_id, "host": spec.backend.host, **_placement_arguments(placement)}
        step = Step(QmpCall("device_add", device), undo=QmpCall("device_del", {"id": nic_id}), undo_waits_for=nic_id)
        return AddPlan(nic_id, None, None, placement, (step,))
    socket = _passt_socket_for(spec, nic_id, passt_dir)
    mac = spec.mac or generate_mac(guest.macs)
    steps = [
        Step(
            QmpCall("netdev_add", netdev_arguments(netdev_id, spec, vhost=vhost, passt_socket=socket)),
            undo=QmpCall("netdev_del", {"id": netdev_id}),
        ),
        Step(
            QmpCall("device_add", _device_arguments(spec, nic_id, netdev_id, mac, placement, mtu)),
            undo=QmpCall("device_del", {"id": nic_id}),
            undo_waits_for=nic_id,
        ),
    ]
    if spec.link == "down":
        steps.append(Step(QmpCall("set_link", {"name": nic_id, "up": False})))
    return AddPlan(
        nic_id, netdev_id, mac, placement, tuple(steps), passt_socket=socket, warnings=add_warnings(spec.model, mtu)
    )


def _passt_socket_for(spec: NicSpec, nic_id: str, passt_dir: str | None) -> str | None:
    if not isinstance(spec.backend, backends.PasstBackend):
        return None
    if passt_dir is None:
        raise Unsupported("nic.backend.type: passt needs host networking, which is not set up here",
                          field="nic.backend.type")
    return passt_socket(passt_dir, nic_id)


def passt_socket(directory: str, nic_id: str) -> str:
    """The unix socket passt listens on for NIC ``nic_id``: ``<directory>/<nic_id>.sock``.

    A NIC id too long for a socket path (107 bytes in all) is replaced by a hash of it.
    """
    path = f"{directory}/{nic_id}.sock"
    if len(path.encode()) <= _SOCKET_PATH_MAX:
        return path
    return f"{directory}/{hashlib.sha256(nic_id.encode()).hexdigest()[:16]}.sock"


def netdev_id_for(nic_id: str) -> str:
    """The id qmpnet gives the backend of NIC ``nic_id``."""
    return f"{nic_id}.net"


def _free_id(model: str, guest: PlanContext) -> str:
    stem = {"virtio-net-pci": "virtio", "rtl8139": "rtl", "e1000": "e1000-", "e1000e": "e1000e-"}.get(model, model)
    # Taken: a device's id, or a netdev's once its ".net" is cut (a candidate ends in a digit, never in ".net").
    # Asked of the guest's sets as they are: no set of every id made at each plan (a hot-add's planning cost).
    devices, netdevs = guest.device_ids, guest.netdev_ids
    n = 0
    while True:
        candidate = f"{stem}{n}"
        if candidate not in devices and candidate not in netdevs and f"{candidate}.net" not in netdevs:
            return candidate
        n += 1


def needs_tap_fds(spec: NicSpec) -> bool:
    """Whether the lane must make a tap and pass its fds before the plan runs (bridge, NAT and macvtap backends)."""
    backend = spec.backend
    helper = isinstance(backend, backends.BridgeBackend) and backend.helper
    return isinstance(backend, backends.NatBackend | backends.MacvtapBackend | backends.BridgeBackend) and not helper


def fd_names(netdev_id: str, queues: int) -> tuple[str, ...]:
    """The names the tap fds of ``netdev_id`` are passed to QEMU under (``getfd``), one per queue."""
    return tuple(f"{netdev_id}.fd{i}" for i in range(queues))


def netdev_arguments(
    netdev_id: str, spec: NicSpec, *, vhost: bool = False, passt_socket: str | None = None
) -> dict[str, object]:
    """The ``netdev_add`` arguments for ``spec``'s backend (a passt backend: a stream to ``passt_socket``)."""
    args: dict[str, object] = {"id": netdev_id, "type": spec.backend.type}
    if isinstance(spec.backend, backends.PasstBackend):
        if passt_socket is None:
            raise Unsupported("nic.backend.type: passt needs its socket, which host networking makes",
                              field="nic.backend.type")
        # QEMU 7.2's stream netdev takes addr and server (8.0 added reconnect, 9.2 reconnect-ms): the common subset.
        return args | {"type": "stream", "server": False, "addr": {"type": "unix", "path": passt_socket}}
    return args | _backend_arguments(spec.backend, netdev_id, spec.queues or 1, vhost)


def _backend_arguments(  # noqa: PLR0911 - one return per backend type reads as the table it is
    backend: object, netdev_id: str, queues: int, vhost: bool
) -> dict[str, object]:
    match backend:
        case backends.UserBackend():
            return _user_arguments(backend)
        case backends.HubportBackend():
            return {"hubid": backend.hub}
        case backends.StreamBackend():
            return {"server": backend.server, "addr": _socket_address(backend.addr)}
        case backends.DgramBackend():
            ends = {"local": backend.local, "remote": backend.remote}
            return {name: _socket_address(addr) for name, addr in ends.items() if addr is not None}
        case backends.BridgeBackend(helper=True):
            return {"br": backend.bridge}
        case backends.BridgeBackend() | backends.NatBackend() | backends.MacvtapBackend():
            names = fd_names(netdev_id, queues)
            fds: dict[str, object] = {"fd": names[0]} if queues == 1 else {"fds": ":".join(names)}
            return {"type": "tap", "vhost": vhost, **fds}
        case backends.TapBackend():
            return {"ifname": backend.ifname, "script": "no", "downscript": "no"} | (
                {"queues": queues} if queues > 1 else {}
            )
    return {}


def _user_arguments(backend: backends.UserBackend) -> dict[str, object]:
    args: dict[str, object] = {}
    for name in ("net", "host", "dhcpstart", "dns"):
        value = getattr(backend, name)
        if value is not None:
            args[name] = str(value)
    if backend.hostfwd:
        args["hostfwd"] = [{"str": rule} for rule in backend.hostfwd]
    if backend.guestfwd:
        args["guestfwd"] = [{"str": rule} for rule in backend.guestfwd]
    if backend.smb is not None:
        args["smb"] = backend.smb
    if backend.restrict:
        args["restrict"] = True
    return args


def _socket_address(addr: backends.UnixAddress | backends.InetAddress) -> dict[str, object]:
    if isinstance(addr, backends.UnixAddress):
        return {"type": "unix", "path": addr.path}
    return {"type": "inet", "host": addr.host, "port": str(addr.port)}


def _placement_arguments(placement: Placement) -> dict[str, object]:
    return {"bus": placement.bus, "addr": format_pci_addr(placement.slot, placement.function)}


def _mtu_arguments(spec: NicSpec, mtu: int | None) -> dict[str, object]:
    value = host_mtu(spec.model, mtu)
    return {"host_mtu": value} if value is not None else {}


def _device_arguments(  # noqa: PLR0913, PLR0917 - the device's properties
    spec: NicSpec, nic_id: str, netdev_id: str, mac: str, placement: Placement, mtu: int | None
) -> dict[str, object]:
    args: dict[str, object] = {
        "driver": spec.model,
        "id": nic_id,
        "netdev": netdev_id,
        "mac": mac,
        **_placement_arguments(placement),
    }
    queues = spec.queues or 1
    if queues > 1:
        args["mq"] = True
    vectors = spec.vectors if spec.vectors is not None else (2 * queues + 2 if queues > 1 else None)
    if vectors is not None:
        args["vectors"] = vectors
    return args | _mtu_arguments(spec, mtu)
