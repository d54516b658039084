"""The undo stack: how a change that fails half-way leaves the host and the guest exactly as before.

A hot-add (:mod:`.hotadd_steps`) and a live change (:mod:`.update`) are each several actions on the host and in
QEMU. Every action that succeeds pushes the action that reverts it; if a later one fails with a QEMU error the stack
unwinds newest first. It is its own module because both runners use it and neither owns the other.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from qmpnet.errors import QmpnetError, RemovalPending

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["UndoStack"]

log = logging.getLogger(__name__)


class UndoStack:
    """Actions that revert what succeeded so far, run in reverse by :meth:`unwind`."""

    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], Awaitable[object]]]] = []

    def push(self, label: str, action: Callable[[], Awaitable[object]]) -> None:
        """Remember how to revert the step called ``label``."""
        self._actions.append((label, action))

    async def unwind(self, cause: QmpnetError) -> bool:
        """Run the undo actions, newest first; failures are logged and noted on ``cause``, never raised.

        Returns:
            ``False`` if unwinding had to stop because the guest has not released a device it was asked to
            unplug: what the device still uses (its netdev, the tap) must then stay until it does.
        """
        while self._actions:
            label, action = self._actions.pop()
            try:
                await action()
            except RemovalPending as err:
                log.warning("rollback stopped at %s: %s", label, err)
                cause.add_note(f"rollback incomplete: {err}; its backend is removed once the guest releases it")
                return False
            except QmpnetError as err:
                log.warning("rollback of %s failed: %s", label, err)
                cause.add_note(f"rollback of {label} failed: {err}")
        return True
