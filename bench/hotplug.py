"""Hot-add latency: raw QMP socket vs the qmpnet Python API vs the ``qmpnet nic add`` CLI, in one run.

Each round starts two fresh ``qemu-system-x86_64 -S -nodefaults -machine pc`` (no guest OS, so unplugs never
complete and each QEMU has ~30 free slots), one for the raw client and one for qmpnet, and interleaves their
hot-adds of a ``user`` netdev plus a ``virtio-net-pci`` device (so both plug into equally full guests under the
same load), then a few CLI calls. The API is measured warm (a long-lived connection, as the
controller uses it); the first add of each connection, which also reads the guest, is reported separately.

Run: ``python bench/hotplug.py [--rounds 6]``. Prints medians, p99 and the ratio to raw. Target: API median
<= 1.3x raw.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from baseline import RawQmp, summary

import qmpnet

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


def cli_add(path: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qmpnet", "nic", "add", "--qmp", path, "--json"],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


async def round_(workdir: Path, n: int, samples: dict[str, list[float]]) -> None:
    # Two fresh QEMUs per round, one per client (QEMU serves one client per monitor socket), and the adds
    # interleaved, so both paths plug into equally full guests under the same machine load.
    (proc_raw, path_raw), (proc_api, path_api) = await start_qemu(workdir, 2 * n), await start_qemu(workdir, 2 * n + 1)
    try:
        raw = await RawQmp.open(path_raw)
        async with qmpnet.connect(path_api) as guest:
            samples["raw_first"].append(await raw.add(0))
            samples["api_first"].append(await api_add(guest))
            for i in range(1, 13):
                samples["raw"].append(await raw.add(i))
                samples["api"].append(await api_add(guest))
        await raw.close()
        samples["cli"].extend(await asyncio.to_thread(lambda: [cli_add(path_api) for _ in range(3)]))
    finally:
        for proc in (proc_raw, proc_api):
            proc.terminate()
            await proc.wait()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    samples: dict[str, list[float]] = {"raw_first": [], "raw": [], "api_first": [], "api": [], "cli": []}
    with tempfile.TemporaryDirectory(prefix="qmpnet-bench-") as tmp:
        for n in range(args.rounds):
            await round_(Path(tmp), n, samples)
    raw_median, _ = summary(samples["raw"])
    print(f"{'path':<28}{'n':>5}{'median ms':>12}{'p99 ms':>10}{'x raw':>8}")
    labels = {"raw": "raw QMP socket", "api": "qmpnet API (warm)", "raw_first": "raw QMP (first add)",
              "api_first": "qmpnet API (first add)", "cli": "qmpnet nic add (CLI)"}
    for key, label in labels.items():
        median, p99 = summary(samples[key])
        print(f"{label:<28}{len(samples[key]):>5}{median:>12.2f}{p99:>10.2f}{median / raw_median:>8.2f}")
    api_ratio = summary(samples["api"])[0] / raw_median
    print(f"target API median <= 1.3x raw: {'met' if api_ratio <= 1.3 else 'NOT met'} ({api_ratio:.2f}x)")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
