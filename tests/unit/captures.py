"""Captured QMP exchanges of real QEMU guests (``data/qemu-<version>/<setup>.json``, see ``capture_outputs.py``).

A :class:`Capture` answers a command exactly as QEMU did when the capture was made. A ``qom-get``/``qom-list`` of
a path the capture does not know answers ``DeviceNotFound`` like QEMU; any other question it cannot answer is an
error naming it, so a reader that starts asking something new fails until the captures are regenerated.
:meth:`Capture.forget_device` removes a device from every answer that shows it, as after an unplug, so the fake
QMP server (``fakeqmp.py``) and the parser tests (``test_parse.py``) read a consistent guest.
"""

from __future__ import annotations

import asyncio
import copy
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from qmpnet.adapters.qmp.parse import machine_kind
from qmpnet.adapters.qmp.reader import GuestReader

if TYPE_CHECKING:
    from collections.abc import Coroutine, Mapping

    from qmpnet.core.ports import Observation

__all__ = ["SETUPS", "VERSIONS", "Capture", "QmpError", "observe", "without_net_clients"]

DATA = Path(__file__).parent / "data"
VERSIONS = ("7.2", "10.0")
_T = TypeVar("_T")
SETUPS = ("pc", "pc-models", "pc-bridges", "pc-multifunction", "q35", "q35-bridge")


class QmpError(Exception):
    """A QMP error answer (raise it from a fake's handler, or get it from :meth:`Capture.answer`)."""

    def __init__(self, desc: str, klass: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.klass = klass


def _key(command: str, arguments: Mapping[str, Any] | None) -> str:
    return json.dumps([command, dict(arguments or {})], sort_keys=True)


@dataclass
class Capture:
    """The exchanges of one captured guest, by question."""

    qemu: str
    args: list[str]
    answers: dict[str, dict[str, Any]]

    @classmethod
    def load(cls, version: str, setup: str) -> Capture:
        """Read ``data/qemu-<version>/<setup>.json``."""
        head, *exchanges = json.loads((DATA / f"qemu-{version}" / f"{setup}.json").read_text())
        answers = {_key(e["execute"], e.get("arguments")): e for e in exchanges}
        return cls(str(head["qemu"]), list(head["args"]), answers)

    @property
    def version(self) -> tuple[int, int, int]:
        """QEMU's version as ``(major, minor, micro)``."""
        major, minor, micro = (int(part) for part in self.qemu.split("."))
        return major, minor, micro

    def copy(self) -> Capture:
        """An independent copy (a test may change it)."""
        return Capture(self.qemu, list(self.args), copy.deepcopy(self.answers))

    def answer(self, command: str, arguments: Mapping[str, Any] | None = None) -> object:
        """QEMU's answer to ``command``.

        Raises:
            QmpError: QEMU answered with an error, the path is unknown (``DeviceNotFound``), or it was not captured.
        """
        exchange = self.answers.get(_key(command, arguments))
        if exchange is None:
            path = (arguments or {}).get("path")
            if command in ("qom-get", "qom-list") and isinstance(path, str):
                raise QmpError(f"Device '{path}' not found", "DeviceNotFound")
            raise QmpError(f"the capture has no answer to {command} {dict(arguments or {})}")
        if "error" in exchange:
            raise QmpError(exchange["error"]["desc"], exchange["error"]["class"])
        return copy.deepcopy(exchange["return"])

    def set_answer(self, command: str, arguments: Mapping[str, Any] | None, value: object) -> None:
        """Make ``command`` answer ``value`` from now on."""
        self.answers[_key(command, arguments)] = {"execute": command, "arguments": arguments, "return": value}

    def hmp(self, command_line: str) -> str:
        """The captured text of HMP ``command_line``."""
        return str(self.answer("human-monitor-command", {"command-line": command_line}))

    def forget_device(self, device_id: str) -> None:
        """Remove device ``device_id`` and its NIC client from every answer, as an unplug does (the backend stays)."""
        path = f"/machine/peripheral/{device_id}"
        listing = self.answers[_key("qom-list", {"path": "/machine/peripheral"})]
        listing["return"] = [p for p in listing["return"] if p["name"] != device_id]
        for key, exchange in list(self.answers.items()):
            target = (exchange.get("arguments") or {}).get("path")
            if isinstance(target, str) and (target == path or target.startswith(f"{path}/")):
                del self.answers[key]
        pci = self.answers[_key("query-pci", None)]
        pci["return"] = [_without_pci(bus, device_id) for bus in pci["return"]]
        network = self.answers[_key("human-monitor-command", {"command-line": "info network"})]
        network["return"] = without_net_clients(network["return"], device_id)

    # ------------------------------------------------------------------------------- changes, as QEMU makes them

    def add_netdev(self, netdev_id: str, netdev_type: str) -> None:
        """Show a new backend in ``info network``, as ``netdev_add`` does."""
        info = "net=10.0.2.0,restrict=off" if netdev_type == "user" else ""
        self._set_network(self.hmp("info network") + f"{netdev_id}: index=0,type={netdev_type},{info}\r\n")

    def delete_netdev(self, netdev_id: str) -> None:
        """Drop a backend from ``info network`` (as ``netdev_del``; a NIC it was attached to stays, without peer)."""
        lines = self.hmp("info network").splitlines(keepends=True)
        gone = (f"{netdev_id}: ", f" \\ {netdev_id}: ")
        self._set_network("".join(line for line in lines if not line.startswith(gone)))

    def add_device(self, arguments: Mapping[str, Any]) -> None:
        """Put the device ``device_add`` was given into every answer that shows devices.

        QOM (the ``/machine/peripheral`` listing, ``parent_bus``, ``addr``, ``mac``, ``netdev``, ``host``),
        ``query-pci`` when it sits on the root bus, and ``info network`` (the NIC, with its backend as peer).
        Without ``addr`` it takes the first free slot of the bus, as QEMU does. A type the capture has no
        ``device-list-properties`` answer for is given a minimal one (``addr``, ``mac``, ``netdev`` or ``host``).
        """
        driver, device_id = str(arguments["driver"]), str(arguments["id"])
        root_name, root_path = self._root()
        bus_name = str(arguments.get("bus", root_name))
        bus_path = root_path if bus_name == root_name else self._bus_path(bus_name)
        slot, function = _devfn(arguments.get("addr")) if "addr" in arguments else (self._free_slot(bus_path), 0)
        path = f"/machine/peripheral/{device_id}"
        listing = self.answers[_key("qom-list", {"path": "/machine/peripheral"})]["return"]
        listing.append({"name": device_id, "type": f"child<{driver}>"})
        mac = str(arguments.get("mac", f"52:54:00:fa:{slot:02x}:{function:02x}"))
        values: dict[str, object] = {"parent_bus": bus_path, "addr": slot << 3 | function}
        if driver == "vfio-pci":
            values["host"] = str(arguments.get("host", ""))
        else:
            values |= {"mac": mac, "netdev": str(arguments.get("netdev", ""))}
        for prop, value in values.items():
            self.set_answer("qom-get", {"path": path, "property": prop}, value)
        if _key("device-list-properties", {"typename": driver}) not in self.answers:
            props = [{"name": name, "type": "str"} for name in ["addr", *values] if name != "parent_bus"]
            self.set_answer("device-list-properties", {"typename": driver}, props)
        if bus_path == root_path:
            pci = self.answers[_key("query-pci", None)]["return"]
            cls = {"class": 512, "desc": "Ethernet controller"}
            pci[0]["devices"].append({"bus": 0, "slot": slot, "function": function, "qdev_id": device_id,
                                      "class_info": cls, "id": {"device": 0, "vendor": 0}, "regions": []})  # fmt: skip
        if driver != "vfio-pci":
            self._attach_nic(device_id, driver, mac, str(arguments.get("netdev", "")))

    def _set_network(self, text: str) -> None:
        self.set_answer("human-monitor-command", {"command-line": "info network"}, text)

    def _attach_nic(self, device_id: str, driver: str, mac: str, netdev: str) -> None:
        lines = self.hmp("info network").splitlines(keepends=True)
        backend = next((line for line in lines if netdev and line.startswith(f"{netdev}: ")), None)
        lines = [line for line in lines if line is not backend]
        lines.append(f"{device_id}: index=0,type=nic,model={driver},macaddr={mac}\r\n")
        if backend is not None:
            lines.append(f" \\ {backend}")
        self._set_network("".join(lines))

    def _root(self) -> tuple[str, str]:
        machine = self.answer("qom-list", {"path": "/machine"})
        assert isinstance(machine, list)
        host = next(p["name"] for p in machine if p["type"] in ("child<i440FX-pcihost>", "child<q35-pcihost>"))
        listing = self.answer("qom-list", {"path": f"/machine/{host}"})
        assert isinstance(listing, list)
        bus = next(p["name"] for p in listing if p["type"] in ("child<PCI>", "child<PCIE>"))
        return bus, f"/machine/{host}/{bus}"

    def _bus_path(self, bus_name: str) -> str:
        for exchange in self.answers.values():
            path = (exchange.get("arguments") or {}).get("path", "")
            if exchange["execute"] != "qom-list" or not path.startswith("/machine/peripheral"):
                continue
            if any(p["name"] == bus_name and p["type"] in ("child<PCI>", "child<PCIE>") for p in exchange["return"]):
                return f"{path}/{bus_name}"
        raise QmpError(f"Bus '{bus_name}' not found", "GenericError")

    def _free_slot(self, bus_path: str) -> int:
        used = {
            self.answers[_key("qom-get", {**e["arguments"], "property": "addr"})]["return"] >> 3
            for e in self.answers.values()
            if e["execute"] == "qom-get" and e["arguments"].get("property") == "parent_bus" and e["return"] == bus_path
        }
        if bus_path == self._root()[1]:
            pci = self.answer("query-pci")
            assert isinstance(pci, list)
            used |= {dev["slot"] for dev in pci[0]["devices"]}
        return next(slot for slot in range(1, 32) if slot not in used)

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> object:
        """:meth:`answer` as a monitor's ``execute`` (for a :class:`GuestReader` without a socket).

        Raises:
            QmpCommandError: What :meth:`answer` raises, as the QMP adapter translates it.
        """
        from qmpnet.errors import QmpCommandError  # noqa: PLC0415 - kept next to the one place that needs it

        try:
            return self.answer(command, arguments)
        except QmpError as err:
            raise QmpCommandError(f"{command}: {err.desc}", qmp_class=err.klass, command=command) from err


def _devfn(addr: object) -> tuple[int, int]:
    slot, _, function = str(addr).partition(".")
    return int(slot, 16), int(function or "0")


def _without_pci(bus: dict[str, Any], device_id: str) -> dict[str, Any]:
    devices = []
    for dev in bus["devices"]:
        if dev.get("qdev_id") == device_id:
            continue
        bridge = dev.get("pci_bridge")
        if bridge is not None and "devices" in bridge:
            bridge["devices"] = [d for d in bridge["devices"] if d.get("qdev_id") != device_id]
        devices.append(dev)
    return {**bus, "devices": devices}


def without_net_clients(network: str, nic_name: str) -> str:
    """``info network`` text without the top-level NIC client ``nic_name``; its backend stays, on a line of its own.

    That is what QEMU shows once a NIC is unplugged: the netdev lives on until ``netdev_del``.
    """
    lines = network.splitlines(keepends=True)
    kept: list[str] = []
    dropping = False
    for line in lines:
        if not line.startswith(" \\ "):
            dropping = line.startswith(f"{nic_name}: ")
            if dropping:
                continue
        if dropping:
            kept.append(line.removeprefix(" \\ "))
            dropping = False
            continue
        kept.append(line)
    return "".join(kept)


def _run(coro: Coroutine[Any, Any, _T]) -> _T:
    # In a thread of its own, so it works whether or not the caller runs an event loop.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def observe(capture: Capture, reader: GuestReader | None = None) -> Observation:
    """What the QMP adapter observes of ``capture``'s guest (synchronously)."""
    machine, kind = machine_kind(str(capture.answer("qom-get", {"path": "/machine", "property": "type"})))
    reader = reader or GuestReader(capture.execute, attempts=3)
    return _run(reader.read(machine, kind))
