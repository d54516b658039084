"""The host side as the guest lane sees it: one object implementing :class:`qmpnet.core.ports.HostNetwork`.

It binds the free functions of this package to the operator's settings (namespace, tap pattern, NAT networks,
sysfs root), so the lane only says *what* it needs (a tap on ``br0`` for NIC ``vm1/virtio0``) and never *where*.
Blocking sysfs work runs in a thread.

The live changes (:meth:`HostNet.move_tap`, :meth:`HostNet.set_vlan`, :meth:`HostNet.set_shape`) each return the
action that undoes them, built from what the host had before, so the caller's undo stack restores it exactly.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from qmpnet.adapters.hostnet import antispoof, nftables
from qmpnet.adapters.hostnet.processes import start_time
from qmpnet.core.hostconfig import HostnetSettings
from qmpnet.core.ifnames import check_ifname
from qmpnet.core.ports import HostProcess
from qmpnet.errors import NotFound, QmpnetError, Unsupported

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from qmpnet.adapters.hostnet import bridgeports, shaping
    from qmpnet.adapters.hostnet.taps import Tap
    from qmpnet.core.model import PasstBackend, Shape, Vlan
    from qmpnet.core.nic_filter import NicFilter
    from qmpnet.core.ports import TapPort

# The netlink side (pyroute2, about 100 ms to import) is imported by the methods that use it, so that a lane that
# never touches a tap (user-mode NICs, the CLI) does not load it; see sweep_orphans for the connect-time sweep.

__all__ = ["HostNet"]

log = logging.getLogger(__name__)


class HostNet:
    """Host networking configured by :class:`HostnetSettings`."""

    def __init__(self, settings: HostnetSettings | None = None) -> None:
        self.settings = settings or HostnetSettings()

    async def create_tap(self, bridge: str, *, queues: int, owner: str, mtu: int | None = None) -> Tap:
        """Make a tap on ``bridge`` with ``queues`` open queue fds, marked as ``owner``'s, of MTU ``mtu``."""
        from qmpnet.adapters.hostnet.taps import create_tap  # noqa: PLC0415 - netlink only when used (see the imports)
        return await create_tap(
            bridge, pattern=self.settings.tap_pattern, queues=queues, netns=self.settings.netns, owner=owner, mtu=mtu
        )

    async def bridge_mtu(self, bridge: str) -> int:
        """The MTU of ``bridge``."""
        from qmpnet.adapters.hostnet.taps import bridge_mtu  # noqa: PLC0415 - netlink only when used (see the imports)
        return await bridge_mtu(bridge, netns=self.settings.netns)
    async def create_macvtap(self, link: str, *, mode: str, mac: str, queues: int, owner: str) -> Tap:
        """Make a macvtap on host link ``link`` with the guest's ``mac``, ``queues`` open fds, marked as ``owner``'s."""
        from qmpnet.adapters.hostnet.macvtap import create_macvtap  # noqa: PLC0415 - netlink only when used
        return await create_macvtap(
            link, mode=mode, mac=mac, pattern=self.settings.tap_pattern, queues=queues, netns=self.settings.netns,
            owner=owner,
        )

    async def delete_tap(self, name: str) -> None:
        """Delete tap (or macvtap) ``name`` if it is still there, and its IFB if shaped.

        A tap normally leaves with QEMU's fd; a macvtap is a persistent link and leaves only here.
        """
        from qmpnet.adapters.hostnet.taps import delete_tap  # noqa: PLC0415 - netlink only when used (see the imports)
        await delete_tap(name, netns=self.settings.netns)
        await self._sweep_ifbs(name)

    async def nat_bridge(self, network: str) -> str:
        """Bring NAT network ``network`` up (idempotent) and return its bridge."""
        from qmpnet.adapters.hostnet.nat import net_up  # noqa: PLC0415 - netlink only when used (see the imports)
        net = self.settings.network(network)
        await net_up(net, netns=self.settings.netns, settings=self.settings)
        return net.bridge

    async def check_tap(self, ifname: str) -> None:
        """Check that ``ifname`` is an existing tap nobody holds."""
        from qmpnet.adapters.hostnet.taps import check_existing_tap  # noqa: PLC0415 - netlink only when used (see the imports)
        await check_existing_tap(ifname, netns=self.settings.netns)

    def vhost(self) -> bool:
        """Whether ``/dev/vhost-net`` can be used."""
        from qmpnet.adapters.hostnet.taps import vhost_usable  # noqa: PLC0415 - netlink only when used (see the imports)
        return vhost_usable()

    async def prepare_vfio(
        self, host: str, *, rebind: bool, taking: Callable[[str], None] | None = None
    ) -> str | None:
        """Check ``host`` for assignment; with ``rebind`` bind it to vfio-pci and return the original driver.

        Returns ``None`` when nothing was changed, ``""`` when the function had no driver before. ``taking`` is told
        the original driver before the rebind (see :meth:`qmpnet.core.ports.HostNetwork.prepare_vfio`).
        """
        from qmpnet.adapters.hostnet.vfio import bind_vfio, check_vfio  # noqa: PLC0415 - only for a vfio NIC

        device = await asyncio.to_thread(check_vfio, host, rebind=rebind, sysfs=self.settings.sysfs_root)
        if not device.needs_rebind:
            return None
        if taking is not None:
            taking(device.driver or "")
        original = await asyncio.to_thread(bind_vfio, host, sysfs=self.settings.sysfs_root)
        return original or ""  # "" = it had no driver: still undo the rebind (driver_override) afterwards

    async def restore_vfio(self, host: str, driver: str) -> None:
        """Give ``host`` back to ``driver`` (``""``: leave it unbound, without the vfio-pci override)."""
        from qmpnet.adapters.hostnet.vfio import restore_driver  # noqa: PLC0415 - only for a vfio NIC

        await asyncio.to_thread(restore_driver, host, driver or None, sysfs=self.settings.sysfs_root)

    async def start_passt(self, socket: str, backend: PasstBackend) -> HostProcess:
        """Start passt on ``socket`` in the host networking's namespace (its port forwards listen there).

        Raises:
            Unsupported, Conflict, QmpnetError: See :func:`qmpnet.adapters.hostnet.passt.start`.
        """
        from qmpnet.adapters.hostnet import passt  # noqa: PLC0415 - only a passt NIC needs it
        from qmpnet.adapters.hostnet.netns import run_in_netns  # noqa: PLC0415 - netlink only when used (see the imports)
        opts = self.settings

        def begin() -> HostProcess:
            return passt.start(socket, backend, program=opts.passt, runas=opts.passt_runas, timeout=opts.tool_timeout)

        def discard(process: HostProcess) -> None:  # the caller was cancelled: nobody will record this passt
            passt.stop(socket, process, timeout=opts.stop_timeout)

        process = await run_in_netns(opts.netns, begin, discard=discard)
        log.info("started passt %d on %s", process.pid, socket)
        return process

    def process(self, pid: int) -> HostProcess | None:
        """Name live process ``pid`` for good by its start time; ``None`` if it is gone."""
        started = start_time(pid)
        return HostProcess(pid, started) if started is not None else None

    def running(self, process: HostProcess) -> bool:
        """Whether ``process`` still runs: its pid is live with the same start time."""
        return start_time(process.pid) == process.started

    async def stop_passt(self, socket: str, process: HostProcess | None) -> None:
        """End the passt on ``socket`` (``process`` only while it is still that process) and remove its files.

        Raises:
            QmpnetError: The OS refused (a file or a process qmpnet may not touch).
        """
        from qmpnet.adapters.hostnet import passt  # noqa: PLC0415 - only a passt NIC needs it
        try:
            ended = await asyncio.to_thread(passt.stop, socket, process, timeout=self.settings.stop_timeout)
        except OSError as err:
            raise QmpnetError(f"ending the passt on {socket}: {err}") from err
        if ended:
            log.info("ended passt %s on %s", ", ".join(map(str, ended)), socket)

    async def sweep_passt(self, directory: str, keep: set[str]) -> list[str]:
        """End the passts in ``directory`` (one guest's) whose socket is not in ``keep``; returns their sockets.

        Raises:
            QmpnetError: The OS refused (a file or a process qmpnet may not touch).
        """
        from qmpnet.adapters.hostnet import passt  # noqa: PLC0415 - only a passt NIC needs it
        try:
            swept = await asyncio.to_thread(passt.sweep, Path(directory), keep, timeout=self.settings.stop_timeout)
        except OSError as err:
            raise QmpnetError(f"sweeping the passts in {directory}: {err}") from err
        if swept:
            log.info("ended the passts of NICs that no longer exist: %s", ", ".join(swept))
        return swept

    async def sweep_orphans(self, owner_prefix: str, keep: set[str]) -> list[str]:
        """Delete qmpnet's taps whose owner starts with ``owner_prefix`` and is not in ``keep``.

        The controller calls this when a guest (re)connects, with the owners of the NICs the guest has: a tap made
        for a NIC that no longer exists (a controller that died between ``getfd`` and ``netdev_add`` leaves one
        held by QEMU's fd table) is removed; taps of other guests are never touched.

        In the host's own namespace, when no link carries a mark of this guest's taps or of an IFB (read from
        sysfs, which costs no netlink), there is nothing to sweep and pyroute2 is not even loaded.
        """
        if self.settings.netns is None and not await asyncio.to_thread(_marked_links, owner_prefix):
            return []
        from qmpnet.adapters.hostnet.taps import delete_tap, list_taps  # noqa: PLC0415 - netlink only when used

        taps = await list_taps(pattern=self.settings.tap_pattern, netns=self.settings.netns)
        stale = [t.name for t in taps if (t.owner or "").startswith(owner_prefix) and t.owner not in keep]
        deleted = [name for name in stale if await delete_tap(name, netns=self.settings.netns)]
        if deleted:
            log.info("swept taps of NICs that no longer exist: %s", ", ".join(deleted))
        await self._sweep_ifbs(None)
        return deleted

    async def _sweep_ifbs(self, tap: str | None) -> None:
        from qmpnet.adapters.hostnet import shaping  # noqa: PLC0415 - netlink only when used (see the imports)
        from qmpnet.adapters.hostnet.links import route  # noqa: PLC0415 - netlink only when used (see the imports)
        from qmpnet.adapters.hostnet.netns import run_in_netns  # noqa: PLC0415 - netlink only when used (see the imports)

        def sweep() -> list[str]:
            with route() as ipr:
                return shaping.sweep_ifbs(ipr, tap_name=tap)

        swept = await run_in_netns(self.settings.netns, sweep)
        if swept:
            log.info("deleted the IFB devices of taps that are gone: %s", ", ".join(swept))

    # ------------------------------------------------------------------------------------------- live changes

    async def find_tap(self, owner: str, *, pid: int | None = None, fd: int | None = None) -> str | None:
        """The tap of a NIC: the one marked for ``owner`` (``<guest>/<nic>``), else the one ``pid`` holds as ``fd``.

        ``/proc/<pid>/fdinfo/<fd>`` names a tun fd's interface. The second way finds the taps of NICs added by
        another process under another guest name (the CLI names a guest by its socket path, ``qmpnet serve`` by
        its configured name).
        """
        from qmpnet.adapters.hostnet import bridgeports  # noqa: PLC0415 - netlink only when used (see the imports)
        from qmpnet.adapters.hostnet.links import route  # noqa: PLC0415 - netlink only when used (see the imports)
        from qmpnet.adapters.hostnet.netns import run_in_netns  # noqa: PLC0415 - netlink only when used (see the imports)
        held = await asyncio.to_thread(bridgeports.tap_held_by, pid, fd) if pid and fd is not None else None

        def look() -> str | None:
            with route() as ipr:
                return bridgeports.find_owned_tap(ipr, owner) or bridgeports.existing_tap(ipr, held)

        return await run_in_netns(self.settings.netns, look)

    async def tap_port(self, tap: str) -> TapPort:
        """How ``tap`` is plugged in now: bridge, NAT network, VLANs, shaping.

        Raises:
            NotFound: No such tap.
        """
        from qmpnet.adapters.hostnet import bridgeports  # noqa: PLC0415 - netlink only when used (see the imports)
        from qmpnet.adapters.hostnet.links import route  # noqa: PLC0415 - netlink only when used (see the imports)
        from qmpnet.adapters.hostnet.netns import run_in_netns  # noqa: PLC0415 - netlink only when used (see the imports)
        check_ifname(tap, field="id")

        def look() -> TapPort:
            with route() as ipr:
                return bridgeports.port_of(ipr, tap)

        return await run_in_netns(self.settings.netns, look)

    async def move_tap(self, tap: str, bridge: str, *, field: str) -> Callable[[], Awaitable[object]]:
        """Enslave ``tap`` to ``bridge``; returns the action that puts it back where it was.

        Raises:
            NotFound: No such tap, or no bridge ``bridge`` (``field``).
            InvalidRequest: ``bridge`` is not a Linux bridge, or a name is malformed.
        """
        from qmpnet.adapters.hostnet import bridgeports  # noqa: PLC0415 - netlink only when used (see the imports)
        from qmpnet.adapters.hostnet.links import route  # noqa: PLC0415 - netlink only when used (see the imports)
        from qmpnet.adapters.hostnet.netns import run_in_netns  # noqa: PLC0415 - netlink only when used (see the imports)
        check_ifname(tap, field="id")
        check_ifname(bridge, field=field)
        netns = self.settings.netns

        def enslave() -> bridgeports.Placement:
            with route() as ipr:
                return bridgeports.move(ipr, tap, bridge, field=field)

        before = await run_in_netns(netns, enslave)
        log.info("moved tap %s to bridge %s", tap, bridge)

        async def put_back() -> None:
            def restore() -> None:
                with route() as ipr:
                    bridgeports.put_back(ipr, tap, before)

            await run_in_netns(netns, restore)
            log.info("put tap %s back on its bridge", tap)

        return put_back

    async def set_mtu(self, tap: str, mtu: int, *, field: str) -> Callable[[], Awaitable[object]]:
        """Give ``tap`` MTU ``mtu`` (at most its bridge's); returns the action that gives it back its old MTU.

        Raises:
            NotFound: No such tap.
            InvalidRequest: ``mtu`` is above the MTU of the tap's bridge (``field``).
        """
        from qmpnet.adapters.hostnet import bridgeports  # noqa: PLC0415 - netlink only when used (see the imports)
        from qmpnet.adapters.hostnet.links import route  # noqa: PLC0415 - netlink only when used (see the imports)
        from qmpnet.adapters.hostnet.netns import run_in_netns  # noqa: PLC0415 - netlink only when used (see the imports)
        check_ifname(tap, field="id")
        netns = self.settings.netns

        def write(value: int) -> int:
            with route() as ipr:
                return bridgeports.set_port_mtu(ipr, tap, value, field=field)

        before = await run_in_netns(netns, lambda: write(mtu))
        log.info("tap %s: MTU %d (was %d)", tap, mtu, before)

        async def restore() -> None:
            await run_in_netns(netns, lambda: write(before))

        return restore

    async def set_vlan(self, tap: str, vlan: Vlan | None) -> Callable[[], Awaitable[object]]:
        """Set the VLANs of ``tap``'s port (``None``: the bridge's default); returns the undo.

        Raises:
            Unsupported: The tap is on no bridge, or the bridge does not filter VLANs.
            NotFound: No such tap.
        """
        from qmpnet.adapters.hostnet import bridgeports  # noqa: PLC0415 - netlink only when used (see the imports)
        from qmpnet.adapters.hostnet.links import route  # noqa: PLC0415 - netlink only when used (see the imports)
        from qmpnet.adapters.hostnet.netns import run_in_netns  # noqa: PLC0415 - netlink only when used (see the imports)
        check_ifname(tap, field="id")
        netns = self.settings.netns

        def write() -> bridgeports.PortVlans:
            with route() as ipr:
                return bridgeports.write_vlans(ipr, tap, vlan)

        before = await run_in_netns(netns, write)

        async def restore() -> None:
            def rewrite() -> None:
                with route() as ipr:
                    bridgeports.restore_vlans(ipr, tap, before)

            await run_in_netns(netns, rewrite)

        return restore

    async def set_shape(self, tap: str, shape: Shape | None) -> Callable[[], Awaitable[object]]:
        """Shape ``tap`` (``None``: no shaping); returns the action that restores its old shaping.

        Raises:
            Unsupported: The kernel lacks tbf, netem, ifb or mirred.
            Conflict: The tap carries qdiscs qmpnet did not make.
            NotFound: No such tap.
        """
        from qmpnet.adapters.hostnet import shaping  # noqa: PLC0415 - netlink only when used (see the imports)
        from qmpnet.adapters.hostnet.links import find_link, route  # noqa: PLC0415 - netlink only when used (see the imports)
        from qmpnet.adapters.hostnet.netns import run_in_netns  # noqa: PLC0415 - netlink only when used (see the imports)
        check_ifname(tap, field="id")
        netns = self.settings.netns
        layout = shaping.layout_of(shape, latency=self.settings.shape_latency)

        def write(wanted: shaping.TcLayout | None) -> shaping.TcLayout | None:
            with route() as ipr:
                link = find_link(ipr, tap)
                if link is None:
                    raise NotFound(f"id: the NIC's tap {tap} no longer exists on this host", field="id")
                return shaping.replace_layout(ipr, link, wanted)

        before = await run_in_netns(netns, lambda: write(layout))
        log.info("tap %s: shaping %s", tap, shape.options() if shape is not None else "removed")

        async def restore() -> None:
            await run_in_netns(netns, lambda: write(before))

        return restore


    # ------------------------------------------------------------------------------------------- anti-spoofing

    async def set_filter(
        self, tap: str, mac: str, wanted: NicFilter | None, *, before: NicFilter | None = None
    ) -> Callable[[], Awaitable[object]]:
        """Give ``tap`` the anti-spoofing rules of ``wanted`` for MAC ``mac`` (``None``: no rules), atomically.

        Returns the action that puts back the rules of ``before`` (what the caller knows the tap had).

        Raises:
            Unsupported: ``nft`` is missing or the kernel lacks nftables' bridge family.
            QmpnetError: nft refused the rules (its message is included).
        """
        from qmpnet.adapters.hostnet.netns import run_in_netns  # noqa: PLC0415 - netlink only when used (see the imports)
        check_ifname(tap, field="id")
        netns = self.settings.netns

        async def write(rules: NicFilter | None) -> None:
            script = antispoof.replace_script(tap, mac, rules) if rules is not None else antispoof.remove_script(tap)
            await run_in_netns(netns, lambda: nftables.apply(script, nft=self.settings.nft,
                                                             timeout=self.settings.tool_timeout))

        await write(wanted)
        log.info("tap %s: anti-spoofing %s", tap, wanted.model_dump(mode="json") if wanted else "removed")

        async def restore() -> None:
            await write(before)

        return restore

    async def sweep_filters(self) -> list[str]:
        """Remove the anti-spoofing rules of taps that no longer exist; returns their names (none without nft).

        Raises:
            QmpnetError: nft failed.
        """
        from qmpnet.adapters.hostnet.netns import run_in_netns  # noqa: PLC0415 - netlink only when used (see the imports)
        nft, timeout = self.settings.nft, self.settings.tool_timeout

        def sweep() -> list[str]:
            try:
                filtered = antispoof.filtered_taps(nft=nft, timeout=timeout)
            except Unsupported:
                return []  # no nft or no nftables: there can be no rules to sweep
            if not filtered:
                return []  # the usual case: no filter anywhere, and no netlink (pyroute2) loaded to find that out
            from qmpnet.adapters.hostnet.links import dump_links, route  # noqa: PLC0415 - see the imports

            with route() as ipr:
                present = {link.name for link in dump_links(ipr)}
            gone = sorted(filtered - present)
            if gone:
                nftables.apply("".join(antispoof.remove_script(tap) for tap in gone), nft=nft, timeout=timeout)
            return gone

        gone = await run_in_netns(self.settings.netns, sweep)
        if gone:
            log.info("removed the anti-spoofing rules of taps that are gone: %s", ", ".join(gone))
        return gone


#: Where the links of this process's network namespace are listed (procfs is per namespace, sysfs per mount).
_PROC_NET_DEV = Path("/proc/self/net/dev")
_SYS_CLASS_NET = Path("/sys/class/net")
#: The aliases of what a sweep deletes: ``links.tap_mark(owner)`` and ``links.ifb_mark(...)`` (links imports
#: pyroute2, so the prefixes are repeated here; a unit test keeps them equal).
TAP_MARK_PREFIX = "qmpnet:tap:"
IFB_MARK_PREFIX = "qmpnet:ifb:"


def _marked_links(owner_prefix: str) -> bool:
    """Whether a link may need sweeping: a tap marked for an owner under ``owner_prefix``, or an IFB qmpnet made.

    Reads the aliases from sysfs. When sysfs does not list exactly this namespace's links (a namespace entered
    without remounting sysfs), or cannot be read, the answer is ``True``: the full netlink sweep then decides.
    """
    try:
        lines = _PROC_NET_DEV.read_text().splitlines()[2:]
        names = {line.partition(":")[0].strip() for line in lines}
        if names != {path.name for path in _SYS_CLASS_NET.iterdir() if path.is_dir()}:  # not bonding_masters
            return True
        aliases = [(_SYS_CLASS_NET / name / "ifalias").read_text().strip() for name in names]
    except OSError:
        return True
    return any(alias.startswith((TAP_MARK_PREFIX + owner_prefix, IFB_MARK_PREFIX)) for alias in aliases)
