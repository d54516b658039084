"""qmpnet remembers (issue 7): every "Why" of the issue, reproduced against real QEMU, CLI processes and the store.

Each test does what a user did when the bug was found — separate `qmpnet` processes on one guest, a process
killed between two QMP commands, a second QMP client working behind qmpnet's back — and checks QEMU's own view
over a second monitor, so nothing extra (netdev, device, bound port) can hide behind qmpnet's answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pytest
from aux_qmp import aux_args, aux_monitor, hmp
from waiting import eventually

import qmpnet
from qmpnet.adapters.store import StateDir
from qmpnet.testguest import TestMachine

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from qmpnet.testguest import GuestImage

pytestmark = [pytest.mark.integration]

FAULTS = Path(__file__).with_name("faults.py")
UNPLUG_TIMEOUT = 15.0


async def cli(*args: str, fault: str | None = None, timeout: float = 60) -> tuple[int, str, str]:
    """Run ``qmpnet ARGS`` as a new process (optionally killed after QMP command ``fault``)."""
    argv = [sys.executable, str(FAULTS), "--die-after", fault, "--", *args] if fault else [
        sys.executable, "-m", "qmpnet", *args
    ]
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(timeout):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def peripheral_nics(workdir: Path) -> set[str]:
    """The NIC devices QEMU itself lists under /machine/peripheral (read over the second monitor)."""
    async with aux_monitor(workdir) as aux:
        children = cast("list[dict[str, str]]", await aux.execute("qom-list", {"path": "/machine/peripheral"}))
        nics = set()
        for child in children:
            if not child["type"].startswith("child<"):
                continue
            props = await aux.execute("qom-list", {"path": f"/machine/peripheral/{child['name']}"})
            if any(p["name"] == "netdev" for p in cast("list[dict[str, str]]", props)):
                nics.add(child["name"])
        return nics


@contextlib.asynccontextmanager
async def no_os_guest(tmp: Path, name: str = "rec") -> AsyncIterator[TestMachine]:
    """A QEMU with no guest OS (never acks an unplug) and a second monitor."""
    workdir = tmp / name
    workdir.mkdir()
    async with TestMachine(None, boot=False, workdir=workdir, name=name, extra_args=aux_args(workdir)) as vm:
        yield vm


@pytest.fixture
async def booted(guest_image: GuestImage, tmp_path: Path) -> AsyncIterator[TestMachine]:
    workdir = tmp_path / "vm"
    workdir.mkdir()
    async with TestMachine(guest_image, workdir=workdir, name="rec-booted", extra_args=aux_args(workdir)) as vm:
        yield vm


# ------------------------------------------------------------------------------------ invisible leftovers


async def test_an_add_killed_between_netdev_add_and_device_add_leaves_nothing(tmp_path: Path) -> None:
    port = free_port()
    async with no_os_guest(tmp_path) as vm:
        qmp = str(vm.qmp_path)
        rc, _, _ = await cli("nic", "add", "--qmp", qmp, "--id", "x1", "--hostfwd", f"tcp:127.0.0.1:{port}-:22",
                             fault="netdev_add")
        assert rc == 137
        # The killed process left QEMU holding the backend and its port, as on main before the store.
        assert "x1.net" in await hmp(vm.workdir, "info network")
        assert not port_is_free(port)
        # The next process recovers first: the orphan is gone, the port is free, the id can be used again.
        rc, out, err = await cli("nic", "list", "--qmp", qmp, "--json")
        assert (rc, err) == (0, "")
        assert "x1" not in {n["id"] for n in json.loads(out)["nics"]}
        assert "x1.net" not in await hmp(vm.workdir, "info network")
        assert port_is_free(port)
        rc, out, err = await cli("nic", "add", "--qmp", qmp, "--id", "x1", "--json")
        assert (rc, err) == (0, ""), err
        assert await peripheral_nics(vm.workdir) == {"x1"}


async def test_an_add_killed_after_device_add_is_kept_and_completed(tmp_path: Path) -> None:
    async with no_os_guest(tmp_path) as vm:
        qmp = str(vm.qmp_path)
        rc, _, _ = await cli("nic", "add", "--qmp", qmp, "--id", "x2", "--link", "down", fault="device_add")
        assert rc == 137
        rc, out, _ = await cli("nic", "list", "--qmp", qmp, "--json")
        assert rc == 0
        nics = {n["id"]: n for n in json.loads(out)["nics"]}
        assert nics["x2"]["state"] == "active"
        assert nics["x2"]["link"] == "down"  # the set_link it never got to was re-applied from the record
        assert await peripheral_nics(vm.workdir) == {"x2"}


async def test_a_removal_acked_after_the_cli_returned_is_finished_by_the_next_one(booted: TestMachine) -> None:
    port = free_port()
    qmp = str(booted.qmp_path)
    mac = "52:54:00:7e:c0:01"
    rc, _, err = await cli("nic", "add", "--qmp", qmp, "--id", "late", "--mac", mac, "--hostfwd",
                           f"tcp:127.0.0.1:{port}-:22")
    assert rc == 0, err
    await booted.wait_nic(mac)
    rc, out, _ = await cli("nic", "del", "--qmp", qmp, "late", "--timeout", "0")
    assert (rc, out.strip()) == (0, "late: removal_pending")
    await booted.wait_nic_gone(mac)  # the guest acks after the process has gone: nobody listens
    assert "late.net" in await hmp(booted.workdir, "info network")  # the leftover of the issue
    rc, out, _ = await cli("nic", "list", "--qmp", qmp, "--json")
    assert rc == 0
    assert "late" not in {n["id"] for n in json.loads(out)["nics"]}
    assert "late.net" not in await hmp(booted.workdir, "info network")
    assert port_is_free(port)
    # The user's second `nic del` is told it is done; `nic add --id late` works again.
    rc, out, _ = await cli("nic", "del", "--qmp", qmp, "late")
    assert (rc, out.strip()) == (0, "late: removed")
    rc, _, err = await cli("nic", "add", "--qmp", qmp, "--id", "late", "--mac", mac)
    assert rc == 0, err
    await booted.wait_nic(mac)


# ------------------------------------------------------------------------------------------- lost intent


async def test_link_intent_survives_the_process_that_set_it(tmp_path: Path) -> None:
    async with no_os_guest(tmp_path) as vm:
        qmp = str(vm.qmp_path)
        assert (await cli("nic", "add", "--qmp", qmp, "--id", "l1", "--link", "down"))[0] == 0
        assert (await cli("nic", "add", "--qmp", qmp, "--id", "l2"))[0] == 0
        assert (await cli("nic", "link", "--qmp", qmp, "l2", "down"))[0] == 0
        rc, out, _ = await cli("nic", "list", "--qmp", qmp, "--json")
        assert rc == 0
        assert {n["id"]: n["link"] for n in json.loads(out)["nics"]} == {"l1": "down", "l2": "down"}


# -------------------------------------------------------------------------------------------- blind cache


async def test_a_slot_another_client_took_is_planned_around(tmp_path: Path) -> None:
    async with no_os_guest(tmp_path) as vm, qmpnet.connect(str(vm.qmp_path)) as guest:
        first = await guest.add_nic({"model": "e1000", "id": "a1"})  # qmpnet's view: the next free slot is known
        assert first.pci is not None
        taken = first.pci.slot + 1
        async with aux_monitor(vm.workdir) as aux:
            await aux.execute("netdev_add", {"type": "user", "id": "aux.net"})
            await aux.execute("device_add", {"driver": "rtl8139", "id": "aux", "netdev": "aux.net",
                                             "bus": "pci.0", "addr": f"{taken:#x}"})
        second = await guest.add_nic({"model": "e1000", "id": "a2"})  # planned into `taken`, refused, re-planned
        assert second.pci is not None
        assert second.pci.slot not in (first.pci.slot, taken)
        listed = {n.id for n in await guest.list_nics()}
        assert listed == await peripheral_nics(vm.workdir) == {"a1", "a2", "aux"}
        assert not (await hmp(vm.workdir, "info network")).count("a2.net") > 1


# ------------------------------------------------------------------------------------ one client at a time


async def test_four_cli_processes_on_one_socket_all_succeed_one_after_another(tmp_path: Path) -> None:
    async with no_os_guest(tmp_path) as vm:
        qmp = str(vm.qmp_path)
        for n in range(4):
            assert (await cli("nic", "add", "--qmp", qmp, "--id", f"p{n}"))[0] == 0
        results = await asyncio.gather(*(cli("nic", "del", "--qmp", qmp, f"p{n}", "--timeout", "0")
                                         for n in range(4)))
        for n, (rc, out, err) in enumerate(results):
            assert (rc, out.strip(), err) == (0, f"p{n}: removal_pending", ""), err
        rc, out, _ = await cli("nic", "list", "--qmp", qmp, "--json")
        assert {n["id"]: n["state"] for n in json.loads(out)["nics"]} == {f"p{n}": "removal_pending" for n in range(4)}


async def test_a_monitor_another_client_holds_is_busy_in_one_line(tmp_path: Path) -> None:
    async with no_os_guest(tmp_path) as vm:
        config = tmp_path / "fast.toml"
        config.write_text("[qmp]\nconnect_timeout = 0.5\n")
        # Another program (not qmpnet) holds the monitor: QEMU accepts the next connection but never greets it.
        reader, writer = await asyncio.open_unix_connection(str(vm.qmp_path))
        try:
            assert b"QMP" in await reader.readline()
            rc, out, err = await cli("nic", "list", "--qmp", str(vm.qmp_path), "--config", str(config))
        finally:
            writer.close()
        assert (rc, out) == (1, "")
        assert len(err.splitlines()) == 1, err
        assert err.startswith("error: busy: ")
        assert "another client holds it" in err
        # Once it lets go, the same command works.
        assert (await cli("nic", "list", "--qmp", str(vm.qmp_path)))[0] == 0


async def test_the_cli_reaches_a_guest_that_serve_holds(tmp_path: Path) -> None:
    from mqtt_fixtures import Mosquitto, Serve, wait_online  # noqa: PLC0415 - only this test needs a broker

    broker_dir = tmp_path / "mq"
    broker_dir.mkdir()
    state = tmp_path / "state"
    broker = Mosquitto(broker_dir).start()
    try:
        async with no_os_guest(tmp_path) as vm:
            serve = Serve(broker_dir, broker.url, "held", {"vm": vm.qmp_path}, args=["--state-dir", str(state)])
            serve.start()
            try:
                await wait_online(serve, broker.url, guests_connected=["vm"])
                qmp = str(vm.qmp_path)
                where = ("--qmp", qmp, "--state-dir", str(state))
                # The monitor is the controller's; the CLI asks the controller through its control socket: the
                # quick path (no typer, no pydantic), and the full command line when a settings file is given.
                rc, out, err = await cli("nic", "add", *where, "--id", "via", "--json")
                assert (rc, err) == (0, ""), err
                quick = json.loads(out)
                config = tmp_path / "empty.toml"
                config.write_text("")
                rc, out, err = await cli("nic", "add", *where, "--id", "full", "--json", "--config", str(config))
                assert (rc, err) == (0, ""), err
                full = json.loads(out)
                assert (quick["id"], full["id"]) == ("via", "full")
                assert list(quick) == list(full)  # the same object, field for field
                assert {k: v for k, v in quick.items() if k not in ("id", "mac", "netdev", "pci")} == {
                    k: v for k, v in full.items() if k not in ("id", "mac", "netdev", "pci")}  # fmt: skip
                rc, out, err = await cli("nic", "set", "via", *where, "--link", "down", "--json")
                assert (rc, err) == (0, ""), err
                assert json.loads(out)["link"] == "down"
                listed = await cli("nic", "list", *where)
                assert listed == await cli("nic", "list", *where, "--config", str(config))
                assert listed[0] == 0
                assert {line.split()[0] for line in listed[1].splitlines()[1:]} == {"via", "full"}
                # An error is the controller's, in the same line either way; nothing more was added.
                again = await cli("nic", "add", *where, "--id", "via")
                assert again == await cli("nic", "add", *where, "--id", "via", "--config", str(config))
                assert again[0] == 1
                assert again[2].startswith("error: conflict: "), again
                assert await peripheral_nics(vm.workdir) == {"via", "full"}
                # A second controller on the same state directory is refused in one line.
                second = Serve(broker_dir, broker.url, "again", {}, args=["--state-dir", str(state)]).start()
                assert second.wait(20) == 2
                assert "another qmpnet serve" in second.log.read_text()
            finally:
                serve.stop()
    finally:
        broker.stop()


async def test_sigterm_lets_an_operation_in_flight_finish_before_the_monitor_closes(tmp_path: Path) -> None:
    from mqtt_fixtures import Mosquitto, Probe, Serve, wait_online  # noqa: PLC0415 - only this test needs a broker

    broker_dir = tmp_path / "mq"
    broker_dir.mkdir()
    broker = Mosquitto(broker_dir).start()
    try:
        async with no_os_guest(tmp_path) as vm:
            serve = Serve(broker_dir, broker.url, "stopper", {"vm": vm.qmp_path}).start()
            try:
                await wait_online(serve, broker.url, guests_connected=["vm"])
                async with Probe(broker.url) as probe:
                    await probe.subscribe(f"probe/{probe.identifier}/response", "qmpnet/stopper/status")
                    added = await probe.call("qmpnet/stopper/guest/vm/request/nic/add", {"nic": {"id": "slow"}})
                    assert added["status"] == "ok", added
                    # A removal the guest (no OS) never acks: it takes its whole 3 s timeout.
                    answer = asyncio.create_task(probe.call(
                        "qmpnet/stopper/guest/vm/request/nic/del", {"id": "slow", "timeout": 3}, timeout=20
                    ))
                    await recorded_as(broker_dir / "state-stopper", "slow", "removal_pending")  # it is under way
                    serve.signal(signal.SIGTERM)
                    result = await answer
                    assert result["status"] == "ok", result
                    assert result["data"] == {"id": "slow", "state": "removal_pending"}
                    offline = await probe.one("qmpnet/stopper/status", lambda m: m.json.get("state") == "offline",
                                              timeout=20)
                    assert offline.json == {"state": "offline"}
                assert serve.wait(20) == 0
            finally:
                serve.stop()
    finally:
        broker.stop()


async def recorded_as(state: Path, nic_id: str, wanted: str, timeout: float = 10) -> None:
    """Until the state store says ``nic_id`` is ``wanted`` (written before the change's first QMP command)."""

    records = StateDir(state)

    def recorded() -> bool:  # the store offers nothing to wait on
        return any(
            nic_id in record.nics and record.nics[nic_id].state == wanted for record in records.records()
        )

    await eventually(recorded, timeout=timeout, interval=0.02, what=f"{nic_id} recorded as {wanted}")


# ------------------------------------------------------------------------------------------------- apply


async def test_apply_dry_run_changes_nothing_twice_is_a_no_op_and_prune_removes_only_qmpnets(tmp_path: Path) -> None:
    workdir = tmp_path / "ap"
    workdir.mkdir()
    cold = ["-netdev", "user,id=cold.net", "-device", "e1000,id=cold,netdev=cold.net,mac=52:54:00:0c:01:d0"]
    async with TestMachine(None, boot=False, workdir=workdir, name="ap",
                           extra_args=[*aux_args(workdir), *cold]) as vm:
        qmp = str(vm.qmp_path)
        want = tmp_path / "want.toml"
        want.write_text('[[nics]]\nid = "w1"\nmodel = "e1000"\n\n'
                        '[[nics]]\nid = "w2"\nmodel = "virtio"\nlink = "down"\n')
        before = await hmp(vm.workdir, "info network")
        rc, out, err = await cli("apply", "--qmp", qmp, str(want), "--dry-run", "--json")
        assert (rc, err) == (0, "")
        assert [(c["action"], c["id"]) for c in json.loads(out)["plan"]] == [("add", "w1"), ("add", "w2")]
        assert await hmp(vm.workdir, "info network") == before  # nothing was changed
        assert await peripheral_nics(vm.workdir) == {"cold"}
        rc, out, err = await cli("apply", "--qmp", qmp, str(want), "--json")
        assert (rc, err) == (0, ""), err
        assert json.loads(out)["converged"] is True
        assert await peripheral_nics(vm.workdir) == {"cold", "w1", "w2"}
        network = await hmp(vm.workdir, "info network")
        rc, out, _ = await cli("apply", "--qmp", qmp, str(want), "--json")
        assert [c["action"] for c in json.loads(out)["plan"]] == ["keep", "keep"]
        assert await hmp(vm.workdir, "info network") == network  # the second apply changed nothing
        one = tmp_path / "one.json"
        one.write_text(json.dumps({"nics": [{"id": "w1", "model": "e1000"}]}))
        rc, out, _ = await cli("apply", "--qmp", qmp, str(one), "--prune", "--json")
        plan = {c["id"]: c["action"] for c in json.loads(out)["plan"]}
        assert plan == {"w1": "keep", "w2": "remove"}  # "cold" is not qmpnet's: never pruned
        assert json.loads(out)["pending"] == ["w2"]  # no OS to ack the unplug: the removal is pending
        rc, out, _ = await cli("nic", "list", "--qmp", qmp, "--json")
        states = {n["id"]: (n["state"], n["managed"]) for n in json.loads(out)["nics"]}
        assert states == {"cold": ("active", False), "w1": ("active", True), "w2": ("removal_pending", True)}


def test_the_integration_session_has_a_state_dir_of_its_own(state_dir: Path) -> None:
    import os  # noqa: PLC0415

    assert os.environ["QMPNET_STATE_DIR"] == str(state_dir)
    assert not str(state_dir).startswith("/var/lib/qmpnet")
