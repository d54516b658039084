"""The state store: atomic, versioned records, one lock per guest, clear errors for a directory it cannot use.

A record alternates between two slot files written in place, each framed with a write number and a checksum
(``qmpnet.adapters.store.slots``): the tests here write torn and spoiled slots as a killed process or a hand edit
leaves them.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pytest
from waiting import eventually

from qmpnet.adapters.store import StateDir, files, guest_key
from qmpnet.adapters.store.encoding import encode_record
from qmpnet.adapters.store.reading import desired_paths, newest_desired, newest_json, read_record_files, slot_paths
from qmpnet.adapters.store.slots import frame, frame_header
from qmpnet.core.model import NicSpec
from qmpnet.core.records import FORMAT_VERSION, GONE_KEPT, DesiredSet, GuestRecord, NicRecord, OperationRecord
from qmpnet.errors import Busy, StoreUnavailable
from qmpnet.settings import Settings

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence


def boot_file(tmp_path: Path, boot: str) -> Path:
    """A stand-in for /proc/sys/kernel/random/boot_id."""
    path = tmp_path / f"boot_id-{boot}"
    path.write_text(f"{boot}\n")
    return path


def nic(nic_id: str) -> NicRecord:
    return NicRecord(id=nic_id, spec=NicSpec(id=nic_id), netdev=f"{nic_id}.net", state="active", link="down")


def on_disk(state: StateDir, key: str) -> dict[str, Any]:
    """The record as the next process reads it."""
    raw = newest_json(state.guests, key)
    assert raw is not None
    data: dict[str, Any] = json.loads(raw)
    return data


def write_next(state: StateDir, key: str, body: bytes) -> Path:
    """Write ``body`` as the store's next write would (the other slot, numbered one past the newest); its slot."""
    found = read_record_files(state.guests, key, lambda raw, _path: raw, None)
    slot = 0 if found.slot is None else 1 - found.slot
    path = slot_paths(state.guests, key)[slot]
    path.write_bytes(frame(found.seq + 1, body))
    return path


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
    # One write so far: one slot file, mode 0700 directory, no temporary files left.
    assert sorted(p.name for p in (tmp_path / "state" / "guests").iterdir()) == sorted(
        [f"{again.key}.record-a", f"{again.key}.lock"]
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


@pytest.mark.parametrize("where", ["slot", "legacy"])  # a complete slot; the single file of an earlier qmpnet
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
    tmp_path: Path, content: str, reason: str, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    state = StateDir(tmp_path, boot_id_file=boot_file(tmp_path, "boot-a"))
    state.check()
    key = guest_key("/run/vm1.qmp")
    keep = DesiredSet(generation=3, nics=[NicSpec(id="d1")], source="apply")
    (state.guests / f"{key}.desired.json").write_text(keep.model_dump_json())
    if where == "slot":
        path = slot_paths(state.guests, key)[1]
        path.write_bytes(frame(7, content.encode()))  # its checksum checks out: what it says is the problem
        written = path.read_bytes()
    else:
        path = state.guests / f"{key}.json"
        path.write_text(content)
        written = content.encode()
    store = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    try:
        assert store.record.nics == {}
        assert store.record.desired == keep  # the set, in its own file, is not lost with the record
        [discarded] = store.discarded
        assert discarded.file == str(path)
        assert reason in discarded.reason
        aside = [p for p in state.guests.iterdir() if ".corrupt-" in p.name]
        assert [p.name for p in aside] == [Path(discarded.moved_to).name]
        assert aside[0].name.startswith(f"{path.name}.corrupt-")
        assert aside[0].read_bytes() == written  # nothing is deleted
        # The record is written back whole, in the current format, in a slot.
        assert on_disk(state, key)["version"] == FORMAT_VERSION
        assert not (state.guests / f"{key}.json").exists()
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


async def _two_writes(state: StateDir) -> tuple[str, GuestRecord]:
    """A guest whose record was written twice (both slots in use): its key and its newest record."""
    store = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    try:
        store.save(store.record.with_nic(nic("a")))
        store.save(store.record.with_nic(nic("b")))
    finally:
        store.close()
    assert all(path.exists() for path in slot_paths(state.guests, store.key))
    return store.key, store.record


@pytest.mark.parametrize(
    "tear",
    [
        lambda new, _old: new[: len(new) // 2],  # cut short: a short file
        lambda new, old: new[: len(new) // 2] + old[len(new) // 2 :],  # the new start over the old rest
        lambda new, _old: new[:20],  # even the header cut short
        lambda _new, _old: b"",  # created, nothing written
    ],
    ids=["short", "over-the-old", "header", "empty"],
)
async def test_a_write_cut_short_by_a_kill_is_never_read_the_write_before_it_is(
    tmp_path: Path, tear: Callable[[bytes, bytes], bytes], caplog: pytest.LogCaptureFixture
) -> None:
    state = StateDir(tmp_path)
    key, before = await _two_writes(state)
    # The killed process's next write: into the slot of the write before the newest, numbered past the newest.
    found = read_record_files(state.guests, key, lambda raw, _path: raw, None)
    assert found.slot is not None
    older = slot_paths(state.guests, key)[1 - found.slot]
    new = frame(found.seq + 1, before.with_nic(nic("c")).model_dump_json().encode())
    older.write_bytes(tear(new, older.read_bytes()))
    store = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    try:
        assert store.record == before  # the newest complete write; "c" never happened
        assert store.discarded == ()  # a torn slot is a write that did not happen, not an unreadable record
        store.save(store.record.with_nic(nic("d")))  # into the torn slot: the newest complete one is kept
        assert set(GuestRecord.model_validate(on_disk(state, key)).nics) == {"a", "b", "d"}
    finally:
        store.close()
    assert not [p for p in state.guests.iterdir() if ".corrupt-" in p.name]
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


async def test_bytes_after_a_complete_frame_are_ignored(tmp_path: Path) -> None:
    # A longer record was in the slot, and the process died after writing the new one but before cutting the file.
    state = StateDir(tmp_path)
    key, before = await _two_writes(state)
    path = write_next(state, key, before.with_nic(nic("c")).model_dump_json().encode())
    path.write_bytes(path.read_bytes() + b"the rest of a longer, older record")
    store = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    try:
        assert set(store.record.nics) == {"a", "b", "c"}
        store.save(store.record.without_nic("c", gone_at=1.0))
    finally:
        store.close()
    assert set(on_disk(state, key)["nics"]) == {"a", "b"}


@pytest.mark.parametrize("count", [1, 2])
async def test_no_complete_slot_is_an_unreadable_record_moved_aside(
    tmp_path: Path, count: int, caplog: pytest.LogCaptureFixture
) -> None:
    # A kill tears one slot at most: two torn ones were changed by something else (a hand edit, the disk). One torn
    # slot alone is the guest's first write cut short. Either way there is no record: the files go aside, once.
    state = StateDir(tmp_path)
    key, _ = await _two_writes(state)
    slots = slot_paths(state.guests, key)
    for path in slots[:count]:
        path.write_bytes(path.read_bytes()[:-5])
    for path in slots[count:]:
        path.unlink()
    store = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    try:
        assert store.record.nics == {}
        [discarded] = store.discarded
        assert discarded.file == str(slots[0])
        assert "no complete copy" in discarded.reason
        assert "truncated" in discarded.reason
        aside = sorted(p.name for p in state.guests.iterdir() if ".corrupt-" in p.name)
        assert [name.split(".corrupt-")[0] for name in aside] == [p.name for p in slots[:count]]
        assert Path(discarded.moved_to).name == aside[0]
    finally:
        store.close()
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "moved aside" in warning


async def test_a_record_of_the_single_file_format_is_read_and_moved_into_the_slots(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.check()
    key = guest_key("/run/vm1.qmp")
    legacy = state.guests / f"{key}.json"
    old = GuestRecord(address="/run/vm1.qmp", name="vm1", nics={"a": nic("a")}, boot=state.boot)
    legacy.write_text(old.model_dump_json())  # as qmpnet wrote it before the slots: whole, renamed into place
    store = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    try:
        assert set(store.record.nics) == {"a"}
        assert store.discarded == ()
        assert not legacy.exists()  # moved into a slot
        assert set(on_disk(state, key)["nics"]) == {"a"}
    finally:
        store.close()
    # Killed after the slot's write, before the file was removed: the slot is the newer, the file goes (when the
    # guest is next taken; a reader that does not hold its lock changes nothing).
    legacy.write_text(old.model_copy(update={"nics": {}}).model_dump_json())
    assert set(on_disk(state, key)["nics"]) == {"a"}
    assert legacy.exists()
    again = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    try:
        assert set(again.record.nics) == {"a"}
        assert not legacy.exists()
    finally:
        again.close()


async def test_each_write_leaves_the_newest_record_on_disk_untouched(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    store = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    slots = slot_paths(state.guests, store.key)
    try:
        for i in range(6):
            found = read_record_files(state.guests, store.key, lambda raw, _path: raw, None)
            newest = None if found.slot is None else (slots[found.slot], slots[found.slot].read_bytes())
            store.save(store.record.with_nic(nic(f"n{i}")))
            if newest is not None:
                assert newest[0].read_bytes() == newest[1], "a write touched the slot of the newest record"
            assert set(on_disk(state, store.key)["nics"]) == {f"n{j}" for j in range(i + 1)}
        assert len(state.records()) == 1
        assert set(state.records()[0].nics) == {f"n{j}" for j in range(6)}
    finally:
        store.close()


@pytest.mark.parametrize("where", ["slot", "legacy"])
async def test_a_truncated_desired_set_is_moved_aside_too(tmp_path: Path, where: str) -> None:
    state = StateDir(tmp_path, boot_id_file=boot_file(tmp_path, "boot-a"))
    store = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    store.save(store.record.with_nic(nic("a")))
    store.close()
    truncated = b'{"generation": 1, "ni'
    if where == "slot":  # framed whole (its checksum checks out): what it holds is the problem
        path = desired_paths(state.guests, store.key)[0]
        path.write_bytes(frame(1, truncated))
    else:  # the single file of an earlier qmpnet
        path = state.guests / f"{store.key}.desired.json"
        path.write_bytes(truncated)
    again = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    try:
        assert "a" in again.record.nics
        assert again.record.desired is None
        assert [d.file for d in again.discarded] == [str(path)]
        assert not path.exists()
        assert [p.name.partition(".corrupt-")[0] for p in state.guests.glob("*.corrupt-*")] == [path.name]
    finally:
        again.close()


async def test_a_desired_set_of_an_earlier_qmpnet_is_moved_into_its_slots_synced(tmp_path: Path) -> None:
    state = StateDir(tmp_path, boot_id_file=boot_file(tmp_path, "boot-a"))
    state.check()
    key = guest_key("/run/vm1.qmp")
    desired = DesiredSet(generation=2, nics=[NicSpec(id="d1")], source="apply")
    legacy = state.guests / f"{key}.desired.json"
    legacy.write_text(desired.model_dump_json())  # temp file and rename, as an earlier qmpnet wrote it
    store = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    try:
        assert store.record.desired == desired
        assert store.discarded == ()
        assert not legacy.exists()
        assert newest_desired(state.guests, key) == desired
        assert [path.exists() for path in desired_paths(state.guests, key)] == [True, False]
    finally:
        store.close()
    # A migration killed after its slot was written, before the file went: the slot is the newer, the file goes.
    newer = DesiredSet(generation=3, nics=[], source="apply")
    store = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    store.save(store.record.model_copy(update={"desired": newer}))
    store.close()
    legacy.write_text(desired.model_dump_json())
    again = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    try:
        assert again.record.desired == newer
        assert not legacy.exists()
    finally:
        again.close()


async def test_the_desired_set_alternates_slots_and_a_torn_one_is_the_write_that_did_not_happen(
    tmp_path: Path,
) -> None:
    state = StateDir(tmp_path, boot_id_file=boot_file(tmp_path, "boot-a"))
    store = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    sets = [DesiredSet(generation=n, nics=[NicSpec(id=f"d{i}") for i in range(n)]) for n in range(1, 4)]
    slots = desired_paths(state.guests, store.key)
    try:
        for n, each in enumerate(sets):
            store.save(store.record.model_copy(update={"desired": each}))
            older = slots[n % 2 - 1].read_bytes() if n else None
            store.rewrite()  # the set synced now
            assert newest_desired(state.guests, store.key) == each
            if older is not None:
                assert slots[n % 2 - 1].read_bytes() == older, "a write touched the slot of the newest set"
        store.save(store.record.model_copy(update={"desired": None}))
        store.rewrite()
        assert newest_desired(state.guests, store.key) is None  # "no set", written over the older slot
        assert slots[1].read_bytes().endswith(b"\nnull")
    finally:
        store.close()
    # A power cut in the middle of the last write: that slot is torn, the other holds the set synced before it.
    slots[1].write_bytes(slots[1].read_bytes()[:20])
    cut = await StateDir(tmp_path, boot_id_file=boot_file(tmp_path, "boot-b")).open_guest(
        "/run/vm1.qmp", "vm1", wait=1
    )
    try:
        assert cut.record.desired == sets[2]
        assert cut.discarded == ()
    finally:
        cut.close()


async def test_a_record_of_an_earlier_boot_keeps_only_its_desired_set(tmp_path: Path) -> None:
    desired = DesiredSet(generation=1, nics=[NicSpec(id="d1")], source="apply")
    state = StateDir(tmp_path, boot_id_file=boot_file(tmp_path, "boot-a"))
    store = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    store.save(store.record.with_nic(nic("a")).with_operation(
        OperationRecord(id="t1", op="nic/add", started=1, finished=2, outcome={"status": "ok"})
    ).model_copy(update={"desired": desired, "instance": "qemu-1", "links": {"x": "down"}}))
    store.close()
    assert on_disk(state, store.key)["boot"] == "boot-a"
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
    assert on_disk(state, rebooted.key)["nics"] == {}  # written back


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
    written = on_disk(state, store.key)
    assert (written["version"], written["boot"]) == (FORMAT_VERSION, "boot-a")
    assert not path.exists()  # moved into a slot
    assert newest_desired(state.guests, store.key) == desired
    # One written before this boot began is of an earlier one: only its set is kept.
    for slot in slot_paths(state.guests, store.key):
        slot.unlink(missing_ok=True)  # only the version 1 file, as an earlier qmpnet left it
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
    record = on_disk(state, store.key)
    write_next(state, store.key, json.dumps({**record, "desired": json.loads(newer.model_dump_json())}).encode())
    killed = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    try:
        assert killed.record.desired == newer  # same boot: the record is the newer
        assert newest_desired(state.guests, store.key) == newer  # and made durable at once
    finally:
        killed.close()
    # After a reboot the record (never fsync'd) may be anything: the durable copy is the one.
    write_next(state, store.key, json.dumps({**record, "desired": json.loads(older.model_dump_json())}).encode())
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
    write_slot = files._write_slot  # counts the synced writes

    def counting(path: str, data: Sequence[bytes], size: int | None, *, sync: bool = False) -> None:
        if sync:
            synced.append(path)
        write_slot(path, data, size, sync=sync)

    monkeypatch.setattr(files, "_write_slot", counting)
    state = StateDir(tmp_path)
    store = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    desired_file = desired_paths(state.guests, store.key)[0]
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
            await asyncio.sleep(0.01)  # polls the worker thread's synced write, bounded
        assert newest_desired(state.guests, store.key) == last
    finally:
        store.close()
    assert synced == [str(desired_file)], "each change of the burst paid its own synced write"


async def test_records_are_not_synced_the_desired_set_is_and_follows_the_answer(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    store = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    desired_file = desired_paths(state.guests, store.key)[0]
    first_slot = store.slots[0]
    try:
        desired = DesiredSet(nics=[NicSpec(id="d1")])
        store.save_later(store.record.with_nic(nic("a")).model_copy(update={"desired": desired}))
        # Nothing is written in the caller's turn: the answer goes first.
        assert "a" in store.record.nics
        assert not desired_file.exists()
        assert not first_slot.exists()
        await asyncio.sleep(0)
        assert not first_slot.exists()  # nothing until the lane lets go of the call
        store.flush_soon()
        assert not first_slot.exists()  # and then WRITE_BEHIND_DELAY later (the answer goes first)
        # The write-behind: the record in the loop, the set in a worker thread.
        await eventually(first_slot.exists, what="the record's write-behind")
        assert "a" in on_disk(state, store.key)["nics"]
        for _ in range(200):
            if desired_file.exists():
                break
            await asyncio.sleep(0.01)  # polls the worker thread's synced write, bounded
        assert newest_desired(state.guests, store.key) == desired
        store.save(store.record.model_copy(update={"desired": None}))
    finally:
        store.close()  # waits for what is pending
    assert newest_desired(state.guests, store.key) is None


@pytest.mark.parametrize("written", [0, 100])  # bytes of the slot written before the disk was full
async def test_a_full_disk_is_store_unavailable_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, written: int
) -> None:
    state = StateDir(tmp_path)
    store = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    store.save(store.record.with_nic(nic("a")))
    before, newest = store.record, newest_json(state.guests, store.key)
    write_slot = files._write_slot

    def full(path: str, data: Sequence[bytes], size: int | None, *, sync: bool = False) -> None:
        if written:
            write_slot(path, (b"".join(data)[:written],), size)  # what a write that fails halfway leaves
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    try:
        monkeypatch.setattr(files, "_write_slot", full)
        with pytest.raises(StoreUnavailable, match="No space left on device") as info:
            store.save(before.with_nic(nic("b")))
        assert info.value.code == "store_unavailable"
        assert info.value.field == "state_dir"
        with pytest.raises(StoreUnavailable):
            store.save(before.with_nic(nic("b")))
        assert store.record is before  # nothing half-applied, in memory or on disk
        assert newest_json(state.guests, store.key) == newest
        monkeypatch.undo()
        store.save(before.with_nic(nic("c")))  # space again: the cut-short slot is written whole
        assert set(on_disk(state, store.key)["nics"]) == {"a", "c"}
    finally:
        monkeypatch.undo()
        store.close()
    reopened = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    try:
        assert set(reopened.record.nics) == {"a", "c"}
        assert reopened.discarded == ()
    finally:
        reopened.close()


async def test_a_full_disk_is_refused_even_where_the_slot_has_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An overwrite in place would fit in the slot's blocks; the store refuses it as it refused a new file's write.
    state = StateDir(tmp_path)
    store = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    store.save(store.record.with_nic(nic("a")))
    store.save(store.record.with_nic(nic("b")))
    real = os.statvfs(store.slots[0].parent)
    full = os.statvfs_result((real.f_bsize, real.f_frsize, real.f_blocks, 0, 0, *real[5:]))
    try:
        monkeypatch.setattr(os, "statvfs", lambda _path: full)
        with pytest.raises(StoreUnavailable, match="No space left on device"):
            store.save(store.record.without_nic("b", gone_at=1.0))
        assert set(on_disk(state, store.key)["nics"]) == {"a", "b"}
    finally:
        monkeypatch.undo()
        store.close()


async def test_a_write_replaces_the_record_whole(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    store = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    try:
        for i in range(20):
            store.save(store.record.with_nic(nic(f"n{i}")))
        written = GuestRecord.model_validate(on_disk(state, store.key))
        assert set(written.nics) == {f"n{i}" for i in range(20)}
        assert list(state.guests.glob(".*.tmp")) == []
        # Shorter again: each slot is cut to its frame's length (no stale tail left behind).
        for i in range(20):
            store.save(store.record.without_nic(f"n{i}", gone_at=float(i)))
        for path in store.slots:
            assert path.read_bytes().endswith(b"}")
    finally:
        store.close()


_PWRITEV: Final = os.pwritev  # the real one, for the short writers below


def _first_part(fd: int, buffers: Sequence[bytes], offset: int) -> int:
    return _PWRITEV(fd, buffers[:1], offset)  # each short write stops where a part ends


def _a_few_bytes(fd: int, buffers: Sequence[bytes], offset: int) -> int:
    return _PWRITEV(fd, [b"".join(buffers)[:7]], offset)  # each stops anywhere, in the header or the record


@pytest.mark.parametrize("short", [_first_part, _a_few_bytes])
async def test_a_short_write_goes_on_where_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, short: Callable[[int, Sequence[bytes], int], int]
) -> None:
    # The header and the record go to the slot with one pwritev, which may write only a part of them.
    state = StateDir(tmp_path)
    store = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    try:
        monkeypatch.setattr(os, "pwritev", short)
        for i in range(3):
            store.save(store.record.with_nic(nic(f"n{i}")))
    finally:
        monkeypatch.undo()
        store.close()
    found = read_record_files(state.guests, store.key, lambda raw, _path: raw, None)
    assert found.slot is not None
    body = encode_record(store.record)
    assert store.slots[found.slot].read_bytes() == frame(found.seq, body)  # exactly the frame, nothing after it
    assert frame(found.seq, body) == frame_header(found.seq, body) + body


def test_finished_operations_are_pruned_in_flight_ones_kept() -> None:
    record = GuestRecord(address="a", name="a")
    record = record.with_operation(OperationRecord(id="old", op="nic/add", started=1, finished=2, outcome={}))
    record = record.with_operation(OperationRecord(id="new", op="nic/add", started=99, finished=100, outcome={}))
    record = record.with_operation(OperationRecord(id="flight", op="nic/add", started=1))
    assert set(record.pruned(now=101, keep=10).operations) == {"new", "flight"}
    assert record.pruned(now=12, keep=10) is record  # the oldest finished exactly keep seconds ago: kept
    assert set(record.pruned(now=12.5, keep=10).operations) == {"new", "flight"}
    assert record.pruned(now=111, keep=1000) is record
    assert set(record.pruned(now=111, keep=0).operations) == {"flight"}
    in_flight = GuestRecord(address="a", name="a").with_operation(OperationRecord(id="f", op="nic/add", started=1))
    assert in_flight.pruned(now=1e9, keep=0) is in_flight


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
    # Not the loop's default executor, which the rest of the process shares.
    threads: list[str] = []
    write_slot = files._write_slot

    def noting(path: str, data: Sequence[bytes], size: int | None, *, sync: bool = False) -> None:
        if sync:
            threads.append(threading.current_thread().name)
        write_slot(path, data, size, sync=sync)

    monkeypatch.setattr(files, "_write_slot", noting)
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


async def test_a_failure_the_durable_write_did_not_expect_is_logged_and_the_set_written_at_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Nothing awaits the thread's write: an error it did not expect must not vanish with it.
    write_slot = files._write_slot
    failing = [True]

    def broken(path: str, data: Sequence[bytes], size: int | None, *, sync: bool = False) -> None:
        if sync and failing[0]:
            raise RuntimeError("a bug in the durable write")
        write_slot(path, data, size, sync=sync)

    monkeypatch.setattr(files, "_write_slot", broken)
    state = StateDir(tmp_path)
    store = await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    desired = DesiredSet(nics=[NicSpec(id="d1")])
    try:
        store.save_later(store.record.model_copy(update={"desired": desired}))
        store.flush_soon()
        await eventually(lambda: "durable write failed" in caplog.text, what="the thread's failure logged")
        assert "a bug in the durable write" in caplog.text  # with its traceback
        assert newest_desired(state.guests, store.key) is None
        failing[0] = False
    finally:
        store.close()  # writes what is still pending
    assert newest_desired(state.guests, store.key) == desired
