"""Everything of qmpnet that relies on ``aiomqtt`` beyond its documented API, in one room.

No other module of qmpnet uses a private name of ``aiomqtt`` or ``paho``. Kept here: one undocumented *behaviour*
of ``aiomqtt.Client``, and the private names :func:`fewer_system_calls` needs.

* **Messages in wire order, before the next packet.** ``aiomqtt`` fills its message queue (the ``queue_type``
  argument, public) from paho's ``on_message`` callback by calling the queue's ``put_nowait``, synchronously, while
  paho parses the socket's bytes: a message is handed over before the SUBACK that follows it on the wire completes
  its ``subscribe``. The public API (``async for message in client.messages``) hands messages over a task switch
  later, after that ``subscribe`` may already have returned. The requester needs the order: the broker sends a
  controller's retained status before it acknowledges the next SUBSCRIBE, so once that subscription returns the
  status has been read, and a controller known to be offline is refused before anything is published.
  :func:`dispatching_queue` makes a queue whose ``put_nowait`` dispatches at once.
* **System calls per packet** (issue 17: the controller's CPU per hot-add). paho reads each incoming packet with
  three or more ``recv`` calls (its type byte, its length one byte at a time, then the rest), and ``aiomqtt``
  makes each outgoing burst register the socket for writing from any thread (``call_soon_threadsafe``: a byte
  through the event loop's self-pipe, then two ``epoll_ctl`` calls). A hot-add over MQTT reads five packets (the
  request and four PUBACKs) and writes five (a PUBACK and four messages): about 20 of the controller's ~95 system
  calls per hot-add were these. :func:`fewer_system_calls` gives paho's socket a read buffer (one ``recv`` takes
  what is there; ``aiomqtt``'s reader reads on while the buffer's ``pending()`` says bytes are left, as it does
  for TLS) and, on the event loop's own thread, writes a burst in the loop's next turn instead. It uses
  ``aiomqtt.Client._client`` (the paho client), ``aiomqtt.Client._socket_options`` (which aiomqtt applies to a
  ``socket.socket`` only, so to the socket before it is wrapped) and paho's ``Client._sock``; TLS and websocket
  connections keep paho's own socket.

tests/unit/adapters/mqtt/test_aiomqtt_internals.py is the contract: it fails, naming what changed, when a new version
of ``aiomqtt`` or ``paho`` no longer works this way; and it checks that no other module of the MQTT adapter uses a
private name of ``aiomqtt`` or ``paho``. ``aiomqtt`` is not pinned exactly (``>=2.5,<3``, the project's rule), so at
run time :func:`fewer_system_calls` steps aside, leaving the libraries' own paths, when a name it needs is missing:
the speed-up is lost, never the connection.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import TYPE_CHECKING, Any, Final

import aiomqtt

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["BufferedReads", "dispatching_queue", "fewer_system_calls"]

_log = logging.getLogger(__name__)

#: How much one ``recv`` of the broker's socket takes at most (what is there, up to this).
READ_SIZE: Final = 65536


def dispatching_queue(dispatch: Callable[[aiomqtt.Message], None]) -> type[asyncio.Queue[aiomqtt.Message]]:
    """A message queue for ``aiomqtt.Client(queue_type=...)`` that hands each message to ``dispatch`` at once.

    The MQTT library fills its queue from the callback that parses the socket's bytes, in wire order, before it
    completes the SUBACK that follows; dispatching right there keeps that order for us.
    """

    class Dispatching(asyncio.Queue[aiomqtt.Message]):
        def put_nowait(self, item: aiomqtt.Message) -> None:
            dispatch(item)

    return Dispatching


def fewer_system_calls(client: aiomqtt.Client) -> None:
    """Make ``client`` read each burst of packets with one ``recv`` and write without waking its loop (see above).

    Call it on the event loop's thread, right after making the client (before it connects).
    """
    paho: Any = getattr(client, "_client", None)  # the one room for aiomqtt's privates
    needed = (hasattr(client, "_socket_options"), hasattr(paho, "on_socket_open"),
              hasattr(paho, "on_socket_register_write"), hasattr(paho, "_sock"))  # fmt: skip
    if not all(needed):
        _log.info("aiomqtt %s / paho: not the private names fewer_system_calls knows; using their own I/O paths",
                  getattr(aiomqtt, "__version__", "?"))
        return
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()
    opened = paho.on_socket_open  # aiomqtt's: adds the socket's reader to the loop
    register = paho.on_socket_register_write  # aiomqtt's: adds its writer, from any thread

    def on_socket_open(paho_client: Any, userdata: object, sock: Any) -> None:  # noqa: ANN401 - paho's callback
        if type(sock) is socket.socket:  # plain TCP; TLS and websockets have their own buffers
            # aiomqtt sets its socket options (TCP_NODELAY) after the connect, on a socket.socket only: on the
            # socket itself, then, before it is wrapped (without TCP_NODELAY each answer waited ~40 ms for an ACK).
            for option in client._socket_options:  # noqa: SLF001 - see the module docstring
                sock.setsockopt(*option)
            paho_client._sock = BufferedReads(sock)  # noqa: SLF001 - see the module docstring
        opened(paho_client, userdata, sock)

    def on_socket_register_write(paho_client: Any, userdata: object, sock: Any) -> None:  # noqa: ANN401 - paho's
        if threading.get_ident() != loop_thread:
            register(paho_client, userdata, sock)  # paho's connect runs in a worker thread: aiomqtt's way
            return
        loop.call_soon(flush, paho_client, userdata)  # no self-pipe, no epoll_ctl: the loop's next turn writes

    def flush(paho_client: Any, userdata: object) -> None:  # noqa: ANN401 - paho's client
        paho_client.loop_write()  # all queued packets; unregisters (nothing to undo) once the queue is empty
        sock = paho_client.socket()
        if paho_client.want_write() and sock is not None:
            register(paho_client, userdata, sock)  # the socket is full: aiomqtt's writer sends the rest

    paho.on_socket_open = on_socket_open
    paho.on_socket_register_write = on_socket_register_write


class BufferedReads:
    """A connected, non-blocking socket whose ``recv`` takes what is there in one call and hands it out as asked.

    paho reads a packet in small pieces; this serves them from what one ``recv`` returned. ``pending()`` (the bytes
    left) makes ``aiomqtt``'s reader call paho again until they are used up, since the socket will not signal them.
    Everything else is the socket's.
    """

    __slots__ = ("_data", "_pos", "_sock")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._data = b""
        self._pos = 0

    def recv(self, size: int) -> bytes:
        """Up to ``size`` bytes: buffered ones, else what one ``recv`` of the socket returns (``b""``: closed).

        Raises:
            BlockingIOError: Nothing buffered, nothing to read.
        """
        if self._pos >= len(self._data):
            data = self._sock.recv(max(size, READ_SIZE))
            if len(data) <= size:
                return data
            self._data, self._pos = data, 0
        start = self._pos
        self._pos = min(start + size, len(self._data))
        return self._data[start : self._pos]

    def pending(self) -> int:
        """The bytes read from the socket and not yet handed out."""
        return len(self._data) - self._pos

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - the socket's own attributes
        return getattr(self._sock, name)
