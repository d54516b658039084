"""Everything of qmpnet that touches a private name of ``qemu.qmp``, in one room (pinned: ``qemu.qmp==0.0.6``).

Why the public API does not suffice:

* **Memory.** ``EventListener`` keeps every event it accepts in a history that nobody can switch off, and
  ``QMPClient`` queues every event on an always-on default listener (``events``). For a guest that emits events for
  months that is a leak. :class:`FlatListener` overrides ``put`` to queue without the history (the queue is the
  private ``_queue``), and :class:`FlatClient` swaps it in for the default listener (removed from the private
  ``_listeners``, the list ``register_listener`` appends to).
* **Speed.** ``QMPClient.execute`` builds a ``Message``, copies it, serialises it twice and hands it to a writer
  task through a queue: about a third of the library's overhead per command on a busy two-core host.
  :class:`FlatClient` overrides ``_issue`` and ``execute`` to write the command to the transport at once when
  nothing is queued (``_outgoing`` empty, ``_writer`` present), registering its reply slot in ``_pending`` as the
  library does (:class:`Reply`, one future instead of an ``asyncio.Queue``), with the id from ``_get_exec_id``, the
  bytes sent by ``_do_send`` and the reply taken by ``_reply``. Replies and errors are handled exactly as
  ``QMPClient.execute_msg`` does. It also skips ``_cb_outbound``/``_cb_inbound``, which format every message for a
  debug line even when debug logging is off.
* **No public accessors:** ``EventListener`` has no ``get_nowait`` (:func:`take_nowait` reads its ``_queue``), and
  ``QMPClient`` does not expose its socket (:func:`peer_socket` reads ``_writer``), which the adapter needs for the
  peer's credentials (QEMU's pid).

tests/unit/adapters/qmp/test_qemu_qmp_internals.py is the contract: it fails, naming the attribute, when a new version
of ``qemu.qmp`` removes or changes any of these; ``pyproject.toml`` pins the version exactly. No other module of
qmpnet uses a private name of ``qemu.qmp`` (that test checks it too).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final, cast

from qemu.qmp import EventListener, ExecInterruptedError, ExecuteError, Message, QMPClient
from qemu.qmp.models import ErrorResponse
from qemu.qmp.protocol import Runstate
from qemu.qmp.qmp_client import BadReplyError

if TYPE_CHECKING:
    import socket
    from collections.abc import Mapping

__all__ = ["PRIVATE_NAMES", "FlatClient", "FlatListener", "Reply", "peer_socket", "take_nowait"]

#: The private names of qemu.qmp used here, by class: what the contract test checks.
PRIVATE_NAMES: Final = {
    "QMPClient": ("_issue", "_reply", "_do_send", "_get_exec_id", "_cb_outbound", "_cb_inbound", "_pending",
                  "_outgoing", "_writer", "_listeners"),
    "EventListener": ("_queue",),
}


class FlatListener(EventListener):
    """An ``EventListener`` that keeps no history (qemu.qmp's grows without bound)."""

    async def put(self, event: Message) -> None:
        """Queue ``event`` if accepted, and keep nothing else."""
        if self.accept(event):
            await self._queue.put(event)


def take_nowait(listener: EventListener) -> Message | None:
    """The next event queued on ``listener`` without waiting, or ``None`` (``EventListener`` has no ``get_nowait``)."""
    if listener.empty():
        return None
    return listener._queue.get_nowait()  # noqa: SLF001 - see the module docstring


def peer_socket(client: QMPClient) -> socket.socket | None:
    """The socket ``client`` is connected over, if any (qemu.qmp has no public accessor for it).

    asyncio hands out a ``TransportSocket``, a view of the socket with the same read-only methods.
    """
    writer = client._writer  # noqa: SLF001 - see the module docstring
    return cast("socket.socket | None", writer.get_extra_info("socket")) if writer is not None else None


class Reply:
    """The one answer a command awaits: what qemu.qmp uses an ``asyncio.Queue(maxsize=1)`` for, on one future.

    qemu.qmp puts the reply (``put``) or, on disconnect, an ``ExecInterruptedError`` (``put_nowait``) and
    ``_reply`` takes it (``get``). A queue costs a deque and two waiter lists per command.
    """

    __slots__ = ("_answer",)

    def __init__(self) -> None:
        self._answer: asyncio.Future[object] = asyncio.get_running_loop().create_future()

    async def put(self, item: object) -> None:
        """Deliver the answer (a reply, or the ``ExecInterruptedError`` of a lost connection)."""
        self.put_nowait(item)

    def put_nowait(self, item: object) -> None:
        """Deliver the answer; a second one is dropped (there is one per command)."""
        if not self._answer.done():
            self._answer.set_result(item)

    async def get(self) -> object:
        """Wait for the answer."""
        return await self._answer


class FlatClient(QMPClient):
    """``QMPClient`` with a history-free default listener and a direct write path for commands."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._listeners.remove(self.events)
        self.events = FlatListener()
        self.register_listener(self.events)

    async def _issue(self, msg: Message) -> str | None:
        # qemu.qmp hands every command to a writer task through a queue: one more task switch per command,
        # which on a busy two-core host is a third of the library's overhead. When nothing is queued, write the
        # command to the transport here (asyncio buffers it; order is kept because the queue is empty).
        if not self._outgoing.empty() or self._writer is None:
            return await super()._issue(msg)
        msg_id = cast("str | None", msg.get("id"))
        self._pending[msg_id] = asyncio.Queue(maxsize=1)
        try:
            self._do_send(self._cb_outbound(msg))
        except BaseException:
            del self._pending[msg_id]
            raise
        return msg_id

    async def execute(self, cmd: str, arguments: Mapping[str, object] | None = None, oob: bool = False) -> object:
        """As ``QMPClient.execute``: QEMU's ``return`` value, or ``ExecuteError``/``BadReplyError``."""
        # qemu.qmp builds a command as a Message, copies it (execute_msg) and serialises it twice on the way (each
        # Message is eagerly encoded): about 15 us per command. On the direct write path (see _issue) the command
        # is built and encoded once here; replies and errors are handled exactly as QMPClient.execute_msg does.
        if oob or self._writer is None or not self._outgoing.empty() or self.runstate != Runstate.RUNNING:
            return await super().execute(cmd, arguments, oob)
        exec_id = self._get_exec_id()
        body: dict[str, object] = {"execute": cmd}
        if arguments is not None:
            body["arguments"] = arguments
        body["id"] = exec_id
        msg = Message(body, eager=False)
        self._pending[exec_id] = cast("asyncio.Queue[Message | ExecInterruptedError]", Reply())
        try:
            self._do_send(self._cb_outbound(msg))
        except BaseException:
            del self._pending[exec_id]
            raise
        reply = await self._reply(exec_id)
        if "error" in reply:
            try:
                error = ErrorResponse(reply)
            except (KeyError, TypeError) as err:
                raise BadReplyError("QMP error reply is malformed", reply, msg) from err
            raise ExecuteError(error, msg, reply)
        if "return" not in reply:
            raise BadReplyError("QMP reply is missing a 'error' or 'return' member", reply, msg)
        return reply["return"]

    def _cb_outbound(self, msg: Message) -> Message:
        # qemu.qmp formats every message for a debug log line even when debug logging is off.
        return super()._cb_outbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg

    def _cb_inbound(self, msg: Message) -> Message:
        return super()._cb_inbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg
