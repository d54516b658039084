"""Interface names, tap patterns and namespace names: what qmpnet lets reach the kernel."""

from __future__ import annotations

import pytest

from qmpnet.core.ifnames import (
    check_ifname,
    check_netns,
    check_tap_pattern,
    tap_pattern_kernel,
    tap_pattern_regex,
)
from qmpnet.errors import InvalidRequest


@pytest.mark.parametrize("name", ["br0", "vnet0", "qmpnat0", "a", "eth0.100", "br-lan_2", "x" * 15])
def test_good_interface_names_pass(name: str) -> None:
    assert check_ifname(name, field="nic.backend.bridge") == name


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "empty"),
        (".", "not a valid"),
        ("..", "not a valid"),
        ("br/0", "'/'"),
        ("../etc", "'/'"),
        ("br 0", "whitespace"),
        ("br\t0", "whitespace"),
        ("br0\n", "whitespace"),
        ("br;reboot", "metacharacters"),
        ("$(id)", "metacharacters"),
        ("`id`", "metacharacters"),
        ("br0|x", "metacharacters"),
        ("a&b", "metacharacters"),
        ("a>b", "metacharacters"),
        ("br*", "metacharacters"),
        ("br0\x00", "NUL"),
        ("x" * 16, "at most 15 bytes"),
        ("brü", "may only contain"),
        ("br:0", "may only contain"),
        ("br@0", "may only contain"),
    ],
)
def test_hostile_interface_names_are_invalid_requests_naming_the_field(name: str, reason: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_ifname(name, field="nic.backend.ifname")
    assert caught.value.field == "nic.backend.ifname"
    assert caught.value.code == "invalid_request"
    assert str(caught.value).startswith("nic.backend.ifname: ")
    assert reason in str(caught.value)


def test_the_field_is_whatever_the_caller_names() -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_ifname("br/0", field="nic.backend.bridge")
    assert caught.value.field == "nic.backend.bridge"


@pytest.mark.parametrize("pattern", ["vnet{n}", "{n}", "qt{n}x", "tap-{n}", "a" * 10 + "{n}"])
def test_good_tap_patterns(pattern: str) -> None:
    assert check_tap_pattern(pattern) == pattern


@pytest.mark.parametrize(
    "pattern", ["vnet", "vnet{n}{n}", "vnet%d", "v/{n}", "v {n}", "a" * 11 + "{n}", "vnet{N}", "v;{n}"]
)
def test_bad_tap_patterns(pattern: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_tap_pattern(pattern, field="hostnet.tap_pattern")
    assert caught.value.field == "hostnet.tap_pattern"


def test_tap_pattern_becomes_the_kernels_percent_d_form() -> None:
    assert tap_pattern_kernel("vnet{n}") == "vnet%d"
    assert tap_pattern_kernel("q{n}t") == "q%dt"


@pytest.mark.parametrize(
    ("name", "matches"),
    [("vnet0", True), ("vnet17", True), ("vnet", False), ("vnet01", False), ("vnetx", False), ("xvnet1", False),
     ("vnet1a", False)],
)
def test_tap_pattern_regex_matches_only_what_the_kernel_would_name(name: str, matches: bool) -> None:
    assert bool(tap_pattern_regex("vnet{n}").fullmatch(name)) is matches


def test_tap_pattern_regex_escapes_dots() -> None:
    assert tap_pattern_regex("v.{n}").fullmatch("v.3")
    assert not tap_pattern_regex("v.{n}").fullmatch("vx3")


@pytest.mark.parametrize("netns", ["hv", "ext-1", "a.b_c", "/run/netns/hv", "/proc/1/ns/net"])
def test_good_netns(netns: str) -> None:
    assert check_netns(netns) == netns


@pytest.mark.parametrize("netns", ["", ".", "..", "a/b", "h v", "/run/netns/../x", "/a/./b", "x" * 65, "$x"])
def test_bad_netns(netns: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_netns(netns)
    assert caught.value.field == "netns"
