"""NAT networks: bring one up (bridge, forwarding, nftables table, dnsmasq), take it down, report its state.

:func:`net_up` converges rather than creates: every part is checked and made right, so calling it on a network
that is up is cheap and changes nothing, and calling it after a settings change (another DHCP range) restarts
dnsmasq with the new command line. A bring-up that fails on a network that was down removes what it made.

The parts, and what qmpnet touches for them (nothing else):

* the bridge, created with qmpnet's mark ``qmpnet:nat:<name>`` as its alias, the gateway address, STP off and
  forward delay 0; a link of that name *without* the mark is someone else's, and ``net_up`` refuses it;
* ``net.ipv4.ip_forward=1`` in the namespace. It is namespace-wide and other things may rely on it, so
  ``net_down`` leaves it as it is (as libvirt does);
* the table ``inet qmpnet_<name>`` (see :mod:`qmpnet.adapters.hostnet.nftables`);
* one dnsmasq (see :mod:`qmpnet.adapters.hostnet.dnsmasq`), its pid and lease files in the state directory.

Guests join a NAT network like a bridge: :func:`qmpnet.adapters.hostnet.taps.create_tap` with ``bridge=net.bridge``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyroute2 import NetlinkError

from qmpnet.adapters.hostnet import dnsmasq, nftables
from qmpnet.adapters.hostnet.failures import host_error
from qmpnet.adapters.hostnet.links import LinkInfo, dump_links, find_link, nat_mark, route
from qmpnet.adapters.hostnet.netns import run_in_netns
from qmpnet.core.hostconfig import HostnetSettings, NatNetwork, parse_nat_network
from qmpnet.core.model_base import Frozen
from qmpnet.errors import Conflict, QmpnetError

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["Lease", "NatStatus", "net_down", "net_list", "net_status", "net_up"]

log = logging.getLogger(__name__)

_IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


class Lease(Frozen):
    """A DHCP lease dnsmasq handed out."""

    mac: str
    ip: ipaddress.IPv4Address
    hostname: str | None
    expires: int


class NatStatus(Frozen):
    """The state of one NAT network on the host.

    ``up`` is true when every part is in place: the bridge (ours, up, with the gateway address), the nftables
    table and a dnsmasq.
    """

    name: str
    bridge: str
    subnet: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    up: bool
    bridge_present: bool
    table_present: bool
    dnsmasq_pid: int | None
    forwarding: bool
    leases: tuple[Lease, ...] = ()


def _defaults(settings: HostnetSettings | None) -> HostnetSettings:
    return settings if settings is not None else HostnetSettings()


#: One bring-up or take-down of a network at a time in this process: lanes of several guests may all ask for the
#: same network "on first use" at once. (Several controllers on one host must not manage the same network.)
#: Per event loop, because an asyncio.Lock belongs to the loop it first waited in.
_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str | None, str], asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


def _lock(netns: str | None, name: str) -> asyncio.Lock:
    locks = _LOCKS.setdefault(asyncio.get_running_loop(), {})
    return locks.setdefault((netns, name), asyncio.Lock())


async def net_up(net: NatNetwork, *, netns: str | None = None, settings: HostnetSettings | None = None) -> NatStatus:
    """Bring NAT network ``net`` up in ``netns`` (idempotent; converges a network that is partly up).

    Waits for the bridge, forwarding, nftables and dnsmasq work in a namespace thread.

    Raises:
        Conflict: A link called ``net.bridge`` exists and is not this network's, or another link already has an
            address in ``net.subnet``.
        NotFound: No namespace ``netns``.
        Unsupported: ``nft`` or ``dnsmasq`` is missing, or the kernel lacks nftables.
        QmpnetError: A netlink, nft or dnsmasq failure (the message includes the tool's).
    """
    opts = _defaults(settings)

    def bring_up() -> NatStatus:
        with route() as ipr:
            existed = find_link(ipr, net.bridge) is not None
        try:
            _ensure_bridge(net)
            _enable_forwarding()
            nftables.apply(nftables.render_table(net), nft=opts.nft, timeout=opts.tool_timeout)
            _ensure_dnsmasq(net, opts)
        except BaseException as err:
            if not existed:
                _undo_partial(net.name, opts, err)
            raise
        return _status(net, opts)

    async with _lock(netns, net.name):
        status = await run_in_netns(netns, bring_up)
    log.info("NAT network %s is up on %s (%s, dnsmasq %s)%s", net.name, net.bridge, net.subnet, status.dnsmasq_pid,
             f" in netns {netns}" if netns else "")
    return status


async def net_down(
    net: NatNetwork | str, *, netns: str | None = None, settings: HostnetSettings | None = None
) -> bool:
    """Take NAT network ``net`` down: stop its dnsmasq, delete its table and its bridge (idempotent).

    ``net`` may be just the name: the bridge is found by qmpnet's mark, the table and dnsmasq by the name. Taps
    still on the bridge are released from it, not deleted; the caller should remove the NICs first.

    Waits for the work in a namespace thread and for dnsmasq to exit (``stop_timeout``, then SIGKILL).

    Returns:
        Whether any part of the network existed.

    Raises:
        NotFound: No namespace ``netns``.
        Unsupported, QmpnetError: As for :func:`net_up`.
    """
    opts = _defaults(settings)
    name = net if isinstance(net, str) else net.name
    parse_nat_network({"name": name})
    async with _lock(netns, name):
        found = await run_in_netns(netns, lambda: _take_down(name, opts))
    if found:
        log.info("NAT network %s is down%s", name, f" in netns {netns}" if netns else "")
    return found


async def net_status(
    net: NatNetwork, *, netns: str | None = None, settings: HostnetSettings | None = None
) -> NatStatus:
    """The state of NAT network ``net`` in ``netns``, with its current DHCP leases.

    Raises:
        NotFound: No namespace ``netns``.
        Unsupported, QmpnetError: ``nft`` failed.
    """
    opts = _defaults(settings)
    return await run_in_netns(netns, lambda: _status(net, opts))


async def net_list(
    nets: Iterable[NatNetwork] | None = None, *, netns: str | None = None, settings: HostnetSettings | None = None
) -> list[NatStatus]:
    """The state of every network in ``nets`` (default: the networks in ``settings``).

    Raises:
        NotFound: No namespace ``netns``.
        Unsupported, QmpnetError: ``nft`` failed.
    """
    opts = _defaults(settings)
    chosen = tuple(opts.networks if nets is None else nets)
    return await run_in_netns(netns, lambda: [_status(net, opts) for net in chosen])


# ------------------------------------------------------------------------------------- in the namespace thread


def _ensure_bridge(net: NatNetwork) -> None:
    with route() as ipr:
        bridge = find_link(ipr, net.bridge)
        if bridge is not None and bridge.alias != nat_mark(net.name):
            raise Conflict(f"network.bridge: a link {net.bridge!r} exists and is not qmpnet's bridge for network "
                           f"{net.name} (alias {bridge.alias!r}); choose another bridge name", field="network.bridge")
        _check_subnet_free(ipr, net, bridge)
        try:
            if bridge is None:
                ipr.link("add", ifname=net.bridge, kind="bridge", br_stp_state=0, br_forward_delay=0)
                bridge = find_link(ipr, net.bridge)
                if bridge is None:
                    raise QmpnetError(f"bridge {net.bridge} vanished right after it was created")
                ipr.link("set", index=bridge.index, ifalias=nat_mark(net.name))
            _set_address(ipr, bridge.index, net)
            ipr.link("set", index=bridge.index, state="up")
        except NetlinkError as err:
            raise host_error(f"set up bridge {net.bridge}", err, field="network.bridge") from err


def _enable_forwarding() -> None:
    try:
        if _IP_FORWARD.read_text().strip() != "1":
            _IP_FORWARD.write_text("1\n")
    except OSError as err:
        raise host_error("enable IPv4 forwarding", err) from err


def _check_subnet_free(ipr: Any, net: NatNetwork, bridge: LinkInfo | None) -> None:  # noqa: ANN401 - pyroute2
    names = {link.index: link.name for link in dump_links(ipr)}
    for msg in ipr.addr("dump", family=2):
        if bridge is not None and msg["index"] == bridge.index:
            continue
        other = ipaddress.IPv4Interface(f"{msg.get('IFA_ADDRESS')}/{msg['prefixlen']}").network
        if other.overlaps(net.subnet):
            owner = names.get(msg["index"], msg["index"])
            raise Conflict(f"network.subnet: {net.subnet} overlaps {other} on {owner}", field="network.subnet")


def _set_address(ipr: Any, index: int, net: NatNetwork) -> None:  # noqa: ANN401 - pyroute2
    wanted = (str(net.gateway), net.subnet.prefixlen)
    present = False
    for msg in ipr.addr("dump", index=index, family=2):
        found = (msg.get("IFA_ADDRESS"), msg["prefixlen"])
        if found == wanted:
            present = True
        else:  # left over from an earlier subnet or gateway of this network
            ipr.addr("del", index=index, address=found[0], prefixlen=found[1])
    if not present:
        ipr.addr("add", index=index, address=wanted[0], prefixlen=wanted[1])


def _has_address(ipr: Any, index: int, address: ipaddress.IPv4Address) -> bool:  # noqa: ANN401 - pyroute2
    return any(msg.get("IFA_ADDRESS") == str(address) for msg in ipr.addr("dump", index=index, family=2))


def _ensure_dnsmasq(net: NatNetwork, opts: HostnetSettings) -> None:
    wanted = dnsmasq.argv(net, opts.state_dir, dnsmasq=opts.dnsmasq)
    running = dnsmasq.find(net, opts.state_dir)
    if len(running) == 1 and next(iter(running.values())) == wanted:
        return
    if running:
        log.info("restarting dnsmasq for NAT network %s: its command line changed", net.name)
        dnsmasq.stop(net, opts.state_dir, timeout=opts.stop_timeout)
    dnsmasq.start(net, opts.state_dir, dnsmasq=opts.dnsmasq, timeout=opts.tool_timeout)


def _undo_partial(name: str, opts: HostnetSettings, cause: BaseException) -> None:
    try:
        _take_down(name, opts)
    except QmpnetError as err:
        log.warning("NAT network %s: removing the half-made network failed too: %s", name, err)
        cause.add_note(f"removing the half-made network failed too: {err}")


def _take_down(name: str, opts: HostnetSettings) -> bool:
    # A name-only net_down still finds everything: dnsmasq by its pid-file path, the table by name, the bridge by
    # its mark. The stand-in network below is used only for those names.
    stand_in = NatNetwork(name=name)
    stopped = dnsmasq.stop(stand_in, opts.state_dir, timeout=opts.stop_timeout)
    table = stand_in.table
    had_table = table in nftables.list_tables(nft=opts.nft, timeout=opts.tool_timeout)
    if had_table:
        nftables.apply(nftables.remove_script(table), nft=opts.nft, timeout=opts.tool_timeout)
    with route() as ipr:
        bridges = [link for link in dump_links(ipr) if link.alias == nat_mark(name)]
        for link in bridges:
            try:
                ipr.link("del", index=link.index)
            except NetlinkError as err:
                raise host_error(f"delete bridge {link.name}", err) from err
    return bool(stopped or had_table or bridges)


def _status(net: NatNetwork, opts: HostnetSettings) -> NatStatus:
    with route() as ipr:
        bridge = find_link(ipr, net.bridge)
        ours = bridge is not None and bridge.alias == nat_mark(net.name)
        addressed = ours and bridge is not None and _has_address(ipr, bridge.index, net.gateway)
    table = net.table in nftables.list_tables(nft=opts.nft, timeout=opts.tool_timeout)
    pids = dnsmasq.find(net, opts.state_dir)
    forwarding = _IP_FORWARD.read_text().strip() == "1"
    up = bool(ours and bridge is not None and bridge.up and addressed and table and pids and forwarding)
    return NatStatus(
        name=net.name,
        bridge=net.bridge,
        subnet=net.subnet,
        gateway=net.gateway,
        up=up,
        bridge_present=ours,
        table_present=table,
        dnsmasq_pid=min(pids) if pids else None,
        forwarding=forwarding,
        leases=_leases(dnsmasq.lease_file(net, opts.state_dir)),
    )


def _leases(path: Path) -> tuple[Lease, ...]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return ()
    leases = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 4 and parts[0].isdigit():  # expiry mac ip hostname [client-id]
            hostname = None if parts[3] == "*" else parts[3]
            leases.append(Lease(mac=parts[1], ip=ipaddress.IPv4Address(parts[2]), hostname=hostname,
                                expires=int(parts[0])))
    return tuple(leases)
