"""The host side of the test guest's agent: interface reports in, commands out, over one stream.

The agent (`init.sh`) speaks JSON lines on the guest's second serial port, which QEMU connects to a unix socket
the harness listens on (see contrib/testguest/README.md for the wire format).

Design decisions:

- **One reader task owns the stream.** It parses every line into a pydantic model (the agent is a boundary, so
  the models forbid unknown fields), keeps the latest interfaces report and resolves request futures by `req`.
  A line that does not parse is logged and skipped: a report lost to noise is replaced by the next one.
- **Waiting is event-driven.** :meth:`Agent.wait_for` checks the current report first and then every new one,
  woken by an :class:`asyncio.Condition`; there are no sleeps. On timeout the error carries the last report,
  which is usually all a failing test needs to say what the guest saw instead.
- **Requests are trivially parseable by a shell.** The host always writes the keys in the same order and only
  numbers, fixed words, interface names and base64 as values (:func:`encode_run`, :func:`encode_dhcp`), so the
  agent needs no JSON parser. The guest runs requests one at a time, in order; results are matched by `req`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

if TYPE_CHECKING:
    from collections.abc import Callable

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: How much longer than the guest-side deadline the host waits for a result: base64 over a slow serial port.
REPLY_MARGIN = 10.0
#: Every deadline of the harness is multiplied by ``$QMPNET_TESTGUEST_TIMEOUT_SCALE`` (default 1). The lab host sets
#: it: a guest booted inside it runs under nested TCG, an order of magnitude slower than here.
TIMEOUT_SCALE = float(os.environ.get("QMPNET_TESTGUEST_TIMEOUT_SCALE") or 1.0)
#: The size of the pieces a trickled request is sent in (:meth:`Agent.run`'s ``trickle``).
TRICKLE_PIECE = 64
#: Longest line accepted from the guest (a result carries a command's whole output).
LINE_LIMIT = 16 * 1024 * 1024
_IFNAME = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")


class AgentError(RuntimeError):
    """The agent connection failed or closed, or a request could not be made."""


class AgentTimeoutError(AgentError, TimeoutError):
    """A wait on the agent ran out; the message carries the last interfaces report."""


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GuestInterface(_Message):
    """One network interface as the guest sees it (`lo` is never reported)."""

    name: str
    mac: str
    driver: str | None
    pci: str | None
    operstate: str
    #: None while the interface is down: the kernel refuses to read carrier then.
    carrier: bool | None
    ipv4: list[str]

    def summary(self) -> str:
        """Return a one-line description for logs and error messages."""
        carrier = "?" if self.carrier is None else int(self.carrier)
        addresses = ",".join(self.ipv4) or "-"
        return f"{self.name} {self.mac} {self.driver} {self.pci} {self.operstate} carrier={carrier} ipv4={addresses}"


class Hello(_Message):
    """Sent once when the agent starts."""

    type: Literal["hello"]
    #: Seconds since the guest kernel started, from /proc/uptime.
    uptime: float | None = None


class InterfacesReport(_Message):
    """The guest's interfaces, sent at start and whenever anything in the list changes."""

    type: Literal["interfaces"]
    seq: int
    interfaces: list[GuestInterface]

    def summary(self) -> str:
        """Return a short multi-line description for error messages."""
        lines = [f"  {interface.summary()}" for interface in self.interfaces] or ["  (no interfaces)"]
        return "\n".join([f"report #{self.seq}:", *lines])


class Result(_Message):
    """The answer to one request."""

    type: Literal["result"]
    req: int
    rc: int
    output_b64: str


GuestMessage = Annotated[Hello | InterfacesReport | Result, Field(discriminator="type")]
_GUEST_MESSAGE: TypeAdapter[Hello | InterfacesReport | Result] = TypeAdapter(GuestMessage)


@dataclass(frozen=True)
class RunResult:
    """What a command or DHCP run in the guest returned: exit status and combined stdout + stderr."""

    rc: int
    output: str

    def check(self) -> RunResult:
        """Return self if the command succeeded.

        Raises:
            AgentError: The command exited non-zero; the message carries its output.
        """
        if self.rc != 0:
            raise AgentError(f"guest command failed with rc {self.rc}: {self.output.strip()}")
        return self


def encode_run(req: int, cmd: str, timeout: float) -> bytes:
    """Return the request line that runs `cmd` with `sh` in the guest, killed after `timeout` seconds."""
    cmd_b64 = base64.b64encode(cmd.encode()).decode()
    return f'{{"req":{req},"op":"run","timeout":{_seconds(timeout)},"cmd_b64":"{cmd_b64}"}}\n'.encode()


def encode_dhcp(req: int, ifname: str, timeout: float) -> bytes:
    """Return the request line that runs udhcpc once on `ifname` in the guest.

    Raises:
        ValueError: `ifname` is not a plausible Linux interface name.
    """
    if not _IFNAME.match(ifname):
        raise ValueError(f"not an interface name: {ifname!r}")
    return f'{{"req":{req},"op":"dhcp","timeout":{_seconds(timeout)},"ifname":"{ifname}"}}\n'.encode()


def _seconds(timeout: float) -> int:
    """Whole seconds for busybox `timeout`, at least one."""
    return max(1, math.ceil(timeout))


def find_mac(interfaces: list[GuestInterface], mac: str) -> GuestInterface | None:
    """Return the interface with this MAC address (any case), or None."""
    wanted = mac.lower()
    return next((interface for interface in interfaces if interface.mac.lower() == wanted), None)


class Agent:
    """A connection to the in-guest agent.

    Created by :class:`~qmpnet.testguest.machine.TestMachine` once QEMU has connected the guest's second serial
    port; :meth:`start` begins reading, :meth:`close` ends it.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str = "guest") -> None:
        self._reader = reader
        self._out = writer
        self._name = name
        self._changed = asyncio.Condition()
        self._awaiting: dict[int, asyncio.Future[RunResult]] = {}
        self._next_req = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._closed: str | None = None
        self.hello: Hello | None = None
        self.latest: InterfacesReport | None = None

    def start(self) -> None:
        """Start the reader task."""
        self._task = asyncio.create_task(self._read_loop(), name=f"testguest[{self._name}].agent")

    async def close(self) -> None:
        """Stop reading, close the stream and fail every pending request."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._out.close()
        with contextlib.suppress(OSError):
            await self._out.wait_closed()
        await self._mark_closed("the agent connection was closed by the harness")

    @property
    def ready(self) -> bool:
        """Whether the agent said hello and sent its first interfaces report."""
        return self.hello is not None and self.latest is not None

    def interface_by_mac(self, mac: str) -> GuestInterface | None:
        """Return the interface with this MAC in the latest report, or None."""
        return find_mac(self.latest.interfaces, mac) if self.latest is not None else None

    async def wait_ready(self, timeout: float) -> InterfacesReport:
        """Wait for the hello and the first interfaces report.

        Raises:
            AgentTimeoutError: They did not both arrive in time.
            AgentError: The connection closed first.
        """
        return await self._wait(lambda: self.latest if self.ready else None, timeout, "hello and first report")

    async def wait_for(self, predicate: Callable[[list[GuestInterface]], T | None], timeout: float) -> T:
        """Wait until an interfaces report satisfies `predicate`, checking the latest report first.

        Args:
            predicate: Called with the interfaces of a report; its first truthy result is returned, so it can
                return the interface it looked for.
            timeout: Seconds to wait.

        Returns:
            What the predicate returned.

        Raises:
            AgentTimeoutError: No report satisfied the predicate in time; the message carries the last report.
            AgentError: The connection closed first.
        """

        def check() -> T | None:
            if self.latest is None:
                return None
            found = predicate(self.latest.interfaces)
            return found or None

        return await self._wait(check, timeout, "interfaces report satisfying the predicate")

    async def run(self, cmd: str, timeout: float = 30, *, trickle: float = 0) -> RunResult:
        """Run a shell command in the guest; its stdout and stderr come back combined.

        The guest kills the command with SIGKILL after `timeout` seconds (rc 137 then). Requests are served one
        at a time in order, so a request waits for the ones before it. `trickle` (seconds) sends the request line
        in pieces of :data:`TRICKLE_PIECE` bytes that far apart, as a slow serial line delivers it (the agent's own
        tests: the guest must read a line that arrives in pieces).

        Raises:
            AgentTimeoutError: No result came within `timeout` plus a margin.
            AgentError: The connection closed first.
        """
        timeout *= TIMEOUT_SCALE
        return await self._request(lambda req: encode_run(req, cmd, timeout), timeout, f"run {cmd!r}", trickle)

    async def dhcp(self, ifname: str, timeout: float = 20) -> RunResult:
        """Run udhcpc once on `ifname`; on success the address shows in the next interfaces report.

        Raises:
            ValueError: `ifname` is not a plausible interface name.
            AgentTimeoutError: No result came within `timeout` plus a margin.
            AgentError: The connection closed first.
        """
        timeout *= TIMEOUT_SCALE
        return await self._request(lambda req: encode_dhcp(req, ifname, timeout), timeout, f"dhcp on {ifname}")

    def describe(self) -> str:
        """Return the agent's state for error messages: the last report, or why there is none."""
        state = f"agent connection closed: {self._closed}\n" if self._closed else ""
        if self.latest is None:
            return f"{state}no interfaces report from the agent (hello {'seen' if self.hello else 'not seen'})"
        return state + self.latest.summary()

    async def _wait(self, check: Callable[[], T | None], timeout: float, what: str) -> T:
        timeout *= TIMEOUT_SCALE
        try:
            async with asyncio.timeout(timeout), self._changed:
                while (found := check()) is None:
                    if self._closed is not None:
                        raise AgentError(f"{self._name}: waiting for {what}: {self._closed}")
                    await self._changed.wait()
                return found
        except TimeoutError as err:
            raise AgentTimeoutError(f"{self._name}: no {what} within {timeout} s; {self.describe()}") from err

    async def _request(
        self, encode: Callable[[int], bytes], timeout: float, what: str, trickle: float = 0
    ) -> RunResult:
        if self._closed is not None:
            raise AgentError(f"{self._name}: cannot {what}: {self._closed}")
        req = next(self._next_req)
        future: asyncio.Future[RunResult] = asyncio.get_running_loop().create_future()
        self._awaiting[req] = future
        try:
            line = encode(req)
            pieces = [line[at : at + TRICKLE_PIECE] for at in range(0, len(line), TRICKLE_PIECE)] if trickle else [line]
            for n, piece in enumerate(pieces):
                if n:
                    await asyncio.sleep(trickle)  # pacing what is sent, not waiting for anything
                self._out.write(piece)
                await self._out.drain()
            async with asyncio.timeout(timeout + REPLY_MARGIN):
                return await future
        except TimeoutError as err:
            raise AgentTimeoutError(f"{self._name}: no result for {what} (req {req}) in time") from err
        except OSError as err:
            raise AgentError(f"{self._name}: cannot {what}: {err}") from err
        finally:
            self._awaiting.pop(req, None)

    async def _read_loop(self) -> None:
        reason = "the guest closed the agent connection (QEMU exited?)"
        try:
            while line := await self._reader.readline():
                await self._dispatch(line)
        except (OSError, ValueError) as err:  # ValueError: a line longer than LINE_LIMIT
            reason = f"reading from the agent failed: {err!r}"
        await self._mark_closed(reason)

    async def _dispatch(self, line: bytes) -> None:
        try:
            message = _GUEST_MESSAGE.validate_json(line.strip())
        except ValidationError as err:
            logger.warning("%s: skipping an unreadable agent line %r: %s", self._name, line[:200], err)
            return
        logger.debug("%s: agent: %s", self._name, message)
        if isinstance(message, Result):
            self._resolve(message)
            return
        async with self._changed:
            if isinstance(message, Hello):
                self.hello = message
            else:
                self.latest = message
            self._changed.notify_all()

    def _resolve(self, result: Result) -> None:
        future = self._awaiting.get(result.req)
        if future is None or future.done():
            logger.warning("%s: result for unknown or abandoned request %d", self._name, result.req)
            return
        output = base64.b64decode(result.output_b64).decode(errors="replace")
        future.set_result(RunResult(rc=result.rc, output=output))

    async def _mark_closed(self, reason: str) -> None:
        if self._closed is None:
            self._closed = reason
        for future in self._awaiting.values():
            if not future.done():
                future.set_exception(AgentError(f"{self._name}: {reason}"))
        async with self._changed:
            self._changed.notify_all()
