"""The JSON Schema of the MQTT API, generated from the pydantic models of :mod:`qmpnet.api.wire.envelopes`.

``qmpnet schema`` prints :func:`api_schema`; ``docs/mqtt-api.schema.json`` is that output, checked in, and the
field reference in ``docs/mqtt-api.md`` is :func:`render_reference` between two marker comments. A test compares
both with what the code generates, so the documentation cannot drift from the wire format. Regenerate with::

    qmpnet schema > docs/mqtt-api.schema.json
    python -c 'import pathlib, qmpnet.api.schema as s; s.update_docs(pathlib.Path("docs/mqtt-api.md"))'
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Final

from pydantic.json_schema import models_json_schema

from qmpnet.api.wire import envelopes
from qmpnet.core.records import DesiredDocument

if TYPE_CHECKING:
    from pathlib import Path

    from pydantic import BaseModel

__all__ = ["BEGIN_MARKER", "END_MARKER", "api_schema", "render_reference", "update_docs"]

BEGIN_MARKER: Final = "<!-- BEGIN GENERATED REFERENCE (qmpnet schema --markdown) -->"
END_MARKER: Final = "<!-- END GENERATED REFERENCE -->"
_REF: Final = "#/$defs/{model}"


def _messages() -> dict[str, dict[str, type[BaseModel]]]:
    """Every message of the API by section and name."""
    ops = envelopes.OPS
    responses: dict[str, type[BaseModel]] = {name: envelopes.OkResponse[spec.data] for name, spec in ops.items()}  # type: ignore[name-defined]
    return {
        "requests": {name: spec.request for name, spec in ops.items()},
        "responses": {**responses, "error": envelopes.ErrorResponse},
        "state": {
            "status (online)": envelopes.ControllerOnline,
            "status (offline)": envelopes.ControllerOffline,
            "guest/<g>/status": envelopes.GuestStatus,
            "guest/<g>/nics": envelopes.NicList,
        },
        "events": {"guest/<g>/event/<name>": envelopes.EventMessage},
        "desired": {"guest/<g>/desired": DesiredDocument},
    }


def api_schema() -> dict[str, Any]:
    """The JSON Schema document of every request, response, retained state, event and desired document."""
    sections = _messages()
    models = [model for section in sections.values() for model in section.values()]
    keys, top = models_json_schema([(model, "validation") for model in models], ref_template=_REF)
    document: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "qmpnet MQTT API",
        "description": "Messages of docs/mqtt-api.md; topics are <root>/<controller>/..., payloads UTF-8 JSON.",
        "x-api-version": envelopes.API_VERSION,
        "x-event-names": list(envelopes.EVENT_NAMES),
    }
    for section, messages in sections.items():
        document[f"x-{section}"] = {name: keys[model, "validation"] for name, model in messages.items()}
    document["$defs"] = top.get("$defs", {})
    return document


def render_reference() -> str:
    """The field reference of docs/mqtt-api.md: one table per message, generated from the schema."""
    schema = api_schema()
    defs: dict[str, Any] = schema["$defs"]
    lines = [BEGIN_MARKER, ""]
    titles = {
        "requests": "Requests",
        "responses": "Responses",
        "state": "Retained state",
        "desired": "Desired state (retained, published by the orchestrator)",
        "events": "Events",
    }
    shown: set[str] = set()
    for section, title in titles.items():
        lines += [f"### {title}", ""]
        for name, ref in schema[f"x-{section}"].items():
            model = ref["$ref"].rsplit("/", 1)[1]
            shown.add(model)
            lines += _table(f"`{name}` ({model})", defs[model], defs)
    lines += [f"Event names: {', '.join(f'`{name}`' for name in schema['x-event-names'])}.", ""]
    lines += ["### Types", ""]
    for model in sorted(set(defs) - shown):
        lines += _table(model, defs[model], defs)
    lines.append(END_MARKER)
    return "\n".join(lines) + "\n"


def _table(title: str, schema: dict[str, Any], defs: dict[str, Any]) -> list[str]:
    required = set(schema.get("required", []))
    rows = [f"#### {title}", ""]
    if schema.get("description"):
        rows += [" ".join(str(schema["description"]).split()), ""]
    rows += ["| field | type | required | description |", "|---|---|---|---|"]
    for field, prop in schema.get("properties", {}).items():
        description = str(prop.get("description", "")).replace("|", "\\|")
        mark = "yes" if field in required else "no"
        rows.append(f"| `{field}` | {_type(prop, defs)} | {mark} | {description} |")
    return [*rows, ""]


def _type(prop: dict[str, Any], defs: dict[str, Any]) -> str:
    """A short human rendering of a property's JSON Schema type."""
    if "$ref" in prop:
        return str(prop["$ref"]).rsplit("/", 1)[1]
    if "const" in prop or "enum" in prop:
        return " \\| ".join(f"`{json.dumps(value)}`" for value in prop.get("enum", [prop.get("const")]))
    options = prop.get("anyOf") or prop.get("oneOf")
    if options:
        return " \\| ".join(_type(option, defs) for option in options)
    kind = str(prop.get("type", "any"))
    if kind == "array":
        return f"array of {_type(prop.get('items', {}), defs)}"
    if kind == "object" and isinstance(prop.get("additionalProperties"), dict):
        return f"object of {_type(prop['additionalProperties'], defs)}"
    return kind


def update_docs(path: Path) -> bool:
    """Replace the generated reference in the Markdown file at ``path``; returns whether it changed."""
    text = path.read_text()
    start, end = text.index(BEGIN_MARKER), text.index(END_MARKER) + len(END_MARKER) + 1
    updated = text[:start] + render_reference() + text[end:]
    if updated != text:
        path.write_text(updated)
    return updated != text
