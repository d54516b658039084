"""The passt backend against real QEMU, a real passt and a booted busybox guest.

passt runs in a network namespace of the test's own (``hostnet.netns``), with an uplink (a veth pair) and a
default route there, so its port forwards and the guest's view of "the host" are the namespace's: nothing collides
with other tests. The guest gets its address from passt's DHCP, reaches a listener in the namespace through its gateway
address (passt maps it to the host), and a client in the namespace reaches the guest's listener through the
forward. After the NIC is removed no passt runs and no socket is left; a controller killed after passt started
but before ``netdev_add`` leaves a passt that the next connect ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import needs
import pytest
import pytest_asyncio
from mqtt_fixtures import Mosquitto, Probe, Qemu, Serve, scratch, started, wait_online
from netns_tools import ip, kill_namespace
from waiting import eventually

import qmpnet
from qmpnet.adapters.hostnet import passt
from qmpnet.adapters.hostnet.netns import run_in_netns
from qmpnet.adapters.store import StateDir
from qmpnet.adapters.store.files import guest_key
from qmpnet.client import Client
from qmpnet.core.hostconfig import HostnetSettings
from qmpnet.testguest import TestMachine

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from qmpnet.testguest import GuestImage

pytestmark = [
    pytest.mark.integration,
    pytest.mark.asyncio(loop_scope="module"),
    needs.root("create network namespaces and start passt as another user"),
    needs.tool("ip", "iproute2"),
    needs.tool("passt", "passt"),
]

FAULTS = Path(__file__).with_name("faults.py")
#: The namespace's uplink: passt hands its address to the guest and maps the gateway to the namespace itself.
UPLINK, GATEWAY = "198.51.100.2/24", "198.51.100.1"
MAC = "52:54:00:aa:05:01"


@pytest.fixture(scope="module")
def hostnet() -> Iterator[HostnetSettings]:
    """A namespace with an uplink and default routes, and a passt directory ``nobody`` can reach; both removed."""
    name = f"passt-{uuid.uuid4().hex[:8]}"
    top = Path(f"/run/qmpnet-test-{name}")
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        # A veth pair with both ends inside (this kernel has no dummy links): an uplink with a carrier.
        ip("-n", name, "link", "add", "up0", "type", "veth", "peer", "name", "up1")
        ip("-n", name, "addr", "add", UPLINK, "dev", "up0")
        ip("-n", name, "-6", "addr", "add", "2001:db8::2/64", "dev", "up0", "nodad")
        ip("-n", name, "link", "set", "up1", "up")
        ip("-n", name, "link", "set", "up0", "up")
        ip("-n", name, "route", "add", "default", "via", GATEWAY)
        ip("-n", name, "-6", "route", "add", "default", "via", "2001:db8::1")
        top.mkdir(mode=0o755)
        yield HostnetSettings(netns=name, passt_dir=top / "passt")
    finally:
        kill_namespace(name)  # and any passt still in it
        shutil.rmtree(top, ignore_errors=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vm(guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TestMachine]:
    workdir = tmp_path_factory.mktemp("passt")
    async with TestMachine(guest_image, name="passt", workdir=workdir, machine="pc") as machine:
        yield machine


def _settings(hostnet: HostnetSettings) -> qmpnet.Settings:
    return qmpnet.Settings(hostnet=hostnet)


def _serve_env(hostnet: HostnetSettings) -> dict[str, str]:
    """The environment that gives ``qmpnet serve`` the test's namespace and passt directory."""
    return {"QMPNET_HOSTNET__NETNS": str(hostnet.netns), "QMPNET_HOSTNET__PASST_DIR": str(hostnet.passt_dir)}


def _passt_dir(vm: TestMachine, hostnet: HostnetSettings) -> Path:
    return hostnet.passt_guest_dir(guest_key(str(vm.qmp_path)))


async def test_a_passt_nic_serves_a_guest_both_ways_and_leaves_nothing(
    vm: TestMachine, hostnet: HostnetSettings
) -> None:
    netns = hostnet.netns
    assert netns is not None
    forward, service = await _free_ports(netns, 2)
    async with qmpnet.connect(str(vm.qmp_path), name=vm.name, settings=_settings(hostnet)) as guest:
        nic = await guest.add_nic(
            {"id": "pt0", "mac": MAC, "backend": {"type": "passt", "ports": [f"tcp:{forward}:7777"]}}
        )
        try:
            assert nic.backend is not None
            socket_path = nic.backend.options["socket"]
            pid = int(nic.backend.options["pid"])
            assert _files(socket_path) == ["socket", "pid file"]
            assert _uid(pid) != 0  # unprivileged (--runas)
            iface = await vm.wait_nic(MAC, carrier=True)
            result = await vm.agent.dhcp(iface.name)
            assert result.rc == 0, result.output
            await vm.wait_nic(MAC, ipv4=[UPLINK])  # passt's DHCP hands out the uplink's address

            # The guest reaches a listener in the host's namespace through its gateway address.
            server = await run_in_netns(netns, lambda: _listener(service))
            received = asyncio.create_task(asyncio.to_thread(_receive_once, server))
            sent = await vm.agent.run(f"echo hello-from-guest | nc {GATEWAY} {service}", timeout=30)
            assert sent.rc == 0, sent.output
            assert await asyncio.wait_for(received, timeout=30) == "hello-from-guest"

            # The host's namespace reaches the guest's listener through the forward.
            listener = asyncio.create_task(vm.agent.run("echo hello-from-guest-port | nc -l -p 7777", timeout=30))
            try:
                answer = await eventually(
                    lambda: run_in_netns(netns, lambda: _ask(forward)), timeout=20, interval=0.2,
                    retry=(OSError,), what=f"an answer on the forward {forward}",
                )
                assert answer == "hello-from-guest-port"
                heard = await asyncio.wait_for(listener, timeout=30)
                assert heard.output.strip() == "hello-from-host-side"
            finally:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await listener
        finally:
            assert (await guest.remove_nic("pt0", timeout=15)).state == "removed"
    await vm.wait_nic_gone(MAC)
    assert passt.find(_passt_dir(vm, hostnet)) == {}
    assert _ended(pid)
    assert _files(socket_path) == []


async def test_a_passt_left_by_a_controller_killed_before_netdev_add_is_ended_on_the_next_connect(
    vm: TestMachine, hostnet: HostnetSettings, state_dir: Path
) -> None:
    netns = hostnet.netns
    assert netns is not None
    [forward] = await _free_ports(netns, 1)
    env = {"QMPNET_STATE_DIR": str(state_dir), "QMPNET_HOSTNET__NETNS": netns,
           "QMPNET_HOSTNET__PASST_DIR": str(hostnet.passt_dir)}
    argv = [sys.executable, str(FAULTS), "--die-before", "netdev_add", "--", "nic", "add", "--qmp",
            str(vm.qmp_path), "--backend", "passt", "--port", f"tcp:{forward}:22", "--id", "pk0"]
    process = await asyncio.create_subprocess_exec(
        *argv, env={**os.environ, **env}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(120):
        out, err = await process.communicate()
    assert process.returncode == 137, (out.decode(), err.decode())
    directory = _passt_dir(vm, hostnet)
    orphans = passt.find(directory)
    assert [path for path, _ in orphans.values()] == [f"{directory}/pk0.sock"]  # it outlived the controller

    async with qmpnet.connect(str(vm.qmp_path), name=vm.name, settings=_settings(hostnet)) as guest:
        assert "pk0" not in {n.id for n in await guest.list_nics()}
    assert passt.find(directory) == {}
    assert all(_ended(pid) for pid in orphans)
    assert _files(f"{directory}/pk0.sock") == []


async def test_over_mqtt_a_passt_outlives_controller_restarts_and_a_desired_set_adds_and_prunes_it(
    vm: TestMachine, hostnet: HostnetSettings
) -> None:
    netns = hostnet.netns
    assert netns is not None
    directory = _passt_dir(vm, hostnet)
    env = _serve_env(hostnet)
    with scratch("qmpnet-passt-") as work, started(broker := Mosquitto(work)):
        serve = Serve(work, broker.url, "pst", {"vm": vm.qmp_path}, env=env)
        with started(serve):
            await wait_online(serve, broker.url, guests_connected=["vm"])
            async with Client(broker.url, timeout=30) as client:
                guest = client.guest("pst", "vm")
                [port] = await _free_ports(netns, 1)
                await guest.add_nic({"id": "pm0", "backend": {"type": "passt", "ports": [f"udp:{port}:53"]}})
                [(pid, (socket_path, _))] = passt.find(directory).items()
                assert socket_path == f"{directory}/pm0.sock"

                serve.restart()  # the record keeps the passt: recovery on the next connect leaves it running
                await wait_online(serve, broker.url, guests_connected=["vm"])
                assert "pm0" in {n.id for n in await guest.list_nics()}
                assert list(passt.find(directory)) == [pid]

                # `qmpnet apply --prune` with another passt NIC: pm0 and its passt go, pd0 and its passt come.
                desired = work / "desired.json"
                desired.write_text(json.dumps(
                    {"nics": [{"id": "pd0", "model": "e1000", "backend": {"type": "passt", "ipv6": False}}]}
                ))
                applied = await _cli("apply", str(desired), "--prune", "--broker", broker.url, "--guest", "vm",
                                     "--controller", "pst")
                assert applied[0] == 0, applied
                found = await eventually(
                    lambda: _only(passt.find(directory), f"{directory}/pd0.sock"), timeout=60, interval=0.2,
                    what="pd0's passt alone",
                )
                assert _ended(pid)
                assert "--ipv4-only" in Path(f"/proc/{found}/cmdline").read_text()  # noqa: ASYNC240 - /proc
                # The retained desired document, pruning to nothing: pd0 and its passt go.
                await client.set_desired("pst", "vm", {"generation": 1, "prune": True, "nics": []})
                await eventually(lambda: passt.find(directory) == {}, timeout=60, interval=0.2, what="no passt")
                assert "pd0" not in {n.id for n in await guest.list_nics()}
    assert _files(f"{directory}/pd0.sock") == []
    assert _files(f"{directory}/pm0.sock") == []


async def test_a_killed_qemus_passt_is_ended_when_the_cli_next_finds_it_gone(
    hostnet: HostnetSettings, tmp_path: Path
) -> None:
    """A QEMU killed for good leaves its passt listening on the forwarded port until a qmpnet process notices."""
    netns = hostnet.netns
    assert netns is not None
    settings = qmpnet.Settings(hostnet=hostnet, state_dir=tmp_path / "state")
    (workdir := tmp_path / "gone").mkdir()
    async with TestMachine(None, boot=False, name="gone", workdir=workdir, machine="pc") as vm:
        [port] = await _free_ports(netns, 1)
        async with qmpnet.connect(str(vm.qmp_path), name="gone", settings=settings) as guest:
            nic = await guest.add_nic({"id": "pk0", "backend": {"type": "passt", "ports": [f"tcp:{port}:22"]}})
        assert nic.backend is not None
        socket_path, pid = nic.backend.options["socket"], int(nic.backend.options["pid"])
        vm.kill()
        await vm.wait_exit(30)
    assert not _ended(pid)  # QEMU's death alone ends nothing: passt keeps the port
    released = r"its QEMU is gone: qmpnet gave back the host side of NIC\(s\) pk0"
    with pytest.raises(qmpnet.GuestUnavailable, match=released):
        async with qmpnet.connect(str(vm.qmp_path), name="gone", settings=settings):
            pass
    assert _ended(pid)
    assert _files(socket_path) == []
    assert await run_in_netns(netns, lambda: _bindable(port))
    store = await StateDir(settings.state_dir).open_guest(str(vm.qmp_path), "gone", wait=5)
    try:
        assert store.record.nics == {}  # the NIC went with its QEMU: no phantom on the next start
        assert store.record.qemu_pid is None
    finally:
        store.close()
    # Nothing is left to give back: the next attempt is the plain error.
    with pytest.raises(qmpnet.GuestUnavailable) as caught:
        async with qmpnet.connect(str(vm.qmp_path), name="gone", settings=settings):
            pass
    assert "its QEMU is gone" not in caught.value.message


async def test_serve_ends_the_passt_of_a_qemu_killed_for_good_and_tells_nic_removed(
    hostnet: HostnetSettings, tmp_path: Path
) -> None:
    netns = hostnet.netns
    assert netns is not None
    env = _serve_env(hostnet)
    with scratch("qmpnet-passt-gone-") as work, started(broker := Mosquitto(work)):
        (workdir := tmp_path / "sgone").mkdir()
        async with TestMachine(None, boot=False, name="sgone", workdir=workdir, machine="pc") as vm:
            serve = Serve(work, broker.url, "psg", {"vm": vm.qmp_path}, env=env)
            with started(serve):
                await wait_online(serve, broker.url, guests_connected=["vm"])
                async with Client(broker.url, timeout=30) as client:
                    guest = client.guest("psg", "vm")
                    [port] = await _free_ports(netns, 1)
                    nic = await guest.add_nic({"id": "ps0", "backend": {"type": "passt", "ports": [f"udp:{port}:53"]}})
                    assert nic.backend is not None
                    pid = int(nic.backend.options["pid"])
                    async with Probe(broker.url) as probe:
                        await probe.subscribe(f"{serve.base}/guest/vm/event/nic_removed")
                        since = probe.mark()
                        vm.kill()
                        await vm.wait_exit(30)
                        removed = await probe.one(
                            f"{serve.base}/guest/vm/event/nic_removed", since=since, timeout=60
                        )
                    assert removed.json["id"] == "ps0"
                    assert "QEMU is gone" in removed.json["message"]
                    assert _ended(pid)
                    assert await run_in_netns(netns, lambda: _bindable(port, kind=socket.SOCK_DGRAM))


async def test_a_discovered_qemu_that_exits_cleanly_has_its_passt_ended(hostnet: HostnetSettings) -> None:
    """A clean QEMU exit removes its socket, so the guest leaves the guest directory: its passt goes with it."""
    netns = hostnet.netns
    assert netns is not None
    env = _serve_env(hostnet)
    with scratch("qmpnet-passt-dir-") as work, started(broker := Mosquitto(work)):
        (guests := work / "guests").mkdir()
        with started(qemu := Qemu(guests / "pq.qmp")):
            serve = Serve(work, broker.url, "psd", args=["--guest-dir", str(guests)], env=env)
            with started(serve):
                await wait_online(serve, broker.url, guests_connected=["pq"])
                async with Client(broker.url, timeout=30) as client:
                    nic = await client.guest("psd", "pq").add_nic({"id": "pd1", "backend": {"type": "passt"}})
                assert nic.backend is not None
                pid = int(nic.backend.options["pid"])
                qemu.stop()  # SIGTERM: QEMU exits cleanly and removes its socket
                await eventually(lambda: _ended(pid), timeout=60, interval=0.2, what="pd1's passt ended")
                assert _files(nic.backend.options["socket"]) == []


async def _cli(*args: str) -> tuple[int | None, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpnet", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(120):
        out, err = await process.communicate()
    return process.returncode, out.decode(), err.decode()


def _only(found: dict[int, tuple[str, int]], socket_path: str) -> int | None:
    """The pid of the one passt in ``found`` if it serves ``socket_path``."""
    if [path for path, _ in found.values()] != [socket_path]:
        return None
    return next(iter(found))


async def _free_ports(netns: str, count: int) -> list[int]:
    """``count`` distinct ports free in ``netns`` now (they are released before use; the namespace is ours)."""

    def pick() -> list[int]:
        socks = [socket.socket() for _ in range(count)]
        try:
            for sock in socks:
                sock.bind(("0.0.0.0", 0))  # noqa: S104 - where passt binds its forwards
            return [int(sock.getsockname()[1]) for sock in socks]
        finally:
            for sock in socks:
                sock.close()

    return await run_in_netns(netns, pick)


def _listener(port: int) -> socket.socket:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))  # passt maps the guest's gateway to the host's loopback
    server.listen()
    server.settimeout(30)
    return server


def _receive_once(server: socket.socket) -> str:
    with server:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(30)
            data = b""
            while chunk := conn.recv(100):
                data += chunk
            return data.decode().strip()


def _ask(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        # passt 0.0~git20230309 acknowledges the guest's SYN-ACK only with the host side's first data: a client
        # that waits for the server to speak first waits forever (ssh is fine: both sides greet at once).
        conn.sendall(b"hello-from-host-side\n")
        data = conn.recv(100)
    if not data:
        raise ConnectionResetError("the forward answered nothing yet")  # the guest's nc may not listen yet
    return data.decode().strip()


def _bindable(port: int, kind: int = socket.SOCK_STREAM) -> bool:
    """Whether ``port`` is free to bind (nothing listens on it any more)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        try:
            sock.bind(("0.0.0.0", port))  # noqa: S104 - where passt binds its forwards
        except OSError:
            return False
    return True


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid in /proc/{pid}/status")


def _ended(pid: int) -> bool:
    """Whether process ``pid`` is gone (or a zombie: it may be re-parented to a PID 1 that does not reap)."""
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] in "ZX"
    return True


def _files(socket_path: str) -> list[str]:
    """What is left of a passt's files: ``socket`` and/or ``pid file``."""
    found = ["socket"] if Path(socket_path).is_socket() else []
    return found + (["pid file"] if Path(passt.pid_file(socket_path)).exists() else [])
