"""A NIC's MTU in a booted guest (issue 18.1): the tap, virtio's host_mtu, don't-fragment pings, refusals.

Each test builds its own namespaces and deletes them afterwards:

    a-<tag>: lan0 10.78.1.1/24 (MTU 1500) ==veth== pm (1500) --master--> br-m, MTU 1400 set   (hv-<tag>)
    hv-<tag>: br-m; br-n (MTU 1500, no port)

br-m's MTU is set by hand and stays 1400 although its port is 1500, so the only thing between the guest and the
outside host that limits a frame is the guest's tap, which qmpnet gives the bridge's MTU. QEMU runs in the root
namespace; qmpnet makes the taps in hv. One guest is booted for the module; every test removes what it adds.

The guest's busybox ping cannot ask for "don't fragment", so the two directions are proven this way:

* host -> guest: ``ping -M do -s 1372`` (1400 bytes of IP) from a reaches the guest and is answered; 1373 bytes do
  not fit the 1400-byte tap and get no answer;
* guest -> host: the guest's ping of 1372 bytes arrives as one packet of 1400 bytes with DF set (Linux sets DF on
  what fits the path MTU), and one of 1373 bytes arrives in fragments of at most 1400: the guest itself uses MTU
  1400, as host_mtu told its virtio driver. Its interface says 1400 too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import needs
import pytest
import pytest_asyncio
from aux_qmp import aux_args, hmp
from netns_tools import ip, kill_namespace, links
from waiting import eventually

import qmpnet
from qmpnet.adapters.hostnet import HostnetSettings
from qmpnet.errors import InvalidRequest
from qmpnet.settings import Settings
from qmpnet.testguest import TestMachine
from qmpnet.testguest.agent import TIMEOUT_SCALE

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

    from qmpnet.testguest import GuestImage, GuestInterface

pytestmark = [
    pytest.mark.integration,
    pytest.mark.asyncio(loop_scope="module"),
    needs.root("create network namespaces"),
    needs.tool("ip", "iproute2"),
    needs.tool("ping", "iputils-ping"),
    needs.tool("tcpdump", "tcpdump"),
    needs.device("/dev/net/tun"),
]

SEE_TIMEOUT = 20.0 * TIMEOUT_SCALE
UNPLUG_TIMEOUT = 15.0 * TIMEOUT_SCALE
HOST, GUEST = "10.78.1.1", "10.78.1.2"
BRIDGE_MTU = 1400
FITS = BRIDGE_MTU - 28  # ICMP payload of a 1400-byte IP packet (20 bytes of IP header, 8 of ICMP)


@dataclass
class Lab:
    hv: str
    a: str
    state_dir: Path

    def settings(self) -> Settings:
        hostnet = HostnetSettings.model_validate({"netns": self.hv, "state_dir": str(self.state_dir)})
        return Settings(hostnet=hostnet)

    def write_config(self, path: Path) -> Path:
        path.write_text(f'[hostnet]\nnetns = "{self.hv}"\nstate_dir = "{self.state_dir}"\n')
        return path


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    tag = uuid.uuid4().hex[:6]
    hv, a = f"hv-{tag}", f"a-{tag}"
    try:
        for name in (hv, a):
            ip("netns", "add", name)
            ip("-n", name, "link", "set", "lo", "up")
        ip("-n", hv, "link", "add", "br-m", "type", "bridge")
        ip("-n", hv, "link", "add", "pm", "type", "veth", "peer", "name", "lan0", "netns", a)
        ip("-n", hv, "link", "set", "pm", "master", "br-m", "up")
        ip("-n", hv, "link", "set", "br-m", "mtu", str(BRIDGE_MTU))  # after its port: set by hand, it stays
        ip("-n", hv, "link", "set", "br-m", "up")
        ip("-n", hv, "link", "add", "br-n", "type", "bridge")
        ip("-n", hv, "link", "set", "br-n", "up")
        ip("-n", a, "addr", "add", f"{HOST}/24", "dev", "lan0")
        ip("-n", a, "link", "set", "lan0", "up")
        assert links(hv)["br-m"]["mtu"] == BRIDGE_MTU  # kept although its port has 1500: it was set by hand
        assert links(hv)["pm"]["mtu"] == 1500
        yield Lab(hv, a, tmp_path / "state")
    finally:
        for name in (hv, a):
            kill_namespace(name)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vm(guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TestMachine]:
    workdir = tmp_path_factory.mktemp("mtu")
    async with TestMachine(guest_image, name="mtu", machine="pc", workdir=workdir,
                           extra_args=aux_args(workdir)) as machine:  # fmt: skip
        yield machine


def taps(netns: str) -> dict[str, int]:
    """The taps of ``netns`` and their MTUs."""
    return {name: link["mtu"] for name, link in links(netns).items() if name.startswith("vnet")}


async def guest_mtu(vm: TestMachine, iface: GuestInterface) -> int:
    out = await vm.agent.run(f"cat /sys/class/net/{iface.name}/mtu")
    out.check()
    return int(out.output.strip())


async def cli(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    """Run ``qmpnet ARGS``; return the exit status, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpnet", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(timeout):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def host_ping(lab: Lab, size: int) -> subprocess.CompletedProcess[str]:
    """A don't-fragment ping of ``size`` bytes of ICMP payload from a to the guest."""
    return subprocess.run(["ip", "netns", "exec", lab.a, "ping", "-M", "do", "-s", str(size), "-c", "2", "-W", "3",
                           GUEST], capture_output=True, text=True, check=False)  # fmt: skip


async def guest_pings_seen(
    vm: TestMachine, lab: Lab, tmp_path: Path, sizes: list[int]
) -> tuple[list[int], list[str]]:
    """The exit codes of the guest's pings of a with ``sizes``, and the IPv4 headers (tcpdump -v) that reached a."""
    log, errors = tmp_path / "icmp.txt", tmp_path / "tcpdump.err"
    with log.open("w") as out, errors.open("w") as err:
        dump = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", lab.a, "tcpdump", "-i", "lan0", "--immediate-mode", "-l", "-nn", "-v",
            f"src {GUEST} and (icmp or ip[6:2] & 0x1fff != 0)", stdout=out, stderr=err,
        )  # fmt: skip
        try:
            await eventually(lambda: "listening on" in errors.read_text(), timeout=10, interval=0.05,
                             what="tcpdump listening")  # fmt: skip
            codes = [(await vm.agent.run(f"ping -c 1 -W 3 -s {size} {HOST}", timeout=30)).rc for size in sizes]
            with contextlib.suppress(TimeoutError):  # what arrived is checked by the caller
                await eventually(lambda: len(icmp_headers(log)) >= len(sizes) + 1, timeout=10, interval=0.05)
        finally:
            dump.terminate()
            await dump.wait()
    return codes, icmp_headers(log)


def icmp_headers(log: Path) -> list[str]:
    """The IPv4 header lines of ICMP packets (and fragments) in tcpdump's -v output."""
    return [line for line in log.read_text().splitlines() if "proto ICMP" in line]


def ip_lengths(headers: list[str]) -> list[tuple[int, str]]:
    """``(length, flags)`` of each IPv4 header line tcpdump -v printed."""
    found = [re.search(r"flags \[([^\]]*)\].*length (\d+)\)", line) for line in headers]
    return [(int(m.group(2)), m.group(1)) for m in found if m is not None]


# ---------------------------------------------------------------------------------------------- the proof


async def test_a_virtio_nic_on_a_1400_bridge_has_mtu_1400_end_to_end(
    vm: TestMachine, lab: Lab, tmp_path: Path
) -> None:
    mac = "52:54:00:3a:00:01"
    async with qmpnet.connect(str(vm.qmp_path), name=vm.name, settings=lab.settings()) as guest:
        nic = await guest.add_nic({"model": "virtio", "mac": mac, "backend": {"type": "bridge", "bridge": "br-m"}})
        try:
            assert nic.warnings == []
            assert nic.backend is not None
            tap = nic.backend.options["tap"]
            assert taps(lab.hv) == {tap: BRIDGE_MTU}  # no mtu asked: the bridge's
            iface = await vm.wait_nic(mac, SEE_TIMEOUT, driver="virtio_net", carrier=True)
            assert await guest_mtu(vm, iface) == BRIDGE_MTU  # host_mtu reached the guest's driver
            (await vm.agent.run(f"ip addr add {GUEST}/24 dev {iface.name}")).check()

            fits, too_big = host_ping(lab, FITS), host_ping(lab, FITS + 1)
            assert fits.returncode == 0, fits.stdout + fits.stderr
            assert too_big.returncode != 0, too_big.stdout
            assert " 0% packet loss" in fits.stdout
            assert "100% packet loss" in too_big.stdout

            codes, headers = await guest_pings_seen(vm, lab, tmp_path, [FITS, FITS + 1])
            assert codes[0] == 0  # the 1400-byte echo reply fits the tap on the way back; 1401 would not
            seen = ip_lengths(headers)
            assert seen[0] == (BRIDGE_MTU, "DF"), seen  # 1372 bytes: one packet, don't-fragment set
            assert len(seen) >= 3, seen  # 1373 bytes: the guest fragmented it itself ...
            assert all(length <= BRIDGE_MTU for length, _ in seen), seen  # ... into packets that fit
            print(f"\nmtu: guest {iface.name} mtu {BRIDGE_MTU}; host DF ping {FITS}: ok, {FITS + 1}: lost; "  # noqa: T201
                  f"guest pings as IP packets {seen}")
        finally:
            assert (await guest.remove_nic(nic.id, timeout=UNPLUG_TIMEOUT)).state == "removed"
            await vm.wait_nic_gone(mac)
    assert taps(lab.hv) == {}


async def test_refusals_change_nothing(vm: TestMachine, lab: Lab) -> None:
    async with qmpnet.connect(str(vm.qmp_path), name=vm.name, settings=lab.settings()) as guest:
        before = {n.id for n in await guest.list_nics()}
        network_before = await hmp(vm.workdir, "info network")
        with pytest.raises(InvalidRequest) as above:
            await guest.add_nic({"id": "big", "mtu": BRIDGE_MTU + 1, "backend": {"type": "bridge", "bridge": "br-m"}})
        assert above.value.field == "nic.mtu"
        assert "larger than the MTU of bridge br-m (1400)" in above.value.message
        with pytest.raises(InvalidRequest) as no_tap:
            await guest.add_nic({"id": "usr", "mtu": 1400, "backend": {"type": "user"}})
        assert no_tap.value.field == "nic.mtu"
        assert {n.id for n in await guest.list_nics()} == before
        assert taps(lab.hv) == {}
        assert await hmp(vm.workdir, "info network") == network_before  # no netdev either


async def test_the_cli_adds_with_mtu_changes_it_live_and_warns(vm: TestMachine, lab: Lab, tmp_path: Path) -> None:
    mac, e1000_mac = "52:54:00:3a:00:02", "52:54:00:3a:00:03"
    qmp = ["--qmp", str(vm.qmp_path), "--config", str(lab.write_config(tmp_path / "qmpnet.toml"))]
    rc, out, err = await cli("nic", "add", "--backend", "bridge", "--bridge", "br-n", "--mtu", "1400", "--mac", mac,
                             "--json", *qmp)  # fmt: skip
    assert rc == 0, err
    nic = json.loads(out)
    try:
        tap = nic["backend"]["options"]["tap"]
        assert (nic["warnings"], taps(lab.hv)) == ([], {tap: 1400})  # below br-n's 1500, as asked
        assert links(lab.hv)["br-n"]["mtu"] == 1500  # the kernel would have lowered it to its port's: put back
        iface = await vm.wait_nic(mac, SEE_TIMEOUT, driver="virtio_net", carrier=True)
        assert await guest_mtu(vm, iface) == 1400

        rc, out, err = await cli("nic", "set", nic["id"], "--mtu", "1300", "--json", *qmp)
        assert rc == 0, err
        [warning] = json.loads(out)["warnings"]
        assert "host_mtu is fixed when the device is added" in warning
        assert taps(lab.hv) == {tap: 1300}
        assert links(lab.hv)["br-n"]["mtu"] == 1500

        rc, out, err = await cli("nic", "set", nic["id"], "--mtu", "1500", *qmp)  # above the device's host_mtu
        assert rc == 1
        assert err.startswith("error: invalid_request: update.mtu: 1500 is above this NIC's host_mtu (1400)"), err
        assert taps(lab.hv) == {tap: 1300}

        rc, out, err = await cli("nic", "add", "--backend", "bridge", "--bridge", "br-n", "--mtu", "1501", *qmp)
        assert rc == 1
        assert "nic.mtu: 1501 is larger than the MTU of bridge br-n (1500)" in err
        assert taps(lab.hv) == {tap: 1300}

        rc, out, err = await cli("nic", "add", "--model", "e1000", "--backend", "bridge", "--bridge", "br-m",
                                 "--mac", e1000_mac, *qmp)  # fmt: skip
        assert rc == 0, err
        assert "warning: mtu: e1000 ignores host_mtu; the guest keeps MTU 1500 until it sets 1400" in out
        e1000 = await vm.wait_nic(e1000_mac, SEE_TIMEOUT, driver="e1000")
        assert await guest_mtu(vm, e1000) == 1500  # as the warning says
        rc, out, err = await cli("nic", "del", out.splitlines()[1].split()[0], "--timeout", str(UNPLUG_TIMEOUT), *qmp)
        assert rc == 0, err
        await vm.wait_nic_gone(e1000_mac)
    finally:
        rc, out, err = await cli("nic", "del", nic["id"], "--timeout", str(UNPLUG_TIMEOUT), *qmp)
    assert rc == 0, err
    await vm.wait_nic_gone(mac)
    assert taps(lab.hv) == {}
