"""MQTT hot-add benchmark: what the controller adds on top of QMP and of the MQTT round trip, in one run.

Phases (all on this machine, mosquitto on a free loopback port with ``set_tcp_nodelay true``):

1. raw QMP hot-add: ``netdev_add`` user + ``device_add`` virtio-net-pci over a bare socket (no library);
2. the MQTT round-trip floor: an echo responder on the same broker, MQTT 5 Response Topic + Correlation Data;
3. qmpnet over MQTT: ``qmpnet.client`` -> broker -> ``qmpnet serve`` -> QEMU and back, one hot-add at a time, with
   the controller's state store on disk, and with a second controller's on tmpfs (``/dev/shm``: the disk's share
   apart);
4. throughput: 20 QEMU ``-S`` guests x 10 hot-adds, all guests at once, through qmpnet vs straight over raw QMP.

Phases 1-3 take turns: one sample of each path, then the next, the order rotated each time, so that every path
sees the same spells of this machine's speed (it drifts by a fifth or more within a minute; run one after another,
a phase that fell in a slow spell made its path look worse). Phase 4 runs ``--rounds`` pairs (direct, then
through qmpnet, or the other way round, alternating; fresh guests for each run) and its verdict is the median of
the pairs' ratios. The controllers' CPU time (user + system, all threads, each thread's
``/proc/PID/task/TID/schedstat``) is read over ``--cpu-adds`` more hot-adds of phase 3, back to back (the CPU per
hot-add one at a time, as earlier sessions measured it; what the controller does after them, the write-behind and
the desired set's write, belongs to them), over phase 3's turns (printed too: a controller that waited while the
other paths ran finds its caches cold, and the same instructions take about half as much CPU time again), and
over each run of phase 4. Phase 4 also reads the CPU of every party (QEMU, the controller, the broker, this
process) and prints it per hot-add over all rounds: with both cores busy the wall time is about the CPU time over
the cores, so the 0.7x target allows the run through qmpnet 1/0.7 of the direct run's CPU, QEMU's own included.
Then ``--split-rounds`` more pairs (default 3; informational) with every QEMU on CPU 0 and the controller, the
broker and this process on CPU 1, direct and through qmpnet alike: a host where the controller does not take its
CPU from QEMU's. On the two shared cores every millisecond any party spends is one QEMU cannot; split, the ratio
says how busy qmpnet keeps QEMU against a raw client, its turn-around apart from its CPU.
Fleet figures (RSS, connect time, 1,000 guests) are ``scale.py``'s.

Run: ``python bench/mqtt_hotplug.py [--samples 100] [--guests 20] [--adds 10] [--rounds 3] [--split-rounds 3]
[--cpu-adds 48]``.
Prints medians, p99 and ratios, and whether each target of issues 11 and 17 is met: MQTT hot-add median <= raw +
floor + 1.5 ms; concurrent throughput >= 0.7x direct QMP; controller CPU per hot-add <= 1 ms (and, informational,
that 1 ms scaled to the run's machine: 0.5x raw QMP's hot-add, as when issue 17 set it). Not a test: nothing
fails, it reports. ``--py-spy OUT`` samples the disk controller during phase 3 with py-spy (``pip install
py-spy``) into OUT, as collapsed stacks (one ``frames count`` line each).

Never hangs: every phase has a deadline (``--phase-timeout``); past it the phase is cancelled and the run ends with
an error naming the phase. A watchdog thread backs the deadlines up (asyncio cancellation can be lost, see
:func:`lab.stop_task`): if the event loop does not unwind within a grace period it stops every process and exits
with status 3. The broker and controllers log to files in the run's directory, and a broker or controller that
exits (or a port held by someone else's broker) is reported with its log instead of surfacing as a hang or as
"Connection refused" later. Every process started is stopped on every way out (SIGTERM and Ctrl-C included).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import aiomqtt
from baseline import RawQmp, summary
from lab import (
    NODELAY,
    SLOTS_PER_GUEST,
    WRITE_BEHIND_WAIT,
    Lab,
    cpu_seconds,
    failed,
    lab_session,
    pin,
    run_phase,
    stop_task,
    wait_connected,
)
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from qmpnet.client import Client

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator


# ------------------------------------------------------------------------------------------------------ phases


class Sampled(Protocol):
    """One of phases 1-3's paths: ``sample`` times one hot-add (or round trip) through it."""

    async def sample(self) -> float: ...


class RawPath:
    """Phase 1's path: raw QMP hot-adds, a fresh QEMU each ``SLOTS_PER_GUEST`` of them."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.raw: RawQmp | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.used = SLOTS_PER_GUEST

    async def sample(self) -> float:
        if self.used == SLOTS_PER_GUEST:  # untimed: a new QEMU and its warm-up
            await self.close()
            (path,), self.procs = self.lab.qemus(1)
            self.raw = await RawQmp.open(str(path))
            await self.raw.call("netdev_add", {"type": "user", "id": "warm.net"})
            self.used = 0
        assert self.raw is not None
        self.used += 1
        return await self.raw.add(self.used - 1)

    async def close(self) -> None:
        if self.raw is not None:
            await self.raw.close()
            self.raw = None
        self.lab.retire(self.procs)
        self.procs = []


class FloorPath:
    """Phase 2's path: the MQTT round trip to an echo responder on the same broker, answering as the controller does."""

    def __init__(self, echo: aiomqtt.Client, asker: aiomqtt.Client) -> None:
        self.echo, self.asker = echo, asker
        self.sending: set[asyncio.Task[None]] = set()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.echo.subscribe("bench/echo/request", qos=1)
        await self.asker.subscribe("bench/echo/answer", qos=1)
        self.task = asyncio.create_task(self.responder(), name="echo responder")
        for _ in range(5):  # warm-up
            await self.sample()

    async def responder(self) -> None:
        # Answers the way the controller does: each QoS 1 answer in its own task, waiting for its PUBACK
        # without a timeout (``timeout=math.inf`` is a plain await; a finite one is an ``asyncio.wait_for``,
        # which on Python 3.11 can swallow the cancellation below).
        async for message in self.echo.messages:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.CorrelationData = message.properties.CorrelationData  # type: ignore[union-attr]
            topic = message.properties.ResponseTopic  # type: ignore[union-attr]
            send = self.echo.publish(topic, message.payload, qos=1, properties=props, timeout=math.inf)
            answer = asyncio.create_task(send)
            self.sending.add(answer)
            answer.add_done_callback(self.sending.discard)

    async def sample(self) -> float:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = "bench/echo/answer"
        correlation = uuid.uuid4().bytes
        props.CorrelationData = correlation
        if self.task is None or self.task.done():
            raise RuntimeError(f"the echo responder stopped: {self.task and self.task.exception()!r}")
        start = time.perf_counter()
        async with asyncio.timeout(10):
            await self.asker.publish("bench/echo/request", b'{"transaction":"x","nic":{}}', qos=1, properties=props)
            async for message in self.asker.messages:
                if getattr(message.properties, "CorrelationData", None) == correlation:
                    break
        return time.perf_counter() - start

    async def close(self) -> None:
        if self.task is not None:
            await stop_task(self.task)


class ServePath:
    """Phase 3's path: hot-adds through ``qmpnet serve`` (its store on disk, or on tmpfs), one at a time.

    Its guests are started up front, for ``adds`` hot-adds: ``SLOTS_PER_GUEST - 1`` each after a first one, made
    by :meth:`start` before any CPU is read (a guest's first hot-add reads the guest: tens of times the work of the
    others). ``cpu`` is the controller's CPU since ``start`` (what it does between the samples, its write-behinds
    and the desired set's writes, belongs to them; idle, it uses none).
    """

    def __init__(self, lab: Lab, broker: str, adds: int, *, tmpfs: bool) -> None:
        self.lab, self.broker = lab, broker
        self.guests, self.procs = lab.qemus((adds + SLOTS_PER_GUEST - 2) // (SLOTS_PER_GUEST - 1))
        self.name = "bench1m" if tmpfs else "bench1"
        self.state = Path(tempfile.mkdtemp(prefix="qmpnet-bench-", dir="/dev/shm")) if tmpfs else None
        try:
            self.serve = lab.serve(broker, self.name, self.guests, state_dir=self.state)
        except BaseException:
            self._release([])
            raise
        self.added = 0
        self.cpu_start = 0.0
        self.client: Client | None = None

    async def start(self, client: Client) -> None:
        """Wait for the controller to serve every guest, make each guest's first hot-add, then start the CPU count."""
        self.client = client
        await wait_connected(self.broker, self.name, len(self.guests))
        for path in self.guests:
            await client.add_nic(self.name, path.stem, {"model": "virtio-net-pci"})
        self.cpu_start = cpu_seconds(self.serve.pid)

    async def sample(self) -> float:
        assert self.client is not None
        guest = self.guests[self.added // (SLOTS_PER_GUEST - 1)].stem
        self.added += 1
        start = time.perf_counter()
        await self.client.add_nic(self.name, guest, {"model": "virtio-net-pci"})
        return time.perf_counter() - start

    def cpu(self) -> float:
        return cpu_seconds(self.serve.pid) - self.cpu_start

    async def back_to_back(self, adds: int) -> float:
        """The controller's CPU seconds per hot-add over ``adds`` hot-adds one after another, nothing in between."""
        before = cpu_seconds(self.serve.pid)
        for _ in range(adds):
            await self.sample()
        await asyncio.sleep(WRITE_BEHIND_WAIT)  # the last add's write-behind belongs to it too
        return (cpu_seconds(self.serve.pid) - before) / adds

    def close(self) -> None:
        self._release([self.serve])

    def _release(self, serve: list[subprocess.Popen[bytes]]) -> None:
        self.lab.retire([*serve, *self.procs])
        if self.state is not None:
            shutil.rmtree(self.state, ignore_errors=True)


@dataclass
class Latencies:
    """Phases 1-3: each path's samples, and each controller's CPU seconds per hot-add."""

    raw: list[float]
    floor: list[float]
    mqtt: list[float]
    mqtt_tmpfs: list[float]
    cpu_turns: float
    cpu_tmpfs_turns: float
    cpu_one: float
    cpu_tmpfs: float


async def phase_latency(lab: Lab, broker: str, samples: int, cpu_adds: int, profile: Path | None = None,
                        ) -> Latencies:  # fmt: skip
    """Phases 1-3 interleaved: one sample of each path in turn, the order rotated every round.

    Run one after another, the paths met different machines: this one's speed drifts by a fifth or more within a
    minute, and whichever phase ran in a slow spell looked worse (the targets compare the paths with each other).
    Taking turns, every path sees the same spells; rotating the order, none always comes right after another.
    Then each controller's CPU per hot-add is read over ``cpu_adds`` more, back to back, as every earlier session
    measured it: taking turns, a controller finds its caches cold at each sample (the other paths ran meanwhile),
    and the same instructions take about half as much CPU time again (both figures are printed).
    ``profile``: py-spy samples the disk controller over the phase (raw collapsed stacks).
    """
    host, port = broker.removeprefix("mqtt://").rsplit(":", 1)
    version = aiomqtt.ProtocolVersion.V5
    raw = RawPath(lab)
    servers: list[ServePath] = []
    spy: subprocess.Popen[bytes] | None = None
    try:
        disk = ServePath(lab, broker, samples + cpu_adds, tmpfs=False)
        servers.append(disk)
        tmpfs = ServePath(lab, broker, samples + cpu_adds, tmpfs=True)
        servers.append(tmpfs)
        async with (
            aiomqtt.Client(host, int(port), protocol=version, socket_options=(NODELAY,)) as echo,
            aiomqtt.Client(host, int(port), protocol=version, socket_options=(NODELAY,)) as asker,
            Client(broker, timeout=30) as client,
        ):
            floor = FloorPath(echo, asker)
            try:
                await floor.start()
                await disk.start(client)
                await tmpfs.start(client)
                if profile is not None:
                    spy = py_spy(disk.serve.pid, profile)
                paths: list[Sampled] = [raw, floor, disk, tmpfs]
                times: list[list[float]] = [[] for _ in paths]
                for n in range(samples):
                    for k in range(len(paths)):
                        turn = (n + k) % len(paths)
                        times[turn].append(await paths[turn].sample())
                cpu_turns, cpu_tmpfs_turns = disk.cpu() / samples, tmpfs.cpu() / samples
                cpu_one, cpu_tmpfs = await disk.back_to_back(cpu_adds), await tmpfs.back_to_back(cpu_adds)
            finally:
                await floor.close()
    finally:
        await raw.close()
        for server in servers:
            server.close()
    if spy is not None:
        await asyncio.to_thread(spy.wait)  # py-spy ends with the process it samples
    return Latencies(times[0], times[1], times[2], times[3], cpu_turns=cpu_turns, cpu_tmpfs_turns=cpu_tmpfs_turns,
                     cpu_one=cpu_one, cpu_tmpfs=cpu_tmpfs)  # fmt: skip


def py_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """Start py-spy (beside this Python, else on PATH) sampling ``pid`` into ``out`` until that process ends."""
    beside = Path(sys.executable).with_name("py-spy")
    exe = str(beside) if beside.exists() else shutil.which("py-spy")
    if exe is None:
        raise RuntimeError("--py-spy needs py-spy (pip install py-spy)")
    argv = [exe, "record", "--pid", str(pid), "--rate", "200", "--nonblocking", "--format", "raw", "--output", str(out)]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def timed_all(jobs: list[Callable[[], Awaitable[None]]]) -> float:
    start = time.perf_counter()
    await asyncio.gather(*(job() for job in jobs))
    return time.perf_counter() - start


@dataclass
class Run:
    """One run of phase 4: its wall time, and the CPU seconds each party used meanwhile."""

    seconds: float
    cpu: dict[str, float]


def cpu_of(parties: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds used so far by each party's processes (``bench``: this process, all its threads)."""
    used = {name: sum(cpu_seconds(pid) for pid in pids) for name, pids in parties.items()}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return used | {"bench": usage.ru_utime + usage.ru_stime}


async def timed_cpu(jobs: list[Callable[[], Awaitable[None]]], parties: dict[str, list[int]]) -> Run:
    """Run ``jobs`` at once; the wall time and each party's CPU seconds over it."""
    before = cpu_of(parties)
    seconds = await timed_all(jobs)
    after = cpu_of(parties)
    return Run(seconds, {name: after[name] - before[name] for name in after})


#: The controller CPU target (1 ms) over raw QMP's hot-add median (2.00 ms) in the run that set it (issue 17).
CPU_PER_RAW = 0.5

#: Phase 4's split rounds: QEMU on CPU 0, every other party (the controller, the broker, this process) on CPU 1.
QEMU_CPUS, REST_CPUS = {0}, {1}


async def run_direct(lab: Lab, guests: int, adds: int, *, split: bool = False) -> Run:
    """``guests`` fresh QEMUs, ``adds`` hot-adds each over raw QMP, all guests at once (``split``: QEMU on CPU 0)."""
    paths, procs = lab.qemus(guests)
    if split:
        pin([proc.pid for proc in procs], QEMU_CPUS)
    raws = [await RawQmp.open(str(path)) for path in paths]
    for raw in raws:
        await raw.call("netdev_add", {"type": "user", "id": "warm.net"})

    def direct(raw: RawQmp) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            for n in range(adds):
                await raw.add(n)

        return run

    run = await timed_cpu([direct(raw) for raw in raws], {"qemu": [proc.pid for proc in procs]})
    for raw in raws:
        await raw.close()
    lab.retire(procs)
    return run


async def run_through(  # noqa: PLR0913 - a run's size and place, keyword-only the placement
    lab: Lab, broker: str, guests: int, adds: int, name: str, *, split: bool = False
) -> Run:
    """``guests`` fresh QEMUs served by a new ``qmpnet serve``, ``adds`` hot-adds each over MQTT, all at once.

    ``split``: QEMU on CPU 0, the controller on CPU 1 (the broker and this process are the caller's to place).
    """
    paths, procs = lab.qemus(guests)
    serve = lab.serve(broker, name, paths)
    if split:
        pin([proc.pid for proc in procs], QEMU_CPUS)
        pin([serve.pid], REST_CPUS)
    await wait_connected(broker, name, guests)
    assert lab.broker_proc is not None
    parties = {"qemu": [proc.pid for proc in procs], "controller": [serve.pid], "broker": [lab.broker_proc.pid]}
    async with Client(broker, timeout=60) as client:
        for path in paths:  # the first add of each guest reads it; the direct run had its warm-up too
            await client.add_nic(name, path.stem, {"model": "virtio-net-pci"})

        def through(guest: str) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                for _ in range(adds):
                    await client.add_nic(name, guest, {"model": "virtio-net-pci"})

            return run

        run = await timed_cpu([through(path.stem) for path in paths], parties)
    lab.retire([serve, *procs])
    return run


@dataclass
class Throughput:
    """Phase 4: each round's run straight over raw QMP and through qmpnet."""

    direct: list[Run]
    mqtt: list[Run]

    def ratios(self) -> list[float]:
        return [d.seconds / m.seconds for d, m in zip(self.direct, self.mqtt, strict=True)]


async def phase_throughput(  # noqa: PLR0913 - a phase's size and place, keyword-only the placement
    lab: Lab, broker: str, guests: int, adds: int, rounds: int, *, split: bool = False
) -> Throughput:
    """``rounds`` pairs of runs, direct and through qmpnet, which goes first alternating (fresh guests each run).

    A pair's ratio compares runs seconds apart; the median of the pairs' ratios is the verdict. One pair alone
    moved from 0.41x to 0.62x between runs minutes apart on this machine, the direct run's own time by 2x.
    ``split``: QEMU on CPU 0 and everything else on CPU 1, in both runs of each pair (see :func:`split_cpus`).
    """
    result = Throughput([], [])
    for n in range(rounds):
        if n % 2 == 0:
            result.direct.append(await run_direct(lab, guests, adds, split=split))
        name = f"bench2{'s' if split else 'r'}{n}"
        result.mqtt.append(await run_through(lab, broker, guests, adds, name, split=split))
        if n % 2 == 1:
            result.direct.append(await run_direct(lab, guests, adds, split=split))
    return result


@contextlib.contextmanager
def split_cpus(lab: Lab) -> Iterator[None]:
    """The broker and this process on CPU 1 (QEMU goes to CPU 0) while inside; back on every CPU they had after.

    Phase 4 as a host where the controller has a core of its own would run it: on the two shared cores every
    CPU millisecond the controller, the broker and the client spend is one QEMU cannot, so the ratio measures the
    parties' CPU as much as qmpnet's turn-around. Split, the direct client and qmpnet each drive QEMUs that have
    one core to themselves, and the ratio says how well each keeps them busy.
    """
    assert lab.broker_proc is not None
    mine, broker = os.sched_getaffinity(0), os.sched_getaffinity(lab.broker_proc.pid)
    pin([os.getpid(), lab.broker_proc.pid], REST_CPUS)
    try:
        yield
    finally:
        pin([os.getpid()], mine)
        with contextlib.suppress(ProcessLookupError):
            pin([lab.broker_proc.pid], broker)


def report_throughput(runs: Throughput, guests: int, adds: int, *, split: bool = False) -> None:
    """Phase 4's rounds, the CPU each party used per hot-add over all of them, and the 0.7x target against it.

    ``split``: the split rounds, informational (the target is judged on the shared cores).
    """
    total = guests * adds
    ratios = runs.ratios()
    ratio = statistics.median(ratios)
    cores = os.cpu_count() or 1
    where = ", QEMU on CPU 0 and the rest on CPU 1" if split else ""
    for n, (direct, mqtt) in enumerate(zip(runs.direct, runs.mqtt, strict=True)):
        print(f"{guests} guests x {adds} hot-adds at once{where}, round {n + 1}: direct QMP {direct.seconds:.2f} s "
              f"({total / direct.seconds:.0f}/s), qmpnet over MQTT {mqtt.seconds:.2f} s "
              f"({total / mqtt.seconds:.0f}/s): {ratios[n]:.2f}x")  # fmt: skip
    if split:
        print(f"informational, QEMU with a core of its own: qmpnet keeps it {ratio:.2f}x as busy as a raw client "
              f"(the median of {len(ratios)} rounds)")  # fmt: skip
    else:
        print(f"target throughput >= 0.7x direct: {'met' if ratio >= 0.7 else 'NOT met'} "
              f"({ratio:.2f}x, the median of {len(ratios)} rounds)")  # fmt: skip
    parties = ("qemu", "controller", "broker", "bench")
    print(f"  CPU ms per hot-add {''.join(f'{name:>12}' for name in parties)}{'all':>8}{'all / wall':>12}")
    for label, series in (("direct QMP", runs.direct), ("qmpnet over MQTT", runs.mqtt)):
        cpu = {name: sum(run.cpu[name] for run in series) for name in series[0].cpu}
        seconds = sum(run.seconds for run in series)
        count = total * len(series)
        cells = "".join(f"{cpu[name] * 1000 / count:>12.2f}" if name in cpu else f"{'-':>12}" for name in parties)
        used = sum(cpu.values())
        print(f"  {label:<18}{cells}{used * 1000 / count:>8.2f}{used / seconds:>12.2f}")
    if not split:
        # With the cores busy, wall time is CPU time over the cores: 0.7x leaves qmpnet's run direct's CPU / 0.7.
        budget = sum(sum(run.cpu.values()) for run in runs.direct) / 0.7 / len(runs.direct)
        qemu = sum(run.cpu["qemu"] for run in runs.mqtt) / len(runs.mqtt)
        print(f"  0.7x on {cores} busy cores allows the qmpnet run {budget * 1000 / total:.2f} ms of CPU per hot-add, "
              f"QEMU's {qemu * 1000 / total:.2f} ms included")  # fmt: skip


def report(rows: list[tuple[str, list[float]]], base: float) -> None:
    print(f"{'path':<40}{'n':>5}{'median ms':>11}{'p99 ms':>9}{'x raw':>8}")
    for label, values in rows:
        median, p99 = summary(values)
        print(f"{label:<40}{len(values):>5}{median:>11.2f}{p99:>9.2f}{median / base:>8.2f}")


async def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--guests", type=int, default=20)
    parser.add_argument("--adds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="phase 4's pairs of runs (default 3)")
    parser.add_argument("--split-rounds", type=int, default=3,
                        help="phase 4's pairs with QEMU on CPU 0 and the rest on CPU 1, informational (default 3)")
    parser.add_argument("--cpu-adds", type=int, default=48,
                        help="hot-adds back to back per controller of phase 3 for its CPU (default 48)")  # fmt: skip
    parser.add_argument("--py-spy", type=Path, default=None, metavar="OUT",
                        help="profile the controller's hot-adds (store on disk) with py-spy into OUT")  # fmt: skip
    parser.add_argument("--phase-timeout", type=float, default=None,
                        help="seconds each phase may take (default: scaled to the phase's size)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # parse the arguments only
    args = parser.parse_args()
    if args.smoke:
        print(f"samples {args.samples}, guests {args.guests}, adds {args.adds}, rounds {args.rounds}")
        return 0

    def deadline(base: float, per_item: float, items: int) -> float:
        return args.phase_timeout if args.phase_timeout is not None else base + per_item * items

    async with lab_session("qmpnet-mqtt-bench-") as (lab, watchdog):
        try:
            broker = lab.broker()
            what = "raw QMP, the MQTT floor and qmpnet over MQTT (store on disk, on tmpfs), taking turns"
            latency = phase_latency(lab, broker, args.samples, args.cpu_adds, profile=args.py_spy)
            lat = await run_phase(lab, watchdog, what, deadline(120, 2.0, args.samples + args.cpu_adds), latency)
            what = f"{args.rounds} rounds of {args.guests} guests x {args.adds} hot-adds, direct and through qmpnet"
            runs = await run_phase(
                lab, watchdog, what, deadline(120, 1.0, args.rounds * args.guests * args.adds),
                phase_throughput(lab, broker, args.guests, args.adds, args.rounds),
            )  # fmt: skip
            split = None
            if args.split_rounds > 0 and os.sched_getaffinity(0) >= QEMU_CPUS | REST_CPUS:
                what = f"{args.split_rounds} rounds of phase 4 with QEMU on CPU 0 and the rest on CPU 1"
                with split_cpus(lab):
                    split = await run_phase(
                        lab, watchdog, what, deadline(120, 1.0, args.split_rounds * args.guests * args.adds),
                        phase_throughput(lab, broker, args.guests, args.adds, args.split_rounds, split=True),
                    )  # fmt: skip
        except (Exception, asyncio.CancelledError) as err:  # noqa: BLE001 - reported, then the exit status says it
            return failed(err)
    raw_median, floor_median, mqtt_median = summary(lat.raw)[0], summary(lat.floor)[0], summary(lat.mqtt)[0]
    report([("raw QMP hot-add", lat.raw), ("MQTT round trip (echo responder)", lat.floor),
            ("qmpnet hot-add over MQTT (client)", lat.mqtt), ("  the same, state store on tmpfs", lat.mqtt_tmpfs)],
           raw_median)  # fmt: skip
    budget = raw_median + floor_median + 1.5
    verdict = "met" if mqtt_median <= budget else "NOT met"
    own = mqtt_median - raw_median - floor_median
    print(f"target MQTT hot-add median <= raw + floor + 1.5 ms = {budget:.2f} ms: {verdict} ({mqtt_median:.2f} ms, "
          f"qmpnet's own {own:.2f} ms)")  # fmt: skip
    report_throughput(runs, args.guests, args.adds)
    if split is not None:
        report_throughput(split, args.guests, args.adds, split=True)
    cpu_one, cpu_mem = lat.cpu_one, lat.cpu_tmpfs
    cpu_many = sum(run.cpu["controller"] for run in runs.mqtt) / (args.guests * args.adds * len(runs.mqtt))
    print(f"controller CPU per hot-add: {cpu_one * 1000:.2f} ms one at a time, back to back ({cpu_mem * 1000:.2f} ms "
          f"with the store on tmpfs), {cpu_many * 1000:.2f} ms at {args.guests} guests at once; taking turns with "
          f"the other paths (cold caches) {lat.cpu_turns * 1000:.2f} ms "
          f"({lat.cpu_tmpfs_turns * 1000:.2f} ms)")  # fmt: skip
    worst = max(cpu_one, cpu_many) * 1000
    print(f"target controller CPU per hot-add <= 1 ms: {'met' if worst <= 1 else 'NOT met'} ({worst:.2f} ms)")
    # Issue 17 set 1 ms in a run where raw QMP took 2.00 ms; the machine's speed moves both by 2-3x between days.
    scaled = raw_median * CPU_PER_RAW
    print(f"informational, the same target scaled to this run's raw QMP hot-add ({CPU_PER_RAW}x {raw_median:.2f} ms "
          f"= {scaled:.2f} ms): {'met' if worst <= scaled else 'NOT met'} ({worst:.2f} ms)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
