"""The ground the models stand on: the frozen base class, the small shared types, and field-named errors.

Every model of the edge derives from :class:`Frozen` (unknown fields are an error, instances never change), and
a pydantic error becomes an :class:`~qmpnet.errors.InvalidRequest` that names the JSON path of the field
(:func:`validate_as`).
"""

from __future__ import annotations

import functools
import weakref
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from qmpnet.core.names import check_qemu_id, normalize_mac
from qmpnet.errors import InvalidRequest

if TYPE_CHECKING:
    from collections.abc import Mapping

NicModel = Literal["virtio-net-pci", "e1000", "e1000e", "rtl8139"]
SUPPORTED_MODELS: tuple[NicModel, ...] = ("virtio-net-pci", "e1000", "e1000e", "rtl8139")
NicState = Literal["adding", "active", "removal_pending"]
#: Whether a change waits until the guest itself shows it (through its agent): ``True`` the interface (or, for a
#: link change, the carrier; for a removal, its absence), ``"address"`` also an address; ``False`` does not wait.
Verify = bool | Literal["address"]
LinkState = Literal["up", "down"]

QemuId = Annotated[str, AfterValidator(check_qemu_id)]
Mac = Annotated[str, AfterValidator(normalize_mac)]

#: Fields holding a discriminated union, and the union's tags (left out of an error's field path).
_UNION_FIELDS = frozenset({"backend", "addr", "local", "remote"})
_UNION_TAGS = frozenset(
    {"user", "hubport", "stream", "dgram", "bridge", "nat", "tap", "macvtap", "vfio", "unix", "inet", "passt"}
)


class Frozen(BaseModel):
    """A model of the edge: unknown fields are an error, and an instance never changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)


#: The configuration of a model that a direct-mode command never validates (the events, the results of the other
#: calls, the capacity report, the live update): pydantic builds its validator on first use instead of at import,
#: which a new process (``qmpnet nic add``) would pay for nothing (docs/performance.md). A model nested in one built
#: at import gains nothing from it.
BUILT_ON_FIRST_USE = ConfigDict(defer_build=True)

def empty_list() -> list[Any]:
    """``[]``: the default factory of a list field, ``list`` itself but cheaper for pydantic to look at.

    Building a model, pydantic reads the signature of each default factory; a builtin's is parsed from its text
    with :mod:`tokenize`, whose patterns the first parse compiles: ~14 M instructions for the first ``list``, ~0.6 M
    for each later one, ~0.1 M for a function; every new process pays it (docs/performance.md).
    """
    return []


M = TypeVar("M", bound=BaseModel)


def validate_as(model: type[M], data: Mapping[str, Any] | M, prefix: str) -> M:
    """Validate ``data`` into ``model`` (an instance of it passes as it is).

    Raises:
        InvalidRequest: A field is invalid; ``field`` holds its JSON path under ``prefix`` (``nic.backend.hostfwd.0``)
            and the message says why.
    """
    if isinstance(data, model):
        return data
    try:
        return model.model_validate(data)
    except InvalidRequest:
        raise
    except ValidationError as err:
        raise invalid_request_from(err, prefix) from err


def invalid_request_from(err: ValidationError, prefix: str) -> InvalidRequest:
    """Turn pydantic's first error into an :class:`InvalidRequest` naming the field."""
    first = err.errors(include_url=False)[0]
    parts: list[str] = [prefix] if prefix else []
    previous: object = None
    for part in first["loc"]:
        # A discriminated union puts the tag right after the union's field; it is noise for a caller.
        if not (previous in _UNION_FIELDS and part in _UNION_TAGS):
            parts.append(str(part))
        previous = part
    path = ".".join(parts)
    message = first["msg"].removeprefix("Value error, ")
    return InvalidRequest(f"{path}: {message}", field=path)


#: The JSON of frozen models already encoded, by object: id -> (weak reference, JSON); an entry goes with its object.
_JSON: dict[int, tuple[weakref.ref[BaseModel], str]] = {}


def json_once(model: BaseModel) -> str:
    """``model.model_dump_json()``, encoded once per object (for frozen models only: the JSON must not change).

    A guest's record and its retained NIC list are written again at every change of one NIC, and a change copies
    only what it changes: the other NICs are the very same objects each time, so their JSON is reused.
    """
    key = id(model)
    cached = _JSON.get(key)
    if cached is not None and cached[0]() is model:
        return cached[1]
    text = model.model_dump_json()
    _JSON[key] = (weakref.ref(model, functools.partial(_forget, key)), text)
    return text


def _forget(key: int, _gone: object) -> None:
    _JSON.pop(key, None)
