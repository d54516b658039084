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
  for TLS) and, on the event loop's own thread, writes a burst in the loop's next turn instead, all of its
  packets in one ``send`` (paho sends each packet on its own: the answer, the status, the NIC list and the event
  of a hot-add were four ``sendto`` calls, each a wake-up of the broker); and paho's call to remove the writer
  after each burst goes to ``aiomqtt`` only when its writer was added. It uses
  ``aiomqtt.Client._client`` (the paho client), ``aiomqtt.Client._socket_options`` (which aiomqtt applies to a
  ``socket.socket`` only, so to the socket before it is wrapped), paho's ``Client._sock`` and that paho's
  ``loop_write`` hands each packet to ``_sock.send`` whole; TLS and websocket
  connections keep paho's own socket.

* **paho's generic read of a PUBACK or a PUBLISH** (issue 17). paho reads every packet the same way: its type
  byte, its length, its body, each through ``recv``, a dictionary of reading state reset per packet, the packet
  decoded into a tuple with a reason code and properties, the time noted twice under a lock; ~45 k instructions for
  the few bytes of a PUBACK, and a hot-add reads four. :func:`fewer_system_calls` also gives paho a ``loop_read``
  that is paho's own (as many packets as messages in flight, each read by ``_packet_read``) but takes two kinds of
  packets found whole in what one ``recv`` returned at once:

  - a plain PUBACK (``40 02`` and the message id; with MQTT 5 also ``40 03``, the id and the reason code "no
    matching subscribers", which the broker gives retained state and events nobody listens to), doing with it what
    paho's ``_handle_pubackcomp`` does (its log line, ``_do_on_publish`` under ``_out_message_mutex`` if the
    message is paho's, ``_last_bytes_received``);
  - a PUBLISH of QoS 0 or 1 (the controller's requests, the client's answers), decoded as paho's ``decode_publish``
    does and then handled as paho's ``_handle_publish`` does (the ``MQTTMessage``, its log line, its timestamp,
    ``_handle_on_message``, ``_send_puback`` unless ``_manual_ack``, ``_last_bytes_received``). One that paho would
    find malformed, and QoS 2, are left to paho's own reading, which tells its error its way.

  The reason code and the properties made are a :class:`FastReasonCode` and :class:`FastProperties` in any process
  (the client's paho keeps its own classes: ~40 k instructions each made): a PUBACK's reach only the callback
  completing a publish, which looks at neither; a message's reach the inbox, which reads its topic and payload.
  The client's instructions per MQTT hot-add went from 1.11 M to 0.77 M. It uses paho's ``_packet_read``,
  ``_protocol``, ``_in_packet``, ``_in_messages``, ``_out_messages``, ``_out_message_mutex``, ``_do_on_publish``,
  ``_easy_log``, ``_msgtime_mutex``, ``_last_bytes_received``, ``_loop_rc_handle``, ``_handle_on_message``,
  ``_manual_ack``, ``_send_puback``, ``time_func``, ``MQTTMessage`` and ``paho.mqtt._packet.DECODE_ERRORS``.

* **A task and an event per message** (issue 17). ``aiomqtt.Client.publish`` makes, per message, a coroutine, an
  :class:`asyncio.Event`, a pending-call entry and a timeout scope, and a sender keeping several messages in flight
  a task per message on top. :class:`Publisher` hands each message to paho's ``publish`` and hears its PUBACK
  from paho's ``on_publish`` callback (the controller's outbox); :func:`publish_at_once` hands one over without
  waiting for it (the requester, which waits for the answer instead). Both use ``aiomqtt.Client._client``.
* **paho's MQTT 5 properties** rebuild two tables of 27 entries per object and find a property by looping over
  its names: ~10 µs per PUBACK read and 20-40 µs per set of properties packed or unpacked. :class:`FastProperties`
  shares paho's own tables and finds a name in a dictionary; :func:`install_fast_properties` makes paho decode
  into it (the controller's process only: it names ``paho.mqtt._packet.Properties`` and
  ``paho.mqtt.client.Properties``).
* **paho's MQTT 5 reason codes** copy paho's table of 45 reason codes into every object: ~3 µs per PUBACK read
  (each makes one), a hot-add reading four. :class:`FastReasonCode` shares the table; :func:`install_fast_reason_codes`
  makes paho build it (the controller's process only: it names ``paho.mqtt._packet.ReasonCode`` and
  ``paho.mqtt.client.ReasonCode``).

tests/unit/adapters/mqtt/test_aiomqtt_internals.py is the contract: it fails, naming what changed, when a new version
of ``aiomqtt`` or ``paho`` no longer works this way; and it checks that no other module of the MQTT adapter uses a
private name of ``aiomqtt`` or ``paho``. ``aiomqtt`` is not pinned exactly (``>=2.5,<3``, the project's rule), so at
run time :func:`fewer_system_calls`, :class:`Publisher`, :func:`publish_at_once` and :func:`install_fast_properties`
step aside, leaving the libraries' own paths, when a name they need is missing: the speed-up is lost, never the
connection.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import socket
import threading
from typing import TYPE_CHECKING, Any, Final

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers, writeBytes, writeInt16, writeInt32, writeUTF
from paho.mqtt.reasoncodes import ReasonCode

from qmpnet.adapters.mqtt.buffered_socket import BufferedSocket

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "BufferedSocket",
    "FastProperties",
    "FastReasonCode",
    "Publisher",
    "dispatching_queue",
    "fewer_system_calls",
    "install_fast_properties",
    "install_fast_reason_codes",
    "publish_at_once",
]

_log = logging.getLogger(__name__)



def _paho_of(client: aiomqtt.Client) -> Any:  # noqa: ANN401 - paho's client is untyped
    """The paho client inside ``client`` (``aiomqtt.Client._client``), or ``None`` where a later aiomqtt keeps none."""
    return getattr(client, "_client", None)  # the one room for aiomqtt's privates


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
    paho = _paho_of(client)
    needed = (hasattr(client, "_socket_options"), hasattr(paho, "on_socket_open"),
              hasattr(paho, "on_socket_register_write"), hasattr(paho, "on_socket_unregister_write"),
              hasattr(paho, "_sock"))  # fmt: skip
    if not all(needed):
        _log.info("aiomqtt %s / paho: not the private names fewer_system_calls knows; using their own I/O paths",
                  getattr(aiomqtt, "__version__", "?"))
        return
    loop = asyncio.get_running_loop()
    opened = paho.on_socket_open  # aiomqtt's: adds the socket's reader to the loop

    def on_socket_open(paho_client: Any, userdata: object, sock: Any) -> None:  # noqa: ANN401 - paho's callback
        if type(sock) is socket.socket:  # plain TCP; TLS and websockets have their own buffers
            # aiomqtt sets its socket options (TCP_NODELAY) after the connect, on a socket.socket only: on the
            # socket itself, then, before it is wrapped (without TCP_NODELAY each answer waited ~40 ms for an ACK).
            for option in client._socket_options:  # noqa: SLF001 - see the module docstring
                sock.setsockopt(*option)
            paho_client._sock = BufferedSocket(sock, loop)  # noqa: SLF001 - see the module docstring
        opened(paho_client, userdata, sock)

    writes = _Writes(loop, paho.on_socket_register_write, paho.on_socket_unregister_write)
    paho.on_socket_open = on_socket_open
    paho.on_socket_register_write = writes.register
    paho.on_socket_unregister_write = writes.unregister
    _read_at_once(paho)


class _Writes:
    """paho's write callbacks: on the loop's thread, a burst written in the loop's next turn, in one ``send``.

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
        if threading.get_ident() != self._thread:
            self._theirs = True
            self._register(paho_client, userdata, sock)  # paho's connect runs in a worker thread: aiomqtt's way
            return
        self._loop.call_soon(self._flush, paho_client, userdata)  # no self-pipe, no epoll_ctl: the next turn writes

    def unregister(self, paho_client: Any, userdata: object, sock: Any) -> None:  # noqa: ANN401 - paho's callback
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
#: What paho's client must have for :func:`_read_at_once`.
_READ_NAMES: Final = ("loop_read", "_packet_read", "_protocol", "_in_packet", "_in_messages", "_out_messages",
                      "_out_message_mutex", "_do_on_publish", "_easy_log", "_msgtime_mutex", "_last_bytes_received",
                      "_loop_rc_handle", "_handle_on_message", "_manual_ack", "_send_puback")  # fmt: skip


def _read_at_once(paho: Any) -> None:  # noqa: ANN401 - paho's client
    """Make ``paho.loop_read`` take plain PUBACKs and whole PUBLISHes at once (see the module docstring), or not."""
    client_module = importlib.import_module("paho.mqtt.client")
    packets = importlib.import_module("paho.mqtt._packet")
    known = (hasattr(client_module, name) for name in ("time_func", "MQTTErrorCode", "MQTT_LOG_DEBUG", "MQTTMessage"))
    if not all(hasattr(paho, name) for name in _READ_NAMES) or not all(known) or not hasattr(packets, "DECODE_ERRORS"):
        _log.info("paho: not the private names reading packets at once needs; paho reads them itself")
        return
    paho.loop_read = _AtOnceReader(paho, client_module, packets.DECODE_ERRORS)


class _AtOnceReader:
    """A paho client's ``loop_read``: paho's own, line for line, but for plain PUBACKs and whole PUBLISHes.

    At most as many packets as messages in flight, each read by paho's ``_packet_read``, unless
    :meth:`BufferedSocket.take_puback` or :meth:`BufferedSocket.whole_publish` finds it whole in what was read.
    """

    __slots__ = ("_clock", "_codes", "_debug", "_errors", "_message", "_mqtt5", "_paho", "_reasons", "_shown")

    def __init__(self, paho: Any, client_module: Any, errors: tuple[type[Exception], ...]) -> None:  # noqa: ANN401
        self._paho = paho
        self._clock = client_module.time_func
        self._codes = client_module.MQTTErrorCode
        self._debug = client_module.MQTT_LOG_DEBUG
        self._message = client_module.MQTTMessage
        self._errors = errors  # what paho's decoding turns into MalformedPacket
        self._mqtt5 = paho._protocol == client_module.MQTTv5  # noqa: SLF001 - see the module docstring
        self._reasons = _PLAIN_REASONS if self._mqtt5 else frozenset()  # before MQTT 5 a PUBACK has none
        shown = "properties=%s, " if self._mqtt5 else ""  # paho's log line of a PUBLISH read, to the letter
        self._shown = f"Received PUBLISH (d%d, q%d, r%d, m%d), '%s', {shown}...  (%d bytes)"

    def __call__(self, max_packets: int = 1) -> Any:  # noqa: ANN401, ARG002 - paho's code; paho ignores it too
        paho, codes = self._paho, self._codes  # the privates below: see the module docstring
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
        paho._easy_log(self._debug, "Received %s (Mid: %d)", "PUBACK", mid)  # noqa: SLF001 - see the module docstring
        rc = self._codes.MQTT_ERR_SUCCESS
        with paho._out_message_mutex:  # noqa: SLF001 - see the module docstring
            if mid in paho._out_messages:  # noqa: SLF001 - see the module docstring
                # paho's classes but for their tables built once, in any process (see the module docstring).
                reason = FastReasonCode(PacketTypes.PUBACK, identifier=code)
                rc = paho._do_on_publish(mid, reason, FastProperties(PacketTypes.PUBACK))  # noqa: SLF001
        with paho._msgtime_mutex:  # noqa: SLF001 - see the module docstring
            paho._last_bytes_received = self._clock()  # noqa: SLF001 - see the module docstring
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
        paho._handle_on_message(message)  # noqa: SLF001 - see the module docstring
        rc = self._codes.MQTT_ERR_SUCCESS
        if qos == 1 and not paho._manual_ack:  # noqa: SLF001 - see the module docstring
            rc = paho._send_puback(mid)  # noqa: SLF001 - see the module docstring
        with paho._msgtime_mutex:  # noqa: SLF001 - see the module docstring
            paho._last_bytes_received = self._clock()  # noqa: SLF001 - see the module docstring
        return rc

    def _decoded(self, body: bytes, qos: int) -> tuple[bytes, int, FastProperties | None, bytes] | None:
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
            properties = FastProperties(PacketTypes.PUBLISH)
            try:
                _, used = properties.unpack(body[at:])  # type: ignore[no-untyped-call]
            except self._errors:
                return None
            at += used
        return topic, mid, properties, body[at:]


class Publisher:
    """Publishes through ``client``'s paho client itself; paho's ``on_publish`` callback reports each acknowledgement.

    ``aiomqtt.Client.publish`` makes, per message, a coroutine to await, an :class:`asyncio.Event`, a pending-call
    entry (and counts all of them), and a timeout scope; a sender keeping several messages in flight needs a task
    per message on top. Here a message is one call of paho's ``publish``, and its PUBACK (for QoS 0: its write) one
    call of ``acknowledged(seq)`` from paho's callback, on the event loop's thread, with no task woken. What paho's
    callback reports for a message not published here (``aiomqtt``'s own publishes) goes on to ``aiomqtt``'s.

    Uses ``aiomqtt.Client._client`` (the paho client); paho's ``publish`` and ``on_publish`` are its public API.

    Args:
        paho: The paho client of a connected ``aiomqtt.Client`` (:meth:`of` finds it).
        acknowledged: Called with a message's ``seq`` once the broker has it.
        limit: At most this many messages await their acknowledgement (:meth:`room` waits).
    """

    __slots__ = ("_acknowledged", "_limit", "_mids", "_paho", "_room")

    def __init__(self, paho: Any, acknowledged: Callable[[int], None], limit: int) -> None:  # noqa: ANN401 - paho's
        self._paho = paho
        self._acknowledged = acknowledged
        self._limit = max(limit, 1)
        self._mids: dict[int, int] = {}  # paho's message id -> the caller's seq, while the broker has not acked
        self._room = asyncio.Event()
        self._room.set()
        theirs = paho.on_publish  # aiomqtt's: completes its own publish calls

        def on_publish(paho_client: Any, userdata: object, mid: int, *rest: Any) -> None:  # noqa: ANN401 - paho's
            seq = self._mids.pop(mid, None)
            if seq is None:
                theirs(paho_client, userdata, mid, *rest)
                return
            self._room.set()
            self._acknowledged(seq)

        paho.on_publish = on_publish

    @classmethod
    def of(cls, client: aiomqtt.Client, acknowledged: Callable[[int], None], limit: int) -> Publisher | None:
        """A publisher for ``client``; ``None`` (use ``client.publish``) when its paho client is not where expected."""
        paho = _paho_of(client)
        if not (hasattr(paho, "publish") and hasattr(paho, "on_publish")):
            _log.info("aiomqtt %s: no paho client at _client; publishing through aiomqtt.Client.publish",
                      getattr(aiomqtt, "__version__", "?"))  # fmt: skip
            return None
        return cls(paho, acknowledged, limit)

    @property
    def inflight(self) -> int:
        """Messages published here whose acknowledgement has not come yet."""
        return len(self._mids)

    async def room(self) -> None:
        """Wait until fewer than ``limit`` messages await their acknowledgement."""
        while len(self._mids) >= self._limit:
            self._room.clear()
            await self._room.wait()

    def publish(  # noqa: PLR0913 - an MQTT publish's parts, keyword-only but the message's own
        self, seq: int, topic: str, payload: bytes, *, qos: int, retain: bool, properties: Properties | None
    ) -> bool:
        """Hand message ``seq`` to paho; ``False`` if paho refused it (no connection): it was not sent."""
        info = self._paho.publish(topic, payload, qos, retain, properties)
        if info.rc != 0:  # MQTT_ERR_SUCCESS
            return False
        if info.is_published():  # QoS 0, written at once (paho's own write path): the callback came already
            self._acknowledged(seq)
        else:
            self._mids[info.mid] = seq
        return True


def publish_at_once(
    client: aiomqtt.Client, topic: str, payload: bytes, *, qos: int, properties: Properties | None
) -> bool | None:
    """Hand a message to ``client``'s paho client, not waiting for the broker's acknowledgement.

    For a sender that needs no acknowledgement (the requester waits for the answer instead): no coroutine, event or
    task per message, as with :class:`Publisher`. ``True``: handed over; ``False``: paho refused it (no
    connection), nothing was sent; ``None``: the paho client is not where expected (publish with
    ``client.publish``).
    """
    paho = _paho_of(client)
    if not hasattr(paho, "publish"):
        return None
    return bool(paho.publish(topic, payload, qos, retain=False, properties=properties).rc == 0)  # MQTT_ERR_SUCCESS


# ------------------------------------------------------------------------------------------ MQTT 5 properties

_PROTOTYPE: Any = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
#: paho's own tables (every Properties object builds the same ones anew), shared, and its names without spaces.
_TYPES: Final[list[str]] = _PROTOTYPE.types
_NAMES: Final[dict[str, int]] = _PROTOTYPE.names
_TABLE: Final[dict[int, tuple[int, list[int]]]] = _PROTOTYPE.properties
_IDENT: Final[dict[str, int]] = {name.replace(" ", ""): ident for name, ident in _NAMES.items()}
_SPACED: Final[dict[int, str]] = {ident: name for name, ident in _NAMES.items()}
#: Each name's place in paho's order of the properties, the order in which they are packed.
_RANK: Final[dict[str, int]] = {name: place for place, name in enumerate(_IDENT)}
#: How paho's ``writeProperty`` writes a value of each type (by its index in paho's list of types), with paho's own
#: helpers, so that a value of the wrong kind fails as it does there; without its seven ``types.index`` per value.
_WRITERS: Final[dict[int, Callable[[Any], bytes]]] = {
    _TYPES.index("Byte"): lambda value: bytes([value]),
    _TYPES.index("Two Byte Integer"): writeInt16,
    _TYPES.index("Four Byte Integer"): writeInt32,
    _TYPES.index("Variable Byte Integer"): VariableByteIntegers.encode,
    _TYPES.index("Binary Data"): writeBytes,
    _TYPES.index("UTF-8 Encoded String"): writeUTF,
    _TYPES.index("UTF-8 String Pair"): lambda pair: writeUTF(pair[0]) + writeUTF(pair[1]),  # type: ignore[no-untyped-call]
}
#: Per property identifier: its identifier as written (a variable byte integer) and the writer of its type.
_WRITE: Final[dict[int, tuple[bytes, Callable[[Any], bytes] | None]]] = {
    ident: (bytes(VariableByteIntegers.encode(ident)), _WRITERS.get(kind))  # type: ignore[no-untyped-call]
    for ident, (kind, _) in _TABLE.items()
}
#: Properties that may be given more than once (a list of values).
_MULTIPLE: Final = frozenset(name for name in _IDENT if _PROTOTYPE.allowsMultiple(name))
#: Names whose values paho checks (a range, or a list it appends to): set through paho's own ``__setattr__``.
_CHECKED: Final = _MULTIPLE | {
    "ReceiveMaximum", "TopicAlias", "TopicAliasMaximum", "MaximumPacketSize", "SubscriptionIdentifier",
    "RequestResponseInformation", "RequestProblemInformation", "PayloadFormatIndicator",
}  # fmt: skip


class FastProperties(Properties):
    """paho's MQTT 5 ``Properties`` without its per-object and per-call table work; the same objects otherwise.

    paho builds two tables of 27 entries for every ``Properties`` object (each PUBACK read makes one), and finds a
    property by looping over the names with their spaces removed, again at each attribute set, ``pack`` and
    ``unpack``: about 10 µs per object and 20-40 µs per set of three properties packed or unpacked, a hot-add over
    MQTT 5 making seven such objects. Here the tables are paho's own, built once and shared (paho never changes
    them), a name is one dictionary lookup, and ``pack`` looks at the properties set (not all 27) and writes each
    with paho's helper for its type (not after seven ``types.index`` per value). What paho checks of a value (the
    ranges, the lists of a repeatable property), an unknown name and a property of another packet type go through
    paho's own ``__setattr__``, so errors are paho's. tests/unit/adapters/mqtt/test_aiomqtt_internals.py compares
    the two for every property and packet type.
    """

    def __init__(self, packetType: int) -> None:  # noqa: N803 - paho's name
        object.__setattr__(self, "packetType", packetType)
        object.__setattr__(self, "types", _TYPES)
        object.__setattr__(self, "names", _NAMES)
        object.__setattr__(self, "properties", _TABLE)

    def getIdentFromName(self, compressedName: str) -> int:  # noqa: N802, N803 - paho's names
        """The identifier of the property named ``compressedName`` (no spaces); -1 if there is none."""
        return _IDENT.get(compressedName, -1)

    def getNameFromIdent(self, identifier: int) -> str | None:  # noqa: N802 - paho's name
        """The name (with spaces) of property ``identifier``; ``None`` if there is none."""
        return _SPACED.get(identifier)

    def __setattr__(self, name: str, value: Any) -> None:  # noqa: ANN401 - a property's value
        compressed = name.replace(" ", "")
        ident = _IDENT.get(compressed)
        if ident is None or compressed in _CHECKED or self.packetType not in _TABLE[ident][1]:
            super().__setattr__(name, value)  # type: ignore[no-untyped-call] # paho's checks, errors, own attributes
            return
        object.__setattr__(self, compressed, value)

    def _present(self) -> list[tuple[int, str]]:
        """The properties set, in paho's order: a few names of the object's, not the 27 of the table."""
        names = [name for name in self.__dict__ if name in _RANK]
        if len(names) > 1:
            names.sort(key=_RANK.__getitem__)
        return [(_IDENT[name], name) for name in names]

    def pack(self) -> bytes:
        """The properties as on the wire: their length, then each (as paho's ``writeProperty`` writes them)."""
        buffer = b""
        for ident, name in self._present():
            head, write = _WRITE[ident]
            values = getattr(self, name) if name in _MULTIPLE else (getattr(self, name),)
            for value in values:
                buffer += head + write(value) if write is not None else head
        return bytes(VariableByteIntegers.encode(len(buffer))) + buffer  # type: ignore[no-untyped-call]

    def clear(self) -> None:
        """Remove every property."""
        for _, name in self._present():
            object.__delattr__(self, name)

    def isEmpty(self) -> bool:  # noqa: N802 - paho's name
        """Whether no property is set."""
        return not self._present()


def install_fast_properties() -> bool:
    """Make paho decode MQTT 5 properties into :class:`FastProperties` (for the whole process: the controller's).

    Returns whether it could (``False``: paho no longer builds them where this knows; its own class stays).
    """
    try:
        modules = [importlib.import_module(name) for name in ("paho.mqtt._packet", "paho.mqtt.client")]
    except ImportError:
        modules = []
    known = (Properties, FastProperties)
    if not modules or not all(getattr(module, "Properties", None) in known for module in modules):
        _log.info("paho: properties are not built where install_fast_properties knows; keeping paho's own class")
        return False
    for module in modules:
        module.Properties = FastProperties  # type: ignore[attr-defined]
    return True


# ------------------------------------------------------------------------------------------ MQTT 5 reason codes


class FastReasonCode(ReasonCode):
    """paho's MQTT 5 ``ReasonCode`` without its per-object copy of the table of names; the same objects otherwise.

    paho's ``__init__`` copies its class's table of 45 reason codes (a read-only mapping that nothing changes) into
    every object: ~3 µs of the ~4 µs of each, and paho makes one per PUBACK it reads. Here the object refers to the
    class's table; the rest is paho's ``__init__`` as it is, so values, names and errors are paho's.
    tests/unit/adapters/mqtt/test_aiomqtt_internals.py compares the two for every packet type, name and value.
    """

    def __init__(self, packetType: int, aName: str = "Success", identifier: int = -1) -> None:  # noqa: N803 - paho's
        self.names = type(self).names
        self.packetType = packetType
        if identifier == -1:
            if packetType == PacketTypes.DISCONNECT and aName == "Success":
                aName = "Normal disconnection"  # noqa: N806 - paho's name
            self.set(aName)
        else:
            self.value = identifier
            self.getName()  # paho's check that the value has a name for this packet type


def install_fast_reason_codes() -> bool:
    """Make paho build its reason codes as :class:`FastReasonCode` (for the whole process: the controller's).

    Returns whether it could (``False``: paho no longer builds them where this knows; its own class stays).
    """
    try:
        modules = [importlib.import_module(name) for name in ("paho.mqtt._packet", "paho.mqtt.client")]
    except ImportError:
        modules = []
    known = (ReasonCode, FastReasonCode)
    if not modules or not all(getattr(module, "ReasonCode", None) in known for module in modules):
        _log.info("paho: reason codes are not built where install_fast_reason_codes knows; keeping paho's own class")
        return False
    for module in modules:
        module.ReasonCode = FastReasonCode  # type: ignore[attr-defined]
    return True
