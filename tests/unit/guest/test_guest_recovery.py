"""Recovery through the real QMP adapter against the fake monitor: what a killed process left is finished or undone.

Each test writes the record a killed qmpnet process would have left, shapes the fake QEMU as it would be, then
connects like any new process and checks both what was sent and that nothing extra is left.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from fakeqmp import Command, FakeQmp
from waiting import eventually

import qmpnet
from qmpnet.adapters.hostnet.processes import start_time
from qmpnet.adapters.store import StateDir, files
from qmpnet.adapters.store.reading import newest_json
from qmpnet.core.model import GuestEvent, NicSpec
from qmpnet.core.records import GuestRecord, HostHold, NicRecord, OperationRecord

if TYPE_CHECKING:
    from collections.abc import Sequence

    from qmpnet.settings import Settings


async def leave(settings: Settings, fake: FakeQmp, *nics: NicRecord, instance: str = "fake-instance-1") -> None:
    """Write the record a killed process would have left for the fake's guest."""
    store = await StateDir(settings.state_dir).open_guest(str(fake.path), str(fake.path), wait=1)
    try:
        record = GuestRecord(address=str(fake.path), name=str(fake.path), instance=instance, boot=store.record.boot)
        for nic in nics:
            record = record.with_nic(nic)
        store.save(record)
    finally:
        store.close()


def nic(nic_id: str, state: str, *, netdev: str | None = None, link: str = "up") -> NicRecord:
    return NicRecord.model_validate({
        "id": nic_id, "spec": NicSpec(id=nic_id).model_dump(), "netdev": netdev or f"{nic_id}.net", "state": state,
        "link": link,
    })


async def test_an_add_killed_between_netdev_add_and_device_add_leaves_nothing(fake: FakeQmp, fast: Settings) -> None:
    await fake.handlers["netdev_add"]({"id": "x1.net", "type": "user"})  # what the killed process got done
    await leave(fast, fake, nic("x1", "adding"))
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        assert fake.changes() == [Command("netdev_del", {"id": "x1.net"})]
        assert guest.record.nics == {}
        assert "x1.net" not in fake.network
        # The id is free again, and nothing of the old attempt is listed.
        assert "x1" not in {n.id for n in await guest.list_nics()}
        added = await guest.add_nic({"id": "x1"})
        assert added.id == "x1"


async def test_a_removal_acked_after_its_process_left_is_finished(fake: FakeQmp, fast: Settings) -> None:
    # `nic del e1 --timeout 0` answered removal_pending and exited; the guest acked later, nobody listened.
    fake.forget_device("e1")
    await leave(fast, fake, nic("e1", "removal_pending", netdev="n1"))
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        assert fake.changes() == [Command("netdev_del", {"id": "n1"})]
        assert guest.record.nics == {}
        assert "n1" not in fake.network
        # The user's second `nic del` is told it is done, not that the NIC never existed.
        assert (await guest.remove_nic("e1")).state == "removed"
    assert fake.change_names() == ["netdev_del"]


async def test_link_intent_is_reapplied_and_listed(fake: FakeQmp, fast: Settings) -> None:
    await fake.handlers["netdev_add"]({"id": "x1.net", "type": "user"})
    await fake.handlers["device_add"]({"driver": "e1000", "id": "x1", "netdev": "x1.net", "mac": "52:54:00:00:00:77",
                                       "bus": "pci.0", "addr": "05.0"})
    await leave(fast, fake, nic("x1", "active", link="down"))
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        assert fake.changes() == [Command("set_link", {"name": "x1", "up": False})]
        listed = {n.id: n for n in await guest.list_nics()}
        assert listed["x1"].link == "down"
        assert listed["e1"].link == "up"


async def test_link_intents_are_reapplied_at_once_not_one_round_trip_each(fake: FakeQmp, fast: Settings) -> None:
    ids = [f"x{n}" for n in range(1, 5)]
    for n, nic_id in enumerate(ids):
        await fake.handlers["netdev_add"]({"id": f"{nic_id}.net", "type": "user"})
        await fake.handlers["device_add"]({"driver": "e1000", "id": nic_id, "netdev": f"{nic_id}.net",
                                           "mac": f"52:54:00:00:00:7{n}", "bus": "pci.0", "addr": f"{n + 0x10:02x}.0"})
    await leave(fast, fake, *(nic(nic_id, "active", link="down") for nic_id in ids))
    fake.hang("set_link")  # QEMU never answers: only what was sent before the first answer is recorded
    with pytest.raises(qmpnet.OutcomeUnknown):
        async with qmpnet.connect(str(fake.path), settings=fast):
            pass
    assert fake.changes() == [Command("set_link", {"name": nic_id, "up": False}) for nic_id in ids]


async def test_a_cold_plugged_nic_keeps_its_link_intent_across_processes(fake: FakeQmp, fast: Settings) -> None:
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        await guest.set_link("e1", up=False)
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        assert {n.id: n.link for n in await guest.list_nics()}["e1"] == "down"
    assert fake.changes() == [Command("set_link", {"name": "e1", "up": False})] * 2  # set, then re-applied


async def test_a_pending_removal_is_asked_again_after_a_reconnect(fake: FakeQmp, fast: Settings) -> None:
    await leave(fast, fake, nic("e1", "removal_pending", netdev="n1"))
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        assert fake.changes() == [Command("device_del", {"id": "e1"})]
        assert {n.id: n.state for n in await guest.list_nics()}["e1"] == "removal_pending"
        await fake.emit_many(list(fake.unplug_events("e1")))
        assert (await guest.remove_nic("e1", timeout=5)).state == "removed"
        assert fake.changes()[-1] == Command("netdev_del", {"id": "n1"})
        assert guest.record.nics == {}


async def test_a_restarted_qemu_is_a_new_instance_whose_old_nics_are_forgotten(fake: FakeQmp, fast: Settings) -> None:
    # The record is of the QEMU that ran before; this one has a cold-plugged e1 of its own with the same id.
    await leave(fast, fake, nic("e1", "active", link="down"), nic("x9", "removal_pending"), instance="old-qemu")
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        assert fake.changes() == []  # nothing of the new QEMU is touched: those devices are not qmpnet's
        assert guest.record.nics == {}
        assert guest.record.instance == "fake-instance-1"
        assert {n.id: n.link for n in await guest.list_nics()}["e1"] == "up"


async def test_a_fresh_qemu_gets_an_instance_mark(fake: FakeQmp, fast: Settings) -> None:
    fake.objects.clear()
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        assert fake.change_names() == ["object-add"]
        mark = fake.objects["qmpnet-instance"]
        assert mark[0] == "authz-simple"
        assert guest.record.instance == mark[1]["identity"]
    async with qmpnet.connect(str(fake.path), settings=fast):
        pass
    assert fake.change_names() == ["object-add"]  # the second process recognises the same instance


async def test_the_record_names_the_qemu_process_behind_the_socket(fake: FakeQmp, fast: Settings) -> None:
    # The fake QEMU serves from this very process: its peer credentials name it.
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        assert guest.record.qemu_pid == os.getpid()
        assert guest.record.qemu_started == start_time(os.getpid())
        assert guest.record.qemu_started is not None


async def test_a_nic_another_client_unplugs_leaves_with_an_event_and_its_backend(fake: FakeQmp, fast: Settings) -> None:
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        events: list[GuestEvent] = []
        guest.subscribe(events.append)
        ours = await guest.add_nic({"id": "x1"})
        before = len(fake.changes())
        await fake.emit_many(list(fake.unplug_events("x1")))  # another QMP client's device_del, acked
        await fake.wait_for_command("netdev_del")
        assert fake.changes()[before:] == [Command("netdev_del", {"id": f"{ours.id}.net"})]
        await fake.emit_many(list(fake.unplug_events("e1")))  # and a cold-plugged NIC qmpnet never owned
        await eventually(lambda: [e.id for e in events if e.name == "nic_removed"] == ["x1", "e1"])
        listed = {n.id for n in await guest.list_nics()}
        assert "x1" not in listed
        assert "e1" not in listed
        assert guest.record.nics == {}
        assert [(e.name, e.id) for e in events if e.name == "nic_removed"] == [("nic_removed", "x1"),
                                                                              ("nic_removed", "e1")]
    assert "n1" not in [c.arguments.get("id") for c in fake.changes()]  # not qmpnet's netdev: never touched


async def test_an_add_records_its_spec_and_host_hold_before_qemu_sees_it(fake: FakeQmp, fast: Settings) -> None:
    seen: list[GuestRecord] = []
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:

        async def netdev_add(arguments: dict[str, object]) -> object:
            seen.append(guest.record)  # what is on disk when QEMU gets the first command
            return {}

        fake.on("netdev_add", netdev_add)
        nic_ = await guest.add_nic({"model": "e1000", "link": "down"})
        recorded = guest.record.nics[nic_.id]
    assert seen[0].nics[nic_.id].state == "adding"
    assert recorded.state == "active"
    assert recorded.spec is not None
    assert (recorded.spec.mac, recorded.spec.bus, recorded.spec.addr) == (nic_.mac, "pci.0", "04.0")
    assert recorded.link == "down"
    assert recorded.host == HostHold()
    operation = guest.record.operations[recorded.operation or ""]
    assert operation.outcome is not None
    assert operation.outcome["status"] == "ok"


async def test_a_hot_add_writes_once_before_its_answer_and_never_syncs_the_record(
    fake: FakeQmp, fast: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[tuple[str, bool]] = []
    write_slot = files._write_slot

    def counted_slot(path: str, data: Sequence[bytes], size: int | None, *, sync: bool = False) -> None:
        writes.append((Path(path).name, sync))
        write_slot(path, data, size, sync=sync)

    monkeypatch.setattr(files, "_write_slot", counted_slot)
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        writes.clear()
        before = len(fake.changes())
        added = await guest.add_nic({"id": "h1"}, operation="t-h1")
        # One write before the answer: the intent (operation + NIC `adding`), not fsync'd, before any QMP command.
        assert [sync for _, sync in writes] == [False]
        assert fake.change_names()[before:] == ["netdev_add", "device_add"]
        key = writes[0][0].rpartition(".record-")[0]
        on_disk = GuestRecord.model_validate_json(newest_json(fast.state_dir / "guests", key) or b"")
        assert on_disk.nics["h1"].state == "adding"
        assert on_disk.operations["t-h1"].outcome is None
        # After the answer: the outcome (the record, not synced), the desired set (synced) in a worker thread.
        await eventually(lambda: len(writes) == 3)
        assert sorted(writes) == sorted([(f"{key}.record-a", False), (f"{key}.record-b", False),
                                         (f"{key}.desired-a", True)])
        assert guest.operation("t-h1") is not None
        assert guest.record.nics["h1"].state == "active"
        assert added.id == "h1"


async def test_an_add_whose_outcome_a_kill_lost_is_answered_as_it_was(fake: FakeQmp, fast: Settings) -> None:
    # The killed process had its answer out; its outcome was still to be written: the record says `adding`.
    await fake.handlers["netdev_add"]({"id": "k1.net", "type": "user"})
    await fake.handlers["device_add"]({"driver": "e1000", "id": "k1", "netdev": "k1.net", "mac": "52:54:00:00:00:78",
                                       "bus": "pci.0", "addr": "07.0"})
    added = nic("k1", "adding").model_copy(update={"operation": "t-k1"})
    store = await StateDir(fast.state_dir).open_guest(str(fake.path), str(fake.path), wait=1)
    try:
        store.save(store.record.model_copy(update={"instance": "fake-instance-1"}).with_nic(added).with_operation(
            OperationRecord(id="t-k1", op="nic/add", nic="k1", started=1.0)))
    finally:
        store.close()
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        operation = guest.operation("t-k1")
        assert operation is not None
        assert operation.outcome is not None
        assert operation.outcome["status"] == "ok"
        assert operation.outcome["data"]["id"] == "k1"
        assert operation.outcome["data"]["mac"] == "52:54:00:00:00:78"
        assert guest.record.nics["k1"].state == "active"
