"""Capacity on real QEMU: ``slots`` (API, CLI, MQTT) and the retained status's ``capacity`` follow every change.

Two kinds of guest:

- QEMU ``-S`` (no OS, a fraction of a second each): the count a guest gives is exactly the number of NICs of that
  model that hot-add then finds room for, and the advice given when none is left is the ``no_free_slot`` error's.
  Unplugs are never acknowledged there, so removals are proven on booted guests.
- A booted guest per machine (pc; q35 with 2 root ports and a pcie-pci-bridge), served by ``qmpnet serve`` on
  mosquitto: counts go down as a PCI Express model and a conventional PCI model are added and back up as they are
  removed (acknowledged by the guest's kernel, within the request or after its answer), in the ``slots`` answer and
  in the retained status alike.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio
from mqtt_fixtures import Mosquitto, Msg, Probe, Serve, scratch, wait_online, wait_retained

import qmpnet
from qmpnet.testguest import BRIDGE_ID, BRIDGE_PORT_ID, TestMachine

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from qmpnet.testguest import GuestImage

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

BASE = "qmpnet/cap/guest/vm"
MODELS = ("virtio-net-pci", "e1000e", "e1000", "rtl8139")
Q35: dict[str, Any] = {"machine": "q35", "root_ports": 2, "pcie_pci_bridge": True}
MACHINES: dict[str, dict[str, Any]] = {"pc": {"machine": "pc"}, "q35": Q35}
SEE_TIMEOUT = 20.0


def frees(capacity: dict[str, Any]) -> dict[str, int]:
    """Each model's free count."""
    return {m["model"]: m["free"] for m in capacity["models"]}


def capacity_is(want: dict[str, int]) -> Callable[[Msg], bool]:
    """A status message whose capacity has these free counts."""
    return lambda m: m.json["capacity"] is not None and frees(m.json["capacity"]) == want


def counts(capacity: dict[str, Any], model: str) -> dict[str, Any]:
    """One model's counts and buses."""
    return next(m for m in capacity["models"] if m["model"] == model)


# ------------------------------------------------------------------------------------------- -S: count == room


@pytest.mark.parametrize(
    ("machine", "model"), [("q35", "virtio-net-pci"), ("q35", "rtl8139"), ("q35", "e1000e"), ("pc", "e1000")]
)
async def test_the_count_is_what_hot_add_finds_room_for(guest_image: GuestImage, machine: str, model: str) -> None:
    async with TestMachine(guest_image, boot=False, name=f"slots-{machine}", **MACHINES[machine]) as vm:
        async with qmpnet.connect(str(vm.qmp_path)) as guest:
            before = (await guest.slots()).model_dump(mode="json")
            expected = counts(before, model)["free"]
            added = 0
            refused: qmpnet.NoFreeSlot | None = None
            for n in range(expected + 3):
                try:
                    await guest.add_nic({"model": model, "id": f"s{n}"})
                except qmpnet.NoFreeSlot as err:
                    refused = err
                    break
                added += 1
                assert counts((await guest.slots()).model_dump(mode="json"), model)["free"] == expected - added
            after = (await guest.slots()).model_dump(mode="json")
        print(f"\n{machine} {model}: {expected} free at start, {added} added")  # noqa: T201
        assert added == expected
        full = counts(after, model)
        assert (full["free"], full["root_ports"], full["bridge_slots"], full["root_slots"]) == (0, 0, 0, 0)
        assert full["advice"] is not None
        assert refused is not None
        assert refused.message == f"no free PCI place for {model}: {full['advice']}"
        if machine == "q35":
            assert expected == (31 if model == "rtl8139" else 2)
            # The other kind of place is untouched: PCI Express models use root ports, conventional ones the bridge.
            other = "rtl8139" if model != "rtl8139" else "virtio-net-pci"
            assert counts(after, other)["free"] == counts(before, other)["free"] > 0
            assert counts(after, other)["advice"] is None
            fix = "pcie-pci-bridge" if model == "rtl8139" else "pcie-root-port"
            assert f"-device {fix}" in full["advice"]
        else:
            assert frees(after) == dict.fromkeys(MODELS, 0)  # pc: every model shares pci.0
            assert "pci-bridge" in full["advice"]

        # The CLI (another QMP client, now that qmpnet.connect has let go) reads the same.
        json_out = await _cli("slots", "--qmp", str(vm.qmp_path), "--json")
        assert json.loads(json_out) == after
        table = await _cli("slots", "--qmp", str(vm.qmp_path))
        assert f"{model}: {full['advice']}" in table.splitlines()


async def test_q35_counts_name_the_places(guest_image: GuestImage) -> None:
    async with (
        TestMachine(guest_image, boot=False, name="slots-where", **Q35) as vm,
        qmpnet.connect(str(vm.qmp_path)) as guest,
    ):
        room = (await guest.slots()).model_dump(mode="json")
    assert room["machine"] == "q35"
    assert frees(room) == {"virtio-net-pci": 2, "e1000e": 2, "e1000": 31, "rtl8139": 31}
    virtio = counts(room, "virtio-net-pci")
    assert (virtio["root_ports"], virtio["bridge_slots"], virtio["root_slots"]) == (2, 0, 0)
    # Every root port placement would try, in its order: the bridge's own port is taken (by the bridge).
    assert [(b["bus"], b["kind"], b["free"]) for b in virtio["buses"]] == [
        ("rp1", "root_port", 1), ("rp2", "root_port", 1), (BRIDGE_PORT_ID, "root_port", 0)
    ]
    legacy = counts(room, "rtl8139")
    assert (legacy["root_ports"], legacy["bridge_slots"], legacy["root_slots"]) == (0, 31, 0)
    assert [(b["bus"], b["kind"], b["free"]) for b in legacy["buses"]] == [(BRIDGE_ID, "pci_bridge", 31)]


async def _cli(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpnet", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode()


# ------------------------------------------------------------------------- booted, over MQTT: down and back up


@dataclass
class Served:
    machine: str
    vm: TestMachine
    broker: Mosquitto


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=sorted(MACHINES))
async def served(request: pytest.FixtureRequest, guest_image: GuestImage) -> AsyncIterator[Served]:
    with scratch("qmpnet-capacity-") as work:
        broker = Mosquitto(work)
        serve = Serve(work, "", "cap")
        try:
            broker.start()
            (work / "vm").mkdir()
            async with TestMachine(
                guest_image, name=f"capacity-{request.param}", workdir=work / "vm", **MACHINES[request.param]
            ) as vm:
                serve = Serve(work, broker.url, "cap", {"vm": vm.qmp_path}).start()
                await wait_online(serve, broker.url, guests_connected=["vm"])
                yield Served(request.param, vm, broker)
                serve.stop()
        finally:
            serve.stop()
            broker.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def probe(served: Served) -> AsyncIterator[Probe]:
    async with Probe(served.broker.url) as client:
        await client.subscribe(client.response_topic, f"{BASE}/status")
        yield client


def ok(answer: dict[str, Any]) -> Any:
    assert answer["status"] == "ok", answer
    return answer["data"]


async def test_counts_go_down_with_each_nic_and_back_up_as_they_are_removed(served: Served, probe: Probe) -> None:
    vm = served.vm
    start = ok(await probe.call(f"{BASE}/request/slots", {}))
    status = await wait_retained(served.broker.url, f"{BASE}/status", lambda s: s["capacity"] is not None)
    assert status["capacity"] == start  # published on connect
    if served.machine == "q35":
        assert frees(start) == {"virtio-net-pci": 2, "e1000e": 2, "e1000": 31, "rtl8139": 31}
        # (virtio/e1000e, e1000/rtl8139) after: virtio added, rtl8139 added, virtio removed, rtl8139 removed
        steps = [(1, 31), (1, 30), (2, 30), (2, 31)]
    else:
        n = start["models"][0]["free"]
        assert frees(start) == dict.fromkeys(MODELS, n)
        assert n > 2
        steps = [(n - 1, n - 1), (n - 2, n - 2), (n - 1, n - 1), (n, n)]
    print(f"\n{served.machine}: at start {frees(start)}")  # noqa: T201
    nics = [("cap-v", "virtio-net-pci", "52:54:00:ca:00:01"), ("cap-r", "rtl8139", "52:54:00:ca:00:02")]
    changes = [("add", *nic) for nic in nics] + [("del", *nic) for nic in nics]

    for (action, nic_id, model, mac), (pcie, legacy) in zip(changes, steps, strict=True):
        since = probe.mark()
        if action == "add":
            ok(await probe.call(f"{BASE}/request/nic/add", {"nic": {"model": model, "id": nic_id, "mac": mac}}))
            await vm.wait_nic(mac)  # the guest's kernel has it, so it can acknowledge the unplug later
        elif model == "virtio-net-pci":
            removed = ok(await probe.call(f"{BASE}/request/nic/del", {"id": nic_id, "timeout": 15}, timeout=20))
            assert removed == {"id": nic_id, "state": "removed"}
            await vm.wait_nic_gone(mac)
        else:
            # Answered before the guest acknowledges: the place is freed (and published) when the ack arrives.
            pending = ok(await probe.call(f"{BASE}/request/nic/del", {"id": nic_id, "timeout": 0}))
            assert pending == {"id": nic_id, "state": "removal_pending"}
            await vm.wait_nic_gone(mac)
        want = {"virtio-net-pci": pcie, "e1000e": pcie, "e1000": legacy, "rtl8139": legacy}
        published = await probe.one(f"{BASE}/status", capacity_is(want), since=since, timeout=SEE_TIMEOUT)
        answered = ok(await probe.call(f"{BASE}/request/slots", {}))
        assert frees(answered) == want, (action, nic_id)
        assert published.json["capacity"] == answered
        print(f"{served.machine}: after {action} {model}: {want}")  # noqa: T201

    assert ok(await probe.call(f"{BASE}/request/slots", {})) == start
    # Broker mode of the CLI asks the controller the same question.
    cli = await _cli("slots", "--broker", served.broker.url, "--controller", "cap", "--guest", "vm", "--json")
    assert json.loads(cli) == start
    listed = ok(await probe.call(f"{BASE}/request/nic/list", {}))
    assert not {"cap-v", "cap-r"} & {n["id"] for n in listed["nics"]}
