"""Over MQTT into a booted guest: each model hot-added through ``qmpnet serve`` is seen by the guest's kernel,
its link changes reach the guest, its removal completes with the guest's ack, and a removal acknowledged only
after the request gave up finishes in the background with a ``nic_removed`` event.

One guest (pc, TCG, ~4 s boot), one broker and one controller for the module; every test removes what it adds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio
from mqtt_fixtures import Mosquitto, Probe, Serve, scratch, wait_online, wait_retained

from qmpnet.testguest import TestMachine

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from qmpnet.testguest import GuestImage

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

DRIVERS = {"virtio-net-pci": "virtio_net", "e1000": "e1000", "e1000e": "e1000e", "rtl8139": "8139cp"}
CARRIER_TIMEOUT = 15.0  # e1000's watchdog notices carrier changes only every ~2 s
SEE_TIMEOUT = 20.0
BASE = "qmpnet/g1/guest/vm"


@dataclass
class Booted:
    vm: TestMachine
    broker: Mosquitto
    serve: Serve


MACHINES: dict[str, dict[str, Any]] = {
    "pc": {"machine": "pc"},
    "q35": {"machine": "q35", "root_ports": 4, "pcie_pci_bridge": True},
}


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=sorted(MACHINES))
async def booted(request: pytest.FixtureRequest, guest_image: GuestImage) -> AsyncIterator[Booted]:
    with scratch("qmpnet-mqtt-guest-") as work:
        broker = Mosquitto(work)
        serve = Serve(work, "", "g1")
        try:
            broker.start()
            (work / "vm").mkdir()
            machine = MACHINES[request.param]
            async with TestMachine(guest_image, name=f"mqtt-{request.param}", workdir=work / "vm", **machine) as vm:
                serve = Serve(work, broker.url, "g1", {"vm": vm.qmp_path}).start()
                await wait_online(serve, broker.url, guests_connected=["vm"])
                yield Booted(vm, broker, serve)
                serve.stop()
        finally:
            serve.stop()
            broker.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def probe(booted: Booted) -> AsyncIterator[Probe]:
    async with Probe(booted.broker.url) as client:
        await client.subscribe(client.response_topic, f"{BASE}/event/#", f"{BASE}/nics")
        yield client


def ok(answer: dict[str, Any]) -> Any:
    assert answer["status"] == "ok", answer
    return answer["data"]


@pytest.mark.parametrize("model", sorted(DRIVERS))
async def test_each_model_over_mqtt_is_seen_by_the_guest(booted: Booted, probe: Probe, model: str) -> None:
    vm = booted.vm
    mac = {"virtio-net-pci": "52:54:00:bb:00:01", "e1000": "52:54:00:bb:00:02",
           "e1000e": "52:54:00:bb:00:03", "rtl8139": "52:54:00:bb:00:04"}[model]  # fmt: skip
    nic_id = f"q-{model}"
    started = time.monotonic()
    nic = ok(await probe.call(f"{BASE}/request/nic/add", {"nic": {"model": model, "id": nic_id, "mac": mac}}))
    answered = time.monotonic() - started
    assert (nic["id"], nic["mac"]) == (nic_id, mac)
    iface = await vm.wait_nic(mac, driver=DRIVERS[model])
    visible = time.monotonic() - started
    assert iface.pci is not None
    await vm.wait_nic(mac, CARRIER_TIMEOUT, carrier=True)

    assert ok(await probe.call(f"{BASE}/request/nic/link", {"id": nic_id, "up": False}))["link"] == "down"
    await vm.wait_nic(mac, CARRIER_TIMEOUT, carrier=False)
    assert ok(await probe.call(f"{BASE}/request/nic/link", {"id": nic_id, "up": True}))["link"] == "up"
    await vm.wait_nic(mac, CARRIER_TIMEOUT, carrier=True)

    since = probe.mark()
    removed = ok(await probe.call(f"{BASE}/request/nic/del", {"id": nic_id, "timeout": 15}, timeout=20))
    assert removed == {"id": nic_id, "state": "removed"}
    event = await probe.one(f"{BASE}/event/nic_removed", since=since)
    assert event.json["id"] == nic_id
    await vm.wait_nic_gone(mac)
    state = await wait_retained(booted.broker.url, f"{BASE}/nics", lambda s: nic_id not in {n["id"] for n in s["nics"]})
    assert nic_id not in {n["id"] for n in state["nics"]}
    print(f"\nmqtt {model}: answered {answered * 1000:.1f} ms, seen by the guest {visible:.2f} s")  # noqa: T201


async def test_late_unplug_ack_finishes_the_removal_in_the_background(booted: Booted, probe: Probe) -> None:
    vm = booted.vm
    mac = "52:54:00:bb:01:01"
    ok(await probe.call(f"{BASE}/request/nic/add", {"nic": {"model": "virtio", "id": "late", "mac": mac}}))
    await vm.wait_nic(mac)
    since = probe.mark()
    pending = ok(await probe.call(f"{BASE}/request/nic/del", {"id": "late", "timeout": 0}))
    assert pending == {"id": "late", "state": "removal_pending"}
    await probe.one(f"{BASE}/event/nic_removal_pending", since=since)
    removed = await probe.one(f"{BASE}/event/nic_removed", since=since, timeout=SEE_TIMEOUT)
    assert removed.json["id"] == "late"
    await probe.one(f"{BASE}/nics", lambda m: "late" not in {n["id"] for n in m.json["nics"]}, since=since)
    await vm.wait_nic_gone(mac)
    listed = ok(await probe.call(f"{BASE}/request/nic/list", {}))
    assert "late" not in {n["id"] for n in listed["nics"]}
