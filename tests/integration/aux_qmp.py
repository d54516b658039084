"""A second QMP monitor on a test machine, to look at (and change) QEMU independently of qmpnet's connection.

QEMU serves one client per monitor socket, so tests that check QEMU's state behind qmpnet's back start the machine
with :func:`aux_args` and talk to ``<workdir>/aux.qmp``. Test modules import this as ``from aux_qmp import ...``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from qemu.qmp import QMPClient

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

__all__ = ["AUX_QMP", "aux_args", "aux_monitor", "hmp"]

AUX_QMP = "aux.qmp"


def aux_args(workdir: Path) -> list[str]:
    """QEMU arguments for a second QMP monitor at ``workdir/aux.qmp``."""
    return ["-qmp", f"unix:{workdir / AUX_QMP},server=on,wait=off"]


@contextlib.asynccontextmanager
async def aux_monitor(workdir: Path) -> AsyncIterator[QMPClient]:
    """A QMP client on ``workdir/aux.qmp``, disconnected on exit."""
    client = QMPClient("aux")
    await client.connect(str(workdir / AUX_QMP))
    try:
        yield client
    finally:
        await client.disconnect()


async def hmp(workdir: Path, command: str) -> str:
    """Run HMP ``command`` (e.g. ``info network``) over ``workdir``'s aux monitor."""
    async with aux_monitor(workdir) as aux:
        return str(await aux.execute("human-monitor-command", {"command-line": command}))
