"""The guest agent adapter: one connection to a guest's qemu-guest-agent over its unix socket.

The agent speaks QMP's JSON framing without a greeting: one command at a time, answers in order. Design decisions:

* **Synchronise before trusting a byte.** The socket is a virtio-serial port whose buffers survive our
  connections, so an earlier client's unread answer may still be in flight. :meth:`GuestAgent.open` sends
  ``guest-sync-delimited`` with a random id after a 0xFF byte (which also resets the agent's parser); the agent
  answers with 0xFF before the JSON, so everything before that byte is stale and skipped, as is any answer with
  another id. A command interrupted by a timeout or a cancellation leaves its answer unread: the next command
  synchronises again first, so a connection is never out of step.
* **No agent is not an error of the guest.** A socket nobody listens on, a QEMU that accepts but a guest whose
  agent is not running (the sync gets no answer), or a second client while another holds the port (QEMU accepts
  one) all raise :class:`~qmpnet.errors.AgentUnavailable` after ``connect_timeout``; :func:`guest_views` turns
  that into ``None`` for callers that only want to show what the guest sees.
* **sysfs through the file API.** ``guest-network-get-interfaces`` gives names, MACs and addresses but no link
  state, so ``carrier`` and ``operstate`` are read from ``/sys/class/net/<if>/`` with ``guest-file-open`` /
  ``guest-file-read`` / ``guest-file-close``, which Debian's qemu-guest-agent allows by default. The kernel
  refuses to read ``carrier`` of an interface that is down: that is ``carrier=None``, not an error.
* **An interface counts once it has its name.** The kernel creates ``eth0`` and udev renames it a moment later
  (``ens4``); :meth:`GuestAgent.named` tells the two apart, so a verified add reports the name that stays.
* **Timeouts come from** :class:`~qmpnet.settings.QgaSettings`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self, TypeVar

from pydantic import BaseModel, ValidationError

from qmpnet.adapters.qga.replies import ExecStarted, ExecStatus, FileRead, NetworkInterface
from qmpnet.core.model import GuestView
from qmpnet.core.names import normalize_mac
from qmpnet.errors import AgentCommandError, AgentUnavailable, QmpnetError, Timeout

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping, Sequence
    from os import PathLike

    from qmpnet.settings import QgaSettings

__all__ = ["ExecResult", "GuestAgent", "guest_views"]

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

#: Longest answer line accepted (guest-exec output comes base64'd in one line).
LINE_LIMIT = 16 * 1024 * 1024
_DELIMITER = b"\xff"
_SYSFS_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")
_SYSFS_READ = 4096
_UDEV_CONTROL = "/run/udev/control"
#: name_assign_type values udev may still change: the kernel's enumerated name (1), and renamed (4), which the kernel
#: sets a moment before the new name shows.
_UDEV_NAMED = frozenset({"1", "4"})
_ENOENT = "No such file or directory"
#: How often a running guest-exec is asked whether it has finished (guest side: a fork + exec under TCG).
_EXEC_POLL = 0.05


@dataclass(frozen=True)
class ExecResult:
    """A command run in the guest with ``guest-exec``: exit status (or signal), stdout and stderr."""

    exitcode: int | None
    signal: int | None
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        """Whether the command exited with status 0."""
        return self.exitcode == 0


class GuestAgent:
    """A synchronised connection to one guest's qemu-guest-agent.

    Use ``async with GuestAgent.connect(path, settings) as agent`` (or :meth:`open` and :meth:`close`). Commands
    run one at a time; a connection is not reusable after :meth:`close`.
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, path: str, settings: QgaSettings
    ) -> None:
        self.path = path
        self.settings = settings
        self._reader = reader
        self._out = writer
        self._lock = asyncio.Lock()
        self._in_step = False
        self._closed = False
        self._udev: bool | None = None

    @classmethod
    async def open(cls, path: str | PathLike[str], settings: QgaSettings) -> Self:
        """Connect to the agent socket at ``path`` and synchronise with the agent.

        Waits at most ``settings.connect_timeout`` for the connection and the ``guest-sync-delimited`` answer.

        Raises:
            AgentUnavailable: Nothing listens at ``path``, or no agent answered in time.
        """
        where = str(path)
        try:
            async with asyncio.timeout(settings.connect_timeout):
                reader, writer = await asyncio.open_unix_connection(where, limit=LINE_LIMIT)
        except (OSError, TimeoutError) as err:
            raise AgentUnavailable(f"cannot connect to the guest agent socket {where}: {err or 'timed out'}") from err
        agent = cls(reader, writer, path=where, settings=settings)
        try:
            await agent._sync(settings.connect_timeout)
        except BaseException:
            await agent.close()
            raise
        return agent

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, path: str | PathLike[str], settings: QgaSettings) -> AsyncIterator[Self]:
        """Connect as :meth:`open` does, and close on exit.

        Raises:
            AgentUnavailable: As :meth:`open`.
        """
        agent = await cls.open(path, settings)
        try:
            yield agent
        finally:
            await agent.close()

    async def close(self) -> None:
        """Close the connection. Safe to call twice."""
        self._closed = True
        self._out.close()
        with contextlib.suppress(OSError):
            await self._out.wait_closed()

    # --- protocol -------------------------------------------------------------------------------------------

    async def _sync(self, timeout: float) -> None:
        """Send ``guest-sync-delimited`` and skip everything up to its answer."""
        token = secrets.randbelow(2**31)
        request = {"execute": "guest-sync-delimited", "arguments": {"id": token}}
        try:
            async with asyncio.timeout(timeout):
                self._out.write(_DELIMITER + json.dumps(request).encode() + b"\n")
                await self._out.drain()
                while True:
                    await self._reader.readuntil(_DELIMITER)
                    answer = _decode(await self._reader.readline())
                    if isinstance(answer, dict) and answer.get("return") == token:
                        self._in_step = False
                        return
        except TimeoutError as err:
            raise AgentUnavailable(
                f"the guest agent at {self.path} did not answer guest-sync within {timeout:g} s (agent not running "
                "in the guest, or another client holds the socket)"
            ) from err
        except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as err:
            raise AgentUnavailable(f"the guest agent connection {self.path} failed during guest-sync: {err}") from err

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> object:
        """Run one agent command and return its ``return`` value; waits at most ``command_timeout``.

        Raises:
            AgentCommandError: The agent answered with an error (``qmp_class`` is its class).
            AgentUnavailable: The connection is closed or failed, or no answer came in time.
        """
        if self._closed:
            raise AgentUnavailable(f"guest agent {self.path}: the connection is closed")
        timeout = self.settings.command_timeout
        async with self._lock:
            if self._in_step:
                await self._sync(timeout)
            message: dict[str, object] = {"execute": command}
            if arguments is not None:
                message["arguments"] = dict(arguments)
            self._in_step = True
            try:
                async with asyncio.timeout(timeout):
                    self._out.write(json.dumps(message).encode() + b"\n")
                    await self._out.drain()
                    answer = _decode(await self._reader.readline())
            except TimeoutError as err:
                raise AgentUnavailable(f"guest agent {self.path}: no answer to {command} within {timeout:g} s") from err
            except (OSError, ValueError) as err:
                raise AgentUnavailable(f"guest agent {self.path}: {command}: {err}") from err
            self._in_step = False
        if not isinstance(answer, dict):
            raise AgentUnavailable(f"guest agent {self.path}: {command}: unreadable answer {answer!r}")
        error = answer.get("error")
        if isinstance(error, dict):
            desc = str(error.get("desc", "error"))
            raise AgentCommandError(f"{command}: {desc}", qmp_class=str(error.get("class")), command=command)
        if "return" not in answer:
            raise AgentUnavailable(f"guest agent {self.path}: {command}: unexpected answer {answer!r}")
        return answer["return"]

    async def _call(self, model: type[M], command: str, arguments: Mapping[str, object] | None = None) -> M:
        value = await self.execute(command, arguments)
        try:
            return model.model_validate(value)
        except ValidationError as err:
            raise AgentUnavailable(f"guest agent {self.path}: {command}: unreadable answer: {err}") from err

    # --- the guest view ---------------------------------------------------------------------------------------

    async def network_interfaces(self) -> list[NetworkInterface]:
        """``guest-network-get-interfaces``, parsed.

        Raises:
            AgentCommandError, AgentUnavailable: As :meth:`execute`.
        """
        value = await self.execute("guest-network-get-interfaces")
        if not isinstance(value, list):
            raise AgentUnavailable(f"guest agent {self.path}: guest-network-get-interfaces: not a list: {value!r}")
        try:
            return [NetworkInterface.model_validate(entry) for entry in value]
        except ValidationError as err:
            raise AgentUnavailable(f"guest agent {self.path}: unreadable interface list: {err}") from err

    async def interfaces(self) -> list[GuestView]:
        """Every interface of the guest that has a MAC address (not ``lo``), with carrier and operstate.

        Raises:
            AgentCommandError, AgentUnavailable: As :meth:`execute`.
        """
        return [await self._view(interface, mac) for interface, mac in _with_macs(await self.network_interfaces())]

    async def interface_for(self, mac: str) -> GuestView | None:
        """The guest's interface with this MAC (any case), or ``None`` when the guest has none.

        Raises:
            ValueError: ``mac`` is not a MAC address.
            AgentCommandError, AgentUnavailable: As :meth:`execute`.
        """
        wanted = normalize_mac(mac)
        for interface, found in _with_macs(await self.network_interfaces()):
            if found == wanted:
                return await self._view(interface, found)
        return None

    async def _view(self, interface: NetworkInterface, mac: str) -> GuestView:
        carrier: bool | None = None
        operstate: str | None = None
        if _SYSFS_IFNAME.match(interface.name):
            base = f"/sys/class/net/{interface.name}"
            raw_carrier = await self.read_text(f"{base}/carrier")
            if raw_carrier is not None and raw_carrier.strip() in ("0", "1"):
                carrier = raw_carrier.strip() == "1"
            raw_operstate = await self.read_text(f"{base}/operstate")
            operstate = raw_operstate.strip() or None if raw_operstate is not None else None
        addresses = [address.cidr for address in interface.ip_addresses]
        return GuestView(ifname=interface.name, mac=mac, carrier=carrier, operstate=operstate, addresses=addresses)

    async def named(self, view: GuestView) -> bool:
        """Whether the guest is done naming the interface: udev renames ``eth0`` to ``ens4`` just after it appears.

        In a guest where udev runs, an interface with the kernel's enumerated name or a renamed one
        (``name_assign_type`` 1 or 4) is named once udev's record of it (``/run/udev/data/n<ifindex>``) says the
        name it chose (``ID_NET_NAME``) is the current one, or has no name to give it (``net.ifnames=0``). udev
        writes that record while still renaming (``ID_RENAMING=1``), and the kernel marks an interface renamed a
        moment before its new name shows, so neither alone is enough. A name given by the user (3) or the driver
        (2), or any name in a guest without udev, is final.

        Raises:
            AgentUnavailable: As :meth:`execute`.
        """
        base = f"/sys/class/net/{view.ifname}"
        if not _SYSFS_IFNAME.match(view.ifname):
            return True
        assign_type = await self.read_text(f"{base}/name_assign_type")
        if assign_type is None:
            # Unreadable (NET_NAME_UNKNOWN: EINVAL) is final, unless the interface is no longer there by that name.
            return await self._exists(f"{base}/ifindex")
        return assign_type.strip() not in _UDEV_NAMED or await self._named_by_udev(base, view.ifname)

    async def _named_by_udev(self, base: str, ifname: str) -> bool:
        if self._udev is None:
            self._udev = await self._exists(_UDEV_CONTROL)
        ifindex = (await self.read_text(f"{base}/ifindex") or "").strip()
        if not ifindex.isdigit():
            return False  # renamed (or gone) since we looked
        if not self._udev:
            return True
        record = await self.read_text(f"/run/udev/data/n{ifindex}")
        return record is not None and _udev_gave_name(record, ifname)

    async def _exists(self, path: str) -> bool:
        """Whether ``path`` exists in the guest (opening a socket fails with ENXIO: it exists)."""
        try:
            handle = await self.execute("guest-file-open", {"path": path, "mode": "r"})
        except AgentCommandError as err:
            return _ENOENT not in err.message
        with contextlib.suppress(AgentCommandError):
            await self.execute("guest-file-close", {"handle": handle})
        return True

    async def read_text(self, path: str) -> str | None:
        """The start (4 KiB) of a file in the guest, or ``None`` when the agent cannot open or read it.

        Raises:
            AgentUnavailable: As :meth:`execute`.
        """
        try:
            handle = await self.execute("guest-file-open", {"path": path, "mode": "r"})
        except AgentCommandError:
            return None
        try:
            chunk = await self._call(FileRead, "guest-file-read", {"handle": handle, "count": _SYSFS_READ})
        except AgentCommandError:
            return None  # e.g. carrier of an interface that is down: EINVAL
        finally:
            # Not while a deadline is cancelling us: closing would cost another round trip past it.
            task = asyncio.current_task()
            if task is None or not task.cancelling():
                with contextlib.suppress(AgentCommandError):
                    await self.execute("guest-file-close", {"handle": handle})
        return base64.b64decode(chunk.buf_b64).decode(errors="replace")

    # --- running commands -------------------------------------------------------------------------------------

    async def exec(self, argv: Sequence[str], *, timeout: float) -> ExecResult:
        """Run ``argv`` in the guest with ``guest-exec`` and return its exit status and output.

        Polls ``guest-exec-status`` until the process exits; qemu-guest-agent has no completion event.

        Raises:
            Timeout: The process did not exit within ``timeout`` seconds (it is left running).
            AgentCommandError: The agent could not start it (no such program ...).
            AgentUnavailable: As :meth:`execute`.
        """
        if not argv:
            raise ValueError("argv must name a program")
        started = await self._call(
            ExecStarted, "guest-exec", {"path": argv[0], "arg": list(argv[1:]), "capture-output": True}
        )
        deadline = time.monotonic() + timeout
        while True:
            status = await self._call(ExecStatus, "guest-exec-status", {"pid": started.pid})
            if status.exited:
                return ExecResult(
                    exitcode=status.exitcode,
                    signal=status.signal,
                    stdout=base64.b64decode(status.out_data).decode(errors="replace"),
                    stderr=base64.b64decode(status.err_data).decode(errors="replace"),
                )
            if time.monotonic() >= deadline:
                raise Timeout(f"guest command {list(argv)!r} still running after {timeout:g} s (pid {started.pid})")
            await asyncio.sleep(_EXEC_POLL)


def _decode(line: bytes) -> object:
    if not line:
        raise EOFError("the agent socket was closed")
    return json.loads(line.strip(_DELIMITER + b" \r\n"))


def _udev_gave_name(record: str, ifname: str) -> bool:
    """Whether udev's database record of an interface says it is done naming it ``ifname``."""
    properties = dict(line[2:].partition("=")[::2] for line in record.splitlines() if line.startswith("E:"))
    if "ID_NET_NAME" in properties:
        return properties["ID_NET_NAME"] == ifname
    return "ID_RENAMING" not in properties  # written mid-rename, before the name is known


def _with_macs(interfaces: list[NetworkInterface]) -> list[tuple[NetworkInterface, str]]:
    """The interfaces with a usable unicast MAC (``lo`` reports all zeros), each with its normalised MAC."""
    found: list[tuple[NetworkInterface, str]] = []
    for interface in interfaces:
        if interface.hardware_address is None:
            continue
        try:
            found.append((interface, normalize_mac(interface.hardware_address)))
        except ValueError:
            continue
    return found


async def guest_views(path: str | PathLike[str] | None, settings: QgaSettings) -> dict[str, GuestView] | None:
    """What the guest sees of its NICs, by MAC, or ``None`` when no agent answers (never an error).

    This is the read for ``list_nics``: a NIC whose MAC is missing from the result has no interface in the guest.
    """
    if path is None:
        return None
    try:
        async with GuestAgent.connect(path, settings) as agent:
            return {view.mac: view for view in await agent.interfaces()}
    except QmpnetError as err:
        log.debug("no guest view from %s: %s", path, err)
        return None
