"""Files of the state store: atomic, versioned JSON records and one advisory lock per guest.

Two kinds of file per guest, durable against two different failures (see :mod:`qmpnet.core.records`):

* ``<key>.record-a`` and ``<key>.record-b``, the record (NICs, host resources, operations, boot id, QEMU
  instance), protect against the death of the qmpnet process while QEMU lives on. Each write overwrites the slot
  that does not hold the newest record, in place, as one frame with a write number and a checksum
  (:mod:`.slots`), **without fsync** and without a rename: a write that reached the page cache survives the death
  of the process that made it, and a write cut short by it is torn, never read, so the reader takes the other
  slot: the old record or the new one, never a mix. (Renaming a file over the record, as the store did before,
  makes ext4 start the data's writeback at every write: most of a hot-add's store cost.) A store of one
  ``<key>.json`` per guest, written by an earlier qmpnet, is read and moved into the slots. A host crash takes the
  QEMU processes, taps and bindings the record names with it; the record of an earlier boot is void
  (:meth:`GuestRecord.for_boot`).
* ``<key>.desired-a`` and ``<key>.desired-b``, the desired set, must outlive a reboot: it alternates between its
  two slots the same way, *and* each write is followed by ``fdatasync`` (no rename, so no fsync of the directory
  but once, when a slot file is made), in a worker thread once the call that changed it has been answered
  (:meth:`FileGuestStore.flush_soon`), so an answer never waits for the disk; :meth:`FileGuestStore.close` waits for
  it. The sync follows the first change by ``WRITE_BEHIND_DELAY`` and writes the set as it is then: the changes of a
  burst (hot-adds one after another) share one sync instead of paying one each. The record carries the set too,
  written with each change's intent: after a kill (same boot) the record's set is the newer and wins; after a reboot,
  or when the record is unreadable, the durable slots' does. A ``<key>.desired.json`` written by an earlier qmpnet
  is read and moved into the slots.

A record that cannot be read (not JSON, another format version, invalid, or no complete slot) never locks a guest
out: its files are moved aside as ``<name>.corrupt-<timestamp>`` (nothing is deleted), logged once and reported
(:attr:`FileGuestStore.discarded`, published as the ``record_discarded`` event), and the guest is rebuilt from QEMU.

The lock is ``flock`` on a separate file: it dies with its process, so a killed holder never blocks the next
one, and it conflicts between any two open files, so two ``Guest`` objects in one process are kept apart too.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import fcntl
import hashlib
import logging
import os
import re
import tempfile
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Final

from qmpnet.adapters.store.encoding import RecordEncoder
from qmpnet.adapters.store.reading import (
    BOOT_ID_FILE,
    Unreadable,
    desired_paths,
    legacy_desired_path,
    legacy_path,
    load_any,
    load_record,
    mtime_of,
    read_boot_id,
    read_desired_files,
    read_record_files,
    slot_paths,
)
from qmpnet.adapters.store.slots import NO_DESIRED_SET, SLOT_SUFFIXES, frame_header
from qmpnet.core.records import DesiredSet, GuestRecord
from qmpnet.errors import Busy, StoreUnavailable

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

    from qmpnet.adapters.store.reading import RecordFiles
    from qmpnet.core.model import DiscardedRecord

__all__ = [
    "BOOT_ID_FILE",
    "FileGuestStore",
    "MemoryGuestStore",
    "StateDir",
    "canonical_address",
    "guest_key",
    "read_boot_id",
]

log = logging.getLogger(__name__)

_KEY_CHARS: Final = re.compile(r"[^A-Za-z0-9_.-]+")
#: How often a waiter retries a held lock; the wait as a whole is bounded by the caller's timeout.
_LOCK_POLL: Final = 0.02
#: Seconds from an answered call to the write of what it left pending: its outcome's record (a page-cache write) and
#: the desired set's synced write. A call that follows within this time writes its intent first, and that write
#: carries the outcome before it: a burst of hot-adds costs one record write each (the intent) instead of two, and
#: one sync of the desired set in all (issue 17: the controller's CPU per hot-add). A controller kill in this window
#: leaves the record of the step before, which recovery settles from QEMU; a host crash in it loses the desired
#: change.
WRITE_BEHIND_DELAY: Final = 0.1


class _Unwritten(enum.Enum):
    """What the desired slots hold when the set was read from a legacy ``<key>.desired.json``: not yet that set."""

    LEGACY = enum.auto()


def guest_key(address: str) -> str:
    """The file name stem of the guest at QMP ``address``: readable, and unique by a hash of the address."""
    canonical = canonical_address(address)
    readable = _KEY_CHARS.sub("_", canonical).strip("_.")[-64:] or "guest"
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:12]
    return f"{readable}-{digest}"


def canonical_address(address: str) -> str:
    """A unix socket path made absolute and resolved; ``host:port`` as given."""
    if "/" in address or ":" not in address:
        return os.path.realpath(address)
    return address


class StateDir:
    """The state directory.

    Args:
        root: The directory (created with mode 0700 when missing).
        boot_id_file: Where the current boot's id is read (records of another boot are void).
    """

    def __init__(self, root: Path, *, boot_id_file: Path = BOOT_ID_FILE) -> None:
        self.root = root
        self.guests = root / "guests"
        self.boot = read_boot_id(boot_id_file)
        # The desired sets' synced writes of all its guests, one at a time in a thread of their own (started at
        # the first): off every answer's path, and never holding the default executor's threads.
        self._durable_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qmpnet-desired")

    @property
    def control_socket(self) -> Path:
        """Where a running ``qmpnet serve`` listens for local clients."""
        return self.root / "control.sock"

    def check(self) -> None:
        """Create the directory if needed and check that records can be written there.

        Raises:
            StoreUnavailable: The directory cannot be created or written (the message says why, naming it).
        """
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.guests.mkdir(mode=0o700, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.guests, prefix=".probe-"):
                pass
        except OSError as err:
            reason = err.strerror or str(err)
            raise StoreUnavailable(
                f"state_dir: {self.root} cannot be written ({reason}); set --state-dir or QMPNET_STATE_DIR to a "
                "writable directory",
                field="state_dir",
            ) from err

    async def open_guest(self, address: str, name: str, *, wait: float) -> FileGuestStore:
        """Lock the record of the guest at ``address`` and load it (a fresh one if there is none).

        Waits up to ``wait`` seconds for another qmpnet process holding the guest to let go. A record of an earlier
        boot keeps only its desired set; one that cannot be read is moved aside (see the module docstring); a
        record of format version 1 is migrated. Either way the record is written back in the current format.

        Raises:
            StoreUnavailable: The state directory cannot be written.
            Busy: Another qmpnet process kept the guest for ``wait`` seconds.
        """
        self.check()
        key = guest_key(address)
        lock = await _lock(
            self.guests / f"{key}.lock",
            wait,
            lambda pid, waited: f"guest {address}: another qmpnet process (pid {pid}) holds it; waited {waited:g} s",
        )
        try:
            discarded: list[DiscardedRecord] = []
            durable = read_desired_files(self.guests, key, discarded)
            desired = durable.loaded
            files = read_record_files(
                self.guests, key, lambda raw, path: load_any(raw, boot=self.boot, mtime=mtime_of(path)), discarded
            )
            loaded = files.loaded
            fresh = GuestRecord(address=canonical_address(address), name=name, boot=self.boot)
            record, migrated_from_v1 = loaded or (fresh, False)
            void = self.boot is not None and record.boot != self.boot
            if void and (record.nics or record.operations or record.instance):
                log.info("guest %s: its record is of an earlier boot: only the desired set is kept", address)
            if migrated_from_v1:
                pass  # version 1 kept the set in the record only: it is the one
            elif loaded is None or void:
                # No record of this boot (none, unreadable, or void after a reboot): the durable set is the one.
                record = record.model_copy(update={"desired": desired})
            elif record.desired == desired:
                record = record.model_copy(update={"desired": desired})  # the same set: the same object
            # else the record of this boot is the newer: a killed process wrote it, not yet its durable copy.
            record = record.for_boot(self.boot).model_copy(update={"name": name})
            store = FileGuestStore(
                _SlotPair(slot_paths(self.guests, key), files), record, lock, key,
                desired=_SlotPair(desired_paths(self.guests, key), durable), discarded=discarded,
                desired_on_disk=_Unwritten.LEGACY if durable.legacy else desired, durable_writer=self._durable_writer,
            )
            legacy = files.legacy or durable.legacy
            if migrated_from_v1 or void or discarded or legacy or record.desired is not desired:
                store.rewrite()  # the current format and boot, and the set made durable, in place of what was read
            if files.legacy:
                legacy_path(self.guests, key).unlink()  # its record is in a slot now
            if durable.legacy:
                legacy_desired_path(self.guests, key).unlink()  # its set is in a slot now, synced
        except BaseException:
            os.close(lock)
            raise
        return store

    async def lock_controller(self) -> int:
        """Hold the directory for one ``qmpnet serve`` (its control socket is the directory's own).

        Returns the lock's file descriptor, released when the process ends (or the fd is closed).

        Raises:
            Busy: Another ``qmpnet serve`` uses this state directory.
        """
        self.check()
        return await _lock(
            self.root / "serve.lock", 0, lambda pid, _: f"state_dir: another qmpnet serve (pid {pid}) uses {self.root}"
        )

    def records(self) -> list[GuestRecord]:
        """Every guest record in the directory, without its desired set (unreadable ones are logged, skipped)."""
        keys = {path.name.removesuffix(suffix) for suffix in SLOT_SUFFIXES for path in self.guests.glob(f"*{suffix}")}
        keys |= {path.stem for path in self.guests.glob("*.json") if not path.name.endswith(".desired.json")}
        found = []
        for key in sorted(keys):
            try:
                record = load_record(self.guests, key, boot=self.boot)
            except Unreadable as err:
                log.warning("state_dir: %s: %s", self.guests / key, err)
                continue
            if record is not None:
                found.append(record)
        return found


class FileGuestStore:
    """One guest's record, locked for this process until :meth:`close`.

    The record alternates between two slot files (:mod:`.slots`): each write goes to the slot that does not hold the
    newest record on disk, numbered one past it. A write is a page-cache write made on the caller's thread (the
    event loop's: cheaper than a hop to a worker thread and back); writes are serialised by a lock all the same (a
    tool may close the store from another thread) and numbered in the order they were asked for; a write that finds
    a later one already on disk has nothing left to do, since every record is built from the current one and so
    contains what the earlier ones did. The desired set of the newest record on disk is written durably to its own
    file by :meth:`flush_soon` whenever it is not the object last written.
    """

    def __init__(  # noqa: PLR0913 - the files and what was found in them, keyword-only but the first four
        self,
        slots: _SlotPair,
        record: GuestRecord,
        lock_fd: int,
        key: str,
        *,
        desired: _SlotPair,
        discarded: list[DiscardedRecord] | None = None,
        desired_on_disk: DesiredSet | _Unwritten | None = None,
        durable_writer: Executor | None = None,
    ) -> None:
        self.slots = slots.files
        self.key = key
        self.discarded: tuple[DiscardedRecord, ...] = tuple(discarded or ())
        self._record = record
        self._durable = record  # the newest record known to be on disk
        self._encoder = RecordEncoder()  # each record is built from the one before: it reuses that one's pieces
        self._asked = 0  # writes asked for, numbered
        self._done = 0  # the number of the newest write on disk
        self._io = threading.Lock()
        self._lock_fd: int | None = lock_fd
        self._slots = slots  # the record's
        self._dir_fd: int | None = None
        # statvfs by path (no descriptor held per guest for it); root may use the blocks a file system reserves for it
        self._room = (str(self.slots[0].parent), os.geteuid() == 0)
        self._desired = desired
        self._desired_io = threading.Lock()
        self._desired_on_disk = desired_on_disk  # the set the newest desired slot holds (None: none, or no slot)
        self._behind: asyncio.TimerHandle | None = None  # the write-behind, due WRITE_BEHIND_DELAY after a call
        self._durable_writer = durable_writer  # where the desired set's synced write runs (None: the loop's default)

    @property
    def record(self) -> GuestRecord:
        """The record as last saved (or loaded)."""
        return self._record

    def save(self, record: GuestRecord) -> None:
        """Write ``record`` to the older slot (no fsync, see the module docstring), then make it the current one.

        Only the holder of the guest's lock writes the slots. A changed desired set waits for :meth:`flush_soon`
        (or :meth:`close`).

        Raises:
            StoreUnavailable: The state directory can no longer be written (nothing was changed).
        """
        self._asked += 1
        self._write(self._encoder.encode(record), self._asked, record)
        self._record = record

    def save_later(self, record: GuestRecord) -> None:
        """Make ``record`` the current one now; it is written by the next write, or by :meth:`flush_soon`'s.

        For an outcome that may follow its answer: the next write contains it anyway, :meth:`close` writes it, and
        a process killed before it leaves the record of the step before, which recovery settles. A failed
        write-behind is logged; the record stays the current one and the next write carries it.
        """
        self._asked += 1
        self._record = record

    def flush_soon(self) -> None:
        """``WRITE_BEHIND_DELAY`` from now, write what is still pending: the record, and the desired set durably.

        The guest's lane calls it as it lets go of a call, so the writes follow the call's answer; a call that comes
        meanwhile writes its intent, and with it the record left pending (one write instead of two).
        """
        if self._record is not self._durable or self._durable.desired is not self._desired_on_disk:
            self._schedule()

    def rewrite(self) -> None:
        """Write the current record and desired set now, durably (what :meth:`StateDir.open_guest` read, migrated).

        Raises:
            StoreUnavailable: The state directory can no longer be written.
        """
        self.save(self._record)
        self._write_desired()

    def _schedule(self) -> None:
        if self._behind is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a tool, a test): the write-behind is due at once
            self._write_behind()
            return
        self._behind = loop.call_later(WRITE_BEHIND_DELAY, self._write_behind)

    def _write_behind(self) -> None:
        """Write what is pending: the record here (a page-cache write), the desired set in a worker thread."""
        self._behind = None
        if self._record is not self._durable:
            try:
                self._write(self._encoder.encode(self._record), self._asked, self._record)
            except StoreUnavailable as err:
                log.warning("%s (the record is kept in memory; the next write carries it)", err)
        if self._durable.desired is self._desired_on_disk:
            return
        if self._durable_writer is not None:
            # Handed to the thread as is: nothing awaits the write (close() waits on its lock), so no asyncio future
            # and no wake-up of the loop when it is done (each cost a loop turn and a send on its self-pipe).
            self._durable_writer.submit(self._write_desired_in_thread)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write_desired_logged()
            return
        loop.run_in_executor(None, self._write_desired_logged)

    def _write_desired_in_thread(self) -> None:
        try:
            self._write_desired_logged()
        except Exception:  # nobody awaits the thread's write: what it did not expect is logged here, not lost
            log.exception("guest %s: the desired set's durable write failed; the next change or close writes it",
                          self.key)

    def _write_desired_logged(self) -> None:
        try:
            self._write_desired()
        except StoreUnavailable as err:
            log.warning("%s (the desired set is kept in memory; the next change or close writes it)", err)

    def _write_desired(self) -> None:
        """Make the newest desired slot hold the current set: the older slot overwritten, then ``fdatasync``."""
        with self._desired_io:
            # The set of the newest record on disk: the durable copy never gets ahead of the record, whose set
            # the next process takes after a kill (see StateDir.open_guest).
            desired = self._durable.desired
            if desired is self._desired_on_disk or self._lock_fd is None:
                return  # written already, or closed (close wrote it)
            body = NO_DESIRED_SET if desired is None else desired.model_dump_json().encode()
            self._desired.write(body, directory=self._directory)
            self._desired_on_disk = desired

    def _write(self, data: bytes, number: int, record: GuestRecord) -> None:
        with self._io:
            if number <= self._done:
                return  # a later record (built on this one) is on disk already
            self._slots.write(data, room=self._room)
            self._done, self._durable = number, record

    def _directory(self) -> int:
        if self._dir_fd is None:
            self._dir_fd = os.open(self.slots[0].parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return self._dir_fd

    def close(self) -> None:
        """Write what is pending (the record, the desired set durably), then release the lock. Safe to call twice.

        A write that fails here is logged: the lock is released all the same.
        """
        if self._lock_fd is None:
            return
        if self._behind is not None:
            self._behind.cancel()  # written below, at once
        self._behind = None
        if self._record is not self._durable:
            try:
                self._write(self._encoder.encode(self._record), self._asked, self._record)
            except StoreUnavailable as err:
                log.warning("%s: the last change of guest %s is not recorded", err, self.key)
        self._write_desired_logged()
        with self._io:  # a write under way (a tool's, from another thread) finishes first
            if self._dir_fd is not None:
                os.close(self._dir_fd)
                self._dir_fd = None
        os.close(self._lock_fd)
        self._lock_fd = None


class _SlotPair:
    """Two slot files written in turn (:mod:`.slots`): which holds the newest frame, its write number, their sizes."""

    __slots__ = ("files", "paths", "seq", "sizes", "slot")

    def __init__(self, files: Sequence[Path], found: RecordFiles[Any]) -> None:
        self.files = tuple(files)
        self.paths = tuple(str(path) for path in files)  # str paths on the hot path, no Path objects
        self.slot = found.slot  # the slot holding the newest frame on disk (None: none yet)
        self.seq = found.seq  # its write number
        self.sizes: list[int | None] = list(found.sizes)  # each file's size (None: unknown)

    def write(
        self, body: bytes, *, room: tuple[str, bool] | None = None, directory: Callable[[], int] | None = None
    ) -> None:
        """Frame ``body`` over the slot that does not hold the newest frame, numbered one past it.

        ``room`` (a directory, whether root writes): first refuse unless a new file of the frame's size fits
        (:func:`_check_room`). ``directory`` (its descriptor): a durable write, the slot ``fdatasync``'d and the
        directory fsync'd when the slot file is new.

        Raises:
            StoreUnavailable: The write failed (nothing on disk says it happened).
        """
        slot = 0 if self.slot is None else 1 - self.slot  # never the slot holding the newest frame
        path, seq = self.paths[slot], self.seq + 1
        framed = (frame_header(seq, body), body)  # the frame in its two parts: the body is not copied
        length = len(framed[0]) + len(body)
        try:
            if room is not None:
                _check_room(room[0], length, root=room[1])
            _write_slot(path, framed, self.sizes[slot], sync=directory is not None)
            if directory is not None and not self.sizes[slot]:
                os.fsync(directory())  # a new slot file (or one of unknown size): its name, synced once
        except OSError as err:
            self.sizes[slot] = None  # cut short somewhere: the next write of this slot truncates it
            raise _unavailable(path, err) from err
        self.sizes[slot] = length
        self.slot, self.seq = slot, seq


def _check_room(directory: str, size: int, *, root: bool) -> None:
    """Raise ENOSPC unless the file system of ``directory`` has room for a new file of ``size`` bytes.

    A slot is overwritten in place, so on a full disk a write that fits in the blocks the slot already has would
    succeed. The store refuses it all the same, as it refused every write when each went to a new file: a full disk
    is ``store_unavailable`` every time, before the first QMP command, never a change taken on some writes and
    refused on others. ``root`` may use the blocks reserved for root, as its writes can.
    """
    stat = os.statvfs(directory)
    free = stat.f_bfree if root else stat.f_bavail
    if free * stat.f_frsize < size:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _write_slot(path: str, data: Sequence[bytes], size: int | None, *, sync: bool = False) -> None:
    """``data`` over the slot file at ``path`` (created if missing) from offset 0, cut to its length if it was longer.

    ``data`` is the frame in parts (the header, the body), written one after the other without joining them. No
    rename; ``fdatasync`` with ``sync`` (a desired set), none without (a record; see the module docstring). ``size``
    is the file's size now (``None``: not known).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        length = _pwrite_all(fd, data)
        if size is None or size > length:
            os.ftruncate(fd, length)
        if sync:
            os.fdatasync(fd)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, parts: Sequence[bytes]) -> int:
    """Write ``parts`` one after the other at offset 0 of ``fd`` (one ``pwritev``: they are not joined first).

    Returns their length. A write may be short (a signal, a full disk on the way): what is left is written next.
    """
    length = sum(map(len, parts))
    offset = os.pwritev(fd, parts, 0)
    while offset < length:
        offset += os.pwritev(fd, _after(parts, offset), offset)
    return length


def _after(parts: Sequence[bytes], offset: int) -> list[memoryview]:
    """What follows the first ``offset`` bytes of ``parts`` (taken one after the other), as views: no copy."""
    rest = []
    for part in parts:
        if offset < len(part):
            rest.append(memoryview(part)[offset:])
        offset = max(offset - len(part), 0)
    return rest


def _unavailable(path: str, err: OSError) -> StoreUnavailable:
    return StoreUnavailable(f"state_dir: cannot write {path} ({err.strerror or err})", field="state_dir")


class MemoryGuestStore:
    """A record kept in memory only: for unit tests and throw-away tools, never for a real guest."""

    def __init__(self, record: GuestRecord | None = None, *, key: str = "guest") -> None:
        self._record = record or GuestRecord(address="memory", name=key)
        self.key = key
        self.saves = 0
        self.discarded: tuple[DiscardedRecord, ...] = ()

    @property
    def record(self) -> GuestRecord:
        """The record as last saved."""
        return self._record

    def save(self, record: GuestRecord) -> None:
        """Keep ``record``."""
        self._record = record
        self.saves += 1

    def save_later(self, record: GuestRecord) -> None:
        """Keep ``record`` (as :meth:`save`)."""
        self.save(record)

    def flush_soon(self) -> None:
        """Nothing is pending."""

    def close(self) -> None:
        """Nothing to release."""


async def _lock(path: Path, wait: float, busy: Callable[[str, float], str]) -> int:
    """Lock ``path`` within ``wait`` seconds, or raise ``Busy(busy(holder_pid, wait))``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        await _wait_for_lock(fd, wait, busy)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


async def _wait_for_lock(fd: int, wait: float, busy: Callable[[str, float], str]) -> None:
    deadline = time.monotonic() + wait
    while not _try_lock(fd):
        if time.monotonic() >= deadline:
            raise Busy(busy(os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown", wait))
        await asyncio.sleep(_LOCK_POLL)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        return False
    return True
