"""Bridge and NAT NICs end to end: qmpnet's public API (and its CLI) against a booted guest and real namespaces.

Each test builds its own network namespaces (``hv-<random>``: the hypervisor's network, holding bridge ``br0`` and
the NAT network; ``ext-<random>``: a host outside it) and deletes them afterwards, killing whatever still runs in
them (dnsmasq) first, even when the test fails. QEMU itself runs in the root namespace: qmpnet creates each tap
inside ``hv`` (``settings.hostnet.netns``) and hands QEMU the open fd, so the root namespace's links, routes and
firewall are never touched, and the fixture checks that they are unchanged.

::

    guest --virtio-- vnetN ==br0== ext0 ---- lan0 (ext) 10.77.0.1/24                      (bridge mode)
    guest --virtio-- vnetN ==qmpnat-lab (192.168.150.1)   up0 10.99.0.1 ---- wan0 10.99.0.2 (ext)   (NAT)

One guest is booted for the whole module (a boot costs ~4 s under TCG); every test removes what it adds and ends
with the guest as it found it. A second QMP monitor (``aux.qmp``) lets the tests look at QEMU, and change it
behind qmpnet's back, while qmpnet holds the main one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import needs
import pytest
import pytest_asyncio
from aux_qmp import aux_args, aux_monitor, hmp
from netns_tools import connect_and_read, ip, kill_namespace, links, listen, namespace_pids, nft_tables, serve_once
from waiting import eventually

import qmpnet
from qmpnet.adapters.hostnet import HostnetSettings
from qmpnet.adapters.hostnet.netns import run_in_netns
from qmpnet.adapters.store import guest_key
from qmpnet.errors import Conflict, Forbidden, InvalidRequest, NotFound
from qmpnet.settings import Settings, load_settings
from qmpnet.testguest import TestMachine

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from qmpnet.testguest import GuestImage, GuestInterface

pytestmark = [
    pytest.mark.integration,
    pytest.mark.asyncio(loop_scope="module"),
    needs.root("create network namespaces"),
    needs.tool("ip", "iproute2"),
    needs.tool("nft", "nftables"),
    needs.tool("dnsmasq", "dnsmasq-base"),
    needs.device("/dev/net/tun"),
    needs.tool("busybox", "busybox-static"),
]

SEE_TIMEOUT = 20.0
UNPLUG_TIMEOUT = 15.0
EXT_LAN, GUEST_LAN = "10.77.0.1", "10.77.0.2"
HV_WAN, EXT_WAN = "10.99.0.1", "10.99.0.2"
NAT_NAME, NAT_BRIDGE, NAT_SUBNET = "lab", "qmpnat-lab", ipaddress.IPv4Network("192.168.150.0/24")
NAT_GATEWAY = "192.168.150.1"
OUT_PORT, IN_PORT = 8080, 8081


# ------------------------------------------------------------------------------------------- host plumbing


def taps(netns: str) -> dict[str, dict[str, Any]]:
    return {name: link for name, link in links(netns).items() if name.startswith("vnet")}


def root_state() -> tuple[set[str], str, str, str]:
    """What the root namespace must still look like afterwards: links, routes, nftables tables, ip_forward."""
    routes = subprocess.run(["ip", "route", "show"], capture_output=True, text=True, check=True).stdout
    return set(links(None)), routes, nft_tables(None), Path("/proc/sys/net/ipv4/ip_forward").read_text()


@dataclass
class Lab:
    hv: str
    ext: str
    state_dir: Path

    def hostnet(self) -> HostnetSettings:
        return HostnetSettings(netns=self.hv, state_dir=self.state_dir)

    def write_config(self, path: Path) -> Path:
        """A TOML settings file with the hv namespace and the NAT network ``lab``, for the API and the CLI."""
        path.write_text(
            f'[hostnet]\nnetns = "{self.hv}"\nstate_dir = "{self.state_dir}"\n\n'
            f'[[hostnet.networks]]\nname = "{NAT_NAME}"\nbridge = "{NAT_BRIDGE}"\nsubnet = "{NAT_SUBNET}"\n'
        )
        return path


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """``hv`` with ``br0`` bridged to ``ext`` (10.77.0.0/24) and routed to it by an uplink (10.99.0.0/24)."""
    before = root_state()
    tag = uuid.uuid4().hex[:6]
    hv, ext = f"hv-{tag}", f"ext-{tag}"
    try:
        for name in (hv, ext):
            ip("netns", "add", name)
            ip("-n", name, "link", "set", "lo", "up")
        ip("-n", hv, "link", "add", "br0", "type", "bridge")
        ip("-n", hv, "link", "add", "ext0", "type", "veth", "peer", "name", "lan0", "netns", ext)
        ip("-n", hv, "link", "set", "ext0", "master", "br0", "up")
        ip("-n", hv, "link", "set", "br0", "up")
        ip("-n", ext, "addr", "add", f"{EXT_LAN}/24", "dev", "lan0")
        ip("-n", ext, "link", "set", "lan0", "up")
        ip("-n", hv, "link", "add", "up0", "type", "veth", "peer", "name", "wan0", "netns", ext)
        ip("-n", hv, "addr", "add", f"{HV_WAN}/24", "dev", "up0")
        ip("-n", hv, "link", "set", "up0", "up")
        ip("-n", ext, "addr", "add", f"{EXT_WAN}/24", "dev", "wan0")
        ip("-n", ext, "link", "set", "wan0", "up")
        # ext can route to the NAT subnet: only qmpnet's firewall can keep it from connecting in.
        ip("-n", ext, "route", "add", str(NAT_SUBNET), "via", HV_WAN)
        yield Lab(hv, ext, tmp_path / "state")
    finally:
        for name in (hv, ext):
            kill_namespace(name)
    assert root_state() == before, "the root namespace's links, routes, nftables tables or ip_forward changed"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vm(guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TestMachine]:
    workdir = tmp_path_factory.mktemp("bridge-nat")
    extra = aux_args(workdir)
    async with TestMachine(guest_image, name="bridge-nat", machine="pc", workdir=workdir, extra_args=extra) as machine:
        yield machine


async def no_taps(netns: str, timeout: float = 5) -> dict[str, dict[str, Any]]:
    """Wait (up to ``timeout`` seconds) until ``netns`` has no vnet tap; return what is left.

    A tap leaves with the last fd to it, which QEMU closes when ``netdev_del`` returns; polling covers the kernel's
    unregistering, for which there is nothing to wait on short of a netlink monitor.
    """
    with contextlib.suppress(TimeoutError):
        await eventually(lambda: not taps(netns), timeout=timeout, interval=0.05, what=f"no tap in {netns}")
    return taps(netns)


async def in_ns(netns: str, *argv: str, timeout: float = 60) -> tuple[int, str]:
    """Run ``argv`` in ``netns`` without blocking the event loop; return its status and combined output."""
    process = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", netns, *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    async with asyncio.timeout(timeout):
        output, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, output.decode()


async def cli(*args: str) -> tuple[int, str, str]:
    """Run ``qmpnet ARGS`` as a user would; return the exit status, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpnet", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def report(name: str, values: dict[str, object]) -> None:
    print(f"\n{name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))  # noqa: T201 - the in-guest results


# ------------------------------------------------------------------------------------------- bridge mode


async def test_bridge_nic_reaches_the_outside_and_the_outside_reaches_it(vm: TestMachine, lab: Lab) -> None:
    settings = Settings(hostnet=lab.hostnet())
    seen_results: dict[str, object] = {}
    async with qmpnet.connect(str(vm.qmp_path), name=vm.name, settings=settings) as guest:
        start = time.monotonic()
        nic = await guest.add_nic({"model": "virtio", "backend": {"type": "bridge", "bridge": "br0"}})
        seen_results["add_s"] = f"{time.monotonic() - start:.2f}"
        try:
            assert nic.backend is not None
            assert nic.backend.type == "bridge"
            tap = nic.backend.options["tap"]
            assert nic.backend.options["bridge"] == "br0"
            # The tap lives in hv, is enslaved to br0 and up, and carries qmpnet's mark with the owner: the guest's
            # key in the state store, the same for every qmpnet process on this host.
            shown = taps(lab.hv)[tap]
            assert shown["master"] == "br0"
            assert "UP" in shown["flags"]
            assert shown["ifalias"] == f"qmpnet:tap:{guest_key(str(vm.qmp_path))}/{nic.id}"
            assert guest.record.nics[nic.id].host.tap == tap  # recorded: a restart knows to release it
            assert tap not in links(None)

            iface = await vm.wait_nic(nic.mac or "", driver="virtio_net", carrier=True)
            seen_results["visible_s"] = f"{time.monotonic() - start:.2f}"
            seen_results["guest_if"] = f"{iface.name} {iface.mac} {iface.driver} {iface.pci}"
            (await vm.agent.run(f"ip addr add {GUEST_LAN}/24 dev {iface.name}")).check()
            await vm.wait_nic(nic.mac or "", ipv4=[f"{GUEST_LAN}/24"])

            out = await vm.agent.run(f"ping -c 2 -W 5 {EXT_LAN}", timeout=30)
            assert out.rc == 0, out.output
            seen_results["guest->ext"] = out.output.strip().splitlines()[-1]
            rc, output = await in_ns(lab.ext, "busybox", "ping", "-c", "2", "-W", "5", GUEST_LAN)
            assert rc == 0, output
            seen_results["ext->guest"] = output.strip().splitlines()[-1]

            listed = {n.id: n for n in await guest.list_nics()}
            backend = listed[nic.id].backend
            assert backend is not None
            assert (backend.type, backend.options) == ("bridge", {"bridge": "br0", "tap": tap})
        finally:
            result = await guest.remove_nic(nic.id, timeout=UNPLUG_TIMEOUT)
        assert result.state == "removed"
    await vm.wait_nic_gone(nic.mac or "")
    assert await no_taps(lab.hv) == {}
    assert set(links(lab.hv)) == {"lo", "br0", "ext0", "up0"}
    assert f"{nic.id}.net" not in await hmp(vm.workdir, "info network")
    report("bridge", seen_results)


async def test_bridge_nic_through_the_cli(vm: TestMachine, lab: Lab, tmp_path: Path) -> None:
    config = lab.write_config(tmp_path / "qmpnet.toml")
    qmp = ["--qmp", str(vm.qmp_path), "--config", str(config)]
    rc, out, err = await cli("nic", "add", "--backend", "bridge", "--bridge", "br0", "--mac", "52:54:00:cc:00:01",
                             "--json", *qmp)
    assert rc == 0, err
    nic = json.loads(out)
    assert (nic["backend"]["type"], nic["backend"]["options"]["bridge"]) == ("bridge", "br0")
    tap = nic["backend"]["options"]["tap"]
    try:
        # The CLI process has exited: QEMU's fd alone keeps the tap, still on br0.
        assert taps(lab.hv)[tap]["master"] == "br0"
        await vm.wait_nic("52:54:00:cc:00:01", driver="virtio_net")
        rc, out, err = await cli("nic", "list", "--json", *qmp)
        assert rc == 0, err
        assert nic["id"] in {n["id"] for n in json.loads(out)["nics"]}
    finally:
        rc, out, err = await cli("nic", "del", nic["id"], "--timeout", str(UNPLUG_TIMEOUT), *qmp)
    assert (rc, out.strip()) == (0, f"{nic['id']}: removed"), err
    await vm.wait_nic_gone("52:54:00:cc:00:01")
    assert await no_taps(lab.hv) == {}

    # A hostile bridge name is refused with the field named, and nothing reaches QEMU or the host.
    before = await hmp(vm.workdir, "info network")
    rc, out, err = await cli("nic", "add", "--backend", "bridge", "--bridge", "br0;reboot", *qmp)
    assert rc == 1
    assert err.startswith("error: invalid_request: nic.backend.bridge: ")
    assert await hmp(vm.workdir, "info network") == before
    assert taps(lab.hv) == {}


# ------------------------------------------------------------------------------------------- NAT mode


async def test_nat_nic_gets_a_lease_goes_out_masqueraded_and_cannot_be_reached(
    vm: TestMachine, lab: Lab, tmp_path: Path
) -> None:
    config = lab.write_config(tmp_path / "qmpnet.toml")
    results: dict[str, object] = {}
    async with qmpnet.connect(str(vm.qmp_path), name=vm.name, settings=load_settings(config)) as guest:
        start = time.monotonic()
        nic = await guest.add_nic({"backend": {"type": "nat", "network": NAT_NAME}})  # brought up on first use
        results["add_with_net_up_s"] = f"{time.monotonic() - start:.2f}"
        try:
            assert nic.backend is not None
            assert nic.backend.type == "nat"
            assert nic.backend.options["bridge"] == NAT_BRIDGE
            tap = nic.backend.options["tap"]
            assert taps(lab.hv)[tap]["master"] == NAT_BRIDGE
            listed_nic = {n.id: n for n in await guest.list_nics()}[nic.id]
            assert listed_nic.backend is not None
            assert (listed_nic.backend.type, listed_nic.backend.options) == (
                "nat", {"network": NAT_NAME, "bridge": NAT_BRIDGE, "tap": tap}
            )
            rc, out, err = await cli("net", "list", "--json", "--config", str(config))
            assert rc == 0, err
            [listed] = json.loads(out)["networks"]
            assert (listed["name"], listed["up"], listed["bridge"]) == (NAT_NAME, True, NAT_BRIDGE)

            iface = await vm.wait_nic(nic.mac or "", carrier=True)
            start = time.monotonic()
            dhcp = await vm.agent.dhcp(iface.name)
            assert dhcp.rc == 0, dhcp.output
            leased = await seen_lease(vm, iface.mac)
            results["dhcp_s"] = f"{time.monotonic() - start:.2f}"
            results["lease"] = leased
            address = ipaddress.IPv4Interface(leased)
            assert address.network == NAT_SUBNET
            assert 100 <= int(address.ip) - int(NAT_SUBNET.network_address) <= 200

            results |= await reach_out_and_in(vm, lab, str(address.ip))
        finally:
            with contextlib.suppress(Exception):
                await vm.agent.run("killall nc", timeout=5)
            result = await guest.remove_nic(nic.id, timeout=UNPLUG_TIMEOUT)
        assert result.state == "removed"
    await vm.wait_nic_gone(nic.mac or "")
    assert await no_taps(lab.hv) == {}

    rc, out, err = await cli("net", "down", NAT_NAME, "--config", str(config))
    assert (rc, out.strip()) == (0, f"{NAT_NAME}: down"), err
    assert NAT_BRIDGE not in links(lab.hv)
    assert nft_tables(lab.hv) == ""
    assert namespace_pids(lab.hv) == []  # no dnsmasq (nothing else ever ran in hv)
    assert not list(lab.state_dir.iterdir())
    rc, out, err = await cli("net", "list", "--json", "--config", str(config))
    assert rc == 0, err
    assert [n["up"] for n in json.loads(out)["networks"]] == [False]
    report("nat", results)


async def reach_out_and_in(vm: TestMachine, lab: Lab, guest_ip: str) -> dict[str, object]:
    """The guest connects out to ext (masqueraded); ext cannot connect in. Returns what each side saw."""
    results: dict[str, object] = {}
    # Out: ext sees the hv uplink address as the source (masquerade), not the guest's.
    server = await run_in_netns(lab.ext, lambda: listen(EXT_WAN, OUT_PORT))
    accepted = asyncio.create_task(asyncio.to_thread(serve_once, server))
    out_run = await vm.agent.run(f"nc -w 5 {EXT_WAN} {OUT_PORT}", timeout=20)
    assert out_run.rc == 0, out_run.output
    assert out_run.output.strip() == "hi"
    results["ext_saw_source"] = await asyncio.wait_for(accepted, 20)
    assert results["ext_saw_source"] == HV_WAN

    # In: a one-shot listener in the guest. ext's connection times out (dropped, not even refused) ...
    (await vm.agent.run(f"(echo guest-hi | nc -l -p {IN_PORT} >/dev/null 2>&1 &)")).check()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await run_in_netns(lab.ext, lambda: connect_and_read(guest_ip, IN_PORT, 3))
    results["ext->guest"] = f"timed out after {time.monotonic() - started:.1f}s"
    # ... although the listener is there: the NAT host itself (no forwarding involved) gets its answer, which a
    # one-shot listener could not give had ext's connection reached it.
    results["hv->guest"] = (await connect_from_hv(lab, guest_ip)).decode().strip()
    assert results["hv->guest"] == "guest-hi"
    return results


async def seen_lease(vm: TestMachine, mac: str) -> str:
    def leased(interfaces: list[GuestInterface]) -> str | None:
        found = next((i for i in interfaces if i.mac == mac), None)
        in_subnet = [a for a in found.ipv4 if ipaddress.IPv4Interface(a).network == NAT_SUBNET] if found else []
        return in_subnet[0] if in_subnet else None

    return await vm.agent.wait_for(leased, timeout=SEE_TIMEOUT)


async def connect_from_hv(lab: Lab, guest_ip: str) -> bytes:
    """Connect from hv to the guest's listener, retrying while it is not listening yet (refused)."""
    return await eventually(  # the guest starts nc in the background; poll until it listens
        lambda: run_in_netns(lab.hv, lambda: connect_and_read(guest_ip, IN_PORT, 5)),
        timeout=15, interval=0.2, retry=(ConnectionRefusedError,), what=f"a listener on {guest_ip}:{IN_PORT}",
    )


# ------------------------------------------------------------------------------------------- failure paths


def macs(vm: TestMachine) -> set[str]:
    """The MACs in the guest's latest interfaces report."""
    return {i.mac for i in vm.agent.latest.interfaces} if vm.agent.latest else set()


def first_free_slot(pci: list[dict[str, Any]]) -> int:
    """The lowest free slot of pci.0 (bus 0), where qmpnet's placement puts the next NIC on ``pc``."""
    used = {device["slot"] for bus in pci if bus["bus"] == 0 for device in bus["devices"]}
    return next(slot for slot in range(1, 32) if slot not in used)


async def test_failed_device_add_leaves_no_tap_and_no_netdev(vm: TestMachine, lab: Lab) -> None:
    aux_mac, doomed_mac = "52:54:00:a0:00:01", "52:54:00:dd:00:01"
    settings = Settings(hostnet=lab.hostnet())
    async with (
        qmpnet.connect(str(vm.qmp_path), name=vm.name, settings=settings) as guest,
        aux_monitor(vm.workdir) as aux,
    ):
        before_nics = {n.id for n in await guest.list_nics()}  # qmpnet now holds this view of the guest
        before_macs = macs(vm)
        # Behind qmpnet's back, occupy the slot the caller asks for, so device_add fails after the fd was passed.
        slot = first_free_slot(cast("list[dict[str, Any]]", await aux.execute("query-pci")))
        await aux.execute("netdev_add", {"type": "user", "id": "aux0.net", "net": "10.0.9.0/24"})
        await aux.execute("device_add", {"driver": "e1000", "id": "aux0", "netdev": "aux0.net", "mac": aux_mac,
                                         "bus": "pci.0", "addr": f"{slot:#x}"})
        try:
            network_before = await aux.execute("human-monitor-command", {"command-line": "info network"})
            with pytest.raises(Conflict) as caught:
                await guest.add_nic({"model": "virtio", "id": "doomed", "mac": doomed_mac, "addr": f"{slot:x}",
                                     "backend": {"type": "bridge", "bridge": "br0"}})
            # QEMU refused the stale plan; qmpnet re-read the guest, and planning again names the holder.
            assert caught.value.field == "nic.addr"
            assert "aux0" in caught.value.message
            # Rolled back: netdev_del closed QEMU's copy of the fd, the tap went with it, and nothing else changed.
            assert await no_taps(lab.hv) == {}
            network_after = await aux.execute("human-monitor-command", {"command-line": "info network"})
            assert "doomed" not in str(network_after)
            assert network_after == network_before
            assert vm.agent.interface_by_mac(doomed_mac) is None
            assert guest.record.nics == {}
            await vm.wait_nic(aux_mac, driver="e1000")
            report("device_add failure", {"conflict": caught.value.message})
        finally:
            # qmpnet re-read the guest after the failure, so it knows aux0 and removes it with its netdev.
            assert (await guest.remove_nic("aux0", timeout=UNPLUG_TIMEOUT)).state == "removed"
        assert {n.id for n in await guest.list_nics()} == before_nics
        assert "aux0" not in str(await aux.execute("human-monitor-command", {"command-line": "info network"}))
    await vm.wait_nic_gone(aux_mac)
    assert macs(vm) == before_macs


async def test_forbidden_unknown_and_hostile_bridges_change_nothing(vm: TestMachine, lab: Lab) -> None:
    network_before, links_before = await hmp(vm.workdir, "info network"), set(links(lab.hv))
    forbid = Settings(policy=qmpnet.Policy(allowed_bridges=["br9"]), hostnet=lab.hostnet())
    async with qmpnet.connect(str(vm.qmp_path), name=vm.name, settings=forbid) as guest:
        with pytest.raises(Forbidden) as forbidden:
            await guest.add_nic({"backend": {"type": "bridge", "bridge": "br0"}})
        assert (forbidden.value.code, forbidden.value.field) == ("forbidden", "nic.backend.bridge")
    async with qmpnet.connect(str(vm.qmp_path), name=vm.name, settings=Settings(hostnet=lab.hostnet())) as guest:
        with pytest.raises(NotFound) as unknown:
            await guest.add_nic({"backend": {"type": "bridge", "bridge": "br7"}})
        assert (unknown.value.code, unknown.value.field) == ("not_found", "nic.backend.bridge")
        with pytest.raises(InvalidRequest) as not_bridge:
            await guest.add_nic({"backend": {"type": "bridge", "bridge": "ext0"}})  # a veth
        assert not_bridge.value.field == "nic.backend.bridge"
        for hostile in ("../br0", "br0/x", "b" * 16, "br0;x", "$(x)", "br 0"):
            with pytest.raises(InvalidRequest) as caught:
                await guest.add_nic({"backend": {"type": "bridge", "bridge": hostile}})
            assert caught.value.field == "nic.backend.bridge", hostile
        with pytest.raises(InvalidRequest) as bad_tap:
            await guest.add_nic({"backend": {"type": "tap", "ifname": "$(reboot)"}})
        assert bad_tap.value.field == "nic.backend.ifname"
    assert await hmp(vm.workdir, "info network") == network_before
    assert set(links(lab.hv)) == links_before
    report("refused", {"forbidden": forbidden.value.message, "not_found": unknown.value.message,
                       "not_a_bridge": not_bridge.value.message})
