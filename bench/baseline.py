"""What every benchmark compares against: a bare asyncio socket speaking QMP, and how results are summarised."""

from __future__ import annotations

import asyncio
import json
import statistics
import time


class RawQmp:
    """The baseline: a bare asyncio socket speaking QMP, no library."""

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
        self.writer.write(json.dumps(message).encode() + b"\n")
        while True:
            reply = json.loads(await self.reader.readline())
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeError(reply["error"])
            return reply["return"]

    async def add(self, n: int) -> float:
        """Hot-add ``netdev_add`` user + ``device_add`` virtio-net-pci; return the seconds it took."""
        start = time.perf_counter()
        await self.call("netdev_add", {"type": "user", "id": f"raw{n}.net"})
        await self.call("device_add", {"driver": "virtio-net-pci", "id": f"raw{n}", "netdev": f"raw{n}.net"})
        return time.perf_counter() - start

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def summary(values: list[float]) -> tuple[float, float]:
    """Median and p99, in milliseconds."""
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1000, p99 * 1000
