"""The QMP adapter: one guest's monitor over ``qemu.qmp``, behind the :class:`qmpnet.core.ports.Monitor` port.

These habits are kept here and nowhere else:

* **Errors are translated at the border.** ``qemu.qmp`` raises ``ExecuteError``, ``ExecInterruptedError``,
  ``StateError`` and ``ConnectError``; callers see the qmpnet tree. A command that was sent and got no answer
  (per-command timeout, or the connection dropped while waiting) is ``OutcomeUnknown``: QEMU may have applied it.
* **Listeners are registered before the command that causes their event** (:meth:`QmpMonitor.listen` is a
  context manager entered around the command), so a fast ``DEVICE_DELETED`` cannot slip past.
* **Reading is exact** (:mod:`qmpnet.adapters.qmp.reader`): :meth:`QmpMonitor.observe` builds the guest from QOM,
  ``query-pci`` and ``info network``, refuses answers of unknown shape (``UnexpectedReply``), and keeps what cannot
  change per connection, forgotten on ``DEVICE_DELETED`` by a listener that runs as the event arrives.
* **Memory stays flat.** ``qemu.qmp`` keeps every event in each listener's history and queues every event on its
  always-on default listener. We install history-free listeners and drain the default one in a pump task that
  hands events to the registered handlers, so a guest that emits events for months costs nothing.
* **qemu.qmp's private names are used in one module only**, :mod:`qmpnet.adapters.qmp.qemu_qmp_internals` (the
  history-free listeners and the direct write path for commands), with the reasons and a contract test.

A fresh ``QMPClient`` is made per connection; a ``QmpMonitor`` is not reusable after :meth:`close`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Final, cast

from qemu.qmp import ConnectError, EventListener, ExecInterruptedError, ExecuteError, Message, QMPError
from qemu.qmp.protocol import Runstate

from qmpnet.adapters.qmp.deadlines import Deadlines
from qmpnet.adapters.qmp.parse import machine_kind, parse_device_help
from qmpnet.adapters.qmp.qemu_qmp_internals import FlatClient, FlatListener, peer_socket, take_nowait
from qmpnet.adapters.qmp.reader import GuestReader
from qmpnet.core.model import ModelInfo, RxFilter
from qmpnet.core.ports import EventStream, Observation, QmpEvent
from qmpnet.errors import Busy, GuestUnavailable, OutcomeUnknown, QmpCommandError, QmpnetError, Unsupported

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence

__all__ = ["QmpMonitor", "parse_address"]

log = logging.getLogger(__name__)

Address = str | tuple[str, int]
_RX_FILTER_UNSUPPORTED: Final = "doesn't support rx-filter"


async def _open_socket(target: Address) -> socket.socket:
    """A connected, non-blocking socket to ``target`` (what ``qemu.qmp`` then greets over)."""
    loop = asyncio.get_running_loop()
    if isinstance(target, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)  # noqa: FBT003 - the socket API's own signature
        try:
            await loop.sock_connect(sock, target)
        except BaseException:
            sock.close()
            raise
        return sock
    host, port = target
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: OSError = OSError(f"{host}:{port}: no address")
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)  # noqa: FBT003 - the socket API's own signature
        try:
            await loop.sock_connect(sock, sockaddr)
        except OSError as err:
            sock.close()
            last = err
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise last


def _build_of(pid: int | None, version: str | None) -> tuple[object, ...] | None:
    """Which QEMU binary process ``pid`` runs: its executable's device, inode, size and mtime, and the version.

    ``None`` when it cannot be told (no pid over TCP; another user's process) or the peer is this process (an
    in-process fake monitor is no QEMU binary): the connection then reads the types itself.
    """
    if pid is None or pid == os.getpid():
        return None
    try:
        exe = Path(f"/proc/{pid}/exe").stat()
    except OSError:
        return None
    return (exe.st_dev, exe.st_ino, exe.st_size, exe.st_mtime_ns, version)


def parse_address(address: str) -> Address:
    """Turn ``/path/to.sock`` or ``host:port`` into what ``qemu.qmp`` connects to.

    Raises:
        ValueError: ``host:port`` with a port that is not a number in 1-65535.
    """
    if "/" in address or ":" not in address:
        return address
    host, _, port = address.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r}: port must be a number in 1-65535")
    return host.strip("[]") or "127.0.0.1", int(port)


class _Deletions(EventListener):
    """Calls ``forget(path)`` for each ``DEVICE_DELETED`` as it arrives, before any later answer is delivered.

    qemu.qmp hands an event to every listener before it reads the next message, so a read that starts after an
    answer never uses facts of a device whose deletion QEMU reported before that answer. Nothing is queued.
    """

    def __init__(self, forget: Callable[[str], None]) -> None:
        super().__init__(("DEVICE_DELETED",))
        self._forget = forget

    async def put(self, event: Message) -> None:
        data = event.get("data")
        path = data.get("path") if isinstance(data, dict) else None
        if self.accept(event) and isinstance(path, str):
            self._forget(path)


class _Stream:
    """An :class:`EventStream` over one registered listener."""

    def __init__(self, listener: EventListener) -> None:
        self._listener = listener

    async def get(self) -> QmpEvent:
        return _event(await self._listener.get())

    def get_nowait(self) -> QmpEvent | None:
        message = take_nowait(self._listener)
        return _event(message) if message is not None else None


def _event(message: Message) -> QmpEvent:
    stamp = message.get("timestamp")
    seconds = time.time()
    if isinstance(stamp, dict):
        seconds = float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
    data = message.get("data")
    return QmpEvent(str(message["event"]), dict(data) if isinstance(data, dict) else {}, seconds)


class QmpMonitor:
    """A connected QMP monitor of one guest.

    Use :meth:`connect`; the monitor is live until :meth:`close` or until QEMU goes away (then
    :attr:`closed` is set and every call raises :class:`GuestUnavailable`).

    Args:
        name: A name for logs (the guest's name).
        command_timeout: Seconds to wait for a command's answer before reporting ``outcome_unknown``.
        read_attempts: Reads :meth:`observe` tries when the guest changes while it is read.
    """

    def __init__(self, name: str, *, command_timeout: float, read_attempts: int = 3) -> None:
        self.name = name
        self._client = FlatClient(name)
        self._command_timeout = command_timeout
        self._deadlines = Deadlines(command_timeout)
        self._types_reader = GuestReader(self.execute, attempts=read_attempts)
        self._client.register_listener(_Deletions(self._types_reader.forget))
        self._handlers: list[Callable[[QmpEvent], None]] = []
        self._pump: asyncio.Task[None] | None = None
        self._machine: tuple[str, str] | None = None
        self.closed = asyncio.Event()
        self.peer_pid: int | None = None

    @classmethod
    async def connect(
        cls, address: str, *, name: str, connect_timeout: float, command_timeout: float, read_attempts: int = 3
    ) -> QmpMonitor:
        """Connect to the QMP monitor at ``address`` (unix path or ``host:port``) and negotiate.

        Waits at most ``connect_timeout`` seconds in all: for the socket, then for QEMU's greeting. QEMU serves
        one QMP client per monitor and leaves the next connection waiting, without a greeting, until the current
        client leaves; so a connection that is accepted but not greeted in time means another client holds it.
        ``read_attempts`` is ``qmp.read_attempts`` of the settings (its default here is the settings' default).

        Raises:
            GuestUnavailable: Nothing listens there, QEMU refused the session, or the socket did not connect in time.
            Busy: The socket connected but QEMU did not greet within the timeout: another client holds the monitor.
        """
        monitor = cls(name, command_timeout=command_timeout, read_attempts=read_attempts)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + connect_timeout
        try:
            target = parse_address(address)
            async with asyncio.timeout_at(deadline):
                sock = await _open_socket(target)
        except ValueError as err:
            raise GuestUnavailable(f"bad QMP address {address!r}: {err}") from err
        except TimeoutError as err:
            raise GuestUnavailable(f"QMP monitor {address} did not accept a connection within {connect_timeout:g} s"
                                   ) from err
        except OSError as err:
            raise GuestUnavailable(f"cannot connect to QMP monitor {address}: {err.strerror or err}") from err
        try:
            async with asyncio.timeout_at(deadline):
                await monitor._client.connect(sock)
        except TimeoutError as err:
            await monitor._client.disconnect()
            raise Busy(
                f"QMP monitor {address} sent no greeting within {connect_timeout:g} s: another client holds it "
                "(QEMU serves one QMP client at a time)"
            ) from err
        except ConnectError as err:
            sock.close()
            raise GuestUnavailable(f"cannot connect to QMP monitor {address}: {err.exc}") from err
        monitor.peer_pid = monitor._peer_pid()
        build = _build_of(monitor.peer_pid, monitor.greeting_version)
        if build is not None:
            monitor._types_reader.share_types(build)
        monitor._pump = asyncio.create_task(monitor._run_pump(), name=f"qmpnet[guest={name}].qmp-events")
        return monitor

    def _peer_pid(self) -> int | None:
        """QEMU's process id from the unix socket's peer credentials (``None`` over TCP).

        The host side uses it to find which tap an fd QEMU holds is (``/proc/<pid>/fdinfo``), for NICs another
        process added.
        """
        sock = peer_socket(self._client)
        if sock is None or sock.family != socket.AF_UNIX:
            return None
        try:
            pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        except OSError:
            return None
        return pid or None

    @property
    def greeting_version(self) -> str | None:
        """QEMU's version from the greeting, e.g. ``7.2.22``."""
        greeting = self._client.greeting
        if greeting is None:
            return None
        qemu = greeting.QMP.version.get("qemu")
        if not isinstance(qemu, dict):
            return None
        return f"{qemu.get('major')}.{qemu.get('minor')}.{qemu.get('micro')}"

    async def close(self) -> None:
        """Disconnect and stop the event pump. Safe to call twice."""
        self._deadlines.stop()
        if self._pump is not None:
            self._pump.cancel()
            with suppress(asyncio.CancelledError):
                await self._pump
        with suppress(QMPError, OSError, EOFError):
            await self._client.disconnect()
        self.closed.set()

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> object:
        """Run ``command`` and return QEMU's ``return`` value; waits at most the command timeout.

        Raises:
            QmpCommandError: QEMU answered with an error.
            OutcomeUnknown: The command was sent and no answer came (timeout or connection lost).
            GuestUnavailable: The monitor is not connected; nothing was sent.
        """
        if self._client.runstate != Runstate.RUNNING:
            raise GuestUnavailable(f"guest {self.name}: QMP monitor is not connected")
        log.debug("guest %s: -> %s %s", self.name, command, arguments)
        watch = self._deadlines.watch()  # asyncio.timeout's work, on one timer for every command (see .deadlines)
        try:
            try:
                return await self._client.execute(command, arguments)
            except asyncio.CancelledError as err:
                if Deadlines.expired(watch):
                    raise TimeoutError from err
                raise
            finally:
                self._deadlines.forget(watch)
        except ExecuteError as err:
            desc = err.error.error.desc
            raise QmpCommandError(f"{command}: {desc}", qmp_class=err.error_class, command=command) from err
        except TimeoutError as err:
            raise OutcomeUnknown(
                f"{command}: no answer from QEMU within {self._command_timeout:g} s; it may or may not have been "
                "applied"
            ) from err
        except ExecInterruptedError as err:
            raise OutcomeUnknown(
                f"{command}: the connection to QEMU was lost before it answered; it may or may not have been applied"
            ) from err
        except QMPError as err:
            raise GuestUnavailable(f"guest {self.name}: {command}: {err}") from err

    @asynccontextmanager
    async def listen(
        self, names: Collection[str], where: Callable[[QmpEvent], bool] | None = None
    ) -> AsyncIterator[EventStream]:
        """Listen for events named ``names`` (and matching ``where``) while the context is open."""

        def accept(message: Message) -> bool:
            return where is None or where(_event(message))

        listener = FlatListener(names, accept)
        self._client.register_listener(listener)
        try:
            yield _Stream(listener)
        finally:
            self._client.remove_listener(listener)

    def on_event(self, handler: Callable[[QmpEvent], None]) -> None:
        """Call ``handler`` for every event, from the event pump."""
        self._handlers.append(handler)

    async def _run_pump(self) -> None:
        # qemu.qmp's listeners never end; a watcher task marks the monitor closed when the connection goes.
        watcher = asyncio.create_task(self._wait_disconnect(), name=f"qmpnet[guest={self.name}].qmp-watch")
        try:
            async for message in self._client.events:
                self._dispatch(_event(message))
        finally:
            watcher.cancel()

    def _dispatch(self, event: QmpEvent) -> None:
        for handler in self._handlers:
            try:
                handler(event)
            except Exception:
                log.exception("guest %s: event handler failed on %s", self.name, event.name)

    async def _wait_disconnect(self) -> None:
        while self._client.runstate == Runstate.RUNNING:
            await self._client.runstate_changed()
        log.info("guest %s: QMP connection closed", self.name)
        self.closed.set()

    async def machine(self) -> tuple[str, str]:
        """The machine type name and kind (``pc`` or ``q35``), read once per connection."""
        if self._machine is None:
            qom_type = await self.execute("qom-get", {"path": "/machine", "property": "type"})
            self._machine = machine_kind(str(qom_type))
        return self._machine

    async def hmp(self, command_line: str) -> str:
        """Run a human monitor command and return its text."""
        return str(await self.execute("human-monitor-command", {"command-line": command_line}))

    async def observe(self) -> Observation:
        """Read PCI devices, buses and net clients from QOM, ``query-pci`` and ``info network``.

        See :mod:`.reader` for what is read and why. The independent queries of a read are sent at once.

        Raises:
            Unsupported: The machine has no PCI root bus qmpnet can hot-plug into.
            UnexpectedReply: QEMU answered in a shape qmpnet does not know, or the guest changed during every
                attempt to read it.
            QmpCommandError, OutcomeUnknown, GuestUnavailable: As :meth:`execute`.
        """
        machine, kind = await self.machine()
        return await self._types_reader.read(machine, kind)

    async def models(self) -> list[ModelInfo]:
        """The PCI NIC models this QEMU offers (``device_add help``)."""
        return parse_device_help(await self.hmp("device_add help"))

    async def pass_fds(self, fds: Sequence[tuple[str, int]]) -> None:
        """Hand each open fd to QEMU under its name (``getfd`` with the fd attached by SCM_RIGHTS); all or none.

        Raises:
            Unsupported: The monitor is a TCP socket: fds can only travel over a unix socket.
            QmpCommandError, OutcomeUnknown, GuestUnavailable: As :meth:`execute`.
        """
        passed: list[str] = []
        try:
            for name, fd in fds:
                try:
                    self._client.send_fd_scm(fd)
                except (QMPError, OSError) as err:
                    raise Unsupported(
                        f"guest {self.name}: cannot pass a tap fd over this QMP connection ({err}); bridge and NAT "
                        "NICs need a unix-socket monitor (or a bridge backend with helper: true)"
                    ) from err
                await self.execute("getfd", {"fdname": name})
                passed.append(name)
        except QmpnetError:
            for name in passed:
                with suppress(QmpnetError):
                    await self.execute("closefd", {"fdname": name})
            raise

    async def rx_filter(self, name: str) -> RxFilter | None:
        """The rx-filter of virtio NIC ``name``; ``None`` for models that cannot report one."""
        try:
            answer = await self.execute("query-rx-filter", {"name": name})
        except QmpCommandError as err:
            if _RX_FILTER_UNSUPPORTED in err.message:
                return None
            raise
        entries = cast("list[dict[str, object]]", answer)
        if not entries:
            return None
        raw = entries[0]
        return RxFilter(
            promiscuous=bool(raw.get("promiscuous")),
            multicast=str(raw.get("multicast")),
            unicast=str(raw.get("unicast")),
            main_mac=str(raw.get("main-mac")),
            multicast_table=[str(m) for m in cast("list[object]", raw.get("multicast-table", []))],
            unicast_table=[str(m) for m in cast("list[object]", raw.get("unicast-table", []))],
        )

