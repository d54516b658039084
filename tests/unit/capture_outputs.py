"""Regenerate the captured HMP outputs in ``tests/unit/data`` from the installed QEMU (``-S``, no guest OS).

Run ``python tests/unit/capture_outputs.py``; the parser tests read the files it writes. Each capture is named
``<setup>-<command>.txt``; the QEMU command lines are in :data:`SETUPS`.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from qemu.qmp import QMPClient

DATA = Path(__file__).parent / "data"
QEMU = "qemu-system-x86_64"
BASE = ["-S", "-display", "none", "-nodefaults", "-m", "64"]

#: setup name -> (machine arguments, HMP commands to capture)
SETUPS: dict[str, tuple[list[str], list[str]]] = {
    "pc": (
        [
            "-M",
            "pc",
            "-netdev",
            "user,id=n1",
            "-device",
            "e1000,id=e1,netdev=n1,mac=52:54:00:00:00:e1",
            "-net",
            "nic,model=rtl8139,macaddr=52:54:00:00:01:39",
            "-net",
            "user",
            "-netdev",
            "hubport,id=hp1,hubid=1",
            "-device",
            "virtio-net-pci,id=v1,netdev=hp1,mac=52:54:00:00:00:01,addr=0x6",
            "-netdev",
            "hubport,id=hp2,hubid=1",
        ],
        ["info qtree", "info network", "device_add help"],
    ),
    "q35": (
        [
            "-M",
            "q35",
            "-device",
            "pcie-root-port,id=rp1,chassis=1,bus=pcie.0",
            "-device",
            "pcie-root-port,id=rp2,chassis=2,bus=pcie.0",
            "-device",
            "pcie-root-port,id=rp3,chassis=3,bus=pcie.0",
            "-device",
            "pcie-pci-bridge,id=pcibr1,bus=rp3",
            "-netdev",
            "user,id=n1",
            "-device",
            "virtio-net-pci,id=v1,netdev=n1,bus=rp1,mac=52:54:00:00:00:01",
        ],
        ["info qtree", "info network"],
    ),
    "pc-bridges": (
        [
            "-M",
            "pc",
            "-device",
            "pci-bridge,id=br1,chassis_nr=1",
            "-device",
            "pci-bridge,id=br2,chassis_nr=2",
        ],
        ["info qtree", "info network"],
    ),
}


async def capture(setup: str, machine_args: list[str], commands: list[str], workdir: Path) -> None:
    sock = workdir / f"{setup}.qmp"
    argv = [QEMU, *BASE, *machine_args, "-qmp", f"unix:{sock},server=on,wait=off"]
    qemu = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL)
    try:
        for _ in range(100):
            if sock.exists():
                break
            await asyncio.sleep(0.05)
        client = QMPClient(setup)
        await client.connect(str(sock))
        try:
            for command in commands:
                text = await client.execute("human-monitor-command", {"command-line": command})
                name = command.replace("info ", "").replace("device_add help", "device-add-help")
                (DATA / f"{setup}-{name}.txt").write_text(str(text))
        finally:
            await client.disconnect()
    finally:
        qemu.terminate()
        await asyncio.wait_for(qemu.wait(), 10)


async def main() -> int:
    DATA.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qmpnet-capture-") as tmp:
        for setup, (machine_args, commands) in SETUPS.items():
            await capture(setup, machine_args, commands, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
