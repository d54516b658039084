"""The Python client and the CLI in broker mode, against two controllers (``h1``, ``h2``) on one broker.

``h1`` serves ``vm1`` (running) and ``gone`` (never running); ``h2`` serves ``vm2``. One client drives both.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
from mqtt_fixtures import Mosquitto, Qemu, Serve, scratch, wait_online
from qemu_info import installed_qemu_version

import qmpnet
from qmpnet.client import Client

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

pytestmark = [pytest.mark.integration]


@dataclass
class Fleet:
    broker: Mosquitto
    h1: Serve
    h2: Serve
    work: Path

    @property
    def url(self) -> str:
        return self.broker.url


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with scratch("qmpnet-mqtt-client-") as work:
        broker = Mosquitto(work)
        vm1, vm2 = Qemu(work / "vm1.qmp"), Qemu(work / "vm2.qmp")
        processes: list[Mosquitto | Qemu | Serve] = [broker, vm1, vm2]
        try:
            for process in processes:
                process.start()
            h1 = Serve(work, broker.url, "h1", {"vm1": vm1.qmp, "gone": work / "gone.qmp"}).start()
            processes.append(h1)
            h2 = Serve(work, broker.url, "h2", {"vm2": vm2.qmp}).start()
            processes.append(h2)
            asyncio.run(wait_online(h1, broker.url, guests_connected=["vm1"]))
            asyncio.run(wait_online(h2, broker.url, guests_connected=["vm2"]))
            yield Fleet(broker, h1, h2, work)
        finally:
            for process in reversed(processes):
                process.stop()


@pytest.fixture
async def client(fleet: Fleet) -> AsyncIterator[Client]:
    async with Client(fleet.url, timeout=10) as connected:
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
    started = time.monotonic()
    with pytest.raises(qmpnet.GuestUnavailable):
        await client.list_nics("h1", "gone")
    assert time.monotonic() - started < 0.5
    await client.add_nic("h2", "vm2", {"id": "dupe"})
    with pytest.raises(qmpnet.Conflict):
        await client.add_nic("h2", "vm2", {"id": "dupe"})


async def test_no_controller_means_outcome_unknown_after_the_timeout(fleet: Fleet) -> None:
    async with Client(fleet.url, timeout=0.3) as quick:
        started = time.monotonic()
        with pytest.raises(qmpnet.OutcomeUnknown):
            await quick.list_nics("nobody", "vm1")
        assert 0.3 <= time.monotonic() - started < 2


async def test_unreachable_broker_is_guest_unavailable(fleet: Fleet) -> None:
    with pytest.raises(qmpnet.GuestUnavailable):
        async with Client("mqtt://127.0.0.1:1", timeout=1):
            pass


def qmpnet_cli(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "qmpnet", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_cli_broker_mode_same_output_and_exit_codes(fleet: Fleet) -> None:
    where = ["--broker", fleet.url, "--controller", "h1", "--guest", "vm1"]
    added = qmpnet_cli("nic", "add", "--model", "e1000e", "--id", "cli1", "--json", *where)
    assert added.returncode == 0, added.stderr
    nic = json.loads(added.stdout)
    assert (nic["id"], nic["model"]) == ("cli1", "e1000e")
    table = qmpnet_cli("nic", "list", *where)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == ["ID", "MODEL", "MAC", "NETDEV", "BACKEND", "PCI", "LINK", "STATE"]
    assert any(line.startswith("cli1 ") for line in table.stdout.splitlines())
    link = qmpnet_cli("nic", "link", "cli1", "down", "--json", *where)
    assert link.returncode == 0, link.stderr
    assert json.loads(link.stdout)["link"] == "down"
    removed = qmpnet_cli("nic", "del", "cli1", "--timeout", "0.1", *where)
    assert (removed.returncode, removed.stdout.strip()) == (0, "cli1: removal_pending")
    models = qmpnet_cli("models", "--json", *where)
    assert "virtio-net-pci" in {m["name"] for m in json.loads(models.stdout)["models"]}

    missing = qmpnet_cli("nic", "link", "nosuch", "up", *where)
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: not_found: ")
    assert missing.stderr.count("\n") == 1
    down = qmpnet_cli("nic", "list", "--broker", fleet.url, "--controller", "h1", "--guest", "gone")
    assert down.returncode == 1
    assert down.stderr.startswith("error: guest_unavailable: ")
    usage = qmpnet_cli("nic", "list", "--broker", fleet.url)
    assert usage.returncode == 2
    both = qmpnet_cli("nic", "list", "--qmp", "/x.qmp", "--broker", fleet.url, "--guest", "vm1")
    assert both.returncode == 2


def test_cli_guests(fleet: Fleet) -> None:
    listed = qmpnet_cli("guests", "--broker", fleet.url, "--controller", "h2", "--json")
    assert listed.returncode == 0, listed.stderr
    (vm2,) = json.loads(listed.stdout)["guests"]
    assert (vm2["name"], vm2["state"], vm2["qemu"]) == ("vm2", "connected", installed_qemu_version())
    table = qmpnet_cli("guests", "--broker", fleet.url, "--controller", "h1")
    assert table.returncode == 0, table.stderr
    rows = [line.split()[:2] for line in table.stdout.splitlines()]
    assert rows[0] == ["NAME", "STATE"]
    assert ["gone", "disconnected"] in rows
    assert ["vm1", "connected"] in rows
