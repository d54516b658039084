"""Regenerate the captured QEMU answers in ``tests/unit/data`` from real QEMU (``-S``, no guest OS).

Run ``python tests/unit/capture_outputs.py [--qemu7 BIN] [--qemu10 BIN]``. Each guest of :data:`SETUPS` is started
under each QEMU and asked everything qmpnet reads a guest from, whatever qmpnet's reader happens to ask today: the
machine type, ``qom-list`` of ``/machine``, its host bridge and the three device containers, ``qom-list-types``,
``device-list-properties`` of every PCI type present, for every PCI device ``qom-get`` of ``parent_bus``, ``addr``
and (where its type has them) ``mac``, ``netdev``, ``host``, ``qom-list`` of every bridge, ``query-pci``, and HMP
``info network`` (and ``device_add help``). The raw exchanges go to ``data/qemu-<major.minor>/<setup>.json``, one
exchange a line; :class:`captures.Capture` answers from them (the unit tests and the fake QMP server use it).

QEMU 10.0 is not the system QEMU here: it is Debian bookworm-backports' packages unpacked under /opt/qemu-10.0 by
``scripts/fetch-qemu-10.0`` (``apt-get download`` + ``dpkg-deb -x``, see docs/qemu-notes.md), started through the
wrapper script there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, cast

from qemu.qmp import ExecuteError, QMPClient

DATA = Path(__file__).parent / "data"
QEMU7 = "qemu-system-x86_64"
QEMU10 = "/opt/qemu-10.0/qemu-system-x86_64"
BASE = ["-S", "-display", "none", "-nodefaults", "-m", "64"]
CONTAINERS = ("/machine/peripheral", "/machine/peripheral-anon", "/machine/unattached")
#: Types whose properties are captured although no device of them is in the guest (vfio-pci needs a host device).
EXTRA_TYPES = {"pc-models": ["vfio-pci"]}
HOST_BRIDGES = ("i440FX-pcihost", "q35-pcihost")


def _dev(*args: str) -> list[str]:
    return [item for arg in args for item in ("-device", arg)]


def _net(*args: str) -> list[str]:
    return [item for arg in args for item in ("-netdev", arg)]


#: setup name -> (QEMU arguments, HMP commands to capture besides ``info network``)
SETUPS: dict[str, tuple[list[str], list[str]]] = {
    # pc: a NIC with a backend, a legacy -net nic on hub 0 (a built-in device in /machine/unattached), a virtio
    # NIC on hub 1 and a hub port with nothing on it.
    "pc": (
        [
            *("-M", "pc"),
            *_net("user,id=n1"),
            *_dev("e1000,id=e1,netdev=n1,mac=52:54:00:00:00:e1"),
            *("-net", "nic,model=rtl8139,macaddr=52:54:00:00:01:39", "-net", "user"),
            *_net("hubport,id=hp1,hubid=1"),
            *_dev("virtio-net-pci,id=v1,netdev=hp1,mac=52:54:00:00:00:01,addr=0x6"),
            *_net("hubport,id=hp2,hubid=1"),
        ],
        ["device_add help"],
    ),
    # pc, every model: e1000e, an anonymous rtl8139, a virtio NIC with no backend, and a non-PCI NIC (usb-net).
    "pc-models": (
        [
            *("-M", "pc"),
            *_net("user,id=n2", "user,id=n3", "user,id=n4"),
            *_dev(
                "e1000e,id=ee2,netdev=n2,mac=52:54:00:00:02:ee,addr=0x4",
                "rtl8139,netdev=n3,mac=52:54:00:00:03:39,addr=0x7",
                "virtio-net-pci,id=v4,mac=52:54:00:00:04:01,addr=0x8",
                "e1000,id=e5,netdev=n4,mac=52:54:00:00:05:e1,addr=0x9",
                "qemu-xhci,id=xhci,addr=0xa",
            ),
            *_net("user,id=n6"),
            *_dev("usb-net,id=u6,netdev=n6,mac=52:54:00:00:06:06"),
        ],
        [],
    ),
    # q35 with root ports: a virtio NIC in rp1, rp2 free, a pcie-pci-bridge (empty) in rp3.
    "q35": (
        [
            *("-M", "q35"),
            *_dev(
                "pcie-root-port,id=rp1,chassis=1,bus=pcie.0",
                "pcie-root-port,id=rp2,chassis=2,bus=pcie.0",
                "pcie-root-port,id=rp3,chassis=3,bus=pcie.0",
                "pcie-pci-bridge,id=pcibr1,bus=rp3",
            ),
            *_net("user,id=n1"),
            *_dev("virtio-net-pci,id=v1,netdev=n1,bus=rp1,mac=52:54:00:00:00:01"),
        ],
        [],
    ),
    # q35, the phantom-NIC guest: an e1000e in a root port, an e1000, an rtl8139 and an anonymous rtl8139 behind
    # a pcie-pci-bridge, an e1000e on pcie.0, two anonymous root ports (QEMU names the first one's bus "pcie.0",
    # like the root bus) with a virtio NIC in the second, and a free root port.
    "q35-bridge": (
        [
            *("-M", "q35"),
            *_dev(
                "pcie-root-port,id=rp1,chassis=1,bus=pcie.0,addr=0x8",
                "pcie-root-port,id=rp2,chassis=2,bus=pcie.0,addr=0x9",
                "pcie-root-port,id=rp_br,chassis=3,bus=pcie.0,addr=0xa",
                "pcie-pci-bridge,id=pcibr0,bus=rp_br",
                "pcie-root-port,chassis=4,bus=pcie.0,addr=0xb",
                "pcie-root-port,chassis=5,bus=pcie.0,addr=0xc",
            ),
            *_net("user,id=n2", "user,id=n3", "user,id=n4", "user,id=n5", "user,id=n6", "user,id=n7"),
            *_dev(
                "e1000e,id=e2,netdev=n2,bus=rp1,mac=52:54:00:00:02:ee",
                "e1000,id=e3,netdev=n3,bus=pcibr0,addr=0x1,mac=52:54:00:00:03:e1",
                "rtl8139,id=r4,netdev=n4,bus=pcibr0,addr=0x2,mac=52:54:00:00:04:39",
                "rtl8139,netdev=n5,bus=pcibr0,addr=0x3,mac=52:54:00:00:05:39",
                "e1000e,id=e6,netdev=n6,bus=pcie.0,addr=0x5,mac=52:54:00:00:06:ee",
                "virtio-net-pci,id=v7,netdev=n7,bus=pcie.1,mac=52:54:00:00:07:01",
            ),
        ],
        [],
    ),
    # pc with two pci-bridges: an e1000 and a virtio NIC behind br1, br2 empty.
    "pc-bridges": (
        [
            *("-M", "pc"),
            *_dev("pci-bridge,id=br1,chassis_nr=1,addr=0x3", "pci-bridge,id=br2,chassis_nr=2,addr=0x4"),
            *_net("user,id=n1", "user,id=n2"),
            *_dev(
                "e1000,id=eb1,netdev=n1,bus=br1,addr=0x1,mac=52:54:00:00:0b:01",
                "virtio-net-pci,id=vb2,netdev=n2,bus=br1,addr=0x2,mac=52:54:00:00:0b:02",
            ),
        ],
        [],
    ),
    # pc, a multifunction slot: four NICs in functions 0-3 of slot 5 (the last one anonymous).
    "pc-multifunction": (
        [
            *("-M", "pc"),
            *_net("user,id=n0", "user,id=n1", "user,id=n2", "user,id=n3"),
            *_dev(
                "e1000,id=mf0,netdev=n0,addr=05.0,multifunction=on,mac=52:54:00:00:05:00",
                "rtl8139,id=mf1,netdev=n1,addr=05.1,mac=52:54:00:00:05:01",
                "virtio-net-pci,id=mf2,netdev=n2,addr=05.2,mac=52:54:00:00:05:02",
                "e1000e,netdev=n3,addr=05.3,mac=52:54:00:00:05:03",
            ),
        ],
        [],
    ),
}

Exchange = dict[str, Any]


class Recorder:
    """Runs commands and keeps each exchange as QEMU answered it."""

    def __init__(self, client: QMPClient) -> None:
        self.client = client
        self.exchanges: list[Exchange] = []

    async def __call__(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        exchange: Exchange = {"execute": command}
        if arguments is not None:
            exchange["arguments"] = arguments
        try:
            answer = await self.client.execute(command, arguments)
        except ExecuteError as err:
            exchange["error"] = {"class": err.error_class, "desc": err.error.error.desc}
            self.exchanges.append(exchange)
            return None
        exchange["return"] = answer
        self.exchanges.append(exchange)
        return answer


def children(answer: Any) -> dict[str, str]:
    return {p["name"]: p["type"][6:-1] for p in answer if p["type"].startswith("child<")}


def lineage(parents: dict[str, str | None], qom_type: str) -> list[str]:
    chain: list[str] = []
    current: str | None = qom_type
    while current is not None and current not in chain:
        chain.append(current)
        current = parents.get(current)
    return chain


async def ask_everything(ask: Recorder, hmp: list[str], extra_types: list[str]) -> None:
    await ask("qom-get", {"path": "/machine", "property": "type"})
    machine = children(await ask("qom-list", {"path": "/machine"}))
    for name, qom_type in machine.items():
        if qom_type in HOST_BRIDGES:
            await ask("qom-list", {"path": f"/machine/{name}"})
    types = await ask("qom-list-types", {"implements": "pci-device", "abstract": True})
    parents: dict[str, str | None] = {t["name"]: t.get("parent") for t in types}
    devices = {
        f"{container}/{name}": qom_type
        for container in CONTAINERS
        for name, qom_type in children(await ask("qom-list", {"path": container})).items()
        if qom_type in parents
    }
    properties: dict[str, set[str]] = {}
    for qom_type in sorted(set(devices.values()) | set(extra_types)):
        answer = await ask("device-list-properties", {"typename": qom_type})
        properties[qom_type] = {p["name"] for p in answer}
    for path, qom_type in devices.items():
        for prop in ("parent_bus", "addr", "mac", "netdev", "host"):
            if prop in properties[qom_type] or prop == "parent_bus":
                await ask("qom-get", {"path": path, "property": prop})
        if "base-pci-bridge" in lineage(parents, qom_type):
            await ask("qom-list", {"path": path})
    await ask("query-pci")
    for line in ["info network", *hmp]:
        await ask("human-monitor-command", {"command-line": line})


async def capture(qemu: str, setup: str, workdir: Path) -> Path:
    machine_args, hmp = SETUPS[setup]
    sock = workdir / f"{setup}.qmp"
    argv = [*qemu.split(), *BASE, *machine_args, "-qmp", f"unix:{sock},server=on,wait=off"]
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL)
    try:
        for _ in range(200):
            if sock.exists():
                break
            await asyncio.sleep(0.05)
        client = QMPClient(setup)
        await client.connect(str(sock))
        try:
            ask = Recorder(client)
            await ask_everything(ask, hmp, EXTRA_TYPES.get(setup, []))
            version = cast("dict[str, int]", client.greeting.QMP.version["qemu"] if client.greeting else {})
        finally:
            await client.disconnect()
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
    out = DATA / f"qemu-{version['major']}.{version['minor']}" / f"{setup}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    head = {"qemu": f"{version['major']}.{version['minor']}.{version['micro']}", "args": machine_args}
    lines = [json.dumps(head), *(json.dumps(e, sort_keys=True) for e in ask.exchanges)]
    out.write_text("[\n" + ",\n".join(lines) + "\n]\n")
    return out


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qemu7", default=QEMU7)
    parser.add_argument("--qemu10", default=QEMU10)
    parser.add_argument("setups", nargs="*", default=list(SETUPS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qmpnet-capture-") as tmp:
        for qemu in (args.qemu7, args.qemu10):
            for setup in args.setups:
                print(await capture(qemu, setup, Path(tmp)))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
