"""Live capture of a NIC's traffic into a pcap file, with QEMU's ``filter-dump`` object on the NIC's netdev.

``filter-dump`` is a net filter: attached to a netdev it sees every frame between the NIC and its backend, in both
directions, whatever the backend is (user mode included, where the host has no interface to run tcpdump on), and
writes them to a pcap file that tcpdump and Wireshark read. Starting a capture is ``object-add``; stopping it is
``object-del``, which closes the file. The capture lives in QEMU under the id ``<nic>.capture``, so qmpnet keeps no
state for it: a capture started by a controller that restarted since can still be stopped, a second one on the same
NIC is refused by QEMU's duplicate id (``conflict``), and one whose NIC was removed went with its netdev.

QEMU before 8.1 writes the virtio-net header in front of every frame of a virtio NIC on a tap; stopping such a
capture repairs the file (:mod:`qmpnet.adapters.pcap`), so that tcpdump reads Ethernet frames whatever the QEMU.

QEMU creates (or truncates) the file with its own privileges: which paths a caller may give is policy
(``policy.allowed_capture_dirs``), checked before anything is sent.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Literal

from qmpnet.adapters.pcap import strip_vnet_headers
from qmpnet.core.model import CaptureResult, check_file_path
from qmpnet.core.policy import check_capture_file
from qmpnet.errors import Conflict, InvalidRequest, NotFound, QmpCommandError, Unsupported

if TYPE_CHECKING:
    from collections.abc import Mapping

    from qmpnet.core.model import Nic
    from qmpnet.core.policy import Policy
    from qmpnet.core.ports import Monitor

__all__ = ["capture_id", "check_capture", "run_capture", "start_capture", "stop_capture"]

log = logging.getLogger(__name__)


def capture_id(nic_id: str) -> str:
    """The QOM id of NIC ``nic_id``'s capture object."""
    return f"{nic_id}.capture"


def check_capture(action: str, file: str | None, policy: Policy) -> str | None:
    """Validate a capture request before anything is sent; returns the file for ``start``.

    Raises:
        InvalidRequest: An unknown action, or a missing or malformed file for ``start``.
        Forbidden: The file is outside the directories the policy allows.
    """
    if action not in ("start", "stop"):
        raise InvalidRequest(f"action: must be start or stop, not {action!r}", field="action")
    if action == "stop":
        return None
    if file is None:
        raise InvalidRequest("file: starting a capture needs the file to write", field="file")
    try:
        check_file_path(file)
    except ValueError as err:
        raise InvalidRequest(f"file: {err}", field="file") from err
    check_capture_file(file, policy)
    return file


async def start_capture(monitor: Monitor, nic: Nic, file: str) -> CaptureResult:
    """Make QEMU write every frame of ``nic`` into ``file`` (pcap) until :func:`stop_capture`.

    Raises:
        Unsupported: The NIC has no netdev (a vfio NIC).
        Conflict: The NIC is already being captured.
        QmpCommandError: QEMU refused, e.g. it cannot create the file.
        OutcomeUnknown, GuestUnavailable: As :meth:`Monitor.execute`.
    """
    if nic.netdev is None:
        raise Unsupported(f"id: NIC {nic.id} has no QEMU netdev to capture (an assigned device is the host's own)",
                          field="id")
    arguments = {"qom-type": "filter-dump", "id": capture_id(nic.id), "netdev": nic.netdev, "file": file}
    try:
        await monitor.execute("object-add", arguments)
    except QmpCommandError as err:
        if "duplicate" in err.message or "already" in err.message:
            raise Conflict(f"id: NIC {nic.id} is already being captured; stop that capture first", field="id") from err
        raise
    log.info("NIC %s: capturing into %s", nic.id, file)
    return CaptureResult(id=nic.id, state="capturing", file=file)


async def stop_capture(monitor: Monitor, nic_id: str, nic: Nic | None = None) -> CaptureResult:
    """End NIC ``nic_id``'s capture; QEMU closes the file. With the ``nic`` known, virtio-net headers are stripped.

    Raises:
        NotFound: No capture of that NIC is running.
        QmpCommandError, OutcomeUnknown, GuestUnavailable: As :meth:`Monitor.execute`.
    """
    object_id = capture_id(nic_id)
    try:
        file = await monitor.execute("qom-get", {"path": f"/objects/{object_id}", "property": "file"})
    except QmpCommandError as err:
        raise NotFound(f"id: no capture of NIC {nic_id} is running", field="id") from err
    await monitor.execute("object-del", {"id": object_id})
    log.info("NIC %s: capture into %s stopped", nic_id, file)
    path = file if isinstance(file, str) else None
    if path is not None and nic is not None and nic.mac and _may_carry_vnet_headers(nic):
        try:
            stripped = await asyncio.to_thread(strip_vnet_headers, path, nic.mac)
        except OSError as err:
            log.warning("NIC %s: could not strip the virtio-net headers from %s: %s", nic_id, path, err)
        else:
            if stripped:
                log.info("NIC %s: stripped the %d-byte virtio-net header QEMU left in %s", nic_id, stripped, path)
    return CaptureResult(id=nic_id, state="stopped", file=path)


def _may_carry_vnet_headers(nic: Nic) -> bool:
    """Only a virtio NIC whose backend is a tap exchanges virtio-net headers with it."""
    backend = nic.backend.type if nic.backend is not None else None
    return nic.model.startswith("virtio-net") and backend in ("tap", "bridge", "nat")


async def run_capture(
    monitor: Monitor, nics: Mapping[str, Nic], nic_id: str, action: Literal["start", "stop"], file: str | None
) -> CaptureResult:
    """Start or stop NIC ``nic_id``'s capture (``file`` already checked by :func:`check_capture`).

    Raises:
        NotFound: No such NIC (start), or no capture running (stop).
        Unsupported, Conflict, QmpCommandError, OutcomeUnknown, GuestUnavailable: As above.
    """
    if action == "stop":
        return await stop_capture(monitor, nic_id, nics.get(nic_id))
    nic = nics.get(nic_id)
    if nic is None:
        raise NotFound(f"id: no NIC {nic_id!r} in the guest", field="id")
    if file is None:
        raise InvalidRequest("file: starting a capture needs the file to write", field="file")
    return await start_capture(monitor, nic, file)
