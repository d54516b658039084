"""The contract with aiomqtt's undocumented behaviour (qmpnet/adapters/mqtt/aiomqtt_internals.py), and no privates.

The requester relies on ``aiomqtt.Client`` handing each message to its queue's ``put_nowait`` from paho's
``on_message`` callback, synchronously; ``fewer_system_calls`` relies on where aiomqtt keeps its paho client, on
paho's socket attribute and callbacks, and on aiomqtt's reader honouring ``pending()``. These tests fail, saying
what changed, when the pinned versions no longer do (the last against a minimal MQTT 3.1.1 broker on loopback);
and they check that no other module of the MQTT adapter uses a private name of ``aiomqtt`` or ``paho``.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import importlib
import inspect
import logging
import socket
import struct
import threading
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import aiomqtt
import paho.mqtt.client
import pytest
from paho.mqtt.client import MQTTMessage
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.exception import MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from qmpnet.adapters import mqtt
from qmpnet.adapters.mqtt.aiomqtt_internals import (
    BufferedSocket,
    DirectPublish,
    FastMessageInfo,
    FastProperties,
    FastReasonCode,
    dispatching_queue,
    fewer_system_calls,
    install_fast_message_info,
    install_fast_properties,
    install_fast_reason_codes,
    publish_at_once,
    quieter_logging,
)
from qmpnet.adapters.mqtt.buffered_socket import read_at_once
from qmpnet.adapters.mqtt.publisher import Publisher

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

PACKAGE = Path(mqtt.__file__).parent


def test_the_client_still_takes_a_queue_type() -> None:
    parameters = inspect.signature(aiomqtt.Client).parameters
    assert "queue_type" in parameters, "aiomqtt.Client no longer takes queue_type: dispatching_queue cannot be used"


async def test_a_message_reaches_the_dispatcher_inside_pahos_callback() -> None:
    seen: list[aiomqtt.Message] = []
    client = aiomqtt.Client("127.0.0.1", 1, queue_type=dispatching_queue(seen.append))  # never connected
    paho_client: Any = client._client
    assert isinstance(paho_client, paho.mqtt.client.Client), "aiomqtt.Client no longer wraps a paho Client"
    assert paho_client.on_message is not None, "aiomqtt no longer installs paho's on_message callback"
    message = MQTTMessage(mid=7, topic=b"qmpnet/c1/status")
    message.payload = b'{"state": "online"}'
    paho_client.on_message(paho_client, None, message)
    assert [(str(m.topic), m.payload) for m in seen] == [("qmpnet/c1/status", b'{"state": "online"}')], (
        "aiomqtt no longer hands a message to its queue's put_nowait from paho's on_message callback: "
        "the requester's ordering (qmpnet/adapters/mqtt/aiomqtt_internals.py) is lost"
    )


def _private_names(*classes: type[Any]) -> set[str]:
    names = {name for cls in classes for name in dir(cls) if name.startswith("_") and not name.startswith("__")}
    for cls in classes:
        for klass in cls.__mro__:
            if klass is object:
                continue
            source = inspect.getsource(klass)
            for node in ast.walk(ast.parse(inspect.cleandoc(source) if source.startswith(" ") else source)):
                if not isinstance(node, ast.Attribute) or not isinstance(node.value, ast.Name):
                    continue
                if node.value.id == "self" and node.attr.startswith("_") and not node.attr.startswith("__"):
                    names.add(node.attr)
    return names


def test_no_module_of_the_adapter_reaches_into_aiomqtt_or_paho() -> None:
    privates = _private_names(aiomqtt.Client, aiomqtt.Message, paho.mqtt.client.Client, MQTTMessage)
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name in ("aiomqtt_internals.py", "buffered_socket.py"):
            continue  # the one room for them (its socket's module reads a PUBACK as paho does)
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            # self._x is the module's own attribute (no class of the adapter subclasses the libraries' classes).
            own = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
            if isinstance(node, ast.Attribute) and node.attr in privates and not own:
                found.setdefault(path.name, []).append(f"line {node.lineno}: .{node.attr}")
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(base).split("[")[0] for base in node.bases}
                assert not {b for b in bases if b.startswith(("aiomqtt", "paho")) or b in {"Client", "MQTTMessage"}}, (
                    f"{path.name}: class {node.name} subclasses a class of aiomqtt or paho"
                )
    assert found == {}, "private names of aiomqtt or paho used in adapters/mqtt/ (see aiomqtt_internals.py)"


def _publish(topic: str, payload: bytes) -> bytes:
    """An MQTT 3.1.1 PUBLISH packet, QoS 0 (remaining length < 128)."""
    body = struct.pack("!H", len(topic)) + topic.encode() + payload
    assert len(body) < 128
    return bytes([0x30, len(body)]) + body


class _Broker:
    """A minimal MQTT 3.1.1 broker on loopback: answers CONNECT (followed by ``greeting``) and keeps what it reads."""

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        self.received = bytearray()
        self._grew = asyncio.Event()

    async def start(self) -> tuple[asyncio.Server, int]:
        """The listening server and its port."""
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return server, server.sockets[0].getsockname()[1]

    async def until(self, marker: bytes, timeout: float = 5) -> None:
        """Wait until what was read contains ``marker``."""
        async with asyncio.timeout(timeout):
            while marker not in self.received:
                self._grew.clear()
                await self._grew.wait()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(1024)  # CONNECT
            writer.write(b"\x20\x02\x00\x00" + self.greeting)  # CONNACK, and what follows in the same segment
            await writer.drain()
            while chunk := await reader.read(4096):
                self.received.extend(chunk)
                self._grew.set()
        finally:
            writer.close()


async def test_fewer_system_calls_reads_a_burst_at_once_and_writes_without_waking_the_loop() -> None:
    # CONNACK and three messages in one write: one TCP segment, many small packets.
    broker = _Broker(b"".join(_publish("t/x", b"m%d" % n) for n in range(3)))
    server, port = await broker.start()
    seen: list[aiomqtt.Message] = []
    nodelay = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client = aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V311, socket_options=(nodelay,),
                            queue_type=dispatching_queue(seen.append))  # fmt: skip
    fewer_system_calls(client)
    paho_client: Any = client._client
    try:
        async with server, client:
            for _ in range(200):
                if len(seen) == 3:
                    break
                await asyncio.sleep(0.01)  # the broker's burst, read by the loop's reader: polled, bounded
            sock = paho_client._sock
            assert isinstance(sock, BufferedSocket), "paho no longer keeps its socket in Client._sock"
            assert [m.payload for m in seen] == [b"m0", b"m1", b"m2"], (
                "messages read from the buffer were not all handed over: aiomqtt's reader no longer calls paho "
                "again while the socket's pending() says bytes are left"
            )
            assert sock.pending() == 0
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), (
                "the socket options given to aiomqtt.Client are not set on the wrapped socket (Nagle's delays)"
            )
            loop = asyncio.get_running_loop()
            woken: list[object] = []
            threadsafe = loop.call_soon_threadsafe

            def counting(*args: Any, **kwargs: Any) -> Any:
                woken.append(args[0])
                return threadsafe(*args, **kwargs)

            removals: list[object] = []
            remove_writer = loop.remove_writer

            def counting_removal(fd: Any) -> bool:
                removals.append(fd)
                return remove_writer(fd)

            loop.call_soon_threadsafe = counting  # type: ignore[method-assign,assignment]
            loop.remove_writer = counting_removal  # type: ignore[method-assign]
            try:
                await client.publish("t/out", b"x", qos=0)
                await broker.until(b"t/out")
            finally:
                del loop.call_soon_threadsafe
                del loop.remove_writer
            assert woken == [], f"a publish on the loop's thread still woke the loop through its self-pipe: {woken}"
            assert removals == [], "a write on the loop's thread asked aiomqtt to remove a writer it never added"
            assert not loop.remove_writer(sock.fileno()), "a writer is left on the socket (aiomqtt's, from the connect)"
    finally:
        server.close()


async def test_fewer_system_calls_steps_aside_when_a_private_name_is_missing(caplog: pytest.LogCaptureFixture) -> None:
    client = aiomqtt.Client("127.0.0.1", 1883)
    paho_client: Any = client._client
    opened = paho_client.on_socket_open
    del client._socket_options  # as a later aiomqtt might keep its options elsewhere
    with caplog.at_level(logging.INFO, logger="qmpnet.adapters.mqtt.aiomqtt_internals"):
        fewer_system_calls(client)
    assert paho_client.on_socket_open is opened  # aiomqtt's own I/O path, untouched
    assert "using their own I/O paths" in caplog.text


class _CountingSocket:
    """A socket whose ``send`` calls are counted (a ``socket.socket`` takes no new attributes)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sends = 0

    def send(self, data: bytes) -> int:
        self.sends += 1
        return self.sock.send(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


async def test_packets_queued_in_one_turn_leave_in_one_send() -> None:
    broker = _Broker()
    server, port = await broker.start()
    client = aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V311)
    fewer_system_calls(client)
    paho_client: Any = client._client
    try:
        async with server, client:
            sock = paho_client._sock
            assert isinstance(sock, BufferedSocket)
            counting = _CountingSocket(sock._sock)
            sock._sock = counting  # type: ignore[assignment]
            await asyncio.gather(*(client.publish(f"t/out{n}", b"x%d" % n, qos=0) for n in range(3)))
            await broker.until(b"t/out2")
            assert bytes(broker.received) == b"".join(_publish(f"t/out{n}", b"x%d" % n) for n in range(3))
            assert counting.sends == 1, (
                f"three packets queued in one turn took {counting.sends} sends: paho's loop_write no longer hands "
                "each packet to _sock.send whole, or the burst is no longer gathered"
            )
    finally:
        server.close()


async def test_what_a_full_socket_does_not_take_is_sent_in_order_as_it_drains() -> None:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)  # noqa: FBT003 - socket's API
    theirs.setblocking(False)  # noqa: FBT003 - socket's API
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sock = BufferedSocket(ours, loop)
    burst = bytes(range(256)) * 4096  # 1 MiB: more than the socket takes at once
    later = b"after the burst"
    try:
        with sock.gathered():
            assert sock.send(burst[:1000]) == 1000
            assert sock.send(burst[1000:]) == len(burst) - 1000
        assert sock.waiting() > 0, "the socket took the whole burst: make it larger"
        assert sock.send(later) == len(later)  # behind what waits, never ahead of it
        got = bytearray()
        reader = loop.create_future()

        def read() -> None:
            with contextlib.suppress(BlockingIOError):
                got.extend(theirs.recv(1 << 20))
            if len(got) >= len(burst) + len(later) and not reader.done():
                reader.set_result(None)

        loop.add_reader(theirs.fileno(), read)
        try:
            await asyncio.wait_for(reader, 10)
        finally:
            loop.remove_reader(theirs.fileno())
        assert bytes(got) == burst + later
        assert sock.waiting() == 0
        assert not loop.remove_writer(ours.fileno()), "the drained socket's writer was left on the loop"
    finally:
        sock.close()
        theirs.close()


async def test_closing_sends_what_waits_first() -> None:
    """paho closes the socket inside ``loop_write`` right after it has written DISCONNECT, within the burst."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)  # noqa: FBT003 - socket's API
    sock = BufferedSocket(ours, loop)
    with sock.gathered():
        sock.send(b"\xe0\x00")  # DISCONNECT
        sock.close()
    assert theirs.recv(16) == b"\xe0\x00"
    assert theirs.recv(16) == b""  # then closed
    theirs.close()


async def test_closing_drops_what_the_socket_cannot_take_and_its_writer() -> None:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)  # noqa: FBT003 - socket's API
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sock = BufferedSocket(ours, loop)
    fileno = ours.fileno()
    with sock.gathered():
        sock.send(b"x" * (1 << 20))
    assert sock.waiting() > 0
    sock.close()
    assert sock.waiting() == 0
    assert ours.fileno() == -1
    assert not loop.remove_writer(fileno)
    theirs.close()


class _PahoOnSocket:
    """A paho client, connected, on one end of a socket pair (a BufferedSocket); what it does is recorded."""

    def __init__(self, protocol: int, *, at_once: bool) -> None:
        self.loop = asyncio.get_running_loop()
        self.ours, self.broker = socket.socketpair()
        self.ours.setblocking(False)  # noqa: FBT003 - socket's API
        self.paho: Any = PAHO_CLIENT.Client(PAHO_CLIENT.CallbackAPIVersion.VERSION2, client_id="c", protocol=protocol)
        self.paho._sock = BufferedSocket(self.ours, self.loop)
        self.paho._state = PAHO_CLIENT._ConnectionState.MQTT_CS_CONNECTED
        self.paho.on_socket_register_write = lambda *_: None  # sent by loop_write below
        self.paho.on_socket_unregister_write = lambda *_: None
        self.seen: list[object] = []
        self.paho.on_publish = lambda _c, _u, mid, reason, props: self.seen.append(
            ("puback", mid, type(reason).__mro__[-2].__name__, reason.value, reason.getName(), props.pack())
        )
        self.paho.on_message = lambda _c, _u, message: self.seen.append(("message", message.topic, message.payload))
        self.paho.on_log = lambda _c, _u, level, text: self.seen.append(("log", level, text))
        self.paho.on_disconnect = lambda _c, _u, _flags, reason, _p: self.seen.append(("disconnect", str(reason)))
        self.generic_reads = 0
        generic = self.paho._packet_read

        def counted() -> Any:
            self.generic_reads += 1
            return generic()

        self.paho._packet_read = counted
        if at_once:
            read_at_once(self.paho, FastReasonCode, FastProperties)

    def publish(self, count: int) -> None:
        for n in range(count):
            assert self.paho.publish(f"t/{n}", b"x", qos=1).rc == 0
        self.paho.loop_write()
        self.broker.recv(65536)

    def feed(self, data: bytes) -> None:
        """The broker sends ``data``; the client reads as aiomqtt's reader does (again while bytes are buffered)."""
        self.broker.send(data)
        while True:
            self.seen.append(("rc", self.paho.loop_read()))
            sock = self.paho._sock
            if sock is None or not sock.pending():
                break
        self.seen.append(("state", sorted(self.paho._out_messages), self.paho._inflight_messages))

    def close(self) -> None:
        self.ours.close()
        self.broker.close()


def _puback(mid: int, rest: bytes = b"") -> bytes:
    return bytes([0x40, 2 + len(rest)]) + struct.pack("!H", mid) + rest


@pytest.mark.parametrize("protocol", [paho.mqtt.client.MQTTv311, paho.mqtt.client.MQTTv5])
async def test_pubacks_read_at_once_are_what_pahos_own_reading_makes_of_them(protocol: int) -> None:
    bursts = [
        _puback(1),  # alone
        _puback(2) + _puback(99) + _puback(3),  # several, one not paho's (ignored, logged)
        _publish("t/in", b"m" if protocol == paho.mqtt.client.MQTTv311 else b"\x00m") + _puback(4),  # behind another
        _puback(5) + _puback(6)[:3],  # a PUBACK cut in two: the first part waits in paho's reading state
        _puback(6)[3:] + _puback(7),
    ]
    if protocol == paho.mqtt.client.MQTTv5:
        bursts += [
            _puback(8, b"\x10") + _puback(9, b"\x00") + _puback(10, b"\x10")[:4],  # reason codes: no subscribers
            _puback(10, b"\x10")[4:] + _puback(11, b"\x00\x00"),  # cut before its reason code; empty properties
            _puback(12, b"\x80") + _puback(13, b"\x10\x00"),  # an error code (paho's way), and properties
        ]
    else:
        bursts.append(_puback(8) + _puback(9, b"\x10"))  # a reason code before MQTT 5: malformed, paho's way
    clients = [_PahoOnSocket(protocol, at_once=at_once) for at_once in (False, True)]
    try:
        for client in clients:
            client.publish(13)
            client.paho._last_bytes_received = 0
            for burst in bursts:
                client.feed(burst)
        theirs, ours = clients
        assert ours.seen == theirs.seen
        assert ours.paho._last_bytes_received > 0
        plain = 9 if protocol == paho.mqtt.client.MQTTv5 else 6
        assert ours.generic_reads <= theirs.generic_reads - plain, "the plain PUBACKs were read by paho's own way"
    finally:
        for client in clients:
            client.close()


def _publish_v(first: int, topic: bytes, rest: bytes) -> bytes:
    """A PUBLISH: its first byte (type, flags), its remaining length, its topic, then ``rest`` (id, properties, ...)."""
    body = struct.pack("!H", len(topic)) + topic + rest
    length, encoded = len(body), bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            return bytes([first, *encoded]) + body


def _recorded(client: _PahoOnSocket) -> None:
    """Make ``client`` record each message whole, and what paho queues to send back, after each burst."""

    def on_message(_c: object, _u: object, message: Any) -> None:
        try:
            topic: object = message.topic
        except UnicodeDecodeError as err:
            topic = repr(err)
        props = message.properties
        client.seen.append((
            "message", topic, message.payload, type(message.payload).__name__, message.mid, message.qos, message.dup,
            message.retain, None if props is None else (type(props).__mro__[-2].__name__, props.pack(), str(props)),
            message.timestamp > 0,
        ))  # fmt: skip

    client.paho.on_message = on_message


def _out_packets(client: _PahoOnSocket) -> list[tuple[int, int, bytes]]:
    """What paho queued to send (PUBACKs), taken."""
    queued = [(p["command"], p["mid"], bytes(p["packet"])) for p in client.paho._out_packet]
    client.paho._out_packet.clear()
    return queued


@pytest.mark.parametrize("protocol", [paho.mqtt.client.MQTTv311, paho.mqtt.client.MQTTv5])
@pytest.mark.parametrize("manual_ack", [False, True])
async def test_publishes_read_at_once_are_what_pahos_own_reading_makes_of_them(protocol: int, manual_ack: bool) -> None:
    v5 = protocol == paho.mqtt.client.MQTTv5
    none = b"\x00" if v5 else b""  # no properties
    rich = (  # correlation data, a response topic and a user property given twice
        b"\x09\x00\x03abc" + b"\x08\x00\x05r/x/y" + b"\x26\x00\x01k\x00\x01v" + b"\x26\x00\x01k\x00\x01w"
    )
    rich = bytes([len(rich)]) + rich if v5 else b""
    big = _publish_v(0x32, b"t/big", b"\x00\x05" + none + b"b" * 300)  # a remaining length of two bytes
    bursts = [
        _publish_v(0x30, b"t/0", none + b"zero"),  # QoS 0
        _publish_v(0x3B, b"t/1", b"\x00\x07" + none + b"one"),  # QoS 1, dup, retained
        _publish_v(0x32, b"t/a", b"\x00\x08" + rich + b'{"x": 1}') + _puback(1) + _publish_v(0x30, b"t/b", none),
        big[:2] + b"",  # cut inside its remaining length: paho's reading state takes it
        big[2:] + _publish_v(0x32, b"t/c", b"\x00\x0a" + none + b"c")[:6],  # cut inside its body
        _publish_v(0x32, b"t/c", b"\x00\x0a" + none + b"c")[6:] + _publish_v(0x34, b"t/2", b"\x00\x0b" + none),
        _publish_v(0x32, b"t/\xff", b"\x00\x0c" + none + b"bad utf-8"),  # its topic: paho's way of telling
    ]
    if v5:
        bursts.append(_publish_v(0x32, b"", b"\x00\x0d\x03\x23\x00\x01" + b"alias"))  # empty topic, an alias
    clients = [_PahoOnSocket(protocol, at_once=at_once) for at_once in (False, True)]
    try:
        for client in clients:
            _recorded(client)
            client.paho.manual_ack_set(manual_ack)
            client.paho._last_bytes_received = 0
            for burst in bursts:
                client.feed(burst)
                client.seen.append(("sent", _out_packets(client)))
        theirs, ours = clients
        assert ours.seen == theirs.seen
        assert ours.paho._last_bytes_received > 0
        messages = [event for event in ours.seen if isinstance(event, tuple) and event[0] == "message"]
        assert len(messages) == len(bursts)  # t/2 (QoS 2) waits for its PUBREL
        whole = 6 if v5 else 5  # the PUBLISHes of QoS 0 and 1 found whole (not the cut ones, not QoS 2)
        assert ours.generic_reads <= theirs.generic_reads - whole, "whole PUBLISHes were read by paho's own way"
    finally:
        for client in clients:
            client.close()


@pytest.mark.parametrize("protocol", [paho.mqtt.client.MQTTv311, paho.mqtt.client.MQTTv5])
@pytest.mark.parametrize(
    "packet",
    [
        bytes([0x30, 1, 0]),  # shorter than a topic's length
        bytes([0x30, 3, 0, 9, ord("t")]),  # a topic longer than the packet
        _publish_v(0x32, b"t", b"\x00"),  # QoS 1 without a whole packet id
        _publish_v(0x32, b"t", b"\x00\x01"),  # no properties (malformed with MQTT 5 only)
        _publish_v(0x32, b"t", b"\x00\x01\x05\x09\x00\x09ab"),  # properties cut short
        _publish_v(0x32, b"t", b"\x00\x01\x02\x7f\x00"),  # an unknown property
        _publish_v(0x30, b"", b"\x00x"),  # an empty topic (malformed before MQTT 5)
        bytes([0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]),  # a remaining length of five bytes
    ],
)
async def test_a_malformed_publish_is_left_to_paho_and_told_its_way(protocol: int, packet: bytes) -> None:
    clients = [_PahoOnSocket(protocol, at_once=at_once) for at_once in (False, True)]
    try:
        for client in clients:
            _recorded(client)
            client.feed(packet + _publish_v(0x30, b"t/next", b"\x00" if protocol == paho.mqtt.client.MQTTv5 else b""))
            client.seen.append(("sent", _out_packets(client)))
        theirs, ours = clients
        assert ours.seen == theirs.seen
    finally:
        for client in clients:
            client.close()


class _ResettingSocket:
    """A socket whose ``recv`` returns what was sent, then fails once as a connection reset does, then ends."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reads = 0

    def recv(self, size: int) -> bytes:
        self.reads += 1
        if self.reads == 1:
            return self.sock.recv(size)
        if self.reads == 2:
            raise ConnectionResetError(104, "Connection reset by peer")
        return b""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


@pytest.mark.parametrize("how", ["closed", "reset"])
async def test_a_connection_lost_while_reading_at_once_is_told_as_paho_tells_it(how: str) -> None:
    clients = [_PahoOnSocket(paho.mqtt.client.MQTTv5, at_once=at_once) for at_once in (False, True)]
    try:
        for client in clients:
            client.publish(1)
            client.broker.send(_puback(1))
            if how == "reset":
                client.paho._sock._sock = _ResettingSocket(client.ours)
            else:
                client.broker.shutdown(socket.SHUT_WR)
            while client.paho._sock is not None:
                client.seen.append(("rc", client.paho.loop_read()))
        theirs, ours = clients
        assert ours.seen == theirs.seen
        assert ours.seen[-2:] == [("disconnect", "Unspecified error"), ("rc", paho.mqtt.client.MQTT_ERR_CONN_LOST)]
        if how == "reset":
            assert any("failed to receive on socket" in str(event) for event in ours.seen)
    finally:
        for client in clients:
            client.close()


async def test_reading_pubacks_at_once_steps_aside_when_a_private_name_is_missing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = _PahoOnSocket(PAHO_CLIENT.MQTTv5, at_once=False)
    try:
        del client.paho._in_messages  # as a later paho might keep its state elsewhere
        with caplog.at_level(logging.INFO, logger="qmpnet.adapters.mqtt.buffered_socket"):
            read_at_once(client.paho, FastReasonCode, FastProperties)
        assert "loop_read" not in vars(client.paho)  # paho's own method, untouched
        assert "paho reads them itself" in caplog.text
    finally:
        client.close()


async def test_a_socket_error_met_while_filling_is_told_by_the_next_recv() -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)  # noqa: FBT003 - socket's API
    sock = BufferedSocket(ours, asyncio.get_running_loop())
    assert not sock.fill()  # nothing to read
    theirs.send(b"ab")
    assert sock.fill()
    assert sock.fill()  # still buffered: no read
    assert sock.recv(5) == b"ab"
    theirs.close()
    assert not sock.fill()  # closed: kept for recv
    assert not sock.fill()
    assert sock.recv(1) == b""
    ours.close()
    with pytest.raises(OSError, match="Bad file descriptor"):
        sock.fill() or sock.recv(1)


class _AckingBroker(_Broker):
    """:class:`_Broker` that also acknowledges each QoS 1 PUBLISH (PUBACK), at once or when :meth:`release` says."""

    def __init__(self, *, hold: bool = False) -> None:
        super().__init__()
        self.hold = hold
        self.mids: list[int] = []  # the packet ids of the QoS 1 messages read, in order
        self._writer: asyncio.StreamWriter | None = None

    def release(self, count: int) -> None:
        """Acknowledge the oldest ``count`` messages not yet acknowledged."""
        assert self._writer is not None
        for mid in self.mids[:count]:
            self._writer.write(b"\x40\x02" + struct.pack("!H", mid))
        del self.mids[:count]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        try:
            await reader.read(1024)  # CONNECT
            writer.write(b"\x20\x02\x00\x00")
            while header := await reader.read(1):
                length, shift = 0, 0
                while True:  # the remaining length, 7 bits a byte
                    byte = (await reader.readexactly(1))[0]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                body = await reader.readexactly(length)
                self.received.extend(header + body)
                if header[0] & 0xF0 == 0x30 and header[0] & 0x06 == 0x02:  # PUBLISH, QoS 1: its packet id
                    (topic_length,) = struct.unpack("!H", body[:2])
                    self.mids.append(struct.unpack("!H", body[2 + topic_length : 4 + topic_length])[0])
                    if not self.hold:
                        self.release(1)
                self._grew.set()
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def _connected(broker: _Broker) -> AsyncIterator[aiomqtt.Client]:
    server, port = await broker.start()
    client = aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V311)
    fewer_system_calls(client)
    try:
        async with server, client:
            yield client
    finally:
        server.close()


class _Acks(list[int]):
    """The sequence numbers a publisher reported acknowledged, in order; :meth:`until` waits for more."""

    def __init__(self) -> None:
        super().__init__()
        self._grew = asyncio.Event()

    def append(self, seq: int) -> None:  # the publisher's callback
        super().append(seq)
        self._grew.set()

    async def until(self, count: int, timeout: float = 5) -> None:
        async with asyncio.timeout(timeout):
            while len(self) < count:
                self._grew.clear()
                await self._grew.wait()


async def test_a_publisher_is_told_of_each_puback_by_pahos_callback() -> None:
    broker = _AckingBroker()
    acked = _Acks()
    async with _connected(broker) as client:
        publisher = Publisher.of(client, acked.append, limit=10)
        assert publisher is not None, "aiomqtt.Client no longer keeps its paho client at _client"
        for seq in (7, 8, 9):
            assert publisher.publish(seq, f"t/{seq}", b"x", qos=1, retain=False, properties=None)
        await acked.until(3)
        assert acked == [7, 8, 9], "paho's on_publish no longer reports each PUBACK with its message id"
        assert publisher.inflight == 0
        # aiomqtt's own publish still completes: its acknowledgement goes on to aiomqtt's callback.
        await asyncio.wait_for(client.publish("t/aiomqtt", b"y", qos=1), 5)
        assert acked == [7, 8, 9]
        # QoS 0 has no PUBACK: paho reports the write.
        assert publisher.publish(10, "t/10", b"z", qos=0, retain=False, properties=None)
        await acked.until(4)
        assert acked[-1] == 10
    assert bytes(broker.received).count(b"t/") == 5


async def test_a_publisher_waits_for_room_while_limit_messages_await_their_puback() -> None:
    broker = _AckingBroker(hold=True)
    acked = _Acks()
    async with _connected(broker) as client:
        publisher = Publisher.of(client, acked.append, limit=2)
        assert publisher is not None
        for seq in (1, 2):
            await asyncio.wait_for(publisher.room(), 1)
            assert publisher.publish(seq, f"t/{seq}", b"x", qos=1, retain=False, properties=None)
        waiting = asyncio.create_task(publisher.room())
        await broker.until(b"t/2")
        assert len(broker.mids) == 2
        await asyncio.sleep(0)  # the waiter's first step: it must block, not return
        assert not waiting.done(), "room() returned with two messages of a limit of two unacknowledged"
        broker.release(1)
        await asyncio.wait_for(waiting, 5)
        await acked.until(1)
        assert acked == [1]
        assert publisher.inflight == 1


async def test_a_publish_paho_refuses_is_not_sent_nor_acknowledged() -> None:
    acked: list[int] = []
    client = aiomqtt.Client("127.0.0.1", 1)  # never connected
    publisher = Publisher.of(client, acked.append, limit=2)
    assert publisher is not None
    assert not publisher.publish(1, "t/1", b"x", qos=1, retain=False, properties=None)
    assert not publisher.publish(2, "t/2", b"x", qos=0, retain=False, properties=None)
    assert acked == []
    assert publisher.inflight == 0


async def test_without_a_paho_client_there_is_no_publisher(caplog: pytest.LogCaptureFixture) -> None:
    client = aiomqtt.Client("127.0.0.1", 1883)
    del client._client  # as a later aiomqtt might keep its paho client elsewhere
    with caplog.at_level(logging.INFO, logger="qmpnet.adapters.mqtt.publisher"):
        assert Publisher.of(client, print, limit=1) is None
    assert "publishing through aiomqtt.Client.publish" in caplog.text


async def test_publish_at_once_hands_a_message_to_paho_without_waiting_for_its_puback() -> None:
    broker = _AckingBroker(hold=True)
    async with _connected(broker) as client:
        assert publish_at_once(client, "t/req", b"x", qos=1, properties=None) is True
        await broker.until(b"t/req")
        assert len(broker.mids) == 1  # sent at QoS 1, and not acknowledged: nothing waited for it
        broker.release(1)  # its PUBACK goes to aiomqtt's callback, which knows nothing of it
        after = asyncio.create_task(client.publish("t/after", b"y", qos=1))
        await broker.until(b"t/after")
        broker.release(1)
        await asyncio.wait_for(after, 5)  # aiomqtt's own publish still completes
    never = aiomqtt.Client("127.0.0.1", 1)  # never connected
    assert publish_at_once(never, "t/req", b"x", qos=1, properties=None) is False
    del never._client  # as a later aiomqtt might keep its paho client elsewhere
    assert publish_at_once(never, "t/req", b"x", qos=1, properties=None) is None


# ------------------------------------------------------------------------------------------ MQTT 5 properties

#: paho's class, untyped.
PAHO_PROPERTIES: Any = Properties
#: paho's client module, where it builds the properties of the packets it makes.
PAHO_CLIENT: Any = paho.mqtt.client

#: A valid value of each of paho's property types (by its index in ``Properties.types``).
_SAMPLES: dict[str, object] = {
    "Byte": 1, "Two Byte Integer": 5, "Four Byte Integer": 30, "Variable Byte Integer": 7, "Binary Data": b"ab",
    "UTF-8 Encoded String": "s", "UTF-8 String Pair": ("k", "v"),
}  # fmt: skip
_PACKET_TYPES = [value for name, value in vars(PacketTypes).items() if name.isupper() and isinstance(value, int)]


def _outcome(make: Callable[[], Any]) -> tuple[str, Any]:
    """What building the properties ``make`` gives: its packed bytes, text and JSON, or the error it raised."""
    try:
        built = make()
        return "ok", (built.pack(), str(built), built.json(), built.isEmpty())
    except Exception as err:  # noqa: BLE001 - compared, whatever it is
        return "error", (type(err).__name__, str(err))


def _with(cls: Any, packet_type: int, *settings: tuple[str, object]) -> Callable[[], Any]:
    def make() -> Any:
        built = cls(packet_type)
        for name, value in settings:
            setattr(built, name, value)
        return built

    return make


def test_fast_properties_pack_and_refuse_every_property_as_paho_does() -> None:
    paho_properties = PAHO_PROPERTIES(PacketTypes.PUBLISH)
    names = list(paho_properties.names)
    assert len(names) >= 27, "paho's Properties no longer lists its property names in .names"
    checked = 0
    for packet_type in _PACKET_TYPES:
        for name in names:
            kind = paho_properties.types[paho_properties.properties[paho_properties.names[name]][0]]
            compressed = name.replace(" ", "")
            values = [_SAMPLES[kind], 0, -1, 2, 65536, 268435456] if kind != "Binary Data" else [_SAMPLES[kind]]
            for value in values:
                cases = [((compressed, value),), ((name, value),), ((compressed, value), (compressed, value))]
                for settings in cases:
                    theirs = _outcome(_with(PAHO_PROPERTIES, packet_type, *settings))
                    ours = _outcome(_with(FastProperties, packet_type, *settings))
                    assert ours == theirs, f"{settings}, packet type {packet_type}: paho {theirs}, ours {ours}"
                    checked += 1
    assert checked > 1000
    kinds = {name: paho_properties.types[paho_properties.properties[paho_properties.names[name]][0]] for name in names}
    reverse = [(name.replace(" ", ""), _SAMPLES[kind]) for name, kind in reversed(kinds.items())]
    for packet_type in _PACKET_TYPES:  # all of a packet's properties at once, set in reverse: packed in paho's order
        valid = [case for case in reverse if _outcome(_with(PAHO_PROPERTIES, packet_type, case))[0] == "ok"]
        theirs = _outcome(_with(PAHO_PROPERTIES, packet_type, *valid))
        assert _outcome(_with(FastProperties, packet_type, *valid)) == theirs, f"packet type {packet_type}: {valid}"
        assert packet_type != PacketTypes.PUBLISH or len(valid) >= 5  # PUBLISH has 7 or more
    for cls in (PAHO_PROPERTIES, FastProperties):
        assert _outcome(_with(cls, PacketTypes.PUBLISH, ("NoSuchProperty", 1)))[0] == "error"
    assert _outcome(_with(FastProperties, PacketTypes.PUBLISH, ("NoSuchProperty", 1))) == _outcome(
        _with(PAHO_PROPERTIES, PacketTypes.PUBLISH, ("NoSuchProperty", 1))
    )


def test_fast_properties_unpack_as_paho_does() -> None:
    source = PAHO_PROPERTIES(PacketTypes.PUBLISH)
    source.ResponseTopic = "qmpnet/c1/client/x/response"
    source.CorrelationData = b"\x00\x01transaction"
    source.MessageExpiryInterval = 30
    source.UserProperty = ("a", "1")
    source.UserProperty = ("b", "2")
    packed = source.pack()
    theirs, their_length = PAHO_PROPERTIES(PacketTypes.PUBLISH).unpack(packed)
    fast: Any = FastProperties(PacketTypes.PUBLISH)
    ours, our_length = fast.unpack(packed)
    assert (ours.pack(), str(ours), ours.json()) == (theirs.pack(), str(theirs), theirs.json())
    assert our_length == their_length
    ours.clear()
    assert ours.isEmpty()
    assert ours.pack() == PAHO_PROPERTIES(PacketTypes.PUBLISH).pack()
    twice = PAHO_PROPERTIES(PacketTypes.PUBLISH)
    twice.ResponseTopic = "t"
    once = twice.pack()
    doubled = bytes([once[0] * 2]) + once[1:] * 2  # the same non-repeatable property twice
    for cls in (PAHO_PROPERTIES, FastProperties):
        with pytest.raises(MQTTException):  # both refuse it
            cls(PacketTypes.PUBLISH).unpack(doubled)


def _unpacked_properties(make: Callable[[], Any], buffer: bytes) -> tuple[str, Any]:
    """What unpacking ``buffer`` into a new object gives: the properties as paho shows them, or the error raised."""
    try:
        properties, length = make().unpack(buffer)
        return "ok", (properties.pack(), str(properties), properties.json(), length)
    except Exception as err:  # noqa: BLE001 - compared, whatever it is
        return "error", (type(err).__name__, str(err))


def test_fast_properties_unpack_every_kind_of_buffer_as_paho_does() -> None:
    def packed(**values: Any) -> bytes:
        source = PAHO_PROPERTIES(PacketTypes.PUBLISH)
        for name, value in values.items():
            for one in value if name == "UserProperty" else [value]:
                setattr(source, name, one)
        return bytes(source.pack())

    request = packed(ResponseTopic="qmpnet/v1/c1/client/3f2a9c1d/response", CorrelationData=b"0123456789abcdef")
    buffers = [
        b"", b"\x00", request, request[:-1], request[:5], request + b"tail",
        packed(UserProperty=[("a", "1"), ("b", "2")], PayloadFormatIndicator=1, MessageExpiryInterval=30),
        packed(ResponseTopic="t" * 200),  # a length of two bytes
        packed(SubscriptionIdentifier=200, ContentType="x"),  # an identifier value of two bytes
        b"\x02\x08\x00", b"\x03\x7f\x00\x00", b"\x03\x80\x01\x00",  # truncated, unknown, a two-byte identifier
    ]  # fmt: skip
    once = packed(ResponseTopic="t")
    buffers.append(bytes([once[0] * 2]) + once[1:] * 2)  # a property that may not repeat, twice
    for buffer in buffers:
        theirs = _unpacked_properties(lambda: PAHO_PROPERTIES(PacketTypes.PUBLISH), buffer)
        ours = _unpacked_properties(lambda: FastProperties(PacketTypes.PUBLISH), buffer)
        assert ours == theirs, f"{buffer!r}: paho {theirs}, ours {ours}"
    used: Any = FastProperties(PacketTypes.PUBLISH)
    used.ResponseTopic = "old"
    assert used.unpack(request)[0].json() == PAHO_PROPERTIES(PacketTypes.PUBLISH).unpack(request)[0].json()


def _read(properties: Any, buffer: bytes | bytearray, kind: int, propslen: int) -> tuple[str, Any]:
    try:
        return "ok", properties.readProperty(buffer, kind, propslen)
    except Exception as err:  # noqa: BLE001 - compared, whatever it is
        return "error", (type(err).__name__, str(err))


@pytest.mark.parametrize("kind", ["UTF-8 Encoded String", "Binary Data", "UTF-8 String Pair"])
def test_fast_properties_read_strings_and_data_as_paho_does(kind: str) -> None:
    texts = ["", "qmpnet/v1/c1/client/x/response", "\u00e9t\u00e9 \u2028 \U0001f600", "a\x00b", "\ufeffa", "a\ufeff",
             "\x00\ufeff", "\x7f\x01"]  # fmt: skip
    raw = [text.encode() for text in texts]
    raw += [b"\xff\xfe", b"\xed\xa0\x80", b"a\xc3", b"\xef\xbb\xbf"]  # invalid UTF-8, an encoded surrogate, a BOM
    framed = [len(data).to_bytes(2, "big") + data for data in raw]
    framed += [frame + frame for frame in framed[:3]]  # a pair's two strings, and bytes after the value
    framed += [b"", b"\x00", b"\x00\x05ab", b"\xff\xffab"]  # too short for its length or for the length itself
    ident = PAHO_PROPERTIES(PacketTypes.PUBLISH).types.index(kind)
    theirs, ours = PAHO_PROPERTIES(PacketTypes.PUBLISH), FastProperties(PacketTypes.PUBLISH)
    checked = 0
    for buffer in framed:
        for propslen in sorted({0, 1, 2, 3, len(buffer) - 1, len(buffer), len(buffer) + 5}):
            for data in (buffer, bytearray(buffer)):
                their_read, our_read = _read(theirs, data, ident, propslen), _read(ours, data, ident, propslen)
                assert our_read == their_read, f"{buffer!r} in {propslen}: paho {their_read}, ours {our_read}"
                checked += 1
    assert checked > 150


def test_install_fast_properties_makes_paho_decode_into_them(monkeypatch: pytest.MonkeyPatch) -> None:
    packet_module = importlib.import_module("paho.mqtt._packet")
    # paho's own class there (a controller's bus may have installed ours in this process already); undone after.
    monkeypatch.setattr(packet_module, "Properties", PAHO_PROPERTIES)
    monkeypatch.setattr(PAHO_CLIENT, "Properties", PAHO_PROPERTIES)
    assert install_fast_properties()
    assert PAHO_CLIENT.Properties is FastProperties
    assert install_fast_properties()  # again: nothing changes
    puback = packet_module.decode_puback(0x40, b"\x00\x07\x00\x00", paho.mqtt.client.MQTTv5)
    assert puback.mid == 7
    assert type(puback.properties) is FastProperties, "paho no longer builds a PUBACK's properties by that name"


async def test_install_fast_properties_keeps_pahos_class_when_it_is_not_where_expected(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Other:
        pass

    monkeypatch.setattr(PAHO_CLIENT, "Properties", Other)  # as a later paho might build them elsewhere
    with caplog.at_level(logging.INFO, logger="qmpnet.adapters.mqtt.aiomqtt_internals"):
        assert not install_fast_properties()
    assert PAHO_CLIENT.Properties is Other
    assert "keeping paho's own class" in caplog.text


# ------------------------------------------------------------------------------------------ MQTT 5 reason codes

#: paho's class, untyped.
PAHO_REASON_CODE: Any = ReasonCode


def _reason(make: Callable[[], Any]) -> tuple[str, Any]:
    """What building a reason code with ``make`` gives: all it shows, or the error it raised."""
    try:
        code = make()
        shown = (code.value, code.getName(), str(code), repr(code), code.json(), code.pack(), code.is_failure)
        return "ok", (*shown, code == code.value, code < code.value + 1, code.packetType)
    except Exception as err:  # noqa: BLE001 - compared, whatever it is
        return "error", (type(err).__name__, str(err))


def test_fast_reason_codes_are_built_and_refused_as_pahos_are() -> None:
    table = PAHO_REASON_CODE.names
    names = [*sorted({name for by_name in table.values() for name in by_name}), "No such reason"]
    checked = 0
    for packet_type in _PACKET_TYPES:
        cases: list[dict[str, Any]] = [{}, *({"aName": name} for name in names)]
        cases += [{"identifier": identifier} for identifier in range(256)]
        for case in cases:
            theirs = _reason(lambda c=case, t=packet_type: PAHO_REASON_CODE(t, **c))  # type: ignore[misc]
            ours = _reason(lambda c=case, t=packet_type: FastReasonCode(t, **c))  # type: ignore[misc]
            assert ours == theirs, f"{case}, packet type {packet_type}: paho {theirs}, ours {ours}"
            checked += 1
        for byte in (b"\x00", b"\x10", b"\x80", b"\x97"):
            theirs = _reason(lambda t=packet_type, b=byte: _unpacked(PAHO_REASON_CODE(t), b))  # type: ignore[misc]
            ours = _reason(lambda t=packet_type, b=byte: _unpacked(FastReasonCode(t), b))  # type: ignore[misc]
            assert ours == theirs, f"{byte!r}, packet type {packet_type}: paho {theirs}, ours {ours}"
    assert checked > 4000
    # Shared, not copied: paho's table must stay one nobody can change.
    assert isinstance(table, MappingProxyType), "paho's ReasonCode.names is no longer read-only: it may not be shared"
    assert FastReasonCode(PacketTypes.PUBACK).names is table


def _unpacked(code: Any, data: bytes) -> Any:
    code.unpack(data)
    return code


def test_install_fast_reason_codes_makes_paho_build_them(monkeypatch: pytest.MonkeyPatch) -> None:
    packet_module = importlib.import_module("paho.mqtt._packet")
    # paho's own class there (a controller's bus may have installed ours in this process already); undone after.
    monkeypatch.setattr(packet_module, "ReasonCode", PAHO_REASON_CODE)
    monkeypatch.setattr(PAHO_CLIENT, "ReasonCode", PAHO_REASON_CODE)
    assert install_fast_reason_codes()
    assert PAHO_CLIENT.ReasonCode is FastReasonCode
    assert install_fast_reason_codes()  # again: nothing changes
    puback = packet_module.decode_puback(0x40, b"\x00\x07", paho.mqtt.client.MQTTv5)
    assert puback.mid == 7
    assert type(puback.reason) is FastReasonCode, "paho no longer builds a PUBACK's reason code by that name"
    assert puback.reason == 0


async def test_install_fast_reason_codes_keeps_pahos_class_when_it_is_not_where_expected(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Other:
        pass

    monkeypatch.setattr(PAHO_CLIENT, "ReasonCode", Other)  # as a later paho might build them elsewhere
    with caplog.at_level(logging.INFO, logger="qmpnet.adapters.mqtt.aiomqtt_internals"):
        assert not install_fast_reason_codes()
    assert PAHO_CLIENT.ReasonCode is Other
    assert "keeping paho's own class" in caplog.text


# ------------------------------------------------------------------------------------------ paho's message info

#: paho's class, untyped.
PAHO_MESSAGE_INFO: Any = paho.mqtt.client.MQTTMessageInfo
if PAHO_MESSAGE_INFO is FastMessageInfo:  # a controller's bus installed ours in this process already
    PAHO_MESSAGE_INFO = FastMessageInfo.__mro__[1]


def _info(make: Callable[[], Any], *, rc: int | None = None, published: bool = False) -> tuple[Any, ...]:
    """What a message info made by ``make`` shows (with ``rc`` set, maybe published), or the error it raised."""
    info = make()
    if rc is not None:
        info.rc = rc
    if published:
        info._set_as_published()
    shown: list[Any] = [info.mid, info.rc, str(info), list(info), info[0], info[1]]
    for ask in (info.is_published, lambda: info.wait_for_publish(0.001), lambda: info[2]):
        try:
            shown.append(("ok", ask()))
        except Exception as err:  # noqa: BLE001 - compared, whatever it is
            shown.append(("error", type(err).__name__, str(err)))
    return tuple(shown)


@pytest.mark.parametrize("rc", [None, *MQTTErrorCode])
@pytest.mark.parametrize("published", [False, True])
def test_fast_message_infos_show_and_refuse_as_pahos_do(rc: int | None, published: bool) -> None:
    theirs = _info(lambda: PAHO_MESSAGE_INFO(7), rc=rc, published=published)
    ours = _info(lambda: FastMessageInfo(7), rc=rc, published=published)
    assert ours == theirs
    assert PAHO_MESSAGE_INFO.__slots__ == ("_condition", "_iterpos", "_published", "mid", "rc"), (
        "paho's MQTTMessageInfo keeps other attributes: FastMessageInfo sets those it knew"
    )


@pytest.mark.parametrize("timeout", [None, 30.0])
def test_a_thread_waiting_for_a_fast_message_info_is_woken_when_it_is_published(timeout: float | None) -> None:
    infos = [FastMessageInfo(mid) for mid in range(3)]
    woken: list[int] = []
    started = threading.Barrier(len(infos) + 1)

    def wait(info: FastMessageInfo) -> None:
        started.wait()
        info.wait_for_publish(timeout)
        woken.append(info.mid)

    threads = [threading.Thread(target=wait, args=(info,)) for info in infos]
    for thread in threads:
        thread.start()
    started.wait()
    for info in infos:  # whether its waiter counted itself yet or not: it must not miss it
        info._set_as_published()
    for thread in threads:
        thread.join(60)
    assert sorted(woken) == [0, 1, 2]
    assert all(info.is_published() for info in infos)


def test_install_fast_message_info_makes_paho_make_them(monkeypatch: pytest.MonkeyPatch) -> None:
    # paho's own class there (a controller's bus may have installed ours in this process already); undone after.
    monkeypatch.setattr(PAHO_CLIENT, "MQTTMessageInfo", PAHO_MESSAGE_INFO)
    assert install_fast_message_info()
    assert PAHO_CLIENT.MQTTMessageInfo is FastMessageInfo
    assert install_fast_message_info()  # again: nothing changes
    client: Any = PAHO_CLIENT.Client(PAHO_CLIENT.CallbackAPIVersion.VERSION2, client_id="c")
    for qos in (0, 1):  # not connected: paho makes the info all the same
        assert type(client.publish("t", b"x", qos)) is FastMessageInfo, "paho makes message infos by another name"
    assert type(MQTTMessage(3, b"t").info) is FastMessageInfo, "paho's messages make their info by another name"


async def test_install_fast_message_info_keeps_pahos_class_when_it_is_not_where_expected(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Other:
        pass

    monkeypatch.setattr(PAHO_CLIENT, "MQTTMessageInfo", Other)  # as a later paho might make them elsewhere
    with caplog.at_level(logging.INFO, logger="qmpnet.adapters.mqtt.aiomqtt_internals"):
        assert not install_fast_message_info()
    assert PAHO_CLIENT.MQTTMessageInfo is Other
    assert "keeping paho's own class" in caplog.text


# ------------------------------------------------------------------------------------------ publishing directly


class _NoSocket:
    def close(self) -> None:
        pass


def _connected_paho(protocol: int) -> Any:
    """A paho client as a connected session leaves it, writing to nothing (its writes wait in ``_out_packet``)."""
    client: Any = PAHO_CLIENT.Client(PAHO_CLIENT.CallbackAPIVersion.VERSION2, client_id="c", protocol=protocol)
    client.enable_logger(logging.getLogger("qmpnet.tests.paho"))
    client._sock = _NoSocket()
    client._state = PAHO_CLIENT._ConnectionState.MQTT_CS_CONNECTED
    client.on_socket_register_write = lambda *_: None  # as aiomqtt's callback: the loop writes later
    return client


def _published(client: Any, info: Any) -> tuple[Any, ...]:
    """All a publish left in paho's state: the info, the message kept, the packet queued."""
    messages = [(m.mid, m.topic, m.payload, m.qos, m.retain, m.dup, m.state, m.properties, type(m.info))
                for m in client._out_messages.values()]  # fmt: skip
    packets = [{**p, "info": (type(p["info"]), p["info"].mid, p["info"].rc)} for p in client._out_packet]
    return (info.mid, info.rc, info.is_published(), messages, packets, client._inflight_messages, client._last_mid)


@pytest.mark.parametrize("protocol", [paho.mqtt.client.MQTTv311, paho.mqtt.client.MQTTv5])
def test_publishing_directly_leaves_what_pahos_publish_leaves(
    protocol: int, caplog: pytest.LogCaptureFixture
) -> None:
    correlation = FastProperties(PacketTypes.PUBLISH)
    correlation.CorrelationData = b"abc"
    cases: list[tuple[str, bytes, bool, Any]] = [
        ("qmpnet/v1/c/guest/g1/nics", b'{"nics":[]}', True, None),
        ("qmpnet/v1/c/guest/g1/status", b"", True, None),
        ("r/\u00e9t\u00e9", b"x" * 200, False, correlation),  # a two-byte length, a topic of UTF-8
        ("r", b"y" * 20000, False, None),  # a three-byte length
    ]
    theirs, ours = _connected_paho(protocol), _connected_paho(protocol)
    direct = DirectPublish.of(ours)
    assert direct is not None, "paho no longer has what publishing directly needs"
    for topic, payload, retain, properties in cases:
        props = properties if protocol == paho.mqtt.client.MQTTv5 else None
        with caplog.at_level(logging.DEBUG, logger="qmpnet.tests.paho"):
            caplog.clear()
            expected = _published(theirs, theirs.publish(topic, payload, 1, retain, props))
            their_log = [(r.getMessage(), r.args) for r in caplog.records]
            caplog.clear()
            got = _published(ours, direct(topic, payload, retain=retain, properties=props))
            our_log = [(r.getMessage(), r.args) for r in caplog.records]
        assert got == expected, f"{topic}: paho {expected}, ours {got}"
        assert our_log == their_log
    for client in (theirs, ours):  # what the PUBACK does with them, alike
        client._out_message_mutex.acquire()
        try:
            client._do_on_publish(1, ReasonCode(PacketTypes.PUBACK), FastProperties(PacketTypes.PUBACK))
        finally:
            client._out_message_mutex.release()
    assert _published(ours, ours._out_messages[2].info) == _published(theirs, theirs._out_messages[2].info)


def test_publishing_directly_leaves_to_paho_what_it_does_not_take() -> None:
    client = _connected_paho(paho.mqtt.client.MQTTv5)
    direct = DirectPublish.of(client)
    assert direct is not None
    assert direct("a/+/b", b"x", retain=False, properties=None) is None  # paho refuses wildcards itself
    assert direct("a/#", b"x", retain=False, properties=None) is None
    assert direct("", b"x", retain=False, properties=None) is None
    assert direct("t", bytearray(b"x"), retain=False, properties=None) is None  # type: ignore[arg-type]
    assert direct("t", b"x" * (1 << 21), retain=False, properties=None) is None
    client._max_inflight_messages = 1
    assert direct("t", b"x", retain=False, properties=None) is not None
    assert direct("t", b"x", retain=False, properties=None) is None  # in flight: full; paho's publish queues it
    client._sock = None
    client._max_inflight_messages = 0
    assert direct("t", b"x", retain=False, properties=None) is None  # not connected: paho's publish says so
    assert client._last_mid == 1, "a message left to paho took a message id"
    lacking = _connected_paho(paho.mqtt.client.MQTTv5)
    del lacking._out_messages  # as a later paho might keep its messages elsewhere
    assert DirectPublish.of(lacking) is None
    lacking._out_messages = {}


# ------------------------------------------------------------------------------------------ paho's log lines


def _logged(client: Any, caplog: pytest.LogCaptureFixture, level: int) -> tuple[list[Any], list[Any]]:
    """What paho's client logs of a line at each of its levels, with the logger at ``level``: records, callbacks."""
    taken: list[Any] = []
    if client.on_log is not None:
        client.on_log = lambda _client, _userdata, at, buf: taken.append((at, buf))
    caplog.clear()
    with caplog.at_level(level, logger="qmpnet.tests.paho"):
        for paho_level in PAHO_CLIENT.LOGGING_LEVEL:
            client._easy_log(paho_level, "Sending %s (Mid: %d)", "PUBACK", 7)
    return [(r.levelno, r.msg, r.args, r.getMessage()) for r in caplog.records], taken


@pytest.mark.parametrize("callback", [False, True])
@pytest.mark.parametrize("logger", [False, True])
@pytest.mark.parametrize("level", [logging.DEBUG, logging.INFO, logging.ERROR])
async def test_quieter_logging_logs_what_paho_logs(
    callback: bool, logger: bool, level: int, caplog: pytest.LogCaptureFixture
) -> None:
    clients = [aiomqtt.Client("127.0.0.1", 1883, logger=logging.getLogger("qmpnet.tests.paho")) for _ in range(2)]
    theirs, ours = (client._client for client in clients)
    assert quieter_logging(clients[1])
    for client in (theirs, ours):
        if callback:
            client.on_log = print  # replaced by _logged
        if not logger:
            client.disable_logger()
    assert _logged(ours, caplog, level) == _logged(theirs, caplog, level)
    if logger and level == logging.DEBUG:
        assert caplog.records, "paho no longer logs through the logger it is given"


async def test_quieter_logging_steps_aside_when_a_private_name_is_missing(caplog: pytest.LogCaptureFixture) -> None:
    client = aiomqtt.Client("127.0.0.1", 1883)
    del client._client._on_log  # as a later paho might keep its callback elsewhere
    with caplog.at_level(logging.INFO, logger="qmpnet.adapters.mqtt.aiomqtt_internals"):
        assert not quieter_logging(client)
    assert "paho logs every line itself" in caplog.text
