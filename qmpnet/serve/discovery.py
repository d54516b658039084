"""The guest directory (``controller.guest_dir``): the ``*.qmp`` sockets in it are the guests to serve."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from qmpnet.api.wire.topics import is_bus_name
from qmpnet.core.names import BUS_NAME_RULE

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

__all__ = ["scans"]

log = logging.getLogger(__name__)

#: Seconds a directory's mtime must lie before a scan for that scan to be trusted to have seen every change
#: (file timestamps are coarse: a socket made just after the listing can carry the same mtime).
_MTIME_SLACK = 1.0


async def scans(directory: Path, interval: float) -> AsyncIterator[dict[str, str]]:
    """Every ``interval`` seconds, the guests in ``directory`` (name -> socket path) if it may have changed.

    Sockets whose names cannot be topics are skipped, with a warning when first seen. The next scan starts
    ``interval`` seconds after the caller has taken the last one.
    """
    unfit: set[str] = set()
    seen: tuple[float, float] | None = None  # (the directory's mtime, when the scan that saw it started)
    while True:
        stamp, started = await asyncio.to_thread(_mtime, directory), time.time()
        if stamp is not None and seen is not None and stamp == seen[0] and seen[1] - stamp > _MTIME_SLACK:
            # Unchanged since a scan that began well after its last change: nothing came or went (a fleet of
            # thousands is not re-listed every second).
            await asyncio.sleep(interval)
            continue
        seen = (stamp, started) if stamp is not None else None
        found, skipped = await asyncio.to_thread(_scan, directory)
        for path in skipped - unfit:
            log.warning("ignoring %s: its name is not a valid guest name (%s)", path, BUS_NAME_RULE)
        unfit = skipped
        yield found
        await asyncio.sleep(interval)


def _mtime(directory: Path) -> float | None:
    try:
        return directory.stat().st_mtime
    except OSError:
        return None


def _scan(directory: Path) -> tuple[dict[str, str], set[str]]:
    """The ``*.qmp`` sockets in ``directory`` by stem, and the paths skipped because their names cannot be topics."""
    found: dict[str, str] = {}
    skipped: set[str] = set()
    try:
        paths = sorted(directory.glob("*.qmp"))
    except OSError as err:
        log.warning("cannot read the guest directory %s: %s", directory, err)
        return found, skipped
    for path in paths:
        if not path.is_socket():
            continue
        if is_bus_name(path.stem):
            found[path.stem] = str(path)
        else:
            skipped.add(str(path))
    return found, skipped
