"""The guest agent adapter: qemu-guest-agent over its unix socket, the guest's own view of its NICs.

::

    path = await find_agent_socket(monitor)              # or given: --qga, the serve config, NAME.qga
    async with GuestAgent.connect(path, settings.qga) as agent:
        view = await wait_for(agent, nic.mac, "address")  # GuestView, or NotVerified after verify_timeout

:func:`guest_views` is the read for ``list_nics``: ``None`` (never an error) when no agent answers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qmpnet.core.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from qmpnet.adapters.qga.client import ExecResult, GuestAgent, guest_views
    from qmpnet.adapters.qga.discovery import AGENT_PORT_NAME, find_agent_socket, server_socket_path
    from qmpnet.adapters.qga.verify import WANTS, Want, describe_view, satisfies, wait_for

# The names are loaded on first use (PEP 562): a lane imports the discovery (a QMP read at connect) and loads the
# client, with its reply models, only for a call that talks to the agent (issue 17: `qmpnet nic add` without
# --verify does not build them).
_EXPORTS = {
    **dict.fromkeys(("ExecResult", "GuestAgent", "guest_views"), "qmpnet.adapters.qga.client"),
    **dict.fromkeys(("AGENT_PORT_NAME", "find_agent_socket", "server_socket_path"), "qmpnet.adapters.qga.discovery"),
    **dict.fromkeys(("WANTS", "Want", "describe_view", "satisfies", "wait_for"), "qmpnet.adapters.qga.verify"),
}

__all__ = [
    "AGENT_PORT_NAME",
    "WANTS",
    "ExecResult",
    "GuestAgent",
    "Want",
    "describe_view",
    "find_agent_socket",
    "guest_views",
    "satisfies",
    "server_socket_path",
    "wait_for",
]

__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
