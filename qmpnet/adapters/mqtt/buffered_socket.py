"""A broker connection's socket with a read buffer and gathered writes (see ``aiomqtt_internals.fewer_system_calls``).

Plain socket work, no library's private names: ``aiomqtt_internals`` puts it under paho's client.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import asyncio
    import socket
    from collections.abc import Iterator

__all__ = ["READ_SIZE", "BufferedSocket"]

#: How much one ``recv`` of the broker's socket takes at most (what is there, up to this).
READ_SIZE: Final = 65536
#: A PUBACK without reason code or properties: its first byte, its remaining length, and its size in all.
_PUBACK: Final = 0x40
_PUBACK_LENGTH: Final = 2
_PUBACK_SIZE: Final = 4
#: A PUBLISH: the type in its first byte's high nibble, its least size (the first byte, a length, a topic's length),
#: and the most bytes its remaining length may take.
_PUBLISH_TYPE: Final = 0x3
_PUBLISH_MIN: Final = 4
_LENGTH_BYTES: Final = 4


class BufferedSocket:
    """A connected, non-blocking socket that reads what is there in one call and sends a burst of packets in one.

    Reads: paho reads a packet in small pieces; ``recv`` serves them from what one ``recv`` of the socket returned.
    ``pending()`` (the bytes left) makes ``aiomqtt``'s reader call paho again until they are used up, since the
    socket will not signal them.

    Writes: paho sends each queued packet with its own ``send``. Within :meth:`gathered` (around paho's
    ``loop_write``) the packets are taken whole and sent together when it ends; what the socket does not take then
    stays here, ahead of any later packet, and is sent as the socket becomes writable (this object's own writer on
    the loop). paho is never told to wait, so it never registers a writer of its own meanwhile. A send that fails
    (the connection is gone) drops what is left: paho's reader sees the connection end, as it would have. paho
    closes the socket within ``loop_write`` once it has written a DISCONNECT, so :meth:`close` sends what waits
    first.

    Everything else is the socket's.
    """

    __slots__ = ("_data", "_failure", "_gathering", "_loop", "_out", "_pos", "_sock", "_writer")

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self._sock = sock
        self._loop = loop
        self._data = b""
        self._pos = 0
        self._failure: OSError | bytes | None = None  # what fill() found instead of bytes, for the next recv()
        self._out = bytearray()
        self._gathering = False
        self._writer = False

    def recv(self, size: int) -> bytes:
        """Up to ``size`` bytes: buffered ones, else what one ``recv`` of the socket returns (``b""``: closed).

        Raises:
            BlockingIOError: Nothing buffered, nothing to read.
            OSError: The socket's error (also one :meth:`fill` met).
        """
        if self._failure is not None and self._pos >= len(self._data):
            failure, self._failure = self._failure, None
            if isinstance(failure, bytes):
                return failure  # closed
            raise failure
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

    def fill(self) -> bool:
        """Read what the socket has if nothing is buffered; whether bytes are buffered now.

        A closed connection or an error is kept and told by the next :meth:`recv`, as the socket would have.
        """
        if self._pos < len(self._data):
            return True
        if self._failure is not None:
            return False
        try:
            data = self._sock.recv(READ_SIZE)
        except BlockingIOError:
            return False
        except OSError as err:
            self._failure = err
            return False
        if not data:
            self._failure = data
            return False
        self._data, self._pos = data, 0
        return True

    def failed(self) -> bool:
        """Whether :meth:`fill` met a closed connection or an error, which the next :meth:`recv` tells."""
        return self._failure is not None

    def take_puback(self, *, reasons: frozenset[int]) -> tuple[int, int] | None:
        """The plain PUBACK at the head of the buffer, taken: its message id and reason code (-1: none); else ``None``.

        Plain: ``40 02`` and the id, or (MQTT 5) ``40 03``, the id and one of ``reasons``.
        """
        data, pos = self._data, self._pos
        if len(data) - pos < _PUBACK_SIZE or data[pos] != _PUBACK:
            return None
        if data[pos + 1] == _PUBACK_LENGTH:
            self._pos = pos + _PUBACK_SIZE
            return (data[pos + 2] << 8) | data[pos + 3], -1
        if data[pos + 1] == _PUBACK_LENGTH + 1 and len(data) - pos > _PUBACK_SIZE and data[pos + 4] in reasons:
            self._pos = pos + _PUBACK_SIZE + 1
            return (data[pos + 2] << 8) | data[pos + 3], data[pos + 4]
        return None

    def whole_publish(self) -> tuple[int, bytes, int] | None:
        """The PUBLISH at the head of the buffer if it is there whole: its first byte, its body and where it ends.

        Nothing is taken: :meth:`take_to` takes it once it has been read.
        """
        data, pos = self._data, self._pos
        size = len(data)
        if size - pos < _PUBLISH_MIN or data[pos] >> 4 != _PUBLISH_TYPE:
            return None
        length, shift, at = 0, 0, pos + 1
        while at < size and at - pos <= _LENGTH_BYTES:
            byte = data[at]
            length |= (byte & 0x7F) << shift
            shift += 7
            at += 1
            if not byte & 0x80:
                end = at + length
                return (data[pos], data[at:end], end) if end <= size else None
        return None  # cut in its length, or a length longer than MQTT allows (paho's error)

    def take_to(self, end: int) -> None:
        """Take the buffered bytes up to ``end`` (the end of a packet :meth:`whole_publish` found)."""
        self._pos = end

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Send ``data``, or take it for the burst being gathered (or behind bytes still waiting); its length."""
        if self._gathering or self._out:
            self._out += data
            if not self._gathering:
                self._drain()
            return len(data)
        return self._sock.send(data)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Take what is sent meanwhile and send it in one call at the end."""
        self.gather()
        try:
            yield
        finally:
            self.send_gathered()

    def gather(self) -> None:
        """Take what is sent from now on, until :meth:`send_gathered` (:meth:`gathered` without a generator)."""
        self._gathering = True

    def send_gathered(self) -> None:
        """Send what was taken since :meth:`gather` in one call; send at once again from now on."""
        self._gathering = False
        self._drain()

    def waiting(self) -> int:
        """The bytes taken and not yet sent (the socket was full)."""
        return len(self._out)

    def _drain(self) -> None:
        if self._out:
            try:
                sent = self._sock.send(self._out)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = len(self._out)  # the connection is gone: the reader sees it end
            del self._out[:sent]
        if self._out:
            # Each time, not once: paho's loop_write, run in gathered(), removes the socket's writer (aiomqtt's,
            # it thinks) whenever its own queue is empty.
            self._loop.add_writer(self._sock.fileno(), self._drain)
            self._writer = True
        elif self._writer:
            self._loop.remove_writer(self._sock.fileno())
            self._writer = False

    def close(self) -> None:
        """Close the socket after one last try to send what waits (paho closes it right after writing DISCONNECT).

        What the socket does not take then is dropped.
        """
        if self._out:
            with contextlib.suppress(OSError):
                self._sock.send(self._out)
            self._out.clear()
        if self._writer:
            self._loop.remove_writer(self._sock.fileno())
            self._writer = False
        self._sock.close()

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - the socket's own attributes
        return getattr(self._sock, name)
