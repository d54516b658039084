"""The cost of reading a guest: one ``QmpMonitor.observe()`` on a q35 guest with about ten devices.

Starts ``qemu-system-x86_64 -S -nodefaults -machine q35`` with four root ports, a pcie-pci-bridge and NICs of
every model (two behind the bridge, one in a root port, one on ``pcie.0``), connects the QMP adapter and times
``observe()`` ``--rounds`` times on one connection after a first, uncounted read (warm: what a long-lived
controller pays), then the first read of ``--cold`` fresh connections (what a CLI call pays). Prints medians, p99
and what a read found. Not a timed test: the figures are for humans (and the report that changed them).

Run: ``python bench/observe.py [--rounds 50] [--qemu PATH] [-- EXTRA QEMU ARGS]``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from baseline import summary

from qmpnet.adapters.qmp import QmpMonitor

DEVICES = [
    *("-device", "pcie-root-port,id=rp1,chassis=1,bus=pcie.0,addr=0x8"),
    *("-device", "pcie-root-port,id=rp2,chassis=2,bus=pcie.0,addr=0x9"),
    *("-device", "pcie-root-port,id=rp3,chassis=3,bus=pcie.0,addr=0xa"),
    *("-device", "pcie-root-port,id=rp_br,chassis=4,bus=pcie.0,addr=0xb"),
    *("-device", "pcie-pci-bridge,id=pcibr0,bus=rp_br"),
    *("-netdev", "user,id=n1", "-device", "virtio-net-pci,id=v1,netdev=n1,bus=rp1"),
    *("-netdev", "user,id=n2", "-device", "e1000e,id=e2,netdev=n2,bus=rp2"),
    *("-netdev", "user,id=n3", "-device", "e1000,id=e3,netdev=n3,bus=pcibr0,addr=1"),
    *("-netdev", "user,id=n4", "-device", "rtl8139,id=r4,netdev=n4,bus=pcibr0,addr=2"),
    *("-netdev", "user,id=n5", "-device", "e1000e,id=e5,netdev=n5,bus=pcie.0,addr=0x5"),
]


async def start_qemu(qemu: list[str], workdir: Path, extra: list[str]) -> tuple[asyncio.subprocess.Process, str]:
    sock = workdir / "observe.qmp"
    proc = await asyncio.create_subprocess_exec(
        *qemu, "-S", "-nodefaults", "-display", "none", "-machine", "q35", "-m", "64", *DEVICES, *extra,
        "-qmp", f"unix:{sock},server=on,wait=off", stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not await asyncio.to_thread(sock.exists):
        if time.monotonic() > deadline:
            raise RuntimeError("QEMU did not create its QMP socket")
        await asyncio.sleep(0.01)
    return proc, str(sock)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--cold", type=int, default=10)
    parser.add_argument("--qemu", default=shutil.which("qemu-system-x86_64") or "qemu-system-x86_64",
                        help="the QEMU binary, optionally followed by its options (e.g. '-L DIR'), one string")
    parser.add_argument("extra", nargs="*", help="more QEMU arguments")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qmpnet-bench-") as tmp:
        proc, sock = await start_qemu(args.qemu.split(), Path(tmp), args.extra)
        try:
            monitor = await QmpMonitor.connect(sock, name="bench", connect_timeout=10, command_timeout=10)
            try:
                first = await monitor.observe()
                samples = []
                for _ in range(args.rounds):
                    start = time.perf_counter()
                    await monitor.observe()
                    samples.append(time.perf_counter() - start)
            finally:
                await monitor.close()
            cold = []
            for _ in range(args.cold):
                fresh = await QmpMonitor.connect(sock, name="bench", connect_timeout=10, command_timeout=10)
                try:
                    start = time.perf_counter()
                    await fresh.observe()
                    cold.append(time.perf_counter() - start)
                finally:
                    await fresh.close()
        finally:
            proc.terminate()
            await proc.wait()
    nics = sorted(d.id or d.driver for d in first.devices if d.is_nic)
    print(f"QEMU {monitor.greeting_version}: {len(first.devices)} PCI devices, NIC devices {nics}")
    median, p99 = summary(samples)
    print(f"observe(), warm: median {median:.2f} ms, p99 {p99:.2f} ms over {args.rounds} reads")
    median, p99 = summary(cold)
    print(f"observe(), first read of a connection: median {median:.2f} ms, p99 {p99:.2f} ms over {args.cold}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
