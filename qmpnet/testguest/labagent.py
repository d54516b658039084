"""The lab host's agent: runs commands for :mod:`.lab` clients and streams their output back.

It runs inside the lab (started by lab-init.sh with the host's own python3, ``-I``), so it uses the standard
library only and imports nothing from qmpnet. One TCP connection is one request, so any number of clients may run
commands at once:

- client -> agent: one JSON line ``{"token": T, "op": "run", "argv": [...], "cwd": DIR, "env": {...}}``, or
  ``{"token": T, "op": "info"}``. The token is the one in the lab's state directory (a file only root on the host
  can read), so no other local user can run commands through the forwarded loopback port.
- agent -> client: frames of one kind byte and a 4-byte big-endian length, then the payload: kind 1 is stdout,
  2 stderr, and 0 ends the answer with a JSON object, ``{"status": N}`` (a signal is ``128 + N``, as in a shell),
  ``{"error": "..."}`` when the command cannot run, or the info.
- A client that goes away ends its command: its whole process group is killed.

The info names the lab's assignable functions, found in sysfs: the e1000e functions (each behind its own root
port, so in its own IOMMU group) and the e1000 pair behind the PCIe-to-PCI bridge, which share a group.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import os
import platform
import signal
import struct
import sys
from pathlib import Path
from typing import Any

STDOUT, STDERR, END = 1, 2, 0
HEADER = struct.Struct(">BI")
CHUNK = 65536
REQUEST_LIMIT = 4 * 1024 * 1024
TOKEN_FILE = "token"  # noqa: S105 - the name of the file, not a secret
PCI = Path("/sys/bus/pci/devices")
#: vendor:device of the lab's assignable functions, and of the pair that shares a group.
FUNCTION_ID = ("0x8086", "0x10d3")
SHARED_ID = ("0x8086", "0x100e")


def _pci_ids(bdf: Path) -> tuple[str, str]:
    return (bdf / "vendor").read_text().strip(), (bdf / "device").read_text().strip()


def lab_functions() -> tuple[list[str], list[str]]:
    """The assignable functions (one per IOMMU group) and the pair that shares a group, as PCI addresses."""
    functions: list[str] = []
    shared: list[str] = []
    for device in sorted(PCI.iterdir()):
        ids = _pci_ids(device)
        if ids == FUNCTION_ID:
            functions.append(device.name)
        elif ids == SHARED_ID:
            shared.append(device.name)
    return functions, shared


class Agent:
    """Serves requests; one per connection."""

    def __init__(self, token: str) -> None:
        self.token = token
        functions, shared = lab_functions()
        self.info = {
            "release": platform.release(),
            "functions": functions,
            "shared_group": shared,
        }
        #: Defaults a client's environment may override: a guest booted in the lab runs under nested TCG.
        self.defaults = {"QMPNET_TESTGUEST_TIMEOUT_SCALE": "10"}
        self.lab_env = {
            "QMPNET_LAB": "1",
            "QMPNET_LAB_FUNCTIONS": " ".join(functions),
            "QMPNET_LAB_SHARED_GROUP": " ".join(shared),
        }

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer one request on one connection."""
        try:
            line = await reader.readline()
            request = json.loads(line)
            if not isinstance(request, dict) or not hmac.compare_digest(str(request.get("token")), self.token):
                await self._end(writer, {"error": "the lab refused the request: wrong token"})
            elif request.get("op") == "info":
                await self._end(writer, {"status": 0, **self.info})
            elif request.get("op") == "run":
                await self._run(request, reader, writer)
            else:
                await self._end(writer, {"error": f"unknown op {request.get('op')!r}"})
        except (ValueError, ConnectionError) as err:
            with contextlib.suppress(ConnectionError):
                await self._end(writer, {"error": f"bad request: {err}"})
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _run(
        self, request: dict[str, object], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        argv = request.get("argv")
        env = request.get("env") or {}
        cwd = str(request.get("cwd") or "/")
        if not isinstance(argv, list) or not argv or not isinstance(env, dict):
            await self._end(writer, {"error": "argv must be a non-empty list and env an object"})
            return
        try:
            process = await asyncio.create_subprocess_exec(
                *(str(a) for a in argv),
                cwd=cwd,
                env={**self.defaults, **{str(k): str(v) for k, v in env.items()}, **self.lab_env},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as err:
            await self._end(writer, {"error": f"cannot run {argv[0]!r} in {cwd}: {err.strerror or err}"})
            return
        gone = asyncio.ensure_future(reader.read(1))  # the client sends nothing more: any return means it left
        pumps: list[asyncio.Task[None]] = [
            asyncio.ensure_future(self._pump(process.stdout, STDOUT, writer)),
            asyncio.ensure_future(self._pump(process.stderr, STDERR, writer)),
        ]
        try:
            if await self._finished(process, gone, pumps, writer):
                return
        finally:
            gone.cancel()
            for pump in pumps:
                pump.cancel()
        # The client went away (or its connection broke): the command goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()

    async def _finished(
        self,
        process: asyncio.subprocess.Process,
        gone: asyncio.Future[bytes],
        pumps: list[asyncio.Task[None]],
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Whether the command ran to its end and its status reached the client."""
        try:
            waited: list[asyncio.Future[Any]] = [gone, asyncio.gather(*pumps)]
            done, _ = await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
            if gone in done:
                return False
            status = await process.wait()
            await self._end(writer, {"status": 128 - status if status < 0 else status})
        except ConnectionError:
            return False
        return True

    @staticmethod
    async def _pump(stream: asyncio.StreamReader | None, kind: int, writer: asyncio.StreamWriter) -> None:
        if stream is None:
            return
        while chunk := await stream.read(CHUNK):
            writer.write(HEADER.pack(kind, len(chunk)) + chunk)
            await writer.drain()

    @staticmethod
    async def _end(writer: asyncio.StreamWriter, answer: dict[str, object]) -> None:
        payload = json.dumps(answer).encode()
        writer.write(HEADER.pack(END, len(payload)) + payload)
        await writer.drain()


async def main(argv: list[str] | None = None) -> None:
    """Serve until killed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="10.0.2.15:7000", help="address:port")
    parser.add_argument("--state", type=Path, required=True, help="the lab's state directory (its token)")
    args = parser.parse_args(argv)
    agent = Agent((args.state / TOKEN_FILE).read_text().strip())
    host, _, port = args.listen.rpartition(":")
    server = await asyncio.start_server(agent.serve, host, int(port), limit=REQUEST_LIMIT)
    sys.stdout.write(f"lab: agent listening on {args.listen}; functions {agent.info}\n")
    sys.stdout.flush()
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
