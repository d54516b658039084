"""A real QEMU takes qmpnet's tap fds over QMP, and answers ``device_add vfio-pci`` for a missing device cleanly.

The tap tests run QEMU (``-S``, no guest OS) inside a namespace the test creates (``hv-<random>`` with bridge
``br0``) through ``ip netns exec``, and walk the exact QMP sequence the guest lane will use: ``getfd`` with the fd
attached by SCM_RIGHTS, ``netdev_add {"type": "tap", "fd": name}``, and the undo paths (``closefd`` when
``netdev_add`` failed; ``netdev_del`` once it succeeded). A failing test prints QEMU's command line and stderr.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import needs
import pytest
from netns_tools import bridged_namespace, ip, link_names
from qemu.qmp import ConnectError, ExecuteError, QMPClient
from waiting import eventually

from qmpnet.adapters.hostnet import (
    check_existing_tap,
    check_vfio,
    create_tap,
    delete_tap,
    list_taps,
    sweep_taps,
    vhost_usable,
)
from qmpnet.adapters.hostnet.macvtap import create_macvtap
from qmpnet.errors import NotFound, QmpnetError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

QEMU = "qemu-system-x86_64"

pytestmark = [
    pytest.mark.integration,
    needs.root("create network namespaces"),
    needs.tool(QEMU, "qemu-system-x86"),
    needs.tool("ip", "iproute2"),
]


@pytest.fixture
def hv() -> Iterator[str]:
    with bridged_namespace() as name:
        yield name


@dataclass
class Qemu:
    argv: list[str]
    process: subprocess.Popen[bytes]
    stderr: Path
    qmp: QMPClient

    def report(self) -> str:
        return f"QEMU command line: {' '.join(self.argv)}\nQEMU stderr:\n{self.stderr.read_text()}"

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return await self.qmp.execute(command, arguments)

    async def pass_fd(self, fd: int, name: str) -> None:
        """``getfd`` with ``fd`` attached: what the QMP adapter will do for each tap queue."""
        self.qmp.send_fd_scm(fd)
        await self.qmp.execute("getfd", {"fdname": name})


async def launch(tmp_path: Path, netns: str | None) -> AsyncIterator[Qemu]:
    sock = tmp_path / "qmp.sock"
    argv = [QEMU, "-S", "-nodefaults", "-display", "none", "-machine", "pc", "-m", "64",
            "-qmp", f"unix:{sock},server=on,wait=off"]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    stderr = tmp_path / "qemu.stderr"
    with stderr.open("wb") as err:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)  # noqa: ASYNC220 - returns at once
    qmp = QMPClient("hostnet-test")
    qemu = Qemu(argv, process, stderr, qmp)
    try:

        async def connected() -> bool:
            assert process.poll() is None, "QEMU exited"
            if not sock.exists():  # the socket file appears at bind(), a moment before QEMU listens
                return False
            await qmp.connect(str(sock))
            return True

        await eventually(connected, timeout=5, interval=0.025, retry=(ConnectError,), what="QEMU's QMP socket")
        yield qemu
    finally:
        with contextlib.suppress(Exception):
            await qmp.disconnect()
        process.kill()
        process.wait(10)
        print(qemu.report())  # noqa: T201 - pytest shows captured output only when a test fails


@pytest.fixture
async def qemu_in_hv(tmp_path: Path, hv: str) -> AsyncIterator[Qemu]:
    async for qemu in launch(tmp_path, hv):
        yield qemu


@pytest.fixture
async def qemu(tmp_path: Path) -> AsyncIterator[Qemu]:
    async for machine in launch(tmp_path, None):
        yield machine


async def wait_gone(netns: str, name: str) -> bool:
    with contextlib.suppress(TimeoutError):
        return await eventually(lambda: name not in link_names(netns), timeout=5, interval=0.02, what=f"{name} gone")
    return False


async def test_qemu_takes_the_tap_fd_and_then_owns_the_tap(hv: str, qemu_in_hv: Qemu) -> None:
    tap = await create_tap("br0", netns=hv, owner="vm1/nic0")
    with tap:  # closes our copy on exit: QEMU holds its own after getfd
        await qemu_in_hv.pass_fd(tap.fds[0], "nic0.fd0")
    assert not tap.fds
    await qemu_in_hv.execute("netdev_add", {"type": "tap", "id": "nic0.net", "fd": "nic0.fd0",
                                            "vhost": vhost_usable()})
    [info] = await list_taps(netns=hv)
    assert (info.name, info.bridge, info.attached, info.up) == (tap.name, "br0", True, True)
    network = await qemu_in_hv.execute("human-monitor-command", {"command-line": "info network"})
    assert "nic0.net: index=0,type=tap,fd=" in network

    # The guest lane's removal: after DEVICE_DELETED, netdev_del; QEMU closes the fd and the tap goes with it.
    await qemu_in_hv.execute("netdev_del", {"id": "nic0.net"})
    assert await wait_gone(hv, tap.name)
    assert await delete_tap(tap.name, netns=hv) is False
    assert link_names(hv) == {"lo", "br0"}


async def test_failed_netdev_add_is_undone_with_closefd(hv: str, qemu_in_hv: Qemu) -> None:
    tap = await create_tap("br0", netns=hv)
    try:
        await qemu_in_hv.pass_fd(tap.fds[0], "nic1.fd0")
        with pytest.raises(ExecuteError, match="invalid with fd="):
            await qemu_in_hv.execute("netdev_add", {"type": "tap", "id": "nic1.net", "fd": "nic1.fd0", "queues": 2})
        await qemu_in_hv.execute("closefd", {"fdname": "nic1.fd0"})  # QEMU still held it: give it back
    finally:
        tap.close_fds()
    await delete_tap(tap.name, netns=hv)
    assert await wait_gone(hv, tap.name)
    assert link_names(hv) == {"lo", "br0"}


async def test_failed_device_add_is_undone_with_netdev_del(hv: str, qemu_in_hv: Qemu) -> None:
    tap = await create_tap("br0", netns=hv)
    try:
        await qemu_in_hv.pass_fd(tap.fds[0], "nic2.fd0")
    finally:
        tap.close_fds()
    await qemu_in_hv.execute("netdev_add", {"type": "tap", "id": "nic2.net", "fd": "nic2.fd0"})
    with pytest.raises(ExecuteError, match="nope"):
        await qemu_in_hv.execute("device_add", {"driver": "virtio-net-pci", "id": "nic2", "netdev": "nic2.net",
                                                "bus": "nope"})
    # netdev_add consumed the named fd: closefd no longer applies, netdev_del is the undo.
    with pytest.raises(ExecuteError):
        await qemu_in_hv.execute("closefd", {"fdname": "nic2.fd0"})
    await qemu_in_hv.execute("netdev_del", {"id": "nic2.net"})
    assert await wait_gone(hv, tap.name)
    assert await delete_tap(tap.name, netns=hv) is False


async def test_multiqueue_tap_goes_to_qemu_as_fds(hv: str, qemu_in_hv: Qemu) -> None:
    tap = await create_tap("br0", netns=hv, queues=2)
    try:
        for index, fd in enumerate(tap.fds):
            await qemu_in_hv.pass_fd(fd, f"mq0.fd{index}")
    finally:
        tap.close_fds()
    await qemu_in_hv.execute("netdev_add", {"type": "tap", "id": "mq0.net", "fds": "mq0.fd0:mq0.fd1",
                                            "vhost": vhost_usable()})
    await qemu_in_hv.execute("device_add", {"driver": "virtio-net-pci", "id": "mq0", "netdev": "mq0.net",
                                            "mq": True, "vectors": 6, "bus": "pci.0"})
    shown = json.loads(ip("-n", hv, "-j", "-d", "link", "show", "dev", tap.name))[0]
    queues = shown["linkinfo"]["info_data"]
    # QEMU holds both; until a guest driver turns multiqueue on, it keeps the second one detached.
    assert queues["numqueues"] + queues["numdisabled"] == 2
    assert shown["master"] == "br0"
    qemu_in_hv.process.kill()
    qemu_in_hv.process.wait(10)
    assert await wait_gone(hv, tap.name)  # QEMU gone: the tap went with it


async def test_an_existing_tap_is_opened_by_name(hv: str, qemu_in_hv: Qemu) -> None:
    ip("-n", hv, "tuntap", "add", "mode", "tap", "name", "mytap")
    await check_existing_tap("mytap", netns=hv)
    await qemu_in_hv.execute("netdev_add", {"type": "tap", "id": "t0.net", "ifname": "mytap", "script": "no",
                                            "downscript": "no"})
    with pytest.raises(QmpnetError, match="already held"):
        await check_existing_tap("mytap", netns=hv)
    await qemu_in_hv.execute("netdev_del", {"id": "t0.net"})
    assert (await check_existing_tap("mytap", netns=hv)).attached is False
    assert await delete_tap("mytap", netns=hv) is False  # not qmpnet's: never deleted
    assert "mytap" in link_names(hv)


async def test_device_add_vfio_for_a_missing_device_is_a_clean_error(qemu: Qemu) -> None:
    before = await qemu.execute("query-pci")
    with pytest.raises(ExecuteError) as caught:
        await qemu.execute("device_add", {"driver": "vfio-pci", "host": "0000:99:00.0", "id": "hostnic0"})
    assert caught.value.error_class == "GenericError"
    assert "0000:99:00.0" in str(caught.value)
    print("QEMU says:", caught.value)  # noqa: T201 - shown with -s, for the docs
    peripherals = await qemu.execute("qom-list", {"path": "/machine/peripheral"})
    assert "hostnic0" not in [item["name"] for item in peripherals]
    assert await qemu.execute("query-pci") == before
    # And qmpnet's own check refuses it before QEMU is asked.
    with pytest.raises(NotFound) as refused:
        check_vfio("0000:99:00.0")
    assert refused.value.field == "nic.backend.host"


def test_check_vfio_on_this_hosts_real_nics_gives_a_clear_answer() -> None:
    """Read-only: real network functions here have no IOMMU (or a host driver); the answer must name why."""
    devices = Path("/sys/bus/pci/devices")
    functions = list(devices.iterdir()) if devices.is_dir() else []
    nics = {d.name for d in functions if (d / "class").read_text().startswith("0x02")}
    ready = {d.name for d in functions if (d / "driver").resolve().name == "vfio-pci"}
    needs.require(bool(nics - ready), "needs a PCI network function that is not on vfio-pci")
    for address in sorted(nics - ready):
        with pytest.raises(QmpnetError) as caught:
            check_vfio(address)
        assert caught.value.field == "nic.backend.host"
        assert address in str(caught.value)
        print(f"check_vfio({address}):", caught.value)  # noqa: T201 - shown with -s, for the docs


# ------------------------------------------------------------------------------------------------ macvtap


async def test_a_macvtap_goes_to_qemu_as_fds_and_is_deleted_afterwards(hv: str, qemu_in_hv: Qemu) -> None:
    """The host side of a macvtap NIC: made on the parent with the guest's MAC and qmpnet's mark, its /dev/tapN fd
    taken by QEMU; unlike a tap it outlives ``netdev_del``, so the lane deletes it (or the sweep does)."""
    ip("-n", hv, "link", "add", "mvp0", "type", "veth", "peer", "name", "mvp1")
    mac = "52:54:00:4d:00:01"
    tap = await create_macvtap("mvp0", mode="vepa", mac=mac, netns=hv, owner="vm1/mv0", queues=2)
    try:
        for index, fd in enumerate(tap.fds):
            await qemu_in_hv.pass_fd(fd, f"mv0.fd{index}")
    finally:
        tap.close_fds()
    await qemu_in_hv.execute("netdev_add", {"type": "tap", "id": "mv0.net", "fds": "mv0.fd0:mv0.fd1"})
    shown = json.loads(ip("-n", hv, "-j", "-d", "link", "show", "dev", tap.name))[0]
    assert (shown["linkinfo"]["info_kind"], shown["linkinfo"]["info_data"]["mode"]) == ("macvtap", "vepa")
    assert (shown["address"], shown["ifalias"], shown["link"]) == (mac, "qmpnet:tap:vm1/mv0", "mvp0")
    assert [t.owner for t in await list_taps(netns=hv)] == ["vm1/mv0"]
    await qemu_in_hv.execute("netdev_del", {"id": "mv0.net"})
    assert tap.name in link_names(hv)  # a macvtap is a persistent link: QEMU's fds closing leaves it
    assert await delete_tap(tap.name, netns=hv) is True
    assert link_names(hv) == {"lo", "br0", "mvp0", "mvp1"}


async def test_a_stale_macvtap_is_swept_and_a_missing_parent_changes_nothing(hv: str) -> None:
    ip("-n", hv, "link", "add", "mvp0", "type", "veth", "peer", "name", "mvp1")
    tap = await create_macvtap("mvp0", mode="bridge", mac="52:54:00:4d:00:02", netns=hv, owner="vm1/mv1")
    tap.close_fds()  # a controller that died before QEMU took it: the link stays
    assert tap.name in link_names(hv)
    assert await sweep_taps([], netns=hv) == [tap.name]
    with pytest.raises(NotFound, match=r"nic\.backend\.link") as refused:
        await create_macvtap("nosuch0", mode="bridge", mac="52:54:00:4d:00:03", netns=hv)
    assert refused.value.field == "nic.backend.link"
    assert link_names(hv) == {"lo", "br0", "mvp0", "mvp1"}
