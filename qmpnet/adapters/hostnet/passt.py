"""passt for one NIC: its command line (pure), its start and its end (blocking: callers run them in a thread).

passt (Debian's package ``passt``) is the user-mode backend of libvirt and KubeVirt. qmpnet runs one per NIC, on
the unix socket ``<hostnet.passt_dir>/<guest hash>/<nic>.sock``, and QEMU connects to it with a ``stream``
netdev. How it is run follows from how passt (0.0~git20230309, Debian 12) behaves:

* It drops to ``--runas`` *before* it binds its socket and opens its pid file, and does not report a bind that
  fails. So the guest's directory is made owned by that user, and a start counts only once the socket exists.
* It daemonizes: the process qmpnet runs exits once the socket listens, after writing the daemon's pid (``--pid``),
  and its errors (a bad option, an unknown user) arrive as its exit status and stderr. The daemon outlives the
  qmpnet process that started it, as the NIC does; it is ended when the NIC is removed, or by recovery.
* It does not fail when a forwarded host port is taken (the forward just does not work), so the ports are tried
  first, and a taken one is a ``conflict`` naming ``nic.backend.ports.<i>``.

A passt is ended by its pid *and* start time (``/proc/<pid>/stat``, field 22), both kept in the state store,
through a pidfd: a recycled pid is never signalled. One whose pid was never recorded (a controller killed between
the start and the record) is found by its command line, which names its socket (:func:`find`).
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import select
import signal
import socket as sockets
import stat
import subprocess
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING

from qmpnet.adapters.hostnet.processes import start_time
from qmpnet.core.ports import HostProcess
from qmpnet.errors import Conflict, QmpnetError, Unsupported

if TYPE_CHECKING:
    from qmpnet.core.model import PasstBackend

__all__ = ["argv", "find", "pid_file", "start", "stop", "sweep"]

_PROC = Path("/proc")
#: What passt writes to stderr on every start when no syslog is reachable: noise, not its reason to fail.
_NOISE = ("Failed to send", "UNIX domain socket bound", "You can now start qemu", "kvm ...", "or qrap", "./qrap")


def pid_file(socket: str) -> str:
    """Where the passt listening on ``socket`` writes its pid."""
    return str(Path(socket).with_suffix(".pid"))


def argv(socket: str, backend: PasstBackend, *, program: str, runas: str) -> list[str]:
    """The passt command line for ``backend`` on ``socket``."""
    args = [program, "--quiet", "--runas", runas, "--socket", socket, "--pid", pid_file(socket)]
    if not backend.ipv6:
        args.append("--ipv4-only")
    for proto, host, guest in backend.forwards():
        args += ["--tcp-ports" if proto == "tcp" else "--udp-ports", f"{host}:{guest}"]
    return args


def start(socket: str, backend: PasstBackend, *, program: str, runas: str, timeout: float) -> HostProcess:
    """Start passt for ``backend`` on ``socket`` in the calling thread's namespace; return it once it listens.

    Raises:
        Unsupported: passt is not installed.
        Conflict: A forwarded host port is taken.
        QmpnetError: ``runas`` is unknown, or passt refused to start or did not bind its socket.
    """
    directory = Path(socket).parent
    try:
        stop(socket, None, timeout=timeout)  # a passt (or its files) left on this socket by a killed process
        _own_directory(directory, runas)
    except OSError as err:
        raise QmpnetError(f"hostnet.passt_dir: cannot prepare {directory}: {err.strerror or err}",
                          field="hostnet.passt_dir") from err
    _check_ports_free(backend)
    try:
        done = subprocess.run(argv(socket, backend, program=program, runas=runas), capture_output=True, text=True,
                              timeout=timeout, check=False, stdin=subprocess.DEVNULL)
    except FileNotFoundError as err:
        raise Unsupported(f"nic.backend.type: {program} is not installed (apt-get install passt)",
                          field="nic.backend.type") from err
    except subprocess.TimeoutExpired as err:
        stop(socket, None, timeout=timeout)
        raise QmpnetError(f"passt for {socket} did not start within {timeout:g} s") from err
    if done.returncode != 0:
        raise QmpnetError(f"passt for {socket} failed to start: {_reason(done.stderr, done.returncode)}")
    process = _daemon(socket)
    if process is None or not _is_socket(socket):
        stop(socket, process, timeout=timeout)
        raise QmpnetError(f"passt did not bind {socket}: user {runas} (hostnet.passt_runas) must be able to reach "
                          f"{directory.parent} (hostnet.passt_dir)")
    return process


def stop(socket: str, process: HostProcess | None, *, timeout: float) -> list[int]:
    """End the passt on ``socket`` (SIGTERM, then SIGKILL after ``timeout``) and remove its files; its pids.

    ``process`` is signalled only while its start time still matches; any other passt whose command line names
    ``socket`` is ended too.
    """
    targets: dict[int, int] = {}
    if process is not None and start_time(process.pid) == process.started:
        targets[process.pid] = process.started
    for pid, (path, started) in find(Path(socket).parent).items():
        if path == socket:
            targets[pid] = started
    ended = [pid for pid, started in targets.items() if _end(pid, started, timeout)]
    for path in (socket, pid_file(socket)):
        Path(path).unlink(missing_ok=True)
    with suppress(OSError):  # not empty: other NICs' passts live there
        Path(socket).parent.rmdir()
    return ended


def find(directory: Path) -> dict[int, tuple[str, int]]:
    """The live passts whose socket is in ``directory``: pid -> (socket, start time)."""
    found: dict[int, tuple[str, int]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parts = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # the process ended while we looked
            continue
        if b"--socket" not in parts[:-1]:
            continue
        path = parts[parts.index(b"--socket") + 1].decode(errors="replace")
        started = start_time(int(entry.name))
        if Path(path).parent == directory and started is not None:
            found[int(entry.name)] = (path, started)
    return found


def sweep(directory: Path, keep: set[str], *, timeout: float) -> list[str]:
    """End the passts with a socket in ``directory`` that is not in ``keep``; remove files left of ended ones."""
    if not directory.is_dir():
        return []  # no passt was ever started for this guest (or all were cleaned up): nothing to read in /proc
    stale = {path for path, _ in find(directory).values() if path not in keep}
    stale |= {str(path) for path in directory.glob("*.sock") if str(path) not in keep}
    for path in sorted(stale):
        stop(path, None, timeout=timeout)
    return sorted(stale)


def _own_directory(directory: Path, runas: str) -> None:
    """Make ``directory`` (mode 0700) owned by ``runas``: passt binds its socket after dropping to that user."""
    uid, gid = _ids(runas)
    for missing in reversed([d for d in directory.parents if not d.exists()]):
        missing.mkdir(exist_ok=True)
        missing.chmod(0o755)  # whatever the umask: passt's user must reach its directory through these
    directory.mkdir(mode=0o700, exist_ok=True)
    os.chown(directory, uid, gid)
    directory.chmod(0o700)


def _ids(runas: str) -> tuple[int, int]:
    user, _, group = runas.partition(":")
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        uid, gid = entry.pw_uid, entry.pw_gid
    except KeyError as err:
        if not user.isdigit():
            raise QmpnetError(f"hostnet.passt_runas: no user {user!r} on this host",
                              field="hostnet.passt_runas") from err
        uid = gid = int(user)  # a bare number needs no passwd entry
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError as err:
            raise QmpnetError(f"hostnet.passt_runas: no group {group!r} on this host",
                              field="hostnet.passt_runas") from err
    return uid, gid


def _check_ports_free(backend: PasstBackend) -> None:
    for index, (proto, host, _) in enumerate(backend.forwards()):
        kind = sockets.SOCK_STREAM if proto == "tcp" else sockets.SOCK_DGRAM
        with sockets.socket(sockets.AF_INET, kind) as probe:
            probe.setsockopt(sockets.SOL_SOCKET, sockets.SO_REUSEADDR, 1)  # as passt does: TIME_WAIT is no owner
            field = f"nic.backend.ports.{index}"
            try:
                probe.bind(("0.0.0.0", host))  # noqa: S104 - where passt binds the forward
            except OSError as err:
                if err.errno != errno.EADDRINUSE:
                    raise QmpnetError(f"{field}: host {proto} port {host}: {err.strerror}", field=field) from err
                raise Conflict(f"{field}: host {proto} port {host} is already in use", field=field) from err


def _reason(stderr: str, status: int) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and not line.strip().startswith(_NOISE)]
    return "; ".join(lines)[-500:] or f"exit status {status}"


def _daemon(socket: str) -> HostProcess | None:
    """The daemon the started passt left (its pid file), if it still runs and serves ``socket``."""
    try:
        pid = int(Path(pid_file(socket)).read_text().strip())
    except (OSError, ValueError):
        return None
    started = start_time(pid)
    return HostProcess(pid, started) if started is not None else None


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(Path(path).stat().st_mode)
    except OSError:
        return False


def _end(pid: int, started: int, timeout: float) -> bool:
    """SIGTERM process ``pid`` if it is still the one started at ``started``, SIGKILL after ``timeout``."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        # The pidfd holds the process: if the start time matches now, no signal below can reach a recycled pid.
        if start_time(pid) != started:
            return False
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, sig)
            if select.select([fd], [], [], timeout)[0]:  # a pidfd is readable once the process has exited
                return True
        return True
    finally:
        os.close(fd)
