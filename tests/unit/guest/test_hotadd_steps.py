"""Bridge, NAT, tap and VFIO backends in the guest lane, with a fake monitor and a fake host side.

The lane's host work (a tap on a bridge, a NAT network brought up, a PCI function checked or rebound) happens
through the :class:`qmpnet.core.ports.HostNetwork` port; here a recording fake stands in for it, so every test can say
exactly which QMP commands were sent, in which order, with which arguments, and which host actions ran and were
undone. The pure argument shapes (``netdev_arguments``, ``plan_add``) and the policy checks are tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import pytest
from fakemonitor import RecordingMonitor, pc_observation

from qmpnet.adapters.store import MemoryGuestStore
from qmpnet.core.desired_diff import parse_desired
from qmpnet.core.hotadd_plan import PlanContext, fd_names, netdev_arguments, plan_add
from qmpnet.core.inventory import Inventory
from qmpnet.core.model import NicSpec, ObservedBackend, parse_nic_spec
from qmpnet.core.policy import Policy, check_spec
from qmpnet.core.ports import HostProcess, NetClient, Observation, PciDevice, TapPort
from qmpnet.core.records import GuestRecord, HostHold, NicRecord
from qmpnet.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    QmpCommandError,
    QmpnetError,
    Unsupported,
)
from qmpnet.guest.apply_desired import apply_desired
from qmpnet.guest.guest import Guest
from qmpnet.guest.host_release import release_host_side
from qmpnet.settings import QmpSettings, Settings

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    from qmpnet.core.model import PasstBackend, Shape, Vlan
    from qmpnet.core.nic_filter import NicFilter

HOSTILE_NAMES = [
    "br/0",  # a path
    "../br0",
    "..",
    ".",
    "a23456789012345x",  # 16 bytes: one over IFNAMSIZ-1
    "br0;reboot",
    "$(x)",
    "`id`",
    "br 0",
    "br0|cat",
    "br0&",
    "br0\n",
    "",
]
# The captured pc guest: pci.0 slots 0-3 and 6 are taken (host bridge, PIIX, v1, e1...), slot 4 is the first free.
FIRST_FREE = "04.0"


@dataclass
class FakeTap:
    """A tap as the host side hands it over: a name and one (pretend) fd per queue."""

    name: str
    queue_fds: list[int]
    closed: bool = False

    @property
    def fds(self) -> tuple[int, ...]:
        return () if self.closed else tuple(self.queue_fds)

    def close_fds(self) -> None:
        self.closed = True


class Killed(Exception):
    """The process dying at this point (nothing after it runs in the lane)."""


@dataclass
class FakeHost:
    """A :class:`qmpnet.core.ports.HostNetwork` that records every call and fails the ones listed in ``errors``."""

    use_vhost: bool = False
    original_driver: str | None = "e1000e"
    die_at_rebind: bool = False  # raise Killed with the function rebound, as a SIGKILL right after it
    errors: dict[str, QmpnetError] = field(default_factory=dict)
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    taps: list[FakeTap] = field(default_factory=list)
    bridge_mtus: dict[str, int] = field(default_factory=dict)

    def _call(self, *call: Any) -> None:
        self.calls.append(call)
        if call[0] in self.errors:
            raise self.errors[call[0]]

    @property
    def actions(self) -> list[str]:
        return [call[0] for call in self.calls]

    async def create_tap(self, bridge: str, *, queues: int, owner: str, mtu: int | None = None) -> FakeTap:
        self._call("create_tap", bridge, queues, owner, *([mtu] if mtu is not None else []))
        tap = FakeTap(f"vnet{len(self.taps)}", [100 + i for i in range(queues)])
        self.taps.append(tap)
        return tap

    async def bridge_mtu(self, bridge: str) -> int:  # a read: not in calls
        return self.bridge_mtus.get(bridge, 1500)

    async def set_mtu(self, tap: str, mtu: int, *, field: str) -> Callable[[], Awaitable[object]]:
        self._call("set_mtu", tap, mtu, field)

        async def undo() -> None:
            self.calls.append(("undo set_mtu", tap))

        return undo

    async def create_macvtap(self, link: str, *, mode: str, mac: str, queues: int, owner: str) -> FakeTap:
        self._call("create_macvtap", link, mode, mac, queues, owner)
        tap = FakeTap(f"vnet{len(self.taps)}", [100 + i for i in range(queues)])
        self.taps.append(tap)
        return tap

    async def delete_tap(self, name: str) -> None:
        self._call("delete_tap", name)

    async def nat_bridge(self, network: str) -> str:
        self._call("nat_bridge", network)
        return f"qmpnat-{network}"

    async def check_tap(self, ifname: str) -> None:
        self._call("check_tap", ifname)

    def vhost(self) -> bool:
        return self.use_vhost

    async def prepare_vfio(
        self, host: str, *, rebind: bool, taking: Callable[[str], None] | None = None
    ) -> str | None:
        self._call("prepare_vfio", host, rebind)
        if not rebind:
            return None
        if taking is not None:
            taking(self.original_driver or "")
        if self.die_at_rebind:
            raise Killed  # the process dies with the function rebound: what it wrote is all a restart has
        return self.original_driver

    async def restore_vfio(self, host: str, driver: str) -> None:
        self._call("restore_vfio", host, driver)

    async def sweep_orphans(self, owner_prefix: str, keep: set[str]) -> list[str]:
        self._call("sweep_orphans", owner_prefix, sorted(keep))
        return []

    async def start_passt(self, socket: str, backend: PasstBackend) -> HostProcess:
        self._call("start_passt", socket, backend.ports)
        return HostProcess(4242, 77)

    def process(self, pid: int) -> HostProcess | None:
        return None

    def running(self, process: HostProcess) -> bool:
        return False

    async def stop_passt(self, socket: str, process: HostProcess | None) -> None:
        self._call("stop_passt", socket, process)

    async def sweep_passt(self, directory: str, keep: set[str]) -> list[str]:
        self._call("sweep_passt", directory, sorted(keep))
        return []

    # The live-change side (tests/unit/test_update.py has a stateful fake for it).
    async def find_tap(self, owner: str, *, pid: int | None = None, fd: int | None = None) -> str | None:
        self._call("find_tap", owner)
        return None

    async def tap_port(self, tap: str) -> TapPort:
        self._call("tap_port", tap)
        return TapPort(tap)

    async def move_tap(self, tap: str, bridge: str, *, field: str) -> Callable[[], Awaitable[object]]:
        self._call("move_tap", tap, bridge)
        return _nothing

    async def set_vlan(self, tap: str, vlan: Vlan | None) -> Callable[[], Awaitable[object]]:
        self._call("set_vlan", tap, vlan)
        return _nothing

    async def set_shape(self, tap: str, shape: Shape | None) -> Callable[[], Awaitable[object]]:
        self._call("set_shape", tap, shape)
        return _nothing

    async def set_filter(
        self, tap: str, mac: str, wanted: NicFilter | None, *, before: NicFilter | None = None
    ) -> Callable[[], Awaitable[object]]:
        self._call("set_filter", tap, mac, wanted)

        async def undo() -> None:
            self.calls.append(("undo set_filter", tap, before))

        return undo

    async def sweep_filters(self) -> list[str]:
        self._call("sweep_filters")
        return []


async def _nothing() -> None:
    pass


class AckingMonitor(RecordingMonitor):
    """A recording monitor whose guest acknowledges every ``device_del`` the way virtio-net does (two events)."""

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> object:
        answer = await super().execute(command, arguments)
        if command == "device_del":
            device = str((arguments or {})["id"])
            self.emit("DEVICE_DELETED", {"path": f"/machine/peripheral/{device}/virtio-backend"})
            self.emit("DEVICE_DELETED", {"device": device, "path": f"/machine/peripheral/{device}"})
        return answer


def with_tap_nic(obs: Observation, nic_id: str, mac: str | None) -> Observation:
    """``obs`` plus a virtio NIC ``nic_id`` whose netdev is a tap QEMU got as an fd (as ``info network`` shows it)."""
    device = PciDevice(nic_id, "virtio-net-pci", "pci.0", 4, 0, mac=mac, netdev=f"{nic_id}.net")
    client = NetClient(f"{nic_id}.net", ObservedBackend(type="tap", options={"fd": "23"}))
    return replace(obs, devices=(*obs.devices, device), device_ids=obs.device_ids | {nic_id},
                   netclients={**obs.netclients, client.name: client})


def lane(
    host: FakeHost | None, policy: Policy | None = None, monitor: RecordingMonitor | None = None
) -> tuple[Guest, RecordingMonitor]:
    monitor = monitor or RecordingMonitor()
    settings = Settings(policy=policy or Policy(), qmp=QmpSettings(unplug_timeout=1.0, rollback_unplug_timeout=1.0))
    return Guest(monitor, name="vm1", settings=settings, host=host), monitor


def failing(command: str, message: str = "boom") -> QmpCommandError:
    return QmpCommandError(f"{command}: {message}", qmp_class="GenericError", command=command)


def arguments(monitor: RecordingMonitor, command: str) -> dict[str, object]:
    [found] = [args for name, args in monitor.executed if name == command]
    return found


# ----------------------------------------------------------------------------------------- argument shapes


def _netdev(spec: Mapping[str, Any], *, vhost: bool = False) -> dict[str, object]:
    return netdev_arguments("n.net", parse_nic_spec(spec), vhost=vhost)


@pytest.mark.parametrize(
    ("spec", "vhost", "expected"),
    [
        ({"backend": {"type": "bridge", "bridge": "br0"}}, False,
         {"id": "n.net", "type": "tap", "fd": "n.net.fd0", "vhost": False}),
        ({"backend": {"type": "bridge", "bridge": "br0"}}, True,
         {"id": "n.net", "type": "tap", "fd": "n.net.fd0", "vhost": True}),
        ({"queues": 3, "backend": {"type": "bridge", "bridge": "br0"}}, True,
         {"id": "n.net", "type": "tap", "fds": "n.net.fd0:n.net.fd1:n.net.fd2", "vhost": True}),
        ({"backend": {"type": "nat", "network": "lab"}}, False,
         {"id": "n.net", "type": "tap", "fd": "n.net.fd0", "vhost": False}),
        ({"backend": {"type": "bridge", "bridge": "br0", "helper": True}}, False,
         {"id": "n.net", "type": "bridge", "br": "br0"}),
        ({"backend": {"type": "tap", "ifname": "mytap"}}, False,
         {"id": "n.net", "type": "tap", "ifname": "mytap", "script": "no", "downscript": "no"}),
        ({"queues": 4, "backend": {"type": "tap", "ifname": "mytap"}}, True,
         {"id": "n.net", "type": "tap", "ifname": "mytap", "script": "no", "downscript": "no", "queues": 4}),
    ],
    ids=["bridge", "bridge-vhost", "bridge-mq", "nat", "bridge-helper", "tap", "tap-mq"],
)
def test_netdev_arguments_of_host_backends(spec: dict[str, Any], vhost: bool, expected: dict[str, object]) -> None:
    assert _netdev(spec, vhost=vhost) == expected


def test_tap_backend_never_has_a_script_or_an_fd() -> None:
    args = _netdev({"backend": {"type": "tap", "ifname": "mytap"}}, vhost=True)
    assert (args["script"], args["downscript"]) == ("no", "no")
    assert not {"fd", "fds", "vhost", "helper", "br"} & set(args)


def test_fd_names_are_one_per_queue() -> None:
    assert fd_names("virtio0.net", 1) == ("virtio0.net.fd0",)
    assert fd_names("x.net", 3) == ("x.net.fd0", "x.net.fd1", "x.net.fd2")


def _view() -> PlanContext:
    return Inventory.from_observation(pc_observation(), {}, set()).view()


def test_multiqueue_bridge_plan_has_mq_and_vectors() -> None:
    plan = plan_add(parse_nic_spec({"id": "m", "queues": 4, "backend": {"type": "bridge", "bridge": "br0"}}), _view())
    netdev, device = (step.call for step in plan.steps)
    assert netdev.arguments["fds"] == "m.net.fd0:m.net.fd1:m.net.fd2:m.net.fd3"
    assert "fd" not in netdev.arguments
    assert device.arguments["mq"] is True
    assert device.arguments["vectors"] == 2 * 4 + 2


def test_explicit_vectors_win_over_the_multiqueue_default() -> None:
    spec = parse_nic_spec({"id": "m", "queues": 2, "vectors": 16, "backend": {"type": "bridge", "bridge": "br0"}})
    device = plan_add(spec, _view()).steps[1].call
    assert (device.arguments["mq"], device.arguments["vectors"]) == (True, 16)


def test_vfio_plan_is_one_device_add_without_netdev() -> None:
    plan = plan_add(parse_nic_spec({"id": "h0", "backend": {"type": "vfio", "host": "03:00.0"}}), _view())
    [step] = plan.steps
    assert step.call.command == "device_add"
    assert step.call.arguments == {"driver": "vfio-pci", "id": "h0", "host": "0000:03:00.0", "bus": "pci.0",
                                   "addr": FIRST_FREE}
    assert (plan.netdev_id, plan.mac) == (None, None)
    assert step.undo is not None
    assert step.undo.command == "device_del"


@pytest.mark.parametrize("option", [{"model": "e1000"}, {"mac": "52:54:00:00:00:99"}, {"queues": 2}, {"link": "down"}])
def test_vfio_refuses_emulation_options(option: dict[str, object]) -> None:
    name = next(iter(option))
    with pytest.raises(InvalidRequest) as caught:
        parse_nic_spec({"backend": {"type": "vfio", "host": "03:00.0"}, **option})
    assert caught.value.field == f"nic.{name}"


def test_the_same_host_function_twice_is_a_conflict() -> None:
    view = replace(_view(), vfio_hosts={"0000:03:00.0"})
    with pytest.raises(Conflict) as caught:
        plan_add(parse_nic_spec({"backend": {"type": "vfio", "host": "03:00.0"}}), view)
    assert caught.value.field == "nic.backend.host"


def test_a_vfio_spec_read_back_from_the_store_is_valid() -> None:
    """The state store writes every field, defaults included: reading a vfio spec back must not be a refusal."""
    spec = parse_nic_spec({"id": "h0", "backend": {"type": "vfio", "host": "03:00.0", "rebind": True}})
    assert NicSpec.model_validate_json(spec.model_dump_json()) == spec


# ----------------------------------------------------------------------------------------- policy, pure checks

BRIDGE = NicSpec.model_validate({"backend": {"type": "bridge", "bridge": "br0"}})
HELPER = NicSpec.model_validate({"backend": {"type": "bridge", "bridge": "br0", "helper": True}})
TAP = NicSpec.model_validate({"backend": {"type": "tap", "ifname": "mytap"}})
VFIO = NicSpec.model_validate({"backend": {"type": "vfio", "host": "03:00.0"}})
NAT = NicSpec.model_validate({"backend": {"type": "nat", "network": "default"}})


@pytest.mark.parametrize(
    ("spec", "policy", "field_name"),
    [
        (BRIDGE, Policy(allowed_bridges=["br9"]), "nic.backend.bridge"),
        (BRIDGE, Policy(allowed_bridges=[]), "nic.backend.bridge"),
        (HELPER, Policy(), "nic.backend.helper"),
        (HELPER, Policy(allowed_bridges=["br0"]), "nic.backend.helper"),
        (TAP, Policy(allowed_taps=["other"]), "nic.backend.ifname"),
        (VFIO, Policy(allowed_vfio_hosts=["0000:04:00.0"]), "nic.backend.host"),
    ],
    ids=["bridge-unlisted", "bridge-none", "helper-default", "helper-not-allowed", "tap", "vfio"],
)
def test_policy_refuses(spec: NicSpec, policy: Policy, field_name: str) -> None:
    with pytest.raises(Forbidden) as caught:
        check_spec(spec, policy)
    assert caught.value.code == "forbidden"
    assert caught.value.field == field_name
    assert "policy." in caught.value.message  # says which setting refuses it


@pytest.mark.parametrize(
    ("spec", "policy"),
    [
        (BRIDGE, Policy()),
        (BRIDGE, Policy(allowed_bridges=["br0", "br1"])),
        (HELPER, Policy(allow_bridge_helper=True)),
        (TAP, Policy()),
        (TAP, Policy(allowed_taps=["mytap"])),
        (VFIO, Policy()),
        (VFIO, Policy(allowed_vfio_hosts=["0000:03:00.0"])),  # the spec's short form is normalized first
        (NAT, Policy(allowed_bridges=[])),  # a NAT network is the operator's own: not a bridge a caller picks
    ],
    ids=["bridge-any", "bridge-listed", "helper-allowed", "tap-any", "tap-listed", "vfio-any", "vfio-listed", "nat"],
)
def test_policy_allows(spec: NicSpec, policy: Policy) -> None:
    check_spec(spec, policy)


# ----------------------------------------------------------------------------------------- hostile names


@pytest.mark.parametrize("name", HOSTILE_NAMES)
@pytest.mark.parametrize(("backend", "key"), [("bridge", "bridge"), ("tap", "ifname")])
async def test_hostile_names_are_refused_before_anything_happens(backend: str, key: str, name: str) -> None:
    host = FakeHost()
    guest, monitor = lane(host)
    with pytest.raises(InvalidRequest) as caught:
        await guest.add_nic({"backend": {"type": backend, key: name}})
    assert caught.value.code == "invalid_request"
    assert caught.value.field == f"nic.backend.{key}"
    assert caught.value.message.startswith(f"nic.backend.{key}: ")
    assert monitor.executed == []
    assert monitor.observed == 0
    assert host.calls == []


@pytest.mark.parametrize("name", ["../x", "a b", "x;y", "$(x)", "n" * 33])
async def test_hostile_network_names_are_refused(name: str) -> None:
    host = FakeHost()
    guest, monitor = lane(host)
    with pytest.raises(InvalidRequest) as caught:
        await guest.add_nic({"backend": {"type": "nat", "network": name}})
    assert caught.value.field == "nic.backend.network"
    assert (monitor.executed, host.calls) == ([], [])


# ----------------------------------------------------------------------------------------- bridge in the lane


async def test_bridge_nic_passes_the_tap_fd_then_adds_netdev_and_device() -> None:
    host = FakeHost()
    guest, monitor = lane(host)
    nic = await guest.add_nic({"id": "b0", "mac": "52:54:00:bb:00:01", "backend": {"type": "bridge", "bridge": "br0"}})
    assert host.calls == [("create_tap", "br0", 1, "vm1/b0")]
    assert monitor.executed == [
        ("getfd", {"fdname": "b0.net.fd0"}),
        ("netdev_add", {"id": "b0.net", "type": "tap", "fd": "b0.net.fd0", "vhost": False}),
        ("device_add", {"driver": "virtio-net-pci", "id": "b0", "netdev": "b0.net", "mac": "52:54:00:bb:00:01",
                        "bus": "pci.0", "addr": FIRST_FREE}),
    ]
    assert host.taps[0].closed  # qmpnet's copies are closed once QEMU has its own
    assert nic.backend is not None
    assert nic.backend.type == "bridge"
    assert nic.backend.options == {"bridge": "br0", "tap": "vnet0"}


async def test_vhost_is_asked_for_when_the_host_has_it() -> None:
    guest, monitor = lane(FakeHost(use_vhost=True))
    await guest.add_nic({"id": "b0", "backend": {"type": "bridge", "bridge": "br0"}})
    assert arguments(monitor, "netdev_add")["vhost"] is True


async def test_multiqueue_bridge_passes_one_fd_per_queue() -> None:
    host = FakeHost(use_vhost=True)
    guest, monitor = lane(host)
    await guest.add_nic({"id": "mq", "queues": 3, "backend": {"type": "bridge", "bridge": "br0"}})
    assert host.calls == [("create_tap", "br0", 3, "vm1/mq")]
    assert [args for name, args in monitor.executed if name == "getfd"] == [
        {"fdname": "mq.net.fd0"}, {"fdname": "mq.net.fd1"}, {"fdname": "mq.net.fd2"}
    ]
    assert arguments(monitor, "netdev_add") == {
        "id": "mq.net", "type": "tap", "fds": "mq.net.fd0:mq.net.fd1:mq.net.fd2", "vhost": True
    }
    device = arguments(monitor, "device_add")
    assert (device["mq"], device["vectors"]) == (True, 8)


async def test_bridge_helper_makes_no_tap_and_passes_no_fd() -> None:
    host = FakeHost()
    guest, monitor = lane(host, Policy(allow_bridge_helper=True))
    await guest.add_nic({"id": "h", "backend": {"type": "bridge", "bridge": "br0", "helper": True}})
    assert host.calls == []
    assert monitor.commands == ["netdev_add", "device_add"]
    assert arguments(monitor, "netdev_add") == {"id": "h.net", "type": "bridge", "br": "br0"}


async def test_bridge_not_allowed_by_policy_is_forbidden_and_nothing_happens() -> None:
    host = FakeHost()
    guest, monitor = lane(host, Policy(allowed_bridges=["br9"]))
    with pytest.raises(Forbidden) as caught:
        await guest.add_nic({"backend": {"type": "bridge", "bridge": "br0"}})
    assert caught.value.field == "nic.backend.bridge"
    assert "br9" in caught.value.message
    assert (monitor.executed, monitor.observed, host.calls) == ([], 0, [])


async def test_bridge_helper_is_forbidden_by_default() -> None:
    host = FakeHost()
    guest, monitor = lane(host)
    with pytest.raises(Forbidden) as caught:
        await guest.add_nic({"backend": {"type": "bridge", "bridge": "br0", "helper": True}})
    assert caught.value.field == "nic.backend.helper"
    assert (monitor.executed, host.calls) == ([], [])


@pytest.mark.parametrize(
    "error",
    [
        NotFound("nic.backend.bridge: no bridge 'br7'", field="nic.backend.bridge"),
        InvalidRequest("nic.backend.bridge: eth0 is not a bridge", field="nic.backend.bridge"),
    ],
    ids=["unknown", "not-a-bridge"],
)
async def test_host_refusing_the_bridge_sends_nothing(error: QmpnetError) -> None:
    host = FakeHost(errors={"create_tap": error})
    guest, monitor = lane(host)
    with pytest.raises(type(error)) as caught:
        await guest.add_nic({"backend": {"type": "bridge", "bridge": "br7"}})
    assert caught.value.field == "nic.backend.bridge"
    assert monitor.commands == []  # the guest was read (to plan), but nothing was changed
    assert host.actions == ["create_tap"]


async def test_failed_device_add_deletes_netdev_closes_fds_and_deletes_the_tap() -> None:
    host = FakeHost()
    guest, monitor = lane(host)
    monitor.errors["device_add"] = failing("device_add", "PCI: slot 4 function 0 not available")
    with pytest.raises(QmpCommandError) as caught:
        await guest.add_nic({"id": "b0", "backend": {"type": "bridge", "bridge": "br0"}})
    assert caught.value.code == "qmp_error"
    assert monitor.executed == [
        ("getfd", {"fdname": "b0.net.fd0"}),
        ("netdev_add", {"id": "b0.net", "type": "tap", "fd": "b0.net.fd0", "vhost": False}),
        ("device_add", arguments(monitor, "device_add")),
        ("netdev_del", {"id": "b0.net"}),  # the netdev consumed the fd: deleting it closes QEMU's copy
        ("closefd", {"fdname": "b0.net.fd0"}),  # harmless if consumed; needed if netdev_add never ran
    ]
    assert host.actions == ["create_tap", "delete_tap"]
    assert host.calls[-1] == ("delete_tap", "vnet0")
    assert host.taps[0].closed
    assert "b0" not in {n.id for n in await guest.list_nics()}


async def test_failed_netdev_add_closes_the_passed_fds_and_deletes_the_tap() -> None:
    host = FakeHost()
    guest, monitor = lane(host)
    monitor.errors["netdev_add"] = failing("netdev_add")
    with pytest.raises(QmpCommandError):
        await guest.add_nic({"id": "b0", "queues": 2, "backend": {"type": "bridge", "bridge": "br0"}})
    assert monitor.commands == ["getfd", "getfd", "netdev_add", "closefd", "closefd"]
    assert [args for name, args in monitor.executed if name == "closefd"] == [
        {"fdname": "b0.net.fd0"}, {"fdname": "b0.net.fd1"}
    ]
    assert host.actions == ["create_tap", "delete_tap"]


async def test_failed_getfd_closes_our_fds_and_deletes_the_tap() -> None:
    host = FakeHost()
    guest, monitor = lane(host)
    monitor.errors["getfd"] = failing("getfd", "No file descriptor supplied via SCM_RIGHTS")
    with pytest.raises(QmpCommandError):
        await guest.add_nic({"backend": {"type": "bridge", "bridge": "br0"}})
    assert "netdev_add" not in monitor.commands
    assert host.actions == ["create_tap", "delete_tap"]
    assert host.taps[0].closed


async def test_removal_deletes_netdev_after_device_deleted_then_the_tap() -> None:
    host = FakeHost()
    guest, monitor = lane(host, monitor=AckingMonitor())
    async with guest:
        await guest.add_nic({"id": "b0", "backend": {"type": "bridge", "bridge": "br0"}})
        monitor.executed.clear()
        result = await guest.remove_nic("b0")
    assert result.state == "removed"
    assert monitor.executed == [("device_del", {"id": "b0"}), ("netdev_del", {"id": "b0.net"})]
    assert host.calls[-1] == ("delete_tap", "vnet0")


async def test_list_nics_shows_the_bridge_and_tap_of_a_bridge_nic() -> None:
    guest, monitor = lane(FakeHost())
    nic = await guest.add_nic({"id": "b0", "backend": {"type": "bridge", "bridge": "br0"}})
    monitor.observation = with_tap_nic(monitor.observation, nic.id, nic.mac)
    listed = {n.id: n for n in await guest.list_nics()}
    backend = listed["b0"].backend
    assert backend is not None
    assert (backend.type, backend.options) == ("bridge", {"bridge": "br0", "tap": "vnet0"})


async def test_without_a_host_side_bridge_is_unsupported() -> None:
    guest, monitor = lane(None)
    with pytest.raises(Unsupported) as caught:
        await guest.add_nic({"backend": {"type": "bridge", "bridge": "br0"}})
    assert caught.value.field == "nic.backend.type"
    assert monitor.commands == []


# ----------------------------------------------------------------------------------------- NAT in the lane


async def test_nat_nic_brings_the_network_up_and_uses_its_bridge() -> None:
    host = FakeHost()
    guest, monitor = lane(host)
    nic = await guest.add_nic({"id": "n0", "backend": {"type": "nat", "network": "lab"}})
    assert host.calls == [("nat_bridge", "lab"), ("create_tap", "qmpnat-lab", 1, "vm1/n0")]
    assert monitor.commands == ["getfd", "netdev_add", "device_add"]
    assert nic.backend is not None
    assert nic.backend.type == "nat"
    assert nic.backend.options == {"bridge": "qmpnat-lab", "tap": "vnet0", "network": "lab"}


async def test_unknown_nat_network_is_not_found_and_nothing_is_sent() -> None:
    host = FakeHost(errors={"nat_bridge": NotFound("nic.backend.network: no NAT network 'x'",
                                                   field="nic.backend.network")})
    guest, monitor = lane(host)
    with pytest.raises(NotFound) as caught:
        await guest.add_nic({"backend": {"type": "nat", "network": "x"}})
    assert caught.value.field == "nic.backend.network"
    assert monitor.commands == []
    assert host.actions == ["nat_bridge"]


async def test_list_nics_reports_a_nat_nic_as_nat() -> None:
    guest, monitor = lane(FakeHost())
    nic = await guest.add_nic({"id": "n0", "backend": {"type": "nat", "network": "lab"}})
    monitor.observation = with_tap_nic(monitor.observation, nic.id, nic.mac)
    listed = {n.id: n for n in await guest.list_nics()}
    backend = listed["n0"].backend
    assert backend is not None
    assert (backend.type, backend.options) == ("nat", {"network": "lab", "bridge": "qmpnat-lab", "tap": "vnet0"})


# ----------------------------------------------------------------------------------------- tap in the lane


async def test_tap_backend_checks_the_tap_and_opens_it_by_name() -> None:
    host = FakeHost()
    guest, monitor = lane(host)
    await guest.add_nic({"id": "t0", "queues": 2, "backend": {"type": "tap", "ifname": "mytap"}})
    assert host.calls == [("check_tap", "mytap")]
    assert monitor.commands == ["netdev_add", "device_add"]
    assert arguments(monitor, "netdev_add") == {"id": "t0.net", "type": "tap", "ifname": "mytap", "script": "no",
                                                "downscript": "no", "queues": 2}
    assert arguments(monitor, "device_add")["mq"] is True


@pytest.mark.parametrize(
    "error",
    [
        NotFound("nic.backend.ifname: no tap 'mytap'", field="nic.backend.ifname"),
        Conflict("nic.backend.ifname: mytap is already held", field="nic.backend.ifname"),
        InvalidRequest("nic.backend.ifname: mytap is not a tap", field="nic.backend.ifname"),
    ],
    ids=["missing", "held", "not-a-tap"],
)
async def test_a_tap_the_host_refuses_sends_nothing(error: QmpnetError) -> None:
    guest, monitor = lane(FakeHost(errors={"check_tap": error}))
    with pytest.raises(type(error)):
        await guest.add_nic({"backend": {"type": "tap", "ifname": "mytap"}})
    assert monitor.commands == []


async def test_tap_not_allowed_by_policy_is_forbidden() -> None:
    host = FakeHost()
    guest, monitor = lane(host, Policy(allowed_taps=["tap9"]))
    with pytest.raises(Forbidden) as caught:
        await guest.add_nic({"backend": {"type": "tap", "ifname": "mytap"}})
    assert caught.value.field == "nic.backend.ifname"
    assert (monitor.executed, host.calls) == ([], [])


# ----------------------------------------------------------------------------------------- VFIO in the lane


async def test_vfio_nic_is_one_device_add_after_the_host_checks() -> None:
    host = FakeHost()
    guest, monitor = lane(host)
    nic = await guest.add_nic({"id": "h0", "backend": {"type": "vfio", "host": "03:00.0"}})
    assert host.calls == [("prepare_vfio", "0000:03:00.0", False)]
    assert monitor.executed == [
        ("device_add", {"driver": "vfio-pci", "id": "h0", "host": "0000:03:00.0", "bus": "pci.0", "addr": FIRST_FREE})
    ]
    assert nic.model == "vfio-pci"
    assert nic.netdev is None


async def test_vfio_rebind_is_undone_when_device_add_fails() -> None:
    host = FakeHost(original_driver="e1000e")
    guest, monitor = lane(host)
    monitor.errors["device_add"] = failing("device_add", "vfio 0000:03:00.0: no such host device")
    with pytest.raises(QmpCommandError):
        await guest.add_nic({"backend": {"type": "vfio", "host": "0000:03:00.0", "rebind": True}})
    assert monitor.commands == ["device_add"]
    assert host.calls == [("prepare_vfio", "0000:03:00.0", True), ("restore_vfio", "0000:03:00.0", "e1000e")]


async def test_a_process_killed_right_after_the_rebind_leaves_a_record_that_gives_the_function_back() -> None:
    host = FakeHost(original_driver="ixgbe", die_at_rebind=True)
    store = MemoryGuestStore(GuestRecord(address="vm1", name="vm1"), key="vm1")
    guest = Guest(RecordingMonitor(), name="vm1", settings=Settings(), host=host, store=store)
    with pytest.raises(Killed):
        await guest.add_nic({"id": "h0", "backend": {"type": "vfio", "host": "0000:03:00.0", "rebind": True}})
    left = store.record.nics["h0"]  # what the next process reads
    assert (left.state, left.host.vfio_host, left.host.vfio_driver) == ("adding", "0000:03:00.0", "ixgbe")
    await release_host_side(host, left, "vm1")  # what recovery does with a NIC QEMU never got
    assert host.calls[-1] == ("restore_vfio", "0000:03:00.0", "ixgbe")


async def test_vfio_rebind_is_given_back_after_removal() -> None:
    host = FakeHost(original_driver="ixgbe")
    guest, monitor = lane(host, monitor=AckingMonitor())
    async with guest:
        await guest.add_nic({"id": "h0", "backend": {"type": "vfio", "host": "0000:03:00.0", "rebind": True}})
        assert (await guest.remove_nic("h0")).state == "removed"
    assert "netdev_del" not in monitor.commands
    assert host.calls[-1] == ("restore_vfio", "0000:03:00.0", "ixgbe")


@pytest.mark.parametrize(
    "error",
    [
        InvalidRequest("nic.backend.host: 0000:03:00.0 is not a network controller", field="nic.backend.host"),
        NotFound("nic.backend.host: no PCI function 0000:03:00.0", field="nic.backend.host"),
        Unsupported("nic.backend.host: 0000:03:00.0 has no IOMMU group", field="nic.backend.host"),
    ],
    ids=["class", "missing", "no-iommu"],
)
async def test_vfio_host_check_failure_sends_nothing(error: QmpnetError) -> None:
    host = FakeHost(errors={"prepare_vfio": error})
    guest, monitor = lane(host)
    with pytest.raises(type(error)) as caught:
        await guest.add_nic({"backend": {"type": "vfio", "host": "0000:03:00.0"}})
    assert caught.value.field == "nic.backend.host"
    assert monitor.commands == []
    assert host.actions == ["prepare_vfio"]


async def test_vfio_host_not_allowed_by_policy_is_forbidden() -> None:
    host = FakeHost()
    guest, monitor = lane(host, Policy(allowed_vfio_hosts=["0000:04:00.0"]))
    with pytest.raises(Forbidden) as caught:
        await guest.add_nic({"backend": {"type": "vfio", "host": "0000:03:00.0"}})
    assert caught.value.field == "nic.backend.host"
    assert (monitor.executed, host.calls) == ([], [])


@pytest.mark.parametrize("host", ["0000:03:00.8", "0000:03:20.0", "03:00", "../03:00.0", "0000:03:00.0;x"])
async def test_malformed_vfio_host_is_an_invalid_request(host: str) -> None:
    fake = FakeHost()
    guest, monitor = lane(fake)
    with pytest.raises(InvalidRequest) as caught:
        await guest.add_nic({"backend": {"type": "vfio", "host": host}})
    assert caught.value.field == "nic.backend.host"
    assert (monitor.executed, fake.calls) == ([], [])


# ----------------------------------------------------------------------------- host resources across processes


def _left(nic_id: str, state: str, hold: HostHold) -> MemoryGuestStore:
    """The record a killed process left: NIC ``nic_id`` in ``state`` holding ``hold`` (same QEMU instance)."""
    rec = GuestRecord(address="vm1", name="vm1", instance="{}")  # the recording monitor's instance answer
    nic = NicRecord(id=nic_id, spec=NicSpec(id=nic_id), netdev=f"{nic_id}.net", state=state, link="up", host=hold)

    return MemoryGuestStore(rec.with_nic(nic), key="vm1")


# ----------------------------------------------------------------------------------------- macvtap in the lane

MACVTAP = {"type": "macvtap", "link": "eth0", "mode": "vepa"}


async def test_macvtap_nic_makes_the_macvtap_with_the_guests_mac_and_passes_its_fds() -> None:
    host = FakeHost(use_vhost=True)
    guest, monitor = lane(host)
    nic = await guest.add_nic({"id": "m0", "mac": "52:54:00:bb:00:02", "queues": 2, "backend": MACVTAP})
    assert host.calls == [("create_macvtap", "eth0", "vepa", "52:54:00:bb:00:02", 2, "vm1/m0")]
    assert monitor.commands == ["getfd", "getfd", "netdev_add", "device_add"]
    assert arguments(monitor, "netdev_add") == {"id": "m0.net", "type": "tap", "fds": "m0.net.fd0:m0.net.fd1",
                                                "vhost": True}  # fmt: skip
    assert host.taps[0].closed
    assert nic.backend is not None
    assert (nic.backend.type, nic.backend.options) == (
        "macvtap", {"link": "eth0", "mode": "vepa", "tap": "vnet0", "vhost": "on"}
    )


async def test_macvtap_is_deleted_after_removal() -> None:
    host = FakeHost()
    guest, _ = lane(host, monitor=AckingMonitor())
    async with guest:
        await guest.add_nic({"id": "m0", "backend": MACVTAP})
        result = await guest.remove_nic("m0")
    assert result.state == "removed"
    assert host.calls[-1] == ("delete_tap", "vnet0")


async def test_failed_netdev_add_deletes_the_macvtap() -> None:
    host = FakeHost()
    guest, monitor = lane(host)
    monitor.errors["netdev_add"] = failing("netdev_add", "nope")
    with pytest.raises(QmpCommandError):
        await guest.add_nic({"backend": MACVTAP})
    assert host.actions == ["create_macvtap", "delete_tap"]


async def test_macvtap_link_not_allowed_by_policy_is_forbidden_and_nothing_happens() -> None:
    host = FakeHost()
    guest, monitor = lane(host, Policy(allowed_macvtap_links=["eth1"]))
    with pytest.raises(Forbidden) as caught:
        await guest.add_nic({"backend": MACVTAP})
    assert caught.value.field == "nic.backend.link"
    assert (monitor.executed, host.calls) == ([], [])


@pytest.mark.parametrize(
    ("extra", "field"),
    [({"vlan": {"access": 10}}, "nic.vlan"), ({"shape": {"rate": "1mbit"}}, "nic.shape"),
     ({"backend": {**MACVTAP, "mode": "source"}}, "nic.backend.mode"),
     ({"backend": {**MACVTAP, "link": "bad name"}}, "nic.backend.link")],
)  # fmt: skip
async def test_a_bad_macvtap_request_is_refused_naming_the_field(extra: dict[str, object], field: str) -> None:
    host = FakeHost()
    guest, monitor = lane(host)
    with pytest.raises(InvalidRequest) as caught:
        await guest.add_nic({"backend": MACVTAP, **extra})
    assert caught.value.field == field
    assert (monitor.executed, host.calls) == ([], [])


async def test_a_rebound_function_is_given_back_when_its_removal_completes_after_the_process_left() -> None:
    # `nic add --backend vfio --rebind` then `nic del --timeout 0`; the guest released the function later,
    # while no qmpnet listened: the next process finds the device gone and restores the original driver.
    host = FakeHost()
    store = _left("vf0", "removal_pending", HostHold(vfio_host="0000:03:00.0", vfio_driver="ixgbe"))
    monitor = RecordingMonitor()
    async with Guest(monitor, name="vm1", host=host, store=store):
        pass
    assert ("restore_vfio", "0000:03:00.0", "ixgbe") in host.calls
    assert ("netdev_del", {"id": "vf0.net"}) in monitor.executed
    assert store.record.nics == {}


async def test_a_tap_of_an_add_killed_half_way_is_deleted_on_the_next_connect() -> None:
    host = FakeHost()
    store = _left("b0", "adding", HostHold(owner="vm1/b0", tap="vnet7", bridge="br0"))
    async with Guest(RecordingMonitor(), name="vm1", host=host, store=store):
        pass
    assert ("delete_tap", "vnet7") in host.calls
    assert store.record.nics == {}
    sweeps = [call for call in host.calls if call[0] == "sweep_orphans"]
    assert sweeps == [("sweep_orphans", "vm1/", [])]  # and any other tap of this guest's that no NIC holds


# ----------------------------------------------------------------------------------------- anti-spoofing


async def test_a_filter_is_loaded_for_the_tap_before_the_guest_sees_the_nic() -> None:
    host = FakeHost()
    guest, monitor = lane(host)
    await guest.add_nic({"id": "b0", "mac": "52:54:00:bb:00:01", "backend": {"type": "bridge", "bridge": "br0"},
                         "filter": {"ipv4": ["192.0.2.10"]}})  # fmt: skip
    assert host.actions == ["create_tap", "set_filter"]
    tap, mac, wanted = host.calls[1][1:]
    assert (tap, mac) == ("vnet0", "52:54:00:bb:00:01")
    assert [str(a) for a in wanted.ipv4] == ["192.0.2.10"]
    assert monitor.commands[-1] == "device_add"  # after the rules: the guest's first frame meets them


async def test_a_filter_gets_the_mac_planning_chose() -> None:
    host = FakeHost()
    guest, _ = lane(host)
    nic = await guest.add_nic({"id": "b0", "backend": {"type": "bridge", "bridge": "br0"}, "filter": {}})
    assert host.calls[1][:3] == ("set_filter", "vnet0", nic.mac)


async def test_a_failed_add_removes_the_filter_with_the_tap() -> None:
    host = FakeHost()
    guest, monitor = lane(host)
    monitor.errors["device_add"] = failing("device_add")
    with pytest.raises(QmpCommandError):
        await guest.add_nic({"id": "b0", "backend": {"type": "bridge", "bridge": "br0"}, "filter": {}})
    assert host.actions == ["create_tap", "set_filter", "undo set_filter", "delete_tap"]


async def test_a_failing_filter_adds_nothing_to_the_guest_and_deletes_the_tap() -> None:
    host = FakeHost(errors={"set_filter": Unsupported("nft is not installed")})
    guest, monitor = lane(host)
    with pytest.raises(Unsupported):
        await guest.add_nic({"id": "b0", "backend": {"type": "bridge", "bridge": "br0"}, "filter": {}})
    assert monitor.commands == ["getfd", "closefd"]  # the fd passed with the tap is taken back; no netdev, no device
    assert host.actions == ["create_tap", "set_filter", "delete_tap"]


async def test_removal_deletes_the_tap_and_its_filter() -> None:
    host = FakeHost()
    guest, _ = lane(host, monitor=AckingMonitor())
    await guest.add_nic({"id": "b0", "backend": {"type": "bridge", "bridge": "br0"}, "filter": {}})
    assert (await guest.remove_nic("b0", timeout=1.0)).state == "removed"
    assert host.calls[-2:] == [("delete_tap", "vnet0"), ("set_filter", "vnet0", host.calls[1][2], None)]


# ----------------------------------------------------------------------------------------- passt in the lane

PASST_DIR = Settings().hostnet.passt_guest_dir("vm1")
PASST_SOCKET = f"{PASST_DIR}/p0.sock"


def _passt_lane(
    host: FakeHost, monitor: RecordingMonitor | None = None, store: MemoryGuestStore | None = None
) -> tuple[Guest, RecordingMonitor]:
    monitor = monitor or RecordingMonitor()
    settings = Settings(qmp=QmpSettings(unplug_timeout=1.0, rollback_unplug_timeout=1.0))
    store = store or MemoryGuestStore(GuestRecord(address="vm1", name="vm1"), key="vm1")
    return Guest(monitor, name="vm1", settings=settings, host=host, store=store), monitor


async def test_passt_nic_starts_passt_then_connects_a_stream_netdev_to_its_socket() -> None:
    host = FakeHost()
    guest, monitor = _passt_lane(host)
    nic = await guest.add_nic({"id": "p0", "backend": {"type": "passt", "ports": ["tcp:2222:22"]}})
    assert host.calls == [("start_passt", PASST_SOCKET, ["tcp:2222:22"])]
    assert arguments(monitor, "netdev_add") == {
        "id": "p0.net", "type": "stream", "server": False, "addr": {"type": "unix", "path": PASST_SOCKET}
    }
    assert nic.backend is not None
    assert nic.backend.options == {"ports": "tcp:2222:22", "socket": PASST_SOCKET, "pid": "4242"}


async def test_passt_is_recorded_with_its_socket_pid_and_start_time() -> None:
    guest, _ = _passt_lane(FakeHost())
    async with guest:
        await guest.add_nic({"id": "p0", "backend": {"type": "passt"}})
        hold = guest.record.nics["p0"].host
    assert (hold.passt_socket, hold.passt_pid, hold.passt_started, hold.owner) == (PASST_SOCKET, 4242, 77, "vm1/p0")


@pytest.mark.parametrize("command", ["netdev_add", "device_add"])
async def test_a_failed_hot_add_ends_the_passt_it_started(command: str) -> None:
    host = FakeHost()
    guest, monitor = _passt_lane(host)
    monitor.errors[command] = failing(command)
    with pytest.raises(QmpCommandError):
        await guest.add_nic({"id": "p0", "backend": {"type": "passt"}})
    assert host.actions == ["start_passt", "stop_passt"]
    assert host.calls[-1] == ("stop_passt", PASST_SOCKET, HostProcess(4242, 77))
    assert monitor.commands[-1] == ("netdev_del" if command == "device_add" else "netdev_add")


async def test_a_passt_that_does_not_start_sends_nothing_to_qemu() -> None:
    host = FakeHost(errors={"start_passt": Conflict("nic.backend.ports.0: in use", field="nic.backend.ports.0")})
    guest, monitor = _passt_lane(host)
    with pytest.raises(Conflict) as caught:
        await guest.add_nic({"id": "p0", "backend": {"type": "passt", "ports": ["tcp:2222:22"]}})
    assert caught.value.field == "nic.backend.ports.0"
    assert "netdev_add" not in monitor.commands


async def test_removal_ends_passt_after_the_netdev_is_deleted() -> None:
    host = FakeHost()
    guest, monitor = _passt_lane(host, AckingMonitor())
    async with guest:
        await guest.add_nic({"id": "p0", "backend": {"type": "passt"}})
        monitor.executed.clear()
        assert (await guest.remove_nic("p0")).state == "removed"
    assert monitor.commands == ["device_del", "netdev_del"]
    assert ("stop_passt", PASST_SOCKET, HostProcess(4242, 77)) in host.calls


async def test_without_a_host_side_passt_is_unsupported() -> None:
    guest, monitor = lane(None)
    with pytest.raises(Unsupported) as caught:
        await guest.add_nic({"backend": {"type": "passt"}})
    assert caught.value.field == "nic.backend.type"
    assert monitor.commands == []


async def test_a_passt_of_an_add_killed_before_its_pid_was_recorded_is_ended_on_the_next_connect() -> None:
    host = FakeHost()
    store = _left("p0", "adding", HostHold(owner="vm1/p0", passt_socket="/run/x/p0.sock"))
    async with Guest(RecordingMonitor(), name="vm1", host=host, store=store):
        pass
    assert ("stop_passt", "/run/x/p0.sock", None) in host.calls  # found by its command line, which names the socket
    assert store.record.nics == {}
    assert [call for call in host.calls if call[0] == "sweep_passt"] == [("sweep_passt", str(PASST_DIR), [])]


async def test_the_passt_of_a_vanished_nic_is_ended_by_its_recorded_pid_and_start_time() -> None:
    host = FakeHost()
    hold = HostHold(owner="vm1/p0", passt_socket="/run/x/p0.sock", passt_pid=31, passt_started=900)
    store = _left("p0", "active", hold)
    async with Guest(RecordingMonitor(), name="vm1", host=host, store=store):
        pass
    assert ("stop_passt", "/run/x/p0.sock", HostProcess(31, 900)) in host.calls


async def test_the_sweep_keeps_the_passts_of_nics_that_exist() -> None:
    host = FakeHost()
    store = MemoryGuestStore(GuestRecord(address="vm1", name="vm1"), key="vm1")
    guest, _ = _passt_lane(host, store=store)
    async with guest:
        nic = await guest.add_nic({"id": "p0", "backend": {"type": "passt"}})
    again = RecordingMonitor()
    again.observation = with_tap_nic(again.observation, "p0", nic.mac)
    async with Guest(again, name="vm1", host=host, store=store):
        pass
    sweeps = [call for call in host.calls if call[0] == "sweep_passt"]
    assert sweeps[-1] == ("sweep_passt", str(PASST_DIR), [PASST_SOCKET])
    assert "stop_passt" not in host.actions
# ----------------------------------------------------------------------------------------- MTU

MTU_BRIDGE = {"type": "bridge", "bridge": "br0"}


async def test_without_mtu_a_virtio_nic_gets_its_bridges_mtu_as_host_mtu() -> None:
    host = FakeHost(bridge_mtus={"br0": 1400})
    guest, monitor = lane(host)
    nic = await guest.add_nic({"id": "b0", "backend": MTU_BRIDGE})
    assert host.calls == [("create_tap", "br0", 1, "vm1/b0")]  # the tap takes the bridge's MTU itself
    assert arguments(monitor, "device_add")["host_mtu"] == 1400
    assert nic.warnings == []


async def test_on_a_bridge_of_1500_nothing_mtu_related_is_added() -> None:
    guest, monitor = lane(FakeHost())
    await guest.add_nic({"id": "b0", "backend": MTU_BRIDGE})
    assert "host_mtu" not in arguments(monitor, "device_add")


async def test_an_mtu_below_the_bridges_goes_to_the_tap_and_host_mtu() -> None:
    host = FakeHost(bridge_mtus={"br0": 9000})
    guest, monitor = lane(host)
    await guest.add_nic({"id": "b0", "mtu": 1400, "backend": MTU_BRIDGE})
    assert host.calls == [("create_tap", "br0", 1, "vm1/b0", 1400)]
    assert arguments(monitor, "device_add")["host_mtu"] == 1400


@pytest.mark.parametrize("model", ["e1000", "e1000e", "rtl8139"])
async def test_models_that_ignore_host_mtu_answer_with_a_warning(model: str) -> None:
    guest, monitor = lane(FakeHost())
    nic = await guest.add_nic({"id": "e0", "model": model, "mtu": 1400, "backend": MTU_BRIDGE})
    assert "host_mtu" not in arguments(monitor, "device_add")
    [warning] = nic.warnings
    assert warning.startswith(f"mtu: {model} ignores host_mtu")


async def test_an_mtu_above_the_bridges_is_refused_and_nothing_is_made() -> None:
    host = FakeHost(bridge_mtus={"br0": 1400})
    guest, monitor = lane(host)
    with pytest.raises(InvalidRequest) as caught:
        await guest.add_nic({"id": "b0", "mtu": 1401, "backend": MTU_BRIDGE})
    assert caught.value.field == "nic.mtu"
    assert host.calls == []  # no tap
    assert not {"getfd", "netdev_add", "device_add"} & set(monitor.commands)


async def test_a_nat_nic_is_checked_against_its_networks_bridge_once() -> None:
    host = FakeHost(bridge_mtus={"qmpnat-lab": 1450})
    guest, monitor = lane(host)
    await guest.add_nic({"id": "n0", "backend": {"type": "nat", "network": "lab"}})
    assert host.calls == [("nat_bridge", "lab"), ("create_tap", "qmpnat-lab", 1, "vm1/n0")]
    assert arguments(monitor, "device_add")["host_mtu"] == 1450


async def test_a_tap_backend_gets_its_mtu_and_loses_it_again_on_failure() -> None:
    host = FakeHost()
    guest, monitor = lane(host)
    monitor.errors["device_add"] = failing("device_add")
    with pytest.raises(QmpCommandError):
        await guest.add_nic({"id": "t0", "mtu": 1400, "backend": {"type": "tap", "ifname": "tap0"}})
    assert host.calls == [("check_tap", "tap0"), ("set_mtu", "tap0", 1400, "nic.mtu"), ("undo set_mtu", "tap0")]


async def test_a_desired_set_adds_its_nics_with_their_mtu_and_reports_one_too_big() -> None:
    # What `qmpnet apply`, the retained desired topic and a restarted QEMU's re-add all go through.
    host = FakeHost(bridge_mtus={"br0": 9000, "br1": 1400})
    guest, monitor = lane(host)
    desired = parse_desired({"nics": [{"id": "m0", "mtu": 4000, "backend": MTU_BRIDGE},
                                      {"id": "m1", "mtu": 1500, "backend": {"type": "bridge", "bridge": "br1"}}]},
                            source="apply")  # fmt: skip
    report = await apply_desired(guest, desired)
    assert ("create_tap", "br0", 1, "vm1/m0", 4000) in host.calls
    assert arguments(monitor, "device_add")["host_mtu"] == 4000
    [error] = report.errors
    assert (error.id, error.code) == ("m1", "invalid_request")
    assert error.message.startswith("nic.mtu: 1500 is larger than the MTU of bridge br1 (1400)")
    assert not [call for call in host.calls if call[:2] == ("create_tap", "br1")]
