"""Broker failover: the controller, the client and the CLI given several brokers move on when one is lost.

On a three-node RabbitMQ cluster (private nodes on loopback ports, booted once for the module; a three-node
cluster keeps a majority when one node dies), the node the controller is on is SIGKILLed while a client sends a
stream of hot-adds through another node: every request is answered, none is applied twice (QEMU's own device list
is the answered set), and the controller is ``online`` again through a surviving node (the time it took is
printed). With two independent mosquittos, ``qmpnet serve --broker URL1 --broker URL2`` survives the loss of URL1,
and so do the client and the CLI given both.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING, cast

import pytest
from aux_qmp import aux_args, aux_monitor
from mqtt_fixtures import (
    FAST_ENV,
    MOSQUITTO_5,
    RABBITMQ,
    HotAddStream,
    Mosquitto,
    Msg,
    Probe,
    Process,
    Qemu,
    RabbitCluster,
    Serve,
    answer_topic,
    client_settings,
    fresh_root,
    rabbit_cluster,
    scratch,
    transaction_in,
    wait_online,
)

import qmpnet
from qmpnet.client import Client

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

pytestmark = [pytest.mark.integration]

#: The controller's persistent session is a queue: a quorum queue is replicated on every node and outlives one.
QUORUM = "mqtt.durable_queue_type = quorum"


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[RabbitCluster, Path]]:
    """Three nodes: a cluster of three keeps a majority when one dies."""
    with rabbit_cluster("qmpnet-rabbit-failover-", ("one", "two", "three"), conf=QUORUM) as nodes:
        yield nodes


@pytest.fixture
def cleanup() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in reversed(started):
        process.kill()


def _qemu(vmdir: Path, cleanup: list[Process]) -> Qemu:
    """A QEMU ``-S`` with a second monitor for :func:`_peripherals`."""
    vmdir.mkdir()
    vm = Qemu(vmdir / "vm.qmp", extra=aux_args(vmdir))
    cleanup.append(vm.start())
    return vm


async def _peripherals(workdir: Path) -> set[str]:
    """The devices QEMU itself has (its own view, over the second monitor, not qmpnet's)."""
    async with aux_monitor(workdir) as aux:
        found = cast("list[dict[str, str]]", await aux.execute("qom-list", {"path": "/machine/peripheral"}))
    return {p["name"] for p in found if p["type"].startswith("child<")}


async def test_killing_the_controller_s_node_under_a_stream_of_hot_adds_loses_none_and_applies_none_twice(
    cluster: tuple[RabbitCluster, Path], cleanup: list[Process], figure: Callable[[str], None]
) -> None:
    nodes, work = cluster
    one, two, three = nodes.nodes
    vmdir = work / "stream"
    vm = _qemu(vmdir, cleanup)
    root = fresh_root()
    serve = Serve(work, [one.url, two.url, three.url], "h1", {"vm": vm.qmp}, root=root, protocol=RABBITMQ.protocol)
    cleanup.append(serve.start())
    await wait_online(serve, one.url, guests_connected=["vm"], protocol=3)
    count = 20  # a -S pc guest has ~30 free slots
    add_topic = f"{serve.base}/guest/vm/request/nic/add"
    # A watcher on the third node: sees the controller's status and every answer, wherever the controller is.
    async with Probe(three.url, protocol=3) as watcher:
        await watcher.subscribe(f"{serve.base}/status", answer_topic(add_topic))
        settings = client_settings(two.url, RABBITMQ, root)
        # A second client on the doomed node, its subscriptions made: it has to move too.
        async with (
            Client([two.url, three.url], settings=settings, timeout=60) as client,
            Client([one.url, two.url, three.url], settings=settings, timeout=60) as mover,
        ):
            assert [g.name for g in await mover.guests("h1")] == ["vm"]

            stream = HotAddStream(client, "h1", "vm", count)
            await stream.answered(5)
            since = watcher.mark()
            waiting = count - stream.done
            killed = time.monotonic()
            try:
                await asyncio.to_thread(one.kill)
                online = await watcher.one(
                    f"{serve.base}/status", lambda m: m.json["state"] == "online", since=since, timeout=60
                )
                back = time.monotonic() - killed
            finally:
                results = await stream.results()
            listed = {nic.id for nic in await mover.list_nics("h1", "vm")}
        in_qemu = await _peripherals(vmdir)
        answers = watcher.received(answer_topic(add_topic))
    figure(
        f"failover: controller online again through a surviving node {back:.2f} s after SIGKILL of its node "
        f"({waiting} of {count} hot-adds were still to be answered then)"
    )
    assert online.json["guests"] == ["vm"]
    serve.wait_log(f"broker {two.url}: connected")  # it moved on to the next node of its list
    failed = [r for r in results if not isinstance(r, qmpnet.Nic)]
    assert not failed, f"{len(failed)} of {count} requests failed: {failed}\n{serve.describe()}"
    _all_answered_once({r.id for r in results if isinstance(r, qmpnet.Nic)}, count, in_qemu, listed, answers)
    assert serve.running, serve.describe()


def _all_answered_once(added: set[str], count: int, in_qemu: set[str], listed: set[str], answers: list[Msg]) -> None:
    """Every request answered with a NIC of its own; QEMU has exactly those; answers on the wire agree."""
    assert len(added) == count  # every request answered, each with a NIC of its own
    assert in_qemu == added  # and QEMU has exactly those: none lost, none applied twice
    assert listed == added  # as the client that was on the killed node reads them, through another node
    # What crossed the broker: a repeated answer (QoS 1 is at-least-once) only ever repeats the first one.
    by_transaction: dict[str, set[str]] = {}
    for message in answers:
        by_transaction.setdefault(transaction_in(message) or "", set()).add(message.json["data"]["id"])
    assert all(len(ids) == 1 for ids in by_transaction.values()), by_transaction
    assert {ids.pop() for ids in by_transaction.values()} == added


def _cli(root: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **FAST_ENV, "QMPNET_MQTT__TOPIC_ROOT": root}
    return subprocess.run(
        [sys.executable, "-m", "qmpnet", *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


async def test_serve_client_and_cli_given_two_brokers_survive_the_loss_of_the_first(cleanup: list[Process]) -> None:
    mode = MOSQUITTO_5
    with scratch("qmpnet-failover-") as work:
        (work / "a").mkdir()
        (work / "b").mkdir()
        first, second = Mosquitto(work / "a"), Mosquitto(work / "b")
        cleanup += [first.start(), second.start()]
        vm = Qemu(work / "vm.qmp")
        cleanup.append(vm.start())
        root = fresh_root()
        serve = Serve(work, [first.url, second.url], "m1", {"vm": vm.qmp}, root=root, protocol=mode.protocol)
        cleanup.append(serve.start())
        await wait_online(serve, first.url, guests_connected=["vm"])
        settings = client_settings(first.url, mode, root)
        async with Client([first.url, second.url], settings=settings, timeout=30) as client:
            assert (await client.add_nic("m1", "vm", {"id": "one"})).id == "one"
            first.kill()
            # Independent brokers share nothing: the controller brings its state to the second one itself.
            await wait_online(serve, second.url, guests_connected=["vm"], timeout=30)
            assert (await client.add_nic("m1", "vm", {"id": "two"})).id == "two"  # the client moved on too
        async with Client([first.url, second.url], settings=settings, timeout=30) as late:  # the first is dead
            assert sorted(n.id for n in await late.list_nics("m1", "vm")) == ["one", "two"]
        where = ["--broker", first.url, "--broker", second.url, "--controller", "m1", "--guest", "vm"]
        listed = await asyncio.to_thread(_cli, root, "nic", "list", *where, "--json", "--mqtt-protocol", "5")
        assert listed.returncode == 0, listed.stderr
        assert sorted(n["id"] for n in json.loads(listed.stdout)["nics"]) == ["one", "two"]
        assert serve.running, serve.describe()
        serve.stop()
        vm.stop()
