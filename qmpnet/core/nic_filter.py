"""Anti-spoofing of a NIC (``NicSpec.filter``): which source MAC and addresses a guest may send from (pure).

The filter is enforced on the host, on the frames the guest sends into its tap (see
:mod:`qmpnet.adapters.hostnet.antispoof`), so only backends whose tap qmpnet makes and plugs into a Linux bridge
can have one: :data:`FILTERABLE`. A backend added later whose frames cross a bridge port qmpnet owns joins the
set; the check and its message follow.

An address list *absent* (``null``) leaves that family unchecked; a list *present* is the whole allowance, so an
empty list lets the guest send no packet of that family beyond what it needs to get an address (DHCP discovery
from 0.0.0.0, IPv6 duplicate address detection from ::, link-local IPv6).
"""

from __future__ import annotations

import ipaddress  # noqa: TC003 - pydantic needs it at runtime
from typing import TYPE_CHECKING

from pydantic import Field

from qmpnet.core.model_base import Frozen
from qmpnet.errors import Unsupported

if TYPE_CHECKING:
    from qmpnet.core.backends import Backend

__all__ = ["FILTERABLE", "MAX_ADDRESSES", "NicFilter", "check_filterable"]

#: Backends whose frames enter a bridge through a tap qmpnet made: the bridge-family rules see them.
FILTERABLE: frozenset[str] = frozenset({"bridge", "nat"})
#: The most addresses one family's list may hold (an nftables anonymous set; more is a configuration mistake).
MAX_ADDRESSES = 64


class NicFilter(Frozen):
    """What a guest may send from through this NIC; every other frame it sends is dropped at its tap."""

    mac: bool = Field(default=True, description="Drop frames (and ARP) whose source MAC is not the NIC's MAC.")
    ipv4: list[ipaddress.IPv4Address] | None = Field(
        default=None, max_length=MAX_ADDRESSES,
        description="The IPv4 source addresses allowed (ARP and IP); null: not checked; []: none but DHCP discovery.",
    )
    ipv6: list[ipaddress.IPv6Address] | None = Field(
        default=None, max_length=MAX_ADDRESSES,
        description="The IPv6 source addresses allowed besides link-local (fe80::/10) and DAD from ::; null: not "
        "checked.",
    )
    dhcp_server: bool = Field(default=False, description="Let the guest answer as a DHCP (67) or DHCPv6 (547) server.")


def check_filterable(backend: Backend, *, field: str) -> None:
    """Refuse a filter for ``backend`` unless its frames cross a bridge port qmpnet made.

    Raises:
        Unsupported: The backend is not in :data:`FILTERABLE`, or is a bridge through QEMU's helper (whose tap
            qmpnet does not know); ``field`` is named.
    """
    helper = getattr(backend, "helper", False)
    if backend.type in FILTERABLE and not helper:
        return
    what = "a bridge through QEMU's helper" if helper else f"a {backend.type} backend"
    raise Unsupported(
        f"{field}: anti-spoofing filters the frames of a tap qmpnet makes on a bridge "
        f"({', '.join(sorted(FILTERABLE))}); this NIC has {what}",
        field=field,
    )
