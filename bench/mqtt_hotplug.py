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

Never hangs: every phase has a deadline (``--phase-timeout``); past it the phase is cancelled and the run ends with
an error naming the phase. A watchdog thread backs the deadlines up (asyncio cancellation can be lost, see
:func:`stop_task`): if the event loop does not unwind within a grace period it stops every process and exits with
status 3. The broker and controllers log to files in the run's directory, and a broker or controller that exits
(or a port held by someone else's broker) is reported with its log instead of surfacing as a hang or as
"Connection refused" later. Every process started is stopped on every way out (SIGTERM and Ctrl-C included).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiomqtt
from baseline import RawQmp, summary
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from qmpnet.client import Client

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine

QEMU = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
SLOTS_PER_GUEST = 25  # a -S pc guest with -nodefaults has ~30 free slots; stay below
WATCHDOG_GRACE = 20.0  # seconds past a phase deadline before the watchdog thread gives up on the event loop
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Lab:
    """The processes of one run; all stopped on exit (also from the watchdog thread)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.processes: list[subprocess.Popen[bytes]] = []
        self.watched: dict[int, tuple[str, Path]] = {}  # pid -> (what, log): must stay up while the run lasts
        self.counter = 0
        self._lock = threading.Lock()

    def close(self, grace: float = 10) -> None:
        """Stop every process: SIGTERM, then SIGKILL for those still running after ``grace`` seconds in all."""
        with self._lock:
            processes, self.processes = self.processes, []
            self.watched.clear()
        self.stop(processes, grace)

    @staticmethod
    def stop(processes: list[subprocess.Popen[bytes]], grace: float = 10) -> None:
        for proc in processes:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in processes:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()

    def retire(self, processes: list[subprocess.Popen[bytes]]) -> None:
        """Stop processes a finished phase no longer needs (so they cost the next phases nothing)."""
        with self._lock:
            for proc in processes:
                self.watched.pop(proc.pid, None)
            self.processes = [proc for proc in self.processes if proc not in processes]
        self.stop(processes)

    def spawn(self, argv: list[str], env: dict[str, str] | None = None, log: Path | None = None
              ) -> subprocess.Popen[bytes]:  # fmt: skip
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(log.open("wb")) if log is not None else subprocess.DEVNULL
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                                    start_new_session=True)  # fmt: skip  # Ctrl-C reaches only the bench
        with self._lock:
            self.processes.append(proc)
        return proc

    def watch(self, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
        self.watched[proc.pid] = (what, log)

    def check(self) -> None:
        """Raise if a process the run depends on (broker, controllers) has exited."""
        for proc in list(self.processes):
            if proc.pid in self.watched and proc.poll() is not None:
                what, log = self.watched[proc.pid]
                raise RuntimeError(f"{what} (pid {proc.pid}) exited with status {proc.returncode}; "
                                   f"its log {log}:\n{_tail(log)}")  # fmt: skip

    def broker(self) -> str:
        conf = self.workdir / "mosquitto.conf"
        log = self.workdir / "mosquitto.log"
        for _attempt in range(5):  # the free port may be taken between free_port() and mosquitto's bind
            port = free_port()
            conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
                            "persistence false\nuser root\nmax_queued_messages 100000\n")  # fmt: skip
            proc = self.spawn([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)], log=log)
            wait_until(lambda p=proc, n=port: p.poll() is not None or _listens(p.pid, n), "mosquitto")  # type: ignore[misc]
            if proc.poll() is None:
                self.watch(proc, "mosquitto", log)
                return f"mqtt://127.0.0.1:{port}"
            progress(f"mosquitto could not listen on port {port} ({_tail(log, 3)}); trying another port")
        raise RuntimeError(f"mosquitto did not start; its log {log}:\n{_tail(log)}")

    def qemus(self, count: int, directory: Path | None = None) -> tuple[list[Path], list[subprocess.Popen[bytes]]]:
        """Start ``count`` QEMU -S guests; returns their QMP sockets once all accept connections, and the processes."""
        directory = directory or self.workdir
        paths, procs = [], []
        for _ in range(count):
            self.counter += 1
            path = directory / f"g{self.counter}.qmp"
            procs.append(self.spawn([QEMU, "-S", "-nodefaults", "-display", "none", "-machine", "pc", "-m", "64",
                                     "-qmp", f"unix:{path},server=on,wait=off"]))  # fmt: skip
            paths.append(path)
        for path, proc in zip(paths, procs, strict=True):
            wait_until(lambda p=path, q=proc: _qemu_ready(p, q), f"QEMU {path}", timeout=60)  # type: ignore[misc]
        return paths, procs

    def serve(self, broker: str, controller: str, guests: list[Path] | None = None, guest_dir: Path | None = None
              ) -> subprocess.Popen[bytes]:  # fmt: skip
        argv = [sys.executable, "-m", "qmpnet", "serve", "--broker", broker, "--controller-id", controller,
                "--log-format", "text"]  # fmt: skip
        for path in guests or []:
            argv += ["--guest", f"{path.stem}={path}"]
        if guest_dir is not None:
            argv += ["--guest-dir", str(guest_dir)]
        env = {**os.environ, "QMPNET_LOG__LEVEL": "WARNING"}
        log = self.workdir / f"serve-{controller}.log"
        proc = self.spawn(argv, env=env, log=log)
        self.watch(proc, f"qmpnet serve {controller}", log)
        return proc


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) or "(empty)"
    except OSError:
        return "(no log)"


def _qemu_ready(path: Path, proc: subprocess.Popen[bytes]) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"QEMU for {path} exited with status {proc.returncode}")
    return path.exists() and _accepts(str(path))


def _listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` has a socket listening on 127.0.0.1:``port`` (not merely: something does)."""
    wanted = f"0100007F:{port:04X}"
    inodes = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1] == wanted and fields[3] == "0A":  # local address, state LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return False
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if str(fd.readlink()) in inodes:
                    return True
    return False


def _accepts(address: str | tuple[str, int]) -> bool:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family) as sock:
        try:
            sock.connect(address)
        except OSError:
            return False
    return True


class Watchdog:
    """A thread that ends the run if the event loop overruns a phase's deadline by more than a grace period.

    The phases' own deadlines are timers on the event loop; this one works even if the loop is blocked or a
    cancellation got lost: it stops every process of the lab and exits with status 3.
    """

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._what = ""
        threading.Thread(target=self._run, name="bench-watchdog", daemon=True).start()

    def arm(self, what: str, seconds: float) -> None:
        with self._cond:
            self._what, self._deadline = what, time.monotonic() + seconds
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._deadline = None
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while True:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                break
        print(f"error: watchdog: {self._what!r} is stuck past its deadline; stopping every process", file=sys.stderr,
              flush=True)  # fmt: skip
        self.lab.close(grace=5)
        shutil.rmtree(self.lab.workdir, ignore_errors=True)
        os._exit(3)


async def stop_task(task: asyncio.Task[Any], timeout: float = 10) -> None:
    """Cancel ``task`` and wait (at most ``timeout`` s) until it has ended, cancelling it again as long as it runs.

    One ``cancel()`` is not always enough: on Python 3.11 ``asyncio.wait_for`` (which aiomqtt uses for every
    acknowledged operation) swallows a cancellation that arrives when the awaited operation has just completed,
    and the task then carries on, e.g. into its next ``async for``, where it waits forever.
    """
    deadline = time.monotonic() + timeout
    while not task.done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"task {task.get_name()} did not stop within {timeout:g} s of being cancelled")
        task.cancel()
        await asyncio.wait({task}, timeout=0.2)
    if not task.cancelled() and task.exception() is not None:
        progress(f"task {task.get_name()} ended with {task.exception()!r}")


async def run_phase(lab: Lab, watchdog: Watchdog, what: str, deadline: float, work: Coroutine[Any, Any, T]) -> T:
    """Run one phase within ``deadline`` seconds, checking all the while that the broker and controllers run."""
    progress(what)
    lab.check()
    watchdog.arm(what, deadline + WATCHDOG_GRACE)
    task = asyncio.create_task(work, name=what)
    end = time.monotonic() + deadline
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=max(0.0, min(0.25, end - time.monotonic())))
            if task.done():
                break
            lab.check()
            if time.monotonic() >= end:
                raise TimeoutError(f"phase {what!r} did not finish within its deadline of {deadline:g} s")
        return task.result()
    finally:
        if not task.done():
            await stop_task(task)
        watchdog.disarm()


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
                task = asyncio.create_task(send)
                sending.add(task)
                task.add_done_callback(sending.discard)

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


async def phase_mqtt(lab: Lab, broker: str, samples: int) -> list[float]:
    guests, procs = lab.qemus((samples + SLOTS_PER_GUEST - 1) // SLOTS_PER_GUEST)
    serve = lab.serve(broker, "bench1", guests)
    await wait_connected(broker, "bench1", len(guests))
    times: list[float] = []
    async with Client(broker, timeout=30) as client:
        for path in guests:
            await client.add_nic("bench1", path.stem, {"model": "virtio-net-pci"})  # warm: first add reads the guest
            for _ in range(min(SLOTS_PER_GUEST - 1, samples - len(times))):
                start = time.perf_counter()
                await client.add_nic("bench1", path.stem, {"model": "virtio-net-pci"})
                times.append(time.perf_counter() - start)
    lab.retire([serve, *procs])
    return times


async def timed_all(jobs: list[Callable[[], Awaitable[None]]]) -> float:
    start = time.perf_counter()
    await asyncio.gather(*(job() for job in jobs))
    return time.perf_counter() - start


async def phase_throughput(lab: Lab, broker: str, guests: int, adds: int) -> tuple[float, float]:
    """Seconds for guests x adds hot-adds straight over raw QMP, and through qmpnet."""
    direct_paths, direct_procs = lab.qemus(guests)
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
    lab.retire(direct_procs)

    paths, procs = lab.qemus(guests)
    serve = lab.serve(broker, "bench2", paths)
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
    lab.retire([serve, *procs])
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


async def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--guests", type=int, default=20)
    parser.add_argument("--adds", type=int, default=10)
    parser.add_argument("--fleet", type=int, default=200, help="guests for the RSS measurement (0 to skip)")
    parser.add_argument("--phase-timeout", type=float, default=None,
                        help="seconds each phase may take (default: scaled to the phase's size)")  # fmt: skip
    args = parser.parse_args()

    def deadline(base: float, per_item: float, items: int) -> float:
        return args.phase_timeout if args.phase_timeout is not None else base + per_item * items

    me = asyncio.current_task()
    if me is not None:  # SIGTERM (e.g. from `timeout`) and Ctrl-C unwind through the finally below: no process is left
        for signum in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(signum, me.cancel)
    tmp = Path(tempfile.mkdtemp(prefix="qmpnet-mqtt-bench-", dir="/tmp"))
    lab = Lab(tmp)
    watchdog = Watchdog(lab)
    rss: tuple[float, float] | None = None
    try:
        broker = lab.broker()
        raw = await run_phase(lab, watchdog, "raw QMP hot-adds", deadline(60, 0.5, args.samples),
                              phase_raw(lab, args.samples))  # fmt: skip
        floor = await run_phase(lab, watchdog, "MQTT round-trip floor", deadline(60, 0.5, args.samples),
                                phase_floor(broker, args.samples))  # fmt: skip
        mqtt = await run_phase(lab, watchdog, "qmpnet hot-adds over MQTT", deadline(90, 0.5, args.samples),
                               phase_mqtt(lab, broker, args.samples))  # fmt: skip
        what = f"{args.guests} guests x {args.adds} hot-adds, direct and through qmpnet"
        direct_s, mqtt_s = await run_phase(lab, watchdog, what, deadline(120, 0.5, args.guests * args.adds),
                                           phase_throughput(lab, broker, args.guests, args.adds))  # fmt: skip
        if args.fleet:
            rss = await run_phase(lab, watchdog, f"{args.fleet} guests connected to one controller",
                                  deadline(120, 2.0, args.fleet), phase_fleet(lab, broker, args.fleet))  # fmt: skip
    except (Exception, asyncio.CancelledError) as err:  # noqa: BLE001 - reported, then the exit status says it
        what = "interrupted" if isinstance(err, asyncio.CancelledError) else f"{type(err).__name__}: {err}"
        print(f"error: {what}", file=sys.stderr, flush=True)
        return 1
    finally:
        watchdog.arm("stopping the processes", 30 + WATCHDOG_GRACE)
        lab.close()
        shutil.rmtree(tmp, ignore_errors=True)
        watchdog.disarm()
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
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
