"""The MQTT API end to end on every broker of the matrix: real brokers, real ``qmpnet serve``, real QEMU ``-S`` guests.

For each mode (mosquitto in MQTT 5, mosquitto in 3.1.1, RabbitMQ with ``auto``) one broker, one controller ``h1``
and three guests for the module: ``vm1`` and ``vm2`` (QEMU ``-S``: every op works, unplugs stay pending because no
OS acknowledges them) and ``ghost`` (configured, never running). Tests use their own NIC ids so they do not depend
on each other; a ``-S`` pc guest has about 30 free slots and pending unplugs keep theirs, so the module stays well
below that per guest.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import pytest
from mqtt_fixtures import (
    MOSQUITTO_5,
    Broker,
    Mode,
    Probe,
    Qemu,
    Serve,
    answer_topic,
    broker_for,
    fresh_root,
    retained,
    scratch,
    started,
    transaction_in,
    wait_online,
    wait_retained,
)
from qemu_info import installed_qemu_version

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

pytestmark = [pytest.mark.integration]


@dataclass
class World:
    mode: Mode
    broker: Broker
    serve: Serve
    vm1: Qemu
    vm2: Qemu

    @property
    def url(self) -> str:
        return self.broker.url

    @property
    def base(self) -> str:
        return self.serve.base

    def probe(self) -> Probe:
        return Probe(self.url, protocol=self.mode.probe)

    def guest_topic(self, guest: str, op: str) -> str:
        return f"{self.base}/guest/{guest}/request/{op}"

    async def retained(self, topic: str) -> Any:
        return await retained(self.url, topic, marker=f"{self.base}/status", protocol=self.mode.probe)


@pytest.fixture(scope="module")
def world(mode: Mode, request: pytest.FixtureRequest) -> Iterator[World]:
    with scratch("qmpnet-mqtt-api-") as work, broker_for(mode, work, request) as broker:
        vm1, vm2 = Qemu(work / "vm1.qmp"), Qemu(work / "vm2.qmp")
        guests = {"vm1": vm1.qmp, "vm2": vm2.qmp, "ghost": work / "ghost.qmp"}
        serve = Serve(work, broker.url, "h1", guests, root=fresh_root(), protocol=mode.protocol)
        with started(vm1, vm2, serve):
            asyncio.run(wait_online(serve, broker.url, guests_connected=["vm1", "vm2"], protocol=mode.probe))
            yield World(mode, broker, serve, vm1, vm2)
            assert serve.running, serve.describe()


@pytest.fixture
async def probe(world: World) -> AsyncIterator[Probe]:
    async with world.probe() as client:
        await client.subscribe(f"{world.base}/guest/+/event/#", f"{world.base}/guest/+/nics")
        yield client


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
    status = await world.retained(f"{world.base}/status")
    assert status["state"] == "online"
    assert status["api"] == 1
    assert status["guests"] == ["ghost", "vm1", "vm2"]
    assert status["version"]
    vm1 = await world.retained(f"{world.base}/guest/vm1/status")
    assert vm1["state"] == "connected"
    assert vm1["qemu"] == installed_qemu_version()
    assert vm1["machine"].startswith("pc-i440fx-")
    assert vm1["since"] <= time.time()
    ghost = await world.retained(f"{world.base}/guest/ghost/status")
    assert ghost["state"] == "disconnected"
    nics = await world.retained(f"{world.base}/guest/vm2/nics")
    assert set(nics) == {"nics"}


async def test_every_op(world: World, probe: Probe) -> None:
    base = world.base
    since = probe.mark()
    spec = {"model": "e1000", "id": "op1", "mac": "52:54:00:12:34:01", "backend": {"type": "user"}}
    answer = await probe.call(world.guest_topic("vm1", "nic/add"), {"transaction": "op-add", "nic": spec})
    reply = next(m for m in probe.messages[since:] if transaction_in(m) == "op-add")
    assert not reply.retain
    if world.mode.v5:
        assert reply.correlation is not None  # echoed: Probe.call matched on it
    else:
        assert reply.topic == f"{base}/guest/vm1/response/nic/add"
    assert answer["transaction"] == "op-add"
    nic = ok(answer)
    assert nic["id"] == "op1"
    assert nic["model"] == "e1000"
    assert nic["mac"] == "52:54:00:12:34:01"
    assert nic["pci"]["bus"] == "pci.0"
    assert (nic["link"], nic["state"]) == ("up", "active")
    added = await probe.one(f"{base}/guest/vm1/event/nic_added", since=since)
    assert added.json["id"] == "op1"
    assert added.json["nic"]["mac"] == "52:54:00:12:34:01"
    assert added.json["ts"] == pytest.approx(time.time(), abs=30)
    state = await probe.one(f"{base}/guest/vm1/nics", lambda m: "op1" in str(m.json), since=since)
    assert [n["id"] for n in state.json["nics"] if n["id"] == "op1"] == ["op1"]

    since = probe.mark()
    nic = ok(await probe.call(world.guest_topic("vm1", "nic/link"), {"id": "op1", "up": False}))
    assert nic["link"] == "down"
    changed = await probe.one(f"{base}/guest/vm1/event/link_changed", since=since)
    assert changed.json["nic"]["link"] == "down"
    await probe.one(
        f"{base}/guest/vm1/nics",
        lambda m: any(n["id"] == "op1" and n["link"] == "down" for n in m.json["nics"]),
        since=since,
    )

    listed = ok(await probe.call(world.guest_topic("vm1", "nic/list"), {}))
    (found,) = [n for n in listed["nics"] if n["id"] == "op1"]
    assert (found["link"], found["backend"]["type"]) == ("down", "user")

    models = ok(await probe.call(world.guest_topic("vm1", "models"), {}))["models"]
    names = {m["name"]: m for m in models}
    assert {"e1000", "e1000e", "rtl8139", "virtio-net-pci"} <= set(names)
    assert names["e1000e"]["bus"] == "pcie"
    assert names["virtio-net-pci"]["hotplug"] is True

    since = probe.mark()
    removed = ok(await probe.call(world.guest_topic("vm1", "nic/del"), {"id": "op1", "timeout": 0.2}))
    assert removed == {"id": "op1", "state": "removal_pending"}  # no guest OS acknowledges the unplug
    pending = await probe.one(f"{base}/guest/vm1/event/nic_removal_pending", since=since)
    assert pending.json["id"] == "op1"
    await probe.one(
        f"{base}/guest/vm1/nics",
        lambda m: any(n["id"] == "op1" and n["state"] == "removal_pending" for n in m.json["nics"]),
        since=since,
    )

    guests = ok(await probe.call(f"{base}/request/guests", {"transaction": "g"}))["guests"]
    states = {g["name"]: g["state"] for g in guests}
    assert states == {"ghost": "disconnected", "vm1": "connected", "vm2": "connected"}


@pytest.mark.parametrize(("op", "body", "event"), [
    ("nic/add", {"nic": {"id": "ord-add", "model": "rtl8139"}}, "nic_added"),
    ("nic/link", {"id": "ord-link", "up": False}, "link_changed"),
    ("nic/del", {"id": "ord-del", "timeout": 0.1}, "nic_removal_pending"),  # answered removal_pending
])  # fmt: skip
async def test_each_op_answers_first_then_state_then_event(
    world: World, probe: Probe, op: str, body: dict[str, Any], event: str
) -> None:
    base = world.base
    if op != "nic/add":
        since = probe.mark()
        ok(await probe.call(world.guest_topic("vm2", "nic/add"), {"nic": {"id": body["id"], "model": "rtl8139"}}))
        await probe.one(f"{base}/guest/vm2/event/nic_added", since=since)  # the set-up's messages are all in
    since = probe.mark()
    transaction = f"order-{op}"
    ok(await probe.call(world.guest_topic("vm2", op), {"transaction": transaction, **body}))
    await probe.one(f"{base}/guest/vm2/event/{event}", since=since)
    arrived = probe.messages[since:]
    answer = next(n for n, m in enumerate(arrived) if transaction_in(m) == transaction)
    state = next(n for n, m in enumerate(arrived) if m.matches(f"{base}/guest/vm2/nics") and not m.retain)
    happened = next(n for n, m in enumerate(arrived) if m.matches(f"{base}/guest/vm2/event/{event}"))
    assert answer < state < happened, [m.topic for m in arrived]


@pytest.mark.parametrize("model", ["virtio", "e1000", "e1000e", "rtl8139"])
async def test_hot_add_each_model(world: World, probe: Probe, model: str) -> None:
    nic = ok(await probe.call(world.guest_topic("vm2", "nic/add"), {"nic": {"model": model, "id": f"m-{model}"}}))
    assert nic["model"] == ("virtio-net-pci" if model == "virtio" else model)
    assert nic["mac"].startswith("52:54:00:")
    # The retained state follows the answer: wait for it rather than read it at once.
    await wait_retained(
        world.url, f"{world.base}/guest/vm2/nics", lambda s: f"m-{model}" in {n["id"] for n in s["nics"]},
        protocol=world.mode.probe,
    )  # fmt: skip


async def test_mqtt311_client_is_answered_through_transaction(world: World) -> None:
    base = world.base
    async with Probe(world.url, protocol=3) as old:
        await old.subscribe(f"{base}/guest/vm1/response/#")
        since = old.mark()
        await old.publish(world.guest_topic("vm1", "nic/add"), {"transaction": "v311-add", "nic": {"id": "v311"}})
        await old.publish(world.guest_topic("vm1", "nic/list"), {"transaction": "v311-list"})
        add, listing = await old.wait(f"{base}/guest/vm1/response/#", since=since, count=2)
    assert add.topic == f"{base}/guest/vm1/response/nic/add"
    assert listing.topic == f"{base}/guest/vm1/response/nic/list"
    assert add.json["transaction"] == "v311-add"
    assert ok(add.json)["id"] == "v311"
    assert listing.json["transaction"] == "v311-list"
    assert "v311" in {n["id"] for n in ok(listing.json)["nics"]}


async def test_duplicate_transaction_is_applied_once(world: World, probe: Probe) -> None:
    before = len(ok(await probe.call(world.guest_topic("vm1", "nic/list"), {}))["nics"])
    since = probe.mark()
    request = {"transaction": "dup-1", "nic": {"model": "virtio"}}  # no id: a second add would make a second NIC
    topic = world.guest_topic("vm1", "nic/add")
    await probe.ensure(answer_topic(topic))
    await probe.publish(topic, request)  # answered on the default topic in either version
    await probe.publish(topic, request)
    third = await probe.call(topic, request)
    firsts = await probe.wait(answer_topic(topic), lambda m: transaction_in(m) == "dup-1", since=since, count=2)
    assert [m.json for m in firsts][:2] == [third, third]
    assert third["transaction"] == "dup-1"
    nics = ok(await probe.call(world.guest_topic("vm1", "nic/list"), {}))["nics"]
    assert len(nics) == before + 1
    added = probe.received(f"{world.base}/guest/vm1/event/nic_added", since)
    assert [m.json["id"] for m in added] == [ok(third)["id"]]


@pytest.mark.parametrize("mode", [MOSQUITTO_5], indirect=True, ids=str)  # 3.1.1: test_mqtt_faults.py
async def test_a_retained_request_is_never_executed_in_mqtt5_and_is_deleted(world: World, probe: Probe) -> None:
    topic = world.guest_topic("vm1", "nic/add")
    since = probe.mark()
    await probe.ensure(answer_topic(topic))
    await probe.publish(topic, {"transaction": "kept", "nic": {"id": "kept"}}, retain=True)
    answer = (await probe.one(answer_topic(topic), lambda m: transaction_in(m) == "kept", since=since)).json
    body = error(answer, "invalid_request")
    assert "retain" in body["message"]
    # A later request's answer is the positive signal that nothing more came of the retained one.
    ok(await probe.call(world.guest_topic("vm1", "nic/list"), {"transaction": "after-kept"}))
    assert len([m for m in probe.received(answer_topic(topic), since) if transaction_in(m) == "kept"]) == 1
    assert await world.retained(topic) is None  # the controller deleted the retained copy
    nics = ok(await probe.call(world.guest_topic("vm1", "nic/list"), {}))["nics"]
    assert "kept" not in {n["id"] for n in nics}
    assert not probe.received(f"{world.base}/guest/vm1/event/nic_added", since)


class Bad(NamedTuple):
    path: str  # below the controller's base
    payload: bytes
    code: str
    field: str | None


ADD = "guest/vm1/request/nic/add"


@pytest.mark.parametrize(
    "bad",
    [
        Bad(ADD, b"{not json", "invalid_request", None),
        Bad(ADD, b"[1, 2]", "invalid_request", None),
        Bad(ADD, b'{"nic": {"model": "e1000"}, "x": NaN}', "invalid_request", None),
        Bad(ADD, b'{"pad": "' + b"x" * 70_000 + b'"}', "invalid_request", None),
        Bad("guest/nosuch/request/nic/list", b"{}", "not_found", "guest"),
        Bad("guest/vm1/request/nic/frobnicate", b"{}", "invalid_request", "op"),
        Bad("request/nic/list", b"{}", "invalid_request", "op"),
        Bad(ADD, b"{}", "invalid_request", "nic"),
        Bad(ADD, b'{"nic": {"mac": "zz"}}', "invalid_request", "nic.mac"),
        Bad(ADD, b'{"nic": {"model": "pcnet"}}', "invalid_request", "nic.model"),
        Bad(ADD, b'{"nic": {"backend": {"type": "user", "hostfwd": ["x"]}}}',
            "invalid_request", "nic.backend.hostfwd.0"),
        Bad(ADD, b'{"nic": {}, "bogus": 1}', "invalid_request", "bogus"),
        Bad("guest/vm1/request/nic/link", b'{"id": "op1", "up": "yes"}', "invalid_request", "up"),
        Bad("guest/vm1/request/nic/del", b'{"id": "no such"}', "invalid_request", "id"),
        Bad("guest/vm1/request/nic/del", b'{"id": "nosuch"}', "not_found", "id"),
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
    answer = await probe.call(f"{world.base}/{bad.path}", bad.payload)
    body = error(answer, bad.code)
    assert body.get("field") == bad.field
    assert body["message"]


async def test_bad_request_echoes_its_transaction(world: World, probe: Probe) -> None:
    answer = await probe.call(world.guest_topic("vm1", "nic/add"), {"transaction": "t-bad", "nic": {"mac": "zz"}})
    error(answer, "invalid_request")
    assert answer["transaction"] == "t-bad"


@pytest.mark.parametrize("mode", [MOSQUITTO_5], indirect=True, ids=str)
async def test_response_topic_that_would_spoof_state_is_refused(world: World) -> None:
    base = world.base
    async with world.probe() as client:
        await client.subscribe(f"{base}/guest/vm1/response/#", f"{base}/guest/vm1/status")
        since = client.mark()
        await client.publish(
            world.guest_topic("vm1", "nic/list"), {"transaction": "spoof"}, response_topic=f"{base}/guest/vm1/status"
        )
        answer = (await client.one(f"{base}/guest/vm1/response/nic/list", since=since)).json
        assert error(answer, "invalid_request")["field"] == "response_topic"
        assert not [m for m in client.received(f"{base}/guest/vm1/status", since) if not m.retain]


async def test_unavailable_guest_fails_fast(world: World, probe: Probe) -> None:
    answer = await probe.call(world.guest_topic("ghost", "nic/add"), {"transaction": "ghost-1", "nic": {}})
    body = error(answer, "guest_unavailable")
    assert "ghost" in body["message"]
    # Answered from the state the controller knows (no connection attempt, no wait): "guest ghost is <state>: ...".
    assert body["message"].startswith("guest ghost is "), body["message"]


async def test_fifty_concurrent_requests_to_one_guest_run_in_order(world: World, probe: Probe) -> None:
    topic = world.guest_topic("vm2", "nic/link")
    ok(await probe.call(world.guest_topic("vm2", "nic/add"), {"nic": {"id": "seq", "model": "e1000"}}))
    answers = probe.response_topic if world.mode.v5 else answer_topic(topic)
    await probe.ensure(answers)
    since = probe.mark()
    started = time.monotonic()
    for n in range(50):
        body = {"transaction": f"seq-{n:02d}", "id": "seq", "up": n % 2 == 0}
        if world.mode.v5:
            await probe.publish(topic, body, response_topic=answers, correlation=f"{n}".encode())
        else:
            await probe.publish(topic, body)
    replies = await probe.wait(
        answers, lambda m: (transaction_in(m) or "").startswith("seq-"), since=since, count=50, timeout=20
    )
    elapsed = time.monotonic() - started
    assert [r.json["transaction"] for r in replies] == [f"seq-{n:02d}" for n in range(50)]
    if world.mode.v5:
        assert [r.correlation for r in replies] == [f"{n}".encode() for n in range(50)]
    assert [ok(r.json)["link"] for r in replies] == ["up" if n % 2 == 0 else "down" for n in range(50)]
    # Each event follows its answer (the controller publishes the answer first): wait for the last ones.
    changes = await probe.wait(f"{world.base}/guest/vm2/event/link_changed", since=since, count=50)
    assert [m.json["nic"]["link"] for m in changes] == ["up" if n % 2 == 0 else "down" for n in range(50)]
    print(f"{world.mode}: 50 link requests to one guest answered in {elapsed * 1000:.0f} ms")  # noqa: T201


async def test_requests_to_two_guests_run_in_parallel(world: World, probe: Probe) -> None:
    for guest in ("vm1", "vm2"):
        ok(await probe.call(world.guest_topic(guest, "nic/add"), {"nic": {"id": "par", "model": "rtl8139"}}))
    # Each nic/del waits this long in its guest's lane for an unplug ack that never comes: vm1's three times as
    # long as vm2's, so vm2's answer comes first only if the two guests' lanes run at the same time.
    hold = 1.0
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("vm1", "nic/del", {"transaction": "par-del1", "id": "par", "timeout": 3 * hold}),
        ("vm2", "nic/del", {"transaction": "par-del2", "id": "par", "timeout": hold}),
        ("vm1", "nic/list", {"transaction": "par-list1"}),  # published after vm1's nic/del: queued behind it
    ]
    for guest, op, _ in requests:
        await probe.ensure(answer_topic(world.guest_topic(guest, op)))
    since = probe.mark()
    started = time.monotonic()
    for guest, op, body in requests:  # each publish waits for its PUBACK: the broker has them in this order
        await probe.publish(world.guest_topic(guest, op), body)
    answers = await probe.wait(
        f"{world.base}/guest/+/response/#", lambda m: (transaction_in(m) or "").startswith("par-"),
        since=since, count=3, timeout=10,
    )  # fmt: skip
    total = time.monotonic() - started
    order = [transaction_in(m) for m in answers]
    assert order == ["par-del2", "par-del1", "par-list1"], order  # parallel across guests, serial per guest
    print(f"{world.mode}: two guests' deletes answered in {total:.2f} s")  # noqa: T201 - the figure, not a bound


async def test_events_are_not_retained_and_state_is(world: World) -> None:
    base = world.base
    async with world.probe() as late:
        await late.subscribe(f"{base}/guest/vm1/event/#", f"{base}/guest/vm1/nics", f"{base}/guest/vm1/status")
        # The answer to a later request comes after every retained message of those subscriptions.
        ok(await late.call(world.guest_topic("vm1", "models"), {"transaction": "late-marker"}))
        before = late.messages[: next(n for n, m in enumerate(late.messages) if transaction_in(m) == "late-marker")]
        assert not [m for m in before if m.matches(f"{base}/guest/vm1/event/#")]
        assert [m.retain for m in before if m.matches(f"{base}/guest/vm1/nics")] == [True]
        assert [m.retain for m in before if m.matches(f"{base}/guest/vm1/status")] == [True]


async def test_request_payload_exactly_json_object(world: World, probe: Probe) -> None:
    raw = json.dumps({"transaction": "ünïcode-✓"}).encode()
    answer = await probe.call(world.guest_topic("vm2", "nic/list"), raw)
    assert answer["transaction"] == "ünïcode-✓"
    ok(answer)
