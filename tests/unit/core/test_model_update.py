"""The edge of live changes: NicUpdate, Shape and Vlan validation, the policy rules, the nic/update and nic/capture
envelopes. Every refusal names its field and says why."""

from __future__ import annotations

from typing import Any

import pytest

from qmpnet.api.wire.envelopes import OPS, NicCaptureRequest, NicUpdateRequest, parse_request
from qmpnet.core.model import NicUpdate, Shape, Vlan, parse_nic_update
from qmpnet.core.policy import Policy, check_capture_file, check_update
from qmpnet.errors import Forbidden, InvalidRequest


def parsed(**fields: Any) -> NicUpdate:
    return parse_nic_update({"id": "lan0", **fields})


def test_values_in_tc_notation_are_kept_as_numbers_and_written_back_in_tc_notation() -> None:
    update = parsed(shape={"rate": "5mbit", "burst": "32kb", "delay": "100ms", "jitter": "10ms", "loss": "0.5%"})
    assert update.shape == Shape(rate=5_000_000, burst=32768, delay=100_000, jitter=10_000, loss=0.5)
    wire = update.model_dump(mode="json", exclude_unset=True)
    assert wire == {"id": "lan0", "shape": {"rate": "5mbit", "burst": "32kb", "delay": "100ms", "jitter": "10ms",
                                            "loss": "0.5%"}}
    assert parse_nic_update(wire) == update


def test_fields_left_out_are_kept_and_null_means_back_to_the_default() -> None:
    update = parsed(link="down")
    assert (update.changes_vlan, update.changes_shape, update.backend) == (False, False, None)
    update = parsed(vlan=None, shape=None)
    assert (update.changes_vlan, update.changes_shape, update.vlan, update.shape) == (True, True, None, None)


def test_trunks_are_merged_ranges() -> None:
    vlan = parsed(vlan={"trunks": [30, "10-12", "11-20", 5]}).vlan
    assert vlan is not None
    assert vlan.ranges() == ((5, 5), (10, 20), (30, 30))
    assert vlan.options() == {"trunks": "5,10-20,30"}
    assert Vlan(access=7).options() == {"vlan": "7"}


@pytest.mark.parametrize(
    ("fields", "field", "fragment"),
    [
        ({"shape": {"rate": "-5mbit"}}, "update.shape.rate", "must not be negative"),
        ({"shape": {"rate": -5}}, "update.shape.rate", "must not be negative"),
        ({"shape": {"loss": "150%"}}, "update.shape.loss", "0% to 100%"),
        ({"shape": {"loss": 100.5}}, "update.shape.loss", "0% to 100%"),
        ({"shape": {"rate": "5mbits"}}, "update.shape.rate", "unknown unit 'mbits'"),
        ({"shape": {"delay": "100 parsecs"}}, "update.shape.delay", "not a time"),
        ({"shape": {"burst": "32kib", "rate": "1mbit"}}, "update.shape.burst", "unknown unit"),
        ({"shape": {"rate": "1bit"}}, "update.shape.rate", "8bit to 34gbit"),
        ({"shape": {"rate": "40gbit"}}, "update.shape.rate", "8bit to 34gbit"),
        ({"shape": {"rate": "1mbit", "burst": 100}}, "update.shape.burst", "1600b"),
        ({"shape": {"delay": "5s", "jitter": "1h"}}, "update.shape.jitter", "unknown unit 'h'"),
        ({"shape": {"delay": "300s"}}, "update.shape.delay", "0us to 240s"),
        ({"shape": {"burst": "32kb"}}, "update.shape.burst", "needs a rate"),
        ({"shape": {"jitter": "10ms"}}, "update.shape.jitter", "needs a delay"),
        ({"shape": {}}, "update.shape", "at least one"),
        ({"shape": {"rate": True}}, "update.shape.rate", "must be a rate"),
        ({"shape": {"speed": "1mbit"}}, "update.shape.speed", "Extra inputs"),
        ({"vlan": {"access": 0}}, "update.vlan.access", "greater than or equal to 1"),
        ({"vlan": {"access": 4095}}, "update.vlan.access", "less than or equal to 4094"),
        ({"vlan": {"trunks": ["20-10"]}}, "update.vlan.trunks.0", "low <= high"),
        ({"vlan": {"trunks": ["x"]}}, "update.vlan.trunks.0", "not a VLAN id"),
        ({"vlan": {"trunks": []}}, "update.vlan.trunks", "at least 1"),
        ({"vlan": {"access": 1, "trunks": [2]}}, "update.vlan", "either access or trunks"),
        ({"vlan": {}}, "update.vlan", "either access or trunks"),
        ({"backend": {"type": "bridge", "bridge": "br0;reboot"}}, "update.backend.bridge", "metacharacters"),
        ({"backend": {"type": "bridge", "bridge": "br0", "helper": True}}, "update.backend.helper", "helper"),
        ({"backend": {"type": "nat", "network": "$(x)"}}, "update.backend.network", "pattern"),
        ({"backend": {"type": "user"}}, "update.backend", "does not match"),
        ({"backend": None}, "update.backend", "to move to"),
        ({"link": "sideways"}, "update.link", "'up' or 'down'"),
        ({}, "update", "nothing to change"),
        ({"colour": "red"}, "update.colour", "Extra inputs"),
    ],
)
def test_bad_values_are_refused_naming_the_field(fields: dict[str, Any], field: str, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parsed(**fields)
    assert caught.value.field == field
    assert caught.value.message.startswith(f"{field}: ")
    assert fragment in caught.value.message


def test_the_id_is_checked() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_nic_update({"id": "../x", "link": "up"})
    assert caught.value.field == "update.id"


def test_a_move_obeys_the_bridges_the_policy_allows() -> None:
    move = parsed(backend={"type": "bridge", "bridge": "br-b"})
    check_update(move, Policy())
    check_update(move, Policy(allowed_bridges=["br-a", "br-b"]))
    with pytest.raises(Forbidden) as caught:
        check_update(move, Policy(allowed_bridges=["br-a"]))
    assert caught.value.field == "update.backend.bridge"
    assert "policy.allowed_bridges" in caught.value.message
    check_update(parsed(backend={"type": "nat", "network": "lab"}), Policy(allowed_bridges=[]))
    check_update(parsed(shape=None), Policy(allowed_bridges=[]))


@pytest.mark.parametrize(
    ("dirs", "path", "allowed"),
    [(None, "/any/where.pcap", True), (["/var/cap"], "/var/cap/a.pcap", True), (["/var/cap"], "/var/capx/a", False),
     (["/var/cap"], "/etc/shadow", False), ([], "/var/cap/a.pcap", False)],
)  # fmt: skip
def test_capture_files_obey_the_allowed_directories(dirs: list[str] | None, path: str, allowed: bool) -> None:
    policy = Policy(allowed_capture_dirs=dirs)
    if allowed:
        check_capture_file(path, policy)
        return
    with pytest.raises(Forbidden) as caught:
        check_capture_file(path, policy)
    assert caught.value.field == "file"
    assert "policy.allowed_capture_dirs" in caught.value.message


def test_the_envelopes_carry_the_update_and_the_capture() -> None:
    assert OPS["nic/update"].request is NicUpdateRequest
    assert OPS["nic/capture"].request is NicCaptureRequest
    request = parse_request("nic/update", "guest", {"transaction": "t1", "update": {"id": "lan0", "shape": None}})
    assert isinstance(request, NicUpdateRequest)
    assert request.update.changes_shape
    capture = parse_request("nic/capture", "guest", {"id": "lan0", "action": "start", "file": "/var/cap/a.pcap"})
    assert isinstance(capture, NicCaptureRequest)
    assert (capture.action, capture.file) == ("start", "/var/cap/a.pcap")


@pytest.mark.parametrize(
    ("op", "payload", "field"),
    [
        ("nic/update", {"update": {"id": "lan0", "shape": {"rate": "-1mbit"}}}, "update.shape.rate"),
        ("nic/update", {"id": "lan0", "link": "up"}, "update"),
        ("nic/capture", {"id": "lan0", "action": "start"}, "file"),
        ("nic/capture", {"id": "lan0", "action": "start", "file": "rel.pcap"}, "file"),
        ("nic/capture", {"id": "lan0", "action": "start", "file": "/var/cap/../etc/passwd"}, "file"),
        ("nic/capture", {"id": "lan0", "action": "pause"}, "action"),
    ],
)
def test_bad_envelopes_name_the_field(op: str, payload: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_request(op, "guest", payload)
    assert caught.value.field == field
