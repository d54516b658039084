"""``qmpnet demo``: boot the tiny test guest, hot-plug each NIC model, show what the *guest* saw; again over MQTT.

Every figure in the tables comes from inside the guest (its agent's interface reports), not from QEMU's answers:
the MAC and driver the guest bound, carrier after link down and up, the DHCP address slirp handed out, and how
long the guest took to let go of the NIC on removal.

The first pass talks QMP directly (``qmpnet.connect``). The second is the fleet path end to end: the demo starts
a mosquitto of its own on a free loopback port and ``qmpnet serve`` on a second booted guest, and drives the same
model matrix through the command line in broker mode (``qmpnet nic ... --broker``), printing each command it sent
and what the controller answered. (A second guest because the test guest's e1000e driver no longer reports link
changes once an e1000e has been hot-plugged and removed: each guest sees each model once.)
"""

from __future__ import annotations

import asyncio
import json
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from qmpnet.api.direct import connect
from qmpnet.errors import QmpnetError
from qmpnet.testguest import TestMachine, ensure_image
from qmpnet.testguest.probe import wait_online
from qmpnet.testguest.services import Mosquitto, Serve

if TYPE_CHECKING:
    from collections.abc import Callable

    from qmpnet.guest.guest import Guest
    from qmpnet.testguest import GuestInterface

__all__ = ["run_demo"]

MODELS = (("rtl8139", "8139cp"), ("e1000", "e1000"), ("e1000e", "e1000e"), ("virtio-net-pci", "virtio_net"))
WAIT = 30.0


@dataclass
class Row:
    """What the guest saw of one model."""

    model: str
    expected_driver: str
    mac: str = "-"
    driver: str = "-"
    visible_s: float | None = None
    carrier_down: bool | None = None
    carrier_up: bool | None = None
    address: str = "-"
    removed_s: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every check passed."""
        return not self.problems


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def run_demo(machine: Literal["pc", "q35"] = "pc") -> bool:
    """Run the demo on a ``pc`` or ``q35`` guest; print the table; return whether every check passed.

    Raises:
        QmpnetError: qmpnet itself failed (the message says how).
    """
    _say("qmpnet demo: preparing the test guest (built once from Debian packages, then cached)")
    image = await asyncio.to_thread(ensure_image, None, lambda step: _say(f"  build: {step}"))
    extra: dict[str, Any] = {"root_ports": 4, "pcie_pci_bridge": True} if machine == "q35" else {}
    _say(f"qmpnet demo: booting a {machine} guest (TCG, a few seconds)")
    start = time.monotonic()
    ticker = asyncio.create_task(_tick(start, "booting"))
    try:
        async with TestMachine(image, machine=machine, name=f"demo-{machine}", **extra) as vm:
            ticker.cancel()
            rows = await _run_models(vm, start)
        print(_table(rows, f"What the {machine} guest saw:"))
        # A guest of its own: the test guest's e1000e driver stops reporting link changes after its first hot-plug.
        _say(f"qmpnet demo: booting a second {machine} guest for the MQTT part")
        start = time.monotonic()
        ticker = asyncio.create_task(_tick(start, "booting"))
        async with TestMachine(image, machine=machine, name=f"demo-{machine}-mqtt", **extra) as vm:
            ticker.cancel()
            _say(f"  guest agent up after {time.monotonic() - start:.1f} s")
            over_mqtt = await _run_mqtt(vm)
    finally:
        ticker.cancel()
    print(_table(over_mqtt, f"What the {machine} guest saw over MQTT:"))
    for label, table in (("", rows), ("mqtt ", over_mqtt)):
        for row in table:
            for problem in row.problems:
                print(f"FAIL {label}{row.model}: {problem}")
    ok = all(row.ok for row in (*rows, *over_mqtt)) and len(over_mqtt) == len(MODELS)
    print("all checks passed" if ok else "some checks FAILED")
    return ok


async def _run_models(vm: TestMachine, start: float) -> list[Row]:
    _say(f"  guest agent up after {time.monotonic() - start:.1f} s")
    rows = []
    async with connect(str(vm.qmp_path), name=vm.name) as guest:
        for n, (model, driver) in enumerate(MODELS):
            _say(f"qmpnet demo: {model}")
            rows.append(await _exercise(vm, _Api(guest), model, driver, f"52:54:00:de:00:{n:02x}"))
    return rows


async def _tick(start: float, what: str) -> None:
    """Say every two seconds that ``what`` is still going on (a TCG boot takes a few seconds)."""
    while True:
        await asyncio.sleep(2)  # a progress ticker, not synchronisation
        _say(f"  ... {what} ({time.monotonic() - start:.0f} s)")


class _Api:
    """The first pass's hands: the Python API on a directly connected guest."""

    prefix = "demo"
    failures: tuple[type[Exception], ...] = (QmpnetError, TimeoutError)

    def __init__(self, guest: Guest) -> None:
        self.guest = guest

    async def add(self, model: str, nic_id: str, mac: str) -> None:
        await self.guest.add_nic({"model": model, "id": nic_id, "mac": mac})

    async def set_link(self, nic_id: str, up: bool) -> None:
        await self.guest.set_link(nic_id, up=up)

    async def remove(self, nic_id: str) -> str:
        return (await self.guest.remove_nic(nic_id, timeout=WAIT)).state


async def _exercise(vm: TestMachine, hands: _Api | _Cli, model: str, driver: str, mac: str) -> Row:
    row = Row(model, driver, mac=mac)
    try:
        await _steps(vm, hands, row)
    except hands.failures as err:
        row.problems.append(f"{type(err).__name__}: {err}")
    return row


async def _steps(vm: TestMachine, hands: _Api | _Cli, row: Row) -> None:
    """Hot-add the row's model, check what the guest saw, flap its link, get an address, remove it."""
    nic_id = f"{hands.prefix}{row.model.split('-')[0]}"
    start = time.monotonic()
    await hands.add(row.model, nic_id, row.mac)
    iface = await _wait(vm, row.mac, lambda _: True)
    row.visible_s, row.driver = time.monotonic() - start, iface.driver or "-"
    if row.driver != row.expected_driver:
        row.problems.append(f"guest bound driver {row.driver}, expected {row.expected_driver}")
    await _wait(vm, row.mac, lambda i: i.carrier is True)  # e1000 reports carrier only after its ~2 s watchdog
    await hands.set_link(nic_id, up=False)
    row.carrier_down = (await _wait(vm, row.mac, lambda i: i.carrier is False)).carrier
    await hands.set_link(nic_id, up=True)
    row.carrier_up = (await _wait(vm, row.mac, lambda i: i.carrier is True)).carrier
    result = await vm.agent.dhcp(iface.name)
    if result.rc != 0:
        row.problems.append(f"DHCP failed: {result.output.strip()[-200:]}")
    else:
        row.address = ", ".join((await _wait(vm, row.mac, lambda i: bool(i.ipv4))).ipv4)
    start = time.monotonic()
    removed = await hands.remove(nic_id)
    await vm.agent.wait_for(lambda ifaces: all(i.mac != row.mac for i in ifaces), timeout=WAIT)
    row.removed_s = time.monotonic() - start
    if removed != "removed":
        row.problems.append(f"removal ended {removed}")


async def _wait(vm: TestMachine, mac: str, check: Callable[[GuestInterface], bool]) -> GuestInterface:
    def match(interfaces: list[GuestInterface]) -> GuestInterface | None:
        found = next((i for i in interfaces if i.mac == mac), None)
        return found if found is not None and check(found) else None

    return await vm.agent.wait_for(match, timeout=WAIT)


# ---------------------------------------------------------------------------------------------------- over MQTT


class _Cli:
    """``qmpnet nic ... --broker`` as a user types it: each command and its answer are printed."""

    prefix = "mqtt"
    failures: tuple[type[Exception], ...] = (QmpnetError, TimeoutError, RuntimeError)

    def __init__(self, broker: str, controller: str, guest: str) -> None:
        self.where = ["--broker", broker, "--controller", controller, "--guest", guest]

    async def add(self, model: str, nic_id: str, mac: str) -> None:
        await self("add", "--model", model, "--id", nic_id, "--mac", mac)

    async def set_link(self, nic_id: str, up: bool) -> None:
        await self("link", nic_id, "up" if up else "down")

    async def remove(self, nic_id: str) -> str:
        return str((await self("del", nic_id, "--timeout", f"{WAIT:g}")).get("state"))

    async def __call__(self, *args: str) -> dict[str, Any]:
        argv = ["qmpnet", "nic", *args, *self.where, "--json"]
        print(f"  sent      {shlex.join(argv)}", flush=True)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "qmpnet", *argv[1:], stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        async with asyncio.timeout(WAIT):
            out, err = await process.communicate()
        if process.returncode != 0:
            print(f"  answered  {err.decode().strip()}", flush=True)
            raise RuntimeError(err.decode().strip() or f"exit status {process.returncode}")
        answer: dict[str, Any] = json.loads(out)
        print(f"  answered  {_summary(answer)}", flush=True)
        return answer


def _summary(answer: dict[str, Any]) -> str:
    if "state" in answer and "model" not in answer:
        return f"{answer['id']}: {answer['state']}"
    pci = answer.get("pci") or {}
    where = f"{pci.get('bus')}:{pci.get('slot', 0):02x}.{pci.get('function', 0)}" if pci else "-"
    return f"{answer.get('id')} {answer.get('model')} mac={answer.get('mac')} pci={where} link={answer.get('link')}"


async def _run_mqtt(vm: TestMachine) -> list[Row]:
    """The model matrix again, through a broker and ``qmpnet serve`` on the same guest, driven by the CLI."""
    if shutil.which("mosquitto") is None and shutil.which("mosquitto", path="/usr/sbin") is None:
        _say("qmpnet demo: mosquitto is not installed (./scripts/setup installs it): no MQTT part")
        return []
    work = Path(tempfile.mkdtemp(prefix="qmpnet-demo-mqtt-", dir="/tmp"))
    broker = Mosquitto(work)
    serve = Serve(work, broker.url, "demo", {"vm": vm.qmp_path})
    try:
        broker.start()
        serve.start()
        print(f"\nOver MQTT: mosquitto on {broker.url}, qmpnet serve --controller-id demo --guest vm={vm.qmp_path}")
        cli = _Cli(broker.url, "demo", "vm")
        await wait_online(serve, broker.url, guests_connected=["vm"], timeout=WAIT)
        rows = []
        for n, (model, driver) in enumerate(MODELS):
            _say(f"qmpnet demo (MQTT): {model}")
            rows.append(await _exercise(vm, cli, model, driver, f"52:54:00:de:01:{n:02x}"))
        return rows
    finally:
        serve.stop()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)


def _table(rows: list[Row], title: str) -> str:
    header = ("MODEL", "MAC SEEN", "DRIVER", "VISIBLE", "CARRIER DOWN/UP", "DHCP ADDRESS", "REMOVED", "RESULT")
    lines = [header]
    lines += [
        (r.model, r.mac, r.driver, _secs(r.visible_s), f"{_num(r.carrier_down)}/{_num(r.carrier_up)}", r.address,
         _secs(r.removed_s), "ok" if r.ok else "FAIL")
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    body = "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)
    return f"{title}\n{body}"


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def _num(value: bool | None) -> str:
    return "-" if value is None else str(int(value))
