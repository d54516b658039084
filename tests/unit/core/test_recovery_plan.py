"""Recovery decisions, as the table in qmpnet/core/recovery_plan.py states them (pure)."""

from __future__ import annotations

import pytest

from qmpnet.core.model import NicSpec
from qmpnet.core.records import (
    FORMAT_VERSION,
    DesiredSet,
    GuestRecord,
    NicRecord,
    OperationRecord,
    RecordState,
    migrated,
)
from qmpnet.core.recovery_plan import answered_by_recovery, plan_recovery


def record(*nics: tuple[str, RecordState], instance: str | None = "i1") -> GuestRecord:
    rec = GuestRecord(address="/run/vm1.qmp", name="vm1", instance=instance)
    for nic_id, state in nics:
        rec = rec.with_nic(NicRecord(id=nic_id, spec=NicSpec(id=nic_id), netdev=f"{nic_id}.net", state=state,
                                     link="up"))
    return rec


@pytest.mark.parametrize(
    ("state", "present", "full", "action"),
    [
        ("adding", True, False, "activate"),
        ("adding", False, False, "undo_add"),
        ("active", True, False, None),
        ("active", True, True, "relink"),
        ("active", False, False, "vanished"),
        ("removal_pending", True, False, None),
        ("removal_pending", True, True, "unplug"),
        ("removal_pending", False, False, "finish"),
        ("adding", True, True, "activate"),
        ("removal_pending", False, True, "finish"),
    ],
)
def test_the_table(state: RecordState, present: bool, full: bool, action: str | None) -> None:
    devices = {"a", "foreign"} if present else {"foreign"}
    steps = plan_recovery(record(("a", state)), instance="i1", devices=devices, full=full)
    assert [s.action for s in steps] == ([action] if action else [])


def test_a_pending_unplug_qemu_accepted_is_not_asked_again() -> None:
    # pending_since: QEMU accepted device_del and still has it in progress; another would be refused (or, on a
    # PCIe port, taken by the guest as a cancel). Without it the answer was lost, and asking again is safe.
    accepted = record(("a", "removal_pending"))
    accepted = accepted.with_nic(accepted.nics["a"].model_copy(update={"pending_since": 1.0}))
    assert plan_recovery(accepted, instance="i1", devices={"a"}, full=True) == []
    steps = plan_recovery(accepted, instance="i1", devices=set(), full=True)
    assert [s.action for s in steps] == ["finish"]  # acked while nobody listened: still finished


def test_a_new_instance_forgets_everything_and_touches_nothing_in_qemu() -> None:
    rec = record(("a", "active"), ("b", "removal_pending"), ("c", "adding"))
    steps = plan_recovery(rec, instance="i2", devices={"a", "b", "c"}, full=True)
    assert sorted((s.action, s.nic.id) for s in steps) == [("forget", "a"), ("forget", "b"), ("forget", "c")]


def test_an_unknown_instance_is_taken_as_the_recorded_one() -> None:
    steps = plan_recovery(record(("a", "active")), instance=None, devices={"a"}, full=True)
    assert [s.action for s in steps] == ["relink"]
    steps = plan_recovery(record(("a", "active"), instance=None), instance="i9", devices=set(), full=False)
    assert [s.action for s in steps] == ["vanished"]


def test_devices_without_a_record_are_never_touched() -> None:
    assert plan_recovery(record(), instance="i1", devices={"foreign", "rp1", "pcibr0"}, full=True) == []


def op(kind: str, nic: str | None = "a") -> OperationRecord:
    return OperationRecord(id="t1", op=kind, nic=nic, started=1.0)


@pytest.mark.parametrize(
    ("kind", "state", "made_by_it", "present", "answer"),
    [
        ("nic/add", "active", True, True, "a"),  # recovery activated what the killed add made
        ("nic/add", "active", False, True, None),  # a NIC of another operation answers nothing
        ("nic/add", "adding", True, True, None),  # not settled yet
        ("nic/add", None, True, False, None),  # undone: the add is interrupted
        ("nic/link", "active", False, True, "a"),  # recovery re-applied the intent
        ("nic/link", "removal_pending", False, True, None),
        ("nic/link", None, False, False, None),
        ("nic/del", None, False, False, "a"),  # finished: removed
        ("nic/del", "removal_pending", False, True, None),  # still pending
        ("nic/update", "active", True, True, None),  # not told by recovery
    ],
)
def test_an_operation_left_without_outcome_is_answered_only_by_what_recovery_settled(
    kind: str, state: RecordState | None, made_by_it: bool, present: bool, answer: str | None
) -> None:
    rec = record() if state is None else record(("a", state))
    if state is not None and made_by_it:
        rec = rec.with_nic(rec.nics["a"].model_copy(update={"operation": "t1"}))
    devices = {"a"} if present else set()
    assert answered_by_recovery(op(kind), rec, devices) == answer


def test_a_record_of_another_boot_keeps_only_its_desired_set() -> None:
    desired = DesiredSet(nics=[NicSpec(id="d1")])
    rec = record(("a", "active")).with_operation(op("nic/add")).model_copy(
        update={"boot": "b1", "desired": desired, "links": {"x": "down"}, "gone": {"g": 1.0}}
    )
    assert rec.for_boot("b1") is rec
    assert rec.for_boot(None) is rec  # the kernel does not tell: nothing is dropped
    after = rec.for_boot("b2")
    assert (after.boot, after.desired, after.address, after.name) == ("b2", desired, rec.address, rec.name)
    assert (after.nics, after.operations, after.links, after.gone, after.instance) == ({}, {}, {}, {}, None)


def test_a_version_1_document_is_migrated_to_this_boot_or_to_an_earlier_one() -> None:
    old = {"version": 1, "address": "/run/vm1.qmp", "name": "vm1", "nics": {}, "desired": None}
    assert migrated(old, boot="b1") == {**old, "version": FORMAT_VERSION, "boot": "b1"}
    earlier = GuestRecord.model_validate(migrated(old, boot=None))
    assert earlier.for_boot("b1").boot == "b1"
    assert earlier.boot != "b1"
