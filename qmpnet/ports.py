"""Ports: what the guest lane needs from a QEMU monitor, as ``typing.Protocol``s.

The lane (``qmpnet.guest``) never sees ``qemu.qmp``; it sees a :class:`Monitor`. The real one lives in
``qmpnet.qmp``; unit tests pass an in-memory fake. The data shapes a monitor returns are plain frozen dataclasses
already parsed from QEMU's answers, so no raw QMP dictionary reaches the core.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Mapping, Sequence
    from contextlib import AbstractAsyncContextManager

    from qmpnet.model import ModelInfo, Nic, NicSpec, ObservedBackend, RemoveResult, RxFilter
    from qmpnet.placement import PciTopology
    from qmpnet.records import GuestRecord

__all__ = [
    "Connection",
    "EventStream",
    "Flag",
    "GuestOps",
    "GuestStore",
    "HostNetwork",
    "Monitor",
    "NetClient",
    "Observation",
    "PciDevice",
    "QmpEvent",
    "TapHandle",
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
    """A PCI device as QEMU's device tree shows it."""

    id: str | None
    driver: str
    bus: str
    slot: int
    function: int
    mac: str | None = None
    netdev: str | None = None
    host: str | None = None

    @property
    def is_nic(self) -> bool:
        """Whether this is a network device: an emulated NIC (it has a MAC) or an assigned vfio-pci function."""
        return self.mac is not None or self.netdev is not None or self.driver == "vfio-pci"


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
    """A connected QMP monitor as a long-lived owner needs it (``qmpnet.qmp.QmpMonitor`` is one)."""

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


class HostNetwork(Protocol):
    """The host side of bridge, NAT, tap and VFIO backends."""

    async def create_tap(self, bridge: str, *, queues: int, owner: str) -> TapHandle:
        """Make a tap enslaved to ``bridge`` and open its queues.

        Raises:
            NotFound: No such bridge.
            InvalidRequest: ``bridge`` is not a bridge.
        """
        ...

    async def delete_tap(self, name: str) -> None:
        """Delete tap ``name`` if it still exists and is qmpnet's."""
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

    async def prepare_vfio(self, host: str, *, rebind: bool) -> str | None:
        """Check ``host`` can be assigned; with ``rebind`` bind it to vfio-pci and return its original driver.

        Raises:
            NotFound, InvalidRequest, Unsupported: The device, its class or its IOMMU group do not allow it.
        """
        ...

    async def restore_vfio(self, host: str, driver: str) -> None:
        """Give ``host`` back to ``driver`` after removal."""
        ...

    async def sweep_orphans(self, owner_prefix: str, keep: set[str]) -> list[str]:
        """Delete taps made for NICs (owners ``<guest>/<nic>``) under ``owner_prefix`` that are not in ``keep``."""
        ...


class GuestStore(Protocol):
    """One guest's record in the state store, held by this process (``qmpnet.store`` has the real one)."""

    @property
    def key(self) -> str:
        """A stable name of the guest, the same for every qmpnet process (marks its taps' owners)."""
        ...

    @property
    def record(self) -> GuestRecord:
        """The record as last saved."""
        ...

    def save(self, record: GuestRecord) -> None:
        """Write ``record`` durably before returning; it becomes :attr:`record`.

        Raises:
            InvalidRequest: The state directory cannot be written (nothing was changed).
        """
        ...

    def close(self) -> None:
        """Let other processes have the guest."""
        ...


class GuestOps(Protocol):
    """The operations on one guest, direct (:class:`qmpnet.Guest`) or through a controller (:class:`RemoteGuest`)."""

    async def add_nic(self, spec: NicSpec | Mapping[str, Any]) -> Nic:
        """Hot-add a NIC."""
        ...

    async def remove_nic(self, nic_id: str, timeout: float | None = None) -> RemoveResult:
        """Hot-remove a NIC."""
        ...

    async def set_link(self, nic_id: str, up: bool) -> Nic:
        """Set a NIC's link."""
        ...

    async def list_nics(self) -> list[Nic]:
        """List the NICs."""
        ...

    async def models(self) -> list[ModelInfo]:
        """List the NIC models."""
        ...
