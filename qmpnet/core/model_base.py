"""The ground the models stand on: the frozen base class, the small shared types, and field-named errors.

Every model of the edge derives from :class:`Frozen` (unknown fields are an error, instances never change), and
a pydantic error becomes an :class:`~qmpnet.errors.InvalidRequest` that names the JSON path of the field
(:func:`validate_as`).
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, TypeVar, cast

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


_new: Final = object.__new__
_set: Final = object.__setattr__


def replaced(model: M, update: Mapping[str, Any]) -> M:
    """``model.model_copy(update=update)``, made directly: the same fields, fields set, and JSON.

    pydantic's copy is generic: three ``copy.copy`` calls and a look for private attributes, ~2 us a copy, and a
    hot-add makes ten. A model without extra fields and private attributes (every :class:`Frozen` one) is its
    ``__dict__`` and the names of the fields set, so the copy is those two, updated as pydantic updates them (in
    place, the order of the fields kept, ``update`` not validated). Any other model goes through pydantic's copy.
    """
    if model.__pydantic_extra__ is not None or model.__pydantic_private__ is not None:
        return model.model_copy(update=update)
    copied = _new(type(model))
    _set(copied, "__dict__", {**model.__dict__, **update})
    _set(copied, "__pydantic_extra__", None)
    _set(copied, "__pydantic_fields_set__", model.__pydantic_fields_set__ | update.keys())
    _set(copied, "__pydantic_private__", None)
    return copied


_Template = tuple[dict[str, Any], frozenset[str], tuple[tuple[str, Callable[[], Any]], ...]]
#: By model class: its fields with their defaults, in order (``None`` for the others, filled in by ``trusted``), the
#: names of its required fields, and the fields whose default a factory makes anew for each instance; ``None`` for a
#: model ``trusted`` validates (a validator, a constraint, a default pydantic would copy or a factory taking data).
_TEMPLATES: dict[type[BaseModel], _Template | None] = {}
#: Defaults shared as they are: pydantic copies any other kind for each instance.
_IMMUTABLE: Final = (type(None), bool, int, float, str)


def trusted(cls: type[M], values: dict[str, Any]) -> M:
    """``cls(**values)`` for values qmpnet made itself and knows valid, without validating them again.

    For a model without validators or private attributes, of fields whose values are given in their own type (a
    ``PciAddress`` of plan numbers, a ``NicRecord`` of a validated spec): validation would return each value as it
    is, at ~1-3 us a model, and a hot-add builds seven. The instance is the one ``cls(**values)`` gives: each field
    in the fields' order, a missing one its default (a factory's made anew), the fields set those of ``values``.
    Anything else (an unknown field, a missing required one) goes through ``cls(**values)``, which says what is wrong.
    """
    template = _TEMPLATES[cls] if cls in _TEMPLATES else _template(cls)
    if template is None:
        return cls(**values)
    defaults, required, made = template
    fields = {**defaults, **values}
    if len(fields) != len(defaults) or not values.keys() >= required:
        return cls(**values)
    for name, factory in made:
        if name not in values:
            fields[name] = factory()
    model = _new(cls)
    _set(model, "__dict__", fields)
    _set(model, "__pydantic_fields_set__", set(values))
    _set(model, "__pydantic_extra__", None)
    _set(model, "__pydantic_private__", None)
    return model


def _template(cls: type[BaseModel]) -> _Template | None:
    decorators = cls.__pydantic_decorators__
    validated = decorators.model_validators or decorators.field_validators or decorators.validators
    constrained = any(info.metadata for info in cls.model_fields.values())
    template: _Template | None = None
    if not (validated or constrained or cls.__private_attributes__ or cls.model_config.get("extra") == "allow"):
        template = _defaults(cls)
    _TEMPLATES[cls] = template
    return template


def _defaults(cls: type[BaseModel]) -> _Template | None:
    defaults: dict[str, Any] = {}
    required: set[str] = set()
    made: list[tuple[str, Callable[[], Any]]] = []
    for name, info in cls.model_fields.items():
        defaults[name] = None
        if info.is_required():
            required.add(name)
        elif info.default_factory is not None:
            if _takes_data(info.default_factory):
                return None
            made.append((name, cast("Callable[[], Any]", info.default_factory)))
        elif isinstance(info.default, _IMMUTABLE):
            defaults[name] = info.default
        else:
            return None
    return defaults, frozenset(required), tuple(made)


def _takes_data(factory: Callable[..., Any]) -> bool:
    """Whether pydantic calls ``factory`` with the data validated so far (its rule: one positional parameter)."""
    try:
        parameters = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature (dict): called without
        return False
    if len(parameters) != 1:
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return parameters[0].kind in positional and parameters[0].default is inspect.Parameter.empty
