"""Real processes for MQTT tests: a mosquitto broker, QEMU ``-S`` guests and ``qmpnet serve``.

Each helper owns one process, writes its output to a log file in the test's directory and describes itself
(command line and log tail) when something fails, so a broken test shows what the process said. Every process is
stopped by the fixture that started it, also when the test fails. The broker listens on a free loopback port with
``set_tcp_nodelay true`` (without it every round trip costs ~88 ms of Nagle/delayed-ACK).

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
from pathlib import Path
from typing import TYPE_CHECKING, Self

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

    def __init__(  # noqa: PLR0913 - the controller's coordinates, then keyword-only knobs
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


