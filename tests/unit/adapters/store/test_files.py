"""The state store: atomic, versioned records, one lock per guest, clear errors for a directory it cannot use."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import TYPE_CHECKING

import pytest

from qmpnet.adapters.store import StateDir, guest_key
from qmpnet.core.model import NicSpec
from qmpnet.core.records import FORMAT_VERSION, GONE_KEPT, GuestRecord, NicRecord, OperationRecord
from qmpnet.errors import Busy, InvalidRequest, Unsupported
from qmpnet.settings import Settings

if TYPE_CHECKING:
    from pathlib import Path


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
    with pytest.raises(InvalidRequest) as info:
        await StateDir(blocker / "state").open_guest("/run/vm1.qmp", "vm1", wait=1)
    assert info.value.field == "state_dir"
    assert str(blocker / "state") in info.value.message
    assert "QMPNET_STATE_DIR" in info.value.message
    assert "\n" not in info.value.message


async def test_a_record_of_another_version_is_refused_not_guessed(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.check()
    path = state.guests / f"{guest_key('/run/vm1.qmp')}.json"
    path.write_text(json.dumps({"version": FORMAT_VERSION + 1, "address": "/run/vm1.qmp", "name": "vm1"}))
    with pytest.raises(Unsupported, match=f"format version {FORMAT_VERSION + 1}"):
        await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    path.write_text("{half a rec")
    with pytest.raises(Unsupported, match="not valid JSON"):
        await state.open_guest("/run/vm1.qmp", "vm1", wait=1)
    # The lock was released after each failure.
    path.unlink()
    store = await state.open_guest("/run/vm1.qmp", "vm1", wait=0.1)
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
