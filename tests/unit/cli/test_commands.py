"""The command line as a user runs it (a subprocess): one stderr line per error, input checked before connecting,
``--version``, plain ``--help``, and ``qmpnet serve`` not repeating qemu.qmp's errors on every reconnect.

No QEMU here: an unreachable socket is a path nobody listens on, and a "QEMU that fails" is a unix socket that
accepts and hangs up before the QMP greeting (qemu.qmp logs an ERROR for that on every attempt).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import TYPE_CHECKING

import pytest

import qmpnet

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

QMPNET = [sys.executable, "-m", "qmpnet"]
RUN_TIMEOUT = 60


def qmpnet_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*QMPNET, *args], capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)


def one_error_line(done: subprocess.CompletedProcess[str], status: int, prefix: str) -> str:
    """The one stderr line of a failed run, after checking the exit status and the prefix."""
    assert done.returncode == status, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(prefix), done.stderr
    assert done.stdout == ""
    return lines[0]


class HangUp:
    """A unix socket that accepts each connection and closes it at once: a QEMU that dies before its greeting."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.accepted = 0
        self.changed = threading.Condition()
        self._server = socket.socket(socket.AF_UNIX)
        self._server.bind(str(path))
        self._server.listen(16)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):  # closed by stop()
            while True:
                conn, _ = self._server.accept()
                conn.close()
                with self.changed:
                    self.accepted += 1
                    self.changed.notify_all()

    def wait_accepted(self, count: int, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.accepted >= count, timeout)

    def stop(self) -> None:
        self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        self._thread.join(5)


@pytest.fixture
def hangup(sockdir: Path) -> Iterator[HangUp]:
    server = HangUp(sockdir / "hangup.qmp")
    yield server
    server.stop()


# ------------------------------------------------------------------------------------------------ one-line errors


def test_an_unreachable_socket_is_one_line(sockdir: Path) -> None:
    done = qmpnet_cli("nic", "list", "--qmp", str(sockdir / "nobody.qmp"))
    line = one_error_line(done, 1, "error: guest_unavailable: ")
    assert "nobody.qmp" in line


def test_a_qemu_that_hangs_up_is_one_line(hangup: HangUp) -> None:
    done = qmpnet_cli("nic", "list", "--qmp", str(hangup.path))
    one_error_line(done, 1, "error: guest_unavailable: ")
    assert hangup.accepted == 1


def test_verbose_shows_the_librarys_log(hangup: HangUp) -> None:
    done = qmpnet_cli("nic", "list", "--qmp", str(hangup.path), "--verbose")
    assert done.returncode == 1
    assert "qemu.qmp" in done.stderr  # the lines the default run leaves out exist
    assert done.stderr.splitlines()[-1].startswith("error: guest_unavailable: ")


def test_an_unreachable_broker_is_one_line() -> None:
    done = qmpnet_cli("nic", "list", "--broker", "mqtt://127.0.0.1:1", "--controller", "h1", "--guest", "vm1")
    one_error_line(done, 1, "error: guest_unavailable: ")


# ------------------------------------------------------------------------------------ input checked before connecting


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["nic", "add", "--model", "foo"], "nic.model"),
        (["nic", "add", "--mac", "zz"], "nic.mac"),
        (["nic", "add", "--id", "0bad"], "nic.id"),
        (["nic", "add", "--backend", "stream"], "--listen or --connect"),
        (["nic", "add", "--hostfwd", "tcp:x"], "nic.backend.hostfwd.0"),
        (["nic", "add", "--hostfwd", "tcp::1-:2", "--backend", "user", "--addr", "zz"], "nic.addr"),
        (["nic", "del", "0bad"], "id"),
        (["nic", "del", "lan1", "--timeout", "-1"], "timeout"),
        (["nic", "del", "lan1", "--timeout", "nan"], "timeout"),
        (["nic", "link", "0bad", "up"], "id"),
        (["nic", "add", "--backend", "passt", "--port", "tcp:22:22", "--port", "tcp:2222"], "nic.backend.ports.1"),
        (["nic", "add", "--backend", "bridge", "--bridge", "br0", "--mtu", "65536"], "nic.mtu"),
        (["nic", "add", "--mtu", "1400"], "nic.mtu"),  # user mode has no host tap
        (["nic", "set", "lan1", "--mtu", "67"], "update.mtu"),
        (["nic", "add", "--backend", "macvtap"], "--parent"),
        (["nic", "add", "--backend", "macvtap", "--parent", "eth0", "--mode", "source"], "nic.backend.mode"),
    ],
)
def test_bad_input_is_refused_before_connecting(sockdir: Path, args: list[str], field: str) -> None:
    # Nothing listens on the socket: had the command connected first, it would answer guest_unavailable.
    done = qmpnet_cli(*args, "--qmp", str(sockdir / "nobody.qmp"))
    line = one_error_line(done, 1, "error: invalid_request: ")
    assert line.startswith(f"error: invalid_request: {field}:"), line


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["nic", "add", "--backend", "bridge", "--bridge", "br0", "--filter-ipv4", "999.1.1.1"],
         "error: invalid_request: nic.filter.ipv4.0:"),
        (["nic", "add", "--filter"], "error: unsupported: nic.filter: "),
        (["nic", "add", "--backend", "tap", "--ifname", "t0", "--filter-dhcp-server"],
         "error: unsupported: nic.filter:"),
        (["nic", "set", "lan1", "--no-filter", "--filter"], "error: invalid_request: --no-filter:"),
        (["nic", "set", "lan1", "--filter-ipv6", "10.0.0.1"], "error: invalid_request: update.filter.ipv6.0:"),
    ],
)
def test_bad_filter_flags_are_refused_before_connecting(sockdir: Path, args: list[str], line: str) -> None:
    one_error_line(qmpnet_cli(*args, "--qmp", str(sockdir / "nobody.qmp")), 1, line)


def test_bad_input_is_refused_before_reaching_the_broker() -> None:
    done = qmpnet_cli("nic", "add", "--model", "foo", "--broker", "mqtt://127.0.0.1:1", "--guest", "vm1")
    one_error_line(done, 1, "error: invalid_request: nic.model:")


def test_the_policy_is_checked_before_connecting(sockdir: Path, tmp_path: Path) -> None:
    config = tmp_path / "policy.toml"
    config.write_text("[policy]\nallowed_bridges = []\n")
    done = qmpnet_cli("nic", "add", "--backend", "bridge", "--bridge", "br0", "--config", str(config),
                      "--qmp", str(sockdir / "nobody.qmp"))  # fmt: skip
    one_error_line(done, 1, "error: forbidden: nic.backend.bridge:")


def test_the_policy_is_checked_for_a_macvtap_link(sockdir: Path, tmp_path: Path) -> None:
    config = tmp_path / "policy.toml"
    config.write_text("[policy]\nallowed_macvtap_links = ['eth1']\n")
    done = qmpnet_cli("nic", "add", "--backend", "macvtap", "--parent", "eth0", "--config", str(config),
                      "--qmp", str(sockdir / "nobody.qmp"))  # fmt: skip
    one_error_line(done, 1, "error: forbidden: nic.backend.link:")


@pytest.mark.parametrize(
    "args",
    [
        ["--versio"],
        ["nic", "link", "lan1", "sideways", "--qmp", "/x.qmp"],
        ["nic", "del", "--qmp", "/x.qmp"],
        ["nic", "add", "--hub", "x", "--qmp", "/x.qmp"],
        ["nic", "list"],
        ["nic", "list", "--qmp", "/x.qmp", "--broker", "mqtt://127.0.0.1:1", "--guest", "vm1"],
        ["schema", "--markdown", "--asyncapi"],
    ],
)
def test_a_usage_error_is_one_line_and_exit_2(args: list[str]) -> None:
    done = qmpnet_cli(*args)
    line = one_error_line(done, 2, "error: invalid_request: ")
    assert line.endswith("--help)"), line  # points at the command's help


# -------------------------------------------------------------------------------------------- version and help


def test_version() -> None:
    done = qmpnet_cli("--version")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"qmpnet {qmpnet.__version__}\n", "")


COMMANDS = [[], ["nic"], ["nic", "add"], ["nic", "del"], ["nic", "link"], ["nic", "list"], ["nic", "set"],
            ["nic", "capture"], ["models"], ["apply"], ["guests"], ["schema"], ["serve"], ["demo"], ["net"],
            ["net", "up"], ["net", "down"], ["net", "list"]]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "qmpnet")
def test_help_shows_no_type_noise(command: list[str]) -> None:
    done = qmpnet_cli(*command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: qmpnet")
    for noise in ("<bool>", "list[", " / --no-"):  # a flag is one option, not --x / --no-x
        assert noise not in done.stdout, f"{noise!r} in:\n{done.stdout}"
    options = [line for line in done.stdout.splitlines() if line.startswith("  -")]
    for noise in ("<str>", "<int>", "<float>", "<path>"):  # options name what they take (--qmp SOCKET)
        assert not [line for line in options if noise in line], f"{noise!r} in:\n{done.stdout}"


# ------------------------------------------------------------------------------------------------ qmpnet serve


async def serve_until_attempts(hangup: HangUp, attempts: int, *flags: str) -> str:
    """Run ``qmpnet serve`` on the hang-up socket until it has tried ``attempts`` times; return its stderr."""
    argv = [*QMPNET, "serve", "--broker", "mqtt://127.0.0.1:1", "--controller-id", "t1",
            "--guest", f"vm1={hangup.path}", *flags]  # fmt: skip
    env = os.environ | {"QMPNET_CONTROLLER__BACKOFF_MIN": "0.05", "QMPNET_CONTROLLER__BACKOFF_MAX": "0.1"}
    process = await asyncio.create_subprocess_exec(*argv, stderr=asyncio.subprocess.PIPE, env=env)
    try:
        assert await asyncio.to_thread(hangup.wait_accepted, attempts, RUN_TIMEOUT), "serve did not retry"
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT)
    assert process.returncode == 0, stderr.decode()
    return stderr.decode()


async def test_serve_does_not_repeat_the_qmp_librarys_error_on_each_reconnect(hangup: HangUp) -> None:
    stderr = await serve_until_attempts(hangup, 4)
    guest_lines = [line for line in stderr.splitlines() if "vm1" in line]
    assert guest_lines, stderr
    assert not [line for line in stderr.splitlines() if "qemu.qmp" in line], stderr
    assert not [line for line in guest_lines if " ERROR " in line], stderr


async def test_serve_verbose_shows_the_qmp_librarys_log(hangup: HangUp) -> None:
    stderr = await serve_until_attempts(hangup, 2, "--verbose")
    assert "qemu.qmp" in stderr
