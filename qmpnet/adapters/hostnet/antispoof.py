"""Anti-spoofing of a NIC's tap: nftables rules in qmpnet's own ``bridge`` table (rendered pure, loaded with nft).

One table, ``bridge qmpnet_antispoof``, holds every filtered tap of the namespace:

* a base chain ``prerouting`` (hook prerouting: every frame a bridge port receives, before the bridge forwards
  it or hands it to the host) with one rule, ``iifname vmap @taps``;
* the map ``taps``: tap name -> ``jump tap_<name>``; a tap without an element is not looked at;
* per tap a chain ``tap_<name>`` with that NIC's rules (:func:`render_rules`). They only drop: what passes them
  goes on to the bridge and to every other table's rules as before.

A tap's rules are created, replaced and removed in one ``nft -f`` transaction each (:func:`replace_script`,
:func:`remove_script`): the chain is flushed and refilled in the same transaction, so a change never leaves a
moment without rules. Both scripts first (re)declare the table, the map and the base chain with ``add``, which
is idempotent, and flush the base chain before adding its one rule, so they work on a namespace that has no
table yet and never duplicate the dispatch rule. Removing a tap's rules also succeeds when it had none.

The map is keyed by interface *name*: the rules of a tap that is gone would apply to a new tap given the same
name, so they leave with the NIC (``HostNet.delete_tap``'s caller) and recovery sweeps those of taps that are
gone (:func:`filtered_taps`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from qmpnet.adapters.hostnet import nftables

if TYPE_CHECKING:
    from qmpnet.core.nic_filter import NicFilter

__all__ = ["TABLE", "chain_name", "filtered_taps", "remove_script", "render_rules", "replace_script"]

FAMILY = "bridge"
TABLE = "qmpnet_antispoof"
_PREFIX = f"{FAMILY} {TABLE}"
_MAP = "taps"
#: Characters nft takes in an unquoted chain name (1.0.6 refuses quoted ones); others are hex-escaped.
_PLAIN = re.compile(r"[A-Za-z0-9.]")
#: What a guest needs to send from :: while it has no address: IPv6 duplicate address detection and MLD reports.
_UNSPECIFIED_V6 = "{ nd-neighbor-solicit, mld-listener-report, mld2-listener-report }"
#: DHCP server ports: a guest answering on them would hand out addresses to its neighbours.
_DHCP_SERVER_V4 = 67
#: The source of a guest without an IPv4 address: an ARP probe (RFC 5227) and a DHCP discovery.
_ANY_V4 = "0.0.0.0"  # noqa: S104 - an address matched, not one bound
_DHCP_SERVER_V6 = 547


def chain_name(tap: str) -> str:
    """The chain of ``tap``'s rules: ``tap_<name>``, each character outside ``[A-Za-z0-9.]`` as ``_<hex>``."""
    return "tap_" + "".join(c if _PLAIN.fullmatch(c) else f"_{ord(c):02x}" for c in tap)


def render_rules(mac: str, nic_filter: NicFilter) -> list[str]:
    """The rules of a tap's chain, in order, for a NIC with MAC ``mac`` and filter ``nic_filter`` (pure).

    VLAN-tagged frames are dropped when an address family is checked: nft's ``ip``/``arp`` matches see only
    untagged frames, so a tag would carry any source address past them.
    """
    rules: list[str] = []
    checks_addresses = nic_filter.ipv4 is not None or nic_filter.ipv6 is not None
    if checks_addresses:
        rules.append("ether type { 8021q, 8021ad } drop")
    if nic_filter.mac:
        rules += [f"ether saddr != {mac} drop", f"ether type arp arp saddr ether != {mac} drop"]
    if not nic_filter.dhcp_server:
        rules += [
            f"ip protocol udp udp sport {_DHCP_SERVER_V4} drop",
            f"ip6 nexthdr udp udp sport {_DHCP_SERVER_V6} drop",
        ]
    if nic_filter.ipv4 is not None:
        allowed = sorted({str(a) for a in nic_filter.ipv4})
        rules += [
            f"ether type arp arp saddr ip != {_set([_ANY_V4, *allowed])} drop",
            f"ip saddr {_ANY_V4} ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept",
            f"ip saddr != {_set(allowed)} drop" if allowed else "ether type ip drop",
        ]
    if nic_filter.ipv6 is not None:
        allowed = sorted({str(a) for a in nic_filter.ipv6})
        rules += [
            f"ip6 saddr :: icmpv6 type {_UNSPECIFIED_V6} accept",
            f"ip6 saddr != {_set(['fe80::/10', *allowed])} drop",
        ]
    return rules


def _set(items: list[str]) -> str:
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def _skeleton(tap: str) -> list[str]:
    """Declare the table, map, base chain (with its one rule) and ``tap``'s chain: idempotent."""
    return [
        f"add table {_PREFIX}",
        f"add map {_PREFIX} {_MAP} {{ type ifname : verdict; }}",
        f"add chain {_PREFIX} prerouting {{ type filter hook prerouting priority filter; policy accept; }}",
        f"flush chain {_PREFIX} prerouting",
        f"add rule {_PREFIX} prerouting iifname vmap @{_MAP}",
        f"add chain {_PREFIX} {chain_name(tap)}",
        f"flush chain {_PREFIX} {chain_name(tap)}",
    ]


def replace_script(tap: str, mac: str, nic_filter: NicFilter) -> str:
    """The ``nft -f`` script that gives ``tap`` exactly these rules (creating or atomically replacing them)."""
    chain = chain_name(tap)
    rules = [f"add rule {_PREFIX} {chain} {rule}" for rule in render_rules(mac, nic_filter)]
    element = f'add element {_PREFIX} {_MAP} {{ "{tap}" : jump {chain} }}'
    return "\n".join([*_skeleton(tap), *rules, element, ""])


def remove_script(tap: str) -> str:
    """The ``nft -f`` script that removes ``tap``'s rules; it succeeds whether or not it had any."""
    chain = chain_name(tap)
    return "\n".join([
        *_skeleton(tap),
        # Added first so that the delete that follows always finds it (nft has no "delete if present").
        f'add element {_PREFIX} {_MAP} {{ "{tap}" : jump {chain} }}',
        f'delete element {_PREFIX} {_MAP} {{ "{tap}" }}',
        f"delete chain {_PREFIX} {chain}",
        "",
    ])


def filtered_taps(*, nft: str, timeout: float) -> set[str]:
    """The taps that have rules in the calling thread's namespace (none when the table does not exist).

    Raises:
        Unsupported, QmpnetError: As for :func:`qmpnet.adapters.hostnet.nftables.apply`.
    """
    tables = nftables.list_json(["list", "tables", FAMILY], nft=nft, timeout=timeout)
    if not any(item.get("table", {}).get("name") == TABLE for item in tables):
        return set()
    items = nftables.list_json(["list", "map", FAMILY, TABLE, _MAP], nft=nft, timeout=timeout)
    taps: set[str] = set()
    for item in items:
        for element in item.get("map", {}).get("elem", []):
            if isinstance(element, list) and element and isinstance(element[0], str):
                taps.add(element[0])
    return taps
