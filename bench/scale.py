"""Fleet scale: one controller with many guests — memory, connect time, republish after a broker restart, latency.

Rows (each a fresh controller, broker and guests; ``--rows`` picks them):

* ``qemu:200``: 200 real ``qemu-system-x86_64 -S -nodefaults -machine pc -m 64`` processes (the realistic row);
* ``sim:1000`` and ``sim:5000``: guests of the QMP endpoint **simulator** (``qmpsim.py``: one process answering
  from a real QEMU 7.2's captured replies), which measures the controller's own cost where real QEMUs do not fit
  in this machine's memory. Every figure of these rows is labelled "simulator".

For each row, measured on the controller (``qmpnet serve --guest-dir``, mosquitto on a free loopback port):

* **connected**: seconds from starting the controller until every guest's retained status says ``connected``,
  and the controller's CPU seconds (user + system, from ``/proc/PID/stat``, what ``getrusage`` reports) until then;
* **RSS**: the controller's resident set size with every guest connected;
* **republish**: the broker is stopped (it keeps nothing: no persistence) and started again on the same port; the
  seconds from the new broker listening until a fresh subscriber has seen the retained status and ``nics`` of every
  guest (including the controller's reconnect backoff);
* **request under load**: the median MQTT hot-add to one guest of the fleet, against the idle baseline measured in
  the same run: the same hot-adds to a guest of the same kind on a controller that serves only that guest. The
  load is the fleet itself with the default settings: every guest connected, each re-read every
  ``reconcile.resync_interval`` (60 s; ``--resync`` sets another), the guest directory watched.

Targets (issue 11), for 1,000 guests: RSS <= 250 MiB, all connected <= 10 s, republished <= 10 s, a request
within 2x its idle latency. Not a test: nothing fails, it reports.

Run: ``python bench/scale.py [--rows qemu:200,sim:1000,sim:5000] [--samples 20] [--resync SECONDS]``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from baseline import summary
from lab import (
    Lab,
    cpu_seconds,
    failed,
    lab_session,
    progress,
    raise_nofile,
    rss_mib,
    run_phase,
    wait_connected,
    watch_topics,
)

from qmpnet.client import Client

if TYPE_CHECKING:
    import subprocess
    from pathlib import Path

SLOTS = 20  # hot-adds per guest in the latency samples (a -S pc guest has ~30 free slots, the captured one ~25)


@dataclass
class Row:
    """The figures of one fleet."""

    kind: str  # "qemu" or "sim"
    guests: int
    connect_s: float = 0.0
    connect_cpu_s: float = 0.0
    rss: float = 0.0
    republish_s: float = 0.0
    idle: list[float] | None = None
    loaded: list[float] | None = None

    @property
    def label(self) -> str:
        return f"{self.guests} real QEMU -S" if self.kind == "qemu" else f"{self.guests} simulator guests"


def parse_rows(text: str) -> list[tuple[str, int]]:
    """``qemu:200,sim:1000`` -> ``[("qemu", 200), ("sim", 1000)]``."""
    rows = []
    for item in text.split(","):
        kind, _, count = item.strip().partition(":")
        if kind not in ("qemu", "sim") or not count.isdigit() or int(count) < 1:
            raise argparse.ArgumentTypeError(f"{item!r}: rows are qemu:N or sim:N")
        rows.append((kind, int(count)))
    return rows


def guests_of(
    lab: Lab, kind: str, count: int, directory: Path
) -> tuple[list[Path], list[subprocess.Popen[bytes]]]:
    """``count`` guests of ``kind`` in ``directory``: their QMP sockets and the processes behind them."""
    directory.mkdir()
    if kind == "qemu":
        return lab.qemus(count, directory)
    paths, proc = lab.simulator(count, directory)
    return paths, [proc]


async def hot_adds(broker: str, controller: str, guests: list[str], samples: int) -> list[float]:
    """``samples`` MQTT hot-adds one at a time over ``guests`` (``SLOTS`` each); the first of each is uncounted."""
    times: list[float] = []
    async with Client(broker, timeout=60) as client:
        for name in guests:
            if len(times) >= samples:
                break
            await client.add_nic(controller, name, {"model": "virtio-net-pci"})  # warm
            for _ in range(min(SLOTS - 1, samples - len(times))):
                start = time.perf_counter()
                await client.add_nic(controller, name, {"model": "virtio-net-pci"})
                times.append(time.perf_counter() - start)
    return times


async def idle_baseline(  # noqa: PLR0913 - the row's coordinates
    lab: Lab, kind: str, broker: str, samples: int, env: dict[str, str], *, tag: str
) -> list[float]:
    """The hot-add latency on a controller serving one guest of ``kind`` (as many guests as the samples need)."""
    needed = (samples + SLOTS - 2) // (SLOTS - 1)
    paths, procs = guests_of(lab, kind, needed, lab.workdir / f"idle-{tag}")
    serve = lab.serve(broker, f"idle-{tag}", paths, env=env)
    await wait_connected(broker, f"idle-{tag}", len(paths), timeout=60)
    times = await hot_adds(broker, f"idle-{tag}", [p.stem for p in paths], samples)
    lab.retire([serve, *procs])
    return times


async def fleet(lab: Lab, kind: str, count: int, samples: int, env: dict[str, str]) -> Row:
    row = Row(kind, count)
    tag = f"{kind}{count}"
    broker = lab.broker()
    row.idle = await idle_baseline(lab, kind, broker, samples, env, tag=tag)
    directory = lab.workdir / f"fleet-{tag}"
    paths, _ = guests_of(lab, kind, count, directory)
    controller = f"fleet-{tag}"
    started = time.monotonic()
    serve = lab.serve(broker, controller, guest_dir=directory, env=env)
    row.connect_s = await wait_connected(broker, controller, count, timeout=60 + count * 0.1, started=started)
    row.connect_cpu_s = cpu_seconds(serve.pid)
    progress(f"{row.label}: all connected in {row.connect_s:.1f} s ({row.connect_cpu_s:.1f} s of CPU)")
    await asyncio.sleep(2.0)  # let the last guests' first NIC lists go out
    row.rss = rss_mib(serve.pid)
    row.republish_s = await republish(lab, broker, controller, count)
    progress(f"{row.label}: republished in {row.republish_s:.1f} s after a broker restart")
    row.loaded = await hot_adds(broker, controller, [p.stem for p in paths[: (samples + SLOTS - 2) // (SLOTS - 1)]],
                                samples)  # fmt: skip
    lab.close()  # the row's controller, guests and broker: the next row runs alone
    return row


async def republish(lab: Lab, broker: str, controller: str, count: int) -> float:
    """Restart the broker; seconds until every guest's retained status and NIC list are on the new one."""
    seen: set[str] = set()
    want = 2 * count

    def done(topic: str, payload: bytes) -> bool:
        if payload and topic.rsplit("/", 1)[1] in ("status", "nics"):
            seen.add(topic)
        return len(seen) >= want

    listening = lab.restart_broker(broker)
    filters = [f"qmpnet/{controller}/guest/+/status", f"qmpnet/{controller}/guest/+/nics"]
    return await watch_topics(broker, filters, done, timeout=120 + count * 0.05, started=listening)


def report(rows: list[Row]) -> None:
    print(f"{'fleet':<28}{'connected s':>12}{'CPU s':>7}{'RSS MiB':>9}{'republish s':>12}"
          f"{'idle ms':>9}{'loaded ms':>10}{'x idle':>8}")  # fmt: skip
    for row in rows:
        idle, loaded = summary(row.idle or [0.0])[0], summary(row.loaded or [0.0])[0]
        print(f"{row.label:<28}{row.connect_s:>12.1f}{row.connect_cpu_s:>7.1f}{row.rss:>9.1f}{row.republish_s:>12.1f}"
              f"{idle:>9.2f}{loaded:>10.2f}{loaded / idle:>8.2f}")  # fmt: skip
    for row in rows:
        if row.guests < 1000:
            continue
        idle, loaded = summary(row.idle or [0.0])[0], summary(row.loaded or [0.0])[0]
        checks = [
            ("RSS <= 250 MiB", row.rss <= 250),
            ("all connected <= 10 s", row.connect_s <= 10),
            ("republished <= 10 s", row.republish_s <= 10),
            ("request <= 2x idle", loaded <= 2 * idle),
        ]
        verdicts = ", ".join(f"{what}: {'met' if ok else 'NOT met'}" for what, ok in checks)
        print(f"targets, {row.label}: {verdicts}")


async def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=parse_rows, default=parse_rows("qemu:200,sim:1000,sim:5000"))
    parser.add_argument("--samples", type=int, default=20, help="hot-adds in each latency median")
    parser.add_argument("--resync", type=float, default=None,
                        help="reconcile.resync_interval of the controllers (default: the setting's, 60 s)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # parse the arguments only
    args = parser.parse_args()
    if args.smoke:
        print(f"rows {args.rows}, samples {args.samples}, resync {args.resync or 'default'}")
        return 0
    raise_nofile()
    env = {"QMPNET_RECONCILE__RESYNC_INTERVAL": str(args.resync)} if args.resync else {}
    rows: list[Row] = []
    async with lab_session("qmpnet-scale-bench-") as (lab, watchdog):
        try:
            for kind, count in args.rows:
                what = f"{count} {'real QEMU' if kind == 'qemu' else 'simulator'} guests on one controller"
                deadline = 180 + count * (1.0 if kind == "qemu" else 0.2)
                rows.append(await run_phase(lab, watchdog, what, deadline, fleet(lab, kind, count, args.samples, env)))
        except (Exception, asyncio.CancelledError) as err:  # noqa: BLE001 - reported, then the exit status says it
            return failed(err)
    report(rows)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
