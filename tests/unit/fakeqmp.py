"""An in-process fake QEMU monitor: a unix-socket server speaking QMP, for tests of the real QMP adapter.

It greets like the QEMU of its capture, negotiates ``qmp_capabilities`` and answers every later command from a
handler table the test can change (:meth:`FakeQmp.on`, :meth:`FakeQmp.fail`). It can also misbehave the ways a
real monitor does: never answer a command (:meth:`FakeQmp.hang`), answer only when the test says so
(:meth:`FakeQmp.hold`), or drop the connection when a command arrives (:meth:`FakeQmp.drop_on`). Everything
received and every event sent is kept, in order, in :attr:`FakeQmp.transcript`, and :meth:`FakeQmp.wait_for`
waits (with a deadline) for the transcript to reach a state, so tests never sleep to synchronise.

Commands are served one at a time in arrival order, as QEMU's main loop does without out-of-band execution.

The reads (``qom-get``, ``qom-list``, ``qom-list-types``, ``device-list-properties``, ``query-pci`` and HMP
commands) answer from a :class:`captures.Capture` of a real QEMU guest, by default the QEMU 7.2 ``pc`` one
(``data/qemu-7.2/pc.json``), kept consistent as the guest changes: ``netdev_add``/``netdev_del`` show in
``info network``, ``device_add`` puts the device in every answer that shows devices (QOM, ``query-pci`` on a root
bus, ``info network``), and :meth:`FakeQmp.forget_device` removes it again, as an unplug does. Changes answer
``{}``; ``device_del`` is then never completed, like a guest without an OS, unless the test calls
:meth:`FakeQmp.ack_unplugs` or sends :meth:`FakeQmp.unplug_events` itself.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

from captures import Capture, QmpError
from waiting import eventually  # re-exported for tests written before tests/waiting.py

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from pathlib import Path

__all__ = [
    "Answer",
    "Command",
    "Event",
    "FakeQmp",
    "QmpError",
    "eventually",
]

#: Commands answered from the capture.
CAPTURED = frozenset({"qom-get", "qom-list", "qom-list-types", "device-list-properties", "query-pci"})
#: Commands that only read; :meth:`FakeQmp.changes` leaves them out.
READ_ONLY = CAPTURED | {"qmp_capabilities", "human-monitor-command", "query-rx-filter", "query-chardev"}


@dataclass(frozen=True)
class Command:
    """A command the fake received."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Event:
    """An event the fake sent."""

    name: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Answer:
    """A handler's answer: the ``return`` value, and events to send right after it."""

    value: object = field(default_factory=dict)
    events: tuple[Event, ...] = ()


class FakeQmp:
    """A fake QMP monitor listening on the unix socket ``path``.

    Args:
        path: Where to listen.
        capture: The guest the reads answer from; defaults to QEMU 7.2's captured ``pc`` guest.
        greet: Send the greeting on connect (``False`` makes a monitor that never answers).
    """

    def __init__(self, path: Path, *, capture: Capture | None = None, greet: bool = True) -> None:
        self.path = path
        self.capture = capture if capture is not None else Capture.load("7.2", "pc")
        self.greet = greet
        #: QOM objects by id (qom-type, properties): the instance mark of a QEMU qmpnet has met before.
        self.objects: dict[str, tuple[str, dict[str, Any]]] = {
            "qmpnet-instance": ("authz-simple", {"identity": "fake-instance-1"})
        }
        self.transcript: list[Command | Event] = []
        self.connections = 0
        self.handlers: dict[str, Callable[[dict[str, Any]], Awaitable[object]]] = {
            **{name: self._captured(name) for name in CAPTURED},
            "qom-get": self._qom_get,
            "object-add": self._object_add,
            "query-chardev": _no_chardevs,
            "object-del": self._object_del,
            "human-monitor-command": self._human_monitor_command,
            "query-rx-filter": self._query_rx_filter,
            "netdev_add": self._netdev_add,
            "device_add": self._device_add,
            "netdev_del": self._netdev_del,
            "device_del": _empty,
            "set_link": _empty,
        }
        self._hung: set[str] = set()
        self._drop: set[str] = set()
        self._server: asyncio.Server | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._sessions: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Condition()

    # ------------------------------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Listen on :attr:`path`."""
        self._server = await asyncio.start_unix_server(self._accept, path=str(self.path))

    async def close(self) -> None:
        """Stop listening and hang up on the client."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.hang_up()
        for task in list(self._sessions):
            task.cancel()
        for task in list(self._sessions):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.path.unlink(missing_ok=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def hang_up(self) -> None:
        """Close the current client connection, as a QEMU that exits would."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ------------------------------------------------------------------------------------------- scripting

    def on(self, command: str, handler: Callable[[dict[str, Any]], Awaitable[object]]) -> None:
        """Answer ``command`` with ``handler(arguments)`` (a value, an :class:`Answer`, or raise :class:`QmpError`)."""
        self.handlers[command] = handler

    def fail(self, command: str, desc: str, klass: str = "GenericError") -> None:
        """Answer ``command`` with a QMP error."""

        async def failing(arguments: dict[str, Any]) -> object:
            raise QmpError(desc, klass)

        self.on(command, failing)

    def hang(self, command: str) -> None:
        """Never answer ``command`` (later commands are still read and recorded)."""
        self._hung.add(command)

    def hold(self, command: str) -> asyncio.Event:
        """Answer ``command`` only once the returned event is set; the monitor serves nothing meanwhile."""
        release = asyncio.Event()
        inner = self.handlers.get(command, _empty)

        async def held(arguments: dict[str, Any]) -> object:
            await release.wait()
            return await inner(arguments)

        self.on(command, held)
        return release

    def drop_on(self, command: str) -> None:
        """Close the connection, without answering, when ``command`` arrives."""
        self._drop.add(command)

    async def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Send event ``name`` to the connected client."""
        await self.emit_many([Event(name, data or {})])

    async def emit_many(self, events: list[Event]) -> None:
        """Send ``events`` in one write (used to flood the client)."""
        writer = self._writer
        if writer is None:
            raise RuntimeError("no client is connected to the fake QMP monitor")
        writer.write(b"".join(_event_bytes(event) for event in events))
        await writer.drain()
        await self._record(*events)

    def ack_unplugs(self, *, virtio: bool = False, forget: bool = True) -> None:
        """Answer ``device_del`` like a guest OS that completes the unplug at once.

        Args:
            virtio: Send virtio-net's extra ``DEVICE_DELETED`` for its backend (no ``device``) first.
            forget: Drop the device from the ``info`` outputs, so later observations no longer show it.
        """

        async def unplug(arguments: dict[str, Any]) -> object:
            return Answer({}, self.unplug_events(str(arguments["id"]), virtio=virtio, forget=forget))

        self.on("device_del", unplug)

    def unplug_events(self, device_id: str, *, virtio: bool = False, forget: bool = True) -> tuple[Event, ...]:
        """The events QEMU sends when the guest has unplugged ``device_id`` (optionally forgetting the device)."""
        if forget:
            self.forget_device(device_id)
        path = f"/machine/peripheral/{device_id}"
        done = Event("DEVICE_DELETED", {"device": device_id, "path": path})
        if virtio:
            return (Event("DEVICE_DELETED", {"path": f"{path}/virtio-backend"}), done)
        return (done,)

    def forget_device(self, device_id: str) -> None:
        """Remove device ``device_id`` and its net client from every answer (it was unplugged; its backend stays)."""
        self.capture.forget_device(device_id)

    @property
    def network(self) -> str:
        """What ``info network`` answers now."""
        return self.capture.hmp("info network")

    def reads(self) -> int:
        """How many times the guest was read (each read of the adapter sends one ``query-pci``)."""
        return sum(c.name == "query-pci" for c in self.commands())

    # -------------------------------------------------------------------------------------------- observing

    def commands(self) -> list[Command]:
        """Every command received after capabilities negotiation, in order."""
        return [c for c in self.transcript if isinstance(c, Command) and c.name != "qmp_capabilities"]

    def changes(self) -> list[Command]:
        """The commands that change the guest (no reads), in order."""
        return [c for c in self.transcript if isinstance(c, Command) and c.name not in READ_ONLY]

    def change_names(self) -> list[str]:
        """The names of :meth:`changes`."""
        return [c.name for c in self.changes()]

    def story(self) -> list[str]:
        """The changes and the events, in order: ``["device_del", "!DEVICE_DELETED", "netdev_del"]``."""
        return [
            f"!{entry.name}" if isinstance(entry, Event) else entry.name
            for entry in self.transcript
            if isinstance(entry, Event) or entry.name not in READ_ONLY
        ]

    async def wait_for(self, predicate: Callable[[FakeQmp], bool], timeout: float = 5.0) -> None:
        """Wait until ``predicate(self)`` holds; checked whenever the transcript grows.

        Raises:
            TimeoutError: It did not hold within ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    async def wait_for_command(self, name: str, timeout: float = 5.0) -> Command:
        """Wait until a command ``name`` has been received and return the first one."""
        await self.wait_for(lambda fake: any(c.name == name for c in fake.commands()), timeout)
        return next(c for c in self.commands() if c.name == name)

    # ------------------------------------------------------------------------------------------- protocol

    async def _record(self, *entries: Command | Event) -> None:
        async with self._changed:
            self.transcript.extend(entries)
            self._changed.notify_all()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Our own task rather than the one asyncio makes for a coroutine callback: close() cancels it, and
        # Python 3.11's callback for its own task logs an error when that task was cancelled.
        task = asyncio.create_task(self._session(reader, writer), name=f"fakeqmp[{self.path.name}]")
        self._sessions.add(task)
        task.add_done_callback(self._sessions.discard)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.hang_up()  # QEMU serves one client per monitor; the newest wins here
        self._writer = writer
        try:
            if self.greet:
                major, minor, micro = self.capture.version
                version = {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": "captured"}
                writer.write(_json({"QMP": {"version": version, "capabilities": ["oob"]}}))
                await writer.drain()
            async for message in _messages(reader):
                if not await self._serve(message, writer):
                    break
        except ConnectionError:
            pass
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()

    async def _serve(self, message: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        name = str(message.get("execute") or message.get("exec-oob"))
        arguments = dict(message.get("arguments", {}))
        await self._record(Command(name, arguments))
        if name in self._drop:
            return False
        if name in self._hung:
            return True
        reply, events = await self._answer(name, arguments)
        if "id" in message:
            reply["id"] = message["id"]
        writer.write(_json(reply))
        if events:
            writer.write(b"".join(_event_bytes(e) for e in events))
        await writer.drain()
        if events:
            await self._record(*events)
        return True

    async def _answer(self, name: str, arguments: dict[str, Any]) -> tuple[dict[str, Any], tuple[Event, ...]]:
        handler = _empty if name == "qmp_capabilities" else self.handlers.get(name, _not_found(name))
        try:
            value = await handler(arguments)
        except QmpError as err:
            return {"error": {"class": err.klass, "desc": err.desc}}, ()
        if isinstance(value, Answer):
            return {"return": value.value}, value.events
        return {"return": value}, ()

    # --------------------------------------------------------------------------------------- default handlers

    def _captured(self, command: str) -> Callable[[dict[str, Any]], Awaitable[object]]:
        async def answer(arguments: dict[str, Any]) -> object:
            return self.capture.answer(command, arguments or None)

        return answer

    async def _qom_get(self, arguments: dict[str, Any]) -> object:
        path = str(arguments.get("path"))
        if path.startswith("/objects/"):
            found = self.objects.get(path.removeprefix("/objects/"))
            if found is None:
                raise QmpError(f"Device '{path}' not found", "DeviceNotFound")
            return found[1].get(str(arguments.get("property")))
        return self.capture.answer("qom-get", arguments)

    async def _netdev_add(self, arguments: dict[str, Any]) -> object:
        self.capture.add_netdev(str(arguments["id"]), str(arguments.get("type", "user")))
        return {}

    async def _netdev_del(self, arguments: dict[str, Any]) -> object:
        self.capture.delete_netdev(str(arguments.get("id")))
        return {}

    async def _device_add(self, arguments: dict[str, Any]) -> object:
        self.capture.add_device(arguments)
        return {}

    async def _object_add(self, arguments: dict[str, Any]) -> object:
        object_id = str(arguments.get("id"))
        if object_id in self.objects:
            raise QmpError(f"attempt to add duplicate property '{object_id}' to object (type 'container')")
        rest = {k: v for k, v in arguments.items() if k not in ("id", "qom-type")}
        self.objects[object_id] = (str(arguments.get("qom-type")), rest)
        return {}

    async def _object_del(self, arguments: dict[str, Any]) -> object:
        if self.objects.pop(str(arguments.get("id")), None) is None:
            raise QmpError(f"object '{arguments.get('id')}' not found")
        return {}

    async def _human_monitor_command(self, arguments: dict[str, Any]) -> object:
        line = str(arguments.get("command-line", ""))
        try:
            return self.capture.hmp(line)
        except QmpError:
            return f"unknown command: '{line}'\r\n"

    async def _query_rx_filter(self, arguments: dict[str, Any]) -> object:
        name = str(arguments.get("name"))
        return [
            {
                "name": name,
                "promiscuous": True,
                "multicast": "normal",
                "unicast": "normal",
                "vlan": "normal",
                "broadcast-allowed": False,
                "multicast-overflow": False,
                "unicast-overflow": False,
                "main-mac": "52:54:00:00:00:01",
                "vlan-table": [],
                "unicast-table": [],
                "multicast-table": [],
            }
        ]


async def _empty(arguments: dict[str, Any]) -> object:
    return {}


async def _no_chardevs(arguments: dict[str, Any]) -> object:
    return []


def _not_found(name: str) -> Callable[[dict[str, Any]], Awaitable[object]]:
    async def not_found(arguments: dict[str, Any]) -> object:
        raise QmpError(f"The command {name} has not been found", "CommandNotFound")

    return not_found


async def _messages(reader: asyncio.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """JSON objects as they arrive; like QEMU's parser, this needs no newline between them."""
    decoder = json.JSONDecoder()
    text = codecs.getincrementaldecoder("utf-8")()  # a chunk may end inside a multi-byte character
    buffer = ""
    while chunk := await reader.read(65536):
        buffer += text.decode(chunk)
        while buffer := buffer.lstrip():
            try:
                message, end = decoder.raw_decode(buffer)
            except json.JSONDecodeError:
                break  # incomplete: wait for more
            buffer = buffer[end:]
            yield message


def _json(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\r\n"


def _event_bytes(event: Event) -> bytes:
    now = time.time()
    stamp = {"seconds": int(now), "microseconds": int(now % 1 * 1_000_000)}
    return _json({"event": event.name, "data": event.data, "timestamp": stamp})
