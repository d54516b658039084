"""Direct assignment, vhost-net and macvtap for real: the lab host's kernel, and a guest booted inside it (issue 15).

These tests run inside the lab host (qmpnet.testguest.lab; the ``lab`` marker): a Debian kernel with an emulated
IOMMU, whose assignable functions are emulated e1000e NICs, each alone in its IOMMU group and bound to e1000e
(``QMPNET_LAB_FUNCTIONS``), and an e1000 pair that shares a group (``QMPNET_LAB_SHARED_GROUP``). One busybox guest
(q35, root ports) is booted for the module: under nested TCG that costs about a minute and a half.

Each test hands a function over and checks three places: sysfs in the lab (the function's driver), QEMU (a
``vfio-pci`` device with that host address, read over a second monitor) and the guest (the function appears with
its own driver, e1000e, and its MAC). Giving it back must restore the original driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pytest
import pytest_asyncio
from aux_qmp import aux_args, aux_monitor
from netns_tools import ip

import qmpnet
from qmpnet.adapters.hostnet import HostnetSettings
from qmpnet.errors import Conflict, InvalidRequest, NotFound, QmpnetError, Unsupported
from qmpnet.settings import Settings
from qmpnet.testguest import TestMachine, find_mac
from qmpnet.testguest.probe import wait_online
from qmpnet.testguest.services import Mosquitto, Serve

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from qmpnet.testguest import GuestImage

pytestmark = [
    pytest.mark.integration,
    pytest.mark.lab,
    pytest.mark.qmpnet_lab,
    pytest.mark.asyncio(loop_scope="module"),
]

SYSFS = Path("/sys/bus/pci/devices")
SEE_TIMEOUT = 60.0
#: Under nested TCG a guest acks a PCIe unplug in tens of seconds (its hot-plug driver's 5 s wait included).
UNPLUG_TIMEOUT = "180"
CLI_TIMEOUT = 300.0
CONTROLLER = "lab"
FIELD = "nic.backend.host"


def functions() -> list[str]:
    return os.environ.get("QMPNET_LAB_FUNCTIONS", "").split()


def shared_group() -> list[str]:
    return os.environ.get("QMPNET_LAB_SHARED_GROUP", "").split()


def driver(address: str) -> str | None:
    link = SYSFS / address / "driver"
    return link.readlink().name if link.is_symlink() else None


def mac_of(address: str) -> str:
    (net,) = (SYSFS / address / "net").iterdir()
    return (net / "address").read_text().strip()


async def wait_driver(address: str, wanted: str | None, timeout: float = SEE_TIMEOUT) -> None:
    """Poll sysfs (it sends no event we could wait on) until ``address`` is bound to ``wanted``."""
    async with asyncio.timeout(timeout):
        while driver(address) != wanted:  # noqa: ASYNC110 - polling sysfs with a deadline
            await asyncio.sleep(0.2)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vm(guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TestMachine]:
    assert len(functions()) >= 2, f"QMPNET_LAB_FUNCTIONS={os.environ.get('QMPNET_LAB_FUNCTIONS')!r}"
    workdir = tmp_path_factory.mktemp("lab-vfio")
    async with TestMachine(
        guest_image, name="lab-vfio", machine="q35", root_ports=3, workdir=workdir, extra_args=aux_args(workdir)
    ) as machine:
        yield machine


@pytest.fixture
def function() -> str:
    """The first assignable function, checked to be on its own driver (e1000e) first."""
    first = functions()[0]
    assert driver(first) == "e1000e"
    return first


async def vfio_devices(vm: TestMachine) -> dict[str, str]:
    """QEMU's vfio-pci devices, id -> host address (read over the second monitor, behind qmpnet's back)."""
    found: dict[str, str] = {}
    async with aux_monitor(vm.workdir) as aux:
        peripherals = cast("list[dict[str, str]]", await aux.execute("qom-list", {"path": "/machine/peripheral"}))
        for entry in peripherals:
            path = f"/machine/peripheral/{entry['name']}"
            if entry["type"].startswith("child<vfio-pci"):
                found[entry["name"]] = str(await aux.execute("qom-get", {"path": path, "property": "host"}))
    return found


async def guest_sees(vm: TestMachine, mac: str, *, present: bool) -> None:
    if present:
        seen = await vm.agent.wait_for(lambda interfaces: find_mac(interfaces, mac), timeout=SEE_TIMEOUT)
        assert seen.driver == "e1000e", seen
    else:
        await vm.agent.wait_for(lambda interfaces: find_mac(interfaces, mac) is None or None, timeout=SEE_TIMEOUT)


async def cli(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpnet", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    async with asyncio.timeout(CLI_TIMEOUT):
        out, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode()


async def assigned_and_seen(vm: TestMachine, function: str, nic_id: str, mac: str) -> None:
    assert driver(function) == "vfio-pci"
    assert (await vfio_devices(vm)).get(nic_id) == function
    await guest_sees(vm, mac, present=True)


async def given_back(vm: TestMachine, function: str, mac: str) -> None:
    await wait_driver(function, "e1000e")
    assert await vfio_devices(vm) == {}
    await guest_sees(vm, mac, present=False)


# ------------------------------------------------------------------------------------------------ CLI


async def test_cli_rebinds_assigns_and_gives_the_function_back(vm: TestMachine, function: str, tmp_path: Path) -> None:
    mac = mac_of(function)
    where = ["--qmp", str(vm.qmp_path), "--state-dir", str(tmp_path / "state")]
    rc, out = await cli("nic", "add", *where, "--backend", "vfio", "--host", function, "--rebind", "--id", "host0",
                        "--json")  # fmt: skip
    assert rc == 0, out
    nic = json.loads(out)
    assert (nic["id"], nic["model"], nic["backend"]["type"]) == ("host0", "vfio-pci", "vfio")
    try:
        await assigned_and_seen(vm, function, "host0", mac)
        print(f"\nassigned {function} ({mac}) to the guest at {nic['pci']}")  # noqa: T201 - for the record
    finally:
        rc, out = await cli("nic", "del", *where, "host0", "--timeout", UNPLUG_TIMEOUT)
    assert rc == 0, out
    await given_back(vm, function, mac)


async def test_a_qemu_killed_for_good_has_its_function_given_back_by_the_next_cli_call(
    function: str, tmp_path: Path
) -> None:
    """QEMU's death leaves the function on vfio-pci; the next qmpnet call that finds that QEMU gone gives it back."""
    (workdir := tmp_path / "gone").mkdir()
    state = ["--state-dir", str(tmp_path / "state")]
    async with TestMachine(None, boot=False, name="gone", machine="q35", root_ports=1, workdir=workdir) as gone:
        where = ["--qmp", str(gone.qmp_path), *state]
        rc, out = await cli("nic", "add", *where, "--backend", "vfio", "--host", function, "--rebind", "--id", "g0")
        assert rc == 0, out
        assert driver(function) == "vfio-pci"
        gone.kill()
        await gone.wait_exit(30)
    assert driver(function) == "vfio-pci"  # nothing gave it back yet: QEMU does not rebind on its way out
    rc, out = await cli("nic", "list", *where)
    assert rc != 0, out
    assert "its QEMU is gone: qmpnet gave back the host side of NIC(s) g0" in out
    assert driver(function) == "e1000e"


# ------------------------------------------------------------------------------------------------ MQTT


async def test_mqtt_serve_assigns_and_gives_the_function_back(vm: TestMachine, function: str, tmp_path: Path) -> None:
    mac = mac_of(function)
    broker = Mosquitto(tmp_path).start()
    serve = Serve(tmp_path, broker.url, CONTROLLER, {vm.name: vm.qmp_path})
    try:
        serve.start()
        await wait_online(serve, broker.url, guests_connected=[vm.name], timeout=CLI_TIMEOUT)
        where = ["--broker", broker.url, "--controller", CONTROLLER, "--guest", vm.name]
        rc, out = await cli("nic", "add", *where, "--backend", "vfio", "--host", function, "--rebind", "--id",
                            "host1", "--json")  # fmt: skip
        assert rc == 0, f"{out}\n{serve.describe()}"
        await assigned_and_seen(vm, function, "host1", mac)
        rc, out = await cli("nic", "del", *where, "host1", "--timeout", UNPLUG_TIMEOUT, "--json")
        assert rc == 0, f"{out}\n{serve.describe()}"
        await given_back(vm, function, mac)
    finally:
        serve.stop()
        broker.stop()


# ------------------------------------------------------------------------------------------------ refusals


def refusals() -> list[tuple[str, Callable[[], dict[str, object]], type[QmpnetError], str]]:
    return [
        ("bound-without-rebind", lambda: {"backend": {"type": "vfio", "host": functions()[1]}},
         InvalidRequest, "rebind"),
        ("group-shared", lambda: {"backend": {"type": "vfio", "host": shared_group()[0], "rebind": True}},
         Unsupported, shared_group()[1] if len(shared_group()) > 1 else "group"),
        ("no-such-address", lambda: {"backend": {"type": "vfio", "host": "0000:0f:1f.7", "rebind": True}},
         NotFound, "0000:0f:1f.7"),
    ]  # fmt: skip


async def host_state() -> dict[str, str | None]:
    return {address: driver(address) for address in (*functions(), *shared_group())}


@pytest.mark.parametrize("case", range(3), ids=["bound-without-rebind", "group-shared", "no-such-address"])
async def test_refusals_name_the_field_and_change_nothing(vm: TestMachine, case: int) -> None:
    _, spec, error, says = refusals()[case]
    before = (await host_state(), await vfio_devices(vm))
    async with qmpnet.connect(str(vm.qmp_path), name=vm.name) as guest:
        nics = await guest.list_nics()
        with pytest.raises(error) as caught:
            await guest.add_nic(spec())
        assert await guest.list_nics() == nics
    assert (caught.value.code, caught.value.field) == (error.code, FIELD)
    assert says in caught.value.message, caught.value.message
    assert (await host_state(), await vfio_devices(vm)) == before


async def test_the_same_function_twice_is_a_conflict(vm: TestMachine, function: str) -> None:
    mac = mac_of(function)
    async with qmpnet.connect(str(vm.qmp_path), name=vm.name) as guest:
        nic = await guest.add_nic({"id": "host2", "backend": {"type": "vfio", "host": function, "rebind": True}})
        try:
            await assigned_and_seen(vm, function, "host2", mac)
            before = (await host_state(), await vfio_devices(vm))
            with pytest.raises(Conflict) as caught:
                await guest.add_nic({"backend": {"type": "vfio", "host": function, "rebind": True}})
            assert caught.value.field == FIELD
            assert (await host_state(), await vfio_devices(vm)) == before
        finally:
            assert (await guest.remove_nic(nic.id, timeout=float(UNPLUG_TIMEOUT))).state == "removed"
    await given_back(vm, function, mac)


# ------------------------------------------------------------------------------------------------ SIGKILL


async def test_serve_killed_right_after_the_rebind_never_strands_the_function(
    vm: TestMachine, function: str, tmp_path: Path
) -> None:
    """SIGKILL as soon as the function is on vfio-pci; the next start finishes the assignment or gives it back."""
    mac = mac_of(function)
    broker = Mosquitto(tmp_path).start()
    serve = Serve(tmp_path, broker.url, CONTROLLER, {vm.name: vm.qmp_path})
    where = ["--broker", broker.url, "--controller", CONTROLLER, "--guest", vm.name]
    try:
        serve.start()
        await wait_online(serve, broker.url, guests_connected=[vm.name], timeout=CLI_TIMEOUT)
        request = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "qmpnet", "nic", "add", *where, "--backend", "vfio", "--host", function, "--rebind",
            "--id", "host3", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            await wait_driver(function, "vfio-pci", timeout=CLI_TIMEOUT)
            serve.signal(signal.SIGKILL)
            serve.wait(10)
        finally:
            with contextlib.suppress(ProcessLookupError):
                request.kill()
            await request.wait()
        serve.start()
        await wait_online(serve, broker.url, guests_connected=[vm.name], timeout=CLI_TIMEOUT)
        rc, out = await cli("nic", "list", *where, "--json")
        assert rc == 0, out
        listed = {n["id"]: n for n in json.loads(out)["nics"]}
        outcome = "finished" if "host3" in listed else "gave back"
        if "host3" in listed:
            assert listed["host3"]["state"] == "active", listed
            await assigned_and_seen(vm, function, "host3", mac)
            rc, out = await cli("nic", "del", *where, "host3", "--timeout", UNPLUG_TIMEOUT)
            assert rc == 0, out
        await given_back(vm, function, mac)
        print(f"\nSIGKILL right after the rebind: the next start {outcome} the assignment")  # noqa: T201
    finally:
        serve.stop()
        broker.stop()


# ------------------------------------------------------------------------------------------------ vhost-net


def vhost_fds(pid: int) -> int:
    """How many of QEMU's open files are /dev/vhost-net."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            count += fd.readlink() == Path("/dev/vhost-net")
    return count


async def test_a_bridge_nic_uses_vhost_net_and_carries_traffic(vm: TestMachine, tmp_path: Path) -> None:
    """Where /dev/vhost-net exists (the lab, not this machine), a bridge backend's tap is served by vhost-net."""
    assert Path("/dev/vhost-net").exists()  # noqa: ASYNC240 - one stat
    assert vm.pid is not None
    bridge, host_ip, guest_ip, mac = "qlabvh0", "10.77.9.1", "10.77.9.2", "52:54:00:1b:00:01"
    ip("link", "add", bridge, "type", "bridge")
    try:
        ip("addr", "add", f"{host_ip}/24", "dev", bridge)
        ip("link", "set", bridge, "up")
        settings = Settings(hostnet=HostnetSettings(state_dir=tmp_path / "hostnet"))
        before = vhost_fds(vm.pid)
        async with qmpnet.connect(str(vm.qmp_path), name=vm.name, settings=settings) as guest:
            nic = await guest.add_nic({"model": "virtio", "mac": mac, "backend": {"type": "bridge", "bridge": bridge}})
            try:
                assert vhost_fds(vm.pid) == before + 1  # QEMU opened /dev/vhost-net for this tap
                assert nic.backend is not None
                assert nic.backend.options.get("vhost") == "on", nic.backend  # the NIC's backend view says so
                listed = {n.id: n for n in await guest.list_nics()}[nic.id]
                assert listed.backend is not None
                assert listed.backend.options.get("vhost") == "on", listed.backend
                iface = await vm.wait_nic(mac, SEE_TIMEOUT, driver="virtio_net", carrier=True)
                (await vm.agent.run(f"ip addr add {guest_ip}/24 dev {iface.name}")).check()
                done = await vm.agent.run(f"ping -c 3 -W 10 {host_ip}", timeout=60)
                assert done.rc == 0, done.output
                print(f"\nvhost-net: {done.output.strip().splitlines()[-1]}")  # noqa: T201 - for the record
            finally:
                assert (await guest.remove_nic(nic.id, timeout=float(UNPLUG_TIMEOUT))).state == "removed"
        assert vhost_fds(vm.pid) == before
    finally:
        ip("link", "del", bridge)


# ------------------------------------------------------------------------------------------------ macvtap


async def test_a_macvtap_nic_reaches_a_namespace_on_its_parent_link(vm: TestMachine, tmp_path: Path) -> None:
    """A macvtap in bridge mode on a veth: the guest reaches the namespace holding the veth's peer (a macvtap
    talks to the other side of its parent, not to the lab host), and ``nic del`` removes the macvtap link."""
    parent, peer, netns = "qlabmv0", "qlabmv1", "qlabmvns"
    far_ip, guest_ip, mac = "10.77.10.1", "10.77.10.2", "52:54:00:1b:00:02"
    ip("netns", "add", netns)
    try:
        ip("link", "add", parent, "type", "veth", "peer", "name", peer, "netns", netns)
        ip("link", "set", parent, "up")
        ip("-n", netns, "addr", "add", f"{far_ip}/24", "dev", peer)
        ip("-n", netns, "link", "set", peer, "up")
        settings = Settings(hostnet=HostnetSettings(state_dir=tmp_path / "hostnet"))
        async with qmpnet.connect(str(vm.qmp_path), name=vm.name, settings=settings) as guest:
            nic = await guest.add_nic(
                {"model": "virtio", "mac": mac, "backend": {"type": "macvtap", "link": parent, "mode": "bridge"}}
            )
            assert nic.backend is not None
            macvtap = nic.backend.options["tap"]
            try:
                assert nic.backend.type == "macvtap", nic.backend
                shown = json.loads(ip("-j", "-d", "link", "show", "dev", macvtap))[0]
                assert (shown["linkinfo"]["info_kind"], shown["address"], shown["link"]) == ("macvtap", mac, parent)
                iface = await vm.wait_nic(mac, SEE_TIMEOUT, driver="virtio_net", carrier=True)
                (await vm.agent.run(f"ip addr add {guest_ip}/24 dev {iface.name}")).check()
                done = await vm.agent.run(f"ping -c 3 -W 10 {far_ip}", timeout=60)
                assert done.rc == 0, done.output
                print(f"\nmacvtap: {done.output.strip().splitlines()[-1]}")  # noqa: T201 - for the record
            finally:
                assert (await guest.remove_nic(nic.id, timeout=float(UNPLUG_TIMEOUT))).state == "removed"
        assert macvtap not in {link["ifname"] for link in json.loads(ip("-j", "link", "show"))}
    finally:
        ip("netns", "del", netns)  # takes the peer, and with it the veth's other end, the parent
