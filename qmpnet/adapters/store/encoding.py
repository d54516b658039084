"""Encoding a guest record for its file, reusing the JSON of the sub-records an earlier write encoded.

Kept apart from :mod:`.files` (which decides *when* and *how* a record reaches the disk): this is the CPU side of a
write. The JSON of each sub-record is encoded once per (frozen) object by :func:`qmpnet.core.model_base.json_once`,
which the retained NIC lists of the MQTT API share; a guest's store keeps a :class:`RecordEncoder`, which also keeps
each sub-record's piece of the document from the write before, so that it is found without a look-up per object.

The pieces are kept as UTF-8 bytes, each with the comma that separates it from the one before, so that the document
is one ``b"".join`` of them and a few constant parts, its only copy: a record of 25 NICs is some 40 KB, and each
copy of the whole document (the pieces of a field joined, then the fields, then the str encoded) was paid per write.
"""

from __future__ import annotations

from itertools import compress
from json.encoder import encode_basestring_ascii
from operator import is_, is_not
from typing import TYPE_CHECKING, Final

from qmpnet.core.model_base import json_once
from qmpnet.core.records import DesiredSet, GuestRecord

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pydantic import BaseModel

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

    It keeps, for the NICs, the operations and the desired specs of the record it encoded last, their keys, objects
    and pieces of the document (``"<key>":<JSON>`` as UTF-8, after a comma but the first), in order. The
    next record holds nearly all the same objects in the same order (a change replaces one entry or adds one at the
    end), so its pieces are those kept, found by comparing the lists by identity in C, with the few that differ
    encoded (through :func:`json_once`): a record of 25 NICs has some 75 pieces, and a look-up of each (~1 us) was
    most of a write's CPU. A piece is only ever reused at its own place, which is what lets it carry its comma. It
    holds the last record's sub-records (which the store holds anyway) and nothing older. Not thread-safe: a store
    encodes (and writes) on its event loop.
    """

    __slots__ = ("_last", "_rests")

    def __init__(self) -> None:
        # By field: the last record's keys (None for the desired list), objects and pieces.
        self._last: dict[str, tuple[list[str] | None, Sequence[BaseModel], list[bytes]]] = {}
        # For the record and its desired set: the values of the fields pydantic encodes, and their JSON object left
        # open for the fields that follow (see _opened).
        self._rests: dict[str, tuple[list[object], bytes]] = {}

    def encode(self, record: GuestRecord) -> bytes:
        """``record`` as the JSON document of the record file (see :func:`encode_record`)."""
        # The parts of the document in order, joined once: the only copy of the whole document.
        parts = [self._rest_of(record, _REST, _NOT_REST)]
        for name in _MAPPED:
            mapping = getattr(record, name)
            parts.append(_OPEN[name])
            parts += self._pieces(name, list(mapping), list(mapping.values()))
            parts.append(b"}")
        desired = record.desired
        if desired is None:
            parts.append(_NO_DESIRED)
        else:
            parts.append(_DESIRED)
            parts.append(self._rest_of(desired, _DESIRED_REST, _NOT_DESIRED_REST))
            parts.append(_SPECS)
            parts += self._pieces("desired", None, desired.nics)
            parts.append(b"]}")
        parts.append(b"}")
        return b"".join(parts)

    def _pieces(self, name: str, keys: list[str] | None, values: Sequence[BaseModel]) -> list[bytes]:
        """The pieces of ``values`` (under ``keys``): the last record's kept where it had the same at the same place."""
        last = self._last.get(name)
        kept = 0  # how many places, from the first, held the same keys last time
        if last is not None:
            last_keys, last_values, last_pieces = last
            kept = min(len(values), len(last_values))
            if keys is not None and last_keys is not None and keys[:kept] != last_keys[:kept]:
                kept = 0  # a NIC removed or the order changed: every piece from json_once again
        pieces = last_pieces[:kept] if kept else []
        if kept:
            for at in compress(range(kept), map(is_not, values[:kept], last_values[:kept])):
                pieces[at] = self._piece(keys, values, at)
        pieces.extend(self._piece(keys, values, at) for at in range(kept, len(values)))
        self._last[name] = (keys, list(values), pieces)  # a copy: the values of this record, whatever becomes of it
        return pieces

    @staticmethod
    def _piece(keys: list[str] | None, values: Sequence[BaseModel], at: int) -> bytes:
        """The piece at place ``at``, with the comma before it unless it is the first (it stays at its place)."""
        text = json_once(values[at])
        if keys is not None:
            text = f"{_string(keys[at])}:{text}"
        return f",{text}".encode() if at else text.encode()

    def _rest_of(self, model: BaseModel, names: tuple[str, ...], exclude: set[str]) -> bytes:
        """``model`` without ``exclude``, as a JSON object left open for more fields (:func:`_opened`).

        Reused while its fields ``names`` hold the same objects. They do from one change of a NIC to the next: a
        record's name, boot and instance, a desired set's generation.
        """
        fields = model.__dict__
        values = [fields[name] for name in names]
        kind = type(model).__name__
        last = self._rests.get(kind)
        if last is not None and all(map(is_, values, last[0])):
            return last[1]
        opened = _opened(model.model_dump_json(exclude=exclude))
        self._rests[kind] = (values, opened)
        return opened


def _opened(document: str) -> bytes:
    """The JSON object ``document`` without its closing brace, ready for more fields (a comma after any it has)."""
    return f"{document[:-1]}{',' if document != '{}' else ''}".encode()


def _field(name: str, opening: str) -> bytes:
    """The start of the field ``name`` of a JSON object: its name, the colon and ``opening``."""
    return f"{_string(name)}:{opening}".encode()


# The constant parts of the document, between the pieces (each field's but the first after a comma).
_OPEN: Final = {name: (b"," if at else b"") + _field(name, "{") for at, name in enumerate(_MAPPED)}
_DESIRED: Final = b"," + _field("desired", "")
_NO_DESIRED: Final = _DESIRED + b"null"
_SPECS: Final = _field("nics", "[")
