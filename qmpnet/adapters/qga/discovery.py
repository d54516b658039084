"""Find a guest's agent socket from its QMP monitor, where QEMU allows it.

The guest agent listens on a virtio-serial port named ``org.qemu.guest_agent.0``; QEMU wires that port to a
chardev. ``qom-list`` of ``/machine/peripheral`` and ``/machine/peripheral-anon`` gives the ``virtserialport``
devices, ``qom-get`` their ``name`` and ``chardev`` (the chardev's label), and ``query-chardev`` the chardev's
``filename``, e.g. ``disconnected:unix:/run/vm1.qga,server=on``. Only a unix socket on which QEMU is the server
can be connected to; a chardev where QEMU is the client (libvirt's usual setup is a server too), a TCP socket, a
pty or a file gives ``None``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qmpnet.errors import QmpCommandError

if TYPE_CHECKING:
    from qmpnet.core.ports import Monitor

__all__ = ["AGENT_PORT_NAME", "find_agent_socket", "server_socket_path"]

AGENT_PORT_NAME = "org.qemu.guest_agent.0"
_PERIPHERALS = ("/machine/peripheral", "/machine/peripheral-anon")
_PORT_TYPE = "child<virtserialport>"
_SERVER = ",server=on"


def server_socket_path(filename: str) -> Path | None:
    """The unix socket path of a chardev ``filename`` from ``query-chardev`` when QEMU is its server, else None."""
    spec = filename.removeprefix("disconnected:")
    if not spec.startswith("unix:") or _SERVER not in spec:
        return None
    path = spec.removeprefix("unix:").rpartition(_SERVER)[0]
    return Path(path) if path.startswith("/") else None


async def find_agent_socket(monitor: Monitor) -> Path | None:
    """The unix socket of the guest agent's port, or ``None`` when QEMU has none that can be connected to.

    Costs ``query-chardev``, two ``qom-list`` and two ``qom-get`` per ``virtserialport``.

    Raises:
        OutcomeUnknown, GuestUnavailable: As the monitor's ``execute`` (the monitor itself failed).
    """
    chardevs = await monitor.execute("query-chardev")
    filenames: dict[str, str] = {}
    if isinstance(chardevs, list):
        for entry in chardevs:
            if isinstance(entry, dict) and isinstance(entry.get("label"), str):
                filenames[entry["label"]] = str(entry.get("filename", ""))
    for port in await _virtserialports(monitor):
        if await _qom_get(monitor, port, "name") != AGENT_PORT_NAME:
            continue
        label = await _qom_get(monitor, port, "chardev")
        if label is not None and label in filenames:
            return server_socket_path(filenames[label])
    return None


async def _virtserialports(monitor: Monitor) -> list[str]:
    ports: list[str] = []
    for parent in _PERIPHERALS:
        try:
            children = await monitor.execute("qom-list", {"path": parent})
        except QmpCommandError:
            continue  # no such container: no device of that kind was created
        if isinstance(children, list):
            ports += [
                f"{parent}/{child['name']}"
                for child in children
                if isinstance(child, dict) and child.get("type") == _PORT_TYPE
            ]
    return ports


async def _qom_get(monitor: Monitor, path: str, prop: str) -> str | None:
    try:
        value = await monitor.execute("qom-get", {"path": path, "property": prop})
    except QmpCommandError:
        return None
    return value if isinstance(value, str) else None
