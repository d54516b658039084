"""Network-namespace plumbing shared by the host-networking tests.

Every test host lives in a namespace the test creates (``hv-<random>``, ``ext-<random>``...); these helpers run
``ip`` and friends there, list what is left, and tear a namespace down with everything still running in it, so a
failing test leaves nothing behind. Test modules import them as ``from netns_tools import ...``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "bridged_namespace",
    "connect_and_read",
    "ip",
    "kernel_filters_vlans",
    "kernel_has_netem",
    "kill_namespace",
    "link_names",
    "links",
    "listen",
    "namespace_pids",
    "nft_tables",
    "serve_once",
]


def ip(*args: str) -> str:
    """Run ``ip ARGS`` and return its output (raises on failure)."""
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def links(netns: str | None) -> dict[str, dict[str, Any]]:
    """The links of ``netns`` (``None``: the root namespace) as ``ip -d -j link show`` describes them."""
    where = ["-n", netns] if netns else []
    return {link["ifname"]: link for link in json.loads(ip(*where, "-d", "-j", "link", "show"))}


def link_names(netns: str) -> set[str]:
    """The names of the links in ``netns``."""
    return set(links(netns))


def nft_tables(netns: str | None) -> str:
    """``nft list tables`` in ``netns`` (``None``: the root namespace)."""
    argv = ["ip", "netns", "exec", netns, "nft", "list", "tables"] if netns else ["nft", "list", "tables"]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()


def namespace_pids(name: str) -> list[int]:
    """Live (not zombie) processes whose network namespace is ``name``."""
    inode = (Path("/run/netns") / name).stat().st_ino
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (proc / "stat").read_text()
                if (proc / "ns/net").stat().st_ino == inode and stat[stat.rindex(")") + 2] != "Z":
                    pids.append(int(proc.name))
    return pids


def kill_namespace(name: str) -> None:
    """Kill every process left in namespace ``name``, then delete it (no-op if it is gone)."""
    if not (Path("/run/netns") / name).exists():
        return
    for pid in namespace_pids(name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", name], check=False)


@contextlib.contextmanager
def bridged_namespace(prefix: str = "hv") -> Iterator[str]:
    """A namespace ``<prefix>-<random>`` with an up bridge ``br0``, torn down with everything in it on exit."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "add", "br0", "type", "bridge")
        ip("-n", name, "link", "set", "br0", "up")
        yield name
    finally:
        kill_namespace(name)


def listen(host: str, port: int, timeout: float = 20) -> socket.socket:
    """A listening TCP socket that gives up accepting after ``timeout`` seconds."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen()
    server.settimeout(timeout)
    return server


def serve_once(server: socket.socket, greeting: bytes = b"hi\n") -> str:
    """Accept one connection, send ``greeting``, and return the peer address the server saw."""
    with server:
        conn, (peer, _) = server.accept()
        with conn:
            conn.sendall(greeting)
        return str(peer)


def connect_and_read(host: str, port: int, timeout: float) -> bytes:
    """Connect and read until the peer closes."""
    with socket.create_connection((host, port), timeout=timeout) as conn:
        data = b""
        while chunk := conn.recv(100):
            data += chunk
        return data


def _probe(*commands: list[str]) -> bool:
    """Whether every command succeeds in a throw-away namespace (``{ns}`` in a command is its name)."""
    name = f"probe-{uuid.uuid4().hex[:6]}"
    try:
        ip("netns", "add", name)
        return all(
            subprocess.run([part.format(ns=name) for part in command], capture_output=True, check=False).returncode == 0
            for command in commands
        )
    except (OSError, subprocess.CalledProcessError):
        return False  # no root or no iproute2: the tests that need these skip on their own markers first
    finally:
        kill_namespace(name)


def kernel_has_netem() -> bool:
    """Whether this kernel has the netem qdisc (CONFIG_NET_SCH_NETEM), probed on a veth."""
    return _probe(["ip", "-n", "{ns}", "link", "add", "p0", "type", "veth", "peer", "name", "p1"],
                  ["tc", "-n", "{ns}", "qdisc", "add", "dev", "p0", "root", "netem", "delay", "1ms"])


def kernel_filters_vlans() -> bool:
    """Whether this kernel's bridges can filter VLANs (CONFIG_BRIDGE_VLAN_FILTERING)."""
    return _probe(["ip", "-n", "{ns}", "link", "add", "b0", "type", "bridge", "vlan_filtering", "1"])
