"""Wait until the guest shows a NIC change: the interface there, with an address, its carrier, or gone.

qemu-guest-agent has no events, so :func:`wait_for` looks at the guest every ``poll_interval`` until the wanted
state shows or the deadline passes; then it raises :class:`~qmpnet.errors.NotVerified` with what the guest
showed last, which is what a caller (and a rollback log line) needs to say why.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Literal, get_args

from qmpnet.core.names import normalize_mac
from qmpnet.errors import NotVerified

if TYPE_CHECKING:
    from qmpnet.adapters.qga.client import GuestAgent
    from qmpnet.core.model import GuestView

__all__ = ["WANTS", "Want", "describe_view", "satisfies", "wait_for"]

Want = Literal["present", "address", "absent", "carrier_up", "carrier_down"]
WANTS: tuple[Want, ...] = get_args(Want)

_WHAT: dict[Want, str] = {
    "present": "an interface",
    "address": "an interface with an address",
    "absent": "no interface",
    "carrier_up": "an interface with carrier 1",
    "carrier_down": "an interface with carrier 0",
}


def satisfies(view: GuestView | None, want: Want) -> bool:
    """Whether the guest's view of one MAC (``None``: no interface) is the wanted state.

    ``address`` means an address that is not link-local; ``carrier_*`` needs a readable carrier, so an
    interface that is administratively down satisfies neither.
    """
    if want == "absent":
        return view is None
    if view is None:
        return False
    if want == "address":
        return view.has_address()
    if want == "carrier_up":
        return view.carrier is True
    if want == "carrier_down":
        return view.carrier is False
    return True


def describe_view(view: GuestView | None) -> str:
    """A short description of a view for messages: ``ens4 carrier=1 operstate=up 10.0.2.15/24``."""
    if view is None:
        return "no interface with that MAC"
    carrier = "?" if view.carrier is None else int(view.carrier)
    addresses = " ".join(view.addresses) or "no addresses"
    return f"{view.ifname} carrier={carrier} operstate={view.operstate or '?'} {addresses}"


async def wait_for(
    agent: GuestAgent,
    mac: str,
    want: Want = "present",
    *,
    timeout: float | None = None,
    interval: float | None = None,
) -> GuestView | None:
    """Wait until the guest's interface with ``mac`` is in the ``want`` state; return its view.

    Looks at once, then every ``interval`` seconds (default ``poll_interval`` of the agent's settings) until
    ``timeout`` (default ``verify_timeout``) has passed; a look that is under way when the deadline passes is
    cut short. ``present`` also waits until udev has named the interface (see :meth:`GuestAgent.named`), so the
    view has the name that stays. Returns ``None`` for ``absent``.

    Raises:
        NotVerified: The guest did not show it in time; the message says what it showed last.
        ValueError: ``mac`` is not a MAC address or ``want`` is unknown.
        AgentUnavailable, AgentCommandError: The agent failed (not the same as "not yet").
    """
    if want not in WANTS:
        raise ValueError(f"want must be one of {', '.join(WANTS)}, not {want!r}")
    mac = normalize_mac(mac)
    limit = agent.settings.verify_timeout if timeout is None else timeout
    pause = agent.settings.poll_interval if interval is None else interval
    deadline = time.monotonic() + limit
    last: GuestView | None = None
    seen = False
    try:
        async with asyncio.timeout_at(asyncio.get_running_loop().time() + limit):
            while True:
                last = await agent.interface_for(mac)
                seen = True
                if satisfies(last, want) and (want != "present" or last is None or await agent.named(last)):
                    return last
                await asyncio.sleep(max(0.0, min(pause, deadline - time.monotonic())))
    except TimeoutError as err:
        shown = describe_view(last) if seen else "nothing yet (no answer in time)"
        raise NotVerified(
            f"the guest did not show {_WHAT[want]} for {mac} within {limit:g} s; it shows {shown}"
        ) from err
