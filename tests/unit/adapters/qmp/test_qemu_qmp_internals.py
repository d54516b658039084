"""The contract with qemu.qmp's private names (qmpnet/adapters/qmp/qemu_qmp_internals.py).

A new version of qemu.qmp may rename, remove or change any private name without notice. These tests fail, naming
the attribute, when the pinned version no longer has what the internals module uses: the names, the signatures
it overrides or calls, and the behaviour on a small exchange with an in-process QMP server (a direct write, an
error reply, an event queued without history, the socket). And no other module of qmpnet touches them.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import inspect
import logging
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from fakeqmp import Answer, Event, eventually
from qemu.qmp import EventListener, ExecuteError, Message, QMPClient
from qemu.qmp.protocol import Runstate

from qmpnet.adapters.qmp import qemu_qmp_internals
from qmpnet.adapters.qmp.qemu_qmp_internals import (
    PRIVATE_NAMES,
    STREAM_PRIVATE_NAMES,
    FlatClient,
    FlatListener,
    peer_socket,
    take_nowait,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from fakeqmp import FakeQmp

CLASSES: dict[str, type[Any]] = {"QMPClient": QMPClient, "EventListener": EventListener}

#: The parameters of each private method the internals override or call (``self`` included).
SIGNATURES = {
    (QMPClient, "_issue"): ["self", "msg"],
    (QMPClient, "_reply"): ["self", "msg_id"],
    (QMPClient, "_do_send"): ["self", "msg"],
    (QMPClient, "_cb_outbound"): ["self", "msg"],
    (QMPClient, "_cb_inbound"): ["self", "msg"],
    (QMPClient, "execute"): ["self", "cmd", "arguments", "oob"],
    (QMPClient, "_do_connect"): ["self", "address", "ssl"],
    (QMPClient, "_cleanup"): ["self"],
    (EventListener, "put"): ["self", "event"],
}


def _instance_attributes(cls: type[Any]) -> set[str]:
    """The ``self.X`` names assigned anywhere in ``cls`` and its bases (from their source)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is object:
            continue
        tree = ast.parse(inspect.getsource(inspect.getmodule(klass)))  # type: ignore[arg-type]
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not isinstance(node.ctx, ast.Store):
                continue
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                names.add(node.attr)
    return names


@pytest.mark.parametrize(("owner", "name"), [(o, n) for o, names in PRIVATE_NAMES.items() for n in names])
def test_every_private_name_used_still_exists(owner: str, name: str) -> None:
    cls = CLASSES[owner]
    present = hasattr(cls, name) or name in _instance_attributes(cls)
    assert present, f"qemu.qmp {owner}.{name} is gone: qmpnet/adapters/qmp/qemu_qmp_internals.py relies on it"


@pytest.mark.parametrize(("cls", "name"), list(SIGNATURES))
def test_overridden_and_called_methods_keep_their_signatures(cls: type[Any], name: str) -> None:
    parameters = list(inspect.signature(getattr(cls, name)).parameters)
    assert parameters == SIGNATURES[cls, name], (
        f"qemu.qmp {cls.__name__}.{name}{inspect.signature(getattr(cls, name))} changed: "
        "qmpnet/adapters/qmp/qemu_qmp_internals.py overrides or calls it"
    )


async def test_the_stream_privates_of_the_reply_path_still_exist() -> None:
    reader = asyncio.StreamReader()
    for name in STREAM_PRIVATE_NAMES:
        assert hasattr(reader, name), f"asyncio.StreamReader.{name} is gone: FlatClient._take_reply reads it"
    waiter = getattr(reader, "_waiter", "missing")
    assert waiter is None, "asyncio.StreamReader._waiter no longer means 'nobody waits' when None"
    source = inspect.getsource(asyncio.StreamReaderProtocol.data_received)
    assert "reader.feed_data(data)" in source, (
        "asyncio's stream protocol no longer calls reader.feed_data(data): FlatClient's wrapper would be bypassed"
    )


def test_the_replies_are_still_taken_from_the_pending_slot() -> None:
    # Reply stands in for the asyncio.Queue that _issue puts in _pending; _reply must still read it with get().
    source = inspect.getsource(QMPClient._reply)
    assert "self._pending[msg_id]" in source, "qemu.qmp QMPClient._reply no longer reads self._pending[msg_id]"
    assert ".get()" in source, "qemu.qmp QMPClient._reply no longer awaits get() on the pending slot"


@pytest.mark.parametrize(
    "body",
    [
        {"execute": "qmp_capabilities"},
        {"execute": "netdev_add", "arguments": {"id": "v0.net", "type": "user", "hostfwd": [{"str": "tcp::22-:22"}]}},
        {"execute": "device_add", "arguments": {"driver": "virtio-net-pci", "addr": "0x3", "vectors": 10, "mq": True},
         "id": 7},
        {"execute": "human-monitor-command", "arguments": {"command-line": 'info "réseau"\n', "none": None}},
    ],
)
def test_the_direct_path_sends_the_bytes_qemu_qmp_would(body: dict[str, object]) -> None:
    assert qemu_qmp_internals._ENCODE(body).encode() == bytes(Message(body))


async def test_a_direct_command_an_error_and_an_event_on_a_small_exchange(fake: FakeQmp) -> None:
    client = FlatClient("contract")
    assert client.events in client._listeners, "FlatClient did not register its history-free default listener"
    assert isinstance(client.events, FlatListener)
    sent: list[object] = []
    original = client._do_send

    def spy(msg: Any) -> None:
        sent.append(msg)
        original(msg)

    client._do_send = spy  # type: ignore[method-assign]
    await client.connect(str(fake.path))
    try:
        listener = FlatListener(("DEVICE_DELETED",))
        client.register_listener(listener)

        async def status(arguments: dict[str, Any]) -> object:
            return {"status": "running", "running": True}

        fake.on("query-status", status)
        sent.clear()
        assert await client.execute("query-status") == {"status": "running", "running": True}
        assert sent, "FlatClient.execute did not write through _do_send (the direct path is not taken)"
        assert client._pending == {}, "qemu.qmp left the reply slot in _pending after _reply"
        fake.fail("device_del", "Device 'x' not found", "DeviceNotFound")
        with pytest.raises(ExecuteError) as failed:
            await client.execute("device_del", {"id": "x"})
        assert failed.value.error_class == "DeviceNotFound"
        assert take_nowait(listener) is None
        await fake.emit("DEVICE_DELETED", {"device": "x", "path": "/machine/peripheral/x"})
        async with asyncio.timeout(5):
            event = await listener.get()
        assert event["event"] == "DEVICE_DELETED"
        assert listener.history == (), "FlatListener kept a history"
        await fake.emit("DEVICE_DELETED", {"device": "y", "path": "/machine/peripheral/y"})
        async with asyncio.timeout(5):
            while listener.empty():  # noqa: ASYNC110 - the event has no other signal than the queue
                await asyncio.sleep(0.001)
        taken = take_nowait(listener)
        assert taken is not None
        assert taken["data"] == {"device": "y", "path": "/machine/peripheral/y"}
        sock = peer_socket(client)
        assert sock is not None, "qemu.qmp QMPClient._writer no longer carries the socket"
        assert sock.family == socket.AF_UNIX
        assert len(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)) == 12
    finally:
        await client.disconnect()
    assert peer_socket(client) is None


@contextlib.asynccontextmanager
async def _connected(fake: FakeQmp) -> AsyncIterator[FlatClient]:
    """A FlatClient connected to ``fake``, which answers ``query-name`` too."""
    client = FlatClient("contract")
    fake.on("query-name", _named)
    await client.connect(str(fake.path))
    try:
        yield client
    finally:
        await client.disconnect()


async def _routed_by_reader(client: FlatClient, command: str) -> list[str]:
    """Run ``command`` and return the messages qemu.qmp's reader task routed meanwhile (events and replies)."""
    routed: list[str] = []
    original = client._on_message

    async def spy(msg: Any) -> None:
        routed.append("event" if "event" in msg else "reply")
        await original(msg)

    client._on_message = spy  # type: ignore[method-assign]
    try:
        await client.execute(command)
    finally:
        del client._on_message
    return routed


async def test_a_lone_reply_reaches_its_caller_without_the_reader_task(fake: FakeQmp) -> None:
    async with _connected(fake) as client:
        assert await _routed_by_reader(client, "query-name") == [], "the reply went through the reader task"
        client.logger.setLevel(logging.DEBUG)  # qemu.qmp logs each message it routes: the reader's path is kept
        try:
            assert await _routed_by_reader(client, "query-name") == ["reply"]
        finally:
            client.logger.setLevel(logging.NOTSET)
        assert client._pending == {}


async def test_a_reply_behind_an_event_is_routed_after_it(fake: FakeQmp) -> None:
    listener = FlatListener(("DEVICE_DELETED",))
    async with _connected(fake) as client:
        client.register_listener(listener)
        # QEMU sends the event and then the reply; they may arrive in one read. The event must be with the
        # listener by the time the caller has the reply (as when qemu.qmp's reader routes both).
        deleted = {"device": "x", "path": "/machine/peripheral/x"}
        fake.on("query-name", _after_event(fake, deleted))
        for _ in range(20):
            await client.execute("query-name")
            taken = take_nowait(listener)
            assert taken is not None, "the reply overtook the event QEMU sent before it"
            assert taken["data"] == deleted
        # A reply with more behind it in the same read (here: an event) is the reader task's to route.
        fake.on("query-status", _reply_then_event(deleted))
        assert await _routed_by_reader(client, "query-status") == ["reply", "event"]
        assert take_nowait(listener) is not None
        assert client._pending == {}


def _sent_ids(client: FlatClient) -> list[object]:
    """Spy on what ``client`` writes: the list fills with each command's id (``"none"`` for a command without)."""
    ids: list[object] = []
    original = client._do_send

    def spy(msg: Any) -> None:
        ids.append(msg.get("id", "none"))
        original(msg)

    client._do_send = spy  # type: ignore[method-assign]
    return ids


async def test_a_command_carries_no_id_unless_another_awaits_an_id_less_reply(fake: FakeQmp) -> None:
    async with _connected(fake) as client:
        ids = _sent_ids(client)
        assert await client.execute("query-name") == {"name": "contract"}
        release = fake.hold("query-status")
        first = asyncio.create_task(client.execute("query-status"))
        await fake.wait_for_command("query-status")
        second = asyncio.create_task(client.execute("query-name"))
        await eventually(lambda: len(ids) == 3)  # written; its reply cannot come before the held one's
        release.set()
        async with asyncio.timeout(5):
            assert await first == {}
            assert await second == {"name": "contract"}
        assert ids == ["none", "none", 1], "the command sent while an id-less reply was awaited had no id"
        assert client._pending == {}


async def test_a_late_reply_of_a_command_given_up_on_is_dropped_and_ids_are_used_until_it_comes(fake: FakeQmp) -> None:
    fake.fail("device_del", "Device 'x' not found", "DeviceNotFound")
    release = fake.hold("device_del")
    async with _connected(fake) as client:
        ids = _sent_ids(client)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await client.execute("device_del", {"id": "x"})
        after = asyncio.create_task(client.execute("query-name"))
        await eventually(lambda: len(ids) == 2)  # written; its reply waits for the held one's
        release.set()  # the late reply (an id-less error) comes first: it must not be taken for query-name's
        async with asyncio.timeout(5):
            assert await after == {"name": "contract"}
        assert await client.execute("query-name") == {"name": "contract"}
        assert ids == ["none", 1, "none"], "ids were not used until the late reply came, or not dropped after it"
        assert client.runstate == Runstate.RUNNING, "the late id-less error reply was taken as a parse error"
        assert client._pending == {}


async def test_a_disconnect_while_a_late_reply_is_awaited_leaves_no_slot(fake: FakeQmp) -> None:
    client = FlatClient("contract")
    fake.hang("device_del")
    await client.connect(str(fake.path))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await client.execute("device_del", {"id": "x"})
    assert None in client._pending, "no stand-in waits for the late reply"
    await client.disconnect()  # qemu.qmp asserts that no slot is left
    assert client._pending == {}


def _after_event(fake: FakeQmp, data: dict[str, Any]) -> Any:
    async def answer(arguments: dict[str, Any]) -> object:
        await fake.emit("DEVICE_DELETED", data)
        return {}

    return answer


async def _named(arguments: dict[str, Any]) -> object:
    return {"name": "contract"}


def _reply_then_event(data: dict[str, Any]) -> Any:
    async def answer(arguments: dict[str, Any]) -> object:
        return Answer({"status": "running", "running": True}, (Event("DEVICE_DELETED", data),))

    return answer


def _private_uses(tree: ast.AST, names: set[str]) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in names:
            found.append(f"line {node.lineno}: .{node.attr}")
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in names:
            found.append(f"line {node.lineno}: def {node.name} (an override)")
    return found


def test_no_other_module_touches_qemu_qmp_privates() -> None:
    privates = {name for names in PRIVATE_NAMES.values() for name in names}
    package = Path(qemu_qmp_internals.__file__).parent
    others = {}
    for path in sorted(Path(package).glob("*.py")):
        if path.name == "qemu_qmp_internals.py":
            continue
        uses = _private_uses(ast.parse(path.read_text()), privates)
        if uses:
            others[path.name] = uses
    assert others == {}, "qemu.qmp's private names belong in adapters/qmp/qemu_qmp_internals.py only"
