"""A QEMU gone for good: the host side its NICs held is given back, once, and only when its process is gone."""

from __future__ import annotations

import pytest
from fakehost import PortsHost

from qmpnet.adapters.store.files import MemoryGuestStore
from qmpnet.core.model import NicSpec
from qmpnet.core.ports import HostProcess
from qmpnet.core.records import DesiredSet, GuestRecord, HostHold, NicRecord
from qmpnet.guest.dead_qemu import release_if_gone

QEMU_PID, STARTED = 4321, 987654


def _record(*, pid: int | None = QEMU_PID) -> GuestRecord:
    tapped = NicRecord(
        id="t0", spec=NicSpec.model_validate({"id": "t0", "mac": "52:54:00:00:00:01", "backend": {
            "type": "bridge", "bridge": "br-a"}, "filter": {"mac": True}}),
        netdev="t0.net", state="active", link="up", host=HostHold(owner="g/t0", tap="vnet7", bridge="br-a"),
    )
    assigned = NicRecord(
        id="v0", spec=None, netdev=None, state="active", link="up",
        host=HostHold(owner="g/v0", vfio_host="0000:01:00.0", vfio_driver="e1000e"),
    )
    passt = NicRecord(
        id="p0", spec=None, netdev="p0.net", state="removal_pending", link="up",
        host=HostHold(owner="g/p0", passt_socket="/run/p/p0.sock", passt_pid=55, passt_started=66),
    )
    record = GuestRecord(address="/run/vm.qmp", name="vm", instance="i1", qemu_pid=pid, qemu_started=STARTED,
                         desired=DesiredSet(generation=3, nics=[NicSpec(id="t0")]))
    for nic in (tapped, assigned, passt):
        record = record.with_nic(nic)
    return record


async def test_the_nics_of_a_gone_qemu_give_back_their_host_side_and_leave_the_record() -> None:
    store, host = MemoryGuestStore(_record()), PortsHost()
    assert await release_if_gone(store, host, "vm") == ["p0", "t0", "v0"]
    assert host.calls == [
        ("stop_passt", "/run/p/p0.sock", HostProcess(55, 66)),
        ("delete_tap", "vnet7"),
        ("set_filter", "vnet7", "52:54:00:00:00:01", None),  # the kernel may give the tap's name to another
        ("restore_vfio", "0000:01:00.0", "e1000e"),
    ]
    record = store.record
    assert (record.nics, record.links, record.instance, record.qemu_pid) == ({}, {}, None, None)
    assert record.desired is not None  # what the guest should have outlives its QEMU
    assert record.desired.generation == 3
    # Once released, nothing is left: a second look does nothing.
    host.calls.clear()
    assert await release_if_gone(store, host, "vm") == []
    assert host.calls == []


async def test_a_running_qemu_keeps_everything() -> None:
    store, host = MemoryGuestStore(_record()), PortsHost(processes={QEMU_PID: STARTED})
    assert await release_if_gone(store, host, "vm") == []
    assert (host.calls, store.saves, set(store.record.nics)) == ([], 0, {"t0", "v0", "p0"})


async def test_a_recycled_pid_is_not_taken_for_the_qemu() -> None:
    store, host = MemoryGuestStore(_record()), PortsHost(processes={QEMU_PID: STARTED + 1})
    assert await release_if_gone(store, host, "vm") == ["p0", "t0", "v0"]


@pytest.mark.parametrize("no_host", [True, False])
async def test_without_a_named_process_or_a_host_nothing_is_judged_gone(no_host: bool) -> None:
    store = MemoryGuestStore(_record(pid=QEMU_PID if no_host else None))
    host = PortsHost()
    assert await release_if_gone(store, None if no_host else host, "vm") == []
    assert (host.calls, store.saves) == ([], 0)
