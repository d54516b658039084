"""Giving back the host side of a NIC: its tap and its filter, its passt, its PCI function.

Two callers: the cleanup of a NIC whose device and backend are gone (:mod:`.unplugs`: removal, recovery) and the
release of everything a QEMU that is gone for good still held (:mod:`.dead_qemu`). Failures are logged, never
raised: what can be given back is, whatever else refuses.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from qmpnet.core.ports import HostProcess
from qmpnet.errors import QmpnetError

if TYPE_CHECKING:
    from qmpnet.core.ports import HostNetwork
    from qmpnet.core.records import NicRecord

__all__ = ["release_host_side"]

log = logging.getLogger(__name__)


async def release_host_side(host: HostNetwork, nic: NicRecord, guest: str) -> None:
    """Delete ``nic``'s tap and its filter, end its passt, give its PCI function back; failures are logged."""
    hold = nic.host
    if hold.empty and hold.passt_socket is None:
        return
    try:
        if hold.tap is not None:
            await host.delete_tap(hold.tap)
        if hold.tap is not None and nic.spec is not None and nic.spec.filter is not None:
            await host.set_filter(hold.tap, nic.spec.mac or "", None)  # a new tap may get the name
        if hold.vfio_host is not None and hold.vfio_driver is not None:
            await host.restore_vfio(hold.vfio_host, hold.vfio_driver)
        if hold.passt_socket is not None:
            known = hold.passt_pid is not None and hold.passt_started is not None
            process = HostProcess(hold.passt_pid or 0, hold.passt_started or 0) if known else None
            await host.stop_passt(hold.passt_socket, process)
    except QmpnetError as err:
        log.warning("guest %s: releasing the host side of %s: %s", guest, nic.id, err)
