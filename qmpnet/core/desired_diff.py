"""Desired state: a declared NIC set against the guest as it is -> the changes that converge them (pure).

A desired set (``qmpnet apply FILE``, or the retained MQTT ``desired`` topic) lists NICs in the ``NicSpec`` shape,
each with an ``id``. Converging is idempotent: applying the same set twice changes nothing the second time.

=============================================  ===========  =====================================================
desired NIC vs the guest                       change       why
=============================================  ===========  =====================================================
no NIC with that id                            ``add``      with the same id, MAC and PCI address as declared
same id, same model/MAC/backend/address        ``keep``     or ``link`` when only the link state differs
same id, another model, MAC, backend or place  ``conflict`` never replaced behind the caller's back: remove it first
NIC qmpnet created, not in the set             ``remove``   only with ``prune``; NICs qmpnet did not create stay
=============================================  ===========  =====================================================

Imperative ``nic add|del|link`` edit the stored set too (:func:`with_added`, :func:`without`, :func:`with_link`),
so the set always says what the guest should have, whichever way it was asked for.
"""

from __future__ import annotations

from operator import attrgetter
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple

from pydantic import ValidationError

from qmpnet.core.model import invalid_request_from, parse_nic_spec
from qmpnet.core.model_base import replaced
from qmpnet.core.records import DesiredDocument, DesiredSet
from qmpnet.errors import InvalidRequest

if TYPE_CHECKING:
    from collections.abc import Collection, Mapping

    from qmpnet.core.model import LinkState, Nic, NicSpec

__all__ = ["Change", "ChangeKind", "parse_desired", "plan_changes", "with_added", "with_link", "without"]

ChangeKind = Literal["add", "link", "remove", "keep", "conflict"]


# A NamedTuple, not a frozen dataclass: a value every process that connects defines, and a NamedTuple is
# defined in a fifth of the instructions (docs/performance.md).
class Change(NamedTuple):
    """One step towards the desired set.

    Attributes:
        kind: See the module docstring's table.
        id: The NIC.
        spec: The desired spec (``add``, ``link``, ``keep``, ``conflict``).
        reason: For ``conflict``: what differs.
    """

    kind: ChangeKind
    id: str
    spec: NicSpec | None = None
    reason: str = ""

    def describe(self) -> dict[str, object]:
        """The change as the CLI's ``--json`` and the MQTT status show it."""
        out: dict[str, object] = {"action": self.kind, "id": self.id}
        if self.kind == "link" and self.spec is not None:
            out["link"] = self.spec.link
        if self.reason:
            out["reason"] = self.reason
        return out


def parse_desired(data: Mapping[str, Any], *, source: Literal["apply", "mqtt"], prefix: str = "") -> DesiredSet:
    """Validate a desired document (``{"generation"?, "nics": [...], "prune"?}``).

    Raises:
        InvalidRequest: A field is invalid, a NIC has no ``id``, or two NICs share an id or a MAC; names the field.
    """
    where = f"{prefix}." if prefix else ""
    if not isinstance(data.get("nics", []), list):
        raise InvalidRequest(f"{where}nics: must be a list of NICs", field=f"{where}nics")
    specs: list[NicSpec] = []
    ids: dict[str, int] = {}
    macs: dict[str, int] = {}
    for index, raw in enumerate(data.get("nics", [])):
        path = f"{where}nics.{index}"
        if not isinstance(raw, dict):
            raise InvalidRequest(f"{path}: must be an object in the NicSpec shape", field=path)
        spec = parse_nic_spec(raw, prefix=path)
        if spec.id is None:
            raise InvalidRequest(f"{path}.id: every desired NIC needs an id", field=f"{path}.id")
        if spec.id in ids:
            raise InvalidRequest(f"{path}.id: {spec.id!r} is also nics.{ids[spec.id]}", field=f"{path}.id")
        ids[spec.id] = index
        if spec.mac is not None:
            if spec.mac in macs:
                raise InvalidRequest(f"{path}.mac: {spec.mac} is also nics.{macs[spec.mac]}'s", field=f"{path}.mac")
            macs[spec.mac] = index
        specs.append(spec)
    rest = {k: v for k, v in data.items() if k != "nics"}
    try:
        # The document's model (the one the MQTT API's schemas publish), so what is accepted is what is documented.
        document = DesiredDocument.model_validate({**rest, "nics": []})
    except ValidationError as err:
        raise invalid_request_from(err, prefix) from err
    desired = DesiredSet(generation=document.generation, prune=document.prune, source=source)
    return replaced(desired, {"nics": specs})


def plan_changes(desired: DesiredSet, nics: Mapping[str, Nic], created: Collection[str]) -> list[Change]:
    """The changes that bring ``nics`` (the guest now) to ``desired``; ``created`` are the NICs qmpnet made."""
    changes: list[Change] = []
    wanted = {spec.id for spec in desired.nics}
    for spec in desired.nics:
        assert spec.id is not None  # noqa: S101 - parse_desired guarantees it
        nic = nics.get(spec.id)
        if nic is None:
            changes.append(Change("add", spec.id, spec))
            continue
        reason = _difference(spec, nic)
        if reason:
            changes.append(Change("conflict", spec.id, spec, reason))
        elif nic.link != spec.link:
            changes.append(Change("link", spec.id, spec))
        else:
            changes.append(Change("keep", spec.id, spec))
    if desired.prune:
        extra = [nic_id for nic_id in sorted(nics) if nic_id in created and nic_id not in wanted]
        changes.extend(Change("remove", nic_id) for nic_id in extra)
    return changes


def _difference(spec: NicSpec, nic: Nic) -> str:
    if spec.driver != nic.model:
        return f"the guest's {nic.id} is a {nic.model}, not a {spec.driver}"
    if spec.mac is not None and nic.mac is not None and spec.mac != nic.mac:
        return f"the guest's {nic.id} has MAC {nic.mac}, not {spec.mac}"
    seen = nic.backend.type if nic.backend is not None else None
    if seen is not None and seen != spec.backend.type:
        return f"the guest's {nic.id} has a {seen} backend, not {spec.backend.type}"
    if nic.pci is not None and spec.bus is not None and spec.bus != nic.pci.bus:
        return f"the guest's {nic.id} is on bus {nic.pci.bus}, not {spec.bus}"
    if nic.pci is not None and spec.pci_addr is not None and spec.pci_addr != (nic.pci.slot, nic.pci.function):
        return f"the guest's {nic.id} is at {nic.pci.slot:02x}.{nic.pci.function}, not {spec.addr}"
    return ""


_ID: Final = attrgetter("id")


def with_added(desired: DesiredSet | None, spec: NicSpec) -> DesiredSet:
    """The set after an imperative ``nic add`` (``spec`` as planned: id, MAC and address filled in)."""
    current = desired or DesiredSet()
    if spec.id not in map(_ID, current.nics):  # the usual case, told in C: the set so far, and the spec after it
        return replaced(current, {"nics": [*current.nics, spec]})
    return replaced(current, {"nics": [*(s for s in current.nics if s.id != spec.id), spec]})


def without(desired: DesiredSet | None, nic_id: str) -> DesiredSet | None:
    """The set after an imperative ``nic del``."""
    if desired is None:
        return None
    return replaced(desired, {"nics": [s for s in desired.nics if s.id != nic_id]})


def with_link(desired: DesiredSet | None, nic_id: str, link: LinkState) -> DesiredSet | None:
    """The set after an imperative ``nic link``."""
    if desired is None:
        return None
    nics = [replaced(s, {"link": link}) if s.id == nic_id else s for s in desired.nics]
    return replaced(desired, {"nics": nics})
