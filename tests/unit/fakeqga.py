"""An in-process fake qemu-guest-agent: a unix-socket server speaking the agent's protocol, for the real adapter.

It answers ``guest-sync-delimited`` the way the agent does (0xFF, then the JSON), ``guest-network-get-interfaces``
from :attr:`FakeQga.interfaces`, and the file API from :attr:`FakeQga.files` (a path mapped to ``None`` fails to
read, like ``carrier`` of an interface that is down). It can misbehave as a real port does: leave stale bytes
before the sync answer (:attr:`FakeQga.stale`), never answer (:attr:`FakeQga.silent`), or hang on one command
(:attr:`FakeQga.hang`), or answer one late (:attr:`FakeQga.delays`). :attr:`FakeQga.script` gives successive
interface lists (the last one repeats), so a test can make an interface appear on the third look without
sleeping. ``guest-exec`` runs nothing: it reports ``exec_output`` on the second status query. Every command
received is kept in :attr:`FakeQga.received`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    from pathlib import Path
    from types import TracebackType

__all__ = ["FakeQga", "interface"]


def interface(name: str, mac: str, *addresses: str, extra: bool = False) -> dict[str, Any]:
    """A ``guest-network-get-interfaces`` entry; ``extra`` adds members a newer agent sends."""
    ips = []
    for cidr in addresses:
        address, _, prefix = cidr.partition("/")
        kind = "ipv6" if ":" in address else "ipv4"
        ips.append({"ip-address-type": kind, "ip-address": address, "prefix": int(prefix)})
    entry: dict[str, Any] = {"name": name, "hardware-address": mac, "ip-addresses": ips}
    if extra:
        entry["statistics"] = {"rx-bytes": 1, "tx-bytes": 2}
        entry["future-member"] = True
    return entry


class FakeQga:
    """A fake guest agent listening at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.interfaces: list[dict[str, Any]] = []
        self.files: dict[str, str | None] = {}
        self.received: list[str] = []
        self.stale: bytes = b""
        self.silent = False
        self.hang: str | None = None
        self.errors: dict[str, tuple[str, str]] = {}
        self.delays: dict[str, float] = {}
        self.script: list[list[dict[str, Any]]] = []
        self.exec_output = ""
        self.exec_argv: list[list[str]] = []
        self._status_queries = 0
        self._handles: dict[int, str] = {}
        self._next_handle = 1000
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._clients:
            task.cancel()
        for task in self._clients:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def set_interface(
        self, name: str, mac: str, *addresses: str, carrier: str | None = "1", operstate: str = "up"
    ) -> None:
        """Give the guest an interface (replacing one of the same name) with its sysfs files."""
        self.interfaces = [i for i in self.interfaces if i["name"] != name] + [interface(name, mac, *addresses)]
        self.sysfs(name, carrier=carrier, operstate=operstate)

    def sysfs(self, name: str, *, carrier: str | None = "1", operstate: str = "up", ifindex: int = 2) -> None:
        """The sysfs files of an interface udev has renamed (``name_assign_type`` 4)."""
        base = f"/sys/class/net/{name}"
        self.files[f"{base}/carrier"] = None if carrier is None else f"{carrier}\n"
        self.files[f"{base}/operstate"] = f"{operstate}\n"
        self.files[f"{base}/name_assign_type"] = "4\n"
        self.files[f"{base}/ifindex"] = f"{ifindex}\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            while line := await reader.readline():
                request = json.loads(line.lstrip(b"\xff"))
                command = request["execute"]
                self.received.append(command)
                if self.silent or command == self.hang:
                    continue
                if command in self.delays:
                    await asyncio.sleep(self.delays.pop(command))  # a late answer, on purpose
                writer.write(self._answer(command, request.get("arguments", {})))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def _answer(self, command: str, arguments: dict[str, Any]) -> bytes:
        if command == "guest-sync-delimited":
            return self.stale + b"\xff" + json.dumps({"return": arguments["id"]}).encode() + b"\n"
        if command in self.errors:
            klass, desc = self.errors[command]
            return _line({"error": {"class": klass, "desc": desc}})
        handler = getattr(self, "_on_" + command.removeprefix("guest-").replace("-", "_"), None)
        if handler is None:
            return _line({"error": {"class": "CommandNotFound", "desc": f"The command {command} has not been found"}})
        return _line(handler(arguments))

    def _on_network_get_interfaces(self, arguments: dict[str, Any]) -> dict[str, Any]:
        if self.script:
            self.interfaces = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        return {"return": self.interfaces}

    def _on_exec(self, arguments: dict[str, Any]) -> dict[str, Any]:
        self.exec_argv.append([arguments["path"], *arguments.get("arg", [])])
        self._status_queries = 0
        return {"return": {"pid": 42}}

    def _on_exec_status(self, arguments: dict[str, Any]) -> dict[str, Any]:
        self._status_queries += 1
        if self._status_queries < 2:
            return {"return": {"exited": False}}
        out = base64.b64encode(self.exec_output.encode()).decode()
        return {"return": {"exited": True, "exitcode": 0, "out-data": out}}

    def _on_file_open(self, arguments: dict[str, Any]) -> dict[str, Any]:
        path = arguments["path"]
        if path not in self.files:
            desc = f"failed to open file '{path}' (mode: 'r'): No such file or directory"
            return {"error": {"class": "GenericError", "desc": desc}}
        self._next_handle += 1
        self._handles[self._next_handle] = path
        return {"return": self._next_handle}

    def _on_file_read(self, arguments: dict[str, Any]) -> dict[str, Any]:
        content = self.files.get(self._handles[arguments["handle"]])
        if content is None:
            return {"error": {"class": "GenericError", "desc": "failed to read file: Invalid argument"}}
        data = base64.b64encode(content.encode()).decode()
        return {"return": {"count": len(content), "buf-b64": data, "eof": True}}

    def _on_file_close(self, arguments: dict[str, Any]) -> dict[str, Any]:
        self._handles.pop(arguments["handle"], None)
        return {"return": {}}

    @property
    def open_handles(self) -> int:
        """File handles opened and not closed."""
        return len(self._handles)


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\n"
