"""Chaos figures: QEMU and the controller killed with SIGKILL, round after round; convergence times printed.

    python bench/chaos.py [--rounds 10]

Runs the scenarios of tests/integration/chaos_scenarios.py (the same code the ``chaos`` tests run, with the same
checks after every round: the guest sees its desired NICs with the same MACs; no orphan netdev; nothing applied
twice) and prints, per scenario, the median and the maximum time from a restart to the converged state.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

# The scenarios, and the helpers they share with the tests (tests/needs.py, tests/waiting.py): pytest's pythonpath.
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "integration"))

from chaos_scenarios import controller_kills, qemu_restarts  # type: ignore[import-not-found]

from qmpnet.testguest import ensure_image


async def main(rounds: int) -> None:
    image = ensure_image()
    rows = []
    with tempfile.TemporaryDirectory(prefix="qmpnet-chaos-", dir="/tmp") as tmp:
        qemu_dir, ctl_dir = Path(tmp) / "qemu", Path(tmp) / "ctl"
        qemu_dir.mkdir()
        ctl_dir.mkdir()
        qemu = await qemu_restarts(image, qemu_dir, rounds)
        rows.append(("QEMU kill -9, restarted on the same socket (booted guest sees its 3 desired NICs)", qemu))
        ctl = await controller_kills(image, ctl_dir, rounds)
        rows.append(("controller kill -9 mid-burst, restarted (no orphan, nothing twice, converged)", ctl))
    print("\n| scenario | rounds | median | max |\n|---|---|---|---|")
    for label, result in rows:
        times = sorted(result.convergence)
        print(f"| {label} | {len(times)} | {times[len(times) // 2]:.2f} s | {times[-1]:.2f} s |")
    for note in ctl.notes:
        print(f"  {note}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    asyncio.run(main(parser.parse_args().rounds))
