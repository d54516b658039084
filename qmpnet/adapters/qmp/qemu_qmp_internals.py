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
  library does (:class:`Reply`, one future instead of an ``asyncio.Queue``), with no id while no other command
  awaits an id-less reply, else a short one (QEMU's parser takes microseconds per character: see
  ``FlatClient.__init__``), the bytes sent by ``_do_send`` and the reply taken by ``_reply``. Replies and errors
  are handled exactly as ``QMPClient.execute_msg`` does. It also skips
  ``_cb_outbound``/``_cb_inbound``, which format every message for a debug line even when debug logging is off.
* **One task switch less per reply.** qemu.qmp's reader task reads every message from an ``asyncio.StreamReader``
  and hands a reply to the caller's slot, so a reply wakes the reader task first and the caller one loop turn later
  (measured against a bare client: ~35-100 us more per command here; a hot-add is two commands). When a reply arrives
  alone, and nothing received earlier is still unread (the reader's buffer is empty and the reader task is waiting
  for data: ``_buffer``, ``_waiter``, the stream's privates), :class:`FlatClient` hands it to its caller's
  :class:`Reply` from the transport's callback (the reader's ``feed_data``, wrapped after ``_do_connect`` made it):
  the reader task would have done exactly that next, and nothing can overtake it. Anything else (events, a reply
  behind unread data, a slot qemu.qmp made, debug logging on) is fed to the reader as before.
* **No public accessors:** ``EventListener`` has no ``get_nowait`` (:func:`take_nowait` reads its ``_queue``), and
  ``QMPClient`` does not expose its socket (:func:`peer_socket` reads ``_writer``), which the adapter needs for the
  peer's credentials (QEMU's pid).

tests/unit/adapters/qmp/test_qemu_qmp_internals.py is the contract: it fails, naming the attribute, when a new version
of ``qemu.qmp`` removes or changes any of these; ``pyproject.toml`` pins the version exactly. No other module of
qmpnet uses a private name of ``qemu.qmp`` (that test checks it too).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Final, cast

from qemu.qmp import EventListener, ExecInterruptedError, ExecuteError, Message, QMPClient
from qemu.qmp.error import ProtocolError
from qemu.qmp.models import ErrorResponse
from qemu.qmp.protocol import Runstate
from qemu.qmp.qmp_client import BadReplyError

if TYPE_CHECKING:
    import socket
    import ssl
    from collections.abc import Callable, Mapping

    from qemu.qmp.protocol import SocketAddrT

__all__ = ["PRIVATE_NAMES", "FlatClient", "FlatListener", "Reply", "peer_socket", "take_nowait"]

#: The private names of qemu.qmp used here, by class: what the contract test checks.
PRIVATE_NAMES: Final = {
    "QMPClient": ("_issue", "_reply", "_do_send", "_cb_outbound", "_cb_inbound", "_pending",
                  "_outgoing", "_writer", "_listeners", "_do_connect", "_reader", "_cleanup"),
    "EventListener": ("_queue",),
}

#: The private names of asyncio's ``StreamReader`` the direct reply path reads (the contract test checks them too).
STREAM_PRIVATE_NAMES: Final = ("_buffer", "_waiter")

#: How qemu.qmp encodes a message (``Message._serialize``: json.dumps with these separators), made once: json.dumps
#: builds an encoder for every call that passes separators.
_ENCODE: Final = json.JSONEncoder(separators=(",", ":")).encode

#: How every QEMU event begins (a reply never does): such data goes to the reader without being parsed here.
_EVENT_START: Final = b'{"timestamp"'


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

    @property
    def answered(self) -> bool:
        """Whether the answer was delivered (a caller that stopped waiting cancelled the future instead)."""
        return self._answer.done() and not self._answer.cancelled()


class _LateReply(Reply):
    """Waits, in the id-less slot, for the reply of a command whose caller stopped waiting: drops it when it comes.

    Until then the direct path sends every command with an id (the slot of id None is taken), so that late reply is
    not taken for another command's; qemu.qmp would have reported an id-less error reply with no slot waiting as
    the server's parse error, and disconnected.
    """

    __slots__ = ("_client",)

    def __init__(self, client: QMPClient) -> None:
        super().__init__()
        self._client = client

    def put_nowait(self, item: object) -> None:
        """The late reply: drop it and free the id-less slot (the connection's loss: FlatClient._cleanup frees it)."""
        if isinstance(item, ExecInterruptedError):
            return  # qemu.qmp is iterating over the slots
        pending = self._client._pending  # noqa: SLF001 - see the module docstring
        if pending.get(None) is cast("object", self):
            del pending[None]


class FlatClient(QMPClient):
    """``QMPClient`` with a history-free default listener and a direct write path for commands."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        # QEMU parses a command character by character (~3.5 us each on the development machine, QEMU 7.2), so an
        # id is part of every command's cost: "__qmp#00014" and its key cost ~80-100 us a command, 14 ~30-50 us. QEMU
        # answers commands in order, so the direct path sends none while no other command awaits an id-less reply
        # (the reply routes to the slot of id None, as qemu.qmp routes any reply); a command sent meanwhile gets a
        # small int, never equal to qemu.qmp's own "__qmp#00001" strings. A command that ends without its reply
        # (a timeout) leaves a stand-in for it (_LateReply) until that reply comes: until then all commands carry ids.
        self._next_id = 1
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
        body: dict[str, object] = {"execute": cmd}
        if arguments is not None:
            body["arguments"] = arguments
        slot: str | None = None  # qemu.qmp types its ids str; any JSON value routes (qmp-spec: echoed as sent)
        if None in self._pending:  # another command awaits the id-less reply: this one needs an id (see __init__)
            slot = cast("str", self._next_id)
            self._next_id += 1
            body["id"] = slot
        msg = Message(_ENCODE(body).encode(), eager=False)  # the bytes qemu.qmp would send (Message._serialize)
        answer = Reply()
        self._pending[slot] = cast("asyncio.Queue[Message | ExecInterruptedError]", answer)
        try:
            self._do_send(self._cb_outbound(msg))
        except BaseException:
            del self._pending[slot]
            raise
        try:
            reply = await self._reply(slot)
        except BaseException:
            if slot is None and not answer.answered and self._writer is not None:
                # Its reply may still come, without an id: a stand-in takes it, and the commands sent meanwhile
                # carry ids, so that reply is never taken for theirs.
                self._pending[None] = cast("asyncio.Queue[Message | ExecInterruptedError]", _LateReply(self))
            raise
        if "error" in reply:
            try:
                error = ErrorResponse(reply)
            except (KeyError, TypeError) as err:
                raise BadReplyError("QMP error reply is malformed", reply, msg) from err
            raise ExecuteError(error, msg, reply)
        if "return" not in reply:
            raise BadReplyError("QMP reply is missing a 'error' or 'return' member", reply, msg)
        return reply["return"]

    async def _do_connect(self, address: SocketAddrT | socket.socket, ssl: ssl.SSLContext | None = None) -> None:
        await super()._do_connect(address, ssl)
        reader = self._reader
        if reader is not None:
            # The stream's protocol calls reader.feed_data(data) for each chunk received: the instance's own
            # attribute comes first (see the module docstring, "One task switch less per reply").
            reader.feed_data = self._replies_first(reader)  # type: ignore[method-assign,assignment]

    def _replies_first(self, reader: asyncio.StreamReader) -> Callable[[bytes], None]:
        feed = reader.feed_data

        def feed_data(data: bytes) -> None:
            if not self._take_reply(reader, data):
                feed(data)

        return feed_data

    def _take_reply(self, reader: asyncio.StreamReader, data: bytes) -> bool:
        """Hand ``data`` to the caller awaiting it, if it is one whole reply nothing unread is ahead of."""
        waiter: asyncio.Future[None] | None = reader._waiter  # type: ignore[attr-defined]  # noqa: SLF001
        if (reader._buffer or waiter is None or waiter.done()  # type: ignore[attr-defined]  # noqa: SLF001
                or not data.endswith(b"\n") or data.count(b"\n") != 1 or data.startswith(_EVENT_START)
                or self.logger.isEnabledFor(logging.DEBUG)):  # fmt: skip
            return False
        try:
            msg = Message(data, eager=True)
        except ProtocolError:
            return False  # the reader reports it, as before
        slot = self._pending.get(cast("str | None", msg.get("id")))
        if "event" in msg or not isinstance(slot, Reply):
            return False
        slot.put_nowait(msg)
        return True

    def _cleanup(self) -> None:
        # qemu.qmp asserts that no slot is left once disconnected; a late reply's stand-in has nobody to remove it.
        if isinstance(self._pending.get(None), _LateReply):
            del self._pending[None]
        super()._cleanup()

    def _cb_outbound(self, msg: Message) -> Message:
        # qemu.qmp formats every message for a debug log line even when debug logging is off.
        return super()._cb_outbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg

    def _cb_inbound(self, msg: Message) -> Message:
        return super()._cb_inbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg
