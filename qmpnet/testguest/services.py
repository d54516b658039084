"""Real processes for MQTT tests: brokers (mosquitto, RabbitMQ), QEMU ``-S`` guests and ``qmpnet serve``.

Each helper owns one process, writes its output to a log file in the test's directory and describes itself
(command line and log tail) when something fails, so a broken test shows what the process said. Every process is
stopped by the fixture that started it, also when the test fails.

Brokers: :class:`Mosquitto` on a free loopback port with ``set_tcp_nodelay true`` (without it every round trip
costs ~88 ms of Nagle/delayed-ACK), and :class:`RabbitMQ` with its MQTT plugin (MQTT 3.1.1 only), started from
Debian's ``rabbitmq-server`` package the same way: its own node name, ports, data directory and epmd, no system
service.

The pytest plugin (``qmpnet_broker``, ``qmpnet_controller``) is built on these; test modules that need other
scopes or shapes use them directly. :mod:`.probe` is the MQTT client that watches them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Self

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence

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

    def _started(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise RuntimeError(f"{self.name}: not started")
        return self.proc

    @property
    def pid(self) -> int:
        """The process id."""
        return self._started().pid

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
            self._started().send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Wait for the exit status."""
        return self._started().wait(timeout)

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
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in _lines(self.log) if text in line]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise RuntimeError(f"{text!r} not logged within {timeout} s\n{self.describe()}")
            time.sleep(0.02)

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``ready`` until true; fail with the process description if it dies or the time runs out."""
        deadline = time.monotonic() + timeout
        while not ready():
            if not self.running:
                raise RuntimeError(f"{what}: the process exited\n{self.describe()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not ready within {timeout} s\n{self.describe()}")
            time.sleep(0.02)


def accepts(address: str | tuple[str, int]) -> bool:
    """Whether something listens at ``address`` (a unix socket path, or a TCP host and port) right now."""
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

    def __init__(  # noqa: PLR0913 - one keyword per broker feature
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
        self.wait_until(lambda: accepts(("127.0.0.1", self.port)), 10, "mosquitto")
        return self


# ------------------------------------------------------------------------------------------------------ RabbitMQ

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
RABBITMQ_BOOT = 90.0  # seconds: a cold node boots in ~10 s on two cores; more when the machine is busy


def have_rabbitmq() -> bool:
    """Whether Debian's rabbitmq-server package (and so Erlang's epmd) is installed."""
    return (RABBITMQ_BIN / "rabbitmq-server").exists() and shutil.which("epmd") is not None


class Epmd(Process):
    """Erlang's port mapper on a free port of its own, so our nodes neither need nor disturb a system one."""

    def __init__(self, workdir: Path) -> None:
        super().__init__("epmd", workdir)
        self.port = free_port()

    def start(self) -> Self:
        """Start and wait until it listens."""
        self.spawn([shutil.which("epmd") or "epmd", "-port", str(self.port), "-address", "127.0.0.1"])
        self.wait_until(lambda: accepts(("127.0.0.1", self.port)), 10, "epmd")
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
        conf: More ``rabbitmq.conf`` lines (e.g. ``mqtt.durable_queue_type = quorum`` for a cluster); ``{port}``
            in them is the node's MQTT port (for a second listener: ``mqtt.listeners.tcp.2 = 10.0.0.1:{port}``).
    """

    def __init__(
        self, workdir: Path, epmd: Epmd, *, name: str = "rabbit", cookie: str = "qmpnet-test-cookie", conf: str = ""
    ) -> None:
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
            f"{conf.replace('{port}', str(self.port))}\n"
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
        self.boot()
        self.wait_mqtt()
        return self

    def boot(self) -> None:
        """Start booting the node (see :meth:`wait_mqtt`), so that several nodes can boot at once."""
        self.spawn([str(RABBITMQ_BIN / "rabbitmq-server")], env=self.env)

    def wait_mqtt(self) -> None:
        """Wait until the MQTT port accepts connections (after a boot or ``start_app``)."""
        self.wait_until(lambda: accepts(("127.0.0.1", self.port)), RABBITMQ_BOOT, f"RabbitMQ {self.node}")

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

    def kill(self) -> None:
        """SIGKILL the node's Erlang VM (the ``rabbitmq-server`` script runs it as a child) and reap the script."""
        if not self.running:
            return
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int((self.home / "pid").read_text().strip()), signal.SIGKILL)
        super().kill()


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
        self.wait_until(lambda: self.qmp.exists() and accepts(str(self.qmp)), 10, "QEMU QMP socket")
        return self


class Serve(Process):
    """``qmpnet serve`` as a child process (``python -m qmpnet serve``) with fast retry settings.

    Args:
        workdir: Where its log goes.
        broker: The broker URL, or several (one ``--broker`` each, tried in order).
        controller_id: The controller id.
        guests: Guest name -> QMP socket.
        args: More ``serve`` flags.
        env: More environment (``QMPNET_...`` settings).
        root: The topic root (``mqtt.topic_root``).
        protocol: ``mqtt.protocol`` (``auto``, ``5`` or ``3.1.1``).
    """

    def __init__(  # noqa: PLR0913 - the controller's coordinates, then keyword-only knobs
        self,
        workdir: Path,
        broker: str | Sequence[str],
        controller_id: str,
        guests: Mapping[str, Path] | None = None,
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        root: str = "qmpnet",
        protocol: str = "auto",
    ) -> None:
        super().__init__(f"serve-{controller_id}", workdir)
        #: Every broker, in the order given; :attr:`broker` is the first.
        self.brokers = [broker] if isinstance(broker, str) else list(broker)
        self.broker = self.brokers[0]
        self.controller_id = controller_id
        self.guests = dict(guests or {})
        self.args = list(args)
        self.root = root
        # Each controller has a state directory of its own unless the test shares one on purpose (--state-dir).
        own_state = {"QMPNET_STATE_DIR": str(workdir / f"state-{controller_id}")}
        mqtt = {"QMPNET_MQTT__TOPIC_ROOT": root, "QMPNET_MQTT__PROTOCOL": protocol}
        self.env = {**os.environ, **FAST_ENV, **own_state, **mqtt, **(env or {})}

    @property
    def base(self) -> str:
        """``<root>/<controller id>``."""
        return f"{self.root}/{self.controller_id}"

    def restart(self) -> Self:
        """Stop cleanly (SIGTERM) and start again with the same arguments (and state directory)."""
        self.stop()
        return self.start()

    def start(self) -> Self:
        """Start; the caller waits for the retained ``online`` status (see :func:`wait_online`)."""
        argv = [sys.executable, "-m", "qmpnet", "serve", "--controller-id", self.controller_id]
        for url in self.brokers:
            argv += ["--broker", url]
        for name, path in self.guests.items():
            argv += ["--guest", f"{name}={path}"]
        self.spawn([*argv, *self.args], env=self.env)
        return self


