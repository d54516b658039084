"""The Python client and the CLI in broker mode, on every broker of the matrix, against two controllers on one broker.

``h1`` serves ``vm1`` (running) and ``gone`` (never running); ``h2`` serves ``vm2``; ``h3`` serves nothing and is
stopped cleanly at the start (its retained status says ``offline``). One client drives them all.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from mqtt_fixtures import (
    MOSQUITTO_5,
    MOSQUITTO_311,
    Broker,
    Mode,
    Mosquitto,
    Probe,
    Qemu,
    Serve,
    broker_for,
    client_settings,
    fresh_root,
    scratch,
    started,
    transaction_in,
    wait_online,
    wait_retained,
)
from qemu_info import installed_qemu_version

import qmpnet
from qmpnet.client import Client

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

pytestmark = [pytest.mark.integration]


@dataclass
class Fleet:
    mode: Mode
    broker: Broker
    root: str
    h1: Serve
    h2: Serve
    h3: Serve
    work: Path

    @property
    def url(self) -> str:
        return self.broker.url

    def client(self, **settings: Any) -> Client:
        timeout = settings.pop("timeout", 10)
        return Client(settings=client_settings(self.url, self.mode, self.root, **settings), timeout=timeout)


@pytest.fixture(scope="module")
def fleet(mode: Mode, request: pytest.FixtureRequest) -> Iterator[Fleet]:
    with scratch("qmpnet-mqtt-client-") as work, broker_for(mode, work, request) as broker:
        root = fresh_root()
        vm1, vm2 = Qemu(work / "vm1.qmp"), Qemu(work / "vm2.qmp")
        h1, h2, h3 = (
            Serve(work, broker.url, name, guests, root=root, protocol=mode.protocol)
            for name, guests in (("h1", {"vm1": vm1.qmp, "gone": work / "gone.qmp"}), ("h2", {"vm2": vm2.qmp}),
                                 ("h3", {}))
        )  # fmt: skip
        with started(vm1, vm2, h1, h2, h3):
            asyncio.run(wait_online(h1, broker.url, guests_connected=["vm1"], protocol=mode.probe))
            asyncio.run(wait_online(h2, broker.url, guests_connected=["vm2"], protocol=mode.probe))
            asyncio.run(wait_online(h3, broker.url, protocol=mode.probe))
            h3.stop()
            asyncio.run(
                wait_retained(broker.url, f"{h3.base}/status", lambda s: s["state"] == "offline", protocol=mode.probe)
            )
            yield Fleet(mode, broker, root, h1, h2, h3, work)


@pytest.fixture
async def client(fleet: Fleet) -> AsyncIterator[Client]:
    async with fleet.client() as connected:
        yield connected


async def test_one_client_drives_two_controllers(fleet: Fleet, client: Client) -> None:
    on_h1 = await client.add_nic("h1", "vm1", {"model": "e1000", "id": "c1"})
    on_h2 = await client.add_nic("h2", "vm2", qmpnet.NicSpec(model="virtio-net-pci", id="c2", link="down"))
    assert isinstance(on_h1, qmpnet.Nic)
    assert (on_h1.id, on_h1.model) == ("c1", "e1000")
    assert (on_h2.id, on_h2.model, on_h2.link) == ("c2", "virtio-net-pci", "down")
    assert [n.id for n in await client.list_nics("h1", "vm1")] == ["c1"]
    assert [n.id for n in await client.list_nics("h2", "vm2")] == ["c2"]
    h1 = {g.name: g.state for g in await client.guests("h1")}
    h2 = {g.name: g.state for g in await client.guests("h2")}
    assert h1 == {"gone": "disconnected", "vm1": "connected"}
    assert h2 == {"vm2": "connected"}
    nic = await client.set_link("h2", "vm2", "c2", up=True)
    assert nic.link == "up"
    models = await client.models("h1", "vm1")
    assert "rtl8139" in {m.name for m in models}
    removed = await client.remove_nic("h1", "vm1", "c1", timeout=0.1)
    assert removed.state == "removal_pending"


async def test_remote_guest_has_the_direct_api(fleet: Fleet, client: Client) -> None:
    guest = client.guest("h2", "vm2")
    nic = await guest.add_nic({"model": "rtl8139", "id": "rg"})
    assert nic.model == "rtl8139"
    assert (await guest.set_link("rg", up=False)).link == "down"
    assert "rg" in {n.id for n in await guest.list_nics()}


async def test_errors_are_raised_as_the_direct_api_raises_them(fleet: Fleet, client: Client) -> None:
    with pytest.raises(qmpnet.NotFound) as caught:
        await client.set_link("h1", "vm1", "nosuch", up=True)
    assert caught.value.field == "id"
    with pytest.raises(qmpnet.NotFound) as caught:
        await client.list_nics("h1", "nosuch")
    assert caught.value.field == "guest"
    with pytest.raises(qmpnet.InvalidRequest) as invalid:
        await client.add_nic("h1", "vm1", {"mac": "zz"})
    assert invalid.value.field == "nic.mac"
    # Answered at once from the state the controller knows ("guest gone is <state>: ..."), not after a wait.
    with pytest.raises(qmpnet.GuestUnavailable, match=r"^guest gone is "):
        await client.list_nics("h1", "gone")
    await client.add_nic("h2", "vm2", {"id": "dupe"})
    with pytest.raises(qmpnet.Conflict):
        await client.add_nic("h2", "vm2", {"id": "dupe"})


async def test_names_a_broker_would_rewrite_are_refused(fleet: Fleet, client: Client) -> None:
    for controller, guest, field in (("h1.lab", "vm1", "controller"), ("h1", "vm.1", "guest")):
        with pytest.raises(qmpnet.InvalidRequest) as caught:
            await client.list_nics(controller, guest)
        assert caught.value.field == field
        assert "no '.'" in caught.value.message


async def test_no_controller_means_outcome_unknown_after_the_timeout(fleet: Fleet) -> None:
    async with fleet.client(timeout=0.3) as quick:
        with pytest.raises(qmpnet.OutcomeUnknown, match=r"no answer from controller nobody within 0\.3 s"):
            await quick.list_nics("nobody", "vm1")


async def test_a_controller_known_offline_fails_at_once_and_nothing_is_sent(fleet: Fleet, client: Client) -> None:
    # Its retained status is read on an exact topic: RabbitMQ gives wildcard subscribers no retained messages.
    with pytest.raises(qmpnet.GuestUnavailable) as caught:
        await client.list_nics("h3", "vm9")
    assert "offline" in caught.value.message
    assert "its retained status says so" in caught.value.message  # refused at once, not after the timeout
    # Had it been published, the broker would hand it to h3's session when h3 comes back, before a later request.
    async with Probe(fleet.url, protocol=fleet.mode.probe) as probe:
        h3 = fleet.h3.base
        await probe.subscribe(f"{h3}/guest/+/response/#", f"{h3}/response/#", f"{h3}/client/+/response")
        fleet.h3.start()
        try:
            await wait_online(fleet.h3, fleet.url, protocol=fleet.mode.probe)
            since = probe.mark()
            await probe.publish(f"{fleet.h3.base}/request/guests", {"transaction": "after-offline"})
            await probe.one(f"{fleet.h3.base}/response/guests", since=since)
            assert [transaction_in(m) for m in probe.messages] == ["after-offline"]
        finally:
            fleet.h3.stop()


async def test_a_malformed_retained_status_is_logged_and_ignored(
    fleet: Fleet, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    async with Probe(fleet.url, protocol=fleet.mode.probe) as probe:
        await probe.publish(f"{fleet.root}/hx/status", b"{}", retain=True)
        try:
            with pytest.raises(qmpnet.OutcomeUnknown):  # no controller hx: its "status" says nothing
                await client.call("hx", None, "guests", timeout=0.3)
            assert "ignoring a malformed status of controller hx" in caplog.text
            assert [g.name for g in await client.guests("h2")] == ["vm2"]  # the client still works
        finally:
            await probe.publish(f"{fleet.root}/hx/status", b"", retain=True)


@pytest.mark.parametrize("mode", [MOSQUITTO_311], indirect=True, ids=str)
async def test_an_mqtt5_client_understands_a_311_controller(fleet: Fleet) -> None:
    settings = client_settings(fleet.url, MOSQUITTO_5, fleet.root)
    async with Client(settings=settings, timeout=5) as v5:
        nic = await v5.add_nic("h1", "vm1", {"model": "e1000", "id": "v5to311"})
        assert nic.id == "v5to311"


@pytest.mark.parametrize("mode", [MOSQUITTO_5, MOSQUITTO_311], indirect=True, ids=str)
async def test_the_client_speaks_the_mqtt_version_it_is_told(fleet: Fleet) -> None:
    assert isinstance(fleet.broker, Mosquitto)
    expected = {"5": "p5", "3.1.1": "p2"}  # mosquitto's log: p5 for MQTT 5, p2 for 3.1.1
    for protocol, level in expected.items():
        settings = client_settings(fleet.url, fleet.mode, fleet.root, protocol=protocol)
        identifier = f"vers-{protocol.replace('.', '')}"
        async with Client(settings=settings, client_id=identifier, timeout=5) as told:
            assert [g.name for g in await told.guests("h2")] == ["vm2"]
        line = next(line for line in fleet.broker.log.read_text().splitlines() if f" as {identifier} " in line)
        assert f"({level}," in line, line


async def test_unreachable_broker_says_why(fleet: Fleet) -> None:
    with pytest.raises(qmpnet.GuestUnavailable) as caught:
        async with Client("mqtt://127.0.0.1:1", timeout=1):
            pass
    assert "connection refused" in caught.value.message


def qmpnet_cli(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "qmpnet", *args]
    env = {**os.environ, "QMPNET_MQTT__TOPIC_ROOT": fleet.root}
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, env=env)


def test_cli_broker_mode_same_output_and_exit_codes(fleet: Fleet) -> None:
    where = ["--broker", fleet.url, "--controller", "h1", "--guest", "vm1", "--mqtt-protocol", fleet.mode.protocol]
    added = qmpnet_cli(fleet, "nic", "add", "--model", "e1000e", "--id", "cli1", "--json", *where)
    assert added.returncode == 0, added.stderr
    nic = json.loads(added.stdout)
    assert (nic["id"], nic["model"]) == ("cli1", "e1000e")
    table = qmpnet_cli(fleet, "nic", "list", *where)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == ["ID", "MODEL", "MAC", "NETDEV", "BACKEND", "PCI", "LINK", "STATE"]
    assert any(line.startswith("cli1 ") for line in table.stdout.splitlines())
    link = qmpnet_cli(fleet, "nic", "link", "cli1", "down", "--json", *where)
    assert link.returncode == 0, link.stderr
    assert json.loads(link.stdout)["link"] == "down"
    removed = qmpnet_cli(fleet, "nic", "del", "cli1", "--timeout", "0.1", *where)
    assert (removed.returncode, removed.stdout.strip()) == (0, "cli1: removal_pending")
    models = qmpnet_cli(fleet, "models", "--json", *where)
    assert "virtio-net-pci" in {m["name"] for m in json.loads(models.stdout)["models"]}

    missing = qmpnet_cli(fleet, "nic", "link", "nosuch", "up", *where)
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: not_found: ")
    assert missing.stderr.count("\n") == 1
    down = qmpnet_cli(fleet, "nic", "list", "--broker", fleet.url, "--controller", "h1", "--guest", "gone")
    assert down.returncode == 1
    assert down.stderr.startswith("error: guest_unavailable: ")
    usage = qmpnet_cli(fleet, "nic", "list", "--broker", fleet.url)
    assert usage.returncode == 2
    both = qmpnet_cli(fleet, "nic", "list", "--qmp", "/x.qmp", "--broker", fleet.url, "--guest", "vm1")
    assert both.returncode == 2


def test_cli_guests(fleet: Fleet) -> None:
    listed = qmpnet_cli(fleet, "guests", "--broker", fleet.url, "--controller", "h2", "--json")
    assert listed.returncode == 0, listed.stderr
    (vm2,) = json.loads(listed.stdout)["guests"]
    assert (vm2["name"], vm2["state"], vm2["qemu"]) == ("vm2", "connected", installed_qemu_version())
    table = qmpnet_cli(fleet, "guests", "--broker", fleet.url, "--controller", "h1")
    assert table.returncode == 0, table.stderr
    rows = [line.split()[:2] for line in table.stdout.splitlines()]
    assert rows[0] == ["NAME", "STATE"]
    assert ["gone", "disconnected"] in rows
    assert ["vm1", "connected"] in rows


def test_cli_refuses_a_dotted_controller_id_in_one_line(fleet: Fleet) -> None:
    bad = qmpnet_cli(fleet, "nic", "list", "--broker", fleet.url, "--controller", "h1.lab", "--guest", "vm1")
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: invalid_request: controller: 'h1.lab' is not 1 to 64 letters")
    assert bad.stderr.count("\n") == 1
