"""Command line of the test guest: `python -m qmpnet.testguest build|boot|lab`.

`build` builds (or finds in the cache) the kernel and initramfs and prints their paths as shell assignments,
so `eval "$(python3 -m qmpnet.testguest build)"` sets `kernel` and `initrd` (and `rootfs` with `--flavour debian`;
`--flavour lab` is the lab host's image; `--flavour all` builds the three and prints nothing). `boot` runs the
guest in the foreground with its console on the terminal (leave QEMU with Ctrl-A X), for poking at the guest by
hand; the Debian guest logs in as root without a password, and its agent socket is given with `--qga PATH`.

`lab [--functions N] -- COMMAND [ARG...]` runs COMMAND as root in the lab host (:mod:`.lab`: a Debian kernel with
an IOMMU, vfio, netem, VLAN filtering and vhost-net, the host's own userland), booting it first unless this user
already has one running; it streams the output and exits with COMMAND's status. `lab --stop` ends the lab.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from .build import BuildError, GuestImage, ensure_image
from .debian import DebianImage, ensure_debian_image
from .lab import DEFAULT_FUNCTIONS, Lab, LabError
from .labimage import ensure_lab_image
from .machine import KERNEL_ARGS, QEMU_BINARY, detect_accel


def _progress(line: str) -> None:
    sys.stderr.write(f"testguest: {line}\n")


def _build(args: argparse.Namespace) -> int:
    started = time.monotonic()
    if args.flavour in ("busybox", "all"):
        image: GuestImage = ensure_image(args.cache_dir, progress=_progress)
    if args.flavour in ("debian", "all"):
        image = ensure_debian_image(args.cache_dir, progress=_progress)
    if args.flavour in ("lab", "all"):
        lab = ensure_lab_image(args.cache_dir, progress=_progress)
        image = GuestImage(kernel=lab.kernel, initrd=lab.initrd)
    _progress(f"{args.flavour} image ready after {time.monotonic() - started:.1f} s")
    if args.flavour == "all":
        return 0
    sys.stdout.write(f"kernel={shlex.quote(str(image.kernel))}\ninitrd={shlex.quote(str(image.initrd))}\n")
    if isinstance(image, DebianImage):
        sys.stdout.write(f"rootfs={shlex.quote(str(image.rootfs))}\n")
    return 0


def boot_command_line(image: GuestImage, machine: str, extra_args: list[str], qga: Path | None = None) -> list[str]:
    """Return an interactive QEMU command line: a shell and the monitor on stdio, the agent port unused."""
    if isinstance(image, DebianImage):
        return _debian_boot_command_line(image, machine, extra_args, qga)
    return [
        QEMU_BINARY,
        "-nodefaults",
        "-nographic",
        "-no-reboot",
        "-machine",
        machine,
        "-accel",
        detect_accel(),
        "-m",
        "256",
        "-serial",
        "mon:stdio",
        "-serial",
        "null",
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(image.initrd),
        "-append",
        f"{KERNEL_ARGS} testguest.shell",
        *extra_args,
    ]


def _debian_boot_command_line(image: DebianImage, machine: str, extra_args: list[str], qga: Path | None) -> list[str]:
    agent = ["-device", "virtio-serial-pci,id=qga_serial"]
    if qga is not None:
        agent += [
            "-chardev", f"socket,id=qga0,path={qga},server=on,wait=off",
            "-device", "virtserialport,bus=qga_serial.0,chardev=qga0,name=org.qemu.guest_agent.0",
        ]  # fmt: skip
    return [
        QEMU_BINARY, "-nodefaults", "-nographic", "-no-reboot", "-machine", machine, "-accel", detect_accel(),
        "-m", "512", "-serial", "mon:stdio",
        "-drive", f"file={image.rootfs},format=raw,if=virtio,snapshot=on", *agent,
        "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", KERNEL_ARGS,
        *extra_args,
    ]  # fmt: skip


def _boot(args: argparse.Namespace) -> int:
    image: GuestImage = (
        ensure_debian_image(args.cache_dir, progress=_progress)
        if args.flavour == "debian"
        else ensure_image(args.cache_dir, progress=_progress)
    )
    qemu_args = args.qemu_args[1:] if args.qemu_args[:1] == ["--"] else args.qemu_args
    command = boot_command_line(image, args.machine, qemu_args, args.qga)
    _progress(shlex.join(command))
    os.execvp(command[0], command)  # noqa: S606 - replacing this process with QEMU is the point


def _lab(args: argparse.Namespace) -> int:
    command = args.command_args[1:] if args.command_args[:1] == ["--"] else args.command_args
    if args.stop:
        running = Lab.find()
        if running is None:
            _progress("no lab is running")
            return 0
        running.stop()
        _progress(f"lab (pid {running.state.pid}) stopped")
        return 0
    if not command:
        _progress("lab: give a command after --, or --stop")
        return 2
    try:
        lab = Lab.ensure(args.functions, boot_timeout=args.boot_timeout, progress=_progress)
        return lab.stream(command)
    except LabError as err:
        _progress(f"lab: {err}")
        return 125


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m qmpnet.testguest", description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: $QMPNET_TESTGUEST_CACHE or ~/.cache")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build or find the cached image and print its paths")
    build.add_argument("--flavour", choices=("busybox", "debian", "lab", "all"), default="busybox")
    build.set_defaults(run=_build)
    boot = commands.add_parser("boot", help="boot the guest with its console on this terminal")
    boot.add_argument("--machine", choices=("pc", "q35"), default="pc")
    boot.add_argument("--flavour", choices=("busybox", "debian"), default="busybox")
    boot.add_argument("--qga", type=Path, default=None, help="debian: serve the guest agent's port on this socket")
    boot.add_argument("qemu_args", nargs=argparse.REMAINDER, help="extra QEMU arguments (after --)")
    boot.set_defaults(run=_boot)
    lab = commands.add_parser("lab", help="run a command as root in the lab host (booted first if needed)")
    lab.add_argument("--functions", type=int, default=DEFAULT_FUNCTIONS, help="assignable functions of a new lab")
    lab.add_argument("--boot-timeout", type=float, default=600.0, help="seconds a boot may take (default 600)")
    lab.add_argument("--stop", action="store_true", help="end the running lab")
    lab.add_argument("command_args", nargs=argparse.REMAINDER, help="the command (after --)")
    lab.set_defaults(run=_lab)
    args = parser.parse_args(argv)
    try:
        status: int = args.run(args)
    except BuildError as err:
        _progress(f"build failed: {err}")
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
