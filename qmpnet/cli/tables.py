"""The readable tables of the ``nic`` commands, made from the MQTT API's JSON objects.

They read JSON (a NIC as ``nic/add`` answers it), not the models: the quick path (:mod:`.quick`) prints the
controller's answer without loading pydantic, and the full command line dumps its models into the same objects.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from qmpnet.cli.output import format_rows

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence


def nic_table(nics: Sequence[Mapping[str, Any]]) -> str:
    """Format NICs as a table."""
    rows = [("ID", "MODEL", "MAC", "NETDEV", "BACKEND", "PCI", "LINK", "STATE")]
    for nic in nics:
        pci, backend = nic.get("pci"), nic.get("backend")
        where = f"{pci['bus']}:{pci['slot']:02x}.{pci['function']}" if pci else "-"
        rows.append((nic["id"], nic["model"], nic.get("mac") or "-", nic.get("netdev") or "-",
                     backend["type"] if backend else "-", where, nic["link"], _state(nic)))  # fmt: skip
    return format_rows(rows)


def _state(nic: Mapping[str, Any]) -> str:
    """The NIC's state; a pending removal with since when (UTC), e.g. ``removal_pending since 05:41:07Z``."""
    if nic.get("pending_since") is None:
        return str(nic["state"])
    since = time.gmtime(nic["pending_since"])
    day = "" if since[:3] == time.gmtime()[:3] else time.strftime("%Y-%m-%d ", since)
    return f"{nic['state']} since {day}{time.strftime('%H:%M:%SZ', since)}"


def warning_lines(nic: Mapping[str, Any]) -> str:
    """``warning: ...`` lines under a NIC's table row, one per warning of the answer."""
    return "".join(f"\nwarning: {warning}" for warning in nic.get("warnings") or ())


def backend_line(nic: Mapping[str, Any]) -> str:
    """``backend: bridge bridge=br1 tap=vnet0 rate=5mbit``, under a NIC's table row."""
    backend = nic.get("backend")
    if not backend:
        return ""
    options = " ".join(f"{key}={value}" for key, value in (backend.get("options") or {}).items())
    return f"\nbackend: {backend['type']} {options}".rstrip()
