"""Faults around ``qmpnet serve``: the controller killed or stopped, QEMU killed and restarted, the broker restarted,
guest sockets appearing and disappearing. Each test runs its own controller (and QEMU); the broker is shared
except by the test that restarts it.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import TYPE_CHECKING, Any

import pytest
from mqtt_fixtures import Mosquitto, Probe, Qemu, Serve, retained, scratch, wait_online, wait_retained

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def broker() -> Iterator[Mosquitto]:
    with scratch("qmpnet-mqtt-faults-") as work:
        mosquitto = Mosquitto(work)
        try:
            yield mosquitto.start()
        finally:
            mosquitto.stop()


@pytest.fixture
def work() -> Iterator[Path]:
    with scratch("qmpnet-fault-") as path:
        yield path


@pytest.fixture
def cleanup() -> Iterator[list[Serve | Qemu | Mosquitto]]:
    started: list[Serve | Qemu | Mosquitto] = []
    yield started
    for process in reversed(started):
        process.kill()


def ok(answer: dict[str, Any]) -> Any:
    assert answer["status"] == "ok", answer
    return answer["data"]


async def test_sigkilled_controller_leaves_its_will_offline(
    broker: Mosquitto, work: Path, cleanup: list[Serve | Qemu | Mosquitto]
) -> None:
    serve = Serve(work, broker.url, "k1")
    cleanup.append(serve.start())
    await wait_online(serve, broker.url)
    serve.kill()
    status = await wait_retained(broker.url, "qmpnet/k1/status", lambda s: s["state"] == "offline", timeout=5)
    assert status == {"state": "offline"}


async def test_sigterm_publishes_offline_and_exits_cleanly(
    broker: Mosquitto, work: Path, cleanup: list[Serve | Qemu | Mosquitto]
) -> None:
    vm = Qemu(work / "vm.qmp")
    cleanup.append(vm.start())
    serve = Serve(work, broker.url, "t1", {"vm": vm.qmp})
    cleanup.append(serve.start())
    await wait_online(serve, broker.url, guests_connected=["vm"])
    async with Probe(broker.url) as probe:
        await probe.subscribe("qmpnet/t1/status")
        await probe.one("qmpnet/t1/status")
        since = probe.mark()
        started = time.monotonic()
        serve.signal(signal.SIGTERM)
        offline = await probe.one("qmpnet/t1/status", lambda m: m.json["state"] == "offline", since=since)
        assert offline.json == {"state": "offline"}
        assert serve.wait(5) == 0, serve.describe()
        assert time.monotonic() - started < 3
        await asyncio.sleep(0.2)
        assert len(probe.received("qmpnet/t1/status", since)) == 1  # no will on top of the clean goodbye
    assert vm.running


async def test_qemu_killed_then_restarted_on_the_same_socket(
    broker: Mosquitto, work: Path, cleanup: list[Serve | Qemu | Mosquitto]
) -> None:
    vm = Qemu(work / "vm.qmp")
    cleanup.append(vm.start())
    serve = Serve(work, broker.url, "q1", {"vm": vm.qmp})
    cleanup.append(serve.start())
    await wait_online(serve, broker.url, guests_connected=["vm"])
    async with Probe(broker.url) as probe:
        await probe.subscribe(probe.response_topic, "qmpnet/q1/guest/vm/status", "qmpnet/q1/guest/vm/event/#")
        before = ok(await probe.call("qmpnet/q1/guest/vm/request/nic/add", {"nic": {"id": "before"}}))
        since = probe.mark()
        vm.kill()
        await probe.one("qmpnet/q1/guest/vm/status", lambda m: m.json["state"] == "disconnected", since=since)
        assert (await retained(broker.url, "qmpnet/q1/guest/vm/status"))["state"] == "disconnected"
        await probe.one("qmpnet/q1/guest/vm/event/guest_disconnected", since=since)

        started = time.monotonic()
        answer = await probe.call("qmpnet/q1/guest/vm/request/nic/list", {"transaction": "while-down"})
        assert time.monotonic() - started < 0.5
        assert answer["status"] == "error"
        assert answer["error"]["code"] == "guest_unavailable"

        since = probe.mark()
        vm.start()
        await probe.one("qmpnet/q1/guest/vm/status", lambda m: m.json["state"] == "connected", since=since, timeout=5)
        await probe.one("qmpnet/q1/guest/vm/event/guest_connected", since=since)
        # A new QEMU: the old NIC went with the old process, and the controller adds it back (the stored desired
        # set has it, since nic/add put it there), with the same MAC and PCI address.
        await probe.one("qmpnet/q1/guest/vm/event/reconciled", since=since, timeout=10)
        nics = ok(await probe.call("qmpnet/q1/guest/vm/request/nic/list", {}))["nics"]
        assert [(n["id"], n["mac"], n["pci"]) for n in nics] == [("before", before["mac"], before["pci"])]
        state = await wait_retained(broker.url, "qmpnet/q1/guest/vm/nics", lambda s: len(s["nics"]) == 1)
        assert state["nics"][0]["mac"] == before["mac"]
        ok(await probe.call("qmpnet/q1/guest/vm/request/nic/add", {"nic": {"id": "after"}}))


async def test_broker_restart_controller_comes_back_and_republishes(
    work: Path, cleanup: list[Serve | Qemu | Mosquitto]
) -> None:
    own = Mosquitto(work)  # persistence off: a restart forgets every retained message
    cleanup.append(own.start())
    vm = Qemu(work / "vm.qmp")
    cleanup.append(vm.start())
    serve = Serve(work, own.url, "b1", {"vm": vm.qmp})
    cleanup.append(serve.start())
    await wait_online(serve, own.url, guests_connected=["vm"])
    async with Probe(own.url) as probe:
        await probe.subscribe(probe.response_topic)
        ok(await probe.call("qmpnet/b1/guest/vm/request/nic/add", {"nic": {"id": "kept"}}))
    own.stop()
    own.start()
    status = await wait_retained(own.url, "qmpnet/b1/status", lambda s: s["state"] == "online", timeout=10)
    assert status["guests"] == ["vm"]
    guest = await wait_retained(own.url, "qmpnet/b1/guest/vm/status", lambda _: True, timeout=5)
    assert guest["state"] == "connected"
    nics = await wait_retained(own.url, "qmpnet/b1/guest/vm/nics", lambda _: True, timeout=5)
    assert [n["id"] for n in nics["nics"]] == ["kept"]
    async with Probe(own.url) as probe:
        await probe.subscribe(probe.response_topic)
        listed = ok(await probe.call("qmpnet/b1/guest/vm/request/nic/list", {"transaction": "after-restart"}))
        assert [n["id"] for n in listed["nics"]] == ["kept"]
    assert serve.running, serve.describe()


async def test_guest_directory_sockets_come_and_go(
    broker: Mosquitto, work: Path, cleanup: list[Serve | Qemu | Mosquitto]
) -> None:
    guests = work / "guests"
    guests.mkdir()
    first = Qemu(guests / "alpha.qmp")
    cleanup.append(first.start())
    (guests / "notes.qmp").write_text("not a socket")
    serve = Serve(work, broker.url, "d1", args=["--guest-dir", str(guests), "--guest", "static=/nonexistent.qmp"])
    cleanup.append(serve.start())
    await wait_online(serve, broker.url, guests_connected=["alpha"])
    status = await retained(broker.url, "qmpnet/d1/status")
    assert status["guests"] == ["alpha", "static"]

    second = Qemu(guests / "beta.qmp")
    cleanup.append(second.start())
    status = await wait_retained(broker.url, "qmpnet/d1/status", lambda s: "beta" in s["guests"], timeout=5)
    assert status["guests"] == ["alpha", "beta", "static"]
    await wait_retained(broker.url, "qmpnet/d1/guest/beta/status", lambda s: s["state"] == "connected", timeout=5)

    first.stop()  # a clean QEMU exit removes its socket: the guest is dropped, its retained state deleted
    status = await wait_retained(broker.url, "qmpnet/d1/status", lambda s: "alpha" not in s["guests"], timeout=5)
    assert status["guests"] == ["beta", "static"]
    assert await retained(broker.url, "qmpnet/d1/guest/alpha/status", timeout=0.5) is None
    assert await retained(broker.url, "qmpnet/d1/guest/alpha/nics", timeout=0.5) is None
