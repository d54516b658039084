"""Recovery decisions, as the table in qmpnet/core/recovery_plan.py states them (pure)."""

from __future__ import annotations

import pytest

from qmpnet.core.model import NicSpec
from qmpnet.core.records import GuestRecord, NicRecord, RecordState
from qmpnet.core.recovery_plan import plan_recovery


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
