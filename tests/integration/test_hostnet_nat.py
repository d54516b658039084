"""NAT networks for real, in namespaces the test creates: ``hv`` (the host), ``ext`` (the outside), ``g`` (a guest).

``g`` stands in for a guest: a veth whose host end is on the NAT bridge in ``hv``, as a tap would be. ``hv`` has an
uplink veth to ``ext`` (10.99.0.1 <-> 10.99.0.2). Nothing touches the root namespace; every namespace is deleted
afterwards with any process left in it (dnsmasq, udhcpc) killed first, even when a test fails.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import needs
import pytest
from netns_tools import ip, kill_namespace, listen, namespace_pids, serve_once

from qmpnet.adapters.hostnet import HostnetSettings, NatNetwork, net_down, net_list, net_status, net_up
from qmpnet.adapters.hostnet.netns import run_in_netns
from qmpnet.errors import Conflict, InvalidRequest

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [
    pytest.mark.integration,
    needs.root("create network namespaces"),
    needs.tool("ip", "iproute2"),
    needs.tool("nft", "nftables"),
    needs.tool("dnsmasq", "dnsmasq-base"),
]

NET = NatNetwork(name="test")
UPLINK_HV, UPLINK_EXT = "10.99.0.1", "10.99.0.2"


def in_ns(netns: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=timeout,
                          check=False)


def root_firewall() -> tuple[str, str]:
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=False).stdout
    return tables, Path("/proc/sys/net/ipv4/ip_forward").read_text()


@dataclass
class Lab:
    hv: str
    ext: str
    g: str
    settings: HostnetSettings


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """The three namespaces, wired; afterwards the root namespace's tables and ip_forward must be as before."""
    before = root_firewall()
    tag = uuid.uuid4().hex[:6]
    names = [f"hv-{tag}", f"ext-{tag}", f"g-{tag}"]
    hv, ext, g = names
    try:
        for name in names:
            ip("netns", "add", name)
            ip("-n", name, "link", "set", "lo", "up")
        ip("-n", hv, "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", ext)
        ip("-n", hv, "addr", "add", f"{UPLINK_HV}/24", "dev", "up0")
        ip("-n", hv, "link", "set", "up0", "up")
        ip("-n", ext, "addr", "add", f"{UPLINK_EXT}/24", "dev", "eth0")
        ip("-n", ext, "link", "set", "eth0", "up")
        ip("-n", hv, "link", "add", "gport", "type", "veth", "peer", "name", "eth0", "netns", g)
        ip("-n", g, "link", "set", "eth0", "up")
        yield Lab(hv, ext, g, HostnetSettings(state_dir=tmp_path / "state", networks=(NET,)))
    finally:
        for name in names:
            kill_namespace(name)
    assert root_firewall() == before, "the root namespace's nftables tables or ip_forward changed"


def connect(host: str, port: int, timeout: float) -> bytes:
    with socket.create_connection((host, port), timeout=timeout) as conn:
        return conn.recv(2)


def dhcp(lab: Lab, tmp_path: Path) -> tuple[str, str]:
    """Run busybox's udhcpc in ``g``; return the leased address and router."""
    out = tmp_path / "lease"
    script = tmp_path / "udhcpc.sh"
    script.write_text(f'#!/bin/sh\n[ "$1" = bound ] && echo "$ip $router" > {out}\nexit 0\n')
    script.chmod(0o755)
    done = in_ns(lab.g, "busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "10", "-T", "1", "-s",
                 str(script))
    assert done.returncode == 0, f"udhcpc failed: {done.stdout}{done.stderr}"
    address, router = out.read_text().split()
    return address, router


async def test_net_up_is_idempotent_and_net_down_leaves_nothing(lab: Lab) -> None:
    status = await net_up(NET, netns=lab.hv, settings=lab.settings)
    assert status.up
    assert status.bridge_present
    assert status.table_present
    assert status.forwarding
    assert status.dnsmasq_pid in namespace_pids(lab.hv)

    again = await net_up(NET, netns=lab.hv, settings=lab.settings)
    assert again.dnsmasq_pid == status.dnsmasq_pid  # converged: nothing restarted

    bridge = json.loads(ip("-n", lab.hv, "-j", "-d", "addr", "show", "dev", "qmpnat0"))[0]
    assert bridge["ifalias"] == "qmpnet:nat:test"
    assert {"local": "192.168.123.1", "prefixlen": 24} in [
        {"local": a["local"], "prefixlen": a["prefixlen"]} for a in bridge["addr_info"]
    ]
    tables = in_ns(lab.hv, "nft", "list", "tables").stdout.split("\n")
    assert [t for t in tables if t] == ["table inet qmpnet_test"]
    assert in_ns(lab.hv, "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"
    listening = in_ns(lab.hv, "ss", "-Hlnup").stdout
    assert "192.168.123.1:53" in listening
    assert "0.0.0.0%qmpnat0:67" in listening
    assert not [line for line in listening.splitlines() if "dnsmasq" in line and "up0" in line]

    [listed] = await net_list(netns=lab.hv, settings=lab.settings)
    assert listed.up

    assert await net_down("test", netns=lab.hv, settings=lab.settings) is True
    assert await net_down("test", netns=lab.hv, settings=lab.settings) is False
    assert "qmpnat0" not in ip("-n", lab.hv, "link", "show")
    assert in_ns(lab.hv, "nft", "list", "tables").stdout.strip() == ""
    assert namespace_pids(lab.hv) == []
    assert not list(lab.settings.state_dir.iterdir())
    down = await net_status(NET, netns=lab.hv, settings=lab.settings)
    assert (down.up, down.bridge_present, down.table_present, down.dnsmasq_pid) == (False, False, False, None)


@needs.tool("busybox", "busybox-static")  # udhcpc, the guest's DHCP client
async def test_guest_gets_a_lease_reaches_out_masqueraded_and_cannot_be_reached(lab: Lab, tmp_path: Path) -> None:
    await net_up(NET, netns=lab.hv, settings=lab.settings)
    ip("-n", lab.hv, "link", "set", "gport", "master", "qmpnat0", "up")

    address, router = await asyncio.to_thread(dhcp, lab, tmp_path)
    assert router == "192.168.123.1"
    assert 100 <= int(address.rsplit(".", 1)[1]) <= 200
    mac = json.loads(ip("-n", lab.g, "-j", "link", "show", "dev", "eth0"))[0]["address"]
    status = await net_status(NET, netns=lab.hv, settings=lab.settings)
    assert [(lease.mac, str(lease.ip)) for lease in status.leases] == [(mac, address)]
    ip("-n", lab.g, "addr", "add", f"{address}/24", "dev", "eth0")
    ip("-n", lab.g, "route", "add", "default", "via", router)

    # Out: the outside host sees the hv uplink address, not the guest's.
    server = await run_in_netns(lab.ext, lambda: listen(UPLINK_EXT, 8080))
    accepted = asyncio.create_task(asyncio.to_thread(serve_once, server))
    assert await run_in_netns(lab.g, lambda: connect(UPLINK_EXT, 8080, 5)) == b"hi"
    assert await accepted == UPLINK_HV

    # In: a new connection from outside to the guest is dropped (it times out, it is not even refused) ...
    ip("-n", lab.ext, "route", "add", str(NET.subnet), "via", UPLINK_HV)
    guest_server = await run_in_netns(lab.g, lambda: listen("0.0.0.0", 8081))  # noqa: S104 - inside the test ns
    try:
        with pytest.raises(TimeoutError):
            await run_in_netns(lab.ext, lambda: connect(address, 8081, 1.5))

        # ... and it is qmpnet's table that drops it: without the table it gets through; net_up puts it back.
        assert in_ns(lab.hv, "nft", "delete", "table", "inet", "qmpnet_test").returncode == 0
        accepted = asyncio.create_task(asyncio.to_thread(serve_once, guest_server))
        assert await run_in_netns(lab.ext, lambda: connect(address, 8081, 5)) == b"hi"
        assert await accepted == UPLINK_EXT
        assert not (await net_status(NET, netns=lab.hv, settings=lab.settings)).up
        assert (await net_up(NET, netns=lab.hv, settings=lab.settings)).up
        with pytest.raises(TimeoutError):
            await run_in_netns(lab.ext, lambda: connect(address, 8081, 1.5))
    finally:
        guest_server.close()

    assert await net_down(NET, netns=lab.hv, settings=lab.settings)
    assert in_ns(lab.hv, "nft", "list", "tables").stdout.strip() == ""
    assert namespace_pids(lab.hv) == []
    assert "qmpnat0" not in ip("-n", lab.hv, "link", "show")
    assert "gport" in ip("-n", lab.hv, "link", "show")  # released from the bridge, not deleted


async def test_concurrent_bring_ups_converge_on_one_network(lab: Lab) -> None:
    statuses = await asyncio.gather(*(net_up(NET, netns=lab.hv, settings=lab.settings) for _ in range(4)))
    assert {status.dnsmasq_pid for status in statuses} == {statuses[0].dnsmasq_pid}
    assert namespace_pids(lab.hv) == [statuses[0].dnsmasq_pid]
    await net_down("test", netns=lab.hv, settings=lab.settings)


async def test_a_changed_network_is_converged(lab: Lab) -> None:
    first = await net_up(NET, netns=lab.hv, settings=lab.settings)
    changed = NatNetwork(name="test", subnet="10.77.0.0/24", dhcp_range="10.77.0.10-10.77.0.20")
    second = await net_up(changed, netns=lab.hv, settings=lab.settings)
    assert second.up
    assert second.dnsmasq_pid != first.dnsmasq_pid
    assert namespace_pids(lab.hv) == [second.dnsmasq_pid]
    addresses = json.loads(ip("-n", lab.hv, "-j", "-4", "addr", "show", "dev", "qmpnat0"))[0]["addr_info"]
    assert [(a["local"], a["prefixlen"]) for a in addresses] == [("10.77.0.1", 24)]
    ruleset = in_ns(lab.hv, "nft", "list", "table", "inet", "qmpnet_test").stdout
    assert "10.77.0.0/24" in ruleset
    assert "192.168.123.0/24" not in ruleset
    await net_down("test", netns=lab.hv, settings=lab.settings)
    assert namespace_pids(lab.hv) == []


async def test_a_foreign_bridge_or_subnet_is_a_conflict_and_left_alone(lab: Lab) -> None:
    ip("-n", lab.hv, "link", "add", "qmpnat0", "type", "bridge")
    with pytest.raises(Conflict) as caught:
        await net_up(NET, netns=lab.hv, settings=lab.settings)
    assert caught.value.field == "network.bridge"
    assert await net_down("test", netns=lab.hv, settings=lab.settings) is False
    assert "qmpnat0" in ip("-n", lab.hv, "link", "show")  # not ours: not deleted
    ip("-n", lab.hv, "link", "del", "qmpnat0")

    ip("-n", lab.hv, "addr", "add", "192.168.123.7/24", "dev", "up0")
    with pytest.raises(Conflict) as overlap:
        await net_up(NET, netns=lab.hv, settings=lab.settings)
    assert overlap.value.field == "network.subnet"
    assert "up0" in str(overlap.value)
    # The failed bring-up removed what it had made.
    assert "qmpnat0" not in ip("-n", lab.hv, "link", "show")
    assert in_ns(lab.hv, "nft", "list", "tables").stdout.strip() == ""
    assert namespace_pids(lab.hv) == []


async def test_a_malformed_network_name_is_an_invalid_request(lab: Lab) -> None:
    with pytest.raises(InvalidRequest):
        await net_down("../x", netns=lab.hv, settings=lab.settings)
