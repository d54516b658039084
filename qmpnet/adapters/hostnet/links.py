"""Netlink helpers over pyroute2's sync ``IPRoute``, for code already running in a namespace thread.

qmpnet marks every link it creates by setting the link's alias (``IFLA_IFALIAS``, what ``ip link show`` prints
as ``alias``): ``qmpnet:tap[:owner]`` on taps, ``qmpnet:nat:<network>`` on NAT bridges. Only marked links are
ever deleted, swept or adopted. This matters because the names alone prove nothing: libvirt also names its
taps ``vnet<N>``, and an operator may own a bridge called ``qmpnat0``. The IFB device that shapes a tap's
guest-to-host direction is marked ``qmpnet:ifb:<tap ifindex>:<tap name>``, so that it can be deleted once its tap
is gone (see :mod:`qmpnet.adapters.hostnet.shaping`).
"""

from __future__ import annotations

import contextlib
import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyroute2 import IPRoute, NetlinkError

from qmpnet.adapters.hostnet.failures import host_error

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "MARK",
    "LinkInfo",
    "dump_links",
    "find_link",
    "ifb_mark",
    "nat_mark",
    "parse_ifb_mark",
    "route",
    "tap_mark",
]

MARK = "qmpnet"
_IFF_UP = 0x1


def tap_mark(owner: str | None) -> str:
    """The alias qmpnet gives a tap it created (``owner`` is the caller's note, e.g. ``vm1/virtio0``)."""
    return f"{MARK}:tap:{owner}" if owner else f"{MARK}:tap"


def nat_mark(network: str) -> str:
    """The alias qmpnet gives the bridge of NAT network ``network``."""
    return f"{MARK}:nat:{network}"


def ifb_mark(tap_index: int, tap_name: str) -> str:
    """The alias of the IFB device qmpnet made for tap ``tap_name`` (interface index ``tap_index``)."""
    return f"{MARK}:ifb:{tap_index}:{tap_name}"


def parse_ifb_mark(alias: str | None) -> tuple[int, str] | None:
    """The ``(ifindex, name)`` of the tap an IFB's alias names, or ``None`` if it is not an IFB mark."""
    prefix = f"{MARK}:ifb:"
    if alias is None or not alias.startswith(prefix):
        return None
    index, _, name = alias.removeprefix(prefix).partition(":")
    return (int(index), name) if index.isdigit() and name else None


@dataclass(frozen=True)
class LinkInfo:
    """The few facts about a link that qmpnet looks at."""

    index: int
    name: str
    kind: str | None
    alias: str | None
    master: int | None
    up: bool
    mtu: int
    carrier: bool = False
    tun_type: int | None = None

    @classmethod
    def from_message(cls, msg: Any) -> LinkInfo:  # noqa: ANN401 - pyroute2's messages are untyped
        """Parse an ``ifinfmsg``."""
        linkinfo = msg.get("IFLA_LINKINFO")
        kind = linkinfo.get("IFLA_INFO_KIND") if linkinfo is not None else None
        data = linkinfo.get("IFLA_INFO_DATA") if linkinfo is not None else None
        tun_type = None
        if kind == "tun" and data is not None and hasattr(data, "get"):
            tun_type = data.get("IFLA_TUN_TYPE")
        master = msg.get("IFLA_MASTER")
        return cls(
            index=int(msg["index"]),
            name=str(msg.get("IFLA_IFNAME")),
            kind=kind,
            alias=msg.get("IFLA_IFALIAS") or None,
            master=int(master) if master else None,
            up=bool(msg["flags"] & _IFF_UP),
            mtu=int(msg.get("IFLA_MTU") or 0),
            carrier=bool(msg.get("IFLA_CARRIER")),
            tun_type=tun_type,
        )


@contextlib.contextmanager
def route() -> Iterator[Any]:
    """A pyroute2 ``IPRoute`` on the calling thread's namespace, closed afterwards.

    Raises:
        QmpnetError: The netlink socket could not be opened.
    """
    try:
        ipr = IPRoute()
    except OSError as err:
        raise host_error("open a netlink socket", err) from err
    try:
        yield ipr
    finally:
        ipr.close()


def dump_links(ipr: Any) -> list[LinkInfo]:  # noqa: ANN401 - pyroute2's IPRoute is untyped
    """Every link in the namespace."""
    return [LinkInfo.from_message(msg) for msg in ipr.link("dump")]


def find_link(ipr: Any, name: str) -> LinkInfo | None:  # noqa: ANN401 - pyroute2's IPRoute is untyped
    """The link called ``name``, or ``None``."""
    indices = ipr.link_lookup(ifname=name)
    if not indices:
        return None
    try:
        return LinkInfo.from_message(ipr.link("get", index=indices[0])[0])
    except NetlinkError as err:
        if err.code == errno.ENODEV:  # gone between the lookup and the get
            return None
        raise host_error(f"read link {name}", err) from err
