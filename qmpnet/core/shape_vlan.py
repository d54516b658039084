"""What qmpnet sets on a NIC's host tap: its shaping (tc) and its VLANs on a VLAN-filtering bridge."""

# Without `from __future__ import annotations`: pydantic would compile each field's annotation from its string,
# ~70 k instructions a field in every new process (docs/performance.md).

import re
from collections.abc import Callable
from typing import Annotated

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PlainSerializer,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from qmpnet.core.model_base import Frozen
from qmpnet.core.tcunits import (
    format_percent,
    format_rate,
    format_size,
    format_time,
    parse_percent,
    parse_rate,
    parse_size,
    parse_time,
)


def _tc_value(parse: Callable[[object], int], what: str, low: int, high: int, show: Callable[[int], str]) -> object:
    def check(value: object) -> int:
        parsed = parse(value)
        if not low <= parsed <= high:
            raise ValueError(f"{what} must be {show(low)} to {show(high)}, not {show(parsed)}")
        return parsed

    return BeforeValidator(check)


def _tc_schema(example: str, bare: str) -> WithJsonSchema:
    return WithJsonSchema({"anyOf": [{"type": "string", "examples": [example]}, {"type": "number", "minimum": 0,
                                                                                  "description": bare}]})


#: A rate in bits per second, in tc notation on the wire (``10mbit``); tbf keeps it in 32 bits of bytes/s (34gbit).
TcRate = Annotated[
    int,
    _tc_value(parse_rate, "a rate", 8, 34 * 1000**3, format_rate),
    PlainSerializer(format_rate, return_type=str, when_used="json"),
    _tc_schema("10mbit", "bits per second"),
]
#: A size in bytes, in tc notation on the wire (``32kb``); at least one full-size Ethernet frame.
TcSize = Annotated[
    int,
    _tc_value(parse_size, "a size", 1600, 2**32 - 1, format_size),
    PlainSerializer(format_size, return_type=str, when_used="json"),
    _tc_schema("32kb", "bytes"),
]
#: A time in microseconds, in tc notation on the wire (``100ms``); netem keeps it in 32 bits of 64 ns ticks.
TcTime = Annotated[
    int,
    _tc_value(parse_time, "a time", 0, 240_000_000, format_time),
    PlainSerializer(format_time, return_type=str, when_used="json"),
    _tc_schema("100ms", "microseconds"),
]


def _check_percent(value: object) -> float:
    percent = parse_percent(value)
    if percent > 100:
        raise ValueError(f"a loss must be 0% to 100%, not {format_percent(percent)}")
    return percent


TcPercent = Annotated[
    float,
    BeforeValidator(_check_percent),
    PlainSerializer(format_percent, return_type=str, when_used="json"),
    _tc_schema("1%", "percent"),
]


class Shape(Frozen):
    """Bandwidth and impairment of a tap-based NIC, applied on its host tap with tc.

    ``rate`` (and its ``burst``) limits both directions: the tap's egress (towards the guest) and the guest's
    transmit direction (the tap's ingress, redirected through an IFB device). ``delay``, ``jitter`` and ``loss``
    (netem) apply to frames towards the guest, so a ping's round trip grows by ``delay`` once. A shape replaces
    the whole previous one: what it leaves out is off.
    """

    rate: TcRate | None = Field(default=None, description="Rate limit in both directions, e.g. 10mbit.")
    burst: TcSize | None = Field(
        default=None, description="Bucket of the rate limit, e.g. 32kb (default: 10 ms at the rate, at least 16kb)."
    )
    delay: TcTime | None = Field(default=None, description="Added delay towards the guest, e.g. 100ms.")
    jitter: TcTime | None = Field(default=None, description="Random variation of the delay, e.g. 10ms.")
    loss: TcPercent | None = Field(default=None, description="Share of frames towards the guest dropped, e.g. 1%.")

    @model_validator(mode="after")
    def _consistent(self) -> "Shape":
        # ValueError, not InvalidRequest: the edge names the field by where the shape sits (update.shape, nic.shape).
        if all(getattr(self, name) is None for name in type(self).model_fields):
            raise ValueError("give at least one of rate, burst, delay, jitter, loss (or null to remove the shaping)")
        return self

    @field_validator("burst")
    @classmethod
    def _burst_needs_rate(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("rate") is None:
            raise ValueError("a burst needs a rate")
        return value

    @field_validator("jitter")
    @classmethod
    def _jitter_needs_delay(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("delay"):
            raise ValueError("a jitter needs a delay")
        return value

    @property
    def impaired(self) -> bool:
        """Whether netem is needed (a delay or a loss)."""
        return bool(self.delay or self.loss)

    def options(self) -> dict[str, str]:
        """The set values in tc notation, as a NIC's backend options show them."""
        dumped = self.model_dump(mode="json", exclude_none=True)
        return {key: str(value) for key, value in dumped.items()}


_VLAN_RANGE = re.compile(r"([0-9]{1,4})(?:-([0-9]{1,4}))?")


def _trunk_text(value: object) -> object:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _check_trunk(value: str) -> str:
    match = _VLAN_RANGE.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"{value!r} is not a VLAN id (1-4094) or a range such as 100-199")
    low, high = int(match[1]), int(match[2] or match[1])
    if not 1 <= low <= high <= 4094:
        raise ValueError(f"{value!r}: VLAN ids are 1 to 4094, a range low-high with low <= high")
    return f"{low}-{high}" if high != low else str(low)


VlanTrunk = Annotated[
    str,
    BeforeValidator(_trunk_text),
    AfterValidator(_check_trunk),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 1, "maximum": 4094},
                              {"type": "string", "examples": ["100-199"]}]}),
]


class Vlan(Frozen):
    """VLAN membership of a NIC's port on a VLAN-filtering bridge: an access port, or a trunk.

    ``access``: frames from the guest are untagged and join VLAN N (its PVID); frames of VLAN N reach the guest
    untagged. ``trunks``: the guest sends and receives frames tagged with the listed VLANs; untagged frames are
    dropped.
    """

    access: int | None = Field(default=None, ge=1, le=4094, description="Access VLAN id (PVID, untagged).")
    trunks: list[VlanTrunk] | None = Field(
        default=None, min_length=1, description="Tagged VLANs: ids and ranges, e.g. [10, '100-199']."
    )

    @model_validator(mode="after")
    def _one_kind(self) -> "Vlan":
        if (self.access is None) == (self.trunks is None):
            raise ValueError("give either access or trunks")
        return self

    def ranges(self) -> tuple[tuple[int, int], ...]:
        """The VLAN ids as sorted, merged ``(low, high)`` ranges."""
        if self.access is not None:
            return ((self.access, self.access),)
        spans = sorted(tuple(int(p) for p in (t.split("-") * 2)[:2]) for t in self.trunks or [])
        merged: list[tuple[int, int]] = []
        for low, high in spans:
            if merged and low <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(high, merged[-1][1]))
            else:
                merged.append((low, high))
        return tuple(merged)

    def options(self) -> dict[str, str]:
        """The VLAN as a NIC's backend options show it (``vlan``, or ``trunks`` as ``10,100-199``)."""
        if self.access is not None:
            return {"vlan": str(self.access)}
        return {"trunks": ",".join(f"{lo}-{hi}" if hi != lo else str(lo) for lo, hi in self.ranges())}
