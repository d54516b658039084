"""Verified changes: asking the guest itself (its qemu-guest-agent) whether a change arrived, and undoing it if not.

QEMU's answer says a device was added; only the guest can say that an interface with the NIC's MAC came up (and
got an address), went away, or saw its carrier change. With ``verify`` a call waits for that, up to
``qga.verify_timeout``, polling the agent, and a change the guest does not show is undone (an added NIC is removed
again, a link set back), so a verified call either shows in the guest or leaves it as it was. The agent is opened
for the one call and closed after it: it serves one client at a time.

The agent's socket is given, or found when first needed (``query-chardev`` and the virtserialport named
``org.qemu.guest_agent.0``): by a verified call or ``list_nics``, which reads the guest's view through the same
socket. A change that needs no agent (a plain ``nic add`` from the command line) does not look for one. Not found,
it is looked for again after the next full read of the guest (a reconnect), not at every need.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager, nullcontext
from typing import TYPE_CHECKING, Final

from qmpnet.adapters.qga.discovery import find_agent_socket
from qmpnet.errors import AgentUnavailable, InvalidRequest, NotVerified, QmpCommandError
from qmpnet.guest.journal import new_operation

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from contextlib import AbstractAsyncContextManager
    from pathlib import Path

    from qmpnet.adapters.qga import GuestAgent, Want
    from qmpnet.core.model import GuestView, Nic, Verify
    from qmpnet.guest.parts import LaneParts
    from qmpnet.guest.unplugs import Unplugs

__all__ = ["Verifier"]

log = logging.getLogger(__name__)

#: The session of a call that does not verify: no agent, nothing to open or close (most calls; shared by all).
_NO_AGENT: Final = nullcontext(None)


class Verifier:
    """The guest agent of one guest, for verified changes (see the module docstring)."""

    def __init__(self, parts: LaneParts, *, socket: Path | None, unplugs: Unplugs) -> None:
        self._parts = parts
        self._socket = socket
        self._unplugs = unplugs
        self._looked = False  # whether the socket was looked for since the last full read of the guest

    @property
    def socket(self) -> Path | None:
        """The guest agent's socket, if one is known."""
        return self._socket

    def look_again(self) -> None:
        """The guest was read afresh: an agent not found before is looked for again at the next need."""
        self._looked = False

    async def discover(self) -> None:
        """Look for the agent's socket in QEMU's chardevs, unless one is known or was looked for since the last read.

        Raises:
            OutcomeUnknown, GuestUnavailable: The monitor itself failed.
        """
        if self._socket is not None or self._looked:
            return
        self._looked = True
        try:
            self._socket = await find_agent_socket(self._parts.monitor)
        except QmpCommandError as err:
            log.debug("guest %s: no guest agent socket found (%s)", self._parts.name, err)

    def session(self, wanted: Verify) -> AbstractAsyncContextManager[GuestAgent | None]:
        """The agent for one verified call (``None`` when ``wanted`` is false), closed when the call ends.

        Raises:
            InvalidRequest: No agent socket is known or none answers there (nothing has been changed yet).
        """
        return self._session() if wanted else _NO_AGENT

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[GuestAgent]:
        await self.discover()
        agent = await self._open()
        try:
            yield agent
        finally:
            await agent.close()

    async def _open(self) -> GuestAgent:
        if self._socket is None:
            raise InvalidRequest(
                f"verify: no guest agent is known for guest {self._parts.name}: give its socket (--qga, qga=) or start "
                "QEMU with a virtserialport named org.qemu.guest_agent.0 on a unix socket QEMU listens on",
                field="verify",
            )
        # The client and its reply models load with the first verified call (issue 17: a command's start-up).
        from qmpnet.adapters.qga.client import GuestAgent  # noqa: PLC0415 - see above

        try:
            return await GuestAgent.open(self._socket, self._parts.settings.qga)
        except AgentUnavailable as err:
            raise InvalidRequest(f"verify: {err.message}", field="verify") from err

    async def wait(self, agent: GuestAgent, mac: str, want: Want) -> GuestView | None:
        """Wait until the guest shows ``want`` for the interface with ``mac``; returns its view.

        Raises:
            NotVerified: It did not within ``qga.verify_timeout`` (naming ``verify``).
        """
        from qmpnet.adapters.qga.verify import wait_for  # noqa: PLC0415 - with the client (see _open)

        return await _named(wait_for(agent, mac, want), "verify")

    async def added(self, agent: GuestAgent, nic: Nic, verify: Verify, operation: str) -> Nic:
        """Wait until the guest shows the new NIC; if it does not, remove the NIC again and raise.

        Raises:
            NotVerified: The guest did not show it (the NIC was removed again, or its removal is pending).
        """
        if nic.mac is None:
            return nic
        want: Want = "address" if verify == "address" else "present"
        try:
            view = await self.wait(agent, nic.mac, want)
        except NotVerified as err:
            log.info("guest %s: NIC %s not verified (%s): removing it again", self._parts.name, nic.id, err)
            result = await self._unplugs.unplug(nic, self._parts.settings.qmp.rollback_unplug_timeout, new_operation())
            if result.state == "removal_pending":
                err.add_note(f"the NIC is being removed again; the guest has not acked yet ({nic.id})")
            self._parts.journal.finish(operation, error=err)
            raise
        done = nic.model_copy(update={"guest": view})
        self._parts.journal.finish(operation, data=done.model_dump(mode="json"))
        return done

    async def linked(self, agent: GuestAgent, nic: Nic, *, up: bool, undo: Callable[[], Awaitable[object]]) -> Nic:
        """Wait until the guest's carrier follows ``nic``'s link; if it does not, ``undo`` and raise.

        Raises:
            NotVerified: The carrier did not follow in time (``undo`` has run).
        """
        if nic.mac is None:
            return nic
        want: Want = "carrier_up" if up else "carrier_down"
        try:
            view = await self.wait(agent, nic.mac, want)
        except NotVerified:
            await undo()
            raise
        return nic.model_copy(update={"guest": view})


async def _named(wait: Awaitable[GuestView | None], field: str) -> GuestView | None:
    """``await wait``, naming ``field`` on the ``not_verified`` error."""
    try:
        return await wait
    except NotVerified as err:
        raise NotVerified(err.message, field=field) from err
