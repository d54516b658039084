"""``qmpnet schema``: the JSON Schema of the MQTT API, or its field reference."""

from __future__ import annotations

import json
from typing import Annotated

import typer


def schema(
    markdown: Annotated[
        bool, typer.Option("--markdown", help="Print the field reference of docs/mqtt-api.md instead.")
    ] = False,
    asyncapi: Annotated[
        bool, typer.Option("--asyncapi", help="Print the AsyncAPI 3.0 document (docs/asyncapi.yaml) instead.")
    ] = False,
) -> None:
    """Print the JSON Schema of every MQTT request, response, retained state, event and desired document."""
    if markdown and asyncapi:
        raise typer.BadParameter("give one of --markdown and --asyncapi", param_hint="--markdown/--asyncapi")
    if asyncapi:
        from qmpnet.api.asyncapi import render_asyncapi  # noqa: PLC0415 - only this command needs it

        print(render_asyncapi(), end="")
        return
    from qmpnet.api.schema import api_schema, render_reference  # noqa: PLC0415 - only this command needs it

    print(render_reference() if markdown else json.dumps(api_schema(), indent=2), end="" if markdown else "\n")
