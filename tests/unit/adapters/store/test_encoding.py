"""A guest store's encoder, which reuses the pieces of the record before, writes what pydantic would."""

from __future__ import annotations

import json

from qmpnet.adapters.store.encoding import RecordEncoder, encode_record
from qmpnet.core.desired_diff import with_added, without
from qmpnet.core.model import parse_nic_spec
from qmpnet.core.records import GuestRecord, NicRecord, OperationRecord


def _nic(n: int, state: str = "adding") -> NicRecord:
    spec = parse_nic_spec({"model": "virtio", "id": f"v{n}", "mac": f"52:54:00:00:00:{n:02x}", "addr": f"{n + 3:x}"})
    return NicRecord.model_validate({"id": f"v{n}", "spec": spec, "netdev": f"v{n}.net", "state": state, "link": "up"})


def _steps() -> list[GuestRecord]:
    """Records as a lane makes them, one from the other: adds, an outcome, a removal, a change of the other fields."""
    record = GuestRecord(address="/run/vm1.qmp", name="vm1", links={"e1": "down"}, gone={"old": 1.5})
    records = [record]
    for n in range(4):
        operation = OperationRecord(id=f'op "{n}"', op="nic/add", nic=f"v{n}", started=float(n))
        record = record.with_operation(operation).with_nic(_nic(n))
        records.append(record)
        spec = record.nics[f"v{n}"].spec
        assert spec is not None
        done = operation.model_copy(update={"finished": n + 0.5, "outcome": {"status": "ok", "data": {"é": [n]}}})
        record = record.with_nic(_nic(n, "active")).with_operation(done)
        record = record.model_copy(update={"desired": with_added(record.desired, spec)})
        records.append(record)
    record = record.without_nic("v1", gone_at=9.0)
    record = record.model_copy(update={"desired": without(record.desired, "v1")})
    records.append(record)
    records.append(record.model_copy(update={"instance": "i-2", "qemu_pid": 42}))
    assert record.desired is not None
    applied = record.desired.model_copy(update={"generation": 3, "prune": True, "source": "apply"})
    records.append(record.model_copy(update={"desired": applied}))
    records.append(record.model_copy(update={"desired": applied, "gone": {}}))
    records.append(record.model_copy(update={"desired": None}))
    spec = parse_nic_spec({"model": "e1000", "id": "twice"})
    twice = GuestRecord(address="a", name="b").model_copy(update={"desired": with_added(None, spec)})
    records.append(twice.model_copy(update={"desired": twice.desired.model_copy(  # type: ignore[union-attr]
        update={"nics": [spec, spec]})}))  # fmt: skip
    return records


def test_each_record_of_a_sequence_is_written_as_pydantic_writes_it() -> None:
    encoder = RecordEncoder()
    for record in _steps():
        written = encoder.encode(record)
        assert written == encode_record(record)  # the same bytes as without the pieces of the record before
        assert json.loads(written) == json.loads(record.model_dump_json())
        assert GuestRecord.model_validate_json(written) == record


def test_a_record_not_built_from_the_one_before_is_written_right() -> None:
    encoder = RecordEncoder()
    records = _steps()
    for record in records:
        encoder.encode(record)
    last = records[-1]
    assert encoder.encode(last) == encode_record(last)
    assert encoder.encode(records[0]) == encode_record(records[0])  # back to an older one: encoded again, right
