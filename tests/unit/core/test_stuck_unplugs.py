"""Which pending removals are stuck, and what the operator is told (qmpnet/core/stuck_unplugs.py, pure)."""

from __future__ import annotations

import pytest

from qmpnet.core.model import NicSpec
from qmpnet.core.records import GuestRecord, NicRecord, RecordState
from qmpnet.core.stuck_unplugs import check_stuck, stuck_advice


def nic(nic_id: str, state: RecordState, since: float | None, reported: float | None = None) -> NicRecord:
    return NicRecord(id=nic_id, spec=NicSpec(id=nic_id), netdev=f"{nic_id}.net", state=state, link="up",
                     pending_since=since, stuck_reported=reported)  # fmt: skip


def record(*nics: NicRecord) -> GuestRecord:
    rec = GuestRecord(address="/run/vm1.qmp", name="vm1")
    for one in nics:
        rec = rec.with_nic(one)
    return rec


@pytest.mark.parametrize(
    ("one", "due", "next_at"),
    [
        (nic("a", "removal_pending", 100.0), True, None),  # pending 60 s at 160: due exactly then
        (nic("a", "removal_pending", 101.0), False, 161.0),  # one second short: the next one is at 161
        (nic("a", "removal_pending", 100.0, reported=150.0), False, None),  # told already (maybe by another process)
        (nic("a", "removal_pending", None), False, None),  # device_del not answered yet: the clock has not started
        (nic("a", "active", 100.0), False, None),  # a refused unplug put it back: not pending
        (nic("a", "adding", None), False, None),
    ],
)
def test_the_clock(one: NicRecord, due: bool, next_at: float | None) -> None:
    check = check_stuck(record(one), now=160.0, after=60.0)
    assert [n.id for n in check.due] == (["a"] if due else [])
    assert check.next_at == next_at


def test_several_oldest_first_and_the_soonest_next() -> None:
    rec = record(
        nic("late", "removal_pending", 90.0), nic("early", "removal_pending", 10.0),
        nic("soon", "removal_pending", 150.0), nic("later", "removal_pending", 155.0),
    )  # fmt: skip
    check = check_stuck(rec, now=200.0, after=60.0)
    assert [n.id for n in check.due] == ["early", "late"]
    assert check.next_at == 210.0


def test_the_advice_names_the_nic_the_wait_and_what_helps() -> None:
    text = stuck_advice("lan2", 61.4)
    assert text.startswith("NIC lan2: ")
    assert "for 61 s" in text
    assert "does not help" in text  # repeating nic/del
    assert "system_reset" in text
    assert "pciehp" in text
