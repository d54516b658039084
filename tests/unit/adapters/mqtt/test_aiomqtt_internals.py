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
import inspect
import logging
import socket
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiomqtt
import paho.mqtt.client
from paho.mqtt.client import MQTTMessage

from qmpnet.adapters import mqtt
from qmpnet.adapters.mqtt.aiomqtt_internals import BufferedSocket, dispatching_queue, fewer_system_calls

if TYPE_CHECKING:
    import pytest

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
        if path.name == "aiomqtt_internals.py":
            continue  # the one room for them
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

            loop.call_soon_threadsafe = counting  # type: ignore[method-assign,assignment]
            try:
                await client.publish("t/out", b"x", qos=0)
                await broker.until(b"t/out")
            finally:
                del loop.call_soon_threadsafe
            assert woken == [], f"a publish on the loop's thread still woke the loop through its self-pipe: {woken}"
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
