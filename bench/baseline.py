"""What every benchmark compares against: a bare asyncio socket speaking QMP, and how results are summarised."""

from __future__ import annotations

import asyncio
import json
import statistics
import time

FIRST_FREE_SLOT = 2  # a -S -nodefaults pc guest: 00.0 the host bridge, 01.x the PIIX3


class RawQmp:
    """The baseline: a bare asyncio socket speaking QMP, no library.

    Its commands are what QEMU needs and no more: compact JSON (no spaces) and no ``id`` (one command at a time, so
    replies come in order). QEMU 7.2 parses a command at ~3.5 us per character on the development machine: a space
    or an id is QEMU's work that a client could spare it, and the baseline spares it.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, path: str) -> RawQmp:
        reader, writer = await asyncio.open_unix_connection(path)
        raw = cls(reader, writer)
        await reader.readline()  # greeting
        await raw.call("qmp_capabilities")
        return raw

    async def call(self, command: str, arguments: dict[str, object] | None = None) -> object:
        message: dict[str, object] = {"execute": command} | ({"arguments": arguments} if arguments else {})
        self.writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")  # compact, as qemu.qmp writes
        while True:
            reply = json.loads(await self.reader.readline())
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeError(reply["error"])
            return reply["return"]

    async def add(self, n: int, *, minimal: bool = False) -> float:
        """Hot-add ``netdev_add`` user + ``device_add`` virtio-net-pci; return the seconds it took.

        The device gets the properties qmpnet gives every NIC it adds (``mac``, ``bus``, ``addr``; see
        ``qmpnet.core.hotadd_plan``), in the ``n``-th free slot of a fresh ``-S -nodefaults`` pc guest (slots 0 and 1
        hold the host bridge and the PIIX3): QEMU's own work for them is part of what any tool that sets them pays
        (measured: about 0.15 ms each for ``mac`` and for ``bus`` + ``addr``). ``minimal`` leaves them to QEMU.
        """
        start = time.perf_counter()
        await self.call("netdev_add", {"type": "user", "id": f"raw{n}.net"})
        device: dict[str, object] = {"driver": "virtio-net-pci", "id": f"raw{n}", "netdev": f"raw{n}.net"}
        if not minimal:
            device |= {"mac": f"52:54:00:{n >> 16 & 255:02x}:{n >> 8 & 255:02x}:{n & 255:02x}", "bus": "pci.0",
                       "addr": f"{n + FIRST_FREE_SLOT:02x}.0"}  # fmt: skip
        await self.call("device_add", device)
        return time.perf_counter() - start

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def summary(values: list[float]) -> tuple[float, float]:
    """Median and p99, in milliseconds."""
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1000, p99 * 1000
