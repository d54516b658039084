"""Desired state over MQTT against a booted guest: converge, repair (or only report) drift, see other clients' NICs.

One booted busybox guest with a second QMP monitor (the "other client"), one broker, and ``qmpnet serve`` with a
short resync interval; the orchestrator publishes the retained ``desired`` document as a real one would.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio
from aux_qmp import aux_args, aux_monitor
from mqtt_fixtures import Mosquitto, Probe, Serve, scratch, started, wait_online, wait_retained

from qmpnet.testguest import TestMachine

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from qmpnet.testguest import GuestImage

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

BASE = "qmpnet/want"
DESIRED = [
    {"id": "d1", "model": "e1000", "mac": "52:54:00:de:00:01"},
    {"id": "d2", "model": "virtio", "mac": "52:54:00:de:00:02", "link": "down"},
]


class World:
    def __init__(self, vm: TestMachine, broker: Mosquitto, work: Path) -> None:
        self.vm, self.broker, self.work = vm, broker, work
        self.serve: Serve | None = None

    def start(self, *, repair: bool = True) -> Serve:
        if self.serve is not None:
            self.serve.stop()
        env = {"QMPNET_RECONCILE__RESYNC_INTERVAL": "1", "QMPNET_RECONCILE__REPAIR": "true" if repair else "false"}
        self.serve = Serve(self.work, self.broker.url, "want", {"vm": self.vm.qmp_path}, env=env).start()
        return self.serve


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(guest_image: GuestImage) -> AsyncIterator[World]:
    with scratch("qmpnet-desired-") as work, started(broker := Mosquitto(work)):
        vm_dir = work / "vm"
        vm_dir.mkdir()
        async with TestMachine(guest_image, workdir=vm_dir, name="desired", extra_args=aux_args(vm_dir)) as vm:
            world = World(vm, broker, work)
            try:
                await wait_online(world.start(), broker.url, guests_connected=["vm"])
                yield world
            finally:
                if world.serve is not None:
                    world.serve.stop()


async def publish_desired(world: World, document: dict[str, Any] | None) -> None:
    async with Probe(world.broker.url) as probe:
        payload = b"" if document is None else json.dumps(document).encode()
        await probe.publish(f"{BASE}/guest/vm/desired", payload, retain=True)


async def status(world: World, where: Any) -> dict[str, Any]:
    result: dict[str, Any] = await wait_retained(world.broker.url, f"{BASE}/guest/vm/status", where, timeout=30)
    return result


def desired_of(state: dict[str, Any]) -> dict[str, Any]:
    return state.get("desired") or {}


async def test_a_desired_document_converges_the_guest(world: World) -> None:
    await publish_desired(world, {"generation": 1, "nics": DESIRED})
    state = await status(world, lambda s: desired_of(s).get("generation") == 1 and desired_of(s).get("converged"))
    assert desired_of(state) == {"generation": 1, "converged": True, "pending": [], "errors": []}
    for nic in DESIRED:
        await world.vm.wait_nic(str(nic["mac"]))
    nics = await wait_retained(world.broker.url, f"{BASE}/guest/vm/nics", lambda s: len(s["nics"]) == 2)
    assert {n["id"]: n["link"] for n in nics["nics"]} == {"d1": "up", "d2": "down"}


async def test_a_desired_nic_another_client_removes_is_put_back(world: World) -> None:
    async with Probe(world.broker.url) as probe:
        await probe.subscribe(f"{BASE}/guest/vm/event/#")
        since = probe.mark()
        async with aux_monitor(world.vm.workdir) as aux:
            await aux.execute("device_del", {"id": "d1"})  # behind qmpnet's back; the guest acks the unplug
        drift = await probe.one(f"{BASE}/guest/vm/event/drift", since=since, timeout=30)
        assert {"action": "add", "id": "d1"} in drift.json["changes"]
        done = await probe.one(f"{BASE}/guest/vm/event/reconciled", since=since, timeout=30)
        assert {"action": "add", "id": "d1"} in done.json["changes"]
    await world.vm.wait_nic("52:54:00:de:00:01")  # the guest has it again, with the same MAC


async def test_a_nic_another_client_adds_shows_up_with_an_event(world: World) -> None:
    async with Probe(world.broker.url) as probe:
        await probe.subscribe(f"{BASE}/guest/vm/event/nic_added")
        since = probe.mark()
        async with aux_monitor(world.vm.workdir) as aux:
            await aux.execute("netdev_add", {"type": "user", "id": "other.net", "net": "10.0.8.0/24"})
            await aux.execute("device_add", {"driver": "rtl8139", "id": "other", "netdev": "other.net",
                                             "mac": "52:54:00:de:00:99"})
        added = await probe.one(f"{BASE}/guest/vm/event/nic_added", lambda m: m.json.get("id") == "other",
                                since=since, timeout=30)
        assert added.json["nic"]["mac"] == "52:54:00:de:00:99"
        assert added.json["nic"]["managed"] is False
    nics = await wait_retained(world.broker.url, f"{BASE}/guest/vm/nics",
                               lambda s: "other" in {n["id"] for n in s["nics"]})
    assert {n["id"] for n in nics["nics"]} == {"d1", "d2", "other"}
    # Not qmpnet's, and not in the desired set: the controller leaves it alone.
    state = await status(world, lambda s: desired_of(s).get("converged") is True)
    assert desired_of(state)["errors"] == []


async def test_an_invalid_document_is_refused_naming_the_field_and_the_set_stays(world: World) -> None:
    await publish_desired(world, {"generation": 2, "nics": [{"model": "e1000"}]})
    state = await status(world, lambda s: bool(desired_of(s).get("errors")))
    assert desired_of(state)["errors"][0]["field"] == "nics.0.id"
    assert desired_of(state)["errors"][0]["code"] == "invalid_request"
    await publish_desired(world, {"generation": 3, "nics": DESIRED})  # a good one again
    await status(world, lambda s: desired_of(s).get("generation") == 3 and desired_of(s).get("converged"))


async def test_without_repair_drift_is_only_reported(world: World) -> None:
    await wait_online(world.start(repair=False), world.broker.url, guests_connected=["vm"])
    async with Probe(world.broker.url) as probe:
        await probe.subscribe(f"{BASE}/guest/vm/event/#")
        since = probe.mark()
        async with aux_monitor(world.vm.workdir) as aux:
            await aux.execute("device_del", {"id": "d2"})
        drift = await probe.one(f"{BASE}/guest/vm/event/drift", since=since, timeout=30)
        assert {"action": "add", "id": "d2"} in drift.json["changes"]
    state = await status(world, lambda s: "d2" in desired_of(s).get("pending", []))
    assert desired_of(state)["converged"] is False
    await world.vm.wait_nic_gone("52:54:00:de:00:02")
    # An explicit new document is still converged to, repair or not.
    await publish_desired(world, {"generation": 4, "nics": DESIRED})
    await status(world, lambda s: desired_of(s).get("generation") == 4 and desired_of(s).get("converged"))
    await world.vm.wait_nic("52:54:00:de:00:02")


async def test_an_empty_document_clears_the_set(world: World) -> None:
    await publish_desired(world, None)
    state = await status(world, lambda s: s.get("desired") is None)
    assert state["state"] == "connected"
