"""docs/mqtt-api.md and docs/mqtt-api.schema.json cannot drift from the models the code sends and accepts."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import get_args

from qmpnet.api.schema import BEGIN_MARKER, END_MARKER, api_schema, render_reference
from qmpnet.api.wire.envelopes import EVENT_NAMES, OPS
from qmpnet.errors import ErrorCode

DOCS = Path(__file__).parents[3] / "docs"
REGENERATE = "out of date: regenerate as qmpnet/api/schema.py's docstring says"


def test_the_checked_in_schema_is_the_generated_one() -> None:
    assert json.loads((DOCS / "mqtt-api.schema.json").read_text()) == api_schema(), REGENERATE


def test_the_reference_in_the_doc_is_the_generated_one() -> None:
    text = (DOCS / "mqtt-api.md").read_text()
    start, end = text.index(BEGIN_MARKER), text.index(END_MARKER) + len(END_MARKER) + 1
    assert text[start:end] == render_reference(), REGENERATE


def test_the_doc_names_every_op_event_and_error_code() -> None:
    text = (DOCS / "mqtt-api.md").read_text()
    prose = text[: text.index(BEGIN_MARKER)]
    table_ops = set(re.findall(r"^\| (?:controller )?`([a-z/]+)` \|", prose, flags=re.MULTILINE))
    assert table_ops == set(OPS)
    for name in EVENT_NAMES:
        assert f"`{name}`" in prose, name
    for code in get_args(ErrorCode):
        assert f"`{code}`" in prose, code


def test_the_schema_covers_every_message() -> None:
    schema = api_schema()
    assert set(schema["x-requests"]) == set(OPS)
    assert set(schema["x-responses"]) == {*OPS, "error"}
    assert schema["x-event-names"] == list(EVENT_NAMES)
    for section in ("x-requests", "x-responses", "x-state", "x-events"):
        for ref in schema[section].values():
            assert ref["$ref"].removeprefix("#/$defs/") in schema["$defs"]
    add = schema["$defs"]["NicAddRequest"]
    assert add["additionalProperties"] is False
    assert add["required"] == ["nic"]
