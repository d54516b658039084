"""The host side as the guest lane sees it: one object implementing :class:`qmpnet.ports.HostNetwork`.

It binds the free functions of this package to the operator's settings (namespace, tap pattern, NAT networks,
sysfs root), so the lane only says *what* it needs (a tap on ``br0`` for NIC ``vm1/virtio0``) and never *where*.
Blocking sysfs work runs in a thread.
"""

from __future__ import annotations

import asyncio
import logging

from qmpnet.hostconfig import HostnetSettings
from qmpnet.hostnet.nat import net_up
from qmpnet.hostnet.taps import Tap, check_existing_tap, create_tap, delete_tap, list_taps, vhost_usable
from qmpnet.hostnet.vfio import bind_vfio, check_vfio, restore_driver

__all__ = ["HostNet"]

log = logging.getLogger(__name__)


class HostNet:
    """Host networking configured by :class:`HostnetSettings`."""

    def __init__(self, settings: HostnetSettings | None = None) -> None:
        self.settings = settings or HostnetSettings()

    async def create_tap(self, bridge: str, *, queues: int, owner: str) -> Tap:
        """Make a tap on ``bridge`` with ``queues`` open queue fds, marked as ``owner``'s."""
        return await create_tap(
            bridge, pattern=self.settings.tap_pattern, queues=queues, netns=self.settings.netns, owner=owner
        )

    async def delete_tap(self, name: str) -> None:
        """Delete tap ``name`` if it is still there (it normally leaves with QEMU's fd)."""
        await delete_tap(name, netns=self.settings.netns)

    async def nat_bridge(self, network: str) -> str:
        """Bring NAT network ``network`` up (idempotent) and return its bridge."""
        net = self.settings.network(network)
        await net_up(net, netns=self.settings.netns, settings=self.settings)
        return net.bridge

    async def check_tap(self, ifname: str) -> None:
        """Check that ``ifname`` is an existing tap nobody holds."""
        await check_existing_tap(ifname, netns=self.settings.netns)

    def vhost(self) -> bool:
        """Whether ``/dev/vhost-net`` can be used."""
        return vhost_usable()

    async def prepare_vfio(self, host: str, *, rebind: bool) -> str | None:
        """Check ``host`` for assignment; with ``rebind`` bind it to vfio-pci and return the original driver.

        Returns ``None`` when nothing was changed, ``""`` when the function had no driver before.
        """
        device = await asyncio.to_thread(check_vfio, host, rebind=rebind, sysfs=self.settings.sysfs_root)
        if not device.needs_rebind:
            return None
        original = await asyncio.to_thread(bind_vfio, host, sysfs=self.settings.sysfs_root)
        return original or ""  # "" = it had no driver: still undo the rebind (driver_override) afterwards

    async def restore_vfio(self, host: str, driver: str) -> None:
        """Give ``host`` back to ``driver`` (``""``: leave it unbound, without the vfio-pci override)."""
        await asyncio.to_thread(restore_driver, host, driver or None, sysfs=self.settings.sysfs_root)

    async def sweep_orphans(self, owner_prefix: str, keep: set[str]) -> list[str]:
        """Delete qmpnet's taps whose owner starts with ``owner_prefix`` and is not in ``keep``.

        The controller calls this when a guest (re)connects, with the owners of the NICs the guest has: a tap made
        for a NIC that no longer exists (a controller that died between ``getfd`` and ``netdev_add`` leaves one
        held by QEMU's fd table) is removed; taps of other guests are never touched.
        """
        taps = await list_taps(pattern=self.settings.tap_pattern, netns=self.settings.netns)
        stale = [t.name for t in taps if (t.owner or "").startswith(owner_prefix) and t.owner not in keep]
        deleted = [name for name in stale if await delete_tap(name, netns=self.settings.netns)]
        if deleted:
            log.info("swept taps of NICs that no longer exist: %s", ", ".join(deleted))
        return deleted
