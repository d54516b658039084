"""tc's notation for rates, sizes, times and percentages (``10mbit``, ``32kb``, ``100ms``, ``1%``), parsed and printed.

A live change of a NIC's shaping takes its values the way ``tc`` does (tc(8), "PARAMETERS"), so an operator can
copy them from a tc command line. The units are tc's, with tc's quirks kept on purpose:

* rates: ``bit`` (or a bare number), ``kbit``, ``mbit``, ``gbit``, ``tbit`` in bits per second (SI, x1000);
  ``bps``, ``kbps``, ``mbps``, ``gbps``, ``tbps`` in *bytes* per second; ``kibit`` ... ``tibps`` the IEC (x1024)
  forms;
* sizes: ``b`` (or a bare number) bytes; ``k``/``kb``, ``m``/``mb``, ``g``/``gb`` are x1024 bytes (tc's "kilobyte");
  ``kbit``, ``mbit``, ``gbit`` are x1000 bits;
* times: ``s``/``sec``/``secs``, ``ms``/``msec``/``msecs``, ``us``/``usec``/``usecs`` (or a bare number: tc reads
  a bare time as microseconds);
* percentages: ``1%``, ``0.5%`` (or a bare number, as tc's netem reads it).

Units are case-insensitive and numbers may have a fraction (``1.5mbit``). Parsing returns plain integers in the
base unit (bit/s, bytes, microseconds) or a float percentage; formatting gives the shortest exact tc form back
(``5000000`` -> ``5mbit``), so a value survives a round trip through JSON unchanged. Errors are ``ValueError``
with a sentence (malformed, negative, or an unknown unit) the edge models turn into ``invalid_request`` naming
the field. Pure: no I/O.
"""

from __future__ import annotations

import math
import re
from typing import Final

__all__ = [
    "format_percent",
    "format_rate",
    "format_size",
    "format_time",
    "parse_percent",
    "parse_rate",
    "parse_size",
    "parse_time",
]

_NUMBER: Final = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?P<unit>[a-z%]*)")

_SI, _IEC = 1000, 1024
#: Bits per second per unit.
_RATE_UNITS: Final[dict[str, int]] = {
    "": 1, "bit": 1,
    "kbit": _SI, "mbit": _SI**2, "gbit": _SI**3, "tbit": _SI**4,
    "kibit": _IEC, "mibit": _IEC**2, "gibit": _IEC**3, "tibit": _IEC**4,
    "bps": 8, "kbps": 8 * _SI, "mbps": 8 * _SI**2, "gbps": 8 * _SI**3, "tbps": 8 * _SI**4,
    "kibps": 8 * _IEC, "mibps": 8 * _IEC**2, "gibps": 8 * _IEC**3, "tibps": 8 * _IEC**4,
}  # fmt: skip
#: Bits per unit (sizes are kept in bytes; ``kbit`` sizes exist in tc and are x1000 bits).
_SIZE_UNITS: Final[dict[str, int]] = {
    "": 8, "b": 8,
    "k": 8 * _IEC, "kb": 8 * _IEC, "m": 8 * _IEC**2, "mb": 8 * _IEC**2, "g": 8 * _IEC**3, "gb": 8 * _IEC**3,
    "kbit": _SI, "mbit": _SI**2, "gbit": _SI**3,
}  # fmt: skip
#: Microseconds per unit.
_TIME_UNITS: Final[dict[str, int]] = {
    "": 1, "us": 1, "usec": 1, "usecs": 1,
    "ms": 1000, "msec": 1000, "msecs": 1000,
    "s": 1_000_000, "sec": 1_000_000, "secs": 1_000_000,
}  # fmt: skip


def _split(value: object, what: str, units: dict[str, int]) -> tuple[float, int]:
    """The number and the unit's factor of ``value`` (a tc string or a bare number)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        # ValueError, not TypeError: pydantic reports only ValueError as a validation error naming the field.
        raise ValueError(f"must be a {what} in tc notation (a string such as {_example(what)}) or a number")  # noqa: TRY004
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        if value < 0:
            raise ValueError("must not be negative")
        return float(value), 1
    text = value.strip().lower()
    if text.startswith("-"):
        raise ValueError(f"{value!r}: must not be negative")
    match = _NUMBER.fullmatch(text)
    if match is None:
        raise ValueError(f"{value!r} is not a {what} in tc notation, such as {_example(what)}")
    unit = match["unit"]
    if unit not in units:
        known = ", ".join(u for u in units if u)
        raise ValueError(f"{value!r}: unknown unit {unit!r} for a {what} (known: {known})")
    return float(match["number"]), units[unit]


def _example(what: str) -> str:
    return {"rate": "'10mbit'", "size": "'32kb'", "time": "'100ms'", "percentage": "'1%'"}[what]


def _scaled(value: object, what: str, units: dict[str, int]) -> float:
    number, factor = _split(value, what, units)
    return number * factor


def parse_rate(value: object) -> int:
    """A rate in tc notation (``10mbit``, ``1.5gbit``, ``125kbps``; a bare number is bit/s) -> bits per second."""
    return round(_scaled(value, "rate", _RATE_UNITS))


def parse_size(value: object) -> int:
    """A size in tc notation (``32kb`` = 32768 bytes, ``1500``, ``1mb``; ``kbit`` = 125 bytes) -> bytes."""
    number, factor = _split(value, "size", _SIZE_UNITS)
    bits = number * (factor if isinstance(value, str) else 8)
    return math.ceil(bits / 8 - 1e-9)


def parse_time(value: object) -> int:
    """A time in tc notation (``100ms``, ``1.5s``, ``250us``; a bare number is microseconds) -> microseconds."""
    return round(_scaled(value, "time", _TIME_UNITS))


def parse_percent(value: object) -> float:
    """A percentage (``1%``, ``0.5%``; a bare number is a percentage too) -> percent, e.g. ``0.5``."""
    return _scaled(value, "percentage", {"": 1, "%": 1})


def _shortest(value: int, units: tuple[tuple[str, int], ...]) -> str:
    for unit, factor in units:
        if value % factor == 0:
            return f"{value // factor}{unit}"
    return str(value)


def format_rate(bits_per_second: int) -> str:
    """The shortest exact tc form of a rate: ``5000000`` -> ``5mbit``, ``1500`` -> ``1500bit``."""
    units = (("tbit", _SI**4), ("gbit", _SI**3), ("mbit", _SI**2), ("kbit", _SI), ("bit", 1))
    return _shortest(bits_per_second, units) if bits_per_second else "0bit"


def format_size(size: int) -> str:
    """The shortest exact tc form of a size in bytes: ``32768`` -> ``32kb``, ``1500`` -> ``1500b``."""
    units = (("gb", _IEC**3), ("mb", _IEC**2), ("kb", _IEC), ("b", 1))
    return _shortest(size, units) if size else "0b"


def format_time(microseconds: int) -> str:
    """The shortest exact tc form of a time: ``100000`` -> ``100ms``, ``1500`` -> ``1500us``."""
    units = (("s", 1_000_000), ("ms", 1000), ("us", 1))
    return _shortest(microseconds, units) if microseconds else "0us"


def format_percent(percent: float) -> str:
    """A percentage as tc prints it: ``1.0`` -> ``1%``, ``0.25`` -> ``0.25%``."""
    text = f"{percent:.6f}".rstrip("0").rstrip(".")
    return f"{text}%"
