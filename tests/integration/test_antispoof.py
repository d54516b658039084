"""Anti-spoofing (issue 18.3) with two booted guests on one bridge: a spoofing guest is cut off, then restored.

    out-<tag>: lan0 10.88.0.1/24 ==veth== po --master--> br-s (hv-<tag>) <-- taps of guest "one" and guest "two"

QEMU runs in the root namespace; qmpnet makes the taps in hv and loads their rules into ``bridge qmpnet_antispoof``
there. Each guest has one filtered NIC with a static address; a guest that sends from another MAC or IP no longer
reaches ``out``, the other guest still does, and after the change is undone the first one does again.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import needs
import pytest
import pytest_asyncio
from netns_tools import ip, kill_namespace

import qmpnet
from qmpnet.adapters.hostnet import HostnetSettings, antispoof
from qmpnet.core.nic_filter import NicFilter
from qmpnet.errors import Unsupported
from qmpnet.settings import Settings
from qmpnet.testguest import TestMachine
from qmpnet.testguest.agent import TIMEOUT_SCALE

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

    from qmpnet.core.model import Nic
    from qmpnet.testguest import GuestImage, GuestInterface

pytestmark = [
    pytest.mark.integration,
    pytest.mark.asyncio(loop_scope="module"),
    needs.root("create network namespaces"),
    needs.tool("ip", "iproute2"),
    needs.tool("nft", "nftables"),
    needs.device("/dev/net/tun"),
]

SEE_TIMEOUT = 20.0 * TIMEOUT_SCALE
UNPLUG_TIMEOUT = 15.0 * TIMEOUT_SCALE
OUT_HOST = "10.88.0.1"
ONE_IP, TWO_IP, SPOOFED_IP = "10.88.0.11", "10.88.0.12", "10.88.0.99"
ONE_MAC, TWO_MAC, SPOOFED_MAC = "52:54:00:5f:00:01", "52:54:00:5f:00:02", "52:54:00:5f:00:99"
TABLE = f"bridge {antispoof.TABLE}"


@dataclass
class Lab:
    hv: str
    out: str
    state_dir: Path

    def settings(self) -> Settings:
        hostnet = HostnetSettings.model_validate({"netns": self.hv, "state_dir": str(self.state_dir / "hostnet")})
        return Settings(hostnet=hostnet, state_dir=self.state_dir / "store")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tag = uuid.uuid4().hex[:6]
    hv, out = f"hv-{tag}", f"out-{tag}"
    try:
        for name in (hv, out):
            ip("netns", "add", name)
            ip("-n", name, "link", "set", "lo", "up")
        ip("-n", hv, "link", "add", "br-s", "type", "bridge")
        ip("-n", hv, "link", "set", "br-s", "up")
        ip("-n", hv, "link", "add", "po", "type", "veth", "peer", "name", "lan0", "netns", out)
        ip("-n", hv, "link", "set", "po", "master", "br-s", "up")
        ip("-n", out, "addr", "add", f"{OUT_HOST}/24", "dev", "lan0")
        ip("-n", out, "link", "set", "lan0", "up")
        yield Lab(hv, out, tmp_path_factory.mktemp("antispoof"))
    finally:
        for name in (hv, out):
            kill_namespace(name)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def guests(
    guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[TestMachine, TestMachine]]:
    one = TestMachine(guest_image, name="spoof-one", machine="pc", workdir=tmp_path_factory.mktemp("one"))
    two = TestMachine(guest_image, name="spoof-two", machine="pc", workdir=tmp_path_factory.mktemp("two"))
    async with one, two:  # booted one after the other: two TCG boots at once starve the shared cores
        yield one, two


def table(netns: str) -> dict[str, Any]:
    """The anti-spoofing table in ``netns``: ``{"taps": {tap: chain}, "chains": {chain: [rule, ...]}}``."""
    done = subprocess.run(["ip", "netns", "exec", netns, "nft", "-j", "list", "table", *TABLE.split()],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"taps": {}, "chains": {}}
    items = json.loads(done.stdout)["nftables"]
    taps = {e[0]: e[1]["jump"]["target"] for i in items if "map" in i for e in i["map"].get("elem", [])}
    chains: dict[str, list[str]] = {i["chain"]["name"]: [] for i in items if "chain" in i}
    for item in items:
        if "rule" in item:
            chains[item["rule"]["chain"]].append(json.dumps(item["rule"]["expr"]))
    return {"taps": taps, "chains": chains}


async def add_filtered(guest: qmpnet.Guest, vm: TestMachine, mac: str, address: str) -> tuple[Nic, GuestInterface]:
    nic = await guest.add_nic({"model": "virtio", "mac": mac, "backend": {"type": "bridge", "bridge": "br-s"},
                               "filter": {"ipv4": [address]}})  # fmt: skip
    iface = await vm.wait_nic(mac, SEE_TIMEOUT, driver="virtio_net", carrier=True)
    await set_address(vm, iface, address)
    return nic, iface


async def set_address(vm: TestMachine, iface: GuestInterface, address: str) -> None:
    (await vm.agent.run(f"ip addr flush dev {iface.name} && ip addr add {address}/24 dev {iface.name}")).check()
    await vm.wait_nic(iface.mac, SEE_TIMEOUT, ipv4=[f"{address}/24"])


async def set_mac(vm: TestMachine, iface: GuestInterface, mac: str) -> None:
    (await vm.agent.run(f"ip link set dev {iface.name} down && ip link set dev {iface.name} address {mac} && "
                        f"ip link set dev {iface.name} up")).check()  # fmt: skip


async def reaches(vm: TestMachine) -> bool:
    """Whether the guest gets an answer from ``out`` (a fresh ARP each time: the neighbour entry is flushed)."""
    await vm.agent.run("ip neigh flush all")
    return (await vm.agent.run(f"ping -c 2 -W 2 {OUT_HOST}", timeout=30)).rc == 0


def nft(lab: Lab, script: str) -> None:
    subprocess.run(["ip", "netns", "exec", lab.hv, "nft", "-f", "-"], input=script, text=True, check=True)


def forget_neighbours(lab: Lab) -> None:
    """``out`` forgets the guests' MACs, so an answer needs the guest's ARP to have got through."""
    ip("-n", lab.out, "neigh", "flush", "dev", "lan0")


async def remove(guest: qmpnet.Guest, vm: TestMachine, nic: Nic) -> None:
    assert (await guest.remove_nic(nic.id, timeout=UNPLUG_TIMEOUT)).state == "removed"
    await vm.wait_nic_gone(nic.mac or "", SEE_TIMEOUT)


async def test_a_spoofing_guest_is_cut_off_and_restored_while_its_neighbour_is_not(
    guests: tuple[TestMachine, TestMachine], lab: Lab
) -> None:
    one, two = guests
    async with (qmpnet.connect(str(one.qmp_path), name=one.name, settings=lab.settings()) as g1,
                qmpnet.connect(str(two.qmp_path), name=two.name, settings=lab.settings()) as g2):  # fmt: skip
        nic1, iface1 = await add_filtered(g1, one, ONE_MAC, ONE_IP)
        nic2, _ = await add_filtered(g2, two, TWO_MAC, TWO_IP)
        try:
            assert nic1.backend is not None
            assert nic2.backend is not None
            tap1 = nic1.backend.options["tap"]
            assert set(table(lab.hv)["taps"]) == {tap1, nic2.backend.options["tap"]}
            assert await reaches(one)
            assert await reaches(two)

            await set_address(one, iface1, SPOOFED_IP)
            forget_neighbours(lab)
            assert not await reaches(one)
            assert await reaches(two)
            await set_address(one, iface1, ONE_IP)
            assert await reaches(one)

            await set_mac(one, iface1, SPOOFED_MAC)
            forget_neighbours(lab)
            assert not await reaches(one)
            assert await reaches(two)
            await set_mac(one, iface1, ONE_MAC)
            assert await reaches(one)

            # Live: the new list replaces the old one at once; the address that was spoofed is now the allowed one.
            updated = await g1.update_nic({"id": nic1.id, "filter": {"ipv4": [SPOOFED_IP]}})
            assert updated.id == nic1.id
            forget_neighbours(lab)
            assert not await reaches(one)
            await set_address(one, iface1, SPOOFED_IP)
            assert await reaches(one)
            await g1.update_nic({"id": nic1.id, "filter": None})  # no filter: any address again
            await set_address(one, iface1, ONE_IP)
            assert tap1 not in table(lab.hv)["taps"]
            assert await reaches(one)
            await g1.update_nic({"id": nic1.id, "filter": {"ipv4": [ONE_IP]}})
            assert await reaches(one)
        finally:
            await remove(g1, one, nic1)
            await remove(g2, two, nic2)
    left = table(lab.hv)
    assert left["taps"] == {}
    assert not any(name.startswith("tap_") for name in left["chains"])  # no chain, so no rule, for a removed tap


async def test_recovery_re_applies_rules_from_the_record_and_sweeps_those_of_gone_taps(
    guests: tuple[TestMachine, TestMachine], lab: Lab
) -> None:
    one, _ = guests
    async with qmpnet.connect(str(one.qmp_path), name=one.name, settings=lab.settings()) as guest:
        nic, iface = await add_filtered(guest, one, ONE_MAC, ONE_IP)
    assert nic.backend is not None
    tap = nic.backend.options["tap"]
    chain = antispoof.chain_name(tap)
    rules = table(lab.hv)["chains"][chain]
    try:
        # Behind qmpnet's back: the tap's rules are lost, and a tap that is gone left rules behind.
        nft(lab, f"flush chain {TABLE} {chain}\n" + antispoof.replace_script("vnet99", SPOOFED_MAC, NicFilter()))
        assert "vnet99" in table(lab.hv)["taps"]

        async with qmpnet.connect(str(one.qmp_path), name=one.name, settings=lab.settings()) as guest:
            after = table(lab.hv)
            assert after["chains"][chain] == rules
            assert "vnet99" not in after["taps"]
            assert antispoof.chain_name("vnet99") not in after["chains"]
            await set_address(one, iface, SPOOFED_IP)
            forget_neighbours(lab)
            assert not await reaches(one)
            await remove(guest, one, nic)
    finally:
        async with qmpnet.connect(str(one.qmp_path), name=one.name, settings=lab.settings()) as guest:
            if nic.id in {n.id for n in await guest.list_nics()}:
                await remove(guest, one, nic)
    assert table(lab.hv)["taps"] == {}


async def test_a_filter_is_refused_for_a_user_nic_and_nothing_changes(
    guests: tuple[TestMachine, TestMachine], lab: Lab
) -> None:
    one, _ = guests
    async with qmpnet.connect(str(one.qmp_path), name=one.name, settings=lab.settings()) as guest:
        before = [n.id for n in await guest.list_nics()]
        with pytest.raises(Unsupported) as refused:
            await guest.add_nic({"backend": {"type": "user"}, "filter": {}})
        assert refused.value.field == "nic.filter"
        user = await guest.add_nic({"backend": {"type": "user"}})
        try:
            with pytest.raises(Unsupported) as refused:
                await guest.update_nic({"id": user.id, "filter": {"mac": True}})
            assert refused.value.field == "update.filter"
        finally:
            await remove(guest, one, user)
        assert [n.id for n in await guest.list_nics()] == before


async def cli(*args: str) -> dict[str, Any]:
    """Run ``qmpnet ARGS --json`` and return its answer (the run must succeed)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpnet", *args, "--json", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(120):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    answer: dict[str, Any] = json.loads(out) if out.strip() else {}
    return answer


def rules_of(lab: Lab, tap: str) -> str:
    """The rules of ``tap``'s chain as nft prints them ("" when it has none)."""
    done = subprocess.run(["ip", "netns", "exec", lab.hv, "nft", "list", "chain", *TABLE.split(),
                           antispoof.chain_name(tap)], capture_output=True, text=True, check=False)  # fmt: skip
    return done.stdout if done.returncode == 0 else ""


async def test_the_cli_and_a_desired_document_set_change_and_drop_the_filter(
    guests: tuple[TestMachine, TestMachine], lab: Lab, tmp_path: Path
) -> None:
    one, _ = guests
    config = tmp_path / "qmpnet.toml"
    config.write_text(f'[hostnet]\nnetns = "{lab.hv}"\nstate_dir = "{lab.state_dir / "hostnet"}"\n')
    where = ["--qmp", str(one.qmp_path), "--config", str(config), "--state-dir", str(tmp_path / "store")]

    added = await cli("nic", "add", "--backend", "bridge", "--bridge", "br-s", "--mac", ONE_MAC, "--id", "f0",
                      "--filter-ipv4", ONE_IP, "--filter-ipv6", "2001:db8::11", *where)  # fmt: skip
    tap = added["backend"]["options"]["tap"]
    try:
        assert f"ether saddr != {ONE_MAC} drop" in rules_of(lab, tap)
        assert f"ip saddr != {ONE_IP} drop" in rules_of(lab, tap)
        assert "2001:db8::11" in rules_of(lab, tap)
        await cli("nic", "set", "f0", "--filter-ipv4", "none", "--no-filter-mac", "--filter-dhcp-server", *where)
        now = rules_of(lab, tap)
        assert "ether type ip drop" in now
        assert "ether saddr" not in now
        assert "sport 67" not in now
        await cli("nic", "set", "f0", "--no-filter", *where)
        assert tap not in table(lab.hv)["taps"]
        assert rules_of(lab, tap) == ""
    finally:
        await cli("nic", "del", "f0", "--timeout", str(UNPLUG_TIMEOUT), *where)
    await one.wait_nic_gone(ONE_MAC, SEE_TIMEOUT)

    desired = tmp_path / "desired.json"
    desired.write_text(json.dumps({"nics": [{"id": "d0", "mac": TWO_MAC, "filter": {"ipv4": [TWO_IP]},
                                             "backend": {"type": "bridge", "bridge": "br-s"}}]}))  # fmt: skip
    await cli("apply", str(desired), *where)
    try:
        [tap] = table(lab.hv)["taps"]
        assert f"ip saddr != {TWO_IP} drop" in rules_of(lab, tap)
    finally:
        desired.write_text(json.dumps({"nics": [], "prune": True}))
        await cli("apply", str(desired), *where)
    await one.wait_nic_gone(TWO_MAC, SEE_TIMEOUT)
    assert table(lab.hv)["taps"] == {}
