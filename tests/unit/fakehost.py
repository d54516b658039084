"""A stateful in-memory host side for the live-change tests: taps on bridges with VLANs and shaping.

:class:`PortsHost` implements :class:`qmpnet.core.ports.HostNetwork`. Its taps remember their bridge, VLANs and shape;
every change returns an undo that restores the previous value, the way
:class:`qmpnet.adapters.hostnet.host.HostNet` does,
so a test can check that a failed update leaves every tap exactly as it was. ``errors`` makes a named method fail.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qmpnet.core.ports import HostProcess, TapPort
from qmpnet.errors import InvalidRequest, NotFound, QmpnetError, Unsupported

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from qmpnet.core.model import PasstBackend, Shape, Vlan
    from qmpnet.core.nic_filter import NicFilter

__all__ = ["FakePort", "PortsHost"]


@dataclass
class FakePort:
    bridge: str | None
    vlan: Vlan | None = None
    shape: Shape | None = None
    owner: str | None = None
    mtu: int = 1500
    filter: NicFilter | None = None


@dataclass
class PortsHost:
    """Bridges, NAT networks (``network -> bridge``) and taps; records calls, fails those named in ``errors``."""

    bridges: set[str] = field(default_factory=lambda: {"br-a", "br-b"})
    networks: dict[str, str] = field(default_factory=lambda: {"lab": "qmpnat-lab"})
    taps: dict[str, FakePort] = field(default_factory=dict)
    filtering: bool = True
    errors: dict[str, QmpnetError] = field(default_factory=dict)
    failing_undos: set[str] = field(default_factory=set)
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    bridge_mtus: dict[str, int] = field(default_factory=dict)
    processes: dict[int, int] = field(default_factory=dict)  # live pid -> start time

    def _call(self, *call: Any) -> None:
        self.calls.append(call)
        if call[0] in self.errors:
            raise self.errors[call[0]]

    @property
    def actions(self) -> list[str]:
        return [call[0] for call in self.calls]

    def state(self) -> dict[str, tuple[str | None, Vlan | None, Shape | None]]:
        return {name: (port.bridge, port.vlan, port.shape) for name, port in self.taps.items()}

    def _port(self, tap: str) -> FakePort:
        if tap not in self.taps:
            raise NotFound(f"id: the NIC's tap {tap} no longer exists on this host", field="id")
        return self.taps[tap]

    # the hot-add side, unused here
    async def create_tap(self, bridge: str, *, queues: int, owner: str, mtu: int | None = None) -> Any:
        raise NotImplementedError

    async def bridge_mtu(self, bridge: str) -> int:
        return self.bridge_mtus.get(bridge, 1500)
    async def create_macvtap(self, link: str, *, mode: str, mac: str, queues: int, owner: str) -> Any:
        raise NotImplementedError

    async def delete_tap(self, name: str) -> None:
        self._call("delete_tap", name)

    async def nat_bridge(self, network: str) -> str:
        self._call("nat_bridge", network)
        if network not in self.networks:
            raise NotFound(f"nic.backend.network: no NAT network {network!r}", field="nic.backend.network")
        self.bridges.add(self.networks[network])
        return self.networks[network]

    async def check_tap(self, ifname: str) -> None:
        self._call("check_tap", ifname)

    def vhost(self) -> bool:
        return False

    async def prepare_vfio(
        self, host: str, *, rebind: bool, taking: Callable[[str], None] | None = None
    ) -> str | None:
        raise NotImplementedError

    async def restore_vfio(self, host: str, driver: str) -> None:
        self._call("restore_vfio", host, driver)

    async def sweep_orphans(self, owner_prefix: str, keep: set[str]) -> list[str]:
        return []

    async def start_passt(self, socket: str, backend: PasstBackend) -> HostProcess:
        raise NotImplementedError

    def process(self, pid: int) -> HostProcess | None:
        started = self.processes.get(pid)
        return HostProcess(pid, started) if started is not None else None

    def running(self, process: HostProcess) -> bool:
        return self.processes.get(process.pid) == process.started

    async def stop_passt(self, socket: str, process: HostProcess | None) -> None:
        self._call("stop_passt", socket, process)

    async def sweep_passt(self, directory: str, keep: set[str]) -> list[str]:
        return []

    # the live side
    async def find_tap(self, owner: str, *, pid: int | None = None, fd: int | None = None) -> str | None:
        self._call("find_tap", owner, pid, fd)
        return next((name for name, port in self.taps.items() if port.owner in (owner, f"pid {pid} fd {fd}")), None)

    async def tap_port(self, tap: str) -> TapPort:
        self._call("tap_port", tap)
        port = self._port(tap)
        network = next((n for n, b in self.networks.items() if b == port.bridge), None)
        return TapPort(tap, port.bridge, network, port.vlan, port.shape)

    async def move_tap(self, tap: str, bridge: str, *, field: str) -> Callable[[], Awaitable[object]]:
        self._call("move_tap", tap, bridge, field)
        port = self._port(tap)
        if bridge not in self.bridges:
            raise NotFound(f"{field}: no bridge {bridge!r} on this host", field=field)
        if bridge.startswith("eth"):
            raise InvalidRequest(f"{field}: {bridge!r} is not a Linux bridge", field=field)
        before = (port.bridge, port.vlan)
        port.bridge, port.vlan = bridge, None

        async def undo() -> None:
            self.calls.append(("undo move_tap", tap, before[0]))
            if "move_tap" in self.failing_undos:
                raise QmpnetError(f"put tap {tap} back on its bridge: Device or resource busy")
            port.bridge, port.vlan = before

        return undo

    async def set_vlan(self, tap: str, vlan: Vlan | None) -> Callable[[], Awaitable[object]]:
        self._call("set_vlan", tap, vlan)
        port = self._port(tap)
        if not self.filtering:
            raise Unsupported("update.vlan: bridge does not filter VLANs", field="update.vlan")
        before, port.vlan = port.vlan, vlan

        async def undo() -> None:
            self.calls.append(("undo set_vlan", tap, before))
            port.vlan = before

        return undo

    async def set_mtu(self, tap: str, mtu: int, *, field: str) -> Callable[[], Awaitable[object]]:
        self._call("set_mtu", tap, mtu, field)
        port = self._port(tap)
        if port.bridge is not None and mtu > self.bridge_mtus.get(port.bridge, 1500):
            raise InvalidRequest(f"{field}: {mtu} is larger than the MTU of bridge {port.bridge}", field=field)
        before, port.mtu = port.mtu, mtu

        async def undo() -> None:
            self.calls.append(("undo set_mtu", tap, before))
            port.mtu = before

        return undo

    async def set_shape(self, tap: str, shape: Shape | None) -> Callable[[], Awaitable[object]]:
        self._call("set_shape", tap, shape)
        port = self._port(tap)
        before, port.shape = port.shape, shape

        async def undo() -> None:
            self.calls.append(("undo set_shape", tap, before))
            port.shape = before

        return undo

    async def set_filter(
        self, tap: str, mac: str, wanted: NicFilter | None, *, before: NicFilter | None = None
    ) -> Callable[[], Awaitable[object]]:
        self._call("set_filter", tap, mac, wanted)
        port = self._port(tap)
        port.filter = wanted

        async def undo() -> None:
            self.calls.append(("undo set_filter", tap, before))
            port.filter = before

        return undo

    async def sweep_filters(self) -> list[str]:
        self._call("sweep_filters")
        return []
