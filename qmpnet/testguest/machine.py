"""Boot the test guest in QEMU from asyncio: the harness integration tests use.

A :class:`TestMachine` is an async context manager around one QEMU process with a QMP socket for the code under
test, a console log file (ttyS0) and, when it boots Linux, an agent: the busybox guest's own (ttyS1, see
:mod:`.agent`), or for the Debian guest (``flavour="debian"``, :mod:`.debian`) qemu-guest-agent on a virtio-serial
port named ``org.qemu.guest_agent.0``, on a unix socket QEMU serves (:attr:`TestMachine.qga_path`).

Design decisions:

- **The harness listens, QEMU connects.** The agent's chardev is a unix socket *client*: the harness binds the
  socket before spawning QEMU, so there is no polling for the guest side and QEMU fails at once if the socket
  is missing. QMP is the other way round (`server=on,wait=off`), because that is how qmpnet meets real guests.
- **Every wait races QEMU's exit and has a deadline.** A start that fails raises :class:`MachineError` with the
  command line, QEMU's stderr and the console tail, the text :meth:`TestMachine.describe` gives for any test
  failure report (the way `qemu.machine` reports launch errors).
- **No QEMU outlives its test.** :meth:`TestMachine.stop` sends SIGTERM, then SIGKILL after a deadline, and a
  cancelled stop still sends SIGKILL synchronously. As a best effort against a SIGKILL'd pytest, QEMU runs under
  `setpriv --pdeathsig KILL` (util-linux, always on Debian). Some sandboxes clear that signal at exec (seen on
  a Firecracker development VM); QEMU also stays in pytest's process group, so a CI runner that kills the
  group, or a Ctrl-C, takes QEMU with it.
- **The Debian guest is ready when systemd is.** Its agent socket is polled (connect + guest-sync, with a
  deadline) until qemu-guest-agent answers, then ``systemctl is-system-running --wait`` runs through it, so a test
  starts on a guest whose boot jobs are done. The harness does not keep the agent connection: QEMU serves one
  client at a time on that socket, and the code under test needs it.
- **TCG unless told otherwise.** Nested /dev/kvm devices on CI machines barely run Linux; real KVM is used only
  where the kvm_intel or kvm_amd module is loaded, and `QMPNET_ACCEL=tcg|kvm` overrides the guess.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Self, TypeVar

from qmpnet.adapters.qga import GuestAgent
from qmpnet.adapters.qmp import QmpMonitor
from qmpnet.errors import Busy, QmpnetError
from qmpnet.settings import QgaSettings

from .agent import LINE_LIMIT, TIMEOUT_SCALE, Agent, AgentError, AgentTimeoutError
from .debian import DebianImage
from .qemu_command import (
    ACCEL_ENV,
    BRIDGE_ID,
    BRIDGE_PORT_ID,
    FLAVOURS,
    KERNEL_ARGS,
    QEMU_BINARY,
    Accel,
    Flavour,
    MachineConfig,
    MachineError,
    MachineFiles,
    MachineType,
    build_command_line,
    detect_accel,
    orphan_guard,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Sequence
    from types import TracebackType

    from .agent import GuestInterface
    from .build import GuestImage

logger = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = [
    "ACCEL_ENV",
    "BRIDGE_ID",
    "BRIDGE_PORT_ID",
    "FLAVOURS",
    "KERNEL_ARGS",
    "QEMU_BINARY",
    "Accel",
    "Flavour",
    "MachineConfig",
    "MachineError",
    "MachineFiles",
    "MachineType",
    "TestMachine",
    "build_command_line",
    "detect_accel",
]

#: Seconds a boot may take, times the harness's TIMEOUT_SCALE (the lab host's nested TCG boots the busybox guest in
#: a minute and a half or more).
BOOT_TIMEOUT = 60.0 * TIMEOUT_SCALE
#: systemd under TCG: about 30 s on an idle 2-core machine, more while other guests boot.
DEBIAN_BOOT_TIMEOUT = 240.0 * TIMEOUT_SCALE
#: Short agent timeouts while polling a booting guest; its commands (systemctl --wait) get the boot's deadline.
_BOOT_QGA = QgaSettings(connect_timeout=1.0, command_timeout=5.0)
DEFAULT_MEMORY_MB: dict[Flavour, int] = {"busybox": 256, "debian": 512}
QMP_TIMEOUT = 10.0
#: A probe that connects but is not greeted within this long finds another client holding the monitor.
QMP_PROBE_TIMEOUT = 2.0
STOP_TIMEOUT = 5.0
CONSOLE_TAIL_LINES = 40
_SUN_PATH_MAX = 107


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(not available)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


class TestMachine:
    """One QEMU process running the test guest (or just waiting, with `boot=False`).

    Usage::

        async with TestMachine(image, machine="q35", root_ports=2) as vm:
            report = vm.agent.latest
            # connect to vm.qmp_path ...

    A machine can be started once. `boot=False` starts QEMU paused (`-S`) without a kernel: a guest that can
    never acknowledge an unplug, and has no agent.
    """

    # pytest would otherwise try to collect this class wherever a test module imports it.
    __test__ = False

    def __init__(  # noqa: PLR0913 - keyword-only knobs mirroring the QEMU options they set
        self,
        image: GuestImage | None,
        *,
        machine: MachineType = "pc",
        root_ports: int = 0,
        pcie_pci_bridge: bool = False,
        memory_mb: int | None = None,
        boot: bool = True,
        extra_args: Sequence[str] = (),
        workdir: Path | None = None,
        name: str = "guest",
        flavour: Flavour = "busybox",
    ) -> None:
        if boot and image is None:
            raise ValueError("a booting machine needs an image")
        if boot and flavour == "debian" and not isinstance(image, DebianImage):
            raise ValueError("flavour='debian' needs a DebianImage (qmpnet.testguest.ensure_debian_image())")
        self.image = image
        memory = memory_mb if memory_mb is not None else DEFAULT_MEMORY_MB.get(flavour, 256)
        self.config = MachineConfig(
            machine, root_ports, pcie_pci_bridge, memory, boot, tuple(extra_args), name, flavour
        )
        self._owns_workdir = workdir is None
        self.workdir = workdir if workdir is not None else Path(tempfile.mkdtemp(prefix=f"qmpnet-{name}-"))
        self.files = MachineFiles.in_dir(self.workdir)
        self.command_line = build_command_line(image, self.config, self.files, detect_accel())
        self._process: asyncio.subprocess.Process | None = None
        self._exited: asyncio.Task[int] | None = None
        self._agent: Agent | None = None
        self._server: asyncio.Server | None = None
        self._agent_connected: asyncio.Future[Agent] | None = None
        self._started = False
        self._final_description: str | None = None

    @property
    def name(self) -> str:
        """The machine's name (QEMU's `-name`)."""
        return self.config.name

    @property
    def qmp_path(self) -> Path:
        """The QMP unix socket (QEMU is the server)."""
        return self.files.qmp

    @property
    def flavour(self) -> Flavour:
        """Which guest it boots: ``busybox`` (the in-guest agent on ttyS1) or ``debian`` (qemu-guest-agent)."""
        return self.config.flavour

    @property
    def qga_path(self) -> Path | None:
        """qemu-guest-agent's unix socket (QEMU is the server), for the Debian flavour; None otherwise."""
        return self.files.qga if self.config.boot and self.config.flavour == "debian" else None

    @property
    def console_path(self) -> Path:
        """The guest console log (ttyS0)."""
        return self.files.console

    @property
    def root_port_ids(self) -> list[str]:
        """The ids of the free pcie-root-ports (q35)."""
        return self.config.root_port_ids

    @property
    def pid(self) -> int | None:
        """QEMU's process id, once started."""
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status once it has exited (negative: killed by that signal)."""
        return self._process.returncode if self._process is not None else None

    @property
    def agent(self) -> Agent:
        """The connected agent.

        Raises:
            MachineError: The machine was not started, or does not boot a guest.
        """
        if self._agent is None:
            raise MachineError(f"{self.name}: no agent (boot={self.config.boot}, started={self._started})")
        return self._agent

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self, timeout: float | None = None) -> None:
        """Start QEMU, wait for QMP to accept connections and, when booting, for the agent to report.

        For the Debian flavour, waits until qemu-guest-agent answers and systemd has finished booting.

        Args:
            timeout: Seconds for the whole start, boot included (default: 60, or 240 for Debian).

        Raises:
            MachineError: QEMU exited, or a step did not finish in time; the message describes the machine.
        """
        if self._started:
            raise MachineError(f"{self.name}: a TestMachine can be started only once")
        self._started = True
        if timeout is None:
            timeout = DEBIAN_BOOT_TIMEOUT if self.qga_path is not None else BOOT_TIMEOUT
        step = "starting QEMU"
        try:
            async with asyncio.timeout(timeout):
                step = "spawning QEMU"
                await self._spawn()
                step = "waiting for QMP"
                await self._until_exit(self._wait_qmp())
                if self.qga_path is not None:
                    step = "waiting for qemu-guest-agent to answer"
                    await self._until_exit(self._wait_qga(self.qga_path))
                    step = "waiting for systemd to finish booting"
                    await self._until_exit(self._wait_systemd(self.qga_path, timeout))
                elif self.config.boot:
                    step = "waiting for QEMU to connect the agent port"
                    await self._until_exit(self._accept_agent())
                    step = "waiting for the agent's hello and first report"
                    await self._until_exit(self.agent.wait_ready(timeout))
        except (TimeoutError, OSError, AgentError, MachineError) as err:
            reason = f"timed out after {timeout} s" if isinstance(err, TimeoutError) else str(err)
            message = self.describe(f"{step}: {reason}")
            await self.stop()
            raise MachineError(message) from err
        except BaseException:
            await self.stop()
            raise
        logger.info("%s: started (pid %s)", self.name, self.pid)

    async def _wait_qga(self, path: Path) -> None:
        # The agent has no greeting, and a booting guest's port swallows what we send: poll with connect + sync
        # (each try bounded by its connect timeout); start() bounds the whole loop with its deadline.
        while True:
            try:
                async with GuestAgent.connect(path, _BOOT_QGA):
                    return
            except QmpnetError as err:
                logger.debug("%s: agent not answering yet: %s", self.name, err)
            await asyncio.sleep(0.2)

    async def _wait_systemd(self, path: Path, timeout: float) -> None:
        async with GuestAgent.connect(path, _BOOT_QGA) as agent:
            done = await agent.exec(["systemctl", "is-system-running", "--wait"], timeout=timeout)
        state = done.stdout.strip()
        if state not in ("running", "degraded"):
            raise MachineError(f"systemd finished booting in state {state!r}: {done.stderr.strip()}")
        logger.info("%s: systemd is %s", self.name, state)

    async def shell(self, cmd: str, timeout: float = 30.0) -> str:
        """Run a shell command in the guest and return its standard output.

        The busybox guest runs it through its agent, whose answer is stdout and stderr combined; the Debian guest
        through qemu-guest-agent's ``guest-exec`` (stdout only).

        Raises:
            AgentError: The command exited non-zero (the message carries its output) or the agent failed.
            MachineError: The machine does not boot a guest.
        """
        if self.qga_path is None:
            return (await self.agent.run(cmd, timeout=timeout)).check().output
        try:
            async with GuestAgent.connect(self.qga_path, QgaSettings()) as agent:
                done = await agent.exec(["/bin/sh", "-c", cmd], timeout=timeout)
        except QmpnetError as err:
            raise AgentError(f"{self.name}: cannot run {cmd!r}: {err}") from err
        if not done.ok:
            status = f"rc {done.exitcode}" if done.exitcode is not None else f"signal {done.signal}"
            raise AgentError(f"guest command failed with {status}: {(done.stdout + done.stderr).strip()}")
        return done.stdout

    async def _spawn(self) -> None:
        if self.config.boot and self.qga_path is None:
            self._agent_connected = asyncio.get_running_loop().create_future()
            self._server = await asyncio.start_unix_server(
                self._on_agent_connected, path=self._socket_path(self.files.agent), limit=LINE_LIMIT
            )
        self._socket_path(self.files.qmp)
        if self.qga_path is not None:
            self._socket_path(self.qga_path)
        logger.debug("%s: %s", self.name, shlex.join(self.command_line))
        with self.files.stderr.open("wb") as stderr:
            self._process = await asyncio.create_subprocess_exec(
                *orphan_guard(), *self.command_line, stdin=asyncio.subprocess.DEVNULL, stdout=stderr, stderr=stderr
            )
        self._exited = asyncio.create_task(self._process.wait(), name=f"testguest[{self.name}].exit")

    def _socket_path(self, path: Path) -> str:
        if len(os.fsencode(path)) > _SUN_PATH_MAX:
            raise MachineError(f"socket path too long for AF_UNIX ({_SUN_PATH_MAX} bytes): {path}")
        return str(path)

    def _on_agent_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._agent_connected is None or self._agent_connected.done():
            logger.warning("%s: refusing a second connection to the agent socket", self.name)
            writer.close()
            return
        self._agent_connected.set_result(Agent(reader, writer, name=self.name))

    async def _accept_agent(self) -> None:
        if self._agent_connected is None:
            raise MachineError("the agent socket is not listening")
        self._agent = await self._agent_connected
        self._agent.start()
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _wait_qmp(self) -> None:
        """Poll until QMP answers a command.

        A connection or even the greeting is not enough: QEMU greets from its monitor thread before it has
        created the devices, so a bad `-device` would fail only after that. Commands run in the main loop.
        """
        # QEMU offers nothing to wait on but the socket itself; start() bounds this loop with its deadline.
        while not await self._qmp_answers():  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    async def _qmp_answers(self) -> bool:
        if not self.files.qmp.exists():
            return False  # not listening yet; checked first because qemu.qmp logs every failed connect
        try:
            monitor = await QmpMonitor.connect(
                str(self.files.qmp), name=f"testguest[{self.name}].probe", connect_timeout=QMP_PROBE_TIMEOUT,
                command_timeout=QMP_TIMEOUT,
            )
        except Busy:
            # Somebody else (a controller reconnecting to a QEMU restarted on its socket) got the monitor first:
            # QEMU is up and serving QMP, and that client's commands wait until the devices are created.
            return True
        except QmpnetError:
            return False  # QEMU is still starting, or exiting: _until_exit notices the latter
        try:
            await monitor.execute("query-status")
        except QmpnetError:
            return False
        finally:
            await monitor.close()
        return True

    async def _until_exit(self, awaitable: Awaitable[T]) -> T:
        """Await `awaitable`, but fail as soon as QEMU exits."""
        if self._exited is None:
            raise MachineError("QEMU is not running")
        task = asyncio.ensure_future(awaitable)
        try:
            await asyncio.wait({task, self._exited}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            raise MachineError(f"QEMU exited with status {self._exited.result()}")
        finally:
            task.cancel()

    async def stop(self) -> None:
        """Stop QEMU (SIGTERM, then SIGKILL after a deadline), close the sockets, remove an owned workdir.

        Safe to call more than once, and on a machine that failed to start.
        """
        try:
            await self._close_agent()
            await self._terminate()
        finally:
            # Even when cancelled above: never leave QEMU running.
            if self._process is not None and self._process.returncode is None:
                self._process.kill()
            if self._server is not None:
                self._server.close()
                self._server = None
            if self._exited is not None and not self._exited.done():
                self._exited.cancel()
            self._forget_workdir()

    async def _close_agent(self) -> None:
        connected = self._agent_connected
        if self._agent is None and connected is not None and connected.done() and not connected.cancelled():
            self._agent = connected.result()  # QEMU connected, but start() gave up before taking it
        if self._agent is not None:
            await self._agent.close()

    async def _terminate(self) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await process.wait()
        except TimeoutError:
            logger.warning("%s: QEMU ignored SIGTERM for %s s, killing it", self.name, STOP_TIMEOUT)
            process.kill()
            await process.wait()

    def _forget_workdir(self) -> None:
        if self._owns_workdir and self.workdir.exists():
            self._final_description = self.describe()
            shutil.rmtree(self.workdir, ignore_errors=True)

    def kill(self) -> None:
        """Send QEMU SIGKILL (for fault tests); :meth:`wait_exit` reaps it."""
        if self._process is not None and self._process.returncode is None:
            self._process.kill()

    async def wait_exit(self, timeout: float | None = None) -> int:
        """Wait until QEMU exits and return its status (negative: the signal that killed it).

        Raises:
            MachineError: QEMU was never started.
            TimeoutError: It did not exit within `timeout` seconds.
        """
        if self._process is None:
            raise MachineError(f"{self.name}: QEMU was never started")
        async with asyncio.timeout(timeout):
            return await self._process.wait()

    async def wait_nic(self, mac: str, timeout: float = 20.0, **want: object) -> GuestInterface:
        """Wait until the guest reports an interface with ``mac`` whose attributes equal ``want``.

        Example: ``await vm.wait_nic(mac, driver="e1000", carrier=True)``.

        Raises:
            AgentTimeoutError: Not within ``timeout``; the message describes the machine.
        """

        def match(interfaces: list[GuestInterface]) -> GuestInterface | None:
            found = next((i for i in interfaces if i.mac == mac), None)
            if found is not None and all(getattr(found, k) == v for k, v in want.items()):
                return found
            return None

        try:
            return await self.agent.wait_for(match, timeout=timeout)
        except AgentTimeoutError as err:
            raise AgentTimeoutError(self.describe(f"the guest never reported {mac} with {want}")) from err

    async def wait_nic_gone(self, mac: str, timeout: float = 20.0) -> None:
        """Wait until the guest no longer reports an interface with ``mac``.

        Raises:
            AgentTimeoutError: Not within ``timeout``; the message describes the machine.
        """
        try:
            await self.agent.wait_for(lambda interfaces: all(i.mac != mac for i in interfaces), timeout=timeout)
        except AgentTimeoutError as err:
            raise AgentTimeoutError(self.describe(f"the guest still reports {mac}")) from err

    def describe(self, headline: str | None = None) -> str:
        """Return what a failure report needs: state, command line, QEMU's stderr, console tail, agent state.

        After :meth:`stop` removed the working directory this is the description taken just before.
        """
        if self._final_description is not None and not self.workdir.exists():
            return self._final_description if headline is None else f"{headline}\n{self._final_description}"
        state = "not started" if self._process is None else f"pid {self.pid}, exit status {self.returncode}"
        parts = [
            f"{self.name}: {headline}" if headline else f"test machine {self.name}",
            f"state: {state}",
            f"command line: {shlex.join(self.command_line)}",
            f"QEMU stderr:\n{_tail(self.files.stderr, CONSOLE_TAIL_LINES)}",
            f"console (last {CONSOLE_TAIL_LINES} lines):\n{_tail(self.files.console, CONSOLE_TAIL_LINES)}",
        ]
        if self._agent is not None:
            parts.append(f"agent: {self._agent.describe()}")
        if self.qga_path is not None:
            parts.append(f"guest agent socket: {self.qga_path}")
        return "\n".join(parts)
