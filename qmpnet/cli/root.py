"""The ``qmpnet`` command: its ``--version``, its commands in the order ``--help`` lists them, and :func:`main`.

Direct mode talks to one guest's QMP socket (``--qmp``). Every command prints the same objects as the MQTT API
with ``--json`` (one JSON document on stdout), or a readable table without it. Exit status: 0 on success; 1 on
an error, with one line ``error: <code>: <message>`` on stderr; 2 on a usage error (from the argument parser),
also one line, ``error: invalid_request: <what>`` (:mod:`.exits`). Input is checked before anything is
connected to, as the MQTT API checks it. Logs of the libraries underneath (qemu.qmp, paho) show only with
``--verbose``.

Each command group has its module (:mod:`.nic`, :mod:`.net`, :mod:`.serve`, :mod:`.apply`, :mod:`.models`,
:mod:`.slots`, :mod:`.schema`, :mod:`.demo_command`); the options they share are in :mod:`.options`. Every qmpnet
module but the errors is imported inside the command that needs it, so that ``qmpnet --help`` and a direct-mode
``nic add`` load only what they use (docs/performance.md).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from qmpnet.cli import apply, demo_command, models, net, nic, schema, serve, slots
from qmpnet.cli.exits import invoke, pause_collector

if TYPE_CHECKING:
    from collections.abc import Sequence

# Plain help (click's layout): the rich panels print a type such as <bool> next to every flag.
app = typer.Typer(
    name="qmpnet",
    help="Change the network of running QEMU guests over QMP, without a reboot.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.command("models")(models.models)
app.command("slots")(slots.slots)
app.command("apply")(apply.apply_cmd)
app.command("guests")(serve.guests)
app.command("schema")(schema.schema)
app.command("serve")(serve.serve)
app.command("demo")(demo_command.demo)
app.add_typer(nic.app, name="nic")
app.add_typer(net.app, name="net")


def show_version(value: bool) -> None:
    """``--version``: print ``qmpnet <version>`` and exit."""
    if value:
        from qmpnet import __version__  # noqa: PLC0415 - the package's __init__ imports the API this module uses

        print(f"qmpnet {__version__}")
        raise typer.Exit


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=show_version)
    ] = False,
) -> None:
    """Change the network of running QEMU guests over QMP, without a reboot."""


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``qmpnet`` console script; exits with the command's status.

    A usage error (unknown option, bad choice, missing argument) is one line on stderr and exit status 2.
    """
    if argv is None:
        pause_collector()
    sys.exit(invoke(app, sys.argv[1:] if argv is None else argv))
