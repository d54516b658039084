"""The MQTT API end to end: real mosquitto, real ``qmpnet serve``, real QEMU ``-S`` guests.

One broker, one controller ``h1`` and three guests for the whole module: ``vm1`` and ``vm2`` (QEMU ``-S``: every
op works, unplugs stay pending because no OS acknowledges them) and ``ghost`` (configured, never running).
Tests use their own NIC ids so they do not depend on each other; a ``-S`` pc guest has about 30 free slots and
pending unplugs keep theirs, so the module stays well below that per guest.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import pytest
from mqtt_fixtures import Mosquitto, Probe, Qemu, Serve, retained, scratch, wait_online, wait_retained
from qemu_info import installed_qemu_version

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

pytestmark = [pytest.mark.integration]

BASE = "qmpnet/h1"


@dataclass
class World:
    broker: Mosquitto
    serve: Serve
    vm1: Qemu
    vm2: Qemu

    @property
    def url(self) -> str:
        return self.broker.url


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with scratch("qmpnet-mqtt-api-") as work:
        broker = Mosquitto(work)
        vm1, vm2 = Qemu(work / "vm1.qmp"), Qemu(work / "vm2.qmp")
        serve = Serve(work, "", "h1")
        try:
            broker.start()
            vm1.start()
            vm2.start()
            serve = Serve(work, broker.url, "h1", {"vm1": vm1.qmp, "vm2": vm2.qmp, "ghost": work / "ghost.qmp"})
            serve.start()
            asyncio.run(wait_online(serve, broker.url, guests_connected=["vm1", "vm2"]))
            yield World(broker, serve, vm1, vm2)
            assert serve.running, serve.describe()
        finally:
            for process in (serve, vm1, vm2, broker):
                process.stop()


@pytest.fixture
async def probe(world: World) -> AsyncIterator[Probe]:
    async with Probe(world.url) as client:
        await client.subscribe(client.response_topic, f"{BASE}/guest/+/event/#", f"{BASE}/guest/+/nics")
        yield client


def guest_topic(guest: str, op: str) -> str:
    return f"{BASE}/guest/{guest}/request/{op}"


def ok(answer: dict[str, Any]) -> Any:
    assert answer["status"] == "ok", answer
    return answer["data"]


def error(answer: dict[str, Any], code: str) -> dict[str, Any]:
    assert answer["status"] == "error", answer
    assert answer["error"]["code"] == code, answer
    assert "data" not in answer
    body: dict[str, Any] = answer["error"]
    return body


async def test_retained_state_at_start(world: World) -> None:
    status = await retained(world.url, f"{BASE}/status")
    assert status["state"] == "online"
    assert status["api"] == 1
    assert status["guests"] == ["ghost", "vm1", "vm2"]
    assert status["version"]
    vm1 = await retained(world.url, f"{BASE}/guest/vm1/status")
    assert vm1["state"] == "connected"
    assert vm1["qemu"] == installed_qemu_version()
    assert vm1["machine"].startswith("pc-i440fx-")
    assert vm1["since"] <= time.time()
    ghost = await retained(world.url, f"{BASE}/guest/ghost/status")
    assert ghost["state"] == "disconnected"
    nics = await retained(world.url, f"{BASE}/guest/vm2/nics")
    assert set(nics) == {"nics"}


async def test_every_op_over_mqtt5_with_correlation(world: World, probe: Probe) -> None:
    since = probe.mark()
    correlation = uuid.uuid4().bytes
    spec = {"model": "e1000", "id": "op1", "mac": "52:54:00:12:34:01", "backend": {"type": "user"}}
    await probe.publish(
        guest_topic("vm1", "nic/add"),
        {"transaction": "op-add", "nic": spec},
        response_topic=probe.response_topic,
        correlation=correlation,
    )
    reply = await probe.one(probe.response_topic, since=since)
    assert reply.correlation == correlation
    assert not reply.retain
    answer = reply.json
    assert answer["transaction"] == "op-add"
    nic = ok(answer)
    assert nic["id"] == "op1"
    assert nic["model"] == "e1000"
    assert nic["mac"] == "52:54:00:12:34:01"
    assert nic["pci"]["bus"] == "pci.0"
    assert (nic["link"], nic["state"]) == ("up", "active")
    added = await probe.one(f"{BASE}/guest/vm1/event/nic_added", since=since)
    assert added.json["id"] == "op1"
    assert added.json["nic"]["mac"] == "52:54:00:12:34:01"
    assert added.json["ts"] == pytest.approx(time.time(), abs=30)
    state = await probe.one(f"{BASE}/guest/vm1/nics", lambda m: "op1" in str(m.json), since=since)
    assert [n["id"] for n in state.json["nics"] if n["id"] == "op1"] == ["op1"]

    since = probe.mark()
    nic = ok(await probe.call(guest_topic("vm1", "nic/link"), {"id": "op1", "up": False}))
    assert nic["link"] == "down"
    changed = await probe.one(f"{BASE}/guest/vm1/event/link_changed", since=since)
    assert changed.json["nic"]["link"] == "down"
    await probe.one(
        f"{BASE}/guest/vm1/nics",
        lambda m: any(n["id"] == "op1" and n["link"] == "down" for n in m.json["nics"]),
        since=since,
    )

    listed = ok(await probe.call(guest_topic("vm1", "nic/list"), {}))
    (found,) = [n for n in listed["nics"] if n["id"] == "op1"]
    assert (found["link"], found["backend"]["type"]) == ("down", "user")

    models = ok(await probe.call(guest_topic("vm1", "models"), {}))["models"]
    names = {m["name"]: m for m in models}
    assert {"e1000", "e1000e", "rtl8139", "virtio-net-pci"} <= set(names)
    assert names["e1000e"]["bus"] == "pcie"
    assert names["virtio-net-pci"]["hotplug"] is True

    since = probe.mark()
    removed = ok(await probe.call(guest_topic("vm1", "nic/del"), {"id": "op1", "timeout": 0.2}))
    assert removed == {"id": "op1", "state": "removal_pending"}  # no guest OS acknowledges the unplug
    pending = await probe.one(f"{BASE}/guest/vm1/event/nic_removal_pending", since=since)
    assert pending.json["id"] == "op1"
    await probe.one(
        f"{BASE}/guest/vm1/nics",
        lambda m: any(n["id"] == "op1" and n["state"] == "removal_pending" for n in m.json["nics"]),
        since=since,
    )

    guests = ok(await probe.call(f"{BASE}/request/guests", {"transaction": "g"}))["guests"]
    states = {g["name"]: g["state"] for g in guests}
    assert states == {"ghost": "disconnected", "vm1": "connected", "vm2": "connected"}


@pytest.mark.parametrize("model", ["virtio", "e1000", "e1000e", "rtl8139"])
async def test_hot_add_each_model(world: World, probe: Probe, model: str) -> None:
    nic = ok(await probe.call(guest_topic("vm2", "nic/add"), {"nic": {"model": model, "id": f"m-{model}"}}))
    assert nic["model"] == ("virtio-net-pci" if model == "virtio" else model)
    assert nic["mac"].startswith("52:54:00:")
    # The retained state follows the answer (answer first, then state): wait for it rather than race it.
    wanted = f"m-{model}"
    state = await wait_retained(world.url, f"{BASE}/guest/vm2/nics", lambda s: wanted in {n["id"] for n in s["nics"]})
    assert nic["mac"] == next(n["mac"] for n in state["nics"] if n["id"] == f"m-{model}")


async def test_mqtt311_client_is_answered_through_transaction(world: World) -> None:
    async with Probe(world.url, protocol=3) as old:
        await old.subscribe(f"{BASE}/guest/vm1/response/#")
        since = old.mark()
        await old.publish(guest_topic("vm1", "nic/add"), {"transaction": "v311-add", "nic": {"id": "v311"}})
        await old.publish(guest_topic("vm1", "nic/list"), {"transaction": "v311-list"})
        add, listing = await old.wait(f"{BASE}/guest/vm1/response/#", since=since, count=2)
    assert add.topic == f"{BASE}/guest/vm1/response/nic/add"
    assert listing.topic == f"{BASE}/guest/vm1/response/nic/list"
    assert add.json["transaction"] == "v311-add"
    assert ok(add.json)["id"] == "v311"
    assert listing.json["transaction"] == "v311-list"
    assert "v311" in {n["id"] for n in ok(listing.json)["nics"]}


async def test_duplicate_transaction_is_applied_once(world: World, probe: Probe) -> None:
    before = len(ok(await probe.call(guest_topic("vm1", "nic/list"), {}))["nics"])
    since = probe.mark()
    request = {"transaction": "dup-1", "nic": {"model": "virtio"}}  # no id: a second add would make a second NIC
    first, second = await asyncio.gather(
        probe.call(guest_topic("vm1", "nic/add"), request), probe.call(guest_topic("vm1", "nic/add"), request)
    )
    third = await probe.call(guest_topic("vm1", "nic/add"), request)
    assert first == second == third
    assert first["transaction"] == "dup-1"
    nics = ok(await probe.call(guest_topic("vm1", "nic/list"), {}))["nics"]
    assert len(nics) == before + 1
    added = probe.received(f"{BASE}/guest/vm1/event/nic_added", since)
    assert [m.json["id"] for m in added] == [ok(first)["id"]]


async def test_retained_request_is_refused_and_not_executed(world: World, probe: Probe) -> None:
    topic = guest_topic("vm1", "nic/add")
    since = probe.mark()
    async with Probe(world.url, protocol=3) as old:
        await old.subscribe(f"{BASE}/guest/vm1/response/nic/add")
        await probe.publish(topic, {"transaction": "kept", "nic": {"id": "kept"}}, retain=True)
        answer = (await old.one(f"{BASE}/guest/vm1/response/nic/add", timeout=5)).json
        body = error(answer, "invalid_request")
        assert answer["transaction"] == "kept"
        assert "retain" in body["message"]
        await probe.publish(topic, b"", retain=True)  # clear it: an empty retained message is no request
        await asyncio.sleep(0.3)
        assert len(old.received(f"{BASE}/guest/vm1/response/nic/add")) == 1
    nics = ok(await probe.call(guest_topic("vm1", "nic/list"), {}))["nics"]
    assert "kept" not in {n["id"] for n in nics}
    assert not probe.received(f"{BASE}/guest/vm1/event/nic_added", since)


ADD = f"{BASE}/guest/vm1/request/nic/add"


class Bad(NamedTuple):
    topic: str
    payload: bytes
    code: str
    field: str | None


@pytest.mark.parametrize(
    "bad",
    [
        Bad(ADD, b"{not json", "invalid_request", None),
        Bad(ADD, b"[1, 2]", "invalid_request", None),
        Bad(ADD, b'{"nic": {"model": "e1000"}, "x": NaN}', "invalid_request", None),
        Bad(ADD, b'{"pad": "' + b"x" * 70_000 + b'"}', "invalid_request", None),
        Bad(guest_topic("nosuch", "nic/list"), b"{}", "not_found", "guest"),
        Bad(guest_topic("vm1", "nic/frobnicate"), b"{}", "invalid_request", "op"),
        Bad(f"{BASE}/request/nic/list", b"{}", "invalid_request", "op"),
        Bad(ADD, b"{}", "invalid_request", "nic"),
        Bad(ADD, b'{"nic": {"mac": "zz"}}', "invalid_request", "nic.mac"),
        Bad(ADD, b'{"nic": {"model": "pcnet"}}', "invalid_request", "nic.model"),
        Bad(ADD, b'{"nic": {"backend": {"type": "user", "hostfwd": ["x"]}}}',
         "invalid_request", "nic.backend.hostfwd.0"),
        Bad(ADD, b'{"nic": {}, "bogus": 1}', "invalid_request", "bogus"),
        Bad(guest_topic("vm1", "nic/link"), b'{"id": "op1", "up": "yes"}', "invalid_request", "up"),
        Bad(guest_topic("vm1", "nic/del"), b'{"id": "no such"}', "invalid_request", "id"),
        Bad(guest_topic("vm1", "nic/del"), b'{"id": "nosuch"}', "not_found", "id"),
        Bad(ADD, b'{"transaction": 5, "nic": {}}', "invalid_request", "transaction"),
        Bad(ADD, b'{"nic": {"model": "e1000", "queues": 2}}', "invalid_request", "nic.queues"),
        Bad(ADD, b'{"nic": {"backend": {"type": "user", "guestfwd": ["tcp:10.0.2.9:1-cmd:id"]}}}',
         "forbidden", "nic.backend.guestfwd.0"),
        # serve lists no bridge by default: remote callers may not use any
        Bad(ADD, b'{"nic": {"backend": {"type": "bridge", "bridge": "br0"}}}', "forbidden", "nic.backend.bridge"),
        Bad(ADD, b'{"nic": {"backend": {"type": "bridge", "bridge": "br0;reboot"}}}',
         "invalid_request", "nic.backend.bridge"),
        Bad(ADD, b'{"nic": {"backend": {"type": "nat", "network": "nosuch"}}}', "not_found", "nic.backend.network"),
        Bad(ADD, b'{"nic": {"backend": {"type": "vfio", "host": "0000:99:00.0"}}}', "not_found", "nic.backend.host"),
    ],
)  # fmt: skip
async def test_bad_requests_get_the_right_error(world: World, probe: Probe, bad: Bad) -> None:
    answer = await probe.call(bad.topic, bad.payload)
    body = error(answer, bad.code)
    assert body.get("field") == bad.field
    assert body["message"]


async def test_bad_request_echoes_its_transaction(world: World, probe: Probe) -> None:
    answer = await probe.call(guest_topic("vm1", "nic/add"), {"transaction": "t-bad", "nic": {"mac": "zz"}})
    error(answer, "invalid_request")
    assert answer["transaction"] == "t-bad"


async def test_response_topic_that_would_spoof_state_is_refused(world: World) -> None:
    async with Probe(world.url) as client:
        await client.subscribe(f"{BASE}/guest/vm1/response/#", f"{BASE}/guest/vm1/status")
        since = client.mark()
        await client.publish(
            guest_topic("vm1", "nic/list"), {"transaction": "spoof"}, response_topic=f"{BASE}/guest/vm1/status"
        )
        answer = (await client.one(f"{BASE}/guest/vm1/response/nic/list", since=since)).json
        assert error(answer, "invalid_request")["field"] == "response_topic"
        assert not [m for m in client.received(f"{BASE}/guest/vm1/status", since) if not m.retain]


async def test_unavailable_guest_fails_fast(world: World, probe: Probe) -> None:
    started = time.monotonic()
    answer = await probe.call(guest_topic("ghost", "nic/add"), {"transaction": "ghost-1", "nic": {}})
    elapsed = time.monotonic() - started
    body = error(answer, "guest_unavailable")
    assert "ghost" in body["message"]
    assert elapsed < 0.5


async def test_fifty_concurrent_requests_to_one_guest_run_in_order(world: World, probe: Probe) -> None:
    ok(await probe.call(guest_topic("vm2", "nic/add"), {"nic": {"id": "seq", "model": "e1000"}}))
    since = probe.mark()
    started = time.monotonic()
    for n in range(50):
        await probe.publish(
            guest_topic("vm2", "nic/link"),
            {"transaction": f"seq-{n:02d}", "id": "seq", "up": n % 2 == 0},
            response_topic=probe.response_topic,
            correlation=f"{n}".encode(),
        )
    replies = await probe.wait(probe.response_topic, since=since, count=50, timeout=20)
    elapsed = time.monotonic() - started
    assert [r.json["transaction"] for r in replies] == [f"seq-{n:02d}" for n in range(50)]
    assert [r.correlation for r in replies] == [f"{n}".encode() for n in range(50)]
    assert [ok(r.json)["link"] for r in replies] == ["up" if n % 2 == 0 else "down" for n in range(50)]
    # Each event follows its answer (the controller publishes the answer first): wait for the last ones.
    changes = await probe.wait(f"{BASE}/guest/vm2/event/link_changed", since=since, count=50)
    assert [m.json["nic"]["link"] for m in changes] == ["up" if n % 2 == 0 else "down" for n in range(50)]
    print(f"50 link requests to one guest answered in {elapsed * 1000:.0f} ms")  # noqa: T201


async def test_requests_to_two_guests_run_in_parallel(world: World, probe: Probe) -> None:
    for guest in ("vm1", "vm2"):
        ok(await probe.call(guest_topic(guest, "nic/add"), {"nic": {"id": "par", "model": "rtl8139"}}))
    hold = 1.0  # each nic/del waits this long in its guest's lane for an unplug ack that never comes

    async def timed(guest: str, op: str, payload: dict[str, Any]) -> float:
        started = time.monotonic()
        ok(await probe.call(guest_topic(guest, op), payload))
        return time.monotonic() - started

    started = time.monotonic()
    del1 = asyncio.create_task(timed("vm1", "nic/del", {"id": "par", "timeout": hold}))
    del2 = asyncio.create_task(timed("vm2", "nic/del", {"id": "par", "timeout": hold}))
    await asyncio.sleep(0.1)
    list_behind_del = await timed("vm1", "nic/list", {})  # queued behind vm1's nic/del: serial per guest
    await asyncio.gather(del1, del2)
    total = time.monotonic() - started
    assert list_behind_del > hold - 0.3
    assert total < 2 * hold - 0.3, f"two guests' deletes took {total:.2f} s: not parallel"


async def test_events_and_state_topics_are_not_retained_or_are(world: World) -> None:
    async with Probe(world.url) as late:
        await late.subscribe(f"{BASE}/guest/vm1/event/#", f"{BASE}/guest/vm1/nics", f"{BASE}/guest/vm1/status")
        await asyncio.sleep(0.5)
        assert not late.received(f"{BASE}/guest/vm1/event/#")
        assert [m.retain for m in late.received(f"{BASE}/guest/vm1/nics")] == [True]
        assert [m.retain for m in late.received(f"{BASE}/guest/vm1/status")] == [True]


async def test_request_payload_exactly_json_object(world: World, probe: Probe) -> None:
    raw = json.dumps({"transaction": "ünïcode-✓"}).encode()
    answer = await probe.call(guest_topic("vm2", "nic/list"), raw)
    assert answer["transaction"] == "ünïcode-✓"
    ok(answer)
