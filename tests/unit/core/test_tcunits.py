"""tc's notation: tables of what tc(8) accepts, round trips, and the errors that name what is wrong."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

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


@pytest.mark.parametrize(
    ("text", "bits"),
    [
        ("10mbit", 10_000_000), ("5Mbit", 5_000_000), ("1.5mbit", 1_500_000), ("100kbit", 100_000),
        ("1gbit", 10**9), ("2tbit", 2 * 10**12), ("800", 800), ("800bit", 800), ("1kibit", 1024),
        ("1mibit", 1024**2), ("125kbps", 1_000_000), ("1bps", 8), ("1mbps", 8_000_000), ("1kibps", 8192),
        (" 10mbit ", 10_000_000), (".5mbit", 500_000), (1000, 1000), (2.5, 2),
    ],
)  # fmt: skip
def test_rates(text: str | float, bits: int) -> None:
    assert parse_rate(text) == bits


@pytest.mark.parametrize(
    ("text", "size"),
    [("32kb", 32768), ("32k", 32768), ("1500", 1500), ("1500b", 1500), ("1mb", 1024**2), ("1m", 1024**2),
     ("1g", 1024**3), ("8kbit", 1000), ("1mbit", 125_000), ("1.5kb", 1536), (1600, 1600)],
)  # fmt: skip
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "micros"),
    [("100ms", 100_000), ("1s", 10**6), ("1.5s", 1_500_000), ("2sec", 2 * 10**6), ("3secs", 3 * 10**6),
     ("10msec", 10_000), ("250us", 250), ("250usec", 250), ("250", 250), ("0", 0), ("0.5ms", 500), (100, 100)],
)  # fmt: skip
def test_times(text: str | int, micros: int) -> None:
    assert parse_time(text) == micros


@pytest.mark.parametrize(("text", "percent"), [("1%", 1.0), ("0.5%", 0.5), ("100%", 100.0), ("3", 3.0), (2.5, 2.5)])
def test_percentages(text: str | float, percent: float) -> None:
    assert parse_percent(text) == percent


@pytest.mark.parametrize(
    ("parse", "value", "fragment"),
    [
        (parse_rate, "-5mbit", "must not be negative"),
        (parse_rate, -5, "must not be negative"),
        (parse_rate, "5mbits", "unknown unit 'mbits'"),
        (parse_rate, "5 furlongs", "not a rate in tc notation"),
        (parse_rate, "", "not a rate"),
        (parse_rate, "mbit", "not a rate"),
        (parse_rate, True, "must be a rate"),
        (parse_rate, None, "must be a rate"),
        (parse_rate, float("inf"), "finite"),
        (parse_size, "32kib", "unknown unit 'kib'"),
        (parse_time, "5min", "unknown unit 'min'"),
        (parse_time, "1h", "unknown unit 'h'"),
        (parse_percent, "1%%", "unknown unit"),
        (parse_percent, "1 percent", "not a percentage"),
        (parse_percent, "-1%", "must not be negative"),
    ],
)
def test_refusals_say_why(parse: object, value: object, fragment: str) -> None:
    assert callable(parse)
    with pytest.raises(ValueError, match=fragment):
        parse(value)


@pytest.mark.parametrize(
    ("format_", "value", "text"),
    [
        (format_rate, 5_000_000, "5mbit"), (format_rate, 1_500_000, "1500kbit"), (format_rate, 1234, "1234bit"),
        (format_rate, 0, "0bit"), (format_size, 32768, "32kb"), (format_size, 1500, "1500b"),
        (format_size, 1024**2, "1mb"), (format_time, 100_000, "100ms"), (format_time, 2_000_000, "2s"),
        (format_time, 1500, "1500us"), (format_time, 0, "0us"), (format_percent, 1.0, "1%"),
        (format_percent, 0.25, "0.25%"), (format_percent, 100, "100%"),
    ],
)  # fmt: skip
def test_formatting_is_the_shortest_exact_form(format_: object, value: float, text: str) -> None:
    assert callable(format_)
    assert format_(value) == text


@given(st.integers(min_value=0, max_value=10**13))
def test_rates_round_trip(bits: int) -> None:
    assert parse_rate(format_rate(bits)) == bits


@given(st.integers(min_value=0, max_value=2**32))
def test_sizes_round_trip(size: int) -> None:
    assert parse_size(format_size(size)) == size


@given(st.integers(min_value=0, max_value=10**9))
def test_times_round_trip(micros: int) -> None:
    assert parse_time(format_time(micros)) == micros


@given(st.integers(min_value=0, max_value=100_000_000).map(lambda n: n / 1_000_000))
def test_percentages_round_trip(percent: float) -> None:
    assert parse_percent(format_percent(percent)) == pytest.approx(percent, abs=1e-6)
