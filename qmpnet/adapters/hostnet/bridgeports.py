"""A NIC's tap as a bridge port: moving it to another bridge, its VLANs, and how it is plugged in now.

A live move is ``ip link set TAP master NEWBR`` done through pyroute2, after giving the tap the new bridge's MTU
(the tap was made with its first bridge's; a smaller port MTU would lower the bridge's own). VLANs use the
bridge's VLAN filtering (``bridge vlan``, pyroute2's ``vlan_filter``): an access port is one VLAN with the PVID
and untagged flags, a trunk a list of tagged VLANs without a PVID (untagged frames from the guest are dropped);
"no VLAN" is the bridge's default VLAN (``vlan_default_pvid``, normally 1), as a newly enslaved port gets it.
qmpnet never switches VLAN filtering on: that changes every port of the operator's bridge, so a bridge without it
gets ``unsupported`` with the command that turns it on.

Each change reads what is there first and returns it, so the caller can push the exact undo; a VLAN change that
fails half-way rewrites the old VLANs before raising. Everything here runs in a namespace thread.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pyroute2 import NetlinkError

from qmpnet.adapters.hostnet.failures import host_error, netlink_code
from qmpnet.adapters.hostnet.links import MARK, LinkInfo, dump_links, find_link, tap_mark
from qmpnet.adapters.hostnet.shaping import read_layout, shape_of
from qmpnet.adapters.hostnet.taps import keep_bridge_mtu
from qmpnet.core.model import Vlan
from qmpnet.core.mtu import check_within
from qmpnet.core.ports import TapPort
from qmpnet.errors import Conflict, InvalidRequest, NotFound, Unsupported

__all__ = [
    "Placement",
    "PortVlans",
    "entries_for",
    "existing_tap",
    "find_owned_tap",
    "move",
    "port_of",
    "put_back",
    "set_port_mtu",
    "tap_held_by",
    "vlan_of",
    "write_vlans",
]

PVID: Final = 0x2
UNTAGGED: Final = 0x4
_KEPT_FLAGS: Final = PVID | UNTAGGED
_AF_BRIDGE: Final = 7
_RTEXT_FILTER_BRVLAN: Final = 2

#: A port's VLANs as ``(low, high, flags)`` ranges, flags being PVID and UNTAGGED.
PortVlans = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class Placement:
    """Where a tap was before a move: its master's index (``None``: no bridge) and its MTU."""

    master: int | None
    mtu: int


# ------------------------------------------------------------------------------------------------- pure rules


def entries_for(vlan: Vlan | None, default_pvid: int) -> PortVlans:
    """The port VLANs that make ``vlan`` (``None``: the bridge's default VLAN, untagged, as its PVID)."""
    if vlan is None:
        return ((default_pvid, default_pvid, PVID | UNTAGGED),) if default_pvid else ()
    if vlan.access is not None:
        return ((vlan.access, vlan.access, PVID | UNTAGGED),)
    return tuple((low, high, 0) for low, high in vlan.ranges())


def compress(vids: list[tuple[int, int]]) -> PortVlans:
    """Single ``(vid, flags)`` entries as the kernel lists them -> ranges of consecutive VLANs with equal flags."""
    ranges: list[tuple[int, int, int]] = []
    for vid, flags in sorted(vids):
        kept = flags & _KEPT_FLAGS
        if ranges and ranges[-1][2] == kept and ranges[-1][1] + 1 == vid and not kept & PVID:
            ranges[-1] = (ranges[-1][0], vid, kept)
        else:
            ranges.append((vid, vid, kept))
    return tuple(ranges)


def vlan_of(entries: PortVlans, default_pvid: int) -> Vlan | None:
    """The :class:`Vlan` a port's VLANs stand for; ``None`` for the default VLAN or a mix qmpnet does not make."""
    if not entries or entries == entries_for(None, default_pvid):
        return None
    if len(entries) == 1 and entries[0][0] == entries[0][1] and entries[0][2] == PVID | UNTAGGED:
        return Vlan(access=entries[0][0])
    if all(flags == 0 for _, _, flags in entries):
        return Vlan(trunks=[f"{low}-{high}" if high != low else str(low) for low, high, _ in entries])
    return None


# ------------------------------------------------------------------------------------- in the namespace thread


def find_owned_tap(ipr: Any, owner: str) -> str | None:  # noqa: ANN401 - pyroute2's IPRoute is untyped
    """The name of the tap qmpnet made for ``owner``, if it exists."""
    mark = tap_mark(owner)
    return next((link.name for link in dump_links(ipr) if link.alias == mark and link.kind == "tun"), None)


def tap_held_by(pid: int | None, fd: int | None, proc: Path = Path("/proc")) -> str | None:
    """The interface of tun fd ``fd`` of process ``pid`` (the ``iff:`` line of its fdinfo), if it is one."""
    if not pid or fd is None:
        return None
    try:
        info = (proc / str(pid) / "fdinfo" / str(fd)).read_text()
    except OSError:
        return None
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key == "iff" and value.strip():
            return value.strip()
    return None


def existing_tap(ipr: Any, name: str | None) -> str | None:  # noqa: ANN401 - pyroute2's IPRoute is untyped
    """``name`` if it is a tap (tun) in this namespace."""
    if name is None:
        return None
    link = find_link(ipr, name)
    return link.name if link is not None and link.kind == "tun" else None


def _tap(ipr: Any, name: str) -> LinkInfo:  # noqa: ANN401 - pyroute2's IPRoute is untyped
    link = find_link(ipr, name)
    if link is None:
        raise NotFound(f"id: the NIC's tap {name} no longer exists on this host", field="id")
    return link


def _bridge(ipr: Any, name: str, field: str) -> LinkInfo:  # noqa: ANN401 - pyroute2's IPRoute is untyped
    link = find_link(ipr, name)
    if link is None:
        raise NotFound(f"{field}: no bridge {name!r} on this host", field=field)
    if link.kind != "bridge":
        raise InvalidRequest(f"{field}: {name!r} is a {link.kind or 'plain'} link, not a Linux bridge", field=field)
    return link


def move(ipr: Any, tap_name: str, bridge: str, *, field: str) -> Placement:  # noqa: ANN401 - pyroute2's IPRoute
    """Enslave ``tap_name`` to ``bridge`` with the bridge's MTU; return where it was.

    Raises:
        NotFound: No such tap, or no such bridge (``field``).
        InvalidRequest: ``bridge`` is not a bridge.
        QmpnetError: The kernel refused.
    """
    tap = _tap(ipr, tap_name)
    target = _bridge(ipr, bridge, field)
    before = Placement(tap.master, tap.mtu)
    if tap.master == target.index:
        return before
    try:
        if tap.mtu != target.mtu:
            ipr.link("set", index=tap.index, mtu=target.mtu)
        ipr.link("set", index=tap.index, master=target.index)
    except NetlinkError as err:
        put_back(ipr, tap_name, before)
        raise host_error(f"enslave tap {tap_name} to bridge {bridge}", err, field=field) from err
    return before


def put_back(ipr: Any, tap_name: str, where: Placement) -> None:  # noqa: ANN401 - pyroute2's IPRoute is untyped
    """Undo :func:`move`: the old master (or none) and the old MTU.

    Raises:
        NotFound: The tap is gone.
        QmpnetError: The kernel refused.
    """
    tap = _tap(ipr, tap_name)
    try:
        if tap.master != where.master:
            ipr.link("set", index=tap.index, master=where.master or 0)
        if tap.mtu != where.mtu:
            ipr.link("set", index=tap.index, mtu=where.mtu)
    except NetlinkError as err:
        raise host_error(f"put tap {tap_name} back on its bridge", err) from err


def set_port_mtu(ipr: Any, tap_name: str, mtu: int, *, field: str) -> int:  # noqa: ANN401 - pyroute2's IPRoute
    """Give ``tap_name`` MTU ``mtu``, at most its bridge's, whose MTU stays as it is; return the MTU the tap had.

    Raises:
        NotFound: The tap is gone.
        InvalidRequest: ``mtu`` is above the MTU of the tap's bridge (``field``).
        QmpnetError: The kernel refused.
    """
    tap = _tap(ipr, tap_name)
    master = next((link for link in dump_links(ipr) if link.index == tap.master), None) if tap.master else None
    if master is not None:
        check_within(mtu, master.name, master.mtu, field=field)
    if tap.mtu != mtu:
        try:
            ipr.link("set", index=tap.index, mtu=mtu)
        except NetlinkError as err:
            raise host_error(f"set the MTU of tap {tap_name} to {mtu}", err, field=field) from err
        if master is not None:
            keep_bridge_mtu(ipr, master)
    return tap.mtu


def _vlan_settings(bridge: LinkInfo, ipr: Any) -> tuple[bool, int]:  # noqa: ANN401 - pyroute2's IPRoute
    msg = ipr.link("get", index=bridge.index)[0]
    linkinfo = msg.get_attr("IFLA_LINKINFO")
    data = linkinfo.get_attr("IFLA_INFO_DATA") if linkinfo is not None else None
    if data is None:
        return False, 1
    filtering = bool(data.get_attr("IFLA_BR_VLAN_FILTERING"))
    default_pvid = data.get_attr("IFLA_BR_VLAN_DEFAULT_PVID")
    return filtering, int(default_pvid) if default_pvid is not None else 1


def _port_vlans(ipr: Any, index: int) -> PortVlans:  # noqa: ANN401 - pyroute2's IPRoute is untyped
    vids: list[tuple[int, int]] = []
    for msg in ipr.link("dump", family=_AF_BRIDGE, ext_mask=_RTEXT_FILTER_BRVLAN):
        if msg["index"] != index:
            continue
        spec = msg.get_attr("IFLA_AF_SPEC")
        infos = spec.get_attrs("IFLA_BRIDGE_VLAN_INFO") if spec is not None else ()
        vids.extend((int(info["vid"]), int(info["flags"])) for info in infos)
    return compress(vids)


def _filtering_bridge(ipr: Any, tap: LinkInfo) -> tuple[LinkInfo, int]:  # noqa: ANN401 - pyroute2's IPRoute
    master = next((link for link in dump_links(ipr) if link.index == tap.master), None) if tap.master else None
    if master is None:
        raise Unsupported(f"update.vlan: the NIC's tap {tap.name} is on no bridge", field="update.vlan")
    filtering, default_pvid = _vlan_settings(master, ipr)
    if not filtering:
        raise Unsupported(
            f"update.vlan: bridge {master.name} does not filter VLANs; the operator can turn it on with "
            f"'ip link set {master.name} type bridge vlan_filtering 1' (the kernel needs CONFIG_BRIDGE_VLAN_FILTERING)",
            field="update.vlan",
        )
    return master, default_pvid


def write_vlans(ipr: Any, tap_name: str, vlan: Vlan | None) -> PortVlans:  # noqa: ANN401 - pyroute2's IPRoute
    """Give ``tap_name``'s port the VLANs of ``vlan``; all or nothing. Returns the VLANs it had.

    Raises:
        Unsupported: The tap is on no bridge, or the bridge does not filter VLANs.
        NotFound: The tap is gone.
        QmpnetError: The kernel refused.
    """
    tap = _tap(ipr, tap_name)
    _, default_pvid = _filtering_bridge(ipr, tap)
    return replace_vlans(ipr, tap, entries_for(vlan, default_pvid))


def replace_vlans(ipr: Any, tap: LinkInfo, wanted: PortVlans) -> PortVlans:  # noqa: ANN401 - pyroute2's IPRoute
    """Make ``tap``'s port VLANs ``wanted``; on failure rewrite the old ones. Returns the old ones."""
    previous = _port_vlans(ipr, tap.index)
    if previous == wanted:
        return previous
    try:
        _apply(ipr, tap, previous, wanted)
    except NetlinkError as err:
        try:
            _apply(ipr, tap, _port_vlans(ipr, tap.index), previous)
        except NetlinkError as again:
            err.add_note(f"rewriting the old VLANs failed too: {again}")
        raise host_error(f"set the VLANs of tap {tap.name}", err, field="update.vlan") from err
    return previous


def restore_vlans(ipr: Any, tap_name: str, entries: PortVlans) -> None:  # noqa: ANN401 - pyroute2's IPRoute
    """Put back VLANs :func:`write_vlans` returned.

    Raises:
        NotFound: The tap is gone.
        QmpnetError: The kernel refused.
    """
    replace_vlans(ipr, _tap(ipr, tap_name), entries)


def _apply(ipr: Any, tap: LinkInfo, old: PortVlans, new: PortVlans) -> None:  # noqa: ANN401 - pyroute2's IPRoute
    for low, high, flags in old:
        for info in _infos(low, high, flags):
            try:
                ipr.vlan_filter("del", index=tap.index, vlan_info=info)
            except NetlinkError as err:
                if netlink_code(err) != errno.ENOENT:
                    raise
    for low, high, flags in new:
        for info in _infos(low, high, flags):
            ipr.vlan_filter("add", index=tap.index, vlan_info=info)


def _infos(low: int, high: int, flags: int) -> list[dict[str, object]]:
    """pyroute2 ``vlan_info`` arguments for a range: one ranged entry when it has no flags, else one per VLAN."""
    if low != high and not flags:
        return [{"vid": f"{low}-{high}"}]
    return [{"vid": vid, "flags": flags} for vid in range(low, high + 1)]


def port_of(ipr: Any, tap_name: str) -> TapPort:  # noqa: ANN401 - pyroute2's IPRoute is untyped
    """How ``tap_name`` is plugged in now.

    Raises:
        NotFound: The tap is gone.
    """
    tap = _tap(ipr, tap_name)
    master = next((link for link in dump_links(ipr) if link.index == tap.master), None) if tap.master else None
    network = None
    vlan = None
    if master is not None:
        prefix = f"{MARK}:nat:"
        if master.alias and master.alias.startswith(prefix):
            network = master.alias.removeprefix(prefix)
        filtering, default_pvid = _vlan_settings(master, ipr)
        if filtering:
            vlan = vlan_of(_port_vlans(ipr, tap.index), default_pvid)
    try:
        shape = shape_of(read_layout(ipr, tap))
    except Conflict:
        shape = None  # someone else's qdiscs: not a shape qmpnet can describe
    return TapPort(tap.name, master.name if master else None, network, vlan, shape)
