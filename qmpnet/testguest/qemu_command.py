"""The QEMU command line of a test guest: its configuration, its files, the accelerator, and the arguments.

:class:`~qmpnet.testguest.machine.TestMachine` runs what :func:`build_command_line` returns; the unit tests read
it without starting QEMU.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from qmpnet.adapters.qga import AGENT_PORT_NAME

from .debian import DebianImage

if TYPE_CHECKING:
    from .build import GuestImage

MachineType = Literal["pc", "q35"]
Accel = Literal["tcg", "kvm"]
Flavour = Literal["busybox", "debian"]
FLAVOURS: tuple[Flavour, ...] = ("busybox", "debian")

QEMU_BINARY = "qemu-system-x86_64"
ACCEL_ENV = "QMPNET_ACCEL"
#: quiet: the serial console is slow under TCG. mitigations/tsc/timer/i8042: about 0.4 s less boot time.
KERNEL_ARGS = "console=ttyS0 panic=-1 quiet mitigations=off tsc=reliable no_timer_check i8042.noaux i8042.nokbd"
#: The id of the pcie-pci-bridge and of the root port it sits in (not counted in `root_ports`).
BRIDGE_ID = "pcibr0"
BRIDGE_PORT_ID = "rp_br"
#: Root ports take pcie.0 slots from here up; lower slots stay free for devices given in `extra_args`.
FIRST_ROOT_PORT_SLOT = 0x08
LAST_ROOT_PORT_SLOT = 0x1E  # 0x1f is the ICH9 LPC/SATA/SMBus function group
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class MachineError(RuntimeError):
    """QEMU could not be started, or the guest did not come up; the message describes the machine."""


def detect_accel() -> Accel:
    """Return the accelerator to use: `$QMPNET_ACCEL`, else kvm only where a real KVM module is loaded.

    Raises:
        MachineError: `$QMPNET_ACCEL` is set to something other than tcg or kvm.
    """
    configured = os.environ.get(ACCEL_ENV, "").strip().lower()
    if configured in ("tcg", "kvm"):
        return "kvm" if configured == "kvm" else "tcg"
    if configured:
        raise MachineError(f"{ACCEL_ENV} must be tcg or kvm, not {configured!r}")
    real_kvm = any(Path("/sys/module", module).exists() for module in ("kvm_intel", "kvm_amd"))
    return "kvm" if real_kvm and os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


@dataclass(frozen=True)
class MachineFiles:
    """Where a machine keeps its sockets and logs."""

    qmp: Path
    agent: Path
    console: Path
    stderr: Path
    qga: Path

    @classmethod
    def in_dir(cls, workdir: Path) -> MachineFiles:
        """Return the standard file names inside `workdir`."""
        return cls(
            qmp=workdir / "qmp.sock",
            agent=workdir / "agent.sock",
            console=workdir / "console.log",
            stderr=workdir / "qemu-stderr.log",
            qga=workdir / "qga.sock",
        )


@dataclass(frozen=True)
class MachineConfig:
    """Everything that shapes a test machine's command line."""

    machine: MachineType = "pc"
    root_ports: int = 0
    pcie_pci_bridge: bool = False
    memory_mb: int = 256
    boot: bool = True
    extra_args: tuple[str, ...] = ()
    name: str = "guest"
    flavour: Flavour = "busybox"

    def __post_init__(self) -> None:
        if self.flavour not in FLAVOURS:
            raise ValueError(f"flavour must be busybox or debian, not {self.flavour!r}")
        if self.machine not in ("pc", "q35"):
            raise ValueError(f"machine must be pc or q35, not {self.machine!r}")
        if self.machine == "pc" and (self.root_ports or self.pcie_pci_bridge):
            raise ValueError("root ports and the pcie-pci-bridge need machine='q35'")
        slots = LAST_ROOT_PORT_SLOT - FIRST_ROOT_PORT_SLOT + 1
        if not 0 <= self.root_ports + int(self.pcie_pci_bridge) <= slots:
            raise ValueError(f"at most {slots} root ports (the bridge takes one of them)")
        if not _NAME.match(self.name):
            raise ValueError(f"machine names are 1-64 of [A-Za-z0-9_.-], not {self.name!r}")

    @property
    def root_port_ids(self) -> list[str]:
        """The ids of the free root ports: rp1 … rpN."""
        return [f"rp{number}" for number in range(1, self.root_ports + 1)]


def build_command_line(image: GuestImage | None, config: MachineConfig, files: MachineFiles, accel: Accel) -> list[str]:
    """Return the QEMU command line for a test machine.

    Args:
        image: The guest to boot; ignored when `config.boot` is false (QEMU then waits in `-S` with no kernel).
        config: Machine shape.
        files: Sockets and logs.
        accel: tcg or kvm.
    """
    args = [QEMU_BINARY, "-name", config.name, "-nodefaults", "-display", "none", "-no-reboot"]
    args += ["-machine", config.machine, "-accel", accel, "-m", str(config.memory_mb), "-smp", "1"]
    args += ["-qmp", f"unix:{files.qmp},server=on,wait=off"]
    args += ["-chardev", f"file,id=console,path={files.console}", "-serial", "chardev:console"]
    if config.boot and isinstance(image, DebianImage) and config.flavour == "debian":
        args += _debian_args(image, files)
    elif config.boot and image is not None:
        args += ["-chardev", f"socket,id=agent,path={files.agent}", "-serial", "chardev:agent"]
        args += ["-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", KERNEL_ARGS]
    else:
        args.append("-S")
    return [*args, *_pcie_topology(config), *config.extra_args]


def _debian_args(image: DebianImage, files: MachineFiles) -> list[str]:
    """The root disk (never written: snapshot=on) and qemu-guest-agent's port, served by QEMU on a unix socket."""
    # A machine id per boot: guests booted from the same image must not share DHCP client ids.
    append = f"{KERNEL_ARGS} systemd.show_status=false systemd.machine_id={uuid.uuid4().hex}"
    return [
        "-drive", f"file={image.rootfs},format=raw,if=virtio,snapshot=on",
        "-device", "virtio-serial-pci,id=qga_serial",
        "-chardev", f"socket,id=qga0,path={files.qga},server=on,wait=off",
        "-device", f"virtserialport,bus=qga_serial.0,chardev=qga0,name={AGENT_PORT_NAME}",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", append,
    ]  # fmt: skip


def _pcie_topology(config: MachineConfig) -> list[str]:
    """Root ports rp1..rpN, then the bridge in its own root port, each in its own pcie.0 slot."""
    ports = list(config.root_port_ids)
    if config.pcie_pci_bridge:
        ports.append(BRIDGE_PORT_ID)
    args: list[str] = []
    for index, port in enumerate(ports):
        chassis = index + 1
        slot = FIRST_ROOT_PORT_SLOT + index
        args += ["-device", f"pcie-root-port,id={port},chassis={chassis},bus=pcie.0,addr={slot:#x}"]
    if config.pcie_pci_bridge:
        args += ["-device", f"pcie-pci-bridge,id={BRIDGE_ID},bus={BRIDGE_PORT_ID}"]
    return args


def orphan_guard() -> list[str]:
    """A prefix that makes the kernel SIGKILL QEMU when the harness process dies."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []

