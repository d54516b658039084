"""Real processes for the MQTT tests: brokers, QEMU ``-S`` guests and ``qmpnet serve``, plus an MQTT probe.

Each helper owns one process, writes its output to a log file in the test's directory and describes itself
(command line and log tail) when something fails, so a broken test shows what the process said. Every process is
stopped by the fixture that started it, also when the test fails.

Brokers: :class:`Mosquitto` on a free loopback port with ``set_tcp_nodelay true`` (without it every round trip
costs ~88 ms of Nagle/delayed-ACK), and :class:`RabbitMQ` with its MQTT plugin (MQTT 3.1.1 only), started from
Debian's ``rabbitmq-server`` package the same way: its own node name, ports, data directory and epmd, no system
service. A RabbitMQ node takes ~10 s to boot, so one node serves the whole session (the ``rabbitmq`` fixture in
``conftest.py``); tests that share it use their own topic root. :data:`MODES` are the broker matrix the MQTT tests
run on: mosquitto with everything in MQTT 5, mosquitto with everything in 3.1.1, and RabbitMQ with the controller
and client on ``auto`` (which must find 3.1.1).

Test modules import from here (``from mqtt_fixtures import ...``, the way the unit suite imports its fakes) and
declare their own fixtures with the scope that suits them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self

import aiomqtt
import pytest
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable, Iterator, Mapping, Sequence
    from types import TracebackType

    from qmpnet.settings import MqttSettings

NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

#: Short timeouts and backoffs so fault tests take well under a second per reconnect.
FAST_ENV: Mapping[str, str] = {
    "QMPNET_CONTROLLER__BACKOFF_MIN": "0.05",
    "QMPNET_CONTROLLER__BACKOFF_MAX": "0.4",
    "QMPNET_CONTROLLER__DISCOVERY_INTERVAL": "0.2",
    "QMPNET_MQTT__RECONNECT_MIN": "0.1",
    "QMPNET_MQTT__RECONNECT_MAX": "0.5",
    "QMPNET_MQTT__KEEPALIVE": "5",
    "QMPNET_QMP__UNPLUG_TIMEOUT": "0.3",
    "QMPNET_QMP__CONNECT_TIMEOUT": "2",
}


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def short_dir(prefix: str) -> Path:
    """A fresh directory under /tmp, short enough for unix socket paths."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A short directory removed afterwards."""
    path = short_dir(prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) or "(empty)"
    except OSError:
        return "(no log)"


class Process:
    """A child process with its output in ``<workdir>/<name>.log``."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        self.log = workdir / f"{name}.log"
        self.argv: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        """Start ``argv``; output goes to the log file (appended, so restarts keep history)."""
        self.argv = list(argv)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=env)

    @property
    def pid(self) -> int:
        """The process id."""
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def describe(self) -> str:
        """Command line, state and log tail, for failure messages."""
        state = "not started" if self.proc is None else f"returncode={self.proc.poll()}"
        return f"{self.name}: {' '.join(self.argv)}\n  ({state})\n--- {self.log} (tail) ---\n{_tail(self.log)}"

    def signal(self, signum: int) -> None:
        """Send ``signum`` if the process is alive."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Wait for the exit status."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc is not None:
            self.signal(signal.SIGKILL)
            self.proc.wait(5)

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        """Wait until the log has a line containing ``text`` (a bounded poll of the file); returns that line."""
        found: list[str] = []

        def logged() -> bool:
            found[:] = [line for line in _lines(self.log) if text in line]
            return bool(found)

        deadline = time.monotonic() + timeout
        while not logged():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{text!r} not logged within {timeout} s\n{self.describe()}")
            time.sleep(0.02)
        return found[0]

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``ready`` until true; fail with the process description if it dies or the time runs out."""
        deadline = time.monotonic() + timeout
        while not ready():
            if not self.running:
                raise RuntimeError(f"{what}: the process exited\n{self.describe()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not ready within {timeout} s\n{self.describe()}")
            time.sleep(0.02)


def _accepts(address: str | tuple[str, int]) -> bool:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family) as sock:
        try:
            sock.connect(address)
        except OSError:
            return False
    return True


class Broker(Protocol):
    """What a test needs of a broker."""

    @property
    def url(self) -> str:
        """Where clients connect."""
        ...

    def describe(self) -> str:
        """Command line and log tail, for failure messages."""
        ...


class Mosquitto(Process):
    """A mosquitto broker on a free loopback port.

    Args:
        workdir: Where the config, the log and (with ``persistence``) the database go.
        conf: Extra configuration lines (TLS files, password_file, acl_file).
        anonymous: Whether clients without credentials may connect.
        tls: Whether the listener speaks TLS (for :attr:`url`).
        template: A whole configuration to use instead, with ``{port}`` where the listener's port goes.
        persistence: Keep sessions, queued messages and retained messages across a restart (saved on SIGTERM).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        conf: str = "",
        anonymous: bool = True,
        tls: bool = False,
        template: str | None = None,
        persistence: bool = False,
    ) -> None:
        super().__init__("mosquitto", workdir)
        self.port = free_port()
        self.tls = tls
        self.conf_path = workdir / "mosquitto.conf"
        if template is None:
            stored = f"persistence true\npersistence_location {workdir}/\n" if persistence else "persistence false\n"
            template = (
                "listener {port} 127.0.0.1\n"
                f"allow_anonymous {'true' if anonymous else 'false'}\n"
                "set_tcp_nodelay true\n"
                f"{stored}"
                f"{conf}\n"
            )
        # Running as root, mosquitto would switch to its own user, which cannot read the test's files.
        common = "user root\nlog_type error\nlog_type warning\nlog_type notice\n"
        self.conf_path.write_text(common + template.replace("{port}", str(self.port)))

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:<port>`` (``mqtts://`` with TLS)."""
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def start(self) -> Self:
        """Start and wait until the port accepts connections."""
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.spawn([mosquitto, "-c", str(self.conf_path)])
        self.wait_until(lambda: _accepts(("127.0.0.1", self.port)), 10, "mosquitto")
        return self


# ------------------------------------------------------------------------------------------------------ RabbitMQ

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
RABBITMQ_BOOT = 90.0  # seconds: a cold node boots in ~10 s on two cores; more when the machine is busy


def have_rabbitmq() -> bool:
    """Whether Debian's rabbitmq-server package (and so Erlang's epmd) is installed."""
    return (RABBITMQ_BIN / "rabbitmq-server").exists() and shutil.which("epmd") is not None


def need_rabbitmq() -> None:
    """Skip without RabbitMQ, except in CI (``CI=true``), where ./scripts/setup installs it: there it fails."""
    if not have_rabbitmq():
        reason = "rabbitmq-server is not installed (./scripts/setup installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


class Epmd(Process):
    """Erlang's port mapper on a free port of its own, so our nodes neither need nor disturb a system one."""

    def __init__(self, workdir: Path) -> None:
        super().__init__("epmd", workdir)
        self.port = free_port()

    def start(self) -> Self:
        """Start and wait until it listens."""
        self.spawn([shutil.which("epmd") or "epmd", "-port", str(self.port), "-address", "127.0.0.1"])
        self.wait_until(lambda: _accepts(("127.0.0.1", self.port)), 10, "epmd")
        return self


class RabbitMQ(Process):
    """A RabbitMQ node with the MQTT plugin from Debian's package: its own node name, ports and data directory.

    Nothing of the system's RabbitMQ is used: not its service, config, data, log directory, cookie or epmd. AMQP
    listens nowhere; MQTT on a free loopback port; anonymous MQTT clients are let in as the default user.

    Args:
        workdir: Where this node's home (config, cookie, database, logs) goes.
        epmd: The port mapper the node registers with.
        name: Short name, unique per workdir.
        cookie: The Erlang cookie (nodes of one cluster share it).
    """

    def __init__(self, workdir: Path, epmd: Epmd, *, name: str = "rabbit", cookie: str = "qmpnet-test-cookie") -> None:
        super().__init__(f"rabbitmq-{name}", workdir)
        self.home = workdir / name
        self.home.mkdir(parents=True, exist_ok=True)
        self.node = f"qmpnet-{name}-{uuid.uuid4().hex[:6]}@localhost"
        self.port = free_port()
        self.epmd = epmd
        (self.home / ".erlang.cookie").write_text(cookie)
        (self.home / ".erlang.cookie").chmod(0o600)
        (self.home / "rabbitmq-env.conf").write_text("")
        (self.home / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (self.home / "rabbitmq.conf").write_text(
            "listeners.tcp = none\n"
            f"mqtt.listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            "mqtt.allow_anonymous = true\n"
            "loopback_users = none\n"
            "log.console = true\n"
            "log.console.level = warning\n"
            "log.file = false\n"
        )
        self.env = {
            **os.environ,
            "HOME": str(self.home),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_CONF_ENV_FILE": str(self.home / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.home / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.home / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.home / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.home / "log"),
            "RABBITMQ_GENERATED_CONFIG_DIR": str(self.home / "config"),
            "RABBITMQ_PID_FILE": str(self.home / "pid"),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "ERL_EPMD_PORT": str(epmd.port),
        }

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:<port>``."""
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Self:
        """Boot the node and wait until its MQTT listener accepts connections."""
        self.spawn([str(RABBITMQ_BIN / "rabbitmq-server")], env=self.env)
        self.wait_mqtt()
        return self

    def wait_mqtt(self) -> None:
        """Wait until the MQTT port accepts connections (after a boot or ``start_app``)."""
        self.wait_until(lambda: _accepts(("127.0.0.1", self.port)), RABBITMQ_BOOT, f"RabbitMQ {self.node}")

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """Run ``rabbitmqctl -n <node> ARGS`` and return its output."""
        done = subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node, *args],
            env=self.env, capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stdout}{done.stderr}\n{self.describe()}")
        return done.stdout

    def join(self, first: RabbitMQ) -> None:
        """Make this node a member of ``first``'s cluster and wait until its MQTT listener is back."""
        self.ctl("stop_app")
        self.ctl("join_cluster", first.node)
        self.ctl("start_app")
        self.wait_mqtt()

    def stop(self, timeout: float = 30.0) -> int | None:
        """Stop the node with ``rabbitmqctl stop`` (SIGTERM, then SIGKILL, if that fails)."""
        if self.running:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.ctl("stop", timeout=timeout)
        return super().stop(timeout)


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


class Qemu(Process):
    """A QEMU with no guest OS (``-S``): a real QMP monitor that never acknowledges an unplug.

    Args:
        qmp: The QMP unix socket path (QEMU is the server).
        machine: ``pc`` or ``q35``.
        extra: More QEMU arguments.
    """

    def __init__(self, qmp: Path, *, machine: str = "pc", extra: Sequence[str] = ()) -> None:
        super().__init__(f"qemu-{qmp.stem}", qmp.parent)
        self.qmp = qmp
        self.machine = machine
        self.extra = list(extra)

    def start(self) -> Self:
        """Start (removing a stale socket first) and wait until QMP accepts connections."""
        self.qmp.unlink(missing_ok=True)
        self.spawn(
            [
                "qemu-system-x86_64", "-S", "-display", "none", "-nodefaults", "-machine", self.machine,
                "-m", "64", "-name", self.qmp.stem, "-qmp", f"unix:{self.qmp},server=on,wait=off", *self.extra,
            ]
        )  # fmt: skip
        self.wait_until(lambda: self.qmp.exists() and _accepts(str(self.qmp)), 10, "QEMU QMP socket")
        return self


class Serve(Process):
    """``qmpnet serve`` as a child process (``python -m qmpnet serve``) with fast retry settings.

    Args:
        workdir: Where its log goes.
        broker: The broker URL.
        controller_id: The controller id.
        guests: Guest name -> QMP socket.
        args: More ``serve`` flags.
        env: More environment (``QMPNET_...`` settings).
        root: The topic root (``mqtt.topic_root``).
        protocol: ``mqtt.protocol`` (``auto``, ``5`` or ``3.1.1``).
    """

    def __init__(
        self,
        workdir: Path,
        broker: str,
        controller_id: str,
        guests: Mapping[str, Path] | None = None,
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        root: str = "qmpnet",
        protocol: str = "auto",
    ) -> None:
        super().__init__(f"serve-{controller_id}", workdir)
        self.broker = broker
        self.controller_id = controller_id
        self.guests = dict(guests or {})
        self.args = list(args)
        self.root = root
        self.env = {
            **os.environ, **FAST_ENV, "QMPNET_MQTT__TOPIC_ROOT": root, "QMPNET_MQTT__PROTOCOL": protocol, **(env or {}),
        }  # fmt: skip

    @property
    def base(self) -> str:
        """``<root>/<controller id>``."""
        return f"{self.root}/{self.controller_id}"

    def restart(self) -> Self:
        """Stop cleanly (SIGTERM) and start again with the same arguments."""
        self.stop()
        return self.start()

    def start(self) -> Self:
        """Start; the caller waits for the retained ``online`` status (see :func:`wait_online`)."""
        argv = [sys.executable, "-m", "qmpnet", "serve", "--broker", self.broker, "--controller-id", self.controller_id]
        for name, path in self.guests.items():
            argv += ["--guest", f"{name}={path}"]
        self.spawn([*argv, *self.args], env=self.env)
        return self


# --------------------------------------------------------------------------------------------------- the probe


@dataclass
class Msg:
    """A received MQTT message."""

    topic: str
    payload: bytes
    retain: bool
    correlation: bytes | None = None
    response_topic: str | None = None
    at: float = field(default_factory=time.monotonic)

    @property
    def json(self) -> Any:
        """The payload as JSON."""
        return json.loads(self.payload)

    def matches(self, topic_filter: str) -> bool:
        """Whether the message's topic matches ``topic_filter`` (``aiomqtt.Topic.matches``)."""
        return aiomqtt.Topic(self.topic).matches(topic_filter)


def answer_topic(request_topic: str) -> str:
    """Where a controller answers a request that has no MQTT 5 Response Topic (``request`` -> ``response``)."""
    head, sep, tail = request_topic.rpartition("/request/")
    if not sep:
        raise ValueError(f"{request_topic} is not a request topic")
    return f"{head}/response/{tail}"


class Probe:
    """An MQTT client for tests: publishes requests and records everything it receives, in order.

    Args:
        url: ``mqtt://host:port`` or ``mqtts://host:port``.
        protocol: 5 or 3 (3.1.1).
        username, password: Credentials.
        tls_context: For ``mqtts``.
        identifier: The client id (random when absent).
        session: Seconds the broker keeps this probe's session (subscriptions, queued messages) while it is
            disconnected; 0 (default) for a clean session. 3.1.1 has no expiry: any value > 0 keeps it for good.
    """

    def __init__(
        self,
        url: str,
        *,
        protocol: int = 5,
        username: str | None = None,
        password: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        identifier: str | None = None,
        session: int = 0,
    ) -> None:
        host, port = url.split("://", 1)[1].rsplit(":", 1)
        self.v5 = protocol == 5
        self.identifier = identifier or f"probe-{uuid.uuid4().hex[:8]}"
        connect = None
        if self.v5 and session:
            connect = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            connect.SessionExpiryInterval = session
        self._client = aiomqtt.Client(
            host,
            int(port),
            identifier=self.identifier,
            protocol=aiomqtt.ProtocolVersion.V5 if self.v5 else aiomqtt.ProtocolVersion.V311,
            username=username,
            password=password,
            tls_context=tls_context,
            socket_options=(NODELAY,),
            clean_session=None if self.v5 else not session,
            clean_start=not session if self.v5 else MQTT_CLEAN_START_FIRST_ONLY,
            properties=connect,
        )
        self.messages: list[Msg] = []
        self._subscribed: set[str] = set()
        self._arrived = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        await self._client.__aenter__()
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._reader
        with contextlib.suppress(aiomqtt.MqttError):
            await self._client.__aexit__(exc_type, exc, tb)

    async def _read(self) -> None:
        async for message in self._client.messages:
            props = message.properties
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
            self.messages.append(
                Msg(
                    message.topic.value,
                    payload,
                    message.retain,
                    getattr(props, "CorrelationData", None) if props is not None else None,
                    getattr(props, "ResponseTopic", None) if props is not None else None,
                )
            )
            self._arrived.set()

    async def subscribe(self, *filters: str) -> None:
        """Subscribe to ``filters`` at QoS 1 (one SUBSCRIBE each, in order)."""
        for topic_filter in filters:
            await self._client.subscribe(topic_filter, qos=1)
            self._subscribed.add(topic_filter)

    async def publish(
        self,
        topic: str,
        payload: Mapping[str, Any] | bytes | str,
        *,
        retain: bool = False,
        response_topic: str | None = None,
        correlation: bytes | None = None,
    ) -> None:
        """Publish at QoS 1 (waits for the PUBACK); a mapping is sent as JSON."""
        body = json.dumps(payload).encode() if not isinstance(payload, (bytes, str)) else payload
        properties = None
        if response_topic is not None or correlation is not None:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if response_topic is not None:
                properties.ResponseTopic = response_topic
            if correlation is not None:
                properties.CorrelationData = correlation
        await self._client.publish(topic, body, qos=1, retain=retain, properties=properties)

    def mark(self) -> int:
        """The index of the next message to arrive (pass as ``since`` to :meth:`wait`)."""
        return len(self.messages)

    def received(self, topic_filter: str, since: int = 0) -> list[Msg]:
        """Messages on topics matching ``topic_filter`` (``+``/``#`` wildcards) from index ``since``."""
        return [m for m in self.messages[since:] if m.matches(topic_filter)]

    async def wait(
        self,
        topic_filter: str,
        where: Callable[[Msg], bool] | None = None,
        *,
        since: int = 0,
        timeout: float = 5.0,
        count: int = 1,
    ) -> list[Msg]:
        """Wait until ``count`` messages matching ``topic_filter`` (and ``where``) arrived from index ``since``."""
        async with asyncio.timeout(timeout):
            while True:
                found = [m for m in self.received(topic_filter, since) if where is None or where(m)]
                if len(found) >= count:
                    return found
                self._arrived.clear()
                await self._arrived.wait()

    async def one(
        self, topic_filter: str, where: Callable[[Msg], bool] | None = None, *, since: int = 0, timeout: float = 5.0
    ) -> Msg:
        """The first message matching, waiting for it."""
        return (await self.wait(topic_filter, where, since=since, timeout=timeout))[0]

    async def ensure(self, *filters: str) -> None:
        """Subscribe to those of ``filters`` not subscribed yet."""
        await self.subscribe(*(f for f in filters if f not in self._subscribed))

    async def call(
        self,
        topic: str,
        payload: Mapping[str, Any] | bytes | str,
        *,
        timeout: float = 10.0,
        response_topic: str | None = None,
    ) -> dict[str, Any]:
        """Send one request and return the decoded answer, in either MQTT version.

        MQTT 5: with a Response Topic (default ``probe/<id>/response``) and a Correlation Data, matched on it.
        MQTT 3.1.1: the answer comes on the request topic with ``request`` -> ``response``, matched by the
        ``transaction`` (one is added to a mapping without one; a raw payload's own, or none).
        """
        if self.v5:
            answer_to = response_topic or self.response_topic
            await self.ensure(answer_to)
            correlation = uuid.uuid4().bytes
            since = self.mark()
            await self.publish(topic, payload, response_topic=answer_to, correlation=correlation)
            msg = await self.one(answer_to, lambda m: m.correlation == correlation, since=since, timeout=timeout)
        else:
            answer_to = answer_topic(topic)
            await self.ensure(answer_to)
            transaction: str | None = None
            if not isinstance(payload, (bytes, str)):
                transaction = str(payload.get("transaction") or uuid.uuid4().hex)
                payload = {**payload, "transaction": transaction}
            else:
                transaction = _transaction_of_raw(payload)
            since = self.mark()
            await self.publish(topic, payload)
            msg = await self.one(
                answer_to, lambda m: transaction_in(m) == transaction, since=since, timeout=timeout
            )
        answer: dict[str, Any] = msg.json
        return answer

    @property
    def response_topic(self) -> str:
        """The default Response Topic of :meth:`call` (MQTT 5)."""
        return f"probe/{self.identifier}/response"


def _transaction_of_raw(payload: bytes | str) -> str | None:
    try:
        decoded = json.loads(payload)
    except ValueError:
        return None
    value = decoded.get("transaction") if isinstance(decoded, dict) else None
    return value if isinstance(value, str) else None


def transaction_in(message: Msg) -> str | None:
    """The ``transaction`` of an answer (``None`` when it has none or is not JSON)."""
    try:
        value = message.json.get("transaction")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


async def retained(url: str, topic: str, *, marker: str, **probe_args: Any) -> Any:
    """The JSON retained on ``topic``, or ``None`` if there is none.

    ``marker`` is a topic known to hold a retained message (a controller's status): it is subscribed after
    ``topic``, and the broker sends ``topic``'s retained message before ``marker``'s, so once the marker's has
    arrived, the absence of one on ``topic`` is certain. Exact topics only: RabbitMQ gives wildcard subscribers
    no retained messages.
    """
    async with Probe(url, **probe_args) as probe:
        await probe.subscribe(topic, marker)
        await probe.one(marker, lambda m: m.retain)
        found = [m for m in probe.received(topic) if m.retain and m.payload]
        return found[0].json if found else None


async def wait_retained(
    url: str, topic: str, where: Callable[[Any], bool], *, timeout: float = 10.0, **probe_args: Any
) -> Any:
    """Wait until ``topic`` holds (or is updated to) a JSON payload for which ``where`` is true."""
    async with Probe(url, **probe_args) as probe:
        await probe.subscribe(topic)
        msg = await probe.one(topic, lambda m: bool(m.payload) and where(m.json), timeout=timeout)
        return msg.json


async def wait_online(
    serve: Serve, url: str, *, guests_connected: Sequence[str] = (), timeout: float = 15.0, **probe_args: Any
) -> None:
    """Wait for the controller's retained ``online`` status and for ``guests_connected`` to be connected."""
    base = serve.base
    try:
        await wait_retained(url, f"{base}/status", lambda s: s["state"] == "online", timeout=timeout, **probe_args)
        for guest in guests_connected:
            await wait_retained(
                url,
                f"{base}/guest/{guest}/status",
                lambda s: s["state"] == "connected",
                timeout=timeout,
                **probe_args,
            )
    except TimeoutError as err:
        raise RuntimeError(f"controller not ready\n{serve.describe()}") from err


def client_settings(url: str, mode: Mode, root: str, **more: Any) -> MqttSettings:
    """``MqttSettings`` for a :class:`qmpnet.client.Client` of ``mode`` under topic root ``root``."""
    from qmpnet.settings import MqttSettings  # noqa: PLC0415 - the fixtures stay importable without the package

    return MqttSettings.model_validate({"broker": url, "protocol": mode.protocol, "topic_root": root, **more})
