"""A fault hook that exists in tests only: run a qmpnet command and kill the process right after a QMP command.

    python tests/integration/faults.py --die-after netdev_add -- nic add --qmp SOCK --id x1
    python tests/integration/faults.py --die-after device_add --nth 3 -- serve --broker ... --guest vm=SOCK
    python tests/integration/faults.py --die-before netdev_add -- nic add --qmp SOCK --backend passt

The process ends with ``os._exit(137)`` (what SIGKILL looks like to a parent) as soon as QEMU has answered the
named command — or, with ``--nth N``, the N-th time it has. Nothing is flushed, no ``finally`` runs, no lock file
is unlocked by qmpnet (the kernel drops it): exactly a ``kill -9`` at the worst moment, between two QMP commands.
Product code has no such hook; this script patches the QMP adapter from outside. With ``--die-before`` the process
ends just before the named command is sent instead (after the host work that precedes it, such as starting passt).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from qmpnet.adapters.qmp.monitor import QmpMonitor
from qmpnet.cli import main

if TYPE_CHECKING:
    from collections.abc import Mapping

KILLED = 137


def install(command: str, nth: int, *, before: bool = False) -> None:
    """Make every monitor exit the process once ``command`` has been answered ``nth`` times in all (or is sent)."""
    original = QmpMonitor.execute
    seen = 0

    async def execute(self: QmpMonitor, name: str, arguments: Mapping[str, object] | None = None) -> object:
        nonlocal seen
        if before and name == command:
            os._exit(KILLED)
        answer = await original(self, name, arguments)
        if name == command:
            seen += 1
            if seen >= nth:
                os._exit(KILLED)
        return answer

    QmpMonitor.execute = execute  # type: ignore[method-assign,assignment]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    when = parser.add_mutually_exclusive_group(required=True)
    when.add_argument("--die-after", help="The QMP command after whose answer to die.")
    when.add_argument("--die-before", help="The QMP command before which to die (it is never sent).")
    parser.add_argument("--nth", type=int, default=1, help="Die after the N-th such answer.")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="-- then the qmpnet command line.")
    options = parser.parse_args()
    rest = options.rest[1:] if options.rest[:1] == ["--"] else options.rest
    install(options.die_after or options.die_before, options.nth, before=options.die_before is not None)
    sys.argv = ["qmpnet", *rest]
    main(rest)
