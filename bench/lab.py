"""The machinery of the benchmarks that run processes: a broker, QEMUs, controllers, phases with deadlines.

Every process a run starts belongs to a :class:`Lab` and is stopped on every way out (SIGTERM and Ctrl-C
included); a :class:`Watchdog` thread ends a run whose event loop overruns a phase's deadline, so no benchmark
hangs. Used by ``mqtt_hotplug.py`` and ``scale.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiomqtt

from qmpnet.adapters.store.files import WRITE_BEHIND_DELAY
from qmpnet.testguest.services import accepts, free_port

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Coroutine, Iterable

QEMU = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
SLOTS_PER_GUEST = 25  # a -S pc guest with -nodefaults has ~30 free slots; stay below
#: How long after a controller's last hot-add its write-behind (and the desired set's write) is surely done.
WRITE_BEHIND_WAIT = 3 * WRITE_BEHIND_DELAY
WATCHDOG_GRACE = 20.0  # seconds past a phase deadline before the watchdog thread gives up on the event loop
T = TypeVar("T")




class Lab:
    """The processes of one run; all stopped on exit (also from the watchdog thread)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.processes: list[subprocess.Popen[bytes]] = []
        self.watched: dict[int, tuple[str, Path]] = {}  # pid -> (what, log): must stay up while the run lasts
        self.counter = 0
        self.broker_proc: subprocess.Popen[bytes] | None = None
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

    def broker(self, port: int | None = None) -> str:
        """Start mosquitto (on ``port``, or a free one); returns its URL once it listens."""
        conf = self.workdir / "mosquitto.conf"
        log = self.workdir / "mosquitto.log"
        for _attempt in range(5):  # the free port may be taken between free_port() and mosquitto's bind
            chosen = port or free_port()
            conf.write_text(f"listener {chosen} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
                            "persistence false\nuser root\nmax_queued_messages 1000000\n")  # fmt: skip
            proc = self.spawn([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)], log=log)
            wait_until(lambda p=proc, n=chosen: p.poll() is not None or _listens(p.pid, n), "mosquitto")  # type: ignore[misc]
            if proc.poll() is None:
                self.watch(proc, "mosquitto", log)
                self.broker_proc = proc
                return f"mqtt://127.0.0.1:{chosen}"
            progress(f"mosquitto could not listen on port {chosen} ({_tail(log, 3)}); trying another port")
            if port is not None:
                time.sleep(0.2)  # the old broker's port may still be closing
        raise RuntimeError(f"mosquitto did not start; its log {log}:\n{_tail(log)}")

    def restart_broker(self, url: str) -> float:
        """Stop the broker (its retained messages go with it: no persistence) and start a new one on the same port.

        Returns ``time.monotonic()`` at the moment the new broker listens.
        """
        port = int(url.rsplit(":", 1)[1])
        old = self.broker_proc
        if old is not None:
            self.retire([old])
        self.broker(port)
        return time.monotonic()

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

    def simulator(self, count: int, directory: Path) -> tuple[list[Path], subprocess.Popen[bytes]]:
        """Start the QMP endpoint simulator (``qmpsim.py``) with ``count`` guests in ``directory``.

        Returns their QMP sockets once all listen, and the simulator's process.
        """
        log = self.workdir / f"qmpsim-{directory.name}.log"
        ready = directory / ".ready"
        proc = self.spawn([sys.executable, str(Path(__file__).with_name("qmpsim.py")), "--dir", str(directory),
                           "--count", str(count), "--ready", str(ready)], log=log)  # fmt: skip
        self.watch(proc, "the QMP simulator", log)
        wait_until(lambda: ready.exists() or proc.poll() is not None, "the QMP simulator", timeout=120)
        self.check()
        return [directory / f"g{n}.qmp" for n in range(count)], proc

    def serve(  # noqa: PLR0913 - the controller's knobs, keyword-only
        self,
        broker: str,
        controller: str,
        guests: list[Path] | None = None,
        guest_dir: Path | None = None,
        *,
        env: dict[str, str] | None = None,
        state_dir: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``qmpnet serve`` (state directory: ``state_dir`` or one in the run's directory; ``env``: settings)."""
        state = state_dir or self.workdir / f"state-{controller}"
        argv = [sys.executable, "-m", "qmpnet", "serve", "--broker", broker, "--controller-id", controller,
                "--log-format", "text", "--state-dir", str(state)]  # fmt: skip
        for path in guests or []:
            argv += ["--guest", f"{path.stem}={path}"]
        if guest_dir is not None:
            argv += ["--guest-dir", str(guest_dir)]
        log = self.workdir / f"serve-{controller}.log"
        proc = self.spawn(argv, env={**os.environ, "QMPNET_LOG__LEVEL": "WARNING", **(env or {})}, log=log)
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
    return path.exists() and accepts(str(path))


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


async def wait_connected(
    broker: str, controller: str, count: int, timeout: float = 120, started: float | None = None
) -> float:
    """Seconds until ``count`` guests of ``controller`` report connected (retained status topics).

    Counted from ``started`` (a ``time.monotonic()``; default: now).
    """
    connected: set[str] = set()

    def seen(topic: str, payload: bytes) -> bool:
        guest = topic.split("/")[3]
        if json.loads(payload or b"{}").get("state") == "connected":
            connected.add(guest)
        else:
            connected.discard(guest)
        return len(connected) >= count

    return await watch_topics(broker, [f"qmpnet/{controller}/guest/+/status"], seen, timeout, started)


async def watch_topics(
    broker: str,
    filters: list[str],
    done: Callable[[str, bytes], bool],
    timeout: float,
    started: float | None = None,
) -> float:
    """Subscribe to ``filters`` (QoS 0: no in-flight limit) and return the seconds until ``done(topic, payload)``.

    Counted from ``started`` (a ``time.monotonic()``; default: now).
    """
    host, port = broker.removeprefix("mqtt://").rsplit(":", 1)
    started = time.monotonic() if started is None else started
    async with aiomqtt.Client(host, int(port), socket_options=(NODELAY,)) as mqtt:
        for topic_filter in filters:
            await mqtt.subscribe(topic_filter, qos=0)
        async with asyncio.timeout(timeout):
            async for message in mqtt.messages:
                payload = message.payload if isinstance(message.payload, bytes) else b""
                if done(message.topic.value, payload):
                    return time.monotonic() - started
    raise RuntimeError("unreachable")


def rss_mib(pid: int) -> float:
    """The resident set size of process ``pid``."""
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024


def progress(what: str) -> None:
    print(f"... {what}", file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) process ``pid``'s threads have used, to the nanosecond.

    ``/proc/PID/task/TID/schedstat`` counts each thread's time on a CPU in nanoseconds; ``/proc/PID/stat`` (what
    ``getrusage`` reports) counts whole clock ticks of 10 ms, too coarse for 60 hot-adds of ~2 ms. A thread that
    ended is in neither sum of schedstat, so the difference of two readings leaves out what a thread that ended
    between them used; the processes measured keep their threads (asyncio's executor keeps its workers). Without
    schedstat, the ticks.
    """
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
                total += int((task / "schedstat").read_text().split()[0])
    except (FileNotFoundError, PermissionError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total / 1e9


def pin(pids: Iterable[int], cpus: set[int]) -> None:
    """Bind every thread of each process ``pids`` names to ``cpus`` (a thread made later inherits its maker's set)."""
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(ProcessLookupError, FileNotFoundError):  # a thread that ended meanwhile
                os.sched_setaffinity(int(task.name), cpus)


def raise_nofile() -> None:
    """Raise this process's soft open-file limit to the hard one (a fleet needs a socket per guest)."""
    import resource  # noqa: PLC0415 - only the fleet benchmarks need it

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@contextlib.asynccontextmanager
async def lab_session(prefix: str) -> AsyncIterator[tuple[Lab, Watchdog]]:
    """A lab in a fresh /tmp directory and its watchdog; on exit (SIGTERM and Ctrl-C included) no process is left."""
    me = asyncio.current_task()
    if me is not None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(signum, me.cancel)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    lab = Lab(tmp)
    watchdog = Watchdog(lab)
    try:
        yield lab, watchdog
    finally:
        watchdog.arm("stopping the processes", 30 + WATCHDOG_GRACE)
        lab.close()
        shutil.rmtree(tmp, ignore_errors=True)
        watchdog.disarm()


def failed(err: BaseException) -> int:
    """Report a run that ended on ``err`` (or was interrupted) in one line; the exit status."""
    what = "interrupted" if isinstance(err, asyncio.CancelledError) else f"{type(err).__name__}: {err}"
    print(f"error: {what}", file=sys.stderr, flush=True)
    return 1
