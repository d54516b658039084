"""dnsmasq for one NAT network: its command line (pure), start, find and stop (in a namespace thread).

One dnsmasq per network, bound to that network's bridge only (``--interface`` + ``--bind-interfaces``, never
``lo``), reading no configuration file (``--conf-file=/dev/null``) so a distribution's ``/etc/dnsmasq.conf``
cannot widen it, with its pid and lease files in qmpnet's state directory. dnsmasq daemonizes and reports
start-up errors through its exit status before the parent exits, so a failed start is seen at once.

A running dnsmasq is found by its command line rather than by trusting the pid file: a process whose
arguments contain this network's ``--pid-file=...`` is ours (the pid file's path is unique per network and
state directory), which survives stale pid files and pid reuse. An exact comparison of the whole command line
tells whether it runs with the current settings; :func:`qmpnet.adapters.hostnet.nat.net_up` restarts it when not.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING

from qmpnet.errors import QmpnetError, Unsupported

if TYPE_CHECKING:
    from qmpnet.core.hostconfig import NatNetwork

__all__ = ["argv", "find", "lease_file", "pid_file", "start", "stop"]

_PROC = Path("/proc")
_POLL = 0.02


def pid_file(net: NatNetwork, state_dir: Path) -> Path:
    """Where dnsmasq of ``net`` writes its pid."""
    return state_dir / f"nat-{net.name}.pid"


def lease_file(net: NatNetwork, state_dir: Path) -> Path:
    """Where dnsmasq of ``net`` keeps its DHCP leases."""
    return state_dir / f"nat-{net.name}.leases"


def argv(net: NatNetwork, state_dir: Path, *, dnsmasq: str) -> list[str]:
    """The dnsmasq command line for ``net``."""
    first, last = net.dhcp_range
    return [
        dnsmasq,
        "--conf-file=/dev/null",
        f"--pid-file={pid_file(net, state_dir)}",
        f"--dhcp-leasefile={lease_file(net, state_dir)}",
        f"--interface={net.bridge}",
        "--bind-interfaces",
        "--except-interface=lo",
        f"--listen-address={net.gateway}",
        f"--dhcp-range={first},{last},{net.subnet.netmask},{net.lease_seconds}",
        "--dhcp-authoritative",
        "--dhcp-no-override",
        "--strict-order",
        "--no-hosts",
        "--domain-needed",
        "--bogus-priv",
        f"--port={53 if net.dns else 0}",
    ]


def find(net: NatNetwork, state_dir: Path) -> dict[int, list[str]]:
    """The live (not zombie) dnsmasq processes serving ``net``, with their command lines."""
    marker = f"--pid-file={pid_file(net, state_dir)}".encode()
    found: dict[int, list[str]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if marker not in cmdline.split(b"\0") or _is_zombie(entry):
                continue
        except OSError:  # the process ended while we looked
            continue
        found[int(entry.name)] = [part.decode(errors="replace") for part in cmdline.split(b"\0") if part]
    return found


def start(net: NatNetwork, state_dir: Path, *, dnsmasq: str, timeout: float) -> int:
    """Start dnsmasq for ``net`` in the calling thread's namespace; return its pid.

    Raises:
        Unsupported: dnsmasq is not installed.
        QmpnetError: dnsmasq refused to start (its message is included) or did not daemonize in time.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    command = argv(net, state_dir, dnsmasq=dnsmasq)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError as err:
        raise Unsupported(f"{dnsmasq} is not installed (apt-get install dnsmasq-base)") from err
    except subprocess.TimeoutExpired as err:
        raise QmpnetError(f"dnsmasq for network {net.name} did not start within {timeout} s") from err
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
        raise QmpnetError(f"dnsmasq for network {net.name} failed to start: {message}")
    deadline = time.monotonic() + timeout
    while not (pids := find(net, state_dir)):
        if time.monotonic() > deadline:
            raise QmpnetError(f"dnsmasq for network {net.name} exited right after starting")
        time.sleep(_POLL)
    return min(pids)


def stop(net: NatNetwork, state_dir: Path, *, timeout: float) -> list[int]:
    """Stop every dnsmasq serving ``net``: SIGTERM, then SIGKILL after ``timeout``; remove its files.

    Returns:
        The pids that were stopped.
    """
    pids = list(find(net, state_dir))
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while (left := [pid for pid in pids if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(_POLL)
    for pid in left:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for path in (pid_file(net, state_dir), lease_file(net, state_dir)):
        path.unlink(missing_ok=True)
    return pids


def _alive(pid: int) -> bool:
    try:
        return not _is_zombie(_PROC / str(pid))
    except OSError:
        return False


def _is_zombie(proc: Path) -> bool:
    # Daemons are re-parented to PID 1, which need not reap them; a zombie has stopped serving.
    stat = (proc / "stat").read_text()
    return stat[stat.rindex(")") + 2] in "ZX"
