"""Encoding a guest record for its file, reusing the JSON of the sub-records an earlier write encoded.

Kept apart from :mod:`.files` (which decides *when* and *how* a record reaches the disk): this is the CPU side of a
write. The JSON of each sub-record is encoded once per (frozen) object by :func:`qmpnet.core.model_base.json_once`,
which the retained NIC lists of the MQTT API share; a guest's store keeps a :class:`RecordEncoder`, which also keeps
each sub-record's piece of the document from the write before, so that it is found without a look-up per object.
"""

from __future__ import annotations

from json.encoder import encode_basestring_ascii
from typing import TYPE_CHECKING, Any, Final

from qmpnet.core.model_base import json_once
from qmpnet.core.records import DesiredSet, GuestRecord

if TYPE_CHECKING:
    from pydantic import BaseModel

    from qmpnet.core.model import NicSpec

__all__ = ["RecordEncoder", "encode_record"]

_string: Final = encode_basestring_ascii  # a JSON string, quoted and escaped (json's own C encoder)


#: The fields of a GuestRecord encoded from fragments; every other field is encoded by pydantic.
_MAPPED: Final = ("nics", "operations")
_NOT_REST: Final = {*_MAPPED, "desired"}  # a set: what pydantic takes for exclude
#: The fields pydantic encodes, in the record's order.
_REST: Final = tuple(name for name in GuestRecord.model_fields if name not in _NOT_REST)
_NOT_DESIRED_REST: Final = {"nics"}
_DESIRED_REST: Final = tuple(name for name in DesiredSet.model_fields if name not in _NOT_DESIRED_REST)


def encode_record(record: GuestRecord) -> bytes:
    """``record`` as the JSON document of the record file, reusing what earlier writes encoded.

    Records are frozen, and a change copies only what it changes (``GuestRecord.with_nic`` and the like keep the
    other NICs', operations' and desired specs' objects), so between two writes of a guest nearly every
    ``NicRecord``, ``OperationRecord`` and desired ``NicSpec`` is the very same object; encoding them again was
    most of a write's CPU. The document is the one ``record.model_dump_json()`` gives, field order aside (a unit
    test compares them); the other fields, present and future, are pydantic's own encoding.
    """
    return RecordEncoder().encode(record)


class RecordEncoder:
    """:func:`encode_record` for the successive records of one guest, each built from the one before.

    It keeps, for each NIC, operation and desired spec of the record it encoded last, the object and its piece of
    the document (``"<key>":<JSON>``): the next record holds nearly all the same objects, and its pieces are then
    found by key and identity instead of through :func:`json_once`'s look-up by object (~1 us each, and a record of
    25 NICs has some 75 of them). It holds the last record's sub-records (which the store holds anyway) and
    nothing older. Not thread-safe: a store encodes on its event loop (the disk work alone goes to a thread).
    """

    __slots__ = ("_pieces", "_rests")

    def __init__(self) -> None:
        self._pieces: dict[str, dict[Any, tuple[BaseModel, str]]] = {}
        # For the record and its desired set: the values of the fields pydantic encodes, and their JSON object.
        self._rests: dict[str, tuple[list[object], str]] = {}

    def _rest_of(self, model: BaseModel, names: tuple[str, ...], exclude: set[str]) -> str:
        """``model`` without ``exclude``, as a JSON object, reused while its fields ``names`` hold the same objects.

        They do from one change of a NIC to the next: a record's name, boot and instance, a desired set's generation.
        """
        fields = model.__dict__
        values = [fields[name] for name in names]
        kind = type(model).__name__
        last = self._rests.get(kind)
        if last is not None and all(a is b for a, b in zip(values, last[0], strict=True)):
            return last[1]
        text = model.model_dump_json(exclude=exclude)
        self._rests[kind] = (values, text)
        return text

    def encode(self, record: GuestRecord) -> bytes:
        """``record`` as the JSON document of the record file (see :func:`encode_record`)."""
        fields = [(name, "{" + self._mapping(name, getattr(record, name)) + "}") for name in _MAPPED]
        desired = record.desired
        if desired is None:
            fields.append(("desired", "null"))
        else:
            specs = "[" + self._specs(desired.nics) + "]"
            rest = self._rest_of(desired, _DESIRED_REST, _NOT_DESIRED_REST)
            fields.append(("desired", _with(rest, [("nics", specs)])))
        return _with(self._rest_of(record, _REST, _NOT_REST), fields).encode()

    def _mapping(self, name: str, mapping: dict[str, BaseModel]) -> str:
        before = self._pieces.get(name, {})
        after: dict[Any, tuple[BaseModel, str]] = {}
        for key, value in mapping.items():
            piece = before.get(key)
            if piece is None or piece[0] is not value:
                piece = (value, f"{_string(key)}:{json_once(value)}")
            after[key] = piece
        self._pieces[name] = after
        return ",".join([piece[1] for piece in after.values()])

    def _specs(self, specs: list[NicSpec]) -> str:
        # By object (a list may hold one twice): the pieces kept hold their objects, so no id is reused meanwhile.
        before = self._pieces.get("desired", {})
        after: dict[Any, tuple[BaseModel, str]] = {}
        texts = []
        for spec in specs:
            piece = before.get(id(spec))
            if piece is None or piece[0] is not spec:
                piece = (spec, json_once(spec))
            after[id(spec)] = piece
            texts.append(piece[1])
        self._pieces["desired"] = after
        return ",".join(texts)


def _with(document: str, fields: list[tuple[str, str]]) -> str:
    """The JSON object ``document`` with ``fields`` (name, encoded value) added at its end."""
    added = ",".join(f"{_string(name)}:{value}" for name, value in fields)
    return f"{document[:-1]}{',' if document != '{}' else ''}{added}}}"
