"""Taps for real, inside a network namespace the test creates (``hv-<random>`` holding bridge ``br0``).

Nothing here touches the root namespace: every link lives in the test's namespace, which is deleted afterwards
(with any process still in it killed first), even when a test fails.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import struct
import subprocess
import uuid
from typing import TYPE_CHECKING, Any

import needs
import pytest
from netns_tools import bridged_namespace, ip, link_names

from qmpnet.adapters.hostnet import HostnetSettings, check_existing_tap, create_tap, delete_tap, list_taps, sweep_taps
from qmpnet.adapters.hostnet.host import HostNet
from qmpnet.errors import Conflict, InvalidRequest, NotFound

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [
    pytest.mark.integration,
    needs.root("create network namespaces"),
    needs.tool("ip", "iproute2"),
    needs.device("/dev/net/tun"),
]

TUNGETIFF = 0x800454D2
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100


@pytest.fixture
def hv() -> Iterator[str]:
    """Namespace ``hv-<random>`` with an up bridge ``br0``; root-namespace links are checked to be unchanged."""
    before = {link["ifname"] for link in json.loads(ip("-j", "link", "show"))}
    with bridged_namespace() as name:
        yield name
    after = {link["ifname"] for link in json.loads(ip("-j", "link", "show"))}
    assert not {n for n in after - before if n.startswith(("vnet", "br0", "qt"))}, "a link leaked into the root ns"


def link(netns: str, name: str) -> dict[str, Any] | None:
    found = subprocess.run(["ip", "-n", netns, "-j", "-d", "link", "show", "dev", name], capture_output=True,
                           text=True, check=False)
    if found.returncode != 0:
        return None
    result: dict[str, Any] = json.loads(found.stdout)[0]
    return result


def tun_info(fd: int) -> tuple[str, int]:
    answer = fcntl.ioctl(fd, TUNGETIFF, struct.pack("16sH22x", b"", 0))
    raw, flags = struct.unpack("16sH22x", answer)
    name: bytes = raw.split(b"\0", 1)[0]
    return name.decode(), flags


async def test_tap_is_created_enslaved_up_with_valid_fds_and_deleted_without_trace(hv: str) -> None:
    tap = await create_tap("br0", netns=hv, owner="vm1/virtio0")
    try:
        assert tap.name == "vnet0"
        assert tap.bridge == "br0"
        assert tap.queues == 1
        assert len(tap.fds) == 1
        fd = tap.fds[0]
        assert stat.S_ISCHR(os.fstat(fd).st_mode)
        assert not os.get_inheritable(fd)
        name, flags = tun_info(fd)
        assert name == tap.name
        assert flags & (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) == IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
        assert not flags & IFF_MULTI_QUEUE

        shown = link(hv, tap.name)
        assert shown is not None
        assert shown["master"] == "br0"
        assert "UP" in shown["flags"]
        assert shown["ifalias"] == "qmpnet:tap:vm1/virtio0"
        assert shown["address"].startswith("fe:")
        assert shown["linkinfo"]["info_kind"] == "tun"
        assert shown["linkinfo"]["info_data"]["type"] == "tap"
        assert shown["linkinfo"]["info_data"]["vnet_hdr"] is True

        [info] = await list_taps(netns=hv)
        assert (info.name, info.bridge, info.owner, info.up, info.attached) == (tap.name, "br0", "vm1/virtio0",
                                                                                True, True)
        assert await delete_tap(tap.name, netns=hv) is True
        assert link(hv, tap.name) is None
        assert await delete_tap(tap.name, netns=hv) is False
    finally:
        tap.close_fds()
    assert not tap.fds
    tap.close_fds()  # idempotent
    assert link_names(hv) == {"lo", "br0"}


async def test_multiqueue_tap_has_one_fd_per_queue(hv: str) -> None:
    tap = await create_tap("br0", netns=hv, queues=4)
    try:
        assert len(set(tap.fds)) == 4
        for fd in tap.fds:
            name, flags = tun_info(fd)
            assert name == tap.name
            assert flags & IFF_MULTI_QUEUE
            assert flags & IFF_VNET_HDR
        shown = link(hv, tap.name)
        assert shown is not None
        assert shown["linkinfo"]["info_data"]["multi_queue"] is True
        assert shown["linkinfo"]["info_data"]["numqueues"] == 4
    finally:
        tap.close_fds()


async def test_a_tap_nobody_holds_disappears_by_itself(hv: str) -> None:
    tap = await create_tap("br0", netns=hv)
    second = await create_tap("br0", netns=hv)
    assert (tap.name, second.name) == ("vnet0", "vnet1")
    tap.close_fds()
    second.close_fds()
    assert link_names(hv) == {"lo", "br0"}


async def test_names_follow_the_pattern_and_skip_names_in_use(hv: str) -> None:
    ip("-n", hv, "link", "add", "qt0", "type", "veth", "peer", "name", "peer0")
    tap = await create_tap("br0", netns=hv, pattern="qt{n}")
    try:
        assert tap.name == "qt1"
    finally:
        tap.close_fds()


async def test_unknown_bridge_is_not_found_and_leaves_nothing(hv: str) -> None:
    with pytest.raises(NotFound) as caught:
        await create_tap("br9", netns=hv)
    assert caught.value.field == "nic.backend.bridge"
    assert "br9" in str(caught.value)
    ip("-n", hv, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1")
    with pytest.raises(InvalidRequest) as refused:
        await create_tap("veth0", netns=hv)
    assert refused.value.field == "nic.backend.bridge"
    assert "not a Linux bridge" in str(refused.value)
    assert link_names(hv) == {"lo", "br0", "veth0", "veth1"}


@pytest.mark.parametrize("bridge", ["br/0", "..", "a" * 16, "br0;reboot", "$(id)", "br 0"])
async def test_hostile_bridge_names_are_invalid_requests(hv: str, bridge: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await create_tap(bridge, netns=hv)
    assert caught.value.field == "nic.backend.bridge"
    assert link_names(hv) == {"lo", "br0"}


async def test_bad_queue_count_pattern_and_owner_are_invalid_requests(hv: str) -> None:
    with pytest.raises(InvalidRequest, match=r"nic\.queues"):
        await create_tap("br0", netns=hv, queues=0)
    with pytest.raises(InvalidRequest, match="tap_pattern"):
        await create_tap("br0", netns=hv, pattern="vnet")
    with pytest.raises(InvalidRequest, match="owner"):
        await create_tap("br0", netns=hv, owner="vm1; rm -rf /")
    with pytest.raises(InvalidRequest):
        await delete_tap("../vnet0", netns=hv)


async def test_missing_namespace_is_not_found() -> None:
    with pytest.raises(NotFound) as caught:
        await create_tap("br0", netns=f"hv-missing-{uuid.uuid4().hex[:6]}")
    assert caught.value.field == "netns"


async def test_sweep_deletes_only_unused_qmpnet_taps(hv: str) -> None:
    ip("-n", hv, "tuntap", "add", "mode", "tap", "name", "vnet50")  # someone else's (e.g. libvirt's) tap
    ip("-n", hv, "link", "add", "vnet60", "type", "veth", "peer", "name", "peer0")
    taps = [await create_tap("br0", netns=hv) for _ in range(3)]
    other = await create_tap("br0", netns=hv, pattern="qt{n}")
    try:
        in_use = {taps[1].name}
        swept = await sweep_taps(in_use, netns=hv)
        assert swept == sorted([taps[0].name, taps[2].name])
        assert [tap.name for tap in await list_taps(netns=hv)] == [taps[1].name]
        assert {"vnet50", "vnet60", "qt0", taps[1].name} <= link_names(hv)
        assert await delete_tap("vnet50", netns=hv) is False  # not ours: left alone
        assert "vnet50" in link_names(hv)
        assert await sweep_taps(in_use, netns=hv) == []
    finally:
        for tap in (*taps, other):
            tap.close_fds()
    assert link_names(hv) == {"lo", "br0", "vnet50", "vnet60", "peer0"}


async def test_existing_taps_are_checked_before_qemu_is_given_their_name(hv: str) -> None:
    ip("-n", hv, "tuntap", "add", "mode", "tap", "name", "mytap")
    ip("-n", hv, "link", "set", "mytap", "master", "br0")
    info = await check_existing_tap("mytap", netns=hv)
    assert (info.name, info.bridge, info.owner, info.attached) == ("mytap", "br0", None, False)
    with pytest.raises(NotFound) as missing:
        await check_existing_tap("nosuch", netns=hv)
    assert missing.value.field == "nic.backend.ifname"
    ip("-n", hv, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1")
    with pytest.raises(InvalidRequest, match="not a tap"):
        await check_existing_tap("veth0", netns=hv)
    with pytest.raises(InvalidRequest) as hostile:
        await check_existing_tap("tap;id", netns=hv)
    assert hostile.value.field == "nic.backend.ifname"
    tap = await create_tap("br0", netns=hv)
    with tap, pytest.raises(Conflict, match="already held"):
        await check_existing_tap(tap.name, netns=hv)


async def test_sweep_orphans_removes_only_the_guests_taps_of_vanished_nics(hv: str) -> None:
    host = HostNet(HostnetSettings(netns=hv))
    gone = await host.create_tap("br0", queues=1, owner="vm1/gone0")
    kept = await host.create_tap("br0", queues=1, owner="vm1/kept0")
    other = await host.create_tap("br0", queues=1, owner="vm2/gone0")
    try:
        swept = await host.sweep_orphans("vm1/", {"vm1/kept0"})
        assert swept == [gone.name]
        assert {t.name for t in await list_taps(netns=hv)} == {kept.name, other.name}
    finally:
        for tap in (gone, kept, other):
            tap.close_fds()
