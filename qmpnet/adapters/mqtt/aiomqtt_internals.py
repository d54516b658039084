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
  decoded into a tuple with a reason code and properties, the time noted twice under a lock; ~45 k instructions
  for the few bytes of a PUBACK, and a hot-add reads four. :func:`fewer_system_calls` also gives paho a
  ``loop_read`` that is paho's own (as many packets as messages in flight, each read by ``_packet_read``) but takes
  two kinds of packets found whole in what one ``recv`` returned at once:

  - a plain PUBACK (``40 02`` and the message id; with MQTT 5 also ``40 03``, the id and the reason code "no
    matching subscribers", which the broker gives retained state and events nobody listens to), doing with it what
    paho's ``_handle_pubackcomp`` does (its log line, ``_do_on_publish`` under ``_out_message_mutex`` if the
    message is paho's, ``_last_bytes_received``);
  - a PUBLISH of QoS 0 or 1 (the controller's requests, the client's answers), decoded as paho's ``decode_publish``
    does and then handled as paho's ``_handle_publish`` does (the ``MQTTMessage``, its log line, its timestamp,
    ``_handle_on_message``, ``_send_puback`` unless ``_manual_ack``, ``_last_bytes_received``). One that paho would
    find malformed, and QoS 2, are left to paho's own reading, which tells its error its way.

  The reason code and the properties made are a :class:`FastReasonCode` and :class:`FastProperties` in any process
  (the client's too). It uses paho's ``_packet_read``, ``_protocol``, ``_in_packet``, ``_in_messages``,
  ``_out_messages``, ``_out_message_mutex``, ``_do_on_publish``, ``_easy_log``, ``_msgtime_mutex``,
  ``_last_bytes_received``, ``_loop_rc_handle``, ``_handle_on_message``, ``_manual_ack``, ``_send_puback``,
  ``time_func``, ``MQTTMessage`` and ``paho.mqtt._packet.DECODE_ERRORS`` (``buffered_socket.read_at_once``: the
  socket's module shares this room).

* **A task and an event per message** (issue 17). ``aiomqtt.Client.publish`` makes, per message, a coroutine, an
  :class:`asyncio.Event`, a pending-call entry and a timeout scope, and a sender keeping several messages in flight
  a task per message on top. :class:`Publisher` hands each message to paho's ``publish`` and hears its PUBACK
  from paho's ``on_publish`` callback (the controller's outbox); :func:`publish_at_once` hands one over without
  waiting for it (the requester, which waits for the answer instead). Both use ``aiomqtt.Client._client``.
* **paho's MQTT 5 properties** rebuild two tables of 27 entries per object and find a property by looping over
  its names: ~10 µs per PUBACK read and 20-40 µs per set of properties packed or unpacked. :class:`FastProperties`
  shares paho's own tables and finds a name in a dictionary; :func:`install_fast_properties` makes paho decode
  into it (the controller's process only: it names ``paho.mqtt._packet.Properties`` and
  ``paho.mqtt.client.Properties``). Its ``readProperty`` reads a string without paho's loop over its characters
  (``ord`` and three comparisons each: ~45 k instructions for a request's response topic) and binary data without
  paho's six list lookups; ``clear`` of an object holding none returns at once.
* **paho's MQTT 5 reason codes** copy paho's table of 45 reason codes into every object: ~3 µs per PUBACK read
  (each makes one), a hot-add reading four. :class:`FastReasonCode` shares the table; :func:`install_fast_reason_codes`
  makes paho build it (the controller's process only: it names ``paho.mqtt._packet.ReasonCode`` and
  ``paho.mqtt.client.ReasonCode``).
* **paho's generic publish** (issue 17): :class:`Publisher` hands a QoS 1 message going out at once to
  ``DirectPublish``, which does what paho's ``publish`` and ``_send_publish`` do with it (the message kept in
  ``_out_messages``, counted in ``_inflight_messages``, paho's log line, the same packet, ``_packet_queue``) without
  their checks and helpers for any other kind of call: ~41 k instructions per message against ~56 k. It uses
  ``_sock``, ``_protocol``, ``_out_messages``, ``_out_message_mutex``, ``_inflight_messages``,
  ``_max_inflight_messages``, ``_max_queued_messages``, ``_mid_generate``, ``_easy_log`` and ``_packet_queue``.
* **paho's log lines**: paho's ``_easy_log`` reads its ``on_log`` property and hands every line to
  ``Logger.log``, which drops it (DEBUG is off): four calls deep, ten lines per hot-add. :func:`quieter_logging`
  (the controller's client) gives it a ``_easy_log`` that calls paho's only when ``_on_log`` is set or ``_logger``
  is enabled for the line's level (paho's ``LOGGING_LEVEL``).
* **paho's message infos** each make a :class:`threading.Condition` (a lock, a queue of waiters, five bound
  methods), taken again to mark the message published and to say whether it is: ~19 k instructions per message,
  and a hot-add makes five (its request and four messages out). :class:`FastMessageInfo` shares one condition and
  takes it only while a thread waits; :func:`install_fast_message_info` makes paho make it (the controller's process
  only: it names ``paho.mqtt.client.MQTTMessageInfo`` and sets its ``_condition``, ``_published`` and ``_iterpos``).

tests/unit/adapters/mqtt/test_aiomqtt_internals.py is the contract: it fails, naming what changed, when a new version
of ``aiomqtt`` or ``paho`` no longer works this way; and it checks that no other module of the MQTT adapter uses a
private name of ``aiomqtt`` or ``paho``. ``aiomqtt`` is not pinned exactly (``>=2.5,<3``, the project's rule), so at
run time :func:`fewer_system_calls`, :class:`Publisher`, :func:`publish_at_once` and :func:`install_fast_properties`
step aside, leaving the libraries' own paths, when a name they need is missing: the speed-up is lost, never the
connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import socket
import threading
from typing import TYPE_CHECKING, Any, Final

import aiomqtt
from paho.mqtt import properties as wire
from paho.mqtt.client import MQTTMessageInfo
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers, readBytes
from paho.mqtt.reasoncodes import ReasonCode

from qmpnet.adapters.mqtt.buffered_socket import BufferedSocket, LoopWrites, read_at_once

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "BufferedSocket",
    "DirectPublish",
    "FastMessageInfo",
    "FastProperties",
    "FastReasonCode",
    "dispatching_queue",
    "fewer_system_calls",
    "install_fast_message_info",
    "install_fast_properties",
    "install_fast_reason_codes",
    "paho_of",
    "publish_at_once",
    "quieter_logging",
]

_log = logging.getLogger(__name__)



def paho_of(client: aiomqtt.Client) -> Any:  # noqa: ANN401 - paho's client is untyped
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
    paho = paho_of(client)
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

    writes = LoopWrites(loop, paho.on_socket_register_write, paho.on_socket_unregister_write)
    paho.on_socket_open = on_socket_open
    paho.on_socket_register_write = writes.register
    paho.on_socket_unregister_write = writes.unregister
    read_at_once(paho, FastReasonCode, FastProperties)


def quieter_logging(client: aiomqtt.Client) -> bool:
    """Make ``client``'s paho skip a log line nobody takes at once; whether it could (else paho's own stays)."""
    paho = paho_of(client)
    module = importlib.import_module("paho.mqtt.client")
    levels = getattr(module, "LOGGING_LEVEL", None)
    if not (all(hasattr(paho, name) for name in ("_easy_log", "_on_log", "_logger")) and isinstance(levels, dict)):
        _log.info("paho: not the private names quieter logging needs; paho logs every line itself")
        return False
    theirs = paho._easy_log  # noqa: SLF001 - see the module docstring

    def easy_log(level: int, fmt: str, *args: Any) -> None:  # noqa: ANN401 - paho's arguments
        logger = paho._logger  # noqa: SLF001 - see the module docstring
        if paho._on_log is None and (logger is None or not logger.isEnabledFor(levels[level])):  # noqa: SLF001
            return  # what paho would do: no callback, and Logger.log drops a level it is not enabled for
        theirs(level, fmt, *args)

    paho._easy_log = easy_log  # noqa: SLF001 - see the module docstring
    return True


#: What paho's client and its module must have for :class:`DirectPublish`.
_DIRECT_NAMES: Final = ("_sock", "_protocol", "_out_messages", "_out_message_mutex", "_inflight_messages",
                        "_max_inflight_messages", "_max_queued_messages", "_mid_generate", "_easy_log",
                        "_packet_queue")  # fmt: skip
_DIRECT_MODULE_NAMES: Final = ("MQTTMessage", "MQTTv5", "MQTTv311", "PUBLISH", "MQTT_LOG_DEBUG", "time_func",
                               "mqtt_ms_wait_for_puback", "mqtt_ms_publish", "MQTTErrorCode")  # fmt: skip
#: paho's log line of a PUBLISH sent, by (MQTT 5, a payload).
_SENDING: Final = {
    (True, True): "Sending PUBLISH (d%d, q%d, r%d, m%d), '%s', properties=%s, ... (%d bytes)",
    (True, False): "Sending PUBLISH (d%d, q%d, r%d, m%d), '%s', properties=%s (NULL payload)",
    (False, True): "Sending PUBLISH (d%d, q%d, r%d, m%d), '%s', ... (%d bytes)",
    (False, False): "Sending PUBLISH (d%d, q%d, r%d, m%d), '%s' (NULL payload)",
}
#: Larger payloads take paho's own path (which refuses a packet past MQTT's limit of 268,435,455 bytes).
_DIRECT_MAX_PAYLOAD: Final = 1 << 20


class DirectPublish:
    """paho's ``publish`` of a QoS 1 message going out at once, line for line, without its generic detours.

    paho's ``publish`` checks and converts what any caller may pass (a ``str`` or number payload, any QoS), then
    ``_send_publish`` checks it again and packs it through three helpers: ~55 k instructions per message, and a
    hot-add publishes four. Here the common case (QoS 1, a ``bytes`` payload, a topic without wildcards, a connected
    socket, room in flight and in the queue) is what paho does with it, in the same order and with the same state:
    the message kept in ``_out_messages`` (sent again after a reconnect), counted in flight, paho's log line, the
    packet's bytes, and paho's ``_packet_queue``. Anything else returns ``None``: paho's ``publish`` takes it.
    tests/unit/adapters/mqtt/test_aiomqtt_internals.py compares the two, bytes and state.
    """

    __slots__ = ("_clock", "_codes", "_debug", "_message", "_paho", "_publish", "_unsent", "_v5", "_waiting")

    def __init__(self, paho: Any, module: Any) -> None:  # noqa: ANN401 - paho's
        self._paho = paho
        self._message = module.MQTTMessage
        self._v5 = paho._protocol == module.MQTTv5  # noqa: SLF001 - see the module docstring
        self._publish = module.PUBLISH
        self._debug = module.MQTT_LOG_DEBUG
        self._clock = module.time_func
        self._waiting = module.mqtt_ms_wait_for_puback
        self._unsent = module.mqtt_ms_publish
        self._codes = module.MQTTErrorCode

    @classmethod
    def of(cls, paho: Any) -> DirectPublish | None:  # noqa: ANN401 - paho's
        """The direct path for ``paho``; ``None`` where paho no longer has what it needs."""
        module = importlib.import_module("paho.mqtt.client")
        if not all(hasattr(paho, name) for name in _DIRECT_NAMES) or not all(
            hasattr(module, name) for name in _DIRECT_MODULE_NAMES
        ):
            _log.info("paho: not the private names publishing directly needs; paho's publish sends every message")
            return None
        if paho._protocol not in (module.MQTTv5, module.MQTTv311):  # noqa: SLF001 - see the module docstring
            return None
        return cls(paho, module)

    def __call__(self, topic: str, payload: bytes, *, retain: bool, properties: Properties | None) -> Any:  # noqa: ANN401
        """What paho's ``publish(topic, payload, 1, retain, properties)`` does; ``None`` when paho's own must do it."""
        paho = self._paho  # the privates below: see the module docstring
        topic_bytes = topic.encode()
        queued = paho._max_queued_messages  # noqa: SLF001
        inflight = paho._max_inflight_messages  # noqa: SLF001
        if (
            type(payload) is not bytes
            or not topic_bytes
            or "+" in topic  # in the str: ``bytes in bytes`` first tries the byte as an int, raising and
            or "#" in topic  # clearing a TypeError (~1.8 k instructions each)
            or len(topic_bytes) > 65535
            or len(payload) > _DIRECT_MAX_PAYLOAD
            or paho._sock is None  # noqa: SLF001
            or (queued > 0 and len(paho._out_messages) >= queued)  # noqa: SLF001
            or (inflight > 0 and paho._inflight_messages >= inflight)  # noqa: SLF001
        ):
            return None  # paho's publish says what is wrong, refuses it or queues it
        mid = paho._mid_generate()  # noqa: SLF001
        message = self._message(mid, topic_bytes)
        message.timestamp = self._clock()
        message.payload = payload
        message.qos = 1
        message.retain = retain
        message.dup = False
        message.properties = properties
        info = message.info
        with paho._out_message_mutex:  # noqa: SLF001
            if mid in paho._out_messages:  # noqa: SLF001 - as paho's publish refuses it
                info.rc = self._codes.MQTT_ERR_QUEUE_SIZE
                return info
            paho._out_messages[mid] = message  # noqa: SLF001
            paho._inflight_messages += 1  # noqa: SLF001
            message.state = self._waiting
            if paho._sock is None:  # noqa: SLF001 - lost meanwhile: kept, sent after the reconnect, as paho does
                paho._inflight_messages -= 1  # noqa: SLF001
                message.state = self._unsent
                info.rc = self._codes.MQTT_ERR_NO_CONN
                return info
            info.rc = paho._packet_queue(self._publish, self._packet(mid, topic_bytes, payload, retain, properties),  # noqa: SLF001
                                         mid, 1, info)  # fmt: skip
            return info

    def _packet(self, mid: int, topic: bytes, payload: bytes, retain: bool, properties: Properties | None) -> bytearray:
        """The PUBLISH packet paho's ``_send_publish`` makes (QoS 1, not a duplicate), after its log line."""
        size = len(payload)
        shown = (False, 1, retain, mid, topic, *((properties,) if self._v5 else ()), *((size,) if size else ()))
        self._paho._easy_log(self._debug, _SENDING[self._v5, bool(size)], *shown)  # noqa: SLF001 - see the docstring
        packed = (b"\x00" if properties is None else properties.pack()) if self._v5 else b""  # type: ignore[no-untyped-call]
        remaining = 4 + len(topic) + size + len(packed)
        packet = bytearray((0x32 | retain,))
        while remaining > 0x7F:
            packet.append(remaining & 0x7F | 0x80)
            remaining >>= 7
        packet.append(remaining)
        packet += len(topic).to_bytes(2, "big")
        packet += topic
        packet += mid.to_bytes(2, "big")
        packet += packed
        packet += payload
        return packet


def publish_at_once(
    client: aiomqtt.Client, topic: str, payload: bytes, *, qos: int, properties: Properties | None
) -> bool | None:
    """Hand a message to ``client``'s paho client, not waiting for the broker's acknowledgement.

    For a sender that needs no acknowledgement (the requester waits for the answer instead): no coroutine, event or
    task per message, as with :class:`Publisher`. ``True``: handed over; ``False``: paho refused it (no
    connection), nothing was sent; ``None``: the paho client is not where expected (publish with
    ``client.publish``).
    """
    paho = paho_of(client)
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
    _TYPES.index("Two Byte Integer"): wire.writeInt16,
    _TYPES.index("Four Byte Integer"): wire.writeInt32,
    _TYPES.index("Variable Byte Integer"): VariableByteIntegers.encode,
    _TYPES.index("Binary Data"): wire.writeBytes,
    _TYPES.index("UTF-8 Encoded String"): wire.writeUTF,
    _TYPES.index("UTF-8 String Pair"): lambda pair: wire.writeUTF(pair[0]) + wire.writeUTF(pair[1]),  # type: ignore[no-untyped-call]
}
#: Per property identifier: its identifier as written (a variable byte integer) and the writer of its type.
_WRITE: Final[dict[int, tuple[bytes, Callable[[Any], bytes] | None]]] = {
    ident: (bytes(VariableByteIntegers.encode(ident)), _WRITERS.get(kind))  # type: ignore[no-untyped-call]
    for ident, (kind, _) in _TABLE.items()
}
#: Properties that may be given more than once (a list of values).
_COMPRESSED: Final[dict[int, str]] = {ident: name for name, ident in _IDENT.items()}
_MULTIPLE: Final = frozenset(name for name in _IDENT if _PROTOTYPE.allowsMultiple(name))
#: Names whose values paho checks (a range, or a list it appends to): set through paho's own ``__setattr__``.
_CHECKED: Final = _MULTIPLE | {
    "ReceiveMaximum", "TopicAlias", "TopicAliasMaximum", "MaximumPacketSize", "SubscriptionIdentifier",
    "RequestResponseInformation", "RequestProblemInformation", "PayloadFormatIndicator",
}  # fmt: skip


_UTF8: Final = _TYPES.index("UTF-8 Encoded String")
_BINARY: Final = _TYPES.index("Binary Data")
_OWN: Final = len(("packetType", "types", "names", "properties"))  # what a FastProperties holds of its own


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

    def readProperty(self, buffer: bytes, type: int, propslen: int) -> tuple[Any, int]:  # noqa: A002, N802 - paho's
        """A property's value and length, as paho reads them; a string without paho's loop over its characters."""
        if type == _BINARY:
            return readBytes(buffer, propslen)  # type: ignore[no-untyped-call,no-any-return] # without the lookups
        if type == _UTF8 and propslen >= 2 and len(buffer) >= 2:
            length = int.from_bytes(buffer[:2], "big")
            with contextlib.suppress(UnicodeDecodeError):  # paho's own read raises it again
                text = buffer[2 : 2 + length].decode()
                # A strict decode never yields surrogates; NUL and U+FEFF are paho's to refuse.
                if length <= propslen - 2 and "\x00" not in text and "\ufeff" not in text:
                    return text, length + 2
        return super().readProperty(buffer, type, propslen)  # type: ignore[no-untyped-call,no-any-return]

    def unpack(self, buffer: bytes) -> tuple[FastProperties, int]:
        """Read the properties of ``buffer`` as paho's ``unpack`` does; their length with its own."""
        size = buffer[0] if buffer else 0x80
        if size >= 0x80 or len(self.__dict__) != _OWN:  # a length of several bytes, or not a new object: paho reads
            return super().unpack(buffer)  # type: ignore[no-untyped-call,no-any-return]
        rest, left = buffer[1:], size
        while left > 0:
            ident = rest[0] if rest else 0x80
            name = _COMPRESSED.get(ident)
            if name is None or (name not in _MULTIPLE and name in self.__dict__):  # unknown, or given twice
                return super().unpack(buffer)  # type: ignore[no-untyped-call,no-any-return] # paho's error
            value, length = self.readProperty(rest[1:], _TABLE[ident][0], left - 1)
            rest, left = rest[1 + length :], left - 1 - length
            setattr(self, _SPACED[ident], value)
        return self, size + 1

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
        if len(self.__dict__) == _OWN:  # none set (paho's unpack clears a new object first)
            return
        for _, name in self._present():
            object.__delattr__(self, name)

    def isEmpty(self) -> bool:  # noqa: N802 - paho's name
        """Whether no property is set."""
        return not self._present()


def install_fast_properties() -> bool:
    """Make paho decode MQTT 5 properties into :class:`FastProperties` (for the whole process: the controller's).

    Returns whether it could (``False``: paho no longer builds them where this knows; its own class stays).
    """
    return _install("Properties", Properties, FastProperties, "properties are not built where install_fast_properties")


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
    return _install("ReasonCode", ReasonCode, FastReasonCode,
                    "reason codes are not built where install_fast_reason_codes")  # fmt: skip


def _install(name: str, theirs: type, ours: type, where: str) -> bool:
    """Make paho's packet and client modules use ``ours`` for their class ``name`` if both use ``theirs``."""
    try:
        modules = [importlib.import_module(module) for module in ("paho.mqtt._packet", "paho.mqtt.client")]
    except ImportError:
        modules = []
    if not modules or not all(getattr(module, name, None) in (theirs, ours) for module in modules):
        _log.info("paho: %s knows; keeping paho's own class", where)
        return False
    for module in modules:
        setattr(module, name, ours)
    return True


# ------------------------------------------------------------------------------------------ paho's message info

#: The one condition every :class:`FastMessageInfo` waits on, and how many threads wait on it.
_PUBLISHED: Final = threading.Condition()
_SUCCESS: Final = MQTTErrorCode.MQTT_ERR_SUCCESS
_waiting = 0


class FastMessageInfo(MQTTMessageInfo):
    """paho's ``MQTTMessageInfo`` without a :class:`threading.Condition` of its own; the same objects otherwise.

    paho makes one per message, incoming and outgoing (five per hot-add over MQTT), each with a condition of its
    own (a lock and a queue of waiters) that it takes to mark the message published and to say whether it is, for a
    ``wait_for_publish`` from another thread that the controller never makes. Here every object shares one condition;
    a published message says so with a plain assignment, taking the condition only while some thread waits in
    ``wait_for_publish`` (counted before it looks at the flag, so no wake-up is missed), and ``is_published`` reads
    the flag as it is. tests/unit/adapters/mqtt/test_aiomqtt_internals.py compares the two.
    """

    __slots__ = ()

    def __init__(self, mid: int) -> None:
        self.mid = mid
        self._published = False
        self._condition = _PUBLISHED
        self.rc = _SUCCESS
        self._iterpos = 0

    def _set_as_published(self) -> None:
        self._published = True
        if _waiting:
            with _PUBLISHED:
                _PUBLISHED.notify_all()

    def wait_for_publish(self, timeout: float | None = None) -> None:
        """paho's: block until the message is published, or until ``timeout`` seconds have passed."""
        global _waiting  # noqa: PLW0603 - the waiters of the shared condition
        with _PUBLISHED:
            _waiting += 1
        try:
            super().wait_for_publish(timeout)
        finally:
            with _PUBLISHED:
                _waiting -= 1

    def is_published(self) -> bool:
        """paho's: whether the message has been published (errors for a message paho did not queue)."""
        if self.rc != _SUCCESS:
            return super().is_published()  # paho's errors
        return self._published


def install_fast_message_info() -> bool:
    """Make paho make :class:`FastMessageInfo` s (for the whole process: the controller's).

    Returns whether it could (``False``: paho no longer makes them where this knows; its own class stays).
    """
    module = importlib.import_module("paho.mqtt.client")
    if getattr(module, "MQTTMessageInfo", None) not in (MQTTMessageInfo, FastMessageInfo):
        _log.info("paho: message infos are not made where install_fast_message_info knows; keeping paho's own class")
        return False
    module.MQTTMessageInfo = FastMessageInfo  # type: ignore[attr-defined]
    return True
