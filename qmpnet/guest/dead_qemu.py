"""A QEMU that is gone for good: give back the host side its NICs held.

A guest's NICs live in its QEMU process, but some of what qmpnet made for them lives on the host: a passt (still
listening on its forwarded ports), a PCI function bound to vfio-pci, the nftables filter of a tap whose name the
kernel hands out again. When QEMU restarts on the same socket, recovery tells the new instance from the old one and
releases these (:mod:`qmpnet.core.recovery_plan`, ``forget``). A QEMU that is killed and never started again would
keep them for good, so the record also names the QEMU *process* (its pid and start time, read from the QMP unix
socket's peer at each full recovery) and whoever next fails to reach the guest checks it: the CLI and the direct
API when their connect fails, ``qmpnet serve`` after each failed attempt. If that process no longer runs, each
NIC's host side is released as a removal would (:mod:`.host_release`) and the NIC records are dropped; the
desired set, the operations and their outcomes stay. A QEMU over TCP, or one whose pid could not be read, is never
judged gone.

This runs with no connection, so outside any lane: the caller holds the guest's record (the state store's lock),
which is what keeps a second process from doing the same at once.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from qmpnet.core.ports import HostProcess
from qmpnet.guest.host_release import release_host_side

if TYPE_CHECKING:
    from qmpnet.core.ports import GuestStore, HostNetwork

__all__ = ["release_if_gone"]

log = logging.getLogger(__name__)


async def release_if_gone(store: GuestStore, host: HostNetwork | None, guest: str) -> list[str]:
    """If the QEMU named in ``store``'s record has gone, release its NICs' host side; the ids of those NICs.

    Raises:
        StoreUnavailable: The record could not be written (the host side is released all the same; the next
            attempt finds nothing left to release).
    """
    record = store.record
    if host is None or record.qemu_pid is None or record.qemu_started is None or not record.nics:
        return []
    if host.running(HostProcess(record.qemu_pid, record.qemu_started)):
        return []
    released = sorted(record.nics)
    log.warning("guest %s: its QEMU (pid %d) is gone: releasing the host side of NIC(s) %s", guest, record.qemu_pid,
                ", ".join(released))
    for nic_id in released:
        await release_host_side(host, record.nics[nic_id], guest)
    store.save(record.model_copy(
        update={"nics": {}, "links": {}, "instance": None, "qemu_pid": None, "qemu_started": None}
    ))
    return released
