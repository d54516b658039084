"""The ``qmpnet`` command line (console script ``qmpnet = "qmpnet.cli:main"``).

:mod:`.root` is the command; each command group has its module (:mod:`.nic`, :mod:`.net`, :mod:`.serve`,
:mod:`.apply`, :mod:`.models`, :mod:`.schema`, :mod:`.demo_command`), the options they share are :mod:`.options`
(as data: :mod:`.flags`), how a command reaches its guest or host :mod:`.connect`, its output :mod:`.output` and
:mod:`.tables`, and its exit status :mod:`.exits`. :mod:`.quick` answers the ``nic`` commands a controller on this
host serves without loading typer or pydantic. :mod:`.demo` is the demo ``qmpnet demo`` runs.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``qmpnet`` console script; exits with the command's status.

    A ``nic`` command for a guest the controller on this host serves is answered by the quick path
    (:mod:`.quick`); everything else by the full command line (:func:`.root.main`).
    """
    from qmpnet.cli.quick import attempt  # noqa: PLC0415 - neither path loads the other

    status = attempt(sys.argv[1:] if argv is None else list(argv))
    if status is not None:
        sys.exit(status)
    from qmpnet.cli.root import main as full  # noqa: PLC0415

    full(argv)
