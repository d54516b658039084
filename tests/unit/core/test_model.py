"""Property-based validation of NicSpec: every invalid field is refused with ``invalid_request`` naming it.

The strategies build invalid values *by construction* (a multicast bit, a slot above 0x1f, a forbidden character
at a random place...), so the tests do not restate the validators they check.
"""

from __future__ import annotations

import ipaddress
from typing import Any, get_args

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmpnet.core.model import (
    Backend,
    DgramBackend,
    HubportBackend,
    NicSpec,
    SocketAddress,
    StreamBackend,
    UserBackend,
    parse_nic_spec,
)
from qmpnet.errors import InvalidRequest

FIELDS = frozenset(NicSpec.model_fields)


def _tags(union: object) -> frozenset[str]:
    """The ``type`` tags of a discriminated union of models (``Backend``, ``SocketAddress``)."""
    members = get_args(get_args(union)[0])
    return frozenset(str(member.model_fields["type"].default) for member in members)


BACKEND_TYPES = _tags(Backend)
ADDRESS_TYPES = _tags(SocketAddress)
TAGS = BACKEND_TYPES | ADDRESS_TYPES
MODELS = ("virtio-net-pci", "virtio", "e1000", "e1000e", "rtl8139")
LEGACY = ("e1000", "e1000e", "rtl8139")
ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"
LETTERS = ID_CHARS[:52]


def refused(data: object) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse_nic_spec(data)  # type: ignore[arg-type]  # junk on purpose
    err = info.value
    assert err.code == "invalid_request"
    assert err.field is not None
    return err


# ------------------------------------------------------------------------------------------------ strategies

octet = st.integers(0, 255)
ids: st.SearchStrategy[str] = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(LETTERS),
    st.text(alphabet=ID_CHARS, max_size=63),
)


@st.composite
def bad_ids(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["empty", "first", "char", "long"]))
    if kind == "empty":
        return ""
    if kind == "first":
        return draw(st.sampled_from("0123456789_.-")) + draw(st.text(alphabet=ID_CHARS, max_size=20))
    if kind == "long":
        return draw(st.sampled_from(LETTERS)) + draw(st.text(alphabet=ID_CHARS, min_size=64, max_size=100))
    good: str = draw(ids)
    bad = draw(st.characters(exclude_characters=ID_CHARS, exclude_categories=["Cs"]))
    at = draw(st.integers(1, len(good)))
    return good[:at] + bad + good[at:]


def mac_text(octets: list[int], draw: st.DrawFn) -> str:
    upper = draw(st.booleans())
    return ":".join(f"{o:02X}" if upper else f"{o:02x}" for o in octets)


@st.composite
def valid_macs(draw: st.DrawFn) -> str:
    octets = draw(st.lists(octet, min_size=6, max_size=6))
    octets[0] &= 0xFE
    if not any(octets):
        octets[5] = 1
    return mac_text(octets, draw)


@st.composite
def bad_macs(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["multicast", "zero", "count", "separator", "digits", "char"]))
    octets = draw(st.lists(octet, min_size=6, max_size=6))
    if kind == "multicast":
        octets[0] |= 0x01
        return mac_text(octets, draw)
    if kind == "zero":
        return "00:00:00:00:00:00"
    if kind == "count":
        count = draw(st.sampled_from([1, 2, 3, 4, 5, 7, 8]))
        return mac_text(draw(st.lists(octet, min_size=count, max_size=count)), draw)
    if kind == "separator":
        return draw(st.sampled_from(["-", ".", "", " ", "::"])).join(f"{o:02x}" for o in octets)
    parts = [f"{o:02x}" for o in octets]
    at = draw(st.integers(0, 5))
    if kind == "digits":
        parts[at] = draw(st.sampled_from([f"{octets[at]:x}"[:1], f"0{octets[at]:02x}"]))
    else:
        parts[at] = parts[at][0] + draw(st.sampled_from("gGzZ:x "))
    return ":".join(parts)


@st.composite
def bad_addrs(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["slot", "function", "shape"]))
    if kind == "slot":
        return f"{draw(st.integers(0x20, 0xFF)):x}" + draw(st.sampled_from(["", ".0"]))
    if kind == "function":
        return f"{draw(st.integers(0, 0x1F)):02x}.{draw(st.integers(8, 9))}"
    return draw(st.sampled_from(["", "x", "05:0", "5.", ".1", "05.0.0", "0x", "0x123", "-1", "5 .0"]))


ports = st.integers(1, 65535)
ipv4 = st.builds(lambda a, b, c, d: f"{a}.{b}.{c}.{d}", octet, octet, octet, octet)


@st.composite
def hostfwd_rules(draw: st.DrawFn) -> str:
    proto = draw(st.sampled_from(["", "tcp", "udp"]))
    host = draw(st.one_of(st.just(""), ipv4))
    guest = draw(st.one_of(st.just(""), ipv4))
    return f"{proto}:{host}:{draw(ports)}-{guest}:{draw(ports)}"


@st.composite
def bad_hostfwd_rules(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["port0", "port_big", "octet", "shape", "proto"]))
    good = f"tcp:127.0.0.1:{draw(ports)}-:{draw(ports)}"
    if kind == "port0":
        return draw(st.sampled_from(["tcp::0-:22", "tcp::22-:0", "udp:1.2.3.4:00-:1"]))
    if kind == "port_big":
        return f"tcp::{draw(st.integers(65536, 99999))}-:22"
    if kind == "octet":
        return f"tcp:{draw(st.integers(256, 999))}.0.0.1:22-:22"
    if kind == "proto":
        return "sctp" + good[3:]
    return draw(st.sampled_from([good.replace("-", ""), good.replace("-", "--"), "tcp:22-:22", "::", "22"]))


@st.composite
def bad_nets(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["prefix", "octet", "shape"]))
    if kind == "prefix":
        return f"10.0.2.0/{draw(st.integers(33, 99))}"
    if kind == "octet":
        return f"10.{draw(st.integers(256, 999))}.0.0/24"
    return draw(st.sampled_from(["", "10.0.2", "10.0.2.0/", "net", "10.0.2.0/24/1", "::1/64", "10.0.2.0/255.0.255.0"]))


@st.composite
def bad_socket_paths(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["relative", "dotdot", "long", "nul"]))
    name = draw(st.text(alphabet="abcxyz019_-", min_size=1, max_size=20))
    if kind == "relative":
        return draw(st.sampled_from(["", "./", "run/", "~/"])) + name
    if kind == "dotdot":
        return draw(st.sampled_from([f"/run/../{name}", f"/run/{name}/..", f"/../{name}"]))
    if kind == "nul":
        return f"/run/{name}\x00x"
    return "/" + "d" * draw(st.integers(107, 200))


def unknown_keys(known: frozenset[str]) -> st.SearchStrategy[str]:
    # Tag names are drawn often on purpose: the path must keep them when they are the unknown field.
    names = st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True) | st.sampled_from(sorted(TAGS))
    return names.filter(lambda k: k not in known)


# -------------------------------------------------------------------------------------- invalid, field by field


@given(bad_ids())
def test_bad_id(value: str) -> None:
    assert refused({"id": value}).field == "nic.id"


@given(bad_ids())
def test_bad_bus(value: str) -> None:
    assert refused({"bus": value}).field == "nic.bus"


@given(bad_macs())
def test_bad_mac(value: str) -> None:
    assert refused({"mac": value}).field == "nic.mac"


@given(bad_addrs())
def test_bad_addr(value: str) -> None:
    assert refused({"addr": value}).field == "nic.addr"


@given(st.text().filter(lambda s: s not in MODELS))
def test_bad_model(value: str) -> None:
    assert refused({"model": value}).field == "nic.model"


@given(st.text().filter(lambda s: s not in ("up", "down")))
def test_bad_link(value: str) -> None:
    assert refused({"link": value}).field == "nic.link"


@given(st.one_of(st.integers(max_value=-1), st.integers(min_value=2049)))
def test_vectors_out_of_range(value: int) -> None:
    assert refused({"vectors": value}).field == "nic.vectors"


@given(st.sampled_from(LEGACY), st.integers(0, 2048))
def test_vectors_only_for_virtio(model: str, value: int) -> None:
    assert refused({"model": model, "vectors": value}).field == "nic.vectors"


@given(st.one_of(st.integers(max_value=0), st.integers(min_value=257)))
def test_queues_out_of_range(value: int) -> None:
    assert refused({"queues": value}).field == "nic.queues"


BACKENDS: list[dict[str, Any]] = [
    {"type": "user"},
    {"type": "hubport", "hub": 1},
    {"type": "stream", "addr": {"type": "inet", "host": "127.0.0.1", "port": 1}},
    {"type": "dgram", "remote": {"type": "inet", "host": "127.0.0.1", "port": 1}},
]


@given(st.integers(2, 256), st.sampled_from(BACKENDS))
def test_multiqueue_needs_a_multiqueue_backend(value: int, backend: dict[str, Any]) -> None:
    err = refused({"queues": value, "backend": backend})
    assert err.field == "nic.queues"
    assert backend["type"] in err.message


@given(st.sampled_from(LEGACY), st.integers(1, 256))
def test_queues_only_for_virtio(model: str, value: int) -> None:
    assert refused({"model": model, "queues": value}).field == "nic.queues"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"backend": {"type": "bridge", "bridge": "br 0"}}, "nic.backend.bridge"),
        ({"backend": {"type": "bridge", "bridge": "a-bridge-name-too-long"}}, "nic.backend.bridge"),
        ({"backend": {"type": "bridge"}}, "nic.backend.bridge"),
        ({"backend": {"type": "nat", "network": "0net"}}, "nic.backend.network"),
        ({"backend": {"type": "nat", "network": "net;rm"}}, "nic.backend.network"),
        ({"backend": {"type": "tap", "ifname": "tap/0"}}, "nic.backend.ifname"),
        ({"backend": {"type": "tap", "ifname": "tap0", "script": "/etc/qemu-ifup"}}, "nic.backend.script"),
        ({"backend": {"type": "vfio", "host": "03:00"}}, "nic.backend.host"),
        ({"backend": {"type": "vfio", "host": "0000:03:20.0"}}, "nic.backend.host"),
        ({"mac": "52:54:00:00:00:01", "backend": {"type": "vfio", "host": "03:00.0"}}, "nic.mac"),
        ({"model": "e1000", "backend": {"type": "vfio", "host": "03:00.0"}}, "nic.model"),
        ({"model": "e1000", "queues": 2, "backend": {"type": "tap", "ifname": "tap0"}}, "nic.queues"),
    ],
)
def test_bad_host_backends(data: dict[str, Any], field: str) -> None:
    assert refused(data).field == field


@given(st.integers(2, 256), st.sampled_from([{"type": "tap", "ifname": "tap0"}, {"type": "nat"}]))
def test_multiqueue_with_a_tap_based_backend(queues: int, backend: dict[str, Any]) -> None:
    assert parse_nic_spec({"queues": queues, "backend": backend}).queues == queues


def test_backend_types_are_the_known_ones() -> None:
    # If a backend is added, the strategies below keep excluding it; this says which ones they assume.
    assert {"user", "hubport", "stream", "dgram"} <= BACKEND_TYPES
    assert {"unix", "inet"} == ADDRESS_TYPES


@given(st.one_of(st.text().filter(lambda s: s not in BACKEND_TYPES), st.none(), st.integers()))
def test_bad_backend_type(value: object) -> None:
    assert refused({"backend": {"type": value}}).field == "nic.backend"


def test_backend_without_type() -> None:
    assert refused({"backend": {}}).field == "nic.backend"


@given(st.lists(hostfwd_rules(), max_size=4), bad_hostfwd_rules(), st.data())
def test_bad_hostfwd_rule_is_named_by_index(good: list[str], bad: str, data: st.DataObject) -> None:
    at = data.draw(st.integers(0, len(good)))
    rules = [*good[:at], bad, *good[at:]]
    assert refused({"backend": {"type": "user", "hostfwd": rules}}).field == f"nic.backend.hostfwd.{at}"


@given(st.lists(hostfwd_rules(), min_size=1, max_size=5))
def test_good_hostfwd_rules_pass_unchanged(rules: list[str]) -> None:
    backend = parse_nic_spec({"backend": {"type": "user", "hostfwd": rules}}).backend
    assert isinstance(backend, UserBackend)
    assert backend.hostfwd == rules


@given(bad_nets())
def test_bad_user_net(value: str) -> None:
    assert refused({"backend": {"type": "user", "net": value}}).field == "nic.backend.net"


@given(st.sampled_from(["host", "dhcpstart", "dns"]), st.text().filter(lambda s: not _is_ipv4(s)))
def test_bad_user_addresses(name: str, value: str) -> None:
    assert refused({"backend": {"type": "user", name: value}}).field == f"nic.backend.{name}"


@given(st.integers(max_value=-1) | st.integers(min_value=0x10000))
def test_bad_hub(value: int) -> None:
    assert refused({"backend": {"type": "hubport", "hub": value}}).field == "nic.backend.hub"


@given(bad_socket_paths())
def test_bad_stream_unix_path(path: str) -> None:
    backend = {"type": "stream", "addr": {"type": "unix", "path": path}}
    assert refused({"backend": backend}).field == "nic.backend.addr.path"


@given(bad_socket_paths(), st.sampled_from(["local", "remote"]))
def test_bad_dgram_unix_path(path: str, side: str) -> None:
    backend = {"type": "dgram", side: {"type": "unix", "path": path}}
    assert refused({"backend": backend}).field == f"nic.backend.{side}.path"


@given(st.one_of(st.integers(max_value=0), st.integers(min_value=65536)))
def test_bad_inet_port(port: int) -> None:
    backend = {"type": "stream", "addr": {"type": "inet", "host": "127.0.0.1", "port": port}}
    assert refused({"backend": backend}).field == "nic.backend.addr.port"


def test_dgram_needs_a_side() -> None:
    assert refused({"backend": {"type": "dgram"}}).field == "nic.backend"


@given(unknown_keys(FIELDS), st.integers() | st.text() | st.none())
def test_unknown_top_level_field_is_named(key: str, value: object) -> None:
    assert refused({key: value}).field == f"nic.{key}"


@given(unknown_keys(frozenset(UserBackend.model_fields)), st.integers() | st.text())
def test_unknown_backend_field_is_named(key: str, value: object) -> None:
    assert refused({"backend": {"type": "user", key: value}}).field == f"nic.backend.{key}"


@given(st.sampled_from(["script", "downscript", "fd", "fds", "helper", "ifname", "vhost"]))
def test_tap_options_are_unknown_fields(key: str) -> None:
    assert refused({"backend": {"type": "user", key: "x"}}).field == f"nic.backend.{key}"


@given(st.text() | st.integers() | st.lists(st.integers()) | st.none())
def test_not_an_object(value: object) -> None:
    assert refused(value).field == "nic"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"user": 1}, "nic.user"),
        ({"inet": 1}, "nic.inet"),
        ({"backend": {"type": "user", "unix": 1}}, "nic.backend.unix"),
        ({"backend": {"type": "dgram", "local": {"type": "unix", "path": "/a", "unix": 1}}}, "nic.backend.local.unix"),
        ({"backend": {"type": "stream", "addr": {"type": "inet", "host": "h", "port": 0}}}, "nic.backend.addr.port"),
    ],
)
def test_unknown_field_named_like_a_backend_tag(data: dict[str, Any], field: str) -> None:
    assert refused(data).field == field


@pytest.mark.parametrize(
    "data",
    [
        {"id": "0"},
        {"mac": "01:00:00:00:00:00"},
        {"addr": "20"},
        {"queues": 0},
        {"backend": {"type": "user", "hostfwd": ["x"]}},
        {"backend": {"type": "stream", "addr": {"type": "unix", "path": "x"}}},
        {"extra": 1},
        {"model": "e1000", "vectors": 1},
        {"queues": 2},
    ],
)
def test_message_starts_with_the_field(data: dict[str, Any]) -> None:
    err = refused(data)
    assert err.message.startswith(f"{err.field}: ")


# ------------------------------------------------------------------------------- regressions (were bugs)


@pytest.mark.parametrize("host", ["a b", "host,opt=1", "x" * 300, "h\n"], ids=["space", "comma", "long", "newline"])
def test_inet_host_is_matched_whole(host: str) -> None:
    backend = {"type": "stream", "addr": {"type": "inet", "host": host, "port": 1}}
    assert refused({"backend": backend}).field == "nic.backend.addr.host"


@pytest.mark.parametrize("rule", ["tcp::\u0662\u0662-:22", "tcp::22-:\uff12\uff12"])
def test_hostfwd_ports_are_ascii_digits(rule: str) -> None:
    assert refused({"backend": {"type": "user", "hostfwd": [rule]}}).field == "nic.backend.hostfwd.0"


# ----------------------------------------------------------------------------------------------- valid values


@given(valid_macs())
def test_valid_mac_round_trips_lower_case(mac: str) -> None:
    assert parse_nic_spec({"mac": mac}).mac == mac.lower()


@given(ids)
def test_valid_id_round_trips(value: str) -> None:
    spec = parse_nic_spec({"id": value, "bus": value})
    assert (spec.id, spec.bus) == (value, value)


@st.composite
def socket_addresses(draw: st.DrawFn) -> dict[str, Any]:
    if draw(st.booleans()):
        return {"type": "unix", "path": "/run/" + draw(st.text(alphabet="abc_-019", min_size=1, max_size=30))}
    return {"type": "inet", "host": draw(st.sampled_from(["127.0.0.1", "::1", "host.example"])), "port": draw(ports)}


@st.composite
def valid_specs(draw: st.DrawFn) -> dict[str, Any]:
    model = draw(st.sampled_from(MODELS))
    spec: dict[str, Any] = {"model": model, "link": draw(st.sampled_from(["up", "down"]))}
    if draw(st.booleans()):
        spec["id"] = draw(ids)
    if draw(st.booleans()):
        spec["mac"] = draw(valid_macs())
    if draw(st.booleans()):
        spec["addr"] = f"{draw(st.integers(0, 31)):02x}.{draw(st.integers(0, 7))}"
    if model in ("virtio", "virtio-net-pci") and draw(st.booleans()):
        spec["vectors"] = draw(st.integers(0, 2048))
        spec["queues"] = 1
    kind = draw(st.sampled_from(["user", "hubport", "stream", "dgram"]))
    if kind == "user":
        spec["backend"] = {"type": "user", "hostfwd": draw(st.lists(hostfwd_rules(), max_size=3))}
    elif kind == "hubport":
        spec["backend"] = {"type": "hubport", "hub": draw(st.integers(0, 0xFFFF))}
    elif kind == "stream":
        spec["backend"] = {"type": "stream", "server": draw(st.booleans()), "addr": draw(socket_addresses())}
    else:
        spec["backend"] = {"type": "dgram", "remote": draw(socket_addresses())}
    return spec


@given(valid_specs())
def test_valid_spec_survives_a_json_round_trip(data: dict[str, Any]) -> None:
    spec = parse_nic_spec(data)
    assert parse_nic_spec(spec.model_dump(mode="json")) == spec
    assert isinstance(spec.backend, UserBackend | HubportBackend | StreamBackend | DgramBackend)
    assert spec.backend.type == data["backend"]["type"]
    if "mac" in data:
        assert spec.mac == data["mac"].lower()


# -------------------------------------------------------------------------------------------------------- junk

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
SUB_FIELDS = sorted(FIELDS | frozenset(UserBackend.model_fields) | {"addr", "local", "remote", "path", "port", "hub"})


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(sorted(FIELDS)) | st.text(max_size=8), json_values, max_size=5))
def test_junk_is_refused_only_with_invalid_request(data: dict[str, Any]) -> None:
    _parse_or_invalid(data)


@settings(max_examples=100)
@given(
    st.dictionaries(st.sampled_from(sorted(FIELDS)), st.text(), max_size=4),
    st.sampled_from(["user", "hubport", "stream", "dgram"]),
    st.dictionaries(st.sampled_from(SUB_FIELDS), st.text() | json_values, max_size=4),
)
def test_junk_strings_are_refused_only_with_invalid_request(
    top: dict[str, Any], kind: str, backend: dict[str, Any]
) -> None:
    _parse_or_invalid({**top, "backend": {**backend, "type": kind}})
    _parse_or_invalid(top)


def _parse_or_invalid(data: dict[str, Any]) -> None:
    field: str | None = "nic"
    try:
        assert isinstance(parse_nic_spec(data), NicSpec)
    except InvalidRequest as err:  # anything else fails the test
        field = err.field
    assert field is not None
    assert field.startswith("nic")


def _is_ipv4(value: str) -> bool:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return True
