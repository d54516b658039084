"""Guest-to-guest links: two booted guests joined by hot-added ``stream`` NICs exchange traffic.

The link is a unix stream socket between the two QEMU processes; the addresses live only on that private wire.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

import qmpnet
from qmpnet.testguest import TestMachine

if TYPE_CHECKING:
    from pathlib import Path

    from qmpnet.testguest import GuestImage

pytestmark = [pytest.mark.integration]


async def _address(vm: TestMachine, mac: str, cidr: str) -> None:
    iface = await vm.wait_nic(mac, carrier=True)
    result = await vm.agent.run(f"ip addr add {cidr} dev {iface.name} && ip link set {iface.name} up")
    assert result.rc == 0, result.output


@pytest.mark.parametrize("backend", ["stream", "dgram"])
async def test_two_guests_linked_by_a_socket_backend_ping(
    guest_image: GuestImage, tmp_path: Path, backend: str
) -> None:
    sock_a, sock_b = tmp_path / "a.sock", tmp_path / "b.sock"
    if backend == "stream":
        spec_a: dict[str, object] = {"type": "stream", "server": True, "addr": {"type": "unix", "path": str(sock_a)}}
        spec_b: dict[str, object] = {"type": "stream", "server": False, "addr": {"type": "unix", "path": str(sock_a)}}
    else:
        ua = {"type": "unix", "path": str(sock_a)}
        ub = {"type": "unix", "path": str(sock_b)}
        spec_a = {"type": "dgram", "local": ua, "remote": ub}
        spec_b = {"type": "dgram", "local": ub, "remote": ua}
    async with (
        TestMachine(guest_image, name="link-a") as vm_a,
        TestMachine(guest_image, name="link-b") as vm_b,
        qmpnet.connect(str(vm_a.qmp_path), name="a") as guest_a,
        qmpnet.connect(str(vm_b.qmp_path), name="b") as guest_b,
    ):
        await guest_a.add_nic({"model": "virtio", "id": "wire", "mac": "52:54:00:bb:00:01", "backend": spec_a})
        await guest_b.add_nic({"model": "virtio", "id": "wire", "mac": "52:54:00:bb:00:02", "backend": spec_b})
        await asyncio.gather(
            _address(vm_a, "52:54:00:bb:00:01", "192.168.77.1/24"),
            _address(vm_b, "52:54:00:bb:00:02", "192.168.77.2/24"),
        )
        result = await vm_a.agent.run("ping -c 3 -W 5 192.168.77.2", timeout=30)
        assert result.rc == 0, result.output
        assert "3 packets received" in result.output or " 0% packet loss" in result.output, result.output
        nics = {n.id: n for n in await guest_a.list_nics()}
        assert nics["wire"].backend is not None
        assert nics["wire"].backend.type == backend
