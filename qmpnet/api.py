"""Direct mode: ``async with qmpnet.connect(address) as guest`` on a guest's QMP socket.

This is the composition root for one guest: it builds the QMP adapter, wraps it in a :class:`Guest` and closes
both on exit. The MQTT controller composes the same pieces for many guests.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from qmpnet.guest import Guest
from qmpnet.hostnet.host import HostNet
from qmpnet.qmp import QmpMonitor
from qmpnet.settings import Settings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

__all__ = ["connect"]


@asynccontextmanager
async def connect(address: str, *, name: str | None = None, settings: Settings | None = None) -> AsyncIterator[Guest]:
    """Connect to the QMP monitor at ``address`` (a unix socket path or ``host:port``).

    Waits for QEMU's greeting and capabilities negotiation (``qmp.connect_timeout``).

    Yields:
        The guest, ready for ``add_nic``, ``remove_nic``, ``set_link``, ``list_nics`` and ``models``.

    Raises:
        GuestUnavailable: Nothing answers at ``address``.
    """
    settings = settings or Settings()
    guest_name = name or address
    monitor = await QmpMonitor.connect(
        address,
        name=guest_name,
        connect_timeout=settings.qmp.connect_timeout,
        command_timeout=settings.qmp.command_timeout,
    )
    try:
        host = HostNet(settings.hostnet)
        async with Guest(monitor, name=guest_name, settings=settings, host=host) as guest:
            yield guest
    finally:
        await monitor.close()
