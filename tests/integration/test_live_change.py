"""Live NIC changes in a booted guest (issue 10): move, shaping, VLANs, capture, and the failure paths.

Each test builds its own namespaces and deletes them afterwards with everything still running in them (dnsmasq):

    a-<tag>: lan0 10.77.1.1/24 + dnsmasq (.100-.150) ==veth== pa --master--> br-a   (hv-<tag>)   LAN A
    b-<tag>: lan0 10.77.2.1/24 + dnsmasq (.100-.150) ==veth== pb --master--> br-b   (hv-<tag>)   LAN B
    hv-<tag>: br-a, br-b, and the NAT network "lv" (qmpnat-lv, 192.168.151.0/24) that qmpnet brings up

QEMU runs in the root namespace; qmpnet makes the guest's taps in hv and moves, tags and shapes them there. One
guest is booted for the module; every test removes what it adds. A second QMP monitor (``aux.qmp``) lets the tests
look at QEMU behind qmpnet's back. Throughput, RTT and loss are tolerance checks on measured values (the figures are
printed for the report), never timings of qmpnet itself. Tests that need a kernel feature the machine lacks (netem,
bridge VLAN filtering) skip saying so; on such a kernel the refusal itself is tested instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import needs
import pytest
import pytest_asyncio
from aux_qmp import aux_args
from netns_tools import ip, kernel_filters_vlans, kernel_has_netem, kill_namespace, links, listen
from throughput import Measured, receive_bulk, send_bulk
from waiting import eventually

import qmpnet
from qmpnet.adapters.hostnet import HostnetSettings
from qmpnet.adapters.hostnet.netns import run_in_netns
from qmpnet.errors import Conflict, Forbidden, InvalidRequest, NotFound, Unsupported
from qmpnet.settings import Settings, UpdateSettings
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
    needs.tool("tc", "iproute2"),
    needs.tool("nft", "nftables"),
    needs.tool("dnsmasq", "dnsmasq-base"),
    needs.device("/dev/net/tun"),
]

#: Scaled like the harness's own deadlines: inside the lab host (nested TCG) they are ten times longer.
SEE_TIMEOUT = 20.0 * TIMEOUT_SCALE
UNPLUG_TIMEOUT = 15.0 * TIMEOUT_SCALE
A_HOST, B_HOST = "10.77.1.1", "10.77.2.1"
A_NET, B_NET = ipaddress.IPv4Network("10.77.1.0/24"), ipaddress.IPv4Network("10.77.2.0/24")
GUEST_A = "10.77.1.2"
NAT_NAME, NAT_BRIDGE, NAT_SUBNET = "lv", "qmpnat-lv", ipaddress.IPv4Network("192.168.151.0/24")
RATE_BITS = 5_000_000
TRANSFER = 2 * 1024 * 1024  # ~3.4 s at 5 Mbit/s
TOLERANCE = 0.25
TO_A, FROM_A = 5201, 5202


# ------------------------------------------------------------------------------------------- host plumbing


@dataclass
class Lab:
    hv: str
    a: str
    b: str
    state_dir: Path

    def hostnet(self) -> HostnetSettings:
        return HostnetSettings.model_validate(
            {"netns": self.hv, "state_dir": str(self.state_dir),
             "networks": [{"name": NAT_NAME, "bridge": NAT_BRIDGE, "subnet": str(NAT_SUBNET)}]}
        )  # fmt: skip

    def settings(self, **policy: Any) -> Settings:
        return Settings(hostnet=self.hostnet(), policy=qmpnet.Policy(**policy), update=UpdateSettings(link_flap=1.0))

    def write_config(self, path: Path) -> Path:
        path.write_text(
            f'[hostnet]\nnetns = "{self.hv}"\nstate_dir = "{self.state_dir}"\n\n'
            f'[[hostnet.networks]]\nname = "{NAT_NAME}"\nbridge = "{NAT_BRIDGE}"\nsubnet = "{NAT_SUBNET}"\n'
        )
        return path


def _lan(hv: str, host_ns: str, port: str, bridge: str, *, host_ip: str, leases: Path) -> subprocess.Popen[bytes]:
    """``host_ns`` on ``bridge`` of hv through a veth, with ``host_ip`` and a dnsmasq handing out .100-.150."""
    ip("-n", hv, "link", "add", bridge, "type", "bridge")
    ip("-n", hv, "link", "set", bridge, "up")
    ip("-n", hv, "link", "add", port, "type", "veth", "peer", "name", "lan0", "netns", host_ns)
    ip("-n", hv, "link", "set", port, "master", bridge, "up")
    ip("-n", host_ns, "addr", "add", f"{host_ip}/24", "dev", "lan0")
    ip("-n", host_ns, "link", "set", "lan0", "up")
    prefix = host_ip.rsplit(".", 1)[0]
    return subprocess.Popen(
        ["ip", "netns", "exec", host_ns, "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
         "--interface=lan0", "--bind-interfaces", "--except-interface=lo", "--dhcp-authoritative", "--user=root",
         f"--dhcp-range={prefix}.100,{prefix}.150,255.255.255.0,1h", f"--dhcp-leasefile={leases}", "--pid-file="],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    tag = uuid.uuid4().hex[:6]
    hv, a, b = f"hv-{tag}", f"a-{tag}", f"b-{tag}"
    servers: list[subprocess.Popen[bytes]] = []
    try:
        for name in (hv, a, b):
            ip("netns", "add", name)
            ip("-n", name, "link", "set", "lo", "up")
        servers.append(_lan(hv, a, "pa", "br-a", host_ip=A_HOST, leases=tmp_path / "a.leases"))
        servers.append(_lan(hv, b, "pb", "br-b", host_ip=B_HOST, leases=tmp_path / "b.leases"))
        yield Lab(hv, a, b, tmp_path / "state")
    finally:
        for name in (hv, a, b):
            kill_namespace(name)
        for server in servers:
            server.kill()
            server.wait()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vm(guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TestMachine]:
    workdir = tmp_path_factory.mktemp("live")
    async with TestMachine(guest_image, name="live", machine="pc", workdir=workdir,
                           extra_args=aux_args(workdir)) as machine:  # fmt: skip
        yield machine


def taps(netns: str) -> dict[str, dict[str, Any]]:
    return {name: link for name, link in links(netns).items() if name.startswith("vnet")}


def qdiscs(netns: str, dev: str) -> list[tuple[str, str]]:
    out = subprocess.run(["tc", "-n", netns, "-j", "qdisc", "show", "dev", dev], capture_output=True, text=True,
                         check=True).stdout
    return sorted((q["kind"], q["handle"]) for q in json.loads(out or "[]"))


def fdb_macs(netns: str, bridge: str) -> set[str]:
    out = subprocess.run(["bridge", "-n", netns, "-j", "fdb", "show", "br", bridge], capture_output=True, text=True,
                         check=True).stdout
    return {entry["mac"] for entry in json.loads(out or "[]")}


def ifbs(netns: str) -> set[str]:
    return {name for name in links(netns) if name.startswith("qmpifb")}


async def cli(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    """Run ``qmpnet ARGS``; return the exit status, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpnet", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(timeout):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def report(name: str, values: dict[str, object]) -> None:
    print(f"\n{name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))  # noqa: T201 - the figures of the report


async def add_bridge_nic(guest: qmpnet.Guest, vm: TestMachine, bridge: str, mac: str) -> tuple[Nic, GuestInterface]:
    nic = await guest.add_nic({"model": "virtio", "mac": mac, "backend": {"type": "bridge", "bridge": bridge}})
    return nic, await vm.wait_nic(mac, driver="virtio_net", carrier=True)


async def lease(vm: TestMachine, iface: GuestInterface, network: ipaddress.IPv4Network) -> ipaddress.IPv4Interface:
    """Run DHCP on ``iface`` and wait until the guest reports an address in ``network``."""
    done = await vm.agent.dhcp(iface.name)
    assert done.rc == 0, done.output

    def leased(interfaces: list[GuestInterface]) -> ipaddress.IPv4Interface | None:
        found = next((i for i in interfaces if i.mac == iface.mac), None)
        addresses = [ipaddress.IPv4Interface(a) for a in (found.ipv4 if found else [])]
        return next((a for a in addresses if a.network == network), None)

    return await vm.agent.wait_for(leased, timeout=SEE_TIMEOUT)


async def static_address(vm: TestMachine, iface: GuestInterface, address: str) -> None:
    (await vm.agent.run(f"ip addr flush dev {iface.name} && ip addr add {address}/24 dev {iface.name}")).check()
    await vm.wait_nic(iface.mac, ipv4=[f"{address}/24"])


async def pings(vm: TestMachine, host: str, count: int = 2) -> tuple[int, str]:
    out = await vm.agent.run(f"ping -c {count} -W 3 {host}", timeout=30)
    return out.rc, out.output


async def arp_answers(vm: TestMachine, iface: GuestInterface, host: str) -> bool:
    """Whether ``host`` answers an ARP request on ``iface``'s segment (layer 2, whatever the addresses)."""
    out = await vm.agent.run(f"arping -c 2 -w 3 -I {iface.name} {host}", timeout=20)
    return out.rc == 0


async def remove(guest: qmpnet.Guest, vm: TestMachine, nic: Nic) -> None:
    assert (await guest.remove_nic(nic.id, timeout=UNPLUG_TIMEOUT)).state == "removed"
    await vm.wait_nic_gone(nic.mac or "")


# ------------------------------------------------------------------------------------------- moving


async def test_a_move_keeps_the_interface_and_lands_on_lan_b(vm: TestMachine, lab: Lab) -> None:
    mac = "52:54:00:1a:00:01"
    results: dict[str, object] = {}
    async with qmpnet.connect(str(vm.qmp_path), name=vm.name, settings=lab.settings()) as guest:
        nic, iface = await add_bridge_nic(guest, vm, "br-a", mac)
        try:
            assert nic.backend is not None
            tap = nic.backend.options["tap"]
            results["on_a"] = await lease(vm, iface, A_NET)
            assert (await pings(vm, A_HOST))[0] == 0
            before = {n.id: n for n in await guest.list_nics()}[nic.id]

            carrier_lost = asyncio.create_task(vm.wait_nic(mac, SEE_TIMEOUT, carrier=False))
            try:
                started = time.monotonic()
                moved = await guest.update_nic({"id": nic.id, "backend": {"type": "bridge", "bridge": "br-b"}})
                results["move_s"] = f"{time.monotonic() - started:.2f}"
                await carrier_lost  # the link was flapped, so a DHCP client would renew
            finally:
                carrier_lost.cancel()
            assert moved.link == "up"
            assert moved.backend is not None
            assert (moved.backend.type, moved.backend.options) == ("bridge", {"bridge": "br-b", "tap": tap})
            assert taps(lab.hv)[tap]["master"] == "br-b"
            assert mac not in fdb_macs(lab.hv, "br-a")

            after = await vm.wait_nic(mac, SEE_TIMEOUT, carrier=True)
            assert (after.name, after.pci, after.driver) == (iface.name, iface.pci, iface.driver)  # the same NIC
            listed = {n.id: n for n in await guest.list_nics()}[nic.id]
            assert (listed.pci, listed.mac, listed.netdev) == (before.pci, before.mac, before.netdev)
            assert listed.backend is not None
            assert listed.backend.options["bridge"] == "br-b"

            results["on_b"] = on_b = await lease(vm, iface, B_NET)
            assert on_b.network == B_NET
            rc, output = await pings(vm, B_HOST)
            assert rc == 0, output
            results["ping_b"] = output.strip().splitlines()[-1]
            assert mac in fdb_macs(lab.hv, "br-b")
            # A's host is no longer on the guest's segment: no ARP answer from it, while B's host answers.
            assert not await arp_answers(vm, iface, A_HOST)
            assert await arp_answers(vm, iface, B_HOST)
        finally:
            await remove(guest, vm, nic)
    assert taps(lab.hv) == {}
    report("move", results)


async def test_the_cli_moves_a_nic_it_did_not_add_to_a_nat_network_and_back(
    vm: TestMachine, lab: Lab, tmp_path: Path
) -> None:
    mac = "52:54:00:1a:00:02"
    config = lab.write_config(tmp_path / "qmpnet.toml")
    qmp = ["--qmp", str(vm.qmp_path), "--config", str(config)]
    rc, out, err = await cli("nic", "add", "--backend", "bridge", "--bridge", "br-a", "--mac", mac, "--json", *qmp)
    assert rc == 0, err
    nic = json.loads(out)
    tap = nic["backend"]["options"]["tap"]
    try:
        iface = await vm.wait_nic(mac, carrier=True)
        # Another process: it knows the NIC only from QEMU, and finds the tap by the owner mark qmpnet put on it.
        rc, out, err = await cli("nic", "set", nic["id"], "--network", NAT_NAME, "--json", *qmp)
        assert rc == 0, err
        moved = json.loads(out)
        assert moved["backend"] == {"type": "nat", "options": {"tap": tap, "bridge": NAT_BRIDGE, "network": NAT_NAME}}
        assert taps(lab.hv)[tap]["master"] == NAT_BRIDGE
        leased = await lease(vm, iface, NAT_SUBNET)
        assert leased.network == NAT_SUBNET

        rc, out, err = await cli("nic", "set", nic["id"], "--bridge", "br-a", "--link", "down", "--json", *qmp)
        assert rc == 0, err
        assert (json.loads(out)["link"], taps(lab.hv)[tap]["master"]) == ("down", "br-a")
        await vm.wait_nic(mac, SEE_TIMEOUT, carrier=False)
        rc, out, err = await cli("nic", "set", nic["id"], "--link", "up", *qmp)
        assert rc == 0, err
        assert out.splitlines()[1].split()[6] == "up"  # the readable form: the table row, LINK column
        await vm.wait_nic(mac, SEE_TIMEOUT, carrier=True)
    finally:
        rc, out, err = await cli("nic", "del", nic["id"], "--timeout", str(UNPLUG_TIMEOUT), *qmp)
    assert rc == 0, err
    await vm.wait_nic_gone(mac)
    rc, out, err = await cli("net", "down", NAT_NAME, "--config", str(config))
    assert rc == 0, err


# ------------------------------------------------------------------------------------------- failure paths


async def test_a_failed_move_leaves_the_nic_where_it_was(vm: TestMachine, lab: Lab) -> None:
    mac = "52:54:00:1a:00:03"
    async with qmpnet.connect(str(vm.qmp_path), name=vm.name, settings=lab.settings()) as guest:
        nic, iface = await add_bridge_nic(guest, vm, "br-a", mac)
        try:
            assert nic.backend is not None
            tap = nic.backend.options["tap"]
            await static_address(vm, iface, GUEST_A)
            default_qdiscs = qdiscs(lab.hv, tap)

            with pytest.raises(NotFound) as missing:
                await guest.update_nic({"id": nic.id, "backend": {"type": "bridge", "bridge": "br-x"}})
            assert missing.value.field == "update.backend.bridge"
            assert taps(lab.hv)[tap]["master"] == "br-a"

            # Half-way: the move and the tap's tbf succeed, then the IFB cannot be made (its name is taken).
            blocker = f"qmpifb{taps(lab.hv)[tap]['ifindex']}"
            ip("-n", lab.hv, "link", "add", blocker, "type", "bridge")
            with pytest.raises(Conflict) as halfway:
                await guest.update_nic({"id": nic.id, "backend": {"type": "bridge", "bridge": "br-b"},
                                        "shape": {"rate": "5mbit"}})  # fmt: skip
            assert halfway.value.field == "update.shape"
            ip("-n", lab.hv, "link", "del", blocker)
            assert taps(lab.hv)[tap]["master"] == "br-a"
            assert qdiscs(lab.hv, tap) == default_qdiscs
            assert ifbs(lab.hv) == set()
            listed = {n.id: n for n in await guest.list_nics()}[nic.id]
            assert listed.link == "up"
            await vm.wait_nic(mac, SEE_TIMEOUT, carrier=True)
            rc, output = await pings(vm, A_HOST)
            assert rc == 0, output  # still on LAN A, link up: as before
        finally:
            await remove(guest, vm, nic)
    assert ifbs(lab.hv) == set()


async def test_policy_and_backends_refuse_what_they_cannot_allow(vm: TestMachine, lab: Lab) -> None:
    mac, user_mac = "52:54:00:1a:00:04", "52:54:00:1a:00:05"
    # QEMU serves one QMP client at a time: each connection below is closed before the next one opens.
    async with qmpnet.connect(str(vm.qmp_path), name=vm.name, settings=lab.settings()) as guest:
        nic, _ = await add_bridge_nic(guest, vm, "br-a", mac)
        user = await guest.add_nic({"model": "e1000", "mac": user_mac, "id": "lv-user"})
    try:
        assert nic.backend is not None
        tap = nic.backend.options["tap"]
        default_qdiscs = qdiscs(lab.hv, tap)
        narrow = lab.settings(allowed_bridges=["br-a"], allowed_capture_dirs=["/var/cap"])
        async with qmpnet.connect(str(vm.qmp_path), name=vm.name, settings=narrow) as guest:
            with pytest.raises(Forbidden) as forbidden:
                await guest.update_nic({"id": nic.id, "backend": {"type": "bridge", "bridge": "br-b"}})
            assert forbidden.value.field == "update.backend.bridge"
            with pytest.raises(Forbidden) as outside:
                await guest.capture(nic.id, "start", "/etc/qmpnet.adapters.pcap")
            assert outside.value.field == "file"
        assert taps(lab.hv)[tap]["master"] == "br-a"
        async with qmpnet.connect(str(vm.qmp_path), name=vm.name, settings=lab.settings()) as guest:
            for bad, field in (({"rate": "-5mbit"}, "update.shape.rate"), ({"loss": "150%"}, "update.shape.loss"),
                               ({"delay": "5min"}, "update.shape.delay")):
                with pytest.raises(InvalidRequest) as refused:
                    await guest.update_nic({"id": nic.id, "shape": bad})
                assert refused.value.field == field
            assert qdiscs(lab.hv, tap) == default_qdiscs
            # User mode takes the link change only.
            with pytest.raises(Unsupported) as unsupported:
                await guest.update_nic({"id": user.id, "shape": {"rate": "5mbit"}})
            assert unsupported.value.field == "update.shape"
            assert "user backend" in unsupported.value.message
            assert (await guest.update_nic({"id": user.id, "link": "down"})).link == "down"
            await vm.wait_nic(user_mac, SEE_TIMEOUT, carrier=False)
            assert (await guest.update_nic({"id": user.id, "link": "up"})).link == "up"
            await vm.wait_nic(user_mac, SEE_TIMEOUT, carrier=True)
        rc, _, err = await cli("nic", "set", nic.id, "--rate", "5mbits", "--qmp", str(vm.qmp_path))
        assert rc == 1
        assert err.startswith("error: invalid_request: update.shape.rate: '5mbits': unknown unit 'mbits'")
    finally:
        await cleanup(vm, lab, user, nic)


async def cleanup(vm: TestMachine, lab: Lab, *nics: Nic) -> None:
    """Remove ``nics`` on a fresh connection (the test's own ones are closed by then)."""
    async with qmpnet.connect(str(vm.qmp_path), name=vm.name, settings=lab.settings()) as guest:
        for nic in nics:
            await remove(guest, vm, nic)


# ------------------------------------------------------------------------------------------- shaping


async def guest_sends(vm: TestMachine, lab: Lab) -> Measured:
    """Bulk TCP from the guest (busybox nc) to A's host, measured where it arrives."""
    server = await run_in_netns(lab.a, lambda: listen(A_HOST, TO_A, timeout=60))
    received = asyncio.create_task(run_in_netns(lab.a, lambda: receive_bulk(server, TRANSFER, 60)))
    blocks = (TRANSFER + 256 * 1024) // 65536
    sent = await vm.agent.run(f"dd if=/dev/zero bs=65536 count={blocks} 2>/dev/null | nc {A_HOST} {TO_A}", timeout=90)
    assert sent.rc == 0, sent.output
    return await asyncio.wait_for(received, 60)


async def guest_receives(vm: TestMachine, lab: Lab) -> Measured:
    """Bulk TCP from A's host to the guest (busybox nc -l), timed by the sender until the guest has read it all."""
    # nc's stdin stays open (sleep), so it half-closes only when A's host has sent everything and it has read it.
    (await vm.agent.run(f"(sleep 120 | nc -l -p {FROM_A} >/dev/null 2>&1 &)")).check()
    return await eventually(  # the guest starts nc in the background; poll until it listens
        lambda: run_in_netns(lab.a, lambda: send_bulk(GUEST_A, FROM_A, TRANSFER, 60)),
        timeout=15, interval=0.2, retry=(ConnectionRefusedError,), what=f"a listener on {GUEST_A}:{FROM_A}",
    )


def within(measured: Measured, expected: float) -> bool:
    return expected * (1 - TOLERANCE) <= measured.bits_per_second <= expected * (1 + TOLERANCE)


async def test_a_rate_shapes_both_directions_and_no_shape_restores_the_link(
    vm: TestMachine, lab: Lab, tmp_path: Path
) -> None:
    mac = "52:54:00:1a:00:06"
    config = lab.write_config(tmp_path / "qmpnet.toml")
    qmp = ["--qmp", str(vm.qmp_path), "--config", str(config)]
    results: dict[str, object] = {}
    async with qmpnet.connect(str(vm.qmp_path), name=vm.name, settings=lab.settings()) as guest:
        nic, iface = await add_bridge_nic(guest, vm, "br-a", mac)
    try:
        assert nic.backend is not None
        tap = nic.backend.options["tap"]
        await static_address(vm, iface, GUEST_A)
        default_qdiscs = qdiscs(lab.hv, tap)
        free_out, free_in = await guest_sends(vm, lab), await guest_receives(vm, lab)
        results |= {"unshaped guest->A": free_out, "unshaped A->guest": free_in}

        rc, out, err = await cli("nic", "set", nic.id, "--rate", "5mbit", "--json", *qmp)
        assert rc == 0, err
        assert json.loads(out)["backend"]["options"]["rate"] == "5mbit"
        shaped_out, shaped_in = await guest_sends(vm, lab), await guest_receives(vm, lab)
        results |= {"5mbit guest->A": shaped_out, "5mbit A->guest": shaped_in}
        assert within(shaped_out, RATE_BITS), results
        assert within(shaped_in, RATE_BITS), results

        rc, out, err = await cli("nic", "set", nic.id, "--no-shape", "--json", *qmp)
        assert rc == 0, err
        assert "rate" not in json.loads(out)["backend"]["options"]
        assert qdiscs(lab.hv, tap) == default_qdiscs
        assert ifbs(lab.hv) == set()
        again_out, again_in = await guest_sends(vm, lab), await guest_receives(vm, lab)
        results |= {"no-shape guest->A": again_out, "no-shape A->guest": again_in}
        for measured in (again_out, again_in):  # clearly not limited any more
            assert measured.bits_per_second > 2 * RATE_BITS, results
    finally:
        with contextlib.suppress(Exception):
            await vm.agent.run("killall nc sleep", timeout=5)
        await cleanup(vm, lab, nic)
    assert ifbs(lab.hv) == set()
    report("shaping at 5mbit", results)




NETEM = kernel_has_netem()
_RTT = re.compile(r"min/avg/max = ([0-9.]+)/")


async def rtt_floor(vm: TestMachine, host: str) -> float:
    """The floor of ten RTTs: a slow machine (nested TCG in the lab host) only ever adds to a round trip, so the
    minimum shows netem's delay where an average drowns it (320 ms of noise seen in the lab)."""
    rc, output = await pings(vm, host, count=10)
    assert rc == 0, output
    found = _RTT.search(output)
    assert found is not None, output
    return float(found[1])


@needs.kernel(NETEM, "no netem (CONFIG_NET_SCH_NETEM): delay, jitter and loss cannot be exercised")
async def test_delay_raises_the_rtt_loss_drops_every_ping_and_no_shape_undoes_both(vm: TestMachine, lab: Lab) -> None:
    mac = "52:54:00:1a:00:07"
    results: dict[str, object] = {}
    async with qmpnet.connect(str(vm.qmp_path), name=vm.name, settings=lab.settings()) as guest:
        nic, iface = await add_bridge_nic(guest, vm, "br-a", mac)
        try:
            await static_address(vm, iface, GUEST_A)
            await pings(vm, A_HOST, count=1)  # ARP first, so that it is not in the floor measured below
            results["rtt_ms"] = base = await rtt_floor(vm, A_HOST)
            await guest.update_nic({"id": nic.id, "shape": {"delay": "100ms"}})
            results["rtt_with_100ms_ms"] = delayed = await rtt_floor(vm, A_HOST)
            assert 70 <= delayed - base <= 140, results
            await guest.update_nic({"id": nic.id, "shape": {"loss": "100%"}})
            rc, output = await pings(vm, A_HOST, count=5)
            results["loss_100"] = output.strip().splitlines()[-2] if output.strip() else output
            assert rc != 0
            assert " 0 packets received" in output, output
            await guest.update_nic({"id": nic.id, "shape": None})
            results["rtt_after_no_shape_ms"] = after = await rtt_floor(vm, A_HOST)  # pings get through again
            assert after - base < 30, results
        finally:
            await remove(guest, vm, nic)
    report("impairment", results)


@needs.kernel(not NETEM, "netem is there: the impairment itself is tested instead of its refusal", lab=False)
async def test_without_netem_an_impairment_is_unsupported_and_changes_nothing(vm: TestMachine, lab: Lab) -> None:
    mac = "52:54:00:1a:00:08"
    async with qmpnet.connect(str(vm.qmp_path), name=vm.name, settings=lab.settings()) as guest:
        nic, _ = await add_bridge_nic(guest, vm, "br-a", mac)
        try:
            assert nic.backend is not None
            tap = nic.backend.options["tap"]
            shaped = await guest.update_nic({"id": nic.id, "shape": {"rate": "5mbit"}})
            assert shaped.backend is not None
            before = (qdiscs(lab.hv, tap), ifbs(lab.hv))
            with pytest.raises(Unsupported) as caught:
                await guest.update_nic({"id": nic.id, "backend": {"type": "bridge", "bridge": "br-b"},
                                        "shape": {"rate": "5mbit", "delay": "100ms"}})  # fmt: skip
            assert "netem" in caught.value.message
            assert (qdiscs(lab.hv, tap), ifbs(lab.hv)) == before
            assert taps(lab.hv)[tap]["master"] == "br-a"
            await vm.wait_nic(mac, SEE_TIMEOUT, carrier=True)
            report("impairment", {"refused": caught.value.message})
        finally:
            await remove(guest, vm, nic)


# ------------------------------------------------------------------------------------------- VLANs




VLAN_FILTERING = kernel_filters_vlans()


@needs.kernel(VLAN_FILTERING, "the bridge has no VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING)")
async def test_two_guests_on_a_vlan_bridge_reach_each_other_only_with_matching_tags(
    vm: TestMachine, lab: Lab, guest_image: GuestImage, tmp_path: Path
) -> None:
    ip("-n", lab.hv, "link", "add", "br-v", "type", "bridge", "vlan_filtering", "1")
    ip("-n", lab.hv, "link", "set", "br-v", "up")
    macs = ("52:54:00:1a:00:09", "52:54:00:1a:00:0a")
    addresses = ("10.77.3.1", "10.77.3.2")
    settings = lab.settings()
    (tmp_path / "other").mkdir()
    async with (
        TestMachine(guest_image, name="live-other", machine="pc", workdir=tmp_path / "other") as other,
        qmpnet.connect(str(vm.qmp_path), name=vm.name, settings=settings) as first,
        qmpnet.connect(str(other.qmp_path), name=other.name, settings=settings) as second,
    ):
        nics, ifaces = [], []
        for guest, machine, mac, address in zip((first, second), (vm, other), macs, addresses, strict=True):
            nic, iface = await add_bridge_nic(guest, machine, "br-v", mac)
            await static_address(machine, iface, address)
            nics.append(nic)
            ifaces.append(iface)
        try:
            async def reach() -> bool:
                return (await pings(vm, addresses[1]))[0] == 0

            for guest, nic in zip((first, second), nics, strict=True):
                await guest.update_nic({"id": nic.id, "vlan": {"access": 10}})
            assert await reach()
            await second.update_nic({"id": nics[1].id, "vlan": {"access": 20}})
            assert not await reach()
            await first.update_nic({"id": nics[0].id, "vlan": {"access": 20}})
            assert await reach()  # the positive signal after the negative one: tags match again
            await first.update_nic({"id": nics[0].id, "vlan": None})
            assert not await reach()
            await a_trunk_carries_both(vm, first, nics[0], ifaces[0], (other, second, nics[1], ifaces[1]))
        finally:
            await remove(first, vm, nics[0])
            await remove(second, other, nics[1])


async def a_trunk_carries_both(
    vm: TestMachine, guest: qmpnet.Guest, nic: Nic, iface: GuestInterface,
    access: tuple[TestMachine, qmpnet.Guest, Nic, GuestInterface],
) -> None:
    """``vm``'s port becomes a trunk of 10 and 20, with ``eth.10``/``eth.20`` in the guest (8021q): the access
    guest on VLAN 10, then on 20, is reached over the matching VLAN interface and not over the other one."""
    other, other_guest, other_nic, other_iface = access
    subnets = {10: "10.77.4", 20: "10.77.5"}
    await guest.update_nic({"id": nic.id, "vlan": {"trunks": [10, 20]}})
    for vid, subnet in subnets.items():
        name = f"{iface.name}.{vid}"
        (await vm.agent.run(f"ip link add link {iface.name} name {name} type vlan id {vid} && "
                            f"ip addr add {subnet}.1/24 dev {name} && ip link set {name} up")).check()  # fmt: skip
        (await other.agent.run(f"ip addr add {subnet}.2/24 dev {other_iface.name}")).check()
    for vid, subnet in subnets.items():
        await other_guest.update_nic({"id": other_nic.id, "vlan": {"access": vid}})
        assert (await pings(vm, f"{subnet}.2"))[0] == 0, f"VLAN {vid} over the trunk"
        (wrong,) = (s for v, s in subnets.items() if v != vid)
        assert (await pings(vm, f"{wrong}.2"))[0] != 0, f"only VLAN {vid} reaches the access guest"
    report("vlan", {"trunk": "VLANs 10 and 20 both carried to the trunk guest"})


@needs.kernel(not VLAN_FILTERING, "the bridge filters VLANs: the tagging is tested instead of its refusal", lab=False)
async def test_without_vlan_filtering_a_tag_is_unsupported_and_changes_nothing(vm: TestMachine, lab: Lab) -> None:
    mac = "52:54:00:1a:00:0b"
    async with qmpnet.connect(str(vm.qmp_path), name=vm.name, settings=lab.settings()) as guest:
        nic, _ = await add_bridge_nic(guest, vm, "br-a", mac)
        try:
            assert nic.backend is not None
            with pytest.raises(Unsupported) as caught:
                await guest.update_nic({"id": nic.id, "backend": {"type": "bridge", "bridge": "br-b"},
                                        "vlan": {"access": 10}})  # fmt: skip
            assert "does not filter VLANs" in caught.value.message
            assert taps(lab.hv)[nic.backend.options["tap"]]["master"] == "br-a"
            await vm.wait_nic(mac, SEE_TIMEOUT, carrier=True)
            report("vlan", {"refused": caught.value.message})
        finally:
            await remove(guest, vm, nic)


# ------------------------------------------------------------------------------------------- capture


def tcpdump(path: Path) -> str:
    done = subprocess.run(["tcpdump", "-r", str(path), "-e", "-nn"], capture_output=True, text=True, check=True)
    return done.stdout


@needs.tool("tcpdump", "tcpdump")
async def test_capture_until_ctrl_c_shows_the_guests_frames(vm: TestMachine, lab: Lab, tmp_path: Path) -> None:
    mac = "52:54:00:1a:00:0c"
    config = lab.write_config(tmp_path / "qmpnet.toml")
    pcap = tmp_path / "bridge.pcap"
    async with qmpnet.connect(str(vm.qmp_path), name=vm.name, settings=lab.settings()) as guest:
        nic, iface = await add_bridge_nic(guest, vm, "br-a", mac)
    try:
        await static_address(vm, iface, GUEST_A)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "qmpnet", "nic", "capture", nic.id, "--file", str(pcap), "--json",
            "--qmp", str(vm.qmp_path), "--config", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert process.stderr is not None
        async with asyncio.timeout(30):
            line = await process.stderr.readline()
        assert b"capturing NIC" in line, line
        rc, output = await pings(vm, A_HOST, count=3)
        assert rc == 0, output
        process.send_signal(signal.SIGINT)  # Ctrl-C
        async with asyncio.timeout(30):
            stdout, stderr = await process.communicate()
        assert process.returncode == 0, stderr
        assert json.loads(stdout) == {"id": nic.id, "state": "stopped", "file": str(pcap)}
        frames = tcpdump(pcap)
        echo = [line for line in frames.splitlines() if f"{mac} > " in line and "ICMP echo request" in line]
        assert len(echo) >= 3, frames
        assert any(f"> {mac}" in line and "ICMP echo reply" in line for line in frames.splitlines()), frames
        # --duration 0: started and stopped at once, and QEMU took the first capture's object away on its stop.
        rc, _, err = await cli("nic", "capture", nic.id, "--file", str(tmp_path / "x.pcap"), "--duration", "0",
                               "--qmp", str(vm.qmp_path))  # fmt: skip
        assert rc == 0, err
        report("capture (bridge, Ctrl-C)", {"frames": len(frames.splitlines()), "first": frames.splitlines()[0]})
    finally:
        await cleanup(vm, lab, nic)


@needs.tool("tcpdump", "tcpdump")
async def test_capture_works_in_user_mode_and_refuses_a_second_one(vm: TestMachine, tmp_path: Path) -> None:
    mac = "52:54:00:1a:00:0d"
    pcap = tmp_path / "user.pcap"
    async with qmpnet.connect(str(vm.qmp_path), name=vm.name) as guest:
        nic = await guest.add_nic({"model": "e1000", "mac": mac, "backend": {"type": "user", "net": "10.0.9.0/24"}})
        try:
            iface = await vm.wait_nic(mac, SEE_TIMEOUT, carrier=True)
            started = await guest.capture(nic.id, "start", str(pcap))
            assert (started.state, started.file) == ("capturing", str(pcap))
            with pytest.raises(Conflict):
                await guest.capture(nic.id, "start", str(tmp_path / "again.pcap"))
            done = await vm.agent.dhcp(iface.name)
            assert done.rc == 0, done.output
            stopped = await guest.capture(nic.id, "stop")
            assert (stopped.state, stopped.file) == ("stopped", str(pcap))
            with pytest.raises(NotFound):
                await guest.capture(nic.id, "stop")
        finally:
            await remove(guest, vm, nic)
    frames = tcpdump(pcap)
    assert any(line.startswith(tuple("0123456789")) and f"{mac} > ff:ff:ff:ff:ff:ff" in line and "BOOTP/DHCP" in line
               for line in frames.splitlines()), frames
    assert not (tmp_path / "again.pcap").exists() or (tmp_path / "again.pcap").stat().st_size == 0
