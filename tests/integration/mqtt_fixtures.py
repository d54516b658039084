"""Real processes for the MQTT tests: mosquitto, QEMU ``-S`` guests and ``qmpnet serve``, plus an MQTT probe.

Each helper owns one process, writes its output to a log file in the test's directory and describes itself
(command line and log tail) when something fails, so a broken test shows what the process said. Every process is
stopped by the fixture that started it, also when the test fails. The broker listens on a free loopback port with
``set_tcp_nodelay true`` (without it every round trip costs ~88 ms of Nagle/delayed-ACK).

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
from typing import TYPE_CHECKING, Any, Self

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable, Iterator, Mapping, Sequence
    from types import TracebackType

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


class Mosquitto(Process):
    """A mosquitto broker on a free loopback port.

    Args:
        workdir: Where the config and log go.
        conf: Extra configuration lines (TLS files, password_file, acl_file).
        anonymous: Whether clients without credentials may connect.
        tls: Whether the listener speaks TLS (for :attr:`url`).
        template: A whole configuration to use instead, with ``{port}`` where the listener's port goes.
    """

    def __init__(
        self, workdir: Path, *, conf: str = "", anonymous: bool = True, tls: bool = False, template: str | None = None
    ) -> None:
        super().__init__("mosquitto", workdir)
        self.port = free_port()
        self.tls = tls
        self.conf_path = workdir / "mosquitto.conf"
        if template is None:
            template = (
                "listener {port} 127.0.0.1\n"
                f"allow_anonymous {'true' if anonymous else 'false'}\n"
                "set_tcp_nodelay true\n"
                "persistence false\n"
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
    ) -> None:
        super().__init__(f"serve-{controller_id}", workdir)
        self.broker = broker
        self.controller_id = controller_id
        self.guests = dict(guests or {})
        self.args = list(args)
        # Each controller has a state directory of its own unless the test shares one on purpose (--state-dir).
        own_state = {"QMPNET_STATE_DIR": str(workdir / f"state-{controller_id}")}
        self.env = {**os.environ, **FAST_ENV, **own_state, **(env or {})}

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


class Probe:
    """An MQTT client for tests: publishes requests and records everything it receives, in order.

    Args:
        url: ``mqtt://host:port`` or ``mqtts://host:port``.
        protocol: 5 or 3 (3.1.1).
        username, password: Credentials.
        tls_context: For ``mqtts``.
    """

    def __init__(
        self,
        url: str,
        *,
        protocol: int = 5,
        username: str | None = None,
        password: str | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        host, port = url.split("://", 1)[1].rsplit(":", 1)
        self.v5 = protocol == 5
        self.identifier = f"probe-{uuid.uuid4().hex[:8]}"
        self._client = aiomqtt.Client(
            host,
            int(port),
            identifier=self.identifier,
            protocol=aiomqtt.ProtocolVersion.V5 if self.v5 else aiomqtt.ProtocolVersion.V311,
            username=username,
            password=password,
            tls_context=tls_context,
            socket_options=(NODELAY,),
        )
        self.messages: list[Msg] = []
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
        """Subscribe to ``filters`` at QoS 1."""
        for topic_filter in filters:
            await self._client.subscribe(topic_filter, qos=1)

    async def publish(
        self,
        topic: str,
        payload: Mapping[str, Any] | bytes | str,
        *,
        retain: bool = False,
        response_topic: str | None = None,
        correlation: bytes | None = None,
    ) -> None:
        """Publish at QoS 1; a mapping is sent as JSON."""
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
        return [m for m in self.messages[since:] if topic_matches(topic_filter, m.topic)]

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

    async def call(
        self,
        topic: str,
        payload: Mapping[str, Any] | bytes | str,
        *,
        timeout: float = 10.0,
        response_topic: str | None = None,
    ) -> dict[str, Any]:
        """Send one MQTT 5 request with Response Topic + Correlation Data and return the decoded answer.

        The probe must already be subscribed to ``response_topic`` (default ``probe/<id>/response``).
        """
        answer_to = response_topic or f"probe/{self.identifier}/response"
        correlation = uuid.uuid4().bytes
        since = self.mark()
        await self.publish(topic, payload, response_topic=answer_to, correlation=correlation)
        msg = await self.one(answer_to, lambda m: m.correlation == correlation, since=since, timeout=timeout)
        answer: dict[str, Any] = msg.json
        return answer

    @property
    def response_topic(self) -> str:
        """The default Response Topic of :meth:`call`."""
        return f"probe/{self.identifier}/response"


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic-filter matching (``+`` one level, ``#`` the rest)."""
    pattern = topic_filter.split("/")
    levels = topic.split("/")
    for index, part in enumerate(pattern):
        if part == "#":
            return True
        if index >= len(levels) or (part != "+" and part != levels[index]):
            return False
    return len(levels) == len(pattern)


async def retained(url: str, topic: str, *, timeout: float = 1.0, **probe_args: Any) -> Any:
    """The JSON of the message retained on ``topic`` (``None`` when there is none within ``timeout``)."""
    async with Probe(url, **probe_args) as probe:
        await probe.subscribe(topic)
        try:
            return (await probe.one(topic, timeout=timeout)).json
        except TimeoutError:
            return None


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
    base = f"qmpnet/{serve.controller_id}"
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
