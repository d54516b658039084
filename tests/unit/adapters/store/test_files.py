"""The state store: atomic, versioned records, one lock per guest, clear errors for a directory it cannot use."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import sys
import threading
from pathlib import Path

import pytest
from waiting import eventually

from qmpnet.adapters.store import StateDir, files, guest_key
from qmpnet.core.model import NicSpec
from qmpnet.core.records import FORMAT_VERSION, GONE_KEPT, DesiredSet, GuestRecord, NicRecord, OperationRecord
from qmpnet.errors import Busy, StoreUnavailable
from qmpnet.settings import Settings


def boot_file(tmp_path: Path, boot: str) -> Path:
    """A stand-in for /proc/sys/kernel/random/boot_id."""
    path = tmp_path / f"boot_id-{boot}"
    path.write_text(f"{boot}\n")
    return path


def nic(nic_id: str) -> NicRecord:
    return NicRecord(id=nic_id, spec=NicSpec(id=nic_id), netdev=f"{nic_id}.net", state="active", link="down")


async def test_a_record_survives_a_new_process_view(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    store = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    store.save(store.record.with_nic(nic("a")))
    store.close()
    again = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    try:
        assert again.record.nics["a"].link == "down"
        assert again.record.version == FORMAT_VERSION
        assert again.key == guest_key("/run/vm1.qmp")
    finally:
        again.close()
    # One file per guest, mode 0700 directory, no temporary files left.
    assert sorted(p.name for p in (tmp_path / "state" / "guests").iterdir()) == sorted(
        [f"{again.key}.json", f"{again.key}.lock"]
    )
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700


async def test_the_key_is_the_address_so_every_process_shares_one_record(tmp_path: Path) -> None:
    assert guest_key("/run/./vm1.qmp") == guest_key("/run/vm1.qmp")
    assert guest_key("/run/vm1.qmp") != guest_key("/run/vm2.qmp")
    assert guest_key("127.0.0.1:4444") != guest_key("127.0.0.1:4445")
    state = StateDir(tmp_path)
    store = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    store.save(store.record.with_nic(nic("a")))
    store.close()
    as_cli = await state.open_guest("/run/vm1.qmp", "/run/vm1.qmp", wait=1)  # the CLI names a guest by its socket
    try:
        assert "a" in as_cli.record.nics
    finally:
        as_cli.close()


async def test_a_second_holder_waits_then_gets_busy_naming_the_holder(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    first = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    try:
        with pytest.raises(Busy, match=rf"pid {os.getpid()}\) holds it; waited 0\.2 s"):
            await state.open_guest("/run/vm1.qmp", "vm1", wait=0.2)
        # Another guest is not held up.
        other = await state.open_guest("/run/vm2.qmp", "vm2", wait=0.2)
        other.close()
    finally:
        first.close()


async def test_a_waiter_gets_the_guest_as_soon_as_the_holder_lets_go(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    first = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    waiter = asyncio.create_task(state.open_guest("/run/vm1.qmp", "vm1", wait=5))
    first.save(first.record.with_nic(nic("a")))
    first.close()
    second = await asyncio.wait_for(waiter, 5)
    try:
        assert "a" in second.record.nics  # it reads what the first holder wrote before letting go
    finally:
        second.close()


async def test_a_killed_holder_never_blocks_the_next_one(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    code = (
        "import asyncio, sys, pathlib; from qmpnet.adapters.store import StateDir\n"
        "async def main():\n"
        f"    s = await StateDir(pathlib.Path({str(tmp_path)!r})).open_guest('/run/vm1.qmp', 'vm1', wait=1)\n"
        "    print('held', flush=True); sys.stdin.read()\n"
        "asyncio.run(main())\n"
    )
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert holder.stdout is not None
        assert (await asyncio.wait_for(holder.stdout.readline(), 10)).strip() == b"held"
        with pytest.raises(Busy):
            await state.open_guest("/run/vm1.qmp", "vm1", wait=0.1)
        holder.kill()
        await holder.wait()
        store = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
        store.close()
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()


async def test_an_unwritable_directory_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreUnavailable) as info:
        await StateDir(blocker / "state").open_guest("/run/vm1.qmp", "vm1", wait=1)
    assert info.value.code == "store_unavailable"
    assert info.value.field == "state_dir"
    assert str(blocker / "state") in info.value.message
    assert "QMPNET_STATE_DIR" in info.value.message
    assert "\n" not in info.value.message


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (json.dumps({"version": FORMAT_VERSION + 1, "address": "/run/vm1.qmp", "name": "vm1"}),
         f"format version {FORMAT_VERSION + 1}"),
        (json.dumps({"version": 0, "address": "/run/vm1.qmp", "name": "vm1"}), "format version 0"),
        ('{"version": 2, "address": "/run/vm1.qmp", "na', "not valid JSON"),  # truncated
        ("[]", "not a JSON object"),
        (json.dumps({"version": FORMAT_VERSION, "address": "/run/vm1.qmp"}), "not a valid guest record"),
    ],
)
async def test_an_unreadable_record_is_moved_aside_never_guessed_never_a_lock_out(
    tmp_path: Path, content: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    state = StateDir(tmp_path, boot_id_file=boot_file(tmp_path, "boot-a"))
    state.check()
    key = guest_key("/run/vm1.qmp")
    path = state.guests / f"{key}.json"
    keep = DesiredSet(generation=3, nics=[NicSpec(id="d1")], source="apply")
    (state.guests / f"{key}.desired.json").write_text(keep.model_dump_json())
    path.write_text(content)
    store = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    try:
        assert store.record.nics == {}
        assert store.record.desired == keep  # the set, in its own file, is not lost with the record
        [discarded] = store.discarded
        assert discarded.file == str(path)
        assert reason in discarded.reason
        aside = [p for p in state.guests.iterdir() if ".corrupt-" in p.name]
        assert [p.name for p in aside] == [Path(discarded.moved_to).name]
        assert aside[0].name.startswith(f"{key}.json.corrupt-")
        assert aside[0].read_text() == content  # nothing is deleted
        # The record is written back whole, in the current format.
        assert json.loads(path.read_text())["version"] == FORMAT_VERSION
    finally:
        store.close()
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "moved aside" in warnings[0].getMessage()
    again = await state.open_guest("/run/vm1.qmp", "vm1", wait=0.1)
    try:
        assert again.discarded == ()  # once only
    finally:
        again.close()


async def test_a_truncated_desired_file_is_moved_aside_too(tmp_path: Path) -> None:
    state = StateDir(tmp_path, boot_id_file=boot_file(tmp_path, "boot-a"))
    store = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    store.save(store.record.with_nic(nic("a")))
    store.close()
    (state.guests / f"{store.key}.desired.json").write_text('{"generation": 1, "ni')
    again = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    try:
        assert "a" in again.record.nics
        assert again.record.desired is None
        assert [d.file for d in again.discarded] == [str(state.guests / f"{store.key}.desired.json")]
    finally:
        again.close()


async def test_a_record_of_an_earlier_boot_keeps_only_its_desired_set(tmp_path: Path) -> None:
    desired = DesiredSet(generation=1, nics=[NicSpec(id="d1")], source="apply")
    state = StateDir(tmp_path, boot_id_file=boot_file(tmp_path, "boot-a"))
    store = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    store.save(store.record.with_nic(nic("a")).with_operation(
        OperationRecord(id="t1", op="nic/add", started=1, finished=2, outcome={"status": "ok"})
    ).model_copy(update={"desired": desired, "instance": "qemu-1", "links": {"x": "down"}}))
    store.close()
    assert json.loads(store.path.read_text())["boot"] == "boot-a"
    same = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    same.close()
    assert set(same.record.nics) == {"a"}  # the same boot: all of it
    rebooted = await StateDir(tmp_path, boot_id_file=boot_file(tmp_path, "boot-b")).open_guest(
        "/run/vm1.qmp", "vm1", wait=1
    )
    try:
        record = rebooted.record
        assert (record.nics, record.operations, record.links, record.instance) == ({}, {}, {}, None)
        assert record.desired == desired
        assert record.boot == "boot-b"
        assert rebooted.discarded == ()  # void, not unreadable: nothing to report
    finally:
        rebooted.close()
    assert json.loads(rebooted.path.read_text())["nics"] == {}  # written back


async def test_a_version_1_record_is_migrated_with_its_desired_set_made_durable(tmp_path: Path) -> None:
    state = StateDir(tmp_path, boot_id_file=boot_file(tmp_path, "boot-a"))
    state.check()
    path = state.guests / f"{guest_key('/run/vm1.qmp')}.json"
    desired = DesiredSet(generation=4, nics=[NicSpec(id="d1")], source="mqtt")
    old = GuestRecord(address="/run/vm1.qmp", name="vm1", nics={"a": nic("a")}, desired=desired)
    path.write_text(json.dumps({**json.loads(old.model_dump_json(exclude={"boot"})), "version": 1}))
    store = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    try:
        assert set(store.record.nics) == {"a"}  # written in this boot (after it began): kept
        assert store.record.desired == desired
        assert store.discarded == ()
    finally:
        store.close()
    on_disk = json.loads(path.read_text())
    assert (on_disk["version"], on_disk["boot"]) == (FORMAT_VERSION, "boot-a")
    assert DesiredSet.model_validate_json(path.with_name(f"{store.key}.desired.json").read_text()) == desired
    # One written before this boot began is of an earlier one: only its set is kept.
    path.write_text(json.dumps({**json.loads(old.model_dump_json(exclude={"boot"})), "version": 1}))
    os.utime(path, (1.0, 1.0))
    again = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    try:
        assert again.record.nics == {}
        assert again.record.desired == desired
    finally:
        again.close()


async def test_after_a_kill_the_records_set_wins_after_a_reboot_the_durable_one(tmp_path: Path) -> None:
    older = DesiredSet(generation=1, nics=[NicSpec(id="d1")])
    newer = DesiredSet(generation=1, nics=[])  # `nic del d1`: the intent was written, then the process was killed
    state = StateDir(tmp_path, boot_id_file=boot_file(tmp_path, "boot-a"))
    store = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    store.save(store.record.model_copy(update={"desired": older}))
    store.close()  # the durable copy holds `older`
    desired_file = state.guests / f"{store.key}.desired.json"
    record = json.loads(store.path.read_text())
    store.path.write_text(json.dumps({**record, "desired": json.loads(newer.model_dump_json())}))
    killed = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    try:
        assert killed.record.desired == newer  # same boot: the record is the newer
        assert DesiredSet.model_validate_json(desired_file.read_text()) == newer  # and made durable at once
    finally:
        killed.close()
    # After a reboot the record (never fsync'd) may be anything: the durable copy is the one.
    store.path.write_text(json.dumps({**record, "desired": json.loads(older.model_dump_json())}))
    rebooted = await StateDir(tmp_path, boot_id_file=boot_file(tmp_path, "boot-b")).open_guest(
        "/run/vm1.qmp", "vm1", wait=1
    )
    try:
        assert rebooted.record.desired == newer
    finally:
        rebooted.close()


async def test_a_burst_of_desired_changes_shares_one_durable_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    write_file = files._write_file  # counts the fsync'd writes

    def counting(tmp: str, path: str, data: bytes, *, sync: bool) -> None:
        if sync:
            synced.append(path)
        write_file(tmp, path, data, sync=sync)

    monkeypatch.setattr(files, "_write_file", counting)
    state = StateDir(tmp_path)
    store = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    desired_file = state.guests / f"{store.key}.desired.json"
    last = DesiredSet()
    try:
        for n in range(5):  # hot-adds one after another: each answered, each changing the set
            last = DesiredSet(nics=[NicSpec(id=f"d{i}") for i in range(n + 1)])
            store.save_later(store.record.model_copy(update={"desired": last}))
            store.flush_soon()
            await asyncio.sleep(0)  # the next change comes before the write-behind is due
        for _ in range(200):
            if desired_file.exists():
                break
            await asyncio.sleep(0.01)  # polls the worker thread's fsync'd write, bounded
        assert DesiredSet.model_validate_json(desired_file.read_text()) == last
    finally:
        store.close()
    assert synced == [str(desired_file)], "each change of the burst paid its own fsync'd write"


async def test_records_are_not_synced_the_desired_set_is_and_follows_the_answer(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    store = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    desired_file = state.guests / f"{store.key}.desired.json"
    try:
        desired = DesiredSet(nics=[NicSpec(id="d1")])
        store.save_later(store.record.with_nic(nic("a")).model_copy(update={"desired": desired}))
        # Nothing is written in the caller's turn: the answer goes first.
        assert "a" in store.record.nics
        assert not desired_file.exists()
        assert not store.path.exists()
        await asyncio.sleep(0)
        assert not store.path.exists()  # nothing until the lane lets go of the call
        store.flush_soon()
        assert not store.path.exists()  # and then WRITE_BEHIND_DELAY later (the answer goes first)
        # The write-behind: the record in the loop, the set in a worker thread.
        await eventually(store.path.exists, what="the record's write-behind")
        assert "a" in json.loads(store.path.read_text())["nics"]
        for _ in range(200):
            if desired_file.exists():
                break
            await asyncio.sleep(0.01)  # polls the worker thread's fsync'd write, bounded
        assert DesiredSet.model_validate_json(desired_file.read_text()) == desired
        store.save(store.record.model_copy(update={"desired": None}))
    finally:
        store.close()  # waits for what is pending
    assert not desired_file.exists()


async def test_a_full_disk_is_store_unavailable_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = StateDir(tmp_path)
    store = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    store.save(store.record.with_nic(nic("a")))
    before, on_disk = store.record, store.path.read_bytes()

    def full(tmp: str, path: str, data: bytes, *, sync: bool) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    try:
        monkeypatch.setattr(files, "_write_file", full)
        with pytest.raises(StoreUnavailable, match="No space left on device") as info:
            await store.save_async(before.with_nic(nic("b")))
        assert info.value.code == "store_unavailable"
        assert info.value.field == "state_dir"
        with pytest.raises(StoreUnavailable):
            store.save(before.with_nic(nic("b")))
        assert store.record is before  # nothing half-applied, in memory or on disk
        assert store.path.read_bytes() == on_disk
    finally:
        monkeypatch.undo()
        store.close()


async def test_a_write_replaces_the_record_whole(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    store = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    try:
        for i in range(20):
            store.save(store.record.with_nic(nic(f"n{i}")))
        on_disk = GuestRecord.model_validate_json(store.path.read_text())
        assert set(on_disk.nics) == {f"n{i}" for i in range(20)}
        assert list(state.guests.glob(".*.tmp")) == []
    finally:
        store.close()


def test_finished_operations_are_pruned_in_flight_ones_kept() -> None:
    record = GuestRecord(address="a", name="a")
    record = record.with_operation(OperationRecord(id="old", op="nic/add", started=1, finished=2, outcome={}))
    record = record.with_operation(OperationRecord(id="new", op="nic/add", started=99, finished=100, outcome={}))
    record = record.with_operation(OperationRecord(id="flight", op="nic/add", started=1))
    assert set(record.pruned(now=101, keep=10).operations) == {"new", "flight"}


def test_gone_nics_are_bounded_and_forgotten_when_the_id_is_reused() -> None:
    record = GuestRecord(address="a", name="a")
    for i in range(GONE_KEPT + 10):
        record = record.with_nic(nic(f"n{i}")).without_nic(f"n{i}", gone_at=float(i))
    assert len(record.gone) == GONE_KEPT
    assert f"n{GONE_KEPT + 9}" in record.gone
    assert "n0" not in record.gone
    assert f"n{GONE_KEPT + 9}" not in record.with_nic(nic(f"n{GONE_KEPT + 9}")).gone


def test_the_test_session_has_a_state_dir_of_its_own(state_dir: Path) -> None:
    # Every qmpnet.connect() and Settings() of the suite (and its subprocesses) must stay off /var/lib/qmpnet.
    assert os.environ["QMPNET_STATE_DIR"] == str(state_dir)
    assert Settings().state_dir == state_dir
    assert not str(state_dir).startswith("/var/lib/qmpnet")


async def test_the_desired_sets_durable_writes_have_a_thread_of_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not the loop's default executor, whose threads the hot path's intent writes (save_async) wait for.
    threads: list[str] = []
    write_file = files._write_file

    def noting(tmp: str, path: str, data: bytes, *, sync: bool) -> None:
        if sync:
            threads.append(threading.current_thread().name)
        write_file(tmp, path, data, sync=sync)

    monkeypatch.setattr(files, "_write_file", noting)
    state = StateDir(tmp_path)
    stores = [await state.open_guest(f"/run/vm{n}.qmp", f"vm{n}", wait=1) for n in range(2)]
    try:
        for store in stores:
            store.save_later(store.record.model_copy(update={"desired": DesiredSet(nics=[NicSpec(id="d1")])}))
            store.flush_soon()
        await eventually(lambda: len(threads) == 2, what="both desired sets written")
    finally:
        for store in stores:
            store.close()
    assert len(set(threads)) == 1, f"the durable writes ran on {threads}"
    assert threads[0].startswith("qmpnet-desired"), threads
