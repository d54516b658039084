"""What ``qmpnet serve`` does per MQTT hot-add, counted by tools the machine's load does not change.

One broker, ``--guests`` QEMU ``-S`` guests, one controller; a warm-up hot-add per guest (the first reads the guest),
then ``--adds`` hot-adds per guest, one at a time through ``qmpnet.client``, as ``mqtt_hotplug.py``'s phase 3 does
(``--at-once``: all guests at once, each guest's one after another, as its phase 4 does).
Only those are counted:

* ``--tool callgrind``: the controller runs under ``valgrind --tool=callgrind --instr-atstart=no``, and
  ``callgrind_control -i on/off`` brackets the counted hot-adds: the instructions printed are theirs alone (user
  space, all threads), per hot-add;
* ``--tool strace``: ``strace -f -c`` attaches to the controller (all its threads) for the counted hot-adds only;
  the system calls per hot-add are printed, by name;
* ``--tool py-spy``: py-spy samples the controller during the counted hot-adds into ``--out`` (raw collapsed stacks;
  ``pip install py-spy``);
* ``--tool cprofile``: the controller runs under ``python -m cProfile -o OUT`` (``--out``), the whole run; divide
  a function's call count by the hot-adds to see what each does (the start is a few hundred calls of most);
* ``--tool opcodes``: the controller runs under ``bench/opcounts.py`` (SIGUSR1 and SIGUSR2 bracket the counted
  hot-adds): the bytecodes each Python function ran per hot-add, by module and by function (``--out``: the counts);
* ``--tool none``: the controller's CPU time per hot-add (``/proc/PID/stat``; load-dependent, for comparison).

Run: ``python bench/serve_counts.py [--tool callgrind|strace|py-spy|cprofile|opcodes|none] [--guests 1] [--adds 20]
[--at-once] [--out FILE] [--state-dir DIR]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from lab import SLOTS_PER_GUEST, WRITE_BEHIND_WAIT, cpu_seconds, lab_session, wait_connected
from opcounts import report as opcodes_report

from qmpnet.client import Client


def controller_argv(broker: str, guests: list[Path], state: Path) -> list[str]:
    argv = [sys.executable, "-m", "qmpnet", "serve", "--broker", broker, "--controller-id", "counts",
            "--log-format", "text", "--state-dir", str(state)]  # fmt: skip
    for guest in guests:
        argv += ["--guest", f"{guest.stem}={guest}"]
    return argv


def strace_counts(path: Path) -> dict[str, int]:
    """The calls per system call of an ``strace -c`` summary."""
    counts = {}
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1] != "total":
            counts[fields[-1]] = int(fields[3])
    return counts


def start_counting(tool: str, pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    """Start counting what process ``pid`` does (callgrind: instrumentation on; strace: attached); the tracer."""
    if tool == "callgrind":
        subprocess.run(["callgrind_control", "-i", "on", str(pid)], check=True, capture_output=True)
    elif tool == "opcodes":
        out.unlink(missing_ok=True)
        os.kill(pid, signal.SIGUSR1)
    elif tool == "py-spy":
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        argv = [exe, "record", "--pid", str(pid), "--rate", "200", "--nonblocking", "--format", "raw", "--output",
                str(out)]  # fmt: skip
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    elif tool == "strace":
        tracer = subprocess.Popen(["strace", "-f", "-c", "-o", str(out), "-p", str(pid)], stderr=subprocess.PIPE)
        assert tracer.stderr is not None
        tracer.stderr.readline()  # strace says when it has attached (to each thread: the first line is enough)
        time.sleep(0.5)  # the other threads' attaches
        return tracer
    return None


def stop_counting(tool: str, pid: int, tracer: subprocess.Popen[bytes] | None, out: Path) -> None:
    if tool == "callgrind":
        subprocess.run(["callgrind_control", "-i", "off", str(pid)], check=True, capture_output=True)
    elif tool == "opcodes":
        os.kill(pid, signal.SIGUSR2)
        deadline = time.monotonic() + 60
        while not out.exists():  # written by the controller's signal handler
            if time.monotonic() > deadline:
                raise TimeoutError(f"the controller wrote no counts to {out}")
            time.sleep(0.05)
    elif tracer is not None:
        tracer.send_signal(signal.SIGINT)
        tracer.wait()


async def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    tools = ["callgrind", "strace", "py-spy", "cprofile", "opcodes", "none"]
    parser.add_argument("--tool", choices=tools, default="callgrind")
    parser.add_argument("--guests", type=int, default=1)
    parser.add_argument("--adds", type=int, default=20,
                        help=f"counted hot-adds per guest (at most {SLOTS_PER_GUEST - 1})")  # fmt: skip
    parser.add_argument("--at-once", action="store_true", help="the guests' hot-adds at once (each guest's in turn)")
    parser.add_argument("--out", type=Path, default=Path("serve-profile.txt"),
                        help="the tool's output (py-spy, cprofile, opcodes)")  # fmt: skip
    parser.add_argument("--state-dir", type=Path, default=None, help="the controller's state directory")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # parse the arguments only
    args = parser.parse_args()
    if args.smoke:
        print(f"tool {args.tool}, adds {args.adds}")
        return 0
    per_guest = min(args.adds, SLOTS_PER_GUEST - 1)
    adds = per_guest * args.guests
    async with lab_session("qmpnet-serve-counts-") as (lab, _watchdog):
        broker = lab.broker()
        guests, _ = lab.qemus(args.guests)
        state = args.state_dir or lab.workdir / "state"
        argv = controller_argv(broker, guests, state)
        valgrind_log = lab.workdir / "valgrind.log"
        if args.tool == "callgrind":
            argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--callgrind-out-file=/dev/null",
                    f"--log-file={valgrind_log}", *argv]  # fmt: skip
        elif args.tool == "cprofile":
            argv = [argv[0], "-m", "cProfile", "-o", str(args.out.resolve()), *argv[1:]]
        elif args.tool == "opcodes":
            argv = [argv[0], str(Path(__file__).with_name("opcounts.py")), str(args.out.resolve()), *argv[1:]]
        env = {**os.environ, "QMPNET_LOG__LEVEL": "WARNING"}
        serve = lab.spawn(argv, env=env, log=lab.workdir / "serve.log")
        await wait_connected(broker, "counts", len(guests), timeout=600)
        async with Client(broker, timeout=600) as client:
            for guest in guests:
                await client.add_nic("counts", guest.stem, {"model": "virtio-net-pci"})  # the first reads the guest
            out = args.out.resolve() if args.tool in ("py-spy", "opcodes") else lab.workdir / "strace.txt"
            tracer = await asyncio.to_thread(start_counting, args.tool, serve.pid, out)
            before = cpu_seconds(serve.pid)

            async def adds_to(guest: Path) -> None:
                for _ in range(per_guest):
                    await client.add_nic("counts", guest.stem, {"model": "virtio-net-pci"})

            if args.at_once:
                await asyncio.gather(*(adds_to(guest) for guest in guests))
            else:
                for guest in guests:
                    await adds_to(guest)
            await asyncio.sleep(WRITE_BEHIND_WAIT)  # the last add's write-behind belongs to it too
            cpu = cpu_seconds(serve.pid) - before
            await asyncio.to_thread(stop_counting, args.tool, serve.pid, tracer, out)
        lab.retire([serve])
        return report(args.tool, adds, cpu, lab.workdir, out)


def report(tool: str, adds: int, cpu: float, workdir: Path, out: Path) -> int:
    """Print what was counted, per hot-add; the exit status."""
    if tool == "callgrind":
        log = workdir / "valgrind.log"
        found = re.search(r"Collected : (\d+)", log.read_text())
        if found is None:
            print(f"no instruction count in {log}", file=sys.stderr)
            return 1
        print(f"{adds} hot-adds over MQTT: {int(found[1]) / adds / 1e6:.3f} M instructions each in qmpnet serve")
    elif tool == "opcodes":
        print(f"{adds} hot-adds over MQTT, in qmpnet serve's Python (a unit: one hot-add):")
        opcodes_report(out, adds)
    elif tool == "strace":
        counts = strace_counts(workdir / "strace.txt")
        print(f"{adds} hot-adds over MQTT: {sum(counts.values()) / adds:.1f} system calls each in qmpnet serve")
        for name, calls in sorted(counts.items(), key=lambda item: -item[1]):
            print(f"  {name:<20}{calls / adds:8.2f}")
    else:
        print(f"{adds} hot-adds over MQTT: {cpu / adds * 1000:.2f} ms of CPU each in qmpnet serve"
              + (" (py-spy sampled them)" if tool == "py-spy" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
