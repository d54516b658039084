"""passt's command line, and how a passt is found and ended: by its socket, or by pid *and* start time.

A stand-in process (this Python, sleeping, with passt's ``--socket`` on its command line) plays the passt: the
rules under test are about processes, not about passt itself (tests/integration/test_passt.py runs the real one).
"""

from __future__ import annotations

import contextlib
import pwd
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import needs
import pytest

from qmpnet.adapters.hostnet import passt
from qmpnet.core.model import PasstBackend
from qmpnet.core.ports import HostProcess
from qmpnet.errors import Conflict, QmpnetError, Unsupported

if TYPE_CHECKING:
    from collections.abc import Iterator


def test_the_command_line_forwards_each_port_and_names_socket_pid_file_and_user() -> None:
    backend = PasstBackend(ports=["tcp:2222:22", "udp:5353:53"], ipv6=False)
    assert passt.argv("/run/q/g/p0.sock", backend, program="passt", runas="nobody") == [
        "passt", "--quiet", "--runas", "nobody", "--socket", "/run/q/g/p0.sock", "--pid", "/run/q/g/p0.pid",
        "--ipv4-only", "--tcp-ports", "2222:22", "--udp-ports", "5353:53",
    ]


def test_ipv6_is_served_unless_refused() -> None:
    assert "--ipv4-only" not in passt.argv("/s/p.sock", PasstBackend(), program="passt", runas="nobody")


@pytest.fixture
def stand_in(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    socket = str(tmp_path / "p0.sock")
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--socket", socket])
    try:
        yield process, socket
    finally:
        process.kill()
        process.wait()


def _wait_listed(directory: Path, process: subprocess.Popen[bytes]) -> tuple[str, int]:
    """The stand-in as :func:`passt.find` lists it, once /proc shows its command line (polled, with a deadline)."""
    deadline = time.monotonic() + 10
    while (found := passt.find(directory).get(process.pid)) is None:
        assert time.monotonic() < deadline, f"process {process.pid} never showed its --socket"
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=0.01)  # a wait on the process, which must not end
        assert process.returncode is None
    return found


def test_a_passt_is_found_by_the_socket_on_its_command_line(stand_in: tuple[subprocess.Popen[bytes], str]) -> None:
    process, socket = stand_in
    path, started = _wait_listed(Path(socket).parent, process)
    assert path == socket
    assert started > 0
    assert process.pid not in passt.find(Path(socket).parent / "other")


def test_a_recorded_pid_whose_start_time_differs_is_never_signalled(
    stand_in: tuple[subprocess.Popen[bytes], str],
) -> None:
    process, socket = stand_in
    _, started = _wait_listed(Path(socket).parent, process)
    recycled = HostProcess(process.pid, started + 1)
    assert passt.stop(str(Path(socket).parent / "elsewhere" / "p0.sock"), recycled, timeout=1) == []
    assert process.poll() is None  # still running


def test_stop_ends_the_passt_of_the_socket_and_removes_its_files(
    stand_in: tuple[subprocess.Popen[bytes], str],
) -> None:
    process, socket = stand_in
    _, started = _wait_listed(Path(socket).parent, process)
    Path(socket).touch()
    Path(passt.pid_file(socket)).write_text(f"{process.pid}\n")
    assert passt.stop(socket, HostProcess(process.pid, started), timeout=5) == [process.pid]
    assert process.wait(timeout=5) != 0  # ended by a signal
    assert not Path(socket).exists()
    assert not Path(passt.pid_file(socket)).exists()


def test_the_sweep_ends_what_is_not_kept_and_keeps_the_rest(stand_in: tuple[subprocess.Popen[bytes], str]) -> None:
    process, socket = stand_in
    directory = Path(socket).parent
    _wait_listed(directory, process)
    assert passt.sweep(directory, {socket}, timeout=5) == []
    assert process.poll() is None
    (directory / "gone.sock").touch()  # the file of a passt that died with no one to clean up
    assert passt.sweep(directory, set(), timeout=5) == [str(directory / "gone.sock"), socket]
    assert process.wait(timeout=5) != 0
    assert list(directory.glob("*.sock")) == []


def test_no_directory_means_nothing_to_sweep(tmp_path: Path) -> None:
    assert passt.sweep(tmp_path / "never-made", set(), timeout=1) == []


# ------------------------------------------------------------------------ starting (a stand-in program for passt)

root = needs.root("give the passt directory to another user")


def _program(tmp_path: Path, script: str) -> str:
    program = tmp_path / "fake-passt"
    program.write_text(f"#!/bin/sh\n{script}\n")
    program.chmod(0o755)
    return str(program)


@root
def test_the_guests_directory_belongs_to_passts_user_and_its_parents_are_reachable(tmp_path: Path) -> None:
    directory = tmp_path / "run" / "passt" / "0123456789ab"
    passt._own_directory(directory, "nobody")
    assert (directory.stat().st_uid, directory.stat().st_mode & 0o777) == (pwd.getpwnam("nobody").pw_uid, 0o700)
    assert (directory.parent.stat().st_mode & 0o777, directory.parent.parent.stat().st_mode & 0o777) == (0o755, 0o755)


@root
def test_a_missing_program_is_unsupported(tmp_path: Path) -> None:
    with pytest.raises(Unsupported, match="apt-get install passt"):
        passt.start(str(tmp_path / "g" / "p0.sock"), PasstBackend(), program=str(tmp_path / "none"), runas="nobody",
                    timeout=5)


@root
def test_passts_refusal_is_its_own_words_without_the_noise(tmp_path: Path) -> None:
    program = _program(tmp_path, "echo 'Failed to send 31 bytes to syslog' >&2; echo 'Invalid --runas option: x' >&2"
                                 "; exit 1")
    with pytest.raises(QmpnetError, match=r"failed to start: Invalid --runas option: x$"):
        passt.start(str(tmp_path / "g" / "p0.sock"), PasstBackend(), program=program, runas="nobody", timeout=5)


@root
def test_a_passt_that_did_not_bind_its_socket_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(QmpnetError, match=r"did not bind .* user nobody \(hostnet.passt_runas\) must be able to"):
        passt.start(str(tmp_path / "g" / "p0.sock"), PasstBackend(), program=_program(tmp_path, "exit 0"),
                    runas="nobody", timeout=5)


@root
def test_an_unknown_user_is_named(tmp_path: Path) -> None:
    with pytest.raises(QmpnetError) as caught:
        passt.start(str(tmp_path / "g" / "p0.sock"), PasstBackend(), program="passt", runas="no-such-user-x",
                    timeout=5)
    assert caught.value.field == "hostnet.passt_runas"


def test_a_taken_host_port_is_a_conflict_naming_the_forward() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as free:
        free.bind(("0.0.0.0", 0))  # noqa: S104 - where passt binds
        udp = free.getsockname()[1]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        backend = PasstBackend(ports=[f"udp:{udp}:53", f"tcp:{port}:22"])
        with pytest.raises(Conflict) as caught:
            passt._check_ports_free(backend)
    assert caught.value.field == "nic.backend.ports.1"
