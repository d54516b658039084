"""Hot-plug into a real booted guest, checked from inside it: the model x machine matrix.

One guest per machine type is booted for the whole module (a boot costs ~4 s under TCG) and every test leaves it
as it found it: each test removes what it adds, and the final assertion of each test is that the guest no longer
sees the NIC. The guest's agent reports interfaces (mac, driver, carrier, addresses) as they change; tests wait
on predicates over those reports, never on sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio
from aux_qmp import aux_args, hmp
from waiting import eventually

import qmpnet
from qmpnet.testguest import TestMachine

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from qmpnet.testguest import GuestImage

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

DRIVERS = {"virtio-net-pci": "virtio_net", "e1000": "e1000", "e1000e": "e1000e", "rtl8139": "8139cp"}
# e1000's watchdog notices carrier changes only every ~2 s.
CARRIER_TIMEOUT = 15.0
MACHINES: dict[str, dict[str, Any]] = {
    "pc": {"machine": "pc"},
    "q35": {"machine": "q35", "root_ports": 6, "pcie_pci_bridge": True},
}


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=sorted(MACHINES))
async def vm(
    request: pytest.FixtureRequest, guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[TestMachine]:
    # A second QMP monitor lets the tests look at QEMU independently of the connection qmpnet holds.
    workdir = tmp_path_factory.mktemp(f"hotplug-{request.param}")
    extra = aux_args(workdir)
    async with TestMachine(
        guest_image, name=f"hotplug-{request.param}", workdir=workdir, extra_args=extra, **MACHINES[request.param]
    ) as machine:
        yield machine


@pytest_asyncio.fixture(loop_scope="module")
async def guest(vm: TestMachine) -> AsyncIterator[qmpnet.Guest]:
    async with qmpnet.connect(str(vm.qmp_path), name=vm.name) as connected:
        yield connected


@pytest.mark.parametrize("model", sorted(DRIVERS))
async def test_model_lifecycle_seen_by_guest(vm: TestMachine, guest: qmpnet.Guest, model: str) -> None:
    mac = {"virtio-net-pci": "52:54:00:aa:00:01", "e1000": "52:54:00:aa:00:02",
           "e1000e": "52:54:00:aa:00:03", "rtl8139": "52:54:00:aa:00:04"}[model]
    nic_id = f"t-{model}"
    timings: dict[str, float] = {}

    start = time.monotonic()
    nic = await guest.add_nic({"model": model, "id": nic_id, "mac": mac})
    iface = await vm.wait_nic(mac, driver=DRIVERS[model])
    timings["visible"] = time.monotonic() - start
    assert nic.id == nic_id
    assert nic.mac == mac
    assert iface.pci is not None
    # Carrier must be seen up before "down" can mean anything (e1000 reports it only after its watchdog).
    await vm.wait_nic(mac, CARRIER_TIMEOUT, carrier=True)
    timings["carrier_initial"] = time.monotonic() - start

    start = time.monotonic()
    await guest.set_link(nic_id, up=False)
    await vm.wait_nic(mac, CARRIER_TIMEOUT, carrier=False)
    timings["carrier_down"] = time.monotonic() - start
    start = time.monotonic()
    await guest.set_link(nic_id, up=True)
    await vm.wait_nic(mac, CARRIER_TIMEOUT, carrier=True)
    timings["carrier_up"] = time.monotonic() - start

    start = time.monotonic()
    result = await guest.remove_nic(nic_id, timeout=15)
    timings["removed"] = time.monotonic() - start
    assert result.state == "removed"
    await vm.wait_nic_gone(mac)
    assert nic_id not in {n.id for n in await guest.list_nics()}
    network = await hmp(vm.workdir, "info network")
    assert f"{nic_id}.net" not in network, network

    # The same id and MAC can be used again at once.
    again = await guest.add_nic({"model": model, "id": nic_id, "mac": mac})
    await vm.wait_nic(mac, driver=DRIVERS[model])
    assert (await guest.remove_nic(again.id, timeout=15)).state == "removed"
    await vm.wait_nic_gone(mac)
    print(f"\n{vm.name} {model}: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))  # noqa: T201 - the in-guest timings for the record


async def test_user_backend_dhcp_and_hostfwd(vm: TestMachine, guest: qmpnet.Guest) -> None:
    port = _free_port()
    mac = "52:54:00:aa:01:01"
    nic = await guest.add_nic(
        {"model": "virtio", "id": "dhcp0", "mac": mac,
         "backend": {"type": "user", "hostfwd": [f"tcp:127.0.0.1:{port}-:7777"]}}
    )
    try:
        iface = await vm.wait_nic(mac, carrier=True)
        result = await vm.agent.dhcp(iface.name)
        assert result.rc == 0, result.output
        await vm.wait_nic(mac, ipv4=["10.0.2.15/24"])
        # A listener in the guest answers through the host forward.
        listener = asyncio.create_task(vm.agent.run("echo hello-from-guest | nc -l -p 7777", timeout=30))
        try:
            assert await _read_forwarded(port, deadline=20) == "hello-from-guest"
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await listener
    finally:
        assert (await guest.remove_nic(nic.id, timeout=15)).state == "removed"
    await vm.wait_nic_gone(mac)


async def _read_forwarded(port: int, deadline: float) -> str:
    """Connect to the forwarded port until the guest's listener answers (it may not be listening yet)."""

    async def read() -> str | None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        data = await asyncio.wait_for(reader.read(100), timeout=5)
        writer.close()
        return data.decode().strip() if data else None

    answer = f"an answer on 127.0.0.1:{port}"
    return await eventually(read, timeout=deadline, interval=0.2, retry=(OSError,), what=answer)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
