"""Faults around ``qmpnet serve``: the controller killed, stopped or restarted, QEMU killed and restarted, the broker
restarted (also under a stream of requests), retained requests, names a broker would rewrite, guest sockets
appearing and disappearing. Each test runs its own controller (and QEMU) under a topic root of its own; tests that
restart the broker start their own mosquitto, the others use the mode's broker.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING, Any, cast

import needs
import pytest
from aux_qmp import aux_args, aux_monitor
from mqtt_fixtures import (
    MODES,
    MOSQUITTO_5,
    MOSQUITTO_311,
    RABBITMQ,
    HotAddStream,
    Mode,
    Mosquitto,
    Probe,
    Process,
    Qemu,
    RabbitMQ,
    Serve,
    answer_topic,
    broker_for,
    client_settings,
    fresh_root,
    retained,
    scratch,
    transaction_in,
    wait_online,
    wait_retained,
)

import qmpnet
from qmpnet.client import Client

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator
    from pathlib import Path

    #: ``await start_serve(mode, url, name, guests, **more)``: see the ``start_serve`` fixture.
    StartServe = Callable[..., Awaitable[Serve]]

pytestmark = [pytest.mark.integration]

MOSQUITTO_MODES = (MOSQUITTO_5, MOSQUITTO_311)
V311_MODES = (MOSQUITTO_311, RABBITMQ)


@pytest.fixture
def work() -> Iterator[Path]:
    with scratch("qmpnet-fault-") as path:
        yield path


@pytest.fixture
def cleanup() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in reversed(started):
        process.kill()


def ok(answer: dict[str, Any]) -> Any:
    assert answer["status"] == "ok", answer
    return answer["data"]


def serve_on(mode: Mode, url: str, work: Path, name: str, guests: dict[str, Path] | None = None, **more: Any) -> Serve:
    return Serve(work, url, name, guests, root=more.pop("root", fresh_root()), protocol=mode.protocol, **more)


@pytest.fixture
def vm(work: Path, cleanup: list[Process]) -> Qemu:
    """A QEMU ``-S`` (no guest OS) at ``work/vm.qmp``, started, and killed after the test."""
    qemu = Qemu(work / "vm.qmp")
    cleanup.append(qemu.start())
    return qemu


@pytest.fixture
def start_serve(work: Path, cleanup: list[Process]) -> StartServe:
    """Start ``qmpnet serve`` under a topic root of its own (killed after the test); wait until it is online."""

    async def start(mode: Mode, url: str, name: str, guests: dict[str, Path] | None = None, **more: Any) -> Serve:
        serve = serve_on(mode, url, work, name, guests, **more)
        cleanup.append(serve.start())
        await wait_online(serve, url, guests_connected=sorted(guests or {}), protocol=mode.probe)
        return serve

    return start


@pytest.mark.parametrize("mode", MODES, ids=str)
async def test_sigkilled_controller_leaves_its_will_offline(
    mode: Mode, work: Path, start_serve: StartServe, request: pytest.FixtureRequest
) -> None:
    with broker_for(mode, work, request) as broker:
        serve = await start_serve(mode, broker.url, "k1")
        serve.kill()
        status = await wait_retained(
            broker.url, f"{serve.base}/status", lambda s: s["state"] == "offline", timeout=5, protocol=mode.probe
        )
        assert status == {"state": "offline"}


@pytest.mark.parametrize("mode", MODES, ids=str)
async def test_sigterm_publishes_offline_and_exits_cleanly(
    mode: Mode, work: Path, vm: Qemu, start_serve: StartServe, request: pytest.FixtureRequest
) -> None:
    with broker_for(mode, work, request) as broker:
        serve = await start_serve(mode, broker.url, "t1", {"vm": vm.qmp})
        async with Probe(broker.url, protocol=mode.probe) as probe:
            marker = f"{serve.root}/marker"
            await probe.subscribe(f"{serve.base}/status", marker)
            await probe.one(f"{serve.base}/status")
            since = probe.mark()
            started = time.monotonic()
            serve.signal(signal.SIGTERM)
            offline = await probe.one(f"{serve.base}/status", lambda m: m.json["state"] == "offline", since=since)
            assert offline.json == {"state": "offline"}
            assert serve.wait(5) == 0, serve.describe()
            print(f"{mode}: SIGTERM to exit {time.monotonic() - started:.2f} s")  # noqa: T201 - the figure, not a bound
            # The broker would send the will when it sees the connection go; a message published after the
            # controller exited comes after that.
            await probe.publish(marker, b"after")
            await probe.one(marker, since=since)
            assert len(probe.received(f"{serve.base}/status", since)) == 1  # no will on top of the clean goodbye
    assert vm.running


async def test_qemu_killed_then_restarted_on_the_same_socket(
    work: Path, vm: Qemu, start_serve: StartServe, request: pytest.FixtureRequest
) -> None:
    mode = MOSQUITTO_5
    with broker_for(mode, work, request) as broker:
        base = (await start_serve(mode, broker.url, "q1", {"vm": vm.qmp})).base
        async with Probe(broker.url) as probe:
            await probe.subscribe(f"{base}/guest/vm/status", f"{base}/guest/vm/event/#")
            before = ok(await probe.call(f"{base}/guest/vm/request/nic/add", {"nic": {"id": "before"}}))
            since = probe.mark()
            vm.kill()
            await probe.one(f"{base}/guest/vm/status", lambda m: m.json["state"] == "disconnected", since=since)
            status = await retained(broker.url, f"{base}/guest/vm/status", marker=f"{base}/status")
            assert status["state"] == "disconnected"
            await probe.one(f"{base}/guest/vm/event/guest_disconnected", since=since)

            answer = await probe.call(f"{base}/guest/vm/request/nic/list", {"transaction": "while-down"})
            assert answer["status"] == "error"
            assert answer["error"]["code"] == "guest_unavailable"
            # Answered at once from the state the controller knows, without waiting for QEMU to come back.
            assert answer["error"]["message"].startswith("guest vm is "), answer

            since = probe.mark()
            vm.start()
            await probe.one(f"{base}/guest/vm/status", lambda m: m.json["state"] == "connected", since=since)
            await probe.one(f"{base}/guest/vm/event/guest_connected", since=since)
            # A new QEMU: the old NIC went with the old process, and the controller adds it back (the stored desired
            # set has it, since nic/add put it there), with the same MAC and PCI address.
            await probe.one(f"{base}/guest/vm/event/reconciled", since=since, timeout=10)
            nics = ok(await probe.call(f"{base}/guest/vm/request/nic/list", {}))["nics"]
            assert [(n["id"], n["mac"], n["pci"]) for n in nics] == [("before", before["mac"], before["pci"])]
            state = await wait_retained(broker.url, f"{base}/guest/vm/nics", lambda s: len(s["nics"]) == 1)
            assert state["nics"][0]["mac"] == before["mac"]
            ok(await probe.call(f"{base}/guest/vm/request/nic/add", {"nic": {"id": "after"}}))


@pytest.mark.parametrize("mode", MOSQUITTO_MODES, ids=str)
async def test_broker_restart_controller_comes_back_and_republishes(
    mode: Mode, work: Path, cleanup: list[Process], vm: Qemu, start_serve: StartServe
) -> None:
    own = Mosquitto(work)  # persistence off: a restart forgets every retained message
    cleanup.append(own.start())
    serve = await start_serve(mode, own.url, "b1", {"vm": vm.qmp})
    base = serve.base
    async with Probe(own.url, protocol=mode.probe) as probe:
        ok(await probe.call(f"{base}/guest/vm/request/nic/add", {"nic": {"id": "kept"}}))
    await wait_retained(own.url, f"{base}/guest/vm/nics", lambda s: len(s["nics"]) == 1, protocol=mode.probe)
    own.stop()
    own.start()
    status = await wait_retained(own.url, f"{base}/status", lambda s: s["state"] == "online", protocol=mode.probe)
    assert status["guests"] == ["vm"]
    guest = await wait_retained(own.url, f"{base}/guest/vm/status", lambda _: True, timeout=5, protocol=mode.probe)
    assert guest["state"] == "connected"
    nics = await wait_retained(own.url, f"{base}/guest/vm/nics", lambda _: True, timeout=5, protocol=mode.probe)
    assert [n["id"] for n in nics["nics"]] == ["kept"]
    async with Probe(own.url, protocol=mode.probe) as probe:
        listed = ok(await probe.call(f"{base}/guest/vm/request/nic/list", {"transaction": "after-restart"}))
        assert [n["id"] for n in listed["nics"]] == ["kept"]
    assert serve.running, serve.describe()


@pytest.mark.parametrize("mode", MODES, ids=str)
async def test_requests_published_while_the_controller_is_stopped_are_answered_when_it_starts(
    mode: Mode, work: Path, vm: Qemu, start_serve: StartServe, request: pytest.FixtureRequest
) -> None:
    with broker_for(mode, work, request) as broker:
        serve = await start_serve(mode, broker.url, "p1", {"vm": vm.qmp})  # online: its session exists
        base = serve.base
        serve.stop()
        topic = f"{base}/guest/vm/request/nic/add"
        async with Probe(broker.url, protocol=mode.probe) as probe:
            await probe.subscribe(answer_topic(topic))
            for n in range(3):  # QoS 1, published while nobody serves h1: the broker queues them in its session
                await probe.publish(topic, {"transaction": f"queued-{n}", "nic": {"id": f"queued{n}"}})
            serve.start()
            answers = await probe.wait(answer_topic(topic), count=3, timeout=15)
        assert [m.json["transaction"] for m in answers] == ["queued-0", "queued-1", "queued-2"]
        assert [ok(m.json)["id"] for m in answers] == ["queued0", "queued1", "queued2"]
        async with Probe(broker.url, protocol=mode.probe) as probe:
            listed = ok(await probe.call(f"{base}/guest/vm/request/nic/list", {}))
        assert sorted(n["id"] for n in listed["nics"]) == ["queued0", "queued1", "queued2"]


@pytest.mark.parametrize("mode", MOSQUITTO_MODES, ids=str)
async def test_an_answer_produced_while_the_broker_is_away_is_sent_after_the_reconnect(
    mode: Mode, work: Path, cleanup: list[Process], vm: Qemu, start_serve: StartServe
) -> None:
    own = Mosquitto(work, persistence=True)  # sessions (the probe's, the controller's) survive the restart
    cleanup.append(own.start())
    serve = await start_serve(mode, own.url, "a1", {"vm": vm.qmp}, env={"QMPNET_LOG__LEVEL": "DEBUG"})
    base = serve.base
    topic = f"{base}/guest/vm/request/nic/del"
    probe_id = f"probe-away-{mode.probe}"
    async with Probe(own.url, protocol=mode.probe, identifier=probe_id, session=300) as probe:
        ok(await probe.call(f"{base}/guest/vm/request/nic/add", {"nic": {"id": "slow"}}))
        await probe.subscribe(answer_topic(topic))
        # The unplug is never acknowledged (no guest OS): the answer comes after 2 s, while the broker is down.
        await probe.publish(topic, {"transaction": "away", "id": "slow", "timeout": 2})
        # A controller-level request does not wait for the guest's lane; its answer shows "away" has arrived.
        ok(await probe.call(f"{base}/request/guests", {"transaction": "in-order"}))
    own.stop()
    await asyncio.to_thread(serve.wait_log, "transaction=away -> ok")  # answered with no broker to send it to
    own.start()
    async with Probe(own.url, protocol=mode.probe, identifier=probe_id, session=300) as probe:
        answer = await probe.one(answer_topic(topic), lambda m: transaction_in(m) == "away", timeout=15)
    assert ok(answer.json) == {"id": "slow", "state": "removal_pending"}


@pytest.mark.parametrize("mode", MOSQUITTO_MODES, ids=str)
async def test_a_broker_restart_under_a_stream_of_requests_loses_none_and_applies_none_twice(
    mode: Mode, work: Path, cleanup: list[Process], start_serve: StartServe
) -> None:
    own = Mosquitto(work, persistence=True)
    cleanup.append(own.start())
    (work / "vm").mkdir()
    vm = Qemu(work / "vm" / "vm.qmp", extra=aux_args(work / "vm"))
    cleanup.append(vm.start())
    root = fresh_root()
    await start_serve(mode, own.url, "s1", {"vm": vm.qmp}, root=root)
    count = 20  # a -S pc guest has ~30 free slots

    async with Client(settings=client_settings(own.url, mode, root), timeout=30) as client:
        stream = HotAddStream(client, "s1", "vm", count)
        await stream.answered(5)
        await asyncio.to_thread(own.stop)  # SIGTERM: mosquitto saves its sessions and queued messages
        await asyncio.to_thread(own.start)
        results = await stream.results()
    failed = [r for r in results if not isinstance(r, qmpnet.Nic)]
    assert all(isinstance(r, qmpnet.OutcomeUnknown | qmpnet.GuestUnavailable) for r in failed), failed
    added = {r.id for r in results if isinstance(r, qmpnet.Nic)}
    assert len(added) == count - len(failed)
    async with aux_monitor(work / "vm") as aux:  # QEMU's own view, not qmpnet's
        peripherals = cast("list[dict[str, str]]", await aux.execute("qom-list", {"path": "/machine/peripheral"}))
    in_qemu = {p["name"] for p in peripherals if p["type"].startswith("child<")}
    assert added <= in_qemu
    assert len(in_qemu) <= count  # none applied twice: QEMU itself has no extra NIC
    assert not failed, f"{len(failed)} of {count} requests reported failed: {failed}"
    assert in_qemu == added


@pytest.mark.parametrize("mode", V311_MODES, ids=str)
async def test_a_retained_request_in_311_runs_at_most_once_and_never_after_a_restart(
    mode: Mode, work: Path, vm: Qemu, start_serve: StartServe, request: pytest.FixtureRequest
) -> None:
    with broker_for(mode, work, request) as broker:
        serve = await start_serve(mode, broker.url, "r1", {"vm": vm.qmp})
        base = serve.base
        topic = f"{base}/guest/vm/request/nic/add"
        async with Probe(broker.url, protocol=3) as probe:
            await probe.subscribe(answer_topic(topic))
            await probe.publish(topic, {"transaction": "kept311", "nic": {"id": "kept311"}}, retain=True)
            first = await probe.one(answer_topic(topic), lambda m: transaction_in(m) == "kept311")
            assert ok(first.json)["id"] == "kept311"  # 3.1.1 shows no retain flag on a live publish: executed
            assert await retained(broker.url, topic, marker=f"{base}/status", protocol=3) is None  # deleted
            since = probe.mark()
            serve.restart()
            await wait_online(serve, broker.url, guests_connected=["vm"], protocol=3)
            listed = ok(await probe.call(f"{base}/guest/vm/request/nic/list", {"transaction": "after-restart"}))
            assert [transaction_in(m) for m in probe.received(answer_topic(topic), since)] == []
            assert [n["id"] for n in listed["nics"]] == ["kept311"]


@pytest.mark.parametrize("mode", V311_MODES, ids=str)
async def test_a_stored_retained_request_in_311_is_never_executed_nor_answered(
    mode: Mode, work: Path, cleanup: list[Process], vm: Qemu, request: pytest.FixtureRequest
) -> None:
    with broker_for(mode, work, request) as broker:
        serve = serve_on(mode, broker.url, work, "r2", {"vm": vm.qmp})  # never started yet: it has no session
        base = serve.base
        topic = f"{base}/guest/vm/request/nic/add"
        async with Probe(broker.url, protocol=3) as probe:
            await probe.subscribe(answer_topic(topic))
            await probe.publish(topic, {"transaction": "stored", "nic": {"id": "stored"}}, retain=True)
            cleanup.append(serve.start())
            await wait_online(serve, broker.url, guests_connected=["vm"], protocol=3)
            listed = ok(await probe.call(f"{base}/guest/vm/request/nic/list", {"transaction": "later"}))
            assert [transaction_in(m) for m in probe.received(answer_topic(topic))] == []
            assert listed["nics"] == []
        if mode.broker == "mosquitto":  # RabbitMQ never hands retained messages to the controller's wildcards
            await asyncio.to_thread(serve.wait_log, "ignoring a retained request")
            assert await retained(broker.url, topic, marker=f"{base}/status", protocol=3) is None


@pytest.mark.parametrize("mode", [RABBITMQ], ids=str)
async def test_a_forced_mqtt5_controller_on_a_311_broker_exits_saying_why(
    mode: Mode, work: Path, request: pytest.FixtureRequest
) -> None:
    with broker_for(mode, work, request) as broker:
        env = {"QMPNET_MQTT__CONNECT_TIMEOUT": "1", "QMPNET_MQTT__MAX_REFUSALS": "2"}
        serve = Serve(work, broker.url, "f5", root=fresh_root(), protocol="5", env=env).start()
        try:
            assert await asyncio.to_thread(serve.wait, 30) == 1, serve.describe()
        finally:
            serve.kill()
    lines = serve.log.read_text().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, lines
    assert "does not speak MQTT 5" in errors[0]
    assert errors[0].startswith(f"error: guest_unavailable: cannot connect to the broker at {broker.url}")


@pytest.mark.parametrize("mode", [RABBITMQ], ids=str)
async def test_a_dotted_host_name_becomes_a_topic_safe_default_id(
    mode: Mode, work: Path, cleanup: list[Process], vm: Qemu, request: pytest.FixtureRequest
) -> None:
    needs.require(os.geteuid() == 0 and shutil.which("unshare") is not None,
                  "needs root and unshare(1) to give the controller a host name of its own")  # fmt: skip
    with broker_for(mode, work, request) as broker:
        assert isinstance(broker, RabbitMQ)  # which maps '.' in a topic level to '/'
        root = fresh_root()
        serve = Serve(work, broker.url, "h1-lab-example", root=root)  # the id the controller must pick itself
        script = f'hostname h1.lab.example && exec "$0" -m qmpnet serve --broker {broker.url} --guest vm={vm.qmp}'
        serve.spawn(["unshare", "--uts", "sh", "-c", script, sys.executable], env=serve.env)
        cleanup.append(serve)
        await wait_online(serve, broker.url, guests_connected=["vm"], protocol=3)
        async with Probe(broker.url, protocol=3) as probe:
            listed = ok(await probe.call(f"{root}/h1-lab-example/guest/vm/request/nic/list", {}))
        assert listed == {"nics": []}


@pytest.mark.parametrize("mode", MODES, ids=str)
async def test_a_retained_desired_set_reaches_a_starting_controller_on_every_broker(
    mode: Mode, work: Path, cleanup: list[Process], vm: Qemu, request: pytest.FixtureRequest
) -> None:
    with broker_for(mode, work, request) as broker:
        serve = serve_on(mode, broker.url, work, "w1", {"vm": vm.qmp})
        desired = f"{serve.base}/guest/vm/desired"
        async with Probe(broker.url, protocol=mode.probe) as probe:
            document = {"generation": 1, "nics": [{"id": "wanted", "model": "e1000"}]}
            await probe.publish(desired, document, retain=True)  # before the controller ever ran
            cleanup.append(serve.start())
            # RabbitMQ hands retained messages only to exact subscriptions: the controller makes one per guest.
            await wait_online(serve, broker.url, guests_connected=["vm"], protocol=mode.probe)
            nics = await wait_retained(
                broker.url, f"{serve.base}/guest/vm/nics", lambda s: "wanted" in {n["id"] for n in s["nics"]},
                protocol=mode.probe,
            )  # fmt: skip
            assert [n["id"] for n in nics["nics"]] == ["wanted"]
            await probe.publish(desired, b"", retain=True)


@pytest.mark.parametrize("mode", MOSQUITTO_MODES, ids=str)
async def test_the_client_reconnects_after_a_broker_restart(
    mode: Mode, work: Path, cleanup: list[Process], vm: Qemu, start_serve: StartServe
) -> None:
    own = Mosquitto(work)
    cleanup.append(own.start())
    root = fresh_root()
    await start_serve(mode, own.url, "c1", {"vm": vm.qmp}, root=root)
    async with Client(settings=client_settings(own.url, mode, root), timeout=15) as client:
        assert (await client.add_nic("c1", "vm", {"id": "one"})).id == "one"
        await asyncio.to_thread(own.stop)
        await asyncio.to_thread(own.start)
        assert (await client.add_nic("c1", "vm", {"id": "two"})).id == "two"  # reconnected, subscribed again
        assert sorted(n.id for n in await client.list_nics("c1", "vm")) == ["one", "two"]


def _bound(path: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    return server


async def test_guest_directory_sockets_come_and_go(
    work: Path, cleanup: list[Process], request: pytest.FixtureRequest
) -> None:
    mode = MOSQUITTO_5
    guests = work / "guests"
    guests.mkdir()
    first = Qemu(guests / "alpha.qmp")
    cleanup.append(first.start())
    (guests / "notes.qmp").write_text("not a socket")
    dotted = _bound(guests / "vm.lab.qmp")  # a name a broker would rewrite: skipped, logged once
    with broker_for(mode, work, request) as broker, dotted:
        url = broker.url
        serve = serve_on(mode, url, work, "d1", args=["--guest-dir", str(guests), "--guest", "static=/nonexistent.qmp"])
        cleanup.append(serve.start())
        base = serve.base
        await wait_online(serve, url, guests_connected=["alpha"])
        status = await retained(url, f"{base}/status", marker=f"{base}/status")
        assert status["guests"] == ["alpha", "static"]

        second = Qemu(guests / "beta.qmp")
        cleanup.append(second.start())
        status = await wait_retained(url, f"{base}/status", lambda s: "beta" in s["guests"], timeout=5)
        assert status["guests"] == ["alpha", "beta", "static"]
        await wait_retained(url, f"{base}/guest/beta/status", lambda s: s["state"] == "connected", timeout=5)

        first.stop()  # a clean QEMU exit removes its socket: the guest is dropped, its retained state deleted
        status = await wait_retained(url, f"{base}/status", lambda s: "alpha" not in s["guests"], timeout=5)
        assert status["guests"] == ["beta", "static"]
        assert await retained(url, f"{base}/guest/alpha/status", marker=f"{base}/status") is None
        assert await retained(url, f"{base}/guest/alpha/nics", marker=f"{base}/status") is None
        skipped = [line for line in serve.log.read_text().splitlines() if "vm.lab.qmp" in line]
        assert len(skipped) == 1, skipped  # many scans later, still one line
        assert "not a valid guest name" in skipped[0]


async def test_a_state_interval_publishes_a_burst_of_hot_adds_as_its_latest_nic_list(
    work: Path, cleanup: list[Process], vm: Qemu, start_serve: StartServe
) -> None:
    """``mqtt.state_interval``: each add's answer and event at once, the NIC list once more at the interval's end."""
    own = Mosquitto(work)
    cleanup.append(own.start())
    mode = MOSQUITTO_5
    env = {"QMPNET_MQTT__STATE_INTERVAL": "3"}  # longer than the burst on a slow machine
    serve = await start_serve(mode, own.url, "si", {"vm": vm.qmp}, env=env)
    nics, added = f"{serve.base}/guest/vm/nics", f"{serve.base}/guest/vm/event/nic_added"
    async with Probe(own.url, protocol=mode.probe) as probe:
        await probe.subscribe(nics, added)
        await probe.one(nics)  # the retained list of the connect
        since = probe.mark()
        for n in range(5):
            ok(await probe.call(f"{serve.base}/guest/vm/request/nic/add", {"nic": {"id": f"b{n}"}}))
        await probe.wait(added, since=since, count=5)
        last = await probe.one(nics, lambda m: "b4" in {nic["id"] for nic in m.json["nics"]}, since=since,
                               timeout=15)  # fmt: skip
    lists = [m for m in probe.messages[since:] if m.matches(nics)]
    assert [nic["id"] for nic in last.json["nics"]] == [f"b{n}" for n in range(5)]
    # The first add's list went out at once unless the connect's was published under 3 s before; the rest waited.
    assert 1 <= len(lists) <= 2, [[nic["id"] for nic in m.json["nics"]] for m in lists]
    last_event = max(n for n, m in enumerate(probe.messages) if m.matches(added))
    assert probe.messages.index(lists[-1]) > last_event  # after every event: what the interval trades for fewer
