"""N API hot-adds on one fresh QEMU ``-S``, for counting what each costs under a tool that the load does not change.

Run it under callgrind or strace twice, with two ``--adds`` counts, and divide the difference by the difference of
the counts (what the process start, the connect and the exit cost cancels out)::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null python bench/hotadd_counts.py --adds 5
    valgrind --tool=callgrind --callgrind-out-file=/dev/null python bench/hotadd_counts.py --adds 25
    strace -f -c -o counts.txt python bench/hotadd_counts.py --adds 25

The state store is in a temporary directory on the disk (``--state-dir`` to choose; ``/dev/shm/...`` for tmpfs).
The script starts its own QEMU (callgrind does not follow it); under ``strace -f``, which would follow it too, give
it one started beforehand with ``--qmp SOCKET`` (a fresh ``qemu-system-x86_64 -S -nodefaults -machine pc``).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
from pathlib import Path

from hotplug import start_qemu

import qmpnet


def _cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--adds", type=int, default=25, help="hot-adds after the first (uncounted) one")
    parser.add_argument("--state-dir", type=Path, default=None, help="the state directory (default: a temporary one)")
    parser.add_argument("--qmp", default=None, help="a running QEMU's QMP socket (default: start one)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # parse the arguments only
    args = parser.parse_args()
    if args.smoke:
        print(f"adds {args.adds}")
        return
    with tempfile.TemporaryDirectory(prefix="qmpnet-counts-") as tmp:
        work = Path(tmp)
        proc, path = (None, args.qmp) if args.qmp else await start_qemu(work, 0)
        try:
            settings = qmpnet.Settings(state_dir=args.state_dir or work / "state")
            async with qmpnet.connect(path, settings=settings) as guest:
                await guest.add_nic({"model": "virtio-net-pci"})  # the first add reads what later ones reuse
                start, cpu = time.perf_counter(), _cpu()
                for _ in range(args.adds):
                    await guest.add_nic({"model": "virtio-net-pci"})
                wall, (user, system) = time.perf_counter() - start, (b - a for a, b in zip(cpu, _cpu(), strict=True))
            if args.adds:
                each = 1000 / args.adds
                print(f"{args.adds} hot-adds: {wall * each:.3f} ms wall, CPU {user * each:.3f} ms user + "
                      f"{system * each:.3f} ms system each (this process)")
        finally:
            if proc is not None:
                proc.terminate()
                await proc.wait()


if __name__ == "__main__":
    asyncio.run(main())
