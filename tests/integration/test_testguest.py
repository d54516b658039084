"""The test guest harness itself: boot on pc and q35, agent reports, commands, DHCP, failures and cleanup.

Two guests are booted once for the module (pc with one NIC of each model, q35 with root ports and a
pcie-pci-bridge); the tests that need a fresh QEMU use `boot=False`, which starts in a fraction of a second.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
from typing import TYPE_CHECKING

import pytest
import pytest_asyncio
from qemu.qmp import QMPClient

from qmpnet.testguest import (
    BRIDGE_ID,
    AgentTimeoutError,
    GuestInterface,
    MachineError,
    TestMachine,
    find_mac,
)
from qmpnet.testguest.agent import encode_dhcp, encode_run

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from qmpnet.testguest import GuestImage

logger = logging.getLogger(__name__)

pytestmark = pytest.mark.integration
module_loop = pytest.mark.asyncio(loop_scope="module")

#: model -> (MAC, the driver Linux binds). QEMU's rtl8139 is an 8139C+, which 8139cp drives.
COLD_NICS = {
    "virtio-net-pci": ("52:54:00:12:34:56", "virtio_net"),
    "e1000": ("52:54:00:12:34:57", "e1000"),
    "e1000e": ("52:54:00:12:34:58", "e1000e"),
    "rtl8139": ("52:54:00:12:34:59", "8139cp"),
}
VIRTIO_MAC = COLD_NICS["virtio-net-pci"][0]
# e1000 notices its link only at its ~2 s watchdog; TCG makes everything slower still.
REPORT_TIMEOUT = 20.0


def nic_args(index: int, model: str, mac: str, placement: str = "") -> list[str]:
    """QEMU arguments for a cold-plugged NIC on its own user-mode network."""
    return ["-netdev", f"user,id=n{index}", "-device", f"{model},netdev=n{index},mac={mac}{placement}"]


async def qmp(vm: TestMachine, command: str) -> object:
    """Run one QMP command on a fresh connection."""
    client = QMPClient(vm.name)
    await client.connect(str(vm.qmp_path))
    try:
        return await client.execute(command)
    finally:
        await client.disconnect()


def with_all_macs(interfaces: list[GuestInterface]) -> list[GuestInterface] | None:
    return interfaces if all(find_mac(interfaces, mac) for mac, _ in COLD_NICS.values()) else None


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pc_guest(guest_image: GuestImage) -> AsyncIterator[TestMachine]:
    extra = [arg for index, (model, (mac, _)) in enumerate(COLD_NICS.items()) for arg in nic_args(index, model, mac)]
    started = time.monotonic()
    async with TestMachine(guest_image, machine="pc", extra_args=extra, name="harness-pc") as vm:
        assert vm.agent.hello is not None
        logger.info(
            "pc boot to agent ready: %.2f s (guest uptime %s s)", time.monotonic() - started, vm.agent.hello.uptime
        )
        yield vm


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def q35_guest(guest_image: GuestImage) -> AsyncIterator[TestMachine]:
    # A root port has one slot (0); the rtl8139 (conventional PCI) goes behind the pcie-pci-bridge, as QEMU's
    # PCIe guidelines say.
    extra = [
        *nic_args(0, "virtio-net-pci", VIRTIO_MAC, placement=",bus=rp1,addr=0x0"),
        *nic_args(1, "rtl8139", "52:54:00:ab:cd:01", placement=f",bus={BRIDGE_ID},addr=0x1"),
    ]
    async with TestMachine(
        guest_image, machine="q35", root_ports=2, pcie_pci_bridge=True, extra_args=extra, name="harness-q35"
    ) as vm:
        yield vm


# --- pc: reports -------------------------------------------------------------------------------------------


@module_loop
async def test_pc_reports_each_cold_plugged_model_with_its_driver(pc_guest: TestMachine) -> None:
    interfaces = await pc_guest.agent.wait_for(with_all_macs, timeout=REPORT_TIMEOUT)
    assert len(interfaces) == len(COLD_NICS)
    for mac, driver in COLD_NICS.values():
        interface = find_mac(interfaces, mac)
        assert interface is not None
        assert interface.driver == driver
        assert interface.pci is not None
        assert interface.pci.startswith("0000:00:")
        assert interface.name.startswith("eth")


@module_loop
async def test_new_interfaces_are_brought_up_and_report_carrier(pc_guest: TestMachine) -> None:
    def all_up(interfaces: list[GuestInterface]) -> bool:
        return bool(with_all_macs(interfaces)) and all(i.operstate == "up" and i.carrier for i in interfaces)

    assert await pc_guest.agent.wait_for(all_up, timeout=REPORT_TIMEOUT)
    assert pc_guest.agent.interface_by_mac(VIRTIO_MAC.upper()) is not None


@module_loop
async def test_reports_keep_flowing_while_a_command_runs(pc_guest: TestMachine) -> None:
    def virtio_carrier(interfaces: list[GuestInterface]) -> bool | None:
        interface = find_mac(interfaces, VIRTIO_MAC)
        return interface.carrier if interface else None

    await pc_guest.agent.wait_for(virtio_carrier, timeout=REPORT_TIMEOUT)
    command = asyncio.create_task(pc_guest.agent.run("sleep 4"))
    client = QMPClient("harness")
    await client.connect(str(pc_guest.qmp_path))
    try:
        # set_link takes the netdev id too; n0 is the virtio NIC's.
        await client.execute("set_link", {"name": "n0", "up": False})
        # The report comes from the reporter loop while the request loop is busy with the command.
        await pc_guest.agent.wait_for(lambda i: virtio_carrier(i) is False, timeout=3)
        assert not command.done()
        await client.execute("set_link", {"name": "n0", "up": True})
    finally:
        await client.disconnect()
    assert (await command).rc == 0
    await pc_guest.agent.wait_for(virtio_carrier, timeout=REPORT_TIMEOUT)


@module_loop
async def test_wait_for_timeout_carries_the_last_report(pc_guest: TestMachine) -> None:
    with pytest.raises(AgentTimeoutError, match=VIRTIO_MAC):
        await pc_guest.agent.wait_for(lambda _: None, timeout=0.3)


# --- pc: commands and DHCP ---------------------------------------------------------------------------------


@module_loop
async def test_run_returns_rc_and_combined_output(pc_guest: TestMachine) -> None:
    result = await pc_guest.agent.run("echo out; echo err >&2; exit 3")
    assert result.rc == 3
    assert result.output.splitlines() == ["out", "err"]


@module_loop
async def test_run_passes_awkward_text_unchanged(pc_guest: TestMachine) -> None:
    text = 'quotes " \' backslash \\ braces {"req":1,"op":"run"} tab\tunicode ünï $HOME `x`\nsecond line'
    result = await pc_guest.agent.run(f"cat <<'EOF'\n{text}\nEOF")
    assert result.check().output == f"{text}\n"


@module_loop
async def test_run_kills_a_command_at_its_timeout_and_keeps_serving(pc_guest: TestMachine) -> None:
    result = await pc_guest.agent.run("echo started; sleep 60", timeout=1)
    assert result.rc == 137  # SIGKILL: killed at its timeout, not run to its end (which would be 0)
    assert result.output == "started\nKilled\n"  # "Killed": the agent's shell reporting the signal
    assert (await pc_guest.agent.run("echo still here")).output == "still here\n"


@module_loop
async def test_requests_arrive_whole_while_orphans_end_around_the_agent(pc_guest: TestMachine) -> None:
    # The agent's shell is PID 1: each orphan that ends sends it a SIGCHLD. busybox's `read` of a line dropped what
    # it had read when one came in mid-line (the line then lost its start, and its request never ran).
    started = await pc_guest.agent.run(
        "(i=0; while [ $i -lt 400 ]; do (sleep 0.01 &); sleep 0.01; i=$((i + 1)); done) >/dev/null 2>&1 &"
    )
    assert started.check().rc == 0
    for n in range(5):
        text = f"{n}-" + "x" * 600  # ~900 bytes of request line, in 15 pieces 20 ms apart: the reader waits mid-line
        result = await pc_guest.agent.run(f"echo {text}", timeout=10, trickle=0.02)
        assert result.check().output == f"{text}\n"


@module_loop
async def test_dhcp_configures_the_slirp_address(pc_guest: TestMachine) -> None:
    interface = await pc_guest.agent.wait_for(lambda i: find_mac(i, VIRTIO_MAC), timeout=REPORT_TIMEOUT)
    result = await pc_guest.agent.dhcp(interface.name)
    assert result.rc == 0, result.output
    assert "lease of 10.0.2.15 obtained" in result.output

    def addressed(interfaces: list[GuestInterface]) -> GuestInterface | None:
        found = find_mac(interfaces, VIRTIO_MAC)
        return found if found and found.ipv4 else None

    assert (await pc_guest.agent.wait_for(addressed, timeout=REPORT_TIMEOUT)).ipv4 == ["10.0.2.15/24"]
    routes = await pc_guest.agent.run("ip route show default")
    assert f"via 10.0.2.2 dev {interface.name}" in routes.check().output


def test_request_lines_have_the_documented_shape() -> None:
    assert encode_dhcp(7, "eth0", 20) == b'{"req":7,"op":"dhcp","timeout":20,"ifname":"eth0"}\n'
    run = encode_run(8, "echo 'hi'", 2.5)
    assert run.startswith(b'{"req":8,"op":"run","timeout":3,"cmd_b64":"')
    assert run.endswith(b'"}\n')
    assert base64.b64decode(json.loads(run)["cmd_b64"]) == b"echo 'hi'"
    with pytest.raises(ValueError, match="interface name"):
        encode_dhcp(9, "eth0; reboot", 20)


# --- q35 ---------------------------------------------------------------------------------------------------


@module_loop
async def test_q35_root_ports_and_bridge(q35_guest: TestMachine) -> None:
    assert q35_guest.root_port_ids == ["rp1", "rp2"]
    interfaces = await q35_guest.agent.wait_for(lambda i: i if len(i) == 2 else None, timeout=REPORT_TIMEOUT)
    drivers = {interface.driver: interface.pci for interface in interfaces}
    assert set(drivers) == {"virtio_net", "8139cp"}
    # Both NICs sit behind a bridge, so neither is on bus 0.
    assert all(pci and not pci.startswith("0000:00:") for pci in drivers.values())
    # rp1, rp2, rp_br and the pcie-pci-bridge behind rp_br.
    bridges = await q35_guest.agent.run("grep -l 0x060400 /sys/bus/pci/devices/*/class | wc -l")
    assert bridges.check().output.strip() == "4"


# --- machines without a guest OS ---------------------------------------------------------------------------


@module_loop
async def test_unbooted_machine_waits_in_prelaunch_without_an_agent(guest_image: GuestImage) -> None:
    async with TestMachine(guest_image, boot=False, name="harness-paused") as vm:
        status = await qmp(vm, "query-status")
        assert isinstance(status, dict)
        assert status["status"] == "prelaunch"
        with pytest.raises(MachineError, match="no agent"):
            _ = vm.agent
        assert "-S" in vm.command_line


@module_loop
async def test_kill_then_stop_leaves_nothing_behind(guest_image: GuestImage) -> None:
    vm = TestMachine(guest_image, boot=False, name="harness-kill")
    async with vm:
        pid = vm.pid
        assert pid is not None
        vm.kill()
        assert await vm.wait_exit(timeout=10) == -9
    assert not vm.workdir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "exit status -9" in vm.describe()


@module_loop
async def test_start_failure_describes_the_machine_and_cleans_up(guest_image: GuestImage) -> None:
    vm = TestMachine(guest_image, boot=False, extra_args=["-device", "no-such-device"], name="harness-broken")
    with pytest.raises(MachineError) as caught:
        await vm.start()
    message = str(caught.value)
    assert "command line: qemu-system-x86_64" in message
    assert "no-such-device" in message.split("QEMU stderr:")[1]
    assert "console (last 40 lines)" in message
    assert not vm.workdir.exists()


def test_topology_options_need_q35(guest_image: GuestImage) -> None:
    with pytest.raises(ValueError, match="q35"):
        TestMachine(guest_image, machine="pc", root_ports=1)
