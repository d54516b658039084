"""The glue of live changes: Guest.update_nic / Guest.capture in the lane, and the controller's nic/update and
nic/capture, with the recording monitor and the stateful fake host."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import pytest
from fakehost import FakePort, PortsHost
from fakemonitor import RecordingMonitor

from qmpnet.adapters.store import MemoryGuestStore
from qmpnet.core.model import GuestEvent, ObservedBackend, Shape, parse_nic_spec
from qmpnet.core.policy import Policy
from qmpnet.core.ports import NetClient, PciDevice
from qmpnet.core.records import DesiredSet, GuestRecord, HostHold, NicRecord
from qmpnet.errors import Forbidden, InvalidRequest, NotFound, QmpnetError
from qmpnet.guest.guest import Guest
from qmpnet.serve.controller import Controller
from qmpnet.settings import ControllerSettings, MqttSettings, QmpSettings, Settings, UpdateSettings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from qmpnet.api.wire.envelopes import EventMessage, NicList

MAC = "52:54:00:00:00:42"


class TapGuestMonitor(RecordingMonitor):
    """The captured pc guest plus a virtio NIC ``lan0`` on a tap passed as an fd (another process added it)."""

    def __init__(self) -> None:
        super().__init__()
        obs = self.observation
        device = PciDevice("lan0", "virtio-net-pci", "pci.0", 4, 0, mac=MAC, netdev="lan0.net")
        client = NetClient("lan0.net", ObservedBackend(type="tap", options={"fd": "23"}))
        self.observation = replace(obs, devices=(*obs.devices, device), device_ids=obs.device_ids | {"lan0"},
                                   netclients={**obs.netclients, client.name: client})
        self.closed = asyncio.Event()
        self.greeting_version: str | None = "7.2.22"

    async def machine(self) -> tuple[str, str]:
        return "pc-i440fx-7.2", "pc"

    async def close(self) -> None:
        self.closed.set()


def fast(policy: Policy | None = None) -> Settings:
    return Settings(policy=policy or Policy(), update=UpdateSettings(link_flap=0),
                    qmp=QmpSettings(unplug_timeout=0.1, rollback_unplug_timeout=0.1))


def host() -> PortsHost:
    return PortsHost(taps={"vnet4": FakePort("br-a", owner="vm1/lan0")})


async def test_update_nic_changes_the_nic_emits_nic_updated_and_list_nics_shows_it() -> None:
    monitor, ports = TapGuestMonitor(), host()
    events: list[GuestEvent] = []
    async with Guest(monitor, name="vm1", settings=fast(), host=ports) as guest:
        monitor.forget()  # what entering sent (recovery) is not what is checked here
        guest.subscribe(events.append)
        nic = await guest.update_nic({"id": "lan0", "backend": {"type": "bridge", "bridge": "br-b"},
                                      "shape": {"rate": "5mbit"}})  # fmt: skip
        assert nic.backend is not None
        assert nic.backend.options == {"tap": "vnet4", "bridge": "br-b", "rate": "5mbit"}
        assert [(e.name, e.id) for e in events] == [("nic_updated", "lan0")]
        assert ports.state()["vnet4"] == ("br-b", None, Shape(rate=5_000_000))
        listed = {n.id: n for n in await guest.list_nics()}["lan0"]
        assert listed.backend is not None
        assert (listed.backend.type, listed.backend.options["bridge"]) == ("bridge", "br-b")
        # The lane now holds the tap: a second change needs no search, and the link is remembered.
        calls = len(ports.calls)
        down = await guest.update_nic({"id": "lan0", "link": "down"})
        assert down.link == "down"
        assert ports.calls[calls:] == []
        assert {n.id: n for n in await guest.list_nics()}["lan0"].link == "down"
        await guest.update_nic({"id": "lan0", "shape": None})
        assert ("find_tap", "vm1/lan0", None, 23) not in ports.calls[calls:]


@pytest.mark.parametrize(
    ("update", "policy", "error", "field"),
    [
        ({"id": "lan0", "shape": {"rate": "-1mbit"}}, None, InvalidRequest, "update.shape.rate"),
        ({"id": "lan0", "backend": {"type": "bridge", "bridge": "br-b"}}, Policy(allowed_bridges=["br-a"]),
         Forbidden, "update.backend.bridge"),
        ({"id": "nosuch", "link": "down"}, None, NotFound, "update.id"),
    ],
)  # fmt: skip
async def test_refusals_happen_before_any_change(
    update: dict[str, Any], policy: Policy | None, error: type[QmpnetError], field: str
) -> None:
    monitor, ports = TapGuestMonitor(), host()
    async with Guest(monitor, name="vm1", settings=fast(policy), host=ports) as guest:
        monitor.forget()  # what entering sent (recovery) is not what is checked here
        with pytest.raises(error) as caught:
            await guest.update_nic(update)
    assert caught.value.field == field
    assert monitor.executed == []
    assert ports.state() == host().state()


async def test_a_failed_update_makes_the_lane_read_the_guest_again() -> None:
    monitor, ports = TapGuestMonitor(), host()
    ports.errors["set_shape"] = QmpnetError("boom")
    async with Guest(monitor, name="vm1", settings=fast(), host=ports) as guest:
        monitor.forget()  # what entering sent (recovery) is not what is checked here
        with pytest.raises(QmpnetError):
            await guest.update_nic({"id": "lan0", "shape": {"rate": "1mbit"}})
        observed = monitor.observed
        del ports.errors["set_shape"]
        await guest.update_nic({"id": "lan0", "shape": {"rate": "1mbit"}})
        assert monitor.observed == observed + 1


async def test_capture_checks_the_file_then_adds_the_filter() -> None:
    monitor = TapGuestMonitor()
    async with Guest(monitor, name="vm1", settings=fast(Policy(allowed_capture_dirs=["/var/cap"]))) as guest:
        monitor.forget()  # what entering sent (recovery) is not what is checked here
        with pytest.raises(Forbidden):
            await guest.capture("lan0", "start", "/etc/x.pcap")
        with pytest.raises(InvalidRequest):
            await guest.capture("../x", "start", "/var/cap/x.pcap")
        assert monitor.executed == []
        started = await guest.capture("lan0", "start", "/var/cap/x.pcap")
    assert started.state == "capturing"
    assert monitor.executed == [("object-add", {"qom-type": "filter-dump", "id": "lan0.capture",
                                                "netdev": "lan0.net", "file": "/var/cap/x.pcap"})]


class Sink:
    def __init__(self) -> None:
        self.nics: list[NicList] = []
        self.events: list[tuple[str, EventMessage]] = []
        self.connected = asyncio.Event()

    def controller_status(self, status: object) -> None:
        pass

    def guest_status(self, guest: str, status: Any) -> None:
        if status.state == "connected":
            self.connected.set()

    def guest_nics(self, guest: str, nics: NicList) -> None:
        self.nics.append(nics)

    def guest_gone(self, guest: str) -> None:
        pass

    def event(self, guest: str, name: str, event: EventMessage) -> None:
        self.events.append((name, event))


@contextlib.asynccontextmanager
async def controller(sink: Sink, monitor: TapGuestMonitor) -> AsyncIterator[Controller]:
    async def connect(name: str, address: str) -> TapGuestMonitor:
        return monitor

    settings = fast().model_copy(update={
        "mqtt": MqttSettings(controller_id="t1"),
        "controller": ControllerSettings(guests={"vm1": "/x/vm1.qmp"}, backoff_min=0.01, backoff_max=0.05),
    })  # fmt: skip
    running = Controller(settings, sink, connect, version="0", host=host())
    task = asyncio.create_task(running.run())
    try:
        async with asyncio.timeout(2):
            await sink.connected.wait()
        yield running
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_the_controller_answers_nic_update_and_nic_capture_and_republishes_the_nics() -> None:
    sink, monitor = Sink(), TapGuestMonitor()
    async with controller(sink, monitor) as running:
        answer = await running.handle("vm1", "nic/update", {"transaction": "u1",
                                                            "update": {"id": "lan0", "link": "down"}})
        assert answer.status == "ok", answer
        assert answer.data.link == "down"
        assert [n.link for n in sink.nics[-1].nics if n.id == "lan0"] == ["down"]
        assert sink.events[-1][0] == "nic_updated"
        bad = await running.handle("vm1", "nic/update", {"update": {"id": "lan0", "shape": {"loss": "101%"}}})
        assert bad.status == "error"
        assert (bad.error.code, bad.error.field) == ("invalid_request", "update.shape.loss")
        mtu = await running.handle("vm1", "nic/update", {"update": {"id": "lan0", "mtu": 1400}})
        assert mtu.status == "ok", mtu
        assert "the guest must apply it" in mtu.data.warnings[0]  # the MQTT reply carries the warnings
        too_big = await running.handle("vm1", "nic/update", {"update": {"id": "lan0", "mtu": 1501}})
        assert too_big.status == "error"
        assert (too_big.error.code, too_big.error.field) == ("invalid_request", "update.mtu")
        capture = await running.handle("vm1", "nic/capture", {"id": "lan0", "action": "start", "file": "/var/a.pcap"})
        assert capture.status == "ok", capture
        assert (capture.data.state, capture.data.file) == ("capturing", "/var/a.pcap")


def test_serve_gives_remote_callers_no_capture_directory_unless_listed() -> None:
    from qmpnet.serve.compose import serve_settings  # noqa: PLC0415 - app pulls in the MQTT stack; only this test needs it

    assert serve_settings(Settings()).policy.allowed_capture_dirs == []
    assert serve_settings(Settings()).policy.allowed_bridges == []
    listed = serve_settings(Settings(policy=Policy(allowed_capture_dirs=["/var/cap"])))
    assert listed.policy.allowed_capture_dirs == ["/var/cap"]
    assert listed.policy.allowed_bridges == []


async def test_a_live_mtu_is_kept_in_the_record_and_the_desired_set_and_a_move_alone_clears_it() -> None:
    spec = parse_nic_spec({"id": "lan0", "mac": MAC, "backend": {"type": "bridge", "bridge": "br-a"}})
    nic = NicRecord(id="lan0", spec=spec, netdev="lan0.net", state="active", link="up",
                    host=HostHold(owner="vm1/lan0", tap="vnet4", bridge="br-a"))
    record = GuestRecord(address="vm1", name="vm1", instance="{}", desired=DesiredSet(nics=[spec])).with_nic(nic)
    store = MemoryGuestStore(record, key="vm1")
    monitor, ports = TapGuestMonitor(), host()
    async with Guest(monitor, name="vm1", settings=fast(), host=ports, store=store) as guest:
        answer = await guest.update_nic({"id": "lan0", "mtu": 1300})
        assert ports.taps["vnet4"].mtu == 1300
        [warning] = answer.warnings
        assert "the guest must apply it" in warning
        assert store.record.nics["lan0"].spec is not None
        assert store.record.nics["lan0"].spec.mtu == 1300
        assert store.record.desired is not None
        assert [s.mtu for s in store.record.desired.nics] == [1300]
        [operation] = [op for op in store.record.operations.values() if op.op == "nic/update"]
        assert operation.outcome is not None
        assert operation.outcome["data"]["warnings"] == [warning]  # a repeated transaction gets the same answer

        await guest.update_nic({"id": "lan0", "backend": {"type": "bridge", "bridge": "br-b"}})
        assert store.record.nics["lan0"].spec is not None
        assert store.record.nics["lan0"].spec.mtu is None  # the move gave the tap br-b's MTU
        assert [s.mtu for s in store.record.desired.nics] == [None]
