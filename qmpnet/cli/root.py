"""The ``qmpnet`` command: its ``--version``, its commands in the order ``--help`` lists them, and :func:`main`.

Direct mode talks to one guest's QMP socket (``--qmp``). Every command prints the same objects as the MQTT API
with ``--json`` (one JSON document on stdout), or a readable table without it. Exit status: 0 on success; 1 on
an error, with one line ``error: <code>: <message>`` on stderr; 2 on a usage error (from the argument parser),
also one line, ``error: invalid_request: <what>`` (:mod:`.exits`). Input is checked before anything is
connected to, as the MQTT API checks it. Logs of the libraries underneath (qemu.qmp, paho) show only with
``--verbose``.

Each command group has its module (:mod:`.nic`, :mod:`.net`, :mod:`.serve`, :mod:`.apply`, :mod:`.models`,
:mod:`.slots`, :mod:`.schema`, :mod:`.demo_command`); the options they share are in :mod:`.options`. Every qmpnet
module but the errors is imported inside the command that needs it, and a call that names a command imports and
builds that command alone (:func:`build_app`), so that ``qmpnet --help`` and a direct-mode ``nic add`` load only
what they use (docs/performance.md).
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Annotated

import typer

from qmpnet.cli.exits import invoke, pause_collector
from qmpnet.cli.signatures import ready

if TYPE_CHECKING:
    from collections.abc import Sequence

#: The commands in the order ``--help`` lists them: name -> (module, attribute). The attribute of a command group
#: (``nic``, ``net``) is its ``typer.Typer``, of a command the function.
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("qmpnet.cli.models", "models"),
    "slots": ("qmpnet.cli.slots", "slots"),
    "apply": ("qmpnet.cli.apply", "apply_cmd"),
    "guests": ("qmpnet.cli.serve", "guests"),
    "schema": ("qmpnet.cli.schema", "schema"),
    "serve": ("qmpnet.cli.serve", "serve"),
    "demo": ("qmpnet.cli.demo_command", "demo"),
    "nic": ("qmpnet.cli.nic", "app"),
    "net": ("qmpnet.cli.net", "app"),
}


def show_version(value: bool) -> None:
    """``--version``: print ``qmpnet <version>`` and exit."""
    if value:
        from qmpnet import __version__  # noqa: PLC0415 - the package's __init__ imports the API this module uses

        print(f"qmpnet {__version__}")
        raise typer.Exit


def root(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=show_version)
    ] = False,
) -> None:
    """Change the network of running QEMU guests over QMP, without a reboot."""


def build_app(args: Sequence[str]) -> typer.Typer:
    """The ``qmpnet`` command with what ``args`` can reach: the command they name, or every command.

    A command is a new process, and typer builds (and imports) every command it is given: a call that names a
    known command, and in a group a known subcommand, gets that one alone (docs/performance.md). Anything else
    (``--help`` of the root or of a group, an unknown name, which typer answers with the names it knows) gets the
    full tree; help, usage errors and exit statuses are the same either way.
    """
    # Plain help (click's layout): the rich panels print a type such as <bool> next to every flag.
    app = typer.Typer(
        name="qmpnet",
        help="Change the network of running QEMU guests over QMP, without a reboot.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
    )
    app.callback()(root)
    # The root and the groups take no option with a value, so the first word that is not an option names the command.
    words = [arg for arg in args if not arg.startswith("-")]
    named = words[0] if words and words[0] in COMMANDS else None
    for name, (module, attribute) in COMMANDS.items():
        if named not in (None, name):
            continue
        target = getattr(importlib.import_module(module), attribute)
        if not isinstance(target, typer.Typer):
            ready(target)
            app.command(name)(target)
            continue
        known = {info.name for info in target.registered_commands}
        if named is not None and len(words) > 1 and words[1] in known:
            target = _with_one_command(target, words[1])
        for info in target.registered_commands:
            if info.callback is not None:
                ready(info.callback)
        app.add_typer(target, name=name)
    return app


def _with_one_command(group: typer.Typer, name: str) -> typer.Typer:
    """A copy of command group ``group`` with its subcommand ``name`` alone."""
    one = typer.Typer()
    one.info = group.info
    one.registered_callback = group.registered_callback
    one.registered_commands = [info for info in group.registered_commands if info.name == name]
    return one


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``qmpnet`` console script; exits with the command's status.

    A usage error (unknown option, bad choice, missing argument) is one line on stderr and exit status 2.
    """
    if argv is None:
        pause_collector()
    args = sys.argv[1:] if argv is None else list(argv)
    sys.exit(invoke(build_app(args), args))
