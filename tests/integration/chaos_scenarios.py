"""Chaos scenarios: QEMU and the controller killed with SIGKILL again and again, and what must hold after each.

Used by tests/integration/test_chaos.py (marker ``chaos``) and by bench/chaos.py, which prints the figures.

* :func:`qemu_restarts` — a booted guest under ``qmpnet serve`` with a retained desired set of a virtio, an e1000
  and an rtl8139 NIC; QEMU is killed (SIGKILL) and started again on the same socket, round after round. After each
  restart the guest itself must see all three NICs with the same MACs, and QEMU must hold exactly those three.
* :func:`controller_kills` — a booted guest; a client drives a burst of hot-adds (ids chosen by qmpnet) and a
  removal over MQTT while the controller is killed at a random point: at a random moment, or right after a
  random QMP command (``netdev_add`` — between it and ``device_add`` —, ``device_add``, ``device_del``) through
  the test-only fault hook (tests/integration/faults.py). The client behaves as an orchestrator should: it
  repeats an unanswered request with the same transaction once the controller is back. After each round there
  must be no orphan netdev, no second copy of any NIC (nothing applied twice), the desired set converged.

Each scenario returns the convergence times it measured (seconds from the restart to the checked state).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, cast

from aux_qmp import aux_args, aux_monitor
from mqtt_fixtures import Mosquitto, Probe, Serve, wait_online, wait_retained
from waiting import eventually

from qmpnet.client import Client
from qmpnet.errors import GuestUnavailable, OutcomeUnknown, QmpnetError
from qmpnet.testguest import TestMachine

if TYPE_CHECKING:
    from qmpnet.core.model import Nic
    from qmpnet.testguest import GuestImage

__all__ = ["ChaosResult", "controller_kills", "qemu_restarts"]

FAULTS = Path(__file__).with_name("faults.py")
DESIRED = [
    {"id": "cv", "model": "virtio-net-pci", "mac": "52:54:00:c4:a0:01"},
    {"id": "ce", "model": "e1000", "mac": "52:54:00:c4:a0:02"},
    {"id": "cr", "model": "rtl8139", "mac": "52:54:00:c4:a0:03"},
]
FAULT_POINTS = ("netdev_add", "device_add", "device_del")


@dataclass
class ChaosResult:
    """What a scenario measured."""

    rounds: int
    convergence: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """``median / max`` of the convergence times."""
        times = sorted(self.convergence)
        if not times:
            return "no rounds"
        return f"median {times[len(times) // 2]:.2f} s, max {times[-1]:.2f} s over {len(times)} rounds"


async def qemu_netdevs(workdir: Path) -> list[str]:
    """The backends QEMU holds (``info network`` lines that are not NICs), read over the second monitor."""
    async with aux_monitor(workdir) as aux:
        text = str(await aux.execute("human-monitor-command", {"command-line": "info network"}))
    names = []
    for line in text.splitlines():
        body = line.removeprefix(" \\ ").strip()
        name, _, info = body.partition(": ")
        if name and "type=nic" not in info and not line.startswith("hub "):
            names.append(name)
    return names


async def qemu_nics(workdir: Path) -> dict[str, str]:
    """NIC id -> MAC of every NIC device under /machine/peripheral (QEMU's own view)."""
    async with aux_monitor(workdir) as aux:
        children = cast("list[dict[str, str]]", await aux.execute("qom-list", {"path": "/machine/peripheral"}))
        found = {}
        for child in children:
            if not child["type"].startswith("child<"):
                continue
            path = f"/machine/peripheral/{child['name']}"
            props = {p["name"] for p in cast("list[dict[str, str]]", await aux.execute("qom-list", {"path": path}))}
            if "netdev" in props:
                found[child["name"]] = str(await aux.execute("qom-get", {"path": path, "property": "mac"}))
        return found


class FaultyServe(Serve):
    """``qmpnet serve`` that kills itself right after the ``nth`` answer to QMP command ``fault``."""

    def __init__(self, *args: Any, fault: str | None = None, nth: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fault = fault
        self.nth = nth

    def start(self) -> Self:
        """Start (through the fault hook when a fault is set)."""
        argv = ["serve", "--broker", self.broker, "--controller-id", self.controller_id]
        for name, path in self.guests.items():
            argv += ["--guest", f"{name}={path}"]
        argv += self.args
        if self.fault is None:
            self.spawn([sys.executable, "-m", "qmpnet", *argv], env=self.env)
        else:
            hook = [sys.executable, str(FAULTS), "--die-after", self.fault, "--nth", str(self.nth), "--"]
            self.spawn([*hook, *argv], env=self.env)
        return self


async def wait_guest_sees(vm: TestMachine, macs: list[str], timeout: float) -> None:
    """Until the guest's agent reports every MAC in ``macs``."""
    async with asyncio.timeout(timeout):
        for mac in macs:
            await vm.wait_nic(mac, timeout=timeout)


async def qemu_restarts(image: GuestImage, workdir: Path, rounds: int) -> ChaosResult:
    """Kill QEMU ``rounds`` times under a controller with a desired set; see the module docstring."""
    result = ChaosResult(rounds)
    macs = [str(nic["mac"]) for nic in DESIRED]
    qemu_dir = workdir / "vm"
    qemu_dir.mkdir()
    broker = Mosquitto(workdir).start()
    serve = Serve(workdir, broker.url, "chaos", {"vm": qemu_dir / "qmp.sock"},
                  env={"QMPNET_RECONCILE__RESYNC_INTERVAL": "2"})
    vm = TestMachine(image, workdir=qemu_dir, name="chaos-vm", extra_args=aux_args(qemu_dir))
    try:
        await vm.start()
        serve.start()
        await wait_online(serve, broker.url, guests_connected=["vm"])
        async with Probe(broker.url) as probe:
            await probe.publish("qmpnet/chaos/guest/vm/desired", json.dumps({"generation": 1, "nics": DESIRED}),
                                retain=True)
        await wait_guest_sees(vm, macs, 60)
        for _ in range(rounds):
            os.kill(cast("int", vm.pid), signal.SIGKILL)
            await vm.stop()
            vm = TestMachine(image, workdir=qemu_dir, name="chaos-vm", extra_args=aux_args(qemu_dir))
            started = time.monotonic()
            await vm.start()
            await wait_guest_sees(vm, macs, 60)
            result.convergence.append(time.monotonic() - started)
            assert await qemu_nics(qemu_dir) == {str(n["id"]): str(n["mac"]) for n in DESIRED}
            assert sorted(await qemu_netdevs(qemu_dir)) == sorted(f"{n['id']}.net" for n in DESIRED)
        status = await wait_retained(broker.url, "qmpnet/chaos/guest/vm/status",
                                     lambda s: (s.get("desired") or {}).get("converged") is True)
        assert status["desired"]["generation"] == 1
    finally:
        await vm.stop()
        serve.stop()
        broker.stop()
    return result


@dataclass
class _Op:
    """One request of the burst, and what became of it."""

    op: str
    args: dict[str, Any]
    transaction: str
    done: bool = False


async def _settle(client: Client, op: _Op, nics: dict[str, Nic]) -> None:
    """Send ``op`` until it has a definitive answer, repeating its transaction; a lost add is re-sent anew."""
    for _ in range(40):
        try:
            await client.call("chaos", "vm", op.op, op.args, transaction=op.transaction, timeout=5)
        except (GuestUnavailable, OutcomeUnknown) as err:
            if "interrupted" in err.message:
                # The controller died while it ran and recovery settled it: look before trying again.
                present = {nic.mac for nic in (await client.list_nics("chaos", "vm"))}
                wanted = op.args.get("nic", {}).get("mac")
                if op.op == "nic/add" and wanted in present:
                    op.done = True
                    return
                op.transaction = f"{op.transaction}-again"
            await asyncio.sleep(0.25)  # the controller is restarting: try again shortly (bounded: 40 tries)
        except QmpnetError as err:
            if op.op == "nic/del" and err.code == "not_found" and op.args["id"] not in nics:
                op.done = True
                return
            raise
        else:
            op.done = True
            return
    raise AssertionError(f"{op.op} {op.args} never got an answer")


async def controller_kills(image: GuestImage, workdir: Path, rounds: int, *, seed: int = 7) -> ChaosResult:
    """Kill the controller ``rounds`` times during bursts of changes; see the module docstring."""
    rng = random.Random(seed)  # noqa: S311 - reproducible chaos, not cryptography
    result = ChaosResult(rounds)
    qemu_dir = workdir / "vm"
    qemu_dir.mkdir()
    broker = Mosquitto(workdir).start()
    vm = TestMachine(image, workdir=qemu_dir, name="chaos-ctl", extra_args=aux_args(qemu_dir))
    await vm.start()
    lab = _Lab(workdir, broker, qemu_dir)
    try:
        async with Client(broker.url, timeout=5) as client:
            for round_no in range(rounds):
                fault = rng.choice((None, *FAULT_POINTS))
                seconds = await _one_round(lab, client, vm, round_no, fault, rng)
                result.convergence.append(seconds)
                result.notes.append(f"round {round_no}: fault {fault or 'timed kill'}")
    finally:
        lab.stop()
        await vm.stop()
        broker.stop()
    return result


@dataclass
class _Lab:
    workdir: Path
    broker: Mosquitto
    qemu_dir: Path
    serve: FaultyServe | None = None

    def restart(self, fault: str | None = None, nth: int = 1) -> FaultyServe:
        """Kill the running controller (if any) and start one, optionally armed with a fault."""
        self.stop()
        self.serve = FaultyServe(self.workdir, self.broker.url, "chaos", {"vm": self.qemu_dir / "qmp.sock"},
                                 args=["--state-dir", str(self.workdir / "state")], fault=fault, nth=nth)
        return self.serve.start()

    def stop(self) -> None:
        if self.serve is not None:
            self.serve.kill()
            self.serve = None


async def _one_round(  # noqa: PLR0917 - one round's coordinates
    lab: _Lab, client: Client, vm: TestMachine, round_no: int, fault: str | None, rng: random.Random
) -> float:
    """Adds and a removal with the controller killed on the way; returns the time from the clean restart on."""
    mac_gone = f"52:54:00:c5:{round_no:02x}:02"
    serve = lab.restart(fault, rng.randint(1, 2))
    killer = None if fault is not None else asyncio.get_running_loop().call_later(rng.uniform(0.2, 2.5), serve.kill)
    burst = [
        _Op("nic/add", {"nic": {"model": "e1000", "mac": f"52:54:00:c5:{round_no:02x}:01"}}, f"r{round_no}-keep"),
        _Op("nic/add", {"nic": {"model": "virtio", "mac": mac_gone}}, f"r{round_no}-gone"),
    ]
    await _burst(client, burst)
    if not serve.running or not all(op.done for op in burst):
        lab.restart()  # killed during the adds: finish them (same transactions) on a clean controller
        await _replay(client, burst)
    nics = {nic.id: nic for nic in await _until(lambda: _listed(lab, client))}
    delete = _Op("nic/del", {"id": next(n.id for n in nics.values() if n.mac == mac_gone), "timeout": 10},
                 f"r{round_no}-del")
    await _burst(client, [delete])
    if killer is not None:
        killer.cancel()
    started = time.monotonic()
    serve = lab.restart()  # whatever ran is killed now (mid-removal or not); a clean restart must converge
    await wait_online(serve, lab.broker.url, guests_connected=["vm"])
    await _replay(client, [*burst, delete])
    await _check_round(client, vm, lab.qemu_dir, round_no)
    status = await wait_retained(lab.broker.url, "qmpnet/chaos/guest/vm/status",
                                 lambda s: (s.get("desired") or {}).get("converged") is True)
    assert status["desired"]["errors"] == []
    return time.monotonic() - started


async def _listed(lab: _Lab, client: Client) -> list[Nic]:
    """The guest's NICs; a controller the random kill took after the burst had its answers is started again first.

    Nothing else would restart it then: the burst saw every answer, and the round goes on to list and delete.
    """
    if lab.serve is None or not lab.serve.running:
        lab.restart()
    return await client.list_nics("chaos", "vm")


async def _until(call: Any, timeout: float = 20) -> Any:
    """``await call()`` until the controller answers it (it may be restarting)."""
    return await eventually(
        call, timeout=timeout, interval=0.25, retry=(GuestUnavailable, OutcomeUnknown), what="the controller's answer"
    )


async def _burst(client: Client, ops: list[_Op]) -> None:
    """Send ``ops`` while the controller may die; what gets no answer is replayed after the restart."""
    for op in ops:
        try:
            await client.call("chaos", "vm", op.op, op.args, transaction=op.transaction, timeout=5)
            op.done = True
        except (GuestUnavailable, OutcomeUnknown):
            return


async def _replay(client: Client, ops: list[_Op]) -> None:
    """Repeat every request of the round with its transaction: a done one must not be applied again."""
    nics = {nic.id: nic for nic in await _until(lambda: client.list_nics("chaos", "vm"))}
    for op in ops:
        await _settle(client, op, nics)


async def _check_round(client: Client, vm: TestMachine, qemu_dir: Path, round_no: int) -> None:
    mac_keep, mac_gone = f"52:54:00:c5:{round_no:02x}:01", f"52:54:00:c5:{round_no:02x}:02"
    in_qemu = await qemu_nics(qemu_dir)
    macs = sorted(in_qemu.values())
    assert macs.count(mac_keep) == 1, f"round {round_no}: {in_qemu}"  # added once, never twice
    assert mac_gone not in macs, f"round {round_no}: {in_qemu}"
    netdevs = await qemu_netdevs(qemu_dir)
    assert sorted(netdevs) == sorted(f"{nic_id}.net" for nic_id in in_qemu), f"orphan netdev: {netdevs}"
    listed = {nic.id for nic in await _until(lambda: client.list_nics("chaos", "vm"))}
    assert listed == set(in_qemu)
    await vm.wait_nic(mac_keep, timeout=30)
    await vm.wait_nic_gone(mac_gone, timeout=30)
