"""The MQTT API's messages as pydantic models: every request, response, retained state and event.

These models *are* the wire contract of docs/mqtt-api.md: the controller validates requests with them, the bus
serialises answers and state with them, :mod:`qmpnet.client` builds requests and reads answers with them, and
``qmpnet schema`` exports their JSON Schema. The op table :data:`OPS` ties each op name to its request and data
model, so a new op is one line here plus its handler. Pure: no I/O, no MQTT library.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Final, Generic, Literal, TypeVar, get_args

from pydantic import AfterValidator, BaseModel, Field, StrictBool, ValidationError, model_validator

from qmpnet import errors
from qmpnet.core.model_base import Frozen, Verify, invalid_request_from, json_once
from qmpnet.core.nic_requests import NicSpec, NicUpdate  # noqa: TC001 - pydantic needs them at runtime
from qmpnet.core.observed import (
    Capacity,
    CaptureResult,
    DiscardedRecord,
    GuestEventName,
    ModelInfo,
    Nic,
    RemoveResult,
    check_file_path,
)
from qmpnet.errors import ErrorCode, InvalidRequest, QmpCommandError, QmpnetError

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "API_VERSION",
    "EVENT_NAMES",
    "OPS",
    "ControllerOffline",
    "ControllerOnline",
    "DesiredError",
    "DesiredStatus",
    "ErrorBody",
    "ErrorResponse",
    "EventMessage",
    "GuestInfo",
    "GuestList",
    "GuestState",
    "GuestStatus",
    "GuestsRequest",
    "ModelList",
    "ModelsRequest",
    "NicAddRequest",
    "NicCaptureRequest",
    "NicDelRequest",
    "NicLinkRequest",
    "NicList",
    "NicListRequest",
    "NicUpdateRequest",
    "OkResponse",
    "OpSpec",
    "Response",
    "SlotsRequest",
    "data_of",
    "error_from",
    "error_response",
    "ok_response",
    "parse_request",
    "to_wire",
    "transaction_of",
]

API_VERSION: Final = 1
GuestState = Literal["connecting", "connected", "disconnected"]


# ------------------------------------------------------------------------------------------------------- requests


class _Request(Frozen):
    transaction: str | None = Field(
        default=None, max_length=256, description="Any string; echoed in the answer; repeats are not re-applied."
    )


class NicAddRequest(_Request):
    """``nic/add``: hot-add a NIC."""

    nic: NicSpec = Field(description="What to add; only model is needed, every other field has a default.")
    verify: Verify = Field(
        default=False,
        description='Answer once the guest agent shows the interface (true), with an address ("address"), or undo.',
    )


class NicDelRequest(_Request):
    """``nic/del``: hot-remove a NIC."""

    id: str = Field(description="The NIC's id.")
    timeout: float | None = Field(
        default=None, ge=0, le=3600, description="Seconds to wait for the guest's ack (default: the setting)."
    )
    verify: Verify = Field(default=False, description="Also wait until the guest agent no longer shows the interface.")


class NicLinkRequest(_Request):
    """``nic/link``: set a NIC's link up or down."""

    id: str = Field(description="The NIC's id.")
    up: StrictBool = Field(description="true: link up; false: link down (the guest sees carrier change).")
    verify: Verify = Field(default=False, description="Wait until the guest's carrier follows; else set it back.")


class NicListRequest(_Request):
    """``nic/list``: the guest's NICs, read afresh."""


class NicUpdateRequest(_Request):
    """``nic/update``: change a NIC live (move, VLAN, shaping, link) without unplugging it; atomic."""

    update: NicUpdate = Field(description="The NIC's id and what to change; fields left out stay as they are.")


class NicCaptureRequest(_Request):
    """``nic/capture``: start or stop capturing a NIC's traffic into a pcap file (QEMU filter-dump)."""

    id: str = Field(description="The NIC's id.")
    action: Literal["start", "stop"] = Field(description="start: QEMU begins writing the file; stop: it ends.")
    file: Annotated[str, AfterValidator(check_file_path)] | None = Field(
        default=None, description="start: the pcap file QEMU creates; it must be in policy.allowed_capture_dirs."
    )

    @model_validator(mode="after")
    def _file_to_start(self) -> NicCaptureRequest:
        if self.action == "start" and self.file is None:
            raise InvalidRequest("file: starting a capture needs the file to write", field="file")
        return self


class ModelsRequest(_Request):
    """``models``: the NIC models this QEMU offers."""


class SlotsRequest(_Request):
    """``slots``: how many more NICs of each model can be hot-plugged now, and where."""


class GuestsRequest(_Request):
    """Controller-level ``guests``: the guests this controller serves."""


# ----------------------------------------------------------------------------------------------------- data, state


class NicList(Frozen):
    """A guest's NICs (``nic/list`` data and the retained ``.../nics`` topic)."""

    nics: list[Nic] = Field(description="Every NIC of the guest, cold-plugged ones included.")


class ModelList(Frozen):
    """``models`` data."""

    models: list[ModelInfo] = Field(description="The NIC models this QEMU offers.")


class DesiredError(Frozen):
    """A desired NIC that did not converge, or a desired document that was refused (``id`` null)."""

    id: str | None = Field(description="The NIC, or null when the document itself was refused.")
    code: ErrorCode = Field(description="Stable machine code (docs/errors.md).")
    message: str = Field(description="A human sentence.")
    field: str | None = Field(default=None, description="JSON path of the refused field, for a refused document.")


class DesiredStatus(Frozen):
    """How far a guest is from its desired NIC set (part of the retained guest status)."""

    generation: int = Field(description="The generation of the desired set being converged to.")
    converged: bool = Field(description="The guest has exactly the desired NICs (as far as qmpnet manages them).")
    pending: list[str] = Field(default_factory=list, description="Desired changes not done yet, by NIC id.")
    errors: list[DesiredError] = Field(default_factory=list, description="What could not converge, and why.")


class GuestStatus(Frozen):
    """A guest's connection state (retained ``.../guest/<g>/status``)."""

    state: GuestState = Field(description="Whether the controller holds a QMP connection to the guest.")
    qemu: str | None = Field(default=None, description="QEMU version from the QMP greeting, once connected.")
    machine: str | None = Field(default=None, description="Machine type, e.g. pc-i440fx-7.2.")
    since: float = Field(description="Unix time of the last state change.")
    desired: DesiredStatus | None = Field(
        default=None, description="Convergence to the desired NIC set, when the guest has one."
    )
    capacity: Capacity | None = Field(
        default=None,
        description="Room for hot-plugged NICs (as the slots op answers), once connected; published again when it "
        "changes.",
    )


class GuestInfo(GuestStatus):
    """One guest in the ``guests`` answer."""

    name: str = Field(description="The guest's name in topics.")


class GuestList(Frozen):
    """``guests`` data."""

    guests: list[GuestInfo] = Field(description="The guests this controller serves.")


class ControllerOnline(Frozen):
    """The controller is serving (retained ``<root>/<c>/status``)."""

    state: Literal["online"]
    version: str = Field(description="qmpnet's version.")
    api: int = Field(description="The MQTT API's version (this document: 1).")
    guests: list[str] = Field(description="The names of the guests it serves.")


class ControllerOffline(Frozen):
    """The controller is gone: its will, or its clean shutdown."""

    state: Literal["offline"]


class EventMessage(Frozen):
    """An event (``.../guest/<g>/event/<name>``, not retained): the time and the NIC or id concerned."""

    ts: float = Field(description="Unix time of the event.")
    guest: str = Field(description="The guest's name.")
    id: str | None = Field(default=None, description="The NIC concerned (absent for guest events).")
    nic: Nic | None = Field(
        default=None,
        description="The NIC as it is now (nic_added, link_changed, nic_removal_pending and unplug_stuck with its "
        "pending_since).",
    )
    message: str | None = Field(
        default=None, description="For the operator: what happened and what can be done (unplug_stuck)."
    )
    generation: int | None = Field(default=None, description="The desired set's generation (reconciled, drift).")
    changes: list[dict[str, Any]] | None = Field(
        default=None, description="What reconciling did, or (drift) would do: [{action, id, ...}]."
    )
    record: DiscardedRecord | None = Field(
        default=None, description="The unreadable record moved aside (record_discarded)."
    )


# ------------------------------------------------------------------------------------------------------- answers

DataT = TypeVar("DataT", bound=BaseModel)


class OkResponse(Frozen, Generic[DataT]):
    """A successful answer."""

    transaction: str | None = Field(description="The request's transaction, or null.")
    status: Literal["ok"]
    data: DataT


class ErrorBody(Frozen):
    """What went wrong: a stable code, a sentence, and where known the field and QEMU's error class."""

    code: ErrorCode = Field(description="Stable machine code (docs/errors.md).")
    message: str = Field(description="A human sentence.")
    field: str | None = Field(default=None, description="JSON path of the offending field, when there is one.")
    qmp_class: str | None = Field(default=None, description="QEMU's error class, for qmp_error.")

    @classmethod
    def of(cls, err: QmpnetError) -> ErrorBody:
        """The body describing ``err``."""
        qmp_class = err.qmp_class if isinstance(err, QmpCommandError) else None
        return cls(code=err.code, message=err.message, field=err.field, qmp_class=qmp_class)


class ErrorResponse(Frozen):
    """A failed answer."""

    transaction: str | None = Field(description="The request's transaction, or null.")
    status: Literal["error"]
    error: ErrorBody


Response = OkResponse[Any] | ErrorResponse
#: ``OkResponse[Any]``, looked up once: pydantic finds a parametrised class in its cache by a key it builds per call
#: (~1 µs an answer).
_OK_ANY: Final = OkResponse[Any]


_ERRORS: dict[str, type[QmpnetError]] = {
    cls.code: cls
    for cls in (
        errors.InvalidRequest, errors.NotFound, errors.Conflict, errors.Busy, errors.Timeout, errors.RemovalPending,
        errors.GuestUnavailable, errors.NoFreeSlot, errors.Unsupported, errors.Forbidden, errors.OutcomeUnknown,
        errors.NotVerified, errors.StoreUnavailable,
    )
}  # fmt: skip


def error_from(body: Mapping[str, Any]) -> QmpnetError:
    """The exception for an answer's ``error`` object (the inverse of :meth:`ErrorBody.of`)."""
    code = str(body.get("code", "internal"))
    message = str(body.get("message", "no message"))
    field = body.get("field")
    if code == "qmp_error":
        return QmpCommandError(message, qmp_class=str(body.get("qmp_class", "")), command="")
    error = _ERRORS.get(code, QmpnetError)(message, field=field if isinstance(field, str) else None)
    if error.code != code:
        error.add_note(f"the controller's error code was {code!r}")
    return error


def data_of(answer: Mapping[str, Any]) -> dict[str, Any]:
    """The ``data`` of an answer, or raise the error it carries.

    Raises:
        QmpnetError: The subclass of the answer's error code (``internal`` for a malformed answer).
    """
    if answer.get("status") == "ok" and isinstance(answer.get("data"), dict):
        data: dict[str, Any] = answer["data"]
        return data
    error = answer.get("error")
    raise error_from(error if isinstance(error, dict) else {"message": f"malformed answer: {answer}"})


def error_response(transaction: str | None, err: QmpnetError) -> ErrorResponse:
    """The answer reporting ``err``."""
    return ErrorResponse(transaction=transaction, status="error", error=ErrorBody.of(err))


def ok_response(transaction: str | None, data: BaseModel) -> OkResponse[Any]:
    """The answer carrying ``data``."""
    return _OK_ANY(transaction=transaction, status="ok", data=data)


_CAPACITY: Final = {"capacity"}
_DATA: Final = {"data"}


def to_wire(message: BaseModel) -> bytes:
    """The JSON payload of ``message``. Optional members of error bodies and events are left out, not null."""
    if isinstance(message, ErrorResponse):
        body = message.error.model_dump(mode="json", exclude_none=True)
        return json.dumps({"transaction": message.transaction, "status": "error", "error": body}).encode()
    if type(message) is NicList:
        return ('{"nics":[' + ",".join(map(json_once, message.nics)) + "]}").encode()
    if type(message) is _OK_ANY and isinstance(message.data, BaseModel) and message.data.model_config.get("frozen"):
        # An answer's data, its last field, is most of it: a NIC is encoded once for the answer and again for the
        # retained NIC list (the same object), and pydantic's encoding of an ``Any`` field looks its type up first.
        head = message.model_dump_json(exclude=_DATA)
        return f'{head[:-1]},"data":{json_once(message.data)}}}'.encode()
    if type(message) is GuestStatus and message.capacity is not None:
        # The capacity, the status's last field, is most of it: a count made before is the same object (see
        # qmpnet.core.placement.capacity), published at every hot-add, whose JSON is kept.
        head = message.model_dump_json(exclude=_CAPACITY)
        return f'{head[:-1]},"capacity":{json_once(message.capacity)}}}'.encode()
    return message.model_dump_json(exclude_none=isinstance(message, EventMessage)).encode()


# ------------------------------------------------------------------------------------------------------ op table


@dataclass(frozen=True)
class OpSpec:
    """One op of the API: its name, where it is addressed, its request model and its data model."""

    name: str
    scope: Literal["guest", "controller"]
    request: type[_Request]
    data: type[BaseModel]
    summary: str


OPS: Final[Mapping[str, OpSpec]] = {
    spec.name: spec
    for spec in (
        OpSpec("nic/add", "guest", NicAddRequest, Nic, "Hot-add a NIC; atomic."),
        OpSpec("nic/del", "guest", NicDelRequest, RemoveResult, "Hot-remove a NIC."),
        OpSpec("nic/link", "guest", NicLinkRequest, Nic, "Set a NIC's link up or down."),
        OpSpec("nic/list", "guest", NicListRequest, NicList, "List the guest's NICs."),
        OpSpec("nic/update", "guest", NicUpdateRequest, Nic, "Change a NIC live: move, VLAN, shaping, link; atomic."),
        OpSpec("nic/capture", "guest", NicCaptureRequest, CaptureResult, "Start or stop a NIC's live capture."),
        OpSpec("models", "guest", ModelsRequest, ModelList, "List the NIC models QEMU offers."),
        OpSpec("slots", "guest", SlotsRequest, Capacity, "How many more NICs of each model fit now, and where."),
        OpSpec("guests", "controller", GuestsRequest, GuestList, "List the controller's guests."),
    )
}

EVENT_NAMES: Final[tuple[GuestEventName, ...]] = get_args(GuestEventName)


def transaction_of(payload: object) -> str | None:
    """The request's ``transaction`` if it is a string, for echoing even when the request is otherwise bad."""
    if isinstance(payload, dict):
        value = payload.get("transaction")
        if isinstance(value, str):
            return value
    return None


def parse_request(op: str, scope: Literal["guest", "controller"], payload: Mapping[str, Any]) -> _Request:
    """Validate ``payload`` as a request for ``op`` addressed at ``scope``.

    Raises:
        InvalidRequest: The op is unknown there, or a field is invalid; names the field.
    """
    spec = OPS.get(op)
    if spec is None or spec.scope != scope:
        known = ", ".join(name for name, s in OPS.items() if s.scope == scope)
        raise InvalidRequest(f"op: unknown {scope} op {op!r}; known: {known}", field="op")
    try:
        return spec.request.model_validate(payload)
    except ValidationError as err:
        raise invalid_request_from(err, "") from err
