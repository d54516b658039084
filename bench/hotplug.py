"""Hot-add latency: raw QMP socket vs the qmpnet Python API, and the ``qmpnet`` command line as a new process.

Each round starts four fresh ``qemu-system-x86_64 -S -nodefaults -machine pc`` (no guest OS, so unplugs never
complete and each QEMU has ~30 free slots), one for the raw client, two for qmpnet and one for a raw client that
sends a minimal device (informational), and interleaves their hot-adds of a ``user`` netdev plus a
``virtio-net-pci`` device (so all plug into equally full guests under the same load). The raw baseline's
``device_add`` carries the properties qmpnet sets on every NIC (``mac``, ``bus``, ``addr``): QEMU's work for them
is QEMU's cost, not qmpnet's (``baseline.RawQmp.add``). The API is measured warm (a long-lived connection, as the
controller uses it); the first add of each connection is reported separately. qmpnet's second guest per round has
its state store on tmpfs (``/dev/shm``), where fsync costs nothing: the difference to the first is what the store's
writes cost on this disk.

Then the command line, each call a new process, interleaved so that all of them see the same machine load:
the floor ``python -c 'import asyncio, pydantic, qemu.qmp'`` (what any asyncio QMP tool with pydantic pays to
start), ``qmpnet --help``, ``qmpnet nic add --qmp SOCK --json`` in direct mode on a fresh QEMU (state directory
in the run's temp dir), and the same command for a QEMU that a ``qmpnet serve`` on this host holds (with its
mosquitto): the quick path (``qmpnet/cli/quick.py``) asks the controller over its control socket without loading
typer, pydantic or asyncio, as ``virsh attach-device`` asks libvirtd. And, as an informational row, the floor
defining one pydantic model of one field (``import pydantic`` loads neither ``pydantic.main`` nor its schema
machinery, so the floor has not yet paid for validating anything; any command that validates with pydantic pays
that row first). Python writes bytecode to a
private cache (``PYTHONPYCACHEPREFIX``, warmed by an uncounted first call; ``PYTHONDONTWRITEBYTECODE`` is dropped),
as an installed package has it. Wall time (median, p99) and the process's CPU time (user + system, from ``wait4``)
are printed; CPU time varies less on a loaded machine.

Run: ``python bench/hotplug.py [--rounds 6] [--cli 20]``. Targets, each printed ``met`` or ``NOT met``: API median
<= 1.3x raw (issues 11, 17); ``qmpnet nic add`` median <= 1.5x the floor's (issue 17; printed for each mode);
``qmpnet --help`` <= 200 ms median (issue 11).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from baseline import RawQmp, summary
from lab import lab_session, wait_connected

import qmpnet

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

QEMU = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"


async def start_qemu(workdir: Path, n: int) -> tuple[asyncio.subprocess.Process, str]:
    sock = workdir / f"q{n}.qmp"
    path = str(sock)
    proc = await asyncio.create_subprocess_exec(
        QEMU, "-S", "-nodefaults", "-display", "none", "-machine", "pc", "-m", "64",
        "-qmp", f"unix:{path},server=on,wait=off", stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not await asyncio.to_thread(sock.exists):
        if time.monotonic() > deadline:
            raise RuntimeError("QEMU did not create its QMP socket")
        await asyncio.sleep(0.01)
    return proc, path


async def api_add(guest: qmpnet.Guest) -> float:
    start = time.perf_counter()
    await guest.add_nic({"model": "virtio-net-pci"})
    return time.perf_counter() - start


FLOOR = ("python -c 'import asyncio, pydantic, qemu.qmp'", [sys.executable, "-c", "import asyncio, pydantic, qemu.qmp"])
#: The floor plus one pydantic model of one field (informational): ``import pydantic`` loads neither
#: ``pydantic.main`` nor its schema machinery, so the floor has not paid for validating anything yet.
ONE_MODEL = (
    "the floor + one pydantic model (*)",
    [sys.executable, "-c", "import asyncio, pydantic, qemu.qmp\nclass M(pydantic.BaseModel):\n    x: int"],
)
CLI_ADDS_PER_QEMU = 25


def qmpnet_command() -> list[str]:
    """The ``qmpnet`` console script beside this Python (what a user runs), else ``python -m qmpnet``."""
    script = Path(sys.executable).with_name("qmpnet")
    return [str(script)] if script.exists() else [sys.executable, "-m", "qmpnet"]


def timed_process(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run ``argv`` to its end (it must succeed); the wall seconds and the CPU seconds (user + system) it took."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with status {proc.returncode}")
    return wall, usage.ru_utime + usage.ru_stime


def process_env(workdir: Path) -> dict[str, str]:
    """The environment of the timed processes: bytecode cached in the run's directory, as when installed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return env | {"PYTHONPYCACHEPREFIX": str(workdir / "pycache")}


@contextlib.asynccontextmanager
async def served_guests(count: int) -> AsyncIterator[tuple[list[Path], Path]]:
    """``count`` QEMU -S guests held by a ``qmpnet serve`` (with its broker); their QMP sockets, its state dir."""
    async with lab_session("qmpnet-bench-served-") as (lab, _watchdog):
        broker = lab.broker()
        guests, _ = lab.qemus(count)
        state = lab.workdir / "serve-state"
        argv = [sys.executable, "-m", "qmpnet", "serve", "--broker", broker, "--controller-id", "bench",
                "--state-dir", str(state)]  # fmt: skip
        for guest in guests:
            argv += ["--guest", f"{guest.stem}={guest}"]
        lab.spawn(argv, env={**os.environ, "QMPNET_LOG__LEVEL": "WARNING"}, log=lab.workdir / "serve.log")
        await wait_connected(broker, "bench", len(guests))
        yield guests, state


async def cli_rounds(workdir: Path, count: int, samples: dict[str, list[float]]) -> None:
    """``count`` interleaved runs of the floor, ``qmpnet --help``, ``qmpnet nic add`` in direct mode (fresh QEMUs
    as needed) and through a controller that holds the guest (the quick path, cli/quick.py)."""
    env = process_env(workdir)
    qmpnet = qmpnet_command()
    state = workdir / "cli-state"
    proc: asyncio.subprocess.Process | None = None
    async with served_guests(count // CLI_ADDS_PER_QEMU + 1) as (served, served_state):
        try:
            for n in range(count + 1):  # the first run of each is uncounted: it fills the bytecode cache
                if n % CLI_ADDS_PER_QEMU == 0:
                    if proc is not None:
                        proc.terminate()
                        await proc.wait()
                    proc, path = await start_qemu(workdir, 1000 + n)
                held = str(served[n // CLI_ADDS_PER_QEMU])
                runs = {
                    "floor": FLOOR[1],
                    "one_model": ONE_MODEL[1],
                    "help": [*qmpnet, "--help"],
                    "cli": [*qmpnet, "nic", "add", "--qmp", path, "--json", "--state-dir", str(state)],
                    "served": [*qmpnet, "nic", "add", "--qmp", held, "--json", "--state-dir", str(served_state)],
                }
                for key, argv in runs.items():
                    wall, cpu = await asyncio.to_thread(timed_process, argv, env)
                    if n:
                        samples[key].append(wall)
                        samples[f"{key}_cpu"].append(cpu)
        finally:
            if proc is not None:
                proc.terminate()
                await proc.wait()


async def round_(workdir: Path, memory: Path, n: int, samples: dict[str, list[float]]) -> None:
    # Four fresh QEMUs per round, one per client (QEMU serves one client per monitor socket), and the adds
    # interleaved, so every path plugs into equally full guests under the same machine load. The second qmpnet
    # guest's state store is on tmpfs (``memory``): the difference is the disk's.
    qemus = [await start_qemu(workdir, 4 * n + k) for k in range(4)]
    (_, path_raw), (_, path_api), (_, path_mem), (_, path_minimal) = qemus
    try:
        raw = await RawQmp.open(path_raw)
        raw_minimal = await RawQmp.open(path_minimal)
        on_disk = qmpnet.Settings(state_dir=workdir / "api-state")
        in_memory = qmpnet.Settings(state_dir=memory)
        async with qmpnet.connect(path_api, settings=on_disk) as guest, \
                qmpnet.connect(path_mem, settings=in_memory) as guest_mem:  # fmt: skip
            samples["raw_first"].append(await raw.add(0))
            samples["api_first"].append(await api_add(guest))
            await api_add(guest_mem)
            await raw_minimal.add(0, minimal=True)
            paths: list[tuple[str, Callable[[int], Awaitable[float]]]] = [
                ("raw", raw.add),
                ("raw_minimal", functools.partial(raw_minimal.add, minimal=True)),
                ("api", lambda _: api_add(guest)),
                ("api_tmpfs", lambda _: api_add(guest_mem)),
            ]
            for i in range(1, 13):
                # Each path takes each place in the order in turn: an add runs slower right after another guest's
                # (that QEMU's work goes on after its answer), which a fixed order would charge to one path.
                for key, add in paths[i % len(paths) :] + paths[: i % len(paths)]:
                    samples[key].append(await add(i))
        await raw.close()
        await raw_minimal.close()
    finally:
        for proc, _ in qemus:
            proc.terminate()
            await proc.wait()


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds of 12 warm hot-adds each, raw and API")
    parser.add_argument("--cli", type=int, default=20, help="timed runs of each command line")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # parse the arguments only
    args = parser.parse_args()
    if args.smoke:
        print(f"rounds {args.rounds}, cli {args.cli}, qmpnet {' '.join(qmpnet_command())}")
        return
    keys = ("raw_first", "raw", "raw_minimal", "api_first", "api", "api_tmpfs", "floor", "floor_cpu", "one_model",
            "one_model_cpu", "help", "help_cpu", "cli", "cli_cpu", "served", "served_cpu")  # fmt: skip
    samples: dict[str, list[float]] = {key: [] for key in keys}
    with tempfile.TemporaryDirectory(prefix="qmpnet-bench-") as tmp, \
            tempfile.TemporaryDirectory(prefix="qmpnet-bench-", dir="/dev/shm") as memory:  # fmt: skip
        for n in range(args.rounds):
            await round_(Path(tmp), Path(memory), n, samples)
        if args.cli:
            await cli_rounds(Path(tmp), args.cli, samples)
    if args.rounds:
        report_api(samples)
    if args.cli:
        report_cli(samples)


def report_api(samples: dict[str, list[float]]) -> None:
    raw_median, _ = summary(samples["raw"])
    print(f"{'path':<40}{'n':>5}{'median ms':>12}{'p99 ms':>10}{'x raw':>8}")
    labels = {"raw": "raw QMP socket", "raw_minimal": "raw QMP socket, minimal device (*)",
              "api": "qmpnet API (warm)", "api_tmpfs": "qmpnet API (warm, store on tmpfs)",
              "raw_first": "raw QMP (first add)", "api_first": "qmpnet API (first add of a connection)"}  # fmt: skip
    for key, label in labels.items():
        median, p99 = summary(samples[key])
        print(f"{label:<40}{len(samples[key]):>5}{median:>12.2f}{p99:>10.2f}{median / raw_median:>8.2f}")
    print("(*) no mac, bus or addr: QEMU picks them, and does less work (not the baseline: qmpnet must set them)")
    api_ratio = summary(samples["api"])[0] / raw_median
    print(f"target API median <= 1.3x raw: {'met' if api_ratio <= 1.3 else 'NOT met'} ({api_ratio:.2f}x; with the "
          f"state store on tmpfs {summary(samples['api_tmpfs'])[0] / raw_median:.2f}x)")  # fmt: skip


def report_cli(samples: dict[str, list[float]]) -> None:
    floor = summary(samples["floor"])[0]
    print(f"\n{'new process':<48}{'n':>5}{'median ms':>12}{'p99 ms':>10}{'CPU ms':>9}{'x floor':>9}")
    processes = {"floor": FLOOR[0], "one_model": ONE_MODEL[0], "help": "qmpnet --help",
                 "cli": "qmpnet nic add --qmp (direct mode)",
                 "served": "qmpnet nic add --qmp (a controller holds it)"}  # fmt: skip
    for key, label in processes.items():
        median, p99 = summary(samples[key])
        cpu = summary(samples[f"{key}_cpu"])[0]
        print(f"{label:<48}{len(samples[key]):>5}{median:>12.1f}{p99:>10.1f}{cpu:>9.1f}{median / floor:>9.2f}")
    for key, mode in (("cli", "direct mode"), ("served", "a controller on this host holds the guest")):
        cli = summary(samples[key])[0]
        print(f"target qmpnet nic add median <= 1.5x floor = {1.5 * floor:.0f} ms, {mode}: "
              f"{'met' if cli <= 1.5 * floor else 'NOT met'} ({cli:.0f} ms, {cli / floor:.2f}x)")  # fmt: skip
    print("(*) informational: what any command that validates with pydantic pays before it does anything")
    helped = summary(samples["help"])[0]
    print(f"target qmpnet --help median <= 200 ms: {'met' if helped <= 200 else 'NOT met'} ({helped:.0f} ms)")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
