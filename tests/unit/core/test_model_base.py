"""The direct copy of a frozen model (``replaced``) gives what pydantic's ``model_copy(update=...)`` gives."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from qmpnet.core.model import Nic, ObservedBackend, PciAddress, parse_nic_spec
from qmpnet.core.model_base import replaced, trusted
from qmpnet.core.records import GuestRecord, HostHold, NicRecord, OperationRecord

SPEC = parse_nic_spec({"model": "virtio", "backend": {"type": "user", "hostfwd": ["tcp::2222-:22"]}})
RECORD = NicRecord(id="virtio0", spec=SPEC, netdev="virtio0.net", state="adding", link="up",
                   pci=PciAddress(bus="pci.0", slot=3, function=0), operation="op-1")
NIC = Nic(id="virtio0", model="virtio-net-pci", mac="52:54:00:00:00:01", netdev="virtio0.net",
          backend=ObservedBackend(type="user"), pci=None, link="up", state="active")

CASES: list[tuple[BaseModel, dict[str, Any]]] = [
    (SPEC, {"id": "virtio0", "bus": "pci.0", "addr": "3", "mac": "52:54:00:00:00:01"}),
    (RECORD, {"state": "active"}),
    (RECORD, {"host": HostHold(tap="tap0"), "pending_since": 12.5}),
    (NIC, {"backend": ObservedBackend(type="bridge", options={"tap": "t"}), "managed": True}),
    (NIC, {"warnings": ["set the MTU"]}),
    (NIC, {}),
    (OperationRecord(id="op-1", op="nic/add", started=1.0), {"finished": 2.0, "outcome": {"status": "ok"}}),
    (GuestRecord(address="a", name="g"), {"nics": {"virtio0": RECORD}, "gone": {}}),
]


def assert_same_model(ours: BaseModel, theirs: BaseModel) -> None:
    """``ours`` is what pydantic's own way made (``theirs``): equal, the same fields set, the same JSON, in order."""
    assert ours == theirs
    assert ours.model_fields_set == theirs.model_fields_set
    assert ours.model_dump_json() == theirs.model_dump_json()
    assert ours.model_dump_json(exclude_unset=True) == theirs.model_dump_json(exclude_unset=True)
    assert list(ours.__dict__) == list(theirs.__dict__)  # the order of the fields (the JSON's)
    assert ours.__pydantic_extra__ is None
    assert ours.__pydantic_private__ is None


@pytest.mark.parametrize(("model", "update"), CASES)
def test_replaced_is_model_copy(model: BaseModel, update: dict[str, Any]) -> None:
    ours, theirs = replaced(model, update), model.model_copy(update=update)
    assert type(ours) is type(theirs)
    assert_same_model(ours, theirs)


def test_replaced_leaves_the_original_as_it_was() -> None:
    before_set, before = set(RECORD.model_fields_set), RECORD.model_dump()
    copied = replaced(RECORD, {"state": "active", "pending_since": 3.0})
    assert copied.state == "active"
    assert RECORD.model_dump() == before
    assert RECORD.model_fields_set == before_set
    assert copied.model_fields_set == before_set | {"state", "pending_since"}


def test_replaced_keeps_a_frozen_model_frozen() -> None:
    copied = replaced(NIC, {"managed": True})
    with pytest.raises(ValueError, match="frozen"):
        copied.managed = False  # type: ignore[misc]


class _WithPrivate(BaseModel):
    model_config = ConfigDict(frozen=True)
    value: int = 0
    _note: str = PrivateAttr(default="kept")


class _WithExtra(BaseModel):
    model_config = ConfigDict(extra="allow")
    value: int = 0


def test_replaced_goes_through_pydantic_for_private_or_extra_fields() -> None:
    private = replaced(_WithPrivate(value=1), {"value": 2})
    assert (private.value, private._note) == (2, "kept")
    extra = replaced(_WithExtra(value=1, other="x"), {"value": 2, "more": 3})
    assert extra == _WithExtra(value=1, other="x").model_copy(update={"value": 2, "more": 3})
    assert extra.model_extra == {"other": "x", "more": 3}


BUILT: list[tuple[type[BaseModel], dict[str, Any]]] = [
    (PciAddress, {"bus": "pci.0", "slot": 3, "function": 0}),
    (HostHold, {"owner": None, "passt_socket": None, "vhost": False}),
    (HostHold, {"owner": "g/v0", "passt_socket": "/run/p.sock", "vhost": True}),
    (HostHold, {}),
    (ObservedBackend, {"type": "user", "options": {"hostfwd": "tcp::2222-:22"}}),
    (ObservedBackend, {"type": "user"}),
    (OperationRecord, {"id": "op-1", "op": "nic/add", "nic": None, "started": 1.5}),
    (NicRecord, {"id": "virtio0", "spec": SPEC, "netdev": "virtio0.net", "state": "adding", "link": "up",
                 "host": HostHold(), "pci": PciAddress(bus="pci.0", slot=3, function=0), "operation": "op-1"}),
    (NicRecord, {"id": "e1", "spec": None, "netdev": None, "state": "active", "link": "down"}),
    (Nic, {"id": "virtio0", "model": "virtio-net-pci", "mac": "52:54:00:00:00:01", "netdev": "virtio0.net",
           "backend": ObservedBackend(type="user"), "pci": None, "link": "up", "state": "active"}),
]


@pytest.mark.parametrize(("cls", "values"), BUILT)
def test_trusted_is_the_validated_model(cls: type[BaseModel], values: dict[str, Any]) -> None:
    ours, theirs = trusted(cls, dict(values)), cls(**values)
    assert type(ours) is cls
    assert_same_model(ours, theirs)


def test_trusted_makes_a_factory_default_anew_for_each_instance() -> None:
    values = {"id": "e1", "spec": None, "netdev": None, "state": "active", "link": "down"}
    first, second = trusted(NicRecord, dict(values)), trusted(NicRecord, dict(values))
    assert first.host == HostHold()
    assert first.host is not second.host
    assert trusted(ObservedBackend, {"type": "user"}).options is not trusted(ObservedBackend, {"type": "u"}).options


def test_trusted_validates_what_it_cannot_take_as_it_is() -> None:
    # A model with validators (the NIC spec) is validated: its alias and MAC rules apply.
    spec = trusted(type(SPEC), {"model": "virtio", "mac": "52:54:00:AB:CD:EF"})
    assert (spec.model, spec.mac) == ("virtio-net-pci", "52:54:00:ab:cd:ef")
    with pytest.raises(ValidationError, match="extra"):
        trusted(PciAddress, {"bus": "pci.0", "slot": 3, "function": 0, "other": 1})
    with pytest.raises(ValidationError, match="function"):
        trusted(PciAddress, {"bus": "pci.0", "slot": 3})


class _FromData(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    value: int = 0
    twice: int = Field(default_factory=lambda data: 2 * data["value"])


def test_trusted_leaves_a_factory_of_the_data_to_pydantic() -> None:
    assert trusted(_FromData, {"value": 4}) == _FromData(value=4)
    assert trusted(_FromData, {"value": 4}).twice == 8
