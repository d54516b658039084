"""The passt backend's model (port forwards, IPv6), its settings (the user passt runs as) and its plan (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from qmpnet.core.hostconfig import HostnetSettings
from qmpnet.core.hotadd_plan import PlanContext, netdev_arguments, passt_socket, plan_add
from qmpnet.core.model import PasstBackend, parse_nic_spec
from qmpnet.core.placement import PciBus, PciTopology
from qmpnet.core.records import DesiredDocument
from qmpnet.errors import InvalidRequest, Unsupported


def _refused(backend: dict[str, object]) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        parse_nic_spec({"backend": {"type": "passt", **backend}})
    return caught.value


def test_defaults_forward_nothing_and_serve_ipv6() -> None:
    backend = parse_nic_spec({"backend": {"type": "passt"}}).backend
    assert isinstance(backend, PasstBackend)
    assert (backend.ports, backend.ipv6) == ([], True)


def test_ports_are_read_as_proto_host_port_guest_port() -> None:
    backend = parse_nic_spec({"backend": {"type": "passt", "ports": ["tcp:2222:22", "udp:5353:53"]}}).backend
    assert isinstance(backend, PasstBackend)
    assert backend.forwards() == [("tcp", 2222, 22), ("udp", 5353, 53)]


@pytest.mark.parametrize(
    ("ports", "index", "why"),
    [
        (["tcp:2222"], 0, "not of the form tcp|udp:HOSTPORT:GUESTPORT"),
        (["tcp:2222:22", "sctp:1:2"], 1, "not of the form"),
        (["tcp:2222:22", "tcp:0:22"], 1, "host port 0 is not in 1-65535"),
        (["udp:53:65536"], 0, "guest port 65536 is not in 1-65535"),
        (["tcp:2222:22", "udp:1:2", "tcp: 1:2"], 2, "not of the form"),
        (["tcp:127.0.0.1:2222:22"], 0, "not of the form"),
        ([" tcp:1:2"], 0, "not of the form"),
    ],
)
def test_a_bad_port_forward_is_refused_naming_its_index(ports: list[str], index: int, why: str) -> None:
    err = _refused({"ports": ports})
    assert err.field == f"nic.backend.ports.{index}"
    assert why in err.message
    assert err.message.startswith(f"nic.backend.ports.{index}: ")


def test_a_host_port_forwarded_twice_is_refused() -> None:
    err = _refused({"ports": ["tcp:2222:22", "udp:2222:22", "tcp:2222:23"]})
    assert err.field == "nic.backend.ports"
    assert "ports 0 and 2 both forward tcp host port 2222" in err.message


@pytest.mark.parametrize("junk", [{"ports": "tcp:1:2"}, {"ipv6": "maybe"}, {"socket": "/run/x"}, {"ports": [22]}])
def test_other_junk_is_refused_naming_the_field(junk: dict[str, object]) -> None:
    err = _refused(junk)
    assert err.field is not None
    assert err.field.startswith(f"nic.backend.{next(iter(junk))}")


def test_a_desired_document_takes_a_passt_nic() -> None:
    doc = DesiredDocument.model_validate({"nics": [{"id": "p0", "backend": {"type": "passt", "ipv6": False}}]})
    assert doc.nics[0].backend == PasstBackend(ipv6=False)


@pytest.mark.parametrize("runas", ["root", "0", "0:0", "root:nogroup", "no body", "a:b:c", ""])
def test_passt_never_runs_as_root_or_a_malformed_user(runas: str) -> None:
    with pytest.raises(ValidationError, match="passt_runas"):
        HostnetSettings(passt_runas=runas)


@pytest.mark.parametrize("runas", ["nobody", "nobody:nogroup", "65534", "65534:65534", "qmpnet-passt"])
def test_passt_runs_as_any_other_user(runas: str) -> None:
    assert HostnetSettings(passt_runas=runas).passt_runas == runas


def test_each_guest_has_a_short_passt_directory_of_its_own() -> None:
    settings = HostnetSettings(passt_dir=Path("/run/q"))
    first, second = settings.passt_guest_dir("a" * 77), settings.passt_guest_dir("a" * 76)
    assert first != second
    assert first.parent == Path("/run/q")
    assert len(first.name) == 12


def test_a_socket_path_always_fits_a_unix_address() -> None:
    assert passt_socket("/run/q/0123", "p0") == "/run/q/0123/p0.sock"
    long_id = "n" * 64
    path = passt_socket("/run/qmpnet/passt/" + "d" * 40, long_id)
    assert len(path.encode()) <= 107
    assert path.startswith("/run/qmpnet/passt/")
    assert path != passt_socket("/run/qmpnet/passt/" + "d" * 40, long_id[:-1] + "m")


def _view() -> PlanContext:
    return PlanContext((), (), (), PciTopology("pc", (PciBus("pci.0", "root", hotplug=True, used={(0, 0): "i440FX"}),)))


def test_the_plan_connects_a_stream_netdev_to_the_nics_socket() -> None:
    spec = parse_nic_spec({"id": "p0", "backend": {"type": "passt", "ports": ["tcp:2222:22"]}})
    plan = plan_add(spec, _view(), passt_dir="/run/q/abc")
    assert plan.passt_socket == "/run/q/abc/p0.sock"
    assert plan.steps[0].call.arguments == {
        "id": "p0.net", "type": "stream", "server": False, "addr": {"type": "unix", "path": "/run/q/abc/p0.sock"},
    }
    assert plan.steps[0].undo is not None
    assert plan.steps[0].undo.command == "netdev_del"


def test_other_backends_have_no_passt_socket() -> None:
    assert plan_add(parse_nic_spec({"id": "u0"}), _view(), passt_dir="/run/q/abc").passt_socket is None


def test_a_passt_nic_cannot_be_planned_without_its_directory() -> None:
    spec = parse_nic_spec({"backend": {"type": "passt"}})
    with pytest.raises(Unsupported):
        plan_add(spec, _view())
    with pytest.raises(Unsupported):
        netdev_arguments("p0.net", spec)
