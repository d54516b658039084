"""Tables for the operator policy: host commands and socket directories."""

from __future__ import annotations

from typing import Any

import pytest

from qmpnet.core.model import parse_nic_spec
from qmpnet.core.policy import Policy, check_spec
from qmpnet.errors import Forbidden

CMD_FWD = "tcp:10.0.2.100:1234-cmd:/bin/cat"
TCP_FWD = "tcp:10.0.2.100:80-tcp:127.0.0.1:8080"


def check(backend: dict[str, Any], policy: Policy | None = None) -> None:
    check_spec(parse_nic_spec({"backend": backend}), policy or Policy())


def unix(path: str) -> dict[str, str]:
    return {"type": "unix", "path": path}


@pytest.mark.parametrize(
    ("backend", "field"),
    [
        ({"type": "user", "guestfwd": [CMD_FWD]}, "nic.backend.guestfwd.0"),
        ({"type": "user", "guestfwd": [TCP_FWD, CMD_FWD]}, "nic.backend.guestfwd.1"),
        ({"type": "user", "smb": "/srv"}, "nic.backend.smb"),
    ],
)
def test_host_commands_forbidden_by_default(backend: dict[str, Any], field: str) -> None:
    with pytest.raises(Forbidden) as info:
        check(backend)
    assert info.value.field == field
    assert info.value.code == "forbidden"
    assert info.value.message.startswith(f"{field}:")
    assert "allow_host_commands" in info.value.message


@pytest.mark.parametrize("backend", [{"type": "user", "guestfwd": [CMD_FWD]}, {"type": "user", "smb": "/srv"}])
def test_host_commands_allowed_by_policy(backend: dict[str, Any]) -> None:
    check(backend, Policy(allow_host_commands=True))


@pytest.mark.parametrize(
    "backend",
    [
        {"type": "user"},
        {"type": "user", "guestfwd": [TCP_FWD], "hostfwd": ["tcp::2222-:22"]},
        {"type": "hubport", "hub": 0},
        {"type": "stream", "server": True, "addr": unix("/anywhere/x.sock")},
    ],
)
def test_harmless_backends_pass_the_default_policy(backend: dict[str, Any]) -> None:
    check(backend)


SOCKETS = Policy(allowed_socket_dirs=["/run/qmpnet", "/var/lib/vms/"])


@pytest.mark.parametrize(
    "backend",
    [
        {"type": "stream", "server": True, "addr": unix("/run/qmpnet/a.sock")},
        {"type": "stream", "addr": unix("/run/qmpnet/deep/er/a.sock")},
        {"type": "dgram", "local": unix("/var/lib/vms/l.sock"), "remote": unix("/run/qmpnet/r.sock")},
        {"type": "stream", "addr": {"type": "inet", "host": "127.0.0.1", "port": 9}},
    ],
)
def test_sockets_inside_allowed_dirs(backend: dict[str, Any]) -> None:
    check(backend, SOCKETS)


@pytest.mark.parametrize(
    ("backend", "field"),
    [
        ({"type": "stream", "server": True, "addr": unix("/srv/a.sock")}, "nic.backend.addr.path"),
        ({"type": "stream", "addr": unix("/run/qmpnetx/a.sock")}, "nic.backend.addr.path"),
        ({"type": "stream", "addr": unix("/run/a.sock")}, "nic.backend.addr.path"),
        ({"type": "dgram", "local": unix("/home/vm/l.sock")}, "nic.backend.local.path"),
        (
            {"type": "dgram", "local": unix("/run/qmpnet/l.sock"), "remote": unix("/etc/r.sock")},
            "nic.backend.remote.path",
        ),
    ],
)
def test_sockets_outside_allowed_dirs(backend: dict[str, Any], field: str) -> None:
    with pytest.raises(Forbidden) as info:
        check(backend, SOCKETS)
    assert info.value.field == field
    assert "/run/qmpnet" in info.value.message


def test_empty_allowed_socket_dirs_forbids_every_unix_socket() -> None:
    with pytest.raises(Forbidden, match="none"):
        check({"type": "stream", "addr": unix("/run/qmpnet/a.sock")}, Policy(allowed_socket_dirs=[]))
