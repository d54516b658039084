"""``qmpnet apply``: converge a guest to the NICs a file declares."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from qmpnet.cli.connect import GuestCall
from qmpnet.cli.exits import checked
from qmpnet.cli.options import guest_options
from qmpnet.cli.output import format_rows
from qmpnet.errors import InvalidRequest


@guest_options()
def apply_cmd(
    call: GuestCall,
    file: Annotated[Path, typer.Argument(metavar="FILE", help="TOML or JSON: `nics` = NICs in the NicSpec shape, "
                                         "each with an id; optional `generation`, `prune`.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and change nothing.")] = False,
    prune: Annotated[bool, typer.Option("--prune", help="Also remove NICs qmpnet created, not in FILE.")] = False,
) -> None:
    """Converge a guest to the NICs FILE declares: add what is missing, set links, keep the rest (idempotent)."""
    from qmpnet.core.desired_diff import parse_desired  # noqa: PLC0415 - only this command needs it
    from qmpnet.guest.apply_desired import apply_desired  # noqa: PLC0415 - only this command needs it

    desired = checked(lambda: parse_desired(read_document(file), source="apply"))
    if prune:
        desired = desired.model_copy(update={"prune": True})
    report = call.run(lambda target: apply_desired(target, desired, dry_run=dry_run))

    def table() -> str:
        rows = [("ACTION", "ID", "DETAIL")]
        failed = {e.id: e for e in report.errors}
        for change in report.plan:
            detail = change.link or change.reason or ""
            if change.id in failed and change.action != "conflict":
                detail = f"failed: {failed[change.id].code}: {failed[change.id].message}"
            elif change.id in report.pending:
                detail = "removal pending: the guest has not acked yet"
            rows.append((change.action, change.id, detail))
        verdict = "dry run: nothing was changed" if dry_run else ("converged" if report.converged else "not converged")
        return f"{format_rows(rows)}\n{verdict}"

    call.emit(report.model_dump(mode="json") | {"converged": report.converged}, table)
    if report.errors:
        first = report.errors[0]
        print(f"error: {first.code}: {len(report.errors)} of {len(report.plan)} NICs did not converge "
              f"(first: {first.id}: {first.message})", file=sys.stderr)
        raise typer.Exit(1)


def read_document(path: Path) -> dict[str, Any]:
    """A desired-state file as a dict: TOML (``.toml``) or JSON.

    Raises:
        InvalidRequest: The file cannot be read or parsed, or is not a table/object.
    """
    import tomllib  # noqa: PLC0415 - only apply reads TOML documents

    try:
        text = path.read_text()
    except OSError as err:
        raise InvalidRequest(f"FILE: cannot read {path}: {err.strerror or err}", field="FILE") from err
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as err:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise InvalidRequest(f"FILE: {path} is not valid {kind}: {err}", field="FILE") from err
    if not isinstance(data, dict):
        raise InvalidRequest(f"FILE: {path} must hold an object with `nics`", field="FILE")
    return data
