"""Wire messages: request validation naming the field, answer serialisation, client-side error mapping and checks."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

import qmpnet
from qmpnet.api.wire.envelopes import (
    EVENT_NAMES,
    OPS,
    DesiredError,
    DesiredStatus,
    ErrorBody,
    EventMessage,
    GuestInfo,
    GuestStatus,
    NicAddRequest,
    NicDelRequest,
    NicList,
    OkResponse,
    error_response,
    ok_response,
    parse_request,
    to_wire,
    transaction_of,
)
from qmpnet.client import Client, _new_transaction, error_from
from qmpnet.core.model import Nic, RemoveResult
from qmpnet.core.nic_requests import parse_nic_spec
from qmpnet.core.placement import PciBus, PciTopology, capacity
from qmpnet.errors import InvalidRequest, QmpCommandError, QmpnetError
from qmpnet.settings import MqttSettings


def test_every_op_has_a_scope_request_and_data_model() -> None:
    assert set(OPS) == {
        "nic/add", "nic/del", "nic/link", "nic/list", "nic/update", "nic/capture", "models", "slots", "guests"
    }
    assert {name for name, spec in OPS.items() if spec.scope == "controller"} == {"guests"}
    assert EVENT_NAMES == (
        "nic_added", "nic_removed", "nic_removal_pending", "unplug_rejected", "link_changed", "nic_updated",
        "rx_filter_changed", "guest_connected", "guest_disconnected", "reconciled", "drift",
        "record_discarded", "unplug_stuck",
    )  # fmt: skip


def test_parse_request_builds_the_op_model() -> None:
    request = parse_request("nic/add", "guest", {"transaction": "t", "nic": {"model": "virtio"}})
    assert isinstance(request, NicAddRequest)
    assert request.nic.model == "virtio-net-pci"
    assert request.transaction == "t"
    removal = parse_request("nic/del", "guest", {"id": "n1", "timeout": 2})
    assert removal == NicDelRequest(id="n1", timeout=2.0)


@pytest.mark.parametrize(
    ("op", "payload", "field"),
    [
        ("nic/add", {}, "nic"),
        ("nic/add", {"nic": {"mac": "zz"}}, "nic.mac"),
        ("nic/add", {"nic": {"backend": {"type": "user", "dns": "x"}}}, "nic.backend.dns"),
        ("nic/add", {"nic": {"backend": {"type": "hubport"}}}, "nic.backend.hub"),
        ("nic/add", {"nic": {"model": "rtl8139", "vectors": 4}}, "nic.vectors"),
        ("nic/add", {"nic": {"mtu": 67, "backend": {"type": "bridge", "bridge": "br0"}}}, "nic.mtu"),
        ("nic/add", {"nic": {"mtu": 1400, "backend": {"type": "user"}}}, "nic.mtu"),
        ("nic/update", {"update": {"id": "a", "mtu": 65536}}, "update.mtu"),
        ("nic/add", {"nic": {}, "extra": 1}, "extra"),
        ("nic/add", {"transaction": ["x"], "nic": {}}, "transaction"),
        ("nic/add", {"transaction": "x" * 257, "nic": {}}, "transaction"),
        ("nic/del", {}, "id"),
        ("nic/del", {"id": "a", "timeout": -1}, "timeout"),
        ("nic/link", {"id": "a", "up": 1}, "up"),
        ("nic/link", {"id": "a"}, "up"),
        ("nic/list", {"all": True}, "all"),
        ("nic/nope", {}, "op"),
        ("guests", {}, "op"),
    ],
)
def test_invalid_requests_name_the_field(op: str, payload: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_request(op, "guest", payload)
    assert caught.value.field == field
    assert caught.value.code == "invalid_request"


@pytest.mark.parametrize(
    ("payload", "transaction"), [({"transaction": "a"}, "a"), ({"transaction": 5}, None), ({}, None), ([1], None)]
)
def test_transaction_of(payload: object, transaction: str | None) -> None:
    assert transaction_of(payload) == transaction


def test_answers_on_the_wire() -> None:
    ok = json.loads(to_wire(ok_response("t", RemoveResult(id="n1", state="removed"))))
    assert ok == {"transaction": "t", "status": "ok", "data": {"id": "n1", "state": "removed"}}
    failed = json.loads(to_wire(error_response(None, InvalidRequest("nic.mac: bad", field="nic.mac"))))
    assert failed == {
        "transaction": None,
        "status": "error",
        "error": {"code": "invalid_request", "message": "nic.mac: bad", "field": "nic.mac"},
    }
    qmp = json.loads(
        to_wire(error_response("q", QmpCommandError("device_add: no", qmp_class="GenericError", command="x")))
    )
    assert qmp["error"] == {"code": "qmp_error", "message": "device_add: no", "qmp_class": "GenericError"}
    event = json.loads(to_wire(EventMessage(ts=1.5, guest="vm1", id="n1")))
    assert event == {"ts": 1.5, "guest": "vm1", "id": "n1"}


def test_a_nic_list_on_the_wire_is_pydantics_own_encoding_with_each_nic_encoded_once() -> None:
    nics = [
        Nic.model_validate({"id": "n1", "model": "virtio-net-pci", "mac": "52:54:00:12:34:56", "netdev": "n1.net",
                            "backend": {"type": "tap", "options": {"ifname": "tap\u00e9", "vhost": "on"}},
                            "pci": {"bus": "pci.0", "slot": 3, "function": 0}, "link": "up", "state": "active",
                            "rx_filter": {"promiscuous": False, "multicast": "normal", "unicast": "normal",
                                          "main_mac": "52:54:00:12:34:56", "multicast_table": [], "unicast_table": []},
                            "guest": {"ifname": "ens3", "mac": "52:54:00:12:34:56", "addresses": ["10.0.2.15/24"]},
                            "warnings": ['set the MTU "9000" in the guest']}),
        Nic.model_validate({"id": "n2", "model": "e1000", "mac": None, "netdev": None, "backend": None, "pci": None,
                            "link": "down", "state": "removal_pending", "managed": True, "pending_since": 1.25}),
    ]  # fmt: skip
    for listed in ([], nics, nics[::-1], [nics[0], nics[0]]):
        message = NicList(nics=listed)
        assert to_wire(message) == message.model_dump_json().encode()
    changed = nics[1].model_copy(update={"link": "up"})
    assert to_wire(NicList(nics=[nics[0], changed])) == NicList(nics=[nics[0], changed]).model_dump_json().encode()


def test_an_answer_on_the_wire_is_pydantics_own_encoding_with_its_data_encoded_once() -> None:
    nic = Nic.model_validate({"id": "n\u00e9", "model": "e1000", "mac": None, "netdev": None, "backend": None,
                              "pci": None, "link": "down", "state": "active", "warnings": ['"q"\n\u2028']})  # fmt: skip
    pc = PciTopology("pc", (PciBus("pci.0", "root", hotplug=True, used={(0, 0): "host"}),))
    for transaction in (None, "t-1", 'q"\u00e9\\\u2028\x01'):
        for data in (nic, NicList(nics=[nic]), RemoveResult(id="n1", state="removed"), capacity(pc)):
            answer = ok_response(transaction, data)
            assert to_wire(answer) == answer.model_dump_json().encode()
            assert to_wire(answer) == answer.model_dump_json().encode()  # the data's JSON kept: the same again
    recorded = OkResponse[Any](transaction="t", status="ok", data={"id": "n1", "x": [1, None]})  # not a model
    assert to_wire(recorded) == recorded.model_dump_json().encode()


def test_a_guest_status_on_the_wire_is_pydantics_own_encoding_with_its_capacity_encoded_once() -> None:
    pc = PciTopology("pc", (PciBus("pci.0", "root", hotplug=True, used={(0, 0): "host", (2, 0): "n\u00e9"}),))
    full = PciTopology("q35", (PciBus("pcie.0", "root", hotplug=False), PciBus("rp1", "root_port", hotplug=True)))
    desired = DesiredStatus(generation=3, converged=False, pending=["n1"],
                            errors=[DesiredError(id=None, code="invalid_request", message='bad "x"', field="nics.0")])
    statuses = [
        GuestStatus(state="connecting", since=1.0),
        GuestStatus(state="connected", qemu="8.2.2", machine="pc-i440fx-8.2", since=1.7e9, capacity=capacity(pc)),
        GuestStatus(state="connected", qemu=None, machine="q35", since=2.5, desired=desired, capacity=capacity(full)),
        GuestInfo(name="vm1", state="connected", since=3.0, capacity=capacity(pc)),  # not a status: its own way
    ]  # fmt: skip
    for status in statuses:
        assert to_wire(status) == status.model_dump_json().encode()
        assert to_wire(status) == status.model_dump_json().encode()  # the capacity's JSON kept: the same again


@pytest.mark.parametrize(
    "error",
    [
        qmpnet.InvalidRequest("a: b", field="a"),
        qmpnet.NotFound("no guest", field="guest"),
        qmpnet.Conflict("taken"),
        qmpnet.Busy("full"),
        qmpnet.Timeout("late"),
        qmpnet.RemovalPending("wait"),
        qmpnet.GuestUnavailable("down"),
        qmpnet.NoFreeSlot("full"),
        qmpnet.Unsupported("no"),
        qmpnet.Forbidden("nope", field="nic.backend.smb"),
        qmpnet.OutcomeUnknown("?"),
        QmpnetError("internal error: KeyError"),
    ],
)
def test_client_raises_the_class_of_each_code(error: QmpnetError) -> None:
    body = json.loads(to_wire(error_response(None, error)))["error"]
    raised = error_from(body)
    assert type(raised) is type(error)
    assert (raised.code, raised.message, raised.field) == (error.code, error.message, error.field)


def test_client_maps_qmp_errors_and_unknown_codes() -> None:
    raised = error_from(ErrorBody(code="qmp_error", message="m", qmp_class="DeviceNotFound").model_dump())
    assert isinstance(raised, QmpCommandError)
    assert raised.qmp_class == "DeviceNotFound"
    future = error_from({"code": "from_the_future", "message": "m"})
    assert future.code == "internal"


@pytest.mark.parametrize(
    ("controller", "guest", "document", "field"),
    [
        ("h1", "vm1", {"generation": 1, "nics": [{"model": "e1000"}]}, "nics.0.id"),
        ("h1", "vm1", {"nics": [{"id": "a"}, {"id": "a"}]}, "nics.1.id"),
        ("h1", "vm1", {"nics": "lan0"}, "nics"),
        ("h.1", "vm1", {"nics": []}, "controller"),
        ("h1", "vm/1", None, "guest"),
    ],
)
async def test_a_desired_document_is_checked_before_anything_is_sent(
    controller: str, guest: str, document: dict[str, object] | None, field: str
) -> None:
    client = Client("mqtt://127.0.0.1:1")  # never connected: a refusal must come before any publish
    with pytest.raises(InvalidRequest) as caught:
        await client.set_desired(controller, guest, document, timeout=0.1)
    assert caught.value.field == field


def test_the_client_takes_one_broker_or_several() -> None:
    assert Client("mqtt://a:1").settings.urls == ("mqtt://a:1",)
    both = Client(["mqtt://a:1", "mqtt://b:2"], settings=MqttSettings(broker="mqtt://c:3", topic_root="t"))
    assert both.settings.urls == ("mqtt://a:1", "mqtt://b:2")
    assert both.settings.topic_root == "t"


_SPECS: list[object] = [
    {"model": "virtio-net-pci"},
    {"model": "virtio-net-pci"},  # again: the same JSON
    {"model": "virtio"},  # an alias: another value, the same JSON
    {"model": "e1000", "backend": {"type": "user", "hostfwd": ["tcp::2222-:22"]}, "link": "down"},
    {"model": "e1000", "backend": {"type": "user", "hostfwd": ["tcp::2222-:22"]}, "link": "down"},
    {"model": "e1000", "backend": {"type": "user", "hostfwd": ["tcp::2223-:22"]}, "link": "down"},
    {"model": "virtio-net-pci", "queues": 2},  # refused (not a tap backend), each time
    {"model": "virtio-net-pci", "queues": 2},
    {"model": "virtio-net-pci", "vectors": 3},
    {"model": "virtio-net-pci", "vectors": True},  # True is not 3, nor 1
    {"model": "virtio-net-pci", "vectors": 1},
    {"model": "virtio-net-pci", "vectors": "3"},
    {"model": "virtio-net-pci", "vectors": 3.0},  # a float: never kept
    {"model": "virtio-net-pci", "nope": 1},
    {"model": "virtio-net-pci", "backend": {"type": "user", "hostfwd": [{"deep": [[[[[[["x"]]]]]]]}]}},
    {"backend": {"type": "user"}, "model": "rtl8139"},
    {"model": "rtl8139", "backend": {"type": "user"}},  # another order: another key, the same JSON
]


async def test_a_spec_sent_again_is_sent_as_it_was_checked_and_dumped_the_first_time() -> None:
    sent: list[object] = []
    answer = {"id": "net0", "model": "virtio-net-pci", "mac": "52:54:00:dc:b9:5f", "netdev": "net0.net",
              "backend": {"type": "user"}, "pci": {"bus": "pci.0", "slot": 3, "function": 0}, "link": "up",
              "state": "active"}  # fmt: skip

    async def request(_c: str, _g: str, _op: str, payload: dict[str, object], *, timeout: float) -> dict[str, object]:
        sent.append(json.dumps(payload["nic"]))
        return {"transaction": payload["transaction"], "status": "ok", "data": answer}

    client = Client("mqtt://127.0.0.1:1")  # never connected: the requester is this test's
    client._requester.request = request  # type: ignore[method-assign, assignment]
    spec = {"model": "virtio-net-pci"}
    for value in [*_SPECS, spec, spec]:
        try:
            expected: object = json.dumps(parse_nic_spec(value).model_dump(mode="json", exclude_none=True))  # type: ignore[arg-type]
        except InvalidRequest as err:
            expected = (err.field, err.message)
        try:
            await client.add_nic("h1", "vm1", value)  # type: ignore[arg-type]
            got: object = sent[-1]
        except InvalidRequest as err:
            got = (err.field, err.message)
        assert got == expected, value
        spec["model"] = "e1000"  # the caller's dictionary changed: sent as it is now
    assert len(client._specs) == 11  # the distinct plain values checked without an error, the changed one too


def test_a_transaction_is_a_random_uuid4_in_hex() -> None:
    seen = {_new_transaction() for _ in range(2000)}
    assert len(seen) == 2000
    for transaction in seen:
        as_uuid = uuid.UUID(hex=transaction)
        assert as_uuid.hex == transaction
        assert (as_uuid.version, as_uuid.variant) == (4, uuid.RFC_4122)
    for place in range(32):  # every other hex digit takes every value
        digits = {transaction[place] for transaction in seen}
        expected = {"4"} if place == 12 else set("89ab") if place == 16 else set("0123456789abcdef")
        assert digits == expected, place
