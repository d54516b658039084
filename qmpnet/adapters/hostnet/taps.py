"""Taps for bridge-mode NICs: created by qmpnet, handed to QEMU as open file descriptors.

A tap is made the way libvirt makes one, not with ``ip tuntap``: qmpnet opens ``/dev/net/tun`` once per queue
and issues ``TUNSETIFF`` with the pattern's ``%d`` form (``vnet%d``), so the *kernel* picks the next free number
atomically (two controllers or libvirt cannot race for a name), with ``IFF_VNET_HDR`` (so QEMU can offload
checksums and segmentation) and ``IFF_MULTI_QUEUE`` for several queues. The tap is **not persistent**: it lives
exactly as long as some process holds one of its fds. qmpnet holds them until QEMU has its copies (``getfd``);
after that QEMU's netdev owns the tap and ``netdev_del`` makes it vanish. A qmpnet that crashes before ``getfd``
leaves no tap (the kernel drops it with qmpnet's fds); one that crashes between ``getfd`` and ``netdev_add``
leaves a tap held by QEMU's fd table, which no QMP command lists: it lives until QEMU exits, or until ``qmpnet
serve`` sees the guest (re)connect and sweeps the taps of NICs the guest does not have
(:meth:`qmpnet.adapters.hostnet.host.HostNet.sweep_orphans`). :func:`delete_tap` and :func:`sweep_taps` remove only taps
carrying qmpnet's mark (see :mod:`qmpnet.adapters.hostnet.links`), never someone else's ``vnet3``.

Each tap gets a random ``fe:xx:xx:xx:xx:xx`` MAC (the bridge takes the lowest port MAC as its own, so a high one
never changes the bridge's address under its uplink) and the NIC's MTU, else the bridge's (never more: see
:mod:`qmpnet.core.mtu`), and is enslaved and brought up. A Linux bridge whose MTU nobody set follows its smallest
port, so a tap of a smaller MTU would lower the MTU of the operator's bridge and of every other port's traffic:
:func:`keep_bridge_mtu` sets it back, which also pins it (the kernel no longer lowers it for a port).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from pyroute2 import NetlinkError

from qmpnet.adapters.hostnet.failures import host_error
from qmpnet.adapters.hostnet.links import LinkInfo, dump_links, find_link, route, tap_mark
from qmpnet.adapters.hostnet.netns import run_in_netns
from qmpnet.core.ifnames import (
    TAP_PATTERN_DEFAULT,
    check_ifname,
    tap_pattern_kernel,
    tap_pattern_regex,
)
from qmpnet.core.mtu import check_within
from qmpnet.errors import Conflict, InvalidRequest, NotFound, QmpnetError, Unsupported

if TYPE_CHECKING:
    from collections.abc import Collection

__all__ = [
    "MAX_QUEUES",
    "Tap",
    "TapInfo",
    "bridge_mtu",
    "check_existing_tap",
    "check_owner",
    "create_tap",
    "delete_tap",
    "keep_bridge_mtu",
    "list_taps",
    "sweep_taps",
    "vhost_usable",
]

log = logging.getLogger(__name__)

TUN_DEVICE = Path("/dev/net/tun")
VHOST_DEVICE = Path("/dev/vhost-net")
#: The kernel's MAX_TAP_QUEUES.
MAX_QUEUES = 256
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_IFF_MULTI_QUEUE = 0x0100
_TUN_TYPE_TAP = 2
_IFREQ = struct.Struct("16sH22x")
_OWNER_MAX = 200


@dataclass
class Tap:
    """A tap qmpnet created, with the fds it still holds (one per queue).

    Attributes:
        name: The interface name the kernel gave it (``vnet0``).
        ifindex: Its interface index.
        bridge: The bridge it is enslaved to (``""`` for a macvtap, which sits on a host link).
        netns: The namespace it lives in (``None``: the controller's own).
        vnet_hdr: Always true: the tap was made with ``IFF_VNET_HDR``.
    """

    name: str
    ifindex: int
    bridge: str
    netns: str | None
    _fds: list[int] = field(repr=False)
    vnet_hdr: bool = True

    @property
    def queues(self) -> int:
        """How many queues (fds) the tap was created with."""
        return self._queues

    @property
    def fds(self) -> tuple[int, ...]:
        """The open fds, one per queue, to pass to QEMU; empty after :meth:`close_fds`."""
        return tuple(self._fds)

    def __post_init__(self) -> None:
        self._queues = len(self._fds)

    def close_fds(self) -> None:
        """Close qmpnet's copies of the fds (idempotent).

        Call it once QEMU holds its copies (after ``getfd``), or to give up the tap: a tap no process holds
        disappears.
        """
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the fds (``with tap:`` around the ``getfd`` calls)."""
        self.close_fds()


@dataclass(frozen=True)
class TapInfo:
    """A qmpnet tap as the host shows it now.

    Attributes:
        name: Interface name.
        ifindex: Interface index.
        bridge: The bridge it is enslaved to, if any.
        owner: The ``owner`` note given to :func:`create_tap`.
        up: Administratively up.
        attached: Some process (QEMU) holds the tap open: the kernel gives a tap carrier while a queue is
            attached. A qmpnet tap nobody holds has vanished; a persistent one (made by others) can be detached.
    """

    name: str
    ifindex: int
    bridge: str | None
    owner: str | None
    up: bool
    attached: bool


def vhost_usable(path: Path = VHOST_DEVICE) -> bool:
    """Whether ``/dev/vhost-net`` can be opened, i.e. whether ``vhost=on`` will work for a tap netdev."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


async def create_tap(  # noqa: PLR0913 - the tap's properties, all keyword-only
    bridge: str,
    *,
    pattern: str = TAP_PATTERN_DEFAULT,
    queues: int = 1,
    netns: str | None = None,
    owner: str | None = None,
    mtu: int | None = None,
) -> Tap:
    """Create a tap named by ``pattern``, enslave it to ``bridge``, bring it up, and return it with its fds.

    Waits for the netlink and ioctl work in a namespace thread. The fds are close-on-exec; pass them to QEMU
    (``getfd``) and then :meth:`Tap.close_fds`. If the caller is cancelled the tap is given up.

    Args:
        bridge: An existing Linux bridge in ``netns``.
        pattern: The tap name pattern, ``{n}`` standing for the number (``vnet{n}``).
        queues: Queue count; above 1 the tap is multiqueue and one fd per queue is returned.
        netns: The namespace to create the tap in (the bridge's, and QEMU's).
        owner: A short note stored in the tap's mark (e.g. ``vm1/virtio0``) and shown by :func:`list_taps`.
        mtu: The tap's MTU (``None``: the bridge's).

    Raises:
        InvalidRequest: A malformed name, pattern, owner or queue count; ``bridge`` is not a Linux bridge; or
            ``mtu`` is above the bridge's (``field`` = ``nic.mtu``).
        NotFound: No link called ``bridge`` (``field`` = ``nic.backend.bridge``), or no namespace ``netns``.
        Unsupported: No ``/dev/net/tun``, or not allowed to create taps.
        QmpnetError: Another netlink or ioctl failure.
    """
    check_ifname(bridge, field="nic.backend.bridge")
    kernel_name = tap_pattern_kernel(pattern)
    if not 1 <= queues <= MAX_QUEUES:
        raise InvalidRequest(f"nic.queues: must be 1 to {MAX_QUEUES}", field="nic.queues")
    mark = tap_mark(check_owner(owner))
    tap = await run_in_netns(
        netns, lambda: _create(bridge, kernel_name, queues, netns, mark, mtu), discard=Tap.close_fds
    )
    log.info("created tap %s (%d queue(s)) on bridge %s%s", tap.name, queues, bridge, _where(netns))
    return tap


async def bridge_mtu(bridge: str, *, netns: str | None = None) -> int:
    """The MTU of ``bridge``.

    Raises:
        NotFound: No link called ``bridge`` (``field`` = ``nic.backend.bridge``), or no namespace ``netns``.
        InvalidRequest: ``bridge`` is malformed or not a Linux bridge.
    """
    check_ifname(bridge, field="nic.backend.bridge")

    def look() -> int:
        with route() as ipr:
            return _bridge(ipr, bridge).mtu

    return await run_in_netns(netns, look)


async def delete_tap(name: str, *, netns: str | None = None) -> bool:
    """Delete tap ``name`` if it exists and is one of qmpnet's (idempotent).

    Waits for the netlink work. A link of that name that is not a qmpnet tap is left alone (logged).

    Returns:
        Whether a tap was deleted. ``False`` is normal after ``netdev_del``: the tap left with QEMU's fd.

    Raises:
        InvalidRequest: ``name`` is malformed.
        NotFound: No namespace ``netns``.
        QmpnetError: The kernel refused.
    """
    check_ifname(name, field="ifname")
    deleted = await run_in_netns(netns, lambda: _delete(name))
    if deleted:
        log.info("deleted tap %s%s", name, _where(netns))
    return deleted


async def list_taps(*, pattern: str = TAP_PATTERN_DEFAULT, netns: str | None = None) -> list[TapInfo]:
    """The qmpnet taps whose names match ``pattern``, sorted by name.

    Raises:
        InvalidRequest: ``pattern`` is malformed.
        NotFound: No namespace ``netns``.
    """
    regex = tap_pattern_regex(pattern)
    return await run_in_netns(netns, lambda: _list(regex.fullmatch))


async def check_existing_tap(ifname: str, *, netns: str | None = None) -> TapInfo:
    """Check that ``ifname`` is an existing, free tap, for ``{"type": "tap", "ifname": ...}``.

    Without this check QEMU, given an ``ifname`` that does not exist, would *create* a tap of that name.

    Raises:
        InvalidRequest: ``ifname`` is malformed, or the link is not a tap (``field`` = ``nic.backend.ifname``).
        NotFound: No link called ``ifname``, or no namespace ``netns``.
        Conflict: Some process already holds the tap.
    """
    field_name = "nic.backend.ifname"
    check_ifname(ifname, field=field_name)

    def look() -> tuple[LinkInfo | None, str | None]:
        with route() as ipr:
            link = find_link(ipr, ifname)
            master = _name_of(ipr, link.master) if link is not None and link.master else None
        return link, master

    link, bridge = await run_in_netns(netns, look)
    if link is None:
        raise NotFound(f"{field_name}: no tap {ifname!r} on this host", field=field_name)
    if link.kind != "tun" or link.tun_type != _TUN_TYPE_TAP:
        raise InvalidRequest(f"{field_name}: {ifname!r} is not a tap", field=field_name)
    if link.carrier:
        raise Conflict(f"{field_name}: tap {ifname!r} is already held open by some process", field=field_name)
    return TapInfo(link.name, link.index, bridge, None, link.up, link.carrier)


async def sweep_taps(
    in_use: Collection[str], *, pattern: str = TAP_PATTERN_DEFAULT, netns: str | None = None
) -> list[str]:
    """Delete qmpnet's taps matching ``pattern`` whose names are not in ``in_use`` (start-up clean-up).

    Returns:
        The names deleted, sorted.

    Raises:
        InvalidRequest: ``pattern`` is malformed.
        NotFound: No namespace ``netns``.
        QmpnetError: The kernel refused a deletion.
    """
    regex = tap_pattern_regex(pattern)
    keep = frozenset(in_use)

    def sweep() -> list[str]:
        stale = [tap.name for tap in _list(regex.fullmatch) if tap.name not in keep]
        return [name for name in stale if _delete(name)]

    deleted = await run_in_netns(netns, sweep)
    if deleted:
        log.info("swept %d unused tap(s)%s: %s", len(deleted), _where(netns), ", ".join(deleted))
    return deleted


# ------------------------------------------------------------------------------------- in the namespace thread


def _create(bridge: str, kernel_name: str, queues: int, netns: str | None, mark: str, mtu: int | None) -> Tap:  # noqa: PLR0913, PLR0917 - the tap's properties
    with route() as ipr:
        master = _bridge(ipr, bridge)
        if mtu is not None:
            check_within(mtu, bridge, master.mtu, field="nic.mtu")
        fds: list[int] = []
        try:
            name = _open_queue(kernel_name, queues, fds)
            for _ in range(queues - 1):
                _open_queue(name, queues, fds)
            link = _attach(ipr, name, master, mark, mtu or master.mtu)
            keep_bridge_mtu(ipr, master)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return Tap(name=name, ifindex=link.index, bridge=bridge, netns=netns, _fds=fds)


def _bridge(ipr: Any, bridge: str) -> LinkInfo:  # noqa: ANN401 - pyroute2's IPRoute is untyped
    link = find_link(ipr, bridge)
    if link is None:
        raise NotFound(f"nic.backend.bridge: no bridge {bridge!r} on this host", field="nic.backend.bridge")
    if link.kind != "bridge":
        raise InvalidRequest(f"nic.backend.bridge: {bridge!r} is a {link.kind or 'plain'} link, not a Linux bridge",
                             field="nic.backend.bridge")
    return link


def _open_queue(name: str, queues: int, fds: list[int]) -> str:
    fd, name = open_tap_queue(
        TUN_DEVICE, name, queues, missing=": load the tun module (modprobe tun)", doing=f"create tap {name}"
    )
    fds.append(fd)
    return name


def open_tap_queue(node: Path, name: str, queues: int, *, missing: str, doing: str) -> tuple[int, str]:
    """Open ``node`` (/dev/net/tun, or a macvtap's /dev/tapN) as one queue of tap ``name``; return the fd and name.

    The queue has the vnet header QEMU expects (:func:`_set_tap_queue`). On failure nothing stays open.

    Args:
        node: The character device to open.
        name: The tap's name, ``""`` to let the kernel name it (or, on a macvtap's node, the one it has).
        queues: The NIC's queues (multiqueue when more than 1).
        missing: Said after ``no <node>`` when the node does not exist: what the host lacks.
        doing: What the ioctl does, for the error when the kernel refuses it.

    Raises:
        Unsupported: ``node`` does not exist.
        QmpnetError: The host refused to open it or to set the queue up (:func:`host_error`).
    """
    try:
        fd = os.open(node, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError as err:
        raise Unsupported(f"no {node}{missing}") from err
    except OSError as err:
        raise host_error(f"open {node}", err) from err
    try:
        return fd, _set_tap_queue(fd, name, queues)
    except OSError as err:
        os.close(fd)
        raise host_error(doing, err) from err


def _set_tap_queue(fd: int, name: str, queues: int) -> str:
    """Make ``fd`` a queue of tap ``name`` with the vnet header QEMU expects; return the tap's name.

    ``name`` may be ``""``: the kernel names the tap (or, on a macvtap's node, the macvtap is the one it has).
    Multiqueue when ``queues`` > 1.

    Raises:
        OSError: The kernel refused (TUNSETIFF).
    """
    flags = _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR | (_IFF_MULTI_QUEUE if queues > 1 else 0)
    answer = fcntl.ioctl(fd, _TUNSETIFF, _IFREQ.pack(name.encode(), flags))
    raw_name: bytes = _IFREQ.unpack(answer)[0]
    return raw_name.split(b"\0", 1)[0].decode()


def _attach(ipr: Any, name: str, master: LinkInfo, mark: str, mtu: int) -> LinkInfo:  # noqa: ANN401 - untyped pyroute2
    link = find_link(ipr, name)
    if link is None:
        raise QmpnetError(f"tap {name} vanished right after it was created")
    mac = "fe:" + ":".join(f"{octet:02x}" for octet in secrets.token_bytes(5))
    try:
        ipr.link("set", index=link.index, ifalias=mark, address=mac, mtu=mtu)
        ipr.link("set", index=link.index, master=master.index, state="up")
    except NetlinkError as err:
        raise host_error(f"enslave tap {link.name} to bridge {master.name}", err) from err
    return link


def keep_bridge_mtu(ipr: Any, bridge: LinkInfo) -> None:  # noqa: ANN401 - pyroute2's IPRoute is untyped
    """Give ``bridge`` back the MTU it had (``bridge.mtu``) if a port of smaller MTU made the kernel lower it.

    Raises:
        QmpnetError: The kernel refused.
    """
    now = find_link(ipr, bridge.name)
    if now is None or now.mtu == bridge.mtu:
        return
    try:
        ipr.link("set", index=bridge.index, mtu=bridge.mtu)
    except NetlinkError as err:
        raise host_error(f"put the MTU of bridge {bridge.name} back to {bridge.mtu}", err) from err
    log.info("bridge %s: MTU put back to %d (the kernel had lowered it to %d for a port)", bridge.name, bridge.mtu,
             now.mtu)


def _list(match: Any) -> list[TapInfo]:  # noqa: ANN401 - a regex's fullmatch
    with route() as ipr:
        links = dump_links(ipr)
    names = {link.index: link.name for link in links}
    taps = []
    for link in links:
        if _is_ours(link) and match(link.name):
            owner = (link.alias or "").removeprefix(tap_mark(None)).removeprefix(":") or None
            bridge = names.get(link.master) if link.master is not None else None
            taps.append(TapInfo(link.name, link.index, bridge, owner, link.up, link.carrier))
    return sorted(taps, key=lambda tap: tap.name)


def _delete(name: str) -> bool:
    with route() as ipr:
        link = find_link(ipr, name)
        if link is None:
            return False
        if not _is_ours(link):
            log.warning("not deleting %s: it is not a tap qmpnet created (alias %r)", name, link.alias)
            return False
        try:
            ipr.link("del", index=link.index)
        except NetlinkError as err:
            if err.code == errno.ENODEV:  # its last fd was closed meanwhile
                return False
            raise host_error(f"delete tap {name}", err) from err
        return True


def _name_of(ipr: Any, index: int) -> str | None:  # noqa: ANN401 - pyroute2's IPRoute is untyped
    try:
        return str(ipr.link("get", index=index)[0].get("IFLA_IFNAME"))
    except NetlinkError:
        return None


def _is_ours(link: LinkInfo) -> bool:
    alias = link.alias or ""
    ours = alias == tap_mark(None) or alias.startswith(tap_mark(None) + ":")
    # A macvtap qmpnet made (see macvtap.py) carries the same mark and is listed, swept and deleted with the taps.
    return ours and (link.kind == "macvtap" or (link.kind == "tun" and link.tun_type in (None, _TUN_TYPE_TAP)))


def check_owner(owner: str | None) -> str | None:
    """``owner`` if it can go into a tap's (or macvtap's) mark.

    Raises:
        InvalidRequest: It is empty, too long, or has other characters.
    """
    if owner is None:
        return None
    if not owner or len(owner) > _OWNER_MAX or not all(c.isascii() and (c.isalnum() or c in "_.:/-") for c in owner):
        raise InvalidRequest(f"owner: at most {_OWNER_MAX} characters of A-Z, a-z, 0-9, '_', '.', ':', '/', '-'",
                             field="owner")
    return owner


def _where(netns: str | None) -> str:
    return f" in netns {netns}" if netns else ""

