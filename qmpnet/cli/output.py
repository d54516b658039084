"""What a command prints on stdout: the MQTT API's JSON object (``--json``), or a readable table."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from pydantic import BaseModel


def emit(value: BaseModel | dict[str, Any], as_json: bool, table: Callable[[], str]) -> None:
    """Print ``value`` as JSON or as the readable ``table``."""
    if as_json:
        data = value if isinstance(value, dict) else value.model_dump(mode="json")
        print(json.dumps(data, indent=2))
    else:
        print(table())


def format_rows(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def one_line(text: str) -> str:
    """``text`` with its line breaks turned into spaces, for the one stderr line of an error."""
    return " ".join(text.split())
