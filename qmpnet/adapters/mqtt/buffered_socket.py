"""A broker connection's socket with a read buffer and gathered writes (see ``aiomqtt_internals.fewer_system_calls``).

Plain socket work, and paho's ``loop_write`` callbacks, put under paho's client by ``aiomqtt_internals``; and
paho's read of a PUBACK or a PUBLISH found whole in the buffer (:func:`read_at_once`), the one part that uses paho's
private names (listed in ``aiomqtt_internals``' docstring, which this module's room shares).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
from typing import TYPE_CHECKING, Any, Final

from paho.mqtt.packettypes import PacketTypes

if TYPE_CHECKING:
    import asyncio
    import socket
    from collections.abc import Callable, Iterator

__all__ = ["READ_SIZE", "BufferedSocket", "LoopWrites", "read_at_once"]

_log = logging.getLogger(__name__)

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


class LoopWrites:
    """paho's write callbacks: on the loop's thread, a burst written in the loop's next turn, in one ``send``.

    paho's public client API only (``socket()``, ``loop_write()``, ``want_write()``); ``fewer_system_calls`` sets
    these as its ``on_socket_register_write`` and ``on_socket_unregister_write``.

    Args:
        loop: The event loop (its thread is the one calling this).
        register: aiomqtt's ``on_socket_register_write``: adds its writer, from any thread.
        unregister: aiomqtt's ``on_socket_unregister_write``: removes it.
    """

    __slots__ = ("_loop", "_register", "_theirs", "_thread", "_unregister")

    def __init__(self, loop: asyncio.AbstractEventLoop, register: Callable[..., None],
                 unregister: Callable[..., None]) -> None:  # fmt: skip
        self._loop = loop
        self._thread = threading.get_ident()
        self._register = register
        self._unregister = unregister
        self._theirs = False  # whether aiomqtt's writer was added and not yet removed

    def register(self, paho_client: Any, userdata: object, sock: Any) -> None:  # noqa: ANN401 - paho's callback
        """Packets of paho to write: on the loop's thread, write them all in the loop's next turn."""
        if threading.get_ident() != self._thread:
            self._theirs = True
            self._register(paho_client, userdata, sock)  # paho's connect runs in a worker thread: aiomqtt's way
            return
        self._loop.call_soon(self._flush, paho_client, userdata)  # no self-pipe, no epoll_ctl: the next turn writes

    def unregister(self, paho_client: Any, userdata: object, sock: Any) -> None:  # noqa: ANN401 - paho's callback
        """All of paho's packets written: remove aiomqtt's writer, if it was added."""
        # paho calls this after every write that emptied its queue. Only a writer aiomqtt added is aiomqtt's to
        # remove: removing none cost a selector lookup and a KeyError each time, and a BufferedSocket's own writer
        # is the socket's business.
        if self._theirs:
            self._theirs = False
            self._unregister(paho_client, userdata, sock)

    def _flush(self, paho_client: Any, userdata: object) -> None:  # noqa: ANN401 - paho's client
        sock = paho_client.socket()
        if isinstance(sock, BufferedSocket):
            sock.gather()  # all queued packets in one send (paho sends each packet on its own)
            try:
                paho_client.loop_write()
            finally:
                sock.send_gathered()
            return
        paho_client.loop_write()  # all queued packets; unregisters once the queue is empty
        sock = paho_client.socket()
        if paho_client.want_write() and sock is not None:
            self._theirs = True
            self._register(paho_client, userdata, sock)  # the socket is full: aiomqtt's writer sends the rest


#: The reason codes a plain MQTT 5 PUBACK may carry: success, and no matching subscribers (a retained topic or an
#: event nobody listens to): both taken by paho as they are.
_PLAIN_REASONS: Final = frozenset({0x00, 0x10})
#: What paho's client must have for :func:`read_at_once`.
_READ_NAMES: Final = ("loop_read", "_packet_read", "_protocol", "_in_packet", "_in_messages", "_out_messages",
                      "_out_message_mutex", "_do_on_publish", "_easy_log", "_msgtime_mutex", "_last_bytes_received",
                      "_loop_rc_handle", "_handle_on_message", "_manual_ack", "_send_puback")  # fmt: skip


def read_at_once(paho: Any, reason_code: type[Any], properties: type[Any]) -> None:  # noqa: ANN401 - paho's client
    """Make ``paho.loop_read`` take plain PUBACKs and whole PUBLISHes at once (see aiomqtt_internals), or not.

    What it reads is made of ``reason_code`` and ``properties``: paho's classes, or ``aiomqtt_internals``' faster
    ones (``FastReasonCode``, ``FastProperties``), which that module passes in (it imports this one).
    """
    client_module = importlib.import_module("paho.mqtt.client")
    packets = importlib.import_module("paho.mqtt._packet")
    known = (hasattr(client_module, name) for name in ("time_func", "MQTTErrorCode", "MQTT_LOG_DEBUG", "MQTTMessage"))
    if not all(hasattr(paho, name) for name in _READ_NAMES) or not all(known) or not hasattr(packets, "DECODE_ERRORS"):
        _log.info("paho: not the private names reading packets at once needs; paho reads them itself")
        return
    paho.loop_read = _AtOnceReader(paho, client_module, packets.DECODE_ERRORS, (reason_code, properties))


class _AtOnceReader:
    """A paho client's ``loop_read``: paho's own, line for line, but for plain PUBACKs and whole PUBLISHes.

    At most as many packets as messages in flight, each read by paho's ``_packet_read``, unless
    :meth:`BufferedSocket.take_puback` or :meth:`BufferedSocket.whole_publish` finds it whole in what was read.
    """

    __slots__ = ("_clock", "_codes", "_debug", "_errors", "_made", "_message", "_mqtt5", "_paho", "_reasons", "_shown")

    def __init__(
        self,
        paho: Any,  # noqa: ANN401 - paho's client
        client_module: Any,  # noqa: ANN401 - paho's module
        errors: tuple[type[Exception], ...],
        made: tuple[type[Any], type[Any]],
    ) -> None:
        self._paho = paho
        self._made = made  # the classes of a reason code and of properties
        self._clock = client_module.time_func
        self._codes = client_module.MQTTErrorCode
        self._debug = client_module.MQTT_LOG_DEBUG
        self._message = client_module.MQTTMessage
        self._errors = errors  # what paho's decoding turns into MalformedPacket
        self._mqtt5 = paho._protocol == client_module.MQTTv5  # noqa: SLF001 - see aiomqtt_internals
        self._reasons = _PLAIN_REASONS if self._mqtt5 else frozenset()  # before MQTT 5 a PUBACK has none
        shown = "properties=%s, " if self._mqtt5 else ""  # paho's log line of a PUBLISH read, to the letter
        self._shown = f"Received PUBLISH (d%d, q%d, r%d, m%d), '%s', {shown}...  (%d bytes)"

    def __call__(self, max_packets: int = 1) -> Any:  # noqa: ANN401, ARG002 - paho's code; paho ignores it too
        paho, codes = self._paho, self._codes  # the privates below: see aiomqtt_internals
        if paho._sock is None:  # noqa: SLF001
            return codes.MQTT_ERR_NO_CONN
        for _ in range(max(len(paho._out_messages) + len(paho._in_messages), 1)):  # noqa: SLF001
            sock = paho._sock  # noqa: SLF001
            if sock is None:
                return codes.MQTT_ERR_NO_CONN
            rc = None
            if type(sock) is BufferedSocket and paho._in_packet["command"] == 0:  # noqa: SLF001
                if not sock.fill() and not sock.failed():
                    return codes.MQTT_ERR_SUCCESS  # nothing to read: what paho's MQTT_ERR_AGAIN ends in, no recv
                rc = self._taken(sock)
            if rc is None:
                rc = paho._packet_read()  # noqa: SLF001
            if rc > 0:
                return paho._loop_rc_handle(rc)  # noqa: SLF001
            if rc == codes.MQTT_ERR_AGAIN:
                return codes.MQTT_ERR_SUCCESS
        return codes.MQTT_ERR_SUCCESS

    def _taken(self, sock: BufferedSocket) -> Any:  # noqa: ANN401 - paho's code
        """What paho makes of the packet at the head of ``sock``'s buffer, taken; ``None``: paho is to read it."""
        puback = sock.take_puback(reasons=self._reasons)
        if puback is not None:
            return self._acknowledged(*puback)
        publish = sock.whole_publish()
        return self._received(sock, *publish) if publish is not None else None

    def _acknowledged(self, mid: int, code: int) -> Any:  # noqa: ANN401 - paho's code
        """What paho's ``_handle_pubackcomp`` does with a plain PUBACK, and ``_packet_read``'s time noted."""
        paho = self._paho
        paho._easy_log(self._debug, "Received %s (Mid: %d)", "PUBACK", mid)  # noqa: SLF001 - see aiomqtt_internals
        rc = self._codes.MQTT_ERR_SUCCESS
        with paho._out_message_mutex:  # noqa: SLF001 - see aiomqtt_internals
            if mid in paho._out_messages:  # noqa: SLF001 - see aiomqtt_internals
                # paho's classes but for their tables built once, in any process (see aiomqtt_internals).
                reason_code, properties = self._made
                reason = reason_code(PacketTypes.PUBACK, identifier=code)
                rc = paho._do_on_publish(mid, reason, properties(PacketTypes.PUBACK))  # noqa: SLF001
        with paho._msgtime_mutex:  # noqa: SLF001 - see aiomqtt_internals
            paho._last_bytes_received = self._clock()  # noqa: SLF001 - see aiomqtt_internals
        return rc

    def _received(self, sock: BufferedSocket, first: int, body: bytes, end: int) -> Any:  # noqa: ANN401 - paho's
        """What paho's ``_handle_publish`` does with a PUBLISH of QoS 0 or 1, and ``_packet_read``'s time noted.

        ``None``, nothing taken, for a QoS 2 or a malformed one: paho reads it again, its own way, errors and all.
        """
        qos = (first & 0x06) >> 1
        decoded = self._decoded(body, qos) if qos < 2 else None  # QoS 2: paho's exchange
        if decoded is None:
            return None
        sock.take_to(end)
        topic, mid, properties, payload = decoded
        paho, debug = self._paho, self._debug
        message = self._message(mid=mid, topic=topic)
        message.dup = (first & 0x08) != 0
        message.qos = qos
        message.retain = (first & 0x01) != 0
        message.properties = properties
        message.payload = payload
        try:
            print_topic = topic.decode("utf-8")
        except UnicodeDecodeError:
            print_topic = f"TOPIC WITH INVALID UTF-8: {topic!r}"
        shown = (print_topic, properties) if self._mqtt5 else (print_topic,)
        paho._easy_log(debug, self._shown, message.dup, qos, message.retain, mid, *shown, len(payload))  # noqa: SLF001
        message.timestamp = self._clock()
        paho._handle_on_message(message)  # noqa: SLF001 - see aiomqtt_internals
        rc = self._codes.MQTT_ERR_SUCCESS
        if qos == 1 and not paho._manual_ack:  # noqa: SLF001 - see aiomqtt_internals
            rc = paho._send_puback(mid)  # noqa: SLF001 - see aiomqtt_internals
        with paho._msgtime_mutex:  # noqa: SLF001 - see aiomqtt_internals
            paho._last_bytes_received = self._clock()  # noqa: SLF001 - see aiomqtt_internals
        return rc

    def _decoded(self, body: bytes, qos: int) -> tuple[bytes, int, Any, bytes] | None:
        """What paho's ``decode_publish`` makes of a PUBLISH's body (topic, id, properties, payload), or ``None``."""
        size = len(body)
        at = 2 + ((body[0] << 8) | body[1]) if size >= 2 else size + 1  # its topic's length
        if at > size or (at == 2 and not self._mqtt5):  # an empty topic is malformed before MQTT 5
            return None
        topic, mid = body[2:at], 0
        if qos:
            if at + 2 > size:
                return None
            mid = (body[at] << 8) | body[at + 1]
            at += 2
        properties = None
        if self._mqtt5:
            properties = self._made[1](PacketTypes.PUBLISH)
            try:
                _, used = properties.unpack(body[at:])
            except self._errors:
                return None
            at += used
        return topic, mid, properties, body[at:]
