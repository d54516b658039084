"""The host side of live NIC changes for real, in namespaces the tests create: moves, VLANs, tc shaping.

No QEMU here: a veth end stands in for a guest's tap (``port0`` in ``hv-<random>``, its peer ``eth0`` in
``gst-<random>`` playing the guest), because what qmpnet does to a tap (re-enslave it, set its bridge VLANs, put
tc qdiscs and an IFB on it) is the same for any link, and the peer namespace can run real TCP at the shaped rate.
The tests with booted guests are in test_live_change.py. Each namespace is deleted afterwards, whatever happens.

    gst: eth0 10.9.1.2 ==veth== port0 (hv) --master--> br-a 10.9.1.1          br-b (empty)
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import needs
import pytest
from netns_tools import ip, kernel_filters_vlans, kernel_has_netem, kill_namespace, links, listen
from throughput import Measured, receive_bulk, send_bulk

from qmpnet.adapters.hostnet import HostnetSettings, create_tap
from qmpnet.adapters.hostnet.host import HostNet
from qmpnet.adapters.hostnet.netns import run_in_netns
from qmpnet.core.model import Shape, Vlan
from qmpnet.errors import Conflict, InvalidRequest, NotFound, Unsupported

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [
    pytest.mark.integration,
    needs.root("create network namespaces"),
    needs.tool("ip", "iproute2"),
    needs.tool("tc", "iproute2"),
]

HV_IP, GST_IP, PORT = "10.9.1.1", "10.9.1.2", 5201
RATE_BITS = 5_000_000
TRANSFER = 2 * 1024 * 1024  # 3.4 s at 5 Mbit/s
TOLERANCE = 0.25


@dataclass
class Ns:
    hv: str
    gst: str

    def host(self) -> HostNet:
        return HostNet(HostnetSettings(netns=self.hv))


@pytest.fixture
def ns() -> Iterator[Ns]:
    tag = uuid.uuid4().hex[:6]
    hv, gst = f"hv-{tag}", f"gst-{tag}"
    try:
        for name in (hv, gst):
            ip("netns", "add", name)
            ip("-n", name, "link", "set", "lo", "up")
        for bridge in ("br-a", "br-b"):
            ip("-n", hv, "link", "add", bridge, "type", "bridge")
            ip("-n", hv, "link", "set", bridge, "up")
        ip("-n", hv, "addr", "add", f"{HV_IP}/24", "dev", "br-a")
        ip("-n", hv, "link", "add", "port0", "type", "veth", "peer", "name", "eth0", "netns", gst)
        ip("-n", hv, "link", "set", "port0", "master", "br-a", "up")
        ip("-n", gst, "addr", "add", f"{GST_IP}/24", "dev", "eth0")
        ip("-n", gst, "link", "set", "eth0", "up")
        yield Ns(hv, gst)
    finally:
        for name in (hv, gst):
            kill_namespace(name)


def tc(netns: str, *args: str) -> None:
    subprocess.run(["tc", "-n", netns, *args], check=True)


def tc_show(netns: str, *args: str) -> list[dict[str, Any]]:
    out = subprocess.run(["tc", "-n", netns, "-j", *args], capture_output=True, text=True, check=True).stdout
    result: list[dict[str, Any]] = json.loads(out or "[]")
    return result


def qdiscs(netns: str, dev: str) -> list[tuple[str, str]]:
    return sorted((q["kind"], q["handle"]) for q in tc_show(netns, "qdisc", "show", "dev", dev))


def ifbs(netns: str) -> dict[str, dict[str, Any]]:
    return {name: link for name, link in links(netns).items() if name.startswith("qmpifb")}


async def measure(ns: Ns, *, towards_guest: bool) -> Measured:
    """Bulk TCP from hv to gst (towards the guest: the tap's egress) or from gst to hv (the tap's ingress)."""
    receiver_ns, sender_ns, address = (ns.gst, ns.hv, GST_IP) if towards_guest else (ns.hv, ns.gst, HV_IP)
    server = await run_in_netns(receiver_ns, lambda: listen(address, PORT))
    received = asyncio.create_task(run_in_netns(receiver_ns, lambda: receive_bulk(server, TRANSFER, 60)))
    await run_in_netns(sender_ns, lambda: send_bulk(address, PORT, TRANSFER + 64 * 1024, 60))
    return await asyncio.wait_for(received, 60)


def assert_rate(measured: Measured, expected: float) -> None:
    low, high = expected * (1 - TOLERANCE), expected * (1 + TOLERANCE)
    assert low <= measured.bits_per_second <= high, f"{measured} is not within ±25 % of {expected / 1e6} Mbit/s"


# ------------------------------------------------------------------------------------------------ moving


async def test_move_re_enslaves_the_tap_takes_the_mtu_and_undo_puts_it_back(ns: Ns) -> None:
    ip("-n", ns.hv, "link", "set", "br-b", "mtu", "1400")
    host = ns.host()
    tap = await create_tap("br-a", netns=ns.hv, owner="vm1/virtio0")
    try:
        assert await host.find_tap("vm1/virtio0") == tap.name
        assert await host.find_tap("vm1/other") is None
        undo = await host.move_tap(tap.name, "br-b", field="update.backend.bridge")
        shown = links(ns.hv)[tap.name]
        assert (shown["master"], shown["mtu"]) == ("br-b", 1400)
        assert links(ns.hv)["br-b"]["mtu"] == 1400
        port = await host.tap_port(tap.name)
        assert (port.name, port.bridge, port.network, port.vlan, port.shape) == (tap.name, "br-b", None, None, None)
        await undo()
        shown = links(ns.hv)[tap.name]
        assert (shown["master"], shown["mtu"]) == ("br-a", 1500)
    finally:
        tap.close_fds()


async def test_a_move_to_a_missing_or_non_bridge_leaves_the_tap_where_it_was(ns: Ns) -> None:
    host = ns.host()
    with pytest.raises(NotFound) as missing:
        await host.move_tap("port0", "br-x", field="update.backend.bridge")
    assert missing.value.field == "update.backend.bridge"
    with pytest.raises(InvalidRequest) as not_bridge:
        await host.move_tap("port0", "lo", field="update.backend.bridge")
    assert not_bridge.value.field == "update.backend.bridge"
    with pytest.raises(InvalidRequest):
        await host.move_tap("port0", "br;x", field="update.backend.bridge")
    with pytest.raises(NotFound) as gone:
        await host.move_tap("vnet99", "br-b", field="update.backend.bridge")
    assert gone.value.field == "id"
    assert links(ns.hv)["port0"]["master"] == "br-a"


# ------------------------------------------------------------------------------------------------ shaping


async def test_rate_shapes_both_directions_and_none_removes_every_trace(ns: Ns) -> None:
    host = ns.host()
    before = qdiscs(ns.hv, "port0")
    free = {"towards guest": await measure(ns, towards_guest=True),
            "from guest": await measure(ns, towards_guest=False)}
    await host.set_shape("port0", Shape(rate=RATE_BITS))
    try:
        [ifb] = ifbs(ns.hv)
        assert ifbs(ns.hv)[ifb]["ifalias"] == f"qmpnet:ifb:{links(ns.hv)['port0']['ifindex']}:port0"
        assert qdiscs(ns.hv, "port0") == [("ingress", "ffff:"), ("tbf", "71:")]
        assert qdiscs(ns.hv, ifb) == [("tbf", "71:")]
        port = await host.tap_port("port0")
        assert port.shape == Shape(rate=RATE_BITS, burst=16 * 1024)
        shaped = {"towards guest": await measure(ns, towards_guest=True),
                  "from guest": await measure(ns, towards_guest=False)}
        print(f"\nveth shaping at 5mbit: free {free}, shaped {shaped}")  # noqa: T201 - the figures of the report
        for measured in shaped.values():
            assert_rate(measured, RATE_BITS)
    finally:
        await host.set_shape("port0", None)
    assert qdiscs(ns.hv, "port0") == before
    assert ifbs(ns.hv) == {}
    assert (await host.tap_port("port0")).shape is None
    again = await measure(ns, towards_guest=True)
    assert again.bits_per_second > 4 * RATE_BITS, again


async def test_the_undo_of_a_shape_restores_the_previous_one_exactly(ns: Ns) -> None:
    host = ns.host()
    await host.set_shape("port0", Shape(rate=2_000_000, burst=20_000))
    first = tc_show(ns.hv, "qdisc", "show", "dev", "port0")
    undo = await host.set_shape("port0", Shape(rate=8_000_000))
    assert (await host.tap_port("port0")).shape == Shape(rate=8_000_000, burst=16 * 1024)
    await undo()
    assert tc_show(ns.hv, "qdisc", "show", "dev", "port0") == first
    assert (await host.tap_port("port0")).shape == Shape(rate=2_000_000, burst=20_000)
    undo = await host.set_shape("port0", None)
    assert ifbs(ns.hv) == {}
    await undo()
    assert tc_show(ns.hv, "qdisc", "show", "dev", "port0") == first
    assert len(ifbs(ns.hv)) == 1
    await host.set_shape("port0", None)


async def test_a_shape_failing_half_way_leaves_the_tap_as_it_was(ns: Ns) -> None:
    host = ns.host()
    before = qdiscs(ns.hv, "port0")
    # A link that is not qmpnet's holds the IFB's name: the tap's tbf is made, then the IFB cannot be.
    index = links(ns.hv)["port0"]["ifindex"]
    ip("-n", ns.hv, "link", "add", f"qmpifb{index}", "type", "bridge")
    with pytest.raises(Conflict) as caught:
        await host.set_shape("port0", Shape(rate=1_000_000))
    assert f"a link called qmpifb{index} exists" in caught.value.message
    assert qdiscs(ns.hv, "port0") == before
    assert links(ns.hv)[f"qmpifb{index}"]["linkinfo"]["info_kind"] == "bridge"  # someone else's: left alone


async def test_foreign_qdiscs_are_refused_and_left_alone(ns: Ns) -> None:
    tc(ns.hv, "qdisc", "add", "dev", "port0", "root", "handle", "5:", "tbf", "rate", "1mbit", "burst", "10kb",
       "latency", "50ms")
    host = ns.host()
    with pytest.raises(Conflict) as caught:
        await host.set_shape("port0", Shape(rate=RATE_BITS))
    assert caught.value.field == "update.shape"
    assert qdiscs(ns.hv, "port0") == [("tbf", "5:")]
    assert (await host.tap_port("port0")).shape is None
    tc(ns.hv, "qdisc", "del", "dev", "port0", "root")
    tc(ns.hv, "qdisc", "add", "dev", "port0", "ingress")
    with pytest.raises(Conflict):
        await host.set_shape("port0", Shape(rate=RATE_BITS))
    assert ("ingress", "ffff:") in qdiscs(ns.hv, "port0")




NETEM = kernel_has_netem()


@needs.kernel(not NETEM, "netem is there: the impairment itself is checked in test_live_change.py", lab=False)
async def test_impairment_without_netem_is_unsupported_and_changes_nothing(ns: Ns) -> None:
    host = ns.host()
    await host.set_shape("port0", Shape(rate=RATE_BITS))
    before = tc_show(ns.hv, "qdisc", "show", "dev", "port0")
    with pytest.raises(Unsupported) as caught:
        await host.set_shape("port0", Shape(rate=RATE_BITS, delay=100_000))
    assert "netem" in caught.value.message
    assert caught.value.field == "update.shape"
    assert tc_show(ns.hv, "qdisc", "show", "dev", "port0") == before
    await host.set_shape("port0", None)


@needs.kernel(NETEM, "no netem (CONFIG_NET_SCH_NETEM): delay, jitter and loss cannot be exercised")
async def test_netem_with_a_rate_under_it_and_its_exact_undo(ns: Ns) -> None:
    host = ns.host()
    undo = await host.set_shape("port0", Shape(rate=RATE_BITS, delay=100_000, jitter=10_000, loss=1.0))
    assert qdiscs(ns.hv, "port0") == [("ingress", "ffff:"), ("netem", "71:"), ("tbf", "72:")]
    port = await host.tap_port("port0")
    assert port.shape == Shape(rate=RATE_BITS, burst=16 * 1024, delay=100_000, jitter=10_000, loss=1.0)
    await undo()
    assert qdiscs(ns.hv, "port0") == [("noqueue", "0:")]
    assert ifbs(ns.hv) == {}


async def test_deleting_the_tap_deletes_its_ifb(ns: Ns) -> None:
    host = ns.host()
    tap = await create_tap("br-a", netns=ns.hv, owner="vm1/virtio1")
    await host.set_shape(tap.name, Shape(rate=RATE_BITS))
    assert len(ifbs(ns.hv)) == 1
    tap.close_fds()  # as QEMU does on netdev_del: the tap leaves with its last fd, its IFB stays
    await host.delete_tap(tap.name)
    assert ifbs(ns.hv) == {}


# ------------------------------------------------------------------------------------------------ VLANs




VLAN_FILTERING = kernel_filters_vlans()


async def test_vlans_on_a_bridge_that_does_not_filter_are_unsupported(ns: Ns) -> None:
    host = ns.host()
    with pytest.raises(Unsupported) as caught:
        await host.set_vlan("port0", Vlan(access=10))
    assert "does not filter VLANs" in caught.value.message
    assert "vlan_filtering 1" in caught.value.message
    ip("-n", ns.hv, "link", "set", "port0", "nomaster")
    with pytest.raises(Unsupported, match="on no bridge"):
        await host.set_vlan("port0", Vlan(access=10))


def bridge_vlans(netns: str, dev: str) -> list[tuple[int, tuple[str, ...]]]:
    out = subprocess.run(["bridge", "-n", netns, "-j", "vlan", "show", "dev", dev], capture_output=True, text=True,
                         check=True).stdout
    shown = json.loads(out or "[]")
    return [(v["vlan"], tuple(v.get("flags", []))) for entry in shown for v in entry["vlans"]]


@needs.kernel(VLAN_FILTERING, "the bridge has no VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING)")
async def test_access_trunks_default_and_undo_on_a_filtering_bridge(ns: Ns) -> None:
    ip("-n", ns.hv, "link", "set", "br-a", "type", "bridge", "vlan_filtering", "1")
    host = ns.host()
    assert bridge_vlans(ns.hv, "port0") == [(1, ("PVID", "Egress Untagged"))]
    undo = await host.set_vlan("port0", Vlan(access=10))
    assert bridge_vlans(ns.hv, "port0") == [(10, ("PVID", "Egress Untagged"))]
    assert (await host.tap_port("port0")).vlan == Vlan(access=10)
    await host.set_vlan("port0", Vlan(trunks=["20", "30-32"]))
    assert bridge_vlans(ns.hv, "port0") == [(20, ()), (30, ()), (31, ()), (32, ())]
    assert (await host.tap_port("port0")).vlan == Vlan(trunks=["20", "30-32"])
    await host.set_vlan("port0", None)
    assert bridge_vlans(ns.hv, "port0") == [(1, ("PVID", "Egress Untagged"))]
    await undo()  # back to what the first change found
    assert bridge_vlans(ns.hv, "port0") == [(1, ("PVID", "Egress Untagged"))]


def test_the_fixture_leaves_nothing_in_the_root_namespace() -> None:
    assert not [name for name in links(None) if name.startswith(("qmpifb", "br-a", "br-b", "port0"))]
    assert Path("/run/netns").exists()
