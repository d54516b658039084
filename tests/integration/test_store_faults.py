"""The state store under faults (issue 17), through the CLI and through ``qmpnet serve``, against real QEMU.

* A record that does not parse (truncated, another format version) never locks a guest out: it is moved aside as
  ``<name>.corrupt-<timestamp>``, one warning is logged (``serve`` also publishes ``record_discarded``) and the
  guest is read from QEMU.
* A record of a QEMU instance that is gone, or of an earlier boot, is dropped; the durable desired set is kept.
* A full store answers ``store_unavailable`` (not ``invalid_request``) and changes nothing in QEMU.

QEMU's own view is read over a second monitor (tests/integration/aux_qmp.py), so nothing can hide behind the
answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import needs
import pytest
from aux_qmp import aux_args, hmp
from mqtt_fixtures import Mosquitto, Probe, Serve, wait_online
from test_recovery import no_os_guest, peripheral_nics

from qmpnet.adapters.store import guest_key
from qmpnet.adapters.store.reading import newest_desired, newest_json, read_record_files, slot_paths
from qmpnet.adapters.store.slots import frame
from qmpnet.core.records import FORMAT_VERSION
from qmpnet.testguest import TestMachine

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

pytestmark = [pytest.mark.integration]


async def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str, str]:
    """Run ``qmpnet ARGS`` as a new process (with more environment ``env``)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpnet", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    async with asyncio.timeout(timeout):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def durable_ids(state: Path, qmp: Path | str) -> list[str | None] | None:
    """The NIC ids of the guest's durable desired set as the next process reads it (``None``: no set)."""
    desired = newest_desired(state / "guests", guest_key(str(qmp)))
    return None if desired is None else [spec.id for spec in desired.nics]


def recorded(state: Path, qmp: Path | str) -> dict[str, Any]:
    """The guest's record as the next process reads it (the newest complete slot)."""
    raw = newest_json(state / "guests", guest_key(str(qmp)))
    assert raw is not None
    data: dict[str, Any] = json.loads(raw)
    return data


def truncate_every_slot(state: Path, qmp: Path) -> Path:
    """Cut each slot file of the record short (no complete copy: no kill does that); the file reported."""
    slots = [path for path in slot_paths(state / "guests", guest_key(str(qmp))) if path.exists()]
    for path in slots:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return slots[0]


def another_version(state: Path, qmp: Path) -> Path:
    """Write the record, complete, as a qmpnet of format version 99 would (its next slot); the file reported."""
    guests, key = state / "guests", guest_key(str(qmp))
    found = read_record_files(guests, key, lambda raw, _path: raw, None)
    assert found.slot is not None
    path = slot_paths(guests, key)[1 - found.slot]
    path.write_bytes(frame(found.seq + 1, json.dumps({**recorded(state, qmp), "version": 99}).encode()))
    return path


async def until(ok: Callable[[], bool], timeout: float) -> None:
    """Poll ``ok`` (a file another process writes) until it is true, at most ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while True:
            if ok():
                return
            await asyncio.sleep(0.02)  # a poll with a deadline: a file offers nothing to wait on


async def until_async(read: Callable[[], Awaitable[object]], wanted: object, timeout: float) -> None:
    """Poll ``await read()`` (QEMU's view) until it is ``wanted``, at most ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while True:
            if await read() == wanted:
                return
            await asyncio.sleep(0.1)  # a poll with a deadline: another process changes QEMU


def listed(out: str) -> dict[str, dict[str, object]]:
    return {n["id"]: n for n in json.loads(out)["nics"]}


# ------------------------------------------------------------------------------------- records that do not parse


SPOILED = pytest.mark.parametrize(
    ("spoil", "reason"),
    [(truncate_every_slot, "no complete copy"), (another_version, "format version 99")],
    ids=["truncated", "another-version"],
)


def slot_contents(state: Path, qmp: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in slot_paths(state / "guests", guest_key(str(qmp))) if p.exists()}


def moved_aside(state: Path) -> dict[str, bytes]:
    """The files moved aside, by the name they had."""
    return {p.name.split(".corrupt-")[0]: p.read_bytes() for p in state.glob("guests/*.corrupt-*")}


@SPOILED
async def test_the_cli_moves_an_unreadable_record_aside_and_reads_the_guest_from_qemu(
    tmp_path: Path, spoil: Callable[[Path, Path], Path], reason: str
) -> None:
    state = tmp_path / "state"
    flags = ["--state-dir", str(state)]
    async with no_os_guest(tmp_path) as vm:
        qmp = str(vm.qmp_path)
        rc, _, err = await cli("nic", "add", "--qmp", qmp, "--id", "t1", *flags)
        assert rc == 0, err
        path = spoil(state, vm.qmp_path)
        spoiled = slot_contents(state, vm.qmp_path)
        rc, out, err = await cli("nic", "list", "--qmp", qmp, "--json", *flags)
        assert rc == 0, err
        # One warning, on one line, naming the file, the reason and where it went.
        [warning] = err.splitlines()
        assert warning.startswith("warning: ")
        assert str(path) in warning
        assert reason in warning
        assert "moved aside" in warning
        # The guest as QEMU shows it: t1 is there, no longer known as qmpnet's (its record went aside).
        nics = listed(out)
        assert set(nics) == {"t1"} == await peripheral_nics(vm.workdir)
        assert nics["t1"]["managed"] is False
        assert moved_aside(state) == spoiled  # the record's files, nothing deleted
        assert recorded(state, qmp)["version"] == FORMAT_VERSION  # rebuilt, in the current format
        # Once only; and the guest is served as before.
        rc, _, err = await cli("nic", "add", "--qmp", qmp, "--id", "t2", *flags)
        assert (rc, err) == (0, ""), err
        assert await peripheral_nics(vm.workdir) == {"t1", "t2"}
        assert moved_aside(state) == spoiled


@SPOILED
async def test_serve_publishes_record_discarded_and_serves_the_guest(
    tmp_path: Path, spoil: Callable[[Path, Path], Path], reason: str
) -> None:
    broker_dir = tmp_path / "mq"
    broker_dir.mkdir()
    state = tmp_path / "state"
    broker = Mosquitto(broker_dir).start()
    try:
        async with no_os_guest(tmp_path) as vm:
            rc, _, err = await cli("nic", "add", "--qmp", str(vm.qmp_path), "--id", "s1", "--state-dir", str(state))
            assert rc == 0, err
            path = spoil(state, vm.qmp_path)
            spoiled = slot_contents(state, vm.qmp_path)
            serve = Serve(broker_dir, broker.url, "disc", {"vm": vm.qmp_path}, args=["--state-dir", str(state)])
            async with Probe(broker.url) as probe:
                topic = "qmpnet/disc/guest/vm/event/record_discarded"
                await probe.subscribe(topic, f"probe/{probe.identifier}/response")
                serve.start()
                try:
                    event = (await probe.one(topic, lambda _: True, timeout=30)).json
                    assert event["guest"] == "vm"
                    assert event["record"]["file"] == str(path)
                    assert reason in event["record"]["reason"]
                    moved = Path(event["record"]["moved_to"])
                    assert moved.name.startswith(f"{path.name}.corrupt-")
                    assert moved_aside(state) == spoiled  # the record's files, nothing deleted
                    await wait_online(serve, broker.url, guests_connected=["vm"])
                    answer = await probe.call("qmpnet/disc/guest/vm/request/nic/add", {"nic": {"id": "s2"}})
                    assert answer["status"] == "ok", answer
                    listed_now = await probe.call("qmpnet/disc/guest/vm/request/nic/list", {})
                    assert {n["id"] for n in listed_now["data"]["nics"]} == {"s1", "s2"}
                    assert await peripheral_nics(vm.workdir) == {"s1", "s2"}
                finally:
                    serve.stop()
            warnings = [line for line in serve.log.read_text().splitlines() if "moved aside" in line]
            assert len(warnings) == 1, warnings
    finally:
        broker.stop()


# ---------------------------------------------------------------------------- a dead QEMU, an earlier boot


async def test_a_record_of_a_dead_qemu_is_dropped_and_its_desired_set_kept(tmp_path: Path) -> None:
    state = tmp_path / "state"
    flags = ["--state-dir", str(state)]
    workdir = tmp_path / "dead"
    workdir.mkdir()
    async with TestMachine(None, boot=False, workdir=workdir, name="dead", extra_args=aux_args(workdir)) as vm:
        rc, _, err = await cli("nic", "add", "--qmp", str(vm.qmp_path), "--id", "g1", *flags)
        assert rc == 0, err
        qmp = vm.qmp_path
        old = recorded(state, qmp)
        assert set(old["nics"]) == {"g1"}
        vm.kill()
        await vm.wait_exit(30)
    assert durable_ids(state, qmp) == ["g1"]
    async with TestMachine(None, boot=False, workdir=workdir, name="dead", extra_args=aux_args(workdir)) as vm:
        assert vm.qmp_path == qmp
        rc, out, err = await cli("nic", "list", "--qmp", str(qmp), "--json", *flags)
        assert (rc, err) == (0, ""), err
        assert listed(out) == {}  # no phantom of the dead QEMU's NIC
        assert await peripheral_nics(vm.workdir) == set()
        now = recorded(state, qmp)
        assert now["nics"] == {}
        assert now["instance"] != old["instance"]
        # The desired set is durable and intact: `apply` of it brings the NIC back.
        assert durable_ids(state, qmp) == ["g1"]


async def test_a_record_of_an_earlier_boot_is_dropped_through_the_cli(tmp_path: Path) -> None:
    state = tmp_path / "state"
    boot = tmp_path / "boot_id"
    boot.write_text("boot-a\n")
    env = {"QMPNET_BOOT_ID_FILE": str(boot)}
    flags = ["--state-dir", str(state)]
    async with no_os_guest(tmp_path) as vm:
        qmp = str(vm.qmp_path)
        rc, _, err = await cli("nic", "add", "--qmp", qmp, "--id", "b1", *flags, env=env)
        assert rc == 0, err
        before = recorded(state, qmp)
        assert (before["boot"], set(before["nics"]), len(before["operations"])) == ("boot-a", {"b1"}, 1)
        boot.write_text("boot-b\n")  # as after a reboot (this QEMU stands in for the one started again)
        rc, out, err = await cli("nic", "list", "--qmp", qmp, "--json", *flags, env=env)
        assert (rc, err) == (0, ""), err
        after = recorded(state, qmp)
        assert (after["boot"], after["nics"], after["operations"]) == ("boot-b", {}, {})
        assert listed(out)["b1"]["managed"] is False  # read from QEMU; the void record no longer claims it
        assert durable_ids(state, qmp) == ["b1"]  # kept: it must outlive a reboot


async def test_serve_after_a_reboot_adds_the_desired_set_back_from_the_durable_file(tmp_path: Path) -> None:
    broker_dir = tmp_path / "mq"
    broker_dir.mkdir()
    state = tmp_path / "state"
    boot = tmp_path / "boot_id"
    boot.write_text("boot-a\n")
    env = {"QMPNET_BOOT_ID_FILE": str(boot)}
    workdir = tmp_path / "rb"
    workdir.mkdir()
    broker = Mosquitto(broker_dir).start()
    try:
        async with TestMachine(None, boot=False, workdir=workdir, name="rb", extra_args=aux_args(workdir)) as vm:
            serve = Serve(broker_dir, broker.url, "rb", {"vm": vm.qmp_path}, args=["--state-dir", str(state)], env=env)
            serve.start()
            try:
                await wait_online(serve, broker.url, guests_connected=["vm"])
                async with Probe(broker.url) as probe:
                    await probe.subscribe(f"probe/{probe.identifier}/response")
                    answer = await probe.call("qmpnet/rb/guest/vm/request/nic/add",
                                              {"nic": {"id": "r1", "mac": "52:54:00:0b:00:01"}, "transaction": "t-r1"})
                    assert answer["status"] == "ok", answer
                # The set is synced right after the answer (docs/architecture.md); the crash comes after that.
                await until(lambda: durable_ids(state, vm.qmp_path) == ["r1"], 10)
            finally:
                serve.kill()  # the host goes down: no clean stop
            vm.kill()
            await vm.wait_exit(30)
        boot.write_text("boot-b\n")
        async with TestMachine(None, boot=False, workdir=workdir, name="rb", extra_args=aux_args(workdir)) as vm:
            serve = Serve(broker_dir, broker.url, "rb", {"vm": vm.qmp_path}, args=["--state-dir", str(state)], env=env)
            serve.start()
            try:
                await wait_online(serve, broker.url, guests_connected=["vm"])
                await until_async(lambda: peripheral_nics(vm.workdir), {"r1"}, 30)  # the reconciler adds it back
                record = recorded(state, vm.qmp_path)
                assert record["boot"] == "boot-b"
                assert "t-r1" not in record["operations"]  # the earlier boot's operations are void
                assert "52:54:00:0b:00:01" in await hmp(vm.workdir, "info network")
            finally:
                serve.stop()
    finally:
        broker.stop()


# --------------------------------------------------------------------------------------------- a full store


@contextlib.contextmanager
def tiny_tmpfs(path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs mounted at ``path`` (unmounted afterwards, whatever happened)."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def filled(directory: Path) -> Iterator[None]:
    """``directory``'s file system full (a filler file written until ENOSPC), then freed again."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as out, pytest.raises(OSError, match="No space left on device"):
        _write_forever(out)
    try:
        yield
    finally:
        filler.unlink()


def _write_forever(out: BinaryIO) -> None:
    while True:
        out.write(b"\0" * 4096)


@pytest.fixture
def small_store(tmp_path: Path) -> Iterator[Path]:
    with tiny_tmpfs(tmp_path / "small") as mount:
        yield mount / "state"


@needs.root("mount a tiny tmpfs for the state store")
async def test_a_full_store_is_store_unavailable_through_the_cli_and_nothing_is_half_applied(
    tmp_path: Path, small_store: Path
) -> None:
    flags = ["--state-dir", str(small_store)]
    async with no_os_guest(tmp_path) as vm:
        qmp = str(vm.qmp_path)
        rc, _, err = await cli("nic", "add", "--qmp", qmp, "--id", "f0", *flags)
        assert rc == 0, err
        network = await hmp(vm.workdir, "info network")
        with filled(small_store.parent):
            rc, out, err = await cli("nic", "add", "--qmp", qmp, "--id", "f1", "--json", *flags)
            assert (rc, out) == (1, "")
            assert len(err.splitlines()) == 1, err
            assert err.startswith("error: store_unavailable: state_dir: cannot write")
            assert "No space left on device" in err
            rc, _, err = await cli("nic", "link", "--qmp", qmp, "f0", "down", *flags)
            assert rc == 1
            assert err.startswith("error: store_unavailable: ")
            # Nothing reached QEMU: no device, no netdev, the link as it was.
            assert await peripheral_nics(vm.workdir) == {"f0"}
            assert await hmp(vm.workdir, "info network") == network
            rc, out, err = await cli("nic", "list", "--qmp", qmp, "--json", *flags)  # reading needs no write
            assert (rc, err) == (0, ""), err
            assert listed(out)["f0"]["link"] == "up"
        rc, _, err = await cli("nic", "add", "--qmp", qmp, "--id", "f1", *flags)
        assert (rc, err) == (0, ""), err
        assert await peripheral_nics(vm.workdir) == {"f0", "f1"}


@needs.root("mount a tiny tmpfs for the state store")
async def test_a_full_store_is_store_unavailable_over_mqtt(tmp_path: Path, small_store: Path) -> None:
    broker_dir = tmp_path / "mq"
    broker_dir.mkdir()
    broker = Mosquitto(broker_dir).start()
    try:
        async with no_os_guest(tmp_path) as vm:
            serve = Serve(broker_dir, broker.url, "full", {"vm": vm.qmp_path}, args=["--state-dir", str(small_store)])
            serve.start()
            try:
                await wait_online(serve, broker.url, guests_connected=["vm"])
                async with Probe(broker.url) as probe:
                    await probe.subscribe(f"probe/{probe.identifier}/response")
                    add = "qmpnet/full/guest/vm/request/nic/add"
                    with filled(small_store.parent):
                        answer = await probe.call(add, {"nic": {"id": "m1"}, "transaction": "t-m1"})
                        assert answer["status"] == "error", answer
                        assert answer["error"]["code"] == "store_unavailable"
                        assert answer["error"]["field"] == "state_dir"
                        assert await peripheral_nics(vm.workdir) == set()
                        assert "m1.net" not in await hmp(vm.workdir, "info network")
                    # The disk has room again: the same request is valid and now succeeds.
                    answer = await probe.call(add, {"nic": {"id": "m1"}, "transaction": "t-m1-again"})
                    assert answer["status"] == "ok", answer
                    assert await peripheral_nics(vm.workdir) == {"m1"}
            finally:
                serve.stop()
    finally:
        broker.stop()


@pytest.fixture(autouse=True)
def _no_stray_mounts(tmp_path: Path) -> Iterator[None]:
    yield
    with Path("/proc/mounts").open(encoding="ascii") as mounts:
        assert str(tmp_path) not in mounts.read(), "a tmpfs of the test is still mounted"
