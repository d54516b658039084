"""The quick path (``qmpnet nic ... --qmp`` through the controller on this host) against the full command line.

The controller here is the real control socket (:func:`qmpnet.serve.control_socket.serve_control`) in a thread of
its own, in front of a fake controller that records each request and answers as it is told. The full command line
is made to take its own path with ``--config`` (the quick path leaves a settings file to it), and both must send
the same request and print the same bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import threading
from typing import TYPE_CHECKING, Any

import pytest

from qmpnet.api.wire.envelopes import NicList, Response, error_response, ok_response
from qmpnet.cli import main, quick
from qmpnet.core.model import Nic, RemoveResult, parse_nic_spec, parse_nic_update
from qmpnet.errors import Conflict, InvalidRequest, QmpnetError
from qmpnet.serve.control_socket import serve_control
from qmpnet.settings import Settings

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
    from pathlib import Path

SERVED = "/run/vm1.qmp"
NIC = {"id": "n1", "model": "virtio-net-pci", "mac": "52:54:00:12:34:56", "netdev": "netdev-n1",
       "backend": {"type": "user", "options": {"net": "10.0.2.0/24"}},
       "pci": {"bus": "pci.0", "slot": 4, "function": 0}, "link": "up", "state": "active",
       "warnings": ["set the MTU in the guest"]}  # fmt: skip


class FakeController:
    """Serves the guest at :data:`SERVED`; records each request; answers ``answer`` (or raises ``error``)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.error: QmpnetError | None = None

    def serves(self, address: str) -> str | None:
        return "vm1" if address == SERVED else None

    async def handle(self, guest: str | None, op: str, payload: Mapping[str, Any]) -> Response:
        assert guest == "vm1"
        self.requests.append((op, dict(payload)))
        if self.error is not None:
            return error_response(None, self.error)
        if op == "nic/list":
            return ok_response(None, NicList(nics=[Nic.model_validate(NIC)]))
        if op == "nic/del":
            return ok_response(None, RemoveResult(id=payload["id"], state="removal_pending"))
        return ok_response(None, Nic.model_validate(NIC | {"link": "down" if payload.get("up") is False else "up"}))


@pytest.fixture
def controller(sockdir: Path) -> Iterator[FakeController]:
    """A controller listening on ``sockdir/control.sock``, in a thread with its own event loop."""
    target = FakeController()
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(serve_control(sockdir / "control.sock", target))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield target
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``qmpnet ARGS`` in this process: the exit status, stdout and stderr."""
    with pytest.raises(SystemExit) as ended:
        main(args)
    out, err = capsys.readouterr()
    return int(ended.value.code or 0), out, err


@pytest.fixture
def full(sockdir: Path) -> list[str]:
    """The options that make the full command line answer (a settings file, which the quick path leaves to it)."""
    config = sockdir / "empty.toml"
    config.write_text("")
    return ["--config", str(config)]


@pytest.mark.parametrize(
    "args",
    [
        ["nic", "add"],
        ["nic", "add", "--json", "--id", "n1", "--model", "e1000", "--mac=52:54:00:12:34:56", "--link", "down"],
        ["nic", "add", "--backend", "user", "--hostfwd", "tcp::2222-:22", "--hostfwd=udp::53-:53", "--restrict"],
        ["nic", "add", "--backend", "bridge", "--bridge", "br0", "--mtu", "1400", "--filter-ipv4", "none", "--verify"],
        ["nic", "add", "--addr", "5", "--vectors", "4", "--verify-address", "--json"],
        ["nic", "list"],
        ["nic", "list", "--json"],
        ["nic", "link", "n1", "down", "--verify"],
        ["nic", "del", "n1", "--timeout", "2.5", "--json"],
        ["nic", "del", "--verify", "n1"],
        ["nic", "set", "n1", "--rate", "10mbit", "--trunks", "10,20", "--filter-ipv4", "10.0.0.2", "--mtu", "1400"],
        ["nic", "set", "n1", "--no-shape", "--no-filter", "--json"],
    ],
)
def test_the_quick_path_asks_and_prints_as_the_full_command_line(
    args: list[str], controller: FakeController, sockdir: Path, full: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    where = ["--qmp", SERVED, "--state-dir", str(sockdir)]
    assert quick.attempt([*args, *where]) == 0, capsys.readouterr().err
    quick_out = capsys.readouterr().out
    [(op, asked)] = controller.requests
    assert run([*args, *where, *full], capsys) == (0, quick_out, "")
    [(full_op, full_asked)] = controller.requests[1:]  # (its `serves` question is the socket's own)
    assert op == full_op
    if op == "nic/add":  # the full command line sends the spec as it checked it; the controller checks either
        assert parse_nic_spec(asked.pop("nic")) == parse_nic_spec(full_asked.pop("nic"))
    if op == "nic/update":  # likewise the update (only what it sets)
        assert parse_nic_update(asked.pop("update")) == parse_nic_update(full_asked.pop("update"))
    assert asked == full_asked


def test_an_error_answer_is_the_same_line_and_status(
    controller: FakeController, sockdir: Path, full: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    controller.error = Conflict("id: NIC n1 already exists\nin the guest", field="id")
    args = ["nic", "add", "--id", "n1", "--qmp", SERVED, "--state-dir", str(sockdir)]
    assert run(args, capsys) == (1, "", "error: conflict: id: NIC n1 already exists in the guest\n")
    assert run([*args, *full], capsys) == (1, "", "error: conflict: id: NIC n1 already exists in the guest\n")


def test_invalid_input_is_left_to_the_full_command_line(
    controller: FakeController, sockdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The controller refuses it (nothing changed); the full command line checks it itself and words the error.
    controller.error = InvalidRequest("model: not a NIC model", field="model")
    args = ["nic", "add", "--model", "nope", "--qmp", SERVED, "--state-dir", str(sockdir)]
    status, out, err = run(args, capsys)
    assert (status, out) == (1, "")
    assert err.startswith("error: invalid_request: nic.model: Input should be"), err
    # The quick path asked once; the full command line refused it before asking.
    assert [op for op, _ in controller.requests] == ["nic/add"]


@pytest.mark.parametrize(
    "args",
    [
        ["nic", "add"],  # no --qmp
        ["nic", "add", "--qmp", SERVED, "--help"],
        ["nic", "add", "--qmp", SERVED, "--verbose"],
        ["nic", "add", "--qmp", SERVED, "--qga", "/run/vm1.qga"],
        ["nic", "add", "--broker", "mqtt://localhost", "--guest", "vm1"],
        ["nic", "add", "--qmp", SERVED, "--hub", "x1"],  # not a number: typer words it
        ["nic", "add", "--qmp", SERVED, "--backend", "nope"],
        ["nic", "add", "--qmp", SERVED, "--json=yes"],
        ["nic", "add", "--qmp", SERVED, "--mac"],
        ["nic", "add", "--qmp", SERVED, "--backend", "bridge"],  # no --bridge: the full command line words it
        ["nic", "add", "--qmp", SERVED, "extra"],
        ["nic", "del", "--qmp", SERVED],
        ["nic", "del", "n1", "--qmp", SERVED, "--verify-address"],
        ["nic", "del", "n1", "--qmp", SERVED, "--timeout", "nan"],
        ["nic", "link", "n1", "sideways", "--qmp", SERVED],
        ["nic", "set", "n1", "--qmp", SERVED, "--verify"],  # nic set has no --verify
        ["nic", "set", "n1", "--qmp", SERVED, "--vlan", "5", "--no-vlan"],  # conflicting: typer's side words it
        ["nic", "capture", "n1", "--qmp", SERVED, "--file", "n1.pcap"],
        ["nic", "list", "--qmp", "/run/other.qmp"],  # a guest this controller does not serve: direct mode
        ["models", "--qmp", SERVED],
    ],
)
def test_what_the_quick_path_leaves_to_the_full_command_line(
    args: list[str], controller: FakeController, sockdir: Path
) -> None:
    assert quick.attempt([*args, "--state-dir", str(sockdir)]) is None
    assert [op for op, _ in controller.requests if op != "nic/list"] == []


def test_settings_from_the_environment_are_left_to_the_full_command_line(
    controller: FakeController, sockdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QMPNET_STATE_DIR", str(sockdir))
    monkeypatch.setenv("QMPNET_QEMU", "backports")  # not a setting
    assert quick.attempt(["nic", "list", "--qmp", SERVED]) == 0
    assert "n1" in capsys.readouterr().out
    monkeypatch.setenv("qmpnet_mqtt__request_timeout", "5")  # the settings read their variables in any case
    assert quick.attempt(["nic", "list", "--qmp", SERVED]) is None


def test_no_controller_is_left_to_the_full_command_line(sockdir: Path) -> None:
    args = ["nic", "list", "--qmp", SERVED, "--state-dir", str(sockdir)]
    assert quick.attempt(args) is None  # no socket
    with contextlib.closing(socket.socket(socket.AF_UNIX)) as stale:
        stale.bind(str(sockdir / "control.sock"))  # a socket file nobody listens on
        assert quick.attempt(args) is None


def test_the_quick_paths_defaults_are_the_settings() -> None:
    settings = Settings()
    assert set(Settings.model_fields) == quick.SETTINGS_FIELDS
    assert (settings.mqtt.request_timeout, settings.qga.verify_timeout) == (quick.REQUEST_TIMEOUT, quick.VERIFY_TIMEOUT)
    assert Settings.model_fields["state_dir"].default == quick.DEFAULT_STATE_DIR


def test_the_quick_path_loads_neither_typer_nor_pydantic_nor_asyncio(controller: FakeController, sockdir: Path) -> None:
    script = ("import atexit, json, sys\n"
              "atexit.register(lambda: print(json.dumps(sorted(sys.modules)), file=sys.stderr))\n"
              "from qmpnet.cli import main\n"
              "main(sys.argv[1:])")  # fmt: skip
    args = ["nic", "add", "--id", "n1", "--qmp", SERVED, "--state-dir", str(sockdir), "--json"]
    argv = [sys.executable, "-c", script, *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["id"] == "n1"
    modules = set(json.loads(done.stderr.splitlines()[-1]))
    for heavy in ("typer", "click", "pydantic", "pydantic_core", "asyncio", "qemu", "qmpnet.settings",
                  "qmpnet.core.model", "qmpnet.cli.root", "qmpnet.cli.options"):  # fmt: skip
        assert heavy not in modules, f"the quick path imports {heavy}"
    assert [op for op, _ in controller.requests] == ["nic/add"]
