"""How a command ends: exit status 0, or 1 with one ``error: <code>: <message>`` line, or 2 for a usage error.

Also the cyclic garbage collector's pause while a command imports what it needs (docs/performance.md): it is part
of every command's start and end, so it sits with :func:`run`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from typing import TYPE_CHECKING, Any, TypeVar

import typer

from qmpnet.cli.output import one_line
from qmpnet.errors import QmpnetError

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Sequence


T = TypeVar("T")

log = logging.getLogger(__name__)

_COLLECTOR_PAUSED = False


def pause_collector() -> None:
    """Turn the cyclic collector off until :func:`started` (a command's start frees almost nothing it builds)."""
    global _COLLECTOR_PAUSED  # noqa: PLW0603 - one process-wide switch, set once per command
    if gc.isenabled():
        # A command's start builds hundreds of thousands of objects (pydantic models and their schemas) and frees
        # almost none: the cyclic collector would walk them again and again, for nothing. It is off until the
        # command has imported what it needs (started()), and what exists by then stays out of later collections
        # (docs/performance.md).
        gc.disable()
        _COLLECTOR_PAUSED = True


def started() -> None:
    """The command has loaded what it needs: collect garbage again, leaving out everything made so far."""
    global _COLLECTOR_PAUSED  # noqa: PLW0603 - one process-wide switch, set once per command
    if _COLLECTOR_PAUSED:
        _COLLECTOR_PAUSED = False
        gc.freeze()
        gc.enable()


def invoke(app: typer.Typer, args: Sequence[str]) -> int:
    """Run ``app`` on ``args``; a usage error (unknown option, bad choice, missing argument) is one stderr line."""
    try:
        status = typer.main.get_command(app).main(args=list(args), prog_name="qmpnet", standalone_mode=False)
    except typer.TyperException as err:  # the argument parser's errors (typer >= 0.28 vendors click's)
        ctx = getattr(err, "ctx", None)
        if type(err).__name__ == "NoArgsIsHelpError":  # a group without its command: the help (as typer tells it)
            print(err.format_message(), file=sys.stderr)
        else:
            hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
            message = one_line(err.format_message()).replace("Value error, ", "")
            print(f"error: invalid_request: {message}{hint}", file=sys.stderr)
        status = err.exit_code
    except typer.Abort:
        print("error: internal: aborted", file=sys.stderr)
        status = 1
    finally:
        started()
    return status if isinstance(status, int) else 0


def fail(err: QmpnetError) -> typer.Exit:
    """Print ``error: <code>: <message>`` on stderr and return the exit to raise."""
    print(f"error: {err.code}: {one_line(err.message)}", file=sys.stderr)
    return typer.Exit(1)


def checked(check: Callable[[], T]) -> T:
    """``check()``'s result; an input error it raises becomes the one-line ``error:`` exit, before any connection."""
    try:
        return check()
    except QmpnetError as err:
        raise fail(err) from None


def run(work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` to its end; a qmpnet error, or any other (a bug), becomes the one-line ``error:`` exit."""
    started()
    try:
        return asyncio.run(work)
    except QmpnetError as err:
        raise fail(err) from None
    except Exception as err:
        log.debug("the command failed", exc_info=True)
        raise fail(QmpnetError(f"{type(err).__name__}: {err} (--verbose shows where)")) from None
