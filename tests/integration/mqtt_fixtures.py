"""The MQTT tests' broker matrix, over the test processes and probe that live in the package.

The processes (brokers, QEMU ``-S``, ``qmpnet serve``) are :mod:`qmpnet.testguest.services` and the MQTT probe is
:mod:`qmpnet.testguest.probe`, shared with the pytest plugin; test modules import all of it from here
(``from mqtt_fixtures import ...``, the way the unit suite imports its fakes) and declare their own fixtures with
the scope that suits them.

:data:`MODES` are the broker matrix the MQTT tests run on: mosquitto with everything in MQTT 5, mosquitto with
everything in 3.1.1, and RabbitMQ (its MQTT plugin speaks only 3.1.1) with the controller and client on ``auto``,
which must find 3.1.1. A RabbitMQ node takes ~10 s to boot, so one node serves the whole session (the ``rabbitmq``
fixture in ``conftest.py``); tests that share it use their own topic root (:func:`fresh_root`).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import needs

from qmpnet.settings import MqttSettings
from qmpnet.testguest.probe import (
    Msg,
    Probe,
    answer_topic,
    retained,
    topic_matches,
    transaction_in,
    wait_online,
    wait_retained,
)
from qmpnet.testguest.services import (
    FAST_ENV,
    NODELAY,
    Broker,
    Epmd,
    Mosquitto,
    Process,
    Qemu,
    RabbitMQ,
    Serve,
    free_port,
    have_rabbitmq,
    scratch,
    short_dir,
)

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from pathlib import Path

    import pytest

    import qmpnet
    from qmpnet.client import Client

__all__ = [
    "FAST_ENV",
    "MODES",
    "MOSQUITTO_5",
    "MOSQUITTO_311",
    "NODELAY",
    "RABBITMQ",
    "Broker",
    "Epmd",
    "Mode",
    "Mosquitto",
    "Msg",
    "Probe",
    "Process",
    "Qemu",
    "RabbitMQ",
    "Serve",
    "answer_topic",
    "broker_for",
    "client_settings",
    "free_port",
    "fresh_root",
    "need_rabbitmq",
    "rabbitmq_fixture",
    "retained",
    "scratch",
    "short_dir",
    "started",
    "topic_matches",
    "transaction_in",
    "wait_online",
    "wait_retained",
]


@dataclass(frozen=True)
class Mode:
    """One column of the broker matrix: which broker, and which MQTT version the controller and clients use."""

    name: str
    broker: Literal["mosquitto", "rabbitmq"]
    protocol: Literal["5", "3.1.1", "auto"]

    @property
    def v5(self) -> bool:
        """Whether the connections speak MQTT 5 (RabbitMQ 3.x speaks only 3.1.1: ``auto`` finds that)."""
        return self.protocol == "5"

    @property
    def probe(self) -> int:
        """The :class:`Probe` protocol (5 or 3) for this mode."""
        return 5 if self.v5 else 3

    def __str__(self) -> str:
        return self.name


MOSQUITTO_5 = Mode("mosquitto-5", "mosquitto", "5")
MOSQUITTO_311 = Mode("mosquitto-3.1.1", "mosquitto", "3.1.1")
RABBITMQ = Mode("rabbitmq", "rabbitmq", "auto")
MODES = (MOSQUITTO_5, MOSQUITTO_311, RABBITMQ)


def fresh_root() -> str:
    """A topic root of its own, so tests sharing a broker (the session's RabbitMQ) never see each other's state."""
    return f"q{uuid.uuid4().hex[:10]}"


def need_rabbitmq() -> None:
    """Skip without RabbitMQ, except in CI, where ./scripts/setup installs it: there it fails (tests/needs.py)."""
    needs.require(have_rabbitmq(), "rabbitmq-server is not installed (./scripts/setup installs it)")


def rabbitmq_fixture() -> Iterator[RabbitMQ]:
    """One RabbitMQ node for the whole session (see ``rabbitmq`` in conftest.py)."""
    need_rabbitmq()
    with scratch("qmpnet-rabbitmq-") as work:
        epmd = Epmd(work)
        node = RabbitMQ(work, epmd)
        try:
            epmd.start()
            node.start()
            yield node
        finally:
            node.stop()
            epmd.stop()


@contextlib.contextmanager
def broker_for(mode: Mode, work: Path, request: pytest.FixtureRequest, **mosquitto: Any) -> Iterator[Broker]:
    """The broker of ``mode``: a fresh mosquitto in ``work`` (stopped afterwards), or the session's RabbitMQ."""
    if mode.broker == "rabbitmq":
        node: RabbitMQ = request.getfixturevalue("rabbitmq")
        yield node
        return
    broker = Mosquitto(work, **mosquitto)
    try:
        yield broker.start()
    finally:
        broker.stop()


class Startable(Protocol):
    """A test process: QEMU, a broker, ``qmpnet serve`` (:mod:`qmpnet.testguest.services`)."""

    def start(self) -> object: ...
    def stop(self, timeout: float = ...) -> int | None: ...


@contextlib.contextmanager
def started(*processes: Startable) -> Iterator[None]:
    """Start ``processes`` in order; stop them in reverse order afterwards, also when a start or the test fails."""
    with contextlib.ExitStack() as stack:
        for process in processes:
            stack.callback(process.stop)
            process.start()
        yield


def client_settings(url: str, mode: Mode, root: str, **more: Any) -> MqttSettings:
    """``MqttSettings`` for a :class:`qmpnet.client.Client` of ``mode`` under topic root ``root``."""
    return MqttSettings.model_validate({"broker": url, "protocol": mode.protocol, "topic_root": root, **more})


class HotAddStream:
    """``count`` hot-adds sent at once through ``client``, each with a transaction of its own.

    No id and no MAC: a request applied twice would make a second NIC, which QEMU's own device list then shows.
    """

    def __init__(self, client: Client, controller: str, guest: str, count: int) -> None:
        self.count = count
        self.done = 0
        self._answered = asyncio.Event()
        self._calls = [asyncio.create_task(self._add(client, controller, guest, n)) for n in range(count)]

    async def _add(self, client: Client, controller: str, guest: str, n: int) -> qmpnet.Nic:
        try:
            return await client.add_nic(controller, guest, {"model": "e1000"}, transaction=f"stream-{n}")
        finally:
            self.done += 1
            self._answered.set()

    async def answered(self, n: int) -> None:
        """Wait until ``n`` of the requests have been answered (or have failed)."""
        while self.done < n:
            self._answered.clear()
            await self._answered.wait()

    async def results(self) -> list[qmpnet.Nic | BaseException]:
        """Every request's outcome, in order, once all have ended."""
        return await asyncio.gather(*self._calls, return_exceptions=True)


class RabbitCluster:
    """RabbitMQ nodes (private, on loopback ports) joined into one cluster; ``conf`` goes to every node."""

    def __init__(self, work: Path, names: Sequence[str], *, conf: str = "") -> None:
        self.epmd = Epmd(work)
        self.nodes = [RabbitMQ(work, self.epmd, name=name, conf=conf) for name in names]
        for node in self.nodes:  # idle Erlang schedulers spin by default: several nodes would take both cores
            node.env["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"] = "+sbwt none +sbwtdcpu none +sbwtdio none"

    def start(self) -> None:
        self.epmd.start()
        for node in self.nodes:  # all boot at once
            node.boot()
        for node in self.nodes:
            node.wait_mqtt()
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.join(first)
        members = first.ctl("cluster_status", "--formatter", "json")
        assert all(node.node in members for node in self.nodes), members

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        self.epmd.stop()


@contextlib.contextmanager
def rabbit_cluster(
    prefix: str, names: Sequence[str], *, conf: str = ""
) -> Iterator[tuple[RabbitCluster, Path]]:
    """A started :class:`RabbitCluster` in a scratch directory of its own, stopped and removed afterwards."""
    need_rabbitmq()
    with scratch(prefix) as work:
        nodes = RabbitCluster(work, names, conf=conf)
        try:
            nodes.start()
            yield nodes, work
        finally:
            nodes.stop()
