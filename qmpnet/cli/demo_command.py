"""``qmpnet demo``: the command; the demo itself is :mod:`qmpnet.cli.demo`, loaded only when it runs."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from qmpnet.cli.connect import setup_logging
from qmpnet.cli.exits import run
from qmpnet.cli.options import VerboseOpt


class MachineArg(StrEnum):
    """Machine types of the demo guest."""

    pc = "pc"
    q35 = "q35"


def demo(
    machine: Annotated[MachineArg, typer.Option(help="Machine type of the demo guest.")] = MachineArg.pc,
    verbose: VerboseOpt = False,
) -> None:
    """Boot the test guest, hot-plug each NIC model and show what the guest saw."""
    from qmpnet.cli.demo import run_demo  # noqa: PLC0415 - the demo pulls in the guest builder only when asked for

    setup_logging(verbose)
    ok = run(run_demo("q35" if machine is MachineArg.q35 else "pc"))
    raise typer.Exit(0 if ok else 1)
