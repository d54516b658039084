"""Syntax rules for the names qmpnet hands to QEMU, the host and the broker: QEMU ids, MACs, PCI addresses, bus names.

These are pure functions with no I/O so the rules can be tested with tables and property-based tests. They raise
plain ``ValueError`` with a sentence; the pydantic models at the edge turn that into an ``invalid_request`` that
names the field.
"""

from __future__ import annotations

import re
import secrets
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Collection

__all__ = [
    "BUS_NAME_PATTERN",
    "BUS_NAME_RULE",
    "QEMU_ID_MAX",
    "check_bus_name",
    "check_qemu_id",
    "format_pci_addr",
    "generate_mac",
    "normalize_mac",
    "parse_pci_addr",
    "safe_bus_name",
]

#: Controller ids, guest names and client ids as they appear in MQTT topic levels. No ``.``: RabbitMQ maps MQTT
#: topics to AMQP routing keys, turning ``/`` into ``.`` and ``.`` into ``/``, so ``h1.lab`` would become two levels.
#: No ``+``, ``#`` or ``/`` either (wildcards, level separator), and nothing outside ASCII.
BUS_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
#: The same rule in words, for error messages.
BUS_NAME_RULE = "1 to 64 letters, digits, '_' or '-' (no '.': some brokers rewrite it to a topic level)"
_BUS_NAME = re.compile(BUS_NAME_PATTERN)
#: QEMU itself has no length limit; we keep ids short enough to appear in topics, logs and tap names.
QEMU_ID_MAX = 64
_QEMU_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
_MAC = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}")
_PCI_ADDR = re.compile(r"(?:0x)?([0-9A-Fa-f]{1,2})(?:\.([0-7]))?")
#: The locally administered prefix QEMU and libvirt use for generated MACs.
QEMU_OUI = (0x52, 0x54, 0x00)
_OUI_TEXT = ":".join(f"{octet:02x}" for octet in QEMU_OUI)


def check_qemu_id(value: str) -> str:
    """Return ``value`` if QEMU accepts it as a device or netdev id.

    QEMU's rule (``id_wellformed``): a letter, then letters, digits, ``-``, ``.`` or ``_``.

    Raises:
        ValueError: The id is empty, too long or has a character QEMU refuses.
    """
    if not value:
        raise ValueError("must not be empty")
    if len(value) > QEMU_ID_MAX:
        raise ValueError(f"must be at most {QEMU_ID_MAX} characters")
    if not _QEMU_ID.fullmatch(value):
        raise ValueError("must start with a letter and contain only letters, digits, '-', '.' and '_'")
    return value


def check_bus_name(value: str) -> str:
    """Return ``value`` if it can be a controller id, guest name or client id in a topic level.

    Raises:
        ValueError: It breaks :data:`BUS_NAME_RULE`.
    """
    if not _BUS_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid name: use {BUS_NAME_RULE}")
    return value


def safe_bus_name(value: str, fallback: str) -> str:
    """``value`` made into a bus name: every character outside the alphabet becomes ``-``, cut to 64 characters.

    Used for the default controller id, the host name: ``h1.lab.example`` becomes ``h1-lab-example``.
    """
    name = re.sub(r"[^A-Za-z0-9_-]", "-", value)[:64].strip("-")
    return name if _BUS_NAME.fullmatch(name) else fallback


def normalize_mac(value: str) -> str:
    """Return ``value`` as a lower-case ``xx:xx:xx:xx:xx:xx`` unicast MAC.

    Raises:
        ValueError: Not six colon-separated hex octets, multicast, or all zero.
    """
    if not _MAC.fullmatch(value):
        raise ValueError("must be six colon-separated hex octets such as 52:54:00:12:34:56")
    octets = bytes(int(part, 16) for part in value.split(":"))
    if octets[0] & 0x01:
        raise ValueError("must be a unicast address (the low bit of the first octet is set)")
    if not any(octets):
        raise ValueError("must not be all zero")
    return value.lower()


def generate_mac(taken: Collection[str]) -> str:
    """Return a random ``52:54:00:xx:xx:xx`` MAC that is not in ``taken`` (lower-case MACs).

    Raises:
        ValueError: Could not find a free MAC (only if nearly all 16 million are taken).
    """
    for _ in range(1000):
        tail = secrets.token_bytes(3)
        mac = f"{_OUI_TEXT}:{tail.hex(':')}"  # lower-case, as normalize_mac gives
        if mac not in taken and any(tail):
            return mac
    raise ValueError("no free MAC address could be generated")


def parse_pci_addr(value: str) -> tuple[int, int]:
    """Parse QEMU's ``slot[.function]`` address (slot in hex, as QEMU reads it) into ``(slot, function)``.

    Raises:
        ValueError: Not of that form, or the slot is above 0x1f.
    """
    match = _PCI_ADDR.fullmatch(value.strip())
    if not match:
        raise ValueError("must be 'slot[.function]' with a hex slot (0-1f) and a function 0-7, e.g. '5' or '0x1f.0'")
    slot = int(match.group(1), 16)
    if slot > 0x1F:
        raise ValueError("slot must be at most 0x1f")
    function = int(match.group(2) or "0")
    return slot, function


def format_pci_addr(slot: int, function: int) -> str:
    """Format ``(slot, function)`` the way QEMU's ``addr`` property reads it."""
    return f"{slot:02x}.{function}"
