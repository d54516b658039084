"""MQTT hot-add benchmark: what the controller adds on top of QMP and of the MQTT round trip, in one run.

Phases (all on this machine, mosquitto on a free loopback port with ``set_tcp_nodelay true``):

1. raw QMP hot-add: ``netdev_add`` user + ``device_add`` virtio-net-pci over a bare socket (no library);
2. the MQTT round-trip floor: an echo responder on the same broker, MQTT 5 Response Topic + Correlation Data;
3. qmpnet over MQTT: ``qmpnet.client`` -> broker -> ``qmpnet serve`` -> QEMU and back, one hot-add at a time;
4. throughput: 20 QEMU ``-S`` guests x 10 hot-adds, all guests at once, through qmpnet vs straight over raw QMP;
5. the controller's RSS with 200 connected guests (real ``qemu-system-x86_64 -m 64 -S`` processes).

Run: ``python bench/mqtt_hotplug.py [--samples 100] [--guests 20] [--adds 10] [--fleet 200]``. Prints medians,
p99 and ratios, and whether each target is met: MQTT hot-add median <= raw + floor + 1 ms; concurrent throughput
>= 0.9x direct QMP; controller RSS with 200 guests <= 150 MiB. Not a test: nothing fails, it reports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from qmpnet.client import Client

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

QEMU = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
SLOTS_PER_GUEST = 25  # a -S pc guest with -nodefaults has ~30 free slots; stay below


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def summary(values: list[float]) -> tuple[float, float]:
    """Median and p99, in milliseconds."""
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1000, p99 * 1000


class RawQmp:
    """A bare asyncio socket speaking QMP: the baseline."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, path: str) -> RawQmp:
        reader, writer = await asyncio.open_unix_connection(path)
        raw = cls(reader, writer)
        await reader.readline()
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
        start = time.perf_counter()
        await self.call("netdev_add", {"type": "user", "id": f"raw{n}.net"})
        await self.call("device_add", {"driver": "virtio-net-pci", "id": f"raw{n}", "netdev": f"raw{n}.net"})
        return time.perf_counter() - start

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


class Lab:
    """The processes of one run; all stopped on exit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.processes: list[subprocess.Popen[bytes]] = []
        self.counter = 0

    def close(self) -> None:
        for proc in self.processes:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def spawn(self, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=env)  # fmt: skip
        self.processes.append(proc)
        return proc

    def broker(self) -> str:
        port = free_port()
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
                        "persistence false\nuser root\nmax_queued_messages 100000\n")  # fmt: skip
        self.spawn([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)])
        wait_until(lambda: _accepts(("127.0.0.1", port)), "mosquitto")
        return f"mqtt://127.0.0.1:{port}"

    def qemus(self, count: int, directory: Path | None = None) -> list[Path]:
        """Start ``count`` QEMU -S guests; returns their QMP sockets once all accept connections."""
        directory = directory or self.workdir
        paths = []
        for _ in range(count):
            self.counter += 1
            path = directory / f"g{self.counter}.qmp"
            self.spawn([QEMU, "-S", "-nodefaults", "-display", "none", "-machine", "pc", "-m", "64",
                        "-qmp", f"unix:{path},server=on,wait=off"])  # fmt: skip
            paths.append(path)
        for path in paths:
            wait_until(lambda p=path: p.exists() and _accepts(str(p)), f"QEMU {path}", timeout=60)  # type: ignore[misc]
        return paths

    def serve(self, broker: str, controller: str, guests: list[Path] | None = None, guest_dir: Path | None = None
              ) -> subprocess.Popen[bytes]:  # fmt: skip
        argv = [sys.executable, "-m", "qmpnet", "serve", "--broker", broker, "--controller-id", controller,
                "--log-format", "text"]  # fmt: skip
        for path in guests or []:
            argv += ["--guest", f"{path.stem}={path}"]
        if guest_dir is not None:
            argv += ["--guest-dir", str(guest_dir)]
        env = {**os.environ, "QMPNET_LOG__LEVEL": "WARNING"}
        return self.spawn(argv, env=env)


def _accepts(address: str | tuple[str, int]) -> bool:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family) as sock:
        try:
            sock.connect(address)
        except OSError:
            return False
    return True


def wait_until(ready: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready within {timeout} s")
        time.sleep(0.01)


async def wait_connected(broker: str, controller: str, count: int, timeout: float = 120) -> float:
    """Seconds until ``count`` guests of ``controller`` report connected (retained status topics)."""
    host, port = broker.removeprefix("mqtt://").rsplit(":", 1)
    started = time.monotonic()
    connected: set[str] = set()
    async with aiomqtt.Client(host, int(port), socket_options=(NODELAY,)) as mqtt:
        await mqtt.subscribe(f"qmpnet/{controller}/guest/+/status", qos=1)
        async with asyncio.timeout(timeout):
            async for message in mqtt.messages:
                guest = message.topic.value.split("/")[3]
                payload = message.payload if isinstance(message.payload, bytes) else b"{}"
                if json.loads(payload).get("state") == "connected":
                    connected.add(guest)
                else:
                    connected.discard(guest)
                if len(connected) >= count:
                    return time.monotonic() - started
    raise RuntimeError("unreachable")


# ------------------------------------------------------------------------------------------------------ phases


async def phase_raw(lab: Lab, samples: int) -> list[float]:
    times: list[float] = []
    while len(times) < samples:
        (path,) = lab.qemus(1)
        raw = await RawQmp.open(str(path))
        await raw.call("netdev_add", {"type": "user", "id": "warm.net"})
        times += [await raw.add(n) for n in range(min(SLOTS_PER_GUEST, samples - len(times)))]
        await raw.close()
    return times


async def phase_floor(broker: str, samples: int) -> list[float]:
    host, port = broker.removeprefix("mqtt://").rsplit(":", 1)
    version = aiomqtt.ProtocolVersion.V5
    async with (
        aiomqtt.Client(host, int(port), protocol=version, socket_options=(NODELAY,)) as echo,
        aiomqtt.Client(host, int(port), protocol=version, socket_options=(NODELAY,)) as asker,
    ):
        await echo.subscribe("bench/echo/request", qos=1)
        await asker.subscribe("bench/echo/answer", qos=1)

        async def responder() -> None:
            async for message in echo.messages:
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.CorrelationData = message.properties.CorrelationData  # type: ignore[union-attr]
                topic = message.properties.ResponseTopic  # type: ignore[union-attr]
                await echo.publish(topic, message.payload, qos=1, properties=props)

        task = asyncio.create_task(responder())
        times = []
        try:
            for _ in range(samples + 5):
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.ResponseTopic = "bench/echo/answer"
                correlation = uuid.uuid4().bytes
                props.CorrelationData = correlation
                start = time.perf_counter()
                async with asyncio.timeout(10):
                    await asker.publish("bench/echo/request", b'{"transaction":"x","nic":{}}', qos=1, properties=props)
                    async for message in asker.messages:
                        if getattr(message.properties, "CorrelationData", None) == correlation:
                            break
                times.append(time.perf_counter() - start)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return times[5:]


async def phase_mqtt(lab: Lab, broker: str, samples: int) -> list[float]:
    guests = lab.qemus((samples + SLOTS_PER_GUEST - 1) // SLOTS_PER_GUEST)
    lab.serve(broker, "bench1", guests)
    await wait_connected(broker, "bench1", len(guests))
    times: list[float] = []
    async with Client(broker, timeout=30) as client:
        for path in guests:
            await client.add_nic("bench1", path.stem, {"model": "virtio-net-pci"})  # warm: first add reads the guest
            for _ in range(min(SLOTS_PER_GUEST - 1, samples - len(times))):
                start = time.perf_counter()
                await client.add_nic("bench1", path.stem, {"model": "virtio-net-pci"})
                times.append(time.perf_counter() - start)
    return times


async def timed_all(jobs: list[Callable[[], Awaitable[None]]]) -> float:
    start = time.perf_counter()
    await asyncio.gather(*(job() for job in jobs))
    return time.perf_counter() - start


async def phase_throughput(lab: Lab, broker: str, guests: int, adds: int) -> tuple[float, float]:
    """Seconds for guests x adds hot-adds straight over raw QMP, and through qmpnet."""
    direct_paths = lab.qemus(guests)
    raws = [await RawQmp.open(str(path)) for path in direct_paths]
    for raw in raws:
        await raw.call("netdev_add", {"type": "user", "id": "warm.net"})

    def direct(raw: RawQmp) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            for n in range(adds):
                await raw.add(n)

        return run

    direct_s = await timed_all([direct(raw) for raw in raws])
    for raw in raws:
        await raw.close()

    paths = lab.qemus(guests)
    lab.serve(broker, "bench2", paths)
    await wait_connected(broker, "bench2", guests)
    async with Client(broker, timeout=60) as client:
        for path in paths:  # the first add of each guest reads it; the direct run had its warm-up too
            await client.add_nic("bench2", path.stem, {"model": "virtio-net-pci"})

        def through(name: str) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                for _ in range(adds):
                    await client.add_nic("bench2", name, {"model": "virtio-net-pci"})

            return run

        mqtt_s = await timed_all([through(path.stem) for path in paths])
    return direct_s, mqtt_s


async def phase_fleet(lab: Lab, broker: str, count: int) -> tuple[float, float]:
    """The controller's RSS (MiB) with ``count`` connected guests, and the seconds to connect them all."""
    directory = lab.workdir / "fleet"
    directory.mkdir()
    lab.qemus(count, directory)
    serve = lab.serve(broker, "bench3", guest_dir=directory)
    seconds = await wait_connected(broker, "bench3", count, timeout=300)
    await asyncio.sleep(1.0)
    async with Client(broker, timeout=30) as client:
        assert len(await client.guests("bench3")) == count
    return rss_mib(serve.pid), seconds


def rss_mib(pid: int) -> float:
    """The resident set size of process ``pid``."""
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024


def progress(what: str) -> None:
    print(f"... {what}", file=sys.stderr, flush=True)


def report(rows: list[tuple[str, list[float]]], base: float) -> None:
    print(f"{'path':<40}{'n':>5}{'median ms':>11}{'p99 ms':>9}{'x raw':>8}")
    for label, values in rows:
        median, p99 = summary(values)
        print(f"{label:<40}{len(values):>5}{median:>11.2f}{p99:>9.2f}{median / base:>8.2f}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--guests", type=int, default=20)
    parser.add_argument("--adds", type=int, default=10)
    parser.add_argument("--fleet", type=int, default=200, help="guests for the RSS measurement (0 to skip)")
    args = parser.parse_args()
    me = asyncio.current_task()
    if me is not None:  # SIGTERM (e.g. from `timeout`) unwinds through the finally below, so no process is left
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, me.cancel)
    with tempfile.TemporaryDirectory(prefix="qmpnet-mqtt-bench-", dir="/tmp") as tmp:
        lab = Lab(Path(tmp))
        try:
            broker = lab.broker()
            progress("raw QMP hot-adds")
            raw = await phase_raw(lab, args.samples)
            progress("MQTT round-trip floor")
            floor = await phase_floor(broker, args.samples)
            progress("qmpnet hot-adds over MQTT")
            mqtt = await phase_mqtt(lab, broker, args.samples)
            progress(f"{args.guests} guests x {args.adds} hot-adds, direct and through qmpnet")
            direct_s, mqtt_s = await phase_throughput(lab, broker, args.guests, args.adds)
            progress(f"{args.fleet} guests connected to one controller")
            rss = await phase_fleet(lab, broker, args.fleet) if args.fleet else None
        finally:
            lab.close()
    raw_median, floor_median, mqtt_median = summary(raw)[0], summary(floor)[0], summary(mqtt)[0]
    report([("raw QMP hot-add", raw), ("MQTT round trip (echo responder)", floor),
            ("qmpnet hot-add over MQTT (client)", mqtt)], raw_median)  # fmt: skip
    budget = raw_median + floor_median + 1.0
    verdict = "met" if mqtt_median <= budget else "NOT met"
    print(f"target MQTT hot-add median <= raw + floor + 1 ms = {budget:.2f} ms: {verdict} ({mqtt_median:.2f} ms)")
    total = args.guests * args.adds
    direct_rate, mqtt_rate = total / direct_s, total / mqtt_s
    ratio = mqtt_rate / direct_rate
    print(f"{args.guests} guests x {args.adds} hot-adds at once: direct QMP {direct_s:.2f} s ({direct_rate:.0f}/s), "
          f"qmpnet over MQTT {mqtt_s:.2f} s ({mqtt_rate:.0f}/s)")  # fmt: skip
    print(f"target throughput >= 0.9x direct: {'met' if ratio >= 0.9 else 'NOT met'} ({ratio:.2f}x)")
    if rss is not None:
        mib, seconds = rss
        print(f"controller with {args.fleet} connected guests: RSS {mib:.1f} MiB (all connected in {seconds:.1f} s)")
        print(f"target RSS <= 150 MiB: {'met' if mib <= 150 else 'NOT met'}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        asyncio.run(main())
