"""Encoding a guest record for its file, reusing the JSON of the sub-records an earlier write encoded.

Kept apart from :mod:`.files` (which decides *when* and *how* a record reaches the disk): this is the CPU side of a
write. It keeps no state of its own: the JSON of each sub-record is encoded once per (frozen) object by
:func:`qmpnet.core.model_base.json_once`, which the retained NIC lists of the MQTT API share.
"""

from __future__ import annotations

from json.encoder import encode_basestring_ascii
from typing import TYPE_CHECKING, Final

from qmpnet.core.model_base import json_once

if TYPE_CHECKING:
    from qmpnet.core.records import GuestRecord

__all__ = ["encode_record"]

_string: Final = encode_basestring_ascii  # a JSON string, quoted and escaped (json's own C encoder)


#: The fields of a GuestRecord encoded from fragments; every other field is encoded by pydantic.
_MAPPED: Final = ("nics", "operations")


def encode_record(record: GuestRecord) -> bytes:
    """``record`` as the JSON document of the record file, reusing what earlier writes encoded.

    Records are frozen, and a change copies only what it changes (``GuestRecord.with_nic`` and the like keep the
    other NICs', operations' and desired specs' objects), so between two writes of a guest nearly every
    ``NicRecord``, ``OperationRecord`` and desired ``NicSpec`` is the very same object; encoding them again was
    most of a write's CPU. The document is the one ``record.model_dump_json()`` gives, field order aside (a unit
    test compares them); the other fields, present and future, are pydantic's own encoding.
    """
    fields = [
        (name, "{" + ",".join(f"{_string(key)}:{json_once(value)}" for key, value in getattr(record, name).items())
         + "}")
        for name in _MAPPED
    ]  # fmt: skip
    desired = record.desired
    if desired is None:
        fields.append(("desired", "null"))
    else:
        specs = "[" + ",".join(json_once(spec) for spec in desired.nics) + "]"
        fields.append(("desired", _with(desired.model_dump_json(exclude={"nics"}), [("nics", specs)])))
    return _with(record.model_dump_json(exclude={*_MAPPED, "desired"}), fields).encode()


def _with(document: str, fields: list[tuple[str, str]]) -> str:
    """The JSON object ``document`` with ``fields`` (name, encoded value) added at its end."""
    added = ",".join(f"{_string(name)}:{value}" for name, value in fields)
    return f"{document[:-1]}{',' if document != '{}' else ''}{added}}}"
