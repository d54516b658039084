"""Stuck unplugs: which pending removals have waited too long, and what the operator can do about them (pure).

``device_del`` only asks the guest OS; a guest that runs no OS, has no ACPI/PCIe hotplug driver, or hangs never
answers, and the NIC stays ``removal_pending`` for good. Sending ``device_del`` again does not help (QEMU refuses
it while the first request is in progress: "already in the process of unplug"), which is why a repeated ``nic/del``
only reports the pending state. What helps is the operator: once a removal has been pending for
``unplug.stuck_after`` seconds, it is reported as ``unplug_stuck``, once, with the advice below.

The clock starts when QEMU accepted the request (:attr:`NicRecord.pending_since`, kept in the state store, so a
restart neither resets it nor tells twice: :attr:`NicRecord.stuck_reported`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from qmpnet.core.records import GuestRecord, NicRecord

__all__ = ["StuckCheck", "check_stuck", "stuck_advice"]


# A NamedTuple, not a frozen dataclass: a value every process that connects defines, and a NamedTuple is
# defined in a fifth of the instructions (docs/performance.md).
class StuckCheck(NamedTuple):
    """The pending removals of one guest against the clock.

    Attributes:
        due: Pending for ``after`` seconds or longer and not told yet, oldest first.
        next_at: When the next one not due yet will be (Unix time); ``None`` when none is waiting.
    """

    due: tuple[NicRecord, ...]
    next_at: float | None


def check_stuck(record: GuestRecord, *, now: float, after: float) -> StuckCheck:
    """Which of ``record``'s pending removals are stuck at ``now`` (pending ``after`` seconds), and the next one."""
    due: list[NicRecord] = []
    upcoming: list[float] = []
    for nic in record.nics.values():
        if nic.state != "removal_pending" or nic.pending_since is None or nic.stuck_reported is not None:
            continue
        at = nic.pending_since + after
        if at <= now:
            due.append(nic)
        else:
            upcoming.append(at)
    due.sort(key=lambda nic: (nic.pending_since or 0.0, nic.id))
    return StuckCheck(due=tuple(due), next_at=min(upcoming, default=None))


def stuck_advice(nic_id: str, waited: float) -> str:
    """What the operator is told about NIC ``nic_id``'s unplug, pending for ``waited`` seconds."""
    return (
        f"NIC {nic_id}: the guest has not acknowledged its unplug for {waited:.0f} s (no OS running, no ACPI or "
        "PCIe hotplug driver loaded in the guest, its driver busy, or the guest hung). Repeating nic/del does not "
        "help: QEMU refuses a second device_del while this one is in progress. Check the guest (dmesg: acpiphp, "
        "pciehp), or reset it (a reboot from inside, or QMP system_reset): QEMU completes pending unplugs on reset, "
        "and qmpnet then finishes the removal (netdev, host side) by itself."
    )
