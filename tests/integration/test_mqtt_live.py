"""``nic/update`` and ``nic/capture`` over MQTT: the Python client, raw requests and the CLI in broker mode.

One broker, one ``qmpnet serve`` (controller ``lv``) serving a QEMU with no guest OS (``-S``): what these tests
check is the remote path (policy for remote callers, answers, the ``nic_updated`` event and the retained NIC
list, capture files confined to the allowed directory), not what a guest sees, which test_live_change.py covers.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import needs
import pytest
import pytest_asyncio
from mqtt_fixtures import Mosquitto, Probe, Qemu, Serve, scratch, wait_online, wait_retained

from qmpnet.client import Client
from qmpnet.errors import Conflict, Forbidden, InvalidRequest, NotFound, Unsupported

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

BASE = "qmpnet/lv/guest/vm"


@dataclass
class Remote:
    broker: Mosquitto
    serve: Serve
    captures: Path
    work: Path

    @property
    def url(self) -> str:
        return self.broker.url


@pytest.fixture(scope="module")
def remote() -> Iterator[Remote]:
    with scratch("qmpnet-mqtt-live-") as work:
        captures = work / "captures"
        captures.mkdir()
        broker = Mosquitto(work)
        vm = Qemu(work / "vm.qmp")
        serve = Serve(work, "", "lv")
        try:
            broker.start()
            vm.start()
            serve = Serve(work, broker.url, "lv", {"vm": vm.qmp},
                          env={"QMPNET_POLICY__ALLOWED_CAPTURE_DIRS": json.dumps([str(captures)])}).start()
            asyncio.run(wait_online(serve, broker.url, guests_connected=["vm"]))
            yield Remote(broker, serve, captures, work)
        finally:
            serve.stop()
            vm.stop()
            broker.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def client(remote: Remote) -> AsyncIterator[Client]:
    async with Client(remote.url, timeout=15) as connected:
        yield connected


def tcpdump(pcap: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tcpdump", "-r", str(pcap)], capture_output=True, text=True, check=False)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qmpnet", *args], capture_output=True, text=True, timeout=60,
                          check=False)


async def test_a_link_change_is_answered_announced_and_retained(remote: Remote, client: Client) -> None:
    await client.add_nic("lv", "vm", {"model": "e1000", "id": "u1"})
    try:
        async with Probe(remote.url) as probe:
            await probe.subscribe(f"{BASE}/event/#")
            since = probe.mark()
            nic = await client.update_nic("lv", "vm", {"id": "u1", "link": "down"})
            assert nic.link == "down"
            event = await probe.one(f"{BASE}/event/nic_updated", since=since)
            assert (event.json["id"], event.json["nic"]["link"]) == ("u1", "down")
        state = await wait_retained(remote.url, f"{BASE}/nics",
                                    lambda s: {n["id"]: n["link"] for n in s["nics"]}.get("u1") == "down")
        assert [n["link"] for n in state["nics"] if n["id"] == "u1"] == ["down"]
        # The same through the CLI in broker mode.
        done = cli("nic", "set", "u1", "--link", "up", "--json", "--broker", remote.url, "--controller", "lv",
                   "--guest", "vm")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["link"] == "up"
    finally:
        await client.remove_nic("lv", "vm", "u1", timeout=0)


async def test_remote_refusals_name_the_field(remote: Remote, client: Client) -> None:
    await client.add_nic("lv", "vm", {"model": "e1000", "id": "u2"})
    try:
        # qmpnet serve lets remote callers use only the bridges the policy lists: none here.
        with pytest.raises(Forbidden) as forbidden:
            await client.update_nic("lv", "vm", {"id": "u2", "backend": {"type": "bridge", "bridge": "br0"}})
        assert forbidden.value.field == "update.backend.bridge"
        with pytest.raises(Unsupported) as unsupported:
            await client.update_nic("lv", "vm", {"id": "u2", "shape": {"rate": "5mbit"}})
        assert unsupported.value.field == "update.shape"
        with pytest.raises(Unsupported) as no_tap:  # a user-mode NIC has no host tap to give an MTU
            await client.update_nic("lv", "vm", {"id": "u2", "mtu": 1400})
        assert no_tap.value.field == "update.mtu"
        with pytest.raises(NotFound):
            await client.update_nic("lv", "vm", {"id": "nosuch", "link": "up"})
        # A bad value never leaves the client; on the wire the controller refuses it the same way.
        with pytest.raises(InvalidRequest) as bad:
            await client.update_nic("lv", "vm", {"id": "u2", "shape": {"loss": "150%"}})
        assert bad.value.field == "update.shape.loss"
        async with Probe(remote.url) as probe:
            await probe.subscribe(probe.response_topic)
            answer = await probe.call(f"{BASE}/request/nic/update",
                                      {"update": {"id": "u2", "shape": {"rate": "-5mbit"}}})
        assert answer["status"] == "error"
        assert (answer["error"]["code"], answer["error"]["field"]) == ("invalid_request", "update.shape.rate")
        async with Probe(remote.url) as probe:
            await probe.subscribe(probe.response_topic)
            answer = await probe.call(f"{BASE}/request/nic/add", {"nic": {"id": "u3", "mtu": 1400}})
        assert answer["status"] == "error"
        assert (answer["error"]["code"], answer["error"]["field"]) == ("invalid_request", "nic.mtu")
    finally:
        await client.remove_nic("lv", "vm", "u2", timeout=0)


@needs.tool("tcpdump", "tcpdump")
async def test_captures_stay_inside_the_allowed_directory(remote: Remote, client: Client) -> None:
    await client.add_nic("lv", "vm", {"model": "e1000", "id": "u3"})
    pcap = remote.captures / "u3.pcap"
    try:
        with pytest.raises(Forbidden) as outside:
            await client.capture("lv", "vm", "u3", "start", str(remote.work / "elsewhere.pcap"))
        assert outside.value.field == "file"
        assert not (remote.work / "elsewhere.pcap").exists()
        started = await client.capture("lv", "vm", "u3", "start", str(pcap))
        assert (started.state, started.file) == ("capturing", str(pcap))
        with pytest.raises(Conflict):
            await client.capture("lv", "vm", "u3", "start", str(remote.captures / "again.pcap"))
        stopped = await client.guest("lv", "vm").capture("u3", "stop")
        assert (stopped.state, stopped.file) == ("stopped", str(pcap))
        with pytest.raises(NotFound):
            await client.capture("lv", "vm", "u3", "stop")
        read = tcpdump(pcap)
        assert read.returncode == 0, read.stderr  # a pcap file (no frames: this QEMU runs no guest)
        # The CLI in broker mode, for a fixed duration.
        done = cli("nic", "capture", "u3", "--file", str(remote.captures / "cli.pcap"), "--duration", "0.2",
                   "--json", "--broker", remote.url, "--controller", "lv", "--guest", "vm")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"id": "u3", "state": "stopped", "file": str(remote.captures / "cli.pcap")}
        refused = cli("nic", "capture", "u3", "--file", str(remote.work / "x.pcap"), "--broker", remote.url,
                      "--controller", "lv", "--guest", "vm")
        assert refused.returncode == 1
        assert refused.stderr.startswith("error: forbidden: file: ")
    finally:
        await client.remove_nic("lv", "vm", "u3", timeout=0)
