"""Ports: what the guest lane needs from a QEMU monitor, as ``typing.Protocol``s.

The lane (``qmpnet.guest.guest``) never sees ``qemu.qmp``; it sees a :class:`Monitor`. The real one lives
in ``qmpnet.adapters.qmp``; unit tests pass an in-memory fake. The data shapes a monitor returns are plain frozen
dataclasses already parsed from QEMU's answers, so no raw QMP dictionary reaches the core.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
    from contextlib import AbstractAsyncContextManager

    from qmpnet.core.model import (
        Capacity,
        CaptureResult,
        DiscardedRecord,
        ModelInfo,
        Nic,
        NicSpec,
        NicUpdate,
        ObservedBackend,
        PasstBackend,
        RemoveResult,
        RxFilter,
        Shape,
        Verify,
        Vlan,
    )
    from qmpnet.core.nic_filter import NicFilter
    from qmpnet.core.placement import PciTopology
    from qmpnet.core.records import GuestRecord

__all__ = [
    "Connection",
    "EventStream",
    "Flag",
    "GuestOps",
    "GuestStore",
    "HostNetwork",
    "HostProcess",
    "Monitor",
    "NetClient",
    "Observation",
    "PciDevice",
    "QmpEvent",
    "TapHandle",
    "TapPort",
]


@dataclass(frozen=True)
class QmpEvent:
    """An asynchronous QMP event."""

    name: str
    data: Mapping[str, object]
    timestamp: float

    @property
    def device(self) -> str | None:
        """The ``data.device`` member (device id) if the event has one."""
        value = self.data.get("device")
        return value if isinstance(value, str) else None


@dataclass(frozen=True)
class PciDevice:
    """A PCI device as QEMU shows it (``qmpnet.adapters.qmp`` reads it from QOM and ``query-pci``).

    Attributes:
        id: The device id (``-device ...,id=``); ``None`` for anonymous and built-in devices.
        driver: The QOM type (``e1000``, ``pcie-root-port``). A built-in function that only ``query-pci`` shows
            has QEMU's class description instead (``Host bridge``, ``ISA bridge``).
        bus: The name of the bus it sits on, as ``device_add bus=`` takes it (``pci.0``, ``rp1``, ``pcibr0``).
        slot: PCI slot (device number) on that bus.
        function: PCI function.
        mac: The MAC address, set only for devices whose type has NIC properties.
        netdev: The backend's id; ``None`` for non-NICs and for a NIC with no backend.
        host: The host PCI address of a vfio-pci function.
        path: The QOM path (``/machine/peripheral/e1``, ``/machine/peripheral-anon/device[0]``); ``device_del``
            accepts it for devices without an id. ``None`` for built-in functions seen only in ``query-pci``.
    """

    id: str | None
    driver: str
    bus: str
    slot: int
    function: int
    mac: str | None = None
    netdev: str | None = None
    host: str | None = None
    path: str | None = None

    @property
    def is_nic(self) -> bool:
        """Whether this is a network device: an emulated NIC (it has a MAC) or an assigned vfio-pci function."""
        return self.mac is not None or self.netdev is not None or self.host is not None or self.driver == "vfio-pci"


@dataclass(frozen=True)
class NetClient:
    """A QEMU net client (a NIC's front end or a backend) from ``info network``."""

    name: str
    backend: ObservedBackend
    peer: str | None = None


@dataclass(frozen=True)
class Observation:
    """The guest's network-relevant state, read in one go."""

    machine: str
    topology: PciTopology
    devices: tuple[PciDevice, ...]
    device_ids: frozenset[str]
    netclients: Mapping[str, NetClient] = field(default_factory=dict)

    def device(self, device_id: str) -> PciDevice | None:
        """The PCI device with id ``device_id``, if any."""
        return next((d for d in self.devices if d.id == device_id), None)


class EventStream(Protocol):
    """Events accepted by one listener, in arrival order."""

    async def get(self) -> QmpEvent:
        """Wait for the next event."""
        ...

    def get_nowait(self) -> QmpEvent | None:
        """The next event if one is already queued."""
        ...


class Monitor(Protocol):
    """A connected QMP monitor of one guest."""

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> object:
        """Run one command and return QEMU's ``return`` value.

        Raises:
            QmpCommandError: QEMU answered with an error.
            OutcomeUnknown: The command was sent and no answer came in time, or the connection dropped.
            GuestUnavailable: The monitor is not connected; nothing was sent.
        """
        ...

    def listen(
        self, names: Collection[str], where: Callable[[QmpEvent], bool] | None = None
    ) -> AbstractAsyncContextManager[EventStream]:
        """Listen for events named ``names`` (and matching ``where``) while the context is open.

        Enter it *before* sending the command that causes the event, so the event cannot be missed.
        """
        ...

    def on_event(self, handler: Callable[[QmpEvent], None]) -> None:
        """Call ``handler`` for every event, from the monitor's own event pump."""
        ...

    async def observe(self) -> Observation:
        """Read the guest's PCI devices, buses and net clients.

        Raises:
            QmpCommandError, OutcomeUnknown, GuestUnavailable: As :meth:`execute`.
        """
        ...

    async def models(self) -> list[ModelInfo]:
        """The NIC models this QEMU offers."""
        ...

    async def rx_filter(self, name: str) -> RxFilter | None:
        """The virtio rx-filter of NIC ``name``, or ``None`` when the model cannot report one."""
        ...

    async def pass_fds(self, fds: Sequence[tuple[str, int]]) -> None:
        """Hand each open fd to QEMU under its name (``getfd`` with the fd attached); all or none.

        Raises:
            Unsupported: The monitor is not a unix socket, so fds cannot be passed.
            QmpCommandError, OutcomeUnknown, GuestUnavailable: As :meth:`execute`.
        """
        ...


class Flag(Protocol):
    """A one-way flag that can be awaited (``asyncio.Event`` is one)."""

    def is_set(self) -> bool:
        """Whether the flag is set."""
        ...

    async def wait(self) -> bool:
        """Wait until the flag is set."""
        ...


class Connection(Monitor, Protocol):
    """A connected QMP monitor as a long-lived owner needs it (``qmpnet.adapters.qmp.QmpMonitor`` is one)."""

    @property
    def closed(self) -> Flag:
        """Set once the connection is gone."""
        ...

    @property
    def greeting_version(self) -> str | None:
        """QEMU's version from the greeting."""
        ...

    async def machine(self) -> tuple[str, str]:
        """The machine type and kind."""
        ...

    async def close(self) -> None:
        """Disconnect."""
        ...


@dataclass(frozen=True)
class TapPort:
    """How a NIC's host tap is plugged in now: its bridge (and NAT network), VLANs and shaping.

    Attributes:
        name: The tap.
        bridge: The bridge it is enslaved to, if any.
        network: The qmpnet NAT network whose bridge that is, if it is one.
        vlan: Its VLAN membership on a VLAN-filtering bridge, ``None`` when it is in the bridge's default VLAN
            (or the bridge does not filter VLANs).
        shape: The shaping qmpnet put on it, if any.
    """

    name: str
    bridge: str | None = None
    network: str | None = None
    vlan: Vlan | None = None
    shape: Shape | None = None


class TapHandle(Protocol):
    """A tap the host side made, with qmpnet's open fds to it (one per queue)."""

    @property
    def name(self) -> str:
        """The interface name, e.g. ``vnet3``."""
        ...

    @property
    def fds(self) -> tuple[int, ...]:
        """The open queue fds."""
        ...

    def close_fds(self) -> None:
        """Close qmpnet's copies of the fds (QEMU keeps its own)."""
        ...


@dataclass(frozen=True)
class HostProcess:
    """A process on the host (a passt qmpnet started, a guest's QEMU), named for good by its pid and start time.

    The start time is in clock ticks after boot (``/proc/<pid>/stat``, field 22): a recycled pid has another.
    """

    pid: int
    started: int


class HostNetwork(Protocol):
    """The host side of bridge, NAT, tap, macvtap, VFIO and passt backends."""

    async def create_tap(self, bridge: str, *, queues: int, owner: str, mtu: int | None = None) -> TapHandle:
        """Make a tap enslaved to ``bridge`` and open its queues; its MTU is ``mtu``, else the bridge's.

        Raises:
            NotFound: No such bridge.
            InvalidRequest: ``bridge`` is not a bridge, or ``mtu`` is above its MTU (``nic.mtu``).
        """
        ...

    async def bridge_mtu(self, bridge: str) -> int:
        """The MTU of ``bridge``.

        Raises:
            NotFound: No such bridge.
            InvalidRequest: ``bridge`` is not a bridge.
        """
        ...

    async def create_macvtap(self, link: str, *, mode: str, mac: str, queues: int, owner: str) -> TapHandle:
        """Make a macvtap in ``mode`` with address ``mac`` on host link ``link`` and open its queues (``/dev/tapN``).

        Raises:
            NotFound: No such link.
            Unsupported: The kernel has no macvtap.
        """
        ...

    async def delete_tap(self, name: str) -> None:
        """Delete tap (or macvtap) ``name`` if it still exists and is qmpnet's."""
        ...

    async def nat_bridge(self, network: str) -> str:
        """Bring NAT network ``network`` up if needed and return its bridge.

        Raises:
            NotFound: No such network in the settings.
        """
        ...

    async def check_tap(self, ifname: str) -> None:
        """Check that ``ifname`` is an existing tap nobody holds.

        Raises:
            NotFound, InvalidRequest, Conflict: It is missing, not a tap, or in use.
        """
        ...

    def vhost(self) -> bool:
        """Whether vhost-net can be used."""
        ...

    async def prepare_vfio(
        self, host: str, *, rebind: bool, taking: Callable[[str], None] | None = None
    ) -> str | None:
        """Check ``host`` can be assigned; with ``rebind`` bind it to vfio-pci and return its original driver.

        ``taking`` is called with the original driver (``""``: none) just before the rebind, on the caller's
        thread: the caller records it there, so a process killed during or right after the rebind leaves a record
        that gives the function back (:func:`qmpnet.guest.host_release.release_host_side`; giving back a function
        that was never taken changes nothing).

        Raises:
            NotFound, InvalidRequest, Unsupported: The device, its class or its IOMMU group do not allow it.
        """
        ...

    async def restore_vfio(self, host: str, driver: str) -> None:
        """Give ``host`` back to ``driver`` after removal."""
        ...

    async def start_passt(self, socket: str, backend: PasstBackend) -> HostProcess:
        """Start passt for ``backend``, listening on ``socket``, and wait until it listens.

        Raises:
            Unsupported: passt is not installed.
            Conflict: A forwarded host port is taken (``nic.backend.ports.<i>``).
            QmpnetError: passt refused to start or did not bind its socket (its words are in the message).
        """
        ...

    def process(self, pid: int) -> HostProcess | None:
        """Name live process ``pid`` for good (its start time); ``None`` if it is gone or cannot be read."""
        ...

    def running(self, process: HostProcess) -> bool:
        """Whether ``process`` still runs (the same pid with the same start time, not a zombie)."""
        ...

    async def stop_passt(self, socket: str, process: HostProcess | None) -> None:
        """End the passt listening on ``socket`` and remove its files.

        ``process`` is signalled only while it is still that process (pid and start time); without it, or once it
        is gone, the passt is found by its command line, which names ``socket``.

        Raises:
            QmpnetError: The OS refused (a file or a process qmpnet may not touch).
        """
        ...

    async def sweep_passt(self, directory: str, keep: set[str]) -> list[str]:
        """End the passts whose socket is in ``directory`` but not in ``keep``, remove their files; their sockets.

        Raises:
            QmpnetError: The OS refused (a file or a process qmpnet may not touch).
        """
        ...

    async def sweep_orphans(self, owner_prefix: str, keep: set[str]) -> list[str]:
        """Delete taps made for NICs (owners ``<guest>/<nic>``) under ``owner_prefix`` that are not in ``keep``."""
        ...

    async def find_tap(self, owner: str, *, pid: int | None = None, fd: int | None = None) -> str | None:
        """The tap qmpnet made for ``owner`` (``<guest>/<nic>``), else the tap QEMU process ``pid`` holds as ``fd``.

        The second finds the tap of a NIC another process added under another guest name.
        """
        ...

    async def tap_port(self, tap: str) -> TapPort:
        """How ``tap`` is plugged in now (bridge, NAT network, VLANs, shaping).

        Raises:
            NotFound: No such tap.
        """
        ...

    async def move_tap(self, tap: str, bridge: str, *, field: str) -> Callable[[], Awaitable[object]]:
        """Enslave ``tap`` to ``bridge`` (taking its MTU) and return the action that puts it back.

        Raises:
            NotFound: No such tap, or no such bridge (``field`` names the input).
            InvalidRequest: ``bridge`` is not a Linux bridge.
        """
        ...

    async def set_mtu(self, tap: str, mtu: int, *, field: str) -> Callable[[], Awaitable[object]]:
        """Give ``tap`` MTU ``mtu`` and return the action that gives it back its old MTU.

        Raises:
            NotFound: No such tap.
            InvalidRequest: ``mtu`` is above the MTU of the tap's bridge (``field`` names the input).
        """
        ...

    async def set_vlan(self, tap: str, vlan: Vlan | None) -> Callable[[], Awaitable[object]]:
        """Set the VLANs of ``tap``'s bridge port (``None``: the bridge's default) and return their undo.

        All or nothing: on failure the port keeps its VLANs.

        Raises:
            Unsupported: The tap is on no bridge, or its bridge does not filter VLANs.
        """
        ...

    async def set_shape(self, tap: str, shape: Shape | None) -> Callable[[], Awaitable[object]]:
        """Shape ``tap`` as ``shape`` says (``None``: no shaping) and return the action that restores the old.

        All or nothing: on failure the tap keeps its old shaping.

        Raises:
            Unsupported: The kernel lacks a qdisc the shape needs (netem, tbf, ifb).
            Conflict: The tap carries qdiscs qmpnet did not make.
        """
        ...

    async def set_filter(
        self, tap: str, mac: str, wanted: NicFilter | None, *, before: NicFilter | None = None
    ) -> Callable[[], Awaitable[object]]:
        """Give ``tap`` the anti-spoofing rules of ``wanted`` for MAC ``mac`` (``None``: none) and return the undo.

        All or nothing (one nft transaction); the undo puts back the rules of ``before``.

        Raises:
            Unsupported: nftables (or its bridge family) is not available.
        """
        ...

    async def sweep_filters(self) -> list[str]:
        """Remove the anti-spoofing rules of taps that no longer exist; returns their names."""
        ...


class GuestStore(Protocol):
    """One guest's record in the state store, held by this process (``qmpnet.adapters.store`` has the real one)."""

    @property
    def key(self) -> str:
        """A stable name of the guest, the same for every qmpnet process (marks its taps' owners)."""
        ...

    @property
    def record(self) -> GuestRecord:
        """The record as last saved."""
        ...

    @property
    def discarded(self) -> Sequence[DiscardedRecord]:
        """Records found unreadable when the guest was taken, moved aside (the guest is rebuilt from QEMU)."""
        ...

    def save(self, record: GuestRecord) -> None:
        """Write ``record`` before returning (a killed process leaves it behind); it becomes :attr:`record`.

        Raises:
            StoreUnavailable: The state directory cannot be written (nothing was changed).
        """
        ...

    def save_later(self, record: GuestRecord) -> None:
        """Make ``record`` current now, to be written by :meth:`flush_soon` (an outcome after its answer)."""
        ...

    def flush_soon(self) -> None:
        """Soon after the answer (unless a write carries it first), write what is pending (the desired set durably)."""
        ...

    def close(self) -> None:
        """Let other processes have the guest."""
        ...


class GuestOps(Protocol):
    """The operations on one guest, direct (:class:`qmpnet.Guest`) or through a controller (:class:`RemoteGuest`)."""

    async def add_nic(self, spec: NicSpec | Mapping[str, Any], *, verify: Verify = False) -> Nic:
        """Hot-add a NIC (``verify``: wait until the guest shows it)."""
        ...

    async def remove_nic(self, nic_id: str, timeout: float | None = None, *, verify: Verify = False) -> RemoveResult:
        """Hot-remove a NIC (``verify``: wait until the guest no longer shows it)."""
        ...

    async def set_link(self, nic_id: str, up: bool, *, verify: Verify = False) -> Nic:
        """Set a NIC's link (``verify``: wait until the guest's carrier follows)."""
        ...

    async def list_nics(self) -> list[Nic]:
        """List the NICs."""
        ...

    async def models(self) -> list[ModelInfo]:
        """List the NIC models."""
        ...

    async def slots(self) -> Capacity:
        """How many more NICs of each model can be hot-plugged now, and where."""
        ...

    async def update_nic(self, update: NicUpdate | Mapping[str, Any]) -> Nic:
        """Change a NIC live."""
        ...

    async def capture(self, nic_id: str, action: Literal["start", "stop"], file: str | None = None) -> CaptureResult:
        """Start or stop a NIC's live capture."""
        ...
