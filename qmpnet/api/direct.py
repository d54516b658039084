"""Direct mode: ``async with qmpnet.connect(address) as guest`` on a guest's QMP socket.

This is the composition root for one guest: it takes the guest's record in the state store (``state_dir``; the
lock keeps other qmpnet processes off the guest meanwhile), builds the QMP adapter, wraps both in a
:class:`Guest` (which recovers the guest from its record on entry) and releases everything on exit. The MQTT
controller composes the same pieces for many guests.

Both waits are bounded by ``qmp.connect_timeout``: another qmpnet process holding the guest, then another QMP
client holding the monitor (QEMU serves one at a time); past it the answer is ``busy``, naming who holds it.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from qmpnet.adapters.hostnet.host import HostNet
from qmpnet.adapters.qmp import QmpMonitor
from qmpnet.adapters.store import StateDir
from qmpnet.errors import GuestUnavailable
from qmpnet.guest.dead_qemu import release_if_gone
from qmpnet.guest.guest import Guest
from qmpnet.settings import Settings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

__all__ = ["connect"]


@asynccontextmanager
async def connect(
    address: str, *, name: str | None = None, settings: Settings | None = None, qga: str | None = None
) -> AsyncIterator[Guest]:
    """Connect to the QMP monitor at ``address`` (a unix socket path or ``host:port``).

    ``qga`` is the guest agent's socket; without it qmpnet looks for one (``query-chardev`` and the
    virtserialport named ``org.qemu.guest_agent.0``). An agent gives ``list_nics`` the guest's own view of each NIC
    and makes ``verify=`` possible.

    Waits for the guest's lock in the state store and for QEMU's greeting, together at most
    ``qmp.connect_timeout`` seconds, then recovers the guest from its record.

    Yields:
        The guest, ready for ``add_nic``, ``remove_nic``, ``set_link``, ``list_nics``, ``models`` and ``slots``.

    When nothing answers and the QEMU process the guest's record names has gone, the host side of its NICs (passts,
    PCI functions, tap filters) is given back first (:mod:`qmpnet.guest.dead_qemu`); the error then says so.

    Raises:
        GuestUnavailable: Nothing answers at ``address``.
        Busy: Another qmpnet process or another QMP client kept the guest for the whole connect timeout.
        StoreUnavailable: The state directory cannot be written.
    """
    settings = settings or Settings()
    guest_name = name or address
    timeout = settings.qmp.connect_timeout
    started = time.monotonic()
    state = StateDir(settings.state_dir, boot_id_file=settings.boot_id_file)
    store = await state.open_guest(address, guest_name, wait=timeout)
    try:
        remaining = max(timeout - (time.monotonic() - started), 0.001)
        host = HostNet(settings.hostnet)
        try:
            monitor = await QmpMonitor.connect(
                address,
                name=guest_name,
                connect_timeout=remaining,
                command_timeout=settings.qmp.command_timeout,
                read_attempts=settings.qmp.read_attempts,
            )
        except GuestUnavailable as err:
            released = await release_if_gone(store, host, guest_name)
            if released:
                raise GuestUnavailable(f"{err.message}; its QEMU is gone: qmpnet gave back the host side of NIC(s) "
                                       f"{', '.join(released)}") from err
            raise
        try:
            async with Guest(monitor, name=guest_name, settings=settings, host=host, store=store, qga=qga) as guest:
                yield guest
        finally:
            await monitor.close()
    finally:
        store.close()
