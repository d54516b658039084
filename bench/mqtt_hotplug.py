"""MQTT hot-add benchmark: what the controller adds on top of QMP and of the MQTT round trip, in one run.

Phases (all on this machine, mosquitto on a free loopback port with ``set_tcp_nodelay true``):

1. raw QMP hot-add: ``netdev_add`` user + ``device_add`` virtio-net-pci over a bare socket (no library);
2. the MQTT round-trip floor: an echo responder on the same broker, MQTT 5 Response Topic + Correlation Data;
3. qmpnet over MQTT: ``qmpnet.client`` -> broker -> ``qmpnet serve`` -> QEMU and back, one hot-add at a time;
4. throughput: 20 QEMU ``-S`` guests x 10 hot-adds, all guests at once, through qmpnet vs straight over raw QMP.

Phase 3 runs twice: with the controller's state store on disk, then on tmpfs (``/dev/shm``, where fsync costs
nothing), so the durable writes' share is apart. In phases 3 and 4 the controller's CPU time (user + system of
the ``qmpnet serve`` process, all threads, from
``/proc/PID/stat``: the counters ``getrusage`` reports) is read before and after the timed hot-adds; divided by
their number it is the controller's CPU per hot-add. Phase 4 also reads the CPU of every party (QEMU, the
controller, the broker, this process) over each of its two runs, and prints it per hot-add: with both cores busy
the wall time is about the CPU time over the cores, so the 0.7x target allows the run through qmpnet 1/0.7 of the
direct run's CPU, QEMU's own included. Fleet figures (RSS, connect time, 1,000 guests) are
``scale.py``'s.

Run: ``python bench/mqtt_hotplug.py [--samples 100] [--guests 20] [--adds 10]``. Prints medians, p99 and ratios,
and whether each target of issues 11 and 17 is met: MQTT hot-add median <= raw + floor + 1.5 ms; concurrent throughput
>= 0.7x direct QMP; controller CPU per hot-add <= 1 ms. Not a test: nothing fails, it reports. ``--py-spy OUT``
samples the controller during phase 3 (store on disk) with py-spy (``pip install py-spy``) into OUT, as collapsed
stacks (one ``frames count`` line each).

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
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aiomqtt
from baseline import RawQmp, summary
from lab import (
    NODELAY,
    SLOTS_PER_GUEST,
    Lab,
    cpu_seconds,
    failed,
    lab_session,
    run_phase,
    stop_task,
    wait_connected,
)
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from qmpnet.client import Client

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable


# ------------------------------------------------------------------------------------------------------ phases


async def phase_raw(lab: Lab, samples: int) -> list[float]:
    times: list[float] = []
    while len(times) < samples:
        (path,), procs = lab.qemus(1)
        raw = await RawQmp.open(str(path))
        await raw.call("netdev_add", {"type": "user", "id": "warm.net"})
        times += [await raw.add(n) for n in range(min(SLOTS_PER_GUEST, samples - len(times)))]
        await raw.close()
        lab.retire(procs)
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

        sending: set[asyncio.Task[None]] = set()

        async def responder() -> None:
            # Answers the way the controller does: each QoS 1 answer in its own task, waiting for its PUBACK
            # without a timeout (``timeout=math.inf`` is a plain await; a finite one is an ``asyncio.wait_for``,
            # which on Python 3.11 can swallow the cancellation below).
            async for message in echo.messages:
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.CorrelationData = message.properties.CorrelationData  # type: ignore[union-attr]
                topic = message.properties.ResponseTopic  # type: ignore[union-attr]
                send = echo.publish(topic, message.payload, qos=1, properties=props, timeout=math.inf)
                answer = asyncio.create_task(send)
                sending.add(answer)
                answer.add_done_callback(sending.discard)

        task = asyncio.create_task(responder(), name="echo responder")
        times = []
        try:
            for _ in range(samples + 5):
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.ResponseTopic = "bench/echo/answer"
                correlation = uuid.uuid4().bytes
                props.CorrelationData = correlation
                start = time.perf_counter()
                if task.done():
                    raise RuntimeError(f"the echo responder stopped: {task.exception()!r}")
                async with asyncio.timeout(10):
                    await asker.publish("bench/echo/request", b'{"transaction":"x","nic":{}}', qos=1, properties=props)
                    async for message in asker.messages:
                        if getattr(message.properties, "CorrelationData", None) == correlation:
                            break
                times.append(time.perf_counter() - start)
        finally:
            await stop_task(task)
    return times[5:]


async def phase_mqtt(lab: Lab, broker: str, samples: int, *, tmpfs: bool = False, profile: Path | None = None,
                     ) -> tuple[list[float], float]:  # fmt: skip
    """Hot-add latencies over MQTT, one at a time, and the controller's CPU seconds per hot-add meanwhile.

    ``tmpfs``: the controller's state store on ``/dev/shm``, where fsync costs nothing (the disk's share, apart).
    ``profile``: py-spy samples the controller from its first guest's warm-up to its end, into this file (raw
    collapsed stacks), so the profile is of hot-adds, not of the start.
    """
    guests, procs = lab.qemus((samples + SLOTS_PER_GUEST - 1) // SLOTS_PER_GUEST)
    name = "bench1m" if tmpfs else "bench1"
    state = Path(tempfile.mkdtemp(prefix="qmpnet-bench-", dir="/dev/shm")) if tmpfs else None
    serve = lab.serve(broker, name, guests, state_dir=state)
    await wait_connected(broker, name, len(guests))
    times: list[float] = []
    cpu = 0.0
    spy: subprocess.Popen[bytes] | None = None
    async with Client(broker, timeout=30) as client:
        for path in guests:
            await client.add_nic(name, path.stem, {"model": "virtio-net-pci"})  # warm: first add reads the guest
            if profile is not None and spy is None:
                spy = py_spy(serve.pid, profile)
            before = cpu_seconds(serve.pid)
            for _ in range(min(SLOTS_PER_GUEST - 1, samples - len(times))):
                start = time.perf_counter()
                await client.add_nic(name, path.stem, {"model": "virtio-net-pci"})
                times.append(time.perf_counter() - start)
            cpu += cpu_seconds(serve.pid) - before
    lab.retire([serve, *procs])
    if spy is not None:
        await asyncio.to_thread(spy.wait)  # py-spy ends with the process it samples
    if state is not None:
        shutil.rmtree(state, ignore_errors=True)
    return times, cpu / len(times)


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


async def phase_throughput(lab: Lab, broker: str, guests: int, adds: int) -> tuple[Run, Run]:
    """guests x adds hot-adds straight over raw QMP, then through qmpnet: each run's wall time and CPU by party."""
    direct_paths, direct_procs = lab.qemus(guests)
    raws = [await RawQmp.open(str(path)) for path in direct_paths]
    for raw in raws:
        await raw.call("netdev_add", {"type": "user", "id": "warm.net"})

    def direct(raw: RawQmp) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            for n in range(adds):
                await raw.add(n)

        return run

    direct_run = await timed_cpu([direct(raw) for raw in raws], {"qemu": [proc.pid for proc in direct_procs]})
    for raw in raws:
        await raw.close()
    lab.retire(direct_procs)

    paths, procs = lab.qemus(guests)
    serve = lab.serve(broker, "bench2", paths)
    await wait_connected(broker, "bench2", guests)
    assert lab.broker_proc is not None
    parties = {"qemu": [proc.pid for proc in procs], "controller": [serve.pid], "broker": [lab.broker_proc.pid]}
    async with Client(broker, timeout=60) as client:
        for path in paths:  # the first add of each guest reads it; the direct run had its warm-up too
            await client.add_nic("bench2", path.stem, {"model": "virtio-net-pci"})

        def through(name: str) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                for _ in range(adds):
                    await client.add_nic("bench2", name, {"model": "virtio-net-pci"})

            return run

        mqtt_run = await timed_cpu([through(path.stem) for path in paths], parties)
    lab.retire([serve, *procs])
    return direct_run, mqtt_run


def report_throughput(direct: Run, mqtt: Run, guests: int, adds: int) -> None:
    """Both runs of phase 4, the CPU each party used per hot-add, and the 0.7x target against that CPU."""
    total = guests * adds
    ratio = direct.seconds / mqtt.seconds
    cores = os.cpu_count() or 1
    print(f"{guests} guests x {adds} hot-adds at once: direct QMP {direct.seconds:.2f} s "
          f"({total / direct.seconds:.0f}/s), qmpnet over MQTT {mqtt.seconds:.2f} s "
          f"({total / mqtt.seconds:.0f}/s)")  # fmt: skip
    print(f"target throughput >= 0.7x direct: {'met' if ratio >= 0.7 else 'NOT met'} ({ratio:.2f}x)")
    parties = ("qemu", "controller", "broker", "bench")
    print(f"  CPU ms per hot-add {''.join(f'{name:>12}' for name in parties)}{'all':>8}{'all / wall':>12}")
    for label, run in (("direct QMP", direct), ("qmpnet over MQTT", mqtt)):
        cells = "".join(
            f"{run.cpu[name] * 1000 / total:>12.2f}" if name in run.cpu else f"{'-':>12}" for name in parties
        )
        used = sum(run.cpu.values())
        print(f"  {label:<18}{cells}{used * 1000 / total:>8.2f}{used / run.seconds:>12.2f}")
    # With the cores busy, wall time is CPU time over the cores: 0.7x leaves qmpnet's run direct's CPU / 0.7.
    budget = sum(direct.cpu.values()) / 0.7
    print(f"  0.7x on {cores} busy cores allows the qmpnet run {budget * 1000 / total:.2f} ms of CPU per hot-add, "
          f"QEMU's {mqtt.cpu['qemu'] * 1000 / total:.2f} ms included")  # fmt: skip


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
    parser.add_argument("--py-spy", type=Path, default=None, metavar="OUT",
                        help="profile the controller's hot-adds (store on disk) with py-spy into OUT")  # fmt: skip
    parser.add_argument("--phase-timeout", type=float, default=None,
                        help="seconds each phase may take (default: scaled to the phase's size)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # parse the arguments only
    args = parser.parse_args()
    if args.smoke:
        print(f"samples {args.samples}, guests {args.guests}, adds {args.adds}")
        return 0

    def deadline(base: float, per_item: float, items: int) -> float:
        return args.phase_timeout if args.phase_timeout is not None else base + per_item * items

    async with lab_session("qmpnet-mqtt-bench-") as (lab, watchdog):
        try:
            broker = lab.broker()
            raw = await run_phase(lab, watchdog, "raw QMP hot-adds", deadline(60, 0.5, args.samples),
                                  phase_raw(lab, args.samples))  # fmt: skip
            floor = await run_phase(lab, watchdog, "MQTT round-trip floor", deadline(60, 0.5, args.samples),
                                    phase_floor(broker, args.samples))  # fmt: skip
            mqtt, cpu_one = await run_phase(lab, watchdog, "qmpnet hot-adds over MQTT", deadline(90, 0.5, args.samples),
                                            phase_mqtt(lab, broker, args.samples, profile=args.py_spy))  # fmt: skip
            mqtt_mem, cpu_mem = await run_phase(lab, watchdog, "qmpnet hot-adds over MQTT, state store on tmpfs",
                                                deadline(90, 0.5, args.samples),
                                                phase_mqtt(lab, broker, args.samples, tmpfs=True))  # fmt: skip
            what = f"{args.guests} guests x {args.adds} hot-adds, direct and through qmpnet"
            direct_run, mqtt_run = await run_phase(
                lab, watchdog, what, deadline(120, 0.5, args.guests * args.adds),
                phase_throughput(lab, broker, args.guests, args.adds),
            )  # fmt: skip
        except (Exception, asyncio.CancelledError) as err:  # noqa: BLE001 - reported, then the exit status says it
            return failed(err)
    raw_median, floor_median, mqtt_median = summary(raw)[0], summary(floor)[0], summary(mqtt)[0]
    report([("raw QMP hot-add", raw), ("MQTT round trip (echo responder)", floor),
            ("qmpnet hot-add over MQTT (client)", mqtt), ("  the same, state store on tmpfs", mqtt_mem)],
           raw_median)  # fmt: skip
    budget = raw_median + floor_median + 1.5
    verdict = "met" if mqtt_median <= budget else "NOT met"
    own = mqtt_median - raw_median - floor_median
    print(f"target MQTT hot-add median <= raw + floor + 1.5 ms = {budget:.2f} ms: {verdict} ({mqtt_median:.2f} ms, "
          f"qmpnet's own {own:.2f} ms)")  # fmt: skip
    report_throughput(direct_run, mqtt_run, args.guests, args.adds)
    cpu_many = mqtt_run.cpu["controller"] / (args.guests * args.adds)
    print(f"controller CPU per hot-add: {cpu_one * 1000:.2f} ms one at a time ({cpu_mem * 1000:.2f} ms with the "
          f"store on tmpfs), {cpu_many * 1000:.2f} ms at {args.guests} guests at once")  # fmt: skip
    worst = max(cpu_one, cpu_many) * 1000
    print(f"target controller CPU per hot-add <= 1 ms: {'met' if worst <= 1 else 'NOT met'} ({worst:.2f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
