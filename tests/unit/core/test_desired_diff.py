"""Desired state: validating documents, planning changes (pure), and applying them through the real adapter."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

import qmpnet
from qmpnet.core.desired_diff import parse_desired, plan_changes, with_added, with_link, without
from qmpnet.core.model import Nic, NicSpec, ObservedBackend, PciAddress
from qmpnet.errors import InvalidRequest
from qmpnet.guest.apply_desired import apply_desired

if TYPE_CHECKING:
    from fakeqmp import FakeQmp

    from qmpnet.settings import Settings


def nic(nic_id: str, model: str = "e1000", *, link: str = "up", mac: str = "52:54:00:00:00:01") -> Nic:
    return Nic.model_validate({
        "id": nic_id, "model": model, "mac": mac, "netdev": f"{nic_id}.net",
        "backend": ObservedBackend(type="user").model_dump(), "pci": PciAddress(bus="pci.0", slot=3, function=0),
        "link": link, "state": "active",
    })


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ({"nics": [{"model": "e1000"}]}, "nics.0.id"),
        ({"nics": [{"id": "a"}, {"id": "a"}]}, "nics.1.id"),
        ({"nics": [{"id": "a", "mac": "52:54:00:00:00:01"}, {"id": "b", "mac": "52:54:00:00:00:01"}]}, "nics.1.mac"),
        ({"nics": [{"id": "a", "model": "pcnet"}]}, "nics.0.model"),
        ({"nics": [{"id": "a", "backend": {"type": "user", "hostfwd": ["nonsense"]}}]}, "nics.0.backend.hostfwd.0"),
        ({"nics": "all of them"}, "nics"),
        ({"nics": [], "generation": -1}, "generation"),
        ({"nics": [], "prune": "yes please"}, "prune"),
        ({"nics": [], "extra": 1}, "extra"),
        ({"nics": [], "source": "imperative"}, "source"),  # the store's field, not the document's (DesiredDocument)
        ({"nics": [3]}, "nics.0"),
    ],
)
def test_invalid_documents_name_the_field(document: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_desired(document, source="apply")
    assert info.value.field == field


def test_the_plan_table() -> None:
    desired = parse_desired({"prune": True, "nics": [
        {"id": "missing", "model": "virtio"},
        {"id": "same", "model": "e1000"},
        {"id": "relink", "model": "e1000", "link": "down"},
        {"id": "other", "model": "rtl8139"},
        {"id": "othermac", "model": "e1000", "mac": "52:54:00:00:00:99"},
        {"id": "moved", "model": "e1000", "addr": "05.0"},
    ]}, source="apply")
    guest = {n.id: n for n in (nic("same"), nic("relink"), nic("other"), nic("othermac"), nic("moved"), nic("ours"),
                               nic("foreign"))}
    changes = {c.id: c for c in plan_changes(desired, guest, created={"ours", "same"})}
    assert {k: c.kind for k, c in changes.items()} == {
        "missing": "add", "same": "keep", "relink": "link", "other": "conflict", "othermac": "conflict",
        "moved": "conflict", "ours": "remove",
    }
    assert "e1000, not a rtl8139" in changes["other"].reason
    assert "foreign" not in changes  # not qmpnet's: never removed, even with prune
    assert "ours" not in {c.id for c in plan_changes(desired.model_copy(update={"prune": False}), guest, {"ours"})}


def test_imperative_edits_keep_the_set() -> None:
    spec = NicSpec(id="a", mac="52:54:00:00:00:0a", addr="04.0", bus="pci.0")
    desired = with_added(None, spec)
    assert desired.nics == [spec]
    assert with_added(desired, spec).nics == [spec]  # the same NIC is not listed twice
    other, again = NicSpec(id="b"), spec.model_copy(update={"link": "down"})
    assert with_added(desired, other).nics == [spec, other]  # a new one goes last
    assert with_added(with_added(desired, other), again).nics == [other, again]  # a re-added one too, once
    linked = with_link(desired, "a", "down")
    assert linked is not None
    assert linked.nics[0].link == "down"
    gone = without(linked, "a")
    assert gone is not None
    assert gone.nics == []
    assert without(None, "a") is None


async def test_apply_converges_then_is_a_no_op_and_dry_run_changes_nothing(fake: FakeQmp, fast: Settings) -> None:
    desired = parse_desired({"nics": [{"id": "x1", "model": "e1000", "link": "down"}, {"id": "e1", "model": "e1000"}]},
                            source="apply")
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        dry = await apply_desired(guest, desired, dry_run=True)
        assert [(c.action, c.id) for c in dry.plan] == [("add", "x1"), ("keep", "e1")]
        assert fake.changes() == []
        first = await apply_desired(guest, desired)
        assert first.converged
        assert fake.change_names() == ["netdev_add", "device_add", "set_link"]
        second = await apply_desired(guest, desired)
        assert [c.action for c in second.plan] == ["keep", "keep"]
        assert fake.change_names() == ["netdev_add", "device_add", "set_link"]  # nothing more
        # The set as applied is what the store keeps (id, MAC, address pinned for a re-add).
        stored = guest.record.desired
        assert stored is not None
        assert [(s.id, s.bus, s.addr) for s in stored.nics] == [("x1", "pci.0", "04.0")]


async def test_a_nic_the_policy_forbids_is_an_error_and_the_others_converge(fake: FakeQmp, fast: Settings) -> None:
    desired = parse_desired({"nics": [
        {"id": "bad", "backend": {"type": "user", "guestfwd": ["tcp:10.0.2.100:80-cmd:/bin/sh"]}},
        {"id": "good", "model": "rtl8139"},
    ]}, source="apply")
    async with qmpnet.connect(str(fake.path), settings=fast) as guest:
        report = await apply_desired(guest, desired)
    assert not report.converged
    assert [(e.id, e.code) for e in report.errors] == [("bad", "forbidden")]
    assert fake.change_names() == ["netdev_add", "device_add"]  # the good one only
