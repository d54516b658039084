"""Syntax rules for the host-side names qmpnet makes or is given: interfaces, tap patterns, namespaces.

Interface names reach the kernel, log lines and (through the CLI and MQTT) people's shells, so qmpnet accepts
far less than the kernel does: at most 15 bytes of ``[A-Za-z0-9_.-]``, never ``.`` or ``..``. That one
alphabet already rules out slashes, whitespace, NUL and every shell metacharacter, and the messages still say
which rule a name broke. These are pure functions; they raise :class:`InvalidRequest` naming the field the
caller gave (``nic.backend.bridge``, ``nic.backend.ifname``, ...).
"""

from __future__ import annotations

import re

from qmpnet.errors import InvalidRequest

__all__ = [
    "IFNAME_MAX",
    "TAP_PATTERN_DEFAULT",
    "check_ifname",
    "check_netns",
    "check_tap_pattern",
    "tap_pattern_kernel",
    "tap_pattern_regex",
]

#: IFNAMSIZ is 16 bytes with the terminating NUL.
IFNAME_MAX = 15
TAP_PATTERN_DEFAULT = "vnet{n}"
#: The kernel numbers at most 32768 devices per ``%d`` pattern: five digits must still fit in IFNAME_MAX.
_TAP_NUMBER_DIGITS = 5
_IFNAME = re.compile(r"[A-Za-z0-9_.-]+")
_NETNS = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_NETNS_PATH = re.compile(r"/[A-Za-z0-9_./-]{1,254}")
_METACHARACTERS = set("|&;<>()$`\\\"' \t\n*?[]#~=%!{}")


def check_ifname(value: str, *, field: str) -> str:
    """Return ``value`` if it is an interface name qmpnet accepts.

    Args:
        value: The name.
        field: The JSON path of the input it came from, e.g. ``nic.backend.bridge``.

    Raises:
        InvalidRequest: The name is empty, longer than 15 bytes, ``.`` or ``..``, or has a character outside
            ``[A-Za-z0-9_.-]``; the message says which.
    """
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{field}: an interface name must not be empty", field=field)
    if value in {".", ".."}:
        raise InvalidRequest(f"{field}: {value!r} is not a valid interface name", field=field)
    if "/" in value:
        raise InvalidRequest(f"{field}: an interface name must not contain '/'", field=field)
    if any(char.isspace() for char in value):
        raise InvalidRequest(f"{field}: an interface name must not contain whitespace", field=field)
    if "\x00" in value or any(char in _METACHARACTERS for char in value):
        raise InvalidRequest(f"{field}: an interface name must not contain shell metacharacters or NUL", field=field)
    if not _IFNAME.fullmatch(value):
        raise InvalidRequest(f"{field}: an interface name may only contain A-Z, a-z, 0-9, '_', '.' and '-'",
                             field=field)
    if len(value.encode()) > IFNAME_MAX:
        raise InvalidRequest(f"{field}: an interface name must be at most {IFNAME_MAX} bytes", field=field)
    return value


def check_tap_pattern(pattern: str, *, field: str = "hostnet.tap_pattern") -> str:
    """Return ``pattern`` if it is a tap name pattern: a name with exactly one ``{n}`` for the number.

    The fixed part may hold at most 10 bytes so that any number the kernel hands out still fits.

    Raises:
        InvalidRequest: No or several ``{n}``, a bad character, or too long.
    """
    if not isinstance(pattern, str) or pattern.count("{n}") != 1:
        raise InvalidRequest(f"{field}: a tap name pattern must contain '{{n}}' exactly once, e.g. 'vnet{{n}}'",
                             field=field)
    fixed = pattern.replace("{n}", "")
    if fixed:
        check_ifname(pattern.replace("{n}", "0"), field=field)
    if len(fixed.encode()) > IFNAME_MAX - _TAP_NUMBER_DIGITS:
        raise InvalidRequest(f"{field}: the fixed part of a tap name pattern must be at most "
                             f"{IFNAME_MAX - _TAP_NUMBER_DIGITS} bytes", field=field)
    return pattern


def tap_pattern_kernel(pattern: str) -> str:
    """The name to give ``TUNSETIFF`` so that the kernel picks the next free number (``vnet%d``)."""
    return check_tap_pattern(pattern).replace("{n}", "%d")


def tap_pattern_regex(pattern: str) -> re.Pattern[str]:
    """A regex matching exactly the names ``pattern`` produces."""
    prefix, _, suffix = check_tap_pattern(pattern).partition("{n}")
    return re.compile(f"{re.escape(prefix)}(?:0|[1-9][0-9]*){re.escape(suffix)}")


def check_netns(value: str, *, field: str = "netns") -> str:
    """Return ``value`` if it names a network namespace: a name under ``/run/netns`` or an absolute path.

    Raises:
        InvalidRequest: Not a plain name of ``[A-Za-z0-9_.-]`` (at most 64) nor an absolute path without ``..``.
    """
    if value.startswith("/"):
        if not _NETNS_PATH.fullmatch(value) or "/../" in f"{value}/" or "/./" in f"{value}/":
            raise InvalidRequest(f"{field}: a namespace path must be absolute and contain only A-Z, a-z, 0-9, "
                                 "'_', '.', '-' and '/' (no '..')", field=field)
        return value
    if value in {".", ".."} or not _NETNS.fullmatch(value):
        raise InvalidRequest(f"{field}: a namespace name may only contain A-Z, a-z, 0-9, '_', '.' and '-' "
                             "(at most 64)", field=field)
    return value
