"""The guest agent client against a real qemu-guest-agent, in the Debian 12 test guest (systemd, udev, networkd).

One Debian guest per machine type for the module (booted through the pytest plugin's :func:`boot`, ~15 s under
TCG). Each test removes what it adds and ends by waiting for the guest to no longer have the interface, so the next
test starts from a guest with no NIC at all. Every wait is ``wait_for`` (polling the agent with a deadline), never
a sleep. Run with ``-s`` to see the table of udev's names and the times to an interface and to an address.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio
from mqtt_fixtures import Qemu, scratch
from waiting import eventually

from qmpnet.adapters.qga import GuestAgent, find_agent_socket, guest_views, wait_for
from qmpnet.adapters.qmp import QmpMonitor
from qmpnet.errors import AgentUnavailable, NotVerified
from qmpnet.settings import QgaSettings, Settings
from qmpnet.testguest.plugin import BootedGuest, boot

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    import qmpnet
    from qmpnet.testguest import DebianImage

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

MODELS = ("virtio-net-pci", "e1000", "e1000e", "rtl8139")
#: slirp's DHCP answers at once; e1000's watchdog makes it the slowest (carrier after ~2 s, then DHCP).
ADDRESS_TIMEOUT = 30.0
CARRIER_TIMEOUT = 15.0
GONE_TIMEOUT = 20.0
#: Fine-grained polling for the measurements (the default poll_interval is 0.2 s).
QGA = QgaSettings(poll_interval=0.05)
#: What the guest saw, per machine and model, printed at the end of the module (pytest -s).
TABLE: list[dict[str, Any]] = []


@pytest.fixture(scope="module")
def table() -> Iterator[list[dict[str, Any]]]:
    yield TABLE
    if TABLE:
        print("\n\nDebian 12 guest (qemu-guest-agent), hot-added NICs as the guest saw them:")  # noqa: T201
        header = f"{'machine':<8} {'model':<15} {'ifname':<8} {'verified add (s)':>16}  address"
        print(header)  # noqa: T201
        for row in sorted(TABLE, key=lambda r: (r["machine"], r["model"])):
            line = f"{row['machine']:<8} {row['model']:<15} {row['ifname']:<8} {row['to_address']:>16.2f}"
            print(f"{line}  {row['address']}")  # noqa: T201


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["pc", "q35"])
async def vm(request: pytest.FixtureRequest, qmpnet_debian_image: DebianImage) -> AsyncIterator[BootedGuest]:
    async with boot(machine=request.param, flavour="debian", image=qmpnet_debian_image, root_ports=4) as guest:
        yield guest


@pytest_asyncio.fixture(loop_scope="module")
async def agent(vm: BootedGuest) -> AsyncIterator[GuestAgent]:
    assert vm.qga_path is not None
    async with GuestAgent.connect(vm.qga_path, QGA) as connected:
        assert await connected.interfaces() == [], "a NIC left over from an earlier test"
        yield connected


@pytest_asyncio.fixture(loop_scope="module")
async def guest(vm: BootedGuest) -> AsyncIterator[qmpnet.Guest]:
    async with vm.connect() as connected:
        try:
            yield connected
        finally:
            # A test that failed half-way leaves its NIC: remove it so the next test starts from a clean guest.
            for nic in await connected.list_nics():
                await connected.remove_nic(nic.id, timeout=GONE_TIMEOUT)


async def run(agent: GuestAgent, *argv: str) -> str:
    """A command in the guest through the test's own agent connection (QEMU serves one client at a time)."""
    done = await agent.exec(argv, timeout=30)
    assert done.ok, done
    return done.stdout


async def ip_addr(agent: GuestAgent) -> list[dict[str, Any]]:
    """``ip -j addr`` in the guest: the kernel's own view, to check the agent's against."""
    entries: list[dict[str, Any]] = json.loads(await run(agent, "ip", "-j", "addr", "show"))
    return [entry for entry in entries if entry["ifname"] != "lo"]


async def test_the_agent_reports_what_the_kernel_has(agent: GuestAgent, guest: qmpnet.Guest) -> None:
    nic = await guest.add_nic({"model": "virtio", "mac": "52:54:00:51:00:01"})
    assert nic.mac is not None
    view = await wait_for(agent, nic.mac, "address", timeout=ADDRESS_TIMEOUT)
    assert view is not None
    assert "10.0.2.15/24" in view.addresses
    assert (view.carrier, view.operstate) == (True, "up")

    kernel = await ip_addr(agent)
    assert [(k["ifname"], k["address"]) for k in kernel] == [(view.ifname, nic.mac)]
    kernel_addresses = {f"{a['local']}/{a['prefixlen']}" for a in kernel[0]["addr_info"]}
    seen = await agent.interfaces()
    assert [v.ifname for v in seen] == [view.ifname], "exactly one interface besides lo"
    assert set(seen[0].addresses) == kernel_addresses

    # Administratively down: the kernel refuses to read carrier, which the view shows as None.
    await run(agent, "ip", "link", "set", view.ifname, "down")
    down = await agent.interface_for(nic.mac)
    assert down is not None
    assert (down.carrier, down.operstate) == (None, "down")
    await run(agent, "ip", "link", "set", view.ifname, "up")
    assert await wait_for(agent, nic.mac, "carrier_up", timeout=CARRIER_TIMEOUT) is not None

    assert (await guest.remove_nic(nic.id, timeout=GONE_TIMEOUT)).state == "removed"
    assert await wait_for(agent, nic.mac, "absent", timeout=GONE_TIMEOUT) is None
    assert await agent.interfaces() == []


@pytest.mark.parametrize("model", MODELS)
async def test_each_model_verified_gets_an_address_follows_its_link_and_goes_away(
    vm: BootedGuest, guest: qmpnet.Guest, table: list[dict[str, Any]], model: str
) -> None:
    # verify: the answer comes only once the guest's agent shows the interface (and, "address", an address).
    started = time.monotonic()
    nic = await guest.add_nic({"model": model}, verify="address")
    to_address = time.monotonic() - started
    assert nic.guest is not None
    assert nic.guest.ifname.startswith("en"), "udev's predictable name, not the kernel's eth0"
    ipv4 = [a for a in nic.guest.addresses if a.startswith("10.0.2.")]
    assert ipv4 == ["10.0.2.15/24"]
    listed = {n.id: n for n in await guest.list_nics()}
    assert listed[nic.id].guest is not None
    assert listed[nic.id].guest.ifname == nic.guest.ifname  # type: ignore[union-attr]
    table.append(
        {
            "machine": vm.machine.config.machine,
            "model": model,
            "ifname": nic.guest.ifname,
            "to_address": to_address,
            "address": ipv4[0],
        }
    )

    down = await guest.set_link(nic.id, up=False, verify=True)
    assert down.guest is not None
    assert down.guest.carrier is False
    up = await guest.set_link(nic.id, up=True, verify=True)
    assert up.guest is not None
    assert up.guest.carrier is True

    assert (await guest.remove_nic(nic.id, timeout=GONE_TIMEOUT, verify=True)).state == "removed"
    assert {n.id for n in await guest.list_nics()} == set()


async def test_verify_fails_for_real_and_the_nic_is_rolled_back(vm: BootedGuest) -> None:
    # A NIC added with its link down never gets a DHCP lease: "address" is not verified, and the add is undone.
    quick = Settings(qga=QgaSettings(verify_timeout=1.5, poll_interval=0.1))
    async with vm.connect(settings=quick) as guest:
        with pytest.raises(NotVerified) as caught:
            await guest.add_nic({"model": "virtio", "id": "nover", "link": "down"}, verify="address")
        assert caught.value.code == "not_verified"
        assert caught.value.field == "verify"
        assert "did not show an interface with an address" in caught.value.message
        assert {n.id for n in await guest.list_nics()} == set()  # rolled back: nothing left in QEMU
        assert guest.record.nics == {}
        assert guest.record.desired is None or all(s.id != "nover" for s in guest.record.desired.nics)
    assert vm.qga_path is not None
    async with GuestAgent.connect(vm.qga_path, QGA) as agent:
        assert await wait_for(agent, "52:54:00:00:00:00", "absent", timeout=1) is None
        assert await agent.interfaces() == []  # and nothing left in the guest


async def test_wait_for_fails_for_real(vm: BootedGuest, agent: GuestAgent, guest: qmpnet.Guest) -> None:
    # A NIC whose link is down never gets a DHCP lease: "address" cannot be verified, whatever the timeout.
    nic = await guest.add_nic({"model": "virtio", "link": "down"})
    assert nic.mac is not None
    present = await wait_for(agent, nic.mac, "present", timeout=ADDRESS_TIMEOUT)
    assert present is not None
    # Until the guest's network manager sets the interface up, its carrier cannot be read ("carrier=?"): wait for
    # the state this test is about, an interface that is up and has no carrier.
    assert await wait_for(agent, nic.mac, "carrier_down", timeout=CARRIER_TIMEOUT) is not None
    with pytest.raises(NotVerified) as caught:
        await wait_for(agent, nic.mac, "address", timeout=1.0)
    assert caught.value.code == "not_verified"
    assert f"{present.ifname} carrier=0" in caught.value.message
    # A tiny timeout: not even one look at the guest fits in it.
    with pytest.raises(NotVerified, match="nothing yet"):
        await wait_for(agent, nic.mac, "absent", timeout=0.001)
    # The connection is still in step after the cut-short look.
    assert await wait_for(agent, nic.mac, "present", timeout=CARRIER_TIMEOUT) is not None

    assert (await guest.remove_nic(nic.id, timeout=GONE_TIMEOUT)).state == "removed"
    assert await wait_for(agent, nic.mac, "absent", timeout=GONE_TIMEOUT) is None


async def test_the_socket_is_found_through_qmp(vm: BootedGuest) -> None:
    monitor = await QmpMonitor.connect(str(vm.qmp_path), name=vm.name, connect_timeout=5, command_timeout=5)
    try:
        assert await find_agent_socket(monitor) == vm.qga_path
    finally:
        await monitor.close()


async def test_one_client_at_a_time_and_no_lasting_harm(vm: BootedGuest, agent: GuestAgent) -> None:
    # `agent` holds QEMU's one connection: a second client gets no answer, which is "unavailable", not a hang.
    assert vm.qga_path is not None
    quick = QgaSettings(connect_timeout=1.0)
    with pytest.raises(AgentUnavailable, match="another client"):
        await GuestAgent.open(vm.qga_path, quick)
    assert await guest_views(vm.qga_path, quick) is None
    await agent.close()
    # QEMU first accepts the abandoned connection waiting in its backlog and finds it closed; then the port is free.
    qga_path = vm.qga_path
    views = await eventually(lambda: guest_views(qga_path, quick), timeout=15, interval=0, what="a free agent port")
    assert views == {}


async def test_no_agent_socket_and_no_agent() -> None:
    with scratch("qmpnet-noqga-") as work:
        qga = work / "vm.qga"
        # QEMU serves the port's socket, but no guest runs (-S): connect works, guest-sync gets no answer.
        served = [
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,id=qga0,path={qga},server=on,wait=off",
            "-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
        ]  # fmt: skip
        qemu = Qemu(work / "vm.qmp", extra=served).start()
        bare = Qemu(work / "bare.qmp").start()
        try:
            monitor = await QmpMonitor.connect(str(qemu.qmp), name="vm", connect_timeout=5, command_timeout=5)
            try:
                assert await find_agent_socket(monitor) == qga
            finally:
                await monitor.close()
            with pytest.raises(AgentUnavailable, match="did not answer guest-sync"):
                await GuestAgent.open(qga, QgaSettings(connect_timeout=0.5))
            assert await guest_views(qga, QgaSettings(connect_timeout=0.5)) is None

            monitor = await QmpMonitor.connect(str(bare.qmp), name="bare", connect_timeout=5, command_timeout=5)
            try:
                assert await find_agent_socket(monitor) is None
            finally:
                await monitor.close()
        finally:
            qemu.stop()
            bare.stop()
