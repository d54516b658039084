"""macvtaps for macvtap-mode NICs: a link on a host NIC, made by qmpnet, whose ``/dev/tapN`` QEMU gets as an open fd.

A macvtap is a macvlan whose frames go to a character device (``/dev/tap<ifindex>``) instead of the host stack:
the guest sits on the parent link's network without a bridge (libvirt's ``type='direct'``). qmpnet makes it the
way libvirt does: an ``RTM_NEWLINK`` of kind ``macvtap`` on the parent in the wanted mode, with the *guest's* MAC
(a macvlan receives only frames for its own address), the parent's MTU, and qmpnet's mark as its alias; then it
opens the device node once per queue and sets ``IFF_VNET_HDR`` on each fd (``TUNSETIFF``), so QEMU can offload.

Unlike a tap, a macvtap is a persistent link: closing its fds does not remove it. So the lane deletes it after the
NIC's removal (:func:`qmpnet.adapters.hostnet.taps.delete_tap` deletes qmpnet's macvtaps as it deletes its taps),
and the connect-time sweep (:meth:`qmpnet.adapters.hostnet.host.HostNet.sweep_orphans`) deletes those of NICs
that no longer exist. It is named by the same pattern as taps (``vnet{n}``) and carries the same mark, so every
place that finds, lists or sweeps qmpnet's taps finds its macvtaps too.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
from pathlib import Path
from typing import Any

from pyroute2 import NetlinkError

from qmpnet.adapters.hostnet.failures import host_error
from qmpnet.adapters.hostnet.links import LinkInfo, dump_links, find_link, route, tap_mark
from qmpnet.adapters.hostnet.netns import run_in_netns
from qmpnet.adapters.hostnet.taps import MAX_QUEUES, Tap, check_owner, open_tap_queue
from qmpnet.core.ifnames import TAP_PATTERN_DEFAULT, check_ifname, check_tap_pattern
from qmpnet.errors import InvalidRequest, NotFound, QmpnetError, Unsupported

__all__ = ["MODES", "create_macvtap"]

log = logging.getLogger(__name__)

#: The macvtap modes qmpnet offers (the kernel's ``passthru`` gives the guest the whole parent).
MODES = frozenset({"bridge", "vepa", "private", "passthru"})
_DEV = Path("/dev")
_FIELD = "nic.backend.link"
#: How many names of the pattern to try before giving up (each try fails only if the name is taken meanwhile).
_NAME_TRIES = 64


async def create_macvtap(  # noqa: PLR0913 - one keyword per property of the link
    link: str,
    *,
    mode: str,
    mac: str,
    pattern: str = TAP_PATTERN_DEFAULT,
    queues: int = 1,
    netns: str | None = None,
    owner: str | None = None,
) -> Tap:
    """Create a macvtap on ``link`` in ``mode`` with address ``mac``, bring it up, and return it with its fds.

    Waits for the netlink and device work in a namespace thread. The fds are close-on-exec; pass them to QEMU
    (``getfd``) and then :meth:`Tap.close_fds`. If anything fails after the link was made, the link is deleted.

    Args:
        link: The parent link in ``netns`` (``nic.backend.link``).
        mode: ``bridge``, ``vepa``, ``private`` or ``passthru``.
        mac: The guest NIC's MAC: a macvtap passes up only frames for its own address.
        pattern: The name pattern, ``{n}`` standing for the number (the tap pattern, ``vnet{n}``).
        queues: Queue count; one fd per queue is returned.
        netns: The namespace of the parent link (and of QEMU).
        owner: A short note stored in the link's mark (e.g. ``vm1/virtio0``).

    Raises:
        InvalidRequest: A malformed name, mode, pattern, owner or queue count.
        NotFound: No link called ``link`` (``field`` = ``nic.backend.link``), or no namespace ``netns``.
        Unsupported: The kernel has no macvtap (``field`` = ``nic.backend.type``), or its device node is missing.
        QmpnetError: Another netlink or ioctl failure.
    """
    check_ifname(link, field=_FIELD)
    if mode not in MODES:
        raise InvalidRequest(f"nic.backend.mode: must be one of {', '.join(sorted(MODES))}", field="nic.backend.mode")
    prefix, _, suffix = check_tap_pattern(pattern).partition("{n}")
    if not 1 <= queues <= MAX_QUEUES:
        raise InvalidRequest(f"nic.queues: must be 1 to {MAX_QUEUES}", field="nic.queues")
    mark = tap_mark(check_owner(owner))
    tap = await run_in_netns(
        netns, lambda: _create(link, mode, mac, (prefix, suffix), queues, netns, mark), discard=_give_up
    )
    log.info("created macvtap %s (%s mode, %d queue(s)) on %s", tap.name, mode, queues, link)
    return tap


def _give_up(tap: Tap) -> None:
    tap.close_fds()
    with route() as ipr:
        _delete_link(ipr, tap.ifindex)


# ------------------------------------------------------------------------------------- in the namespace thread


def _create(  # noqa: PLR0913, PLR0917 - the request, unpacked for the thread
    link: str, mode: str, mac: str, pattern: tuple[str, str], queues: int, netns: str | None, mark: str
) -> Tap:
    with route() as ipr:
        parent = find_link(ipr, link)
        if parent is None:
            raise NotFound(f"{_FIELD}: no link {link!r} on this host", field=_FIELD)
        made = _add(ipr, parent, mode, mac, pattern)
        fds: list[int] = []
        try:
            ipr.link("set", index=made.index, ifalias=mark, state="up")
            fds.extend(_open_queue(made, queues) for _ in range(queues))
        except BaseException as err:
            for fd in fds:
                os.close(fd)
            _delete_link(ipr, made.index)
            if isinstance(err, NetlinkError):
                raise host_error(f"bring macvtap {made.name} up", err) from err
            raise
        return Tap(name=made.name, ifindex=made.index, bridge="", netns=netns, _fds=fds)


def _add(ipr: Any, parent: LinkInfo, mode: str, mac: str, pattern: tuple[str, str]) -> LinkInfo:  # noqa: ANN401
    taken = {info.name for info in dump_links(ipr)}
    names = (f"{pattern[0]}{n}{pattern[1]}" for n in range(1 << 15))
    for name in itertools.islice((name for name in names if name not in taken), _NAME_TRIES):
        try:
            ipr.link("add", ifname=name, kind="macvtap", link=parent.index, macvtap_mode=mode, address=mac,
                     mtu=parent.mtu)
        except NetlinkError as err:
            if err.code == errno.EEXIST:  # someone took the name meanwhile: try the next
                continue
            raise _add_error(parent.name, err) from err
        made = find_link(ipr, name)
        if made is not None:
            return made
    raise QmpnetError(f"{_FIELD}: no free name of the tap pattern for a macvtap on {parent.name}", field=_FIELD)


def _add_error(parent: str, err: NetlinkError) -> QmpnetError:
    if err.code == errno.EOPNOTSUPP:  # the kernel knows no link kind "macvtap" (and could not load the module)
        return Unsupported("nic.backend.type: this kernel has no macvtap (modprobe macvtap)", field="nic.backend.type")
    if err.code == errno.EBUSY:
        return host_error(f"make a macvtap on {parent} (passthru needs the link to itself)", err, field=_FIELD)
    return host_error(f"make a macvtap on {parent}", err, field=_FIELD)


def _open_queue(made: LinkInfo, queues: int) -> int:
    node = _DEV / f"tap{made.index}"
    missing = f" for macvtap {made.name}: the host needs devtmpfs (or udev) on /dev"
    return open_tap_queue(node, "", queues, missing=missing, doing=f"set the vnet header on {node}")[0]


def _delete_link(ipr: Any, index: int) -> None:  # noqa: ANN401 - pyroute2's IPRoute is untyped
    try:
        ipr.link("del", index=index)
    except NetlinkError as err:
        if err.code != errno.ENODEV:
            log.warning("could not delete macvtap %d after a failure: %s", index, err)
