"""The nftables table of a NAT network: rendered as text (pure), loaded with ``nft -f -`` (in a namespace thread).

Each network has a table of its own, ``inet qmpnet_<name>``, and qmpnet never touches another table. A table is
replaced in one ``nft`` transaction (``table X`` + ``delete table X`` + the new table: nft's idiom for "create
or replace" that never leaves a moment without rules) and removed with ``table X`` + ``delete table X``, which
succeeds whether or not it existed.

The rules:

* ``postrouting`` (nat): traffic from the subnet leaving through *another* interface is masqueraded, except to
  multicast and broadcast addresses (as libvirt does).
* ``forward`` (filter): into the bridge only replies (``ct state established,related``) to the subnet; every new
  connection into the subnet is dropped; out of the bridge only packets sourced from the subnet.

nftables evaluates every base chain on a hook, and an ``accept`` in one table does not override a ``drop`` in
another: a host whose own firewall drops forwarded traffic must allow the subnet there too. qmpnet adds
restrictions and the masquerade, and relaxes nothing of anyone else's.
"""

from __future__ import annotations

import json
import subprocess
from typing import TYPE_CHECKING, Any

from qmpnet.errors import QmpnetError, Unsupported

if TYPE_CHECKING:
    from qmpnet.core.hostconfig import NatNetwork

__all__ = ["apply", "list_json", "list_tables", "remove_script", "render_table"]

FAMILY = "inet"


def render_table(net: NatNetwork) -> str:
    """The ``nft -f`` script that creates or atomically replaces ``net``'s table."""
    table = f"{FAMILY} {net.table}"
    bridge = json.dumps(net.bridge)  # a quoted string; the name is already restricted to [A-Za-z0-9_.-]
    subnet = str(net.subnet)
    return "\n".join([
        f"table {table}",
        f"delete table {table}",
        f"table {table} {{",
        "    chain postrouting {",
        "        type nat hook postrouting priority srcnat; policy accept;",
        (
            f"        ip saddr {subnet} ip daddr != {subnet} oifname != {bridge} "
            "ip daddr != { 224.0.0.0/24, 255.255.255.255 } masquerade"
        ),
        "    }",
        "    chain forward {",
        "        type filter hook forward priority filter; policy accept;",
        f"        oifname {bridge} ip daddr {subnet} ct state established,related accept",
        f"        oifname {bridge} drop",
        f"        iifname {bridge} ip saddr {subnet} accept",
        f"        iifname {bridge} drop",
        "    }",
        "}",
        "",
    ])


def remove_script(table: str) -> str:
    """The ``nft -f`` script that deletes table ``table`` if it exists."""
    return f"table {FAMILY} {table}\ndelete table {FAMILY} {table}\n"


def apply(script: str, *, nft: str, timeout: float) -> None:
    """Load ``script`` with ``nft -f -`` in the calling thread's namespace (one atomic transaction).

    Raises:
        Unsupported: ``nft`` is not installed, or the kernel lacks nftables.
        QmpnetError: nft refused the script (its message is included).
    """
    _run([nft, "-f", "-"], script, nft=nft, timeout=timeout)


def list_tables(*, nft: str, timeout: float) -> set[str]:
    """The names of the ``inet`` tables in the calling thread's namespace.

    Raises:
        Unsupported, QmpnetError: As for :func:`apply`.
    """
    items = list_json(["list", "tables", FAMILY], nft=nft, timeout=timeout)
    return {item["table"]["name"] for item in items if "table" in item and item["table"].get("family") == FAMILY}


def list_json(args: list[str], *, nft: str, timeout: float) -> list[dict[str, Any]]:
    """The objects ``nft -j ARGS`` prints (its ``nftables`` array) in the calling thread's namespace.

    Raises:
        Unsupported, QmpnetError: As for :func:`apply`; also when nft prints something that is not JSON.
    """
    output = _run([nft, "-j", *args], None, nft=nft, timeout=timeout)
    try:
        items = json.loads(output or "{}").get("nftables", [])
    except (json.JSONDecodeError, AttributeError) as err:
        raise QmpnetError(f"nft printed something that is not JSON: {output[:200]!r}") from err
    return [item for item in items if isinstance(item, dict)]


def _run(argv: list[str], stdin: str | None, *, nft: str, timeout: float) -> str:
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as err:
        raise Unsupported(f"{nft} is not installed (apt-get install nftables)") from err
    except subprocess.TimeoutExpired as err:
        raise QmpnetError(f"{nft} did not finish within {timeout} s") from err
    if done.returncode != 0:
        message = done.stderr.strip() or f"exit status {done.returncode}"
        if "Operation not supported" in message or "Protocol not supported" in message:
            raise Unsupported(f"nftables is not available: {message}")
        raise QmpnetError(f"nft {' '.join(argv[1:])}: {message}")
    return done.stdout
