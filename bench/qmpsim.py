"""A light QMP endpoint simulator: many guests in one process, answering from a real QEMU's captured replies.

Its figures are the controller's *own* cost at fleet sizes that real QEMU processes cannot reach on one machine (a
``-S`` QEMU takes about 40 MiB); every benchmark row that uses it says "simulator". Real QEMU stays the realistic
row (``scale.py`` keeps 200 ``qemu-system-x86_64 -S`` processes).

Each guest listens on ``DIR/g<N>.qmp``, serves one client at a time (like QEMU, a second client waits without a
greeting until the first leaves), greets as the captured QEMU and answers what the controller asks:

* the reads (``qom-get``, ``qom-list``, ``qom-list-types``, ``device-list-properties``, ``query-pci``, HMP ``info
  network`` and ``device_add help``) from the capture of a real QEMU 7.2 guest (``tests/unit/data/qemu-7.2/pc.json``:
  a pc machine with an e1000, a virtio NIC and a built-in rtl8139), through ``tests/unit/captures.py`` as the unit
  tests' fake QMP server does, and kept consistent by the changes (``netdev_add``, ``device_add``, ``netdev_del``);
* the instance mark qmpnet adds (``object-add`` of an ``authz-simple``, read back by ``qom-get /objects/...``);
* ``query-chardev``: the monitor's own chardev, as QEMU 7.2 answers it for ``-qmp unix:PATH,server=on``;
* ``query-rx-filter``: what QEMU 7.2 answers for a virtio NIC of a guest that has not booted (VLAN filter ``all``,
  so a 4096-entry table);
* ``set_link``, ``device_del``: ``{}`` (an unplug is never completed, as in a guest without an OS).

The guests share the capture until one is changed (copy on first change), and the encoded answers of the shared
capture are cached, so the simulator itself stays cheap next to the controller it is measuring.

Run: ``python bench/qmpsim.py --dir DIR --count N [--ready FILE]``; it writes FILE once every socket listens and
serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "unit"))

from captures import Capture, QmpError, _key
from lab import raise_nofile

if TYPE_CHECKING:
    from collections.abc import Mapping

INSTANCE_PATH = "/objects/"
_VLAN_ALL = list(range(4095, -1, -1))


class SimCapture(Capture):
    """A capture that answers without copying (the simulator only encodes answers; changes edit ``answers``)."""

    def answer(self, command: str, arguments: Mapping[str, Any] | None = None) -> object:
        exchange = self.answers.get(_key(command, arguments))
        if exchange is None or "error" in exchange:
            return super().answer(command, arguments)  # the error QEMU gives
        return exchange["return"]

    def copy(self) -> SimCapture:
        return SimCapture(self.qemu, list(self.args), copy.deepcopy(self.answers))


class Base:
    """The capture all unchanged guests share, with its encoded answers."""

    def __init__(self, capture: SimCapture) -> None:
        self.capture = capture
        self._encoded: dict[str, bytes] = {}

    def encoded(self, command: str, arguments: dict[str, Any] | None) -> bytes:
        key = json.dumps([command, arguments or {}], sort_keys=True)
        found = self._encoded.get(key)
        if found is None:
            found = _reply_body(self.capture, command, arguments)
            self._encoded[key] = found
        return found


class SimGuest:
    """One simulated QEMU: its socket, its capture (shared until changed), its QOM objects."""

    def __init__(self, path: Path, base: Base) -> None:
        self.path = path
        self.base = base
        self.own: SimCapture | None = None
        self.objects: dict[str, dict[str, Any]] = {}
        self.turn = asyncio.Lock()  # one client at a time, as QEMU

    def capture(self) -> SimCapture:
        if self.own is None:
            self.own = self.base.capture.copy()
        return self.own

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with self.turn:
            try:
                major, minor, micro = self.base.capture.version
                version = {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": "qmpsim"}
                writer.write(json.dumps({"QMP": {"version": version, "capabilities": ["oob"]}}).encode() + b"\r\n")
                decoder = json.JSONDecoder()
                buffer = ""
                while chunk := await reader.read(65536):
                    buffer += chunk.decode()
                    out = []
                    while buffer := buffer.lstrip():
                        try:
                            message, end = decoder.raw_decode(buffer)
                        except json.JSONDecodeError:
                            break
                        buffer = buffer[end:]
                        out.append(self.answer(message))
                    writer.write(b"".join(out))
                    await writer.drain()
            except ConnectionError:
                pass
            finally:
                writer.close()

    def answer(self, message: dict[str, Any]) -> bytes:
        command = str(message.get("execute") or message.get("exec-oob"))
        arguments = message.get("arguments") or None
        body = self._body(command, arguments)
        tail = b', "id": ' + json.dumps(message["id"]).encode() if "id" in message else b""
        return b"{" + body + tail + b"}\r\n"

    def _body(self, command: str, arguments: dict[str, Any] | None) -> bytes:
        try:
            handled = self._handled(command, arguments or {})
        except QmpError as err:
            return _error(err)
        if handled is not None:
            return b'"return": ' + json.dumps(handled).encode()
        if self.own is None:
            return self.base.encoded(command, arguments)
        return _reply_body(self.own, command, arguments)

    def _handled(self, command: str, args: dict[str, Any]) -> object:
        """The answer to a command the capture does not hold (``None``: answer from the capture)."""
        if command in ("qmp_capabilities", "set_link", "device_del"):
            return {}
        if command == "qom-get" and str(args.get("path", "")).startswith(INSTANCE_PATH):
            found = self.objects.get(str(args["path"]).removeprefix(INSTANCE_PATH))
            if found is None:
                raise QmpError(f"Device '{args['path']}' not found", "DeviceNotFound")
            return found.get(str(args.get("property")))
        if command == "object-add":
            object_id = str(args.get("id"))
            if object_id in self.objects:
                raise QmpError(f"attempt to add duplicate property '{object_id}' to object (type 'container')")
            self.objects[object_id] = {k: v for k, v in args.items() if k not in ("id", "qom-type")}
            return {}
        if command == "query-chardev":
            return [{"frontend-open": True, "filename": f"unix:{self.path},server=on", "label": "compat_monitor0"}]
        if command == "query-rx-filter":
            return [_rx_filter(str(args.get("name")))]
        return self._changed(command, args)

    def _changed(self, command: str, args: dict[str, Any]) -> object:
        """A change the capture is kept consistent with (``None``: not a change)."""
        if command == "netdev_add":
            self.capture().add_netdev(str(args["id"]), str(args.get("type", "user")))
        elif command == "netdev_del":
            self.capture().delete_netdev(str(args.get("id")))
        elif command == "device_add":
            self.capture().add_device(args)
        else:
            return None
        return {}


def _reply_body(capture: Capture, command: str, arguments: dict[str, Any] | None) -> bytes:
    try:
        if command == "human-monitor-command":
            line = str((arguments or {}).get("command-line", ""))
            try:
                value: object = capture.hmp(line)
            except QmpError:
                value = f"unknown command: '{line}'\r\n"
        else:
            value = capture.answer(command, arguments)
    except QmpError as err:
        return _error(err)
    return b'"return": ' + json.dumps(value).encode()


def _error(err: QmpError) -> bytes:
    return b'"error": ' + json.dumps({"class": err.klass, "desc": err.desc}).encode()


def _rx_filter(name: str) -> dict[str, object]:
    return {"promiscuous": True, "name": name, "main-mac": "52:54:00:00:00:01", "unicast": "normal", "vlan": "all",
            "vlan-table": _VLAN_ALL, "unicast-table": [], "multicast": "normal", "multicast-overflow": False,
            "unicast-overflow": False, "multicast-table": [], "broadcast-allowed": False}  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--ready", type=Path, default=None, help="file written once every socket listens")
    parser.add_argument("--version", default="7.2", help="QEMU version of the capture (tests/unit/data)")
    parser.add_argument("--setup", default="pc", help="the captured guest (tests/unit/data/qemu-VERSION/SETUP.json)")
    args = parser.parse_args()
    raise_nofile()
    loaded = Capture.load(args.version, args.setup)
    base = Base(SimCapture(loaded.qemu, loaded.args, loaded.answers))
    args.dir.mkdir(parents=True, exist_ok=True)
    servers = []
    for n in range(args.count):
        guest = SimGuest(args.dir / f"g{n}.qmp", base)
        guest.path.unlink(missing_ok=True)
        servers.append(await asyncio.start_unix_server(guest.session, path=str(guest.path), backlog=16))
    if args.ready is not None:
        args.ready.write_text(f"{os.getpid()}\n")
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


if __name__ == "__main__":
    asyncio.run(main())
